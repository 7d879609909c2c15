//! The worker's private mount namespace (policy `[mount_namespace]`, certd and identityd;
//! docs/security.md "Pathname unix sockets"), at the worker boundary: the test starts the REAL
//! worker (`aziotd --worker`) for certd exactly as the broker does — the namespace prepared
//! before fork and entered in the child before the privilege drop with the broker's own code
//! (`aziot_policy::mountns`, which broker/src/mountns.rs calls), a socketpair on fd 3, the
//! service user's credentials, certd's effective policy with socket grants — and the worker,
//! locked in (rlimits, Landlock, seccomp), tries ONE connect (escape-probe attempt mode).
//!
//! Targets: a stand-in for keyd's socket (granted), world-writable (0777) sockets planted in
//! /run and /tmp (not granted), the same through /var/run, and through /proc/<pid>/root of a
//! same-user process outside the namespace. Every target is also tried by the plain service user
//! without any sandbox (the control: it connects) and by the locked-in worker WITHOUT the
//! namespace (Landlock ABI 7 does not restrict unix connects: it connects too) — so the namespace
//! is what stops it. (certd's broker entry is being written: these tests use certd's policy with
//! the worker's generic lock-in, like tests/tests/escape.rs.)
//!
//! Needs root and the service user aziotcs. Run:
//! `cargo build --workspace --bins --tests && cargo test -p aziot-tests --test mount_namespace`
//! (the worker's attempt mode comes with the tests' build: tests/tests/escape.rs)

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aziot_ipc::handoff::{
    self, DescriptorEntry, DescriptorKind, Manifest, MANIFEST_VERSION,
};
use aziot_policy::escape::{EscapeAttempt, EscapeOutcome};
use aziot_tests::{require, Dep};

const USER: &str = "aziotcs";

fn ids() -> (u32, u32) {
    let u = nix::unistd::User::from_name(USER)
        .unwrap()
        .unwrap_or_else(|| panic!("user {USER} missing"));
    (u.uid.as_raw(), u.gid.as_raw())
}

fn mode(p: &Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

/// A listening socket that accepts forever, mode `m`.
fn plant_socket(path: &Path, m: u32) {
    let l = UnixListener::bind(path).unwrap_or_else(|e| panic!("bind {}: {e}", path.display()));
    mode(path, m);
    std::thread::spawn(move || while l.accept().is_ok() {});
}

/// The test's sockets and directories: `/run/aziot-mountns-<tag>-<pid>/{keyd.sock, public.sock}`,
/// `/tmp/aziot-mountns-<tag>-<pid>/{public.sock, granted/keyd.sock, state/}`.
struct Fixture {
    run_dir: PathBuf,
    tmp_dir: PathBuf,
    /// Granted: the stand-in for keyd's socket (beneath /run).
    keyd_sock: PathBuf,
    /// Granted: a socket in a test prefix under /tmp.
    tmp_granted: PathBuf,
    run_public: PathBuf,
    tmp_public: PathBuf,
    state: PathBuf,
    /// A `sleep` running as aziotcs outside any namespace or sandbox.
    sibling: std::process::Child,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        let name = format!("aziot-mountns-{tag}-{}", std::process::id());
        let (run_dir, tmp_dir) = (Path::new("/run").join(&name), Path::new("/tmp").join(&name));
        for d in [&run_dir, &tmp_dir] {
            let _ = std::fs::remove_dir_all(d);
            std::fs::create_dir_all(d).unwrap();
            mode(d, 0o755);
        }
        std::fs::create_dir(tmp_dir.join("granted")).unwrap();
        mode(&tmp_dir.join("granted"), 0o755);
        let state = tmp_dir.join("state");
        std::fs::create_dir(&state).unwrap();
        mode(&state, 0o700);
        let (uid, gid) = ids();
        chown(&state, Some(uid), Some(gid)).unwrap();
        let f = Fixture {
            keyd_sock: run_dir.join("keyd.sock"),
            tmp_granted: tmp_dir.join("granted/keyd.sock"),
            run_public: run_dir.join("public.sock"),
            tmp_public: tmp_dir.join("public.sock"),
            state,
            sibling: {
                let mut cmd = Command::new("sleep");
                cmd.arg("600")
                    .uid(uid)
                    .gid(gid)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null());
                cmd.spawn().expect("spawn a sibling as aziotcs")
            },
            run_dir,
            tmp_dir,
        };
        for s in [&f.keyd_sock, &f.tmp_granted, &f.run_public, &f.tmp_public] {
            // World-writable: file permissions let anyone connect; only the namespace stops the worker.
            plant_socket(s, 0o777);
        }
        f
    }

    fn policy(&self) -> aziot_policy::Policy {
        let sockets = [&self.keyd_sock, &self.tmp_granted]
            .into_iter()
            .map(|p| aziot_policy::SocketGrant {
                path: p.clone(),
                origin: aziot_policy::Origin::Config("endpoints.aziot_keyd (test)".into()),
            })
            .collect();
        let grants = aziot_policy::Grants {
            sockets,
            ..Default::default()
        };
        aziot_policy::effective("certd", &grants, None).expect("certd's effective policy")
    }

    fn sibling_root(&self, path: &Path) -> String {
        format!("/proc/{}/root{}", self.sibling.id(), path.display())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.sibling.kill();
        let _ = self.sibling.wait();
        let _ = std::fs::remove_dir_all(&self.run_dir);
        let _ = std::fs::remove_dir_all(&self.tmp_dir);
    }
}

/// A started worker: the child, our end of the hand-off socket, its sandbox report.
struct Worker {
    child: std::process::Child,
    ours: OwnedFd,
    report: Option<serde_json::Value>,
    listener_path: PathBuf,
}

impl Worker {
    /// `aziotd --worker` for certd, as the broker starts it; `namespace`: with the private mount
    /// namespace (else without, the comparison). The manifest carries `attempt`.
    fn start(f: &Fixture, namespace: bool, attempt: &str, arg: Option<&str>) -> Worker {
        let policy = f.policy();
        let creds = aziot_policy::resolve_credentials(&policy).expect("credentials");
        // The broker's step before fork (broker/src/mountns.rs): every socket cloned now.
        let prepared = if namespace {
            Some(
                aziot_policy::mountns::prepare(&policy.mount_plan().expect("certd's plan"))
                    .expect("prepare the namespace"),
            )
        } else {
            None
        };
        static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let listener_path = f.tmp_dir.join(format!("listener-{n}.sock"));
        let _ = std::fs::remove_file(&listener_path);
        let listener = UnixListener::bind(&listener_path).unwrap();
        mode(&listener_path, 0o777);
        let entries = vec![
            DescriptorEntry {
                name: "listener".into(),
                kind: DescriptorKind::UnixListener,
            },
            DescriptorEntry {
                name: "state".into(),
                kind: DescriptorKind::Directory,
            },
        ];
        let fds: Vec<OwnedFd> = vec![
            listener.into(),
            std::fs::File::open(&f.state).unwrap().into(),
        ];
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            service: "certd".into(),
            config: format!("homedir_path = {:?}\n", f.state.display().to_string()),
            descriptors: entries,
            policy: serde_json::to_value(&policy).unwrap(),
            log_filter: String::new(),
            seccomp_mode: "kill".into(),
            allow_degraded: false,
            // "serve": no attempt, the worker serves (certd's real server).
            escape: (attempt != "serve").then(|| EscapeAttempt {
                name: attempt.into(),
                arg: arg.map(str::to_owned),
            }),
        };
        let aziot_tests::worker_spawn::Spawned { child, sock: ours } =
            aziot_tests::worker_spawn::spawn(&manifest, fds, creds, prepared, false);
        let report = handoff::recv_json::<serde_json::Value>(ours.as_fd()).ok();
        assert!(
            report
                .as_ref()
                .is_some_and(|r| r["ok"] == true && r["seccomp"].is_object()),
            "the worker did not report its sandbox: {report:?}"
        );
        Worker {
            child,
            ours,
            report,
            listener_path,
        }
    }

    /// Kills a serving worker and reaps it.
    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.listener_path);
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The attempt's outcome (`ok`, `errno=N (...)`, `signal=N`), once the worker exited.
    fn finish(mut self) -> String {
        let mut outcome = None;
        while let Ok(m) = handoff::recv_json::<serde_json::Value>(self.ours.as_fd()) {
            if m.get("seccomp_violation").is_some() {
                outcome = Some(m.to_string());
            }
            if let Ok(o) = serde_json::from_value::<EscapeOutcome>(m) {
                outcome = Some(o.escape_outcome);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
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
        let _ = std::fs::remove_file(&self.listener_path);
        match (status.signal(), outcome) {
            (Some(sig), o) => format!("signal={sig} {}", o.unwrap_or_default()),
            (None, Some(o)) => o,
            (None, None) => {
                let mut err = String::new();
                let _ =
                    std::io::Read::read_to_string(&mut self.child.stderr.take().unwrap(), &mut err);
                format!(
                    "no outcome (exit {:?}, report {:?}, stderr {err})",
                    status.code(),
                    self.report
                )
            }
        }
    }
}

/// The same connect(2) as the plain service user, without any sandbox or namespace (the
/// control): a forked child drops to the user and connects, with only raw syscalls; its exit
/// code is 0 or the errno.
fn control(_attempt: &str, target: &str) -> String {
    let (uid, gid) = ids();
    let groups = aziot_policy::resolve_credentials(&aziot_policy::builtin("certd").unwrap())
        .unwrap()
        .groups;
    // SAFETY: a zeroed sockaddr_un is valid; the path is copied in below (bounded).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = target.as_bytes();
    assert!(
        bytes.len() < addr.sun_path.len(),
        "{target}: too long for sockaddr_un"
    );
    for (d, b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *b as libc::c_char;
    }
    // SAFETY: the child makes only async-signal-safe raw calls on values built before the fork
    // (setgroups, setresgid, setresuid, socket, connect) and leaves with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: as above (the child).
        unsafe {
            let errno = || *libc::__errno_location();
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setresgid(gid, gid, gid) != 0
                || libc::setresuid(uid, uid, uid) != 0
            {
                libc::_exit(100);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                libc::_exit(101);
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            let rc = libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len);
            libc::_exit(if rc == 0 { 0 } else { errno() });
        }
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    match libc::WEXITSTATUS(status) {
        0 => "ok".to_owned(),
        100 | 101 => format!("setup-failed ({})", libc::WEXITSTATUS(status)),
        n => format!("errno={n} ({})", nix::errno::Errno::from_raw(n).desc()),
    }
}

fn errno(outcome: &str) -> Option<i32> {
    outcome
        .strip_prefix("errno=")?
        .split(' ')
        .next()?
        .parse()
        .ok()
}

/// connect(2) from the locked-in certd worker: the granted sockets (beneath /run and in a test
/// prefix under /tmp) connect; world-writable sockets planted in /run and /tmp, and the same
/// through /var/run, do not exist for it (ENOENT); the host's /tmp reached through
/// /proc/<pid>/root of a same-user process outside the namespace is refused by Landlock
/// (EACCES: no ptrace-read access outside its domain). Controls: the plain user connects to every
/// one of them, and so does the locked-in worker WITHOUT the namespace (Landlock ABI 7 does not
/// restrict unix connects) — the namespace is what stops it.
#[test]
fn certd_worker_reaches_only_the_granted_sockets() {
    require!(Dep::Root, Dep::ServiceUser(USER));
    let f = Fixture::new("connect");
    let var_run_is_run = std::fs::read_link("/var/run")
        .is_ok_and(|t| t == Path::new("/run") || t == Path::new("../run"));
    let var_run_public = Path::new("/var/run").join(f.run_public.strip_prefix("/run").unwrap());
    let mut rows: Vec<(String, Option<i32>, bool)> = vec![
        // (target, expected errno in the namespace (None: connects), also connects without it)
        (f.keyd_sock.display().to_string(), None, true),
        (f.tmp_granted.display().to_string(), None, true),
        (f.run_public.display().to_string(), Some(libc::ENOENT), true),
        (f.tmp_public.display().to_string(), Some(libc::ENOENT), true),
        // Landlock's ptrace restriction, with or without the namespace.
        (f.sibling_root(&f.tmp_public), Some(libc::EACCES), false),
    ];
    if var_run_is_run {
        rows.push((
            var_run_public.display().to_string(),
            Some(libc::ENOENT),
            true,
        ));
    } else {
        println!("note: /var/run is not a link to /run here; its row is skipped");
    }
    let mut table = String::from("\n== certd worker: connect(2) to pathname unix sockets\n");
    let mut failures = Vec::new();
    for (target, expect, without_ns_connects) in &rows {
        let inside = Worker::start(&f, true, "connect-unix", Some(target)).finish();
        let without = Worker::start(&f, false, "connect-unix", Some(target)).finish();
        let plain = control("connect-unix", target);
        table.push_str(&format!("  {target:<72} namespace: {inside:<40} no namespace: {without:<30} plain user: {plain}\n"));
        let inside_ok = match expect {
            None => inside == "ok",
            Some(e) => errno(&inside) == Some(*e),
        };
        if !inside_ok {
            failures.push(format!(
                "{target}: in the namespace expected {expect:?} (None: ok), got {inside}"
            ));
        }
        if plain != "ok" {
            failures.push(format!(
                "{target}: the control (plain {USER}) should connect, got {plain}"
            ));
        }
        if *without_ns_connects && without != "ok" {
            failures.push(format!("{target}: the locked-in worker without the namespace should connect, got {without}"));
        }
    }
    println!("{table}");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The live worker, seen from outside: its /run, /tmp, /var/tmp and /dev/shm (read through
/// /proc/<pid>/root) hold only the granted sockets and their directories; its mount namespace is
/// not ours; the audit's check (`aziotctl policy audit`: /proc/<pid>/ns/mnt and
/// /proc/<pid>/mountinfo against the status file's record) passes for it and fails for a worker
/// started without the namespace.
#[test]
fn the_live_workers_view_holds_only_the_granted_sockets_and_the_audit_checks_it() {
    require!(Dep::Root, Dep::ServiceUser(USER));
    let f = Fixture::new("view");
    let policy = f.policy();
    let record = aziot_policy::mountns::prepare(&policy.mount_plan().unwrap())
        .unwrap()
        .record()
        .clone();
    // The worker, locked in, stays alive for up to 30 s (killed when done).
    let w = Worker::start(&f, true, "linger", Some("30000"));
    let root = PathBuf::from(format!("/proc/{}/root", w.pid()));
    let run_name = f
        .run_dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let tmp_name = f
        .tmp_dir
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    // The host's /run has far more (and the test's public socket).
    assert!(names(Path::new("/run")).len() > 1 && f.run_public.exists());
    assert_eq!(
        names(&root.join("run")),
        vec![run_name.clone()],
        "the worker's /run"
    );
    assert_eq!(
        names(&root.join("run").join(&run_name)),
        vec!["keyd.sock".to_owned()]
    );
    assert_eq!(
        names(&root.join("tmp")),
        vec![tmp_name.clone()],
        "the worker's /tmp"
    );
    assert_eq!(
        names(&root.join("tmp").join(&tmp_name)),
        vec!["granted".to_owned()]
    );
    assert_eq!(
        names(&root.join("tmp").join(&tmp_name).join("granted")),
        vec!["keyd.sock".to_owned()]
    );
    for empty in ["var/tmp", "dev/shm"] {
        if Path::new("/").join(empty).is_dir() {
            assert!(names(&root.join(empty)).is_empty(), "the worker's /{empty}");
        }
    }
    let ns = |pid: String| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    assert_ne!(
        ns(w.pid().to_string()),
        ns("self".into()),
        "the worker shares our mount namespace"
    );

    // The audit, with a status file as the broker writes it (this test plays the broker).
    let audit = |worker_pid: i32, rec: Option<aziot_policy::mountns::MountNsRecord>| {
        let status = aziot_policy::Status {
            service: "certd".into(),
            broker_pid: std::process::id() as i32,
            worker_pid,
            policy_digest: policy.digest(),
            seccomp_digest: String::new(),
            seccomp_program: "certd".into(),
            landlock: Default::default(),
            seccomp_mode: "kill".into(),
            degraded: false,
            warnings: vec![],
            restarts: 0,
            handed_dirs: vec![f.state.clone()],
            handed_inodes: vec![],
            mount_namespace: rec,
        };
        let path = f.tmp_dir.join(format!("certd-{worker_pid}.status"));
        status.write(&path).unwrap();
        let report = aziot_policy::audit_service_with("certd", &path, &[f.state.clone()]);
        report
            .findings
            .into_iter()
            .filter(|x| {
                matches!(
                    x.check.as_str(),
                    "mount namespace" | "mounts" | "masked directories"
                )
            })
            .collect::<Vec<_>>()
    };
    let findings = audit(w.pid(), Some(record.clone()));
    println!("{findings:#?}");
    assert_eq!(findings.len(), 3, "{findings:?}");
    assert!(findings.iter().all(|x| x.ok), "{findings:#?}");
    let mounts = findings.iter().find(|x| x.check == "mounts").unwrap();
    assert!(
        mounts.actual.contains(&f.keyd_sock.display().to_string()),
        "{mounts:?}"
    );
    // A recorded socket that is not bound there is a deviation.
    let mut extra = record.clone();
    extra.binds.push(f.run_public.clone());
    let findings = audit(w.pid(), Some(extra));
    assert!(
        findings
            .iter()
            .any(|x| x.check == "mounts" && !x.ok && x.actual.contains("public.sock is not bound")),
        "{findings:#?}"
    );
    w.stop();

    // The control: a worker without the namespace fails the audit.
    let plain = Worker::start(&f, false, "linger", Some("30000"));
    let findings = audit(plain.pid(), Some(record.clone()));
    println!("{findings:#?}");
    assert!(
        findings
            .iter()
            .any(|x| x.check == "mount namespace" && !x.ok),
        "{findings:#?}"
    );
    assert!(
        findings.iter().any(|x| x.check == "mounts" && !x.ok),
        "{findings:#?}"
    );
    // No record at all, while the policy asks for a namespace: a deviation too.
    let findings = audit(plain.pid(), None);
    assert!(
        findings
            .iter()
            .any(|x| x.check == "mount namespace" && !x.ok && x.actual.contains("none recorded")),
        "{findings:#?}"
    );
    plain.stop();
}
