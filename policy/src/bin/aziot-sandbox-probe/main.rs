//! aziot-sandbox-probe: a TEST-ONLY helper (never installed) that puts itself under a worker's
//! exact sandbox and serves as a stand-in worker for the audit tests (`policy/tests/audit.rs`):
//! a live, sandboxed process with a status file, for `aziotctl policy audit` to inspect. (The
//! escape attempts run in the real worker, `aziotd --worker`: `tests/tests/escape.rs`.)
//!
//! As root it plays the broker: resolves the service user's credentials, opens the state
//! directory, and spawns itself in worker mode with `drop_privileges_in_child` in `pre_exec`
//! (the state directory as fd 3, an optional listener as fd 4). The worker then follows the
//! real worker's order: pre-load (openssl::init), apply_rlimits, apply_landlock,
//! apply_seccomp, check_required; reports, and waits. The parent prints the result:
//!
//! ```text
//! result: ok | result: errno=<n> (<name>) | result: signal=<n> (<name>) | result: setup-failed: ...
//! ```
//!
//! usage:
//!   aziot-sandbox-probe --service SVC --state-dir DIR [--grant-port N]... [--control]
//!       [--seccomp kill|log|skip] [--allow-degraded] [--listener PATH] --serve --status FILE
//!
//! `--control` drops privileges but applies no sandbox (an unsandboxed process for the audit
//! to flag).
//! `--serve`: the worker reports its sandbox, the parent writes a status file (as the broker
//! does), prints `ready`, and both wait for stdin to close (for the audit tests).
//! `--broker-seccomp`: the broker side first installs an allow-all filter on itself, as systemd's
//! `SystemCallFilter=` would; the worker inherits it below its own two.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use aziot_policy::{Grants, Origin, PortGrant, SeccompMode, Status};

const STATE_FD: RawFd = 3;
const LISTENER_FD: RawFd = 4;

#[derive(Clone, Debug, Default)]
struct Args {
    service: String,
    state_dir: Option<PathBuf>,
    grant_ports: Vec<u16>,
    control: bool,
    seccomp: Option<String>,
    allow_degraded: bool,
    listener: Option<PathBuf>,
    serve: bool,
    status: Option<PathBuf>,
    worker: bool,
    broker_seccomp: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--service" => a.service = value()?,
            "--state-dir" => a.state_dir = Some(value()?.into()),
            "--grant-port" => a.grant_ports.push(value()?.parse().map_err(|e| format!("--grant-port: {e}"))?),
            "--control" => a.control = true,
            "--seccomp" => a.seccomp = Some(value()?),
            "--allow-degraded" => a.allow_degraded = true,
            "--listener" => a.listener = Some(value()?.into()),
            "--serve" => a.serve = true,
            "--status" => a.status = Some(value()?.into()),
            "--worker" => a.worker = true,
            "--broker-seccomp" => a.broker_seccomp = true,
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.service.is_empty() {
        return Err("--service is required".into());
    }
    if !a.serve {
        return Err("--serve is required (the escape attempts run in `aziotd --worker`: tests/tests/escape.rs)".into());
    }
    Ok(a)
}

fn grants(a: &Args) -> Grants {
    Grants {
        paths: Vec::new(),
        tcp_ports: a
            .grant_ports
            .iter()
            .map(|p| PortGrant { port: *p, origin: Origin::Config("probe --grant-port".into()) })
            .collect(),
        pkcs11: false,
        sockets: Vec::new(),
    }
}

fn mode(a: &Args) -> Result<SeccompMode, String> {
    a.seccomp.as_deref().unwrap_or("kill").parse()
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("aziot-sandbox-probe: {e}");
            return ExitCode::from(64);
        }
    };
    let result = if args.worker { worker(&args) } else { broker(&args) };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("aziot-sandbox-probe: {e}");
            ExitCode::from(70)
        }
    }
}

// ---- the broker side (root) ----

fn broker(a: &Args) -> Result<ExitCode, String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("must run as root (it plays the broker)".into());
    }
    let policy = aziot_policy::effective(&a.service, &grants(a), None).map_err(|e| e.to_string())?;
    let creds = aziot_policy::resolve_credentials(&policy).map_err(|e| e.to_string())?;
    if a.broker_seccomp {
        allow_all_filter().map_err(|e| format!("broker filter: {e}"))?;
    }
    let state_dir = a.state_dir.clone().ok_or("--state-dir is required")?;
    let state = std::fs::File::open(&state_dir).map_err(|e| format!("{}: {e}", state_dir.display()))?;
    let state: OwnedFd = state.into();
    let listener: Option<OwnedFd> = match &a.listener {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            let l = std::os::unix::net::UnixListener::bind(path).map_err(|e| format!("{}: {e}", path.display()))?;
            Some(l.into())
        }
        None => None,
    };

    let mut cmd = Command::new(std::env::current_exe().map_err(|e| e.to_string())?);
    cmd.arg("--worker").args(["--service", &a.service]);
    for p in &a.grant_ports {
        cmd.args(["--grant-port", &p.to_string()]);
    }
    for (flag, on) in [("--control", a.control), ("--allow-degraded", a.allow_degraded), ("--serve", a.serve)] {
        if on {
            cmd.arg(flag);
        }
    }
    if let Some(s) = &a.seccomp {
        cmd.args(["--seccomp", s]);
    }
    if listener.is_some() {
        cmd.arg("--listener").arg(a.listener.as_ref().expect("listener path"));
    }
    cmd.env_clear().current_dir("/").stdout(Stdio::piped()).stderr(Stdio::inherit());
    cmd.stdin(Stdio::inherit());
    let state_raw = state.as_raw_fd();
    let listener_raw = listener.as_ref().map(|l| l.as_raw_fd());
    // The worker's private mount namespace, as the broker makes it (certd, identityd).
    let mountns = match policy.mount_plan() {
        Some(plan) => Some(aziot_policy::mountns::prepare(&plan).map_err(|e| format!("mount namespace: {e}"))?),
        None => None,
    };
    let mountns_record = mountns.as_ref().map(|p| p.record().clone());
    // SAFETY: the closure runs in the forked child before exec and only makes raw syscalls
    // (dup2/fcntl, the mount namespace's and drop_privileges_in_child's, all async-signal-safe);
    // `creds` and the mount namespace's paths were prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            place_fd(state_raw, STATE_FD)?;
            if let Some(l) = listener_raw {
                place_fd(l, LISTENER_FD)?;
            }
            if let Some(p) = &mountns {
                aziot_policy::mountns::enter_in_child(p)?;
            }
            aziot_policy::drop_privileges_in_child(&creds)
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("spawn the worker: {e}"))?;
    drop(listener);
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout);
    let mut transcript = String::new();

    if a.serve {
        let mut report = String::new();
        loop {
            report.clear();
            if lines.read_line(&mut report).map_err(|e| e.to_string())? == 0 || report.starts_with('{') {
                break;
            }
            transcript.push_str(&report);
        }
        let report: serde_json::Value = serde_json::from_str(report.trim())
            .map_err(|e| format!("worker report {report:?}: {e}"))?;
        let warnings: Vec<String> = serde_json::from_value(report["warnings"].clone()).unwrap_or_default();
        let status = Status {
            service: a.service.clone(),
            broker_pid: std::process::id() as i32,
            worker_pid: child.id() as i32,
            policy_digest: policy.digest(),
            seccomp_digest: report["seccomp"]["digest"].as_str().unwrap_or_default().to_owned(),
            seccomp_program: policy.seccomp.program_name().to_owned(),
            landlock: serde_json::from_value(report["landlock"].clone()).unwrap_or_default(),
            seccomp_mode: mode(a)?.to_string(),
            degraded: aziot_policy::is_degraded(&warnings),
            warnings,
            restarts: 0,
            handed_dirs: Vec::new(),
            handed_inodes: Vec::new(),
            mount_namespace: mountns_record.clone(),
        };
        let path = a.status.clone().ok_or("--serve needs --status FILE")?;
        status.write(&path).map_err(|e| e.to_string())?;
        println!("ready {} {}", child.id(), path.display());
        std::io::stdout().flush().map_err(|e| e.to_string())?;
    }
    lines.read_to_string(&mut transcript).map_err(|e| e.to_string())?;
    let status = child.wait().map_err(|e| e.to_string())?;
    for line in transcript.lines() {
        println!("worker: {line}");
    }
    let outcome = transcript.lines().find_map(|l| l.strip_prefix("outcome: "));
    let setup = transcript.lines().find_map(|l| l.strip_prefix("setup-failed: "));
    let result = if let Some(sig) = status.signal() {
        format!("signal={sig} ({})", signal_name(sig))
    } else if let Some(s) = setup {
        format!("setup-failed: {s}")
    } else if let Some(o) = outcome {
        o.to_owned()
    } else if a.serve && status.success() {
        "ok".to_owned()
    } else {
        format!("no-outcome (exit {:?})", status.code())
    };
    println!("result: {result}");
    Ok(ExitCode::SUCCESS)
}

/// One instruction: SECCOMP_RET_ALLOW.
fn allow_all_filter() -> std::io::Result<()> {
    let mut insn = [libc::sock_filter { code: 0x06 /* BPF_RET | BPF_K */, jt: 0, jf: 0, k: libc::SECCOMP_RET_ALLOW }];
    let prog = libc::sock_fprog { len: 1, filter: insn.as_mut_ptr() };
    // SAFETY: seccomp copies the one-instruction program from `prog`, alive during the call;
    // root (CAP_SYS_ADMIN) needs no no_new_privs.
    let rc = unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &prog as *const libc::sock_fprog) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Puts `fd` at `target` without CLOEXEC (async-signal-safe).
fn place_fd(fd: RawFd, target: RawFd) -> std::io::Result<()> {
    if fd == target {
        // SAFETY: clears FD_CLOEXEC on a descriptor we own.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    } else {
        // SAFETY: dup2 onto `target`; the new descriptor has no CLOEXEC.
        if unsafe { libc::dup2(fd, target) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig).map(|s| s.as_str().to_owned()).unwrap_or_else(|_| "?".into())
}

// ---- the worker side (the service user from its first instruction) ----

fn worker(a: &Args) -> Result<ExitCode, String> {
    let policy = aziot_policy::effective(&a.service, &grants(a), None).map_err(|e| e.to_string())?;
    // Pre-load, as the real worker does, before anything is locked.
    openssl::init();
    // SAFETY: the broker side placed the state directory at fd 3 for us; it stays open for
    // the life of the process.
    let state = unsafe { BorrowedFd::borrow_raw(STATE_FD) };
    let _listener = a.listener.as_ref().map(|_| {
        // SAFETY: the broker side placed the listener at fd 4; we take ownership of it.
        unsafe { OwnedFd::from_raw_fd(LISTENER_FD) }
    });
    let mode = mode(a)?;
    let mut report = serde_json::Value::Null;
    if a.control {
        println!("sandboxed: no (control)");
    } else {
        let sandbox = || -> Result<serde_json::Value, aziot_policy::PolicyError> {
            aziot_policy::apply_rlimits(&policy)?;
            let ll = aziot_policy::apply_landlock(&policy, &[("state", state)])?;
            let sc = aziot_policy::apply_seccomp(&policy, mode)?;
            let warnings = aziot_policy::check_required(&policy, &ll, &sc, a.allow_degraded)?;
            Ok(serde_json::json!({ "landlock": ll, "seccomp": sc, "warnings": warnings }))
        };
        match sandbox() {
            Ok(r) => report = r,
            Err(e) => {
                println!("setup-failed: {}", chain(&e));
                return Ok(ExitCode::from(2));
            }
        }
        println!("sandboxed: yes");
    }
    serve(report)
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Serve mode: report the sandbox, start two threads (as a runtime would), wait for stdin EOF.
fn serve(report: serde_json::Value) -> Result<ExitCode, String> {
    static DONE: AtomicBool = AtomicBool::new(false);
    println!("{report}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let threads: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(|| {
                while !DONE.load(Ordering::SeqCst) {
                    std::thread::park();
                }
            })
        })
        .collect();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    DONE.store(true, Ordering::SeqCst);
    for t in threads {
        t.thread().unpark();
        t.join().map_err(|_| "a thread panicked".to_owned())?;
    }
    println!("outcome: ok");
    Ok(ExitCode::SUCCESS)
}
