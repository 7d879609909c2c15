//! The mock DPS (tests/src/mock_dps.rs) by hand, with its two IoT hubs on the same port:
//!
//! ```text
//! cargo run -p aziot-tests --bin mock-dps -- --registration-id dev1 --symmetric-key <base64>
//! ```
//!
//! Generates its own CA and a server certificate for `localhost`/`127.0.0.1`, writes the CA to
//! `--ca-out` (default `./mock-dps-ca.pem`; point identityd at it with `SSL_CERT_FILE`), prints
//! the `[provisioning]` section for identityd, logs every request with its status, and runs until
//! interrupted.

use std::time::Duration;

use aziot_tests::mock_dps::{Attestation, Enrollment, Group, MockDps};
use aziot_tests::mock_tls::TestCa;
use base64::Engine as _;

const USAGE: &str = "\
usage: mock-dps [--port N] [--ca-out PATH] [--scope ID] [--hub a|b] [--assigning N]
                (--registration-id ID (--symmetric-key B64 | --tpm | --x509-ca PEM-FILE))...
                [--group-key B64] [--group-ca PEM-FILE]

  --port N             listen on 127.0.0.1:N (default: any free port, printed)
  --ca-out PATH        write the mock's CA certificate here (default ./mock-dps-ca.pem)
  --scope ID           the ID scope (default 0ne00000001)
  --hub a|b            the hub enrollments are assigned to: a = localhost:<port> (default),
                       b = 127.0.0.1:<port> (both served on this port)
  --assigning N        answer `assigning` to the first N polls of each registration
  --registration-id ID an individual enrollment; follow with its attestation:
  --symmetric-key B64  ... SAS with this key
  --tpm                ... TPM (the first EK presented is registered)
  --x509-ca FILE       ... a client certificate issued by this CA, subject CN = ID
  --group-key B64      a symmetric-key group enrollment (device key = HMAC-SHA256(key, ID))
  --group-ca FILE      an X.509 group enrollment (any CN whose certificate chains to this CA)
";

fn main() {
    if let Err(e) = run() {
        eprintln!("mock-dps: {e}\n\n{USAGE}");
        std::process::exit(2);
    }
}

fn pem(path: &str, what: &str) -> Result<openssl::x509::X509, String> {
    openssl::x509::X509::from_pem(&std::fs::read(path).map_err(|e| format!("{what} {path}: {e}"))?)
        .map_err(|e| format!("{what} {path}: {e}"))
}

fn key(v: &str, what: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(v.trim())
        .map_err(|e| format!("{what}: {e}"))
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (mut port, mut scope, mut hub, mut assigning) =
        (0u16, "0ne00000001".to_owned(), "a".to_owned(), 0u32);
    let mut ca_out = std::path::PathBuf::from("mock-dps-ca.pem");
    let mut enrollments: Vec<(String, Option<Attestation>)> = Vec::new();
    let (mut group_key, mut group_ca) = (None, None);
    while let Some(a) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        let attestation = match a.as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                return Ok(());
            }
            "--port" => {
                port = value("--port")?
                    .parse()
                    .map_err(|e| format!("--port: {e}"))?;
                None
            }
            "--ca-out" => {
                ca_out = value("--ca-out")?.into();
                None
            }
            "--scope" => {
                scope = value("--scope")?;
                None
            }
            "--hub" => {
                hub = value("--hub")?;
                if hub != "a" && hub != "b" {
                    return Err("--hub is a or b".into());
                }
                None
            }
            "--assigning" => {
                assigning = value("--assigning")?
                    .parse()
                    .map_err(|e| format!("--assigning: {e}"))?;
                None
            }
            "--registration-id" => {
                enrollments.push((value("--registration-id")?, None));
                None
            }
            "--symmetric-key" => Some(Attestation::SymmetricKey(key(
                &value(&a)?,
                "--symmetric-key",
            )?)),
            "--tpm" => Some(Attestation::Tpm(None)),
            "--x509-ca" => Some(Attestation::X509Ca(pem(&value(&a)?, "--x509-ca")?)),
            "--group-key" => {
                group_key = Some(key(&value(&a)?, "--group-key")?);
                None
            }
            "--group-ca" => {
                group_ca = Some(pem(&value(&a)?, "--group-ca")?);
                None
            }
            other => return Err(format!("unknown argument {other:?}")),
        };
        if let Some(att) = attestation {
            let last = enrollments
                .last_mut()
                .ok_or_else(|| format!("{a} must follow --registration-id"))?;
            if last.1.replace(att).is_some() {
                return Err(format!("enrollment {} has two attestations", last.0));
            }
        }
    }
    if enrollments.is_empty() && group_key.is_none() && group_ca.is_none() {
        return Err("no enrollment".into());
    }
    let dps = MockDps::start_with_ca(TestCa::new("aziot mock DPS CA"), port, &scope)
        .map_err(|e| format!("could not listen: {e}"))?;
    let hub = if hub == "a" { dps.hub_a() } else { dps.hub_b() };
    let mut methods = Vec::new();
    for (id, att) in enrollments {
        let att = att.ok_or_else(|| format!("enrollment {id} has no attestation"))?;
        methods.push((
            id.clone(),
            match att {
                Attestation::SymmetricKey(_) => "symmetric_key",
                Attestation::Tpm(_) => "tpm",
                _ => "x509",
            },
        ));
        dps.enroll(
            &id,
            Enrollment {
                attestation: att,
                hub: hub.clone(),
                device_id: None,
            },
        );
    }
    if let Some(group_key) = group_key {
        dps.enroll_group(Group::SymmetricKey {
            group_key,
            hub: hub.clone(),
        });
    }
    if let Some(ca) = group_ca {
        dps.enroll_group(Group::X509Ca {
            ca,
            hub: hub.clone(),
        });
    }
    dps.set_assigning_polls(assigning, Some(1));
    dps.ca
        .write_cert(&ca_out)
        .map_err(|e| format!("could not write {}: {e}", ca_out.display()))?;
    dps.set_logging(true);
    println!(
        "mock DPS listening on {} (scope {scope}); assigns to hub {hub}",
        dps.endpoint()
    );
    println!("hubs on the same port: {} and {}", dps.hub_a(), dps.hub_b());
    println!(
        "CA certificate: {} (e.g. SSL_CERT_FILE={})",
        ca_out.display(),
        ca_out.display()
    );
    for (id, method) in methods {
        println!(
            "\nidentityd config for {id}:\n[provisioning]\nsource = \"dps\"\nglobal_endpoint = \"{}\"\nscope_id = \"{scope}\"\n[provisioning.attestation]\nmethod = \"{method}\"\nregistration_id = \"{id}\"{}",
            dps.endpoint(),
            match method {
                "symmetric_key" => "\nsymmetric_key = \"device-id\"",
                "x509" => "\nidentity_cert = \"device-id\"\nidentity_pk = \"device-id\"",
                _ => "",
            }
        );
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
