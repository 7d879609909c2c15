//! Unit tests of the crypto operations of the file backend and their error paths.

use std::sync::Arc;

use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcKey, EcPoint};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use openssl::rsa::{Padding, Rsa};
use openssl::symm::Cipher;

use super::crypto::{self, Algorithm};
use super::tests::{is_external, is_invalid, store};
use super::*;

const IV: &[u8] = b"123456789012";

fn ec_public_key(point: &[u8]) -> EcKey<openssl::pkey::Public> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let mut ctx = BigNumContext::new().unwrap();
    let point = EcPoint::from_bytes(&group, point, &mut ctx).unwrap();
    EcKey::from_public_key(&group, &point).unwrap()
}

fn rsa_public_key(store: &KeyStore, id: &str) -> Rsa<openssl::pkey::Public> {
    let n = store.get_key_pair_parameter(id, KeyPairParameter::RsaModulus).unwrap();
    let e = store.get_key_pair_parameter(id, KeyPairParameter::RsaExponent).unwrap();
    Rsa::from_public_components(BigNum::from_slice(&n).unwrap(), BigNum::from_slice(&e).unwrap()).unwrap()
}

#[test]
fn preferred_algorithms() {
    use Algorithm::*;
    assert_eq!(crypto::parse_preferred_algorithms(None).unwrap(), [EcP256, Rsa2048]);
    assert_eq!(crypto::parse_preferred_algorithms(Some("*")).unwrap(), [EcP256, Rsa2048]);
    assert_eq!(crypto::parse_preferred_algorithms(Some("rsa-2048:*")).unwrap(), [Rsa2048, EcP256]);
    assert_eq!(crypto::parse_preferred_algorithms(Some("ed25519:rsa-4096:rsa-4096")).unwrap(), [Rsa4096]);
    for bad in ["", "ed25519", "EC-P256", ":"] {
        assert!(is_invalid(crypto::parse_preferred_algorithms(Some(bad))), "{bad}");
    }
    let (_tmp, store) = store();
    assert!(is_invalid(store.create_key_pair_if_not_exists("k", Some("ed25519"))));
    assert!(is_invalid(store.create_key_pair_if_not_exists("k", Some(""))));
    assert!(is_invalid(store.load_key_pair("k")));
}

#[test]
fn ec_key_pair_parameters_and_ecdsa() {
    let (_tmp, store) = store();
    store.create_key_pair_if_not_exists("ec", None).unwrap(); // NULL → ec-p256 first
    assert_eq!(store.get_key_pair_parameter("ec", KeyPairParameter::Algorithm).unwrap(), 1u32.to_ne_bytes());
    assert_eq!(
        store.get_key_pair_parameter("ec", KeyPairParameter::EcCurveOid).unwrap(),
        [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07]
    );
    let point = store.get_key_pair_parameter("ec", KeyPairParameter::EcPoint).unwrap();
    assert_eq!(point.len(), 33);
    assert!(point[0] == 2 || point[0] == 3);
    assert!(is_invalid(store.get_key_pair_parameter("ec", KeyPairParameter::RsaModulus)));
    assert!(is_invalid(store.get_key_pair_parameter("ec", KeyPairParameter::RsaExponent)));

    let public = ec_public_key(&point);
    let digest = openssl::sha::sha256(b"message");
    let der = store.sign("ec", SignMechanism::Ecdsa, &digest).unwrap();
    assert!(EcdsaSig::from_der(&der).unwrap().verify(&digest, &public).unwrap());
    assert!(!EcdsaSig::from_der(&der).unwrap().verify(&openssl::sha::sha256(b"other"), &public).unwrap());
    assert!(der.len() <= store.sign_len_bound("ec", SignMechanism::Ecdsa).unwrap());
    assert_eq!(store.sign_len_bound("ec", SignMechanism::Ecdsa).unwrap(), 72);
    // An over-long digest is truncated to the order size, as OpenSSL does.
    let long = [0x5au8; 64];
    let der = store.sign("ec", SignMechanism::Ecdsa, &long).unwrap();
    assert!(EcdsaSig::from_der(&der).unwrap().verify(&long[..32], &public).unwrap());
    assert!(is_invalid(store.sign("ec", SignMechanism::Ecdsa, b"")));

    assert!(is_invalid(store.encrypt("ec", EncryptMechanism::RsaPkcs1, b"x")));
    assert!(is_invalid(store.encrypt("ec", EncryptMechanism::RsaNoPadding, b"x")));
    assert!(is_invalid(store.verify("ec", SignMechanism::Ecdsa, &digest, &der)));
    assert!(is_invalid(store.sign("missing", SignMechanism::Ecdsa, &digest)));
    assert!(is_invalid(store.get_key_pair_parameter("missing", KeyPairParameter::Algorithm)));
    // Creating again keeps the existing pair.
    store.create_key_pair_if_not_exists("ec", Some("rsa-2048")).unwrap();
    assert_eq!(store.get_key_pair_parameter("ec", KeyPairParameter::EcPoint).unwrap(), point);
}

#[test]
fn non_p256_curves() {
    let (tmp, store) = store();
    store.create_key_if_not_exists("warmup", KeyUsage::SIGN).unwrap();
    let group = EcGroup::from_curve_name(Nid::SECP384R1).unwrap();
    let ec = EcKey::generate(&group).unwrap();
    std::fs::write(super::tests::key_path(&tmp, "p384"), ec.private_key_to_pem().unwrap()).unwrap();
    assert_eq!(store.get_key_pair_parameter("p384", KeyPairParameter::Algorithm).unwrap(), 1u32.to_ne_bytes());
    assert!(is_invalid(store.get_key_pair_parameter("p384", KeyPairParameter::EcCurveOid)));
    assert_eq!(store.get_key_pair_parameter("p384", KeyPairParameter::EcPoint).unwrap().len(), 49);
}

#[test]
fn rsa_key_pairs() {
    let (_tmp, store) = store();
    store.create_key_pair_if_not_exists("rsa", Some("rsa-2048:ec-p256")).unwrap();
    assert_eq!(store.get_key_pair_parameter("rsa", KeyPairParameter::Algorithm).unwrap(), 2u32.to_ne_bytes());
    assert_eq!(store.get_key_pair_parameter("rsa", KeyPairParameter::RsaExponent).unwrap(), [1, 0, 1]);
    let n = store.get_key_pair_parameter("rsa", KeyPairParameter::RsaModulus).unwrap();
    assert_eq!(n.len(), 256);
    assert!(n[0] != 0);
    assert!(is_invalid(store.get_key_pair_parameter("rsa", KeyPairParameter::EcCurveOid)));
    assert!(is_invalid(store.get_key_pair_parameter("rsa", KeyPairParameter::EcPoint)));
    assert!(is_invalid(store.sign("rsa", SignMechanism::Ecdsa, &[1; 32])));
    assert!(is_invalid(store.sign("rsa", SignMechanism::HmacSha256, &[1; 32])));
    let public = rsa_public_key(&store, "rsa");

    // PKCS#1 v1.5 type 1: the public operation recovers the input.
    let input = b"DigestInfo goes here";
    let sig = store.encrypt("rsa", EncryptMechanism::RsaPkcs1, input).unwrap();
    assert_eq!(sig.len(), 256);
    let mut recovered = vec![0; 256];
    let len = public.public_decrypt(&sig, &mut recovered, Padding::PKCS1).unwrap();
    assert_eq!(&recovered[..len], input);
    assert!(is_invalid(store.encrypt("rsa", EncryptMechanism::RsaPkcs1, &[1; 246])));
    store.encrypt("rsa", EncryptMechanism::RsaPkcs1, &[1; 245]).unwrap();

    // Raw: exactly modulus-length input below the modulus.
    let mut raw = vec![0x11u8; 256];
    raw[0] = 0;
    let out = store.encrypt("rsa", EncryptMechanism::RsaNoPadding, &raw).unwrap();
    let mut recovered = vec![0; 256];
    public.public_decrypt(&out, &mut recovered, Padding::NONE).unwrap();
    assert_eq!(recovered, raw);
    assert!(is_invalid(store.encrypt("rsa", EncryptMechanism::RsaNoPadding, &raw[1..])));
    assert!(is_invalid(store.encrypt("rsa", EncryptMechanism::RsaNoPadding, &[0xff; 256])));
    assert!(is_invalid(store.encrypt("rsa", EncryptMechanism::RsaNoPadding, &n)));
    assert_eq!(store.encrypt_len_bound("rsa", EncryptMechanism::RsaPkcs1, 10).unwrap(), 256);

    assert!(is_invalid(store.decrypt("rsa", EncryptMechanism::RsaPkcs1, &sig)));
    assert!(is_invalid(store.decrypt("rsa", EncryptMechanism::RsaNoPadding, &out)));
    assert!(is_invalid(store.encrypt("rsa", EncryptMechanism::Aead { iv: IV, aad: b"" }, b"x")));
}

#[test]
fn rsa_4096() {
    let (_tmp, store) = store();
    store.create_key_pair_if_not_exists("big", Some("rsa-4096")).unwrap();
    assert_eq!(store.get_key_pair_parameter("big", KeyPairParameter::RsaModulus).unwrap().len(), 512);
}

#[test]
fn hmac_and_verify() {
    let (_tmp, store) = store();
    // RFC 4231 test case 2.
    store.import_key("jefe", b"Jefe", KeyUsage::SIGN).unwrap();
    let mac = store.sign("jefe", SignMechanism::HmacSha256, b"what do ya want for nothing?").unwrap();
    assert_eq!(super::files::hex(&mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    assert!(store.verify("jefe", SignMechanism::HmacSha256, b"what do ya want for nothing?", &mac).unwrap());
    let mut bad = mac.clone();
    bad[31] ^= 1;
    assert!(!store.verify("jefe", SignMechanism::HmacSha256, b"what do ya want for nothing?", &bad).unwrap());
    assert!(!store.verify("jefe", SignMechanism::HmacSha256, b"what do ya want for nothing?", &mac[..31]).unwrap());
    assert!(!store.verify("jefe", SignMechanism::HmacSha256, b"what do ya want for nothing?", b"").unwrap());
    assert!(!store.verify("jefe", SignMechanism::HmacSha256, b"other", &mac).unwrap());
    let derived = SignMechanism::DerivedHmacSha256 { derivation_data: b"d" };
    assert!(is_invalid(store.verify("jefe", derived, b"m", &mac)));
    assert!(is_invalid(store.verify("missing", SignMechanism::HmacSha256, b"m", &mac)));
    assert!(is_invalid(store.sign("missing", SignMechanism::HmacSha256, b"m")));
    assert!(is_invalid(store.load_key("missing")));
    assert!(is_external(store.sign("jefe", SignMechanism::Ecdsa, &[1; 32])));
    assert_eq!(store.sign_len_bound("jefe", SignMechanism::HmacSha256).unwrap(), 32);

    // A generated key signs; create again keeps it.
    store.create_key_if_not_exists("gen", KeyUsage::SIGN).unwrap();
    let m1 = store.sign("gen", SignMechanism::HmacSha256, b"m").unwrap();
    store.create_key_if_not_exists("gen", KeyUsage::ENCRYPT).unwrap();
    assert_eq!(store.sign("gen", SignMechanism::HmacSha256, b"m").unwrap(), m1);
    assert_eq!(m1.len(), 32);
}

#[test]
fn derivation() {
    let (_tmp, store) = store();
    store.import_key("master", b"master key bytes", KeyUsage::DERIVE).unwrap();
    let data = b"module1:gen1:primary";
    let derived = store.derive_key("master", data).unwrap();
    assert_eq!(&derived[..], &crypto::hmac_sha256(b"master key bytes", data).unwrap()[..]);
    assert_eq!(derived.len(), 32);
    let mechanism = SignMechanism::DerivedHmacSha256 { derivation_data: data };
    assert_eq!(store.sign("master", mechanism, b"msg").unwrap(), crypto::hmac_sha256(&derived, b"msg").unwrap());
    assert!(is_invalid(store.derive_key("missing", data)));
    // Empty derivation data is allowed.
    assert_eq!(
        &store.derive_key("master", b"").unwrap()[..],
        &crypto::hmac_sha256(b"master key bytes", b"").unwrap()[..]
    );
}

#[test]
fn aead_round_trip_and_format() {
    let (_tmp, store) = store();
    let key = [0x42u8; 32];
    store.import_key("aes", &key, KeyUsage::ENCRYPT).unwrap();
    let mech = EncryptMechanism::Aead { iv: IV, aad: b"aad" };
    let ct = store.encrypt("aes", mech, b"plaintext").unwrap();
    assert_eq!(ct.len(), 1 + 9 + 16);
    assert_eq!(ct[0], 0x02);
    assert_eq!(store.encrypt_len_bound("aes", mech, 9).unwrap(), ct.len());
    // Independent AES-256-GCM: version ‖ ciphertext ‖ tag.
    let mut tag = [0u8; 16];
    let expected =
        openssl::symm::encrypt_aead(Cipher::aes_256_gcm(), &key, Some(IV), b"aad", b"plaintext", &mut tag).unwrap();
    assert_eq!(&ct[1..10], &expected[..]);
    assert_eq!(&ct[10..], &tag);
    assert_eq!(&store.decrypt("aes", mech, &ct).unwrap()[..], b"plaintext");
    assert_eq!(store.decrypt_len_bound("aes", mech, &ct).unwrap(), 9);

    // Legacy version 0x01: tag ‖ ciphertext.
    let mut legacy = vec![0x01];
    legacy.extend_from_slice(&tag);
    legacy.extend_from_slice(&expected);
    assert_eq!(&store.decrypt("aes", mech, &legacy).unwrap()[..], b"plaintext");

    // Empty plaintext.
    let ct_empty = store.encrypt("aes", mech, b"").unwrap();
    assert_eq!(ct_empty.len(), 17);
    assert!(store.decrypt("aes", mech, &ct_empty).unwrap().is_empty());
}

#[test]
fn aead_errors() {
    let (_tmp, store) = store();
    store.import_key("aes", &[0x42u8; 32], KeyUsage::ENCRYPT).unwrap();
    let mech = EncryptMechanism::Aead { iv: IV, aad: b"aad" };
    let ct = store.encrypt("aes", mech, b"plaintext").unwrap();
    let expect_decryption_failed = |r: Result<Zeroizing<Vec<u8>>>| match r {
        Err(Error::InvalidParameter(msg)) => assert_eq!(msg, "decryption failed"),
        other => panic!("{other:?}"),
    };
    let mut tampered = ct.clone();
    tampered[3] ^= 1;
    expect_decryption_failed(store.decrypt("aes", mech, &tampered));
    expect_decryption_failed(store.decrypt("aes", EncryptMechanism::Aead { iv: IV, aad: b"other" }, &ct));
    expect_decryption_failed(store.decrypt("aes", EncryptMechanism::Aead { iv: b"other iv", aad: b"aad" }, &ct));
    // The same bytes read as legacy format fail authentication too.
    let mut as_legacy = ct.clone();
    as_legacy[0] = 0x01;
    expect_decryption_failed(store.decrypt("aes", mech, &as_legacy));

    for bad in [&b""[..], &[0x02; 16][..], &[0x01; 5][..]] {
        assert!(is_invalid(store.decrypt("aes", mech, bad)));
        assert!(is_invalid(store.decrypt_len_bound("aes", mech, bad)));
    }
    let mut unknown = ct.clone();
    unknown[0] = 0x03;
    assert!(is_invalid(store.decrypt("aes", mech, &unknown)));

    let empty_iv = EncryptMechanism::Aead { iv: b"", aad: b"" };
    assert!(is_invalid(store.encrypt("aes", empty_iv, b"x")));
    assert!(is_invalid(store.encrypt_len_bound("aes", empty_iv, 1)));
    assert!(is_invalid(store.decrypt("aes", empty_iv, &ct)));

    store.import_key("short", &[1u8; 16], KeyUsage::ENCRYPT).unwrap();
    assert!(is_external(store.encrypt("short", mech, b"x")));
    assert!(is_external(store.decrypt("short", mech, &ct)));
    assert!(is_invalid(store.encrypt("missing", mech, b"x")));
    assert!(is_invalid(store.decrypt("missing", mech, &ct)));
}

#[test]
fn derived_aead() {
    let (_tmp, store) = store();
    store.import_key("base", b"any-length base key", KeyUsage::ENCRYPT).unwrap();
    let mech = EncryptMechanism::DerivedAead { derivation_data: b"ctx", iv: IV, aad: b"a" };
    let ct = store.encrypt("base", mech, b"secret").unwrap();
    assert_eq!(ct[0], 0x02);
    assert_eq!(&store.decrypt("base", mech, &ct).unwrap()[..], b"secret");
    // Same as AEAD with the exported derived key.
    let derived = store.derive_key("base", b"ctx").unwrap();
    store.import_key("derived", &derived, KeyUsage::ENCRYPT).unwrap();
    let aead = EncryptMechanism::Aead { iv: IV, aad: b"a" };
    assert_eq!(&store.decrypt("derived", aead, &ct).unwrap()[..], b"secret");
    let other = EncryptMechanism::DerivedAead { derivation_data: b"other", iv: IV, aad: b"a" };
    assert!(is_invalid(store.decrypt("base", other, &ct)));
    // The base key itself is not 32 bytes, so plain AEAD with it is an EXTERNAL error.
    assert!(is_external(store.encrypt("base", aead, b"x")));
}

#[test]
fn concurrent_use() {
    let (_tmp, store) = store();
    let store = Arc::new(store);
    store.create_key_pair_if_not_exists("ec", None).unwrap();
    store.create_key_if_not_exists("hmac", KeyUsage::SIGN).unwrap();
    let point = store.get_key_pair_parameter("ec", KeyPairParameter::EcPoint).unwrap();
    let public = ec_public_key(&point);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let store = Arc::clone(&store);
            let public = public.clone();
            std::thread::spawn(move || {
                for i in 0..50u8 {
                    let digest = openssl::sha::sha256(&[t, i]);
                    let der = store.sign("ec", SignMechanism::Ecdsa, &digest).unwrap();
                    assert!(EcdsaSig::from_der(&der).unwrap().verify(&digest, &public).unwrap());
                    let mac = store.sign("hmac", SignMechanism::HmacSha256, &digest).unwrap();
                    assert!(store.verify("hmac", SignMechanism::HmacSha256, &digest, &mac).unwrap());
                    // Writers interleave with readers.
                    store.import_key(&format!("t{t}"), &[i + 1; 32], KeyUsage::SIGN).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for t in 0..4 {
        let mac = store.sign(&format!("t{t}"), SignMechanism::HmacSha256, b"m").unwrap();
        assert_eq!(mac, crypto::hmac_sha256(&[50; 32], b"m").unwrap());
    }
}
