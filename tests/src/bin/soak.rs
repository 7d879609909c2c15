//! Soak: mixed load on all four services through their brokers (keyd, certd, identityd, tpmd on
//! swtpm) for 10 minutes, the RSS of each worker sampled every 10 s and printed; fails (exit 1)
//! when a worker's memory grows beyond the bound below, a worker was restarted, a request was
//! not answered 2xx, or a worker holds more descriptors at the end than at the start.
//!
//! ```text
//! soak [--duration SECS]   (as root; ./scripts/test --soak, or AZIOT_SOAK=1 ./scripts/test)
//! ```
//!
//! Load per service, as root: two keep-alive clients cycling through the service's requests
//! (aziot_tests::load::Target::mixed: keyd GET /key + HMAC /sign, certd GET + PUT of a
//! certificate, identityd E2 + E1, tpmd /get_tpm_keys) with no think time, and one client that
//! opens a new connection for every request (per-connection state must not leak either).
//!
//! The bound: the first minute is warm-up (allocator arenas, caches, the runtime's buffers);
//! from the sample at 60 s to the end, a worker's RSS may grow by at most max(2 MiB, 10 %).
//! At these request rates (hundreds to thousands per second per service) a leak of even a few
//! bytes per request exceeds it; the printed slope (least squares over the samples after the
//! warm-up) shows the trend.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aziot_tests::http::Conn;
use aziot_tests::load::{exchange, rss_kib, Outcome, Tally, Target, KINDS};

const SAMPLE: Duration = Duration::from_secs(10);
const WARMUP: Duration = Duration::from_secs(60);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let duration = match args.iter().position(|a| a == "--duration") {
        Some(i) => Duration::from_secs(args.get(i + 1).and_then(|s| s.parse().ok()).expect("--duration SECS")),
        None => Duration::from_secs(600),
    };
    assert!(nix::unistd::geteuid().is_root(), "soak starts brokers: run it as root");
    for kind in KINDS {
        if let Some(missing) = kind.deps().into_iter().find_map(aziot_tests::Dep::missing) {
            eprintln!("soak: {} needs {missing}", kind.name());
            std::process::exit(1);
        }
    }
    let targets: Vec<Target> = KINDS.iter().map(|&k| Target::start(k, None, "info")).collect();
    let pids: Vec<i32> = targets.iter().map(Target::worker_pid).collect();
    let fds0: Vec<usize> = pids.iter().map(|&p| aziot_tests::load::settled_fd_count(p)).collect();
    println!("soak: {duration:?} of mixed load on {}; worker RSS (VmRSS, KiB) every {SAMPLE:?}", names(&targets));
    println!("  aziotd: {}", aziot_tests::keyd::aziotd_bin().display());

    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        for fresh in [false, false, true] {
            let (stop, sock, reqs) = (Arc::clone(&stop), t.socket.clone(), t.mixed.clone());
            clients.push((i, std::thread::spawn(move || client(&sock, &reqs, fresh, &stop))));
        }
    }

    let start = Instant::now();
    let mut samples: Vec<(f64, Vec<u64>)> = Vec::new();
    let mut restarted = Vec::new();
    println!("  {:>6}  {}", "t (s)", targets.iter().map(|t| format!("{:>10}", t.name())).collect::<String>());
    while start.elapsed() < duration {
        let next = SAMPLE * (samples.len() as u32 + 1);
        std::thread::sleep(next.saturating_sub(start.elapsed()));
        let rss: Vec<u64> = pids.iter().map(|&p| rss_kib(p).unwrap_or(0)).collect();
        for (t, &pid) in targets.iter().zip(&pids) {
            if t.worker_pid() != pid && !restarted.contains(&t.name()) {
                restarted.push(t.name());
            }
        }
        let t = start.elapsed().as_secs_f64();
        println!("  {t:>6.0}  {}", rss.iter().map(|r| format!("{r:>10}")).collect::<String>());
        samples.push((t, rss));
    }
    stop.store(true, Ordering::Relaxed);
    let mut tallies = vec![Tally::default(); targets.len()];
    for (i, c) in clients {
        tallies[i].merge(&c.join().expect("client thread"));
    }

    let mut failed = false;
    println!("summary (RSS in KiB; bound: end - RSS at {}s <= max(2048, 10 %)):", WARMUP.as_secs());
    for (i, t) in targets.iter().enumerate() {
        let series: Vec<(f64, u64)> = samples.iter().map(|(s, r)| (*s, r[i])).collect();
        let first = series.first().map_or(0, |s| s.1);
        let max = series.iter().map(|s| s.1).max().unwrap_or(0);
        let end = series.last().map_or(0, |s| s.1);
        let after: Vec<(f64, u64)> = series.iter().copied().filter(|s| s.0 >= WARMUP.as_secs_f64() - 1.0).collect();
        let warm = after.first().map_or(first, |s| s.1);
        let slope = slope_kib_per_min(&after);
        let allowed = (warm / 10).max(2048);
        let grew = end.saturating_sub(warm);
        let ok_rss = grew <= allowed;
        let ok_req = tallies[i].failed == 0
            && tallies[i].unanswered == 0
            && tallies[i].answered.keys().all(|s| (200..300).contains(s));
        let ok_restart = !restarted.contains(&t.name());
        // Every client has stopped: the worker's descriptors are back where they started.
        let fds = if ok_restart { aziot_tests::load::settled_fd_count(pids[i]) } else { 0 };
        let ok_fds = fds <= fds0[i];
        println!(
            "  {:<9} start {first:>7}  max {max:>7}  end {end:>7}  at {}s {warm:>7}  growth {grew:>6} (allowed {allowed}) {}  slope {slope:>+8.1} KiB/min | requests: {} | worker fds {} -> {fds}{}",
            t.name(),
            WARMUP.as_secs(),
            if ok_rss { "ok" } else { "EXCEEDED" },
            tallies[i],
            fds0[i],
            if ok_restart { "" } else { " | WORKER RESTARTED" },
        );
        failed |= !(ok_rss && ok_req && ok_restart && ok_fds);
    }
    drop(targets);
    if failed {
        println!("soak: FAILED");
        std::process::exit(1);
    }
    println!("soak: ok");
}

fn names(targets: &[Target]) -> String {
    targets.iter().map(Target::name).collect::<Vec<_>>().join(", ")
}

/// Cycles through `reqs` on one keep-alive connection (or a new connection per request when
/// `fresh`) until `stop`.
fn client(sock: &std::path::Path, reqs: &[Vec<u8>], fresh: bool, stop: &AtomicBool) -> Tally {
    let mut tally = Tally::default();
    let mut conn: Option<Conn> = None;
    let mut i = 0;
    while !stop.load(Ordering::Relaxed) {
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::connect(sock) {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    tally.add(&Outcome::Failed(format!("connect: {e}")));
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            },
        };
        let outcome = exchange(c, &reqs[i % reqs.len()]);
        i += 1;
        if fresh || !matches!(outcome, Outcome::Answered(200..=299)) {
            conn = None;
        }
        tally.add(&outcome);
    }
    tally
}

/// Least-squares slope of (seconds, KiB) in KiB per minute.
fn slope_kib_per_min(points: &[(f64, u64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1 as f64).sum::<f64>() / n;
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 as f64 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx == 0.0 {
        0.0
    } else {
        sxy / sxx * 60.0
    }
}
