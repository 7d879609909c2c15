//! The broker/worker split of `aziotd aziot-keyd`, seen from outside: the process topology and
//! what /proc says about each side, `aziotctl policy audit` on a normal and on a deliberately
//! weakened service, the supervision of the worker (kill -9 under load, a seccomp kill) and
//! SIGTERM. Runs in both activation modes (`AZIOT_TEST_ACTIVATION`).

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aziot_tests::api::*;
use aziot_tests::crypto::{b64, random};
use aziot_tests::http::{build_request, Conn};
use aziot_tests::keyd::{aziotctl_bin, aziotd_bin, fds_of, listening_unix_inodes, service_user};
use aziot_tests::Keyd;
use serde_json::json;

mod inject;
#[cfg(target_arch = "x86_64")]
use inject::{inject_forbidden_syscall, FORBIDDEN};

/// The fields of /proc/<pid>/task/<tid>/status this suite looks at.
#[derive(Debug)]
struct Task {
    tid: i32,
    ppid: i32,
    uid: Vec<u32>,
    gid: Vec<u32>,
    /// CapInh, CapPrm, CapEff, CapBnd, CapAmb
    caps: [(String, u64); 5],
    no_new_privs: Option<u32>,
    seccomp: Option<u32>,
    sig_blk: u64,
    sig_ign: u64,
}

fn task(pid: i32, tid: i32) -> Option<Task> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/task/{tid}/status"))
    };
    let nums = |name: &str| field(name).split_whitespace().map(|n| n.parse().expect("number")).collect();
    let hex = |name: &str| u64::from_str_radix(field(name), 16).expect("hex");
    let caps = ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"].map(|c| (c.to_owned(), hex(c)));
    Some(Task {
        tid,
        ppid: field("PPid").parse().expect("ppid"),
        uid: nums("Uid"),
        gid: nums("Gid"),
        caps,
        no_new_privs: field("NoNewPrivs").parse().ok(),
        seccomp: field("Seccomp").parse().ok(),
        sig_blk: hex("SigBlk"),
        sig_ign: hex("SigIgn"),
    })
}

/// Every thread of `pid` (main thread first).
fn tasks(pid: i32) -> Vec<Task> {
    let mut tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/task: {e}"))
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable_by_key(|t| (*t != pid, *t));
    tids.into_iter().filter_map(|t| task(pid, t)).collect()
}

fn alive(pid: i32) -> bool {
    // A zombie still has a /proc entry; it is not running any more.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}

/// SIGKILLs `pid` on drop if it is still running: a worker that outlives its broker must not
/// outlive the test either.
struct KillOnDrop(i32);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if alive(self.0) {
            // SAFETY: plain syscall on a pid this test started (through the broker).
            unsafe {
                libc::kill(self.0, libc::SIGKILL);
            }
        }
    }
}

/// Unix sockets of the current network namespace: sockfs inode → (listening, type).
fn unix_sockets() -> std::collections::HashMap<u64, (bool, u32)> {
    let table = std::fs::read_to_string("/proc/net/unix").expect("/proc/net/unix");
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            let kind = u32::from_str_radix(f.get(4)?, 16).ok()?;
            Some((f.get(6)?.parse().ok()?, (flags & 0x10000 != 0, kind)))
        })
        .collect()
}

const SOCK_STREAM: u32 = 1;
const SOCK_SEQPACKET: u32 = 5;

/// Checks every descriptor of the broker or worker against what it must hold; returns the
/// unexpected ones (empty = all expected).
fn unexpected_fds(keyd: &Keyd, pid: i32, worker: bool) -> Vec<String> {
    let socks = unix_sockets();
    let listener = listening_unix_inodes(keyd.socket());
    let log = keyd.log_path().to_string_lossy().into_owned();
    let home = keyd.home().to_string_lossy().into_owned();
    let mut bad = Vec::new();
    let (mut control, mut listeners, mut homes) = (BTreeSet::new(), 0, 0);
    for (fd, link) in fds_of(pid) {
        let ok = match (fd, link.as_str()) {
            // stdio as the harness gave it: /dev/null in, the log file out
            (0, "/dev/null") => true,
            (1 | 2, l) if l == log => true,
            (_, l) if l.starts_with("socket:[") => {
                let inode: u64 = l[8..l.len() - 1].parse().expect("socket inode");
                match socks.get(&inode) {
                    // the one listening socket, bound to the configured path
                    Some((true, SOCK_STREAM)) if listener.contains(&inode) => {
                        listeners += 1;
                        true
                    }
                    // the hand-off/control channel between broker and worker
                    Some((false, SOCK_SEQPACKET)) => {
                        control.insert(inode);
                        true
                    }
                    // a client connection being served (the worker only; transient)
                    Some((false, SOCK_STREAM)) => worker,
                    _ => false,
                }
            }
            // the state directory handed over (the worker may have a key file open beneath it)
            (_, l) if l == home => {
                homes += 1;
                true
            }
            (_, l) if worker && l.starts_with(&format!("{home}/")) => true,
            // the broker's signalfd; the worker's async runtime
            (_, "anon_inode:[signalfd]") => !worker,
            (_, "anon_inode:[eventpoll]" | "anon_inode:[eventfd]" | "anon_inode:[timerfd]") => worker,
            _ => false,
        };
        if !ok {
            bad.push(format!("fd {fd} -> {link}"));
        }
    }
    if listeners != 1 {
        bad.push(format!("{listeners} descriptors of the listening socket {listener:?} (expected 1)"));
    }
    if control.len() != 1 {
        bad.push(format!("{} control sockets {control:?} (expected 1)", control.len()));
    }
    if homes == 0 {
        bad.push(format!("no descriptor of the state directory {home}"));
    }
    bad
}

/// `ps`/proc: a root broker (the process the harness started) whose only child is the worker,
/// running as aziotks with no capability in any set, NoNewPrivs and a seccomp filter on every
/// thread, and both holding only the descriptors they need.
#[test]
fn topology_broker_root_worker_confined() {
    let keyd = Keyd::start("");
    println!("activation mode: {}", keyd.activation().name());
    keyd.api(V2021).create_key("k", "sign");
    let broker = i32::try_from(keyd.pid()).expect("pid");
    let worker = keyd.worker_pid();
    let (ks_uid, ks_gid) = service_user();

    // the broker is the process we started (exec'ed by systemd-socket-activate in that mode)
    let exe = std::fs::read_link(format!("/proc/{broker}/exe")).expect("broker exe");
    // (a rebuild while the suite runs replaces the file: " (deleted)")
    let exe = exe.to_string_lossy().trim_end_matches(" (deleted)").to_owned();
    let want = aziotd_bin().canonicalize().expect("canonical aziotd");
    assert_eq!(Path::new(&exe), want, "the broker runs aziotd");
    let status = keyd.status().expect("status file");
    assert_eq!(status["broker_pid"], json!(broker), "{status}");
    assert_eq!(status["restarts"], json!(0), "{status}");
    // the service is exactly these two processes
    let mut pids: Vec<i32> = keyd.pids().into_iter().map(|p| p as i32).collect();
    pids.sort_unstable();
    let mut want = vec![broker, worker];
    want.sort_unstable();
    assert_eq!(pids, want, "processes of the service's group (broker {broker}, worker {worker})");

    // ps agrees
    let out = Command::new("ps")
        .args(["-o", "user=,pid=,ppid=,args=", "-p"])
        .arg(format!("{broker},{worker}"))
        .output()
        .expect("ps (procps) must be installed");
    let ps = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{ps}");
    let line = |pid: i32| {
        ps.lines()
            .map(str::split_whitespace)
            .map(Iterator::collect::<Vec<_>>)
            .find(|f| f.get(1) == Some(&pid.to_string().as_str()))
            .unwrap_or_else(|| panic!("no ps line for {pid}:\n{ps}"))
    };
    let (b, w) = (line(broker), line(worker));
    assert_eq!(b[0], "root", "broker user:\n{ps}");
    assert!(b[3..].join(" ").ends_with("aziotd aziot-keyd"), "broker command:\n{ps}");
    assert_eq!(w[0], "aziotks", "worker user:\n{ps}");
    assert_eq!(w[2], broker.to_string(), "the worker's parent is the broker:\n{ps}");
    assert_eq!(w[3..].join(" "), "aziotd --worker", "worker command:\n{ps}");

    // /proc, thread by thread
    let b_tasks = tasks(broker);
    assert_eq!(b_tasks[0].uid, vec![0; 4], "broker uids");
    let w_tasks = tasks(worker);
    assert!(w_tasks.len() > 1, "the worker serves with threads: {w_tasks:?}");
    for t in &w_tasks {
        let what = format!("worker {worker} thread {}", t.tid);
        assert_eq!(t.ppid, broker, "{what}: PPid");
        assert_eq!(t.uid, vec![ks_uid; 4], "{what}: Uid (real, effective, saved, fs)");
        assert_eq!(t.gid, vec![ks_gid; 4], "{what}: Gid");
        for (name, value) in &t.caps {
            assert_eq!(*value, 0, "{what}: {name} = {value:#x}");
        }
        assert_eq!(t.no_new_privs, Some(1), "{what}: NoNewPrivs");
        assert_eq!(t.seccomp, Some(2), "{what}: Seccomp (2 = filter)");
    }

    // descriptors: transient client connections may need a moment to go away
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let bad_b = unexpected_fds(&keyd, broker, false);
        let bad_w = unexpected_fds(&keyd, worker, true);
        if bad_b.is_empty() && bad_w.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "unexpected descriptors\n broker {broker}: {bad_b:?}\n  all: {:?}\n worker {worker}: {bad_w:?}\n  all: {:?}",
            fds_of(broker),
            fds_of(worker)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // broker and worker share the one listening socket
    let listener = listening_unix_inodes(keyd.socket());
    let link = format!("socket:[{}]", listener[0]);
    for pid in [broker, worker] {
        assert!(fds_of(pid).iter().any(|(_, l)| *l == link), "{pid} does not hold {link}");
    }
}

/// Runs `aziotctl policy audit [--json] --run-dir <dir>`: (exit code, stdout, stderr).
fn audit(run_dir: &Path, json: bool) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(aziotctl_bin());
    cmd.args(["policy", "audit"]);
    if json {
        cmd.arg("--json");
    }
    let out = cmd.arg("--run-dir").arg(run_dir).output().expect("run aziotctl");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn policy_audit_passes_on_a_normal_keyd() {
    let keyd = Keyd::start("");
    println!("activation mode: {}", keyd.activation().name());
    keyd.api(V2021).create_key("k", "sign");
    let (code, out, err) = audit(keyd.dir(), false);
    assert_eq!(code, Some(0), "audit of a normal keyd\nstdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("keyd: ok"), "{out}");
    let (code, out, err) = audit(keyd.dir(), true);
    assert_eq!(code, Some(0), "audit --json\nstdout:\n{out}\nstderr:\n{err}");
    let reports: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let reports = reports.as_array().expect("an array of reports");
    assert_eq!(reports.len(), 1, "{out}");
    let r = &reports[0];
    assert_eq!((&r["service"], &r["ok"]), (&json!("keyd"), &json!(true)), "{out}");
    let findings = r["findings"].as_array().expect("findings");
    assert!(!findings.is_empty());
    assert!(findings.iter().all(|f| f["ok"] == json!(true)), "{out}");
    // it really looked at this worker
    let worker = keyd.worker_pid();
    assert!(
        findings.iter().any(|f| f["subject"] == json!(format!("worker {worker}")) && f["check"] == json!("seccomp program")),
        "{out}"
    );
}

/// The deliberately weakened switch: the worker runs without seccomp, and the audit says so.
#[test]
fn policy_audit_reports_seccomp_off() {
    let keyd = Keyd::start("[sandbox]\nallow_degraded = true\nseccomp = \"off\"\n");
    println!("activation mode: {}", keyd.activation().name());
    keyd.api(V2021).create_key("k", "sign");
    let worker = keyd.worker_pid();
    // really off, not just reported off
    for t in tasks(worker) {
        assert_eq!(t.seccomp, Some(0), "worker thread {} runs without seccomp", t.tid);
    }
    let status = keyd.status().expect("status");
    assert_eq!((&status["seccomp_mode"], &status["degraded"]), (&json!("off"), &json!(true)), "{status}");

    let (code, out, err) = audit(keyd.dir(), false);
    assert!(matches!(code, Some(c) if c != 0), "the audit must fail ({code:?})\n{out}\n{err}");
    assert!(
        out.lines().any(|l| l.contains("DEVIATION") && l.contains(&format!("worker {worker}")) && l.contains("seccomp")),
        "a DEVIATION line naming the worker's seccomp:\n{out}"
    );
    let (code, out, _) = audit(keyd.dir(), true);
    assert!(matches!(code, Some(c) if c != 0), "--json exit code {code:?}");
    let reports: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let r = &reports[0];
    assert_eq!(r["ok"], json!(false), "{out}");
    let deviations: Vec<&serde_json::Value> =
        r["findings"].as_array().expect("findings").iter().filter(|f| f["ok"] == json!(false)).collect();
    assert!(
        deviations.iter().any(|f| f["check"] == json!("seccomp program")
            && f["actual"].as_str().is_some_and(|a| a.contains("none installed"))),
        "the seccomp program deviation: {deviations:#?}"
    );
    assert!(
        deviations.iter().any(|f| f["check"] == json!("seccomp") && f["subject"] == json!(format!("worker {worker}"))),
        "the per-thread Seccomp deviation: {deviations:#?}"
    );
}

/// `seccomp = "off"` without `allow_degraded` is a configuration error: no worker starts.
#[test]
fn seccomp_off_without_allow_degraded_refuses_to_start() {
    println!("activation mode: {}", aziot_tests::keyd::Activation::from_env().name());
    for extra in ["[sandbox]\nseccomp = \"off\"\n", "[sandbox]\nallow_degraded = false\nseccomp = \"off\"\n"] {
        let (status, log) = Keyd::builder().extra(extra).start_expecting_exit();
        assert_eq!(status.code(), Some(1), "{extra}\n{log}");
        assert!(
            log.contains("invalid [sandbox] config: seccomp = \"off\" weakens the sandbox; set allow_degraded = true to accept that"),
            "a clear message:\n{log}"
        );
        assert!(!log.contains("ready (sandbox report"), "no worker may have started:\n{log}");
    }
}

const CLIENTS: usize = 8;

#[derive(Default)]
struct ClientStats {
    ok_before: usize,
    ok_after: usize,
    refused: usize,
    connect_errors: Vec<String>,
    /// errors of an exchange on an established connection (the peer went away)
    exchange_errors: Vec<String>,
    bad_status: Vec<u16>,
}

/// kill -9 of the worker while 8 clients loop HMAC signs (each on its own keep-alive
/// connection, reconnecting after an error): the broker restarts it, no connection attempt is
/// ever refused, only in-flight exchanges fail, and every client is served again.
///
/// The bound on failed exchanges: a client has one connection at a time. The connection
/// accepted by the killed worker dies with it (EOF, ECONNRESET or EPIPE on the request in
/// flight or the next one): one error per client. Its reconnection goes to the listening
/// socket, which the broker holds open across the restart, so it waits in the backlog and is
/// accepted by the new worker; it cannot have been accepted by the old one, since the client
/// only sees the error once the old worker's descriptors are closed, i.e. after its last
/// thread is gone. Hence ≤ 1 failed exchange per client, ≤ 8 in all, and 0 refusals.
#[test]
fn worker_kill9_under_load_is_restarted_without_refusals() {
    let keyd = Keyd::start("max_requests = 64\n");
    println!("activation mode: {}", keyd.activation().name());
    let api = keyd.api(V2021);
    let h = api.import_key("load", &random(32));
    let body = serde_json::to_vec(&json!({"keyHandle": h, "algorithm": "HMAC-SHA256",
        "parameters": {"message": b64(b"under load")}}))
    .expect("json");
    let req = build_request("POST", &api.target("/sign"), Some(&body));
    let broker = i32::try_from(keyd.pid()).expect("pid");
    let old = keyd.worker_pid();

    let stop = Arc::new(AtomicBool::new(false));
    let restarted = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    // per client: exchanges served by the new worker
    let served_after: Arc<Vec<AtomicUsize>> = Arc::new((0..CLIENTS).map(|_| AtomicUsize::new(0)).collect());
    let mut threads = Vec::new();
    for client in 0..CLIENTS {
        let (stop, restarted, served) = (Arc::clone(&stop), Arc::clone(&restarted), Arc::clone(&served));
        let served_after = Arc::clone(&served_after);
        let sock = keyd.socket().to_path_buf();
        let req = req.clone();
        threads.push(std::thread::spawn(move || {
            let mut st = ClientStats::default();
            let mut conn: Option<Conn> = None;
            while !stop.load(Ordering::Relaxed) {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => match Conn::connect(&sock) {
                        Ok(c) => {
                            c.set_read_timeout(Duration::from_secs(20)).expect("timeout");
                            conn.insert(c)
                        }
                        Err(e) => {
                            if e.raw_os_error() == Some(libc::ECONNREFUSED) {
                                st.refused += 1;
                            } else {
                                st.connect_errors.push(e.to_string());
                            }
                            std::thread::sleep(Duration::from_millis(1));
                            continue;
                        }
                    },
                };
                match c.send_raw(&req).and_then(|()| c.read_response()) {
                    Ok(r) if r.status == 200 => {
                        if restarted.load(Ordering::Relaxed) {
                            st.ok_after += 1;
                            served_after[client].fetch_add(1, Ordering::Relaxed);
                        } else {
                            st.ok_before += 1;
                        }
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        st.bad_status.push(r.status);
                        conn = None;
                    }
                    Err(e) => {
                        st.exchange_errors.push(format!("{:?}: {e}", e.kind()));
                        conn = None;
                    }
                }
            }
            st
        }));
    }
    // load is on: every client has been served a few times
    let deadline = Instant::now() + Duration::from_secs(20);
    while served.load(Ordering::Relaxed) < CLIENTS * 10 {
        assert!(Instant::now() < deadline, "clients not served before the kill\n{}", keyd.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    // SAFETY: plain syscall; `old` is the worker of the keyd this test started.
    assert_eq!(unsafe { libc::kill(old, libc::SIGKILL) }, 0, "kill -9 {old}");
    let status = keyd.wait_new_worker(old, Duration::from_secs(20));
    restarted.store(true, Ordering::Relaxed);
    let new = i32::try_from(status["worker_pid"].as_i64().expect("pid")).expect("pid");
    assert_eq!(status["restarts"], json!(1), "{status}");
    assert_eq!(status["broker_pid"], json!(broker), "same broker: {status}");
    // let every client be served by the new worker
    let after = served.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    while served.load(Ordering::Relaxed) < after + CLIENTS * 10 {
        assert!(Instant::now() < deadline, "clients not served after the restart\n{}", keyd.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    // and every single client among them
    while served_after.iter().any(|n| n.load(Ordering::Relaxed) == 0) {
        assert!(Instant::now() < deadline, "a client was not served after the restart\n{}", keyd.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    let stats: Vec<ClientStats> = threads.into_iter().map(|t| t.join().expect("client thread")).collect();

    let refused: usize = stats.iter().map(|s| s.refused).sum();
    let failed: usize = stats.iter().map(|s| s.exchange_errors.len()).sum();
    println!(
        "{CLIENTS} clients: served {} before / {} after the restart; refused {refused}; failed exchanges {failed}",
        stats.iter().map(|s| s.ok_before).sum::<usize>(),
        stats.iter().map(|s| s.ok_after).sum::<usize>()
    );
    for (i, s) in stats.iter().enumerate() {
        assert!(s.connect_errors.is_empty(), "client {i}: connect errors {:?}", s.connect_errors);
        assert!(s.bad_status.is_empty(), "client {i}: non-200 answers {:?}", s.bad_status);
        assert!(
            s.exchange_errors.len() <= 1,
            "client {i}: more than its one in-flight connection failed: {:?}",
            s.exchange_errors
        );
        for e in &s.exchange_errors {
            assert!(
                ["UnexpectedEof", "ConnectionReset", "BrokenPipe"].iter().any(|k| e.starts_with(k)),
                "client {i}: a failure other than the peer going away: {e}"
            );
        }
        assert!(s.ok_after > 0, "client {i} was not served after the restart");
    }
    assert_eq!(refused, 0, "connect() was refused {refused} times: the listener must stay open");
    assert!(failed <= CLIENTS, "{failed} failed exchanges > {CLIENTS} in flight");
    assert!(alive(new) && !alive(old), "old worker {old} gone, new worker {new} running");
    let log = keyd.log();
    assert!(log.contains(&format!("worker {old} was killed by SIGKILL")), "{log}");
    assert!(log.contains(&format!("worker {new} of keyd restarted (restart #1)")), "{log}");
}

/// A worker that makes a forbidden syscall dies by SIGSYS (seccomp trap; the worker's SIGSYS
/// handler reports the syscall on the hand-off socket, then dies by SIGSYS) and the broker
/// names the syscall from that record, then restarts the worker.
///
/// How it is triggered, from outside and without weakening anything: the test (root, as
/// `aziotctl policy audit` does to dump the filters) ptraces the idle worker's main thread and
/// makes it execute `socket(AF_INET, SOCK_STREAM, 0)` at its own `syscall` instruction. The
/// kernel then applies the worker's real filter exactly as for a syscall the worker's own code
/// made, and the kernel fills the siginfo the handler reports — unlike `kill -SYS <worker>`,
/// which carries no syscall number (the broker then says so, and names none).
/// The same under the hardened unit's sandbox (no /dev/kmsg):
/// `broker_supervise.rs` `seccomp_death_is_named_under_the_units_sandbox`.
#[test]
fn worker_killed_by_seccomp_is_named_and_restarted() {
    #[cfg(not(target_arch = "x86_64"))]
    panic!("the syscall injection of this test is written for x86_64 only");
    #[cfg(target_arch = "x86_64")]
    {
        let keyd = Keyd::start("");
        println!("activation mode: {}", keyd.activation().name());
        let api = keyd.api(V2021);
        let h = api.create_key("k", "sign");
        let old = keyd.worker_pid();
        let (nr, name) = FORBIDDEN;
        inject_forbidden_syscall(old);
        assert!(wait_gone(old, Duration::from_secs(10)), "worker {old} survived a forbidden syscall");
        let status = keyd.wait_new_worker(old, Duration::from_secs(20));
        assert_eq!(status["restarts"], json!(1), "{status}");
        let line = format!("worker {old} was killed by seccomp (SIGSYS): forbidden syscall {nr} ({name})");
        assert!(keyd.wait_log(&line, Duration::from_secs(5)), "the broker logs `{line}`:\n{}", keyd.log());
        // and serves again, with the same keys
        assert_eq!(api.sign_hmac(&h, b"m").len(), 32);
    }
}

/// SIGTERM to the broker: it stops its worker, removes its status file and exits 0.
#[test]
fn sigterm_stops_worker_and_broker() {
    let mut keyd = Keyd::start("");
    println!("activation mode: {}", keyd.activation().name());
    keyd.api(V2021).create_key("k", "sign");
    let worker = keyd.worker_pid();
    let _guard = KillOnDrop(worker);
    assert!(keyd.status_path().exists());
    // The broker stops the worker with SIGTERM (SIGKILL only after a grace period): the worker
    // must be able to receive it — not ignored, and not blocked on every thread (a
    // process-directed signal blocked everywhere just stays pending).
    let term = 1u64 << (libc::SIGTERM - 1);
    let w_tasks = tasks(worker);
    assert!(
        w_tasks[0].sig_ign & term == 0 && w_tasks.iter().any(|t| t.sig_blk & term == 0),
        "SIGTERM is ignored or blocked in the worker: {:?}",
        w_tasks.iter().map(|t| (t.tid, format!("SigBlk {:#x} SigIgn {:#x}", t.sig_blk, t.sig_ign))).collect::<Vec<_>>()
    );
    let started = Instant::now();
    keyd.signal_broker(libc::SIGTERM);
    let status = keyd.wait_exit(Duration::from_secs(20));
    println!("broker exited {:?} after SIGTERM", started.elapsed());
    assert_eq!(status.code(), Some(0), "broker exit: {status}\n{}", keyd.log());
    assert!(!alive(worker), "worker {worker} still running after its broker exited");
    assert!(!keyd.status_path().exists(), "status file {} not removed", keyd.status_path().display());
    assert!(keyd.log().contains("received signal 15, stopping the worker"), "{}", keyd.log());
}
