//! The escape suite: under each worker's exact policy (the probe drops to the service user in
//! pre_exec, then applies rlimits, Landlock and seccomp in the worker's order) at least 20
//! forbidden actions each fail with the expected errno or kill the probe with SIGSYS; the same
//! action run with privileges dropped but no sandbox ("control") shows, where it succeeds,
//! that it is the sandbox and not file permissions that stops it. Allowed actions (the state
//! dir, threads, OpenSSL, a tokio runtime serving a client) succeed under the same sandbox.
//!
//! Run as root: `cargo test -p aziot-policy --test escape -- --nocapture` prints the table.

mod common;

use std::io::{Read, Write};
use std::process::Stdio;
use std::time::Duration;

use common::{env, run_probe, Env};

const SIGSYS: i32 = libc::SIGSYS;

#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Killed by the seccomp allowlist.
    Sigsys,
    /// Failed with one of these errnos.
    Errno(&'static [i32]),
}

/// What the same action does with privileges dropped but no Landlock and no seccomp.
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

const EACCES: &[i32] = &[libc::EACCES];
const EPERM: &[i32] = &[libc::EPERM];

fn no_network(svc: &str) -> bool {
    svc == "keyd" || svc == "tpmd"
}

fn forbidden(e: &Env, svc: &str) -> Vec<Case> {
    let other = if svc == "keyd" { "certd" } else { "keyd" };
    let p = |rel: String| Some(e.prefix.join(rel).display().to_string());
    let sibling = Some(e.sibling(svc).to_string());
    let owned = p(format!("outside/owned-{svc}"));
    use Control::*;
    use Expect::*;
    let c = |attempt, arg: Option<String>, what, expect, control| Case { attempt, arg, what, expect, control };
    let mut v = vec![
        c("read-path", Some("/etc/shadow".into()), "read /etc/shadow", Errno(EACCES), Refused),
        c("read-path", p(format!("var/lib/aziot/{other}/secret")), "read another service's state", Errno(EACCES), Succeeds),
        c("list-dir", p(format!("var/lib/aziot/{other}")), "list another service's state dir", Errno(EACCES), Succeeds),
        c("read-path", p(format!("etc/aziot/{svc}/config.toml")), "read its config (the broker passes it)", Errno(EACCES), Succeeds),
        c("write-path", p(format!("outside/x-{svc}")), "write outside its state dir", Errno(EACCES), Succeeds),
        c("write-path", p(format!("var/lib/aziot/new-{svc}")), "create a file in the parent of its state dir", Errno(EACCES), Succeeds),
        c("mkdir-path", p(format!("outside/dir-{svc}")), "mkdir outside its state dir", Errno(EACCES), Succeeds),
        c("move-state-file-out", p(format!("outside/moved-{svc}")), "move a state file out", Errno(&[libc::EXDEV, libc::EACCES]), Succeeds),
        c("write-proc-self-mem", None, "open /proc/self/mem read-write", Errno(EACCES), Succeeds),
        c("open-path", p("dev/mem".into()), "open /dev/mem (a c 1:1 node)", Errno(EACCES), Refused),
        c("open-path", Some("/dev/random".into()), "open a world-writable device (/dev/random)", Errno(EACCES), Succeeds),
        c("open-path", Some("/dev/kmsg".into()), "open the kernel log (/dev/kmsg)", Errno(&[libc::EACCES, libc::EPERM]), Any),
        c("symlink", p(format!("outside/link-{svc}")), "create a symlink outside", Sigsys, Succeeds),
        c("chmod-path", owned.clone(), "chmod a file by path", Sigsys, Succeeds),
        c("truncate-path", owned.clone(), "truncate a file by path", Sigsys, Succeeds),
        c("hardlink-into-state", owned, "hard-link a file into its state dir", Sigsys, Succeeds),
        c("exec-sh", None, "execve /bin/sh", Sigsys, Succeeds),
        c("fork", None, "fork (clone without CLONE_THREAD)", Sigsys, Succeeds),
        c("clone3-process", None, "clone3 a new process", Errno(&[libc::ENOSYS]), Succeeds),
        c("ptrace-traceme", None, "ptrace(PTRACE_TRACEME)", Sigsys, Succeeds),
        c("ptrace-attach", sibling.clone(), "ptrace-attach a same-uid process", Sigsys, Succeeds),
        c("process-vm-readv", sibling.clone(), "read a same-uid process's memory", Sigsys, PermissionOk),
        c("kill-parent", None, "kill the broker (SIGTERM)", Sigsys, Refused),
        c("kill-pid", sibling.clone(), "kill() a same-uid process", Sigsys, Succeeds),
        c("tgkill-pid", sibling, "tgkill a same-uid process outside the sandbox", Errno(EPERM), Succeeds),
        c("setuid-0", None, "setuid(0)", Sigsys, Refused),
        c("setgid-0", None, "setgid(0)", Sigsys, Refused),
        c("setgroups-0", None, "setgroups([0])", Sigsys, Refused),
        c("capset-sys-admin", None, "capset raising CAP_SYS_ADMIN", Sigsys, Refused),
        c("ambient-raise", None, "raise an ambient capability", Sigsys, Refused),
        c("clear-pdeathsig", None, "outlive the broker (clear PDEATHSIG)", Sigsys, Succeeds),
        c("raise-rlimit-core", None, "raise RLIMIT_CORE (dump key material)", Sigsys, Any),
        c("socket-netlink", None, "open a netlink socket", Sigsys, Succeeds),
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
        c("connect-tcp", Some(e.closed_port.to_string()), "connect to a TCP port not granted",
            if no_network(svc) { Sigsys } else { Errno(EACCES) }, Succeeds),
        c("connect-abstract", Some(e.abstract_name.clone()), "connect to an abstract unix socket",
            if no_network(svc) { Sigsys } else { Errno(EPERM) }, Succeeds),
    ];
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
        v.push(c("open-path", Some("/dev/ptmx".into()), "open a character device (/dev/ptmx, a TPM stand-in's source)", Errno(EACCES), Succeeds));
        v.push(c("open-path", Some("/dev/null".into()), "open /dev/null", Errno(EACCES), Succeeds));
    }
    v
}

fn allowed(e: &Env, svc: &str) -> Vec<(&'static str, Option<String>, &'static str)> {
    let mut v = vec![
        ("state-write-read", None, "write, fsync, rename, read back in its state dir"),
        ("state-mkdir-list", None, "mkdir and list in its state dir"),
        ("thread", None, "spawn a thread (clone3 -> ENOSYS -> clone with CLONE_THREAD)"),
        ("openssl-keygen", None, "EC P-256 and RSA-2048 keys and signatures"),
    ];
    if !no_network(svc) {
        v.push(("connect-tcp", Some(e.granted_port.to_string()), "connect to the granted TCP port"));
        v.push(("connect-unix", Some(e.public_sock.display().to_string()), "connect to another service's socket"));
    }
    if svc == "identityd" {
        v.push(("read-path", Some("/etc/hosts".into()), "read /etc/hosts (resolver)"));
    }
    v
}

fn check_denied(case: &Case, r: &common::ProbeResult) -> Result<(), String> {
    let ok = match case.expect {
        Expect::Sigsys => r.signal() == Some(SIGSYS),
        Expect::Errno(set) => r.errno().is_some_and(|n| set.contains(&n)),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{}: expected {:?}, got {} — transcript:\n{}", case.what, case.expect, r.result, r.transcript))
    }
}

fn check_control(case: &Case, r: &common::ProbeResult) -> Result<(), String> {
    let permission_error = r.errno().is_some_and(|n| n == libc::EPERM || n == libc::EACCES) || r.signal().is_some();
    let ok = match case.control {
        Control::Succeeds => r.is_ok(),
        Control::PermissionOk => !permission_error && !r.result.starts_with("setup-failed"),
        Control::Refused => !r.is_ok(),
        Control::Any => !r.result.starts_with("setup-failed"),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{} (control, no sandbox): expected {:?}, got {}", case.what, case.control, r.result))
    }
}

fn escape_suite(svc: &str) {
    let e = env();
    let cases = forbidden(e, svc);
    assert!(cases.len() >= 20, "at least 20 forbidden actions per worker");
    let mut failures = Vec::new();
    let mut table = format!("\n== {svc}: {} forbidden actions under the {svc} worker's policy\n", cases.len());
    for case in &cases {
        let sandboxed = run_probe(svc, case.attempt, case.arg.as_deref(), false);
        let control = run_probe(svc, case.attempt, case.arg.as_deref(), true);
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
            "  {verdict:<8} {:<48} sandboxed: {:<36} control: {}\n",
            case.what, sandboxed.result, control.result
        ));
    }
    for (attempt, arg, what) in allowed(e, svc) {
        let r = run_probe(svc, attempt, arg.as_deref(), false);
        if !r.is_ok() {
            failures.push(format!("allowed action {what} failed: {} — {}", r.result, r.transcript));
        }
        table.push_str(&format!("  {:<8} {what:<48} sandboxed: {}\n", if r.is_ok() { "allowed" } else { "BROKEN" }, r.result));
    }
    println!("{table}");
    assert!(failures.is_empty(), "{svc}:\n{}", failures.join("\n"));
}

#[test]
fn keyd_escape_attempts_fail() {
    escape_suite("keyd");
}

#[test]
fn certd_escape_attempts_fail() {
    escape_suite("certd");
}

#[test]
fn identityd_escape_attempts_fail() {
    escape_suite("identityd");
}

#[test]
fn tpmd_escape_attempts_fail() {
    escape_suite("tpmd");
}

/// A multi-threaded tokio runtime on a handed-over listener, under each worker's real
/// seccomp filter: accept, SO_PEERCRED, read, spawn_blocking, a timer, write, shutdown.
#[test]
fn tokio_runtime_serves_under_every_worker_filter() {
    let e = env();
    for svc in common::SERVICES {
        let sock = e.prefix.join(format!("echo-{svc}.sock"));
        let child = common::probe_cmd(svc, &["--attempt", "tokio-echo", "--listener", sock.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stream = None;
        for _ in 0..200 {
            if let Ok(s) = std::os::unix::net::UnixStream::connect(&sock) {
                stream = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let mut stream = stream.unwrap_or_else(|| panic!("{svc}: the probe never listened"));
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        stream.write_all(b"ping").unwrap();
        let mut reply = String::new();
        let _ = stream.read_to_string(&mut reply);
        let out = child.wait_with_output().unwrap();
        let transcript = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(reply, "ping uid=0\n", "{svc}: {transcript}");
        assert!(transcript.contains("result: ok"), "{svc}: {transcript}");
    }
}

/// Fail closed: seccomp in log mode is a missing protection; the worker refuses to start unless
/// degraded mode is allowed explicitly.
#[test]
fn log_mode_needs_explicit_degraded_mode() {
    // check_required in log mode without degraded mode: refuses to start.
    let out = common::probe_cmd("keyd", &["--attempt", "thread", "--seccomp", "log"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("result: setup-failed: required protections are not enforced: seccomp runs in log mode"), "{text}");
    // Allowed explicitly: starts, with a DEGRADED warning, and nothing is denied (log mode).
    let out = common::probe_cmd("keyd", &["--attempt", "fork", "--seccomp", "log", "--allow-degraded"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("result: ok"), "{text}");
    assert!(text.contains("sandboxed: yes"), "{text}");
}
