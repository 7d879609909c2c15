//! The directories the broker opens as root on the config's behalf — the state directory
//! (`homedir_path`) and the preloaded key directories — on directory descriptors only.
//!
//! Each path is walked from `/` one component at a time with
//! `openat(O_DIRECTORY|O_NOFOLLOW)` ([`aziot_policy::trusted::open_dir_nofollow`]), so a
//! symbolic link anywhere in it — planted by whoever can write to one of its directories — is
//! refused instead of redirecting root. The state directory's mode and owner are set with
//! `fchmod`/`fchown` on the opened descriptor; the recursive chown uses
//! `fchownat(dir, name, AT_SYMLINK_NOFOLLOW)` and descends with `openat(O_NOFOLLOW|O_DIRECTORY)`,
//! so it never leaves the tree it was given.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use aziot_policy::trusted::{self, Create, TrustError};
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::{Gid, Uid};

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("could not open the {what} {}", path.display())]
    Walk { what: &'static str, path: PathBuf, #[source] source: TrustError },
    #[error("could not {op} {}", path.display())]
    Sys { op: &'static str, path: PathBuf, #[source] source: nix::Error },
}

impl DirError {
    /// Whether the directory (or one of its parents) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, DirError::Walk { source, .. } if source.is_not_found())
    }
}

/// Ensures the state directory `path` exists (missing parents `0755`, itself `0700`, before the
/// umask, as `create_dir_all` and systemd's `StateDirectory=` would), sets its mode to 0700,
/// gives it — and, when its owner does not match, everything beneath it — to the service user,
/// and opens it.
pub fn open_state_dir(path: &Path, creds: &aziot_policy::Credentials) -> Result<OwnedFd, DirError> {
    let create = Create { intermediate_mode: 0o755, final_mode: 0o700 };
    let dir = trusted::open_dir_nofollow(path, Some(create))
        .map_err(|source| DirError::Walk { what: "state directory", path: path.to_owned(), source })?;
    let sys = |op| move |source| DirError::Sys { op, path: path.to_owned(), source };
    nix::sys::stat::fchmod(dir.as_raw_fd(), Mode::from_bits_truncate(0o700)).map_err(sys("set the mode of"))?;
    let st = nix::sys::stat::fstat(dir.as_raw_fd()).map_err(sys("stat"))?;
    if st.st_uid != creds.uid || st.st_gid != creds.gid {
        chown_tree(dir.as_fd(), path, creds)?;
    }
    Ok(dir)
}

/// Opens an existing directory to hand over (a preloaded key directory), walking its path
/// without following links; nothing is created or changed.
pub fn open_existing_dir(path: &Path) -> Result<OwnedFd, DirError> {
    trusted::open_dir_nofollow(path, None)
        .map_err(|source| DirError::Walk { what: "directory", path: path.to_owned(), source })
}

fn is_type(st: &FileStat, t: SFlag) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == t.bits()
}

/// `chown -R` of the open directory `dir` (at `path`, for messages) to the service user: the
/// directory itself with `fchown`, each entry with `fchownat(AT_SYMLINK_NOFOLLOW)` (a symbolic
/// link is re-owned itself, never its target), subdirectories entered with
/// `openat(O_NOFOLLOW|O_DIRECTORY)` relative to their parent's descriptor. A file with more than
/// one hard link is left alone (with a warning): it is also reachable from outside the tree.
fn chown_tree(dir: BorrowedFd<'_>, path: &Path, creds: &aziot_policy::Credentials) -> Result<(), DirError> {
    let (uid, gid) = (Some(Uid::from_raw(creds.uid)), Some(Gid::from_raw(creds.gid)));
    let sys = |op, path: &Path| {
        let path = path.to_owned();
        move |source| DirError::Sys { op, path, source }
    };
    nix::unistd::fchown(dir.as_raw_fd(), uid, gid).map_err(sys("set the owner of", path))?;
    let mut listing = nix::dir::Dir::openat(
        Some(dir.as_raw_fd()),
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(sys("list", path))?;
    let mut names = Vec::new();
    for entry in listing.iter() {
        let entry = entry.map_err(sys("list", path))?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_owned());
        }
    }
    drop(listing);
    for name in names {
        let child = path.join(&name);
        let st = match nix::sys::stat::fstatat(Some(dir.as_raw_fd()), name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(nix::Error::ENOENT) => continue,
            Err(e) => return Err(sys("stat", &child)(e)),
        };
        if is_type(&st, SFlag::S_IFDIR) {
            let fd = nix::fcntl::openat(
                Some(dir.as_raw_fd()),
                name.as_os_str(),
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(sys("open", &child))?;
            // SAFETY: openat returned a fresh descriptor that nothing else owns.
            let sub = unsafe { OwnedFd::from_raw_fd(fd) };
            chown_tree(sub.as_fd(), &child, creds)?;
        } else if !is_type(&st, SFlag::S_IFLNK) && st.st_nlink > 1 {
            tracing::warn!(
                "{} has {} hard links: not given to the service user (it is also reachable from outside {})",
                child.display(),
                st.st_nlink,
                path.display()
            );
        } else {
            nix::unistd::fchownat(Some(dir.as_raw_fd()), name.as_os_str(), uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(sys("set the owner of", &child))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn creds() -> aziot_policy::Credentials {
        let user = nix::unistd::User::from_name("aziotks")
            .unwrap()
            .expect("user aziotks (systemd-sysusers packaging/sysusers.d/aziot.conf)");
        aziot_policy::Credentials {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            groups: vec![user.gid.as_raw()],
            last_cap: 40,
        }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("aziotd-statedir-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn state_dir_is_created_chowned_recursively_and_links_stay_untouched() {
        assert!(nix::unistd::geteuid().is_root(), "the state directory is chowned: run the tests as root");
        let creds = creds();
        let dir = temp_dir("tree");
        let outside = dir.join("outside");
        std::fs::write(&outside, "root's").unwrap();
        let home = dir.join("a/b/home");
        std::fs::create_dir_all(home.join("sub")).unwrap();
        std::fs::write(home.join("sub/key"), "k").unwrap();
        std::os::unix::fs::symlink(&outside, home.join("sub/link")).unwrap();
        std::fs::hard_link(&outside, home.join("hard")).unwrap();
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();

        let fd = open_state_dir(&home, &creds).unwrap();
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).unwrap();
        assert_eq!((st.st_uid, st.st_gid, st.st_mode & 0o7777), (creds.uid, creds.gid, 0o700));
        for p in ["sub", "sub/key", "sub/link"] {
            let m = std::fs::symlink_metadata(home.join(p)).unwrap();
            assert_eq!((m.uid(), m.gid()), (creds.uid, creds.gid), "{p}");
        }
        // neither the link's target nor the hard-linked file changed owner
        assert_eq!(std::fs::metadata(&outside).unwrap().uid(), 0);
        // created from nothing: parents and the directory itself
        let fresh = dir.join("x/y/state");
        open_state_dir(&fresh, &creds).unwrap();
        let m = std::fs::metadata(&fresh).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o7777), (creds.uid, 0o700));
        assert_eq!(std::fs::metadata(dir.join("x")).unwrap().uid(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
