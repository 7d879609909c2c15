//! Filesystem primitives of the file backend (spec/keyd.md §7.2–§7.3, DESIGN.md §5).
//!
//! Every operation is relative to an already-open directory fd (`openat`, `mkdirat`,
//! `renameat`, `unlinkat`); key IDs never become paths: they are mapped to a single file name
//! made of ASCII alphanumerics, `-`, lowercase hex and `.key` ([`key_file_name`]).

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fchmod, fstat, mkdirat, Mode, SFlag};
use nix::unistd::{fsync, unlinkat, UnlinkatFlags};
use openssl::sha::sha256;
use zeroize::Zeroizing;

use crate::{Error, Result};

/// The subdirectory of the home directory that holds key files.
pub(crate) const KEYS_DIR: &str = "keys";
/// Prefix of temporary files. Key file names never start with `.`, so the two cannot clash.
pub(crate) const TMP_PREFIX: &str = ".tmp-";
/// Linux `NAME_MAX`: the longest file name a directory entry can have.
const NAME_MAX: usize = 255;
/// Longest key file accepted. Key files are small (a PEM RSA-4096 key is about 3.3 kB); the cap
/// keeps a misconfigured preloaded path from making the service read an arbitrary huge file.
pub(crate) const MAX_KEY_FILE_LEN: usize = 1 << 20;

/// Lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// The file name of key `id` inside `keys/`: `<S>-<H>.key` where `S` is `id` with every
/// character that is not ASCII `[A-Za-z0-9]` removed and `H` the lowercase hex SHA-256 of the
/// UTF-8 bytes of `id` (spec §7.2).
///
/// The result can contain neither `/` nor NUL and never is `.` or `..`, so it always names an
/// entry directly inside `keys/`.
///
/// Choice for over-long IDs: a name longer than `NAME_MAX` (255 bytes, i.e. more than 186
/// alphanumerics in `id`) cannot exist on Linux. Upstream would fail the `open` with
/// `ENAMETOOLONG` (EXTERNAL); we reject it up front as an invalid parameter ("key id too
/// long"), since it is the caller's input that can never work. IDs made mostly of other
/// characters stay usable at any length, because only alphanumerics reach the name.
pub(crate) fn key_file_name(id: &str) -> Result<CString> {
    let mut name: String = id.chars().filter(char::is_ascii_alphanumeric).collect();
    name.push('-');
    name.push_str(&hex(&sha256(id.as_bytes())));
    name.push_str(".key");
    if name.len() > NAME_MAX {
        return Err(Error::invalid("key id too long"));
    }
    CString::new(name).map_err(|_| Error::invalid("key id maps to an invalid file name"))
}

fn io_err(context: &'static str) -> impl FnOnce(Errno) -> Error {
    move |e| Error::external(context, e)
}

/// Wraps a freshly returned descriptor.
fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open(at) call, so it is a valid
    // descriptor that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Opens a directory by path (used for the configured home directory and for the parent
/// directory of preloaded `file://` keys; both paths come from configuration, not requests).
pub(crate) fn open_dir(path: &Path) -> Result<OwnedFd> {
    openat(None, path, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
        .map(owned)
        .map_err(io_err("could not open directory"))
}

/// Opens the parent directory of a preloaded key file and returns it with the file name.
pub(crate) fn open_parent(path: &Path) -> Result<(OwnedFd, CString)> {
    let name = path.file_name().ok_or_else(|| Error::invalid("preloaded key path has no file name"))?;
    let name = CString::new(name.as_bytes()).map_err(|_| Error::invalid("preloaded key path contains NUL"))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok((open_dir(parent)?, name))
}

/// Creates (mode 0700) and opens `<home>/keys`, then removes temporary files left behind by an
/// interrupted write.
pub(crate) fn open_keys_dir(home: BorrowedFd<'_>) -> Result<OwnedFd> {
    match mkdirat(Some(home.as_raw_fd()), KEYS_DIR, Mode::S_IRWXU) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(Error::external("could not create keys directory", e)),
    }
    let fd = openat(
        Some(home.as_raw_fd()),
        KEYS_DIR,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map(owned)
    .map_err(io_err("could not open keys directory"))?;
    remove_temp_files(fd.as_raw_fd());
    Ok(fd)
}

/// Best-effort removal of `.tmp-*` entries (leftovers of a write killed before its rename).
fn remove_temp_files(dir: RawFd) {
    let Ok(mut entries) =
        nix::dir::Dir::openat(Some(dir), ".", OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
    else {
        return;
    };
    let stale: Vec<CString> = entries
        .iter()
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_bytes().starts_with(TMP_PREFIX.as_bytes()))
        .map(|entry| entry.file_name().to_owned())
        .collect();
    for name in stale {
        // Ignored: a failure only leaves a harmless 0600 file behind.
        let _ = unlinkat(Some(dir), name.as_c_str(), UnlinkatFlags::NoRemoveDir);
    }
}

/// Reads a whole key file. `Ok(None)` if it does not exist.
pub(crate) fn read_file(dir: BorrowedFd<'_>, name: &CStr) -> Result<Option<Zeroizing<Vec<u8>>>> {
    // O_NONBLOCK: opening a FIFO planted in place of a key must not hang the service.
    // O_NOFOLLOW: keyd writes key files, never symlinks; one planted in their place is refused
    // rather than followed out of the directory (the sandbox would refuse it too).
    let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW;
    let fd = match openat(Some(dir.as_raw_fd()), name, flags, Mode::empty()) {
        Ok(fd) => owned(fd),
        Err(Errno::ENOENT) => return Ok(None),
        Err(Errno::ELOOP) => return Err(Error::invalid("the key file is a symbolic link; refusing to follow it")),
        Err(e) => return Err(Error::external(format!("could not open key file {name:?}"), e)),
    };
    let stat = fstat(fd.as_raw_fd()).map_err(|e| Error::external(format!("could not stat key file {name:?}"), e))?;
    if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(Error::external_msg(format!("key file {name:?} is not a regular file")));
    }
    let size = usize::try_from(stat.st_size)
        .map_err(|_| Error::external_msg(format!("key file {name:?} has an invalid size")))?;
    if size > MAX_KEY_FILE_LEN {
        return Err(Error::external_msg(format!("key file {name:?} is too large")));
    }
    // Read into a buffer of the final size, so that no reallocation leaves key bytes behind.
    // Files are only ever replaced by rename, never modified in place, so the size is stable.
    let mut buf = Zeroizing::new(vec![0u8; size]);
    let mut filled = 0;
    while filled < size {
        match nix::unistd::read(fd.as_raw_fd(), &mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(Error::external(format!("could not read key file {name:?}"), e)),
        }
    }
    buf.truncate(filled);
    Ok(Some(buf))
}

fn temp_name() -> Result<CString> {
    let mut random = [0u8; 12];
    openssl::rand::rand_bytes(&mut random).map_err(|e| Error::external("could not generate temp name", e))?;
    CString::new(format!("{TMP_PREFIX}{}", hex(&random))).map_err(|_| Error::external_msg("invalid temp name"))
}

fn write_all(fd: BorrowedFd<'_>, mut data: &[u8]) -> Result<()> {
    while !data.is_empty() {
        match nix::unistd::write(fd, data) {
            Ok(0) => return Err(Error::external_msg("could not write key file: no progress")),
            Ok(n) => data = &data[n..],
            Err(Errno::EINTR) => {}
            Err(e) => return Err(Error::external("could not write key file", e)),
        }
    }
    Ok(())
}

/// Atomically replaces `dir/name` with `data` (mode 0600): write a new temp file in the same
/// directory, fsync it, rename it over the target, fsync the directory. A crash at any point
/// leaves either the old or the new complete file (plus, at worst, a stray temp file).
pub(crate) fn write_atomic(dir: BorrowedFd<'_>, name: &CStr, data: &[u8]) -> Result<()> {
    let dir = dir.as_raw_fd();
    let tmp = temp_name()?;
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    let mode = Mode::S_IRUSR | Mode::S_IWUSR;
    // Every error names the key file being written (the log is where an operator looks).
    let named = |what: &str| {
        let context = format!("{what} {name:?}");
        move |e: Errno| Error::external(context, e)
    };
    let fd = openat(Some(dir), tmp.as_c_str(), flags, mode)
        .map(owned)
        .map_err(named("could not create a temporary file for key file"))?;
    let result = (|| {
        // The umask can only have removed bits; make the mode exactly 0600 regardless.
        fchmod(fd.as_raw_fd(), mode).map_err(named("could not set the mode of key file"))?;
        write_all(fd.as_fd(), data).map_err(|e| match e {
            Error::External { source, .. } => {
                Error::External { context: format!("could not write key file {name:?}").into(), source }
            }
            other => other,
        })?;
        fsync(fd.as_raw_fd()).map_err(named("could not sync key file"))?;
        renameat(Some(dir), tmp.as_c_str(), Some(dir), name).map_err(named("could not rename into place key file"))
    })();
    drop(fd);
    if let Err(e) = result {
        let _ = unlinkat(Some(dir), tmp.as_c_str(), UnlinkatFlags::NoRemoveDir);
        return Err(e);
    }
    fsync(dir).map_err(named("could not sync the keys directory after writing"))
}

/// Removes `dir/name`. `Ok(false)` if it did not exist.
pub(crate) fn remove_file(dir: BorrowedFd<'_>, name: &CStr) -> Result<bool> {
    match unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) => {
            fsync(dir.as_raw_fd()).map_err(io_err("could not sync keys directory"))?;
            Ok(true)
        }
        Err(Errno::ENOENT) => Ok(false),
        Err(e) => Err(Error::external("could not delete key file", e)),
    }
}

/// Renames `from_dir/from` to `to_dir/to`, replacing the destination. A missing source is an
/// EXTERNAL error, as upstream.
pub(crate) fn rename_file(from_dir: BorrowedFd<'_>, from: &CStr, to_dir: BorrowedFd<'_>, to: &CStr) -> Result<()> {
    match renameat(Some(from_dir.as_raw_fd()), from, Some(to_dir.as_raw_fd()), to) {
        Ok(()) => {}
        Err(Errno::ENOENT) => return Err(Error::external("source key file does not exist", Errno::ENOENT)),
        Err(e) => return Err(Error::external("could not rename key file", e)),
    }
    fsync(to_dir.as_raw_fd()).map_err(io_err("could not sync keys directory"))?;
    if from_dir.as_raw_fd() != to_dir.as_raw_fd() {
        fsync(from_dir.as_raw_fd()).map_err(io_err("could not sync keys directory"))?;
    }
    Ok(())
}
