//! Starting `aziotd --worker` exactly as the broker does, for the suites that test at the worker
//! boundary (escape attempts, the mount namespace, the engine twin in a confined worker): the
//! hand-off socket at fd 3, the private mount namespace when one was prepared, the privilege drop
//! in the child, then the manifest with its descriptors and a receive timeout on our end.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use aziot_ipc::handoff::{self, Manifest, HANDOFF_FD};

/// A worker started by [`spawn`]: the child (stdout and stderr piped) and our end of the
/// hand-off socket.
pub struct Spawned {
    pub child: Child,
    pub sock: OwnedFd,
}

/// Spawns the worker as `creds`, hands `manifest` and `fds` over, and sets a 60 s receive
/// timeout on the hand-off socket. `mountns`: enter that prepared namespace before the drop (as
/// the broker does for certd and identityd). `unlimited_core`: raise RLIMIT_CORE first, so the
/// test proves the worker's own rlimit lowers it.
pub fn spawn(
    manifest: &Manifest,
    fds: Vec<OwnedFd>,
    creds: aziot_policy::Credentials,
    mountns: Option<aziot_policy::mountns::Prepared>,
    unlimited_core: bool,
) -> Spawned {
    let (ours, theirs) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair");
    let child_fd = theirs.as_raw_fd();
    let mut cmd = Command::new(crate::keyd::aziotd_bin());
    cmd.arg0("aziotd").arg("--worker").env_clear().current_dir("/");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    // SAFETY: runs in the forked child before exec; raw syscalls only (setrlimit, dup2/fcntl, the
    // namespace entry and the policy crate's privilege drop, which allocate nothing) on what was
    // prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if unlimited_core {
                unlimited_core_limit()?;
            }
            place_fd(child_fd, HANDOFF_FD)?;
            if let Some(p) = &mountns {
                aziot_policy::mountns::enter_in_child(p)?;
            }
            aziot_policy::drop_privileges_in_child(&creds)
        });
    }
    let child = cmd.spawn().expect("spawn aziotd --worker");
    // Closes our copies of the namespace's detached socket mounts (held by the closure).
    drop(cmd);
    drop(theirs);
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    handoff::send_manifest(ours.as_fd(), manifest, &borrowed).expect("send the manifest");
    drop(fds);
    nix::sys::socket::setsockopt(
        &ours,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(60, 0),
    )
    .expect("receive timeout on the hand-off socket");
    Spawned { child, sock: ours }
}

/// Puts `fd` at `target` without CLOEXEC (async-signal-safe).
fn place_fd(fd: RawFd, target: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl/dup2 on descriptors of this process.
    let rc = unsafe {
        if fd == target {
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, target)
        }
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// RLIMIT_CORE unlimited (async-signal-safe: callable between fork and exec).
pub fn unlimited_core_limit() -> std::io::Result<()> {
    let lim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: setrlimit reads one live rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Fails (naming the fix) unless the aziotd under test has the attempt mode compiled in.
pub fn assert_attempt_mode(bin: &Path) {
    let bytes = std::fs::read(bin).unwrap_or_else(|e| panic!("read {}: {e}", bin.display()));
    assert!(
        contains(&bytes, marker().as_bytes()),
        "{} has no escape attempt mode (built without the escape-probe feature, e.g. by `cargo build -p aziotd`): \
         run `cargo build --workspace --bins --tests` (aziot-tests enables the feature)",
        bin.display()
    );
}

pub fn marker() -> &'static str {
    aziot_policy::escape::MARKER
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
