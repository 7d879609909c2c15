//! The request pipeline (common-http.md §5, §9; keyd.md §5.14): api-version, routing, methods,
//! bodies and content types, forged handles, body limits, HTTP framing, keep-alive.

use std::io::Write as _;
use std::time::{Duration, Instant};

use aziot_tests::api::*;
use aziot_tests::crypto::*;
use aziot_tests::http::{build_request, build_request_ct, Conn};
use aziot_tests::{both_versions, Keyd};
use serde_json::json;

both_versions!(
    api_version_handling,
    routing_and_methods,
    bodies_and_content_types,
    forged_handles,
    body_too_large,
    body_too_slow,
    keep_alive_and_framing,
    put_is_decoded_before_method_dispatch,
);

/// Every (method, path) of keyd that takes a body.
const BODY_ROUTES: &[(&str, &str)] = &[
    ("POST", "/key"),
    ("DELETE", "/key"),
    ("POST", "/key/x"),
    ("POST", "/keypair"),
    ("DELETE", "/keypair"),
    ("POST", "/keypair/x"),
    ("POST", "/parameters/algorithm"),
    ("POST", "/derivedkey"),
    ("POST", "/derivedkey/export"),
    ("POST", "/sign"),
    ("POST", "/encrypt"),
    ("POST", "/decrypt"),
];

fn api_version_handling(v: &'static str) {
    let keyd = Keyd::start("");
    let root = Api::new(keyd.socket().to_path_buf(), v);
    let body = serde_json::to_vec(&json!({"keyId": "k", "usage": "sign"})).expect("json");
    let send = |target: &str| {
        let r = root.exchange(&build_request("POST", target, Some(&body)));
        check_envelope(&r, target);
        r
    };

    // missing: checked before routing
    for target in [
        "/key",
        "/key?foo=bar",
        "/nonexistent",
        "/keypair/",
        "/key?api_version=2021-05-01",
    ] {
        expect_err(&send(target), 400, "api-version not specified");
    }
    let r = root.exchange(&build_request("GET", "/unknown/path", None));
    expect_err(&r, 400, "api-version not specified");

    // unknown values (Rust debug quoting of the decoded value)
    for (q, shown) in [
        ("2099-01-01", "\"2099-01-01\""),
        ("", "\"\""),
        ("2021-12-01", "\"2021-12-01\""),
        ("a%22b", "\"a\\\"b\""),
        ("a+b", "\"a b\""),
        ("a%5Cb", "\"a\\\\b\""),
    ] {
        expect_err(
            &send(&format!("/key?api-version={q}")),
            400,
            &format!("invalid api-version {shown}"),
        );
        // also before routing
        expect_err(
            &send(&format!("/nope?api-version={q}")),
            400,
            &format!("invalid api-version {shown}"),
        );
    }

    expect_err(&send("/key?api-version"), 400, "invalid api-version \"\"");
    expect_err(
        &send(&format!("/key?api-version={v}%20")),
        400,
        &format!("invalid api-version \"{v} \""),
    );
    // the last occurrence wins; other parameters are ignored; names are form-decoded
    assert_eq!(
        send(&format!("/key?api-version=2099-01-01&api-version={v}")).status,
        200
    );
    expect_err(
        &send(&format!("/key?api-version={v}&api-version=x")),
        400,
        "invalid api-version \"x\"",
    );
    assert_eq!(send(&format!("/key?x=1&api-version={v}&y=2")).status, 200);
    assert_eq!(
        send(&format!("/key?api%2Dversion={}", v.replace('-', "%2D"))).status,
        200
    );
}

fn routing_and_methods(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);
    let body = json!({"keyHandle": "x"});

    for path in [
        "/foo",
        "/keypair/",
        "/key/",
        "/parameters/",
        "/sign/",
        "/derivedkey/export/",
        "/KEY",
        "/key/a/b",
        "//key",
        "/keys",
        "/",
        "/key/%FF",
        "/parameters/a/b",
    ] {
        expect_err(&api.call("POST", path, Some(&body)), 404, "not found");
    }
    expect_err(&api.get("/keypair/"), 404, "not found");

    for (method, path, with_body) in [
        ("PATCH", "/key", true),
        ("GET", "/sign", false),
        ("GET", "/key", false),
        ("GET", "/keypair", false),
        ("PUT", "/keypair", true),
        ("OPTIONS", "/encrypt", false),
        ("DELETE", "/keypair/x", true),
        ("DELETE", "/key/x", true),
        ("GET", "/derivedkey", false),
        ("DELETE", "/sign", true),
        ("GET", "/parameters/algorithm", false),
        ("PUT", "/decrypt", true),
    ] {
        let r = api.call(method, path, with_body.then_some(&body));
        expect_err(&r, 400, "method not allowed");
    }
}

fn bodies_and_content_types(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);

    for &(method, path) in BODY_ROUTES {
        expect_err(&api.call(method, path, None), 400, "missing request body");
        expect_err(
            &api.call_bytes(method, path, Some(b"")),
            400,
            "missing request body",
        );
        // a non-JSON content type makes the body "absent"
        let r = api.call_ct(
            method,
            path,
            br#"{"keyId":"k","usage":"sign"}"#,
            Some("text/plain"),
        );
        expect_err(&r, 400, "missing request body");
        let r = api.call_ct(
            method,
            path,
            br#"{"keyId":"k","usage":"sign"}"#,
            Some("Application/JSON"),
        );
        expect_err(&r, 400, "missing request body");
        // malformed / mistyped JSON → 422 with a parser message
        for bad in [
            &b"{"[..],
            b"nul",
            b"[]",
            b"null",
            b"\"str\"",
            br#"{"keyHandle": 5, "keyId": 5, "from": 5}"#,
        ] {
            let r = api.call_bytes(method, path, Some(bad));
            assert_eq!(
                r.status,
                422,
                "{method} {path} {:?}\n{r}",
                String::from_utf8_lossy(bad)
            );
            assert!(!r.message().is_empty());
        }
    }

    // Content-Type absent or with parameters → JSON
    let body = br#"{"keyId":"ct","usage":"sign"}"#;
    assert_eq!(api.call_ct("POST", "/key", body, None).status, 200);
    assert_eq!(
        api.call_ct(
            "POST",
            "/key",
            body,
            Some("application/json; charset=utf-8")
        )
        .status,
        200
    );
    assert_eq!(
        api.call_ct("POST", "/key", body, Some(" application/json ;x=y"))
            .status,
        200
    );

    // POST /key schema
    let r = api.post("/key", &json!({"usage": "sign"}));
    assert_eq!(r.status, 422, "{r}");
    assert!(r.message().contains("missing field `keyId`"), "{r}");
    let r = api.post("/key", &json!({"keyId": "k"}));
    assert_eq!(r.status, 422, "{r}");
    assert!(r.message().contains("usage"), "{r}");
    for usage in [
        "",
        "Sign",
        "sign,",
        ",sign",
        "sign,,derive",
        "sign, derive",
        "verify",
        "SIGN",
    ] {
        let r = api.post("/key", &json!({"keyId": "k", "usage": usage}));
        assert_eq!(r.status, 422, "usage {usage:?}\n{r}");
    }
    for (what, body) in [
        ("keyId type", json!({"keyId": 1, "usage": "sign"})),
        ("usage type", json!({"keyId": "k", "usage": ["sign"]})),
        (
            "keyBytes type",
            json!({"keyId": "k", "usage": "sign", "keyBytes": 5}),
        ),
        (
            "unpadded base64",
            json!({"keyId": "k", "usage": "sign", "keyBytes": "QUI"}),
        ),
        (
            "whitespace in base64",
            json!({"keyId": "k", "usage": "sign", "keyBytes": "QU JD"}),
        ),
        (
            "newline in base64",
            json!({"keyId": "k", "usage": "sign", "keyBytes": "QUJD\n"}),
        ),
        (
            "url-safe base64",
            json!({"keyId": "k", "usage": "sign", "keyBytes": "_-8="}),
        ),
        (
            "usage missing on import",
            json!({"keyId": "k", "keyBytes": "QUJD"}),
        ),
    ] {
        let r = api.post("/key", &body);
        assert_eq!(r.status, 422, "{what}\n{r}");
    }
    // NUL in an id
    let r = api.post("/key", &json!({"keyId": "a\u{0}b", "usage": "sign"}));
    expect_err_prefix(&r, 400, "parameter \"id\" has an invalid value");
    // `keyHandle` not a string on every handle-consuming route
    for path in [
        "/parameters/algorithm",
        "/derivedkey/export",
        "/sign",
        "/encrypt",
        "/decrypt",
    ] {
        let r = api.post(path, &json!({"keyHandle": 42}));
        assert_eq!(r.status, 422, "{path}\n{r}");
    }
}

/// common-http.md §5 step 5 (and §9): PUT checks the content type (415) and decodes the JSON
/// body (empty → 422) before the route's method table answers `method not allowed`.
fn put_is_decoded_before_method_dispatch(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);
    expect_err(
        &api.call("PUT", "/key", Some(&json!({}))),
        400,
        "method not allowed",
    );
    let r = api.call_ct("PUT", "/key", b"{}", Some("text/plain"));
    expect_err(&r, 415, "request body must be application/json");
    let r = api.call_bytes("PUT", "/keypair", Some(b""));
    assert_eq!(r.status, 422, "PUT with an empty JSON body\n{r}");
    let r = api.call_bytes("PUT", "/sign", Some(b"{"));
    assert_eq!(r.status, 422, "PUT with malformed JSON\n{r}");
}

fn forged_handles(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);
    let key = api.create_key("k", "sign");
    let pair = api.create_keypair("p", Some("ec-p256"));
    let derived = api.derive(&key, b"d");
    let kp = Handle::parse(&key);
    let pp = Handle::parse(&pair);

    // pieces in any order / extra pieces are fine (keyd.md §4.3 step 1)
    let (sr_part, sig_part) = key.split_once('&').expect("two pieces");
    let reordered = format!("{sig_part}&{sr_part}");
    assert_eq!(api.sign_hmac(&reordered, b"m"), api.sign_hmac(&key, b"m"));
    let extra = format!("se=1&{key}&foo=bar");
    assert_eq!(api.sign_hmac(&extra, b"m"), api.sign_hmac(&key, b"m"));

    let other = Keyd::start("");
    let foreign = other.api(v).create_key("k", "sign");

    let forgeries = [
        String::new(),
        "hello".to_owned(),
        "sr=&sig=".to_owned(),
        sr_part.to_owned(),
        sig_part.to_owned(),
        tamper(&key, "sig"),
        tamper(&key, "sr"),
        make_handle(&kp.sr_raw, &pp.sig),
        make_handle(br#"{"key_id":{"Key":"k"},"nonce":"AA=="}"#, &kp.sig),
        make_handle(&kp.sr_raw, &[]),
        key.trim_end_matches('=').to_owned(),
        format!("{key}x"),
        key.replace("sr=", "sr= "),
        foreign,
    ];
    for forged in &forgeries {
        let h = forged.as_str();
        let d = b64(b"data");
        let calls = [
            ("DELETE", "/key", json!({"keyHandle": h})),
            ("DELETE", "/keypair", json!({"keyHandle": h})),
            ("POST", "/parameters/algorithm", json!({"keyHandle": h})),
            (
                "POST",
                "/derivedkey",
                json!({"baseKeyHandle": h, "derivationData": d}),
            ),
            ("POST", "/derivedkey/export", json!({"keyHandle": h})),
            (
                "POST",
                "/sign",
                json!({"keyHandle": h, "algorithm": "HMAC-SHA256", "parameters": {"message": d}}),
            ),
            (
                "POST",
                "/sign",
                json!({"keyHandle": h, "algorithm": "ECDSA", "parameters": {"digest": d}}),
            ),
            (
                "POST",
                "/encrypt",
                json!({"keyHandle": h, "algorithm": "AEAD",
                "parameters": {"iv": d, "aad": d}, "plaintext": d}),
            ),
            (
                "POST",
                "/encrypt",
                json!({"keyHandle": h, "algorithm": "RSA-PKCS1", "plaintext": d}),
            ),
            (
                "POST",
                "/decrypt",
                json!({"keyHandle": h, "algorithm": "AEAD",
                "parameters": {"iv": d, "aad": d}, "ciphertext": d}),
            ),
        ];
        for (method, path, body) in calls {
            let r = api.call(method, path, Some(&body));
            expect_err(&r, 400, INVALID_HANDLE);
        }
    }
    // a derived handle whose embedded base was tampered with
    let dp = Handle::parse(&derived);
    let tampered_sr = String::from_utf8(dp.sr_raw.clone())
        .expect("utf8")
        .replacen("sig=", "sig=AAAA", 1);
    let forged_derived = make_handle(tampered_sr.as_bytes(), &dp.sig);
    expect_err(&api.export_resp(&forged_derived), 400, INVALID_HANDLE);

    // nothing was deleted by the forged calls
    assert_eq!(api.param(&pair, "algorithm"), "ECDSA");
    api.get_key("k");
    assert_eq!(api.export(&derived).len(), 32);
}

fn body_too_large(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);
    let key = api.create_key("k", "sign");

    // a 4 MiB message is fine
    let big = random(4 * 1024 * 1024);
    assert_eq!(api.sign_hmac(&key, &big), api.sign_hmac(&key, &big));

    // > 16 MiB → 413 {"message": ...}; the body is streamed while we read the answer
    let len = 16 * 1024 * 1024 + 1;
    let head = format!(
        "POST /sign?api-version={v} HTTP/1.1\r\nHost: keyd.sock\r\nContent-Type: application/json\r\n\
         Content-Length: {len}\r\n\r\n"
    );
    let mut conn = keyd.conn();
    conn.send_raw(head.as_bytes()).expect("send head");
    let mut writer = conn.stream().try_clone().expect("clone");
    let feeder = std::thread::spawn(move || {
        let chunk = vec![b' '; 64 * 1024];
        let mut sent = 0usize;
        while sent < len {
            let n = chunk.len().min(len - sent);
            if writer.write_all(&chunk[..n]).is_err() {
                break; // the server may stop reading once it has answered
            }
            sent += n;
        }
    });
    let r = conn
        .read_response()
        .expect("a 413 response, not a dropped connection");
    check_envelope(&r, "oversized body");
    assert_eq!(r.status, 413, "{r}");
    assert!(!r.message().is_empty());
    drop(conn);
    feeder.join().expect("feeder");

    // a declared Content-Length over the cap is refused too
    let head = format!(
        "POST /key?api-version={v} HTTP/1.1\r\nHost: keyd.sock\r\nContent-Type: application/json\r\n\
         Content-Length: 1000000000\r\n\r\n{{\"keyId\""
    );
    let r = keyd.raw(head.as_bytes()).expect("response");
    assert_eq!(r.status, 413, "{r}");
    // still serving
    assert_eq!(api.sign_hmac(&key, b"m").len(), 32);
}

fn body_too_slow(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);
    let body = br#"{"keyId":"slow","usage":"sign"}"#;
    let head = format!(
        "POST /key?api-version={v} HTTP/1.1\r\nHost: keyd.sock\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    let mut conn = keyd.conn();
    conn.set_read_timeout(Duration::from_secs(30))
        .expect("timeout");
    let start = Instant::now();
    conn.send_raw(head.as_bytes()).expect("head");
    conn.send_raw(&body[..10]).expect("part of the body");
    let r = conn.read_response().expect("a 408 response");
    let waited = start.elapsed();
    check_envelope(&r, "slow body");
    expect_err(&r, 408, "deadline has elapsed");
    assert!(
        waited >= Duration::from_millis(4500),
        "408 came after {waited:?}, expected ~5 s"
    );
    assert!(
        waited < Duration::from_secs(20),
        "408 came after {waited:?}"
    );
    assert!(!keyd.keys_dir().join(key_file_name("slow")).exists());
    // a body trickling in within 5 s is fine
    let mut conn = keyd.conn();
    conn.send_raw(head.as_bytes()).expect("head");
    for b in body.chunks(8) {
        // The scenario, not a wait for a state: a client pausing mid-body (under the 5 s limit).
        std::thread::sleep(Duration::from_millis(300));
        conn.send_raw(b).expect("chunk");
    }
    let r = conn.read_response().expect("response");
    assert_eq!(r.status, 200, "{r}");
    api.get_key("slow");
}

fn keep_alive_and_framing(v: &'static str) {
    let keyd = Keyd::start("");
    let api = keyd.api(v);
    let key = api.create_key("k", "sign");
    let t = |p: &str| api.target(p);
    let sign_body = serde_json::to_vec(
        &json!({"keyHandle": key, "algorithm": "HMAC-SHA256", "parameters": {"message": "bQ=="}}),
    )
    .expect("json");

    // many requests, successes and errors mixed, on one connection
    let mut conn = keyd.conn();
    for i in 0..20 {
        let (method, target, body, status) = match i % 4 {
            0 => ("POST", t("/sign"), Some(&sign_body[..]), 200),
            1 => ("POST", t("/nope"), Some(&b"{}"[..]), 404),
            2 => ("GET", t("/key/k"), None, 200),
            _ => ("POST", t("/sign"), Some(&b"{"[..]), 422),
        };
        let r = conn
            .request(method, &target, body)
            .expect("keep-alive request");
        check_envelope(&r, &target);
        assert_eq!(r.status, status, "request {i} on a reused connection\n{r}");
        assert!(
            !r.connection_close(),
            "server must not force Connection: close\n{r}"
        );
    }
    // pipelined requests are answered in order
    let mut two = build_request("POST", &t("/sign"), Some(&sign_body));
    two.extend(build_request("GET", &t("/key/missing"), None));
    conn.send_raw(&two).expect("pipelined");
    assert_eq!(conn.read_response().expect("first").status, 200);
    assert_eq!(conn.read_response().expect("second").status, 400);

    // a GET with a body: the body is ignored (and drained: the connection stays usable)
    let mut get_with_body = format!(
        "GET {} HTTP/1.1\r\nHost: keyd.sock\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n",
        t("/key/k")
    )
    .into_bytes();
    get_with_body.extend_from_slice(b"{\"x\":1}");
    conn.send_raw(&get_with_body).expect("GET with body");
    assert_eq!(conn.read_response().expect("GET with body").status, 200);
    let r = conn
        .request("GET", &t("/key/k"), None)
        .expect("next request after a GET body");
    assert_eq!(r.status, 200, "{r}");
    // a chunked request body
    let chunked = format!(
        "POST {} HTTP/1.1\r\nHost: keyd.sock\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
         a\r\n{{\"keyId\":\"\r\n18\r\nchunked\",\"usage\":\"sign\"}}\r\n0\r\n\r\n",
        t("/key")
    );
    conn.send_raw(chunked.as_bytes()).expect("chunked");
    let r = conn.read_response().expect("chunked response");
    check_envelope(&r, "chunked request");
    assert_eq!(r.status, 200, "{r}");
    api.get_key("chunked");

    // the synchronous upstream client: lowercase headers, no Host header
    let body = br#"{"keyId":"sync","usage":"sign"}"#;
    let raw = format!(
        "POST {} HTTP/1.1\r\ncontent-length: {}\r\ncontent-type: application/json\r\n\r\n",
        t("/key"),
        body.len()
    );
    let r = keyd
        .raw(&[raw.as_bytes(), body].concat())
        .expect("response");
    check_envelope(&r, "no Host header");
    assert_eq!(r.status, 200, "{r}");
    let r = keyd
        .raw(format!("GET {} HTTP/1.1\r\n\r\n", t("/key/sync")).as_bytes())
        .expect("response");
    assert_eq!(r.status, 200, "{r}");
    // absolute-form target with a host, as the async clients send it
    let r = keyd
        .raw(&build_request_ct(
            "GET",
            &format!("http://keyd.sock{}", t("/key/sync")),
            None,
            None,
        ))
        .expect("response");
    assert_eq!(r.status, 200, "absolute-form request target\n{r}");

    // malformed HTTP: answered with an error or closed, and the service keeps serving
    for junk in [
        &b"GARBAGE\r\n\r\n"[..],
        b"POST /key HTTP/1.1\r\nno colon here\r\n\r\n",
        b"POST /key?api-version=2021-05-01 HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"\x00\x01\x02\x03\r\n\r\n",
    ] {
        let mut c = Conn::connect(keyd.socket()).expect("connect");
        c.set_read_timeout(Duration::from_secs(10))
            .expect("timeout");
        c.send_raw(junk).expect("send");
        match c.read_response() {
            Ok(r) => assert!(
                (400..500).contains(&r.status),
                "{:?}\n{r}",
                String::from_utf8_lossy(junk)
            ),
            Err(e) => assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ),
                "malformed request {:?}: neither an error response nor a close: {e}",
                String::from_utf8_lossy(junk)
            ),
        }
    }
    // a huge header block
    let mut c = Conn::connect(keyd.socket()).expect("connect");
    c.set_read_timeout(Duration::from_secs(10))
        .expect("timeout");
    let huge = format!(
        "GET {} HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        t("/key/k"),
        "a".repeat(1 << 20)
    );
    let _ = c.send_raw(huge.as_bytes());
    match c.read_response() {
        Ok(r) => assert!((400..500).contains(&r.status), "{r}"),
        Err(e) => assert_ne!(
            e.kind(),
            std::io::ErrorKind::WouldBlock,
            "no answer to a 1 MiB header"
        ),
    }
    assert_eq!(api.sign_hmac(&key, b"m").len(), 32, "still serving");
}
