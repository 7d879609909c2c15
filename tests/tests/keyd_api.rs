//! keyd endpoints that create, load, delete and move keys, and `/parameters/*`
//! (keyd.md §4.1, §5.1–§5.8, §5.15). Every scenario runs under both api-versions.

use aziot_tests::api::*;
use aziot_tests::crypto::*;
use aziot_tests::keyd::Backend;
use aziot_tests::{both_versions, Keyd};
use serde_json::json;

both_versions!(
    key_create_is_idempotent_and_handle_is_well_formed,
    key_import_overwrites,
    key_get,
    key_delete,
    key_post_with_id_is_always_400,
    keypair_create_algorithms,
    keypair_get_and_delete,
    keypair_and_key_share_one_namespace,
    keypair_move,
    parameters_ec,
    parameters_rsa,
);

fn key_create_is_idempotent_and_handle_is_well_formed(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);

    let h1 = api.create_key("k1", "sign");
    let parsed = Handle::parse(&h1);
    assert_eq!(parsed.kind(), "Key");
    assert_eq!(parsed.id(), "k1");
    // exact SR layout: compact JSON, members key_id then nonce, 64-byte nonce
    let sr = parsed.sr_text();
    assert!(
        sr.starts_with(r#"{"key_id":{"Key":"k1"},"nonce":""#),
        "sr layout: {sr}"
    );
    assert!(sr.ends_with("\"}") && !sr.contains(' '), "sr layout: {sr}");
    let nonce = parsed.sr["nonce"].as_str().expect("nonce string");
    assert_eq!(nonce.len(), 88, "nonce is 64 bytes in base64: {nonce}");
    assert_eq!(unb64(nonce).len(), 64);
    assert_eq!(
        parsed.sr.as_object().expect("object").len(),
        2,
        "sr members: {sr}"
    );
    assert_eq!(parsed.sig.len(), 32, "sig is an HMAC-SHA256");

    let msg = b"some message to authenticate";
    let file = keyd.keys_dir().join(key_file_name("k1"));
    let mac1 = api.sign_hmac(&h1, msg);
    let bytes = if keyd.backend() == Backend::File {
        // the generated key is 32 random bytes stored raw (keyd.md §7.3)
        let bytes = std::fs::read(&file).expect("key file");
        assert_eq!(bytes.len(), 32);
        assert_eq!(mac1, hmac_sha256(&bytes, msg));
        Some(bytes)
    } else {
        // a generic secret on the token (the bytes cannot be read), no file
        assert!(keyd.key_stored("k1"), "k1 on the token");
        assert!(!file.exists(), "token key k1 also written as a file");
        None
    };

    // create again (any usage): same key, new handle (new nonce); both handles valid
    let h2 = api.create_key("k1", "encrypt");
    assert_ne!(h1, h2, "every mint has a fresh nonce");
    assert_eq!(api.sign_hmac(&h2, msg), mac1);
    if let Some(bytes) = &bytes {
        assert_eq!(&std::fs::read(&file).expect("key file"), bytes, "existing key kept");
    }

    // keyBytes: null is "absent" → create-if-not-exists
    let r = api.post(
        "/key",
        &json!({"keyId": "k1", "usage": "sign", "keyBytes": null}),
    );
    let h3 = handle_of(&r, "keyBytes null");
    assert_eq!(api.sign_hmac(&h3, msg), mac1, "existing key kept");

    // every valid usage spelling
    for (i, usage) in [
        "derive",
        "sign",
        "encrypt",
        "derive,sign",
        "sign,encrypt",
        "encrypt,derive,sign",
    ]
    .iter()
    .enumerate()
    {
        if keyd.backend() == Backend::SoftHsm && usage.contains("sign") && usage.contains("encrypt") {
            // a token key is an HMAC secret or an AES key, not both (docs/pkcs11.md)
            let r = api.post("/key", &json!({"keyId": format!("usage-{i}"), "usage": usage}));
            expect_err(&r, 400, LIB_INVALID);
            continue;
        }
        let h = api.create_key(&format!("usage-{i}"), usage);
        assert_eq!(Handle::parse(&h).id(), format!("usage-{i}"));
    }
}

fn key_import_overwrites(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);
    let file = keyd.keys_dir().join(key_file_name("imp"));
    let msg = b"message";

    let k1 = random(32);
    let h1 = api.import_key("imp", &k1);
    assert_eq!(Handle::parse(&h1).kind(), "Key");
    assert_eq!(api.sign_hmac(&h1, msg), hmac_sha256(&k1, msg));
    let file_backend = keyd.backend() == Backend::File;
    if file_backend {
        assert_eq!(std::fs::read(&file).expect("file"), k1, "imported bytes stored as given");
    } else {
        assert!(keyd.key_stored("imp") && !file.exists(), "imported onto the token, no file");
    }

    // import again: always overwrites; any length is accepted and stored as given
    let k2 = random(48);
    let h2 = api.import_key("imp", &k2);
    assert_eq!(api.sign_hmac(&h2, msg), hmac_sha256(&k2, msg));
    assert_eq!(
        api.sign_hmac(&h1, msg),
        hmac_sha256(&k2, msg),
        "old handle → new key"
    );
    if file_backend {
        assert_eq!(std::fs::read(&file).expect("file"), k2);
    }

    // create-if-not-exists keeps the imported key
    let h3 = api.create_key("imp", "sign");
    assert_eq!(api.sign_hmac(&h3, msg), hmac_sha256(&k2, msg));

    // a one-byte key and every usage form with keyBytes
    let r = api.post(
        "/key",
        &json!({"keyId": "tiny", "usage": "encrypt", "keyBytes": b64(&[7])}),
    );
    let h = handle_of(&r, "import 1 byte");
    assert_eq!(api.sign_hmac(&h, msg), hmac_sha256(&[7], msg));
}

fn key_get(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);
    let k = random(32);
    api.import_key("getme", &k);

    let h = api.get_key("getme");
    let p = Handle::parse(&h);
    assert_eq!((p.kind().as_str(), p.id().as_str()), ("Key", "getme"));
    assert_eq!(api.sign_hmac(&h, b"m"), hmac_sha256(&k, b"m"));

    // not found → 400 lib, never 404
    expect_err(&api.get("/key/missing"), 400, LIB_INVALID);

    // the path segment is percent-decoded: "a/b" must be sent as a%2Fb
    let k2 = random(32);
    api.import_key("a/b", &k2);
    let h2 = api.get_key("a/b");
    assert_eq!(Handle::parse(&h2).id(), "a/b");
    assert_eq!(api.sign_hmac(&h2, b"m"), hmac_sha256(&k2, b"m"));
    expect_err(&api.get("/key/a/b"), 404, "not found");
    // invalid UTF-8 after decoding → the route does not match
    expect_err(&api.get("/key/%FF%FE"), 404, "not found");
    // in a path '+' is a literal plus (no form decoding); %20 is a space
    let plus = api.create_key("a+b", "sign");
    assert_eq!(
        Handle::parse(&handle_of(&api.get("/key/a+b"), "GET /key/a+b")).id(),
        "a+b"
    );
    assert_eq!(
        api.sign_hmac(&plus, b"m"),
        api.sign_hmac(&api.get_key("a+b"), b"m")
    );
    expect_err(&api.get("/key/a%20b"), 400, LIB_INVALID);
    // NUL in a decoded id
    for path in ["/key/a%00b", "/keypair/a%00b"] {
        expect_err_prefix(&api.get(path), 400, "parameter \"id\" has an invalid value");
    }
    // unicode ids round-trip
    api.create_key("ключ-🔑", "sign");
    assert_eq!(Handle::parse(&api.get_key("ключ-🔑")).id(), "ключ-🔑");
}

fn key_delete(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);
    let h = api.create_key("del", "sign");
    assert!(keyd.key_stored("del"));

    let pair = api.create_keypair("delpair", Some("ec-p256"));
    expect_err(&api.delete_key(&pair), 400, NOT_FOR_KEY);
    let derived = api.derive(&h, b"data");
    expect_err(&api.delete_key(&derived), 400, NOT_FOR_KEY);

    let r = api.delete_key(&h);
    assert_eq!(r.status, 204, "{r}");
    assert!(!keyd.key_stored("del"), "key removed from the store");
    expect_err(&api.get("/key/del"), 400, LIB_INVALID);
    expect_err(&api.sign_hmac_resp(&h, b"m"), 400, LIB_INVALID);
    // idempotent
    assert_eq!(api.delete_key(&h).status, 204);
    expect_err(
        &api.call("DELETE", "/key", None),
        400,
        "missing request body",
    );
    // the key pair was not touched
    assert_eq!(api.param(&pair, "algorithm"), "ECDSA");
}

fn key_post_with_id_is_always_400(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);
    api.create_key("x", "sign");
    expect_err(
        &api.post("/key/x", &json!({"from": "x"})),
        400,
        "source and destination for move are identical",
    );
    expect_err(
        &api.post("/key/x", &json!({"from": "y"})),
        400,
        "invalid type \"key\"",
    );
    expect_err(
        &api.post("/key/nope", &json!({"from": "y"})),
        400,
        "invalid type \"key\"",
    );
    expect_err(
        &api.call("POST", "/key/x", None),
        400,
        "missing request body",
    );
    expect_err(
        &api.delete("/key/x", &json!({"from": "y"})),
        400,
        "method not allowed",
    );
    expect_err(
        &api.call("PUT", "/key/x", Some(&json!({}))),
        400,
        "method not allowed",
    );
    // the key is still there
    api.get_key("x");
}

fn keypair_create_algorithms(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);

    let ec = api.create_keypair("ec", Some("ec-p256"));
    let p = Handle::parse(&ec);
    assert_eq!((p.kind().as_str(), p.id().as_str()), ("KeyPair", "ec"));
    assert!(
        p.sr_text()
            .starts_with(r#"{"key_id":{"KeyPair":"ec"},"nonce":""#),
        "{}",
        p.sr_text()
    );
    assert_eq!(api.param(&ec, "algorithm"), "ECDSA");
    if keyd.backend() == Backend::File {
        let pem = std::fs::read_to_string(keyd.keys_dir().join(key_file_name("ec"))).expect("pem");
        assert!(
            pem.starts_with("-----BEGIN PRIVATE KEY-----"),
            "generated pairs are PKCS#8: {pem}"
        );
        let local = openssl::pkey::PKey::private_key_from_pem(pem.as_bytes()).expect("parse pem");
        assert_eq!(
            unb64(&api.param(&ec, "ec-point")),
            ec_compressed_point(&local.ec_key().expect("ec")),
            "file and ec-point agree"
        );
    } else {
        // private + public object labelled with the id; the pair signs for its ec-point
        let labels = keyd.softhsm().expect("token").labels();
        assert_eq!(labels.iter().filter(|l| *l == "ec").count(), 2, "{labels:?}");
        let digest = sha256(b"token pair");
        let point = unb64(&api.param(&ec, "ec-point"));
        assert!(ecdsa_verify(&point, &digest, &api.sign_ecdsa(&ec, &digest)));
    }

    let rsa = api.create_keypair("rsa", Some("rsa-2048"));
    assert_eq!(api.param(&rsa, "algorithm"), "RSA");
    assert_eq!(unb64(&api.param(&rsa, "rsa-modulus")).len(), 256);

    // default / null / "*" → ec-p256 first
    for (id, body) in [
        ("default", json!({"keyId": "default"})),
        (
            "null",
            json!({"keyId": "null", "preferredAlgorithms": null}),
        ),
        ("star", json!({"keyId": "star", "preferredAlgorithms": "*"})),
        (
            "unknown-first",
            json!({"keyId": "unknown-first", "preferredAlgorithms": "foo:ec-p256"}),
        ),
        (
            "dup",
            json!({"keyId": "dup", "preferredAlgorithms": "ec-p256:ec-p256:rsa-2048"}),
        ),
    ] {
        let h = handle_of(&api.post("/keypair", &body), id);
        assert_eq!(api.param(&h, "algorithm"), "ECDSA", "{id}");
    }
    // filesystem: only the first listed algorithm is attempted (token: the first that works)
    let h = api.create_keypair("rsa-first", Some("rsa-2048:ec-p256"));
    assert_eq!(api.param(&h, "algorithm"), "RSA");

    // nothing recognised → 400 lib
    for algs in ["ed25519", "", "rsa-1024:p384"] {
        let r = api.post(
            "/keypair",
            &json!({"keyId": "bad", "preferredAlgorithms": algs}),
        );
        expect_err(&r, 400, LIB_INVALID);
    }
    assert!(!keyd.key_stored("bad"));
    let r = api.post(
        "/keypair",
        &json!({"keyId": "bad", "preferredAlgorithms": 5}),
    );
    assert_eq!(r.status, 422, "{r}");

    // create again with another algorithm: the existing pair is returned unchanged
    let point = api.param(&ec, "ec-point");
    let again = api.create_keypair("ec", Some("rsa-2048"));
    assert_ne!(again, ec);
    assert_eq!(api.param(&again, "algorithm"), "ECDSA");
    assert_eq!(api.param(&again, "ec-point"), point);
}

/// RSA-4096 generation is slow: one case only.
#[test]
fn keypair_rsa_4096() {
    aziot_tests::require_keyd!();
    let keyd = Keyd::start("");
    let api = keyd.api(V2021);
    let h = api.create_keypair("big", Some("rsa-4096"));
    assert_eq!(api.param(&h, "algorithm"), "RSA");
    let n = unb64(&api.param(&h, "rsa-modulus"));
    assert_eq!(n.len(), 512);
    assert!(n[0] & 0x80 != 0, "modulus has full length");
    assert_eq!(api.param(&h, "rsa-exponent"), "AQAB");
    let pk = rsa_public(&n, &unb64(&api.param(&h, "rsa-exponent")));
    let digest_info = [
        &b"\x30\x31\x30\x0d\x06\x09\x60\x86\x48\x01\x65\x03\x04\x02\x01\x05\x00\x04\x20"[..],
        &sha256(b"x"),
    ]
    .concat();
    let sig = api.encrypt_rsa(&h, "RSA-PKCS1", &digest_info);
    assert_eq!(sig.len(), 512);
    assert_eq!(
        rsa_public_decrypt(&pk, &sig, openssl::rsa::Padding::PKCS1),
        Some(digest_info)
    );
}

fn keypair_get_and_delete(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);
    let h = api.create_keypair("p", Some("ec-p256"));
    let point = api.param(&h, "ec-point");

    let g = api.get_keypair("p");
    let gp = Handle::parse(&g);
    assert_eq!((gp.kind().as_str(), gp.id().as_str()), ("KeyPair", "p"));
    assert_eq!(api.param(&g, "ec-point"), point);
    expect_err(&api.get("/keypair/missing"), 400, LIB_INVALID);

    let key = api.create_key("sym", "sign");
    expect_err(&api.delete_keypair(&key), 400, NOT_FOR_KEY_PAIR);
    expect_err(
        &api.delete_keypair(&api.derive(&key, b"d")),
        400,
        NOT_FOR_KEY_PAIR,
    );
    expect_err(
        &api.call("DELETE", "/keypair", None),
        400,
        "missing request body",
    );

    let r = api.delete_keypair(&h);
    assert_eq!(r.status, 204, "{r}");
    assert!(!keyd.key_stored("p"));
    expect_err(&api.get("/keypair/p"), 400, LIB_INVALID);
    expect_err(&api.param_resp(&g, "ec-point"), 400, LIB_INVALID);
    expect_err(&api.sign_ecdsa_resp(&g, &sha256(b"x")), 400, LIB_INVALID);
    assert_eq!(api.delete_keypair(&h).status, 204, "idempotent");
    // the symmetric key was not touched
    api.get_key("sym");
}

fn keypair_and_key_share_one_namespace(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);
    let bytes = random(32);
    let kh = api.import_key("shared", &bytes);

    if keyd.backend() == Backend::File {
        // GET /keypair on raw symmetric bytes: keyd.md §5.15 → 500
        expect_err(&api.get("/keypair/shared"), 500, "internal error");
    } else {
        // on the token there is no pair object with that label: not found
        expect_err(&api.get("/keypair/shared"), 400, LIB_INVALID);
    }
    // creating a pair over a symmetric key is refused (deliberate difference) ...
    let r = api.post(
        "/keypair",
        &json!({"keyId": "shared", "preferredAlgorithms": "ec-p256"}),
    );
    assert_eq!(r.status, 400, "pair over an existing symmetric key\n{r}");
    // ... and the symmetric key survives
    assert_eq!(api.sign_hmac(&kh, b"m"), hmac_sha256(&bytes, b"m"));
    if keyd.backend() == Backend::File {
        assert_eq!(
            std::fs::read(keyd.keys_dir().join(key_file_name("shared"))).expect("file"),
            bytes
        );
    }

    // GET /key on a key pair is refused (deliberate difference)
    api.create_keypair("pair", Some("ec-p256"));
    let r = api.get("/key/pair");
    assert_eq!(r.status, 400, "GET /key on a key pair\n{r}");
}

fn keypair_move(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);
    let src = api.create_keypair("src", Some("ec-p256"));
    let point = unb64(&api.param(&src, "ec-point"));

    expect_err(
        &api.move_keypair("src", "src"),
        400,
        "source and destination for move are identical",
    );
    // compared after percent-decoding the destination
    expect_err(
        &api.post("/keypair/s%72c", &json!({"from": "src"})),
        400,
        "source and destination for move are identical",
    );
    expect_err(
        &api.call("POST", "/keypair/dst", None),
        400,
        "missing request body",
    );
    let r = api.post("/keypair/dst", &json!({"source": "src"}));
    assert_eq!(r.status, 422, "missing `from`\n{r}");

    let r = api.move_keypair("src", "dst");
    assert_eq!(r.status, 204, "{r}");
    assert!(!keyd.key_stored("src"));
    assert!(keyd.key_stored("dst"));
    expect_err(&api.get("/keypair/src"), 400, LIB_INVALID);
    expect_err(&api.param_resp(&src, "ec-point"), 400, LIB_INVALID);
    let dst = api.get_keypair("dst");
    assert_eq!(unb64(&api.param(&dst, "ec-point")), point);
    let digest = sha256(b"moved");
    assert!(ecdsa_verify(
        &point,
        &digest,
        &api.sign_ecdsa(&dst, &digest)
    ));

    // the destination is replaced if it exists
    let other = api.create_keypair("other", Some("rsa-2048"));
    assert_eq!(api.param(&other, "algorithm"), "RSA");
    assert_eq!(api.move_keypair("dst", "other").status, 204);
    let other = api.get_keypair("other");
    assert_eq!(unb64(&api.param(&other, "ec-point")), point);
    expect_err(&api.get("/keypair/dst"), 400, LIB_INVALID);

    // ids in the path are percent-decoded
    assert_eq!(api.move_keypair("other", "x/y").status, 204);
    assert_eq!(
        unb64(&api.param(&api.get_keypair("x/y"), "ec-point")),
        point
    );

    // missing source on the filesystem → 500 (keyd.md §5.7)
    expect_err(
        &api.move_keypair("never-existed", "z"),
        500,
        "internal error",
    );
}

fn parameters_ec(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);
    let h = api.create_keypair("ec", Some("ec-p256"));
    assert_eq!(api.param(&h, "algorithm"), "ECDSA");
    assert_eq!(api.param(&h, "ec-curve-oid"), "BggqhkjOPQMBBw==");
    let point = unb64(&api.param(&h, "ec-point"));
    assert_eq!(point.len(), 33, "compressed P-256 point");
    assert!(
        point[0] == 2 || point[0] == 3,
        "compressed form: {:02x}",
        point[0]
    );
    // the parameter name is percent-decoded
    assert_eq!(unb64(&api.param(&h, "ec%2Dpoint")), point);

    // ECDSA signature from /sign verifies against the public key built from ec-point
    let digest = sha256(b"hello");
    let sig = api.sign_ecdsa(&h, &digest);
    assert!(
        ecdsa_verify(&point, &digest, &sig),
        "ECDSA signature must verify"
    );
    assert!(!ecdsa_verify(&point, &sha256(b"other"), &sig));

    for name in ["rsa-modulus", "rsa-exponent", "foo", "ALGORITHM"] {
        expect_err(&api.param_resp(&h, name), 400, LIB_INVALID);
    }
    expect_err(
        &api.call("POST", "/parameters/algorithm", None),
        400,
        "missing request body",
    );
    // symmetric / derived handles: deliberate difference, 400 instead of 500
    let key = api.create_key("sym", "sign");
    expect_err(&api.param_resp(&key, "algorithm"), 400, NOT_FOR_KEY_PAIR);
    let derived = api.derive(&key, b"x");
    expect_err(&api.param_resp(&derived, "ec-point"), 400, NOT_FOR_KEY_PAIR);
}

fn parameters_rsa(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);
    let h = api.create_keypair("rsa", Some("rsa-2048"));
    assert_eq!(api.param(&h, "algorithm"), "RSA");
    let n = unb64(&api.param(&h, "rsa-modulus"));
    assert_eq!(n.len(), 256, "minimal big-endian modulus of a 2048-bit key");
    assert!(n[0] & 0x80 != 0);
    assert_eq!(api.param(&h, "rsa-exponent"), "AQAB");
    if keyd.backend() == Backend::File {
        let pem = std::fs::read(keyd.keys_dir().join(key_file_name("rsa"))).expect("pem");
        let local = openssl::pkey::PKey::private_key_from_pem(&pem).expect("pem");
        assert_eq!(
            local.rsa().expect("rsa").n().to_vec(),
            n,
            "file and modulus agree"
        );
    } else {
        // the token's pair: a PKCS#1 signature made through keyd opens with (n, e)
        let pk = rsa_public(&n, &unb64(&api.param(&h, "rsa-exponent")));
        let digest_info = [
            &b"\x30\x31\x30\x0d\x06\x09\x60\x86\x48\x01\x65\x03\x04\x02\x01\x05\x00\x04\x20"[..],
            &sha256(b"y"),
        ]
        .concat();
        let sig = api.encrypt_rsa(&h, "RSA-PKCS1", &digest_info);
        assert_eq!(rsa_public_decrypt(&pk, &sig, openssl::rsa::Padding::PKCS1), Some(digest_info));
    }
    for name in ["ec-point", "ec-curve-oid", "rsa"] {
        expect_err(&api.param_resp(&h, name), 400, LIB_INVALID);
    }
}
