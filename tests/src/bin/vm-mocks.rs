//! vm-mocks: the mock DPS and its IoT hub (tests/src/mock_dps.rs) for the VM suite
//! (scripts/vm-test, tests/vm/guest.sh), whose state outlives a reboot of the guest.
//!
//! ```text
//! vm-mocks --state DIR --port N --scope ID --registration-id ID [--tls-port N]...
//! ```
//!
//! One TPM individual enrollment, assigned to hub `localhost:<port>` (served on the same port).
//! The mock's CA (DIR/ca.pem, DIR/ca.key) is made on the first start and reused afterwards, so
//! the guest trusts the same CA across its reboot. After every change the mock writes DIR/hub.json
//! (atomically): the device the DPS registered, its hub credential (the TPM key the DPS sent in
//! the activation blob) and the hub's record of each module (generation ID, the keys identityd
//! uploaded). A later start restores that into the hub, so after the guest's reboot identityd
//! finds the device and modules it left, and the suite can tell whether it kept them. Every DPS
//! and hub request is printed with its status (stdout), so the suite can count registrations.
//! `--tls-port`: more TLS listeners with a certificate for `localhost` from the same CA (no
//! state), so `aziotctl check`'s hub connectivity checks (TLS handshakes on 5671 and 8883) have
//! a peer.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aziot_tests::mock_dps::{Attestation, Enrollment, MockDps};
use aziot_tests::mock_hub::{DeviceCredential, StoredModule};
use aziot_tests::mock_tls::{CertKey, TestCa};
use base64::Engine as _;
use serde_json::{json, Value};

const USAGE: &str = "usage: vm-mocks --state DIR --port N --scope ID --registration-id ID [--tls-port N]...";

fn main() {
    if let Err(e) = run() {
        eprintln!("vm-mocks: {e}\n{USAGE}");
        std::process::exit(2);
    }
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Writes `data` to `path` atomically (temporary file in the same directory, fsync, rename,
/// fsync of the directory).
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("state")));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The CA from DIR (made and saved on the first start).
fn load_or_make_ca(dir: &Path) -> Result<TestCa, String> {
    let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    if cert_path.exists() {
        let cert = openssl::x509::X509::from_pem(&std::fs::read(&cert_path).map_err(|e| format!("{}: {e}", cert_path.display()))?)
            .map_err(|e| format!("{}: {e}", cert_path.display()))?;
        let key = openssl::pkey::PKey::private_key_from_pem(&std::fs::read(&key_path).map_err(|e| format!("{}: {e}", key_path.display()))?)
            .map_err(|e| format!("{}: {e}", key_path.display()))?;
        return Ok(TestCa { ca: CertKey { cert, key } });
    }
    let ca = TestCa::new("aziot VM suite mock DPS CA");
    write_atomic(&key_path, &ca.ca.key_pem(), 0o600).map_err(|e| format!("{}: {e}", key_path.display()))?;
    write_atomic(&cert_path, &ca.cert_pem(), 0o644).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    Ok(ca)
}

fn module_json(m: &StoredModule) -> Value {
    json!({
        "moduleId": m.module_id, "deviceId": m.device_id, "generationId": m.generation_id, "etag": m.etag,
        "managedBy": m.managed_by, "primaryKey": m.primary_key, "secondaryKey": m.secondary_key, "authType": m.auth_type,
    })
}

fn module_from_json(v: &Value) -> Option<StoredModule> {
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    Some(StoredModule {
        module_id: s("moduleId")?,
        device_id: s("deviceId")?,
        generation_id: s("generationId")?,
        etag: s("etag")?,
        managed_by: s("managedBy"),
        primary_key: s("primaryKey"),
        secondary_key: s("secondaryKey"),
        auth_type: s("authType")?,
    })
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (mut state, mut port, mut scope, mut reg) = (None, None, None, None);
    let mut tls_ports = Vec::new();
    while let Some(a) = args.next() {
        let v = args.next().ok_or_else(|| format!("{a} needs a value"))?;
        match a.as_str() {
            "--state" => state = Some(PathBuf::from(v)),
            "--port" => port = Some(v.parse::<u16>().map_err(|e| format!("--port: {e}"))?),
            "--scope" => scope = Some(v),
            "--registration-id" => reg = Some(v),
            "--tls-port" => tls_ports.push(v.parse::<u16>().map_err(|e| format!("--tls-port: {e}"))?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let (Some(dir), Some(port), Some(scope), Some(reg)) = (state, port, scope, reg) else {
        return Err("missing argument".into());
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ca = load_or_make_ca(&dir)?;
    let mut others = Vec::new();
    for p in tls_ports {
        others.push(MockDps::start_with_ca(ca.clone(), p, &scope).map_err(|e| format!("could not listen on {p}: {e}"))?);
    }
    let dps = MockDps::start_with_ca(ca, port, &scope).map_err(|e| format!("could not listen on {port}: {e}"))?;
    let hub_name = dps.hub_a();
    let hub = dps.hub(&hub_name);
    dps.enroll(&reg, Enrollment { attestation: Attestation::Tpm(None), hub: hub_name.clone(), device_id: None });

    // What an earlier start left.
    let state_file = dir.join("hub.json");
    let mut device: Option<(String, Vec<u8>)> = None;
    if let Ok(text) = std::fs::read(&state_file) {
        let v: Value = serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", state_file.display()))?;
        if let (Some(id), Some(key)) = (v["deviceId"].as_str(), v["key"].as_str()) {
            let key = base64::engine::general_purpose::STANDARD.decode(key).map_err(|e| format!("hub.json key: {e}"))?;
            hub.add_device(id, DeviceCredential::Sas(key.clone()));
            for m in v["modules"].as_array().into_iter().flatten() {
                hub.insert_module(module_from_json(m).ok_or_else(|| format!("hub.json: bad module {m}"))?);
            }
            println!("vm-mocks: restored device {id} with {} module(s) from {}", hub.module_ids(id).len(), state_file.display());
            device = Some((id.to_owned(), key));
        }
    }
    dps.set_logging(true);
    println!("vm-mocks: DPS https://127.0.0.1:{port}/ scope {scope}, hub {hub_name}, CA {}", dir.join("ca.pem").display());
    for o in &others {
        println!("vm-mocks: TLS also on port {}", o.port());
    }
    std::io::stdout().flush().ok();

    let mut last = Value::Null;
    loop {
        // The device's hub credential: the last TPM key the DPS handed out (the activation
        // blob's), else the one restored.
        if let Some(key) = dps.tpm_keys().last() {
            device = Some((reg.clone(), key.clone()));
        }
        if let Some((id, key)) = &device {
            let modules: Vec<Value> = hub.modules(id).iter().map(module_json).collect();
            let now = json!({"deviceId": id, "hub": hub_name, "key": b64(key), "modules": modules});
            if now != last {
                let text = serde_json::to_vec_pretty(&now).map_err(|e| e.to_string())?;
                write_atomic(&state_file, &text, 0o600).map_err(|e| format!("{}: {e}", state_file.display()))?;
                last = now;
            }
        }
        std::io::stdout().flush().ok();
        std::thread::sleep(Duration::from_millis(100));
    }
}
