//! identityd behind an HTTPS proxy (cloud-protocols.md §1.4; identityd.md §7 step 4), through
//! the real broker: the proxy is the unit's environment (`HTTPS_PROXY` of the broker, as a
//! systemd `Environment=` sets it), which the BROKER reads as root, validates, turns into the
//! worker's only TCP grant besides 443/53 and hands to the worker in its config text
//! (`workers/identityd/src/lib.rs` `BROKER_TABLE`).
//!
//! The mock IoT Hub (tests/src/mock_hub.rs) listens on 127.0.0.1:<port>, the recording `CONNECT`
//! proxy of tests/src/mock_tls.rs on another port and requires Basic credentials. Needs root,
//! the service users (harness tests/src/identityd.rs).

use std::sync::OnceLock;
use std::time::Duration;

use aziot_tests::crypto::{b64, hmac_sha256, unb64};
use aziot_tests::identityd::{Identityd, DEVICE_ID, DEVICE_KEY, HOSTNAME, MASTER_KEY};
use aziot_tests::mock_hub::{DeviceCredential, MockHub};
use aziot_tests::mock_tls::{ConnectProxy, TestCa};
use aziot_tests::require_identityd;

/// The mock hub's CA, exported as `SSL_CERT_FILE` (the harness passes it on to the broker, the
/// broker to the worker) before anything starts.
fn shared_ca() -> TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(|| {
        let ca = TestCa::new("aziot identityd_proxy test CA");
        // Not under /tmp: identityd's worker has its own empty /tmp (its mount namespace).
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("aziot-identityd-proxy-ca-{}.pem", std::process::id()));
        ca.write_cert(&path).expect("write the CA");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod the CA");
        std::env::set_var("SSL_CERT_FILE", &path);
        ca
    })
    .clone()
}

const MOD_A: &str = "[[principal]]\nuid = 5101\nname = \"mod-a\"\nidtype = [\"module\"]\n";
const SECRET: &str = "s3cret-Pr0xy";

fn config(hub: &str) -> String {
    format!(
        "hostname = \"{HOSTNAME}\"\ncloud_retries = 1\n[provisioning]\nsource = \"manual\"\niothub_hostname = \"{hub}\"\ndevice_id = \"{DEVICE_ID}\"\n[provisioning.authentication]\nmethod = \"sas\"\ndevice_id_pk = \"device-id\"\n{MOD_A}"
    )
}

/// The mock hub with the harness's device; its name `127.0.0.1:<port>` (no DNS).
fn hub() -> (MockHub, String) {
    let hub = MockHub::start_with_ca(shared_ca(), 0).expect("start the mock hub");
    let name = format!("127.0.0.1:{}", hub.port());
    hub.set_hub_name(&name);
    hub.add_device(DEVICE_ID, DeviceCredential::Sas(DEVICE_KEY.to_vec()));
    (hub, name)
}

/// The effective policy the broker computes for `config` with `proxy` (the same code path:
/// `aziot_identityd::service::grants`, then the policy crate), as its digest.
fn policy_digest(stack: &Identityd, proxy: Option<&aziot_identityd::Proxy>) -> (String, Vec<u16>) {
    let text = std::fs::read_to_string(stack.config_path()).expect("read identityd's config");
    let config = aziot_identityd::config_from_text(&text).expect("identityd's config");
    let grants = aziot_identityd::service::grants(&config, proxy).expect("grants");
    let ports = grants.tcp_ports.iter().map(|g| g.port).collect();
    let policy_d = aziot_ipc::config::policy_dir("identityd");
    let policy = aziot_policy::effective("identityd", &grants, Some(&policy_d)).expect("effective policy");
    (policy.digest(), ports)
}

/// Module reconciliation reaches the hub through the proxy only: every hub connection was a
/// `CONNECT` tunnel carrying the URI's credentials (percent-decoded, Basic); the live worker's
/// policy is the one with the proxy's port and WITHOUT the hub's (status file digest); the log
/// names the proxy with its password masked and never carries the password or the Basic value.
#[test]
fn hub_reached_only_through_the_proxy_whose_credentials_are_never_logged() {
    require_identityd!();
    let (hub, name) = hub();
    let basic = format!("Basic {}", b64(format!("us@r:{SECRET}").as_bytes()));
    let proxy = ConnectProxy::start(Some(basic.clone())).expect("start the proxy");
    let uri = format!("http://us%40r:{SECRET}@127.0.0.1:{}", proxy.port());
    let mut stack = Identityd::prepare(&config(&name));
    stack.set_broker_env("HTTPS_PROXY", &uri);
    stack.start_identityd().unwrap_or_else(|e| panic!("identityd: {e}"));

    assert!(
        hub.wait_for(Duration::from_secs(40), |h| h.module(DEVICE_ID, "mod-a").is_some_and(|m| m.primary_key.is_some())),
        "mod-a not reconciled through the proxy: {:?}\n{}",
        proxy.connects(),
        stack.log()
    );
    let m = hub.module(DEVICE_ID, "mod-a").expect("mod-a");
    let derived = hmac_sha256(&MASTER_KEY, format!("mod-a:{}:primary", m.generation_id).as_bytes());
    assert_eq!(m.primary_key.as_deref().map(unb64), Some(derived), "§8.2 keys, uploaded through the tunnel");

    let connects = proxy.connects();
    assert!(!connects.is_empty(), "the proxy saw no CONNECT\n{}", stack.log());
    for c in &connects {
        assert_eq!(c.authority, name, "CONNECT to the hub's host:port");
        assert_eq!(c.proxy_authorization.as_deref(), Some(basic.as_str()), "credentials from the URI");
    }
    let direct = hub.connections();
    assert!(
        direct as usize <= connects.len(),
        "{direct} TLS connections reached the hub but only {} went through the proxy",
        connects.len()
    );
    for r in hub.requests() {
        assert_eq!(r.sas.as_ref().map(|s| s.verdict.clone()), Some(Ok(())), "{} {}", r.method, r.target);
    }

    // The live worker's policy: the proxy's port granted, the hub's not.
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(stack.status_path()).expect("status file")).expect("status json");
    let parsed = aziot_identityd::Proxy::parse(&uri).expect("proxy");
    let (with_proxy, ports) = policy_digest(&stack, Some(&parsed));
    assert_eq!(ports, vec![proxy.port()], "only the proxy's port is granted");
    let (direct_policy, direct_ports) = policy_digest(&stack, None);
    assert_eq!(direct_ports, vec![hub.port()], "without a proxy the hub's port would be granted");
    assert_ne!(with_proxy, direct_policy);
    assert_eq!(status["policy_digest"], with_proxy.as_str(), "the live worker runs the proxy's policy\n{status:#}");

    let log = stack.log();
    let masked = format!("Detected HTTPS proxy server http://us%40r:***@127.0.0.1:{}", proxy.port());
    assert!(log.contains(&masked), "the proxy is logged, password masked\n{log}");
    let basic_b64 = basic.trim_start_matches("Basic ");
    assert!(!log.contains(SECRET) && !log.contains(basic_b64), "the proxy password leaked into the log\n{log}");
    let status_text = std::fs::read_to_string(stack.status_path()).expect("status file");
    assert!(!status_text.contains(SECRET), "the password is in the status file");
}

/// §7 step 4: a proxy value that is not a usable URI stops identityd's start (the broker's
/// validation; exit non-zero), naming the variable and never quoting the value. `https_proxy`
/// (lower case) is read, and `HTTPS_PROXY` wins over it (§1.4).
#[test]
fn an_invalid_proxy_stops_the_start_without_quoting_it() {
    require_identityd!();
    let mut stack = Identityd::prepare(&config("127.0.0.1:9"));
    let mut seen = 0;
    for (var, value) in [
        ("https_proxy", format!("socks5://us3r:{SECRET}@proxy.example:1080")),
        ("HTTPS_PROXY", format!("us3r:{SECRET}@proxy.example:3128")),
    ] {
        stack.set_broker_env(var, &value);
        let (status, log) = stack.start_expecting_exit();
        let this_run = &log[seen..];
        seen = log.len();
        assert!(!status.success(), "{var}={value:?}: identityd started\n{this_run}");
        assert!(
            this_run.contains("invalid HTTPS proxy") && this_run.contains(&format!("{var}:")),
            "{var}: the reason is logged, naming the variable\n{this_run}"
        );
        assert!(!this_run.contains(SECRET), "{var}: the value leaked into the log\n{this_run}");
    }
}
