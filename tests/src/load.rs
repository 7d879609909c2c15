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
    /// Requests answered 200 in the measured window.
    pub requests: u64,
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
        requests: all.len() as u64,
    }
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// The load suite (tests/tests/load.rs), its bench (`load-bench fairness`) and the soak
// (`soak`): what one connection saw, client processes of other uids, the four services.
// ---------------------------------------------------------------------------------------------

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write as _};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use serde_json::{json, Value};

use crate::certd::{uid_of, Certd};
use crate::identityd::Identityd;
use crate::keyd::{Keyd, TempDir, TEST_GID};
use crate::tpmd::{Swtpm, Tpmd};

/// The uid that floods a service in the load suite (it need not exist).
pub const FLOOD_UID: u32 = 5301;
/// The uid whose requests must all be served while [`FLOOD_UID`] floods (tpmd: `aziotid`, the
/// only non-root caller tpmd answers).
pub const VICTIM_UID: u32 = 5302;

/// What one request on one connection got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An HTTP response with this status.
    Answered(u16),
    /// The connection was closed (EOF or reset) before a single byte of a response: what the
    /// throttle of spec common-http §7.3 does to a connection over a uid's limit.
    Unanswered,
    /// Anything else (timeout, a torn response, connect failure).
    Failed(String),
}

/// Sends `req` on `conn` and classifies what came back ([`Outcome`]).
pub fn exchange(conn: &mut Conn, req: &[u8]) -> Outcome {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
    if let Err(e) = conn.send_raw(req) {
        return match e.kind() {
            BrokenPipe | ConnectionReset => Outcome::Unanswered,
            _ => Outcome::Failed(format!("send: {e}")),
        };
    }
    // Peek one byte: 0 (EOF) or a reset before any byte is "closed without a response".
    let mut byte = [0u8; 1];
    match nix::sys::socket::recv(conn.stream().as_raw_fd(), &mut byte, nix::sys::socket::MsgFlags::MSG_PEEK) {
        Ok(0) | Err(nix::errno::Errno::ECONNRESET) => return Outcome::Unanswered,
        Err(e) => return Outcome::Failed(format!("waiting for a response: {e}")),
        Ok(_) => {}
    }
    match conn.read_response() {
        Ok(r) => Outcome::Answered(r.status),
        Err(e) => Outcome::Failed(format!("response: {e}")),
    }
}

/// Counts of [`Outcome`]s.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub answered: BTreeMap<u16, u64>,
    pub unanswered: u64,
    pub failed: u64,
    /// The first failure's description.
    pub first_failure: Option<String>,
}

impl Tally {
    pub fn add(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Answered(s) => *self.answered.entry(*s).or_default() += 1,
            Outcome::Unanswered => self.unanswered += 1,
            Outcome::Failed(e) => {
                self.failed += 1;
                self.first_failure.get_or_insert_with(|| e.clone());
            }
        }
    }
    pub fn merge(&mut self, other: &Tally) {
        for (s, n) in &other.answered {
            *self.answered.entry(*s).or_default() += n;
        }
        self.unanswered += other.unanswered;
        self.failed += other.failed;
        if self.first_failure.is_none() {
            self.first_failure.clone_from(&other.first_failure);
        }
    }
    /// Responses of any status.
    pub fn answered_total(&self) -> u64 {
        self.answered.values().sum()
    }
    pub fn to_json(&self) -> Value {
        let answered: serde_json::Map<String, Value> =
            self.answered.iter().map(|(s, n)| (s.to_string(), json!(n))).collect();
        json!({"answered": answered, "unanswered": self.unanswered, "failed": self.failed, "first_failure": self.first_failure})
    }
    pub fn from_json(v: &Value) -> Tally {
        let answered = v["answered"]
            .as_object()
            .map(|m| m.iter().map(|(s, n)| (s.parse().expect("status"), n.as_u64().expect("count"))).collect())
            .unwrap_or_default();
        Tally {
            answered,
            unanswered: v["unanswered"].as_u64().expect("unanswered"),
            failed: v["failed"].as_u64().expect("failed"),
            first_failure: v["first_failure"].as_str().map(str::to_owned),
        }
    }
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "answered {:?}, closed unanswered {}, failed {}", self.answered, self.unanswered, self.failed)?;
        if let Some(e) = &self.first_failure {
            write!(f, " (first failure: {e})")?;
        }
        Ok(())
    }
}

/// Opens `n` connections to `sock` one after another, one exchange of `req` on each (each
/// answered or closed before the next is opened); returns the connections still open (the
/// answered ones: keep-alive, each holds one of the uid's slots) and the tally.
pub fn hold(sock: &Path, n: usize, req: &[u8]) -> (Vec<Conn>, Tally) {
    let (mut open, mut tally) = (Vec::with_capacity(n), Tally::default());
    for _ in 0..n {
        let mut conn = match Conn::connect(sock) {
            Ok(c) => c,
            Err(e) => {
                tally.add(&Outcome::Failed(format!("connect: {e}")));
                continue;
            }
        };
        let outcome = exchange(&mut conn, req);
        tally.add(&outcome);
        if matches!(outcome, Outcome::Answered(_)) {
            open.push(conn);
        }
    }
    (open, tally)
}

/// `conns` threads each open a connection and send `req` on it over and over until `stop`; a
/// connection closed unanswered (the throttle) is counted and replaced at once — beyond the
/// uid's limit, a connection storm.
pub fn flood(sock: &Path, conns: usize, req: &[u8], stop: &Arc<AtomicBool>) -> Tally {
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            let (stop, sock, req) = (Arc::clone(stop), sock.to_path_buf(), req.to_vec());
            std::thread::spawn(move || {
                let mut tally = Tally::default();
                let mut conn: Option<Conn> = None;
                while !stop.load(Ordering::Relaxed) {
                    let c = match conn.as_mut() {
                        Some(c) => c,
                        None => match Conn::connect(&sock) {
                            Ok(c) => conn.insert(c),
                            Err(e) => {
                                tally.add(&Outcome::Failed(format!("connect: {e}")));
                                std::thread::sleep(Duration::from_millis(1));
                                continue;
                            }
                        },
                    };
                    let outcome = exchange(c, &req);
                    if !matches!(outcome, Outcome::Answered(_)) {
                        conn = None;
                    }
                    tally.add(&outcome);
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for t in threads {
        total.merge(&t.join().expect("flood thread"));
    }
    total
}

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (a client holding 1,000
/// connections); returns the new soft limit.
pub fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).expect("setrlimit");
    hard
}

/// `(soft, hard)` "Max open files" of `pid` (from /proc/<pid>/limits).
pub fn nofile_limits(pid: i32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("/proc/<pid>/limits");
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("Max open files");
    let f: Vec<&str> = line.split_whitespace().collect();
    let num = |s: &str| if s == "unlimited" { u64::MAX } else { s.parse().expect("limit") };
    (num(f[3]), num(f[4]))
}

/// Number of open descriptors of `pid`.
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(Iterator::count).unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
}

/// Polls until `pid` has at most `baseline` descriptors; the last count seen otherwise.
pub fn wait_fds_at_most(pid: i32, baseline: usize, timeout: Duration) -> Result<(), usize> {
    let deadline = Instant::now() + timeout;
    loop {
        let n = fd_count(pid);
        if n <= baseline {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(n);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `pid`'s descriptor count once it has not changed for 200 ms (a connection just closed by a
/// client may still be open in the worker for a moment); panics after 10 s of changes.
pub fn settled_fd_count(pid: i32) -> usize {
    let deadline = Instant::now() + Duration::from_secs(10);
    let (mut last, mut since) = (fd_count(pid), Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let n = fd_count(pid);
        if n != last {
            (last, since) = (n, Instant::now());
        } else if since.elapsed() >= Duration::from_millis(200) {
            return n;
        }
        assert!(Instant::now() < deadline, "the descriptor count of {pid} kept changing for 10 s");
    }
}

/// utime + stime of `pid` in clock ticks (/proc/<pid>/stat).
pub fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/<pid>/stat");
    // Fields after the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').expect("stat") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

/// A client process of `load-bench` (`bin`) running as `uid`, group [`TEST_GID`] (the
/// services' socket group in the harnesses): `load-bench <args>`. It prints one JSON line when
/// ready and, for `hold`/`flood`, another when its stdin is closed ([`ClientProc::finish`]).
pub struct ClientProc {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    what: String,
}

impl ClientProc {
    pub fn spawn(bin: &Path, uid: u32, args: &[String]) -> ClientProc {
        use std::os::unix::process::CommandExt;
        let mut child = Command::new(bin)
            .args(args)
            .uid(uid)
            .gid(TEST_GID)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {} as uid {uid}: {e}", bin.display()));
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        ClientProc { child, stdin, stdout, what: format!("load-bench {} (uid {uid})", args.join(" ")) }
    }

    /// The next JSON line it prints.
    pub fn line(&mut self) -> Value {
        let mut line = String::new();
        let n = self.stdout.read_line(&mut line).unwrap_or_else(|e| panic!("{}: {e}", self.what));
        assert!(n > 0, "{}: exited without output ({:?})", self.what, self.child.wait());
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{}: {e}: {line:?}", self.what))
    }

    /// Closes its stdin (it stops and closes its connections), reads its last line, reaps it.
    pub fn finish(mut self) -> Value {
        drop(self.stdin.take());
        let v = self.line();
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "{}: {status}", self.what);
        v
    }
}

impl Drop for ClientProc {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `load-bench` client modes, run in the client process ([`ClientProc`]):
/// * `hold SOCK N REQUEST`: [`hold`], prints `{"tally": ..}`, keeps the connections until stdin
///   closes, then prints `{}` and exits;
/// * `flood SOCK CONNS REQUEST`: prints `{}`, [`flood`]s until stdin closes, prints
///   `{"tally": ..}`;
/// * `loop SOCK CONC WARMUP_MS DURATION_MS REQUEST`: [`closed_loop`], prints its figures.
///
/// `None` when `args` is no client mode.
pub fn client_main(args: &[String]) -> Option<()> {
    let mode = args.first()?.as_str();
    if !matches!(mode, "hold" | "flood" | "loop") {
        return None;
    }
    raise_nofile();
    let sock = PathBuf::from(&args[1]);
    let wait_stdin_eof = || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    };
    let print = |v: Value| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{v}").expect("stdout");
        out.flush().expect("stdout");
    };
    match mode {
        "hold" => {
            let (open, tally) = hold(&sock, args[2].parse().expect("N"), args[3].as_bytes());
            print(json!({"tally": tally.to_json(), "open": open.len()}));
            wait_stdin_eof();
            drop(open);
            print(json!({}));
        }
        "flood" => {
            let stop = Arc::new(AtomicBool::new(false));
            let stopper = Arc::clone(&stop);
            std::thread::spawn(move || {
                wait_stdin_eof();
                stopper.store(true, Ordering::Relaxed);
            });
            print(json!({}));
            let tally = flood(&sock, args[2].parse().expect("CONNS"), args[3].as_bytes(), &stop);
            print(json!({"tally": tally.to_json()}));
        }
        _ => {
            let ms = |s: &String| Duration::from_millis(s.parse().expect("milliseconds"));
            let l = closed_loop(&sock, args[5].as_bytes(), args[2].parse().expect("CONC"), ms(&args[3]), ms(&args[4]));
            print(
                json!({"rps": l.rps, "p50_us": l.p50_us, "p99_us": l.p99_us, "errors": l.errors, "requests": l.requests}),
            );
        }
    }
    Some(())
}

/// The four services of the load suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Keyd,
    Certd,
    Identityd,
    Tpmd,
}

pub const KINDS: [Kind; 4] = [Kind::Keyd, Kind::Certd, Kind::Identityd, Kind::Tpmd];

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Keyd => "keyd",
            Kind::Certd => "certd",
            Kind::Identityd => "identityd",
            Kind::Tpmd => "tpmd",
        }
    }
    pub fn from_name(name: &str) -> Option<Kind> {
        KINDS.into_iter().find(|k| k.name() == name)
    }
    /// What [`Target::start`] needs.
    pub fn deps(self) -> Vec<crate::Dep> {
        match self {
            Kind::Keyd => crate::keyd::harness_deps(),
            Kind::Certd => crate::certd::harness_deps(),
            Kind::Identityd => crate::identityd::harness_deps(),
            Kind::Tpmd => vec![
                crate::Dep::Root,
                crate::Dep::ServiceUser("aziottpm"),
                crate::Dep::ServiceUser("aziotid"),
                crate::Dep::Swtpm,
            ],
        }
    }
}

enum Harness {
    Keyd(Keyd),
    Certd(Certd),
    Identityd(Identityd),
    /// Fields drop in order: tpmd before its swtpm, the directory last (held for that only).
    Tpmd(Tpmd, #[allow(dead_code)] Swtpm, #[allow(dead_code)] TempDir),
}

/// One service through its broker (the tests/src harnesses), with the requests of the load
/// suite: `request` is answered 200 for root and [`Target::victim_uid`] (and with some HTTP
/// response for [`FLOOD_UID`]); `mixed` (the soak's) are answered 200 for root.
pub struct Target {
    pub kind: Kind,
    pub socket: PathBuf,
    pub request: Vec<u8>,
    pub mixed: Vec<Vec<u8>>,
    pub victim_uid: u32,
    harness: Harness,
}

impl Target {
    /// Starts `kind` (and what it depends on) with `max_requests` in its config (`None`: the
    /// default, 10) and `AZIOT_LOG=<log_level>`.
    pub fn start(kind: Kind, max_requests: Option<usize>, log_level: &str) -> Target {
        use crate::http::build_request;
        let limit = max_requests.map(|n| format!("max_requests = {n}\n")).unwrap_or_default();
        match kind {
            Kind::Keyd => {
                let principals = format!(
                    "[[principal]]\nuid = {FLOOD_UID}\nkeys = [\"*\"]\n[[principal]]\nuid = {VICTIM_UID}\nkeys = [\"*\"]\n"
                );
                let keyd = Keyd::builder().log_level(log_level).extra(&limit).extra(&principals).start();
                let api = keyd.api(crate::api::V2021);
                api.import_key("load", &[9; 32]);
                let handle = api.get_key("load");
                let sign = serde_json::to_vec(
                    &json!({"keyHandle": handle, "algorithm": "HMAC-SHA256", "parameters": {"message": crate::crypto::b64(b"soak")}}),
                )
                .expect("json");
                let get = build_request("GET", "/key/load?api-version=2021-05-01", None);
                Target {
                    kind,
                    socket: keyd.socket().to_path_buf(),
                    mixed: vec![get.clone(), build_request("POST", "/sign?api-version=2021-05-01", Some(&sign))],
                    request: get,
                    victim_uid: VICTIM_UID,
                    harness: Harness::Keyd(keyd),
                }
            }
            Kind::Certd => {
                let certd = Certd::start_with_log(&limit, log_level);
                let pem = String::from_utf8(crate::mock_tls::TestCa::new("aziot load").cert_pem()).expect("pem");
                let body = serde_json::to_vec(&json!({ "pem": pem })).expect("json");
                let put =
                    |id: &str| build_request("PUT", &format!("/certificates/{id}?api-version=2020-09-01"), Some(&body));
                for id in ["load", "soak"] {
                    let r = crate::http::raw_once(&certd.socket(), &put(id)).expect("PUT a cert");
                    assert_eq!(r.status, 201, "import the load suite's cert {id}: {r:?}");
                }
                let put = put("soak");
                let get = build_request("GET", "/certificates/load?api-version=2020-09-01", None);
                Target {
                    kind,
                    socket: certd.socket(),
                    mixed: vec![get.clone(), put],
                    request: get,
                    victim_uid: VICTIM_UID,
                    harness: Harness::Certd(certd),
                }
            }
            Kind::Identityd => {
                let mut stack = Identityd::prepare(&crate::identityd::default_config(&limit));
                stack.set_broker_env("AZIOT_LOG", log_level);
                stack.start_identityd().unwrap_or_else(|e| panic!("identityd: {e}"));
                let get = build_request("GET", "/identities/provisioning?api-version=2021-12-01", None);
                Target {
                    kind,
                    socket: stack.socket(),
                    mixed: vec![get.clone(), build_request("GET", "/identities/identity?api-version=2021-12-01", None)],
                    request: get,
                    victim_uid: VICTIM_UID,
                    harness: Harness::Identityd(stack),
                }
            }
            Kind::Tpmd => {
                let dir = TempDir::new("load-tpmd");
                let swtpm = Swtpm::start(dir.path());
                let tpmd = Tpmd::start_with(dir.path(), &swtpm.tcti(), log_level, &limit);
                // Other uids reach the socket through the harness's client group.
                nix::unistd::chown(&tpmd.socket(), None, Some(nix::unistd::Gid::from_raw(TEST_GID))).expect("chgrp");
                let get = build_request("GET", "/get_tpm_keys?api-version=2020-09-01", None);
                Target {
                    kind,
                    socket: tpmd.socket(),
                    mixed: vec![get.clone()],
                    request: get,
                    victim_uid: uid_of("aziotid"),
                    harness: Harness::Tpmd(tpmd, swtpm, dir),
                }
            }
        }
    }

    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    pub fn worker_pid(&self) -> i32 {
        match &self.harness {
            Harness::Keyd(k) => k.worker_pid(),
            Harness::Certd(c) => c.worker_pid(),
            Harness::Identityd(i) => i.worker_pid(),
            Harness::Tpmd(t, ..) => t.worker_pid(),
        }
    }

    pub fn log(&self) -> String {
        match &self.harness {
            Harness::Keyd(k) => k.log(),
            Harness::Certd(c) => c.log(),
            Harness::Identityd(i) => i.log(),
            Harness::Tpmd(t, ..) => t.log(),
        }
    }

    /// Polls the log until it contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
