//! Caller identity, principals, the reserved handle-validation key, throttling and the socket
//! permission gate (common-http.md §4.1, §7; keyd.md §3, §4.2). Other uids are real processes
//! (the helper binary, and curl) running with `Command::uid`.

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::process::Command;
use std::time::{Duration, Instant};

use aziot_tests::api::*;
use aziot_tests::crypto::*;
use aziot_tests::keyd::{exchange_as, Activation, TEST_GID};
use aziot_tests::{both_versions, Keyd};
use serde_json::json;

both_versions!(
    principals,
    move_authorization,
    handle_validation_key_is_reserved
);

const APP: u32 = 4242;
const OTHER: u32 = 4343;
const IGNORED: u32 = 4444;
const NOBODY: u32 = 5555;

fn principals(v: &'static str) {
    let keyd = Keyd::builder()
        .extra(&format!(
            "[[principal]]\nuid = {APP}\nkeys = [\"app-*\", \"dev?ce\", \"exact\"]\n\n\
             [[principal]]\nuid = {OTHER}\nkeys = [\"other-*\"]\n\n\
             [[principal]]\nuid = {APP}\nkeys = [\"second-*\"]\n"
        ))
        // drop-ins accumulate [[principal]] arrays; only regular *.toml files count
        .drop_in(
            "10-more.toml",
            &format!("[[principal]]\nuid = {OTHER}\nkeys = [\"dropin-*\"]\n"),
        )
        .drop_in(
            "20-ignored.txt",
            &format!("[[principal]]\nuid = {IGNORED}\nkeys = [\"*\"]\n"),
        )
        .drop_in(
            "30-ignored.TOML",
            &format!("[[principal]]\nuid = {IGNORED}\nkeys = [\"*\"]\n"),
        )
        .start();
    let root = keyd.api(v);
    let app = root.as_uid(APP);
    let other = root.as_uid(OTHER);

    // globs: `*` any sequence (also empty), `?` exactly one Unicode scalar, case-sensitive
    for id in [
        "app-1",
        "app-",
        "app-ключ",
        "dev1ce",
        "dev🔑ce",
        "exact",
        "second-x",
    ] {
        let h = app.create_key(id, "sign");
        assert_eq!(Handle::parse(&h).id(), id);
    }
    for id in [
        "App-1", "devce", "dev12ce", "exact2", "xexact", "other-1", "dropin-1", "ap",
    ] {
        expect_err(
            &app.post("/key", &json!({"keyId": id, "usage": "sign"})),
            401,
            &unauthorized(APP, id),
        );
    }
    other.create_key("other-1", "sign");
    other.create_key("dropin-1", "sign");
    expect_err(
        &other.post("/key", &json!({"keyId": "app-9", "usage": "sign"})),
        401,
        &unauthorized(OTHER, "app-9"),
    );
    for uid in [IGNORED, NOBODY] {
        let r = root
            .as_uid(uid)
            .post("/key", &json!({"keyId": "app-1", "usage": "sign"}));
        expect_err(&r, 401, &unauthorized(uid, "app-1"));
    }

    // every uid-checked endpoint, on an id the caller may not use (existing, owned by root)
    root.create_key("secret", "sign");
    root.create_keypair("secret-pair", Some("ec-p256"));
    expect_err(&app.get("/key/secret"), 401, &unauthorized(APP, "secret"));
    expect_err(
        &app.get("/keypair/secret-pair"),
        401,
        &unauthorized(APP, "secret-pair"),
    );
    expect_err(
        &app.post("/keypair", &json!({"keyId": "secret-pair"})),
        401,
        &unauthorized(APP, "secret-pair"),
    );
    expect_err(
        &app.post(
            "/key",
            &json!({"keyId": "secret", "usage": "sign", "keyBytes": b64(b"overwrite")}),
        ),
        401,
        &unauthorized(APP, "secret"),
    );
    // the check is on the percent-decoded id
    root.create_key("app-/x", "sign");
    assert_eq!(Handle::parse(&app.get_key("app-/x")).id(), "app-/x");
    expect_err(&app.get("/key/%73ecret"), 401, &unauthorized(APP, "secret"));

    // authorized loads and creates
    let pair = app.create_keypair("app-pair", Some("ec-p256"));
    assert_eq!(app.param(&pair, "algorithm"), "ECDSA");
    app.get_keypair("app-pair");
    app.get_key("app-1");

    // root is always allowed
    root.create_key("anything-at-all", "sign");
    root.get_key("app-1");
    root.get_keypair("app-pair");

    // handles are bearer capabilities: another uid can use and delete them
    let secret = root.get_key("secret");
    let sig = other.sign_hmac(&secret, b"m");
    assert_eq!(sig, root.sign_hmac(&secret, b"m"));
    let nobody = root.as_uid(NOBODY);
    let d = nobody.derive(&secret, b"x");
    assert_eq!(nobody.export(&d).len(), 32);
    let pair_h = root.get_keypair("secret-pair");
    assert_eq!(nobody.param(&pair_h, "algorithm"), "ECDSA");
    assert_eq!(nobody.delete_keypair(&pair_h).status, 204);
    assert_eq!(other.delete_key(&secret).status, 204);
    expect_err(&root.get("/key/secret"), 400, LIB_INVALID);
    expect_err(&root.get("/keypair/secret-pair"), 400, LIB_INVALID);
}

fn move_authorization(v: &'static str) {
    let keyd = Keyd::start(&format!("[[principal]]\nuid = {APP}\nkeys = [\"mv-*\"]\n"));
    let root = keyd.api(v);
    let app = root.as_uid(APP);
    root.create_keypair("mv-a", Some("ec-p256"));
    root.create_keypair("other-b", Some("ec-p256"));

    expect_err(
        &app.move_keypair("other-b", "mv-c"),
        401,
        &unauthorized(APP, "other-b"),
    );
    expect_err(
        &app.move_keypair("mv-a", "other-c"),
        401,
        &unauthorized(APP, "other-c"),
    );
    // `from` is checked first
    expect_err(
        &app.move_keypair("other-b", "other-c"),
        401,
        &unauthorized(APP, "other-b"),
    );
    // identical ids are refused before any authorization
    expect_err(
        &app.move_keypair("other-b", "other-b"),
        400,
        "source and destination for move are identical",
    );
    // nothing moved
    root.get_keypair("mv-a");
    root.get_keypair("other-b");
    expect_err(&root.get("/keypair/mv-c"), 400, LIB_INVALID);

    assert_eq!(app.move_keypair("mv-a", "mv-c").status, 204);
    app.get_keypair("mv-c");
    assert_eq!(root.move_keypair("other-b", "elsewhere").status, 204);
    root.get_keypair("elsewhere");
}

fn handle_validation_key_is_reserved(v: &'static str) {
    const HVK: &str = "handle-validation-key";
    let keyd = Keyd::start(&format!("[[principal]]\nuid = {APP}\nkeys = [\"*\"]\n"));
    let root = keyd.api(v);
    let before = root.create_key("k", "sign");
    let pair = root.create_keypair("p", Some("ec-p256"));
    let sig_before = root.sign_hmac(&before, b"m");

    for (uid, api) in [(0, root.clone()), (APP, root.as_uid(APP))] {
        let denied = unauthorized(uid, HVK);
        expect_err(
            &api.post("/key", &json!({"keyId": HVK, "usage": "sign"})),
            401,
            &denied,
        );
        expect_err(
            &api.post(
                "/key",
                &json!({"keyId": HVK, "usage": "sign", "keyBytes": b64(&[0u8; 32])}),
            ),
            401,
            &denied,
        );
        expect_err(&api.get("/key/handle-validation-key"), 401, &denied);
        expect_err(&api.get("/key/handle%2Dvalidation%2Dkey"), 401, &denied);
        expect_err(&api.post("/keypair", &json!({"keyId": HVK})), 401, &denied);
        expect_err(&api.get("/keypair/handle-validation-key"), 401, &denied);
        expect_err(&api.move_keypair(HVK, "stolen"), 401, &denied);
        expect_err(&api.move_keypair("p", HVK), 401, &denied);
    }
    // outstanding handles still verify: the key was neither replaced nor moved
    assert_eq!(root.sign_hmac(&before, b"m"), sig_before);
    assert_eq!(root.param(&pair, "algorithm"), "ECDSA");
    expect_err(&root.get("/keypair/stolen"), 400, LIB_INVALID);
}

/// common-http.md §7.3: per-uid simultaneous-connection limit; excess connections are closed
/// without an HTTP response; other uids are unaffected; the slot comes back on close.
#[test]
fn throttling_per_uid() {
    aziot_tests::require_keyd!();
    let keyd = Keyd::start(&format!(
        "max_requests = 10\n[[principal]]\nuid = {APP}\nkeys = [\"thr-*\"]\n"
    ));
    let api = keyd.api(V2021);
    api.create_key("thr-1", "sign");
    let target = api.target("/key/thr-1");
    // The readiness probe's and create_key's slots come back when keyd sees those connections
    // close: poll until root holds all 10.
    let mut held = hold_all_slots(&keyd, &target, "the readiness probe's slot never came back");
    // the 11th connection from root: closed, no response at all
    let mut c11 = keyd.conn();
    c11.set_read_timeout(Duration::from_secs(10))
        .expect("timeout");
    let _ = c11.send_raw(&aziot_tests::http::build_request("GET", &target, None));
    match c11.read_until_close() {
        Ok(bytes) => assert!(
            bytes.is_empty(),
            "11th connection got bytes instead of a silent close: {:?}",
            String::from_utf8_lossy(&bytes)
        ),
        Err(e) => panic!("11th connection was neither closed nor answered within 10 s: {e}"),
    }
    assert!(
        keyd.wait_log(
            "Max simultaneous connections reached for user 0",
            Duration::from_secs(5)
        ),
        "log must say `Max simultaneous connections reached for user 0`"
    );
    // another (authorized) uid is still served
    let r = exchange_as(
        APP,
        keyd.socket(),
        &aziot_tests::http::build_request("GET", &target, None),
    )
    .expect("uid 4242 must be served while root is throttled");
    assert_eq!(r.status, 200, "{r}");
    // the held connections still work
    let r = held[3]
        .request("GET", &target, None)
        .expect("held connection");
    assert_eq!(r.status, 200);

    // free one slot: root is served again
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = keyd.conn();
        c.set_read_timeout(Duration::from_secs(5)).expect("timeout");
        match c.request("GET", &target, None) {
            Ok(r) => {
                assert_eq!(r.status, 200, "{r}");
                break;
            }
            Err(e) => assert!(
                Instant::now() < deadline,
                "root not served after a slot was freed: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // every slot comes back when the connections go away (abruptly, mid-request too)
    for mut c in held.drain(..) {
        let _ = c
            .send_raw(b"POST /key?api-version=2021-05-01 HTTP/1.1\r\nContent-Length: 100\r\n\r\n{");
    }
    hold_all_slots(&keyd, &target, "the slots of the abruptly closed connections were not returned");
}

/// Polls (10 s) until root can hold 10 connections at once, each answered 200: every slot of
/// the per-uid limit is free. Returns the held connections.
fn hold_all_slots(keyd: &Keyd, target: &str, what: &str) -> Vec<aziot_tests::http::Conn> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut held = Vec::new();
        let mut failed = None;
        for i in 0..10 {
            let mut c = keyd.conn();
            c.set_read_timeout(Duration::from_secs(10)).expect("timeout");
            match c.request("GET", target, None) {
                Ok(r) if r.status == 200 => held.push(c),
                Ok(r) => panic!("slot {i}: {r}"),
                Err(e) => {
                    failed = Some(format!("slot {i}: {e}"));
                    break;
                }
            }
        }
        match failed {
            None => return held,
            Some(e) => assert!(Instant::now() < deadline, "{what}: {e}"),
        }
        drop(held);
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn max_requests_zero_rejects_everything() {
    aziot_tests::require_keyd!();
    let keyd = Keyd::start("max_requests = 0\n");
    let mut c = keyd.conn();
    c.set_read_timeout(Duration::from_secs(10))
        .expect("timeout");
    let _ = c.send_raw(&aziot_tests::http::build_request(
        "GET",
        "/key/x?api-version=2021-05-01",
        None,
    ));
    let bytes = c.read_until_close().expect("closed, not timed out");
    assert!(
        bytes.is_empty(),
        "got {:?}",
        String::from_utf8_lossy(&bytes)
    );
}

/// The socket is the first access gate: 0660, owned by the service user (aziotks:aziotks).
///
/// Self-bound, the service sets that itself (at bind). Under socket activation the socket unit
/// sets it (`SocketUser=`/`SocketGroup=`/`SocketMode=`, done here by the harness for
/// systemd-socket-activate) and the service must keep it: same file (not re-bound), same owner
/// and mode once the service runs. The access checks that follow are the same in both modes.
#[test]
fn socket_mode_and_owner() {
    aziot_tests::require_keyd!();
    let keyd = Keyd::builder()
        .extra(&format!("[[principal]]\nuid = {APP}\nkeys = [\"*\"]\n"))
        .keep_socket_owner()
        .start();
    println!("activation mode: {}", keyd.activation().name());
    let meta = std::fs::metadata(keyd.socket()).expect("socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660, "socket mode");
    let user = nix::unistd::User::from_name("aziotks").expect("getpwnam").expect("user aziotks (systemd-sysusers)");
    assert_eq!(
        (meta.uid(), meta.gid()),
        (user.uid.as_raw(), user.gid.as_raw()),
        "socket owner = the service user aziotks, as the socket unit sets it"
    );
    if keyd.activation() == Activation::Systemd {
        assert_eq!(
            Some((meta.dev(), meta.ino())),
            keyd.activated_socket(),
            "the service replaced the socket the socket unit created"
        );
    }
    // a uid outside the socket's group cannot even connect
    let req = aziot_tests::http::build_request("GET", "/key/x?api-version=2021-05-01", None);
    let err = exchange_as(APP, keyd.socket(), &req).expect_err("connect must be refused");
    assert!(err.contains("ermission denied"), "{err}");
    // in the group: reaches keyd (which answers on its own terms)
    nix::unistd::chown(
        keyd.socket(),
        None,
        Some(nix::unistd::Gid::from_raw(TEST_GID)),
    )
    .expect("chgrp");
    let r = exchange_as(APP, keyd.socket(), &req).expect("connects now");
    expect_err(&r, 400, LIB_INVALID);
}

/// A standard client (curl --unix-socket) running as another uid.
#[test]
fn curl_as_another_uid() {
    aziot_tests::require_keyd!();
    aziot_tests::require!(aziot_tests::Dep::Curl);
    let keyd = Keyd::start(&format!(
        "[[principal]]\nuid = {APP}\nkeys = [\"curl-*\"]\n"
    ));
    let curl = |body: &str, path: &str| {
        let out = Command::new("curl")
            .args(["-sS", "--unix-socket"])
            .arg(keyd.socket())
            .args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                body,
            ])
            .args(["-w", "\n%{http_code}\n%{content_type}"])
            .arg(format!("http://keyd.sock{path}?api-version=2021-05-01"))
            .uid(APP)
            .gid(TEST_GID)
            .output()
            .expect("curl must be installed (apt-get install curl)");
        assert!(
            out.status.success(),
            "curl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).expect("utf8");
        let mut lines: Vec<&str> = text.rsplitn(3, '\n').collect();
        lines.reverse();
        (
            lines[1].parse::<u16>().expect("code"),
            lines[2].to_owned(),
            lines[0].to_owned(),
        )
    };
    let (code, ct, body) = curl(r#"{"keyId":"curl-1","usage":"sign"}"#, "/key");
    assert_eq!((code, ct.as_str()), (200, "application/json"), "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert!(v["keyHandle"].as_str().expect("handle").starts_with("sr="));
    let (code, _, body) = curl(r#"{"keyId":"nope","usage":"sign"}"#, "/key");
    assert_eq!(code, 401);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).expect("json")["message"],
        unauthorized(APP, "nope")
    );
}

use std::os::unix::process::CommandExt as _;

/// common-http.md §3.3: `[[principal]]` is re-read when a drop-in changes (10 s debounce);
/// nothing else is applied without a restart.
#[test]
fn principals_hot_reload() {
    aziot_tests::require_keyd!();
    let keyd = Keyd::start(&format!("[[principal]]\nuid = {APP}\nkeys = [\"a-*\"]\n"));
    let app = keyd.api(V2021).as_uid(APP);
    app.create_key("a-1", "sign");
    expect_err(
        &app.post("/key", &json!({"keyId": "b-1", "usage": "sign"})),
        401,
        &unauthorized(APP, "b-1"),
    );
    std::fs::write(
        keyd.config_dir().join("50-reload.toml"),
        format!("[[principal]]\nuid = {APP}\nkeys = [\"b-*\"]\n"),
    )
    .expect("write drop-in");
    assert!(
        keyd.wait_log("Config update finished.", Duration::from_secs(30)),
        "no `Config update finished.` within 30 s"
    );
    assert!(keyd
        .log()
        .contains("Detected change in config files. Updating config."));
    app.create_key("b-1", "sign");
    app.create_key("a-2", "sign");
    // a broken drop-in keeps the old principals in force
    std::fs::write(keyd.config_dir().join("60-broken.toml"), "not = = toml").expect("write");
    assert!(
        keyd.wait_log(
            "Detected config file update, but new config failed to parse",
            Duration::from_secs(30)
        ),
        "a WARN about the unparsable update"
    );
    app.create_key("b-2", "sign");
}
