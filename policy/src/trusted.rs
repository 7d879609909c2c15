//! Root's inputs are root's: how the broker opens what it reads and acts on as root.
//!
//! - The files it takes decisions from (config.toml, config.d/*.toml, policy.d/*.toml) and the
//!   directories holding them must be owned by root and not writable by group or others:
//!   [`open_root_owned`], [`open_root_owned_dir`], [`TrustedDir::open_file`]. The check is made
//!   on the descriptor that is then read (fstat after an `O_NOFOLLOW` open), by one function,
//!   [`check_owner_and_mode`].
//! - The paths it opens on the config's behalf (the state directory, preloaded key directories,
//!   a TPM device) are walked from `/` one component at a time with
//!   `openat(O_NOFOLLOW|O_DIRECTORY)`, so that no symbolic link, at any depth, can redirect
//!   root: [`open_dir_nofollow`], [`open_parent_nofollow`].
//!
//! When the process is not root (aziotctl, `aziotd --unconfined` run as the service user, unit
//! tests), a file or directory owned by the caller's own euid is accepted too: such a process
//! grants nothing the caller does not already have.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

/// What a path is expected to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Directory,
}

impl Kind {
    fn noun(self) -> &'static str {
        match self {
            Kind::File => "regular file",
            Kind::Directory => "directory",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("could not open {}", path.display())]
    Open { path: PathBuf, #[source] source: std::io::Error },
    #[error(
        "{} is a symbolic link: the broker opens the paths it acts on as root without following \
         links; put the {noun} itself at that path",
        path.display()
    )]
    Symlink { path: PathBuf, noun: &'static str },
    #[error("{} is a {found}, not a {expected}", path.display())]
    WrongType { path: PathBuf, expected: &'static str, found: &'static str },
    #[error(
        "{} is owned by {owner} with mode {mode:04o}: the broker acts only on {noun}s owned by root \
         and not writable by group or others; fix it with `chown root:root {}` and `chmod {fix} {}`",
        path.display(), path.display(), path.display()
    )]
    Untrusted { path: PathBuf, owner: String, mode: u32, noun: &'static str, fix: &'static str },
    #[error("{} is not a usable path: {why}", path.display())]
    BadPath { path: PathBuf, why: &'static str },
}

impl TrustError {
    /// Whether the path (or one of its directories) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, TrustError::Open { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

fn errno_io(e: Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

fn file_type_name(st: &FileStat) -> &'static str {
    match SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => "regular file",
        SFlag::S_IFDIR => "directory",
        SFlag::S_IFLNK => "symbolic link",
        SFlag::S_IFCHR => "character device",
        SFlag::S_IFBLK => "block device",
        SFlag::S_IFIFO => "FIFO",
        SFlag::S_IFSOCK => "socket",
        _ => "file of unknown type",
    }
}

fn is_type(st: &FileStat, t: SFlag) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == t.bits()
}

/// `uid 995 (aziotks)`, or `uid 4242` when the uid has no name.
fn owner_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => format!("uid {uid} ({})", user.name),
        _ => format!("uid {uid}"),
    }
}

/// THE check: the object behind `fd` (opened from `path` without following a link) is a `kind`,
/// owned by root (or by this process's euid when it is not root) and not writable by group or
/// others.
pub fn check_owner_and_mode(fd: BorrowedFd<'_>, path: &Path, kind: Kind) -> Result<FileStat, TrustError> {
    let st = nix::sys::stat::fstat(fd.as_raw_fd())
        .map_err(|e| TrustError::Open { path: path.to_owned(), source: errno_io(e) })?;
    let wanted = match kind {
        Kind::File => SFlag::S_IFREG,
        Kind::Directory => SFlag::S_IFDIR,
    };
    if !is_type(&st, wanted) {
        return Err(TrustError::WrongType { path: path.to_owned(), expected: kind.noun(), found: file_type_name(&st) });
    }
    let euid = nix::unistd::geteuid().as_raw();
    let owner_ok = st.st_uid == 0 || st.st_uid == euid;
    if !owner_ok || st.st_mode & 0o022 != 0 {
        return Err(TrustError::Untrusted {
            path: path.to_owned(),
            owner: owner_name(st.st_uid),
            mode: st.st_mode & 0o7777,
            noun: match kind {
                Kind::File => "file",
                Kind::Directory => "directory",
            },
            fix: match kind {
                Kind::File => "0600",
                Kind::Directory => "go-w",
            },
        });
    }
    Ok(st)
}

/// Classifies a failed `O_NOFOLLOW` open of `name` in `dir`: a symbolic link, something else
/// than the expected kind, or the plain error.
fn open_failure(dir: Option<BorrowedFd<'_>>, name: &OsStr, path: &Path, kind: Kind, e: Errno) -> TrustError {
    if matches!(e, Errno::ELOOP | Errno::ENOTDIR | Errno::EMLINK) {
        if let Ok(st) = nix::sys::stat::fstatat(dir.map(|d| d.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            if is_type(&st, SFlag::S_IFLNK) {
                return TrustError::Symlink { path: path.to_owned(), noun: kind.noun() };
            }
            return TrustError::WrongType { path: path.to_owned(), expected: kind.noun(), found: file_type_name(&st) };
        }
    }
    TrustError::Open { path: path.to_owned(), source: errno_io(e) }
}

fn openat(dir: Option<BorrowedFd<'_>>, name: &OsStr, flags: OFlag, mode: Mode) -> Result<OwnedFd, Errno> {
    let fd = nix::fcntl::openat(dir.map(|d| d.as_raw_fd()), name, flags | OFlag::O_CLOEXEC, mode)?;
    // SAFETY: openat returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the config or drop-in file `path` for reading: not through a symbolic link, a regular
/// file, root-owned, not group/other-writable (checked on the opened descriptor).
pub fn open_root_owned(path: &Path) -> Result<File, TrustError> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
    let fd = openat(None, path.as_os_str(), flags, Mode::empty())
        .map_err(|e| open_failure(None, path.as_os_str(), path, Kind::File, e))?;
    check_owner_and_mode(fd.as_fd(), path, Kind::File)?;
    Ok(File::from(fd))
}

/// A drop-in directory (config.d, policy.d) that passed the owner and mode check; its entries
/// are listed and opened through its descriptor.
#[derive(Debug)]
pub struct TrustedDir {
    path: PathBuf,
    fd: OwnedFd,
}

/// One entry of a [`TrustedDir`]: its name and whether it is a symbolic link (by `lstat`
/// semantics; the kernel's `d_type`, or `fstatat(AT_SYMLINK_NOFOLLOW)` when that is unknown).
#[derive(Clone, Debug)]
pub struct DirEntry {
    pub name: OsString,
    pub is_symlink: bool,
    pub is_file: bool,
}

/// Opens the drop-in directory `path` (not through a symbolic link, root-owned, not
/// group/other-writable).
pub fn open_root_owned_dir(path: &Path) -> Result<TrustedDir, TrustError> {
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW;
    let fd = openat(None, path.as_os_str(), flags, Mode::empty())
        .map_err(|e| open_failure(None, path.as_os_str(), path, Kind::Directory, e))?;
    check_owner_and_mode(fd.as_fd(), path, Kind::Directory)?;
    Ok(TrustedDir { path: path.to_owned(), fd })
}

impl TrustedDir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The entries (not `.` and `..`), in no particular order.
    pub fn entries(&self) -> Result<Vec<DirEntry>, TrustError> {
        let list_err = |e: Errno| TrustError::Open { path: self.path.clone(), source: errno_io(e) };
        // A fresh open file description of the same directory: its own offset.
        let mut dir = nix::dir::Dir::openat(
            Some(self.fd.as_raw_fd()),
            ".",
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(list_err)?;
        let mut out = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(list_err)?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes()).to_owned();
            if name == "." || name == ".." {
                continue;
            }
            let (is_symlink, is_file) = match entry.file_type() {
                Some(nix::dir::Type::Symlink) => (true, false),
                Some(nix::dir::Type::File) => (false, true),
                Some(_) => (false, false),
                None => match nix::sys::stat::fstatat(Some(self.fd.as_raw_fd()), name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                    Ok(st) => (is_type(&st, SFlag::S_IFLNK), is_type(&st, SFlag::S_IFREG)),
                    Err(Errno::ENOENT) => continue,
                    Err(e) => return Err(list_err(e)),
                },
            };
            out.push(DirEntry { name, is_symlink, is_file });
        }
        Ok(out)
    }

    /// Opens the entry `name` for reading, with the same checks as [`open_root_owned`].
    pub fn open_file(&self, name: &OsStr) -> Result<File, TrustError> {
        let path = self.path.join(name);
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
        let fd = openat(Some(self.fd.as_fd()), name, flags, Mode::empty())
            .map_err(|e| open_failure(Some(self.fd.as_fd()), name, &path, Kind::File, e))?;
        check_owner_and_mode(fd.as_fd(), &path, Kind::File)?;
        Ok(File::from(fd))
    }
}

/// Directories to create while walking ([`open_dir_nofollow`]).
#[derive(Clone, Copy, Debug)]
pub struct Create {
    /// Mode of a missing intermediate directory (before the umask), as `create_dir_all` would.
    pub intermediate_mode: u32,
    /// Mode of the final directory when it is missing (before the umask).
    pub final_mode: u32,
}

/// The normal components of the absolute path `path`; refuses relative paths and `..`.
fn components(path: &Path) -> Result<Vec<&OsStr>, TrustError> {
    let bad = |why| TrustError::BadPath { path: path.to_owned(), why };
    let mut parts = Vec::new();
    let mut absolute = false;
    for c in path.components() {
        match c {
            Component::RootDir => absolute = true,
            Component::CurDir => {}
            Component::Normal(n) => parts.push(n),
            Component::ParentDir => return Err(bad("it contains `..`")),
            Component::Prefix(_) => return Err(bad("not a Unix path")),
        }
    }
    if !absolute {
        return Err(bad("it is not absolute"));
    }
    Ok(parts)
}

/// Walks `parts` from `/`, each component opened `O_PATH|O_DIRECTORY|O_NOFOLLOW` relative to
/// the previous one (created first with `create` when missing), and returns the last one.
fn walk(parts: &[&OsStr], create: Option<u32>) -> Result<OwnedFd, TrustError> {
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW;
    let mut current = openat(None, OsStr::new("/"), flags, Mode::empty())
        .map_err(|e| TrustError::Open { path: "/".into(), source: errno_io(e) })?;
    let mut so_far = PathBuf::from("/");
    for name in parts {
        so_far.push(name);
        let mut result = openat(Some(current.as_fd()), name, flags, Mode::empty());
        if let (Err(Errno::ENOENT), Some(mode)) = (&result, create) {
            match nix::sys::stat::mkdirat(Some(current.as_raw_fd()), *name, Mode::from_bits_truncate(mode)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(TrustError::Open { path: so_far, source: errno_io(e) }),
            }
            result = openat(Some(current.as_fd()), name, flags, Mode::empty());
        }
        current = result.map_err(|e| open_failure(Some(current.as_fd()), name, &so_far, Kind::Directory, e))?;
    }
    Ok(current)
}

/// Opens the directory `path` (absolute) for reading, walking from `/` without following a
/// symbolic link at any component; with `create`, missing directories are made on the way.
/// The result is checked to be a directory after it is opened.
pub fn open_dir_nofollow(path: &Path, create: Option<Create>) -> Result<OwnedFd, TrustError> {
    let parts = components(path)?;
    let Some((last, parents)) = parts.split_last() else {
        return Err(TrustError::BadPath { path: path.to_owned(), why: "it is the root directory" });
    };
    let parent = walk(parents, create.map(|c| c.intermediate_mode))?;
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW;
    let mut result = openat(Some(parent.as_fd()), last, flags, Mode::empty());
    if let (Err(Errno::ENOENT), Some(c)) = (&result, create) {
        match nix::sys::stat::mkdirat(Some(parent.as_raw_fd()), *last, Mode::from_bits_truncate(c.final_mode)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(TrustError::Open { path: path.to_owned(), source: errno_io(e) }),
        }
        result = openat(Some(parent.as_fd()), last, flags, Mode::empty());
    }
    let dir = result.map_err(|e| open_failure(Some(parent.as_fd()), last, path, Kind::Directory, e))?;
    let st = nix::sys::stat::fstat(dir.as_raw_fd()).map_err(|e| TrustError::Open { path: path.to_owned(), source: errno_io(e) })?;
    if !is_type(&st, SFlag::S_IFDIR) {
        return Err(TrustError::WrongType { path: path.to_owned(), expected: "directory", found: file_type_name(&st) });
    }
    Ok(dir)
}

/// For opening the final component of `path` (absolute) yourself: its parent directory, walked
/// from `/` without following a symbolic link (an `O_PATH` descriptor), and the final name.
pub fn open_parent_nofollow(path: &Path) -> Result<(OwnedFd, OsString), TrustError> {
    let parts = components(path)?;
    let Some((last, parents)) = parts.split_last() else {
        return Err(TrustError::BadPath { path: path.to_owned(), why: "it is the root directory" });
    };
    Ok((walk(parents, None)?, last.to_os_string()))
}

/// What `st` is (`regular file`, `character device`, ...), for callers that check the type of
/// what they opened.
pub fn type_name(st: &FileStat) -> &'static str {
    file_type_name(st)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "aziot-policy-trusted-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    fn write(path: &Path, mode: u32) {
        std::fs::write(path, "x = 1\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn service_user() -> (u32, u32) {
        let u = nix::unistd::User::from_name("aziotks")
            .unwrap()
            .expect("user aziotks (systemd-sysusers packaging/sysusers.d/aziot.conf)");
        (u.uid.as_raw(), u.gid.as_raw())
    }

    fn chown(path: &Path, uid: u32, gid: u32) {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
    }

    fn root() {
        assert!(nix::unistd::geteuid().is_root(), "these tests create files of other owners: run them as root");
    }

    #[test]
    fn root_owned_files_pass_and_others_are_refused_with_the_fix() {
        root();
        let dir = temp_dir("files");
        let ok = dir.join("ok.toml");
        write(&ok, 0o644);
        let mut text = String::new();
        std::io::Read::read_to_string(&mut open_root_owned(&ok).unwrap(), &mut text).unwrap();
        assert_eq!(text, "x = 1\n");
        write(&dir.join("ok600.toml"), 0o600);
        open_root_owned(&dir.join("ok600.toml")).unwrap();

        // owned by the service user
        let (uid, gid) = service_user();
        let theirs = dir.join("theirs.toml");
        write(&theirs, 0o600);
        chown(&theirs, uid, gid);
        let e = open_root_owned(&theirs).unwrap_err().to_string();
        let p = theirs.display();
        assert!(e.contains(&format!("{p} is owned by uid {uid} (aziotks) with mode 0600")), "{e}");
        assert!(e.contains(&format!("`chown root:root {p}` and `chmod 0600 {p}`")), "{e}");

        // root-owned, but group- or world-writable
        for mode in [0o666, 0o620, 0o602] {
            let w = dir.join(format!("w{mode:o}.toml"));
            write(&w, mode);
            let e = open_root_owned(&w).unwrap_err().to_string();
            assert!(e.contains(&format!("is owned by uid 0 (root) with mode {mode:04o}")), "{e}");
        }

        // a symbolic link to a good file, and other types
        std::os::unix::fs::symlink(&ok, dir.join("link.toml")).unwrap();
        let e = open_root_owned(&dir.join("link.toml")).unwrap_err();
        assert!(matches!(e, TrustError::Symlink { .. }), "{e}");
        assert!(e.to_string().contains("is a symbolic link"), "{e}");
        let e = open_root_owned(&dir).unwrap_err();
        assert!(matches!(e, TrustError::WrongType { found: "directory", .. }), "{e}");
        let e = open_root_owned(&dir.join("missing.toml")).unwrap_err();
        assert!(e.is_not_found(), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn drop_in_directories_are_checked_and_list_without_following_links() {
        root();
        let dir = temp_dir("dirs");
        let d = dir.join("config.d");
        std::fs::create_dir(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        write(&d.join("a.toml"), 0o644);
        std::os::unix::fs::symlink(d.join("a.toml"), d.join("b.toml")).unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        let trusted = open_root_owned_dir(&d).unwrap();
        let mut entries = trusted.entries().unwrap();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        let summary: Vec<_> = entries.iter().map(|e| (e.name.to_str().unwrap(), e.is_file, e.is_symlink)).collect();
        assert_eq!(summary, [("a.toml", true, false), ("b.toml", false, true), ("sub", false, false)]);
        trusted.open_file(OsStr::new("a.toml")).unwrap();
        assert!(matches!(trusted.open_file(OsStr::new("b.toml")), Err(TrustError::Symlink { .. })));

        // writable by others, or owned by the service user
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = open_root_owned_dir(&d).unwrap_err().to_string();
        assert!(e.contains("with mode 0777") && e.contains(&format!("`chmod go-w {}`", d.display())), "{e}");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let (uid, gid) = service_user();
        chown(&d, uid, gid);
        let e = open_root_owned_dir(&d).unwrap_err().to_string();
        assert!(e.contains("(aziotks)"), "{e}");
        chown(&d, 0, 0);
        // a link to the directory
        std::os::unix::fs::symlink(&d, dir.join("link.d")).unwrap();
        assert!(matches!(open_root_owned_dir(&dir.join("link.d")), Err(TrustError::Symlink { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn walks_refuse_a_link_at_any_depth_and_create_what_is_missing() {
        root();
        let dir = temp_dir("walk");
        let victim = dir.join("victim");
        std::fs::create_dir_all(victim.join("home")).unwrap();
        std::fs::set_permissions(victim.join("home"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("link")).unwrap();

        // an intermediate link, with and without creation
        for create in [None, Some(Create { intermediate_mode: 0o755, final_mode: 0o700 })] {
            let e = open_dir_nofollow(&dir.join("link/home"), create).unwrap_err();
            assert!(matches!(&e, TrustError::Symlink { path, .. } if *path == dir.join("link")), "{e}");
        }
        // the final component a link
        let e = open_dir_nofollow(&dir.join("link"), None).unwrap_err();
        assert!(matches!(&e, TrustError::Symlink { path, .. } if *path == dir.join("link")), "{e}");
        assert!(matches!(open_parent_nofollow(&dir.join("link/home/x")), Err(TrustError::Symlink { .. })));
        // a file where a directory is expected
        write(&dir.join("file"), 0o644);
        let e = open_dir_nofollow(&dir.join("file"), None).unwrap_err();
        assert!(matches!(e, TrustError::WrongType { found: "regular file", .. }), "{e}");
        // relative paths and `..` are refused
        assert!(matches!(open_dir_nofollow(Path::new("rel/dir"), None), Err(TrustError::BadPath { .. })));
        assert!(matches!(open_dir_nofollow(&dir.join("victim/../victim"), None), Err(TrustError::BadPath { .. })));
        // creation: intermediates and the final directory, with their modes
        let target = dir.join("a/b/state");
        let fd = open_dir_nofollow(&target, Some(Create { intermediate_mode: 0o755, final_mode: 0o700 })).unwrap();
        assert!(nix::sys::stat::fstat(fd.as_raw_fd()).unwrap().st_mode & 0o170000 == 0o040000);
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let umask = status.lines().find_map(|l| l.strip_prefix("Umask:")).map(|m| u32::from_str_radix(m.trim(), 8).unwrap()).unwrap();
        assert_eq!(std::fs::metadata(dir.join("a")).unwrap().mode() & 0o777, 0o755 & !umask);
        assert_eq!(std::fs::metadata(&target).unwrap().mode() & 0o777, 0o700 & !umask);
        // the victim was left alone
        assert_eq!(std::fs::read_dir(victim.join("home")).unwrap().count(), 0);
        assert_eq!(std::fs::metadata(victim.join("home")).unwrap().mode() & 0o777, 0o755);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
