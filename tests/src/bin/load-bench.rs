//! Load bench and the load suite's client processes.
//!
//! ```text
//! load-bench fairness [--duration SECS] [--services keyd,certd,identityd,tpmd] [--flood-conns N]   (as root)
//! load-bench hold|flood|loop ...   (a client process of tests/tests/load.rs; aziot_tests::load::client_main)
//! ```
//!
//! `fairness`: for each service (through its broker, default `max_requests` = 10), the victim
//! uid's closed-loop latency (c=1, one keep-alive connection) alone, then while another uid
//! floods the service (a) with 10 connections looping requests (all admitted: the server's
//! fairness among connections), (b) with 30 (`--flood-conns`): the 20 over the limit are closed
//! by the throttle and reopened at once, a connection storm. Prints p50/p99 and req/s of the
//! victim, its share (victim req/s ÷ req/s of one admitted flood connection; 1.0 = an equal
//! share), and p99 against the stated bound; never asserts on time.
//!
//! The bound: victim p99 under either flood ≤ 50 ms. The throttle caps the server's work at
//! max_requests + 1 connections, each answered in turn (11 × a request's service time: ~1 ms
//! here); what remains is CPU: the flooder is local (a unix socket) and its 30 client threads
//! share the machine's cores with the server's 2, so the victim also waits for the scheduler
//! (CFS periods of several ms on 2 cores). 50 ms is that allowance; a server that served the
//! flood before the victim would exceed it by orders of magnitude.

use std::path::Path;
use std::time::Duration;

use aziot_tests::load::{ClientProc, Kind, Tally, Target, FLOOD_UID, KINDS};

const MAX_REQUESTS: usize = 10;
/// Victim p99 under the flood, µs.
const BOUND_US: f64 = 50_000.0;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if aziot_tests::load::client_main(&args).is_some() {
        return;
    }
    if args.first().map(String::as_str) != Some("fairness") {
        eprintln!(
            "usage: load-bench fairness [--duration SECS] [--services keyd,certd,identityd,tpmd] [--flood-conns N]"
        );
        std::process::exit(2);
    }
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let duration = Duration::from_secs_f64(value("--duration").map_or(3.0, |s| s.parse().expect("--duration SECS")));
    let storm: usize = value("--flood-conns").map_or(3 * MAX_REQUESTS, |s| s.parse().expect("--flood-conns N"));
    let kinds: Vec<Kind> = match value("--services") {
        Some(list) => {
            list.split(',').map(|n| Kind::from_name(n).unwrap_or_else(|| panic!("unknown service {n}"))).collect()
        }
        None => KINDS.to_vec(),
    };
    assert!(nix::unistd::geteuid().is_root(), "load-bench starts brokers and switches uids: run it as root");
    let bin = std::env::current_exe().expect("current_exe");
    let warmup = Duration::from_millis(500);
    println!(
        "load-bench fairness: victim uid c=1 alone, then while uid {FLOOD_UID} floods with {MAX_REQUESTS} and {storm} connections (max_requests {MAX_REQUESTS}); {duration:?} per row"
    );
    println!("  aziotd: {}", aziot_tests::keyd::aziotd_bin().display());
    let mut rows = Vec::new();
    for kind in kinds {
        let target = Target::start(kind, None, "info");
        let alone = victim(&bin, &target, warmup, duration);
        println!("  {:<9} alone:            {alone}", kind.name());
        for conns in [MAX_REQUESTS, storm] {
            let mut flooder = ClientProc::spawn(
                &bin,
                FLOOD_UID,
                &["flood".into(), target.socket.display().to_string(), conns.to_string(), req(&target)],
            );
            flooder.line();
            let flooded = victim(&bin, &target, warmup, duration);
            let tally = Tally::from_json(&flooder.finish()["tally"]);
            // The flood ran for the victim's warm-up + measured window (and a little more).
            let per_conn =
                tally.answered_total() as f64 / (warmup + duration).as_secs_f64() / MAX_REQUESTS.min(conns) as f64;
            let share = flooded.rps / per_conn;
            let verdict = if flooded.p99_us <= BOUND_US { "met" } else { "NOT met" };
            println!(
                "  {:<9} flood of {conns:>2}:   {flooded} | share {share:.2} | p99 x{:.1} alone (bound {:.0} ms: {verdict}) | flooder: {tally}",
                kind.name(),
                flooded.p99_us / alone.p99_us,
                BOUND_US / 1000.0,
            );
            rows.push((kind, conns, alone, flooded, share));
        }
    }
    println!(
        "summary (victim c=1; share = victim req/s / one admitted flood connection's req/s; bound p99 <= {:.0} ms):",
        BOUND_US / 1000.0
    );
    for (kind, conns, alone, flooded, share) in rows {
        println!(
            "  {:<9} flood {conns:>2}: p50 {:>8.1} -> {:>8.1} µs, p99 {:>8.1} -> {:>8.1} µs ({}), share {share:.2}",
            kind.name(),
            alone.p50_us,
            flooded.p50_us,
            alone.p99_us,
            flooded.p99_us,
            if flooded.p99_us <= BOUND_US { "met" } else { "NOT met" }
        );
    }
}

/// The victim's figures.
#[derive(Clone, Copy)]
struct Figures {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

impl std::fmt::Display for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:>8.1} µs  p99 {:>8.1} µs  {:>6.0} req/s  errors {}",
            self.p50_us, self.p99_us, self.rps, self.errors
        )
    }
}

fn req(target: &Target) -> String {
    String::from_utf8(target.request.clone()).expect("ASCII request")
}

/// The victim's closed loop (c=1) in a client process as its uid.
fn victim(bin: &Path, target: &Target, warmup: Duration, duration: Duration) -> Figures {
    let args = [
        "loop".to_owned(),
        target.socket.display().to_string(),
        "1".into(),
        warmup.as_millis().to_string(),
        duration.as_millis().to_string(),
        req(target),
    ];
    let v = ClientProc::spawn(bin, target.victim_uid, &args).line();
    let f = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k} in {v}"));
    Figures { rps: f("rps"), p50_us: f("p50_us"), p99_us: f("p99_us"), errors: v["errors"].as_u64().expect("errors") }
}
