//! Process harness: the real `aziotd aziot-identityd` (root broker + confined `aziotid` worker)
//! with a live keyd and certd beside it, in one private temporary prefix.
//!
//! keyd has `aziotcs` and `aziotid` as principals for every key, and holds the device key
//! `device-id` ([`DEVICE_KEY`]) and identityd's master key ([`MASTER_KEY`]) imported by root
//! before identityd starts, so a suite can recompute every signature independently. Its socket
//! keeps the socket unit's owner (`aziotks`, 0660: `aziotid` and `aziotcs` are in that group).
//! certd (also spawned here, socket group `aziotcs` as its unit makes it, since `aziotid` must
//! reach it) has a self-signed `device-ca` as its local CA and issues the local identities
//! named in [`LOCAL_IDS`]. identityd's socket is chgrp'd to [`TEST_GID`] (callers of other uids).
//!
//! The hub is `127.0.0.1:9` ([`HUB`]): nothing listens there, so whether this build has an IoT
//! Hub client or not, hub calls fail ([`expect_hub_unreachable`]) and module identities come
//! from the module cache the harness seeds ([`Identityd::seed_module`]).

use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::api::{handle_of, Api};
use crate::certd::uid_of;
use crate::http::{build_request, Response};
use crate::keyd::{aziotd_bin, toml_str, Keyd, TEST_GID};

pub const SERVICE_USER: &str = "aziotid";
pub const V2020: &str = "2020-09-01";
pub const V2021: &str = "2021-12-01";
pub const V2022: &str = "2022-08-01";
pub const VERSIONS: [&str; 3] = [V2020, V2021, V2022];
/// The hub (nothing listens on the discard port).
pub const HUB: &str = "127.0.0.1:9";
pub const DEVICE_ID: &str = "dev1";
pub const HOSTNAME: &str = "testhost";
pub const DOMAIN: &str = "example.com";
/// The device's SAS key (`device-id` in keyd).
pub const DEVICE_KEY: [u8; 32] = [7; 32];
/// `aziot_identityd_master_id` in keyd.
pub const MASTER_KEY: [u8; 32] = [0x11; 32];
/// Caller uids (they need not exist).
pub const MODULE_UID: u32 = 5101;
pub const LOCAL_UID: u32 = 5102;
pub const DEVICE_UID: u32 = 5103;
pub const BOTH_UID: u32 = 5104;
pub const UNKNOWN_UID: u32 = 5199;
/// Local identity IDs certd issues (the principals' and one ad-hoc one).
pub const LOCAL_IDS: [&str; 3] = ["loc-a", "mod-b", "adhoc"];

/// The principals of the default config.
pub const PRINCIPALS: &str = r#"
[[principal]]
uid = 5101
name = "mod-a"
idtype = ["module"]

[[principal]]
uid = 5102
name = "loc-a"
idtype = ["local"]

[[principal]]
uid = 5103
name = "dev-p"
idtype = ["device"]

[[principal]]
uid = 5104
name = "mod-b"
idtype = ["module", "local"]
localid = { type = "x509", attributes = "server" }
"#;

/// What the harness needs.
pub fn harness_deps() -> Vec<crate::Dep> {
    let mut deps = crate::certd::harness_deps();
    deps.push(crate::Dep::ServiceUser(SERVICE_USER));
    deps
}

#[macro_export]
macro_rules! require_identityd {
    () => {
        if !$crate::require_deps(&$crate::identityd::harness_deps()) {
            return;
        }
    };
}

/// A broker process of ours.
struct Broker {
    child: Child,
}

impl Broker {
    fn stop(mut self) {
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(pgid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                // SAFETY: our own process group.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        // SAFETY: signal 0 only checks existence.
        while unsafe { libc::kill(-pgid, 0) } == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: our own process group.
            unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// Spawns `aziotd <program>` with `env` and `extra` (e.g. `HTTPS_PROXY`), logging to `log`.
fn spawn(program: &str, env: &[(&str, &Path)], extra: &[(String, String)], log: &Path, cwd: &Path) -> Child {
    let log = fs::OpenOptions::new().create(true).append(true).open(log).expect("open log");
    let mut cmd = Command::new(aziotd_bin());
    cmd.arg(program)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()))
        .env("AZIOT_LOG", "debug")
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().expect("dup log")))
        .stderr(Stdio::from(log))
        .process_group(0);
    for (k, v) in env {
        cmd.env(k, v);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    // The mock IoT Hub's CA (tests/tests/identityd_hub.rs exports it; cloud-protocols.md §1.1).
    if let Some(ca) = std::env::var_os("SSL_CERT_FILE") {
        cmd.env("SSL_CERT_FILE", ca);
    }
    // SAFETY: prctl is async-signal-safe; the child dies with the spawning thread.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap_or_else(|e| panic!("spawn aziotd {program}: {e}"))
}

/// Waits until `status` names a worker and `socket` accepts; panics (with `log`) on exit or
/// after 20 s.
fn wait_ready(child: &mut Child, status: &Path, socket: &Path, log: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = child.try_wait().ok().flatten() {
            return Err(format!("exited during startup with {s}\n--- log ---\n{}", read_log(log)));
        }
        let recorded = fs::read(status)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|s| s["worker_pid"].as_i64().is_some());
        if recorded && std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("not ready within 20 s\n--- log ---\n{}", read_log(log)));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn read_log(path: &Path) -> String {
    String::from_utf8_lossy(&fs::read(path).unwrap_or_default()).into_owned()
}

/// keyd + certd + identityd.
pub struct Identityd {
    identityd: Option<Broker>,
    certd: Option<Broker>,
    root: PathBuf,
    config: String,
    /// Extra environment of identityd's broker (the unit's `Environment=`, e.g. `HTTPS_PROXY`).
    broker_env: Vec<(String, String)>,
    /// Dropped last: its prefix holds everything.
    keyd: Keyd,
}

impl Identityd {
    /// The default stack: manual SAS provisioning, [`PRINCIPALS`], `[localid]`, `extra` at the
    /// top of identityd's config (top-level keys).
    pub fn start(extra: &str) -> Identityd {
        let mut stack = Identityd::prepare(&default_config(extra));
        stack.start_identityd().unwrap_or_else(|e| panic!("identityd: {e}"));
        stack
    }

    /// keyd and certd running, identityd's config written (`config` is the whole of it but
    /// `homedir` and `[endpoints]`), identityd not started.
    pub fn prepare(config: &str) -> Identityd {
        Identityd::prepare_with(config, "", None)
    }

    /// [`Identityd::prepare`] with `certd_extra` appended to certd's config (e.g. EST's
    /// `[cert_issuance.est]` and a `method = "est"` identity cert) and keyd's key `backend`
    /// forced (else `AZIOT_TEST_BACKEND` decides).
    pub fn prepare_with(config: &str, certd_extra: &str, backend: Option<crate::keyd::Backend>) -> Identityd {
        let builder = match backend {
            Some(b) => Keyd::builder().backend(b),
            None => Keyd::builder(),
        };
        let keyd = builder
            .keep_socket_owner()
            .extra(&format!(
                "[[principal]]\nuid = {}\nkeys = [\"*\"]\n[[principal]]\nuid = {}\nkeys = [\"*\"]\n",
                uid_of("aziotcs"),
                uid_of(SERVICE_USER)
            ))
            .start();
        let kapi = keyd.api(crate::api::V2021);
        kapi.import_key("device-id", &DEVICE_KEY);
        let r = kapi.post(
            "/key",
            &json!({"keyId": "aziot_identityd_master_id", "keyBytes": crate::crypto::b64(&MASTER_KEY), "usage": "derive,sign"}),
        );
        handle_of(&r, "import the master key");
        let root = keyd.dir().join("identityd");
        fs::create_dir_all(root.join("config.d")).expect("mkdir identityd/config.d");
        let mut stack = Identityd { identityd: None, certd: None, root, config: config.to_owned(), broker_env: Vec::new(), keyd };
        stack.start_certd(certd_extra);
        stack.write_config();
        stack
    }

    /// keyd, certd and identityd with the bodies `aziotctl config apply` generated, relocated
    /// into the harness's prefix only: `keyd_extra` is keyd's config without `[aziot_keys]`
    /// (the harness writes its `homedir_path`; `keyd` is the builder, whose [`Builder::dir`]
    /// may hold the preloaded files), `certd_body` certd's without `homedir_path`, `config`
    /// identityd's without `homedir`; each gets the harness's `[endpoints]`. Nothing else: no
    /// key imported, no local CA, the principals are the generated ones. identityd not started.
    ///
    /// [`Builder::dir`]: crate::keyd::Builder::dir
    pub fn prepare_generated(keyd: crate::keyd::Builder, keyd_extra: &str, certd_body: &str, config: &str) -> Identityd {
        let keyd = keyd.keep_socket_owner().extra(keyd_extra).start();
        let root = keyd.dir().join("identityd");
        fs::create_dir_all(root.join("config.d")).expect("mkdir identityd/config.d");
        let mut stack = Identityd { identityd: None, certd: None, root, config: config.to_owned(), broker_env: Vec::new(), keyd };
        stack.spawn_certd(certd_body);
        stack.write_config();
        stack
    }

    fn start_certd(&mut self, extra: &str) {
        let mut config = format!(
            "[[principal]]\nuid = {}\ncerts = [\"*\"]\n[cert_issuance.device-ca]\nmethod = \"self_signed\"\nexpiry_days = 3650\n[cert_issuance.local_ca]\ncert = \"device-ca\"\npk = \"device-ca\"\n",
            uid_of(SERVICE_USER)
        );
        for id in LOCAL_IDS {
            config.push_str(&format!("[cert_issuance.{id}]\nmethod = \"local_ca\"\n"));
        }
        config.push_str(extra);
        self.spawn_certd(&config);
        // the local CA: a keyd key pair and its self-signed cert, made by root
        let kapi = self.keyd.api(crate::api::V2021);
        let handle = handle_of(
            &kapi.post("/keypair", &json!({"keyId": "device-ca", "preferredAlgorithms": "ec-p256"})),
            "create the CA key pair",
        );
        let key = crate::certd::pki::keyd_key(self.keyd.socket(), &handle);
        let csr = String::from_utf8(crate::certd::pki::csr_with(&key, &key, "Test Device CA", true).to_pem().unwrap())
            .unwrap();
        let r = Api::new(self.certd_socket(), "2020-09-01")
            .post("/certificates", &json!({"certId": "device-ca", "csr": csr}));
        assert_eq!(r.status, 201, "issue the CA\n{r}");
    }

    /// Writes certd's config (`homedir_path`, `body`, `[endpoints]`) and starts it.
    fn spawn_certd(&mut self, body: &str) {
        let dir = self.keyd.dir().join("certd");
        fs::create_dir_all(dir.join("config.d")).unwrap();
        let mut config = format!("homedir_path = {}\n", toml_str(dir.join("home").to_str().unwrap()));
        config.push_str(body);
        config.push_str(&format!(
            "\n[endpoints]\naziot_certd = {}\naziot_keyd = {}\n",
            toml_str(&format!("unix://{}", self.certd_socket().display())),
            toml_str(&format!("unix://{}", self.keyd.socket().display())),
        ));
        fs::write(dir.join("config.toml"), config).unwrap();
        let status = self.keyd.dir().join("certd.status");
        let log = dir.join("certd.log");
        let mut child = spawn(
            "aziot-certd",
            &[("AZIOT_CERTD_CONFIG", &dir.join("config.toml")), ("AZIOT_CERTD_CONFIG_DIR", &dir.join("config.d"))],
            &[],
            &log,
            &dir,
        );
        if let Err(e) = wait_ready(&mut child, &status, &self.certd_socket(), &log) {
            panic!("certd: {e}");
        }
        self.certd = Some(Broker { child });
    }

    /// The local CA's certificate.
    pub fn ca_cert(&self) -> openssl::x509::X509 {
        let r = Api::new(self.certd_socket(), "2020-09-01").get("/certificates/device-ca");
        crate::certd::pki::certs(r.json()["pem"].as_str().unwrap()).remove(0)
    }

    fn write_config(&self) {
        let config = format!(
            "homedir = {}\n{}\n[endpoints]\naziot_certd = {}\naziot_identityd = {}\naziot_keyd = {}\naziot_tpmd = {}\n",
            toml_str(self.home().to_str().unwrap()),
            self.config,
            toml_str(&format!("unix://{}", self.certd_socket().display())),
            toml_str(&format!("unix://{}", self.socket().display())),
            toml_str(&format!("unix://{}", self.keyd.socket().display())),
            toml_str(&format!("unix://{}", self.tpmd_socket().display())),
        );
        fs::write(self.config_path(), config).unwrap();
    }

    /// Replaces identityd's config (not `homedir`/`[endpoints]`); takes effect on
    /// [`Identityd::reload`] or the next start.
    pub fn set_config(&mut self, config: &str) {
        config.clone_into(&mut self.config);
        self.write_config();
    }

    /// Sets `key=value` in the environment of identityd's broker from its next start on.
    pub fn set_broker_env(&mut self, key: &str, value: &str) {
        self.broker_env.retain(|(k, _)| k != key);
        self.broker_env.push((key.to_owned(), value.to_owned()));
    }

    /// Writes `config.d/<name>`.
    pub fn drop_in(&self, name: &str, content: &str) {
        fs::write(self.root.join("config.d").join(name), content).unwrap();
    }

    /// SIGHUP to identityd's broker.
    pub fn reload(&self) {
        let pid = self.identityd.as_ref().expect("identityd running").child.id();
        // SAFETY: plain syscall on our own child.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) }, 0);
    }

    /// Starts identityd (again); an error with the log when it exits or is not ready.
    pub fn start_identityd(&mut self) -> Result<(), String> {
        assert!(self.identityd.is_none(), "identityd running");
        let _ = fs::remove_file(self.status_path());
        let mut child = spawn(
            "aziot-identityd",
            &[
                ("AZIOT_IDENTITYD_CONFIG", &self.config_path()),
                ("AZIOT_IDENTITYD_CONFIG_DIR", &self.root.join("config.d")),
            ],
            &self.broker_env,
            &self.log_path(),
            &self.root,
        );
        wait_ready(&mut child, &self.status_path(), &self.socket(), &self.log_path())?;
        nix::unistd::chown(&self.socket(), None, Some(nix::unistd::Gid::from_raw(TEST_GID)))
            .expect("chgrp identityd.sock");
        self.identityd = Some(Broker { child });
        Ok(())
    }

    /// Starts identityd and expects its broker to exit: the exit status and the log.
    pub fn start_expecting_exit(&mut self) -> (std::process::ExitStatus, String) {
        let mut child = spawn(
            "aziot-identityd",
            &[
                ("AZIOT_IDENTITYD_CONFIG", &self.config_path()),
                ("AZIOT_IDENTITYD_CONFIG_DIR", &self.root.join("config.d")),
            ],
            &self.broker_env,
            &self.log_path(),
            &self.root,
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return (s, self.log());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("identityd still running after 20 s\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM identityd's broker and wait for the group to be gone.
    pub fn stop_identityd(&mut self) {
        if let Some(b) = self.identityd.take() {
            b.stop();
        }
    }

    /// Writes a module cache file for `module_id` (generationId `gen`) for the default device,
    /// as identityd writes it (§14), owned by aziotid.
    pub fn seed_module(&self, module_id: &str, gen: &str) {
        let (uid, gid) = (uid_of(SERVICE_USER), nix::unistd::User::from_name(SERVICE_USER).unwrap().unwrap().gid);
        let owner = |p: &Path| nix::unistd::chown(p, Some(nix::unistd::Uid::from_raw(uid)), Some(gid)).unwrap();
        let modules = self.home().join("modules");
        let dir = modules.join(device_dir(HUB, DEVICE_ID));
        for d in [self.home(), modules, dir.clone()] {
            fs::create_dir_all(&d).unwrap();
            owner(&d);
        }
        let file = dir.join(module_file(module_id));
        fs::write(&file, json!({"moduleId": module_id, "deviceId": DEVICE_ID, "generationId": gen}).to_string())
            .unwrap();
        owner(&file);
    }

    pub fn keyd(&self) -> &Keyd {
        &self.keyd
    }
    /// The keyd beside it, to stop and start it (tests/tests/fault_process.rs: keyd down).
    pub fn keyd_mut(&mut self) -> &mut Keyd {
        &mut self.keyd
    }
    pub fn socket(&self) -> PathBuf {
        self.keyd.dir().join("identityd.sock")
    }
    /// Where a test's tpmd lives (`tests/src/tpmd.rs` `Tpmd::start(stack.tpmd_dir(), ..)`): its
    /// socket is the `aziot_tpmd` endpoint of identityd's config.
    pub fn tpmd_dir(&self) -> PathBuf {
        self.keyd.dir().join("tpmd")
    }
    pub fn tpmd_socket(&self) -> PathBuf {
        self.tpmd_dir().join("tpmd.sock")
    }
    pub fn certd_socket(&self) -> PathBuf {
        self.keyd.dir().join("certd.sock")
    }
    pub fn status_path(&self) -> PathBuf {
        self.keyd.dir().join("identityd.status")
    }
    pub fn run_dir(&self) -> &Path {
        self.keyd.dir()
    }
    pub fn home(&self) -> PathBuf {
        self.root.join("home")
    }
    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    pub fn log_path(&self) -> PathBuf {
        self.root.join("identityd.log")
    }
    pub fn log(&self) -> String {
        read_log(&self.log_path())
    }
    pub fn worker_pid(&self) -> i32 {
        let s: Value = serde_json::from_slice(&fs::read(self.status_path()).expect("status file")).unwrap();
        i32::try_from(s["worker_pid"].as_i64().expect("worker_pid")).unwrap()
    }
    /// Poll the log until it contains `needle`.
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

    /// A client as `uid` (None: root) at `version`.
    pub fn client(&self, uid: Option<u32>, version: &'static str) -> Client {
        let api = Api::new(self.socket(), version);
        Client {
            api: match uid {
                None => api,
                Some(u) => api.as_uid(u),
            },
        }
    }
}

impl Drop for Identityd {
    fn drop(&mut self) {
        self.identityd.take();
        self.certd.take();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let start = lines.len().saturating_sub(80);
            eprintln!("--- identityd log, last lines ---\n{}\n--- end ---", lines[start..].join("\n"));
        }
    }
}

/// The default config (manual SAS, the principals, `[localid]`), `extra` top-level keys first.
pub fn default_config(extra: &str) -> String {
    format!(
        "hostname = \"{HOSTNAME}\"\ncloud_retries = 0\n{extra}\n[provisioning]\nsource = \"manual\"\niothub_hostname = \"{HUB}\"\ndevice_id = \"{DEVICE_ID}\"\n[provisioning.authentication]\nmethod = \"sas\"\ndevice_id_pk = \"device-id\"\n[localid]\ndomain = \"{DOMAIN}\"\n{PRINCIPALS}"
    )
}

/// A client of identityd as one uid at one api-version.
pub struct Client {
    pub api: Api,
}

impl Client {
    /// `path` may carry a query (`?type=aziot`); the api-version is appended.
    pub fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> Response {
        let sep = if path.contains('?') { '&' } else { '?' };
        let target = format!("{path}{sep}api-version={}", self.api.version);
        let r = self.api.exchange(&build_request(method, &target, body));
        crate::api::check_envelope(&r, &format!("{method} {path}"));
        r
    }
    pub fn get(&self, path: &str) -> Response {
        self.call("GET", path, None)
    }
    pub fn post(&self, path: &str, body: &Value) -> Response {
        self.call("POST", path, Some(&serde_json::to_vec(body).unwrap()))
    }
}

/// The hub is unreachable: 503 when this build has no IoT Hub client, else 404 `Hub client
/// error` (a network error surfaces as upstream's 404).
#[track_caller]
pub fn expect_hub_unreachable(r: &Response) {
    let m = r.message();
    assert!(
        (r.status == 503 && m == "IoT Hub client unavailable")
            || (r.status == 404 && m.starts_with("Hub client error")),
        "expected the hub to be unreachable\n{r}"
    );
}

/// `modules/<H>-<D>` (§14).
pub fn device_dir(hub: &str, device: &str) -> String {
    format!(
        "{}-{}",
        crate::crypto::hex(&crate::crypto::sha256(hub.as_bytes())),
        crate::crypto::hex(&crate::crypto::sha256(device.as_bytes()))
    )
}

/// `<S>-<M>` (§14).
pub fn module_file(module_id: &str) -> String {
    let s: String = module_id.chars().filter(char::is_ascii_alphanumeric).collect();
    format!("{s}-{}", crate::crypto::hex(&crate::crypto::sha256(module_id.as_bytes())))
}
