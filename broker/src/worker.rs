//! The worker entry point (`aziotd --worker`): already the service user, with no capabilities
//! and NoNewPrivs (the broker's child did that before exec). Reads the manifest, checks every
//! descriptor, pre-loads, locks itself in (rlimits, Landlock, seccomp — before any thread),
//! reports to the broker, and only then serves.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use aziot_ipc::handoff::{self, DescriptorKind, Manifest, HANDOFF_FD};
use aziot_ipc::service::{Handed, ServiceError};

use crate::supervise::WorkerReport;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the worker runs as root; refusing to serve")]
    Root,
    #[error(transparent)]
    Handoff(#[from] aziot_ipc::handoff::HandoffError),
    #[error("descriptor {name:?} is not a {kind:?}")]
    BadDescriptor { name: String, kind: DescriptorKind },
    #[error("invalid policy in the manifest")]
    Policy(#[from] serde_json::Error),
    #[error("the manifest is for service {manifest:?} but its policy is {policy:?}'s")]
    PolicyService { manifest: String, policy: String },
    #[error(transparent)]
    Sandbox(#[from] aziot_policy::PolicyError),
    #[error(transparent)]
    Service(#[from] aziot_ipc::service::ServiceError),
    #[error("unknown service {0:?}")]
    Unknown(String),
}

/// Runs the worker; returns only on failure.
pub fn main() -> Result<(), WorkerError> {
    // SAFETY: fd 3 is the hand-off socket the broker's child placed there before exec; nothing
    // else in this fresh process owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(HANDOFF_FD) };
    let _ = nix::fcntl::fcntl(sock.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC));
    // A seccomp trap is reported to the broker on this socket (open until the process exits).
    aziot_policy::report_seccomp_violations_to(sock.as_raw_fd());
    let (manifest, fds) = handoff::recv_manifest(sock.as_fd())?;
    aziot_ipc::logging::init_with(&manifest.log_filter);
    let result = serve(&sock, manifest, fds);
    if let Err(e) = &result {
        let report = WorkerReport { ok: false, error: Some(chain(e)), landlock: None, seccomp: None, warnings: vec![] };
        let _ = handoff::send_json(sock.as_fd(), &report);
    }
    result
}

/// The generic steps: refuse root, check the handed descriptors against the policy's
/// `[[descriptor]]` declarations and against what they claim to be, then hand over to the
/// service's implementation, which pre-loads and calls back [`lock_in`] (+ the report) before
/// it serves.
fn serve(sock: &OwnedFd, manifest: Manifest, fds: Vec<OwnedFd>) -> Result<(), WorkerError> {
    if nix::unistd::getuid().is_root() || nix::unistd::geteuid().is_root() {
        return Err(WorkerError::Root);
    }
    let policy: aziot_policy::Policy = serde_json::from_value(manifest.policy.clone())?;
    if policy.service != manifest.service {
        return Err(WorkerError::PolicyService { manifest: manifest.service.clone(), policy: policy.service.clone() });
    }
    // The broker checked this before spawning; checked again on receipt.
    policy.check_handoff(manifest.descriptors.iter().map(|e| (e.name.as_str(), e.kind)))?;
    let mut named = Vec::new();
    for (entry, fd) in manifest.descriptors.iter().zip(fds) {
        check_descriptor(&entry.name, entry.kind, &fd)?;
        named.push((entry.name.clone(), fd));
    }
    let mut lock_in_and_report = |dirs: &[(&str, BorrowedFd<'_>)]| -> Result<(), ServiceError> {
        let report = lock_in(&policy, &manifest, dirs).map_err(ServiceError::lock_in)?;
        handoff::send_json(sock.as_fd(), &report).map_err(ServiceError::lock_in)?;
        // TEST-ONLY escape attempt (feature escape-probe; a real manifest has none): never returns.
        aziot_policy::escape::run_if_requested(manifest.escape.as_ref(), sock.as_fd(), dirs);
        Ok(())
    };
    let Some(service) = crate::services::implementation(&manifest.service) else {
        // No worker yet (certd, identityd): the escape suite still locks it in with its policy.
        if manifest.escape.is_some() {
            openssl::init(); // what every worker pre-loads (DESIGN.md §1, worker step 2)
            lock_in_and_report(&named.iter().map(|(n, fd)| (n.as_str(), fd.as_fd())).collect::<Vec<_>>())?;
        }
        return Err(WorkerError::Unknown(manifest.service.clone()));
    };
    let control = sock.try_clone().map_err(|e| WorkerError::BadDescriptor {
        name: format!("hand-off socket ({e})"),
        kind: DescriptorKind::Socket,
    })?;
    match service.serve(&manifest.config, Handed::new(named), &mut lock_in_and_report, control) {
        Ok(never) => match never {},
        Err(e) => Err(e.into()),
    }
}

/// Checks, before spawning, that the descriptors the broker is about to hand over (name, kind)
/// are the ones the policy declares; the worker checks again on receipt.
pub fn check_handoff(policy: &aziot_policy::Policy, entries: &[handoff::DescriptorEntry]) -> Result<(), aziot_policy::PolicyError> {
    policy.check_handoff(entries.iter().map(|e| (e.name.as_str(), e.kind)))
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
