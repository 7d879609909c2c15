//! Outside reporting: sd_notify(READY=1) and the status file `/run/aziot/<svc>.status`.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

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
///
/// The temporary file has an unpredictable name and is created `O_CREAT|O_EXCL|O_NOFOLLOW`:
/// whatever already sits at that name — a symbolic link planted to make root write elsewhere
/// included — is never opened; the next name is tried instead. `rename` replaces a link at
/// `path` itself without following it.
pub fn write_atomic(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    write_atomic_via(path, contents, std::iter::repeat_with(|| temp_name(path)))
}

/// How many names are tried before giving up (each taken name is a collision or an attack).
const TEMP_ATTEMPTS: usize = 64;

/// `.<file name>.<pid>-<16 random hex digits>.tmp` beside `path`.
fn temp_name(path: &Path) -> PathBuf {
    let mut random = [0u8; 8];
    // SAFETY: getrandom writes at most `random.len()` bytes into the buffer it is given.
    let n = unsafe { libc::getrandom(random.as_mut_ptr().cast(), random.len(), 0) };
    if n != random.len() as isize {
        // Without the kernel's randomness the name is still unique to this process and moment;
        // O_EXCL|O_NOFOLLOW keeps it safe either way.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        random = nanos.to_le_bytes();
    }
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    let dir = path.parent().unwrap_or(Path::new("."));
    dir.join(format!(
        ".{}.{}-{hex}.tmp",
        path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ))
}

fn write_atomic_via(path: &Path, contents: &[u8], names: impl Iterator<Item = PathBuf>) -> std::io::Result<()> {
    for tmp in names.take(TEMP_ATTEMPTS) {
        let created = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o644)
            .open(&tmp);
        let mut f = match created {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                tracing::warn!("{} already exists (not opened): trying another temporary name", tmp.display());
                continue;
            }
            Err(e) => return Err(e),
        };
        let written = f.write_all(contents);
        drop(f);
        let result = written.and_then(|()| std::fs::rename(&tmp, path));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        return result;
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        format!("no free temporary name beside {} after {TEMP_ATTEMPTS} attempts", path.display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_planted_link_at_the_temporary_name_is_not_followed() {
        let dir = std::env::temp_dir().join(format!("aziotd-notify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        let status = dir.join("keyd.status");
        // the attacker guessed the first name: a link to the victim, and a dangling link (that
        // O_CREAT alone would follow and create)
        let planted = dir.join(".keyd.status.planted.tmp");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let dangling = dir.join(".keyd.status.dangling.tmp");
        std::os::unix::fs::symlink(dir.join("created-through-link"), &dangling).unwrap();
        let names = [planted.clone(), dangling.clone(), dir.join(".keyd.status.free.tmp")];
        write_atomic_via(&status, b"{\"ok\":1}", names.into_iter()).unwrap();
        assert_eq!(std::fs::read_to_string(&status).unwrap(), "{\"ok\":1}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        assert!(!dir.join("created-through-link").exists());
        assert!(std::fs::symlink_metadata(&planted).unwrap().file_type().is_symlink());

        // every name taken: an error, nothing written
        let e = write_atomic_via(&dir.join("other.status"), b"x", std::iter::repeat(planted.clone())).unwrap_err();
        assert!(e.to_string().contains("no free temporary name"), "{e}");
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");

        // a link at the status path itself is replaced, not followed
        std::fs::remove_file(&status).unwrap();
        std::os::unix::fs::symlink(&victim, &status).unwrap();
        write_atomic(&status, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&status).unwrap().file_type().is_file());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        // and the real names are unpredictable
        assert_ne!(temp_name(&status), temp_name(&status));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
