//! Process faults for every service through its broker (issue 17, item 2, first half):
//!
//! - kill -9 of the WORKER while 8 clients loop a read + write mix (keyd, certd, identityd, tpmd
//!   on swtpm): no connection is refused (the broker holds the listening socket), only the
//!   exchanges in flight at the kill fail, as EOF/reset, never as a wrong answer, and every
//!   client is answered again by the new worker; restart-to-serving is printed per service;
//! - kill -9 of the BROKER: its worker is gone within 1 s (PR_SET_PDEATHSIG), for all four;
//! - a dependency down — keyd for certd (local-CA issuance, its key in keyd) and for identityd
//!   (a module identity's key derivation, a local identity, the SAS token of module creation and
//!   reprovisioning), tpmd for identityd provisioned with TPM attestation (the SAS token of
//!   module creation, signed in the TPM): the spec's status and message (certd.md §4.1,
//!   identityd.md §2.1/§16: 500 `internal error` with the cause in the log, or 404 `Hub client
//!   error` with the cause in the message — each naming the unreachable service's socket),
//!   nothing stored changes, and the dependent service answers again once its dependency is
//!   back, without a restart of the service: its broker and listener stay. (Its worker: under
//!   the units, the mount namespace is systemd's and binds /run/aziot as a directory, so the
//!   same worker reaches the dependency's new socket; here, as on a system without the units,
//!   the broker made the namespace, which binds the socket inode, and the broker restarts the
//!   worker once when the socket at that path is replaced — `expect_recovered`.)
//!
//! Shared machinery: tests/src/fault.rs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aziot_tests::api::handle_of;
use aziot_tests::certd::pki::{certs, csr, csr_with, ec_key, keyd_key};
use aziot_tests::certd::Certd;
use aziot_tests::crypto::{b64, hmac_sha256, random, unb64};
use aziot_tests::fault::{
    alive, broker_pid, json_of, kill_broker_expect_worker_gone, kill_worker_under_load, status_is, Op, Subject,
};
use aziot_tests::http::{build_request, Conn, Response};
use aziot_tests::identityd::{default_config, Identityd, DEVICE_ID, HUB, MASTER_KEY};
use aziot_tests::keyd::TempDir;
use aziot_tests::tpmd::{Swtpm, Tpmd};
use aziot_tests::{require, require_certd, require_identityd, require_keyd, Dep, Keyd, V2021};
use serde_json::{json, Value};

/// The generation ID of the seeded module identities.
const GEN: &str = "638000000000000000";

/// The worker pid a status file names, once it names one other than `old`.
fn wait_status_worker(status: &Path, old: i32, timeout: Duration, log: &dyn Fn() -> String) -> i32 {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let named = std::fs::read(status)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|s| s["worker_pid"].as_i64())
            .and_then(|p| i32::try_from(p).ok());
        match named {
            Some(pid) if pid != old => return pid,
            _ => {}
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} names no worker other than {old} within {timeout:?}\n{}",
            status.display(),
            log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------- keyd

fn keyd_sign_request(api_target: &str, handle: &str, message: &[u8]) -> Vec<u8> {
    let body = json!({"keyHandle": handle, "algorithm": "HMAC-SHA256", "parameters": {"message": b64(message)}});
    build_request("POST", api_target, Some(&serde_json::to_vec(&body).unwrap()))
}

/// keyd: HMAC signs (checked against a local HMAC), handle look-ups and key imports (a write
/// of the key file every time; all clients import the same bytes).
fn keyd_mix(keyd: &Keyd) -> (Vec<Op>, Vec<u8>) {
    let api = keyd.api(V2021);
    let key = random(32);
    let handle = api.import_key("load", &key);
    let written = random(32);
    let message = b"under load".to_vec();
    let want = hmac_sha256(&key, &message);
    let import = json!({"keyId": "written", "keyBytes": b64(&written), "usage": "sign"});
    let ops = vec![
        Op::new("sign", keyd_sign_request(&api.target("/sign"), &handle, &message), move |r| {
            let v = json_of(r, 200)?;
            let sig = v["signature"].as_str().ok_or_else(|| format!("no signature: {v}"))?;
            (unb64(sig) == want).then_some(()).ok_or_else(|| format!("wrong signature {sig}"))
        }),
        Op::new("get key", build_request("GET", &api.target("/key/load"), None), |r| {
            json_of(r, 200)?["keyHandle"].as_str().map(|_| ()).ok_or_else(|| "no keyHandle".into())
        }),
        Op::new(
            "import",
            build_request("POST", &api.target("/key"), Some(&serde_json::to_vec(&import).unwrap())),
            |r| json_of(r, 200)?["keyHandle"].as_str().map(|_| ()).ok_or_else(|| "no keyHandle".into()),
        ),
    ];
    (ops, written)
}

#[test]
fn keyd_worker_kill9_under_load_is_served_again_without_refusals() {
    require_keyd!();
    let keyd = Keyd::start("max_requests = 64\n");
    let (ops, written) = keyd_mix(&keyd);
    let old = keyd.worker_pid();
    let wait = |old: i32, t: Duration| {
        i32::try_from(keyd.wait_new_worker(old, t)["worker_pid"].as_i64().expect("pid")).expect("pid")
    };
    let log = || keyd.log();
    let subject = Subject {
        service: "keyd",
        socket: keyd.socket().to_path_buf(),
        worker: old,
        wait_new_worker: &wait,
        log: &log,
    };
    let outcome = kill_worker_under_load(&subject, ops);
    assert_eq!(keyd.status().expect("status")["restarts"], json!(1));
    // the key written under load is whole: it signs as the imported bytes
    let api = keyd.api(V2021);
    let h = api.get_key("written");
    assert_eq!(api.sign_hmac(&h, b"after"), hmac_sha256(&written, b"after"));
    assert!(keyd.log().contains(&format!("worker {old} was killed by SIGKILL")), "{}", keyd.log());
    assert!(alive(outcome.new_worker));
}

#[test]
fn keyd_broker_kill9_takes_its_worker() {
    require_keyd!();
    let keyd = Keyd::start("");
    let broker = i32::try_from(keyd.pid()).expect("pid");
    kill_broker_expect_worker_gone("keyd", broker, keyd.worker_pid());
}

// ---------------------------------------------------------------- certd

const CERTD_CONFIG: &str = r#"
[cert_issuance.device-ca]
method = "self_signed"
expiry_days = 3650
[cert_issuance.local_ca]
cert = "device-ca"
pk = "device-ca"
[cert_issuance.leaf]
method = "local_ca"
"#;

/// The local CA: keyd key pair `device-ca` and its self-signed cert, issued by certd.
fn certd_with_ca() -> (Certd, openssl::x509::X509) {
    let certd = Certd::start(CERTD_CONFIG);
    let handle = handle_of(
        &certd.keyd_api().post("/keypair", &json!({"keyId": "device-ca", "preferredAlgorithms": "ec-p256"})),
        "create the CA key pair",
    );
    let key = keyd_key(certd.keyd().socket(), &handle);
    let csr = String::from_utf8(csr_with(&key, &key, "Fault CA", true).to_pem().unwrap()).unwrap();
    let r = certd.api().post("/certificates", &json!({"certId": "device-ca", "csr": csr}));
    assert_eq!(r.status, 201, "{r}\n{}", certd.log());
    let ca = certs(r.json()["pem"].as_str().unwrap()).remove(0);
    (certd, ca)
}

/// An issued chain: leaf for `public`'s key, signed by `ca`.
fn check_issued(
    pem: &str,
    public: &openssl::pkey::PKey<openssl::pkey::Private>,
    ca: &openssl::x509::X509,
) -> Result<(), String> {
    let chain = openssl::x509::X509::stack_from_pem(pem.as_bytes()).map_err(|e| format!("not PEM ({e}): {pem}"))?;
    let leaf = chain.first().ok_or("no certificate")?;
    let leaf_key = leaf.public_key().map_err(|e| e.to_string())?;
    if !leaf_key.public_eq(public) {
        return Err("the leaf does not certify the CSR's key".into());
    }
    let ca_key = ca.public_key().map_err(|e| e.to_string())?;
    if !leaf.verify(&ca_key).map_err(|e| e.to_string())? {
        return Err("the leaf is not signed by the local CA".into());
    }
    Ok(())
}

#[test]
fn certd_worker_kill9_under_load_is_served_again_without_refusals() {
    require_certd!();
    let (certd, ca) = certd_with_ca();
    let key = ec_key();
    let csr_pem = csr(&key, "leaf under load", false);
    let fixed = String::from_utf8(ca.to_pem().unwrap()).unwrap();
    let r = certd.api().call("PUT", "/certificates/fixed", Some(&json!({"pem": fixed})));
    assert_eq!(r.status, 201, "{r}");
    let target = |p: &str| format!("{p}?api-version={}", aziot_tests::certd::V);
    let issue = serde_json::to_vec(&json!({"certId": "leaf", "csr": csr_pem})).unwrap();
    let put = serde_json::to_vec(&json!({"pem": fixed})).unwrap();
    let (issue_key, issue_ca, get_want) = (key.clone(), ca.clone(), fixed.clone());
    let ops = vec![
        // a write through keyd: the local CA signs with its key in keyd
        Op::new("issue", build_request("POST", &target("/certificates"), Some(&issue)), move |r| {
            let v = json_of(r, 201)?;
            check_issued(v["pem"].as_str().ok_or("no pem")?, &issue_key, &issue_ca)
        }),
        Op::new("get", build_request("GET", &target("/certificates/fixed"), None), move |r| {
            let v = json_of(r, 200)?;
            (v["pem"].as_str() == Some(get_want.as_str())).then_some(()).ok_or_else(|| format!("wrong pem: {v}"))
        }),
        Op::new("import", build_request("PUT", &target("/certificates/imported"), Some(&put)), |r| status_is(r, 201)),
    ];
    let wait = |old: i32, t: Duration| certd.wait_new_worker(old, t);
    let log = || certd.log();
    let subject = Subject {
        service: "certd",
        socket: certd.socket(),
        worker: certd.worker_pid(),
        wait_new_worker: &wait,
        log: &log,
    };
    kill_worker_under_load(&subject, ops);
    // what was written under load is whole
    let r = certd.api().get("/certificates/leaf");
    assert_eq!(r.status, 200, "{r}");
    check_issued(r.json()["pem"].as_str().unwrap(), &key, &ca).unwrap();
    assert_eq!(certd.api().get("/certificates/imported").json()["pem"], json!(fixed));
    assert_eq!(certd.status().unwrap()["restarts"], json!(1));
}

#[test]
fn certd_broker_kill9_takes_its_worker() {
    require_certd!();
    let certd = Certd::start("");
    kill_broker_expect_worker_gone("certd", broker_pid(&certd.status_path()), certd.worker_pid());
}

/// keyd down under certd: issuing with the local CA (its key in keyd) fails as the spec says
/// (500 `internal error`, certd.md §4.1) with keyd's socket named in certd's log; the stored
/// cert is unchanged and still served, imports still work; once keyd is back certd issues
/// again, without a restart of the service ([`expect_recovered`]).
#[test]
fn certd_with_keyd_down_fails_issuance_cleanly_and_recovers() {
    require_certd!();
    let (mut certd, ca) = certd_with_ca();
    let key = ec_key();
    let body = json!({"certId": "leaf", "csr": csr(&key, "leaf", false)});
    let r = certd.api().post("/certificates", &body);
    assert_eq!(r.status, 201, "{r}\n{}", certd.log());
    let stored = std::fs::read(certd.cert_path("leaf")).unwrap();
    let worker = certd.worker_pid();
    let keyd_socket = certd.keyd().socket().to_path_buf();

    certd.keyd_mut().kill9();
    let log_before = certd.log().len();
    let r = certd.api().post("/certificates", &body);
    assert_eq!((r.status, r.json()), (500, json!({"message": "internal error"})), "{r}\n{}", certd.log());
    // The cause, in the log (the body is exactly `internal error`): keyd named. Its last line is
    // the socket error — `could not talk to <keyd.sock>` on a new connection, or the reset of
    // the engine client's kept one.
    let named = "!!! could not get the local CA key pair \"device-ca\" from keyd";
    assert!(
        certd.wait_log(named, Duration::from_secs(5)) && certd.log()[log_before..].contains(named),
        "certd's log names keyd ({named})\n{}",
        certd.log()
    );
    // nothing stored changed; reads and imports do not need keyd
    assert_eq!(std::fs::read(certd.cert_path("leaf")).unwrap(), stored, "the stored cert is untouched");
    let r = certd.api().get("/certificates/leaf");
    assert_eq!((r.status, r.json()["pem"].as_str().map(str::as_bytes)), (200, Some(stored.as_slice())), "{r}");
    assert_eq!(certd.api().call("PUT", "/certificates/other", Some(&json!({"pem": "x"}))).status, 201);

    certd.keyd_mut().start_again();
    let r = poll_answer("certd issues again once keyd is back", &certd.log_path(), || {
        attempt(&certd.socket(), "POST", "/certificates?api-version=2020-09-01", Some(&body))
            .filter(|r| r.status == 201)
    });
    check_issued(r.json()["pem"].as_str().unwrap(), &key, &ca).unwrap();
    let status = certd.status().unwrap();
    expect_recovered("certd", &status, worker, &keyd_socket, &certd.log());
}

/// Polls `attempt` until it gives an answer, for [`BACK_WITHIN`]; panics with the log after.
fn poll_answer<T>(what: &str, log: &Path, mut attempt: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + BACK_WITHIN;
    loop {
        if let Some(v) = attempt() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {BACK_WITHIN:?}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One exchange on a new connection; `None` when no answer came (the broker restarting the
/// worker closes the connections it had: the caller polls).
fn attempt(socket: &Path, method: &str, target: &str, body: Option<&Value>) -> Option<Response> {
    let body = body.map(|b| serde_json::to_vec(b).unwrap());
    aziot_tests::http::raw_once(socket, &build_request(method, target, body.as_deref())).ok()
}

/// Generous: a dependent service answers again this soon after its dependency is back.
const BACK_WITHIN: Duration = Duration::from_secs(30);

/// After the dependency came back at the same path with a new socket (self-bound, as this
/// harness and a system without the socket units run it): the worker's mount namespace, made by
/// the broker, binds the socket by inode, so the broker restarted the worker once (and said
/// why) — the broker itself, its listener and the service stay. Under the units, the namespace
/// is systemd's and binds /run/aziot as a directory: the same worker reaches the new socket.
fn expect_recovered(service: &str, status: &Value, old: i32, dependency_socket: &Path, log: &str) {
    let made_by = status["mount_namespace"]["made_by"].as_str().unwrap_or("broker");
    if made_by == "broker" {
        assert_eq!(status["restarts"], json!(1), "{service}: one worker restart\n{status}\n{log}");
        assert_ne!(status["worker_pid"], json!(old), "{status}");
        assert!(
            log.contains(&format!("{} was replaced", dependency_socket.display())),
            "{service}: the broker says why it restarted the worker\n{log}"
        );
    } else {
        assert_eq!(status["worker_pid"], json!(old), "{service}: the same worker\n{status}");
        assert_eq!(status["restarts"], json!(0), "{service}: {status}");
    }
    println!(
        "{service}: answers again once its dependency is back (mount namespace made by {made_by}; worker {old} -> {}, restarts {})",
        status["worker_pid"], status["restarts"]
    );
}

// ---------------------------------------------------------------- identityd

fn identityd_stack(modules: &[&str]) -> Identityd {
    let mut stack = Identityd::prepare(&default_config(""));
    for m in modules {
        stack.seed_module(m, GEN);
    }
    stack.start_identityd().unwrap_or_else(|e| panic!("{e}"));
    stack
}

fn identityd_status_worker(stack: &Identityd) -> Value {
    serde_json::from_slice(&std::fs::read(stack.status_path()).unwrap()).unwrap()
}

/// A local identity answer (§3.2): its key and cert match.
fn check_local(r: &Response, id: &str) -> Result<(), String> {
    let v = json_of(r, 200)?;
    if v["spec"]["moduleId"] != json!(id) {
        return Err(format!("wrong moduleId: {v}"));
    }
    let key =
        openssl::pkey::PKey::private_key_from_pem(v["spec"]["auth"]["privateKey"].as_str().unwrap_or("").as_bytes())
            .map_err(|e| format!("privateKey ({e}): {v}"))?;
    let chain = openssl::x509::X509::stack_from_pem(v["spec"]["auth"]["certificate"].as_str().unwrap_or("").as_bytes())
        .map_err(|e| format!("certificate ({e}): {v}"))?;
    let leaf = chain.first().ok_or("no certificate")?;
    leaf.public_key()
        .map_err(|e| e.to_string())?
        .public_eq(&key)
        .then_some(())
        .ok_or_else(|| "key and cert differ".into())
}

#[test]
fn identityd_worker_kill9_under_load_is_served_again_without_refusals() {
    require_identityd!();
    let stack = identityd_stack(&["mod-a"]);
    let target = |p: &str| format!("{p}{}api-version=2021-12-01", if p.contains('?') { '&' } else { '?' });
    let local = serde_json::to_vec(&json!({"type": "local", "moduleId": "adhoc"})).unwrap();
    let ops = vec![
        Op::new("device identity", build_request("GET", &target("/identities/identity"), None), |r| {
            let v = json_of(r, 200)?;
            let ok = v["spec"]["deviceId"] == json!(DEVICE_ID)
                && v["spec"]["hubName"] == json!(HUB)
                && v["spec"]["auth"]["keyHandle"].is_string();
            ok.then_some(()).ok_or_else(|| format!("wrong device identity: {v}"))
        }),
        Op::new("module identity", build_request("GET", &target("/identities/modules/mod-a?type=aziot"), None), |r| {
            let v = json_of(r, 200)?;
            let ok = v["spec"]["moduleId"] == json!("mod-a")
                && v["spec"]["genId"] == json!(GEN)
                && v["spec"]["auth"]["keyHandle"].is_string();
            ok.then_some(()).ok_or_else(|| format!("wrong module identity: {v}"))
        }),
        // a write: certd issues (local CA in keyd) and stores a new cert for "adhoc"
        Op::new("local identity", build_request("POST", &target("/identities/modules"), Some(&local)), |r| {
            check_local(r, "adhoc")
        }),
    ];
    let status = stack.status_path();
    let log = || stack.log();
    let wait = |old: i32, t: Duration| wait_status_worker(&status, old, t, &log);
    let subject = Subject {
        service: "identityd",
        socket: stack.socket(),
        worker: stack.worker_pid(),
        wait_new_worker: &wait,
        log: &log,
    };
    kill_worker_under_load(&subject, ops);
    assert_eq!(identityd_status_worker(&stack)["restarts"], json!(1));
}

#[test]
fn identityd_broker_kill9_takes_its_worker() {
    require_identityd!();
    let stack = identityd_stack(&[]);
    kill_broker_expect_worker_gone("identityd", broker_pid(&stack.status_path()), stack.worker_pid());
}

/// keyd down under identityd: a module identity whose key was not derived yet (500 `internal
/// error`, identityd.md §16, the cause in the log), a new local identity (certd cannot sign:
/// 500), module creation and reprovisioning (the hub call's SAS token is signed in keyd: 404
/// `Hub client error`, the cause in the message) fail as the spec says, naming keyd's socket;
/// an identity whose key is derived already is still served; state files are unchanged; once
/// keyd is back identityd answers them all (the module key derives exactly as §8.2) without a
/// restart of the service ([`expect_recovered`]).
#[test]
fn identityd_with_keyd_down_fails_cleanly_and_recovers() {
    require_identityd!();
    let mut stack = identityd_stack(&["mod-a", "mod-c"]);
    let root = stack.client(None, aziot_identityd_v());
    // warm: mod-a's key derived, a local identity issued
    assert_eq!(root.get("/identities/modules/mod-a?type=aziot").status, 200);
    let r = root.post("/identities/modules", &json!({"type": "local", "moduleId": "adhoc"}));
    check_local(&r, "adhoc").unwrap();
    let worker = stack.worker_pid();
    let home_before = snapshot(&stack.home());
    let keyd_socket = stack.keyd().socket().to_path_buf();
    let keyd_named = format!("could not talk to {}", keyd_socket.display());

    stack.keyd_mut().kill9();
    let from = stack.log().len();
    // module identity not derived yet: needs keyd
    let r = root.get("/identities/modules/mod-c?type=aziot");
    assert_eq!((r.status, r.json()), (500, json!({"message": "internal error"})), "{r}\n{}", stack.log());
    assert!(
        stack.wait_log(&keyd_named, Duration::from_secs(5)) && stack.log()[from..].contains(&keyd_named),
        "identityd's log names keyd's socket ({keyd_named})\n{}",
        stack.log()
    );
    // one already derived is served from identityd's cache
    assert_eq!(root.get("/identities/modules/mod-a?type=aziot").status, 200);
    // a local identity: certd cannot sign with the CA key
    let r = root.post("/identities/modules", &json!({"type": "local", "moduleId": "adhoc"}));
    assert_eq!((r.status, r.json()), (500, json!({"message": "internal error"})), "{r}\n{}", stack.log());
    assert!(stack.log()[from..].contains("certd could not issue local identity"), "{}", stack.log());
    // module identity creation and reprovisioning: the SAS token of their hub call is signed in
    // keyd, before any connection (§2.1: 404 `Hub client error` and the cause)
    let unsigned = format!("Hub client error\ncaused by: could not sign the SAS token: {keyd_named}");
    for (what, r) in [
        ("create module", root.post("/identities/modules", &json!({"type": "aziot", "moduleId": "m-new"}))),
        ("reprovision", root.post("/identities/device/reprovision", &json!({"type": "aziot"}))),
    ] {
        assert_eq!(r.status, 404, "{what}: {r}");
        assert!(r.message().starts_with(&unsigned), "{what}: {:?} (want {unsigned:?}...)", r.message());
    }
    assert_eq!(snapshot(&stack.home()), home_before, "identityd's state files are unchanged");
    assert_eq!(stack.worker_pid(), worker);

    stack.keyd_mut().start_again();
    let r = poll_answer("identityd serves mod-c once keyd is back", &stack.log_path(), || {
        attempt(&stack.socket(), "GET", "/identities/modules/mod-c?type=aziot&api-version=2021-12-01", None)
            .filter(|r| r.status == 200)
    });
    let handle = r.json()["spec"]["auth"]["keyHandle"].as_str().unwrap().to_owned();
    let module_key = hmac_sha256(&MASTER_KEY, format!("mod-c:{GEN}:primary").as_bytes());
    assert_eq!(
        stack.keyd().api(V2021).sign_hmac(&handle, b"m"),
        hmac_sha256(&module_key, b"m"),
        "the module key derives as §8.2"
    );
    // certd (whose worker binds keyd's socket too) issues again
    poll_answer("identityd issues a local identity once keyd is back", &stack.log_path(), || {
        let body = json!({"type": "local", "moduleId": "adhoc"});
        let r = attempt(&stack.socket(), "POST", "/identities/modules?api-version=2021-12-01", Some(&body))?;
        check_local(&r, "adhoc").ok()
    });
    // the SAS token is signed again: what fails now is the hub (nothing listens at HUB)
    for (what, r) in [
        ("create module", root.post("/identities/modules", &json!({"type": "aziot", "moduleId": "m-new"}))),
        ("reprovision", root.post("/identities/device/reprovision", &json!({"type": "aziot"}))),
    ] {
        assert_eq!(r.status, 404, "{what}: {r}");
        assert!(r.message().starts_with("Hub client error\ncaused by: "), "{what}: {r}");
        assert!(!r.message().contains("could not sign"), "{what}: signed once keyd is back: {r}");
    }
    expect_recovered("identityd", &identityd_status_worker(&stack), worker, &keyd_socket, &stack.log());
}

fn aziot_identityd_v() -> &'static str {
    aziot_tests::identityd::V2021
}

/// Every regular file under `dir` with its content (sorted by path).
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() => out.push((p.clone(), std::fs::read(&p).unwrap_or_default())),
                _ => {}
            }
        }
    }
    out.sort();
    out
}

// ---------------------------------------------------------------- tpmd

fn tpmd_call(sock: &Path, method: &str, path: &str, body: Option<&Value>) -> Response {
    let mut conn = Conn::connect(sock).unwrap_or_else(|e| panic!("connect: {e}"));
    let body = body.map(|b| b.to_string().into_bytes());
    conn.request(method, &format!("{path}?api-version=2020-09-01"), body.as_deref())
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

#[test]
fn tpmd_worker_kill9_under_load_is_served_again_without_refusals() {
    require!(Dep::Root, Dep::ServiceUser("aziottpm"), Dep::Swtpm);
    let dir = TempDir::new("fault-tpmd");
    let root = dir.path();
    let swtpm = Swtpm::start(root);
    let tpmd = Tpmd::start(root, &swtpm.tcti(), "info");
    let sock = tpmd.socket();
    let keys = tpmd_call(&sock, "GET", "/get_tpm_keys", None);
    assert_eq!(keys.status, 200, "{keys}\n{}", tpmd.log());
    let keys = keys.json();
    let (ek, srk) =
        (unb64(keys["endorsement_key"].as_str().unwrap()), unb64(keys["storage_root_key"].as_str().unwrap()));
    let k1 = random(32);
    let blob = aziot_tpmd::dps_blob::build(&ek, &srk, &k1).unwrap();
    let import = json!({"key": b64(&blob)});
    let r = tpmd_call(&sock, "POST", "/import_auth_key", Some(&import));
    assert_eq!(r.status, 200, "{r}\n{}", tpmd.log());
    let data = b"sr\n1700000000".to_vec();
    let want = hmac_sha256(&k1, &data);
    let target = |p: &str| format!("{p}?api-version=2020-09-01");
    let keys_want = Arc::new(keys);
    let ops = vec![
        Op::new("get_tpm_keys", build_request("GET", &target("/get_tpm_keys"), None), move |r| {
            let v = json_of(r, 200)?;
            (v == *keys_want).then_some(()).ok_or_else(|| format!("other EK/SRK: {v}"))
        }),
        Op::new(
            "sign_with_auth_key",
            build_request(
                "POST",
                &target("/sign_with_auth_key"),
                Some(json!({"data": b64(&data)}).to_string().as_bytes()),
            ),
            move |r| {
                let v = json_of(r, 200)?;
                let d = v["digest"].as_str().ok_or_else(|| format!("no digest: {v}"))?;
                (unb64(d) == want).then_some(()).ok_or_else(|| format!("wrong digest {d}"))
            },
        ),
        // a write into the TPM: the same key again (evict + persist at the auth key index)
        Op::new(
            "import_auth_key",
            build_request("POST", &target("/import_auth_key"), Some(import.to_string().as_bytes())),
            |r| status_is(r, 200),
        ),
    ];
    let status = root.join("tpmd.status");
    let log = || tpmd.log();
    let wait = |old: i32, t: Duration| wait_status_worker(&status, old, t, &log);
    let subject =
        Subject { service: "tpmd", socket: sock.clone(), worker: tpmd.worker_pid(), wait_new_worker: &wait, log: &log };
    kill_worker_under_load(&subject, ops);
    // the auth key still signs as k1
    let r = tpmd_call(&sock, "POST", "/sign_with_auth_key", Some(&json!({"data": b64(b"after")})));
    assert_eq!(r.status, 200, "{r}\n{}", tpmd.log());
    assert_eq!(unb64(r.json()["digest"].as_str().unwrap()), hmac_sha256(&k1, b"after"));
    drop(tpmd);
    drop(swtpm);
}

#[test]
fn tpmd_broker_kill9_takes_its_worker() {
    require!(Dep::Root, Dep::ServiceUser("aziottpm"), Dep::Swtpm);
    let dir = TempDir::new("fault-tpmd-broker");
    let root = dir.path();
    let swtpm = Swtpm::start(root);
    let tpmd = Tpmd::start(root, &swtpm.tcti(), "info");
    kill_broker_expect_worker_gone("tpmd", broker_pid(&root.join("tpmd.status")), tpmd.worker_pid());
    drop(tpmd);
    drop(swtpm);
}

// ---------------------------------------------------------------- tpmd down for identityd

/// The mocks' CA, exported once as `SSL_CERT_FILE` (identityd trusts the system store only;
/// the harness passes the variable to identityd's broker). Not under /tmp: identityd's worker
/// has its own empty /tmp.
fn shared_ca() -> aziot_tests::mock_tls::TestCa {
    static CA: std::sync::OnceLock<aziot_tests::mock_tls::TestCa> = std::sync::OnceLock::new();
    CA.get_or_init(|| {
        let ca = aziot_tests::mock_tls::TestCa::new("aziot fault_process test CA");
        let path =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("aziot-fault-process-ca-{}.pem", std::process::id()));
        ca.write_cert(&path).expect("write the CA");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod the CA");
        std::env::set_var("SSL_CERT_FILE", &path);
        ca
    })
    .clone()
}

/// tpmd down under identityd provisioned by DPS with TPM attestation (mock DPS and hub, tpmd on
/// swtpm): creating a module identity — its hub call's SAS token is signed in the TPM — fails
/// with 404 `Hub client error` naming tpmd's socket, nothing is created in the hub and the
/// `device_info` backup is unchanged; once tpmd is back the module is created, keys derived
/// as §8.2.
#[test]
fn identityd_with_tpmd_down_fails_cleanly_and_recovers() {
    require_identityd!();
    require!(Dep::ServiceUser("aziottpm"), Dep::Swtpm);
    use aziot_tests::mock_dps::{Attestation, Enrollment, MockDps};
    const SCOPE: &str = "0ne00FAULT1";
    let dps = MockDps::start_with_ca(shared_ca(), 0, SCOPE).expect("start the mock DPS");
    let hub_name = dps.hub_b();
    dps.enroll(
        "tpm-dev",
        Enrollment { attestation: Attestation::Tpm(None), hub: hub_name.clone(), device_id: Some("tpm-device".into()) },
    );
    let config = format!(
        "hostname = \"faulthost\"\ncloud_retries = 0\n[provisioning]\nsource = \"dps\"\nglobal_endpoint = \"{}\"\n\
         scope_id = \"{SCOPE}\"\n[provisioning.attestation]\nmethod = \"tpm\"\nregistration_id = \"tpm-dev\"\n\
         [[principal]]\nuid = 5101\nname = \"mod-a\"\nidtype = [\"module\"]\n",
        dps.endpoint()
    );
    let mut stack = Identityd::prepare(&config);
    let tpmd_dir = stack.tpmd_dir();
    std::fs::create_dir_all(&tpmd_dir).expect("mkdir tpmd");
    std::fs::set_permissions(&tpmd_dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let swtpm = Swtpm::start(&tpmd_dir);
    let mut tpmd = Tpmd::start(&tpmd_dir, &swtpm.tcti(), "info");
    stack.start_identityd().unwrap_or_else(|e| panic!("identityd: {e}"));
    let hub = dps.hub(&hub_name);
    poll_answer("mod-a created in the hub at start", &stack.log_path(), || {
        hub.module("tpm-device", "mod-a").is_some_and(|m| m.primary_key.is_some()).then_some(())
    });
    let device_info = poll_answer("the device_info backup written", &stack.log_path(), || {
        std::fs::read(stack.home().join("device_info")).ok()
    });
    let worker = stack.worker_pid();
    let root = stack.client(None, aziot_identityd_v());

    tpmd.stop();
    let tpmd_named = format!("could not talk to {}", stack.tpmd_socket().display());
    let r = root.post("/identities/modules", &json!({"type": "aziot", "moduleId": "m-new"}));
    assert_eq!(r.status, 404, "{r}\n{}", stack.log());
    let unsigned = format!("Hub client error\ncaused by: could not sign the SAS token: {tpmd_named}");
    assert!(r.message().starts_with(&unsigned), "{:?} (want {unsigned:?}...)", r.message());
    assert!(hub.module("tpm-device", "m-new").is_none(), "nothing created in the hub");
    assert_eq!(std::fs::read(stack.home().join("device_info")).unwrap(), device_info, "the backup is unchanged");
    assert_eq!(stack.worker_pid(), worker);

    let tpmd = Tpmd::start(&tpmd_dir, &swtpm.tcti(), "info");
    let r = poll_answer("identityd creates m-new once tpmd is back", &stack.log_path(), || {
        let body = json!({"type": "aziot", "moduleId": "m-new"});
        attempt(&stack.socket(), "POST", "/identities/modules?api-version=2021-12-01", Some(&body))
            .filter(|r| r.status == 200)
    });
    let created = hub.module("tpm-device", "m-new").expect("m-new in the hub");
    assert_eq!(r.json()["spec"]["genId"], json!(created.generation_id));
    assert_eq!(
        created.primary_key.as_deref().map(unb64),
        Some(hmac_sha256(&MASTER_KEY, format!("m-new:{}:primary", created.generation_id).as_bytes())),
        "keys derived as §8.2"
    );
    assert_eq!(std::fs::read(stack.home().join("device_info")).unwrap(), device_info, "no new registration");
    expect_recovered("identityd", &identityd_status_worker(&stack), worker, &stack.tpmd_socket(), &stack.log());
    drop(stack);
    drop(tpmd);
    drop(swtpm);
}
