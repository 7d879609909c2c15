//! Outside reporting: sd_notify(READY=1) and the status file `/run/aziot/<svc>.status`.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Sends `state` to `$NOTIFY_SOCKET` when set (path or abstract `@name`). Errors are logged.
pub fn sd_notify(state: &str) {
    let Some(addr) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let result = (|| -> std::io::Result<()> {
        let sock = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = addr.as_bytes();
        if let Some(name) = bytes.strip_prefix(b"@") {
            use std::os::linux::net::SocketAddrExt;
            let a = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &a)?;
        } else {
            sock.send_to(state.as_bytes(), Path::new(&addr))?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!("could not notify systemd: {e}");
    }
}

/// Writes `contents` to `path` atomically (temp file in the same directory, then rename: a
/// reader sees the old or the new file, never a torn one), mode 0644 (the status holds no
/// secret; aziotctl reads it). No fsync: the status describes the running processes and lives
/// in /run (tmpfs); after a crash it is stale whatever the disk holds, and the broker
/// rewrites it at every start. (An fsync here cost 1–4 ms of CPU and journal time while the
/// new worker was answering its first request.)
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(&tmp)?;
    f.write_all(contents)?;
    drop(f);
    std::fs::rename(&tmp, path)
}
