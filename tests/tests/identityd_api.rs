//! identityd through the broker (root broker + confined aziotid worker, keyd and certd beside
//! it): every endpoint E1–E10 as root, a device principal, a module principal, a local-only
//! principal, a module+local principal and an unknown uid (spec identityd.md §4.2's matrix),
//! the §2.1/§16 error rows, JSON shapes field by field, derived module keys recomputed here,
//! restart without network, reload, config errors, and the sandbox as `aziotctl policy audit`
//! sees it.

use std::time::Duration;

use aziot_tests::api::{expect_err, expect_err_prefix};
use aziot_tests::crypto::{b64, hmac_sha256};
use aziot_tests::identityd::*;
use aziot_tests::keyd::aziotctl_bin;
use aziot_tests::require_identityd;
use openssl::x509::X509;
use serde_json::{json, Value};

const GEN: &str = "638000000000000000";

/// The device identity every device-authorised caller gets (§3.1), with the handle checked
/// against keyd: it signs with the device key.
fn check_device_identity(stack: &Identityd, v: &Value) {
    let handle = v["spec"]["auth"]["keyHandle"].as_str().unwrap_or_else(|| panic!("{v}")).to_owned();
    assert_eq!(
        *v,
        json!({"type": "aziot", "spec": {"hubName": HUB, "gatewayHost": HUB, "deviceId": DEVICE_ID,
            "auth": {"type": "sas", "keyHandle": handle}}})
    );
    let sig = stack.keyd().api(aziot_tests::V2021).sign_hmac(&handle, b"message");
    assert_eq!(sig, hmac_sha256(&DEVICE_KEY, b"message"), "the handle is the device key's");
}

/// A module identity with auth (§3.1): its key handle signs with
/// HMAC-SHA256(HMAC-SHA256(master, "<m>:<gen>:primary"), msg) — the derivation of §8.2,
/// computed here independently.
fn check_module_identity(stack: &Identityd, v: &Value, module: &str) {
    let handle = v["spec"]["auth"]["keyHandle"].as_str().unwrap_or_else(|| panic!("{v}")).to_owned();
    assert_eq!(
        *v,
        json!({"type": "aziot", "spec": {"hubName": HUB, "gatewayHost": HUB, "deviceId": DEVICE_ID,
            "moduleId": module, "genId": GEN, "auth": {"type": "sas", "keyHandle": handle}}})
    );
    let module_key = hmac_sha256(&MASTER_KEY, format!("{module}:{GEN}:primary").as_bytes());
    let sig = stack.keyd().api(aziot_tests::V2021).sign_hmac(&handle, b"module message");
    assert_eq!(sig, hmac_sha256(&module_key, b"module message"));
    if module == "mod1" {
        assert_eq!(b64(&module_key), "e5k5RFQ6Yjee3H53K2bAsCEkY6NEDfZJUYPmFxlGgVM=", "the spec's vector");
    }
}

/// A local identity (§3.2, §9): key and cert match, CN, EKU, issuer, expiration.
fn check_local_identity(stack: &Identityd, v: &Value, id: &str, server: bool) {
    assert_eq!(v["type"], "local", "{v}");
    let spec = v["spec"].as_object().unwrap();
    assert_eq!(spec.len(), 2, "{v}");
    assert_eq!(spec["moduleId"], id);
    let auth = spec["auth"].as_object().unwrap();
    assert_eq!(auth.len(), 3, "{v}");
    let key_pem = auth["privateKey"].as_str().unwrap();
    assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "PKCS#8: {key_pem}");
    let key = openssl::pkey::PKey::private_key_from_pem(key_pem.as_bytes()).unwrap();
    assert_eq!(key.bits(), 2048);
    let chain = X509::stack_from_pem(auth["certificate"].as_str().unwrap().as_bytes()).unwrap();
    assert_eq!(chain.len(), 2, "leaf then the local CA");
    let leaf = &chain[0];
    assert!(leaf.public_key().unwrap().public_eq(&key));
    let ca = stack.ca_cert();
    assert!(leaf.verify(&ca.public_key().unwrap()).unwrap(), "issued by the local CA");
    let cn = leaf.subject_name().entries().next().unwrap().data().to_string().unwrap();
    assert_eq!(cn, format!("{id}.{HOSTNAME}.{DOMAIN}"));
    let text = String::from_utf8(leaf.to_text().unwrap()).unwrap();
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let eku = if server {
        "TLS Web Client Authentication, TLS Web Server Authentication"
    } else {
        "TLS Web Client Authentication"
    };
    assert!(text.contains(&format!("X509v3 Extended Key Usage: critical {eku} ")), "{text}");
    // expiration: notAfter as RFC 3339, UTC, +00:00
    let exp = auth["expiration"].as_str().unwrap();
    assert!(exp.ends_with("+00:00") && exp.len() == 25, "{exp}");
    let asn1 = openssl::asn1::Asn1Time::from_str(&format!(
        "{}{}{}{}{}{}Z",
        &exp[0..4],
        &exp[5..7],
        &exp[8..10],
        &exp[11..13],
        &exp[14..16],
        &exp[17..19]
    ))
    .unwrap();
    assert_eq!(leaf.not_after().compare(&asn1).unwrap(), std::cmp::Ordering::Equal, "{exp}");
}

fn start() -> Identityd {
    let mut stack = Identityd::prepare(&default_config(""));
    stack.seed_module("mod-a", GEN);
    stack.seed_module("mod-b", GEN);
    stack.seed_module("mod1", GEN);
    stack.start_identityd().unwrap_or_else(|e| panic!("{e}"));
    stack
}

#[test]
fn every_endpoint_for_every_caller_class() {
    require_identityd!();
    let stack = start();
    let root = stack.client(None, V2020);
    let device = stack.client(Some(DEVICE_UID), V2020);
    let module = stack.client(Some(MODULE_UID), V2020);
    let local = stack.client(Some(LOCAL_UID), V2020);
    let both = stack.client(Some(BOTH_UID), V2020);
    let unknown = stack.client(Some(UNKNOWN_UID), V2020);
    let all = [&root, &device, &module, &local, &both, &unknown];

    // E10: everyone, every version
    for c in all {
        let r = c.get("/trust-bundle");
        assert_eq!((r.status, r.json()), (200, json!({"certificate": ""})), "{r}");
    }
    // E2: no authentication at all; absent below 2021-12-01
    for c in all {
        expect_err(&c.get("/identities/provisioning"), 404, "not found");
    }
    for v in [V2021, V2022] {
        for uid in [None, Some(MODULE_UID), Some(UNKNOWN_UID)] {
            let r = stack.client(uid, v).get("/identities/provisioning");
            assert_eq!((r.status, r.json()), (200, json!({"source": "manual", "auth": "sas"})), "{r}");
        }
    }

    // E1
    for c in [&root, &device] {
        let r = c.get("/identities/identity");
        assert_eq!(r.status, 200, "{r}\n{}", stack.log());
        check_device_identity(&stack, &r.json());
    }
    let r = module.get("/identities/identity");
    assert_eq!(r.status, 200, "module principal: its hub module identity (from the cache)\n{r}\n{}", stack.log());
    check_module_identity(&stack, &r.json(), "mod-a");
    let r = both.get("/identities/identity");
    assert_eq!(r.status, 200, "{r}");
    check_module_identity(&stack, &r.json(), "mod-b");
    // a local-only principal asks the hub for module "loc-a" (§4.2 quirk, kept)
    expect_hub_unreachable(&local.get("/identities/identity"));
    expect_err(&unknown.get("/identities/identity"), 401, "authorization error");

    // E3: body required; its type is not checked
    for c in [&root, &device] {
        let r = c.post("/identities/device", &json!({"type": "local"}));
        assert_eq!(r.status, 200, "{r}");
        check_device_identity(&stack, &r.json());
    }
    expect_err(&root.call("POST", "/identities/device", None), 400, "missing request body");
    assert_eq!(root.post("/identities/device", &json!({"type": 1})).status, 422);
    for c in [&module, &local, &both, &unknown] {
        expect_err(&c.post("/identities/device", &json!({"type": "aziot"})), 401, "authorization error");
    }

    // E4: the hub is unreachable → the cache
    let r = root.get("/identities/modules?type=aziot");
    assert_eq!(r.status, 200, "{r}");
    let mut ids: Vec<Value> = r.json()["identities"].as_array().unwrap().clone();
    ids.sort_by_key(|v| v["spec"]["moduleId"].as_str().unwrap().to_owned());
    let expect: Vec<Value> = ["mod-a", "mod-b", "mod1"]
        .iter()
        .map(|m| json!({"type": "aziot", "spec": {"hubName": HUB, "gatewayHost": HUB, "deviceId": DEVICE_ID, "moduleId": m, "genId": GEN}}))
        .collect();
    assert_eq!(ids, expect, "no auth in lists");
    expect_err(
        &root.get("/identities/modules"),
        400,
        "parameter \"type\" has an invalid value\ncaused by: missing parameter",
    );
    expect_err(
        &root.get("/identities/modules?type=local"),
        400,
        "parameter \"type\" has an invalid value\ncaused by: invalid type: local",
    );
    for c in [&device, &module, &local, &both, &unknown] {
        // authorisation before parameter checks
        expect_err(&c.get("/identities/modules?type=bogus"), 401, "authorization error");
    }

    // E6
    let r = root.get("/identities/modules/mod1?type=aziot");
    assert_eq!(r.status, 200, "{r}");
    check_module_identity(&stack, &r.json(), "mod1");
    let r = module.get("/identities/modules/mod-a?type=aziot");
    assert_eq!(r.status, 200, "{r}");
    check_module_identity(&stack, &r.json(), "mod-a");
    expect_err(&module.get("/identities/modules/mod-b?type=aziot"), 401, "authorization error");
    expect_err(
        &module.get("/identities/modules/mod-a?type=local"),
        400,
        "parameter \"moduleId\" has an invalid value\ncaused by: local identity for mod-a doesn't exist",
    );
    let r = local.get("/identities/modules/loc-a?type=local");
    assert_eq!(r.status, 200, "{r}\n{}", stack.log());
    check_local_identity(&stack, &r.json(), "loc-a", false);
    let r = both.get("/identities/modules/mod-b?type=local");
    assert_eq!(r.status, 200, "{r}");
    check_local_identity(&stack, &r.json(), "mod-b", true);
    expect_hub_unreachable(&local.get("/identities/modules/loc-a?type=aziot"));
    expect_hub_unreachable(&root.get("/identities/modules/not-cached?type=aziot"));
    expect_err(
        &root.get("/identities/modules/mod1?type=x"),
        400,
        "parameter \"type\" has an invalid value\ncaused by: invalid type: x",
    );
    expect_err(
        &root.get("/identities/modules/mod1"),
        400,
        "parameter \"type\" has an invalid value\ncaused by: missing parameter",
    );
    for c in [&device, &unknown] {
        expect_err(&c.get("/identities/modules/mod-a?type=aziot"), 401, "authorization error");
    }
    expect_err(&root.get("/identities/modules/%ff?type=aziot"), 404, "not found");

    // E5
    let r = root.post(
        "/identities/modules",
        &json!({"type": "local", "moduleId": "adhoc", "localIdOpts": {"type": "x509", "attributes": "server"}}),
    );
    assert_eq!(r.status, 200, "{r}\n{}", stack.log());
    check_local_identity(&stack, &r.json(), "adhoc", true);
    // a malformed localIdOpts is ignored: a client cert
    let r = root
        .post("/identities/modules", &json!({"type": "local", "moduleId": "adhoc", "localIdOpts": {"type": "nope"}}));
    assert_eq!(r.status, 200, "{r}");
    check_local_identity(&stack, &r.json(), "adhoc", false);
    expect_err(
        &root.post("/identities/modules", &json!({"type": "local", "moduleId": "loc-a"})),
        400,
        "parameter \"moduleId\" has an invalid value\ncaused by: local identity for loc-a already exists",
    );
    expect_err(
        &root.post("/identities/modules", &json!({"type": "bogus", "moduleId": "x"})),
        400,
        "parameter \"type\" has an invalid value\ncaused by: invalid type: bogus",
    );
    expect_err(
        &root.post("/identities/modules", &json!({"type": "aziot", "moduleId": "  "})),
        400,
        "parameter \"module_id\" has an invalid value\ncaused by: module name cannot be empty",
    );
    expect_hub_unreachable(&root.post("/identities/modules", &json!({"type": "aziot", "moduleId": "new-module"})));
    assert_eq!(root.post("/identities/modules", &json!({"type": "aziot"})).status, 422);
    expect_err(&root.call("POST", "/identities/modules", None), 400, "missing request body");
    // a local identity whose certd issuance is not configured: 500
    expect_err(
        &root.post("/identities/modules", &json!({"type": "local", "moduleId": "unissued"})),
        500,
        "internal error",
    );
    for c in [&device, &module, &local, &both, &unknown] {
        expect_err(
            &c.post("/identities/modules", &json!({"type": "bogus", "moduleId": "x"})),
            401,
            "authorization error",
        );
    }

    // E7
    expect_hub_unreachable(&root.call("PUT", "/identities/modules/mod1?type=aziot", Some(b"{}")));
    assert_eq!(
        root.call("PUT", "/identities/modules/mod1?type=aziot", None).status,
        422,
        "PUT bodies are always decoded"
    );
    expect_err(
        &root.call("PUT", "/identities/modules/mod1", Some(b"{}")),
        400,
        "parameter \"type\" has an invalid value\ncaused by: missing parameter",
    );
    for c in [&device, &module, &local, &both, &unknown] {
        expect_err(&c.call("PUT", "/identities/modules/mod-a?type=aziot", Some(b"{}")), 401, "authorization error");
    }

    // E8
    expect_hub_unreachable(&root.call("DELETE", "/identities/modules/mod1?type=aziot", None));
    expect_err(
        &root.call("DELETE", "/identities/modules/mod1?type=local", None),
        400,
        "parameter \"type\" has an invalid value\ncaused by: invalid type: local",
    );
    for c in [&device, &module, &local, &both, &unknown] {
        expect_err(&c.call("DELETE", "/identities/modules/mod-a?type=aziot", None), 401, "authorization error");
    }

    // E9: root's reprovision reconciles with the (unreachable) hub; the device stays served
    for c in [&device, &module, &local, &both, &unknown] {
        expect_err(&c.post("/identities/device/reprovision", &json!({"type": "aziot"})), 401, "authorization error");
    }
    expect_hub_unreachable(&root.post("/identities/device/reprovision", &json!({})));
    let r = root.get("/identities/identity");
    assert_eq!(r.status, 200, "{r}");
    check_device_identity(&stack, &r.json());

    // framework rows
    expect_err(&root.call("DELETE", "/trust-bundle", None), 400, "method not allowed");
    expect_err(&root.get("/nope"), 404, "not found");
    let bad = Client { api: aziot_tests::Api::new(stack.socket(), "2020-09-01-preview") };
    expect_err(&bad.get("/trust-bundle"), 400, "invalid api-version \"2020-09-01-preview\"");
}

#[test]
fn none_provisioning_serves_local_identities_only() {
    require_identityd!();
    let config = format!(
        "hostname = \"{HOSTNAME}\"\n[provisioning]\nsource = \"none\"\n[localid]\ndomain = \"{DOMAIN}\"\n[[principal]]\nuid = {LOCAL_UID}\nname = \"loc-a\"\nidtype = [\"local\"]\n"
    );
    let mut stack = Identityd::prepare(&config);
    stack.start_identityd().unwrap_or_else(|e| panic!("{e}"));
    let root = stack.client(None, V2021);
    let r = root.get("/identities/provisioning");
    assert_eq!(r.json(), json!({"source": "none"}));
    for path in ["/identities/identity", "/identities/modules?type=aziot", "/identities/modules/m?type=aziot"] {
        expect_err(&root.get(path), 400, "device identity not found");
    }
    expect_err(&root.post("/identities/device", &json!({"type": "aziot"})), 400, "device identity not found");
    let r = stack.client(Some(LOCAL_UID), V2020).get("/identities/modules/loc-a?type=local");
    assert_eq!(r.status, 200, "{r}");
    check_local_identity(&stack, &r.json(), "loc-a", false);
}

#[test]
fn restart_without_network_serves_the_last_identities() {
    require_identityd!();
    let mut stack = start();
    let before = stack.client(Some(MODULE_UID), V2020).get("/identities/identity");
    assert_eq!(before.status, 200, "{before}");
    stack.stop_identityd();
    stack.start_identityd().unwrap_or_else(|e| panic!("{e}"));
    let r = stack.client(None, V2020).get("/identities/identity");
    assert_eq!(r.status, 200, "{r}");
    check_device_identity(&stack, &r.json());
    let r = stack.client(Some(MODULE_UID), V2020).get("/identities/identity");
    assert_eq!(r.status, 200, "{r}");
    check_module_identity(&stack, &r.json(), "mod-a");
    assert!(
        stack.log().contains("Network not available for Identity reconciliation. Using offline backup from last run.")
            || stack.log().contains("IoT Hub client unavailable in this build"),
        "{}",
        stack.log()
    );
}

#[test]
fn reload_applies_new_principals_and_refuses_invalid_ones() {
    require_identityd!();
    let stack = start();
    let late = stack.client(Some(5105), V2020);
    expect_err(&late.get("/identities/identity"), 401, "authorization error");
    stack.drop_in("late.toml", "[[principal]]\nuid = 5105\nname = \"late\"\nidtype = [\"device\"]\n");
    stack.reload();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = late.get("/identities/identity");
        if r.status == 200 {
            check_device_identity(&stack, &r.json());
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the new principal never took effect\n{r}\n{}", stack.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // an invalid drop-in (duplicate name): the broker refuses it, the old config stays
    stack.drop_in("dup.toml", "[[principal]]\nuid = 5106\nname = \"late\"\nidtype = [\"device\"]\n");
    stack.reload();
    assert!(stack.wait_log("duplicate module name: late", Duration::from_secs(10)), "{}", stack.log());
    assert_eq!(late.get("/identities/identity").status, 200);
    expect_err(&stack.client(Some(5106), V2020).get("/identities/identity"), 401, "authorization error");
}

#[test]
fn config_errors_stop_the_service_at_start() {
    require_identityd!();
    let cases = [
        ("cloud_timeout_sec = 69\n", "cloud_timeout_sec must be at least 70 seconds"),
        ("[[principal]]\nuid = 1\nname = \"mod-a\"\n", "duplicate module name: mod-a"),
    ];
    let mut stack = Identityd::prepare(&default_config(""));
    for (extra, message) in cases {
        let config =
            if extra.starts_with('[') { format!("{}{extra}", default_config("")) } else { default_config(extra) };
        stack.set_config(&config);
        let (status, log) = stack.start_expecting_exit();
        assert!(!status.success(), "{log}");
        assert!(log.contains(message), "{message}\n{log}");
    }
    stack.set_config(&format!(
        "hostname = \"h\"\n[provisioning]\nsource = \"dps\"\nglobal_endpoint = \"http://global.azure-devices-provisioning.net/\"\nscope_id = \"0ne00000000\"\n[provisioning.attestation]\nmethod = \"symmetric_key\"\nregistration_id = \"r\"\nsymmetric_key = \"device-id\"\n"
    ));
    let (status, log) = stack.start_expecting_exit();
    assert!(!status.success(), "{log}");
    // DPS is provisioned (tests/tests/identityd_dps.rs); an unusable DPS section stops the broker.
    assert!(log.contains("global_endpoint \"http://global.azure-devices-provisioning.net/\" must be an https:// URL"), "{log}");
}

#[test]
fn x509_manual_device_identity_is_created_through_certd() {
    require_identityd!();
    let config = format!(
        "hostname = \"{HOSTNAME}\"\ncloud_retries = 0\n[provisioning]\nsource = \"manual\"\niothub_hostname = \"{HUB}\"\ndevice_id = \"{DEVICE_ID}\"\n[provisioning.authentication]\nmethod = \"x509\"\nidentity_cert = \"adhoc\"\nidentity_pk = \"adhoc-key\"\ncsr_subject = {{ CN = \"ignored\", L = \"AQ\" }}\n[localid]\ndomain = \"{DOMAIN}\"\n"
    );
    let mut stack = Identityd::prepare(&config);
    stack.start_identityd().unwrap_or_else(|e| panic!("{e}"));
    let r = stack.client(None, V2021).get("/identities/identity");
    assert_eq!(r.status, 200, "{r}\n{}", stack.log());
    let v = r.json();
    let handle = v["spec"]["auth"]["keyHandle"].as_str().unwrap().to_owned();
    assert_eq!(
        v,
        json!({"type": "aziot", "spec": {"hubName": HUB, "gatewayHost": HUB, "deviceId": DEVICE_ID,
            "auth": {"type": "x509", "keyHandle": handle, "certId": "adhoc"}}})
    );
    assert_eq!(
        stack.client(None, V2021).get("/identities/provisioning").json(),
        json!({"source": "manual", "auth": "x509"})
    );
    // the cert certd issued: CN = device ID, other RDNs kept, key = the keyd key pair
    let pem = aziot_tests::Api::new(stack.certd_socket(), "2020-09-01").get("/certificates/adhoc").json()["pem"]
        .as_str()
        .unwrap()
        .to_owned();
    let leaf = X509::stack_from_pem(pem.as_bytes()).unwrap().remove(0);
    let subject: Vec<String> = leaf
        .subject_name()
        .entries()
        .map(|e| format!("{}={}", e.object().nid().short_name().unwrap(), e.data().to_string().unwrap()))
        .collect();
    assert!(subject.contains(&format!("CN={DEVICE_ID}")) && subject.contains(&"L=AQ".to_owned()), "{subject:?}");
    let keyd = stack.keyd().api(aziot_tests::V2021);
    let pair = keyd.get_keypair("adhoc-key");
    assert_eq!(keyd.param(&pair, "algorithm"), "RSA");
    assert_eq!(keyd.param(&handle, "rsa-modulus"), keyd.param(&pair, "rsa-modulus"));
    // the device cert ID is not a local identity ID (§9 Recommendation)
    expect_err_prefix(
        &stack.client(None, V2020).post("/identities/modules", &json!({"type": "local", "moduleId": "adhoc"})),
        400,
        "parameter \"moduleId\" has an invalid value\ncaused by: local identity ID \"adhoc\" is reserved",
    );
}

#[test]
fn worker_is_confined_and_the_audit_passes() {
    require_identityd!();
    let stack = start();
    let worker = stack.worker_pid();
    let status = std::fs::read_to_string(format!("/proc/{worker}/status")).unwrap();
    let uid = aziot_tests::certd::uid_of(SERVICE_USER);
    assert!(status.contains(&format!("Uid:\t{uid}\t{uid}\t{uid}\t{uid}")), "{status}");
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("Seccomp:\t2"), "{status}");
    let audit = std::process::Command::new(aziotctl_bin())
        .args(["policy", "audit", "--run-dir"])
        .arg(stack.run_dir())
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&audit.stdout), String::from_utf8_lossy(&audit.stderr));
    assert!(audit.status.success(), "audit:\n{text}");
    assert!(text.contains("identityd"), "the audit covers identityd:\n{text}");
    // the hub's port (9, from iothub_hostname) is granted beside the policy's 443 and 53; the
    // sibling sockets are bound into the worker's mount namespace
    let s: Value = serde_json::from_slice(&std::fs::read(stack.status_path()).unwrap()).unwrap();
    assert_eq!(s["landlock"]["tcp_connect_ports"], json!([443, 53, 9]), "{s}");
    let binds = s["mount_namespace"]["binds"].as_array().unwrap();
    assert!(binds.contains(&json!(stack.keyd().socket())) && binds.contains(&json!(stack.certd_socket())), "{s}");
}
