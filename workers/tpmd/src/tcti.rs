//! How tpmd reaches the TPM, and what the sandbox must allow for it.
//!
//! Two ways to open the TPM, both **before** the worker's sandbox locks:
//!
//! 1. **A descriptor from the broker (preferred, DESIGN §3 option (a))**:
//!    [`crate::init_tpm_fd`] runs ESYS on [`crate::fd_tcti::FdTcti`], an in-process TCTI over
//!    an already-open fd. The broker opens `/dev/tpmrm0` (or `/dev/tpm0`), or connects a
//!    stream socket to a TPM speaking the raw command stream (swtpm's command port), and hands
//!    the fd over. The worker opens no path, loads no TCTI module, and needs only
//!    `read`/`write`/`poll` on that fd: no Landlock rule, no `connect`, no device group.
//!    Why in-process rather than a loadable `libtss2-tcti-aziotfd.so`: nothing to install
//!    where tpm2-tss's loader searches, no `dlopen`, and the fd's ownership stays in Rust.
//!    Why our own ESYS layer ([`crate::esys`]) rather than tss-esapi's `Context`: tss-esapi 7.x
//!    builds a `Context` only from a loader name (`device`/`mssim`/`swtpm`/`tabrmd`), so it
//!    cannot run on a caller-made TCTI; it also lacks the HMAC sequence commands.
//! 2. **The config's `tcti` string** ([`crate::init_tpm`], upstream behaviour):
//!    `Tss2_TctiLdr_Initialize(tcti)`. The module is `dlopen`ed and the device opened or the
//!    simulator connected at init; afterwards the worker uses the open descriptor only.
//!    [`open_descriptor`] opens the fd for 1. from the same string; [`target`] tells the broker
//!    what the string points at (to decide what the sandbox must allow). `tabrmd` talks D-Bus and is not supported in the
//!    sandbox.
//!
//! Raw stream vs MS-simulator framing: `/dev/tpm*` and swtpm's command port (what the
//! `swtpm:` TCTI uses) carry raw TPM commands/responses; the `mssim:` TCTI wraps each command
//! in `TPM_SEND_COMMAND`, locality and length, which swtpm also accepts on the same port. The
//! fd TCTI speaks the raw stream, so the tests drive it over a TCP socket connected to swtpm's
//! command port — the same code path as a device fd.

use std::net::ToSocketAddrs as _;

/// What a `tcti` config string connects to: what the broker must provide or allow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TctiTarget {
    /// A TPM character device; `None` = the device TCTI's default (`/dev/tpmrm0`, then
    /// `/dev/tpm0`).
    Device { path: Option<std::path::PathBuf> },
    /// A simulator over TCP (`swtpm:`/`mssim:`): command port `port`, platform port `port + 1`.
    Network { host: String, port: u16 },
    /// The access broker daemon over D-Bus.
    Tabrmd,
    /// The empty string: tpm2-tss's loader probes its default list (tabrmd, device, mssim...).
    LoaderDefault,
}

#[derive(Debug, thiserror::Error)]
pub enum TctiError {
    #[error("unknown TCTI {0:?} (expected device, swtpm, mssim or tabrmd)")]
    Unknown(String),
    #[error("invalid TCTI configuration {0:?}")]
    Invalid(String),
    #[error("could not open the TPM {what}")]
    Open { what: String, #[source] source: std::io::Error },
    #[error("refusing the TPM device {}: {why}", path.display())]
    NotADevice { path: std::path::PathBuf, why: String },
}

/// Opens the TPM device node `path` read-write, as root, on the config's behalf: the path is
/// walked from `/` without following a symbolic link at any component
/// ([`aziot_ipc::config::trusted::open_parent_nofollow`]), the node is first opened `O_PATH`
/// (no side effect on whatever it is) and must be a character device beneath `/dev`; only then
/// is it opened `O_RDWR|O_NOFOLLOW|O_NOCTTY`, and the result checked to be the same device.
/// So `device:<a regular file>` or `device:<a link to /etc/shadow>` are refused before any
/// open for writing.
pub fn open_device(path: &std::path::Path) -> Result<std::os::fd::OwnedFd, TctiError> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use aziot_ipc::config::trusted::{self, TrustError};
    use nix::fcntl::OFlag;
    use nix::sys::stat::{Mode, SFlag};

    let refuse = |why: String| TctiError::NotADevice { path: path.to_owned(), why };
    let open_err = |source: std::io::Error| TctiError::Open { what: path.display().to_string(), source };
    let errno = |e: nix::Error| std::io::Error::from_raw_os_error(e as i32);
    let (parent, name) = trusted::open_parent_nofollow(path).map_err(|e| match e {
        TrustError::Open { source, .. } => open_err(source),
        other => refuse(other.to_string()),
    })?;
    let openat = |flags: OFlag| -> Result<OwnedFd, nix::Error> {
        let fd = nix::fcntl::openat(Some(parent.as_raw_fd()), name.as_os_str(), flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())?;
        // SAFETY: openat returned a fresh descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let probe = openat(OFlag::O_PATH).map_err(|e| open_err(errno(e)))?;
    let st = nix::sys::stat::fstat(probe.as_raw_fd()).map_err(|e| open_err(errno(e)))?;
    if st.st_mode & SFlag::S_IFMT.bits() != SFlag::S_IFCHR.bits() {
        let what = trusted::type_name(&st);
        let hint = if what == "symbolic link" {
            "; the broker does not follow links on root's behalf: name the device node itself"
        } else {
            ""
        };
        return Err(refuse(format!("it is a {what}, not a character device{hint}")));
    }
    if !path.starts_with("/dev") {
        return Err(refuse("a TPM device must be beneath /dev".to_owned()));
    }
    let fd = openat(OFlag::O_RDWR | OFlag::O_NOCTTY).map_err(|e| open_err(errno(e)))?;
    let opened = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| open_err(errno(e)))?;
    if (opened.st_dev, opened.st_ino, opened.st_rdev, opened.st_mode) != (st.st_dev, st.st_ino, st.st_rdev, st.st_mode) {
        return Err(refuse("it was replaced while being opened".to_owned()));
    }
    Ok(fd)
}

/// For the broker: opens the descriptor the worker's [`crate::init_tpm_fd`] will use, when
/// the TCTI can be replaced by the raw-stream fd TCTI: a device node (`device[:path]`; default
/// `/dev/tpmrm0`, then `/dev/tpm0`) or swtpm's command port (`swtpm:`). `None` for `mssim:`
/// (a real MS simulator needs its framing), `tabrmd` and the empty string: the worker then
/// uses [`crate::init_tpm`] before its sandbox locks.
pub fn open_descriptor(tcti: &str) -> Result<Option<std::os::fd::OwnedFd>, TctiError> {
    let open_device = |path: &std::path::Path| open_device(path).map(std::fs::File::from);
    match target(tcti)? {
        TctiTarget::Device { path: Some(path) } => Ok(Some(open_device(&path)?.into())),
        TctiTarget::Device { path: None } => match open_device("/dev/tpmrm0".as_ref()) {
            Ok(f) => Ok(Some(f.into())),
            Err(TctiError::Open { source: first, .. }) => match open_device("/dev/tpm0".as_ref()) {
                Ok(f) => Ok(Some(f.into())),
                // name both devices: the first one's failure is often the telling one
                Err(TctiError::Open { source, .. }) => {
                    Err(TctiError::Open { what: format!("/dev/tpm0 (after /dev/tpmrm0: {first})"), source })
                }
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        },
        TctiTarget::Network { host, port } if tcti.starts_with("swtpm") => {
            let stream = std::net::TcpStream::connect((host.as_str(), port))
                .map_err(|source| TctiError::Open { what: format!("simulator at {host}:{port}"), source })?;
            Ok(Some(stream.into()))
        }
        _ => Ok(None),
    }
}

/// Classifies a `tcti` config string (the same syntax tss-esapi accepts).
pub fn target(tcti: &str) -> Result<TctiTarget, TctiError> {
    let (name, conf) = match tcti.split_once(':') {
        Some((n, c)) => (n, c),
        None => (tcti, ""),
    };
    match name {
        "" if conf.is_empty() => Ok(TctiTarget::LoaderDefault),
        "device" => Ok(TctiTarget::Device { path: (!conf.is_empty()).then(|| conf.into()) }),
        "swtpm" | "mssim" => {
            let (mut host, mut port) = ("localhost".to_owned(), 2321u16);
            for kv in conf.split(',').filter(|s| !s.is_empty()) {
                match kv.split_once('=') {
                    Some(("host", h)) if !h.is_empty() => host = h.to_owned(),
                    Some(("port", p)) => port = p.parse().map_err(|_| TctiError::Invalid(tcti.to_owned()))?,
                    _ => return Err(TctiError::Invalid(tcti.to_owned())),
                }
            }
            Ok(TctiTarget::Network { host, port })
        }
        "tabrmd" => Ok(TctiTarget::Tabrmd),
        other => Err(TctiError::Unknown(other.to_owned())),
    }
}

impl TctiTarget {
    /// For a network TCTI: whether every address `host` resolves to is a loopback address
    /// (the broker may refuse a remote TPM simulator).
    pub fn is_loopback(&self) -> bool {
        match self {
            TctiTarget::Network { host, port } => (host.as_str(), *port)
                .to_socket_addrs()
                .map(|mut addrs| addrs.all(|a| a.ip().is_loopback()))
                .unwrap_or(false),
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        assert_eq!(target("").unwrap(), TctiTarget::LoaderDefault);
        assert_eq!(target("device").unwrap(), TctiTarget::Device { path: None });
        assert_eq!(target("device:/dev/tpmrm0").unwrap(), TctiTarget::Device { path: Some("/dev/tpmrm0".into()) });
        assert_eq!(target("swtpm:port=2321").unwrap(), TctiTarget::Network { host: "localhost".into(), port: 2321 });
        assert_eq!(
            target("mssim:host=127.0.0.1,port=5").unwrap(),
            TctiTarget::Network { host: "127.0.0.1".into(), port: 5 }
        );
        assert!(target("mssim:host=127.0.0.1,port=5").unwrap().is_loopback());
        assert_eq!(target("tabrmd").unwrap(), TctiTarget::Tabrmd);
        assert!(matches!(target("foo:bar"), Err(TctiError::Unknown(_))));
        assert!(matches!(open_descriptor("device:/nonexistent/tpm"), Err(TctiError::Open { .. })));
        assert!(matches!(open_descriptor("device:/dev/../etc/passwd"), Err(TctiError::NotADevice { .. })));
        assert!(matches!(open_descriptor("device:dev/null"), Err(TctiError::NotADevice { .. })));
        if !std::path::Path::new("/dev/tpmrm0").exists() && !std::path::Path::new("/dev/tpm0").exists() {
            let e = open_descriptor("device").unwrap_err();
            assert_eq!(e.to_string(), "could not open the TPM /dev/tpm0 (after /dev/tpmrm0: No such file or directory (os error 2))");
        }
        assert!(open_descriptor("mssim:port=1").unwrap().is_none());
        assert!(open_descriptor("tabrmd").unwrap().is_none());
        assert!(matches!(target("swtpm:port=x"), Err(TctiError::Invalid(_))));
    }

    #[test]
    fn only_character_devices_beneath_dev_are_opened() {
        // /dev/null is a character device beneath /dev (what a TPM device is, type-wise)
        open_device(std::path::Path::new("/dev/null")).unwrap();
        let dir = std::env::temp_dir().join(format!("aziot-tpmd-tcti-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("regular");
        std::fs::write(&file, "not a TPM").unwrap();
        let e = open_device(&file).unwrap_err().to_string();
        assert!(e.contains("it is a regular file, not a character device"), "{e}");
        let link = dir.join("null-link");
        std::os::unix::fs::symlink("/dev/null", &link).unwrap();
        let e = open_device(&link).unwrap_err().to_string();
        assert!(e.contains("it is a symbolic link, not a character device"), "{e}");
        std::os::unix::fs::symlink("/dev", dir.join("dev-link")).unwrap();
        let e = open_device(&dir.join("dev-link/null")).unwrap_err().to_string();
        assert!(e.contains("dev-link is a symbolic link"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
