//! The listening socket: adopted from systemd (`LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES`,
//! spec common-http §4.2) or bound by the service itself (§4.1).

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::sys::socket::{getsockname, getsockopt, sockopt, AddressFamily, SockaddrLike, SockaddrStorage};

use crate::endpoint::Endpoint;

const SD_LISTEN_FDS_START: RawFd = 3;

#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("LISTEN_PID {0:?} is not a number")]
    BadPid(String),
    #[error("LISTEN_FDS {0:?} is not a number")]
    BadFds(String),
    #[error("LISTEN_FDNAMES has {names} names for {fds} descriptors")]
    NameCount { names: usize, fds: usize },
    #[error("no socket named {0:?} was passed by systemd (LISTEN_FDNAMES)")]
    NameNotFound(String),
    #[error("fd {0} is not a listening unix stream socket")]
    NotUnixListener(RawFd),
    #[error("could not remove stale socket {path}")]
    RemoveStale { path: PathBuf, #[source] source: std::io::Error },
    #[error("could not bind {path}")]
    Bind { path: PathBuf, #[source] source: std::io::Error },
    #[error("could not set the mode of {path}")]
    Chmod { path: PathBuf, #[source] source: std::io::Error },
    #[error("{0}")]
    Sys(#[from] nix::Error),
}

/// Descriptors passed by systemd socket activation, with their names.
#[derive(Debug)]
pub struct ActivatedFds {
    pub fds: Vec<(RawFd, Option<String>)>,
}

/// Reads the socket-activation variables. `None` when this process was not activated.
/// Sets `FD_CLOEXEC` on every passed descriptor and removes the variables from the
/// environment, so nothing is passed on to children.
pub fn activated_fds() -> Result<Option<ActivatedFds>, ListenerError> {
    let Ok(pid) = std::env::var("LISTEN_PID") else { return Ok(None) };
    let pid: u32 = pid.trim().parse().map_err(|_| ListenerError::BadPid(pid.clone()))?;
    if pid != std::process::id() {
        return Ok(None);
    }
    let fds = match std::env::var("LISTEN_FDS") {
        Ok(n) => n.trim().parse::<usize>().map_err(|_| ListenerError::BadFds(n.clone()))?,
        Err(_) => 0,
    };
    let names = std::env::var("LISTEN_FDNAMES").ok();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    if fds == 0 {
        return Ok(None);
    }
    let names: Vec<Option<String>> = match names {
        Some(names) => {
            let names: Vec<Option<String>> = names.split(':').map(|n| Some(n.to_owned())).collect();
            if names.len() != fds {
                return Err(ListenerError::NameCount { names: names.len(), fds });
            }
            names
        }
        None => vec![None; fds],
    };
    let mut out = Vec::with_capacity(fds);
    for (i, name) in names.into_iter().enumerate() {
        let fd = SD_LISTEN_FDS_START + i as RawFd;
        nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
        out.push((fd, name));
    }
    Ok(Some(ActivatedFds { fds: out }))
}

/// Picks the listener: an activated fd (the only one, or the one named `socket_name`), else
/// the configured endpoint (`fd://` or `unix://`, bound with mode 0660).
pub fn open(endpoint: &Endpoint, socket_name: Option<&str>) -> Result<UnixListener, ListenerError> {
    if let Some(activated) = activated_fds()? {
        let chosen = if activated.fds.len() == 1 {
            Some(activated.fds[0].0)
        } else if let Some(name) = socket_name {
            Some(
                activated
                    .fds
                    .iter()
                    .find(|(_, n)| n.as_deref() == Some(name))
                    .map(|(fd, _)| *fd)
                    .ok_or_else(|| ListenerError::NameNotFound(name.to_owned()))?,
            )
        } else {
            None
        };
        if let Some(fd) = chosen {
            return adopt(fd);
        }
    }
    match endpoint {
        Endpoint::Unix(path) => bind(path),
        Endpoint::FdNumber(fd) => adopt(*fd),
        Endpoint::FdName(name) => Err(ListenerError::NameNotFound(name.clone())),
    }
}

/// Takes ownership of an inherited descriptor after checking it is a listening unix stream socket.
pub fn adopt(fd: RawFd) -> Result<UnixListener, ListenerError> {
    // SAFETY: the fd was handed to this process (socket activation or broker) and nothing else
    // in the process owns it; from here on the listener owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    check_unix_listener(&owned).map_err(|_| ListenerError::NotUnixListener(fd))?;
    let listener = UnixListener::from(owned);
    listener.set_nonblocking(true).map_err(|e| ListenerError::Sys(nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL))))?;
    Ok(listener)
}

/// Checks that `fd` is a listening `AF_UNIX` stream socket.
pub fn check_unix_listener(fd: &OwnedFd) -> Result<(), ListenerError> {
    use std::os::fd::AsRawFd;
    let raw = fd.as_raw_fd();
    let addr: SockaddrStorage = getsockname(raw).map_err(|_| ListenerError::NotUnixListener(raw))?;
    if addr.family() != Some(AddressFamily::Unix) {
        return Err(ListenerError::NotUnixListener(raw));
    }
    if !getsockopt(fd, sockopt::AcceptConn).unwrap_or(false) {
        return Err(ListenerError::NotUnixListener(raw));
    }
    Ok(())
}

/// Removes a stale socket (a directory in its place is removed too, with a warning), binds,
/// and sets mode 0660 whatever the umask.
pub fn bind(path: &Path) -> Result<UnixListener, ListenerError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {
            tracing::warn!("Could not remove socket file because it is a directory. Removing directory.");
            std::fs::remove_dir_all(path)
                .map_err(|source| ListenerError::RemoveStale { path: path.to_owned(), source })?;
        }
        Ok(_) => std::fs::remove_file(path)
            .map_err(|source| ListenerError::RemoveStale { path: path.to_owned(), source })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(ListenerError::RemoveStale { path: path.to_owned(), source }),
    }
    let listener =
        UnixListener::bind(path).map_err(|source| ListenerError::Bind { path: path.to_owned(), source })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|source| ListenerError::Chmod { path: path.to_owned(), source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ListenerError::Bind { path: path.to_owned(), source })?;
    Ok(listener)
}
