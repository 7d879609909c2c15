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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use aziot_tests::certd::pki::{csr, csr_with, keyd_key};
use aziot_tests::certd::Certd;
use aziot_tests::http::{build_request, Conn};
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
    let barrier = Arc::new(Barrier::new(conc + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let counting = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..conc)
        .map(|_| {
            let (barrier, stop, counting, sock, req) =
                (Arc::clone(&barrier), Arc::clone(&stop), Arc::clone(&counting), sock.to_path_buf(), req.to_vec());
            std::thread::spawn(move || {
                let mut conn = Conn::connect(&sock).expect("connect");
                let (mut lat, mut errors) = (Vec::with_capacity(1 << 16), 0u64);
                barrier.wait();
                while !stop.load(Ordering::Relaxed) {
                    let s = Instant::now();
                    let ok =
                        matches!(conn.send_raw(&req).and_then(|()| conn.read_response()), Ok(r) if r.status == 200);
                    if !ok {
                        errors += 1;
                        conn = Conn::connect(&sock).expect("reconnect");
                        continue;
                    }
                    if counting.load(Ordering::Relaxed) {
                        lat.push(s.elapsed());
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    barrier.wait();
    std::thread::sleep(warmup);
    counting.store(true, Ordering::Relaxed);
    std::thread::sleep(duration);
    counting.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    for t in threads {
        let (l, e) = t.join().expect("client thread");
        all.extend(l);
        errors += e;
    }
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or_default()
    };
    let rps = all.len() as f64 / duration.as_secs_f64();
    println!(
        "  {name:<30} c={conc:<2} {rps:>9.0} req/s  p50 {:>8.1} µs  p99 {:>8.1} µs  errors {errors}",
        pct(0.5).as_secs_f64() * 1e6,
        pct(0.99).as_secs_f64() * 1e6
    );
    rps
}

fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}
