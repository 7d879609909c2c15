//! The escape suite, in the REAL worker: for each service the test starts `aziotd --worker`
//! exactly as the broker does — a SOCK_SEQPACKET socketpair on fd 3, the service user's
//! credentials dropped with `aziot_policy::drop_privileges_in_child` in `pre_exec`, an empty
//! environment — and sends it a manifest with the service's real effective policy and real
//! handed-over descriptors (listener, state directory, for tpmd a connection to swtpm). The
//! worker runs its own start (descriptor checks, pre-load, `lock_in`: rlimits → Landlock →
//! seccomp, the report) and then, because the manifest carries an attempt, tries ONE action
//! (`aziot_policy::escape`, compiled in only with the `escape-probe` feature, which the workspace
//! build gets through this package's dependency and `cargo build --release -p aziotd` has not:
//! `release_aziotd_has_no_attempt_mode`).
//!
//! Every forbidden action must fail with the expected errno or kill the worker by SIGSYS. Each is
//! also run as the plain service user WITHOUT the sandbox (`aziot-escape-control`: setgroups +
//! setresgid + setresuid only) — the control. The targets are ones that user can reach (a 0644
//! root-owned file, a 0666 file and device, files the user owns outside its state directory, a
//! set-user-ID-root program, a same-uid process): where the control succeeds, the sandbox is what
//! stopped the worker, not file permissions. Allowed actions (the state directory, threads,
//! OpenSSL, a tokio runtime serving a client) succeed in the same locked-in worker.
//!
//! Needs root and the service users; tpmd needs swtpm. Run:
//! `cargo build --workspace --bins --tests && cargo test -p aziot-tests --test escape -- --nocapture`
//! (prints the table).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use aziot_ipc::handoff::{
    self, DescriptorEntry, DescriptorKind, Manifest, MANIFEST_VERSION,
};
use aziot_policy::escape::{EscapeAttempt, EscapeOutcome};
use aziot_tests::keyd::aziotd_bin;
use aziot_tests::worker_spawn::assert_attempt_mode;
use aziot_tests::tpmd::Swtpm;
use aziot_tests::{require, Dep};

const SERVICES: &[&str] = &["keyd", "certd", "identityd", "tpmd"];
const SIGSYS: i32 = libc::SIGSYS;
const EACCES: &[i32] = &[libc::EACCES];
const EPERM: &[i32] = &[libc::EPERM];

fn user_of(svc: &str) -> &'static str {
    aziot_policy::services::by_short(svc)
        .map(|i| i.user)
        .unwrap_or_else(|| panic!("unknown service {svc}"))
}

fn ids(user: &str) -> (u32, u32) {
    let u = nix::unistd::User::from_name(user)
        .expect("getpwnam")
        .unwrap_or_else(|| panic!("user {user} missing"));
    (u.uid.as_raw(), u.gid.as_raw())
}

// ---- the host-like prefix and its targets ----

struct Env {
    prefix: PathBuf,
    /// TCP port no policy grants.
    closed_port: u16,
    /// TCP port granted to every worker (a config grant).
    granted_port: u16,
    /// A pathname unix socket anyone may connect to (DAC-wise).
    public_sock: PathBuf,
    abstract_name: String,
    /// Per service: a `sleep` running as the service user.
    siblings: Vec<(String, i32)>,
}

impl Env {
    fn state_dir(&self, svc: &str) -> PathBuf {
        self.prefix.join("var/lib/aziot").join(svc)
    }

    fn sibling(&self, svc: &str) -> i32 {
        self.siblings
            .iter()
            .find(|(s, _)| s == svc)
            .map(|(_, p)| *p)
            .expect("sibling")
    }

    fn path(&self, rel: &str) -> String {
        self.prefix.join(rel).display().to_string()
    }
}

static ENV: OnceLock<Env> = OnceLock::new();

extern "C" fn remove_prefix() {
    if let Some(e) = ENV.get() {
        let _ = std::fs::remove_dir_all(&e.prefix);
    }
}

fn accept_forever<T: Send + 'static>(listener: T, accept: fn(&T) -> bool) {
    std::thread::spawn(move || while accept(&listener) {});
}

fn mode(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

fn mknod(path: &Path, perm: u32, major: u32, minor: u32) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a valid path; creates a device node in our own temporary prefix.
    let rc = unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFCHR | perm,
            libc::makedev(major, minor),
        )
    };
    assert_eq!(
        rc,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // mknod applies the umask.
    mode(path, perm);
}

fn env() -> &'static Env {
    ENV.get_or_init(|| {
        let prefix = PathBuf::from(format!("/tmp/aziot-escape-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&prefix);
        // SAFETY: registers a plain extern "C" function to run at exit.
        unsafe { libc::atexit(remove_prefix) };
        std::fs::create_dir_all(prefix.join("var/lib/aziot")).unwrap();
        for d in ["", "var", "var/lib"] {
            mode(&prefix.join(d), 0o755);
        }
        // World-writable, so that only Landlock stops a worker creating files beside its state.
        mode(&prefix.join("var/lib/aziot"), 0o777);
        let outside = prefix.join("outside");
        std::fs::create_dir(&outside).unwrap();
        mode(&outside, 0o777);
        // A root-owned 0644 file outside every grant: any user may read it (DAC).
        std::fs::write(outside.join("root-0644"), b"readable by all").unwrap();
        mode(&outside.join("root-0644"), 0o644);
        // A root-owned 0666 file: any user may write it (DAC).
        std::fs::write(outside.join("world-0666"), b"writable by all").unwrap();
        mode(&outside.join("world-0666"), 0o666);
        for svc in SERVICES {
            let (uid, gid) = ids(user_of(svc));
            // Each state dir and its "secret" are readable by all (DAC), so that reading another
            // service's state is stopped by Landlock alone.
            let state = prefix.join("var/lib/aziot").join(svc);
            std::fs::create_dir(&state).unwrap();
            mode(&state, 0o755);
            std::fs::write(state.join("secret"), b"another service's secret").unwrap();
            mode(&state.join("secret"), 0o644);
            chown(&state, Some(uid), Some(gid)).unwrap();
            chown(state.join("secret"), Some(uid), Some(gid)).unwrap();
            let etc = prefix.join("etc/aziot").join(svc);
            std::fs::create_dir_all(&etc).unwrap();
            std::fs::write(etc.join("config.toml"), b"[aziot_keys]\n").unwrap();
            mode(&etc.join("config.toml"), 0o644);
            // A file the service user owns, outside its state directory.
            let owned = outside.join(format!("owned-{svc}"));
            std::fs::write(&owned, b"x").unwrap();
            chown(&owned, Some(uid), Some(gid)).unwrap();
        }
        for d in ["etc", "etc/aziot"] {
            mode(&prefix.join(d), 0o755);
        }
        for svc in SERVICES {
            mode(&prefix.join("etc/aziot").join(svc), 0o755);
        }
        std::fs::create_dir(prefix.join("dev")).unwrap();
        mode(&prefix.join("dev"), 0o755);
        // A /dev/mem look-alike (c 1:1, root 0600) and a world-writable device (c 1:3, 0666).
        mknod(&prefix.join("dev/mem"), 0o600, 1, 1);
        mknod(&prefix.join("dev/null-0666"), 0o666, 1, 3);
        // A set-user-ID-root program: id(1), which prints the effective uid it got.
        std::fs::create_dir(prefix.join("bin")).unwrap();
        mode(&prefix.join("bin"), 0o755);
        std::fs::copy("/usr/bin/id", prefix.join("bin/id-suid")).expect("copy /usr/bin/id");
        mode(&prefix.join("bin/id-suid"), 0o4755);

        let public_sock = prefix.join("public.sock");
        let unix = UnixListener::bind(&public_sock).unwrap();
        mode(&public_sock, 0o777);
        accept_forever(unix, |l| l.accept().is_ok());
        let abstract_name = format!("aziot-escape-test-{}", std::process::id());
        {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes())
                .unwrap();
            accept_forever(UnixListener::bind_addr(&addr).unwrap(), |l| {
                l.accept().is_ok()
            });
        }
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let granted = TcpListener::bind("127.0.0.1:0").unwrap();
        let (closed_port, granted_port) = (
            closed.local_addr().unwrap().port(),
            granted.local_addr().unwrap().port(),
        );
        accept_forever(closed, |l| l.accept().is_ok());
        accept_forever(granted, |l| l.accept().is_ok());

        // Siblings are spawned by a thread that never exits: PR_SET_PDEATHSIG fires when the
        // spawning *thread* ends, here only with the test process.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut pids = Vec::new();
            let mut children = Vec::new();
            for svc in SERVICES {
                let (uid, gid) = ids(user_of(svc));
                let mut cmd = Command::new("sleep");
                cmd.arg("600")
                    .uid(uid)
                    .gid(gid)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null());
                // SAFETY: prctl takes integers; async-signal-safe.
                unsafe {
                    cmd.pre_exec(|| {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                let child = cmd.spawn().expect("spawn sibling");
                pids.push((svc.to_string(), child.id() as i32));
                children.push(child);
            }
            tx.send(pids).unwrap();
            loop {
                std::thread::park();
            }
        });
        let siblings = rx.recv().unwrap();
        Env {
            prefix,
            closed_port,
            granted_port,
            public_sock,
            abstract_name,
            siblings,
        }
    })
}

// ---- starting the real worker as the broker does ----

/// What one worker (or control) run ended with: `ok`, `errno=<n> (...)`, `signal=<n> (...)`,
/// `setup-failed: ...`.
#[derive(Debug)]
struct RunResult {
    result: String,
    transcript: String,
    /// The worker's sandbox report (worker runs only).
    report: Option<serde_json::Value>,
}

impl RunResult {
    fn is_ok(&self) -> bool {
        self.result == "ok" || self.result.starts_with("ok ")
    }
    fn errno(&self) -> Option<i32> {
        self.result
            .strip_prefix("errno=")?
            .split(' ')
            .next()?
            .parse()
            .ok()
    }
    fn signal(&self) -> Option<i32> {
        self.result
            .strip_prefix("signal=")?
            .split(' ')
            .next()?
            .parse()
            .ok()
    }
}

fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|_| "?".into())
}

/// Raises RLIMIT_CORE to unlimited (as root, before the drop): the environment is generous, so
/// a worker's 0 is its own lock-in's doing, and the control can raise it.
use aziot_tests::worker_spawn::unlimited_core_limit as generous_core_limit;

struct WorkerOpts {
    attempt: Option<EscapeAttempt>,
    seccomp_mode: &'static str,
    allow_degraded: bool,
    /// A worker set up from its service's own config (identityd's rows): its policy, config
    /// text, state dir and private mount namespace instead of the generic ones.
    custom: Option<Custom>,
}

/// What [`WorkerOpts::custom`] replaces.
#[derive(Clone)]
struct Custom {
    policy: aziot_policy::Policy,
    config: String,
    state: PathBuf,
    /// Enter the policy's private mount namespace (the broker's code: `aziot_policy::mountns`).
    namespace: bool,
}

impl WorkerOpts {
    fn attempt(name: &str, arg: Option<&str>) -> WorkerOpts {
        WorkerOpts {
            attempt: Some(EscapeAttempt {
                name: name.to_owned(),
                arg: arg.map(str::to_owned),
            }),
            seccomp_mode: "kill",
            allow_degraded: false,
            custom: None,
        }
    }
}

/// The TPM descriptor for tpmd (a connection to swtpm, as the broker makes it) and swtpm.
static SWTPM: OnceLock<std::sync::Mutex<Swtpm>> = OnceLock::new();

fn swtpm_conn() -> (OwnedFd, u16) {
    let swtpm = SWTPM
        .get_or_init(|| std::sync::Mutex::new(Swtpm::start_temp()))
        .lock()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    // swtpm serves one client at a time: the previous worker's connection may still be closing.
    loop {
        match std::net::TcpStream::connect(("127.0.0.1", swtpm.port)) {
            Ok(s) => return (s.into(), swtpm.port),
            Err(e) => {
                assert!(Instant::now() < deadline, "connect to swtpm: {e}");
                std::thread::yield_now();
            }
        }
    }
}

static RUNS: AtomicUsize = AtomicUsize::new(0);

/// A running worker: its hand-off socket (ours), the child, its listener path.
struct Worker {
    child: std::process::Child,
    ours: OwnedFd,
    listener_path: PathBuf,
}

/// Starts `aziotd --worker` for `svc` as the broker does and sends the manifest.
fn start_worker(svc: &str, opts: &WorkerOpts) -> Worker {
    let e = env();
    let mut grants = aziot_policy::Grants::default();
    grants.tcp_ports.push(aziot_policy::PortGrant {
        port: e.granted_port,
        origin: aziot_policy::Origin::Config("escape suite: a granted port".into()),
    });
    let policy = match &opts.custom {
        Some(c) => c.policy.clone(),
        None => aziot_policy::effective(svc, &grants, None).expect("effective policy"),
    };
    // The broker's step before fork (broker/src/mountns.rs), when asked for.
    let prepared = opts.custom.as_ref().filter(|c| c.namespace).map(|_| {
        aziot_policy::mountns::prepare(&policy.mount_plan().expect("mount plan")).expect("prepare the namespace")
    });
    let creds = aziot_policy::resolve_credentials(&policy).expect("credentials");
    let n = RUNS.fetch_add(1, Ordering::SeqCst);
    let listener_path = e.prefix.join(format!("{svc}-{n}.sock"));
    let listener = UnixListener::bind(&listener_path).unwrap();
    mode(&listener_path, 0o777);
    let mut entries = vec![DescriptorEntry {
        name: "listener".into(),
        kind: DescriptorKind::UnixListener,
    }];
    let mut fds: Vec<OwnedFd> = vec![listener.into()];
    let config = match svc {
        "tpmd" => {
            entries.push(DescriptorEntry {
                name: "tpm".into(),
                kind: DescriptorKind::Socket,
            });
            // The broker connects to swtpm; the worker only uses the descriptor.
            let (tpm, port) = swtpm_conn();
            fds.push(tpm);
            // As the broker does: the principal's uid resolved here (the worker cannot read
            // /etc/passwd, and a lookup would try nscd's socket).
            let (aziotid, _) = ids("aziotid");
            format!("tcti = \"swtpm:host=127.0.0.1,port={port}\"\n[[principal]]\nuid = {aziotid}\n")
        }
        _ => {
            let state = opts.custom.as_ref().map_or_else(|| e.state_dir(svc), |c| c.state.clone());
            entries.push(DescriptorEntry {
                name: "state".into(),
                kind: DescriptorKind::Directory,
            });
            fds.push(std::fs::File::open(&state).unwrap().into());
            let home = state.display().to_string();
            match svc {
                "keyd" => format!("[aziot_keys]\nhomedir_path = {home:?}\n"),
                // the real worker parses its config before it locks itself in
                "identityd" => format!("hostname = \"escape\"\nhomedir = {home:?}\n[provisioning]\nsource = \"none\"\n"),
                _ => format!("homedir_path = {home:?}\n"),
            }
        }
    };
    let config = opts.custom.as_ref().map_or(config, |c| c.config.clone());
    let manifest = Manifest {
        version: MANIFEST_VERSION,
        service: svc.to_owned(),
        config,
        descriptors: entries,
        policy: serde_json::to_value(&policy).unwrap(),
        log_filter: String::new(),
        seccomp_mode: opts.seccomp_mode.to_owned(),
        allow_degraded: opts.allow_degraded,
        escape: opts.attempt.clone(),
    };

    let aziot_tests::worker_spawn::Spawned { child, sock: ours } =
        aziot_tests::worker_spawn::spawn(&manifest, fds, creds, prepared, true);
    Worker {
        child,
        ours,
        listener_path,
    }
}

impl Worker {
    /// The next message on the hand-off socket (`None`: closed, or nothing within 60 s).
    fn recv(&self) -> Option<serde_json::Value> {
        handoff::recv_json::<serde_json::Value>(self.ours.as_fd()).ok()
    }

    /// Reads the rest of the messages, reaps the worker (killing it after `grace`; at once for
    /// zero), and classifies how the run ended.
    fn finish(mut self, report: Option<serde_json::Value>, grace: Duration) -> RunResult {
        let mut messages = Vec::new();
        if grace.is_zero() {
            // A serving worker: stop it (its end of the socket closes with it).
            let _ = self.child.kill();
        }
        if report.as_ref().is_some_and(|r| r["ok"] == true) {
            while let Some(m) = self.recv() {
                messages.push(m);
            }
        }
        let deadline = Instant::now() + grace;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut out = String::new();
        let mut err = String::new();
        let _ = self.child.stdout.take().unwrap().read_to_string(&mut out);
        let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
        let _ = std::fs::remove_file(&self.listener_path);
        let outcome = messages
            .iter()
            .find_map(|m| serde_json::from_value::<EscapeOutcome>(m.clone()).ok());
        let transcript = format!("report: {report:?}\nmessages: {messages:?}\nstdout: {out}\nstderr: {err}\nexit: {status:?}");
        let result = if let Some(sig) = status.signal() {
            format!("signal={sig} ({})", signal_name(sig))
        } else if let Some(o) = outcome {
            o.escape_outcome
        } else if let Some(r) = report.as_ref().filter(|r| r["ok"] != true) {
            format!("setup-failed: {}", r["error"].as_str().unwrap_or("?"))
        } else {
            format!("no-outcome (exit {:?})", status.code())
        };
        RunResult {
            result,
            transcript,
            report,
        }
    }
}

/// One attempt in the real, locked-in worker.
fn run_worker(svc: &str, opts: WorkerOpts) -> RunResult {
    let w = start_worker(svc, &opts);
    let report = w.recv();
    w.finish(report, Duration::from_secs(30))
}

/// The same attempt as the plain service user, without any sandbox (the control): setgroups,
/// setresgid, setresuid — no capability-set change, no NoNewPrivs, no rlimit, no Landlock, no
/// seccomp.
fn run_control(svc: &str, attempt: &str, arg: Option<&str>) -> RunResult {
    let e = env();
    let (uid, gid) = ids(user_of(svc));
    let groups: Vec<libc::gid_t> = {
        let policy = aziot_policy::builtin(svc).unwrap();
        aziot_policy::resolve_credentials(&policy).unwrap().groups
    };
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aziot-escape-control"));
    cmd.arg(attempt);
    if let Some(a) = arg {
        cmd.args(["--arg", a]);
    }
    if has_state(svc) {
        cmd.arg("--state-dir").arg(e.state_dir(svc));
    }
    cmd.env_clear().current_dir("/").stdin(Stdio::null());
    // SAFETY: raw syscalls only between fork and exec; `groups` was built before the fork.
    unsafe {
        cmd.pre_exec(move || {
            generous_core_limit()?;
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("run the control");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let transcript = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let result = if let Some(sig) = out.status.signal() {
        format!("signal={sig} ({})", signal_name(sig))
    } else if let Some(o) = stdout.lines().find_map(|l| l.strip_prefix("outcome: ")) {
        o.to_owned()
    } else if attempt == "exec-setuid" && out.status.success() {
        // The set-user-ID program ran in place of the control: `id -u` printed its euid.
        match stdout.trim() {
            "0" => "ok (euid 0)".to_owned(),
            other => format!("exec'ed, euid {other}"),
        }
    } else {
        format!("no-outcome (exit {:?})", out.status.code())
    };
    RunResult {
        result,
        transcript,
        report: None,
    }
}

// ---- the cases ----

#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Killed by the seccomp allowlist.
    Sigsys,
    /// Failed with one of these errnos.
    Errno(&'static [i32]),
    /// Either (a rule that may be an argument check or a Landlock scope, e.g. tgkill).
    SigsysOrErrno(&'static [i32]),
}

/// What the same action does as the plain service user without the sandbox.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Control {
    /// Succeeds: only the sandbox stops it.
    Succeeds,
    /// Passes the permission checks (fails later, e.g. EFAULT/EINVAL/ENOTTY).
    PermissionOk,
    /// Refused anyway (DAC, capabilities): the sandbox is a second layer.
    Refused,
    /// Depends on the host's configuration; recorded only.
    Any,
}

struct Case {
    attempt: &'static str,
    arg: Option<String>,
    what: &'static str,
    expect: Expect,
    control: Control,
}

fn no_network(svc: &str) -> bool {
    svc == "keyd" || svc == "tpmd"
}

fn has_state(svc: &str) -> bool {
    svc != "tpmd"
}

#[rustfmt::skip]
fn forbidden(e: &Env, svc: &str) -> Vec<Case> {
    let other = if svc == "keyd" { "certd" } else { "keyd" };
    let p = |rel: String| Some(e.path(&rel));
    let sibling = Some(e.sibling(svc).to_string());
    let owned = p(format!("outside/owned-{svc}"));
    use Control::*;
    use Expect::*;
    let c = |attempt, arg: Option<String>, what, expect, control| Case { attempt, arg, what, expect, control };
    let mut v = vec![
        c("read-path", p("outside/root-0644".into()), "read a 0644 root-owned file outside its grants", Errno(EACCES), Succeeds),
        c("read-path", Some("/etc/shadow".into()), "read /etc/shadow", Errno(EACCES), Refused),
        c("read-path", p(format!("var/lib/aziot/{other}/secret")), "read another service's state", Errno(EACCES), Succeeds),
        c("list-dir", p(format!("var/lib/aziot/{other}")), "list another service's state dir", Errno(EACCES), Succeeds),
        c("read-path", p(format!("etc/aziot/{svc}/config.toml")), "read its config (0644; the broker passes it)", Errno(EACCES), Succeeds),
        c("write-path", p(format!("outside/x-{svc}")), "create a file outside its state dir", Errno(EACCES), Succeeds),
        c("write-path", p("outside/world-0666".into()), "write a 0666 file outside its state dir", Errno(EACCES), Succeeds),
        c("write-path", p(format!("var/lib/aziot/new-{svc}")), "create a file in the parent of its state dir", Errno(EACCES), Succeeds),
        // tpmd has no state directory and no mkdirat at all (seccomp); the others: Landlock.
        c("mkdir-path", p(format!("outside/dir-{svc}")), "mkdir outside its state dir", SigsysOrErrno(EACCES), Succeeds),
        c("write-proc-self-mem", None, "open /proc/self/mem read-write", Errno(EACCES), Succeeds),
        c("open-path", p("dev/null-0666".into()), "open a 0666 character device (c 1:3)", Errno(EACCES), Succeeds),
        c("open-path", Some("/dev/random".into()), "open a world-writable device (/dev/random)", Errno(EACCES), Succeeds),
        c("open-path", p("dev/mem".into()), "open /dev/mem (a c 1:1 node, root 0600)", Errno(EACCES), Refused),
        c("open-path", Some("/dev/kmsg".into()), "open the kernel log (/dev/kmsg)", Errno(&[libc::EACCES, libc::EPERM]), Any),
        c("symlink", p(format!("outside/link-{svc}")), "create a symlink outside", Sigsys, Succeeds),
        c("chmod-path", owned.clone(), "chmod a file it owns, by path", Sigsys, Succeeds),
        c("truncate-path", owned.clone(), "truncate a file it owns, by path", Sigsys, Succeeds),
        c("exec-sh", None, "execve /bin/sh", Sigsys, Succeeds),
        c("exec-setuid", p("bin/id-suid".into()), "execve a set-user-ID-root program (become root)", Sigsys, Succeeds),
        c("fork", None, "fork (clone without CLONE_THREAD)", Sigsys, Succeeds),
        c("clone3-process", None, "clone3 a new process", Errno(&[libc::ENOSYS]), Succeeds),
        c("ptrace-traceme", None, "ptrace(PTRACE_TRACEME)", Sigsys, Succeeds),
        c("ptrace-attach", sibling.clone(), "ptrace-attach a same-uid process", Sigsys, Succeeds),
        c("process-vm-readv", sibling.clone(), "read a same-uid process's memory", Sigsys, PermissionOk),
        c("kill-parent", None, "kill its parent (root) with SIGTERM", Sigsys, Refused),
        c("kill-pid", sibling.clone(), "kill() a same-uid process", Sigsys, Succeeds),
        c("tgkill-pid", sibling, "tgkill a same-uid process outside the sandbox", SigsysOrErrno(EPERM), Succeeds),
        c("setuid-0", None, "setuid(0)", Sigsys, Refused),
        c("setgid-0", None, "setgid(0)", Sigsys, Refused),
        c("setgroups-0", None, "setgroups([0])", Sigsys, Refused),
        c("capset-sys-admin", None, "capset raising CAP_SYS_ADMIN", Sigsys, Refused),
        c("ambient-raise", None, "raise an ambient capability", Sigsys, Refused),
        c("clear-pdeathsig", None, "outlive the broker (clear PDEATHSIG)", Sigsys, Succeeds),
        c("raise-rlimit-core", None, "raise RLIMIT_CORE (dump key material)", Sigsys, Succeeds),
        c("socket-netlink", None, "open a netlink socket (identityd: ENOSYS, getaddrinfo sorts without it)", if svc == "identityd" { Errno(&[libc::ENOSYS]) } else { Sigsys }, Succeeds),
        c("socket-packet", None, "open a packet socket", Sigsys, Refused),
        c("mount-tmpfs", None, "mount", Sigsys, Refused),
        c("unshare-user", None, "unshare(CLONE_NEWUSER)", Sigsys, Any),
        c("setns-net", None, "setns", Sigsys, Any),
        c("chroot", None, "chroot", Sigsys, Refused),
        c("personality-exec", None, "personality(READ_IMPLIES_EXEC)", Sigsys, Succeeds),
        c("bpf-map-create", None, "bpf()", Sigsys, Any),
        c("keyctl-add-key", None, "add_key/keyctl", Sigsys, Any),
        c("init-module", None, "init_module", Sigsys, Refused),
        c("reboot-cad-off", None, "reboot()", Sigsys, Refused),
        c("io-uring-setup", None, "io_uring_setup (a seccomp bypass)", Sigsys, Any),
        c("memfd-create", None, "memfd_create", Sigsys, Succeeds),
        c("ioctl-tiocsti", None, "ioctl(TIOCSTI)", Sigsys, PermissionOk),
        c("mmap-exec", None, "mmap PROT_EXEC after start", Sigsys, Succeeds),
        c("mprotect-exec", None, "mprotect a page to PROT_EXEC", Sigsys, Succeeds),
        c("connect-tcp", Some(e.closed_port.to_string()), "connect to a TCP port not granted", if no_network(svc) { Sigsys } else if svc == "certd" { Errno(EACCES) } else { SigsysOrErrno(EACCES) }, Succeeds),
        c("connect-abstract", Some(e.abstract_name.clone()), "connect to an abstract unix socket", if no_network(svc) { Sigsys } else { Errno(EPERM) }, Succeeds),
    ];
    if has_state(svc) {
        v.push(c("move-state-file-out", p(format!("outside/moved-{svc}")), "move a state file out", Errno(&[libc::EXDEV, libc::EACCES]), Succeeds));
        v.push(c("hardlink-into-state", owned, "hard-link a file into its state dir", Sigsys, Succeeds));
    }
    if svc != "identityd" {
        // identityd may read /etc (resolver files) and send UDP (DNS) by design.
        v.push(c("read-path", Some("/etc/passwd".into()), "read /etc/passwd", Errno(EACCES), Succeeds));
        v.push(c("socket-udp", None, "open a UDP socket", Sigsys, Succeeds));
    }
    if no_network(svc) {
        v.push(c("socket-tcp", None, "open a TCP socket", Sigsys, Succeeds));
        v.push(c("connect-unix", Some(e.public_sock.display().to_string()), "connect to a pathname unix socket", Sigsys, Succeeds));
    }
    if svc == "tpmd" {
        // The broker opens the TPM and hands the descriptor over: the tpmd worker reaches
        // neither the port a swtpm grant names nor a character device by path.
        v.push(c("connect-tcp", Some(e.granted_port.to_string()), "connect to the granted port (the broker connects to swtpm)", Sigsys, Succeeds));
        v.push(c("open-path", Some("/dev/ptmx".into()), "open a character device (/dev/ptmx)", Errno(EACCES), Succeeds));
        v.push(c("open-path", Some("/dev/null".into()), "open /dev/null", Errno(EACCES), Succeeds));
    }
    v
}

#[rustfmt::skip]
fn allowed(e: &Env, svc: &str) -> Vec<(&'static str, Option<String>, &'static str)> {
    let mut v = vec![("thread", None, "spawn a thread (clone3 -> ENOSYS -> clone with CLONE_THREAD)")];
    if svc != "tpmd" {
        // tpmd does its cryptography in the TPM: its filter has no room for OpenSSL's.
        v.push(("openssl-keygen", None, "EC P-256 and RSA-2048 keys and signatures"));
    }
    if has_state(svc) {
        v.push(("state-write-read", None, "write, fsync, rename, read back in its state dir"));
    }
    if svc == "keyd" || svc == "identityd" {
        // certd's store needs no subdirectories (its filter has no mkdirat).
        v.push(("state-mkdir-list", None, "mkdir and list in its state dir"));
    }
    if !no_network(svc) {
        v.push(("connect-unix", Some(e.public_sock.display().to_string()), "connect to another service's socket"));
    }
    if svc == "identityd" || svc == "certd" {
        // certd: the port of its EST server (Landlock TCP rule derived from the config).
        v.push(("connect-tcp", Some(e.granted_port.to_string()), "connect to the granted TCP port"));
    }
    if svc == "identityd" {
        v.push(("read-path", Some("/etc/hosts".into()), "read /etc/hosts (resolver)"));
        v.push(("getaddrinfo-several", Some("localhost".into()), "resolve a name with several results (glibc sorts them after netlink answers ENOSYS)"));
    }
    v
}

fn check_denied(case: &Case, r: &RunResult) -> Result<(), String> {
    let ok = match case.expect {
        Expect::Sigsys => r.signal() == Some(SIGSYS),
        Expect::Errno(set) => r.errno().is_some_and(|n| set.contains(&n)),
        Expect::SigsysOrErrno(set) => {
            r.signal() == Some(SIGSYS) || r.errno().is_some_and(|n| set.contains(&n))
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{}: expected {:?}, got {} — transcript:\n{}",
            case.what, case.expect, r.result, r.transcript
        ))
    }
}

fn check_control(case: &Case, r: &RunResult) -> Result<(), String> {
    let permission_error = r
        .errno()
        .is_some_and(|n| n == libc::EPERM || n == libc::EACCES)
        || r.signal().is_some();
    let ok = match case.control {
        Control::Succeeds => r.is_ok(),
        Control::PermissionOk => !permission_error && !r.result.starts_with("setup-failed"),
        Control::Refused => !r.is_ok(),
        Control::Any => !r.result.starts_with("setup-failed"),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} (control, no sandbox): expected {:?}, got {} — {}",
            case.what, case.control, r.result, r.transcript
        ))
    }
}

fn escape_suite(svc: &str) {
    let e = env();
    assert_attempt_mode(&aziotd_bin());
    let cases = forbidden(e, svc);
    assert!(
        cases.len() >= 20,
        "at least 20 forbidden actions per worker"
    );
    let mut failures = Vec::new();
    let mut table = format!(
        "\n== {svc}: {} forbidden actions in the real {svc} worker (aziotd --worker)\n",
        cases.len()
    );
    for case in &cases {
        let sandboxed = run_worker(svc, WorkerOpts::attempt(case.attempt, case.arg.as_deref()));
        let control = run_control(svc, case.attempt, case.arg.as_deref());
        // The attempt ran after the real lock-in: the worker reported a sandbox first.
        if !sandboxed
            .report
            .as_ref()
            .is_some_and(|r| r["ok"] == true && r["seccomp"].is_object())
        {
            failures.push(format!(
                "{}: the worker did not report its sandbox before the attempt: {}",
                case.what, sandboxed.transcript
            ));
        }
        let verdict = match check_denied(case, &sandboxed) {
            Ok(()) => "denied",
            Err(e) => {
                failures.push(e);
                "ESCAPED?"
            }
        };
        if let Err(e) = check_control(case, &control) {
            failures.push(e);
        }
        table.push_str(&format!(
            "  {verdict:<8} {:<52} worker: {:<30} control: {}\n",
            case.what, sandboxed.result, control.result
        ));
    }
    for (attempt, arg, what) in allowed(e, svc) {
        let r = run_worker(svc, WorkerOpts::attempt(attempt, arg.as_deref()));
        if !r.is_ok() {
            failures.push(format!(
                "allowed action {what} failed: {} — {}",
                r.result, r.transcript
            ));
        }
        table.push_str(&format!(
            "  {:<8} {what:<52} worker: {}\n",
            if r.is_ok() { "allowed" } else { "BROKEN" },
            r.result
        ));
    }
    println!("{table}");
    assert!(failures.is_empty(), "{svc}:\n{}", failures.join("\n"));
}

#[test]
fn keyd_escape_attempts_fail() {
    require!(Dep::Root, Dep::ServiceUser("aziotks"));
    escape_suite("keyd");
}

#[test]
fn certd_escape_attempts_fail() {
    require!(Dep::Root, Dep::ServiceUser("aziotcs"));
    escape_suite("certd");
}

#[test]
fn identityd_escape_attempts_fail() {
    require!(Dep::Root, Dep::ServiceUser("aziotid"));
    escape_suite("identityd");
}

#[test]
fn tpmd_escape_attempts_fail() {
    require!(Dep::Root, Dep::ServiceUser("aziottpm"), Dep::Swtpm);
    escape_suite("tpmd");
}

/// Polls `connect` on `path` until it succeeds or `timeout` passes.
fn connect_when_listening(
    path: &Path,
    timeout: Duration,
) -> std::io::Result<std::os::unix::net::UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// keyd's, tpmd's and identityd's real servers (tokio + hyper) answer a request from the
/// locked-in worker started by this suite's broker stand-in (no attempt in the manifest: the
/// worker serves).
#[test]
fn real_workers_serve_under_their_filter() {
    require!(
        Dep::Root,
        Dep::ServiceUser("aziotks"),
        Dep::ServiceUser("aziottpm"),
        Dep::ServiceUser("aziotid"),
        Dep::Swtpm
    );
    for svc in ["keyd", "tpmd", "identityd"] {
        let opts = WorkerOpts {
            attempt: None,
            seccomp_mode: "kill",
            allow_degraded: false,
            custom: None,
        };
        let w = start_worker(svc, &opts);
        let report = w.recv();
        assert!(
            report.as_ref().is_some_and(|r| r["ok"] == true),
            "{svc}: no sandbox report: {report:?}"
        );
        let path = match svc {
            "keyd" => "/keys/nonexistent?api-version=2020-09-01",
            "identityd" => "/trust-bundle?api-version=2020-09-01",
            _ => "/get_tpm_keys?api-version=2020-09-01",
        };
        let mut stream = match connect_when_listening(&w.listener_path, Duration::from_secs(10)) {
            Ok(s) => s,
            Err(e) => panic!(
                "{svc}: connect: {e}\n{}",
                w.finish(report, Duration::ZERO).transcript
            ),
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        let _ = stream.read_to_string(&mut reply);
        // Serving does not end the worker: finish() kills it.
        let r = w.finish(report, Duration::ZERO);
        assert!(
            reply.starts_with("HTTP/1.1 "),
            "{svc}: {reply:?} — {}",
            r.transcript
        );
        assert!(
            !reply.starts_with("HTTP/1.1 5"),
            "{svc}: {reply:?} — {}",
            r.transcript
        );
    }
}

/// Fail closed, in the real worker: seccomp in log mode is a missing protection; the worker
/// refuses to start unless degraded mode is allowed explicitly.
#[test]
fn log_mode_needs_explicit_degraded_mode() {
    require!(Dep::Root, Dep::ServiceUser("aziotks"));
    assert_attempt_mode(&aziotd_bin());
    let refused = run_worker(
        "keyd",
        WorkerOpts {
            seccomp_mode: "log",
            ..WorkerOpts::attempt("thread", None)
        },
    );
    assert!(
        refused.result.starts_with("setup-failed")
            && refused
                .result
                .contains("required protections are not enforced"),
        "{} — {}",
        refused.result,
        refused.transcript
    );
    // Allowed explicitly: starts, with a DEGRADED warning, and nothing is denied (log mode).
    let degraded = run_worker(
        "keyd",
        WorkerOpts {
            seccomp_mode: "log",
            allow_degraded: true,
            ..WorkerOpts::attempt("fork", None)
        },
    );
    assert!(
        degraded.is_ok(),
        "{} — {}",
        degraded.result,
        degraded.transcript
    );
    let warnings = degraded
        .report
        .as_ref()
        .map(|r| r["warnings"].to_string())
        .unwrap_or_default();
    assert!(warnings.contains("DEGRADED"), "{warnings}");
}

/// The soft and hard "Max core file size" of `/proc/<pid>/limits` ("unlimited" → u64::MAX).
fn core_limits(pid: i32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/limits: {e}"));
    let line = text
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap_or_else(|| panic!("{text}"));
    let v: Vec<u64> = line["Max core file size".len()..]
        .split_whitespace()
        .take(2)
        .map(|f| {
            if f == "unlimited" {
                u64::MAX
            } else {
                f.parse().unwrap_or_else(|_| panic!("{line}"))
            }
        })
        .collect();
    (v[0], v[1])
}

/// No core dump of key material: the LIVE keyd worker, started by the real broker, has
/// RLIMIT_CORE 0/0 in /proc/<pid>/limits, while its broker — started with a generous core
/// limit, as an environment may give it — has not (the control: without the worker's lock-in the
/// limit would be inherited). Raising it again is the `raise-rlimit-core` attempt (SIGSYS).
#[test]
fn live_worker_cannot_dump_core() {
    aziot_tests::require_keyd!();
    // The environment the broker inherits: unlimited core dumps.
    // SAFETY: setrlimit on this (root) test process; only the core limit changes.
    generous_core_limit().expect("raise RLIMIT_CORE");
    let keyd = aziot_tests::Keyd::start("");
    let broker = keyd.pid() as i32;
    let worker = keyd.worker_pid();
    assert_eq!(
        core_limits(broker),
        (u64::MAX, u64::MAX),
        "the control: the broker inherited unlimited core dumps"
    );
    assert_eq!(
        core_limits(worker),
        (0, 0),
        "the live worker {worker} may dump core"
    );
    // Every worker thread shares the process's limits; the worker is confined (Seccomp: 2).
    let status = std::fs::read_to_string(format!("/proc/{worker}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Seccomp:") && l.ends_with('2')),
        "{status}"
    );
}

// ---- identityd, set up from its own config (the broker's grant code, its mount namespace) ----

/// identityd's fixture: keyd's and certd's stand-in sockets and a world-writable socket nobody
/// granted in `/run/<name>/`, another in `/tmp/<name>/`; identityd's, keyd's and certd's state
/// directories in `/var/lib/<name>/` (outside the namespace's masks, so Landlock alone decides),
/// the others' with a 0644 `secret` any user may read; TCP listeners for the hub, a proxy and a
/// port nobody grants.
struct IdentitydFixture {
    run_dir: PathBuf,
    tmp_dir: PathBuf,
    lib_dir: PathBuf,
    keyd_sock: PathBuf,
    certd_sock: PathBuf,
    run_public: PathBuf,
    tmp_public: PathBuf,
    hub_port: u16,
    proxy_port: u16,
    closed_port: u16,
}

impl IdentitydFixture {
    fn new() -> IdentitydFixture {
        let name = format!("aziot-escape-identityd-{}", std::process::id());
        let (run_dir, tmp_dir, lib_dir) =
            (Path::new("/run").join(&name), Path::new("/tmp").join(&name), Path::new("/var/lib").join(&name));
        for d in [&run_dir, &tmp_dir, &lib_dir] {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d).unwrap();
            mode(d, 0o755);
        }
        for (svc, user) in [("keyd", "aziotks"), ("certd", "aziotcs"), ("identityd", "aziotid")] {
            let (uid, gid) = ids(user);
            let state = lib_dir.join(svc);
            std::fs::create_dir(&state).unwrap();
            if svc == "identityd" {
                mode(&state, 0o700);
            } else {
                // Readable by all (DAC): only the sandbox stops identityd.
                mode(&state, 0o755);
                std::fs::write(state.join("secret"), b"another service's secret").unwrap();
                mode(&state.join("secret"), 0o644);
                chown(state.join("secret"), Some(uid), Some(gid)).unwrap();
            }
            chown(&state, Some(uid), Some(gid)).unwrap();
        }
        let f = IdentitydFixture {
            keyd_sock: run_dir.join("keyd.sock"),
            certd_sock: run_dir.join("certd.sock"),
            run_public: run_dir.join("public.sock"),
            tmp_public: tmp_dir.join("public.sock"),
            hub_port: listen_tcp(),
            proxy_port: listen_tcp(),
            closed_port: listen_tcp(),
            run_dir,
            tmp_dir,
            lib_dir,
        };
        for s in [&f.keyd_sock, &f.certd_sock, &f.run_public, &f.tmp_public] {
            let l = UnixListener::bind(s).unwrap_or_else(|e| panic!("bind {}: {e}", s.display()));
            mode(s, 0o777);
            accept_forever(l, |l| l.accept().is_ok());
        }
        f
    }

    fn state(&self, svc: &str) -> PathBuf {
        self.lib_dir.join(svc)
    }

    /// identityd's worker as its broker sets it up for a manual-SAS config naming the hub at
    /// `127.0.0.1:<hub_port>` and these keyd/certd sockets, with `proxy` as the unit's
    /// `HTTPS_PROXY`: grants from `aziot_identityd::service::grants`, the config text from
    /// `aziot_identityd::manifest_text`, the policy's mount namespace.
    fn custom(&self, proxy: Option<&str>) -> Custom {
        let unix = |p: &Path| format!("unix://{}", p.display());
        let text = format!(
            "hostname = \"escape\"\nhomedir = {:?}\n[provisioning]\nsource = \"manual\"\niothub_hostname = \"127.0.0.1:{}\"\ndevice_id = \"d\"\n[provisioning.authentication]\nmethod = \"sas\"\ndevice_id_pk = \"device-id\"\n[endpoints]\naziot_certd = {:?}\naziot_identityd = {:?}\naziot_keyd = {:?}\naziot_tpmd = {:?}\n",
            self.state("identityd").display().to_string(),
            self.hub_port,
            unix(&self.certd_sock),
            unix(&self.run_dir.join("identityd.sock")),
            unix(&self.keyd_sock),
            unix(&self.run_dir.join("tpmd.sock")),
        );
        let config = aziot_identityd::config_from_text(&text).expect("identityd's config");
        let proxy = proxy.map(|p| aziot_identityd::Proxy::parse(p).expect("proxy"));
        let grants = aziot_identityd::service::grants(&config, proxy.as_ref()).expect("grants");
        let policy = aziot_policy::effective("identityd", &grants, None).expect("effective policy");
        let merged: toml::Table = toml::from_str(&text).expect("toml");
        Custom {
            policy,
            config: aziot_identityd::manifest_text(merged, proxy.as_ref()).expect("manifest text"),
            state: self.state("identityd"),
            namespace: true,
        }
    }
}

impl Drop for IdentitydFixture {
    fn drop(&mut self) {
        for d in [&self.run_dir, &self.tmp_dir, &self.lib_dir] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// A TCP listener on 127.0.0.1 that accepts forever; its port.
fn listen_tcp() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    accept_forever(l, |l| l.accept().is_ok());
    port
}

/// identityd's own grants, in its real worker set up as its broker does (grants derived from a
/// manual-SAS config by `aziot_identityd::service::grants`, its private mount namespace):
/// another service's state (keyd's, certd's: 0644 files any user may read) is unreadable; a TCP
/// port nobody granted is refused by Landlock (EACCES) while the hub's port connects; with an
/// HTTPS proxy in the unit's environment only the proxy's port connects and the hub's is refused;
/// a world-writable pathname socket nobody granted does not exist in its mount namespace
/// (ENOENT) while keyd's and certd's connect. Every refused action succeeds for the plain
/// `aziotid` user without the sandbox (the control).
#[test]
fn identityd_reaches_only_what_its_config_grants() {
    require!(Dep::Root, Dep::ServiceUser("aziotid"), Dep::ServiceUser("aziotks"), Dep::ServiceUser("aziotcs"));
    assert_attempt_mode(&aziotd_bin());
    let f = IdentitydFixture::new();
    let direct = f.custom(None);
    let proxied = f.custom(Some(&format!("http://u:p@127.0.0.1:{}", f.proxy_port)));
    let path = |p: PathBuf| Some(p.display().to_string());
    let port = |p: u16| Some(p.to_string());
    use Control::*;
    use Expect::*;
    #[rustfmt::skip]
    let denied: Vec<(&Custom, Case)> = vec![
        (&direct, Case { attempt: "read-path", arg: path(f.state("keyd").join("secret")), what: "read keyd's state (a 0644 file)", expect: Errno(EACCES), control: Succeeds }),
        (&direct, Case { attempt: "list-dir", arg: path(f.state("keyd")), what: "list keyd's state dir", expect: Errno(EACCES), control: Succeeds }),
        (&direct, Case { attempt: "read-path", arg: path(f.state("certd").join("secret")), what: "read certd's state (a 0644 file)", expect: Errno(EACCES), control: Succeeds }),
        (&direct, Case { attempt: "connect-tcp", arg: port(f.closed_port), what: "connect to a TCP port not granted", expect: Errno(EACCES), control: Succeeds }),
        (&proxied, Case { attempt: "connect-tcp", arg: port(f.hub_port), what: "with a proxy: connect to the hub directly", expect: Errno(EACCES), control: Succeeds }),
        (&direct, Case { attempt: "connect-unix", arg: path(f.run_public.clone()), what: "connect to a 0777 socket in /run not granted", expect: Errno(&[libc::ENOENT]), control: Succeeds }),
        (&direct, Case { attempt: "connect-unix", arg: path(f.tmp_public.clone()), what: "connect to a 0777 socket in /tmp not granted", expect: Errno(&[libc::ENOENT]), control: Succeeds }),
    ];
    #[rustfmt::skip]
    let allowed: Vec<(&Custom, &str, Option<String>, &str)> = vec![
        (&direct, "connect-tcp", port(f.hub_port), "connect to the hub's port (from iothub_hostname)"),
        (&proxied, "connect-tcp", port(f.proxy_port), "with a proxy: connect to the proxy's port"),
        (&direct, "connect-unix", path(f.keyd_sock.clone()), "connect to keyd's socket ([endpoints])"),
        (&direct, "connect-unix", path(f.certd_sock.clone()), "connect to certd's socket ([endpoints])"),
        (&direct, "state-write-read", None, "write and read back in its own state dir"),
    ];
    let mut failures = Vec::new();
    let mut table = String::from("\n== identityd, set up from its config, in its mount namespace\n");
    for (custom, case) in &denied {
        let opts = WorkerOpts { custom: Some((*custom).clone()), ..WorkerOpts::attempt(case.attempt, case.arg.as_deref()) };
        let sandboxed = run_worker("identityd", opts);
        let control = run_control("identityd", case.attempt, case.arg.as_deref());
        if !sandboxed.report.as_ref().is_some_and(|r| r["ok"] == true && r["seccomp"].is_object()) {
            failures.push(format!("{}: no sandbox report before the attempt: {}", case.what, sandboxed.transcript));
        }
        let verdict = match check_denied(case, &sandboxed) {
            Ok(()) => "denied",
            Err(e) => {
                failures.push(e);
                "ESCAPED?"
            }
        };
        if let Err(e) = check_control(case, &control) {
            failures.push(e);
        }
        table.push_str(&format!("  {verdict:<8} {:<52} worker: {:<30} control: {}\n", case.what, sandboxed.result, control.result));
    }
    for (custom, attempt, arg, what) in &allowed {
        let opts = WorkerOpts { custom: Some((*custom).clone()), ..WorkerOpts::attempt(attempt, arg.as_deref()) };
        let r = run_worker("identityd", opts);
        if !r.is_ok() {
            failures.push(format!("allowed action {what} failed: {} — {}", r.result, r.transcript));
        }
        table.push_str(&format!("  {:<8} {what:<52} worker: {}\n", if r.is_ok() { "allowed" } else { "BROKEN" }, r.result));
    }
    println!("{table}");
    assert!(failures.is_empty(), "identityd:\n{}", failures.join("\n"));
}
