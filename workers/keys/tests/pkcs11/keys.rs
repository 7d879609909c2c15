//! Key pairs and symmetric keys on a SoftHSM2 token.

use aziot_keys::{
    EncryptMechanism, KeyBackend, KeyPairParameter, KeyUsage, SignMechanism, ALGORITHM_EC, ALGORITHM_RSA,
};
use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcKey, EcPoint};
use openssl::ecdsa::EcdsaSig;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::PKey;
use openssl::rsa::{Padding, Rsa};
use openssl::sign::Signer;
use openssl::symm::{decrypt_aead, Cipher};

use crate::{is_external, is_invalid, pkcs11_tool, token_store, PIN};

#[test]
fn ec_key_pair_lifecycle_and_cross_checks() {
    let Some((_home, store, label)) = token_store("ec") else {
        return;
    };
    store.create_key_pair_if_not_exists("device-id", Some("ec-p256")).unwrap();
    // Idempotent.
    store.create_key_pair_if_not_exists("device-id", Some("ec-p256")).unwrap();
    store.load_key_pair("device-id").unwrap();

    // pkcs11-tool sees the generated pair under the key ID as label.
    let listing =
        String::from_utf8(pkcs11_tool(&["--token-label", &label, "--login", "--pin", PIN, "--list-objects"])).unwrap();
    assert!(listing.contains("label:      device-id"), "{listing}");
    assert!(listing.contains("Private Key Object; EC"), "{listing}");

    assert_eq!(
        store.get_key_pair_parameter("device-id", KeyPairParameter::Algorithm).unwrap(),
        ALGORITHM_EC.to_ne_bytes()
    );
    assert_eq!(
        store.get_key_pair_parameter("device-id", KeyPairParameter::EcCurveOid).unwrap(),
        [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]
    );
    let point = store.get_key_pair_parameter("device-id", KeyPairParameter::EcPoint).unwrap();
    assert_eq!(point.len(), 33);
    assert!(point[0] == 2 || point[0] == 3);
    assert!(is_invalid(store.get_key_pair_parameter("device-id", KeyPairParameter::RsaModulus)));

    // Sign a digest; verify with OpenSSL against the public key pkcs11-tool reads (DER SPKI).
    let digest = openssl::sha::sha256(b"hello from the token");
    let der_sig = store.sign("device-id", SignMechanism::Ecdsa, &digest).unwrap();
    let spki = pkcs11_tool(&["--token-label", &label, "--read-object", "--type", "pubkey", "--label", "device-id"]);
    let public = PKey::public_key_from_der(&spki).unwrap().ec_key().unwrap();
    assert!(EcdsaSig::from_der(&der_sig).unwrap().verify(&digest, &public).unwrap());
    let other = openssl::sha::sha256(b"something else");
    assert!(!EcdsaSig::from_der(&der_sig).unwrap().verify(&other, &public).unwrap());
    // The compressed point we report is the same key.
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let mut ctx = BigNumContext::new().unwrap();
    let ours = EcPoint::from_bytes(&group, &point, &mut ctx).unwrap();
    assert!(ours.eq(&group, public.public_key(), &mut ctx).unwrap());

    // Move (relabel), then delete.
    store.create_key_pair_if_not_exists("target", Some("ec-p256")).unwrap();
    store.move_key_pair("device-id", "target").unwrap();
    assert!(is_invalid(store.load_key_pair("device-id")));
    let pkey = EcKey::from_public_key(&group, &ours).unwrap();
    let sig = store.sign("target", SignMechanism::Ecdsa, &digest).unwrap();
    assert!(EcdsaSig::from_der(&sig).unwrap().verify(&digest, &pkey).unwrap());
    store.delete_key_pair("target").unwrap();
    assert!(store.load_key_pair("target").is_err());
    let listing =
        String::from_utf8(pkcs11_tool(&["--token-label", &label, "--login", "--pin", PIN, "--list-objects"])).unwrap();
    assert!(!listing.contains("label:      target"), "{listing}");
}

#[test]
fn rsa_key_pairs() {
    let Some((_home, store, _label)) = token_store("rsa") else {
        return;
    };
    // The first algorithm the token accepts wins.
    store.create_key_pair_if_not_exists("rsa", Some("rsa-2048:ec-p256")).unwrap();
    assert_eq!(store.get_key_pair_parameter("rsa", KeyPairParameter::Algorithm).unwrap(), ALGORITHM_RSA.to_ne_bytes());
    let n = store.get_key_pair_parameter("rsa", KeyPairParameter::RsaModulus).unwrap();
    let e = store.get_key_pair_parameter("rsa", KeyPairParameter::RsaExponent).unwrap();
    assert_eq!(n.len(), 256);
    assert_eq!(e, [1, 0, 1]);
    let public = Rsa::from_public_components(BigNum::from_slice(&n).unwrap(), BigNum::from_slice(&e).unwrap()).unwrap();

    let input = b"0123456789abcdef0123456789abcdef";
    let out = store.encrypt("rsa", EncryptMechanism::RsaPkcs1, input).unwrap();
    assert_eq!(out.len(), 256);
    let mut back = vec![0; 256];
    let len = public.public_decrypt(&out, &mut back, Padding::PKCS1).unwrap();
    assert_eq!(&back[..len], input);

    let mut raw = vec![0u8; 256];
    raw[255] = 7;
    let out = store.encrypt("rsa", EncryptMechanism::RsaNoPadding, &raw).unwrap();
    let len = public.public_decrypt(&out, &mut back, Padding::NONE).unwrap();
    assert_eq!(&back[..len], &raw[..]);
    assert!(is_invalid(store.encrypt("rsa", EncryptMechanism::RsaNoPadding, b"short")));
    assert!(is_invalid(store.sign("rsa", SignMechanism::Ecdsa, &[0; 32])));

    store.create_key_pair_if_not_exists("rsa4k", Some("rsa-4096")).unwrap();
    assert_eq!(store.get_key_pair_parameter("rsa4k", KeyPairParameter::RsaModulus).unwrap().len(), 512);
    store.delete_key_pair("rsa4k").unwrap();
    assert!(store.load_key_pair("rsa4k").is_err());
}

pub fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let key = PKey::hmac(key).unwrap();
    let mut signer = Signer::new(MessageDigest::sha256(), &key).unwrap();
    signer.update(data).unwrap();
    signer.sign_to_vec().unwrap()
}

#[test]
fn hmac_keys_and_derivation() {
    let Some((home, store, label)) = token_store("hmac") else {
        return;
    };
    store.create_key_if_not_exists("mac", KeyUsage::SIGN).unwrap();
    store.load_key("mac").unwrap();
    let mac = store.sign("mac", SignMechanism::HmacSha256, b"data").unwrap();
    assert_eq!(mac.len(), 32);
    assert!(store.verify("mac", SignMechanism::HmacSha256, b"data", &mac).unwrap());
    assert!(!store.verify("mac", SignMechanism::HmacSha256, b"datA", &mac).unwrap());
    // Derivation runs on the token; the derived key is used in memory.
    let derived = store.derive_key("mac", b"module-1").unwrap();
    assert_eq!(derived.len(), 32);
    assert_eq!(
        store.sign("mac", SignMechanism::DerivedHmacSha256 { derivation_data: b"module-1" }, b"m").unwrap(),
        hmac(&derived, b"m")
    );
    // It is a generic secret on the token, not a file.
    let listing =
        String::from_utf8(crate::pkcs11_tool(&["--token-label", &label, "--login", "--pin", PIN, "--list-objects"]))
            .unwrap();
    assert!(listing.contains("Secret Key Object; Generic secret length 32"), "{listing}");
    assert_eq!(std::fs::read_dir(home.path().join("keys")).map(|d| d.count()).unwrap_or(0), 0);

    // Imported keys compute what OpenSSL computes with the same bytes.
    let known = b"an imported HMAC key of 32 bytes";
    store.import_key("imported", known, KeyUsage::SIGN).unwrap();
    assert_eq!(store.sign("imported", SignMechanism::HmacSha256, b"x").unwrap(), hmac(known, b"x"));
    assert_eq!(&*store.derive_key("imported", b"d").unwrap(), &hmac(known, b"d")[..]);

    // Usage must be exactly SIGN/DERIVE or ENCRYPT on a token.
    assert!(is_invalid(store.create_key_if_not_exists("both", KeyUsage(17))));
    store.delete_key("mac").unwrap();
    assert!(is_invalid(store.load_key("mac")));
}

#[test]
fn aes_keys() {
    let Some((_home, store, _label)) = token_store("aes") else {
        return;
    };
    store.create_key_if_not_exists("aes", KeyUsage::ENCRYPT).unwrap();
    let mech = EncryptMechanism::Aead { iv: b"0123456789ab", aad: b"aad" };
    let ct = store.encrypt("aes", mech, b"plaintext").unwrap();
    assert_eq!(ct.len(), 1 + 9 + 16);
    assert_eq!(ct[0], 2);
    assert_eq!(&**store.decrypt("aes", mech, &ct).unwrap(), b"plaintext");
    let mut bad = ct.clone();
    bad[3] ^= 1;
    assert!(is_invalid(store.decrypt("aes", mech, &bad)), "a tag failure is INVALID_PARAMETER, as with files");
    let mut v1 = ct.clone();
    v1[0] = 1;
    assert!(is_invalid(store.decrypt("aes", mech, &v1)));
    assert!(is_invalid(store.decrypt("aes", mech, &ct[..10])));
    assert!(is_invalid(store.encrypt("aes", EncryptMechanism::Aead { iv: b"", aad: b"" }, b"x")));

    // An imported AES-256 key: OpenSSL decrypts what the token encrypted.
    let key = [7u8; 32];
    store.import_key("known", &key, KeyUsage::ENCRYPT).unwrap();
    let ct = store.encrypt("known", mech, b"cross-check").unwrap();
    let (body, tag) = ct[1..].split_at(ct.len() - 17);
    let pt = decrypt_aead(Cipher::aes_256_gcm(), &key, Some(b"0123456789ab"), b"aad", body, tag).unwrap();
    assert_eq!(pt, b"cross-check");
    store.delete_key("known").unwrap();
    assert!(store.load_key("known").is_err());
}

#[test]
fn derived_aead_on_a_token_key() {
    let Some((_home, store, _label)) = token_store("daead") else {
        return;
    };
    store.import_key("base", b"base key bytes base key bytes!!!", KeyUsage::SIGN).unwrap();
    let mech = EncryptMechanism::DerivedAead { derivation_data: b"dd", iv: b"iv", aad: b"" };
    let ct = store.encrypt("base", mech, b"secret").unwrap();
    assert_eq!(&**store.decrypt("base", mech, &ct).unwrap(), b"secret");
    let derived = hmac(b"base key bytes base key bytes!!!", b"dd");
    let (body, tag) = ct[1..].split_at(ct.len() - 17);
    assert_eq!(decrypt_aead(Cipher::aes_256_gcm(), &derived, Some(b"iv"), b"", body, tag).unwrap(), b"secret");
}

#[test]
fn concurrent_requests_share_the_token() {
    let Some((_home, store, _label)) = token_store("conc") else {
        return;
    };
    store.create_key_pair_if_not_exists("k", Some("ec-p256")).unwrap();
    store.create_key_if_not_exists("m", KeyUsage::SIGN).unwrap();
    let expected = store.sign("m", SignMechanism::HmacSha256, b"x").unwrap();
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| {
                for _ in 0..20 {
                    store.sign("k", SignMechanism::Ecdsa, &[1; 32]).unwrap();
                    assert_eq!(store.sign("m", SignMechanism::HmacSha256, b"x").unwrap(), expected);
                }
            });
        }
    });
}

/// Keys and pairs share one namespace (spec §7.2); on the token as with files, neither kind
/// replaces or stands in for the other (spec §10 quirk 3, docs/compatibility.md).
#[test]
fn keys_and_pairs_share_one_namespace() {
    let Some((home, store, label)) = token_store("namespace") else {
        return;
    };
    let known = b"a symmetric key of thirty-two b!";
    store.import_key("sym", known, KeyUsage::SIGN).unwrap();
    assert!(is_invalid(store.load_key_pair("sym")));
    assert!(is_invalid(store.create_key_pair_if_not_exists("sym", Some("ec-p256"))));
    assert_eq!(store.sign("sym", SignMechanism::HmacSha256, b"m").unwrap(), hmac(known, b"m"));

    store.create_key_pair_if_not_exists("pair", Some("ec-p256")).unwrap();
    assert!(is_invalid(store.load_key("pair")));
    assert!(is_invalid(store.create_key_if_not_exists("pair", KeyUsage::SIGN)));
    assert!(is_invalid(store.import_key("pair", known, KeyUsage::SIGN)));
    store.sign("pair", SignMechanism::Ecdsa, &[2; 32]).unwrap();

    // A move never replaces a symmetric key; a missing source is EXTERNAL (as a failed rename).
    assert!(is_invalid(store.move_key_pair("pair", "sym")));
    store.sign("pair", SignMechanism::Ecdsa, &[2; 32]).unwrap();
    assert!(is_external(store.move_key_pair("absent", "elsewhere")));
    let listing =
        String::from_utf8(pkcs11_tool(&["--token-label", &label, "--login", "--pin", PIN, "--list-objects"])).unwrap();
    assert_eq!(listing.matches("label:      pair\n").count(), 2, "{listing}");
    assert_eq!(listing.matches("label:      sym\n").count(), 1, "{listing}");

    // An "AES" key of a length AES does not have cannot be a token key (a conforming token's
    // C_CreateObject refuses it; SoftHSM2 would accept it): it goes to the home directory.
    store.import_key("tiny", &[7], KeyUsage::ENCRYPT).unwrap();
    assert!(!listing.contains("label:      tiny\n"));
    assert_eq!(std::fs::read_dir(home.path().join("keys")).unwrap().count(), 1);
    assert_eq!(store.sign("tiny", SignMechanism::HmacSha256, b"m").unwrap(), hmac(&[7], b"m"));
}
