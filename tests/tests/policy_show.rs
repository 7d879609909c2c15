//! `aziotctl policy show`: each worker's environment list (policy/src/services.rs `worker_env`),
//! and certd's / identityd's config-derived grants (the EST, DPS and proxy ports, the sockets
//! they reach) when their config is present, derived as their brokers derive them.

use std::fs;
use std::path::Path;
use std::process::Command;

use aziot_tests::keyd::{aziotctl_bin, TempDir};

/// `aziotctl policy show <args>` with the services' config paths pointed into `dir` (so that
/// the host's /etc/aziot plays no part) and `env`: (exit code, stdout + stderr).
fn show(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut cmd = Command::new(aziotctl_bin());
    cmd.args(["policy", "show"])
        .args(args)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy");
    for svc in ["KEYD", "CERTD", "IDENTITYD", "TPMD"] {
        let lower = svc.to_ascii_lowercase();
        cmd.env(
            format!("AZIOT_{svc}_CONFIG"),
            dir.join(format!("{lower}.toml")),
        )
        .env(
            format!("AZIOT_{svc}_CONFIG_DIR"),
            dir.join(format!("{lower}.d")),
        )
        .env(
            format!("AZIOT_{svc}_POLICY_DIR"),
            dir.join(format!("{lower}-policy.d")),
        );
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("run aziotctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn policy_show_prints_each_worker_environment() {
    let dir = TempDir::new("policy-show-env");
    let (code, out) = show(dir.path(), &[], &[]);
    assert_eq!(code, Some(0), "{out}");
    for line in [
        "worker environment: only SOFTHSM2_CONF (each when the broker has it); nothing else",
        "worker environment: only HTTPS_PROXY, https_proxy, SSL_CERT_FILE, SSL_CERT_DIR (each when the broker has it); nothing else",
        "worker environment: only SSL_CERT_FILE, SSL_CERT_DIR (each when the broker has it); nothing else",
        "worker environment: empty (nothing of the broker's is passed on)",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    let (code, out) = show(dir.path(), &["--json"], &[]);
    assert_eq!(code, Some(0), "{out}");
    let policies: serde_json::Value = serde_json::from_str(&out).expect("json");
    let env: Vec<(String, serde_json::Value)> = policies
        .as_array()
        .expect("array")
        .iter()
        .map(|p| {
            (
                p["service"].as_str().expect("service").to_owned(),
                p["worker_env"].clone(),
            )
        })
        .collect();
    assert_eq!(
        env,
        [
            ("keyd".to_owned(), serde_json::json!(["SOFTHSM2_CONF"])),
            (
                "certd".to_owned(),
                serde_json::json!([
                    "HTTPS_PROXY",
                    "https_proxy",
                    "SSL_CERT_FILE",
                    "SSL_CERT_DIR"
                ])
            ),
            (
                "identityd".to_owned(),
                serde_json::json!(["SSL_CERT_FILE", "SSL_CERT_DIR"])
            ),
            ("tpmd".to_owned(), serde_json::json!([])),
        ]
    );
}

#[test]
fn policy_show_lists_config_derived_grants_of_certd_and_identityd() {
    let dir = TempDir::new("policy-show-grants");
    let d = dir.path();
    // no config: the built-in policy alone, and the note says so
    let (code, out) = show(d, &["certd"], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("config-derived grants: none shown (no config at"),
        "{out}"
    );
    assert!(!out.contains("[config "), "{out}");

    fs::create_dir_all(d.join("certd.d")).unwrap();
    fs::create_dir_all(d.join("identityd.d")).unwrap();
    let sock = |name: &str| format!("unix://{}", d.join(name).display());
    fs::write(
        d.join("certd.toml"),
        format!(
            "homedir_path = {:?}\n[cert_issuance.est.urls]\ndefault = \"https://est.example:8443/.well-known/est\"\n[endpoints]\naziot_keyd = {:?}\n",
            d.join("certd-home").display().to_string(),
            sock("keyd.sock")
        ),
    )
    .unwrap();
    // identityd's config entirely in a drop-in (as `config apply` writes it)
    fs::write(
        d.join("identityd.d/00-super.toml"),
        format!(
            "hostname = \"h\"\nhomedir = {:?}\n[provisioning]\nsource = \"dps\"\nglobal_endpoint = \"https://dps.example:9443/\"\nscope_id = \"0ne0001\"\n[provisioning.attestation]\nmethod = \"symmetric_key\"\nregistration_id = \"r\"\nsymmetric_key = \"device-id\"\n[endpoints]\naziot_keyd = {:?}\naziot_certd = {:?}\naziot_identityd = {:?}\naziot_tpmd = {:?}\n",
            d.join("identityd-home").display().to_string(),
            sock("keyd.sock"),
            sock("certd.sock"),
            sock("identityd.sock"),
            sock("tpmd.sock"),
        ),
    )
    .unwrap();

    let (code, out) = show(d, &["certd"], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("allow tcp connect to port 8443 [config cert_issuance.est.urls.default]"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "allow socket {}: bound back at the same path [config endpoints.aziot_keyd]",
            d.join("keyd.sock").display()
        )),
        "{out}"
    );
    assert!(
        out.contains("config-derived grants (marked \"config <key>\" above): from"),
        "{out}"
    );

    let (code, out) = show(d, &["identityd"], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("allow tcp connect to port 9443 [config provisioning.global_endpoint]"),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "allow socket {}: bound back at the same path [config endpoints.aziot_certd]",
            d.join("certd.sock").display()
        )),
        "{out}"
    );

    // with a proxy, the proxy's port instead of the servers' (as the brokers grant it)
    let proxy = [("HTTPS_PROXY", "http://127.0.0.1:3128")];
    for svc in ["certd", "identityd"] {
        let (code, out) = show(d, &[svc], &proxy);
        assert_eq!(code, Some(0), "{out}");
        assert!(
            out.contains("allow tcp connect to port 3128 [config environment HTTPS_PROXY]"),
            "{svc}: {out}"
        );
        assert!(
            !out.contains("port 8443") && !out.contains("port 9443"),
            "{svc}: {out}"
        );
    }

    // JSON: the same grants
    let (code, out) = show(d, &["certd", "--json"], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("cert_issuance.est.urls.default"), "{out}");
    let json: serde_json::Value = serde_json::from_str(&out).expect("json");
    let note = json[0]["config_grants"].as_str().unwrap_or_default();
    assert!(note.starts_with("config-derived grants (marked"), "{note}");

    // an unreadable config: the built-in policy, and the note names the error
    fs::write(d.join("certd.toml"), "homedir_path = 1\n").unwrap();
    let (code, out) = show(d, &["certd"], &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("config-derived grants: NOT shown, the config could not be read: "),
        "{out}"
    );
    assert!(!out.contains("[config "), "{out}");
}
