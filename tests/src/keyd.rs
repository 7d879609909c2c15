//! Process harness: runs the real `aziotd aziot-keyd` in a private temporary prefix.
//!
//! Two ways of launching it, chosen by `AZIOT_TEST_ACTIVATION` ([`Activation::from_env`]):
//! the service binds its socket itself (default), or `systemd-socket-activate` creates the
//! socket first and passes it as `LISTEN_FDS` (`AZIOT_TEST_ACTIVATION=systemd`), as the
//! `aziot-keyd.socket` unit does in production.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::api::Api;
pub use crate::softhsm::{SoftHsm, SOFTHSM_MODULE};
pub use crate::tempdir::TempDir;
use crate::http::{self, Conn, Response};

/// Group every "other uid" client runs with; the harness chowns the socket (mode 0660) to
/// this group so those clients pass the file-permission gate (common-http.md §4.1) and reach
/// keyd's own principal checks.
pub const TEST_GID: u32 = 4200;

/// How long to wait for a started keyd to accept connections.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);


/// The environment variable that selects the [`Activation`] mode of the whole suite.
pub const ACTIVATION_ENV: &str = "AZIOT_TEST_ACTIVATION";

/// `FileDescriptorName=` of packaging/systemd/aziot-keyd.socket.
pub const SOCKET_FDNAME: &str = "aziot-keyd.socket";

/// The user the service's worker runs as, and the owner the socket unit gives the socket.
pub const SERVICE_USER: &str = "aziotks";

/// How the harness launches keyd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `aziotd aziot-keyd`: the broker binds the socket itself (common-http.md §4.1), removing
    /// whatever is at the path, and sets its owner and mode.
    SelfBound,
    /// `systemd-socket-activate -l <sock> --fdname=aziot-keyd.socket aziotd aziot-keyd`: the
    /// socket exists before the service and is passed as `LISTEN_FDS`/`LISTEN_PID`/
    /// `LISTEN_FDNAMES` (§4.2). The harness gives the socket what `aziot-keyd.socket` gives it
    /// (`SocketUser=aziotks`, `SocketGroup=aziotks`, `SocketMode=0660`).
    /// systemd-socket-activate (without `--accept`) execs the service on the first connection
    /// attempt, in its own process (same pid): the harness connects once to trigger that.
    Systemd,
}

impl Activation {
    /// The suite-wide mode: `AZIOT_TEST_ACTIVATION` unset, empty or `self` → [`SelfBound`],
    /// `systemd` → [`Systemd`]; anything else fails the test (never a silent default).
    ///
    /// [`SelfBound`]: Activation::SelfBound
    /// [`Systemd`]: Activation::Systemd
    pub fn from_env() -> Activation {
        match std::env::var(ACTIVATION_ENV) {
            Err(std::env::VarError::NotPresent) => Activation::SelfBound,
            Ok(v) if v.is_empty() || v == "self" || v == "self-bound" => Activation::SelfBound,
            Ok(v) if v == "systemd" => Activation::Systemd,
            other => panic!("{ACTIVATION_ENV}={other:?}: expected `systemd`, `self` or unset"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Activation::SelfBound => "self-bound",
            Activation::Systemd => "systemd socket activation",
        }
    }
}

/// The environment variable that selects the key [`Backend`] of the keyd suite.
pub const BACKEND_ENV: &str = "AZIOT_TEST_BACKEND";

/// Where keyd keeps dynamic keys (keys that are not preloaded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Files in the home directory (no `pkcs11_*` settings).
    File,
    /// A fresh SoftHSM2 token per keyd instance ([`SoftHsm`]), configured as
    /// `pkcs11_lib_path` + `pkcs11_base_slot`; `SOFTHSM2_CONF` in the broker's environment.
    SoftHsm,
}

impl Backend {
    /// `AZIOT_TEST_BACKEND` unset, empty or `file` → [`Backend::File`], `softhsm` →
    /// [`Backend::SoftHsm`]; anything else fails the test.
    pub fn from_env() -> Backend {
        match std::env::var(BACKEND_ENV) {
            Err(std::env::VarError::NotPresent) => Backend::File,
            Ok(v) if v.is_empty() || v == "file" => Backend::File,
            Ok(v) if v == "softhsm" => Backend::SoftHsm,
            other => panic!("{BACKEND_ENV}={other:?}: expected `softhsm`, `file` or unset"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::File => "file backend",
            Backend::SoftHsm => "SoftHSM2 (PKCS#11) backend",
        }
    }
}

/// For a test whose subject is the file backend (file names on disk, torn files, preloaded
/// file keys, handles minted with the file HVK): prints a note when the suite runs with
/// another backend. The test then starts its keyd with `.backend(Backend::File)`.
pub fn file_backend_only(test: &str) -> Backend {
    if Backend::from_env() != Backend::File {
        println!(
            "note: {test} checks the file backend itself: it runs with the file backend \
             ({BACKEND_ENV}={:?} applies to the other tests)",
            std::env::var(BACKEND_ENV).unwrap_or_default()
        );
    }
    Backend::File
}

/// uid and gid of [`SERVICE_USER`] (created by `systemd-sysusers packaging/sysusers.d/aziot.conf`).
pub fn service_user() -> (u32, u32) {
    let user = nix::unistd::User::from_name(SERVICE_USER)
        .unwrap_or_else(|e| panic!("getpwnam({SERVICE_USER}): {e}"))
        .unwrap_or_else(|| {
            panic!(
                "no user {SERVICE_USER}: run `systemd-sysusers packaging/sysusers.d/aziot.conf` first"
            )
        });
    (user.uid.as_raw(), user.gid.as_raw())
}

/// What the keyd harness needs as this run configures it: root, [`SERVICE_USER`], SoftHSM2 with
/// `AZIOT_TEST_BACKEND=softhsm`, systemd-socket-activate with
/// `AZIOT_TEST_ACTIVATION=systemd`. For [`crate::require_keyd!`].
pub fn harness_deps() -> Vec<crate::Dep> {
    use crate::Dep;
    let mut deps = vec![Dep::Root, Dep::ServiceUser(SERVICE_USER)];
    if Backend::from_env() == Backend::SoftHsm {
        deps.push(Dep::SoftHsm);
    }
    if Activation::from_env() == Activation::Systemd {
        deps.push(Dep::SocketActivate);
    }
    deps
}

/// Whether [`socket_activate_bin`] would find one.
pub fn socket_activate_available() -> bool {
    std::env::var_os("AZIOT_TEST_SOCKET_ACTIVATE").is_some() || crate::on_path("systemd-socket-activate")
}

/// `systemd-socket-activate`: `$AZIOT_TEST_SOCKET_ACTIVATE`, else the first one on `$PATH` (or
/// /usr/bin, /bin). Panics (test failure, never a skip) when it is not installed.
pub fn socket_activate_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("AZIOT_TEST_SOCKET_ACTIVATE") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|d| d.join("systemd-socket-activate"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{ACTIVATION_ENV}=systemd needs systemd-socket-activate (package systemd): not found \
                 on $PATH"
            )
        })
}

/// Location of the admin CLI: `$AZIOTCTL_BIN`, else `<profile dir>/aziotctl`.
pub fn aziotctl_bin() -> PathBuf {
    let path = match std::env::var_os("AZIOTCTL_BIN") {
        Some(p) => PathBuf::from(p),
        None => profile_dir().join("aziotctl"),
    };
    assert!(
        path.is_file(),
        "aziotctl {} does not exist: run `cargo build --workspace --bins` first \
         (or point AZIOTCTL_BIN at one)",
        path.display()
    );
    path
}

/// The directory holding the binaries of the current cargo profile (`target/<profile>`), derived
/// from the running executable (integration tests live in `target/<profile>/deps/`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe has a parent").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// Location of the service binary: `$AZIOTD_BIN`, else `<profile dir>/aziotd`.
/// Panics (test failure, never a skip) with a clear message if it does not exist.
pub fn aziotd_bin() -> PathBuf {
    let path = match std::env::var_os("AZIOTD_BIN") {
        Some(p) => PathBuf::from(p),
        None => profile_dir().join("aziotd"),
    };
    assert!(
        path.is_file(),
        "the service binary {} does not exist: run `cargo build --workspace --bins` first \
         (or point AZIOTD_BIN at an aziotd binary)",
        path.display()
    );
    path
}

/// Location of this package's helper that performs one HTTP exchange as another uid.
pub fn client_bin() -> PathBuf {
    let path = match std::env::var_os("AZIOT_TEST_CLIENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => profile_dir().join("aziot-test-client"),
    };
    assert!(
        path.is_file(),
        "helper {} does not exist: build it with `cargo build -p aziot-tests --bins`",
        path.display()
    );
    path
}

/// How to start a keyd.
pub struct Builder {
    dir: TempDir,
    extra: String,
    bin: Option<PathBuf>,
    log_level: String,
    chown_socket: bool,
    argv0: Option<String>,
    activation: Activation,
    backend: Backend,
    base_slot: Option<String>,
    pin_file: Option<String>,
}

impl Builder {
    /// The temporary prefix (exists already: write preloaded key files etc. here).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Extra TOML placed at the *top* of config.toml (top-level keys like `max_requests`,
    /// then any tables such as `[[principal]]` or `[preloaded_keys]`). It must not define
    /// `[aziot_keys]` or `[endpoints]`, which the harness writes.
    pub fn extra(mut self, toml: &str) -> Builder {
        self.extra.push_str(toml);
        self.extra.push('\n');
        self
    }

    pub fn bin(mut self, bin: PathBuf) -> Builder {
        self.bin = Some(bin);
        self
    }

    pub fn log_level(mut self, level: &str) -> Builder {
        level.clone_into(&mut self.log_level);
        self
    }

    /// Launch through a symlink `<tmp>/<name>` to the binary, without argv[1]
    /// (the installed form: the service is chosen by argv[0]'s file name).
    pub fn via_symlink(mut self, name: &str) -> Builder {
        self.argv0 = Some(name.to_owned());
        self
    }

    /// Launch this way whatever `AZIOT_TEST_ACTIVATION` says (the benchmark measures the
    /// self-bound service; a test that only makes sense in one mode says so and prints it).
    pub fn activation(mut self, activation: Activation) -> Builder {
        self.activation = activation;
        self
    }

    /// Use this key backend whatever `AZIOT_TEST_BACKEND` says (tests whose subject is one
    /// backend).
    pub fn backend(mut self, backend: Backend) -> Builder {
        self.backend = backend;
        self
    }

    /// SoftHSM backend: write this `pkcs11_base_slot` instead of the token's own URI (to test
    /// bad URIs, labels and PINs). The token is still created.
    pub fn pkcs11_base_slot(mut self, uri: &str) -> Builder {
        self.base_slot = Some(uri.to_owned());
        self
    }

    /// With a SoftHSM token: write its user PIN (and a newline) to `<dir>/<name>`, 0400, owned
    /// by the service user, before keyd starts (for `pin-source=file:` URIs).
    pub fn softhsm_pin_file(mut self, name: &str) -> Builder {
        self.pin_file = Some(name.to_owned());
        self
    }

    /// Do not chgrp the socket to [`TEST_GID`] (to look at what the service itself created).
    pub fn keep_socket_owner(mut self) -> Builder {
        self.chown_socket = false;
        self
    }

    /// Write a drop-in file `config.d/<name>`.
    pub fn drop_in(self, name: &str, content: &str) -> Builder {
        let p = self.dir.path().join("config.d").join(name);
        fs::write(&p, content).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        self
    }

    /// Write the config and start; wait until the socket accepts connections.
    pub fn start(self) -> Keyd {
        let mut keyd = self.prepare();
        keyd.spawn_and_wait();
        keyd
    }

    /// Write the config, start, and expect the service to refuse to start: returns its exit
    /// status and log. Panics if it is still running after 10 s.
    pub fn start_expecting_exit(self) -> (std::process::ExitStatus, String) {
        let mut keyd = self.prepare();
        keyd.spawn();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = keyd
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                keyd.child = None;
                return (status, keyd.log());
            }
            assert!(
                Instant::now() < deadline,
                "keyd was expected to refuse to start but is still running\n--- log ---\n{}",
                keyd.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Write the config and spawn without waiting for readiness (cold-start measurements).
    /// The socket is not chgrp'ed.
    pub fn start_unready(self) -> Keyd {
        let mut keyd = self.prepare();
        keyd.spawn();
        keyd
    }

    fn prepare(self) -> Keyd {
        let bin = self.bin.unwrap_or_else(aziotd_bin);
        let dir = self.dir;
        let root = dir.path().to_path_buf();
        let home = root.join("home");
        let sock = root.join("keyd.sock");
        let softhsm = match self.backend {
            Backend::File => None,
            Backend::SoftHsm => Some(SoftHsm::create(&root.join("softhsm"))),
        };
        if let (Some(name), Some(hsm)) = (&self.pin_file, &softhsm) {
            let path = root.join(name);
            fs::write(&path, format!("{}\n", hsm.pin)).expect("write the PIN file");
            fs::set_permissions(&path, fs::Permissions::from_mode(0o400)).expect("chmod the PIN file");
            let (uid, gid) = service_user();
            nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(uid)), Some(nix::unistd::Gid::from_raw(gid)))
                .expect("chown the PIN file");
        }
        let pkcs11 = match &softhsm {
            None => String::new(),
            // pkcs11_base_slot("") writes none: token keys only as preloaded pkcs11: URIs.
            Some(_) if self.base_slot.as_deref() == Some("") => {
                format!("pkcs11_lib_path = {}\n", toml_str(SOFTHSM_MODULE))
            }
            Some(hsm) => format!(
                "pkcs11_lib_path = {}\npkcs11_base_slot = {}\n",
                toml_str(SOFTHSM_MODULE),
                toml_str(self.base_slot.as_deref().unwrap_or(&hsm.base_slot())),
            ),
        };
        let config = format!(
            "{}\n[aziot_keys]\nhomedir_path = {}\n{pkcs11}\n[endpoints]\naziot_keyd = {}\n",
            self.extra,
            toml_str(home.to_str().expect("utf-8 tmp path")),
            toml_str(&format!("unix://{}", sock.display())),
        );
        fs::write(root.join("config.toml"), config).expect("write config.toml");
        let (bin, with_arg) = match self.argv0 {
            Some(name) => {
                let link = root.join(name);
                std::os::unix::fs::symlink(&bin, &link).expect("symlink to aziotd");
                (link, false)
            }
            None => (bin, true),
        };
        Keyd {
            child: None,
            with_arg,
            bin,
            log_level: self.log_level,
            chown_socket: self.chown_socket,
            activation: self.activation,
            activated_socket: None,
            softhsm,
            home,
            sock,
            spawned_at: Instant::now(),
            ready_after: Duration::ZERO,
            dir,
        }
    }
}

/// TOML basic-string literal.
pub fn toml_str(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// A running keyd (broker + worker, whatever the binary runs), in its own process group.
pub struct Keyd {
    dir: TempDir,
    child: Option<Child>,
    /// pass `aziot-keyd` as argv[1] (false when launched through a symlink)
    with_arg: bool,
    bin: PathBuf,
    log_level: String,
    chown_socket: bool,
    activation: Activation,
    /// (device, inode) of the socket systemd-socket-activate created at the last start.
    activated_socket: Option<(u64, u64)>,
    /// The token of the SoftHSM backend (`None`: file backend).
    softhsm: Option<SoftHsm>,
    home: PathBuf,
    sock: PathBuf,
    spawned_at: Instant,
    ready_after: Duration,
}

impl Keyd {
    /// A fresh prefix (`config.d/` and `home/` (0700) created) not started yet.
    pub fn builder() -> Builder {
        let name = std::thread::current()
            .name()
            .unwrap_or("keyd")
            .replace("::", "-");
        let dir = TempDir::new(&name);
        fs::create_dir(dir.path().join("config.d")).expect("mkdir config.d");
        fs::DirBuilder::new()
            .mode(0o700)
            .create(dir.path().join("home"))
            .expect("mkdir home");
        fs::set_permissions(dir.path().join("home"), fs::Permissions::from_mode(0o700))
            .expect("chmod home");
        Builder {
            dir,
            extra: String::new(),
            bin: None,
            log_level: "debug".to_owned(),
            chown_socket: true,
            argv0: None,
            activation: Activation::from_env(),
            backend: Backend::from_env(),
            base_slot: None,
            pin_file: None,
        }
    }

    /// Start with `config_extra` at the top of config.toml.
    pub fn start(config_extra: &str) -> Keyd {
        Keyd::builder().extra(config_extra).start()
    }

    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .open(self.log_path())
            .expect("open log file");
        let root = self.dir.path();
        let mut vars = vec![
            ("AZIOT_KEYD_CONFIG", root.join("config.toml").into_os_string()),
            ("AZIOT_KEYD_CONFIG_DIR", root.join("config.d").into_os_string()),
            ("AZIOT_LOG", self.log_level.clone().into()),
        ];
        if let Some(hsm) = &self.softhsm {
            // The broker keeps this one variable and forwards exactly it to the worker.
            vars.push(("SOFTHSM2_CONF", hsm.conf().into_os_string()));
        }
        let mut cmd = match self.activation {
            Activation::SelfBound => {
                let mut cmd = Command::new(&self.bin);
                if self.with_arg {
                    cmd.arg("aziot-keyd");
                }
                cmd
            }
            Activation::Systemd => {
                // A socket unit starts from a fresh socket; the readiness check below waits
                // for the new one to appear.
                if fs::symlink_metadata(&self.sock).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) {
                    fs::remove_file(&self.sock).expect("remove the previous socket");
                }
                // systemd-socket-activate passes on only PATH (TERM, USER, HOME) and `-E`.
                let mut cmd = Command::new(socket_activate_bin());
                cmd.arg("-l")
                    .arg(&self.sock)
                    .arg(format!("--fdname={SOCKET_FDNAME}"));
                for (k, v) in &vars {
                    let mut kv = std::ffi::OsString::from(format!("{k}="));
                    kv.push(v);
                    cmd.arg("-E").arg(kv);
                }
                cmd.arg(&self.bin);
                if self.with_arg {
                    cmd.arg("aziot-keyd");
                }
                cmd
            }
        };
        cmd.env_clear().env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
        );
        if self.activation == Activation::SelfBound {
            cmd.envs(vars.iter().map(|(k, v)| (*k, v)));
        }
        cmd.current_dir(root)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("dup log")))
            .stderr(Stdio::from(log))
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent; it only asks
        // the kernel to SIGKILL the child if the spawning thread dies (no leaked services when
        // the test binary is killed).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        self.spawned_at = Instant::now();
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {}: {e}", self.bin.display()));
        self.child = Some(child);
        if self.activation == Activation::Systemd {
            self.activate();
        }
    }

    /// Systemd mode, right after spawning systemd-socket-activate: wait for its socket, give it
    /// the socket unit's owner and mode (then the test group, unless
    /// [`Builder::keep_socket_owner`]), and connect once so that it execs the service.
    fn activate(&mut self) {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let deadline = Instant::now() + READY_TIMEOUT;
        let meta = loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                self.child = None;
                panic!(
                    "systemd-socket-activate exited with {status} before creating {}\n--- log ---\n{}",
                    self.sock.display(),
                    self.log()
                );
            }
            if let Ok(m) = fs::symlink_metadata(&self.sock) {
                if m.file_type().is_socket() {
                    break m;
                }
            }
            assert!(
                Instant::now() < deadline,
                "systemd-socket-activate did not create {} within {READY_TIMEOUT:?}\n--- log ---\n{}",
                self.sock.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        self.activated_socket = Some((meta.dev(), meta.ino()));
        // SocketUser=aziotks, SocketGroup=aziotks, SocketMode=0660 (aziot-keyd.socket).
        let (uid, gid) = service_user();
        nix::unistd::chown(
            &self.sock,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .unwrap_or_else(|e| panic!("chown {} {SERVICE_USER}: {e}", self.sock.display()));
        fs::set_permissions(&self.sock, fs::Permissions::from_mode(0o660)).expect("chmod 0660 socket");
        if self.chown_socket {
            nix::unistd::chown(&self.sock, None, Some(nix::unistd::Gid::from_raw(TEST_GID)))
                .unwrap_or_else(|e| panic!("chgrp {} failed: {e}", self.sock.display()));
        }
        // The first connection attempt makes systemd-socket-activate exec the service; this
        // connection waits in the backlog and is accepted (and sees EOF) once the worker serves.
        // The file appears at bind(), a moment before listen(): refused until then.
        loop {
            match std::os::unix::net::UnixStream::connect(&self.sock) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => panic!(
                    "connect {} (activation trigger): {e}\n--- log ---\n{}",
                    self.sock.display(),
                    self.log()
                ),
            }
        }
    }

    fn spawn_and_wait(&mut self) {
        self.spawn();
        self.wait_ready(READY_TIMEOUT);
    }

    /// Wait until the service is ready. Self-bound: the socket exists and accepts connections
    /// (the broker has read the config and bound it). Systemd: the socket always accepted
    /// connections (systemd-socket-activate created it), so the equivalent is that the exec'ed
    /// broker has written its status file (its pid, a worker that reported its sandbox).
    /// Panics with the log on timeout or if the process exits.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let broker = self.child.as_ref().map(Child::id);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    panic!(
                        "keyd exited during startup with {status}\n--- log ---\n{}",
                        self.log()
                    );
                }
            }
            // Ready = the broker has recorded its worker (status file naming this broker: it is
            // written once the worker's sandbox report arrived, a moment after the worker may
            // already answer) and, self-bound, the socket accepts connections.
            let recorded =
                self.status().is_some_and(|s| s["broker_pid"].as_u64() == broker.map(u64::from));
            let ready = match self.activation {
                Activation::SelfBound => {
                    recorded && std::os::unix::net::UnixStream::connect(&self.sock).is_ok()
                }
                Activation::Systemd => recorded,
            };
            if ready {
                break;
            }
            if Instant::now() > deadline {
                panic!(
                    "keyd ({}) was not ready on {} within {timeout:?}\n--- log ---\n{}",
                    self.activation.name(),
                    self.sock.display(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.ready_after = self.spawned_at.elapsed();
        if self.chown_socket {
            nix::unistd::chown(&self.sock, None, Some(nix::unistd::Gid::from_raw(TEST_GID)))
                .unwrap_or_else(|e| panic!("chgrp {} failed: {e}", self.sock.display()));
        }
    }

    /// Time from spawn to the socket accepting connections (last start).
    pub fn ready_after(&self) -> Duration {
        self.ready_after
    }

    pub fn spawned_at(&self) -> Instant {
        self.spawned_at
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("keyd not running").id()
    }

    /// Every live process of the service (the process group we created).
    pub fn pids(&self) -> Vec<u32> {
        let Some(child) = self.child.as_ref() else {
            return Vec::new();
        };
        let pgid = child.id();
        let mut out = Vec::new();
        if let Ok(rd) = fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                // SAFETY: getpgid has no memory-safety preconditions.
                let pg = unsafe { libc::getpgid(pid as libc::pid_t) };
                if pg == pgid as libc::pid_t {
                    out.push(pid);
                }
            }
        }
        out.sort_unstable();
        out
    }

    fn signal_group(&self, sig: libc::c_int) {
        if let Some(child) = self.child.as_ref() {
            // SAFETY: plain syscall; the group id is our own child's pid (process_group(0)).
            unsafe {
                libc::kill(-(child.id() as libc::pid_t), sig);
            }
        }
    }

    fn reap(&mut self, timeout: Duration) -> bool {
        let Some(child) = self.child.as_mut() else {
            return true;
        };
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => {
                    self.child = None;
                    return true;
                }
                Ok(None) => {}
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL the whole service (every process of its group) and reap it. The socket file and
    /// the state stay as the kill left them.
    pub fn kill9(&mut self) {
        let pgid = self.last_pgid();
        self.signal_group(libc::SIGKILL);
        assert!(
            self.reap(Duration::from_secs(10)),
            "keyd did not die after SIGKILL"
        );
        // Make sure no other member of the group survives (e.g. a worker).
        wait_group_gone(pgid);
    }

    /// Send `sig` to the broker only (not to its process group, unlike [`Keyd::stop`]).
    pub fn signal_broker(&self, sig: libc::c_int) {
        let pid = self.pid();
        // SAFETY: plain syscall on our own child.
        let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}): {}", io::Error::last_os_error());
    }

    /// Waits up to `timeout` for the broker to exit and reaps it; its exit status. Panics (with
    /// the log) if it is still running then.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("keyd not running");
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "keyd still running {timeout:?} later\n--- log ---\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Start again after [`Keyd::kill9`] / [`Keyd::stop`] with the same prefix and config.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "keyd still running");
        self.spawn_and_wait();
    }

    /// SIGTERM (then SIGKILL after 5 s) the service group.
    pub fn stop(&mut self) {
        let pgid = self.last_pgid();
        self.signal_group(libc::SIGTERM);
        if !self.reap(Duration::from_secs(5)) {
            self.signal_group(libc::SIGKILL);
            assert!(self.reap(Duration::from_secs(10)), "keyd did not die");
        }
        // Other members of the group (worker) too: they follow the broker (PDEATHSIG) within
        // 500 ms, else they are killed.
        let deadline = Instant::now() + Duration::from_millis(500);
        while group_alive(pgid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if group_alive(pgid) {
            if let Some(pg) = pgid {
                // SAFETY: plain syscall on our own process group.
                unsafe {
                    libc::kill(-(pg as libc::pid_t), libc::SIGKILL);
                }
            }
        }
        wait_group_gone(pgid);
    }

    fn last_pgid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stop and start again (same prefix, config, state).
    pub fn restart(&mut self) {
        self.stop();
        self.spawn_and_wait();
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    /// How this keyd was launched.
    pub fn activation(&self) -> Activation {
        self.activation
    }
    /// Where dynamic keys live.
    pub fn backend(&self) -> Backend {
        if self.softhsm.is_some() {
            Backend::SoftHsm
        } else {
            Backend::File
        }
    }
    /// Whether key `id` is in this keyd's store: its file (keyd.md §7.2) with the file backend,
    /// an object labelled `id` on the token with SoftHSM.
    pub fn key_stored(&self, id: &str) -> bool {
        match &self.softhsm {
            None => self.keys_dir().join(crate::crypto::key_file_name(id)).exists(),
            Some(hsm) => hsm.labels().iter().any(|l| l == id),
        }
    }
    /// The SoftHSM token of this keyd (`None` with the file backend).
    pub fn softhsm(&self) -> Option<&SoftHsm> {
        self.softhsm.as_ref()
    }
    /// Systemd mode: (device, inode) of the socket systemd-socket-activate created at the last
    /// start (the one the service must keep serving on); `None` in self-bound mode.
    pub fn activated_socket(&self) -> Option<(u64, u64)> {
        self.activated_socket
    }
    /// The broker's status file: `<socket dir>/keyd.status`.
    pub fn status_path(&self) -> PathBuf {
        self.sock.parent().expect("socket dir").join("keyd.status")
    }
    /// The status file, parsed; `None` while it does not exist (or is being replaced).
    pub fn status(&self) -> Option<serde_json::Value> {
        let bytes = fs::read(self.status_path()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
    /// The worker pid the status file names (panics if there is no status file).
    pub fn worker_pid(&self) -> i32 {
        let status = self
            .status()
            .unwrap_or_else(|| panic!("no status file {}\n{}", self.status_path().display(), self.log()));
        i32::try_from(status["worker_pid"].as_i64().expect("worker_pid")).expect("pid")
    }
    /// Waits until the status file names a worker other than `old`; its status.
    pub fn wait_new_worker(&self, old: i32, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.status() {
                if s["worker_pid"].as_i64().is_some_and(|p| p != i64::from(old)) {
                    return s;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the status file did not name a new worker (old {old}) within {timeout:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    pub fn home(&self) -> &Path {
        &self.home
    }
    pub fn keys_dir(&self) -> PathBuf {
        self.home.join("keys")
    }
    pub fn socket(&self) -> &Path {
        &self.sock
    }
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }
    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config.d")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("keyd.log")
    }

    /// Everything keyd wrote to stderr/stdout so far (all starts).
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(self.log_path()).unwrap_or_default()).into_owned()
    }

    /// Poll the log until it contains `needle` (max `timeout`).
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

    pub fn conn(&self) -> Conn {
        Conn::connect(&self.sock).unwrap_or_else(|e| panic!("connect {}: {e}", self.sock.display()))
    }

    /// API client (as root, in-process) for one api-version.
    pub fn api(&self, version: &'static str) -> Api {
        Api::new(self.sock.clone(), version)
    }

    /// One raw exchange on a fresh connection.
    pub fn raw(&self, bytes: &[u8]) -> io::Result<Response> {
        http::raw_once(&self.sock, bytes)
    }
}

fn wait_group_gone(pgid: Option<u32>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && group_alive(pgid) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether a member of the process group is still running. Zombies do not count: a killed
/// worker whose broker died first is re-parented to init and stays a zombie until init reaps
/// it (seconds, on some machines) — it has released its files and memory, it is gone.
fn group_alive(pgid: Option<u32>) -> bool {
    let Some(pgid) = pgid else { return false };
    // SAFETY: signal 0 only checks existence.
    if unsafe { libc::kill(-(pgid as libc::pid_t), 0) } != 0 {
        return false;
    }
    let Ok(rd) = fs::read_dir("/proc") else { return true };
    rd.flatten().any(|e| {
        if !e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) {
            return false;
        }
        // /proc/<pid>/stat: pid (comm) state ppid pgrp ...
        let Ok(stat) = fs::read_to_string(e.path().join("stat")) else { return false };
        let Some((_, rest)) = stat.rsplit_once(')') else { return false };
        let f: Vec<&str> = rest.split_whitespace().collect();
        f.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid) && !matches!(f.first(), Some(&"Z" | &"X"))
    })
}

impl Drop for Keyd {
    fn drop(&mut self) {
        let pgid = self.last_pgid();
        self.signal_group(libc::SIGKILL);
        let _ = self.reap(Duration::from_secs(10));
        wait_group_gone(pgid);
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let start = lines.len().saturating_sub(80);
            eprintln!(
                "--- keyd log ({}; {}; {}), last {} lines ---\n{}\n--- end of keyd log ---",
                self.log_path().display(),
                self.activation.name(),
                self.backend().name(),
                lines.len() - start,
                lines[start..].join("\n")
            );
        }
    }
}

/// The socket inodes (sockfs, as in `/proc/<pid>/fd` links `socket:[N]`) of the listening
/// unix sockets bound to `path`, from /proc/net/unix. A socket that was unlinked and re-bound
/// would show up twice.
pub fn listening_unix_inodes(path: &Path) -> Vec<u64> {
    let table = fs::read_to_string("/proc/net/unix").expect("/proc/net/unix");
    let want = path.to_string_lossy();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            // Num RefCount Protocol Flags Type St Inode Path; flag 0x10000 = __SO_ACCEPTCON
            let f: Vec<&str> = line.split_whitespace().collect();
            let listening = f.get(3).and_then(|x| u32::from_str_radix(x, 16).ok())? & 0x10000 != 0;
            (listening && f.get(7).is_some_and(|p| *p == want)).then(|| f.get(6)?.parse().ok())?
        })
        .collect()
}

/// `(fd, readlink target)` of every descriptor of `pid`.
pub fn fds_of(pid: i32) -> Vec<(i32, String)> {
    let mut out: Vec<(i32, String)> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
        .flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            Some((fd, fs::read_link(e.path()).ok()?.to_string_lossy().into_owned()))
        })
        .collect();
    out.sort();
    out
}

/// Run one raw HTTP exchange as `uid` (gid [`TEST_GID`], no supplementary groups) through the
/// helper binary. `Err` carries the helper's description when no response came back (e.g. the
/// connection was refused or closed).
pub fn exchange_as(uid: u32, sock: &Path, request: &[u8]) -> Result<Response, String> {
    use std::io::Write as _;
    let mut child = Command::new(client_bin())
        .arg(sock)
        .uid(uid)
        .gid(TEST_GID)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn helper as uid {uid}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(request)
        .expect("feed helper");
    let out = child.wait_with_output().expect("helper output");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "helper (uid {uid}) printed no JSON ({e}); status {}; stdout {:?}; stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    if let Some(err) = v.get("error").and_then(serde_json::Value::as_str) {
        return Err(err.to_owned());
    }
    Ok(http::response_from_json(&v).expect("helper JSON shape"))
}
