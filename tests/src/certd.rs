//! Process harness: the real `aziotd aziot-certd` (root broker + confined `aziotcs` worker) with
//! a live keyd beside it, in one private temporary prefix.
//!
//! keyd is the [`Keyd`] harness, started with `aziotcs` as a principal for every key and its
//! socket left to the socket unit's owner and group (`aziotks:aziotks` 0660: `aziotcs` is in the
//! group `aziotks`, as packaging/sysusers.d/aziot.conf makes it). certd's `[endpoints]
//! aziot_keyd` points at that socket; its own socket is `<prefix>/certd.sock`, group
//! [`TEST_GID`] (clients of other uids), its status file `<prefix>/certd.status` beside
//! keyd's, so that `aziotctl policy audit --run-dir <prefix>` covers both.

use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::api::Api;
use crate::keyd::{aziotd_bin, toml_str, Keyd, TEST_GID};

/// certd's only api-version.
pub const V: &str = "2020-09-01";
/// The worker's user.
pub const SERVICE_USER: &str = "aziotcs";
/// Appended to certd's config when set: e.g. `[sandbox]` `seccomp = "log"` `allow_degraded =
/// true` for measuring the worker's syscalls (policy/tools/measure-certd-syscalls.sh).
pub const EXTRA_CONFIG_ENV: &str = "AZIOT_TESTS_CERTD_CONFIG";

/// uid of `user` (a service user, or panics naming the fix).
pub fn uid_of(user: &str) -> u32 {
    nix::unistd::User::from_name(user)
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no user {user}: run `systemd-sysusers packaging/sysusers.d/aziot.conf` first"))
        .uid
        .as_raw()
}

/// What the certd harness needs.
pub fn harness_deps() -> Vec<crate::Dep> {
    let mut deps = crate::keyd::harness_deps();
    deps.push(crate::Dep::ServiceUser(SERVICE_USER));
    deps.push(crate::Dep::OpensslCli);
    deps
}

/// `require_certd!()`: root, both service users, the openssl CLI (issued certs are checked with
/// `openssl verify`).
#[macro_export]
macro_rules! require_certd {
    () => {
        if !$crate::require_deps(&$crate::certd::harness_deps()) {
            return;
        }
    };
}

/// A running keyd + certd.
pub struct Certd {
    child: Option<Child>,
    root: PathBuf,
    extra: String,
    log_level: String,
    /// Dropped last: its prefix holds certd's files too.
    keyd: Keyd,
}

impl Certd {
    /// keyd (with `aziotcs` a principal for all keys) and certd with `extra` after
    /// `homedir_path` (top-level keys first, then tables).
    pub fn start(extra: &str) -> Certd {
        Certd::start_with_log(extra, "debug")
    }

    /// [`Certd::start`] with `AZIOT_LOG=<log_level>` for certd (the bench: `info`, as
    /// production; per-request lines are DEBUG).
    pub fn start_with_log(extra: &str, log_level: &str) -> Certd {
        let keyd = Keyd::builder()
            .keep_socket_owner()
            .extra(&format!("[[principal]]\nuid = {}\nkeys = [\"*\"]\n", uid_of(SERVICE_USER)))
            .start();
        let root = keyd.dir().join("certd");
        fs::create_dir_all(root.join("config.d")).expect("mkdir certd/config.d");
        let mut certd = Certd { child: None, root, extra: extra.to_owned(), log_level: log_level.into(), keyd };
        certd.write_config();
        certd.spawn_and_wait();
        certd
    }

    fn write_config(&self) {
        let measuring = std::env::var(EXTRA_CONFIG_ENV).unwrap_or_default();
        let config = format!(
            "homedir_path = {}\n{}\n{measuring}\n[endpoints]\naziot_certd = {}\naziot_keyd = {}\n",
            toml_str(self.home().to_str().expect("utf-8")),
            self.extra,
            toml_str(&format!("unix://{}", self.socket().display())),
            toml_str(&format!("unix://{}", self.keyd.socket().display())),
        );
        fs::write(self.config_path(), config).expect("write certd config");
    }

    /// Replaces the `extra` part of the config (the broker picks it up on SIGHUP: [`Certd::reload`]).
    pub fn set_extra(&mut self, extra: &str) {
        extra.clone_into(&mut self.extra);
        self.write_config();
    }

    /// SIGHUP to the broker (re-read the config and send it to the worker).
    pub fn reload(&self) {
        let pid = self.child.as_ref().expect("certd running").id();
        // SAFETY: plain syscall on our own child.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) }, 0);
    }

    fn spawn_and_wait(&mut self) {
        let _ = fs::remove_file(self.status_path());
        let log = fs::OpenOptions::new().create(true).append(true).open(self.log_path()).expect("open certd log");
        let mut cmd = Command::new(aziotd_bin());
        cmd.arg("aziot-certd")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()))
            .env("AZIOT_CERTD_CONFIG", self.config_path())
            .env("AZIOT_CERTD_CONFIG_DIR", self.root.join("config.d"))
            .env("AZIOT_LOG", &self.log_level)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("dup log")))
            .stderr(Stdio::from(log))
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGKILL the child when
        // the spawning thread dies (no service outlives a killed test).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn aziotd aziot-certd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                panic!("certd exited during startup with {status}\n--- log ---\n{}", self.log());
            }
            // the status file of this start (the last one's was removed above; with AZIOTD_BIN
            // a wrapper, e.g. strace, the broker is not our child itself)
            let recorded = self.status().is_some_and(|s| s["worker_pid"].as_i64().is_some());
            if recorded && std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "certd was not ready within 20 s\n--- log ---\n{}", self.log());
            std::thread::sleep(Duration::from_millis(5));
        }
        nix::unistd::chown(&self.socket(), None, Some(nix::unistd::Gid::from_raw(TEST_GID))).expect("chgrp certd.sock");
    }

    /// Start certd again (same prefix, config, store) after [`Certd::stop`].
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "certd still running");
        self.spawn_and_wait();
    }

    /// SIGTERM the broker (it stops its worker) and reap it; SIGKILL the group after 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let pgid = child.id() as libc::pid_t;
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(pgid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                // SAFETY: our own process group.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // the worker follows its broker (PDEATHSIG): wait until the group is empty
        let deadline = Instant::now() + Duration::from_secs(5);
        // SAFETY: signal 0 only checks existence.
        while unsafe { libc::kill(-pgid, 0) } == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The keyd beside it.
    pub fn keyd(&self) -> &Keyd {
        &self.keyd
    }
    /// The keyd beside it, to stop and start it (tests/tests/fault_process.rs: keyd down).
    pub fn keyd_mut(&mut self) -> &mut Keyd {
        &mut self.keyd
    }
    /// The prefix (`<keyd prefix>/certd`) holding certd's config, home and log.
    pub fn dir(&self) -> &Path {
        &self.root
    }
    /// Status files, sockets: the keyd prefix (`aziotctl policy audit --run-dir` it).
    pub fn run_dir(&self) -> &Path {
        self.keyd.dir()
    }
    pub fn socket(&self) -> PathBuf {
        self.keyd.dir().join("certd.sock")
    }
    pub fn status_path(&self) -> PathBuf {
        self.keyd.dir().join("certd.status")
    }
    pub fn home(&self) -> PathBuf {
        self.root.join("home")
    }
    pub fn certs_dir(&self) -> PathBuf {
        self.home().join("certs")
    }
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    pub fn log_path(&self) -> PathBuf {
        self.root.join("certd.log")
    }
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.log_path()).unwrap_or_default()).into_owned()
    }
    /// Poll the log until it contains `needle` (max `timeout`).
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
    pub fn status(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&fs::read(self.status_path()).ok()?).ok()
    }
    pub fn worker_pid(&self) -> i32 {
        let s = self.status().unwrap_or_else(|| panic!("no certd status file\n{}", self.log()));
        i32::try_from(s["worker_pid"].as_i64().expect("worker_pid")).expect("pid")
    }
    /// Waits until the status file names a worker other than `old`.
    pub fn wait_new_worker(&self, old: i32, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = self.status().and_then(|s| s["worker_pid"].as_i64()) {
                if p != i64::from(old) {
                    return p as i32;
                }
            }
            assert!(Instant::now() < deadline, "no new certd worker within {timeout:?}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    /// The store file of a (non-preloaded) cert ID: `<home>/certs/<S>-<H>.cer` (spec §2).
    pub fn cert_path(&self, id: &str) -> PathBuf {
        let s: String = id.chars().filter(char::is_ascii_alphanumeric).collect();
        self.certs_dir().join(format!("{s}-{}.cer", crate::crypto::hex(&crate::crypto::sha256(id.as_bytes()))))
    }
    /// The names in `<home>/certs` (empty when it does not exist).
    pub fn stored(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.certs_dir())
            .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }
    /// Client as root.
    pub fn api(&self) -> Api {
        Api::new(self.socket(), V)
    }
    /// keyd client as root (2021-05-01).
    pub fn keyd_api(&self) -> Api {
        self.keyd.api(crate::api::V2021)
    }
}

impl Drop for Certd {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_ref() {
            // SAFETY: our own process group.
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let start = lines.len().saturating_sub(80);
            eprintln!(
                "--- certd log ({}), last lines ---\n{}\n--- end ---",
                self.log_path().display(),
                lines[start..].join("\n")
            );
        }
    }
}

/// CSRs, certificates and keys for the suites (local OpenSSL; a key in keyd through the
/// engine's in-process twin).
pub mod pki {
    use std::sync::Arc;

    use openssl::ec::{EcGroup, EcKey};
    use openssl::hash::MessageDigest;
    use openssl::nid::Nid;
    use openssl::pkey::{PKey, PKeyRef, Private};
    use openssl::stack::Stack;
    use openssl::x509::extension::{BasicConstraints, ExtendedKeyUsage, KeyUsage};
    use openssl::x509::{X509NameBuilder, X509Req, X509ReqBuilder, X509};

    /// A fresh P-256 key.
    pub fn ec_key() -> PKey<Private> {
        PKey::from_ec_key(EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap()).unwrap()
    }

    /// The private key of keyd key pair `handle` (operations done by keyd).
    pub fn keyd_key(keyd_socket: &std::path::Path, handle: &str) -> PKey<Private> {
        let client = Arc::new(aziot_key_openssl_engine::KeydClient::new(keyd_socket));
        aziot_key_openssl_engine::load_private_key(&client, handle).expect("load the keyd key through the engine twin")
    }

    /// A CSR for `cn` with public key `public`, signed by `signer` (the same key for a valid
    /// CSR); `ca` requests basicConstraints CA:TRUE + keyCertSign; always EKU clientAuth.
    pub fn csr_with(public: &PKeyRef<Private>, signer: &PKeyRef<Private>, cn: &str, ca: bool) -> X509Req {
        let mut b = X509ReqBuilder::new().unwrap();
        let mut n = X509NameBuilder::new().unwrap();
        n.append_entry_by_text("CN", cn).unwrap();
        b.set_subject_name(&n.build()).unwrap();
        b.set_pubkey(public).unwrap();
        let mut exts = Stack::new().unwrap();
        if ca {
            exts.push(BasicConstraints::new().critical().ca().build().unwrap()).unwrap();
            exts.push(KeyUsage::new().critical().key_cert_sign().digital_signature().build().unwrap()).unwrap();
        } else {
            exts.push(ExtendedKeyUsage::new().client_auth().build().unwrap()).unwrap();
        }
        b.add_extensions(&exts).unwrap();
        b.sign(signer, MessageDigest::sha256()).unwrap();
        b.build()
    }

    pub fn csr(key: &PKeyRef<Private>, cn: &str, ca: bool) -> String {
        String::from_utf8(csr_with(key, key, cn, ca).to_pem().unwrap()).unwrap()
    }

    /// Every certificate in a PEM text.
    pub fn certs(pem: &str) -> Vec<X509> {
        X509::stack_from_pem(pem.as_bytes()).unwrap_or_else(|e| panic!("not PEM certificates ({e}):\n{pem}"))
    }

    /// `openssl verify -CAfile <ca> [-untrusted <chain>] <leaf>` in `dir`: (success, output).
    pub fn openssl_verify(dir: &std::path::Path, ca: &X509, leaf: &X509) -> (bool, String) {
        let ca_path = dir.join("verify-ca.pem");
        let leaf_path = dir.join("verify-leaf.pem");
        std::fs::write(&ca_path, ca.to_pem().unwrap()).unwrap();
        std::fs::write(&leaf_path, leaf.to_pem().unwrap()).unwrap();
        let out = std::process::Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(&ca_path)
            .arg(&leaf_path)
            .output()
            .expect("run openssl verify");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }
}
