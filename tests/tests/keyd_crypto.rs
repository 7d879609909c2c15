//! `/sign`, `/encrypt`, `/decrypt`, `/derivedkey`, `/derivedkey/export` (keyd.md §5.9–§5.13,
//! §7.5): results cross-checked with local OpenSSL computations. Both api-versions.

use aziot_tests::api::*;
use aziot_tests::crypto::*;
use aziot_tests::keyd::Backend;
use aziot_tests::{both_versions, Keyd};
use openssl::rsa::Padding;
use serde_json::json;

both_versions!(
    sign_ecdsa,
    sign_hmac,
    sign_errors,
    encrypt_rsa,
    aead_round_trip_and_format,
    aead_errors,
    derived_keys,
);

const SHA256_DIGEST_INFO_PREFIX: &[u8] =
    b"\x30\x31\x30\x0d\x06\x09\x60\x86\x48\x01\x65\x03\x04\x02\x01\x05\x00\x04\x20";

fn sign_ecdsa(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);
    let h = api.create_keypair("ec", Some("ec-p256"));
    let point = unb64(&api.param(&h, "ec-point"));

    let digest = sha256(b"to be signed");
    let s1 = api.sign_ecdsa(&h, &digest);
    let s2 = api.sign_ecdsa(&h, &digest);
    assert!(ecdsa_verify(&point, &digest, &s1));
    assert!(ecdsa_verify(&point, &digest, &s2));
    assert_ne!(s1, s2, "ECDSA uses a fresh k per signature");
    // DER ECDSA-Sig-Value: SEQUENCE
    assert_eq!(s1[0], 0x30);

    // an over-long digest is truncated to the order size (as OpenSSL's verify does)
    let long = [sha256(b"a"), sha256(b"b")].concat();
    let s3 = api.sign_ecdsa(&h, &long);
    assert!(ecdsa_verify(&point, &long, &s3));

    // a GET-minted handle signs the same key
    let g = api.get_keypair("ec");
    assert!(ecdsa_verify(&point, &digest, &api.sign_ecdsa(&g, &digest)));
}

fn sign_hmac(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);
    let key = random(32);
    let h = api.import_key("hmac", &key);
    for len in [1usize, 64, 100 * 1024] {
        let msg = random(len);
        let sig = api.sign_hmac(&h, &msg);
        assert_eq!(sig.len(), 32);
        assert_eq!(sig, hmac_sha256(&key, &msg), "HMAC over {len} bytes");
    }
    // a generated (not imported) key: deterministic per key
    let g = api.create_key("gen", "sign");
    assert_eq!(api.sign_hmac(&g, b"x"), api.sign_hmac(&g, b"x"));
    assert_ne!(api.sign_hmac(&g, b"x"), api.sign_hmac(&h, b"x"));
}

fn sign_errors(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);
    let key = api.create_key("k", "sign");
    let ec = api.create_keypair("ec", Some("ec-p256"));
    let rsa = api.create_keypair("rsa", Some("rsa-2048"));
    let derived = api.derive(&key, b"d");
    let digest = sha256(b"x");

    expect_err(&api.sign_ecdsa_resp(&key, &digest), 400, BAD_MECHANISM);
    expect_err(&api.sign_ecdsa_resp(&derived, &digest), 400, BAD_MECHANISM);
    expect_err(&api.sign_hmac_resp(&ec, b"m"), 400, BAD_MECHANISM);
    expect_err(&api.sign_hmac_resp(&rsa, b"m"), 400, BAD_MECHANISM);
    // ECDSA on an RSA pair: library error
    expect_err(&api.sign_ecdsa_resp(&rsa, &digest), 400, LIB_INVALID);

    // schema errors → 422
    for body in [
        json!({"keyHandle": key, "algorithm": "RSA", "parameters": {"message": b64(b"m")}}),
        json!({"keyHandle": key, "algorithm": "HMAC-SHA256"}),
        json!({"keyHandle": key, "algorithm": "HMAC-SHA256", "parameters": {"digest": b64(b"m")}}),
        json!({"keyHandle": ec, "algorithm": "ECDSA", "parameters": {"message": b64(&digest)}}),
        json!({"keyHandle": key, "algorithm": "HMAC-SHA256", "parameters": {"message": "bm9"}}),
        json!({"keyHandle": key, "algorithm": "HMAC-SHA256", "parameters": {"message": 5}}),
        json!({"keyHandle": key, "parameters": {"message": b64(b"m")}}),
        json!({"keyHandle": 7, "algorithm": "HMAC-SHA256", "parameters": {"message": b64(b"m")}}),
        json!({"algorithm": "HMAC-SHA256", "parameters": {"message": b64(b"m")}}),
    ] {
        let r = api.post("/sign", &body);
        assert_eq!(r.status, 422, "{body}\n{r}");
    }
    // unknown members are ignored
    let r = api.post(
        "/sign",
        &json!({"keyHandle": key, "algorithm": "HMAC-SHA256", "parameters": {"message": b64(b"m")}, "x": 1}),
    );
    assert_eq!(r.status, 200, "{r}");
}

fn encrypt_rsa(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);
    let h = api.create_keypair("rsa", Some("rsa-2048"));
    let pk = rsa_public(
        &unb64(&api.param(&h, "rsa-modulus")),
        &unb64(&api.param(&h, "rsa-exponent")),
    );

    // RSA-PKCS1 = private-key operation with type-1 padding over a caller-made DigestInfo
    let msg = b"signed with RSA through /encrypt";
    let digest_info = [SHA256_DIGEST_INFO_PREFIX, &sha256(msg)].concat();
    let sig = api.encrypt_rsa(&h, "RSA-PKCS1", &digest_info);
    assert_eq!(sig.len(), 256);
    assert_eq!(
        rsa_public_decrypt(&pk, &sig, Padding::PKCS1),
        Some(digest_info.clone())
    );
    // it is a standard RSASSA-PKCS1-v1_5 SHA-256 signature
    let pkey = openssl::pkey::PKey::from_rsa(pk.clone()).expect("pkey");
    let mut verifier = openssl::sign::Verifier::new(openssl::hash::MessageDigest::sha256(), &pkey)
        .expect("verifier");
    verifier.update(msg).expect("update");
    assert!(
        verifier.verify(&sig).expect("verify"),
        "PKCS#1 v1.5 signature verifies"
    );
    // "parameters": null is the same as absent
    let r = api.post(
        "/encrypt",
        &json!({"keyHandle": h, "algorithm": "RSA-PKCS1", "parameters": null, "plaintext": b64(&digest_info)}),
    );
    assert_eq!(r.status, 200, "{r}");
    // ... but an object is a schema error
    let r = api.post(
        "/encrypt",
        &json!({"keyHandle": h, "algorithm": "RSA-PKCS1", "parameters": {}, "plaintext": b64(&digest_info)}),
    );
    assert_eq!(r.status, 422, "{r}");

    // RSA-NO-PADDING: raw private-key operation on a modulus-length input
    let mut raw = random(256);
    raw[0] = 0;
    let out = api.encrypt_rsa(&h, "RSA-NO-PADDING", &raw);
    assert_eq!(out.len(), 256);
    assert_eq!(rsa_public_decrypt(&pk, &out, Padding::NONE), Some(raw));

    // wrong kinds
    let ec = api.create_keypair("ec", Some("ec-p256"));
    expect_err(
        &api.encrypt_rsa_resp(&ec, "RSA-PKCS1", &digest_info),
        400,
        LIB_INVALID,
    );
    let key = api.create_key("k", "encrypt");
    expect_err(
        &api.encrypt_rsa_resp(&key, "RSA-PKCS1", &digest_info),
        400,
        BAD_MECHANISM,
    );
    expect_err(
        &api.encrypt_rsa_resp(&key, "RSA-NO-PADDING", &digest_info),
        400,
        BAD_MECHANISM,
    );
    expect_err(
        &api.encrypt_aead_resp(&h, b"123456789012", b"", b"pt"),
        400,
        BAD_MECHANISM,
    );
    expect_err(
        &api.encrypt_aead_resp(&ec, b"123456789012", b"", b"pt"),
        400,
        BAD_MECHANISM,
    );
    let r = api.post(
        "/encrypt",
        &json!({"keyHandle": h, "algorithm": "RSA-OAEP", "plaintext": "AA=="}),
    );
    assert_eq!(r.status, 422, "{r}");
}

fn aead_round_trip_and_format(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);
    let key = random(32);
    let h = api.import_key_usage("aead", &key, "encrypt");
    let iv = random(12);
    let aad = b"additional data";
    let pt = random(100);

    let ct = api.encrypt_aead(&h, &iv, aad, &pt);
    assert_eq!(ct.len(), 1 + pt.len() + 16, "0x02 ‖ ct ‖ tag");
    assert_eq!(ct[0], 0x02);
    let (body, tag) = ct[1..].split_at(pt.len());
    assert_eq!(
        aes_gcm_decrypt(&key, &iv, aad, body, tag),
        Some(pt.clone()),
        "AES-256-GCM"
    );
    assert_eq!(api.decrypt_aead(&h, &iv, aad, &ct), pt);

    // a locally made v2 ciphertext decrypts
    let (lct, ltag) = aes_gcm_encrypt(&key, &iv, b"", b"local plaintext");
    let v2 = [&[2u8][..], &lct, &ltag].concat();
    assert_eq!(api.decrypt_aead(&h, &iv, b"", &v2), b"local plaintext");
    // legacy IoT Edge 1.1 layout: 0x01 ‖ tag ‖ ct
    let v1 = [&[1u8][..], &ltag, &lct].concat();
    if keyd.backend() == Backend::File {
        assert_eq!(api.decrypt_aead(&h, &iv, b"", &v1), b"local plaintext");
    } else {
        // PKCS#11 keys take only format 0x02 (docs/pkcs11.md: output 0x02 ‖ ct ‖ tag)
        expect_err(&api.decrypt_aead_resp(&h, &iv, b"", &v1), 400, LIB_INVALID);
    }

    // empty plaintext and other IV lengths
    let e = api.encrypt_aead(&h, &iv, b"", b"");
    assert_eq!(e.len(), 17);
    assert!(api.decrypt_aead(&h, &iv, b"", &e).is_empty());
    let iv16 = random(16);
    let c16 = api.encrypt_aead(&h, &iv16, b"", b"sixteen byte iv");
    assert_eq!(
        aes_gcm_decrypt(
            &key,
            &iv16,
            b"",
            &c16[1..c16.len() - 16],
            &c16[c16.len() - 16..]
        ),
        Some(b"sixteen byte iv".to_vec())
    );

    // a generated AEAD key round-trips too
    let g = api.create_key("gen", "encrypt");
    let c = api.encrypt_aead(&g, &iv, aad, b"generated");
    assert_eq!(api.decrypt_aead(&g, &iv, aad, &c), b"generated");
    // the IV is the caller's: same IV, same key, same plaintext → same ciphertext
    assert_eq!(api.encrypt_aead(&h, &iv, aad, &pt), ct);
}

fn aead_errors(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);
    let key = random(32);
    let h = api.import_key_usage("aead", &key, "encrypt");
    let iv = random(12);
    let ct = api.encrypt_aead(&h, &iv, b"aad", b"secret plaintext");

    // short input, unknown version byte, empty input → 400 lib
    expect_err(
        &api.decrypt_aead_resp(&h, &iv, b"aad", &ct[..16]),
        400,
        LIB_INVALID,
    );
    expect_err(
        &api.decrypt_aead_resp(&h, &iv, b"aad", &[2u8; 1]),
        400,
        LIB_INVALID,
    );
    expect_err(
        &api.decrypt_aead_resp(&h, &iv, b"aad", b""),
        400,
        LIB_INVALID,
    );
    let mut v3 = ct.clone();
    v3[0] = 3;
    expect_err(
        &api.decrypt_aead_resp(&h, &iv, b"aad", &v3),
        400,
        LIB_INVALID,
    );
    let mut v0 = ct.clone();
    v0[0] = 0;
    expect_err(
        &api.decrypt_aead_resp(&h, &iv, b"aad", &v0),
        400,
        LIB_INVALID,
    );

    // authentication failures → 400 (deliberate difference), generic message
    let mut bad_tag = ct.clone();
    *bad_tag.last_mut().expect("tag") ^= 1;
    let mut bad_body = ct.clone();
    bad_body[3] ^= 0x80;
    for (what, r) in [
        ("tag", api.decrypt_aead_resp(&h, &iv, b"aad", &bad_tag)),
        (
            "ciphertext",
            api.decrypt_aead_resp(&h, &iv, b"aad", &bad_body),
        ),
        ("aad", api.decrypt_aead_resp(&h, &iv, b"other aad", &ct)),
        ("iv", api.decrypt_aead_resp(&h, &random(12), b"aad", &ct)),
    ] {
        assert_eq!(r.status, 400, "AEAD with wrong {what}\n{r}");
        let m = r.message();
        assert!(!m.contains("secret"), "{m}");
    }
    // another key cannot decrypt
    let other = api.import_key_usage("other", &random(32), "encrypt");
    assert_eq!(api.decrypt_aead_resp(&other, &iv, b"aad", &ct).status, 400);

    // empty IV → 400 (deliberate difference)
    let r = api.encrypt_aead_resp(&h, b"", b"aad", b"pt");
    assert_eq!(r.status, 400, "empty IV\n{r}");
    let r = api.decrypt_aead_resp(&h, b"", b"aad", &ct);
    assert_eq!(r.status, 400, "empty IV on decrypt\n{r}");

    // RSA algorithms on /decrypt: always mechanism errors
    let pair = api.create_keypair("rsa", Some("rsa-2048"));
    for handle in [&h, &pair] {
        for alg in ["RSA-PKCS1", "RSA-NO-PADDING"] {
            let r = api.post(
                "/decrypt",
                &json!({"keyHandle": handle, "algorithm": alg, "ciphertext": b64(&ct)}),
            );
            expect_err(&r, 400, BAD_MECHANISM);
        }
    }
    expect_err(
        &api.decrypt_aead_resp(&pair, &iv, b"aad", &ct),
        400,
        BAD_MECHANISM,
    );
    // schema errors
    for body in [
        json!({"keyHandle": h, "algorithm": "AEAD", "ciphertext": b64(&ct)}),
        json!({"keyHandle": h, "algorithm": "AEAD", "parameters": {"iv": b64(&iv)}, "ciphertext": b64(&ct)}),
        json!({"keyHandle": h, "algorithm": "AEAD", "parameters": {"iv": b64(&iv), "aad": ""}}),
        json!({"keyHandle": h, "algorithm": "AES", "parameters": {"iv": b64(&iv), "aad": ""}, "ciphertext": b64(&ct)}),
    ] {
        let r = api.post("/decrypt", &body);
        assert_eq!(r.status, 422, "{body}\n{r}");
    }
    let r = api.post(
        "/encrypt",
        &json!({"keyHandle": h, "algorithm": "AEAD", "plaintext": "AA=="}),
    );
    assert_eq!(r.status, 422, "{r}");
}

fn derived_keys(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);
    let base_bytes = random(32);
    let base = api.import_key("master", &base_bytes);
    let data = b"module1:generation:primary";

    let d = api.derive(&base, data);
    let p = Handle::parse(&d);
    assert_eq!(p.kind(), "Derived");
    let arr = p.sr["key_id"]["Derived"]
        .as_array()
        .expect("Derived is [base, data]");
    assert_eq!(arr.len(), 2);
    assert_eq!(
        arr[0].as_str(),
        Some(base.as_str()),
        "embeds the complete base handle"
    );
    let embedded: Vec<u8> = arr[1]
        .as_array()
        .expect("data as array of integers")
        .iter()
        .map(|x| u8::try_from(x.as_u64().expect("int")).expect("byte"))
        .collect();
    assert_eq!(embedded, data);

    // export = HMAC-SHA256(base, data)
    let derived = api.export(&d);
    assert_eq!(derived, hmac_sha256(&base_bytes, data));
    // sign with a Derived handle = HMAC keyed with the derived key
    let msg = random(64);
    assert_eq!(api.sign_hmac(&d, &msg), hmac_sha256(&derived, &msg));
    // AEAD with a derived key = AES-256-GCM keyed with the derived key
    let iv = random(12);
    let ct = api.encrypt_aead(&d, &iv, b"a", b"derived plaintext");
    assert_eq!(ct[0], 2);
    assert_eq!(
        aes_gcm_decrypt(
            &derived,
            &iv,
            b"a",
            &ct[1..ct.len() - 16],
            &ct[ct.len() - 16..]
        ),
        Some(b"derived plaintext".to_vec())
    );
    assert_eq!(api.decrypt_aead(&d, &iv, b"a", &ct), b"derived plaintext");
    // legacy layout works for derived keys too
    let (lct, ltag) = aes_gcm_encrypt(&derived, &iv, b"", b"legacy");
    assert_eq!(
        api.decrypt_aead(&d, &iv, b"", &[&[1u8][..], &ltag, &lct].concat()),
        b"legacy"
    );

    // same data again: another handle, same key; other data: another key; empty data is data
    let d2 = api.derive(&base, data);
    assert_ne!(d2, d);
    assert_eq!(api.export(&d2), derived);
    assert_eq!(
        api.export(&api.derive(&base, b"other")),
        hmac_sha256(&base_bytes, b"other")
    );
    assert_eq!(
        api.export(&api.derive(&base, b"")),
        hmac_sha256(&base_bytes, b"")
    );

    // errors
    let r = api.derive_resp(&d, b"x");
    expect_err_prefix(&r, 400, HANDLE_PREFIX);
    assert!(
        r.message()
            .contains("nested derived keys are not supported, import the outer derived key first"),
        "{r}"
    );
    let pair = api.create_keypair("pair", Some("ec-p256"));
    expect_err_prefix(&api.derive_resp(&pair, b"x"), 400, HANDLE_PREFIX);
    expect_err(&api.export_resp(&base), 400, NOT_FOR_DERIVED);
    expect_err(&api.export_resp(&pair), 400, NOT_FOR_DERIVED);
    expect_err(&api.sign_ecdsa_resp(&d, &sha256(b"x")), 400, BAD_MECHANISM);
    expect_err(
        &api.encrypt_rsa_resp(&d, "RSA-PKCS1", b"x"),
        400,
        BAD_MECHANISM,
    );
    let r = api.post(
        "/derivedkey",
        &json!({"baseKeyHandle": base, "derivationData": "not base64"}),
    );
    assert_eq!(r.status, 422, "{r}");
    let r = api.post("/derivedkey", &json!({"baseKeyHandle": base}));
    assert_eq!(r.status, 422, "{r}");
    expect_err(
        &api.call("POST", "/derivedkey", None),
        400,
        "missing request body",
    );
    expect_err(
        &api.call("POST", "/derivedkey/export", None),
        400,
        "missing request body",
    );

    // base deleted: the derived handle still validates but the key is gone → 400 lib
    assert_eq!(api.delete_key(&base).status, 204);
    expect_err(&api.export_resp(&d), 400, LIB_INVALID);
    expect_err(&api.sign_hmac_resp(&d, b"m"), 400, LIB_INVALID);
    // /derivedkey does not look the base key up
    let d3 = api.derive(&base, b"still mintable");
    assert_eq!(Handle::parse(&d3).kind(), "Derived");
}
