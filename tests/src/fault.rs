//! Process faults, shared by every service's case in tests/tests/fault_process.rs: a worker
//! killed (-9) while [`CLIENTS`] clients loop a mix of requests, a broker killed (-9), and the
//! process helpers they need (liveness without zombies, parent pid).
//!
//! The clients are written from the spec (tests/src/http.rs), one keep-alive connection each,
//! reconnecting after an error; every answer is checked by the case's own [`Op::check`] (a 2xx
//! whose body is not what the service must return counts as garbage, and fails the test).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::http::{Conn, Response};

/// Concurrent clients of every load.
pub const CLIENTS: usize = 8;
/// Generous: how long a new worker may take to be named in the status file, and every client to
/// be served again (assertions are on behaviour; the time is printed, not asserted).
pub const ANSWERS_AGAIN_WITHIN: Duration = Duration::from_secs(30);
/// kill -9 of a broker: its worker must be gone within this (PR_SET_PDEATHSIG).
pub const WORKER_FOLLOWS_WITHIN: Duration = Duration::from_secs(1);

/// The checker of one kind of answer: `Err(what is wrong)` for anything but the right answer.
pub type Check = Arc<dyn Fn(&Response) -> Result<(), String> + Send + Sync>;

/// One request of a mix and how its answer is judged.
#[derive(Clone)]
pub struct Op {
    pub name: &'static str,
    /// The whole request (tests/src/http.rs `build_request`).
    pub request: Vec<u8>,
    pub check: Check,
}

impl Op {
    pub fn new(
        name: &'static str,
        request: Vec<u8>,
        check: impl Fn(&Response) -> Result<(), String> + Send + Sync + 'static,
    ) -> Op {
        Op { name, request, check: Arc::new(check) }
    }
}

/// `Ok` when `r` has status `want`, else what it was (with the body).
pub fn status_is(r: &Response, want: u16) -> Result<(), String> {
    if r.status == want {
        Ok(())
    } else {
        Err(format!("status {} (want {want}): {}", r.status, String::from_utf8_lossy(&r.body)))
    }
}

/// The JSON body of `r` after [`status_is`].
pub fn json_of(r: &Response, want: u16) -> Result<serde_json::Value, String> {
    status_is(r, want)?;
    serde_json::from_slice(&r.body).map_err(|e| format!("body is not JSON ({e}): {}", String::from_utf8_lossy(&r.body)))
}

/// The worker being killed, and how to see its successor.
pub struct Subject<'a> {
    /// For the printed figure: `keyd`, `certd`, ...
    pub service: &'static str,
    pub socket: PathBuf,
    /// The worker pid the status file names now.
    pub worker: i32,
    /// Waits (up to the given time) until the status file names a worker other than the given
    /// one; its pid. Panics after the deadline.
    pub wait_new_worker: &'a dyn Fn(i32, Duration) -> i32,
    /// The service's log (for failure messages).
    pub log: &'a dyn Fn() -> String,
}

#[derive(Default)]
struct ClientStats {
    ok_before: usize,
    ok_after: usize,
    refused: usize,
    connect_errors: Vec<String>,
    /// Exchanges that got no answer: `(kind: message)`.
    exchange_errors: Vec<String>,
    /// Answers that were not the right answer: `op: what`.
    garbage: Vec<String>,
}

/// What one kill under load showed.
#[derive(Debug)]
pub struct Outcome {
    pub new_worker: i32,
    /// From the kill to the first right answer on a connection opened after the kill.
    pub restart_to_serving: Duration,
    /// From the kill to the status file naming the new worker.
    pub restart_to_status: Duration,
    pub served_before: usize,
    pub served_after: usize,
    /// Exchanges that failed (every one an in-flight connection of the killed worker).
    pub failed: usize,
}

/// kill -9 of `subject.worker` while [`CLIENTS`] clients loop `ops` (client `i` starts at op
/// `i % ops.len()` and goes round), each on its own keep-alive connection, reconnecting after
/// an error or a `Connection: close`. Asserts, with every client's record in the message:
///
/// - no `connect()` is ever refused, nor fails in any other way (the broker holds the listening
///   socket across the restart: clients wait in its backlog);
/// - every answer is the right one ([`Op::check`]): no error status, no garbage, before or after;
/// - at most one exchange per client fails — its connection to the killed worker — and it fails
///   cleanly, as the peer going away (EOF, reset, broken pipe), never as a malformed answer;
/// - every client is served again by the new worker, and the old worker is gone.
///
/// Prints `<service>: restart-to-serving <ms> ms` (the figure; not asserted).
pub fn kill_worker_under_load(subject: &Subject<'_>, ops: Vec<Op>) -> Outcome {
    assert!(!ops.is_empty());
    let log = subject.log;
    let ops = Arc::new(ops);
    let stop = Arc::new(AtomicBool::new(false));
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let first_after: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let served = Arc::new(AtomicUsize::new(0));
    let served_after: Arc<Vec<AtomicUsize>> = Arc::new((0..CLIENTS).map(|_| AtomicUsize::new(0)).collect());
    let mut threads = Vec::new();
    for client in 0..CLIENTS {
        let (ops, stop, killed_at, first_after) =
            (Arc::clone(&ops), Arc::clone(&stop), Arc::clone(&killed_at), Arc::clone(&first_after));
        let (served, served_after) = (Arc::clone(&served), Arc::clone(&served_after));
        let sock = subject.socket.clone();
        threads.push(std::thread::spawn(move || {
            let mut st = ClientStats::default();
            // the connection, and whether it was opened after the kill
            let mut conn: Option<(Conn, bool)> = None;
            let mut next = client % ops.len();
            while !stop.load(Ordering::Relaxed) {
                let (c, opened_after_kill) = match conn.as_mut() {
                    Some(c) => c,
                    None => {
                        let after = killed_at.lock().unwrap_or_else(|p| p.into_inner()).is_some();
                        match Conn::connect(&sock) {
                            Ok(c) => {
                                c.set_read_timeout(ANSWERS_AGAIN_WITHIN).expect("read timeout");
                                conn.insert((c, after))
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
                        }
                    }
                };
                let op = &ops[next];
                next = (next + 1) % ops.len();
                match c.send_raw(&op.request).and_then(|()| c.read_response()) {
                    Ok(r) => {
                        if let Err(what) = (op.check)(&r) {
                            st.garbage.push(format!("{}: {what}", op.name));
                        } else if killed_at.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
                            st.ok_after += 1;
                            if *opened_after_kill {
                                served_after[client].fetch_add(1, Ordering::Relaxed);
                                let mut first = first_after.lock().unwrap_or_else(|p| p.into_inner());
                                first.get_or_insert_with(Instant::now);
                            }
                        } else {
                            st.ok_before += 1;
                        }
                        if st.garbage.is_empty() {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                        if r.connection_close() {
                            conn = None;
                        }
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
    let stop_clients = |threads: Vec<std::thread::JoinHandle<ClientStats>>| -> Vec<ClientStats> {
        stop.store(true, Ordering::Relaxed);
        threads.into_iter().map(|t| t.join().expect("client thread")).collect()
    };
    // load is on: every op has been answered a few times
    let want = CLIENTS * 3 * ops.len().max(1);
    let deadline = Instant::now() + ANSWERS_AGAIN_WITHIN;
    while served.load(Ordering::Relaxed) < want {
        if Instant::now() > deadline {
            let stats = stop_clients(threads);
            panic!("{}: clients not served before the kill: {}\n{}", subject.service, describe(&stats), log());
        }
        std::thread::sleep(Duration::from_millis(5));
    }

    let old = subject.worker;
    let kill_instant = Instant::now();
    *killed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(kill_instant);
    // SAFETY: plain syscall; `old` is the worker of a service this test started.
    assert_eq!(unsafe { libc::kill(old, libc::SIGKILL) }, 0, "kill -9 {old}");
    let new = (subject.wait_new_worker)(old, ANSWERS_AGAIN_WITHIN);
    let restart_to_status = kill_instant.elapsed();
    // every client served by the new worker, on a connection opened after the kill
    let deadline = Instant::now() + ANSWERS_AGAIN_WITHIN;
    while served_after.iter().any(|n| n.load(Ordering::Relaxed) < 2) {
        if Instant::now() > deadline {
            let stats = stop_clients(threads);
            panic!(
                "{}: a client was not served again within {ANSWERS_AGAIN_WITHIN:?} of the restart: {}\n{}",
                subject.service,
                describe(&stats),
                log()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let stats = stop_clients(threads);
    let restart_to_serving =
        first_after.lock().unwrap_or_else(|p| p.into_inner()).expect("served after the kill") - kill_instant;

    let refused: usize = stats.iter().map(|s| s.refused).sum();
    let failed: usize = stats.iter().map(|s| s.exchange_errors.len()).sum();
    let outcome = Outcome {
        new_worker: new,
        restart_to_serving,
        restart_to_status,
        served_before: stats.iter().map(|s| s.ok_before).sum(),
        served_after: stats.iter().map(|s| s.ok_after).sum(),
        failed,
    };
    println!(
        "{}: restart-to-serving {} ms (status file names the new worker after {} ms); {CLIENTS} clients, \
         {} ops: served {} before / {} after the kill; refused {refused}; failed exchanges {failed}",
        subject.service,
        restart_to_serving.as_millis(),
        restart_to_status.as_millis(),
        ops.len(),
        outcome.served_before,
        outcome.served_after,
    );
    let all = describe(&stats);
    for (i, s) in stats.iter().enumerate() {
        assert!(s.connect_errors.is_empty(), "{}: client {i}: connect errors: {all}\n{}", subject.service, log());
        assert!(s.garbage.is_empty(), "{}: client {i}: wrong answers: {all}\n{}", subject.service, log());
        assert!(
            s.exchange_errors.len() <= 1,
            "{}: client {i}: more than its one in-flight exchange failed: {all}\n{}",
            subject.service,
            log()
        );
        for e in &s.exchange_errors {
            assert!(
                ["UnexpectedEof", "ConnectionReset", "BrokenPipe"].iter().any(|k| e.starts_with(k)),
                "{}: client {i}: a failure other than the peer going away: {e}\n{all}",
                subject.service
            );
        }
    }
    assert_eq!(
        refused, 0,
        "{}: connect() refused {refused} times (the listener must stay open): {all}",
        subject.service
    );
    assert!(failed <= CLIENTS, "{}: {failed} failed exchanges > {CLIENTS} in flight: {all}", subject.service);
    assert!(!alive(old), "{}: the killed worker {old} still runs", subject.service);
    assert!(alive(new), "{}: the new worker {new} is not running\n{}", subject.service, log());
    outcome
}

fn describe(stats: &[ClientStats]) -> String {
    let mut out = String::new();
    for (i, s) in stats.iter().enumerate() {
        out.push_str(&format!(
            "\n  client {i}: ok {} before / {} after, refused {}, connect errors {:?}, failed {:?}, wrong answers {:?}",
            s.ok_before, s.ok_after, s.refused, s.connect_errors, s.exchange_errors, s.garbage
        ));
    }
    out
}

/// Whether `pid` runs (a zombie has released everything: it does not).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X'])))
}

/// The parent pid of `pid` (from /proc/<pid>/status).
pub fn ppid(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|v| v.trim().parse().ok())
}

/// kill -9 of `broker` (the parent of `worker`, checked first); asserts the worker is gone
/// within [`WORKER_FOLLOWS_WITHIN`] and returns how long that took (polled).
pub fn kill_broker_expect_worker_gone(service: &str, broker: i32, worker: i32) -> Duration {
    assert_eq!(ppid(worker), Some(broker), "{service}: worker {worker} is a child of broker {broker}");
    let _guard = KillOnDrop(worker);
    // SAFETY: plain syscall on the broker this test started.
    assert_eq!(unsafe { libc::kill(broker, libc::SIGKILL) }, 0, "kill -9 {broker}");
    let start = Instant::now();
    while alive(worker) {
        assert!(
            start.elapsed() <= WORKER_FOLLOWS_WITHIN,
            "{service}: worker {worker} still running {WORKER_FOLLOWS_WITHIN:?} after kill -9 of its broker {broker}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let took = start.elapsed();
    // the broker is past the point of its exit where the kernel signals its children; polled
    while alive(broker) {
        assert!(start.elapsed() <= WORKER_FOLLOWS_WITHIN, "{service}: broker {broker} survived kill -9");
        std::thread::sleep(Duration::from_millis(2));
    }
    println!("{service}: worker {worker} gone {took:?} after kill -9 of broker {broker}");
    took
}

/// SIGKILLs `pid` on drop if it still runs (a worker must not outlive a failed test).
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if alive(self.0) {
            // SAFETY: plain syscall on a process this test started (through a broker).
            unsafe {
                libc::kill(self.0, libc::SIGKILL);
            }
        }
    }
}

/// The `broker_pid` of a broker's status file.
pub fn broker_pid(status_file: &Path) -> i32 {
    let s: serde_json::Value = serde_json::from_slice(
        &std::fs::read(status_file).unwrap_or_else(|e| panic!("{}: {e}", status_file.display())),
    )
    .expect("status JSON");
    i32::try_from(s["broker_pid"].as_i64().unwrap_or_else(|| panic!("broker_pid in {s}"))).expect("pid")
}
