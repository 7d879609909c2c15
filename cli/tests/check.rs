//! `aziotctl check` against a live keyd + certd + identityd (the black-box harness of
//! aziot-tests, in a private prefix: the configs through `AZIOT_<SVC>_CONFIG[_DIR]`, the
//! sockets through their `[endpoints]`, exactly as the services find them), and against broken
//! installs: a service stopped, a config with an error, a missing certificate. The connectivity
//! checks reach local TLS servers on 127.0.0.1 (ports 5671, 443, 8883) trusted through
//! `SSL_CERT_FILE`; `host-local-time` asks a local SNTP responder. Needs root (the services
//! start as root and switch uids) and the service users.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use aziot_tests::identityd::Identityd;
use aziot_tests::mock_tls::{Handler, Request, Response, TestCa, TlsServer};
use aziot_tests::require;
use serde_json::Value;

fn deps() -> Vec<aziot_tests::Dep> {
    aziot_tests::identityd::harness_deps()
}

fn machine_hostname() -> String {
    nix::unistd::gethostname().unwrap().into_string().unwrap()
}

/// identityd's config: manual SAS provisioning with the hub at `hub`, this machine's hostname.
fn identityd_config(hub: &str, extra_top: &str) -> String {
    format!(
        "hostname = \"{}\"\ncloud_retries = 0\n{extra_top}\n[provisioning]\nsource = \"manual\"\niothub_hostname = \"{hub}\"\ndevice_id = \"dev1\"\n[provisioning.authentication]\nmethod = \"sas\"\ndevice_id_pk = \"device-id\"\n",
        machine_hostname()
    )
}

/// The environment that points aziotctl at a prefix's configs (tpmd: none, an empty config).
fn config_env(keyd_dir: &Path, identityd_config: &Path) -> Vec<(&'static str, PathBuf)> {
    let identityd_dir = identityd_config.parent().unwrap();
    vec![
        ("AZIOT_KEYD_CONFIG", keyd_dir.join("config.toml")),
        ("AZIOT_KEYD_CONFIG_DIR", keyd_dir.join("config.d")),
        ("AZIOT_CERTD_CONFIG", keyd_dir.join("certd/config.toml")),
        ("AZIOT_CERTD_CONFIG_DIR", keyd_dir.join("certd/config.d")),
        ("AZIOT_IDENTITYD_CONFIG", identityd_config.to_owned()),
        ("AZIOT_IDENTITYD_CONFIG_DIR", identityd_dir.join("config.d")),
        ("AZIOT_TPMD_CONFIG", keyd_dir.join("no-tpmd/config.toml")),
        ("AZIOT_TPMD_CONFIG_DIR", keyd_dir.join("no-tpmd/config.d")),
    ]
}

fn aziotctl(env: &[(&str, PathBuf)], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_aziotctl"))
        .args(args)
        .env_remove("NO_COLOR")
        .envs(env.iter().map(|(k, v)| (*k, v)))
        .output()
        .expect("run aziotctl")
}

/// `check -o json`: the exit code and the parsed document.
fn check_json(env: &[(&str, PathBuf)], extra: &[&str]) -> (i32, Value, String) {
    let mut args = vec!["check", "-o", "json"];
    args.extend_from_slice(extra);
    let out = aziotctl(env, &args);
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        stdout.ends_with("}\n"),
        "one JSON object and a newline\nstdout: {stdout}\nstderr: {stderr}"
    );
    let doc: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    (out.status.code().unwrap(), doc, stderr)
}

fn result<'a>(doc: &'a Value, id: &str) -> &'a str {
    doc["checks"][id]["result"]["result"]
        .as_str()
        .unwrap_or_else(|| panic!("no result for {id}: {doc:#}"))
}

fn details(doc: &Value, id: &str) -> Vec<String> {
    doc["checks"][id]["result"]["details"]
        .as_array()
        .unwrap_or_else(|| panic!("no details for {id}: {doc:#}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// Any TLS request gets 404: the checks only complete the handshake.
struct NotFound;
impl Handler for NotFound {
    fn handle(&self, _: &Request) -> Response {
        Response::new(404)
    }
}

/// A one-thread SNTP server answering with this machine's clock; its `host:port`.
fn sntp_server() -> String {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();
    std::thread::spawn(move || loop {
        let mut buf = [0u8; 48];
        let Ok((_, peer)) = socket.recv_from(&mut buf) else {
            return;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let secs = (now.as_secs() + 2_208_988_800) as u32;
        let frac = ((u64::from(now.subsec_nanos()) << 32) / 1_000_000_000) as u32;
        let mut reply = [0u8; 48];
        reply[0] = 0x1c; // version 3, mode 4 (server)
        reply[1] = 1;
        for at in [32, 40] {
            reply[at..at + 4].copy_from_slice(&secs.to_be_bytes());
            reply[at + 4..at + 8].copy_from_slice(&frac.to_be_bytes());
        }
        let _ = socket.send_to(&reply, peer);
    });
    addr.to_string()
}

/// The IoT Hub's three ports on 127.0.0.1 with a certificate for `localhost`; the CA's file.
fn hub_servers(dir: &Path) -> (Vec<TlsServer>, PathBuf) {
    let ca = TestCa::new("check test CA");
    let server = ca.issue_server(&["localhost", "127.0.0.1"]);
    let mut servers = Vec::new();
    for port in [5671, 443, 8883] {
        servers.push(
            TlsServer::start(port, &server, &[], Arc::new(NotFound)).unwrap_or_else(|e| {
                panic!("cannot listen on 127.0.0.1:{port} for the hub connectivity checks: {e}")
            }),
        );
    }
    let ca_file = dir.join("check-ca.pem");
    ca.write_cert(&ca_file).unwrap();
    (servers, ca_file)
}

/// Checks that pass on the healthy stack; the rest must be `ignored` (not applicable here).
const OK: &[&str] = &[
    "keyd-config-well-formed",
    "certd-config-well-formed",
    "tpmd-config-well-formed",
    "identityd-config-well-formed",
    "hostname",
    "aziot-version",
    "host-local-time",
    "local-ca-certificate-expiry",
    "certs-preloaded",
    "keyd-running",
    "certd-running",
    "identityd-running",
    "certs-read",
    "key-pairs-read",
    "est-server-https",
    "certs-match-private-keys",
    "sandbox-kernel",
    "sandbox-audit",
    "host-connect-iothub-amqp",
    "host-connect-iothub-https",
    "host-connect-iothub-mqtt",
];

#[test]
fn healthy_stack_passes_and_a_stopped_service_fails() {
    if !aziot_tests::require_deps(&deps()) {
        return;
    }
    let mut stack = Identityd::prepare(&identityd_config("localhost", ""));
    stack
        .start_identityd()
        .unwrap_or_else(|e| panic!("identityd: {e}"));
    let (servers, ca_file) = hub_servers(stack.keyd().dir());
    let mut env = config_env(stack.keyd().dir(), &stack.config_path());
    env.push(("SSL_CERT_FILE", ca_file));
    let ntp = sntp_server();
    let args = [
        "--expected-aziot-version",
        env!("CARGO_PKG_VERSION"),
        "--ntp-server",
        ntp.as_str(),
    ];

    let (code, doc, stderr) = check_json(&env, &args);
    for id in OK {
        assert_eq!(
            result(&doc, id),
            "ok",
            "{id}: {:#}\nstderr: {stderr}",
            doc["checks"][id]
        );
    }
    let checks = doc["checks"].as_object().unwrap();
    assert_eq!(checks.len(), 26, "every check reported (ignored ones too)");
    for (id, c) in checks {
        if !OK.contains(&id.as_str()) {
            // configs-up-to-date (no /etc/aziot/config.toml), tpmd-running (no DPS TPM), the
            // SAS identity's and EST certificates, DPS: not applicable.
            assert_eq!(c["result"]["result"], "ignored", "{id}: {c:#}");
        }
    }
    assert_eq!(code, 0, "a healthy install exits 0\n{doc:#}");
    // additional_info: the hub, the clock offset, the certificate, the top-level facts.
    assert_eq!(
        doc["checks"]["host-connect-iothub-mqtt"]["additional_info"]["port_number"],
        8883
    );
    assert_eq!(
        doc["checks"]["host-connect-iothub-mqtt"]["additional_info"]["iothub_hostname"],
        "localhost"
    );
    assert_eq!(
        doc["checks"]["host-local-time"]["additional_info"]["offset"],
        0
    );
    let ca_info =
        &doc["checks"]["local-ca-certificate-expiry"]["additional_info"]["certificate_info"];
    assert_eq!(ca_info["cert_id"], "device-ca", "{ca_info:#}");
    assert!(ca_info["not_after"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        doc["checks"]["sandbox-audit"]["additional_info"]["audited"],
        serde_json::json!(["certd", "identityd", "keyd"])
    );
    assert_eq!(doc["additional_info"]["iothub_hostname"], "localhost");
    assert_eq!(doc["additional_info"]["os"]["arch"], std::env::consts::ARCH);
    assert!(
        servers.iter().all(|s| s.connections() >= 1),
        "each hub port was contacted"
    );

    // json-stream: sections and checks as they run, no separators, one final newline.
    let out = aziotctl(
        &env,
        &[
            "check",
            "-o",
            "json-stream",
            "--expected-aziot-version",
            env!("CARGO_PKG_VERSION"),
            "--ntp-server",
            &ntp,
        ],
    );
    let stream = String::from_utf8(out.stdout).unwrap();
    assert!(stream.starts_with(r#"{"kind":"section","name":"Configuration checks"}{"kind":"check","id":"keyd-config-well-formed","#), "{stream}");
    assert!(
        stream.contains(r#"}{"kind":"section","name":"Connectivity checks"}{"#),
        "{stream}"
    );
    assert_eq!(stream.matches('\n').count(), 1);
    let tail = &stream[stream.rfind(r#"{"kind":"additional_info""#).unwrap()..];
    assert!(serde_json::from_str::<Value>(tail.trim_end()).unwrap()["now"].is_string());
    assert_eq!(out.status.code(), Some(0));

    // Text: one line per reported check, the summary.
    let out = aziotctl(
        &env,
        &[
            "check",
            "--expected-aziot-version",
            env!("CARGO_PKG_VERSION"),
            "--ntp-server",
            &ntp,
        ],
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("Configuration checks\n--------------------\n\u{221a} keyd configuration is well-formed - OK\n"), "{text}");
    assert!(
        text.contains(&format!("\n\n{} check(s) succeeded.\n", OK.len())),
        "{text}"
    );
    assert!(!text.contains("raised"), "{text}");

    // identityd stopped: its socket refuses, the check fails with the spec's message, exit 1.
    stack.stop_identityd();
    let (code, doc, _) = check_json(&env, &args);
    assert_eq!(result(&doc, "identityd-running"), "error");
    let socket = stack.socket();
    assert_eq!(
        details(&doc, "identityd-running")[0],
        format!(
            "Could not connect to identityd on unix://{}",
            socket.display()
        )
    );
    assert!(
        details(&doc, "identityd-running")[1].contains("No such file")
            || details(&doc, "identityd-running")[1].contains("refused")
    );
    assert_eq!(result(&doc, "keyd-running"), "ok");
    assert_eq!(
        result(&doc, "sandbox-audit"),
        "ok",
        "the two running services are still audited"
    );
    assert_eq!(code, 1, "a failed check exits 1");
    drop(servers);
}

/// A prefix with configs only (no services): keyd's and identityd's, certd's with `certd_extra`.
struct Configs {
    dir: aziot_tests::tempdir::TempDir,
}

impl Configs {
    fn new(name: &str, certd_extra: &str, identityd: &str) -> Configs {
        let dir = aziot_tests::tempdir::TempDir::new(name);
        let root = dir.path();
        for d in [
            "config.d",
            "certd/config.d",
            "identityd/config.d",
            "certd/home",
            "identityd/home",
        ] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(
            root.join("config.toml"),
            format!(
                "[aziot_keys]\nhomedir_path = \"{}\"\n",
                root.join("home").display()
            ),
        )
        .unwrap();
        std::fs::write(
            root.join("certd/config.toml"),
            format!(
                "homedir_path = \"{}\"\n{certd_extra}\n",
                root.join("certd/home").display()
            ),
        )
        .unwrap();
        std::fs::write(
            root.join("identityd/config.toml"),
            format!(
                "homedir = \"{}\"\n{identityd}\n",
                root.join("identityd/home").display()
            ),
        )
        .unwrap();
        Configs { dir }
    }

    fn env(&self) -> Vec<(&'static str, PathBuf)> {
        config_env(
            self.dir.path(),
            &self.dir.path().join("identityd/config.toml"),
        )
    }
}

#[test]
fn config_with_an_error_fails_its_well_formed_check() {
    require!(aziot_tests::Dep::Root);
    let configs = Configs::new("check-bad-config", "", &identityd_config("localhost", ""));
    let dropin = configs.dir.path().join("config.d/50-bad.toml");
    std::fs::write(&dropin, "max_requests = \"many\"\n").unwrap();
    let (code, doc, _) = check_json(
        &configs.env(),
        &["--dont-run", "keyd-running certd-running identityd-running"],
    );
    assert_eq!(result(&doc, "keyd-config-well-formed"), "error");
    let d = details(&doc, "keyd-config-well-formed");
    assert_eq!(d[0], "keyd's configuration file is not well-formed.");
    assert!(d[1..].iter().any(|c| c.contains("max_requests")), "{d:?}");
    assert_eq!(result(&doc, "certd-config-well-formed"), "ok");
    assert_eq!(result(&doc, "identityd-config-well-formed"), "ok");
    // keyd's config did not load: what needs it is skipped.
    assert_eq!(result(&doc, "key-pairs-read"), "skipped");
    assert_eq!(result(&doc, "keyd-running"), "ignored", "--dont-run");
    assert_eq!(code, 1);

    // A config the broker would refuse (not root's alone: group-writable) fails the same way.
    std::fs::remove_file(&dropin).unwrap();
    let main = configs.dir.path().join("identityd/config.toml");
    std::fs::set_permissions(&main, std::os::unix::fs::PermissionsExt::from_mode(0o664)).unwrap();
    let (code, doc, _) = check_json(
        &configs.env(),
        &["--dont-run", "keyd-running certd-running identityd-running"],
    );
    assert_eq!(result(&doc, "keyd-config-well-formed"), "ok");
    assert_eq!(
        details(&doc, "identityd-config-well-formed")[0],
        "identityd's configuration file is not well-formed."
    );
    assert!(
        details(&doc, "identityd-config-well-formed")[1].contains("mode 0664"),
        "{doc:#}"
    );
    assert_eq!(result(&doc, "hostname"), "skipped");
    assert_eq!(code, 1);
}

#[test]
fn missing_identity_certificate_fails_the_expiry_check() {
    require!(
        aziot_tests::Dep::Root,
        aziot_tests::Dep::ServiceUser("aziotcs")
    );
    let identityd = format!(
        "hostname = \"{}\"\n[provisioning]\nsource = \"manual\"\niothub_hostname = \"localhost\"\ndevice_id = \"dev1\"\n[provisioning.authentication]\nmethod = \"x509\"\nidentity_cert = \"device-id\"\nidentity_pk = \"device-id\"\n",
        machine_hostname()
    );
    let configs = Configs::new("check-missing-cert", "", &identityd);
    let dont = ["--dont-run", "keyd-running certd-running identityd-running host-connect-iothub-amqp host-connect-iothub-https host-connect-iothub-mqtt"];
    let (code, doc, _) = check_json(&configs.env(), &dont);
    assert_eq!(
        result(&doc, "identity-certificate-expiry"),
        "error",
        "{doc:#}"
    );
    assert_eq!(
        details(&doc, "identity-certificate-expiry"),
        ["Manual identity certificate is neither preloaded nor configured to be dynamically issued, and thus cannot be used."]
    );
    assert_eq!(
        doc["checks"]["identity-certificate-expiry"]["additional_info"]["provisioning_mode"],
        "manual-x509"
    );
    assert_eq!(code, 1);

    // Preloaded but expired: named with its date.
    let pem = expired_cert_pem();
    let file = configs.dir.path().join("device-id.pem");
    std::fs::write(&file, pem).unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    std::fs::write(
        configs.dir.path().join("certd/config.d/10-preloaded.toml"),
        format!(
            "[preloaded_certs]\ndevice-id = \"file://{}\"\n",
            file.display()
        ),
    )
    .unwrap();
    let (code, doc, _) = check_json(&configs.env(), &dont);
    let d = details(&doc, "identity-certificate-expiry");
    assert!(
        d[0].starts_with("Manual identity 'device-id' expired at 20"),
        "{d:?}"
    );
    assert!(d[0].ends_with(" UTC"), "{d:?}");
    assert!(
        details(&doc, "certs-preloaded")[0].starts_with(" 'device-id' expired at"),
        "{doc:#}"
    );
    assert_eq!(code, 1);

    // Not readable by aziotcs (0600 root): the spec's message.
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (_, doc, _) = check_json(&configs.env(), &dont);
    let d = details(&doc, "identity-certificate-expiry");
    assert!(
        d[0].starts_with(&format!(
            "{} is not readable by user aziotcs (uid ",
            file.display()
        )),
        "{d:?}"
    );
}

/// A self-signed certificate that expired two days ago.
fn expired_cert_pem() -> Vec<u8> {
    use openssl::asn1::Asn1Time;
    use openssl::ec::{EcGroup, EcKey};
    use openssl::hash::MessageDigest;
    use openssl::nid::Nid;
    use openssl::pkey::PKey;
    let key = PKey::from_ec_key(
        EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap(),
    )
    .unwrap();
    let mut name = openssl::x509::X509NameBuilder::new().unwrap();
    name.append_entry_by_nid(Nid::COMMONNAME, "dev1").unwrap();
    let name = name.build();
    let mut b = openssl::x509::X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(&name).unwrap();
    b.set_pubkey(&key).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    b.set_not_before(&Asn1Time::from_unix(now - 10 * 86400).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::from_unix(now - 2 * 86400).unwrap())
        .unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    b.build().to_pem().unwrap()
}

#[test]
fn warnings_count_as_errors_only_when_asked() {
    require!(aziot_tests::Dep::Root);
    let configs = Configs::new("check-warnings", "", &identityd_config("localhost", ""));
    let all_but_version: Vec<&str> = [
        "keyd-config-well-formed certd-config-well-formed tpmd-config-well-formed identityd-config-well-formed",
        "configs-up-to-date hostname host-local-time identity-certificate-expiry",
        "est-identity-and-bootstrap-certificate-expiry local-ca-certificate-expiry certs-preloaded",
        "keyd-running certd-running tpmd-running identityd-running certs-read key-pairs-read est-server-https",
        "certs-match-private-keys sandbox-kernel sandbox-audit host-connect-iothub-amqp host-connect-iothub-https",
        "host-connect-iothub-mqtt host-connect-dps-endpoint",
    ]
    .iter()
    .flat_map(|s| ["--dont-run", s])
    .collect();
    let mut args = all_but_version.clone();
    args.extend(["--expected-aziot-version", "9.9.9"]);
    let (code, doc, _) = check_json(&configs.env(), &args);
    assert_eq!(result(&doc, "aziot-version"), "warning");
    assert_eq!(
        details(&doc, "aziot-version"),
        [format!(
            "Installed aziot-identity-service package has version {} but 9.9.9 is the latest stable version available.\nPlease see https://aka.ms/aziot-update-runtime for update instructions.",
            env!("CARGO_PKG_VERSION")
        )]
    );
    assert!(doc["checks"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(id, _)| *id != "aziot-version")
        .all(|(_, c)| c["result"]["result"] == "ignored"));
    assert_eq!(code, 0, "a warning alone exits 0");
    args.push("--warnings-as-errors");
    let (code, doc, _) = check_json(&configs.env(), &args);
    assert_eq!(result(&doc, "aziot-version"), "error");
    assert_eq!(code, 1);
}

#[test]
fn unreadable_config_is_fatal_and_stops_the_run() {
    require!(
        aziot_tests::Dep::Root,
        aziot_tests::Dep::ServiceUser("aziotks")
    );
    let configs = Configs::new("check-fatal", "", &identityd_config("localhost", ""));
    // The config (root's, 0600) is not readable by aziotks (nor, perhaps, the prefix: the
    // read is refused either way).
    let main = configs.dir.path().join("config.toml");
    std::fs::set_permissions(&main, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let user = nix::unistd::User::from_name("aziotks").unwrap().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_aziotctl"))
        .args(["check", "-o", "json"])
        .envs(configs.env().iter().map(|(k, v)| (*k, v)))
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let doc: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout} {}", String::from_utf8_lossy(&out.stderr)));
    let checks = doc["checks"].as_object().unwrap();
    assert_eq!(
        checks["keyd-config-well-formed"]["result"]["result"], "fatal",
        "{doc:#}"
    );
    assert_eq!(
        details(&doc, "keyd-config-well-formed")[..2],
        [
            "Could not open file. You might need to run this command as root.".to_owned(),
            format!("error in file {}", main.display())
        ]
    );
    assert_eq!(
        checks.len(),
        1,
        "nothing runs after a fatal result: {doc:#}"
    );
    assert_eq!(out.status.code(), Some(1));
}

use std::os::unix::process::CommandExt as _;
