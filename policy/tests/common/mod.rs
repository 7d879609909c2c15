//! Setup of the audit tests (audit.rs): the real service users (systemd-sysusers), a temporary
//! prefix with a state directory per service, and the probe in serve mode (a sandboxed stand-in
//! worker with a status file). Needs root. (The escape suite, with its own setup, is
//! tests/tests/escape.rs in aziot-tests: it runs the real worker.)

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::fs::{chown, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

pub const SERVICES: &[&str] = &["keyd", "certd", "identityd", "tpmd"];

pub struct Env {
    pub prefix: PathBuf,
    /// TCP port no policy grants.
    pub closed_port: u16,
    /// TCP port the probes are given with `--grant-port`.
    pub granted_port: u16,
    /// A pathname unix socket anyone may connect to (DAC-wise).
    pub public_sock: PathBuf,
    pub abstract_name: String,
    /// Per service: a `sleep` running as the service user.
    pub siblings: Vec<(String, i32)>,
}

impl Env {
    pub fn state_dir(&self, svc: &str) -> PathBuf {
        self.prefix.join("var/lib/aziot").join(svc)
    }

    pub fn sibling(&self, svc: &str) -> i32 {
        self.siblings.iter().find(|(s, _)| s == svc).map(|(_, p)| *p).expect("sibling")
    }
}

pub fn probe_bin() -> &'static str {
    env!("CARGO_BIN_EXE_aziot-sandbox-probe")
}

pub fn user_of(svc: &str) -> &'static str {
    match svc {
        "keyd" => "aziotks",
        "certd" => "aziotcs",
        "identityd" => "aziotid",
        "tpmd" => "aziottpm",
        other => panic!("unknown service {other}"),
    }
}

fn ids(user: &str) -> (u32, u32) {
    let u = nix::unistd::User::from_name(user).expect("getpwnam").unwrap_or_else(|| panic!("user {user} missing"));
    (u.uid.as_raw(), u.gid.as_raw())
}

/// Creates the service users (idempotent).
pub fn sysusers() {
    let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/sysusers.d/aziot.conf");
    let out = Command::new("systemd-sysusers").arg(&conf).output().expect("run systemd-sysusers (apt-get install systemd)");
    assert!(out.status.success(), "systemd-sysusers {}: {}", conf.display(), String::from_utf8_lossy(&out.stderr));
}

fn accept_forever<T: Send + 'static>(listener: T, accept: fn(&T) -> bool) {
    std::thread::spawn(move || while accept(&listener) {});
}

static ENV: OnceLock<Env> = OnceLock::new();

/// Removes the temporary prefix when the test binary exits.
extern "C" fn remove_prefix() {
    if let Some(e) = ENV.get() {
        let _ = std::fs::remove_dir_all(&e.prefix);
    }
}

pub fn env() -> &'static Env {
    ENV.get_or_init(|| {
        assert!(nix::unistd::geteuid().is_root(), "the sandbox tests must run as root (they create users and drop to them)");
        sysusers();
        let prefix = PathBuf::from(format!("/tmp/aziot-sandbox-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&prefix);
        // SAFETY: registers a plain extern "C" function to run at exit.
        unsafe { libc::atexit(remove_prefix) };
        let mode = |p: &Path, m: u32| std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        std::fs::create_dir_all(prefix.join("var/lib/aziot")).unwrap();
        mode(&prefix, 0o755);
        mode(&prefix.join("var"), 0o755);
        mode(&prefix.join("var/lib"), 0o755);
        // World-writable here, so that only Landlock stops a worker creating files beside its state.
        mode(&prefix.join("var/lib/aziot"), 0o777);
        let outside = prefix.join("outside");
        std::fs::create_dir(&outside).unwrap();
        mode(&outside, 0o777);
        for svc in SERVICES {
            let (uid, gid) = ids(user_of(svc));
            // Each state dir and its "secret" are readable by all (DAC) so that reading another
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
            let owned = outside.join(format!("owned-{svc}"));
            std::fs::write(&owned, b"x").unwrap();
            chown(&owned, Some(uid), Some(gid)).unwrap();
        }
        // A /dev/mem look-alike (c 1:1, root 0600).
        std::fs::create_dir(prefix.join("dev")).unwrap();
        mode(&prefix.join("dev"), 0o755);
        let mem = std::ffi::CString::new(prefix.join("dev/mem").to_str().unwrap()).unwrap();
        // SAFETY: a valid path; creates a device node in our own temporary prefix.
        let rc = unsafe { libc::mknod(mem.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 1)) };
        assert_eq!(rc, 0, "mknod: {}", std::io::Error::last_os_error());
        for d in ["etc", "etc/aziot"] {
            mode(&prefix.join(d), 0o755);
        }
        for svc in SERVICES {
            mode(&prefix.join("etc/aziot").join(svc), 0o755);
        }

        let public_sock = prefix.join("public.sock");
        let unix = UnixListener::bind(&public_sock).unwrap();
        mode(&public_sock, 0o777);
        accept_forever(unix, |l| l.accept().is_ok());
        let abstract_name = format!("aziot-sandbox-test-{}", std::process::id());
        {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(abstract_name.as_bytes()).unwrap();
            accept_forever(UnixListener::bind_addr(&addr).unwrap(), |l| l.accept().is_ok());
        }
        let closed = TcpListener::bind("127.0.0.1:0").unwrap();
        let granted = TcpListener::bind("127.0.0.1:0").unwrap();
        let (closed_port, granted_port) = (closed.local_addr().unwrap().port(), granted.local_addr().unwrap().port());
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
                cmd.arg("600").uid(uid).gid(gid).stdin(Stdio::null()).stdout(Stdio::null());
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
        Env { prefix, closed_port, granted_port, public_sock, abstract_name, siblings }
    })
}

pub fn probe_cmd(svc: &str, extra: &[&str]) -> Command {
    let e = env();
    let mut cmd = Command::new(probe_bin());
    cmd.args(["--service", svc, "--state-dir"]).arg(e.state_dir(svc));
    cmd.args(["--grant-port", &e.granted_port.to_string()]);
    cmd.args(extra);
    cmd
}

/// A probe in `--serve` mode: sandboxed worker + status file, until dropped.
pub struct Served {
    pub child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
    pub status_path: PathBuf,
    pub worker_pid: i32,
}

pub fn serve(svc: &str, tag: &str, extra: &[&str]) -> Served {
    let e = env();
    let status_path = e.prefix.join(format!("{svc}-{tag}.status"));
    let stderr_path = e.prefix.join(format!("{svc}-{tag}.stderr"));
    let listener = e.prefix.join(format!("{svc}-{tag}.sock"));
    let mut args = vec!["--serve", "--status", status_path.to_str().unwrap(), "--listener", listener.to_str().unwrap()];
    args.extend(extra);
    let mut child = probe_cmd(svc, &args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the probe");
    // Drain stderr into a file (a pipe, not a file, is what the worker's fd 2 must be).
    let mut err_pipe = child.stderr.take().unwrap();
    let err_file = stderr_path.clone();
    std::thread::spawn(move || {
        let mut f = std::fs::File::create(err_file).unwrap();
        let _ = std::io::copy(&mut err_pipe, &mut f);
    });
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let worker_pid = line
        .strip_prefix("ready ")
        .and_then(|r| r.split(' ').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| {
            let mut rest = String::new();
            let _ = std::io::Read::read_to_string(&mut out, &mut rest);
            let err = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            panic!("probe --serve for {svc} did not get ready: {line}{rest}{err}")
        });
    Served { child, out, status_path, worker_pid }
}

impl Served {
    /// Closes the worker's stdin (it exits) and returns the probe's final `result:`.
    pub fn finish(mut self) -> String {
        self.stop()
    }

    fn stop(&mut self) -> String {
        drop(self.child.stdin.take());
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut self.out, &mut rest);
        let _ = self.child.wait();
        rest.lines().find_map(|l| l.strip_prefix("result: ")).unwrap_or(&rest).to_owned()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.child.stdin.is_some() {
            self.stop();
        }
    }
}
