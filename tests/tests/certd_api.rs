//! certd through the broker (root broker + confined aziotcs worker, a live keyd beside it):
//! every endpoint and the rows of spec certd.md §8 that need no issuance, the store's file
//! names, preloaded certs and lists, IDs that must never reach the store, reload, and the
//! sandbox as `aziotctl policy audit` sees it. Issuance: certd_issue.rs.

use std::time::Duration;

use aziot_tests::api::{expect_err, pct};
use aziot_tests::certd::{uid_of, Certd};
use aziot_tests::http::build_request;
use aziot_tests::keyd::aziotctl_bin;
use aziot_tests::require_certd;
use serde_json::json;

/// An unprivileged caller (any uid that is not root; it need not exist).
const OTHER: u32 = 4242;

fn not_found() -> &'static str {
    "parameter \"id\" has an invalid value\ncaused by: not found"
}

#[test]
fn api_version_is_checked_first() {
    require_certd!();
    let certd = Certd::start("");
    let api = certd.api();
    let r = api.exchange(&build_request("GET", "/certificates/x", None));
    expect_err(&r, 400, "api-version not specified");
    let r = api.exchange(&build_request("GET", "/certificates/x?api-version=2021-05-01", None));
    expect_err(&r, 400, "invalid api-version \"2021-05-01\"");
    let r = api.exchange(&build_request("GET", "/nope?api-version=2099-01-01", None));
    expect_err(&r, 400, "invalid api-version \"2099-01-01\"");
    let r = api.exchange(&build_request("GET", "/nope", None));
    expect_err(&r, 400, "api-version not specified");
}

#[test]
fn put_get_delete_round_trip_with_the_spec_file_name() {
    require_certd!();
    let certd = Certd::start("");
    let api = certd.api();
    let pem = "-----BEGIN CERTIFICATE-----\nnot validated\n-----END CERTIFICATE-----\n";
    let r = api.call("PUT", "/certificates/device-id", Some(&json!({ "pem": pem })));
    assert_eq!((r.status, r.json()), (201, json!({ "pem": pem })), "{r}");
    // spec §2's example name, 0644 in a 0700 home
    let path = certd.home().join("certs/deviceid-bd732105ef89cf8edd2606a5309c8a26b7b5599a4e124a0fe6199b6b2f60e655.cer");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), pem);
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o644);
    assert_eq!(meta.uid(), uid_of("aziotcs"));
    assert_eq!(std::fs::metadata(certd.home()).unwrap().permissions().mode() & 0o777, 0o700);
    // GET is open to any caller that reaches the socket
    let r = api.as_uid(OTHER).get("/certificates/device-id");
    assert_eq!((r.status, r.json()), (200, json!({ "pem": pem })), "{r}");
    // PUT replaces
    let r = api.call("PUT", "/certificates/device-id", Some(&json!({ "pem": "v2" })));
    assert_eq!(r.status, 201, "{r}");
    assert_eq!(api.get("/certificates/device-id").json()["pem"], "v2");
    let r = api.call("DELETE", "/certificates/device-id", None);
    assert_eq!(r.status, 204, "{r}");
    assert!(!path.exists());
    expect_err(&api.get("/certificates/device-id"), 400, not_found());
    // unknown ID: 204
    assert_eq!(api.call("DELETE", "/certificates/never-was", None).status, 204);
    // no temporary files left behind
    assert!(certd.stored().is_empty(), "{:?}", certd.stored());
}

#[test]
fn edge_cases_of_section_8() {
    require_certd!();
    let certd = Certd::start("[[principal]]\nuid = 4243\ncerts = [\"mine-*\"]\n");
    let api = certd.api();
    // GET unknown -> 400 not found (never 404)
    expect_err(&api.get("/certificates/unknown"), 400, not_found());
    // percent-encoded ID that is not UTF-8 -> 404
    expect_err(&api.get("/certificates/%ff%fe"), 404, "not found");
    // other paths and methods (spec §4.5)
    expect_err(&api.get("/certificates"), 400, "method not allowed");
    expect_err(&api.get("/certificates/"), 404, "not found");
    expect_err(&api.get("/certificates/a/b"), 404, "not found");
    expect_err(&api.call("PATCH", "/certificates/a", None), 400, "method not allowed");
    // POST: no body, non-JSON content type -> 400; bad JSON, missing fields -> 422
    expect_err(&api.call_bytes("POST", "/certificates", None), 400, "missing request body");
    expect_err(
        &api.call_ct("POST", "/certificates", b"{\"certId\":\"a\"}", Some("text/plain")),
        400,
        "missing request body",
    );
    let r = api.call_bytes("POST", "/certificates", Some(b"{not json"));
    assert_eq!(r.status, 422, "{r}");
    let r = api.post("/certificates", &json!({ "certId": "a" }));
    assert_eq!(r.status, 422, "{r}");
    assert!(r.message().contains("missing field `csr`"), "{r}");
    let r = api.post("/certificates", &json!({ "csr": "x" }));
    assert!(r.status == 422 && r.message().contains("missing field `certId`"), "{r}");
    // POST by a uid without a principal entry for the ID -> 401 (before the CSR is looked at)
    let r = api.as_uid(OTHER).post("/certificates", &json!({ "certId": "a", "csr": "x" }));
    expect_err(&r, 401, &format!("user {OTHER} is not authorized to modify the cert a"));
    // PUT: text/plain -> 415, {} -> 422, unauthorized -> 401
    let r = api.call_ct("PUT", "/certificates/a", b"{\"pem\":\"x\"}", Some("text/plain"));
    expect_err(&r, 415, "request body must be application/json");
    let r = api.call("PUT", "/certificates/a", Some(&json!({})));
    assert!(r.status == 422 && r.message().starts_with("missing field `pem`"), "{r}");
    let r = api.as_uid(OTHER).call("PUT", "/certificates/a", Some(&json!({ "pem": "x" })));
    expect_err(&r, 401, &format!("user {OTHER} is not authorized to modify the cert a"));
    // DELETE: unauthorized -> 401; a non-empty non-JSON body -> 422
    let r = api.as_uid(OTHER).call("DELETE", "/certificates/a", None);
    expect_err(&r, 401, &format!("user {OTHER} is not authorized to modify the cert a"));
    let r = api.call_ct("DELETE", "/certificates/a", b"garbage", None);
    assert_eq!(r.status, 422, "{r}");
    // principals: globs on the cert ID, by uid
    let mine = api.as_uid(4243);
    assert_eq!(mine.call("PUT", "/certificates/mine-1", Some(&json!({ "pem": "m" }))).status, 201);
    assert_eq!(mine.call("DELETE", "/certificates/mine-1", None).status, 204);
    assert_eq!(mine.call("PUT", "/certificates/yours-1", Some(&json!({ "pem": "m" }))).status, 401);
    assert!(certd.stored().is_empty(), "{:?}", certd.stored());
}

#[test]
fn ids_with_slash_dotdot_or_nul_are_refused_and_nothing_is_written() {
    require_certd!();
    let certd = Certd::start("");
    let api = certd.api();
    for (id, why) in
        [("a/b", "\"/\""), ("..", "\"..\""), ("x..y", "\"..\""), ("a\0b", "NUL"), (&*"z".repeat(220), "too long")]
    {
        let path = format!("/certificates/{}", pct(id));
        let prefix = "parameter \"id\" has an invalid value\ncaused by: ";
        for r in [api.call("PUT", &path, Some(&json!({ "pem": "x" }))), api.get(&path), api.call("DELETE", &path, None)]
        {
            assert_eq!(r.status, 400, "{id:?}: {r}");
            assert!(r.message().starts_with(prefix) && r.message().contains(why), "{id:?}: {r}");
        }
        let r = api.post("/certificates", &json!({ "certId": id, "csr": "x" }));
        assert_eq!(r.status, 400, "{r}");
        assert!(r.message().starts_with("parameter \"certId\" has an invalid value"), "{r}");
    }
    // an unencoded `..` segment is a path the router never matches
    expect_err(&api.get("/certificates/../x"), 404, "not found");
    assert!(certd.stored().is_empty(), "{:?}", certd.stored());
    assert_eq!(std::fs::read_dir(certd.home()).unwrap().count(), 1, "only certs/ in the home directory");
}

/// `method path` with a body of `len` bytes streamed while the answer is read (the server may
/// answer before it has read it all).
fn streamed(certd: &Certd, method: &str, path: &str, len: usize) -> aziot_tests::http::Response {
    use std::io::Write as _;
    let head = format!(
        "{method} {path}?api-version=2020-09-01 HTTP/1.1\r\nHost: certd.sock\r\nContent-Type: application/json\r\n\
         Content-Length: {len}\r\n\r\n"
    );
    let mut conn = aziot_tests::http::Conn::connect(&certd.socket()).unwrap();
    conn.send_raw(head.as_bytes()).unwrap();
    let mut writer = conn.stream().try_clone().unwrap();
    let feeder = std::thread::spawn(move || {
        let chunk = vec![b' '; 64 * 1024];
        let mut sent = 0;
        while sent < len {
            let n = chunk.len().min(len - sent);
            if writer.write_all(&chunk[..n]).is_err() {
                break;
            }
            sent += n;
        }
    });
    let r = conn.read_response().expect("a 413 response, not a dropped connection");
    drop(conn);
    feeder.join().unwrap();
    aziot_tests::api::check_envelope(&r, "oversized body");
    r
}

#[test]
fn oversized_body_is_refused_and_nothing_is_written() {
    require_certd!();
    let certd = Certd::start("");
    for (method, path) in [("PUT", "/certificates/big"), ("POST", "/certificates")] {
        let r = streamed(&certd, method, path, (16 << 20) + 1);
        assert_eq!(r.status, 413, "{r}");
        assert!(r.message().contains("too large"), "{r}");
    }
    assert!(certd.stored().is_empty());
    // still serving
    expect_err(&certd.api().get("/certificates/big"), 400, not_found());
}

#[test]
fn preloaded_files_lists_and_cycles() {
    require_certd!();
    let pre = aziot_tests::keyd::TempDir::new("certd-preloaded");
    let file = pre.path().join("ca.pem");
    std::fs::write(&file, "PRELOADED\n").unwrap();
    std::fs::write(pre.path().join("der.cer"), [0x30, 0x82, 0xff, 0xfe]).unwrap();
    let certd = Certd::start(&format!(
        "[preloaded_certs]\nca = \"file://{0}/ca.pem\"\nder = \"file://{0}/der.cer\"\nweb = \"https://example.com/x.pem\"\n\
         bundle = [\"ca\", \"missing\", \"local\"]\nnone = [\"missing\"]\nloop1 = [\"loop2\"]\nloop2 = [\"ca\", \"loop1\"]\n",
        pre.path().display()
    ));
    let api = certd.api();
    assert_eq!(api.get("/certificates/ca").json()["pem"], "PRELOADED\n");
    assert_eq!(api.call("PUT", "/certificates/local", Some(&json!({ "pem": "LOCAL\n" }))).status, 201);
    // a list concatenates its members in order, skipping missing ones
    assert_eq!(api.get("/certificates/bundle").json()["pem"], "PRELOADED\nLOCAL\n");
    expect_err(&api.get("/certificates/none"), 400, not_found());
    // writes to a list: 500 (as upstream); to the operator's preloaded file: 500, file intact
    expect_err(&api.call("PUT", "/certificates/bundle", Some(&json!({ "pem": "x" }))), 500, "internal error");
    expect_err(&api.call("DELETE", "/certificates/bundle", None), 500, "internal error");
    expect_err(&api.call("PUT", "/certificates/ca", Some(&json!({ "pem": "x" }))), 500, "internal error");
    expect_err(&api.call("DELETE", "/certificates/ca", None), 500, "internal error");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "PRELOADED\n");
    // a cycle: 500 with the cycle in the log (upstream overflows its stack); still serving
    expect_err(&api.get("/certificates/loop1"), 500, "internal error");
    assert!(
        certd.wait_log("preloaded cert lists form a cycle: loop1 -> loop2 -> loop1", Duration::from_secs(5)),
        "{}",
        certd.log()
    );
    // not UTF-8 (a DER file): 500, not a dropped connection; a non-file URI: 500
    expect_err(&api.get("/certificates/der"), 500, "internal error");
    expect_err(&api.get("/certificates/web"), 500, "internal error");
    assert_eq!(api.get("/certificates/ca").status, 200);
}

#[test]
fn config_errors_refuse_to_start() {
    require_certd!();
    // the broker validates as root: a bare string in [cert_issuance] is a config error
    let certd = Certd::start("");
    let bin = aziot_tests::keyd::aziotd_bin();
    for (extra, needle) in [
        ("[cert_issuance]\ndevice-id = \"local_ca\"\n", "must be a table"),
        ("[cert_issuance.x]\nmethod = \"self_signed\"\nexpiry_days = 0\n", "expiry_days"),
        ("[preloaded_certs]\nx = \"/var/secrets/x.pem\"\n", "not an absolute URL"),
    ] {
        let cfg = certd.dir().join("bad.toml");
        std::fs::write(&cfg, format!("homedir_path = \"{}/h2\"\n{extra}", certd.dir().display())).unwrap();
        let out = std::process::Command::new(&bin)
            .arg("aziot-certd")
            .env_clear()
            .env("AZIOT_CERTD_CONFIG", &cfg)
            .env("AZIOT_CERTD_CONFIG_DIR", certd.dir().join("nope.d"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(needle), "{extra}: {}\n{err}", out.status);
    }
    // no homedir_path at all
    let cfg = certd.dir().join("empty.toml");
    std::fs::write(&cfg, "").unwrap();
    let out = std::process::Command::new(&bin)
        .arg("aziot-certd")
        .env_clear()
        .env("AZIOT_CERTD_CONFIG", &cfg)
        .env("AZIOT_CERTD_CONFIG_DIR", certd.dir().join("nope.d"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("homedir_path is required"), "{out:?}");
}

#[test]
fn unknown_keys_warn_with_file_and_key() {
    require_certd!();
    let certd = Certd::start("bogus_top = 1\n[cert_issuance.x]\nmethod = \"self_signed\"\nbogus_inner = 2\n");
    let cfg = certd.config_path().display().to_string();
    assert!(certd.log().contains(&format!("unknown config key \"bogus_top\" in {cfg}")), "{}", certd.log());
    assert!(
        certd.log().contains(&format!("unknown config key \"cert_issuance.x.bogus_inner\" in {cfg}")),
        "{}",
        certd.log()
    );
}

#[test]
fn reload_applies_principals_and_preloaded_certs() {
    require_certd!();
    let mut certd = Certd::start("");
    let api = certd.api();
    let r = api.as_uid(OTHER).call("PUT", "/certificates/granted-1", Some(&json!({ "pem": "g" })));
    assert_eq!(r.status, 401, "{r}");
    certd.set_extra(&format!(
        "[[principal]]\nuid = {OTHER}\ncerts = [\"granted-*\"]\n[preloaded_certs]\nalias = [\"granted-1\"]\n"
    ));
    certd.reload();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = api.as_uid(OTHER).call("PUT", "/certificates/granted-1", Some(&json!({ "pem": "g" })));
        if r.status == 201 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the reload was not applied: {r}\n{}", certd.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(api.get("/certificates/alias").json()["pem"], "g");
}

#[test]
fn worker_is_confined_and_the_audit_passes() {
    require_certd!();
    let certd = Certd::start("");
    let worker = certd.worker_pid();
    let status = std::fs::read_to_string(format!("/proc/{worker}/status")).unwrap();
    let uid = uid_of("aziotcs");
    assert!(status.contains(&format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}")), "{status}");
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    let audit = std::process::Command::new(aziotctl_bin())
        .args(["policy", "audit", "--run-dir"])
        .arg(certd.run_dir())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&audit.stdout), String::from_utf8_lossy(&audit.stderr));
    assert!(audit.status.success(), "audit:\n{text}");
    assert!(text.contains("certd"), "the audit covers certd:\n{text}");
}
