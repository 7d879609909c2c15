//! Prints the time from identityd's start (the broker spawned) to provisioned (E1 answers the
//! device identity: registered with DPS, reconciled) against the mock DPS answering at once,
//! for symmetric key and for TPM (tpmd on swtpm). Every run registers (the `device_info` backup
//! is removed between runs). Target ≤ 1 s; the original needs ≥ 5 s for its fixed first wait.
//! Never asserts on time.
//!
//! ```text
//! cargo build -p aziotd && cargo run -p aziot-tests --bin dps-bench -- [--runs N]
//! ```
//! (as root, with the service users and swtpm installed, like the test suites)

use std::time::{Duration, Instant};

use aziot_tests::identityd::{Identityd, DEVICE_KEY, HOSTNAME, V2021};
use aziot_tests::mock_dps::{Attestation, Enrollment, MockDps};
use aziot_tests::mock_tls::TestCa;
use aziot_tests::tpmd::{Swtpm, Tpmd};

const SCOPE: &str = "0ne00BENCH1";

fn config(endpoint: &str, attestation: &str) -> String {
    format!(
        "hostname = \"{HOSTNAME}\"\ncloud_retries = 0\n[provisioning]\nsource = \"dps\"\nglobal_endpoint = \"{endpoint}\"\nscope_id = \"{SCOPE}\"\n[provisioning.attestation]\n{attestation}\n"
    )
}

/// Start identityd, wait for E1 = 200; the elapsed time.
fn one_run(stack: &mut Identityd) -> Duration {
    let _ = std::fs::remove_file(stack.home().join("device_info"));
    let t = Instant::now();
    stack
        .start_identityd()
        .unwrap_or_else(|e| panic!("identityd: {e}"));
    let r = stack.client(None, V2021).get("/identities/identity");
    let took = t.elapsed();
    assert_eq!(r.status, 200, "{r}\n{}", stack.log());
    stack.stop_identityd();
    took
}

fn report(name: &str, mut runs: Vec<Duration>) {
    runs.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name:<14} start → provisioned: median {:7.1} ms   min {:7.1} ms   max {:7.1} ms   ({} runs; target ≤ 1000 ms)",
        ms(runs[runs.len() / 2]),
        ms(runs[0]),
        ms(runs[runs.len() - 1]),
        runs.len()
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut n = 5usize;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => n = args.next().and_then(|v| v.parse().ok()).expect("--runs N"),
            _ => {
                eprintln!("usage: dps-bench [--runs N]");
                std::process::exit(2);
            }
        }
    }
    // The worker's /tmp is its own: the CA goes beside the binaries.
    let ca = TestCa::new("aziot dps-bench CA");
    let ca_path = aziot_tests::keyd::aziotd_bin().with_file_name("dps-bench-ca.pem");
    ca.write_cert(&ca_path).expect("write the CA");
    std::env::set_var("SSL_CERT_FILE", &ca_path);
    let dps = MockDps::start_with_ca(ca, 0, SCOPE).expect("mock DPS");

    dps.enroll(
        "bench-sym",
        Enrollment {
            attestation: Attestation::SymmetricKey(DEVICE_KEY.to_vec()),
            hub: dps.hub_b(),
            device_id: None,
        },
    );
    let attestation = "method = \"symmetric_key\"\nregistration_id = \"bench-sym\"\nsymmetric_key = \"device-id\"";
    let mut stack = Identityd::prepare(&config(&dps.endpoint(), attestation));
    let runs = (0..n).map(|_| one_run(&mut stack)).collect();
    report("symmetric key", runs);
    drop(stack);

    dps.enroll(
        "bench-tpm",
        Enrollment {
            attestation: Attestation::Tpm(None),
            hub: dps.hub_b(),
            device_id: None,
        },
    );
    let mut stack = Identityd::prepare(&config(
        &dps.endpoint(),
        "method = \"tpm\"\nregistration_id = \"bench-tpm\"",
    ));
    let dir = stack.tpmd_dir();
    std::fs::create_dir_all(&dir).expect("mkdir tpmd");
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let swtpm = Swtpm::start(&dir);
    let tpmd = Tpmd::start(&dir, &swtpm.tcti(), "warn");
    let runs = (0..n).map(|_| one_run(&mut stack)).collect();
    report("TPM", runs);
    drop(stack);
    drop(tpmd);
    drop(swtpm);
    let _ = std::fs::remove_file(&ca_path);
}
