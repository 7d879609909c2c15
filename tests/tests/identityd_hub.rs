//! identityd's IoT Hub client against the mock IoT Hub (tests/src/mock_hub.rs).
//!
//! * `client_*`: the client library (workers/identityd/src/hub/) driven directly, no broker:
//!   wire shape of each operation (cloud-protocols.md §1.2, §4.2), SAS and X.509 device auth,
//!   §1.5 retries / 429 back-off / timeouts, §4.5 error classes, the proxy of §1.4, calls in
//!   parallel (no lock across cloud I/O).
//! * `broker_*`: the real identityd through the broker (harness tests/src/identityd.rs), module
//!   reconciliation and module identities against the mock.
//!
//! Every client test shares one CA (the mocks are started with it) exported once as
//! `SSL_CERT_FILE`, since the client trusts the system store only (§1.1).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use aziot_identityd::hub::client::{Client, Tuning};
use aziot_identityd::hub::{
    BoxFuture, DeviceAuth, HubClient, HubDevice, HubErrorKind, HubSettings, ModuleKeys, SasSigner, SignError,
};
use aziot_tests::crypto::{b64, hmac_sha256};
use aziot_tests::mock_hub::{verify_sas, DeviceCredential, Fault, MockHub, StoredModule};
use aziot_tests::mock_tls::{self, ConnectProxy, TestCa};

/// The one CA of this test process, written to a file and exported as `SSL_CERT_FILE` before
/// any client is built.
fn shared_ca() -> TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(|| {
        let ca = TestCa::new("aziot identityd_hub test CA");
        // Not under /tmp: identityd's worker has its own empty /tmp (its mount namespace); the
        // target's tmp dir is world-readable.
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("aziot-identityd-hub-ca-{}.pem", std::process::id()));
        ca.write_cert(&path).expect("write the CA");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod the CA");
        std::env::set_var("SSL_CERT_FILE", &path);
        ca
    })
    .clone()
}

fn start_hub() -> MockHub {
    MockHub::start_with_ca(shared_ca(), 0).expect("start the mock hub")
}

/// HMAC-SHA256 with a key held here (identityd's signer asks keyd; the token format is what is
/// under test).
struct LocalSigner(Vec<u8>);

impl SasSigner for LocalSigner {
    fn sign<'a>(&'a self, data: &'a [u8]) -> BoxFuture<'a, Result<Vec<u8>, SignError>> {
        Box::pin(async move { Ok(hmac_sha256(&self.0, data)) })
    }
}

const DEVICE: &str = "dev-1";

fn sas_device(hub: &MockHub) -> HubDevice {
    sas_device_with_key(hub).0
}

/// Registers [`DEVICE`] with a random SAS key; the device as the client sees it, and the key.
fn sas_device_with_key(hub: &MockHub) -> (HubDevice, Vec<u8>) {
    let key = aziot_tests::crypto::random(32);
    hub.add_device(DEVICE, DeviceCredential::Sas(key.clone()));
    let device = HubDevice {
        hub_name: hub.hub_name(),
        gateway_host: hub.host(),
        device_id: DEVICE.into(),
        auth: DeviceAuth::Sas(Arc::new(LocalSigner(key.clone()))),
    };
    (device, key)
}

fn settings(timeout: Duration, retries: u32) -> HubSettings {
    HubSettings { timeout, retries, proxy: None }
}

/// The §1.5 schedule with short pauses (the back-off table is injectable; the production
/// defaults are §1.5's).
fn fast() -> Tuning {
    let ms = Duration::from_millis;
    Tuning {
        backoff: [ms(200), ms(200), ms(200), ms(200)],
        jitter: [Duration::ZERO; 4],
        failure_delay: ms(100),
        ..Tuning::default()
    }
}

fn client(timeout: Duration, retries: u32, tuning: Tuning) -> Client {
    shared_ca();
    Client::with_tuning(&settings(timeout, retries), tuning).expect("client")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

fn keys() -> ModuleKeys {
    ModuleKeys { primary: b64(&[1u8; 32]), secondary: b64(&[2u8; 32]) }
}

/// Create, set keys, get, list, delete over SAS: each request's method, path, api-version,
/// headers (only those of §1.2) and compact body are exactly §4.2's, and every token verifies.
#[test]
fn client_sas_module_crud_wire_shape() {
    let hub = start_hub();
    let device = sas_device(&hub);
    let c = client(Duration::from_secs(10), 1, fast());
    let rt = rt();

    let created = rt.block_on(c.create_module(&device, "mod-a")).expect("create");
    let stored = hub.module(DEVICE, "mod-a").expect("the hub holds the module");
    assert_eq!(created.generation_id.as_deref(), Some(stored.generation_id.as_str()));
    assert_eq!((created.module_id.as_str(), created.device_id.as_str()), ("mod-a", DEVICE));

    let k = keys();
    let updated = rt.block_on(c.update_module(&device, "mod-a", &k)).expect("update");
    assert_eq!(updated.generation_id, created.generation_id, "an update keeps the generation");
    let stored = hub.module(DEVICE, "mod-a").expect("module");
    assert_eq!(stored.primary_key.as_deref(), Some(k.primary.as_str()));
    assert_eq!(stored.secondary_key.as_deref(), Some(k.secondary.as_str()));

    assert_eq!(rt.block_on(c.get_module(&device, "mod-a")).expect("get"), updated);
    let listed = rt.block_on(c.list_modules(&device)).expect("list");
    assert_eq!(listed, vec![updated.clone()]);
    rt.block_on(c.delete_module(&device, "mod-a")).expect("delete");
    assert!(hub.modules(DEVICE).is_empty());

    let reqs = hub.requests();
    let shape: Vec<(String, String)> = reqs.iter().map(|r| (r.method.clone(), r.target.clone())).collect();
    let one = "/devices/dev-1/modules/mod-a?api-version=2017-11-08-preview".to_owned();
    assert_eq!(
        shape,
        vec![
            ("PUT".into(), one.clone()),
            ("PUT".into(), one.clone()),
            ("GET".into(), one.clone()),
            ("GET".into(), "/devices/dev-1/modules?api-version=2017-11-08-preview".into()),
            ("DELETE".into(), one),
        ]
    );
    for (i, r) in reqs.iter().enumerate() {
        let sas = r.sas.as_ref().expect("every request carries a SAS token");
        assert_eq!(sas.verdict, Ok(()), "request {i}");
        assert_eq!(sas.sr, format!("{}/devices/dev-1", hub.hub_name()));
        let names: Vec<&str> = r.headers.iter().map(|(n, _)| n.as_str()).collect();
        let mut expected = vec!["host", "authorization"];
        if i == 1 || i == 4 {
            expected.push("if-match");
        }
        if i < 2 {
            expected.extend(["content-type", "content-length"]);
        }
        assert_eq!(names, expected, "request {i}: only §1.2's headers");
        assert_eq!(r.header("host"), Some(hub.host().as_str()));
        if i < 2 {
            assert_eq!(r.header("content-type"), Some("application/json"));
        }
        if i == 1 || i == 4 {
            assert_eq!(r.header("if-match"), Some("*"));
        }
    }
    assert_eq!(String::from_utf8_lossy(&reqs[0].body), r#"{"moduleId":"mod-a","deviceId":"dev-1"}"#);
    assert_eq!(
        String::from_utf8_lossy(&reqs[1].body),
        format!(
            r#"{{"moduleId":"mod-a","deviceId":"dev-1","authentication":{{"symmetricKey":{{"primaryKey":"{}","secondaryKey":"{}"}},"type":"sas"}}}}"#,
            k.primary, k.secondary
        )
    );
    assert!(reqs[2].body.is_empty() && reqs[4].body.is_empty());
    assert!(hub.connections() >= 5, "one connection per request");
}

/// The audience is the hub name even when requests go to a gateway (§2.2); a token for the
/// wrong hub is refused by the mock (the test can fail).
#[test]
fn client_sas_audience_is_the_hub_name_not_the_gateway() {
    let hub = start_hub();
    hub.set_hub_name("MyHub.Azure-Devices.NET");
    let mut device = sas_device(&hub);
    let c = client(Duration::from_secs(10), 0, fast());
    let rt = rt();
    assert!(rt.block_on(c.list_modules(&device)).expect("list").is_empty());
    let r = &hub.requests()[0];
    assert_eq!(r.sas.as_ref().expect("sas").sr, "myhub.azure-devices.net/devices/dev-1", "lower-cased audience");

    device.hub_name = hub.host();
    let e = rt.block_on(c.list_modules(&device)).expect_err("wrong audience");
    assert_eq!((e.kind, e.status), (HubErrorKind::Other, Some(401)));
    assert_eq!(e.message, "ErrorCode:IotHubUnauthorizedAccess;Unauthorized");
    assert!(!e.is_network());
}

/// X.509 device auth: the client certificate (leaf + chain) is presented, no Authorization
/// header; registered by thumbprint, or by CA with CN = device ID. Another certificate → 401.
#[test]
fn client_x509_device_auth() {
    let hub = start_hub();
    let rt = rt();
    let c = client(Duration::from_secs(10), 0, fast());

    let self_signed = mock_tls::self_signed_client(DEVICE);
    hub.add_device(DEVICE, DeviceCredential::Thumbprint(self_signed.thumbprint_sha1()));
    let device = |ck: &mock_tls::CertKey, chain: Vec<openssl::x509::X509>| HubDevice {
        hub_name: hub.hub_name(),
        gateway_host: hub.host(),
        device_id: DEVICE.into(),
        auth: DeviceAuth::X509 { chain: std::iter::once(ck.cert.clone()).chain(chain).collect(), key: ck.key.clone() },
    };
    rt.block_on(c.create_module(&device(&self_signed, vec![]), "m1")).expect("create as a self-signed device");
    let r = hub.requests().pop().expect("recorded");
    assert_eq!(r.client_cert_sha256.as_deref(), Some(self_signed.thumbprint_sha256().as_str()));
    assert!(r.header("authorization").is_none() && r.sas.is_none());

    let other = mock_tls::self_signed_client(DEVICE);
    let e = rt.block_on(c.list_modules(&device(&other, vec![]))).expect_err("unregistered cert");
    assert_eq!(e.status, Some(401));

    // CA-signed: an intermediate sent as an extra chain certificate.
    let root = TestCa::new("device root");
    let intermediate = root.issue_intermediate("device intermediate");
    let leaf = intermediate.issue_client(DEVICE);
    hub.add_device(DEVICE, DeviceCredential::Ca(root.ca.cert.clone()));
    let e = rt.block_on(c.list_modules(&device(&leaf, vec![]))).expect_err("the intermediate is missing");
    assert_eq!(e.status, Some(401));
    let with_chain = device(&leaf, vec![intermediate.ca.cert.clone()]);
    assert_eq!(rt.block_on(c.list_modules(&with_chain)).expect("list").len(), 1);
    let wrong_cn = root.issue_client("another-device");
    let e = rt.block_on(c.list_modules(&device(&wrong_cn, vec![]))).expect_err("CN != device");
    assert_eq!(e.status, Some(401));
}

/// §4.3 Recommendation: a module with an auth type the spec does not list (`selfSigned`, as the
/// real hub reports X.509 modules) does not make the listing fail.
#[test]
fn client_lists_modules_with_unknown_auth_types() {
    let hub = start_hub();
    let device = sas_device(&hub);
    hub.insert_module(StoredModule {
        module_id: "x509-mod".into(),
        device_id: DEVICE.into(),
        generation_id: hub.new_generation_id(),
        etag: "e".into(),
        managed_by: Some("someone".into()),
        primary_key: None,
        secondary_key: None,
        auth_type: "selfSigned".into(),
    });
    let c = client(Duration::from_secs(10), 0, fast());
    let listed = rt().block_on(c.list_modules(&device)).expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].module_id.as_str(), listed[0].managed_by.as_deref()), ("x509-mod", Some("someone")));
}

/// A 429 with `Retry-After: 2` is retried after 2 s — not after the table's `B[1]` (set to
/// 30 s here, so waiting for the table would blow the bound).
#[test]
fn client_429_retry_after_honoured() {
    let hub = start_hub();
    let device = sas_device(&hub);
    let mut tuning = fast();
    tuning.backoff = [Duration::from_secs(30); 4];
    let c = client(Duration::from_secs(10), 1, tuning);
    hub.push_fault(Fault::throttled(Some(2)));
    let t = Instant::now();
    rt().block_on(c.list_modules(&device)).expect("the retry succeeds");
    let took = t.elapsed();
    let reqs = hub.requests();
    assert_eq!(reqs.iter().map(|r| r.status).collect::<Vec<_>>(), vec![429, 200]);
    let gap = reqs[1].at_instant - reqs[0].at_instant;
    assert!(gap >= Duration::from_secs(2), "waited only {gap:?}");
    assert!(took < Duration::from_secs(10), "took {took:?}: the table was used, not Retry-After");
}

/// Without `Retry-After` the table applies; throttling shares the attempt counter and a 429 on
/// the fifth attempt is final (§1.5 step 3), not a network error.
#[test]
fn client_429_table_and_exhaustion() {
    let hub = start_hub();
    let device = sas_device(&hub);
    let mut tuning = fast();
    tuning.backoff = [Duration::from_millis(300), Duration::from_millis(400), Duration::from_millis(500), Duration::from_millis(600)];
    let c = client(Duration::from_secs(10), 1, tuning);
    for _ in 0..5 {
        hub.push_fault(Fault::throttled(None));
    }
    let e = rt().block_on(c.list_modules(&device)).expect_err("five 429s");
    assert_eq!((e.kind, e.message.as_str()), (HubErrorKind::Throttled, "429: Too many requests"));
    assert!(!e.is_network());
    let reqs = hub.requests();
    assert_eq!(reqs.len(), 5);
    for (i, want) in [300u64, 400, 500, 600].iter().enumerate() {
        let gap = reqs[i + 1].at_instant - reqs[i].at_instant;
        assert!(gap >= Duration::from_millis(*want), "B[{}] = {want} ms, waited {gap:?}", i + 1);
    }

    // One 429 consumes the retry budget: then a failure with retries = 1 is final.
    hub.clear_requests();
    hub.push_fault(Fault::throttled(None));
    hub.push_fault(Fault::HangUp);
    let e = rt().block_on(c.list_modules(&device)).expect_err("429 then a hang-up");
    assert_eq!(hub.requests().len(), 2, "{e:?}");
}

/// §2.4 Recommendation: a token is built for every attempt. With a 2 s lifetime and a 3 s
/// `Retry-After`, the first token is expired when the retry goes out — the mock rejects expired
/// tokens (shown by replaying it), yet the retry succeeds with a fresh one.
#[test]
fn client_expired_sas_never_sent_on_retry() {
    let hub = start_hub();
    let (device, key) = sas_device_with_key(&hub);
    let mut tuning = fast();
    tuning.sas_lifetime_secs = 2;
    let c = client(Duration::from_secs(10), 1, tuning);
    hub.push_fault(Fault::throttled(Some(3)));
    rt().block_on(c.list_modules(&device)).expect("the retry succeeds");
    let reqs = hub.requests();
    assert_eq!(reqs.len(), 2);
    for r in &reqs {
        let sas = r.sas.as_ref().expect("sas");
        assert!(!sas.expired && sas.verdict.is_ok(), "{sas:?}");
    }
    let (first, second) = (reqs[0].header("authorization").expect("auth"), reqs[1].header("authorization").expect("auth"));
    assert_ne!(first, second, "a new token for the retry");
    // The first token, replayed now, is refused as expired.
    let replay = verify_sas(first, &format!("{}/devices/{DEVICE}", hub.hub_name()), &key, None);
    assert!(replay.expired && replay.verdict.is_err(), "{replay:?}");
    let status = raw_get(&hub, "/devices/dev-1/modules?api-version=2017-11-08-preview", Some(first));
    assert_eq!(status, 401, "the mock rejects the expired token");
}

/// One raw HTTPS GET to the mock with an optional Authorization header; the status.
fn raw_get(hub: &MockHub, path: &str, authorization: Option<&str>) -> u16 {
    use std::io::{Read, Write};
    let mut b = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls_client()).expect("connector");
    b.cert_store_mut().add_cert(hub.ca.ca.cert.clone()).expect("ca");
    let tcp = std::net::TcpStream::connect(("127.0.0.1", hub.port())).expect("connect");
    let mut tls = b.build().connect("localhost", tcp).expect("tls");
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n", hub.host());
    if let Some(a) = authorization {
        req.push_str(&format!("Authorization: {a}\r\n"));
    }
    req.push_str("\r\n");
    tls.write_all(req.as_bytes()).expect("write");
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out);
    String::from_utf8_lossy(&out).split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status")
}

/// §1.5 steps 1 and 4: an attempt that outlives the timeout fails as TimedOut (network) and is
/// retried after the failure pause; with no retries left it is final.
#[test]
fn client_timeout_retry_then_final() {
    let hub = start_hub();
    let device = sas_device(&hub);
    let rt = rt();
    let c = client(Duration::from_secs(1), 1, fast());
    hub.push_fault(Fault::Slow(Duration::from_secs(5)));
    let t = Instant::now();
    rt.block_on(c.list_modules(&device)).expect("the retry succeeds");
    assert!(t.elapsed() < Duration::from_secs(4), "the attempt was cut at 1 s: {:?}", t.elapsed());
    assert_eq!(hub.requests().len(), 2);

    let c = client(Duration::from_secs(1), 0, fast());
    hub.push_fault(Fault::Slow(Duration::from_secs(5)));
    let t = Instant::now();
    let e = rt.block_on(c.list_modules(&device)).expect_err("no retries");
    assert_eq!(e.kind, HubErrorKind::TimedOut);
    assert!(e.is_network());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

/// §4.5 and §1.3: a 500 with a JSON Message is network-class (no retry: it is a response), a
/// malformed body is InvalidData, a refused connection is NotConnected after retries + 1
/// attempts, DELETE wants exactly 204.
#[test]
fn client_error_classes() {
    let hub = start_hub();
    let device = sas_device(&hub);
    let rt = rt();
    let c = client(Duration::from_secs(10), 1, fast());

    hub.push_fault(Fault::server_error());
    let e = rt.block_on(c.list_modules(&device)).expect_err("500");
    assert_eq!((e.kind, e.status), (HubErrorKind::NotConnected, Some(500)));
    assert_eq!(hub.requests().len(), 1, "a response ends the retry loop");

    hub.push_fault(Fault::MalformedJson);
    let e = rt.block_on(c.get_module(&device, "nope")).expect_err("malformed");
    assert_eq!(e.kind, HubErrorKind::InvalidData);

    hub.push_fault(Fault::unauthorized());
    let e = rt.block_on(c.list_modules(&device)).expect_err("401");
    assert_eq!((e.kind, e.status), (HubErrorKind::Other, Some(401)));

    let e = rt.block_on(c.get_module(&device, "absent")).expect_err("404");
    assert!(e.is_not_found() && !e.is_network(), "{e:?}");
    assert_eq!(e.message, "ErrorCode:ModuleNotFound;mock");

    let e = rt.block_on(c.delete_module(&device, "absent")).expect_err("404 on delete");
    assert_eq!((e.status, e.message.as_str()), (Some(404), "unexpected HTTP status code: 404"));

    // Nothing listens on a port just freed.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let gone = HubDevice { gateway_host: format!("localhost:{port}"), ..device.clone() };
    let t = Instant::now();
    let e = rt.block_on(c.list_modules(&gone)).expect_err("refused");
    assert_eq!(e.kind, HubErrorKind::NotConnected, "{e:?}");
    assert!(t.elapsed() >= Duration::from_millis(100), "one failure pause before the retry");
}

/// The server certificate must verify against the system store (`SSL_CERT_FILE` here): a hub
/// whose CA is not trusted is a connect failure, never a silent success.
#[test]
fn client_rejects_an_untrusted_server() {
    shared_ca();
    let hub = MockHub::start().expect("a hub with a CA of its own");
    let device = sas_device(&hub);
    let c = client(Duration::from_secs(5), 0, fast());
    let e = rt().block_on(c.list_modules(&device)).expect_err("untrusted");
    assert_eq!(e.kind, HubErrorKind::NotConnected, "{e:?}");
    assert!(hub.requests().is_empty());
}

/// §1.4: through an HTTP proxy, a `CONNECT host:port` tunnel with Basic credentials from the
/// URI, then TLS end to end with the hub.
#[test]
fn client_through_connect_proxy() {
    let hub = start_hub();
    let device = sas_device(&hub);
    let basic = format!("Basic {}", b64(b"us@r:s3cret"));
    let proxy = ConnectProxy::start(Some(basic.clone())).expect("proxy");
    shared_ca();
    let s = HubSettings {
        timeout: Duration::from_secs(10),
        retries: 0,
        proxy: Some(format!("http://us%40r:s3cret@127.0.0.1:{}", proxy.port())),
    };
    let c = Client::with_tuning(&s, fast()).expect("client");
    assert!(c.proxy_display().is_some_and(|d| !d.contains("s3cret")), "password masked");
    rt().block_on(c.create_module(&device, "via-proxy")).expect("through the proxy");
    assert!(hub.module(DEVICE, "via-proxy").is_some());
    let connects = proxy.connects();
    assert_eq!(connects.len(), 1);
    assert_eq!(connects[0].authority, hub.host());
    assert_eq!(connects[0].proxy_authorization.as_deref(), Some(basic.as_str()));

    // Wrong credentials: the proxy refuses the tunnel → a connect failure.
    let s = HubSettings { proxy: Some(format!("http://us%40r:wrong@127.0.0.1:{}", proxy.port())), ..s };
    let c = Client::with_tuning(&s, fast()).expect("client");
    let e = rt().block_on(c.list_modules(&device)).expect_err("407");
    assert_eq!(e.kind, HubErrorKind::NotConnected, "{e:?}");
}

/// No lock across cloud I/O: eight calls, each answered after 1 s, finish together in about
/// 1 s, not 8 s one after another.
#[test]
fn client_calls_run_in_parallel() {
    let hub = start_hub();
    let device = sas_device(&hub);
    let c = Arc::new(client(Duration::from_secs(20), 0, fast()));
    for _ in 0..8 {
        hub.push_fault(Fault::Slow(Duration::from_secs(1)));
    }
    let rt = rt();
    let t = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (c, device) = (c.clone(), device.clone());
            tasks.push(tokio::spawn(async move { c.list_modules(&device).await }));
        }
        for t in tasks {
            t.await.expect("task").expect("list");
        }
    });
    let took = t.elapsed();
    assert_eq!(hub.requests().len(), 8);
    assert!(took < Duration::from_secs(4), "8 × 1 s calls took {took:?}: serialized");
}

// ---------------------------------------------------------------------------------------------
// Through the broker: the real identityd (manual SAS provisioning, device `dev1` with the
// harness's DEVICE_KEY) against the mock hub on 127.0.0.1:<port>.
// ---------------------------------------------------------------------------------------------

mod broker {
    use std::time::{Duration, Instant};

    use aziot_tests::crypto::{b64, hmac_sha256, unb64};
    use aziot_tests::identityd::{Identityd, DEVICE_ID, DEVICE_KEY, HOSTNAME, MASTER_KEY, MODULE_UID, V2021};
    use aziot_tests::mock_hub::{DeviceCredential, Fault, MockHub, StoredModule};
    use aziot_tests::require_identityd;

    const MOD_A: &str = "[[principal]]\nuid = 5101\nname = \"mod-a\"\nidtype = [\"module\"]\n";
    const MOD_C: &str = "[[principal]]\nuid = 5105\nname = \"mod-c\"\nidtype = [\"module\"]\n";

    /// identityd's config for the mock hub at `hub` (`127.0.0.1:<port>`: no DNS involved).
    fn config(hub: &str, principals: &str) -> String {
        format!(
            "hostname = \"{HOSTNAME}\"\ncloud_retries = 1\n[provisioning]\nsource = \"manual\"\niothub_hostname = \"{hub}\"\ndevice_id = \"{DEVICE_ID}\"\n[provisioning.authentication]\nmethod = \"sas\"\ndevice_id_pk = \"device-id\"\n{principals}"
        )
    }

    /// The mock hub, trusted through the shared `SSL_CERT_FILE` (passed on to the worker), with
    /// the harness's device registered under its SAS key and the hub name identityd uses.
    fn hub() -> (MockHub, String) {
        let hub = super::start_hub();
        let name = format!("127.0.0.1:{}", hub.port());
        hub.set_hub_name(&name);
        hub.add_device(DEVICE_ID, DeviceCredential::Sas(DEVICE_KEY.to_vec()));
        (hub, name)
    }

    fn wait_modules(hub: &MockHub, want: &[&str], timeout: Duration) -> bool {
        hub.wait_for(timeout, |h| h.module_ids(DEVICE_ID) == want)
    }

    /// identityd.md §8.2, computed here: HMAC-SHA256(master, "{m}:{gen}:primary|secondary").
    fn derived(module: &str, gen: &str, which: &str) -> Vec<u8> {
        hmac_sha256(&MASTER_KEY, format!("{module}:{gen}:{which}").as_bytes())
    }

    #[track_caller]
    fn assert_keys_derived(hub: &MockHub, module: &str) {
        let m = hub.module(DEVICE_ID, module).unwrap_or_else(|| panic!("{module} not in the hub"));
        assert_eq!(m.primary_key.as_deref().map(unb64), Some(derived(module, &m.generation_id, "primary")), "{module} primary");
        assert_eq!(
            m.secondary_key.as_deref().map(unb64),
            Some(derived(module, &m.generation_id, "secondary")),
            "{module} secondary"
        );
    }

    /// §12: the principals' modules are created at start with keys derived as §8.2; a module
    /// identityd does not manage is left alone; a principal added in a config.d drop-in is
    /// created, and removed again when the drop-in drops it, each within one reload.
    #[test]
    fn broker_reconciliation_follows_config_d() {
        require_identityd!();
        let (hub, name) = hub();
        hub.insert_module(StoredModule {
            module_id: "$edgeAgent".into(),
            device_id: DEVICE_ID.into(),
            generation_id: hub.new_generation_id(),
            etag: "e".into(),
            managed_by: Some("iotedge".into()),
            primary_key: None,
            secondary_key: None,
            auth_type: "selfSigned".into(),
        });
        let mut stack = Identityd::prepare(&config(&name, MOD_A));
        stack.start_identityd().unwrap_or_else(|e| panic!("identityd: {e}"));
        assert!(wait_modules(&hub, &["$edgeAgent", "mod-a"], Duration::from_secs(30)), "start: {:?}\n{}", hub.module_ids(DEVICE_ID), stack.log());
        assert!(hub.wait_for(Duration::from_secs(10), |h| h.module(DEVICE_ID, "mod-a").is_some_and(|m| m.primary_key.is_some())));
        assert_keys_derived(&hub, "mod-a");
        let gen_a = hub.module(DEVICE_ID, "mod-a").expect("mod-a").generation_id;
        for r in hub.requests() {
            let sas = r.sas.as_ref().unwrap_or_else(|| panic!("{} {} without SAS", r.method, r.target));
            assert_eq!(sas.verdict, Ok(()), "{} {}", r.method, r.target);
        }

        stack.drop_in("50-mod-c.toml", MOD_C);
        stack.reload();
        assert!(
            wait_modules(&hub, &["$edgeAgent", "mod-a", "mod-c"], Duration::from_secs(30)),
            "after adding mod-c: {:?}\n{}",
            hub.module_ids(DEVICE_ID),
            stack.log()
        );
        assert!(hub.wait_for(Duration::from_secs(10), |h| h.module(DEVICE_ID, "mod-c").is_some_and(|m| m.primary_key.is_some())));
        assert_keys_derived(&hub, "mod-c");
        assert_eq!(hub.module(DEVICE_ID, "mod-a").expect("mod-a").generation_id, gen_a, "mod-a kept, not recreated");

        stack.drop_in("50-mod-c.toml", "");
        stack.reload();
        assert!(
            wait_modules(&hub, &["$edgeAgent", "mod-a"], Duration::from_secs(30)),
            "after removing mod-c: {:?}\n{}",
            hub.module_ids(DEVICE_ID),
            stack.log()
        );
        assert_eq!(hub.module(DEVICE_ID, "$edgeAgent").expect("untouched").managed_by.as_deref(), Some("iotedge"));
    }

    /// Module identities through the API: the module principal's own identity (E1) carries the
    /// derived primary key handle, which signs exactly as the §8.2 key computed here and yields a
    /// module SAS the hub accepts; root creates, reads, lists, updates and deletes one (E4–E8).
    #[test]
    fn broker_module_identity_api() {
        require_identityd!();
        let (hub, name) = hub();
        let mut stack = Identityd::prepare(&config(&name, MOD_A));
        stack.start_identityd().unwrap_or_else(|e| panic!("identityd: {e}"));
        assert!(hub.wait_for(Duration::from_secs(30), |h| h.module(DEVICE_ID, "mod-a").is_some_and(|m| m.primary_key.is_some())));

        let module = stack.client(Some(MODULE_UID), V2021);
        let r = module.get("/identities/identity");
        assert_eq!(r.status, 200, "{r}");
        let id = r.json();
        let gen = hub.module(DEVICE_ID, "mod-a").expect("mod-a").generation_id;
        assert_eq!(id["type"], "aziot");
        assert_eq!(id["spec"]["hubName"], name.as_str());
        assert_eq!(id["spec"]["gatewayHost"], name.as_str());
        assert_eq!(id["spec"]["deviceId"], DEVICE_ID);
        assert_eq!(id["spec"]["moduleId"], "mod-a");
        assert_eq!(id["spec"]["genId"], gen.as_str());
        assert_eq!(id["spec"]["auth"]["type"], "sas");
        let handle = id["spec"]["auth"]["keyHandle"].as_str().expect("keyHandle").to_owned();
        let keyd = stack.keyd().api(aziot_tests::api::V2021);
        let msg = b"any message";
        assert_eq!(keyd.sign_hmac(&handle, msg), hmac_sha256(&derived("mod-a", &gen, "primary"), msg));
        // An agent's module token (cloud-protocols.md §2.2) with that handle validates in the hub.
        let se = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs() + 60;
        let sr = format!("{name}/devices/{DEVICE_ID}/modules/mod-a").to_lowercase();
        let sig = b64(&keyd.sign_hmac(&handle, format!("{sr}\n{se}").as_bytes()));
        let token = format!("SharedAccessSignature sr={sr}&sig={}&se={se}", sig.replace('+', "%2B").replace('/', "%2F").replace('=', "%3D"));
        assert_eq!(hub.verify_module_sas(DEVICE_ID, "mod-a", &token).verdict, Ok(()));

        let root = stack.client(None, V2021);
        let r = root.post("/identities/modules", &serde_json::json!({"type": "aziot", "moduleId": "m-new"}));
        assert_eq!(r.status, 200, "{r}");
        let created = hub.module(DEVICE_ID, "m-new").expect("created in the hub");
        assert_eq!(r.json()["spec"]["genId"], created.generation_id.as_str());
        assert_keys_derived(&hub, "m-new");

        let r = root.get("/identities/modules/m-new?type=aziot");
        assert_eq!(r.status, 200, "{r}");
        assert_eq!(r.json()["spec"]["moduleId"], "m-new");
        let r = root.get("/identities/modules?type=aziot");
        assert_eq!(r.status, 200, "{r}");
        let mut listed: Vec<String> = r.json()["identities"]
            .as_array()
            .expect("identities")
            .iter()
            .map(|i| i["spec"]["moduleId"].as_str().expect("moduleId").to_owned())
            .collect();
        listed.sort();
        assert_eq!(listed, ["m-new", "mod-a"]);

        // E7: keys re-derived from the hub's generation and uploaded again (same values).
        hub.clear_requests();
        let r = root.call("PUT", "/identities/modules/m-new?type=aziot", Some(b"{}"));
        assert_eq!(r.status, 200, "{r}");
        assert!(hub.requests().iter().any(|q| q.method == "PUT" && q.header("if-match") == Some("*")));
        assert_keys_derived(&hub, "m-new");

        let r = root.call("DELETE", "/identities/modules/m-new?type=aziot", None);
        assert_eq!(r.status, 204, "{r}");
        assert!(hub.module(DEVICE_ID, "m-new").is_none(), "deleted in the hub");
    }

    /// identityd.md §11.3 / §16: the hub down at start with a device_info backup from an earlier
    /// run → identityd starts offline and still serves the device and the module identity (from
    /// the module cache).
    #[test]
    fn broker_hub_down_at_start_serves_from_backup() {
        require_identityd!();
        let (hub, name) = hub();
        let mut stack = Identityd::prepare(&config(&name, MOD_A));
        stack.start_identityd().unwrap_or_else(|e| panic!("identityd: {e}"));
        assert!(hub.wait_for(Duration::from_secs(30), |h| h.module(DEVICE_ID, "mod-a").is_some_and(|m| m.primary_key.is_some())));
        let gen = hub.module(DEVICE_ID, "mod-a").expect("mod-a").generation_id;
        let device_info = stack.home().join("device_info");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !device_info.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(device_info.exists(), "device_info written after reconciliation\n{}", stack.log());
        stack.stop_identityd();
        drop(hub);

        stack.start_identityd().unwrap_or_else(|e| panic!("identityd with the hub down: {e}"));
        let root = stack.client(None, V2021);
        let deadline = Instant::now() + Duration::from_secs(40);
        let r = loop {
            let r = root.get("/identities/identity");
            if r.status == 200 || Instant::now() > deadline {
                break r;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(r.status, 200, "{r}\n{}", stack.log());
        assert_eq!(r.json()["spec"]["deviceId"], DEVICE_ID);
        assert_eq!(r.json()["spec"]["hubName"], name.as_str());
        let r = stack.client(Some(MODULE_UID), V2021).get("/identities/identity");
        assert_eq!(r.status, 200, "{r}\n{}", stack.log());
        assert_eq!(r.json()["spec"]["moduleId"], "mod-a");
        assert_eq!(r.json()["spec"]["genId"], gen.as_str());
        assert!(stack.log().contains("Network not available"), "the offline path was taken\n{}", stack.log());
    }

    /// X.509 device auth through the sandbox: identityd gets its identity cert issued by certd
    /// (key pair in keyd), and its hub calls present it as the TLS client certificate — the
    /// handshake signature made by keyd through the engine's in-process twin — with no
    /// Authorization header; the mock accepts it because it chains to the device CA with
    /// CN = the device ID.
    #[test]
    fn broker_x509_device_reconciles() {
        require_identityd!();
        let (hub, name) = hub();
        let x509 = format!(
            "hostname = \"{HOSTNAME}\"\ncloud_retries = 1\n[provisioning]\nsource = \"manual\"\niothub_hostname = \"{name}\"\ndevice_id = \"{DEVICE_ID}\"\n[provisioning.authentication]\nmethod = \"x509\"\nidentity_cert = \"adhoc\"\nidentity_pk = \"device-x509\"\n{MOD_A}"
        );
        let mut stack = Identityd::prepare(&x509);
        hub.add_device(DEVICE_ID, DeviceCredential::Ca(stack.ca_cert()));
        stack.start_identityd().unwrap_or_else(|e| panic!("identityd: {e}"));
        assert!(
            hub.wait_for(Duration::from_secs(30), |h| h.module(DEVICE_ID, "mod-a").is_some_and(|m| m.primary_key.is_some())),
            "{:?}\n{}",
            hub.requests().iter().map(|r| (r.method.clone(), r.status)).collect::<Vec<_>>(),
            stack.log()
        );
        assert_keys_derived(&hub, "mod-a");
        let r = aziot_tests::api::Api::new(stack.certd_socket(), "2020-09-01").get("/certificates/adhoc");
        assert_eq!(r.status, 200, "{r}");
        let leaf = openssl::x509::X509::stack_from_pem(r.json()["pem"].as_str().expect("pem").as_bytes()).expect("pem")
            .remove(0);
        let thumb = aziot_tests::mock_tls::thumbprint(&leaf, openssl::hash::MessageDigest::sha256());
        for r in hub.requests() {
            assert!(r.header("authorization").is_none(), "{} {}: no SAS with X.509", r.method, r.target);
            assert_eq!(r.client_cert_sha256.as_deref(), Some(thumb.as_str()), "{} {}", r.method, r.target);
            assert!(r.status < 300, "{} {} -> {}", r.method, r.target, r.status);
        }
    }

    /// cloud-protocols.md §1.5 with the Retry-After difference: a 429 with `Retry-After: 2` on
    /// the first hub call is retried after 2 s, well before the table's 60 s.
    #[test]
    fn broker_429_retry_after_honoured() {
        require_identityd!();
        let (hub, name) = hub();
        hub.push_fault(Fault::throttled(Some(2)));
        let mut stack = Identityd::prepare(&config(&name, MOD_A));
        let t = Instant::now();
        stack.start_identityd().unwrap_or_else(|e| panic!("identityd: {e}"));
        assert!(
            wait_modules(&hub, &["mod-a"], Duration::from_secs(40)),
            "not reconciled within 40 s (Retry-After ignored?)\n{}",
            stack.log()
        );
        assert!(t.elapsed() < Duration::from_secs(40));
        let reqs = hub.requests();
        assert_eq!(reqs[0].status, 429);
        let gap = reqs[1].at_instant - reqs[0].at_instant;
        assert!(gap >= Duration::from_secs(2) && gap < Duration::from_secs(30), "retried after {gap:?}");
        assert!(stack.log().contains("throttled"), "{}", stack.log());
    }

    /// §2.4: after a 31 s `Retry-After` the first token (30 s lifetime) has expired; the retry
    /// carries a fresh one, which the mock (rejecting expired tokens) accepts.
    #[test]
    fn broker_expired_sas_never_sent_on_retry() {
        require_identityd!();
        let (hub, name) = hub();
        hub.push_fault(Fault::throttled(Some(31)));
        let mut stack = Identityd::prepare(&config(&name, MOD_A));
        stack.start_identityd().unwrap_or_else(|e| panic!("identityd: {e}"));
        assert!(wait_modules(&hub, &["mod-a"], Duration::from_secs(70)), "{}", stack.log());
        let reqs = hub.requests();
        assert_eq!(reqs[0].status, 429);
        let first = reqs[0].sas.as_ref().expect("sas");
        assert!(
            first.expiry < reqs[1].at.duration_since(std::time::UNIX_EPOCH).expect("time").as_secs(),
            "the first token had expired by the retry"
        );
        for r in &reqs {
            let sas = r.sas.as_ref().expect("sas");
            assert!(!sas.expired && sas.verdict.is_ok(), "{} {}: {sas:?}", r.method, r.target);
        }
        assert_eq!(reqs[1].status, 200);
    }
}
