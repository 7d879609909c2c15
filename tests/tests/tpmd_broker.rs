//! tpmd through the real topology: the root broker opens the TPM (here a connection to a
//! fresh swtpm) and hands the descriptor to the worker, which runs as aziottpm, confined,
//! and never opens a path or a socket itself.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aziot_tests::http::{build_request, Conn};
use aziot_tests::keyd::{aziotctl_bin, aziotd_bin, exchange_as, TempDir};
use aziot_tests::tpmd::{Kill, Swtpm};

#[test]
fn tpmd_serves_from_a_confined_worker_on_a_handed_over_tpm() {
    let dir = TempDir::new("tpmd-broker");
    let root = dir.path();
    let swtpm = Swtpm::start(root);
    let port = swtpm.port;
    let sock = root.join("tpmd.sock");
    std::fs::write(
        root.join("config.toml"),
        format!("tcti = \"swtpm:host=127.0.0.1,port={port}\"\n[endpoints]\naziot_tpmd = \"unix://{}\"\n", sock.display()),
    )
    .unwrap();
    let log = std::fs::File::create(root.join("tpmd.log")).unwrap();
    let broker = Kill(
        Command::new(aziotd_bin())
            .arg("aziot-tpmd")
            .env_clear()
            .env("AZIOT_TPMD_CONFIG", root.join("config.toml"))
            .env("AZIOT_TPMD_CONFIG_DIR", root.join("config.d"))
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let log_text = || std::fs::read_to_string(root.join("tpmd.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !root.join("tpmd.status").exists() {
        assert!(Instant::now() < deadline, "tpmd did not start:\n{}", log_text());
        std::thread::sleep(Duration::from_millis(20));
    }

    // The API answers as the spec says, from the worker.
    let mut conn = Conn::connect(&sock).unwrap();
    let r = conn.request("GET", "/get_tpm_keys?api-version=2020-09-01", None).unwrap();
    assert_eq!(r.status, 200, "{r}\n{}", log_text());
    let keys = r.json();
    for field in ["endorsement_key", "storage_root_key"] {
        let v = keys[field].as_str().unwrap_or_else(|| panic!("{field} in {keys}"));
        assert!(v.len() > 100, "{field}: {v}");
    }
    // Only root and aziotid may call tpmd (a difference from the original, which lets anyone
    // who reaches the socket in): uid 4242 is refused.
    nix::unistd::chown(&sock, None, Some(nix::unistd::Gid::from_raw(aziot_tests::keyd::TEST_GID))).unwrap();
    let refused = exchange_as(4242, &sock, &build_request("GET", "/get_tpm_keys?api-version=2020-09-01", None)).unwrap();
    assert_eq!(refused.status, 401, "{refused}");

    // The worker is aziottpm, without capabilities, under seccomp; the audit agrees.
    let status: serde_json::Value = serde_json::from_slice(&std::fs::read(root.join("tpmd.status")).unwrap()).unwrap();
    let worker = status["worker_pid"].as_i64().unwrap();
    let proc_status = std::fs::read_to_string(format!("/proc/{worker}/status")).unwrap();
    let user = nix::unistd::User::from_name("aziottpm").unwrap().expect("user aziottpm");
    assert!(proc_status.contains(&format!("Uid:\t{0}\t{0}\t{0}\t{0}", user.uid)), "{proc_status}");
    assert!(proc_status.contains("CapEff:\t0000000000000000"), "{proc_status}");
    assert!(proc_status.contains("Seccomp:\t2"), "{proc_status}");
    let audit = Command::new(aziotctl_bin()).args(["policy", "audit", "--run-dir"]).arg(root).output().unwrap();
    assert!(
        audit.status.success(),
        "audit:\n{}{}",
        String::from_utf8_lossy(&audit.stdout),
        String::from_utf8_lossy(&audit.stderr)
    );
    drop(broker);
    drop(swtpm);
}

#[test]
fn auth_key_imported_through_the_broker_signs_and_persists_in_the_tpm() {
    use aziot_tests::tpmd::{Swtpm, Tpmd};
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;

    let dir = TempDir::new("tpmd-auth-key");
    let root = dir.path();
    let swtpm = Swtpm::start(root);
    let mut tpmd = Tpmd::start(root, &swtpm.tcti(), "info");
    let sock = tpmd.socket();
    let request = |method: &str, path: &str, body: serde_json::Value| {
        let mut conn = Conn::connect(&sock).unwrap();
        let body = (!body.is_null()).then(|| body.to_string().into_bytes());
        conn.request(method, &format!("{path}?api-version=2020-09-01"), body.as_deref())
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", tpmd.log()))
    };

    let r = request("GET", "/get_tpm_keys", serde_json::Value::Null);
    assert_eq!(r.status, 200, "{r}\n{}", tpmd.log());
    let keys = r.json();
    let ek = STANDARD.decode(keys["endorsement_key"].as_str().unwrap()).unwrap();
    let srk = STANDARD.decode(keys["storage_root_key"].as_str().unwrap()).unwrap();

    // the blob a DPS would send for this TPM, carrying k1
    let k1 = aziot_tests::crypto::random(32);
    let blob = aziot_tpmd::dps_blob::build(&ek, &srk, &k1).unwrap();
    let r = request("POST", "/import_auth_key", serde_json::json!({"key": STANDARD.encode(&blob)}));
    assert_eq!(r.status, 200, "{r}\n{}", tpmd.log());
    assert_eq!(r.json(), serde_json::json!({}));

    let sign = |data: &[u8]| {
        let r = request("POST", "/sign_with_auth_key", serde_json::json!({"data": STANDARD.encode(data)}));
        assert_eq!(r.status, 200, "{r}");
        STANDARD.decode(r.json()["digest"].as_str().expect("digest")).unwrap()
    };
    let hmac = aziot_tests::crypto::hmac_sha256;
    assert_eq!(sign(b"sr\n1700000000"), hmac(&k1, b"sr\n1700000000"), "TPM HMAC = software HMAC");
    assert_ne!(sign(b"other"), hmac(&k1, b"sr\n1700000000"));

    // a corrupted blob is refused with 400 and the imported key still signs
    let mut corrupted = blob.clone();
    corrupted[50] ^= 1;
    let r = request("POST", "/import_auth_key", serde_json::json!({"key": STANDARD.encode(&corrupted)}));
    assert_eq!(r.status, 400, "{r}");
    let message = r.json()["message"].as_str().unwrap_or_default().to_owned();
    assert!(message.starts_with("could not import auth key\ncaused by: "), "{message}");
    assert_eq!(sign(b"still k1"), hmac(&k1, b"still k1"));

    // stop tpmd (broker and worker), so that swtpm (one client at a time) serves tpm2-tools
    tpmd.stop();

    // the auth key persists at 0x81000100 (0x81000000 + default auth_key_index 0x100), with
    // the SRK (0x81000001) and the EK (0x81010001)
    let handles = String::from_utf8_lossy(&swtpm.tool(&["tpm2_getcap", "handles-persistent"])).into_owned();
    for h in ["0x81000100", "0x81000001", "0x81010001"] {
        assert!(handles.contains(h), "{h} not in tpm2_getcap handles-persistent:\n{handles}");
    }
    // the EK and SRK tpmd returned are the TPM's persistent ones, byte for byte: both are
    // TPM2B_PUBLIC (tpm2_readpublic -f tss writes TPM2B_PUBLIC)
    for (handle, want, what) in [("0x81010001", &ek, "EK"), ("0x81000001", &srk, "SRK")] {
        let file = root.join(format!("{what}.pub"));
        swtpm.tool(&["tpm2_readpublic", "-c", handle, "-f", "tss", "-o", file.to_str().unwrap()]);
        assert_eq!(&std::fs::read(&file).unwrap(), want, "tpm2_readpublic -f tss -c {handle} = tpmd's {what}");
    }
}
