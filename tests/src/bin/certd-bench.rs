//! certd benchmark: `GET /certificates/{id}` over the socket at c=1 and c=8, side by side with
//! the hyper floor keyd-bench uses (`keyd-bench --floor`: a trivial hyper 1 server on a unix
//! socket answering 200 with a small JSON body), and the RSS of the idle certd worker. Prints
//! figures; never asserts on time.
//!
//! ```text
//! certd-bench [--duration SECS]      (as root; keyd-bench beside it; AZIOTD_BIN or <target>/<profile>/aziotd)
//! ```
//!
//! certd runs as in production: root broker + confined aziotcs worker, with a keyd beside it
//! (aziot_tests::certd). The cert read is a 3-certificate PEM chain (local CA + leaf, issued by
//! certd itself). One keep-alive connection per client thread, the same raw client for both.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aziot_tests::certd::pki::{csr, csr_with, keyd_key};
use aziot_tests::certd::Certd;
use aziot_tests::http::build_request;
use aziot_tests::load::{closed_loop, rss_kib};
use aziot_tests::keyd::{profile_dir, TempDir};
use serde_json::json;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut duration = Duration::from_secs(3);
    if let Some(i) = args.iter().position(|a| a == "--duration") {
        duration = Duration::from_secs_f64(args.get(i + 1).and_then(|s| s.parse().ok()).expect("--duration SECS"));
    }
    let warmup = Duration::from_millis(500);
    assert!(nix::unistd::geteuid().is_root(), "certd-bench starts brokers: run it as root");

    let floor_dir = TempDir::new("certd-bench-floor");
    let floor_sock = floor_dir.path().join("floor.sock");
    let mut floor = Command::new(profile_dir().join("keyd-bench"))
        .arg("--floor")
        .arg(&floor_sock)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn `keyd-bench --floor` (build the tests package's bins)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&floor_sock).is_err() {
        assert!(Instant::now() < deadline, "floor server did not start");
        std::thread::sleep(Duration::from_millis(5));
    }

    let certd = Certd::start_with_log(
        "[cert_issuance.ca]\nmethod = \"self_signed\"\n[cert_issuance.local_ca]\ncert = \"ca\"\npk = \"ca\"\n\
         [cert_issuance.leaf]\nmethod = \"local_ca\"\n",
        "info",
    );
    let idle_rss = rss_kib(certd.worker_pid());
    // a CA whose key is in keyd, and a leaf it issued
    let r = certd.keyd_api().post("/keypair", &json!({ "keyId": "ca", "preferredAlgorithms": "ec-p256" }));
    let handle = r.json()["keyHandle"].as_str().expect("key handle").to_owned();
    let ca_key = keyd_key(certd.keyd().socket(), &handle);
    let ca_csr = String::from_utf8(csr_with(&ca_key, &ca_key, "Bench CA", true).to_pem().unwrap()).unwrap();
    assert_eq!(certd.api().post("/certificates", &json!({ "certId": "ca", "csr": ca_csr })).status, 201);
    let leaf = csr(&aziot_tests::certd::pki::ec_key(), "leaf", false);
    let r = certd.api().post("/certificates", &json!({ "certId": "leaf", "csr": leaf }));
    assert_eq!(r.status, 201, "{r}");

    println!(
        "certd-bench: GET /certificates/leaf ({} bytes of PEM), {duration:?} per row",
        r.json()["pem"].as_str().unwrap().len()
    );
    println!("  aziotd: {}", aziot_tests::keyd::aziotd_bin().display());
    let get = build_request("GET", "/certificates/leaf?api-version=2020-09-01", None);
    let mut table = Vec::new();
    for conc in [1, 8] {
        let f = measure("floor (hyper, 2 workers)", &floor_sock, &get, conc, warmup, duration);
        let c = measure("certd GET (broker, confined)", &certd.socket(), &get, conc, warmup, duration);
        table.push((conc, f, c));
    }
    println!("summary:");
    for (conc, f, c) in &table {
        let ratio = if *f > 0.0 { c / f } else { 0.0 };
        let verdict = if *conc == 8 {
            if ratio >= 0.6 {
                " (target >= 0.60: met)"
            } else {
                " (target >= 0.60: NOT met)"
            }
        } else {
            ""
        };
        println!("  c={conc}: certd {c:>9.0} req/s, floor {f:>9.0} req/s, certd/floor {ratio:.2}{verdict}");
    }
    match idle_rss {
        Some(kib) => println!("  idle certd worker RSS: {kib} KiB (VmRSS, right after start)"),
        None => println!("  idle certd worker RSS: unavailable"),
    }
    let _ = floor.kill();
    let _ = floor.wait();
}

/// Requests per second of `req` on `sock` with `conc` keep-alive clients; prints the row.
fn measure(name: &str, sock: &Path, req: &[u8], conc: usize, warmup: Duration, duration: Duration) -> f64 {
    let l = closed_loop(sock, req, conc, warmup, duration);
    println!(
        "  {name:<30} c={conc:<2} {:>9.0} req/s  p50 {:>8.1} µs  p99 {:>8.1} µs  errors {}",
        l.rps, l.p50_us, l.p99_us, l.errors
    );
    l.rps
}
