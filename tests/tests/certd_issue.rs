//! Local issuance through the broker (spec certd.md §4.1, §5, §8): self-signed, local CA and
//! explicit issuer, each with the signing key in keyd (certd signs through the engine's
//! in-process twin); every issued certificate is checked with `openssl verify` against its
//! issuer. Bad CSRs and issuers, EST without auth, and kill -9 of the worker in a loop of
//! issuances (every cert file is the old or the new one, never torn).

use std::time::{Duration, Instant};

use aziot_tests::api::{expect_err, handle_of};
use aziot_tests::certd::pki::{certs, csr, csr_with, ec_key, keyd_key, openssl_verify};
use aziot_tests::certd::Certd;
use aziot_tests::require_certd;
use openssl::x509::X509;
use serde_json::json;

const CONFIG: &str = r#"
[cert_issuance.device-ca]
method = "self_signed"
expiry_days = 3650
[cert_issuance.local_ca]
cert = "device-ca"
pk = "device-ca"
[cert_issuance.leaf]
method = "local_ca"
expiry_days = 100000
[cert_issuance.named]
method = "local_ca"
subject = { L = "AQ", ST = "Antarctica", CN = "a-very-long-common-name-that-is-longer-than-sixty-four-characters-in-total" }
[cert_issuance.est-cert]
method = "est"
[cert_issuance.orphan]
method = "self_signed"
"#;

/// A keyd key pair `id` and a CSR for `cn` made with it (signed by keyd through the twin).
fn keyd_csr(certd: &Certd, id: &str, cn: &str, ca: bool) -> (String, String) {
    let handle = handle_of(
        &certd.keyd_api().post("/keypair", &json!({ "keyId": id, "preferredAlgorithms": "ec-p256" })),
        "create key pair",
    );
    let key = keyd_key(certd.keyd().socket(), &handle);
    (handle, String::from_utf8(csr_with(&key, &key, cn, ca).to_pem().unwrap()).unwrap())
}

fn issue(certd: &Certd, body: serde_json::Value) -> Vec<X509> {
    let r = certd.api().post("/certificates", &body);
    assert_eq!(r.status, 201, "{r}\n{}", certd.log());
    let pem = r.json()["pem"].as_str().unwrap().to_owned();
    // stored exactly as returned
    let id = body["certId"].as_str().unwrap();
    assert_eq!(std::fs::read_to_string(certd.cert_path(id)).unwrap(), pem);
    certs(&pem)
}

/// The CA: a self-signed cert whose key is keyd's `device-ca`.
fn device_ca(certd: &Certd) -> (X509, String) {
    let (handle, csr) = keyd_csr(certd, "device-ca", "Device CA", true);
    let chain = issue(certd, json!({ "certId": "device-ca", "csr": csr }));
    assert_eq!(chain.len(), 1);
    (chain[0].clone(), handle)
}

#[test]
fn self_signed_cert_verifies_under_its_own_key() {
    require_certd!();
    let certd = Certd::start(CONFIG);
    let (ca, _) = device_ca(&certd);
    assert_eq!(ca.issuer_name().to_der().unwrap(), ca.subject_name().to_der().unwrap());
    let (ok, out) = openssl_verify(certd.dir(), &ca, &ca);
    assert!(ok, "{out}");
    // random positive 128-bit serial (upstream: 0)
    let serial = ca.serial_number().to_bn().unwrap();
    assert_eq!(serial.num_bits(), 128, "{serial}");
    assert!(ca.subject_key_id().is_some());
    // 3650 days
    let days = ca.not_before().diff(ca.not_after()).unwrap().days;
    assert_eq!(days, 3650);
}

#[test]
fn local_ca_issues_certs_that_verify_against_it() {
    require_certd!();
    let certd = Certd::start(CONFIG);
    let (ca, _) = device_ca(&certd);
    let leaf_key = ec_key();
    let chain = issue(&certd, json!({ "certId": "leaf", "csr": csr(&leaf_key, "leaf", false) }));
    assert_eq!(chain.len(), 2, "leaf then the CA chain");
    assert_eq!(chain[1].to_der().unwrap(), ca.to_der().unwrap());
    let leaf = &chain[0];
    let (ok, out) = openssl_verify(certd.dir(), &ca, leaf);
    assert!(ok, "{out}");
    assert_eq!(leaf.issuer_name().to_der().unwrap(), ca.subject_name().to_der().unwrap());
    assert_eq!(leaf.authority_key_id().unwrap().as_slice(), ca.subject_key_id().unwrap().as_slice());
    assert!(leaf.public_key().unwrap().public_eq(&leaf_key));
    // expiry_days = 100000 is clamped to the CA's notAfter
    assert_eq!(leaf.not_after().compare(ca.not_after()).unwrap(), std::cmp::Ordering::Equal);
    // a second issuance: a new serial
    let again = issue(&certd, json!({ "certId": "leaf", "csr": csr(&leaf_key, "leaf", false) }));
    assert_ne!(again[0].serial_number().to_bn().unwrap(), leaf.serial_number().to_bn().unwrap());
    // the CSR's EKU is copied; a subject override sorts its RDNs and truncates CN to 64
    let text = String::from_utf8(leaf.to_text().unwrap()).unwrap();
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    let named = issue(&certd, json!({ "certId": "named", "csr": csr(&ec_key(), "ignored", false) }));
    let rdns: Vec<String> = named[0]
        .subject_name()
        .entries()
        .map(|e| format!("{}={}", e.object().nid().short_name().unwrap(), e.data().to_string().unwrap()))
        .collect();
    let cn: String =
        "a-very-long-common-name-that-is-longer-than-sixty-four-characters-in-total".chars().take(64).collect();
    assert_eq!(rdns, [format!("CN={cn}"), "L=AQ".into(), "ST=Antarctica".into()]);
    assert!(openssl_verify(certd.dir(), &ca, &named[0]).0);
}

#[test]
fn explicit_issuer_takes_precedence() {
    require_certd!();
    let certd = Certd::start(CONFIG);
    let (ca, handle) = device_ca(&certd);
    // no [cert_issuance.other]: the request's issuer is enough
    let chain = issue(
        &certd,
        json!({ "certId": "other", "csr": csr(&ec_key(), "other", false),
                "issuer": { "certId": "device-ca", "privateKeyHandle": handle } }),
    );
    assert!(openssl_verify(certd.dir(), &ca, &chain[0]).0);
    // ... even over method = "est"
    let chain = issue(
        &certd,
        json!({ "certId": "est-cert", "csr": csr(&ec_key(), "e", false),
                "issuer": { "certId": "device-ca", "privateKeyHandle": handle } }),
    );
    assert!(openssl_verify(certd.dir(), &ca, &chain[0]).0);
}

#[test]
fn bad_csrs_and_issuers() {
    require_certd!();
    let certd = Certd::start(CONFIG);
    let (_, handle) = device_ca(&certd);
    let api = certd.api();
    let before = certd.stored();
    // a CSR signed by another key than the one it carries
    let wrong = String::from_utf8(csr_with(&ec_key(), &ec_key(), "x", false).to_pem().unwrap()).unwrap();
    let r = api.post("/certificates", &json!({ "certId": "leaf", "csr": wrong }));
    assert_eq!(r.status, 400, "{r}");
    assert!(r.message().starts_with("parameter \"csr\" has an invalid value\ncaused by: "), "{r}");
    // not a CSR at all; a certificate instead of a CSR
    for bad in ["garbage", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"] {
        let r = api.post("/certificates", &json!({ "certId": "leaf", "csr": bad }));
        assert_eq!(r.status, 400, "{r}");
        assert!(r.message().starts_with("parameter \"csr\" has an invalid value\ncaused by: "), "{r}");
    }
    let good = csr(&ec_key(), "x", false);
    // issuer cert ID unknown; issuer with no certificate in it; a handle with NUL; a bad handle
    let r = api.post(
        "/certificates",
        &json!({ "certId": "x", "csr": good, "issuer": { "certId": "nope", "privateKeyHandle": handle } }),
    );
    expect_err(&r, 400, "parameter \"issuer.certId\" has an invalid value\ncaused by: not found");
    assert_eq!(api.call("PUT", "/certificates/empty", Some(&json!({ "pem": "no certs here" }))).status, 201);
    let r = api.post(
        "/certificates",
        &json!({ "certId": "x", "csr": good, "issuer": { "certId": "empty", "privateKeyHandle": handle } }),
    );
    expect_err(&r, 400, "parameter \"issuer.certId\" has an invalid value\ncaused by: invalid issuer");
    let r = api.post(
        "/certificates",
        &json!({ "certId": "x", "csr": good, "issuer": { "certId": "device-ca", "privateKeyHandle": "a\u{0}b" } }),
    );
    assert_eq!(r.status, 400, "{r}");
    assert!(r.message().starts_with("parameter \"issuer.privateKeyHandle\" has an invalid value"), "{r}");
    let r = api.post(
        "/certificates",
        &json!({ "certId": "x", "csr": good, "issuer": { "certId": "device-ca", "privateKeyHandle": "forged" } }),
    );
    expect_err(&r, 500, "internal error");
    // no issuer and no [cert_issuance.<id>]: 400 (upstream 500)
    let r = api.post("/certificates", &json!({ "certId": "x", "csr": good }));
    expect_err(&r, 400, "issuer is required for locally-issued certs");
    // self_signed whose key pair does not exist in keyd: 500
    let r = api.post("/certificates", &json!({ "certId": "orphan", "csr": good }));
    expect_err(&r, 500, "internal error");
    // EST without EST auth configured: 500 naming the cause, in the API and the log (EST
    // against a server: tests/tests/certd_est.rs)
    let r = api.post("/certificates", &json!({ "certId": "est-cert", "csr": good }));
    expect_err(
        &r,
        500,
        "could not issue cert \"est-cert\" by EST: EST issuance failed: EST auth is not configured for cert \"est-cert\"",
    );
    assert!(certd.wait_log("EST auth is not configured", Duration::from_secs(5)), "{}", certd.log());
    let mut after = certd.stored();
    after.retain(|n| !before.contains(n));
    // only the import of "empty" was written
    assert_eq!(after, [certd.cert_path("empty").file_name().unwrap().to_string_lossy().into_owned()]);
}

#[test]
fn local_ca_not_configured_or_missing_is_500() {
    require_certd!();
    let certd =
        Certd::start("[cert_issuance.leaf]\nmethod = \"local_ca\"\n[cert_issuance.leaf2]\nmethod = \"local_ca\"\n");
    let r = certd.api().post("/certificates", &json!({ "certId": "leaf", "csr": csr(&ec_key(), "l", false) }));
    expect_err(&r, 500, "internal error");
    assert!(certd.wait_log("[cert_issuance.local_ca] is not configured", Duration::from_secs(5)), "{}", certd.log());
    drop(certd);
    let certd = Certd::start(
        "[cert_issuance.local_ca]\ncert = \"ca\"\npk = \"ca\"\n[cert_issuance.leaf]\nmethod = \"local_ca\"\n",
    );
    let r = certd.api().post("/certificates", &json!({ "certId": "leaf", "csr": csr(&ec_key(), "l", false) }));
    expect_err(&r, 500, "internal error");
    assert!(certd.stored().is_empty());
}

/// Every cert file is a complete PEM chain of `len` certificates (never torn).
fn assert_whole(certd: &Certd, ids: &[String], len: usize) {
    for id in ids {
        let path = certd.cert_path(id);
        if let Ok(text) = std::fs::read_to_string(&path) {
            let chain =
                X509::stack_from_pem(text.as_bytes()).unwrap_or_else(|e| panic!("{id}: torn file ({e}):\n{text}"));
            assert_eq!(chain.len(), len, "{id}: {text}");
            assert!(text.ends_with("-----END CERTIFICATE-----\n"), "{id}: {text}");
        }
    }
    for name in certd.stored() {
        assert!(name.ends_with(".cer") || name.starts_with(".tmp-"), "{name}");
    }
}

#[test]
fn kill_9_of_the_worker_during_issuances_leaves_old_or_new_files_and_restart_reads_back() {
    require_certd!();
    let mut extra = String::from(CONFIG);
    let ids: Vec<String> = (0..4).map(|i| format!("kill-{i}")).collect();
    for id in &ids {
        extra.push_str(&format!("[cert_issuance.{id}]\nmethod = \"local_ca\"\n"));
    }
    let mut certd = Certd::start(&extra);
    let (ca, _) = device_ca(&certd);
    let key = ec_key();
    let req = csr(&key, "k", false);
    for id in &ids {
        issue(&certd, json!({ "certId": id, "csr": req }));
    }
    // issuances in a loop on 4 threads while the worker is killed three times
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let threads: Vec<_> = ids
        .iter()
        .map(|id| {
            let (sock, id, req, stop) = (certd.socket(), id.clone(), req.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut ok = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let bytes = serde_json::to_vec(&json!({ "certId": id, "csr": req })).unwrap();
                    let r = aziot_tests::http::raw_once(
                        &sock,
                        &aziot_tests::http::build_request("POST", "/certificates?api-version=2020-09-01", Some(&bytes)),
                    );
                    if r.is_ok_and(|r| r.status == 201) {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(150));
        let worker = certd.worker_pid();
        // SAFETY: plain syscall; the worker is a child of our broker.
        assert_eq!(unsafe { libc::kill(worker, libc::SIGKILL) }, 0);
        certd.wait_new_worker(worker, Duration::from_secs(10));
        assert_whole(&certd, &ids, 2);
    }
    std::thread::sleep(Duration::from_millis(150));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let issued: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(issued > 0, "no issuance succeeded\n{}", certd.log());
    assert_whole(&certd, &ids, 2);
    // the new worker removed any temporary file a killed write left
    let deadline = Instant::now() + Duration::from_secs(5);
    let stored = loop {
        let s = certd.stored();
        if s.iter().all(|n| n.ends_with(".cer")) || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // a restart of the whole service reads every cert back
    let before: Vec<String> =
        ids.iter().map(|id| certd.api().get(&format!("/certificates/{id}")).json()["pem"].to_string()).collect();
    certd.stop();
    certd.start_again();
    assert!(certd.stored().iter().all(|n| n.ends_with(".cer")), "{:?} (before: {stored:?})", certd.stored());
    for (id, old) in ids.iter().zip(before) {
        let r = certd.api().get(&format!("/certificates/{id}"));
        assert_eq!(r.status, 200, "{r}");
        assert_eq!(r.json()["pem"].to_string(), old);
        let chain = certs(r.json()["pem"].as_str().unwrap());
        assert!(openssl_verify(certd.dir(), &ca, &chain[0]).0);
    }
}
