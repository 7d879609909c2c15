//! Steps 4–7 of the broker: open the resources, spawn the confined worker, hand over, wait for
//! its sandbox report, then supervise — restart with backoff while the listener stays open,
//! forward SIGTERM.
//!
//! Every wait is a poll on the signalfd (with the hand-off socket while a worker starts):
//! SIGTERM/SIGINT end the restart backoff, the wait for a report, spawn retries and a stop's
//! grace period at once. A worker that dies by SIGSYS (seccomp trap) has left the syscall on
//! its hand-off socket (`aziot_policy::sigsys`); the broker reads it after the death, as
//! untrusted data, and logs the syscall by number and name.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
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
/// How long a stopping worker may take to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("the broker must start as root: it opens the service's resources and drops privileges for its worker")]
    NotRoot,
    #[error(transparent)]
    Policy(#[from] aziot_policy::PolicyError),
    #[error(transparent)]
    Listener(#[from] aziot_ipc::listener::ListenerError),
    #[error(transparent)]
    Dir(#[from] crate::statedir::DirError),
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
    #[error("the worker died before reporting its sandbox")]
    WorkerDied,
    #[error("{0}")]
    Sys(#[from] nix::Error),
    #[error("invalid [sandbox] config: {0}")]
    Sandbox(String),
    #[error("refusing to start the worker without its private mount namespace (allow_degraded is not set)")]
    MountNs(#[from] aziot_policy::mountns::MountNsError),
    #[error("could not open the service's descriptors again for the new worker")]
    Reopen(#[source] crate::services::SetupError),
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
    /// Its private mount namespace, as set up (`None`: the policy asks for none).
    mount_namespace: Option<aziot_policy::mountns::MountNsRecord>,
}

/// The sockets the broker bound into `worker`'s own mount namespace (made by the broker, in
/// force), each with the (device, inode) at its path now, in the broker's view.
///
/// The bind is of the socket inode, not of its path: a service that starts again without a
/// socket unit (self-bound) binds a new socket at the path, which the worker cannot see. The
/// broker notices ([`replaced_socket`], each watch interval) and restarts the worker, whose new
/// namespace binds the new socket (tests/tests/fault_process.rs, keyd down). A namespace made
/// by the unit binds /run/aziot as a directory and is shared with the broker: nothing to watch.
fn bound_sockets(worker: &Worker) -> Vec<(PathBuf, (u64, u64))> {
    use std::os::unix::fs::MetadataExt;
    let Some(record) = worker.mount_namespace.as_ref() else { return Vec::new() };
    if !record.in_force || record.made_by != aziot_policy::mountns::MadeBy::Broker {
        return Vec::new();
    }
    record
        .binds
        .iter()
        .filter_map(|p| std::fs::symlink_metadata(p).ok().map(|m| (p.clone(), (m.dev(), m.ino()))))
        .collect()
}

/// The first of `sockets` whose path now holds another socket (never follows a link). The inode
/// numbers compared cannot be a reused one: the worker's bind mount pins the old socket.
fn replaced_socket(sockets: &[(PathBuf, (u64, u64))]) -> Option<&Path> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    sockets
        .iter()
        .find(|(p, id)| {
            std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) != *id)
        })
        .map(|(p, _)| p.as_path())
}

/// `timeout` for poll(2), rounded up to the next millisecond (a wait never ends early).
fn poll_timeout(timeout: Duration) -> nix::poll::PollTimeout {
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    nix::poll::PollTimeout::try_from(ms).unwrap_or(nix::poll::PollTimeout::MAX)
}

/// SIGTERM and SIGINT: stop the service, whatever the broker is waiting for.
fn is_stop(signo: i32) -> bool {
    signo == Signal::SIGTERM as i32 || signo == Signal::SIGINT as i32
}

/// Waits up to `timeout` for a signal; `None` on timeout.
fn wait_signal(sfd: &mut SignalFd, timeout: Duration) -> Result<Option<i32>, BrokerError> {
    use nix::poll::{poll, PollFd, PollFlags};
    let ms = poll_timeout(timeout);
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
    /// The service has descriptors opened from its config (the TPM): opened afresh for every
    /// restarted worker ([`Broker::reopen_extra_fds`]).
    reopen_fds: bool,
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
        let policy_d = aziot_ipc::config::policy_dir(setup.short);
        let policy = aziot_policy::effective(setup.short, &setup.grants, Some(&policy_d))?;
        let creds = aziot_policy::resolve_credentials(&policy)?;
        let state_dir = match &setup.state_dir {
            Some(path) => Some(crate::statedir::open_state_dir(path, &creds)?),
            None => None,
        };
        let mut extra_dirs = Vec::new();
        for (name, path) in &setup.extra_dirs {
            // Walked without following links; a missing directory is not an error (its key is).
            match crate::statedir::open_existing_dir(path) {
                Ok(dir) => extra_dirs.push((name.clone(), dir)),
                Err(e) if e.is_not_found() => {
                    tracing::warn!("could not open {} ({name}): it does not exist; not handed to the worker", path.display())
                }
                Err(e) => return Err(e.into()),
            }
        }
        // The listener last: a refused path must not have touched the socket path.
        let activated = !crate::sanitize::activated_range().is_empty();
        let listener: OwnedFd = aziot_ipc::listener::open(&setup.endpoint, Some(setup.socket_name))?.into();
        if let (false, aziot_ipc::endpoint::Endpoint::Unix(path)) = (activated, &setup.endpoint) {
            // A socket we bound ourselves gets the socket unit's owner and mode (0660, set at bind).
            nix::unistd::chown(path, Some(creds.uid.into()), Some(creds.gid.into()))
                .map_err(|source| BrokerError::Chown { path: path.clone(), source })?;
        }
        let status_path = match &setup.endpoint {
            aziot_ipc::endpoint::Endpoint::Unix(p) => {
                p.parent().unwrap_or(Path::new(aziot_ipc::SOCKET_DIR)).join(format!("{}.status", setup.short))
            }
            _ => PathBuf::from(format!("{}/{}.status", aziot_ipc::SOCKET_DIR, setup.short)),
        };
        let exe = std::env::current_exe().map_err(BrokerError::Spawn)?;
        let reopen_fds = !setup.extra_fds.is_empty();
        let broker = Broker {
            setup,
            policy,
            creds,
            listener,
            state_dir,
            extra_dirs,
            status_path,
            seccomp_mode,
            restarts: 0,
            reopen_fds,
            exe,
        };
        // Only what the policy's [[descriptor]] entries declare is handed over (the worker checks again).
        crate::worker::check_handoff(&broker.policy, &broker.descriptors().0)?;
        Ok(broker)
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
        let mut reload_pending = false;
        let mut worker = match self.spawn_and_handoff(&mut sfd, &mut reload_pending)? {
            Started::Worker(w) => w,
            Started::Stopped(signo) => {
                tracing::info!("received signal {signo} while the first worker was starting; stopped it, exiting");
                return Ok(());
            }
        };
        tracing::info!("worker {} of {} ready (sandbox report received in {:?})", worker.pid, self.setup.short, started.elapsed());
        self.write_status(&worker);
        crate::notify::sd_notify(&format!("READY=1\nSTATUS=worker {} serving\nMAINPID={}", worker.pid, std::process::id()));

        let mut backoff = BACKOFF_MIN;
        let mut worker_started = Instant::now();
        let mut watcher = crate::watch::ConfigWatcher::new(&self.setup.paths);
        let mut sockets = bound_sockets(&worker);
        loop {
            if std::mem::take(&mut reload_pending) {
                self.reload(Some(&worker));
            }
            let signo = match wait_signal(&mut sfd, WATCH_INTERVAL)? {
                Some(signo) => signo,
                None => {
                    if watcher.changed() {
                        self.reload(Some(&worker));
                    }
                    if let Some(path) = replaced_socket(&sockets) {
                        tracing::warn!(
                            "{} was replaced (its service started again); the worker's mount namespace holds the old \
                             socket: restarting worker {} so that it reaches the new one",
                            path.display(),
                            worker.pid
                        );
                        sockets.clear();
                        let _ = nix::sys::signal::kill(worker.pid, Signal::SIGTERM);
                    }
                    continue;
                }
            };
            if is_stop(signo) {
                tracing::info!("received signal {signo}, stopping the worker");
                self.stop(worker.pid, &mut sfd)?;
                let _ = std::fs::remove_file(&self.status_path);
                return Ok(());
            }
            if signo == Signal::SIGHUP as i32 {
                self.reload(Some(&worker));
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
                            // What its SIGSYS handler reported, if it died of a seccomp trap.
                            let violation = matches!(status, WaitStatus::Signaled(_, Signal::SIGSYS, _))
                                .then(|| pending_violation(worker.control.as_fd()))
                                .flatten();
                            log_exit(worker.pid, &status, violation);
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
            worker = match self.restart(&mut sfd, &mut backoff, &mut reload_pending)? {
                Some(w) => w,
                None => {
                    let _ = std::fs::remove_file(&self.status_path);
                    return Ok(());
                }
            };
            self.restarts += 1;
            sockets = bound_sockets(&worker);
            worker_started = Instant::now();
            tracing::info!("worker {} of {} restarted (restart #{})", worker.pid, self.setup.short, self.restarts);
            self.write_status(&worker);
        }
    }

    /// Re-reads the config as root and sends it to the worker (if one is running; the next
    /// one starts with it anyway); a config that does not parse leaves the old one in force.
    fn reload(&mut self, worker: Option<&Worker>) {
        tracing::info!("Detected change in config files. Updating config.");
        match crate::services::reload(self.setup.short, &self.setup.paths) {
            Ok(text) => {
                self.setup.config_text = text.clone();
                let Some(worker) = worker else { return };
                if let Err(e) = handoff::send_json(worker.control.as_fd(), &handoff::Control::Config { config: text }) {
                    tracing::warn!("Config update failed. Error: {e}");
                }
            }
            Err(e) => tracing::warn!("Detected config file update, but new config failed to parse. Error: {e}"),
        }
    }

    /// Waits out `backoff`, then spawns workers until one reports, doubling the backoff after
    /// every wait; `None` when SIGTERM/SIGINT arrived meanwhile (the worker being started, if
    /// any, is killed). Every wait listens to the signalfd.
    fn restart(
        &mut self,
        sfd: &mut SignalFd,
        backoff: &mut Duration,
        reload_pending: &mut bool,
    ) -> Result<Option<Worker>, BrokerError> {
        loop {
            tracing::info!("restarting the worker of {} in {backoff:?}", self.setup.short);
            if let Some(signo) = self.pause(sfd, *backoff)? {
                tracing::info!("received signal {signo} while waiting to restart the worker; exiting");
                return Ok(None);
            }
            *backoff = (*backoff * 2).min(BACKOFF_MAX);
            if std::mem::take(reload_pending) {
                self.reload(None);
            }
            if let Err(e) = self.reopen_extra_fds() {
                log_chain(&e);
                continue;
            }
            match self.spawn_and_handoff(sfd, reload_pending) {
                Ok(Started::Worker(w)) => return Ok(Some(w)),
                Ok(Started::Stopped(signo)) => {
                    tracing::info!("received signal {signo} while a worker was starting; stopped it, exiting");
                    return Ok(None);
                }
                Err(e) => log_chain(&e),
            }
        }
    }

    /// Opens the descriptors the service's setup opened from its config (the TPM) afresh, the
    /// old ones closed first. A worker that died in the middle of a TPM command left that
    /// stream mid-exchange — a half-written command, or a response nobody read — which the next
    /// worker would take for its own (it could never start again: tests/tests/fault_process.rs
    /// `tpmd_worker_kill9_under_load_is_served_again_without_refusals`); and a resource manager
    /// (`/dev/tpmrm0`) flushes a connection's transient objects only when it is closed. Closing
    /// first, since a TPM device without one (`/dev/tpm0`) admits a single open.
    fn reopen_extra_fds(&mut self) -> Result<(), BrokerError> {
        if !self.reopen_fds {
            return Ok(());
        }
        self.setup.extra_fds.clear();
        let service = crate::services::implementation(self.setup.short)
            .ok_or_else(|| BrokerError::Reopen(crate::services::SetupError::NotBuilt(self.setup.short.to_owned())))?;
        let fresh = service.setup(&self.setup.paths).map_err(|e| BrokerError::Reopen(e.into()))?;
        self.setup.extra_fds = fresh.extra_fds;
        Ok(())
    }

    /// Waits `duration` on the signalfd: `Some(signal)` as soon as SIGTERM/SIGINT arrives.
    /// SIGHUP re-reads the config; SIGCHLD reaps (no worker is running during a pause).
    fn pause(&mut self, sfd: &mut SignalFd, duration: Duration) -> Result<Option<i32>, BrokerError> {
        let deadline = Instant::now() + duration;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match wait_signal(sfd, left)? {
                Some(signo) if is_stop(signo) => return Ok(Some(signo)),
                Some(signo) if signo == Signal::SIGHUP as i32 => self.reload(None),
                Some(_) => reap_any(),
                None => {}
            }
        }
    }

    /// Spawns a worker, hands the manifest over and waits for its report, or for SIGTERM/SIGINT
    /// (then the worker is killed and reaped: [`Started::Stopped`]). A SIGHUP meanwhile sets
    /// `reload_pending`.
    fn spawn_and_handoff(&self, sfd: &mut SignalFd, reload_pending: &mut bool) -> Result<Started, BrokerError> {
        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)?;
        let child_fd = theirs.as_raw_fd();
        let creds = self.creds.clone();
        // Before fork: the worker's private mount namespace (crate::mountns), if the policy asks.
        // Already in force (made by systemd for the unit) is verified, not rebuilt.
        let worker = aziot_policy::mountns::Reach { uid: creds.uid, groups: creds.groups.clone() };
        let own = match &self.setup.endpoint {
            aziot_ipc::endpoint::Endpoint::Unix(p) => Some(p.as_path()),
            _ => None,
        };
        let broker_sockets = crate::mountns::broker_sockets(own);
        let mountns = crate::mountns::prepare(&self.policy, &worker, &broker_sockets, self.setup.sandbox.allow_degraded)?;
        let (prepared, mount_namespace) = (mountns.prepared, mountns.record);
        let mut cmd = Command::new(&self.exe);
        cmd.arg0("aziotd").arg("--worker").env_clear().stdin(Stdio::null());
        for var in crate::sanitize::worker_env(self.setup.short) {
            if let Some(value) = std::env::var_os(var) {
                cmd.env(var, value);
            }
        }
        // SAFETY: the closure runs in the forked child before exec and only makes raw,
        // async-signal-safe calls (sigemptyset/sigprocmask, dup2, then the policy crate's
        // mount namespace entry and privilege drop, which allocate nothing and take no lock, on
        // what was prepared before fork); `empty` is a local sigset_t initialised by
        // sigemptyset before use.
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
                if let Some(p) = &prepared {
                    aziot_policy::mountns::enter_in_child(p)?;
                }
                aziot_policy::drop_privileges_in_child(&creds)
            });
        }
        let child = cmd.spawn().map_err(BrokerError::Spawn)?;
        // Closes the broker's copies of the detached socket mounts.
        drop(cmd);
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
            escape: None,
        };
        let result = handoff::send_manifest(ours.as_fd(), &manifest, &fds)
            .map_err(BrokerError::from)
            .and_then(|()| wait_report(ours.as_fd(), sfd, REPORT_TIMEOUT, reload_pending));
        match result {
            Ok(Awaited::Report(report)) if report.ok => {
                Ok(Started::Worker(Worker { pid, report, control: ours, mount_namespace }))
            }
            Ok(Awaited::Report(report)) => {
                self.reap(pid, None);
                Err(BrokerError::WorkerRefused(report.error.unwrap_or_else(|| "no reason given".to_owned())))
            }
            Ok(Awaited::Stop(signo)) => {
                self.reap(pid, None);
                Ok(Started::Stopped(signo))
            }
            Ok(Awaited::Died(violation)) => {
                self.reap(pid, violation);
                Err(BrokerError::WorkerDied)
            }
            Err(e) => {
                self.reap(pid, pending_violation(ours.as_fd()));
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

    /// Kills and reaps a worker that failed its start (SIGKILL: the wait for its death is the
    /// kernel's, not a grace period), and logs how it ended.
    fn reap(&self, pid: Pid, violation: Option<aziot_policy::SeccompViolation>) {
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        loop {
            match waitpid(pid, None) {
                Ok(status) => return log_exit(pid, &status, violation),
                Err(nix::Error::EINTR) => continue,
                Err(_) => return,
            }
        }
    }

    /// SIGTERM to the worker, then up to [`STOP_GRACE`] for it to exit, woken by SIGCHLD on the
    /// signalfd (no polling sleep); SIGKILL after the grace period, or at once when SIGTERM or
    /// SIGINT arrives again (an impatient operator).
    fn stop(&self, worker: Pid, sfd: &mut SignalFd) -> Result<(), BrokerError> {
        let _ = nix::sys::signal::kill(worker, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            match waitpid(worker, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {}
                Err(nix::Error::EINTR) => continue,
                _ => return Ok(()),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                tracing::warn!("worker {worker} did not stop within {STOP_GRACE:?}; killing it");
                break;
            }
            if let Some(signo) = wait_signal(sfd, left)? {
                if is_stop(signo) {
                    tracing::warn!("received signal {signo} again; killing worker {worker}");
                    break;
                }
            }
        }
        let _ = nix::sys::signal::kill(worker, Signal::SIGKILL);
        while let Err(nix::Error::EINTR) = waitpid(worker, None) {}
        Ok(())
    }

    fn write_status(&self, worker: &Worker) {
        let report = &worker.report;
        let mut warnings = report.warnings.clone();
        warnings.extend(worker.mount_namespace.as_ref().and_then(crate::mountns::degraded_warning));
        let degraded = self.seccomp_mode != "kill" || aziot_policy::is_degraded(&warnings);
        let status = aziot_policy::Status {
            service: self.setup.short.to_owned(),
            broker_pid: std::process::id() as i32,
            worker_pid: worker.pid.as_raw(),
            policy_digest: self.policy.digest(),
            seccomp_digest: report.seccomp.as_ref().map(|s| s.digest.clone()).unwrap_or_default(),
            seccomp_program: self.policy.seccomp.program_name().to_owned(),
            landlock: report.landlock.clone().unwrap_or_default(),
            seccomp_mode: self.seccomp_mode.clone(),
            degraded,
            warnings: warnings.clone(),
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
            mount_namespace: worker.mount_namespace.clone(),
        };
        for w in &warnings {
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

/// How a spawn ended: a worker that reported its sandbox, or SIGTERM/SIGINT during its start
/// (the worker was killed and reaped).
enum Started {
    Worker(Worker),
    Stopped(i32),
}

/// What ended the wait for a worker's report.
enum Awaited {
    Report(WorkerReport),
    /// SIGTERM or SIGINT.
    Stop(i32),
    /// The worker closed the hand-off socket (it died) without reporting; what its SIGSYS
    /// handler sent, if anything.
    Died(Option<aziot_policy::SeccompViolation>),
}

/// Waits for the worker's report on the hand-off socket and for signals on the signalfd, both
/// in one poll: a stop signal ends the wait at once, SIGHUP sets `reload_pending`, SIGCHLD is
/// left to the socket (a dead worker's end closes).
fn wait_report(
    sock: BorrowedFd<'_>,
    sfd: &mut SignalFd,
    timeout: Duration,
    reload_pending: &mut bool,
) -> Result<Awaited, BrokerError> {
    use nix::poll::{poll, PollFd, PollFlags};
    let deadline = Instant::now() + timeout;
    let mut violation = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(BrokerError::ReportTimeout(timeout));
        }
        let (sig_ready, sock_ready) = {
            let mut fds = [PollFd::new(sfd.as_fd(), PollFlags::POLLIN), PollFd::new(sock, PollFlags::POLLIN)];
            match poll(&mut fds, poll_timeout(left)) {
                Ok(_) => {}
                Err(nix::Error::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
            (ready(&fds[0]), ready(&fds[1]))
        };
        if sig_ready {
            if let Some(info) = sfd.read_signal()? {
                let signo = info.ssi_signo as i32;
                if is_stop(signo) {
                    return Ok(Awaited::Stop(signo));
                }
                if signo == Signal::SIGHUP as i32 {
                    *reload_pending = true;
                }
            }
        }
        if sock_ready {
            match recv_message(sock, false)? {
                None => return Ok(Awaited::Died(violation)),
                Some(bytes) => match aziot_policy::parse_violation(&bytes) {
                    // The worker trapped before reporting; it is dying: wait for the close.
                    Some(v) => violation = violation.or(Some(v)),
                    None => return Ok(Awaited::Report(serde_json::from_slice(&bytes).map_err(handoff::HandoffError::from)?)),
                },
            }
        }
    }
}

/// One message from the worker's end of the hand-off socket (`None`: closed, or nothing
/// pending with `nonblocking`). Attached descriptors are closed, truncation is an error.
fn recv_message(sock: BorrowedFd<'_>, nonblocking: bool) -> Result<Option<Vec<u8>>, BrokerError> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    use std::os::fd::{FromRawFd, RawFd};
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmsg_space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut flags = MsgFlags::MSG_CMSG_CLOEXEC;
    if nonblocking {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    let msg = match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg_space), flags) {
        Ok(msg) => msg,
        Err(nix::Error::EAGAIN) if nonblocking => return Ok(None),
        Err(e) => return Err(handoff::HandoffError::from(e).into()),
    };
    for c in msg.cmsgs().map_err(handoff::HandoffError::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                // SAFETY: installed in our table by the kernel for this message; only closed.
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
        return Err(handoff::HandoffError::Truncated.into());
    }
    let len = msg.bytes;
    if len == 0 {
        return Ok(None);
    }
    Ok(Some(buf[..len].to_vec()))
}

/// The violation record a dead worker's SIGSYS handler left on the hand-off socket: reads
/// (without blocking) what is pending and keeps the first message that parses as one. The
/// worker's messages are untrusted data: only the integer syscall number is used.
fn pending_violation(sock: BorrowedFd<'_>) -> Option<aziot_policy::SeccompViolation> {
    // Bounded: a dead worker cannot add messages, and the socket buffer holds few.
    for _ in 0..64 {
        match recv_message(sock, true) {
            Ok(Some(bytes)) => {
                if let Some(v) = aziot_policy::parse_violation(&bytes) {
                    return Some(v);
                }
            }
            Ok(None) | Err(_) => return None,
        }
    }
    None
}

/// Reaps every exited child without blocking (SIGCHLD while no worker is running).
fn reap_any() {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(status) => tracing::debug!("reaped {status:?}"),
        }
    }
}

/// Logs how a worker ended; a death by SIGSYS names the syscall its handler reported.
fn log_exit(pid: Pid, status: &WaitStatus, violation: Option<aziot_policy::SeccompViolation>) {
    match status {
        WaitStatus::Exited(_, code) => tracing::warn!("worker {pid} exited with status {code}"),
        WaitStatus::Signaled(_, Signal::SIGSYS, _) => match violation {
            Some(v) => {
                let nr = i64::from(v.syscall);
                // A record for another architecture (x32, compat) would name the wrong call.
                let name = if v.arch == aziot_policy::AUDIT_ARCH { aziot_policy::syscall_name(nr) } else { None };
                tracing::error!(
                    "worker {pid} was killed by seccomp (SIGSYS): forbidden syscall {nr} ({})",
                    name.unwrap_or("unknown")
                )
            }
            None => tracing::error!(
                "worker {pid} was killed by SIGSYS without reporting a syscall (a seccomp trap before its \
                 handler was installed, or a SIGSYS sent to it)"
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket bound again at the same path is another inode: seen as replaced; the same one,
    /// a missing path, or a non-socket at the path are not.
    #[test]
    fn a_socket_bound_again_at_its_path_is_seen_as_replaced() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("aziot-replaced-socket-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dep.sock");
        let _ = std::fs::remove_file(&path);
        let first = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let m = std::fs::symlink_metadata(&path).unwrap();
        let sockets = vec![(path.clone(), (m.dev(), m.ino()))];
        assert_eq!(replaced_socket(&sockets), None, "the same socket");
        // The worker's bind mount pins the old inode (its number cannot be reused): a link here.
        std::fs::hard_link(&path, dir.join("pinned")).unwrap();
        drop(first);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(replaced_socket(&sockets), None, "nothing at the path (the service is down)");
        std::fs::write(&path, b"").unwrap();
        assert_eq!(replaced_socket(&sockets), None, "a regular file is not a socket");
        std::fs::remove_file(&path).unwrap();
        let _second = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert_eq!(replaced_socket(&sockets), Some(path.as_path()), "bound again: another inode");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
