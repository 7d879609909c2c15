//! The worker entry point (`aziotd --worker`): already the service user, with no capabilities
//! and NoNewPrivs (the broker's child did that before exec). Reads the manifest, checks every
//! descriptor, pre-loads, locks itself in (rlimits, Landlock, seccomp — before any thread),
//! reports to the broker, and only then serves.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use aziot_ipc::handoff::{self, DescriptorKind, Manifest, HANDOFF_FD};

use crate::supervise::WorkerReport;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the worker runs as root; refusing to serve")]
    Root,
    #[error(transparent)]
    Handoff(#[from] aziot_ipc::handoff::HandoffError),
    #[error("descriptor {name:?} is not a {kind:?}")]
    BadDescriptor { name: String, kind: DescriptorKind },
    #[error("the manifest has no descriptor {0:?}")]
    Missing(&'static str),
    #[error("invalid config in the manifest")]
    Config(#[from] toml::de::Error),
    #[error("invalid policy in the manifest")]
    Policy(#[from] serde_json::Error),
    #[error(transparent)]
    Sandbox(#[from] aziot_policy::PolicyError),
    #[error(transparent)]
    Keyd(#[from] aziot_keyd::KeydError),
    #[error(transparent)]
    Tpmd(#[from] aziot_tpmd::TpmdError),
    #[error("unknown service {0:?}")]
    Service(String),
}

/// Runs the worker; returns only on failure.
pub fn main() -> Result<(), WorkerError> {
    // SAFETY: fd 3 is the hand-off socket the broker's child placed there before exec; nothing
    // else in this fresh process owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(HANDOFF_FD) };
    let _ = nix::fcntl::fcntl(sock.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    let (manifest, fds) = handoff::recv_manifest(sock.as_fd())?;
    aziot_ipc::logging::init_with(&manifest.log_filter);
    let result = serve(&sock, manifest, fds);
    if let Err(e) = &result {
        let report = WorkerReport { ok: false, error: Some(chain(e)), landlock: None, seccomp: None, warnings: vec![] };
        let _ = handoff::send_json(sock.as_fd(), &report);
    }
    result
}

fn serve(sock: &OwnedFd, manifest: Manifest, fds: Vec<OwnedFd>) -> Result<(), WorkerError> {
    if nix::unistd::getuid().is_root() || nix::unistd::geteuid().is_root() {
        return Err(WorkerError::Root);
    }
    let mut named = Vec::new();
    for (entry, fd) in manifest.descriptors.iter().zip(fds) {
        check_descriptor(&entry.name, entry.kind, &fd)?;
        named.push((entry.name.clone(), fd));
    }
    let policy: aziot_policy::Policy = serde_json::from_value(manifest.policy.clone())?;
    match manifest.service.as_str() {
        "keyd" => {
            openssl::init();
            let config: aziot_keyd::config::Config = toml::from_str(&manifest.config)?;
            let listener = take_named(&mut named, "listener").ok_or(WorkerError::Missing("listener"))?;
            let home = take_named(&mut named, "state");
            let mut preloaded = Vec::new();
            for (id, path) in aziot_keyd::preloaded_files(&config) {
                let (Some(fd), Some(file_name)) = (take_named(&mut named, &format!("preloaded-key:{id}")), path.file_name())
                else {
                    continue;
                };
                preloaded.push((id, fd, file_name.to_string_lossy().into_owned()));
            }
            // Landlock rules are made on the same directories.
            let mut rule_dirs = Vec::new();
            for (name, fd) in home.iter().map(|fd| ("state", fd)).chain(preloaded.iter().map(|(_, fd, _)| ("preloaded-keys", fd))) {
                let dup = fd.try_clone().map_err(|e| WorkerError::BadDescriptor {
                    name: format!("{name} ({e})"),
                    kind: DescriptorKind::Directory,
                })?;
                rule_dirs.push((name, dup));
            }
            // Pre-load: the key library (a replacement .so is dlopen'ed here, before seccomp
            // forbids PROT_EXEC).
            let backend = aziot_keyd::backend(&config, aziot_keyd::HandedDirs { home, preloaded })?;
            let dirs: Vec<(&str, std::os::fd::BorrowedFd<'_>)> = rule_dirs.iter().map(|(n, fd)| (*n, fd.as_fd())).collect();
            let report = lock_in(&policy, &manifest, &dirs)?;
            // the duplicates served only to make the Landlock rules
            drop(dirs);
            drop(rule_dirs);
            handoff::send_json(sock.as_fd(), &report)?;
            let listener = std::os::unix::net::UnixListener::from(listener);
            let control = sock.try_clone().map_err(|e| WorkerError::BadDescriptor { name: format!("hand-off socket ({e})"), kind: DescriptorKind::Socket })?;
            Err(aziot_keyd::serve(listener, &config, backend, Some(control)).into())
        }
        "tpmd" => {
            let config: aziot_tpmd::Config = toml::from_str(&manifest.config)?;
            let listener = take_named(&mut named, "listener").ok_or(WorkerError::Missing("listener"))?;
            let tpm_fd = take_named(&mut named, "tpm").ok_or(WorkerError::Missing("tpm"))?;
            // Pre-load: start the TPM (EK, SRK) on the handed-over descriptor.
            let tpm = aziot_tpmd::init_tpm_fd(&config, tpm_fd)?;
            let report = lock_in(&policy, &manifest, &[])?;
            handoff::send_json(sock.as_fd(), &report)?;
            let listener = std::os::unix::net::UnixListener::from(listener);
            let control = sock.try_clone().map_err(|e| WorkerError::BadDescriptor {
                name: format!("hand-off socket ({e})"),
                kind: DescriptorKind::Socket,
            })?;
            Err(aziot_tpmd::serve(listener, &config, tpm, Some(control)).into())
        }
        other => Err(WorkerError::Service(other.to_owned())),
    }
}

fn take_named(named: &mut Vec<(String, OwnedFd)>, name: &str) -> Option<OwnedFd> {
    named.iter().position(|(n, _)| n == name).map(|i| named.remove(i).1)
}

/// rlimits, Landlock, seccomp, in that order; fails closed unless degraded mode is allowed.
fn lock_in(
    policy: &aziot_policy::Policy,
    manifest: &Manifest,
    dirs: &[(&str, std::os::fd::BorrowedFd<'_>)],
) -> Result<WorkerReport, WorkerError> {
    aziot_policy::apply_rlimits(policy)?;
    let landlock = aziot_policy::apply_landlock(policy, dirs)?;
    let mode = match manifest.seccomp_mode.as_str() {
        "log" => aziot_policy::SeccompMode::Log,
        "off" => aziot_policy::SeccompMode::Skip,
        _ => aziot_policy::SeccompMode::Kill,
    };
    let seccomp = aziot_policy::apply_seccomp(policy, mode)?;
    let warnings = aziot_policy::check_required(policy, &landlock, &seccomp, manifest.allow_degraded)?;
    Ok(WorkerReport { ok: true, error: None, landlock: Some(landlock), seccomp: Some(seccomp), warnings })
}

fn check_descriptor(name: &str, kind: DescriptorKind, fd: &OwnedFd) -> Result<(), WorkerError> {
    let bad = || WorkerError::BadDescriptor { name: name.to_owned(), kind };
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|_| bad())?;
    let ok = match kind {
        DescriptorKind::UnixListener => aziot_ipc::listener::check_unix_listener(fd).is_ok(),
        DescriptorKind::Directory => st.st_mode & libc::S_IFMT == libc::S_IFDIR,
        DescriptorKind::File => st.st_mode & libc::S_IFMT == libc::S_IFREG,
        DescriptorKind::Device => st.st_mode & libc::S_IFMT == libc::S_IFCHR,
        DescriptorKind::Socket => st.st_mode & libc::S_IFMT == libc::S_IFSOCK,
    };
    if ok {
        Ok(())
    } else {
        Err(bad())
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(c) = cur {
        parts.push(c.to_string());
        cur = c.source();
    }
    parts.join(": ")
}
