//! The broker -> worker hand-off: one `SOCK_SEQPACKET` socketpair, fd 3 in the worker.
//!
//! 1. broker -> worker: the manifest (JSON: service, validated config, descriptor names and
//!    kinds) with the descriptors attached (`SCM_RIGHTS`), in one message.
//! 2. worker -> broker: the sandbox report (JSON), once the sandbox is in force. The broker
//!    records it and never obeys it.
//!
//! Truncated messages (`MSG_TRUNC`/`MSG_CTRUNC`) are rejected on both sides.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

/// The descriptor number of the hand-off socket in the worker.
pub const HANDOFF_FD: RawFd = 3;
/// Upper bound of one message (the manifest carries the merged config).
pub const MAX_MESSAGE: usize = 1 << 20;
/// Upper bound of descriptors in one manifest.
pub const MAX_FDS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("hand-off I/O failed")]
    Io(#[from] nix::Error),
    #[error("the hand-off message was truncated")]
    Truncated,
    #[error("the peer closed the hand-off socket")]
    Closed,
    #[error("malformed hand-off message")]
    Json(#[from] serde_json::Error),
    #[error("the manifest names {names} descriptors but {fds} were attached")]
    FdCount { names: usize, fds: usize },
}

/// What a descriptor is, so the worker can check it (fstat type, SO_ACCEPTCONN): the kinds a
/// policy declares its descriptors with.
pub use aziot_policy::DescriptorKind;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorEntry {
    pub name: String,
    pub kind: DescriptorKind,
}

/// What the broker tells the worker.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// `keyd`, `certd`, `identityd`, `tpmd`.
    pub service: String,
    /// The merged, validated config, as TOML text.
    pub config: String,
    pub descriptors: Vec<DescriptorEntry>,
    /// The effective sandbox policy (built in + config grants + admin drop-ins), as the
    /// broker computed it; the worker applies it.
    pub policy: serde_json::Value,
    /// The broker's `AZIOT_LOG` filter.
    #[serde(default)]
    pub log_filter: String,
    /// The sandbox switches the broker decided from config.
    pub seccomp_mode: String,
    pub allow_degraded: bool,
    /// TEST-ONLY (the escape suite, tests/tests/escape.rs): an attempt the worker makes right
    /// after its lock-in and report, instead of serving. Honoured only by a build with
    /// aziot-policy's `escape-probe` feature (a release worker asked for one exits); the broker
    /// never sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escape: Option<aziot_policy::escape::EscapeAttempt>,
}

pub const MANIFEST_VERSION: u32 = 1;

/// Messages the broker sends a running worker over the hand-off socket.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Control {
    /// The config files changed; here is the new merged, validated config (TOML). keyd applies
    /// only its `[[principal]]` tables, as upstream does.
    Config { config: String },
}

/// Starts [`control_loop`] on its own thread (`aziot-control`), when the worker has a control
/// channel.
pub fn spawn_control(
    control: Option<OwnedFd>,
    apply: impl Fn(&str) -> Result<(), String> + Send + 'static,
) -> std::io::Result<()> {
    if let Some(control) = control {
        std::thread::Builder::new().name("aziot-control".into()).spawn(move || control_loop(&control, apply))?;
    }
    Ok(())
}

/// The worker's side of the control channel: applies every config update the broker sends
/// with `apply` (which returns the error text of a config it cannot use), logging as upstream
/// does; exits the process when the broker is gone. Runs on its own thread.
pub fn control_loop(control: &OwnedFd, apply: impl Fn(&str) -> Result<(), String>) {
    use std::os::fd::AsFd;
    loop {
        match recv_json::<Control>(control.as_fd()) {
            Ok(Control::Config { config }) => match apply(&config) {
                Ok(()) => tracing::info!("Config update finished."),
                Err(e) => tracing::warn!("Config update failed. Error: {e}"),
            },
            Err(HandoffError::Closed) => {
                tracing::error!("the broker closed the control channel; exiting");
                std::process::exit(1);
            }
            Err(e) => tracing::warn!("bad control message from the broker: {e}"),
        }
    }
}

/// Sends the manifest with its descriptors (in `manifest.descriptors` order).
pub fn send_manifest(sock: BorrowedFd<'_>, manifest: &Manifest, fds: &[BorrowedFd<'_>]) -> Result<(), HandoffError> {
    if manifest.descriptors.len() != fds.len() {
        return Err(HandoffError::FdCount { names: manifest.descriptors.len(), fds: fds.len() });
    }
    let bytes = serde_json::to_vec(manifest)?;
    if bytes.len() > MAX_MESSAGE {
        return Err(HandoffError::Truncated);
    }
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(&bytes)], cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

/// Receives the manifest and takes ownership of its descriptors (set CLOEXEC on receipt).
pub fn recv_manifest(sock: BorrowedFd<'_>) -> Result<(Manifest, Vec<OwnedFd>), HandoffError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg_space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let (len, flags, received) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg_space), MsgFlags::MSG_CMSG_CLOEXEC)?;
        let mut received = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for fd in fds {
                    // SAFETY: the kernel just installed this descriptor in our table for us;
                    // nothing else refers to it.
                    received.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        (msg.bytes, msg.flags, received)
    };
    if flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
        return Err(HandoffError::Truncated);
    }
    if len == 0 {
        return Err(HandoffError::Closed);
    }
    let manifest: Manifest = serde_json::from_slice(&buf[..len])?;
    if manifest.descriptors.len() != received.len() {
        return Err(HandoffError::FdCount { names: manifest.descriptors.len(), fds: received.len() });
    }
    Ok((manifest, received))
}

/// Sends a JSON message without descriptors (the worker's report).
pub fn send_json<T: Serialize>(sock: BorrowedFd<'_>, value: &T) -> Result<(), HandoffError> {
    let bytes = serde_json::to_vec(value)?;
    if bytes.len() > MAX_MESSAGE {
        return Err(HandoffError::Truncated);
    }
    sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(&bytes)], &[], MsgFlags::empty(), None)?;
    Ok(())
}

/// Receives one JSON message; attached descriptors are refused (closed) and reported as an error.
pub fn recv_json<T: for<'de> Deserialize<'de>>(sock: BorrowedFd<'_>) -> Result<T, HandoffError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmsg_space = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg_space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut got_fds = false;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for fd in fds {
                got_fds = true;
                // SAFETY: installed for us by the kernel; we only close it.
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) || got_fds {
        return Err(HandoffError::Truncated);
    }
    let len = msg.bytes;
    if len == 0 {
        return Err(HandoffError::Closed);
    }
    Ok(serde_json::from_slice(&buf[..len])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    use std::os::fd::AsFd;

    #[test]
    fn manifest_round_trip_with_fds() {
        let (a, b) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
        let dir = std::fs::File::open("/").unwrap();
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            service: "keyd".into(),
            config: "max_requests = 3\n".into(),
            descriptors: vec![DescriptorEntry { name: "state".into(), kind: DescriptorKind::Directory }],
            policy: serde_json::json!({}),
            log_filter: "info".into(),
            seccomp_mode: "kill".into(),
            allow_degraded: false,
            escape: None,
        };
        send_manifest(a.as_fd(), &manifest, &[dir.as_fd()]).unwrap();
        let (got, fds) = recv_manifest(b.as_fd()).unwrap();
        assert_eq!(got.service, "keyd");
        assert_eq!(fds.len(), 1);
        let st = nix::sys::stat::fstat(fds[0].as_raw_fd()).unwrap();
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFDIR);

        send_json(b.as_fd(), &serde_json::json!({"ok": true})).unwrap();
        let v: serde_json::Value = recv_json(a.as_fd()).unwrap();
        assert_eq!(v["ok"], true);

        let mismatched = send_manifest(a.as_fd(), &manifest, &[]);
        assert!(matches!(mismatched, Err(HandoffError::FdCount { .. })));
        drop(a);
        assert!(matches!(recv_json::<serde_json::Value>(b.as_fd()), Err(HandoffError::Closed)));
    }
}
