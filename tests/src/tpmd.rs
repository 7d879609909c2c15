//! Harness for tpmd against a fresh swtpm: through the broker (tpmd_broker.rs, keyd-bench) and
//! in process (tpmd_core.rs, tpmd_http_api.rs, tpmd_fd_tcti.rs).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::keyd::{aziotd_bin, TempDir};

/// Two consecutive free loopback ports (swtpm's server and control ports); the first.
pub fn free_ports() -> u16 {
    for _ in 0..50 {
        let a = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = a.local_addr().expect("addr").port();
        if port < 65535 && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
    panic!("no two consecutive free ports");
}

/// A child process, SIGTERMed and reaped on drop.
pub struct Kill(pub Child);

impl Kill {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGTERM and reap (once: a reaped child is not signalled again, its pid may be reused).
    pub fn stop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: plain syscall on our own child, not yet reaped.
            unsafe {
                libc::kill(self.0.id() as i32, libc::SIGTERM);
            }
            let _ = self.0.wait();
        }
    }
}

impl Drop for Kill {
    fn drop(&mut self) {
        self.stop();
    }
}

/// swtpm (TPM 2.0, startup-clear) on fresh state in `<root>/state`, 127.0.0.1:port (control
/// port + 1). Serves one client at a time.
pub struct Swtpm {
    child: Kill,
    pub port: u16,
    root: PathBuf,
    /// Removed after `child` is stopped (fields drop in order).
    _temp: Option<TempDir>,
}

impl Swtpm {
    pub fn start(root: &Path) -> Swtpm {
        std::fs::create_dir_all(root.join("state")).expect("mkdir state");
        let (child, port) = spawn_swtpm(&root.join("state"));
        Swtpm { child, port, root: root.to_path_buf(), _temp: None }
    }

    /// On a temporary directory of its own (in-process tests).
    pub fn start_temp() -> Swtpm {
        let temp = TempDir::new("swtpm");
        let mut swtpm = Swtpm::start(temp.path());
        swtpm._temp = Some(temp);
        swtpm
    }

    /// The directory swtpm's state lives in (under `state/`); scratch files may go here.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// Stops swtpm and starts a new process on the same state (new ports).
    pub fn restart(&mut self) {
        self.child.stop();
        let (child, port) = spawn_swtpm(&self.root.join("state"));
        self.child = child;
        self.port = port;
    }

    /// The TCTI string for tpmd's config and tpm2-tools.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Runs a tpm2-tools command (`TPM2TOOLS_TCTI` = this swtpm; only while no other client,
    /// e.g. tpmd, is connected); stdout. Panics with the output if it fails.
    pub fn tool(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new(args[0])
            .args(&args[1..])
            .env("TPM2TOOLS_TCTI", self.tcti())
            .output()
            .unwrap_or_else(|e| panic!("{} (apt-get install tpm2-tools): {e}", args[0]));
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

/// Starts swtpm on `state`; retries on other ports when it loses a race for its ports.
fn spawn_swtpm(state: &Path) -> (Kill, u16) {
    for _ in 0..20 {
        let port = free_ports();
        let mut child = Kill(
            Command::new("swtpm")
                .args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear"])
                .arg("--tpmstate")
                .arg(format!("dir={}", state.display()))
                .args(["--server", &format!("type=tcp,port={port},bindaddr=127.0.0.1")])
                .args(["--ctrl", &format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1)])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("swtpm (apt-get install swtpm)"),
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if child.0.try_wait().expect("wait for swtpm").is_some() {
                break; // lost the ports to another process: try others
            }
            // Both ports (the TCTI opens the server and the control port), and still our swtpm:
            // one that lost its control port to another process exits after binding the first.
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", port + 1)).is_ok()
                && child.0.try_wait().expect("wait for swtpm").is_none()
            {
                return (child, port);
            }
            assert!(Instant::now() < deadline, "swtpm did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("could not start swtpm");
}

/// A tpmd config on this swtpm, with `extra` TOML after the `tcti` line (in-process tests).
pub fn config(swtpm: &Swtpm, extra: &str) -> aziot_tpmd::Config {
    toml::from_str(&format!("tcti = {:?}\n{extra}", swtpm.tcti())).expect("valid tpmd config")
}

/// `aziotd aziot-tpmd` (root broker + confined aziottpm worker) in `root` on `tcti`: socket
/// `<root>/tpmd.sock`, log `<root>/tpmd.log`, status `<root>/tpmd.status`.
pub struct Tpmd {
    broker: Option<Kill>,
    root: PathBuf,
}

impl Tpmd {
    /// Starts and waits (20 s) for the broker's status file (a worker reported ready).
    pub fn start(root: &Path, tcti: &str, log_level: &str) -> Tpmd {
        Tpmd::start_with(root, tcti, log_level, "")
    }

    /// Like [`Tpmd::start`], with `extra` placed at the top level of the config (before the
    /// `[endpoints]` table, so bare keys such as `auth_key_index = ...` stay top-level; tables
    /// may follow them). The log is appended to, so that it spans restarts in one `root`.
    pub fn start_with(root: &Path, tcti: &str, log_level: &str, extra: &str) -> Tpmd {
        let mut broker = Tpmd::spawn(root, tcti, log_level, extra);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !root.join("tpmd.status").exists() {
            if let Ok(Some(status)) = broker.0.try_wait() {
                panic!("tpmd exited ({status}) before it was ready:\n{}", read_log(root));
            }
            assert!(Instant::now() < deadline, "tpmd did not start:\n{}", read_log(root));
            std::thread::sleep(Duration::from_millis(20));
        }
        Tpmd { broker: Some(broker), root: root.to_path_buf() }
    }

    /// Writes the config and spawns `aziotd aziot-tpmd` without waiting for it (stderr appended
    /// to `<root>/tpmd.log`). A status file left by an earlier run in `root` is removed first.
    ///
    /// `AZIOT_TESTS_TPMD_CONFIG`, when set, is appended after `extra`: for measuring the
    /// worker's syscalls, e.g. `[sandbox]` `seccomp = "log"` `allow_degraded = true`
    /// (policy/tools/measure-tpmd-syscalls.sh).
    pub fn spawn(root: &Path, tcti: &str, log_level: &str, extra: &str) -> Kill {
        let sock = root.join("tpmd.sock");
        let _ = std::fs::remove_file(root.join("tpmd.status"));
        let measuring = std::env::var("AZIOT_TESTS_TPMD_CONFIG").unwrap_or_default();
        std::fs::write(
            root.join("config.toml"),
            format!(
                "tcti = \"{tcti}\"\n{extra}\n{measuring}\n[endpoints]\naziot_tpmd = \"unix://{}\"\n",
                sock.display()
            ),
        )
        .expect("write config");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(root.join("tpmd.log")).expect("log");
        Kill(
            Command::new(aziotd_bin())
                .arg("aziot-tpmd")
                .env_clear()
                .env("AZIOT_TPMD_CONFIG", root.join("config.toml"))
                .env("AZIOT_TPMD_CONFIG_DIR", root.join("config.d"))
                .env("AZIOT_LOG", log_level)
                .stdin(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn aziotd aziot-tpmd"),
        )
    }

    pub fn socket(&self) -> PathBuf {
        self.root.join("tpmd.sock")
    }

    pub fn log(&self) -> String {
        read_log(&self.root)
    }

    pub fn worker_pid(&self) -> i32 {
        let status: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.root.join("tpmd.status")).expect("status")).expect("json");
        i32::try_from(status["worker_pid"].as_i64().expect("worker_pid")).expect("pid")
    }

    /// SIGTERM the broker, reap it, and wait (10 s) until its worker is gone too, so that the
    /// TPM connection is closed.
    pub fn stop(&mut self) {
        let worker = self.worker_pid();
        drop(self.broker.take());
        let deadline = Instant::now() + Duration::from_secs(10);
        // SAFETY: signal 0 only checks existence.
        while unsafe { libc::kill(worker, 0) } == 0
            && !std::fs::read_to_string(format!("/proc/{worker}/stat")).is_ok_and(|s| s.contains(") Z"))
        {
            assert!(Instant::now() < deadline, "the tpmd worker {worker} outlived its broker");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn read_log(root: &Path) -> String {
    std::fs::read_to_string(root.join("tpmd.log")).unwrap_or_default()
}
