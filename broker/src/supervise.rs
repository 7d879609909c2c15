//! Steps 4–7 of the broker: open the resources, spawn the confined worker, hand over, wait for
//! its sandbox report, then supervise — restart with backoff while the listener stays open,
//! forward SIGTERM.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aziot_ipc::handoff::{self, DescriptorEntry, DescriptorKind, Manifest, MANIFEST_VERSION};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::services::ServiceSetup;

/// How long a worker may take from exec to its sandbox report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(15);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A worker that ran this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("the broker must start as root: it opens the service's resources and drops privileges for its worker")]
    NotRoot,
    #[error(transparent)]
    Policy(#[from] aziot_policy::PolicyError),
    #[error(transparent)]
    Listener(#[from] aziot_ipc::listener::ListenerError),
    #[error("could not prepare the state directory {path}")]
    StateDir { path: PathBuf, #[source] source: std::io::Error },
    #[error("could not set the owner of {path}")]
    Chown { path: PathBuf, #[source] source: nix::Error },
    #[error("could not spawn the worker")]
    Spawn(#[source] std::io::Error),
    #[error("hand-off to the worker failed")]
    Handoff(#[from] aziot_ipc::handoff::HandoffError),
    #[error("the worker did not report its sandbox within {0:?}")]
    ReportTimeout(Duration),
    #[error("the worker refused to start: {0}")]
    WorkerRefused(String),
    #[error("{0}")]
    Sys(#[from] nix::Error),
    #[error("invalid [sandbox] config: {0}")]
    Sandbox(String),
}

/// What the worker sends back once its sandbox is in force (untrusted: recorded only).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct WorkerReport {
    pub ok: bool,
    pub error: Option<String>,
    pub landlock: Option<aziot_policy::LandlockReport>,
    pub seccomp: Option<aziot_policy::SeccompReport>,
    pub warnings: Vec<String>,
}

/// How often the broker looks at the config files.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// A running worker: its pid, what it reported, and the broker's end of the hand-off socket
/// (kept for config updates).
pub struct Worker {
    pid: Pid,
    report: WorkerReport,
    control: OwnedFd,
}

/// Waits up to `timeout` for a signal; `None` on timeout.
fn wait_signal(sfd: &mut SignalFd, timeout: Duration) -> Result<Option<i32>, BrokerError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let ms = PollTimeout::try_from(timeout.as_millis().min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX);
    let ready = {
        let mut fds = [PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(n) => n,
            Err(nix::Error::EINTR) => 0,
            Err(e) => return Err(e.into()),
        }
    };
    if ready == 0 {
        return Ok(None);
    }
    Ok(sfd.read_signal()?.map(|info| info.ssi_signo as i32))
}

/// The running broker of one service.
pub struct Broker {
    setup: ServiceSetup,
    policy: aziot_policy::Policy,
    creds: aziot_policy::Credentials,
    listener: OwnedFd,
    state_dir: Option<OwnedFd>,
    extra_dirs: Vec<(String, OwnedFd)>,
    status_path: PathBuf,
    seccomp_mode: String,
    restarts: u32,
    /// This binary, resolved at start (the worker is the same image in worker mode).
    exe: PathBuf,
}

impl Broker {
    /// Effective policy, credentials, listener and state directory: everything opened as root.
    pub fn prepare(setup: ServiceSetup) -> Result<Broker, BrokerError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(BrokerError::NotRoot);
        }
        let seccomp_mode = setup.sandbox.seccomp.clone().unwrap_or_else(|| "kill".to_owned());
        if !matches!(seccomp_mode.as_str(), "kill" | "log" | "off") {
            return Err(BrokerError::Sandbox(format!("seccomp = {seccomp_mode:?} (expected kill, log or off)")));
        }
        if seccomp_mode != "kill" && !setup.sandbox.allow_degraded {
            return Err(BrokerError::Sandbox(format!(
                "seccomp = {seccomp_mode:?} weakens the sandbox; set allow_degraded = true to accept that"
            )));
        }
        let policy_d = PathBuf::from(format!("/etc/aziot/{}/policy.d", setup.short));
        let policy = aziot_policy::effective(setup.short, &setup.grants, Some(&policy_d))?;
        let creds = aziot_policy::resolve_credentials(&policy)?;
        let activated = !crate::sanitize::activated_range().is_empty();
        let listener: OwnedFd = aziot_ipc::listener::open(&setup.endpoint, Some(setup.socket_name))?.into();
        if let (false, aziot_ipc::endpoint::Endpoint::Unix(path)) = (activated, &setup.endpoint) {
            // A socket we bound ourselves gets the socket unit's owner and mode (0660, set at bind).
            nix::unistd::chown(path, Some(creds.uid.into()), Some(creds.gid.into()))
                .map_err(|source| BrokerError::Chown { path: path.clone(), source })?;
        }
        let state_dir = match &setup.state_dir {
            Some(path) => Some(open_state_dir(path, &creds)?),
            None => None,
        };
        let mut extra_dirs = Vec::new();
        for (name, path) in &setup.extra_dirs {
            match std::fs::File::open(path) {
                Ok(dir) if dir.metadata().map(|m| m.is_dir()).unwrap_or(false) => extra_dirs.push((name.clone(), dir.into())),
                Ok(_) => tracing::warn!("{} ({name}) is not a directory; not handed to the worker", path.display()),
                Err(e) => tracing::warn!("could not open {} ({name}): {e}; not handed to the worker", path.display()),
            }
        }
        let status_path = match &setup.endpoint {
            aziot_ipc::endpoint::Endpoint::Unix(p) => {
                p.parent().unwrap_or(Path::new(aziot_ipc::SOCKET_DIR)).join(format!("{}.status", setup.short))
            }
            _ => PathBuf::from(format!("{}/{}.status", aziot_ipc::SOCKET_DIR, setup.short)),
        };
        let exe = std::env::current_exe().map_err(BrokerError::Spawn)?;
        Ok(Broker { setup, policy, creds, listener, state_dir, extra_dirs, status_path, seccomp_mode, restarts: 0, exe })
    }

    /// Runs until SIGTERM/SIGINT (then exits cleanly) or until the first worker fails before
    /// reporting (a configuration the worker cannot serve: exit with the error).
    pub fn run(mut self) -> Result<(), BrokerError> {
        let mut mask = SigSet::empty();
        for s in [Signal::SIGCHLD, Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
            mask.add(s);
        }
        mask.thread_block()?;
        let mut sfd = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;

        let started = Instant::now();
        let mut worker = self.spawn_and_handoff(&mut sfd)?;
        tracing::info!("worker {} of {} ready (sandbox report received in {:?})", worker.pid, self.setup.short, started.elapsed());
        self.write_status(&worker);
        crate::notify::sd_notify(&format!("READY=1\nSTATUS=worker {} serving\nMAINPID={}", worker.pid, std::process::id()));

        let mut backoff = BACKOFF_MIN;
        let mut worker_started = Instant::now();
        let mut watcher = crate::watch::ConfigWatcher::new(&self.setup.paths);
        loop {
            let signo = match wait_signal(&mut sfd, WATCH_INTERVAL)? {
                Some(signo) => signo,
                None => {
                    if watcher.changed() {
                        self.reload(&worker);
                    }
                    continue;
                }
            };
            if signo == Signal::SIGTERM as i32 || signo == Signal::SIGINT as i32 {
                tracing::info!("received signal {signo}, stopping the worker");
                self.stop(worker.pid);
                let _ = std::fs::remove_file(&self.status_path);
                return Ok(());
            }
            if signo == Signal::SIGHUP as i32 {
                self.reload(&worker);
                continue;
            }
            if signo != Signal::SIGCHLD as i32 {
                continue;
            }
            // Reap everything; only the worker matters.
            let mut worker_died = false;
            loop {
                match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(nix::Error::ECHILD) => break,
                    Ok(status) => {
                        if status.pid() == Some(worker.pid) {
                            log_exit(worker.pid, &status);
                            worker_died = true;
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if !worker_died {
                continue;
            }
            if worker_started.elapsed() > STABLE_AFTER {
                backoff = BACKOFF_MIN;
            }
            // Keep the listener open while we wait: clients queue in the backlog.
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(BACKOFF_MAX);
            loop {
                match self.spawn_and_handoff(&mut sfd) {
                    Ok(w) => {
                        worker = w;
                        break;
                    }
                    Err(e) => {
                        log_chain(&e);
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
            self.restarts += 1;
            worker_started = Instant::now();
            tracing::info!("worker {} of {} restarted (restart #{})", worker.pid, self.setup.short, self.restarts);
            self.write_status(&worker);
        }
    }

    /// Re-reads the config as root and sends it to the worker; a config that does not parse
    /// leaves the old one in force.
    fn reload(&mut self, worker: &Worker) {
        tracing::info!("Detected change in config files. Updating config.");
        match crate::services::reload(self.setup.short, &self.setup.paths) {
            Ok(text) => {
                self.setup.config_text = text.clone();
                if let Err(e) = handoff::send_json(worker.control.as_fd(), &handoff::Control::Config { config: text }) {
                    tracing::warn!("Config update failed. Error: {e}");
                }
            }
            Err(e) => tracing::warn!("Detected config file update, but new config failed to parse. Error: {e}"),
        }
    }

    /// Spawns a worker, hands the manifest over and waits for its report.
    fn spawn_and_handoff(&self, sfd: &mut SignalFd) -> Result<Worker, BrokerError> {
        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
        let child_fd = theirs.as_raw_fd();
        let creds = self.creds.clone();
        let mut cmd = Command::new(&self.exe);
        cmd.arg0("aziotd").arg("--worker").env_clear().stdin(Stdio::null());
        for var in crate::sanitize::WORKER_ENV {
            if let Some(value) = std::env::var_os(var) {
                cmd.env(var, value);
            }
        }
        // SAFETY: the closure runs in the forked child before exec and only makes raw,
        // async-signal-safe calls (sigemptyset/sigprocmask, dup2, then the policy crate's
        // privilege drop, which allocates nothing and takes no lock); `empty` is a local
        // sigset_t initialised by sigemptyset before use.
        unsafe {
            cmd.pre_exec(move || {
                // The broker blocks the signals it reads through its signalfd; the worker
                // starts with none blocked (SIGTERM must stop it).
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::dup2(child_fd, aziot_ipc::handoff::HANDOFF_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                aziot_policy::drop_privileges_in_child(&creds)
            });
        }
        let child = cmd.spawn().map_err(BrokerError::Spawn)?;
        drop(theirs);
        let pid = Pid::from_raw(child.id() as i32);

        let (entries, fds) = self.descriptors();
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            service: self.setup.short.to_owned(),
            config: self.setup.config_text.clone(),
            descriptors: entries,
            policy: serde_json::to_value(&self.policy).unwrap_or_default(),
            log_filter: std::env::var("AZIOT_LOG").unwrap_or_default(),
            seccomp_mode: self.seccomp_mode.clone(),
            allow_degraded: self.setup.sandbox.allow_degraded,
        };
        let result = handoff::send_manifest(ours.as_fd(), &manifest, &fds)
            .map_err(BrokerError::from)
            .and_then(|()| wait_report(ours.as_fd(), REPORT_TIMEOUT));
        match result {
            Ok(report) if report.ok => Ok(Worker { pid, report, control: ours }),
            Ok(report) => {
                self.reap(pid, sfd);
                Err(BrokerError::WorkerRefused(report.error.unwrap_or_else(|| "no reason given".to_owned())))
            }
            Err(e) => {
                self.reap(pid, sfd);
                Err(e)
            }
        }
    }

    fn descriptors(&self) -> (Vec<DescriptorEntry>, Vec<BorrowedFd<'_>>) {
        let mut entries = vec![DescriptorEntry { name: "listener".into(), kind: DescriptorKind::UnixListener }];
        let mut fds = vec![self.listener.as_fd()];
        if let Some(dir) = &self.state_dir {
            entries.push(DescriptorEntry { name: "state".into(), kind: DescriptorKind::Directory });
            fds.push(dir.as_fd());
        }
        for (name, dir) in &self.extra_dirs {
            entries.push(DescriptorEntry { name: name.clone(), kind: DescriptorKind::Directory });
            fds.push(dir.as_fd());
        }
        for (name, kind, fd) in &self.setup.extra_fds {
            entries.push(DescriptorEntry { name: name.clone(), kind: *kind });
            fds.push(fd.as_fd());
        }
        (entries, fds)
    }

    /// Kills and reaps a worker that failed its start.
    fn reap(&self, pid: Pid, _sfd: &mut SignalFd) {
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        if let Ok(status) = waitpid(pid, None) {
            log_exit(pid, &status);
        }
    }

    fn stop(&self, worker: Pid) {
        let _ = nix::sys::signal::kill(worker, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match waitpid(worker, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(10)),
                _ => return,
            }
        }
        let _ = nix::sys::signal::kill(worker, Signal::SIGKILL);
        let _ = waitpid(worker, None);
    }

    fn write_status(&self, worker: &Worker) {
        let report = &worker.report;
        let degraded = self.seccomp_mode != "kill" || aziot_policy::is_degraded(&report.warnings);
        let status = aziot_policy::Status {
            service: self.setup.short.to_owned(),
            broker_pid: std::process::id() as i32,
            worker_pid: worker.pid.as_raw(),
            policy_digest: self.policy.digest(),
            seccomp_digest: report.seccomp.as_ref().map(|s| s.digest.clone()).unwrap_or_default(),
            landlock: report.landlock.clone().unwrap_or_default(),
            seccomp_mode: self.seccomp_mode.clone(),
            degraded,
            warnings: report.warnings.clone(),
            restarts: self.restarts,
            handed_dirs: self
                .setup
                .state_dir
                .iter()
                .cloned()
                .chain(self.setup.extra_dirs.iter().map(|(_, p)| p.clone()))
                .collect(),
            handed_inodes: self
                .descriptors()
                .1
                .iter()
                .filter_map(|fd| nix::sys::stat::fstat(fd.as_raw_fd()).ok())
                .map(|st| (st.st_dev, st.st_ino))
                .collect(),
        };
        for w in &report.warnings {
            tracing::warn!("sandbox degraded: {w}");
        }
        match serde_json::to_vec_pretty(&status) {
            Ok(bytes) => {
                if let Err(e) = crate::notify::write_atomic(&self.status_path, &bytes) {
                    tracing::warn!("could not write {}: {e}", self.status_path.display());
                }
            }
            Err(e) => tracing::warn!("could not render the status: {e}"),
        }
    }
}

fn wait_report(sock: BorrowedFd<'_>, timeout: Duration) -> Result<WorkerReport, BrokerError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(sock, PollFlags::POLLIN)];
    let ms = PollTimeout::try_from(timeout.as_millis().min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX);
    if poll(&mut fds, ms)? == 0 {
        return Err(BrokerError::ReportTimeout(timeout));
    }
    Ok(handoff::recv_json(sock)?)
}

/// Ensures the state directory exists, owned by the service user, mode 0700, as systemd's
/// StateDirectory= does (including its recursive chown when the directory's owner does not
/// match), and opens it.
fn open_state_dir(path: &Path, creds: &aziot_policy::Credentials) -> Result<OwnedFd, BrokerError> {
    use std::os::unix::fs::MetadataExt;
    let err = |source| BrokerError::StateDir { path: path.to_owned(), source };
    std::fs::create_dir_all(path).map_err(err)?;
    let meta = std::fs::symlink_metadata(path).map_err(err)?;
    if !meta.is_dir() {
        return Err(err(std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory")));
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    if meta.uid() != creds.uid || meta.gid() != creds.gid {
        chown_tree(path, creds)?;
    }
    let dir = std::fs::File::open(path).map_err(err)?;
    Ok(dir.into())
}

/// `chown -R` without following symlinks (a symlink itself is re-owned, never its target).
fn chown_tree(path: &Path, creds: &aziot_policy::Credentials) -> Result<(), BrokerError> {
    use nix::fcntl::AtFlags;
    let chown_err = |source| BrokerError::Chown { path: path.to_owned(), source };
    nix::unistd::fchownat(None, path, Some(creds.uid.into()), Some(creds.gid.into()), AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(chown_err)?;
    let meta = std::fs::symlink_metadata(path).map_err(|source| BrokerError::StateDir { path: path.to_owned(), source })?;
    if meta.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|source| BrokerError::StateDir { path: path.to_owned(), source })?;
        for entry in entries {
            let entry = entry.map_err(|source| BrokerError::StateDir { path: path.to_owned(), source })?;
            chown_tree(&entry.path(), creds)?;
        }
    }
    Ok(())
}

fn log_exit(pid: Pid, status: &WaitStatus) {
    match status {
        WaitStatus::Exited(_, code) => tracing::warn!("worker {pid} exited with status {code}"),
        WaitStatus::Signaled(_, Signal::SIGSYS, _) => match crate::kmsg::seccomp_syscall(pid.as_raw()) {
            Some(nr) => tracing::error!(
                "worker {pid} was killed by seccomp (SIGSYS): forbidden syscall {nr} ({})",
                aziot_policy::syscall_name(nr).unwrap_or("unknown")
            ),
            None => tracing::error!(
                "worker {pid} was killed by seccomp (SIGSYS); the syscall number is not in the kernel log \
                 (the kernel rate-limits these records: look for \"callbacks suppressed\" in dmesg)"
            ),
        },
        WaitStatus::Signaled(_, sig, _) => tracing::warn!("worker {pid} was killed by {sig}"),
        other => tracing::warn!("worker {pid}: {other:?}"),
    }
}

pub fn log_chain(e: &(dyn std::error::Error + 'static)) {
    let mut current = Some(e);
    let mut first = true;
    while let Some(err) = current {
        if first {
            tracing::error!("{err}");
        } else {
            tracing::error!("caused by: {err}");
        }
        first = false;
        current = err.source();
    }
}
