//! Closed-loop load for the benches: `conc` keep-alive clients send one request over and over;
//! requests answered 200 during the measured window count, anything else counts as an error (the
//! client reconnects).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::http::Conn;

/// Throughput, latency percentiles (µs) and errors of one [`closed_loop`] run.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
}

/// Runs `conc` clients of `req` against `sock`: `warmup` uncounted, then `duration` counted.
pub fn closed_loop(sock: &Path, req: &[u8], conc: usize, warmup: Duration, duration: Duration) -> Load {
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
    Load {
        rps: all.len() as f64 / duration.as_secs_f64(),
        p50_us: pct(0.5).as_secs_f64() * 1e6,
        p99_us: pct(0.99).as_secs_f64() * 1e6,
        errors,
    }
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}
