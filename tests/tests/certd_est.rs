//! EST through the broker (spec certd.md §6; docs/certd.md "EST"): the real certd worker,
//! confined (Landlock grants only the mock's TCP port), against the mock EST server
//! (tests/src/mock_est.rs) over real TLS.
//!
//! Bootstrap → identity cert → device cert; renewal near expiry with `/simplereenroll` and the
//! current identity (a new key with `rotate_key`, the same without); a server that is down, slow,
//! answers garbage or an error status: a clear error in the API and the log, the previous cert
//! intact; failed renewals retried per `retry`; 202 + Retry-After honoured (and bounded);
//! `trusted_certs` the only trust store.

use aziot_tests::wait_for;
use std::time::{Duration, Instant};

use aziot_tests::api::handle_of;
use aziot_tests::certd::pki::{certs, csr, csr_with, ec_key, keyd_key, openssl_verify};
use aziot_tests::certd::Certd;
use aziot_tests::mock_est::{MockEst, Mode, Options, Validity};
use aziot_tests::require_certd;
use openssl::pkey::{PKey, Private};
use openssl::x509::X509;
use serde_json::json;

const BOOTSTRAP: &str = "est-bootstrap";
const IDENTITY: &str = "est-id";

/// certd's config for x509 auth against `mock`: bootstrap identity, identity `est-id`, the
/// device cert `device-id` by EST; `renew` is the `identity_auto_renew` table's body.
fn x509_config(mock: &MockEst, renew: &str) -> String {
    format!(
        r#"
[cert_issuance.est]
trusted_certs = ["est-server-ca"]
identity_cert = "{IDENTITY}"
identity_pk = "{IDENTITY}"
bootstrap_identity_cert = "{BOOTSTRAP}"
bootstrap_identity_pk = "{BOOTSTRAP}"
[cert_issuance.est.identity_auto_renew]
{renew}
[cert_issuance.est.urls]
default = "{}"
[cert_issuance.device-id]
method = "est"
"#,
        mock.url()
    )
}

/// certd's config for basic auth (`u`/`p`) against `url`, trusting `est-server-ca`: the device
/// cert `device-id` by EST, then `extra` (more `cert_issuance` tables).
fn basic_config(url: &str, extra: &str) -> String {
    format!(
        r#"
[cert_issuance.est]
trusted_certs = ["est-server-ca"]
username = "u"
password = "p"
[cert_issuance.est.urls]
default = "{url}"
[cert_issuance.device-id]
method = "est"
{extra}"#
    )
}

fn put_cert(certd: &Certd, id: &str, pem: &str) {
    let r = certd.api().call("PUT", &format!("/certificates/{id}"), Some(&json!({ "pem": pem })));
    assert_eq!(r.status, 201, "PUT {id}: {r}");
}

/// Imports the mock's CA as `est-server-ca`, and a bootstrap identity: a keyd key pair and a
/// certificate for it from the mock's CA. Returns the bootstrap certificate.
fn provision(certd: &Certd, mock: &MockEst) -> X509 {
    put_cert(certd, "est-server-ca", &mock.ca_pem());
    let handle = handle_of(
        &certd.keyd_api().post("/keypair", &json!({ "keyId": BOOTSTRAP, "preferredAlgorithms": "ec-p256" })),
        "create the bootstrap key pair",
    );
    let key = keyd_key(certd.keyd().socket(), &handle);
    let cert = mock.sign(&csr_with(&key, &key, "bootstrap", false), Validity::default());
    put_cert(certd, BOOTSTRAP, &String::from_utf8(cert.to_pem().unwrap()).unwrap());
    cert
}

fn der(c: &X509) -> Vec<u8> {
    c.to_der().unwrap()
}

fn public_der(c: &X509) -> Vec<u8> {
    c.public_key().unwrap().public_key_to_der().unwrap()
}

/// The public key (DER) of keyd key pair `id`, through the engine's twin.
fn keyd_public(certd: &Certd, id: &str) -> Vec<u8> {
    let handle = certd.keyd_api().get_keypair(id);
    keyd_key(certd.keyd().socket(), &handle).public_key_to_der().unwrap()
}

fn stored(certd: &Certd, id: &str) -> Option<Vec<X509>> {
    std::fs::read_to_string(certd.cert_path(id)).ok().map(|p| certs(&p))
}

/// POST /certificates for `id` with a fresh local key: (status, the response, the key).
fn enroll(certd: &Certd, id: &str, cn: &str) -> (aziot_tests::http::Response, PKey<Private>) {
    let key = ec_key();
    let r = certd.api().post("/certificates", &json!({ "certId": id, "csr": csr(&key, cn, false) }));
    (r, key)
}


#[test]
fn bootstrap_then_identity_then_device_cert() {
    require_certd!();
    let mock = MockEst::start(Options { require_client_cert: true, ..Options::default() });
    let certd = Certd::start(&x509_config(&mock, "rotate_key = true\nthreshold = \"80%\"\nretry = \"4%\""));
    let bootstrap = provision(&certd, &mock);

    let (r, key) = enroll(&certd, "device-id", "device-1");
    assert_eq!(r.status, 201, "{r}\n{}", certd.log());
    let pem = r.json()["pem"].as_str().unwrap().to_owned();
    let chain = certs(&pem);
    assert_eq!(chain.len(), 2, "issued cert + the CA from /cacerts");
    assert_eq!(public_der(&chain[0]), key.public_key_to_der().unwrap());
    assert_eq!(der(&chain[1]), der(mock.ca()));
    let (ok, out) = openssl_verify(certd.dir(), mock.ca(), &chain[0]);
    assert!(ok, "{out}");
    assert_eq!(std::fs::read_to_string(certd.cert_path("device-id")).unwrap(), pem);

    // the wire: bootstrap enrollment with the bootstrap cert, then the device CSR unchanged with
    // the new identity; both base64 PKCS#10, /cacerts alongside
    let enrolls = mock.requests_for("simpleenroll");
    assert_eq!(enrolls.len(), 2, "{enrolls:#?}");
    assert_eq!(enrolls[0].client_cert.as_ref().map(der), Some(der(&bootstrap)));
    for e in &enrolls {
        assert_eq!(e.status, 200);
        assert_eq!(e.content_type.as_deref(), Some("application/pkcs10"));
        assert_eq!(e.content_transfer_encoding.as_deref(), Some("base64"));
        assert!(e.path.starts_with("/.well-known/est/"), "{}", e.path);
    }
    let identity = stored(&certd, IDENTITY).expect("the identity cert is stored");
    assert_eq!(enrolls[1].client_cert.as_ref().map(der), Some(der(&identity[0])));
    // the identity: CSR subject = the requested CSR's, key pair est-id in keyd, clientAuth
    let id_csr = enrolls[0].csr().unwrap();
    assert_eq!(id_csr.version(), 0);
    assert_eq!(id_csr.subject_name().to_der().unwrap(), chain[0].subject_name().to_der().unwrap());
    assert_eq!(public_der(&identity[0]), keyd_public(&certd, IDENTITY));
    let device_csr = enrolls[1].csr().unwrap();
    assert_eq!(device_csr.public_key().unwrap().public_key_to_der().unwrap(), key.public_key_to_der().unwrap());
    assert!(mock.requests_for("cacerts").len() >= 2);
    assert!(mock.requests_for("simplereenroll").is_empty());

    // a second device cert reuses the identity: no new bootstrap
    let (r, _) = enroll(&certd, "device-id", "device-2");
    assert_eq!(r.status, 201, "{r}");
    let enrolls = mock.requests_for("simpleenroll");
    assert_eq!(enrolls.len(), 3);
    assert_eq!(enrolls[2].client_cert.as_ref().map(der), Some(der(&identity[0])));
    assert_eq!(stored(&certd, IDENTITY).unwrap()[0].to_der().unwrap(), der(&identity[0]));
}

/// The identity cert comes back 90 % through its life (threshold 80 %): the timer renews it at
/// once with `/simplereenroll`, authenticated by the current identity.
fn renewal(rotate_key: bool) {
    require_certd!();
    let mock = MockEst::start(Options { require_client_cert: true, ..Options::default() });
    mock.set_enroll_validity(Validity { backdate: Duration::from_secs(90), lifetime: Duration::from_secs(100) });
    let certd =
        Certd::start(&x509_config(&mock, &format!("rotate_key = {rotate_key}\nthreshold = \"80%\"\nretry = \"4%\"")));
    let bootstrap = provision(&certd, &mock);
    let (r, _) = enroll(&certd, "device-id", "device-1");
    assert_eq!(r.status, 201, "{r}\n{}", certd.log());

    assert!(
        mock.wait_for(Duration::from_secs(20), |rs| rs.iter().any(|r| r.op == "simplereenroll" && r.status == 200)),
        "no renewal within 20 s: {:#?}\n{}",
        mock.requests(),
        certd.log()
    );
    let enrolls = mock.requests_for("simpleenroll");
    let first_identity = enrolls[1].client_cert.clone().expect("the device enrollment presented the identity");
    assert_ne!(der(&first_identity), der(&bootstrap));
    let re = mock.requests_for("simplereenroll").into_iter().find(|r| r.status == 200).unwrap();
    // the current identity (its whole chain was offered; the leaf is what the server saw)
    assert_eq!(re.client_cert.as_ref().map(der), Some(der(&first_identity)));
    let re_csr = re.csr().unwrap();
    assert_eq!(re_csr.subject_name().to_der().unwrap(), first_identity.subject_name().to_der().unwrap());
    let new_public = re_csr.public_key().unwrap().public_key_to_der().unwrap();
    if rotate_key {
        assert_ne!(new_public, public_der(&first_identity), "rotate_key: a new key");
    } else {
        assert_eq!(new_public, public_der(&first_identity), "no rotation: the same key");
    }
    // committed: the stored identity is the renewed cert (30 days), and keyd's est-id is its key
    assert!(
        wait_for(Duration::from_secs(10), || stored(&certd, IDENTITY)
            .is_some_and(|c| public_der(&c[0]) == new_public && der(&c[0]) != der(&first_identity))),
        "the renewed identity was not stored\n{}",
        certd.log()
    );
    assert!(wait_for(Duration::from_secs(10), || keyd_public(&certd, IDENTITY) == new_public), "{}", certd.log());
    if rotate_key {
        let r = certd.keyd_api().get("/keypair/est-id-temp");
        assert_eq!(r.status, 400, "the temporary key pair was moved onto est-id: {r}");
    }
    assert!(certd.wait_log("Renewed EST identity cert \"est-id\"", Duration::from_secs(5)), "{}", certd.log());
    // the renewed identity is used for the next device cert
    let renewed = stored(&certd, IDENTITY).unwrap();
    let (r, _) = enroll(&certd, "device-id", "device-2");
    assert_eq!(r.status, 201, "{r}\n{}", certd.log());
    let last = mock.requests_for("simpleenroll").pop().unwrap();
    assert_eq!(last.client_cert.as_ref().map(der), Some(der(&renewed[0])));
}

#[test]
fn renewal_near_expiry_uses_simplereenroll_with_the_current_identity_and_a_new_key() {
    renewal(true);
}

#[test]
fn renewal_without_rotate_key_keeps_the_key() {
    renewal(false);
}

#[test]
fn failed_renewals_are_retried_per_retry_and_keep_the_identity() {
    require_certd!();
    let mock = MockEst::start(Options { require_client_cert: true, ..Options::default() });
    // due after 10 s (50 %), retried every second (5 %)
    mock.set_enroll_validity(Validity { backdate: Duration::ZERO, lifetime: Duration::from_secs(20) });
    let certd = Certd::start(&x509_config(&mock, "rotate_key = true\nthreshold = \"50%\"\nretry = \"5%\""));
    provision(&certd, &mock);
    let (r, _) = enroll(&certd, "device-id", "device-1");
    assert_eq!(r.status, 201, "{r}\n{}", certd.log());
    let identity = std::fs::read(certd.cert_path(IDENTITY)).unwrap();
    mock.set_mode(Mode::Garbage);
    assert!(
        mock.wait_for(Duration::from_secs(20), |rs| rs.iter().filter(|r| r.op == "simplereenroll").count() >= 2),
        "not retried: {:#?}\n{}",
        mock.requests(),
        certd.log()
    );
    mock.set_mode(Mode::Normal);
    let attempts: Vec<_> = mock.requests_for("simplereenroll");
    assert!(attempts.len() >= 2);
    assert!(certd.log().contains("Tried to renew est-id, but"), "{}", certd.log());
    assert!(certd.log().contains("Retrying at unix time"), "{}", certd.log());
    assert!(certd.log().contains("not a PKCS#7"), "{}", certd.log());
    // the failures left the identity as it was; then a retry succeeds and replaces it
    assert!(
        wait_for(Duration::from_secs(15), || std::fs::read(certd.cert_path(IDENTITY)).unwrap() != identity),
        "no successful retry\n{}",
        certd.log()
    );
    let renewed = stored(&certd, IDENTITY).unwrap();
    assert_eq!(der(&renewed[1]), der(mock.ca()));
    // the commit writes the cert, then moves the rotated key onto the identity's id (spec
    // certd.md §6.4 step 6): the key follows the cert within the same renewal
    assert!(
        wait_for(Duration::from_secs(10), || public_der(&renewed[0]) == keyd_public(&certd, IDENTITY)),
        "the identity key did not follow the renewed cert\n{}",
        certd.log()
    );
}

#[test]
fn server_down_slow_garbage_or_failing_is_a_clear_error_and_the_cert_is_kept() {
    require_certd!();
    let mut mock = MockEst::start(Options::default());
    let certd = Certd::start(&basic_config(&mock.url(), ""));
    put_cert(&certd, "est-server-ca", &mock.ca_pem());
    let (r, _) = enroll(&certd, "device-id", "device-1");
    assert_eq!(r.status, 201, "{r}\n{}", certd.log());
    assert_eq!(mock.requests_for("simpleenroll")[0].basic_user.as_deref(), Some("u"));
    let before = std::fs::read(certd.cert_path("device-id")).unwrap();

    let cases: [(Mode, &str); 3] = [
        (Mode::Garbage, "not a PKCS#7 certs-only message"),
        (Mode::Status(503), "EST endpoint did not return successful response: 503 mock EST server: forced error"),
        (Mode::Slow(Duration::from_secs(40)), "timed out after 20s"),
    ];
    for (mode, needle) in cases {
        mock.set_mode(mode.clone());
        let started = Instant::now();
        let (r, _) = enroll(&certd, "device-id", "device-2");
        assert_eq!(r.status, 500, "{mode:?}: {r}");
        let message = r.message();
        assert!(
            message.contains("could not issue cert \"device-id\" by EST") && message.contains(needle),
            "{mode:?}: {message}"
        );
        assert!(certd.log().contains(needle), "{mode:?}: not in the log\n{}", certd.log());
        assert_eq!(std::fs::read(certd.cert_path("device-id")).unwrap(), before, "{mode:?}: the cert changed");
        if let Mode::Slow(_) = mode {
            assert!(started.elapsed() < Duration::from_secs(35), "the exchange deadline was not kept");
        }
    }
    mock.set_mode(Mode::Normal);
    mock.stop();
    let (r, _) = enroll(&certd, "device-id", "device-3");
    assert_eq!(r.status, 500, "{r}");
    assert!(r.message().contains("could not connect to 127.0.0.1:"), "{}", r.message());
    assert_eq!(std::fs::read(certd.cert_path("device-id")).unwrap(), before);
    // no secret in the log
    assert!(!certd.log().contains("Basic dTpw"), "the basic credentials were logged");
}

#[test]
fn deferred_enrollment_202_retry_after_is_honoured_and_bounded() {
    require_certd!();
    let mock = MockEst::start(Options { basic: Some(("u".into(), "p".into())), ..Options::default() });
    let certd = Certd::start(&basic_config(
        &mock.url(),
        "[cert_issuance.wrong-password]\nmethod = \"est\"\nusername = \"u\"\npassword = \"wrong\"\n",
    ));
    put_cert(&certd, "est-server-ca", &mock.ca_pem());
    mock.set_mode(Mode::Defer { times: 2, retry_after: 1 });
    let started = Instant::now();
    let (r, key) = enroll(&certd, "device-id", "device-1");
    assert_eq!(r.status, 201, "{r}\n{}", certd.log());
    assert!(started.elapsed() >= Duration::from_secs(2), "Retry-After was not waited for");
    let chain = certs(r.json()["pem"].as_str().unwrap());
    assert_eq!(public_der(&chain[0]), key.public_key_to_der().unwrap());
    let statuses: Vec<u16> = mock.requests_for("simpleenroll").iter().map(|r| r.status).collect();
    assert_eq!(statuses, [202, 202, 200]);
    // the same CSR each time
    let bodies: Vec<Vec<u8>> = mock.requests_for("simpleenroll").iter().map(|r| r.csr_der.clone().unwrap()).collect();
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));

    // a delay beyond the bound ends the enrollment with an error (and no file)
    mock.set_mode(Mode::Defer { times: 1, retry_after: 3600 });
    let before = std::fs::read(certd.cert_path("device-id")).unwrap();
    let (r, _) = enroll(&certd, "device-id", "device-2");
    assert_eq!(r.status, 500, "{r}");
    assert!(r.message().contains("Retry-After \"3600\""), "{}", r.message());
    assert_eq!(std::fs::read(certd.cert_path("device-id")).unwrap(), before);

    // basic auth refused by the server
    mock.set_mode(Mode::Normal);
    let (r, _) = enroll(&certd, "wrong-password", "w");
    assert_eq!(r.status, 500, "{r}");
    assert!(r.message().contains("did not return successful response: 401"), "{}", r.message());
    assert!(!certd.cert_path("wrong-password").exists());
}

#[test]
fn trusted_certs_is_the_only_trust_store() {
    require_certd!();
    let trusted = MockEst::start(Options::default());
    let other = MockEst::start(Options::default());
    let certd = Certd::start(&format!(
        r#"
[cert_issuance.est]
trusted_certs = ["est-server-ca"]
username = "u"
password = "p"
[cert_issuance.est.urls]
good = "{}"
other-ca = "{}"
[cert_issuance.good]
method = "est"
[cert_issuance.other-ca]
method = "est"
[cert_issuance.system-store]
method = "est"
url = "{}"
username = "u"
password = "p"
"#,
        trusted.url(),
        other.url(),
        trusted.url(),
    ));
    put_cert(&certd, "est-server-ca", &trusted.ca_pem());
    let (r, _) = enroll(&certd, "good", "good");
    assert_eq!(r.status, 201, "{r}\n{}", certd.log());
    // a server whose certificate comes from another CA is refused
    let (r, _) = enroll(&certd, "other-ca", "x");
    assert_eq!(r.status, 500, "{r}");
    assert!(r.message().contains("server certificate verification failed"), "{}", r.message());
    assert!(other.requests().is_empty(), "a request reached the untrusted server: {:#?}", other.requests());
    assert!(!certd.cert_path("other-ca").exists());
    // a missing trusted cert is an error, not a fall-back to the system store
    let r = certd.api().call("DELETE", "/certificates/est-server-ca", None);
    assert_eq!(r.status, 204);
    let (r, _) = enroll(&certd, "good", "again");
    assert_eq!(r.status, 500, "{r}");
    assert!(r.message().contains("trusted cert \"est-server-ca\""), "{}", r.message());
}

#[test]
fn without_trusted_certs_the_system_store_is_used() {
    require_certd!();
    let mock = MockEst::start(Options::default());
    let certd = Certd::start(&format!(
        "[cert_issuance.est]\nusername = \"u\"\npassword = \"p\"\n[cert_issuance.est.urls]\ndefault = \"{}\"\n[cert_issuance.device-id]\nmethod = \"est\"\n",
        mock.url()
    ));
    // the mock's CA is in no system store: refused (the worker read the system bundle in its
    // sandbox and was not killed doing so)
    let pid = certd.worker_pid();
    let (r, _) = enroll(&certd, "device-id", "d");
    assert_eq!(r.status, 500, "{r}");
    assert!(
        r.message().contains("server certificate verification failed: self-signed certificate in certificate chain"),
        "{}",
        r.message()
    );
    assert_eq!(certd.worker_pid(), pid, "the worker was restarted\n{}", certd.log());
    assert!(mock.requests().is_empty());
}

#[test]
fn landlock_grants_exactly_the_est_ports_and_the_audit_passes() {
    require_certd!();
    let a = MockEst::start(Options::default());
    let b = MockEst::start(Options::default());
    let certd =
        Certd::start(&basic_config(&a.url(), &format!("[cert_issuance.other]\nmethod = \"est\"\nurl = \"{}\"\n", b.url())));
    let status = certd.status().expect("status file");
    let mut ports: Vec<u64> =
        status["landlock"]["tcp_connect_ports"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap()).collect();
    ports.sort();
    let mut expected = vec![u64::from(a.port()), u64::from(b.port())];
    expected.sort();
    assert_eq!(ports, expected, "{status}");
    assert_eq!(status["landlock"]["tcp_restricted"], true);
    put_cert(&certd, "est-server-ca", &a.ca_pem());
    let (r, _) = enroll(&certd, "device-id", "d");
    assert_eq!(r.status, 201, "{r}\n{}", certd.log());
    // the worker, with its renewal thread and after TLS, passes the audit
    let audit = std::process::Command::new(aziot_tests::keyd::aziotctl_bin())
        .args(["policy", "audit", "--run-dir"])
        .arg(certd.run_dir())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&audit.stdout), String::from_utf8_lossy(&audit.stderr));
    assert!(audit.status.success(), "audit:\n{text}");
    assert!(text.contains("certd"), "{text}");
}
