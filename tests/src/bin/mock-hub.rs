//! The mock IoT Hub (tests/src/mock_hub.rs) by hand:
//!
//! ```text
//! cargo run -p aziot-tests --bin mock-hub -- --device dev1 --sas-key <base64> [--port 8443]
//! ```
//!
//! Generates its own CA and a server certificate for `localhost`/`127.0.0.1`, writes the CA to
//! `--ca-out` (default `./mock-hub-ca.pem`; point identityd at it with `SSL_CERT_FILE`), listens
//! on 127.0.0.1, prints every request with its status, and runs until interrupted.

use std::time::Duration;

use aziot_tests::mock_hub::{DeviceCredential, MockHub};
use base64::Engine as _;

const USAGE: &str = "\
usage: mock-hub [--port N] [--ca-out PATH] [--hub-name NAME]
                [--device ID (--sas-key BASE64 | --thumbprint HEX | --ca-cert PEM-FILE)]...

  --port N          listen on 127.0.0.1:N (default: any free port, printed)
  --ca-out PATH     write the mock's CA certificate here (default ./mock-hub-ca.pem)
  --hub-name NAME   the hub name SAS audiences must carry (default localhost:<port>)
  --device ID       register a device; follow with its credential:
  --sas-key B64     ... SAS tokens signed with this key
  --thumbprint HEX  ... a TLS client certificate with this SHA-1/SHA-256 thumbprint
  --ca-cert FILE    ... a TLS client certificate issued by this CA (subject CN = ID)
";

fn main() {
    if let Err(e) = run() {
        eprintln!("mock-hub: {e}\n\n{USAGE}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut port = 0u16;
    let mut ca_out = std::path::PathBuf::from("mock-hub-ca.pem");
    let mut hub_name = None;
    let mut devices: Vec<(String, Option<DeviceCredential>)> = Vec::new();
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(());
            }
            "--port" => port = value("--port")?.parse().map_err(|e| format!("--port: {e}"))?,
            "--ca-out" => ca_out = value("--ca-out")?.into(),
            "--hub-name" => hub_name = Some(value("--hub-name")?),
            "--device" => devices.push((value("--device")?, None)),
            "--sas-key" | "--thumbprint" | "--ca-cert" => {
                let v = value(&a)?;
                let cred = match a.as_str() {
                    "--sas-key" => DeviceCredential::Sas(
                        base64::engine::general_purpose::STANDARD.decode(v.trim()).map_err(|e| format!("--sas-key: {e}"))?,
                    ),
                    "--thumbprint" => DeviceCredential::Thumbprint(v),
                    _ => DeviceCredential::Ca(
                        openssl::x509::X509::from_pem(&std::fs::read(&v).map_err(|e| format!("--ca-cert {v}: {e}"))?)
                            .map_err(|e| format!("--ca-cert {v}: {e}"))?,
                    ),
                };
                let last = devices.last_mut().ok_or_else(|| format!("{a} must follow --device"))?;
                if last.1.replace(cred).is_some() {
                    return Err(format!("device {} has two credentials", last.0));
                }
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let hub = MockHub::start_on(port).map_err(|e| format!("could not listen: {e}"))?;
    if let Some(name) = hub_name {
        hub.set_hub_name(&name);
    }
    for (id, cred) in devices {
        let cred = cred.ok_or_else(|| format!("device {id} has no credential"))?;
        hub.add_device(&id, cred);
    }
    hub.ca.write_cert(&ca_out).map_err(|e| format!("could not write {}: {e}", ca_out.display()))?;
    hub.set_logging(true);
    println!("mock IoT Hub listening on https://{} (hub name {})", hub.host(), hub.hub_name());
    println!("CA certificate: {} (e.g. SSL_CERT_FILE={})", ca_out.display(), ca_out.display());
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
