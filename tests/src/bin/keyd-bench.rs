//! keyd benchmark: throughput and latency over the socket, RSS and cold start.
//! Prints figures; never asserts on time.
//!
//! ```text
//! keyd-bench [--duration SECS] [--quick]
//! keyd-bench --floor <socket>          (internal: the hyper "floor" server)
//! ```
//!
//! The keyd binary is `$AZIOTD_BIN`, else `<target>/release/aziotd`, else (loudly)
//! `<target>/debug/aziotd`. The "floor" is a trivial hyper 1 server on a unix socket (tokio
//! multi-thread, 2 workers) answering 200 with a small JSON body: the best an HTTP-over-UDS
//! service on this machine can do, to which keyd's figures are compared. Both are driven by
//! the same raw keep-alive client (`aziot_tests::http`), one connection per client thread.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use aziot_tests::crypto::{b64, random, sha256};
use aziot_tests::http::{build_request, Conn};
use aziot_tests::keyd::{profile_dir, Keyd, TempDir};
use serde_json::json;

const VERSION: &str = "2021-05-01";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--floor") {
        let sock = args.get(i + 1).expect("--floor <socket>");
        floor_server(Path::new(sock));
        return;
    }
    let mut duration = Duration::from_secs(3);
    let mut warmup = Duration::from_millis(500);
    let mut cold_starts = 5;
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--duration" => {
                let secs: f64 = args
                    .get(i + 1)
                    .and_then(|s| s.parse().ok())
                    .expect("--duration SECS");
                duration = Duration::from_secs_f64(secs);
                i += 1;
            }
            "--quick" => {
                duration = Duration::from_millis(500);
                warmup = Duration::from_millis(100);
                cold_starts = 2;
            }
            "-h" | "--help" => {
                println!("usage: keyd-bench [--duration SECS] [--quick]");
                return;
            }
            other => panic!("unknown argument {other:?} (try --help)"),
        }
        i += 1;
    }
    run(duration, warmup, cold_starts);
}

fn keyd_binary() -> (PathBuf, &'static str) {
    if let Some(p) = std::env::var_os("AZIOTD_BIN") {
        return (PathBuf::from(p), "AZIOTD_BIN");
    }
    let target = profile_dir().parent().expect("target dir").to_path_buf();
    let release = target.join("release/aziotd");
    if release.is_file() {
        return (release, "release build");
    }
    let debug = target.join("debug/aziotd");
    eprintln!();
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!("!!! NOTE: no release aziotd at {}", release.display());
    eprintln!(
        "!!! falling back to the DEBUG build {}: figures are NOT representative.",
        debug.display()
    );
    eprintln!("!!! Build it with `cargo build --release -p aziotd` (or set AZIOTD_BIN).");
    eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
    eprintln!();
    assert!(
        debug.is_file(),
        "no aziotd binary at {} either: build the workspace first",
        debug.display()
    );
    (debug, "DEBUG build (not representative)")
}

struct Row {
    name: String,
    conc: usize,
    rps: f64,
    p50: Duration,
    p99: Duration,
    ok: u64,
    errors: u64,
}

fn run(duration: Duration, warmup: Duration, cold_starts: usize) {
    let (bin, flavour) = keyd_binary();
    println!(
        "keyd-bench: keyd = {} ({flavour}); {:.1} s per case after {:.1} s warm-up",
        bin.display(),
        duration.as_secs_f64(),
        warmup.as_secs_f64()
    );

    // the floor, as a separate process
    let floor_dir = TempDir::new("bench-floor");
    let floor_sock = floor_dir.path().join("floor.sock");
    let mut floor = FloorProcess::start(&floor_sock);

    // keyd: info level (production default), enough connection slots for c=8 plus headroom
    let keyd = Keyd::builder()
        .bin(bin.clone())
        .log_level("info")
        .extra("max_requests = 64")
        .start();
    std::thread::sleep(Duration::from_millis(300));
    let idle_rss = rss_kib(&keyd.pids(), "VmRSS");

    let sock = keyd.socket().to_path_buf();
    let api = keyd.api(VERSION);
    let hmac_key = api.import_key("bench-hmac", &random(32));
    let ec = api.create_keypair("bench-ec", Some("ec-p256"));
    let aead = api.import_key("bench-aead", &random(32));
    let t = |p: &str| format!("{p}?api-version={VERSION}");
    let hmac_req = build_request(
        "POST",
        &t("/sign"),
        Some(&body(
            &json!({"keyHandle": hmac_key, "algorithm": "HMAC-SHA256", "parameters": {"message": b64(&random(64))}}),
        )),
    );
    let ecdsa_req = build_request(
        "POST",
        &t("/sign"),
        Some(&body(
            &json!({"keyHandle": ec, "algorithm": "ECDSA", "parameters": {"digest": b64(&sha256(b"bench"))}}),
        )),
    );
    let aead_req = build_request(
        "POST",
        &t("/encrypt"),
        Some(&body(&json!({"keyHandle": aead, "algorithm": "AEAD",
            "parameters": {"iv": b64(&random(12)), "aad": b64(b"aad")}, "plaintext": b64(&random(1024))}))),
    );

    let mut rows = Vec::new();
    for conc in [1usize, 8] {
        rows.push(measure(
            "floor (hyper, 2 workers)",
            &floor_sock,
            &hmac_req,
            conc,
            warmup,
            duration,
        ));
        rows.push(measure(
            "keyd HMAC-SHA256 sign 64 B",
            &sock,
            &hmac_req,
            conc,
            warmup,
            duration,
        ));
        rows.push(measure(
            "keyd ECDSA P-256 sign",
            &sock,
            &ecdsa_req,
            conc,
            warmup,
            duration,
        ));
        rows.push(measure(
            "keyd AEAD encrypt 1 KiB",
            &sock,
            &aead_req,
            conc,
            warmup,
            duration,
        ));
    }
    let peak_rss = rss_kib(&keyd.pids(), "VmHWM");
    let pids = keyd.pids();
    drop(keyd);
    floor.stop();

    // cold start: spawn → first successful response, fresh prefix each time
    let mut colds = Vec::new();
    for _ in 0..cold_starts {
        colds.push(cold_start(&bin));
    }

    // ----- summary -----
    println!();
    println!(
        "{:<30} {:>4} {:>11} {:>10} {:>10} {:>9} {:>7}",
        "case", "c", "req/s", "p50 µs", "p99 µs", "ok", "errors"
    );
    println!("{}", "-".repeat(87));
    for r in &rows {
        println!(
            "{:<30} {:>4} {:>11.0} {:>10.1} {:>10.1} {:>9} {:>7}",
            r.name,
            r.conc,
            r.rps,
            r.p50.as_secs_f64() * 1e6,
            r.p99.as_secs_f64() * 1e6,
            r.ok,
            r.errors
        );
    }
    println!("{}", "-".repeat(87));
    let find = |prefix: &str, c: usize| {
        rows.iter()
            .find(|r| r.name.starts_with(prefix) && r.conc == c)
            .map_or(0.0, |r| r.rps)
    };
    let floor8 = find("floor", 8);
    let hmac8 = find("keyd HMAC", 8);
    let ecdsa8 = find("keyd ECDSA", 8);
    let ratio = if floor8 > 0.0 { hmac8 / floor8 } else { 0.0 };
    let verdict = |ok: bool| if ok { "meets target" } else { "BELOW TARGET" };
    println!(
        "HMAC c=8 / floor c=8           {ratio:>8.2}   (target >= 0.60: {})",
        verdict(ratio >= 0.6)
    );
    println!(
        "ECDSA c=8                      {ecdsa8:>8.0}   req/s (target >= 10000: {})",
        verdict(ecdsa8 >= 10_000.0)
    );
    println!(
        "keyd idle RSS                  {:>8} KiB (processes {pids:?})",
        idle_rss.map_or("n/a".into(), |v| v.to_string())
    );
    println!(
        "keyd peak RSS (VmHWM)          {:>8} KiB",
        peak_rss.map_or("n/a".into(), |v| v.to_string())
    );
    if !colds.is_empty() {
        let avg = colds.iter().sum::<Duration>() / u32::try_from(colds.len()).expect("few");
        let min = colds.iter().min().expect("some");
        let max = colds.iter().max().expect("some");
        println!(
            "cold start (spawn → first 200) {:>8.1} ms average of {} (min {:.1}, max {:.1})",
            avg.as_secs_f64() * 1e3,
            colds.len(),
            min.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3
        );
    }
    println!("keyd binary: {} ({flavour})", bin.display());
    if rows.iter().any(|r| r.errors > 0) {
        println!(
            "NOTE: some requests failed (see the errors column); their latencies are excluded."
        );
    }
}

fn body(v: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("json")
}

/// Drive `sock` with `conc` threads (one keep-alive connection each) sending `req`.
fn measure(
    name: &str,
    sock: &Path,
    req: &[u8],
    conc: usize,
    warmup: Duration,
    duration: Duration,
) -> Row {
    let barrier = Arc::new(Barrier::new(conc + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    let t0 = Arc::new(std::sync::OnceLock::<Instant>::new());
    for _ in 0..conc {
        let barrier = Arc::clone(&barrier);
        let stop = Arc::clone(&stop);
        let t0 = Arc::clone(&t0);
        let sock = sock.to_path_buf();
        let req = req.to_vec();
        threads.push(std::thread::spawn(move || {
            let mut lat: Vec<u64> = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            let mut conn = Conn::connect(&sock).ok();
            barrier.wait();
            let start = *t0.get().expect("t0");
            let (m0, m1) = (start + warmup, start + warmup + duration);
            while !stop.load(Ordering::Relaxed) {
                let s = Instant::now();
                if s >= m1 {
                    break;
                }
                let ok = match conn.as_mut() {
                    Some(c) => matches!(c.send_raw(&req).and_then(|()| c.read_response()), Ok(r) if r.status == 200),
                    None => false,
                };
                let e = Instant::now();
                if !ok {
                    conn = Conn::connect(&sock).ok();
                    if s >= m0 {
                        errors += 1;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                if s >= m0 && e <= m1 {
                    lat.push(u64::try_from((e - s).as_nanos()).unwrap_or(u64::MAX));
                }
            }
            (lat, errors)
        }));
    }
    let _ = t0.set(Instant::now());
    barrier.wait();
    std::thread::sleep(warmup + duration);
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
        if all.is_empty() {
            Duration::ZERO
        } else {
            let idx = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
            Duration::from_nanos(all[idx])
        }
    };
    let row = Row {
        name: name.to_owned(),
        conc,
        rps: all.len() as f64 / duration.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
        ok: all.len() as u64,
        errors,
    };
    println!(
        "  {:<30} c={:<2} {:>9.0} req/s  p50 {:>8.1} µs  p99 {:>8.1} µs  errors {}",
        row.name,
        row.conc,
        row.rps,
        row.p50.as_secs_f64() * 1e6,
        row.p99.as_secs_f64() * 1e6,
        row.errors
    );
    row
}

/// Sum of a /proc/<pid>/status field (kB) over the service's processes.
fn rss_kib(pids: &[u32], field: &str) -> Option<u64> {
    let mut total = 0;
    let mut any = false;
    for pid in pids {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        for line in status.lines() {
            if let Some(rest) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
                if let Some(kb) = rest
                    .split_whitespace()
                    .next()
                    .and_then(|v| v.parse::<u64>().ok())
                {
                    total += kb;
                    any = true;
                }
            }
        }
    }
    any.then_some(total)
}

fn cold_start(bin: &Path) -> Duration {
    let keyd = Keyd::builder()
        .bin(bin.to_path_buf())
        .log_level("info")
        .start_unready();
    let spawned = keyd.spawned_at();
    let req = build_request(
        "POST",
        &format!("/key?api-version={VERSION}"),
        Some(br#"{"keyId":"cold","usage":"sign"}"#),
    );
    let deadline = spawned + Duration::from_secs(10);
    loop {
        if let Ok(mut c) = Conn::connect(keyd.socket()) {
            if c.send_raw(&req).is_ok() {
                if let Ok(r) = c.read_response() {
                    if r.status == 200 {
                        return spawned.elapsed();
                    }
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "keyd did not answer within 10 s\n{}",
            keyd.log()
        );
        std::thread::sleep(Duration::from_micros(500));
    }
}

struct FloorProcess {
    child: Child,
}

impl FloorProcess {
    fn start(sock: &Path) -> FloorProcess {
        let exe = std::env::current_exe().expect("current_exe");
        let child = Command::new(exe)
            .arg("--floor")
            .arg(sock)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn floor server");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(sock).is_err() {
            assert!(Instant::now() < deadline, "floor server did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        FloorProcess { child }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for FloorProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The floor: hyper 1 http1 server, reads the body, answers 200 with a small JSON body.
fn floor_server(sock: &Path) {
    use http_body_util::{BodyExt as _, Full};
    use hyper::body::Bytes;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let _ = std::fs::remove_file(sock);
        let listener = tokio::net::UnixListener::bind(sock).expect("bind floor socket");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let io = hyper_util::rt::TokioIo::new(stream);
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let _ = req.into_body().collect().await;
                        let resp = hyper::Response::builder()
                            .status(200)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from_static(
                                br#"{"signature":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="}"#,
                            )))
                            .expect("response");
                        Ok::<_, std::convert::Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
}
