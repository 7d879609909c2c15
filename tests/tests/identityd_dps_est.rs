//! DPS X.509 with an EST-issued identity cert and its auto-renewal (identityd.md §10.2, §10.3;
//! certd.md §6), and DPS X.509 with the identity key on a PKCS#11 token (keyd's pkcs11 backend on
//! SoftHSM2). The real services through their brokers (keyd, certd, identityd), against the mock
//! EST server (tests/src/mock_est.rs) and the mock DPS with its hubs (tests/src/mock_dps.rs),
//! all over real TLS. Last, both auto-renewals (certd's own EST identity, identityd's identity
//! cert) on nothing but the configs `aziotctl config apply` writes (aziotctl.md §2.6.6, §2.6.8).

use aziot_tests::wait_for;
use std::os::unix::fs::PermissionsExt as _;
use std::sync::OnceLock;
use std::time::Duration;

use aziot_tests::api::Api;
use aziot_tests::certd::pki::certs;
use aziot_tests::identityd::{Identityd, HOSTNAME, V2021};
use aziot_tests::mock_dps::{Attestation, Enrollment, MockDps};
use aziot_tests::mock_est::{MockEst, Options, Validity};
use aziot_tests::mock_tls::{thumbprint, TestCa};
use aziot_tests::{require_identityd, Dep};
use openssl::hash::MessageDigest;
use openssl::x509::X509;
use serde_json::json;

const SCOPE: &str = "0ne00DPSEST";

/// The mock DPS's CA, exported once as `SSL_CERT_FILE` (identityd trusts the system store only,
/// cloud-protocols.md §1.1) before any service starts. Not under /tmp: identityd's worker has
/// its own empty /tmp.
fn shared_ca() -> TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(|| {
        let ca = TestCa::new("aziot identityd_dps_est test CA");
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "aziot-identityd-dps-est-ca-{}.pem",
            std::process::id()
        ));
        ca.write_cert(&path).expect("write the CA");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .expect("chmod the CA");
        std::env::set_var("SSL_CERT_FILE", &path);
        ca
    })
    .clone()
}


fn config(endpoint: &str, attestation: &str) -> String {
    format!(
        "hostname = \"{HOSTNAME}\"\ncloud_retries = 0\n[provisioning]\nsource = \"dps\"\nglobal_endpoint = \"{endpoint}\"\nscope_id = \"{SCOPE}\"\n[provisioning.attestation]\n{attestation}\n[[principal]]\nuid = 5101\nname = \"mod-a\"\nidtype = [\"module\"]\n"
    )
}

fn sha256(c: &X509) -> String {
    thumbprint(c, MessageDigest::sha256())
}

fn certd_leaf(stack: &Identityd, id: &str) -> Option<X509> {
    let r = Api::new(stack.certd_socket(), "2020-09-01").get(&format!("/certificates/{id}"));
    (r.status == 200).then(|| certs(r.json()["pem"].as_str().expect("pem")).remove(0))
}

/// The public key (DER) of keyd key pair `id`, through the engine's twin.
fn keyd_public(stack: &Identityd, id: &str) -> Vec<u8> {
    let handle = stack.keyd().api(aziot_tests::api::V2021).get_keypair(id);
    aziot_tests::certd::pki::keyd_key(stack.keyd().socket(), &handle)
        .public_key_to_der()
        .expect("der")
}

fn public(c: &X509) -> Vec<u8> {
    c.public_key()
        .expect("key")
        .public_key_to_der()
        .expect("der")
}

/// The DPS client certs (SHA-256 thumbprints) of the register requests, in order.
/// The device-id renewal as DPS and certd see it: a second registration with another cert, which
/// becomes certd's `device-id`; returns that cert.
fn renewed_registration(stack: &Identityd, dps: &MockDps, first: &str) -> X509 {
    assert!(
        wait_for(Duration::from_secs(60), || registered_with(dps).len() >= 2),
        "no re-registration after the renewal deadline\n{}",
        stack.log()
    );
    let renewed = registered_with(dps)[1].clone();
    assert_ne!(renewed, first, "re-registered with another cert");
    assert!(
        wait_for(Duration::from_secs(20), || certd_leaf(stack, "device-id").is_some_and(|c| sha256(&c) == renewed)),
        "certd's device-id is the cert DPS accepted\n{}",
        stack.log()
    );
    certd_leaf(stack, "device-id").expect("device-id")
}

fn registered_with(dps: &MockDps) -> Vec<String> {
    dps.requests()
        .into_iter()
        .filter(|r| r.target.contains("/register"))
        .filter_map(|r| r.client_cert_sha256)
        .collect()
}

/// certd issues identityd's identity cert `device-id` by EST (basic auth, `trusted_certs` the
/// mock's CA only), `device-id-temp` too (the renewal's temporary ID, §10.3 step 2).
fn est_certd(mock: &MockEst) -> String {
    format!(
        "[cert_issuance.est]\ntrusted_certs = [\"est-server-ca\"]\nusername = \"u\"\npassword = \"p\"\n[cert_issuance.est.urls]\ndefault = \"{}\"\n[cert_issuance.device-id]\nmethod = \"est\"\n[cert_issuance.device-id-temp]\nmethod = \"est\"\n",
        mock.url()
    )
}

/// DPS X.509 whose identity cert certd obtains by EST, with `identity_auto_renew`: identityd
/// creates the key pair in keyd and has certd enroll it at the mock EST server; the device
/// registers with DPS (which trusts the EST CA: a CA enrollment) presenting that cert and lands
/// on the assigned hub. The cert is short-lived (40 s, threshold 50%): identityd renews it through
/// certd (EST `simpleenroll` of `device-id-temp`, a new key pair with `rotate_key`), registers
/// again with the renewed cert, then stores it as `device-id` with the new key moved onto
/// `dev-x509`; `device-id-temp` is gone, the hub's later calls present the new cert, and E1
/// still answers with the same device.
#[test]
fn est_issued_identity_registers_and_is_renewed_with_a_new_registration() {
    require_identityd!();
    let mock = MockEst::start(Options {
        basic: Some(("u".into(), "p".into())),
        ..Options::default()
    });
    mock.set_enroll_validity(Validity {
        backdate: Duration::ZERO,
        lifetime: Duration::from_secs(40),
    });
    let dps = MockDps::start_with_ca(shared_ca(), 0, SCOPE).expect("start the mock DPS");
    let attestation = "method = \"x509\"\nidentity_cert = \"device-id\"\nidentity_pk = \"dev-x509\"\nregistration_id = \"est-dev\"\nidentity_auto_renew = { rotate_key = true, threshold = \"50%\", retry = \"10%\" }";
    let mut stack = Identityd::prepare_with(
        &config(&dps.endpoint(), attestation),
        &est_certd(&mock),
        None,
    );
    let r = Api::new(stack.certd_socket(), "2020-09-01").call(
        "PUT",
        "/certificates/est-server-ca",
        Some(&json!({ "pem": mock.ca_pem() })),
    );
    assert_eq!(r.status, 201, "import the EST CA: {r}");
    dps.enroll(
        "est-dev",
        Enrollment {
            attestation: Attestation::X509Ca(mock.ca().clone()),
            hub: dps.hub_a(),
            device_id: None,
        },
    );
    stack
        .start_identityd()
        .unwrap_or_else(|e| panic!("identityd: {e}"));

    // provisioned with the EST-issued cert
    let e1 = stack.client(None, V2021).get("/identities/identity");
    assert_eq!(e1.status, 200, "{e1}\n{}", stack.log());
    let spec = &e1.json()["spec"];
    assert_eq!(
        (spec["hubName"].as_str(), spec["deviceId"].as_str()),
        (Some(dps.hub_a().as_str()), Some("est-dev"))
    );
    assert_eq!(
        (
            spec["auth"]["type"].as_str(),
            spec["auth"]["certId"].as_str()
        ),
        (Some("x509"), Some("device-id"))
    );
    let first = registered_with(&dps);
    assert_eq!(first.len(), 1, "one registration at start");
    let enrolls = mock.requests_for("simpleenroll");
    assert!(
        !enrolls.is_empty(),
        "certd enrolled the identity cert at the EST server"
    );
    let old = certd_leaf(&stack, "device-id").expect("device-id in certd");
    assert_eq!(first[0], sha256(&old), "DPS saw the EST-issued cert");
    let old_key = keyd_public(&stack, "dev-x509");
    assert_eq!(public(&old), old_key);
    let issuer = format!("{:?}", old.issuer_name());
    assert!(issuer.contains("Mock EST CA"), "{issuer}");

    // renewal: a second registration with a new cert, then the commit
    let new = renewed_registration(&stack, &dps, &first[0]);
    assert_eq!(
        format!("{:?}", new.subject_name()),
        format!("{:?}", old.subject_name()),
        "the old leaf's subject"
    );
    assert!(
        wait_for(Duration::from_secs(10), || keyd_public(&stack, "dev-x509")
            == public(&new)),
        "the rotated key was moved onto dev-x509\n{}",
        stack.log()
    );
    assert_ne!(public(&new), old_key, "rotate_key: a new key pair");
    assert!(
        certd_leaf(&stack, "device-id-temp").is_none(),
        "the temporary cert was deleted"
    );
    assert!(
        mock.requests_for("simpleenroll").len() > enrolls.len(),
        "renewed through EST"
    );
    assert!(
        stack.log().contains("Renewed the identity cert"),
        "{}",
        stack.log()
    );

    // the device still works with the new credentials: the module identity E1 answers, and the
    // hub's calls since the renewal present the new cert (the first of them is the reprovision's
    // reconciliation)
    let hub = dps.hub(&dps.hub_a());
    assert!(
        wait_for(Duration::from_secs(20), || hub
            .module("est-dev", "mod-a")
            .is_some_and(|m| m.primary_key.is_some())),
        "mod-a in the hub\n{}",
        stack.log()
    );
    let r = stack.client(Some(5101), V2021).get("/identities/identity");
    assert_eq!(r.status, 200, "{r}\n{}", stack.log());
    let thumbs: Vec<String> = hub
        .requests()
        .into_iter()
        .filter_map(|r| r.client_cert_sha256)
        .collect();
    assert!(
        thumbs.contains(&sha256(&new)),
        "the hub saw the renewed cert: {thumbs:?}"
    );
    for r in hub.requests() {
        assert!(r.status < 300, "{} {} -> {}", r.method, r.target, r.status);
    }
    let e1 = stack.client(None, V2021).get("/identities/identity");
    assert_eq!(e1.json()["spec"]["deviceId"], "est-dev");
}

/// DPS X.509 with keyd's PKCS#11 backend (a SoftHSM2 token): identityd creates the identity key
/// pair through keyd, which keeps it on the token (its label is there); certd issues the cert
/// (local CA) for it; the TLS handshakes with DPS and the hub are signed by the token's key (the
/// engine), and the device lands on the hub DPS assigned.
#[test]
fn identity_key_on_a_pkcs11_token_provisions() {
    require_identityd!();
    aziot_tests::require!(Dep::SoftHsm);
    let dps = MockDps::start_with_ca(shared_ca(), 0, SCOPE).expect("start the mock DPS");
    let attestation = "method = \"x509\"\nidentity_cert = \"adhoc\"\nidentity_pk = \"dev-hsm\"\nregistration_id = \"hsm-dev\"";
    let mut stack = Identityd::prepare_with(
        &config(&dps.endpoint(), attestation),
        "",
        Some(aziot_tests::keyd::Backend::SoftHsm),
    );
    dps.enroll(
        "hsm-dev",
        Enrollment {
            attestation: Attestation::X509Ca(stack.ca_cert()),
            hub: dps.hub_b(),
            device_id: None,
        },
    );
    stack
        .start_identityd()
        .unwrap_or_else(|e| panic!("identityd: {e}"));
    let e1 = stack.client(None, V2021).get("/identities/identity");
    assert_eq!(e1.status, 200, "{e1}\n{}", stack.log());
    assert_eq!(e1.json()["spec"]["hubName"], dps.hub_b());
    assert_eq!(e1.json()["spec"]["deviceId"], "hsm-dev");
    let hsm = stack.keyd().softhsm().expect("keyd runs on SoftHSM2");
    let labels = hsm.labels();
    assert!(
        labels.iter().any(|l| l == "dev-hsm"),
        "the identity key pair is on the token: {labels:?}"
    );
    let leaf = certd_leaf(&stack, "adhoc").expect("identity cert");
    assert_eq!(
        public(&leaf),
        keyd_public(&stack, "dev-hsm"),
        "the cert is for the token's key"
    );
    let regs = registered_with(&dps);
    assert_eq!(
        regs,
        vec![sha256(&leaf)],
        "DPS saw that cert (TLS signed with the token's key)"
    );
    let hub = dps.hub(&dps.hub_b());
    assert!(
        wait_for(Duration::from_secs(30), || hub
            .module("hsm-dev", "mod-a")
            .is_some_and(|m| m.primary_key.is_some())),
        "mod-a in the assigned hub\n{}",
        stack.log()
    );
    assert!(hub
        .requests()
        .iter()
        .all(|r| r.client_cert_sha256.as_deref() == Some(sha256(&leaf).as_str())));
}

// ---- both auto-renewals with exactly the configs `aziotctl config apply` writes ----

/// The device of [`both_renewals_run_on_the_configs_config_apply_writes`].
const RENEW_REGISTRATION_ID: &str = "renew-dev";

fn file_uri(p: &std::path::Path) -> String {
    aziot_tests::keyd::toml_str(&format!("file://{}", p.display()))
}

/// Runs `aziotctl config apply --root <root>` on `super_config` (the root's passwd and group
/// are the system's, so the principals carry the real service users' uids) and returns the
/// generated bodies of keyd, certd and identityd, parsed.
fn config_apply(root: &std::path::Path, super_config: &str) -> [toml::Table; 3] {
    for d in [
        "etc/aziot/keyd/config.d",
        "etc/aziot/certd/config.d",
        "etc/aziot/identityd/config.d",
        "etc/aziot/tpmd/config.d",
    ] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    for f in ["etc/passwd", "etc/group"] {
        std::fs::copy(std::path::Path::new("/").join(f), root.join(f)).expect("copy passwd/group");
    }
    std::fs::write(root.join("etc/hostname"), format!("{HOSTNAME}\n")).expect("hostname");
    std::fs::write(root.join("etc/aziot/config.toml"), super_config).expect("super-config");
    let out = std::process::Command::new(aziot_tests::keyd::aziotctl_bin())
        .args(["config", "apply", "--root"])
        .arg(root)
        .output()
        .expect("run aziotctl");
    assert!(
        out.status.success(),
        "config apply: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ["keyd", "certd", "identityd"].map(|svc| {
        let path = root.join(format!("etc/aziot/{svc}/config.d/00-super.toml"));
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .parse()
            .unwrap_or_else(|e| panic!("{svc}: {e}"))
    })
}

fn strings(v: Option<&toml::Value>) -> Vec<&str> {
    v.and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|s| s.as_str()).collect())
        .unwrap_or_default()
}

/// certd renews its own EST identity `est-id` (bootstrapped with the preloaded bootstrap pair,
/// rotated through `est-id-temp`), and identityd renews the EST-issued `device-id` (through
/// certd's `device-id-temp`, keyd's `device-id-temp`), re-registering with DPS — with nothing
/// but what `config apply` generated: every principal is the generated one, so a missing grant
/// or a missing `[cert_issuance.device-id-temp]` fails the renewal.
#[test]
fn both_renewals_run_on_the_configs_config_apply_writes() {
    require_identityd!();
    let mock = MockEst::start(Options {
        basic: Some(("u".into(), "p".into())),
        require_client_cert: true,
        ..Options::default()
    });
    // every simpleenroll (est-id's bootstrap, device-id, device-id-temp) lives 40 s; est-id's
    // simplereenroll too
    let short = Validity {
        backdate: Duration::ZERO,
        lifetime: Duration::from_secs(40),
    };
    mock.set_enroll_validity(short);
    mock.set_reenroll_validity(Validity {
        backdate: Duration::ZERO,
        lifetime: Duration::from_secs(3600),
    });
    let dps = MockDps::start_with_ca(shared_ca(), 0, SCOPE).expect("start the mock DPS");

    // the operator's files: the EST server's CA, a bootstrap cert from it and its key (keyd's)
    let builder = aziot_tests::keyd::Keyd::builder();
    let secrets = builder.dir().join("secrets");
    std::fs::create_dir_all(&secrets).expect("mkdir secrets");
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let est_ca = secrets.join("est-ca.pem");
    std::fs::write(&est_ca, mock.ca_pem()).expect("write the EST CA");
    let bootstrap_key = aziot_tests::certd::pki::ec_key();
    let bootstrap = mock.sign(
        &aziot_tests::certd::pki::csr_with(&bootstrap_key, &bootstrap_key, "bootstrap", false),
        Validity::default(),
    );
    let bootstrap_cert = secrets.join("bootstrap.pem");
    std::fs::write(&bootstrap_cert, bootstrap.to_pem().expect("pem")).expect("write");
    let bootstrap_pk = secrets.join("bootstrap.key.pem");
    std::fs::write(
        &bootstrap_pk,
        bootstrap_key.private_key_to_pem_pkcs8().expect("pem"),
    )
    .expect("write");
    std::fs::set_permissions(&bootstrap_pk, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let (ks_uid, ks_gid) = aziot_tests::keyd::service_user();
    nix::unistd::chown(
        &bootstrap_pk,
        Some(nix::unistd::Uid::from_raw(ks_uid)),
        Some(nix::unistd::Gid::from_raw(ks_gid)),
    )
    .expect("chown the bootstrap key");
    for f in [&est_ca, &bootstrap_cert] {
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }

    let super_config = format!(
        r#"hostname = "{HOSTNAME}"

[provisioning]
source = "dps"
global_endpoint = {endpoint}
id_scope = "{SCOPE}"

[provisioning.attestation]
method = "x509"
registration_id = "{RENEW_REGISTRATION_ID}"

[provisioning.attestation.identity_cert]
method = "est"
common_name = "{RENEW_REGISTRATION_ID}"

[provisioning.attestation.identity_cert.auto_renew]
rotate_key = true
threshold = "50%"
retry = "10%"

[cert_issuance.est]
trusted_certs = [{ca}]

[cert_issuance.est.auth]
username = "u"
password = "p"
bootstrap_identity_cert = {bcert}
bootstrap_identity_pk = {bkey}

[cert_issuance.est.identity_auto_renew]
rotate_key = true
threshold = "50%"
retry = "10%"

[cert_issuance.est.urls]
default = {url}
"#,
        endpoint = aziot_tests::keyd::toml_str(&dps.endpoint()),
        ca = file_uri(&est_ca),
        bcert = file_uri(&bootstrap_cert),
        bkey = file_uri(&bootstrap_pk),
        url = aziot_tests::keyd::toml_str(&mock.url()),
    );
    let [mut keyd, mut certd, mut identityd] =
        config_apply(&builder.dir().join("apply-root"), &super_config);

    // what the spec says config apply writes for this (aziotctl.md §2.6.6 step 3, §2.6.8 step 1)
    let issuance = certd["cert_issuance"].as_table().expect("cert_issuance");
    assert_eq!(
        issuance.get("device-id-temp"),
        issuance.get("device-id"),
        "{issuance:?}"
    );
    let key_grants: Vec<Vec<&str>> = keyd["principal"]
        .as_array()
        .expect("keyd principals")
        .iter()
        .map(|p| strings(p.get("keys")))
        .collect();
    assert!(
        key_grants.iter().any(|k| k.contains(&"device-id-temp")),
        "{key_grants:?}"
    );
    assert!(
        key_grants.iter().any(|k| k.contains(&"est-id-temp")),
        "{key_grants:?}"
    );

    // relocation into the harness's prefix only
    keyd.remove("aziot_keys");
    certd.remove("homedir_path");
    identityd.remove("homedir");
    // identityd's DPS calls: no retries, so that a failure shows at once
    identityd.insert("cloud_retries".into(), toml::Value::Integer(0));

    dps.enroll(
        RENEW_REGISTRATION_ID,
        Enrollment {
            attestation: Attestation::X509Ca(mock.ca().clone()),
            hub: dps.hub_a(),
            device_id: None,
        },
    );
    let mut stack = Identityd::prepare_generated(
        builder,
        &keyd.to_string(),
        &certd.to_string(),
        &identityd.to_string(),
    );
    stack
        .start_identityd()
        .unwrap_or_else(|e| panic!("identityd: {e}"));

    // provisioned with the EST-issued cert, obtained with certd's bootstrapped est-id
    let e1 = stack.client(None, V2021).get("/identities/identity");
    assert_eq!(e1.status, 200, "{e1}\n{}", stack.log());
    assert_eq!(
        e1.json()["spec"]["deviceId"].as_str(),
        Some(RENEW_REGISTRATION_ID)
    );
    let first = registered_with(&dps);
    assert_eq!(first.len(), 1, "one registration at start");
    let old = certd_leaf(&stack, "device-id").expect("device-id in certd");
    assert_eq!(first[0], sha256(&old), "DPS saw the EST-issued cert");
    let old_key = keyd_public(&stack, "device-id");
    assert_eq!(public(&old), old_key);
    let old_est_id = certd_leaf(&stack, "est-id").expect("est-id bootstrapped");
    let old_est_key = keyd_public(&stack, "est-id");
    assert_eq!(public(&old_est_id), old_est_key);
    let enrolls = mock.requests_for("simpleenroll");
    assert_eq!(
        enrolls[0].client_cert.as_ref().map(sha256),
        Some(sha256(&bootstrap)),
        "est-id was bootstrapped with the preloaded bootstrap identity"
    );

    // certd renews est-id: simplereenroll with the current est-id, a new key moved from est-id-temp
    assert!(
        mock.wait_for(Duration::from_secs(60), |r| r
            .iter()
            .any(|r| r.op == "simplereenroll")),
        "certd did not renew est-id\n{}",
        std::fs::read_to_string(stack.run_dir().join("certd/certd.log")).unwrap_or_default()
    );
    let reenroll = mock.requests_for("simplereenroll").remove(0);
    assert_eq!(
        reenroll.client_cert.as_ref().map(sha256),
        Some(sha256(&old_est_id))
    );
    assert!(
        wait_for(Duration::from_secs(20), || certd_leaf(&stack, "est-id")
            .is_some_and(|c| sha256(&c) != sha256(&old_est_id)
                && public(&c) == keyd_public(&stack, "est-id"))),
        "est-id renewed and its rotated key moved onto est-id\n{}",
        std::fs::read_to_string(stack.run_dir().join("certd/certd.log")).unwrap_or_default()
    );
    assert_ne!(
        keyd_public(&stack, "est-id"),
        old_est_key,
        "est-id's key was rotated"
    );

    // identityd renews device-id: a second registration with a new cert, then the commit
    let new = renewed_registration(&stack, &dps, &first[0]);
    assert!(
        wait_for(Duration::from_secs(10), || keyd_public(&stack, "device-id")
            == public(&new)),
        "the rotated key was moved onto device-id\n{}",
        stack.log()
    );
    assert_ne!(public(&new), old_key, "rotate_key: a new key pair");
    assert_eq!(
        format!("{:?}", new.subject_name()),
        format!("{:?}", old.subject_name()),
        "the old leaf's subject"
    );
    assert!(
        certd_leaf(&stack, "device-id-temp").is_none(),
        "the temporary cert was deleted"
    );
    let e1 = stack.client(None, V2021).get("/identities/identity");
    assert_eq!(e1.status, 200, "{e1}\n{}", stack.log());
    assert_eq!(
        e1.json()["spec"]["deviceId"].as_str(),
        Some(RENEW_REGISTRATION_ID)
    );
}
