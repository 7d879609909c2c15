//! DPS provisioning (identityd.md §10, §11; cloud-protocols.md §3) against the mock DPS
//! (tests/src/mock_dps.rs, real TLS, the assigned hubs served on the same port).
//!
//! * `client_*`: identityd's DPS client (workers/identityd/src/dps/client.rs) driven directly:
//!   wire shape, SAS, group keys, polling (at once, then `Retry-After`), the bounded total time,
//!   and the error of each kind of bad cloud input.
//! * `broker_*`: the real services through their brokers (keyd, certd, identityd; tpmd on swtpm
//!   for TPM), each attestation and enrollment kind; the device lands on the hub the mock DPS
//!   assigned, and module identities created afterwards authenticate at that hub; bad cloud input
//!   on E9 leaves the previous identity and its backup in place; so does a hub that cannot be
//!   reached after a successful registration.
//!
//! Every mock shares one CA, exported once as `SSL_CERT_FILE` (the clients trust the system store
//! only, cloud-protocols.md §1.1) before any client or service is started.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use aziot_identityd::dps::client::{DpsAuth, DpsClient, DpsTuning, Registration};
use aziot_identityd::hub::transport::Authority;
use aziot_identityd::hub::{BoxFuture, HubErrorKind, SasSigner, SignError};
use aziot_tests::crypto::hmac_sha256;
use aziot_tests::mock_dps::{derive_device_key, Attestation, DpsFault, Enrollment, Group, MockDps};
use aziot_tests::mock_tls::TestCa;
use serde_json::json;

const SCOPE: &str = "0ne00DPS001";

fn shared_ca() -> TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(|| {
        let ca = TestCa::new("aziot identityd_dps test CA");
        // Not under /tmp: identityd's worker has its own empty /tmp (its mount namespace).
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("aziot-identityd-dps-ca-{}.pem", std::process::id()));
        ca.write_cert(&path).expect("write the CA");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .expect("chmod the CA");
        std::env::set_var("SSL_CERT_FILE", &path);
        ca
    })
    .clone()
}

fn start_dps() -> MockDps {
    MockDps::start_with_ca(shared_ca(), 0, SCOPE).expect("start the mock DPS")
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
/// Enrolls `id` individually with the symmetric key `key`, assigned to `hub` as `device_id`
/// (else under its registration ID).
fn enroll_sym(dps: &MockDps, id: &str, key: &[u8], hub: String, device_id: Option<&str>) {
    let attestation = Attestation::SymmetricKey(key.to_vec());
    dps.enroll(
        id,
        Enrollment {
            attestation,
            hub,
            device_id: device_id.map(Into::into),
        },
    );
}


// ---------------------------------------------------------------------------------------------
// The DPS client, directly.
// ---------------------------------------------------------------------------------------------

/// HMAC-SHA256 with a key held here (in the product keyd or tpmd signs).
struct LocalSigner(Vec<u8>);

impl SasSigner for LocalSigner {
    fn sign<'a>(&'a self, data: &'a [u8]) -> BoxFuture<'a, Result<Vec<u8>, SignError>> {
        Box::pin(async move { Ok(hmac_sha256(&self.0, data)) })
    }
}

fn tuning(max_total: Duration) -> DpsTuning {
    let ms = Duration::from_millis;
    DpsTuning {
        backoff: [ms(200); 4],
        jitter: [Duration::ZERO; 4],
        failure_delay: ms(100),
        poll_timeout: Duration::from_secs(10),
        max_total,
        ..DpsTuning::for_timeout(Duration::from_secs(70))
    }
}

fn client(max_total: Duration) -> DpsClient {
    shared_ca();
    DpsClient::with_tuning(Duration::from_secs(10), 0, None, tuning(max_total)).expect("client")
}

fn registration(dps: &MockDps, id: &str, payload: Option<serde_json::Value>) -> Registration {
    Registration {
        endpoint: Authority::parse(&format!("127.0.0.1:{}", dps.port()), 443).expect("authority"),
        scope_id: SCOPE.into(),
        registration_id: id.into(),
        payload,
    }
}

fn sas(key: &[u8]) -> DpsAuth {
    DpsAuth::Sas(Arc::new(LocalSigner(key.to_vec())))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// §3.1–§3.3: the register PUT and the status poll, each with exactly the spec's path,
/// api-version, headers and compact body and a valid `skn=registration` SAS; the first poll is
/// sent at once (the original waits 5 s); the custom allocation payload goes up and comes back;
/// the device is assigned to the hub the enrollment names.
#[test]
fn client_symmetric_key_registers_with_the_wire_shape() {
    let dps = start_dps();
    let key = aziot_tests::crypto::random(32);
    enroll_sym(&dps, "dev-sym", &key, dps.hub_b(), Some("device-7"));
    let c = client(Duration::from_secs(30));
    let payload = json!({"modelId": "dtmi:x;1", "n": [1, 2]});
    let t = Instant::now();
    let a = rt()
        .block_on(c.register(
            &registration(&dps, "dev-sym", Some(payload.clone())),
            &sas(&key),
        ))
        .expect("register");
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}: a fixed wait before the first poll?",
        t.elapsed()
    );
    assert_eq!(
        (a.assigned_hub.as_str(), a.device_id.as_str()),
        (dps.hub_b().as_str(), "device-7")
    );
    assert_eq!(a.payload, Some(json!({"received": payload})));
    let reqs = dps.requests();
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(
        (reqs[0].method.as_str(), reqs[0].target.as_str()),
        (
            "PUT",
            "/0ne00DPS001/registrations/dev-sym/register?api-version=2021-06-01"
        )
    );
    assert_eq!(
        String::from_utf8_lossy(&reqs[0].body),
        format!(r#"{{"registrationId":"dev-sym","payload":{payload}}}"#)
    );
    let names: Vec<&str> = reqs[0].headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["host", "authorization", "content-type", "content-length"]
    );
    assert!(reqs[1].is_poll() && reqs[1].target.ends_with("?api-version=2021-06-01"));
    let names: Vec<&str> = reqs[1].headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["host", "authorization"], "a poll has no body");
    for r in &reqs {
        let s = r.sas.as_ref().expect("SAS checked");
        assert_eq!(s.verdict, Ok(()), "{} {}", r.method, r.target);
        assert_eq!(
            s.sr, "0ne00dps001/registrations/dev-sym",
            "lower-cased audience"
        );
        assert!(r
            .header("authorization")
            .expect("auth")
            .ends_with("&skn=registration"));
    }
    // The hub now knows the device by the same key.
    assert!(dps.hub(&dps.hub_b()).requests().is_empty());
}

/// §3.6: with a group enrollment the device signs with HMAC-SHA256(groupKey, registrationId);
/// the group key itself, or another device's derived key, is refused (401).
#[test]
fn client_group_enrollment_uses_the_derived_key() {
    let dps = start_dps();
    let group = aziot_tests::crypto::random(32);
    dps.enroll_group(Group::SymmetricKey {
        group_key: group.clone(),
        hub: dps.hub_a(),
    });
    let c = client(Duration::from_secs(30));
    let rt = rt();
    let a = rt
        .block_on(c.register(
            &registration(&dps, "grp-1", None),
            &sas(&derive_device_key(&group, "grp-1")),
        ))
        .expect("register");
    assert_eq!(
        (a.assigned_hub.as_str(), a.device_id.as_str()),
        (dps.hub_a().as_str(), "grp-1")
    );
    assert_eq!(
        String::from_utf8_lossy(&dps.requests()[0].body),
        r#"{"registrationId":"grp-1"}"#
    );
    for wrong in [group.clone(), derive_device_key(&group, "grp-2")] {
        let e = rt
            .block_on(c.register(&registration(&dps, "grp-1", None), &sas(&wrong)))
            .expect_err("wrong key");
        assert_eq!((e.kind, e.status), (HubErrorKind::Other, Some(401)));
        assert_eq!(
            e.message,
            "DPS answered HTTP error 401 Unauthorized: Unauthorized (code 401002)"
        );
    }
}

/// Polling: `assigning` twice with `Retry-After: 1` → three polls, the first at once, the next
/// ones ≥ 1 s apart, each with a fresh token.
#[test]
fn client_polls_at_once_then_honours_retry_after() {
    let dps = start_dps();
    let key = aziot_tests::crypto::random(32);
    enroll_sym(&dps, "dev-poll", &key, dps.hub_a(), None);
    dps.set_assigning_polls(2, Some(1));
    let c = client(Duration::from_secs(30));
    rt().block_on(c.register(&registration(&dps, "dev-poll", None), &sas(&key)))
        .expect("register");
    let reqs = dps.requests();
    let statuses: Vec<u16> = reqs.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [202, 202, 202, 200]);
    assert!(
        reqs[1].at - reqs[0].at < Duration::from_millis(900),
        "first poll at once: {:?}",
        reqs[1].at - reqs[0].at
    );
    for i in 2..4 {
        let gap = reqs[i].at - reqs[i - 1].at;
        assert!(
            gap >= Duration::from_secs(1) && gap < Duration::from_secs(4),
            "poll {i} after {gap:?}"
        );
    }
    assert!(reqs
        .iter()
        .all(|r| r.sas.as_ref().is_some_and(|s| s.verdict.is_ok())));
}

/// The whole registration is bounded: a DPS that answers `assigning` forever ends in a clear
/// error once the bound passes (the original polls forever).
#[test]
fn client_total_time_is_bounded() {
    let dps = start_dps();
    let key = aziot_tests::crypto::random(32);
    enroll_sym(&dps, "dev-slow", &key, dps.hub_a(), None);
    dps.set_assigning_polls(1000, Some(1));
    let c = client(Duration::from_millis(2500));
    let t = Instant::now();
    let e = rt()
        .block_on(c.register(&registration(&dps, "dev-slow", None), &sas(&key)))
        .expect_err("never assigned");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(e.message, "DPS registration did not complete within 2.5 s");
    assert_eq!(e.kind, HubErrorKind::TimedOut);
    assert!(dps.requests().len() >= 3, "it did poll");
}

/// Each kind of bad cloud input ends the registration with an error naming its cause:
/// a wrong key (401), throttling past the fifth attempt (429 with `Retry-After`, honoured), a
/// `failed` status, malformed JSON, a DPS 500 (network-class).
#[test]
fn client_bad_cloud_input_errors() {
    let dps = start_dps();
    let key = aziot_tests::crypto::random(32);
    enroll_sym(&dps, "dev-bad", &key, dps.hub_a(), None);
    let c = client(Duration::from_secs(30));
    let rt = rt();
    let reg = registration(&dps, "dev-bad", None);

    let e = rt
        .block_on(c.register(&reg, &sas(&[9u8; 32])))
        .expect_err("wrong key");
    assert_eq!(
        e.message,
        "DPS answered HTTP error 401 Unauthorized: Unauthorized (code 401002)"
    );
    assert!(!e.is_network());

    dps.clear_requests();
    for _ in 0..5 {
        dps.push_fault(DpsFault::throttled(Some(1)));
    }
    let e = rt
        .block_on(c.register(&reg, &sas(&key)))
        .expect_err("throttled");
    assert_eq!((e.kind, e.status), (HubErrorKind::Throttled, Some(429)));
    assert_eq!(
        e.message,
        "DPS throttled the request 5 times (429 Too Many Requests)"
    );
    let reqs = dps.requests();
    assert_eq!(reqs.len(), 5);
    for w in reqs.windows(2) {
        let gap = w[1].at - w[0].at;
        assert!(
            gap >= Duration::from_secs(1) && gap < Duration::from_secs(10),
            "Retry-After: 1 honoured: {gap:?}"
        );
    }

    dps.fail_next(400209, "Custom allocation failed");
    let e = rt
        .block_on(c.register(&reg, &sas(&key)))
        .expect_err("failed");
    assert_eq!(
        e.message,
        "DPS registration failed: Custom allocation failed (code 400209)"
    );

    dps.push_fault(DpsFault::MalformedJson);
    let e = rt
        .block_on(c.register(&reg, &sas(&key)))
        .expect_err("malformed");
    assert_eq!(e.kind, HubErrorKind::InvalidData);
    assert!(
        e.message
            .starts_with("DPS answered 202 Accepted with a body that is not valid JSON"),
        "{}",
        e.message
    );

    dps.push_fault(DpsFault::server_error());
    let e = rt.block_on(c.register(&reg, &sas(&key))).expect_err("500");
    assert_eq!(e.message, "DPS answered HTTP error 500 Internal Server Error: Internal server error (mock) (code 500000)");
    assert!(e.is_network(), "a DPS 500 is network-class");

    // And the mock was not left in a bad state: the same registration succeeds.
    rt.block_on(c.register(&reg, &sas(&key))).expect("register");
}

/// A DPS whose certificate does not chain to a trusted CA: the TLS handshake fails, and the
/// error says so (network-class: nothing was learnt from that server).
#[test]
fn client_rejects_an_untrusted_server() {
    shared_ca();
    let rogue = TestCa::new("not trusted");
    let dps = MockDps::start_with_ca(rogue, 0, SCOPE).expect("start");
    let key = aziot_tests::crypto::random(32);
    enroll_sym(&dps, "dev-tls", &key, dps.hub_a(), None);
    let e = rt()
        .block_on(
            client(Duration::from_secs(30))
                .register(&registration(&dps, "dev-tls", None), &sas(&key)),
        )
        .expect_err("untrusted");
    assert_eq!(e.kind, HubErrorKind::NotConnected);
    assert!(
        e.message.contains("TLS handshake with 127.0.0.1 failed")
            && e.message.contains("certificate verify failed"),
        "{}",
        e.message
    );
    assert!(
        dps.requests().is_empty(),
        "no request reached the untrusted server"
    );
}

// ---------------------------------------------------------------------------------------------
// Through the brokers.
// ---------------------------------------------------------------------------------------------

mod broker {
    use std::path::Path;
    use std::time::Duration;

    use aziot_tests::crypto::{b64, hmac_sha256};
    use aziot_tests::identityd::{Identityd, DEVICE_KEY, HOSTNAME, MASTER_KEY, MODULE_UID, V2021};
    use aziot_tests::mock_dps::{
        derive_device_key, Attestation, DpsFault, Enrollment, Group, MockDps,
    };
    use aziot_tests::mock_hub::HubState;
    use aziot_tests::mock_tls::TestCa;
    use aziot_tests::tpmd::{Swtpm, Tpmd};
    use aziot_tests::{require_identityd, Dep};
    use serde_json::json;

    use super::{enroll_sym, shared_ca, start_dps, SCOPE};
    use aziot_tests::wait_for;

    const MOD_A: &str = "[[principal]]\nuid = 5101\nname = \"mod-a\"\nidtype = [\"module\"]\n";

    /// identityd's config: DPS at `endpoint` with `attestation` (the lines of
    /// `[provisioning.attestation]`), `provisioning_extra` lines in `[provisioning]`, principal
    /// mod-a.
    fn config(endpoint: &str, attestation: &str, provisioning_extra: &str) -> String {
        format!(
            "hostname = \"{HOSTNAME}\"\ncloud_retries = 0\n[provisioning]\nsource = \"dps\"\nglobal_endpoint = \"{endpoint}\"\nscope_id = \"{SCOPE}\"\n{provisioning_extra}[provisioning.attestation]\n{attestation}\n{MOD_A}"
        )
    }

    fn sym(registration_id: &str, key_id: &str) -> String {
        format!("method = \"symmetric_key\"\nregistration_id = \"{registration_id}\"\nsymmetric_key = \"{key_id}\"")
    }

    fn module_ready(hub: &HubState, device: &str) -> bool {
        hub.module(device, "mod-a")
            .is_some_and(|m| m.primary_key.is_some())
    }

    /// identityd.md §8.2 computed here.
    fn derived(module: &str, gen: &str, which: &str) -> Vec<u8> {
        hmac_sha256(&MASTER_KEY, format!("{module}:{gen}:{which}").as_bytes())
    }

    /// E1 as root: the device identity (waits for startup provisioning).
    fn device_identity(stack: &Identityd) -> serde_json::Value {
        let r = stack.client(None, V2021).get("/identities/identity");
        assert_eq!(r.status, 200, "{r}\n{}", stack.log());
        r.json()
    }

    /// The device landed on `hub` as `device`: E1 says so, mod-a exists there with keys derived
    /// as §8.2, and the module principal's identity yields a module SAS that hub accepts.
    #[track_caller]
    fn assert_landed(
        stack: &Identityd,
        dps: &MockDps,
        hub_name: &str,
        device: &str,
        auth_type: &str,
    ) {
        let hub = dps.hub(hub_name);
        assert!(
            wait_for(Duration::from_secs(40), || module_ready(&hub, device)),
            "mod-a not created in {hub_name}\n{}",
            stack.log()
        );
        for other in dps.hub_names().into_iter().filter(|n| n != hub_name) {
            assert!(
                dps.hub(&other).requests().is_empty(),
                "nothing went to the other hub {other}"
            );
        }
        let id = device_identity(stack);
        assert_eq!(id["spec"]["hubName"], hub_name);
        assert_eq!(id["spec"]["gatewayHost"], hub_name);
        assert_eq!(id["spec"]["deviceId"], device);
        assert_eq!(id["spec"]["auth"]["type"], auth_type);
        let m = hub.module(device, "mod-a").expect("mod-a");
        assert_eq!(
            m.primary_key.as_deref().map(aziot_tests::crypto::unb64),
            Some(derived("mod-a", &m.generation_id, "primary"))
        );
        for r in hub.requests() {
            assert!(r.status < 300, "{} {} -> {}", r.method, r.target, r.status);
            if let Some(s) = &r.sas {
                assert_eq!(s.verdict, Ok(()), "{} {}", r.method, r.target);
            }
        }
        // A module principal's identity, and an agent's token made with its handle, valid in
        // the assigned hub.
        let r = stack
            .client(Some(MODULE_UID), V2021)
            .get("/identities/identity");
        assert_eq!(r.status, 200, "{r}\n{}", stack.log());
        let spec = &r.json()["spec"];
        assert_eq!(
            (spec["hubName"].as_str(), spec["moduleId"].as_str()),
            (Some(hub_name), Some("mod-a"))
        );
        let handle = spec["auth"]["keyHandle"]
            .as_str()
            .expect("keyHandle")
            .to_owned();
        let keyd = stack.keyd().api(aziot_tests::api::V2021);
        let se = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("time")
            .as_secs()
            + 60;
        let sr = format!("{hub_name}/devices/{device}/modules/mod-a").to_lowercase();
        let sig = b64(&keyd.sign_hmac(&handle, format!("{sr}\n{se}").as_bytes()));
        let token = format!(
            "SharedAccessSignature sr={sr}&sig={}&se={se}",
            sig.replace('+', "%2B")
                .replace('/', "%2F")
                .replace('=', "%3D")
        );
        assert_eq!(
            hub.verify_module_sas(device, "mod-a", &token).verdict,
            Ok(())
        );
    }

    fn wait_device_info(stack: &Identityd) -> String {
        let path = stack.home().join("device_info");
        assert!(
            wait_for(Duration::from_secs(30), || path.exists()),
            "device_info written\n{}",
            stack.log()
        );
        std::fs::read_to_string(path).expect("device_info")
    }

    fn write_root_file(path: &Path, text: &str) {
        std::fs::write(path, text).expect("write");
    }

    /// Symmetric key, individual enrollment, with a custom allocation payload: the device
    /// registers (SAS signed in keyd with `device-id`), lands on the hub the enrollment names
    /// (not the other one on that port), creates its module there. E2 shows the DPS settings
    /// and the payload. A restart uses the `device_info` backup without calling DPS; a change of
    /// the provisioning config invalidates it and the next start registers again.
    #[test]
    fn broker_symmetric_key_individual_lands_on_the_assigned_hub() {
        require_identityd!();
        let dps = start_dps();
        enroll_sym(
            &dps,
            "dev-sym",
            &DEVICE_KEY,
            dps.hub_b(),
            Some("sym-device"),
        );
        let mut stack = Identityd::prepare("");
        let payload_path = stack.run_dir().join("dps-payload.json");
        write_root_file(&payload_path, r#"{"modelId": "dtmi:aziot:test;1"}"#);
        let payload_line = format!(
            "payload = {{ uri = \"file://{}\" }}\n",
            payload_path.display()
        );
        stack.set_config(&config(
            &dps.endpoint(),
            &sym("dev-sym", "device-id"),
            &payload_line,
        ));
        stack
            .start_identityd()
            .unwrap_or_else(|e| panic!("identityd: {e}"));
        assert_landed(&stack, &dps, &dps.hub_b(), "sym-device", "sas");
        let reqs = dps.requests();
        assert_eq!(
            reqs[0].json()["payload"],
            json!({"modelId": "dtmi:aziot:test;1"}),
            "the payload went up"
        );
        assert!(
            stack
                .log()
                .contains("DPS returned a custom allocation payload"),
            "{}",
            stack.log()
        );
        let r = stack.client(None, V2021).get("/identities/provisioning");
        assert_eq!(r.status, 200, "{r}");
        assert_eq!(
            r.json(),
            json!({"source": "dps", "auth": "symmetric_key", "endpoint": dps.endpoint(), "scope_id": SCOPE, "registration_id": "dev-sym", "payload": {"modelId": "dtmi:aziot:test;1"}})
        );
        let info = wait_device_info(&stack);
        assert!(
            info.contains(&format!("hub_name = \"{}\"", dps.hub_b()))
                && info.contains("device_id = \"sym-device\""),
            "{info}"
        );

        // Restart: the backup, no DPS call.
        stack.stop_identityd();
        dps.clear_requests();
        stack
            .start_identityd()
            .unwrap_or_else(|e| panic!("identityd: {e}"));
        assert_eq!(device_identity(&stack)["spec"]["deviceId"], "sym-device");
        assert!(dps.requests().is_empty(), "started from the backup");
        assert!(
            stack
                .log()
                .contains("Provisioned with backup for sym-device."),
            "{}",
            stack.log()
        );

        // Another provisioning config (another registration, another hub): the backup is not
        // used; the next start registers and lands on the new hub.
        stack.stop_identityd();
        enroll_sym(&dps, "dev-sym-2", &DEVICE_KEY, dps.hub_a(), None);
        stack.set_config(&config(&dps.endpoint(), &sym("dev-sym-2", "device-id"), ""));
        stack
            .start_identityd()
            .unwrap_or_else(|e| panic!("identityd: {e}"));
        let hub_a = dps.hub(&dps.hub_a());
        assert!(
            wait_for(Duration::from_secs(40), || module_ready(
                &hub_a,
                "dev-sym-2"
            )),
            "{}",
            stack.log()
        );
        assert_eq!(
            device_identity(&stack)["spec"]["hubName"],
            dps.hub_a().as_str()
        );
        assert!(dps
            .requests()
            .iter()
            .any(|r| r.target.contains("/registrations/dev-sym-2/register")));
    }

    /// Symmetric key, group enrollment: keyd holds the per-device key derived from the group key
    /// (§3.6); DPS accepts it and assigns; the hub knows the device by that derived key.
    #[test]
    fn broker_symmetric_key_group_enrollment() {
        require_identityd!();
        let dps = start_dps();
        let group = aziot_tests::crypto::random(32);
        dps.enroll_group(Group::SymmetricKey {
            group_key: group.clone(),
            hub: dps.hub_a(),
        });
        let stack_config = config(&dps.endpoint(), &sym("grp-dev-1", "dps-derived"), "");
        let mut stack = Identityd::prepare(&stack_config);
        stack
            .keyd()
            .api(aziot_tests::api::V2021)
            .import_key("dps-derived", &derive_device_key(&group, "grp-dev-1"));
        stack
            .start_identityd()
            .unwrap_or_else(|e| panic!("identityd: {e}"));
        assert_landed(&stack, &dps, &dps.hub_a(), "grp-dev-1", "sas");
    }

    /// X.509, certd-issued: identityd creates the key pair in keyd and has certd issue the
    /// identity cert (CN = the configured registration ID, local CA); the DPS register, the polls
    /// and every hub call present it as the TLS client certificate (signature by keyd through the
    /// engine's twin), no Authorization header; DPS (X.509 CA enrollment) and the hub accept it.
    #[test]
    fn broker_x509_certd_issued_identity() {
        require_identityd!();
        let dps = start_dps();
        let attestation = "method = \"x509\"\nidentity_cert = \"adhoc\"\nidentity_pk = \"device-x509\"\nregistration_id = { CN = \"x509-dev\", O = \"aziot tests\" }";
        let mut stack = Identityd::prepare(&config(&dps.endpoint(), attestation, ""));
        dps.enroll(
            "x509-dev",
            Enrollment {
                attestation: Attestation::X509Ca(stack.ca_cert()),
                hub: dps.hub_b(),
                device_id: None,
            },
        );
        stack
            .start_identityd()
            .unwrap_or_else(|e| panic!("identityd: {e}"));
        assert_landed(&stack, &dps, &dps.hub_b(), "x509-dev", "x509");
        let r = aziot_tests::api::Api::new(stack.certd_socket(), "2020-09-01")
            .get("/certificates/adhoc");
        assert_eq!(r.status, 200, "{r}");
        let leaf = aziot_tests::certd::pki::certs(r.json()["pem"].as_str().expect("pem")).remove(0);
        let subject = format!("{:?}", leaf.subject_name());
        assert!(
            subject.contains("x509-dev") && subject.contains("aziot tests"),
            "{subject}"
        );
        let thumb =
            aziot_tests::mock_tls::thumbprint(&leaf, openssl::hash::MessageDigest::sha256());
        for r in dps.requests() {
            assert!(
                r.header("authorization").is_none(),
                "{} {}: no SAS with X.509",
                r.method,
                r.target
            );
            assert_eq!(r.client_cert_sha256.as_deref(), Some(thumb.as_str()));
        }
        let id = device_identity(&stack);
        assert_eq!(id["spec"]["auth"]["certId"], "adhoc");
    }

    /// X.509 with an identity cert that already exists (as a preloaded one does): no
    /// registration ID configured, so the certificate's CN is the registration ID; DPS knows the
    /// device by its thumbprint (individual enrollment).
    #[test]
    fn broker_x509_existing_identity_cert() {
        require_identityd!();
        let dps = start_dps();
        let attestation =
            "method = \"x509\"\nidentity_cert = \"mod-b\"\nidentity_pk = \"pre-x509\"";
        let mut stack = Identityd::prepare(&config(&dps.endpoint(), attestation, ""));
        let kapi = stack.keyd().api(aziot_tests::api::V2021);
        let handle = aziot_tests::api::handle_of(
            &kapi.post(
                "/keypair",
                &json!({"keyId": "pre-x509", "preferredAlgorithms": "ec-p256"}),
            ),
            "create the identity key pair",
        );
        let key = aziot_tests::certd::pki::keyd_key(stack.keyd().socket(), &handle);
        let csr = String::from_utf8(
            aziot_tests::certd::pki::csr_with(&key, &key, "pre-dev", false)
                .to_pem()
                .expect("pem"),
        )
        .expect("utf8");
        let r = aziot_tests::api::Api::new(stack.certd_socket(), "2020-09-01")
            .post("/certificates", &json!({"certId": "mod-b", "csr": csr}));
        assert_eq!(r.status, 201, "{r}");
        let leaf = aziot_tests::certd::pki::certs(r.json()["pem"].as_str().expect("pem")).remove(0);
        dps.enroll(
            "pre-dev",
            Enrollment {
                attestation: Attestation::X509Thumbprint(leaf_thumb(&leaf)),
                hub: dps.hub_a(),
                device_id: None,
            },
        );
        stack
            .start_identityd()
            .unwrap_or_else(|e| panic!("identityd: {e}"));
        assert_landed(&stack, &dps, &dps.hub_a(), "pre-dev", "x509");
        assert!(dps.requests()[0]
            .target
            .contains("/registrations/pre-dev/register"));
        let r = stack.client(None, V2021).get("/identities/provisioning");
        assert_eq!(
            r.json()["registration_id"],
            "pre-dev",
            "the CN of the identity cert"
        );
    }

    fn leaf_thumb(leaf: &openssl::x509::X509) -> String {
        aziot_tests::mock_tls::thumbprint(leaf, openssl::hash::MessageDigest::sha1())
    }

    /// TPM attestation through tpmd on swtpm: round 1 carries the EK and SRK tpmd read from the
    /// TPM and no Authorization; DPS answers 401 with an activation blob (built from them as
    /// cloud-protocols.md §5.3) for K1, which tpmd imports; round 2 and the polls are signed by the
    /// TPM with K1; the assignment carries a blob for K2, imported too, and the hub (which knows
    /// the device by K2 only) accepts every call identityd makes: signed in the TPM by the key
    /// imported last. E1 says `tpm`, with no handle.
    #[test]
    fn broker_tpm_attestation() {
        require_identityd!();
        aziot_tests::require!(Dep::ServiceUser("aziottpm"), Dep::Swtpm);
        let dps = start_dps();
        dps.enroll(
            "tpm-dev",
            Enrollment {
                attestation: Attestation::Tpm(None),
                hub: dps.hub_b(),
                device_id: Some("tpm-device".into()),
            },
        );
        let mut stack = Identityd::prepare(&config(
            &dps.endpoint(),
            "method = \"tpm\"\nregistration_id = \"tpm-dev\"",
            "",
        ));
        let tpmd_dir = stack.tpmd_dir();
        std::fs::create_dir_all(&tpmd_dir).expect("mkdir tpmd");
        std::fs::set_permissions(
            &tpmd_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let swtpm = Swtpm::start(&tpmd_dir);
        let tpmd = Tpmd::start(&tpmd_dir, &swtpm.tcti(), "info");
        assert_eq!(tpmd.socket(), stack.tpmd_socket());
        stack
            .start_identityd()
            .unwrap_or_else(|e| panic!("identityd: {e}"));
        assert_landed(&stack, &dps, &dps.hub_b(), "tpm-device", "tpm");
        let id = device_identity(&stack);
        assert!(id["spec"]["auth"].get("keyHandle").is_none(), "{id}");
        let reqs = dps.requests();
        assert_eq!(reqs[0].status, 401, "round 1 is the challenge");
        assert!(reqs[0].header("authorization").is_none());
        let body = reqs[0].json();
        assert!(
            body["tpm"]["endorsementKey"]
                .as_str()
                .is_some_and(|k| !k.is_empty()),
            "{body}"
        );
        assert!(
            body["tpm"]["storageRootKey"]
                .as_str()
                .is_some_and(|k| !k.is_empty()),
            "{body}"
        );
        assert_eq!(reqs[1].status, 202);
        assert!(
            reqs[1].json().get("tpm").is_none(),
            "round 2 does not send the keys again"
        );
        for r in &reqs[1..] {
            assert_eq!(
                r.sas.as_ref().map(|s| s.verdict.clone()),
                Some(Ok(())),
                "{} {}: signed by K1 in the TPM",
                r.method,
                r.target
            );
        }
        assert_eq!(
            dps.tpm_keys().len(),
            2,
            "K1 (challenge) and K2 (assignment)"
        );
        assert!(
            stack
                .log()
                .matches("Imported DPS authentication key into TPM.")
                .count()
                >= 2,
            "{}",
            stack.log()
        );
        drop(stack);
        drop(tpmd);
        drop(swtpm);
    }

    /// Bad cloud input on E9 (reprovision): a wrong key (401), throttling past the fifth attempt
    /// (429 with Retry-After), a `failed` status, malformed JSON, then a DPS whose certificate is
    /// not trusted: each time E9 fails with 404 `DPS client error` and a cause that names the
    /// problem, the `device_info` backup is byte-for-byte what it was, and the service keeps
    /// serving the device and module identities it had.
    #[test]
    fn broker_bad_cloud_input_keeps_the_previous_identity() {
        require_identityd!();
        let dps = start_dps();
        let port = dps.port();
        enroll_sym(&dps, "dev-bad", &DEVICE_KEY, dps.hub_a(), None);
        let mut stack =
            Identityd::prepare(&config(&dps.endpoint(), &sym("dev-bad", "device-id"), ""));
        stack
            .start_identityd()
            .unwrap_or_else(|e| panic!("identityd: {e}"));
        assert_landed(&stack, &dps, &dps.hub_a(), "dev-bad", "sas");
        let backup = wait_device_info(&stack);
        let root = stack.client(None, V2021);

        let still_serving = |stack: &Identityd| {
            assert_eq!(
                std::fs::read_to_string(stack.home().join("device_info")).expect("device_info"),
                backup,
                "backup intact"
            );
            let id = device_identity(stack);
            assert_eq!(
                (
                    id["spec"]["hubName"].as_str(),
                    id["spec"]["deviceId"].as_str()
                ),
                (Some(dps.hub_a().as_str()), Some("dev-bad"))
            );
            let r = stack
                .client(Some(MODULE_UID), V2021)
                .get("/identities/identity");
            assert_eq!(r.status, 200, "the module identity is still served\n{r}");
        };
        let reprovision_fails_with = |cause: &str| {
            let r = root.post("/identities/device/reprovision", &json!({"type": "aziot"}));
            assert_eq!(r.status, 404, "{r}");
            let m = r.message();
            assert!(
                m.starts_with("DPS client error\ncaused by: ") && m.contains(cause),
                "expected {cause:?} in\n{m}"
            );
        };

        // 401: DPS now holds another key for this registration.
        enroll_sym(&dps, "dev-bad", &[1; 32], dps.hub_a(), None);
        reprovision_fails_with(
            "DPS answered HTTP error 401 Unauthorized: Unauthorized (code 401002)",
        );
        still_serving(&stack);
        enroll_sym(&dps, "dev-bad", &DEVICE_KEY, dps.hub_a(), None);

        for _ in 0..5 {
            dps.push_fault(DpsFault::throttled(Some(1)));
        }
        reprovision_fails_with("DPS throttled the request 5 times (429 Too Many Requests)");
        still_serving(&stack);

        dps.fail_next(400209, "Custom allocation failed");
        reprovision_fails_with("DPS registration failed: Custom allocation failed (code 400209)");
        still_serving(&stack);

        dps.push_fault(DpsFault::MalformedJson);
        reprovision_fails_with("DPS answered 202 Accepted with a body that is not valid JSON");
        still_serving(&stack);

        // An untrusted server on the same (granted) port.
        drop(dps);
        let rogue = MockDps::start_with_ca(TestCa::new("not trusted"), port, SCOPE)
            .expect("rogue DPS on the same port");
        enroll_sym(&rogue, "dev-bad", &DEVICE_KEY, rogue.hub_a(), None);
        let r = root.post("/identities/device/reprovision", &json!({}));
        assert_eq!(r.status, 404, "{r}");
        assert!(
            r.message().contains("certificate verify failed"),
            "{}",
            r.message()
        );
        assert!(rogue.requests().is_empty());
        assert_eq!(
            std::fs::read_to_string(stack.home().join("device_info")).expect("device_info"),
            backup
        );
        let id = device_identity(&stack);
        assert_eq!(id["spec"]["deviceId"], "dev-bad");
    }

    /// E9 while the hub DPS assigns cannot be reached: DPS answers (the registration itself
    /// succeeds), reconciliation with the new hub fails, and identityd keeps the old identity,
    /// its backup and its module identities (quirk 8 made atomic). A later E9 with the hub
    /// reachable again succeeds and recreates the modules as upstream's E9 does.
    #[test]
    fn broker_reprovision_with_the_hub_unreachable_keeps_the_old_identity() {
        require_identityd!();
        let dps = start_dps();
        enroll_sym(&dps, "dev-re", &DEVICE_KEY, dps.hub_a(), None);
        let mut stack =
            Identityd::prepare(&config(&dps.endpoint(), &sym("dev-re", "device-id"), ""));
        stack
            .start_identityd()
            .unwrap_or_else(|e| panic!("identityd: {e}"));
        assert_landed(&stack, &dps, &dps.hub_a(), "dev-re", "sas");
        let backup = wait_device_info(&stack);
        let gen = dps
            .hub(&dps.hub_a())
            .module("dev-re", "mod-a")
            .expect("mod-a")
            .generation_id;

        // A hub nothing serves (the discard port).
        dps.add_hub("127.0.0.1:9");
        enroll_sym(&dps, "dev-re", &DEVICE_KEY, "127.0.0.1:9".to_owned(), None);
        let root = stack.client(None, V2021);
        let r = root.post("/identities/device/reprovision", &json!({}));
        assert_eq!(r.status, 404, "{r}");
        assert!(
            r.message().starts_with("Hub client error"),
            "{}",
            r.message()
        );
        assert!(
            stack.log().contains("Assigned to IoT hub: 127.0.0.1:9"),
            "DPS did assign\n{}",
            stack.log()
        );
        assert_eq!(
            std::fs::read_to_string(stack.home().join("device_info")).expect("device_info"),
            backup
        );
        let id = device_identity(&stack);
        assert_eq!(
            id["spec"]["hubName"],
            dps.hub_a().as_str(),
            "the old identity stays"
        );
        let r = stack
            .client(Some(MODULE_UID), V2021)
            .get("/identities/identity");
        assert_eq!(r.status, 200, "{r}");
        assert_eq!(r.json()["spec"]["genId"], gen.as_str());

        // Reachable again: E9 succeeds (upstream's E9 recreates the configured modules).
        enroll_sym(&dps, "dev-re", &DEVICE_KEY, dps.hub_a(), None);
        let r = root.post("/identities/device/reprovision", &json!({}));
        assert_eq!(r.status, 204, "{r}\n{}", stack.log());
        let m = dps
            .hub(&dps.hub_a())
            .module("dev-re", "mod-a")
            .expect("mod-a");
        assert_ne!(m.generation_id, gen, "recreated");
        assert!(m.primary_key.is_some());
    }

    /// At start, with no backup, a DPS that refuses the device: the worker exits 1 logging
    /// upstream's message and the cause; identityd is not serving a device it does not have.
    #[test]
    fn broker_startup_without_backup_names_the_cause() {
        require_identityd!();
        let dps = start_dps();
        enroll_sym(&dps, "dev-401", &[3; 32], dps.hub_a(), None);
        let mut stack =
            Identityd::prepare(&config(&dps.endpoint(), &sym("dev-401", "device-id"), ""));
        let _ = shared_ca();
        stack
            .start_identityd()
            .unwrap_or_else(|e| panic!("identityd: {e}"));
        assert!(
            stack.wait_log("Failed to provision with IoT Hub, and no valid device backup was found: DPS client error", Duration::from_secs(30)),
            "{}",
            stack.log()
        );
        assert!(
            stack
                .log()
                .contains("DPS answered HTTP error 401 Unauthorized: Unauthorized (code 401002)"),
            "{}",
            stack.log()
        );
        assert!(!stack.home().join("device_info").exists());
    }
}
