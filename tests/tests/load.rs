//! The load suite (issue 17 §3), for keyd, certd, identityd and tpmd (on swtpm), each through
//! its broker with a confined worker:
//!
//! * per-uid fairness: one uid floods a service with 3 × `max_requests` connections looping
//!   requests; the throttle (spec common-http §7.3) closes its connections over the limit without
//!   an HTTP response and logs `Max simultaneous connections reached for user <uid>`, while every
//!   request of another uid is served. (The latency figures are `load-bench fairness`'s: a
//!   benchmark, not an assertion.)
//! * 1,000 concurrent connections from one uid: with `max_requests` raised they are all served
//!   and held, with the default 10 exactly 10 are served and 990 closed unanswered; either way
//!   another uid is served while they are held, the worker is the same process after, and its
//!   descriptor count returns to its baseline once they close.
//! * the accept loop at EMFILE (the shared server, through keyd): it neither dies nor spins, and
//!   serves the waiting connections once descriptors are free again.
//!
//! Services run with the soft RLIMIT_NOFILE a systemd unit gets (1024; the hard limit is left):
//! the worker's own limit comes from its policy (`[[rlimit]] nofile`, checked here).
//!
//! The clients of other uids are `load-bench` processes (tests/src/bin/load-bench.rs, modes of
//! aziot_tests::load::client_main) running as that uid.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aziot_tests::keyd::exchange_as;
use aziot_tests::load::{
    cpu_ticks, exchange, fd_count, nofile_limits, settled_fd_count, wait_fds_at_most, ClientProc, Kind, Outcome, Tally,
    Target, FLOOD_UID,
};

const DEFAULT_MAX_REQUESTS: u64 = 10;
/// How long a closed connection may take to leave the worker's descriptor table.
const RELEASE: Duration = Duration::from_secs(10);

fn load_bench() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_load-bench"))
}

/// The soft RLIMIT_NOFILE systemd gives a unit (DefaultLimitNOFILE=1024:524288), so that the
/// brokers (and through them the workers) start as in production; the hard limit is unchanged.
fn systemd_like_nofile() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        setrlimit(Resource::RLIMIT_NOFILE, 1024.min(hard), hard).expect("setrlimit");
    });
}

fn start(kind: Kind, max_requests: Option<usize>) -> Target {
    systemd_like_nofile();
    let target = Target::start(kind, max_requests, "info");
    // Warm: the victim is answered before anything is counted.
    victim_served(&target, "before the load");
    target
}

fn request(target: &Target) -> String {
    String::from_utf8(target.request.clone()).expect("ASCII request")
}

/// One fresh connection as the victim uid is answered 200.
#[track_caller]
fn victim_served(target: &Target, when: &str) {
    let r = exchange_as(target.victim_uid, &target.socket, &target.request).unwrap_or_else(|e| {
        panic!("{}: uid {} not served {when}: {e}\n{}", target.name(), target.victim_uid, tail(target))
    });
    assert_eq!(r.status, 200, "{}: uid {} {when}: {r:?}", target.name(), target.victim_uid);
}

fn tail(target: &Target) -> String {
    let log = target.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

#[track_caller]
fn back_to_baseline(target: &Target, pid: i32, baseline: usize, after: &str) {
    assert_eq!(target.worker_pid(), pid, "{}: the worker was replaced ({after})\n{}", target.name(), tail(target));
    if let Err(n) = wait_fds_at_most(pid, baseline, RELEASE) {
        panic!("{}: worker fds {n} > baseline {baseline} {RELEASE:?} after {after}", target.name());
    }
}

fn flooding_uid_is_throttled_and_another_uid_is_served(kind: Kind) {
    let target = start(kind, None);
    let pid = target.worker_pid();
    let baseline = settled_fd_count(pid);
    let sock = target.socket.display().to_string();

    // The flood: 30 connections of FLOOD_UID looping requests (default max_requests: 10).
    let conns = (3 * DEFAULT_MAX_REQUESTS).to_string();
    let mut flooder =
        ClientProc::spawn(&load_bench(), FLOOD_UID, &["flood".into(), sock.clone(), conns, request(&target)]);
    flooder.line();
    let throttled = format!("Max simultaneous connections reached for user {FLOOD_UID}");
    assert!(
        target.wait_log(&throttled, Duration::from_secs(10)),
        "{}: no {throttled:?}\n{}",
        target.name(),
        tail(&target)
    );
    // Meanwhile the victim: 2 keep-alive connections looping for 1.5 s; every request answered 200.
    let v = ClientProc::spawn(
        &load_bench(),
        target.victim_uid,
        &["loop".into(), sock.clone(), "2".into(), "100".into(), "1500".into(), request(&target)],
    )
    .line();
    let flood = Tally::from_json(&flooder.finish()["tally"]);
    println!("{}: victim {v}; flooder {flood}", target.name());
    assert_eq!(v["errors"], 0, "{}: a request of uid {} was not answered 200: {v}", target.name(), target.victim_uid);
    assert!(v["requests"].as_u64() > Some(0), "{}: the victim got nothing done: {v}", target.name());
    assert!(flood.answered_total() > 0, "{}: the flooder's admitted connections are served: {flood}", target.name());
    assert!(flood.unanswered > 0, "{}: connections over the limit are closed unanswered: {flood}", target.name());
    assert_eq!(flood.failed, 0, "{}: a flood connection neither answered nor closed cleanly: {flood}", target.name());
    let victim_throttled = format!("Max simultaneous connections reached for user {}\n", target.victim_uid);
    assert!(!target.log().contains(&victim_throttled), "{}: the victim was throttled", target.name());
    back_to_baseline(&target, pid, baseline, "the flood");

    // 1,000 connections of one uid at the default limit: exactly 10 served (and held), 990 closed
    // without a response; another uid is served meanwhile.
    let mut holder =
        ClientProc::spawn(&load_bench(), FLOOD_UID, &["hold".into(), sock, "1000".into(), request(&target)]);
    let held = Tally::from_json(&holder.line()["tally"]);
    assert_eq!(
        (held.answered_total(), held.unanswered, held.failed),
        (DEFAULT_MAX_REQUESTS, 1000 - DEFAULT_MAX_REQUESTS, 0),
        "{}: 1,000 connections of one uid at max_requests 10: {held}",
        target.name()
    );
    victim_served(&target, "while 1,000 connections of another uid are open");
    holder.finish();
    back_to_baseline(&target, pid, baseline, "1,000 connections at the default limit closed");
    victim_served(&target, "after the load");
}

fn thousand_connections_are_served_and_released(kind: Kind) {
    let target = start(kind, Some(2000));
    let pid = target.worker_pid();
    let baseline = settled_fd_count(pid);
    let (soft, hard) = nofile_limits(pid);
    println!("{}: worker RLIMIT_NOFILE {soft}/{hard}, {baseline} fds at rest", target.name());
    assert!(
        soft >= 1000 + baseline as u64,
        "{}: the worker's soft RLIMIT_NOFILE {soft} cannot hold 1,000 connections beside its {baseline} fds",
        target.name()
    );

    let mut holder = ClientProc::spawn(
        &load_bench(),
        FLOOD_UID,
        &["hold".into(), target.socket.display().to_string(), "1000".into(), request(&target)],
    );
    let held = Tally::from_json(&holder.line()["tally"]);
    assert_eq!((held.answered_total(), held.unanswered, held.failed), (1000, 0, 0), "{}: {held}", target.name());
    let during = fd_count(pid);
    assert!(
        during >= baseline + 1000,
        "{}: {during} fds while 1,000 connections are held (baseline {baseline})",
        target.name()
    );
    victim_served(&target, "while 1,000 connections of another uid are held");
    holder.finish();
    back_to_baseline(&target, pid, baseline, "1,000 connections closed");
    victim_served(&target, "after 1,000 connections");
    println!("{}: {baseline} -> {during} -> {} fds", target.name(), settled_fd_count(pid));
}

/// The shared accept loop (ipc/src/server.rs) at the worker's descriptor limit, through keyd: the
/// broker is started with RLIMIT_NOFILE 48 (a wrapper's `ulimit -n`; lowering another process's
/// limit needs CAP_SYS_RESOURCE, which containers often lack), so the worker's policy limit
/// (4096) is capped at 48. 60 clients connect, each asking for a key whose file keyd opens per
/// request: those the worker admits are answered (never a 500 for want of a descriptor) and keep
/// their connections open; the others wait in the listen backlog, the loop idle, and are answered
/// once connections close. (Before the budget, the loop accepted up to EMFILE and the requests
/// of the last connections failed to open the key file: 500.)
#[test]
fn at_the_descriptor_limit_connections_wait_and_no_request_fails() {
    if !aziot_tests::require_deps(&aziot_tests::keyd::harness_deps()) {
        return;
    }
    const LIMIT: u64 = 48;
    const CLIENTS: usize = 60;
    let dir = aziot_tests::keyd::TempDir::new("load-emfile");
    let wrapper = dir.path().join("aziotd-nofile");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nulimit -n {LIMIT}\nexec '{}' \"$@\"\n", aziot_tests::keyd::aziotd_bin().display()),
    )
    .expect("write the wrapper");
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let keyd = aziot_tests::keyd::Keyd::builder().bin(wrapper).log_level("info").extra("max_requests = 100").start();
    keyd.api(aziot_tests::V2021).import_key("load", &[9; 32]);
    let req = aziot_tests::http::build_request("GET", "/key/load?api-version=2021-05-01", None);
    let pid = keyd.worker_pid();
    assert_eq!(
        nofile_limits(pid),
        (LIMIT, LIMIT),
        "the worker's limit is its policy's capped by the broker's hard limit"
    );
    let baseline = settled_fd_count(pid);

    let (done, release) = (Arc::new(AtomicUsize::new(0)), Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (sock, req, done, release) =
                (keyd.socket().to_path_buf(), req.clone(), Arc::clone(&done), Arc::clone(&release));
            std::thread::spawn(move || {
                let (outcome, conn) = match aziot_tests::http::Conn::connect(&sock) {
                    Ok(mut c) => (exchange(&mut c, &req), Some(c)),
                    Err(e) => (Outcome::Failed(format!("connect: {e}")), None),
                };
                done.fetch_add(1, Ordering::SeqCst);
                // Answered connections stay open (holding the worker's descriptors) until released.
                while !release.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                drop(conn);
                outcome
            })
        })
        .collect();
    // The worker admits its descriptor limit less a reserve (ipc::server::connection_budget: 48
    // less 32 = 16 connections); the others wait in the listen backlog, never accepted into a
    // descriptor table too full to open the key file their request needs.
    assert!(
        keyd.wait_log("connections open, as many as this worker's descriptor limit allows", Duration::from_secs(10)),
        "the worker never reached its connection budget\n{}",
        keyd.log()
    );
    // One second at the budget with connections waiting: the loop waits instead of spinning.
    let ticks_per_s = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as u64;
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(pid) - before;
    let answered = done.load(Ordering::SeqCst);
    println!("keyd at its budget: {used} of {ticks_per_s} CPU ticks in 1 s; {answered} of {CLIENTS} clients answered, the rest waiting");
    assert!(answered > 0 && answered <= 16, "{answered} of {CLIENTS} answered at a limit of {LIMIT} descriptors");
    assert!(used * 5 < ticks_per_s, "the worker used {used} of {ticks_per_s} ticks in 1 s at its budget: spinning");
    assert_eq!(keyd.worker_pid(), pid, "the worker died at its budget\n{}", keyd.log());

    // The answered clients close; the waiting ones are then accepted and answered.
    release.store(true, Ordering::SeqCst);
    let outcomes: Vec<Outcome> = clients.into_iter().map(|c| c.join().expect("client")).collect();
    assert!(outcomes.iter().all(|o| *o == Outcome::Answered(200)), "at and after the budget: {outcomes:?}");
    assert!(!keyd.log().contains("Too many open files"), "a descriptor ran out\n{}", keyd.log());
    assert_eq!(keyd.worker_pid(), pid, "the worker was replaced\n{}", keyd.log());
    if let Err(n) = wait_fds_at_most(pid, baseline, RELEASE) {
        panic!("worker fds {n} > baseline {baseline} after the budget was reached");
    }
    let r = aziot_tests::http::raw_once(keyd.socket(), &req).expect("a request after the budget was reached");
    assert_eq!(r.status, 200, "{r:?}");
}

macro_rules! per_service {
    ($($module:ident => $kind:expr),* $(,)?) => {
        $(
            mod $module {
                #[test]
                fn flooding_uid_is_throttled_and_another_uid_is_served() {
                    if !aziot_tests::require_deps(&$kind.deps()) {
                        return;
                    }
                    super::flooding_uid_is_throttled_and_another_uid_is_served($kind)
                }
                #[test]
                fn thousand_connections_are_served_and_released() {
                    if !aziot_tests::require_deps(&$kind.deps()) {
                        return;
                    }
                    super::thousand_connections_are_served_and_released($kind)
                }
            }
        )*
    };
}

per_service!(keyd => super::Kind::Keyd, certd => super::Kind::Certd, identityd => super::Kind::Identityd, tpmd => super::Kind::Tpmd);
