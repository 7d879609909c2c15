//! The certificate store (spec certd.md §2): `<homedir>/certs/<S>-<H>.cer`, preloaded files
//! and preloaded lists.
//!
//! Every operation is relative to a directory descriptor (the state directory and the
//! directories of preloaded files, handed over by the broker); cert IDs never become paths: an ID
//! maps to one file name of ASCII alphanumerics, `-`, lowercase hex and `.cer`. Every write is
//! atomic: a temporary file in the same directory, fsync, rename over the target, fsync the
//! directory (the approach of workers/keys' file backend, whose helper is private to it).

use std::collections::{BTreeMap, HashMap};
use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{fchmod, fstat, mkdirat, Mode, SFlag};
use nix::unistd::{fsync, unlinkat, UnlinkatFlags};

use crate::config::Preloaded;

/// The subdirectory of the home directory that holds cert files.
pub const CERTS_DIR: &str = "certs";
/// Prefix of temporary files (cert file names never start with `.`).
const TMP_PREFIX: &str = ".tmp-";
/// Linux `NAME_MAX`.
const NAME_MAX: usize = 255;
/// Longest cert file read: bundles are small; the cap keeps a wrong preloaded path from making
/// the service read a huge file.
pub const MAX_CERT_FILE_LEN: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The caller's ID can never name a file (400).
    #[error("cert id too long")]
    IdTooLong,
    /// A preloaded list has no file to write or delete (500, as upstream).
    #[error("cert {0:?} is a preloaded list of other certs: it cannot be written or deleted")]
    List(String),
    /// The operator's preloaded file: read only in this implementation (500).
    #[error("cert {id:?} is the preloaded file {}: certd reads it but never writes or deletes it", path.display())]
    PreloadedReadOnly { id: String, path: PathBuf },
    /// A preloaded URI with another scheme than file:// (500, as upstream).
    #[error("cert {id:?} is preloaded from {uri:?}: only file:// URIs are supported")]
    Unsupported { id: String, uri: String },
    /// Preloaded lists that contain themselves (500; upstream overflows its stack).
    #[error("preloaded cert lists form a cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    /// A preloaded file whose directory the broker did not hand over (added by a reload).
    #[error("cert {id:?} is preloaded from {}, a directory certd was not given at start: restart certd to use it", path.display())]
    NotHanded { id: String, path: PathBuf },
    #[error("{what} {name:?}")]
    Io {
        what: &'static str,
        name: String,
        #[source]
        source: Errno,
    },
    #[error("{what} {name:?}")]
    Bad { what: &'static str, name: String },
}

impl StoreError {
    /// Whether the caller's input is at fault (400) rather than the service (500).
    pub fn is_invalid_id(&self) -> bool {
        matches!(self, StoreError::IdTooLong)
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The file name of cert `id` in `<homedir>/certs`: `<S>-<H>.cer` (spec §2).
pub fn cert_file_name(id: &str) -> Result<CString, StoreError> {
    let mut name: String = id.chars().filter(char::is_ascii_alphanumeric).collect();
    name.push('-');
    name.push_str(&hex(&openssl::sha::sha256(id.as_bytes())));
    name.push_str(".cer");
    if name.len() > NAME_MAX {
        return Err(StoreError::IdTooLong);
    }
    Ok(CString::new(name).expect("alphanumerics and hex have no NUL"))
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open(at) call: valid, owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Where a cert ID lives.
enum Location<'a> {
    Home(CString),
    File { dir: BorrowedFd<'a>, name: CString, path: PathBuf },
    List(Vec<String>),
}

/// The store: the home directory's `certs/`, the preloaded entries of the config (reloadable),
/// and the directories of preloaded files (fixed at start).
#[derive(Debug)]
pub struct Store {
    certs: OwnedFd,
    preloaded: RwLock<BTreeMap<String, Preloaded>>,
    /// Directory path -> descriptor, for preloaded files.
    preloaded_dirs: HashMap<PathBuf, OwnedFd>,
}

impl Store {
    /// On the state directory `home`: creates `certs/` (0700) if needed and removes temporary
    /// files a killed write left behind. `preloaded_dirs`: the directories of preloaded files.
    pub fn new(
        home: BorrowedFd<'_>,
        preloaded: BTreeMap<String, Preloaded>,
        preloaded_dirs: HashMap<PathBuf, OwnedFd>,
    ) -> Result<Store, StoreError> {
        let io = |what, source| StoreError::Io { what, name: CERTS_DIR.to_owned(), source };
        match mkdirat(Some(home.as_raw_fd()), CERTS_DIR, Mode::S_IRWXU) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(io("could not create the directory", e)),
        }
        let certs = openat(
            Some(home.as_raw_fd()),
            CERTS_DIR,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )
        .map(owned)
        .map_err(|e| io("could not open the directory", e))?;
        remove_temp_files(certs.as_raw_fd());
        Ok(Store { certs, preloaded: RwLock::new(preloaded), preloaded_dirs })
    }

    /// Opens `path` and the parent directories of the preloaded files by path (unconfined mode).
    pub fn open_dir(path: &Path) -> Result<OwnedFd, StoreError> {
        openat(None, path, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()).map(owned).map_err(
            |source| StoreError::Io { what: "could not open the directory", name: path.display().to_string(), source },
        )
    }

    /// Replaces the preloaded entries (config reload).
    pub fn set_preloaded(&self, preloaded: BTreeMap<String, Preloaded>) {
        *self.preloaded.write().unwrap_or_else(|p| p.into_inner()) = preloaded;
    }

    fn locate(&self, id: &str) -> Result<Location<'_>, StoreError> {
        let entry = self.preloaded.read().unwrap_or_else(|p| p.into_inner()).get(id).cloned();
        match entry {
            None => Ok(Location::Home(cert_file_name(id)?)),
            Some(Preloaded::List(ids)) => Ok(Location::List(ids)),
            Some(Preloaded::Unsupported(uri)) => Err(StoreError::Unsupported { id: id.to_owned(), uri }),
            Some(Preloaded::File(path)) => {
                let (Some(parent), Some(file)) = (path.parent(), path.file_name()) else {
                    return Err(StoreError::Bad {
                        what: "preloaded path has no file name",
                        name: path.display().to_string(),
                    });
                };
                let dir = self
                    .preloaded_dirs
                    .get(parent)
                    .ok_or_else(|| StoreError::NotHanded { id: id.to_owned(), path: path.clone() })?;
                let name = CString::new(file.as_bytes()).map_err(|_| StoreError::Bad {
                    what: "preloaded path contains NUL",
                    name: path.display().to_string(),
                })?;
                Ok(Location::File { dir: std::os::fd::AsFd::as_fd(dir), name, path })
            }
        }
    }

    /// The bytes of cert `id`; `None` when it does not exist (for a list: when none of its
    /// members exists).
    pub fn read(&self, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut chain = Vec::new();
        self.read_inner(id, &mut chain)
    }

    fn read_inner(&self, id: &str, chain: &mut Vec<String>) -> Result<Option<Vec<u8>>, StoreError> {
        if chain.iter().any(|c| c == id) {
            let mut cycle = chain.clone();
            cycle.push(id.to_owned());
            return Err(StoreError::Cycle(cycle));
        }
        match self.locate(id)? {
            Location::Home(name) => read_file(self.certs_fd(), &name),
            Location::File { dir, name, .. } => read_file(dir, &name),
            Location::List(ids) => {
                chain.push(id.to_owned());
                let mut out: Option<Vec<u8>> = None;
                for member in &ids {
                    if let Some(bytes) = self.read_inner(member, chain)? {
                        out.get_or_insert_with(Vec::new).extend_from_slice(&bytes);
                    }
                }
                chain.pop();
                Ok(out)
            }
        }
    }

    fn certs_fd(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.certs)
    }

    /// Atomically replaces cert `id` with `data` (mode 0644: certificates are public; the
    /// home directory stays 0700).
    pub fn write(&self, id: &str, data: &[u8]) -> Result<(), StoreError> {
        match self.locate(id)? {
            Location::Home(name) => write_atomic(self.certs_fd(), &name, data),
            Location::File { path, .. } => Err(StoreError::PreloadedReadOnly { id: id.to_owned(), path }),
            Location::List(_) => Err(StoreError::List(id.to_owned())),
        }
    }

    /// Removes cert `id`; a missing file is success.
    pub fn delete(&self, id: &str) -> Result<(), StoreError> {
        match self.locate(id)? {
            Location::Home(name) => {
                match unlinkat(Some(self.certs.as_raw_fd()), name.as_c_str(), UnlinkatFlags::NoRemoveDir) {
                    Ok(()) => fsync(self.certs.as_raw_fd()).map_err(|source| StoreError::Io {
                        what: "could not sync the directory",
                        name: CERTS_DIR.into(),
                        source,
                    }),
                    Err(Errno::ENOENT) => Ok(()),
                    Err(source) => Err(StoreError::Io { what: "could not delete", name: lossy(&name), source }),
                }
            }
            Location::File { path, .. } => Err(StoreError::PreloadedReadOnly { id: id.to_owned(), path }),
            Location::List(_) => Err(StoreError::List(id.to_owned())),
        }
    }
}

fn lossy(name: &CStr) -> String {
    name.to_string_lossy().into_owned()
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
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_bytes().starts_with(TMP_PREFIX.as_bytes()))
        .map(|e| e.file_name().to_owned())
        .collect();
    for name in stale {
        let _ = unlinkat(Some(dir), name.as_c_str(), UnlinkatFlags::NoRemoveDir);
    }
}

/// Reads a whole cert file; `None` if it does not exist. Symbolic links are refused, not
/// followed; FIFOs and other non-regular files are refused without blocking.
fn read_file(dir: BorrowedFd<'_>, name: &CStr) -> Result<Option<Vec<u8>>, StoreError> {
    let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW;
    let io = |what, source| StoreError::Io { what, name: lossy(name), source };
    let fd = match openat(Some(dir.as_raw_fd()), name, flags, Mode::empty()) {
        Ok(fd) => owned(fd),
        Err(Errno::ENOENT) => return Ok(None),
        Err(Errno::ELOOP) => {
            return Err(StoreError::Bad { what: "refusing to follow the symbolic link", name: lossy(name) })
        }
        Err(e) => return Err(io("could not open", e)),
    };
    let st = fstat(fd.as_raw_fd()).map_err(|e| io("could not stat", e))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        return Err(StoreError::Bad { what: "not a regular file:", name: lossy(name) });
    }
    if usize::try_from(st.st_size).map_or(true, |n| n > MAX_CERT_FILE_LEN) {
        return Err(StoreError::Bad { what: "file too large:", name: lossy(name) });
    }
    let mut buf = vec![0u8; st.st_size as usize];
    let mut filled = 0;
    while filled < buf.len() {
        match nix::unistd::read(fd.as_raw_fd(), &mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(io("could not read", e)),
        }
    }
    buf.truncate(filled);
    Ok(Some(buf))
}

/// Atomically replaces `dir/name` with `data`, mode 0644: a new temporary file in the same
/// directory, fsync, rename over the target, fsync the directory. A crash at any point leaves
/// the old or the new complete file (and at worst a stray temporary file, removed at start).
fn write_atomic(dir: BorrowedFd<'_>, name: &CStr, data: &[u8]) -> Result<(), StoreError> {
    let dir = dir.as_raw_fd();
    let mut random = [0u8; 12];
    openssl::rand::rand_bytes(&mut random)
        .map_err(|_| StoreError::Bad { what: "could not make a temporary name for", name: lossy(name) })?;
    let tmp = CString::new(format!("{TMP_PREFIX}{}", hex(&random))).expect("hex has no NUL");
    let io = |what, source| StoreError::Io { what, name: lossy(name), source };
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
    let mode = Mode::from_bits_truncate(0o644);
    let fd = openat(Some(dir), tmp.as_c_str(), flags, mode)
        .map(owned)
        .map_err(|e| io("could not create a temporary file for", e))?;
    let result = (|| {
        fchmod(fd.as_raw_fd(), mode).map_err(|e| io("could not set the mode of", e))?;
        let mut rest = data;
        while !rest.is_empty() {
            match nix::unistd::write(&fd, rest) {
                Ok(0) => return Err(StoreError::Bad { what: "no progress writing", name: lossy(name) }),
                Ok(n) => rest = &rest[n..],
                Err(Errno::EINTR) => {}
                Err(e) => return Err(io("could not write", e)),
            }
        }
        fsync(fd.as_raw_fd()).map_err(|e| io("could not sync", e))?;
        renameat(Some(dir), tmp.as_c_str(), Some(dir), name).map_err(|e| io("could not rename into place", e))
    })();
    drop(fd);
    if let Err(e) = result {
        let _ = unlinkat(Some(dir), tmp.as_c_str(), UnlinkatFlags::NoRemoveDir);
        return Err(e);
    }
    fsync(dir).map_err(|e| io("could not sync the directory of", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_as_the_spec_says() {
        assert_eq!(
            cert_file_name("device-id").unwrap().to_str().unwrap(),
            "deviceid-bd732105ef89cf8edd2606a5309c8a26b7b5599a4e124a0fe6199b6b2f60e655.cer"
        );
        assert!(matches!(cert_file_name(&"a".repeat(200)), Err(StoreError::IdTooLong)));
        assert!(cert_file_name(&"/".repeat(500)).is_ok());
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "aziot-certd-store-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn write_read_delete_lists_and_cycles() {
        let home = tempdir();
        let pre = tempdir();
        std::fs::write(pre.join("p.pem"), b"PRE").unwrap();
        let mut preloaded = BTreeMap::new();
        preloaded.insert("p".to_owned(), Preloaded::File(pre.join("p.pem")));
        preloaded.insert("l".to_owned(), Preloaded::List(vec!["a".into(), "missing".into(), "p".into()]));
        preloaded.insert("c1".to_owned(), Preloaded::List(vec!["c2".into()]));
        preloaded.insert("c2".to_owned(), Preloaded::List(vec!["a".into(), "c1".into()]));
        let mut dirs = HashMap::new();
        dirs.insert(pre.clone(), Store::open_dir(&pre).unwrap());
        let homefd = Store::open_dir(&home).unwrap();
        std::fs::write(home.join("certs-placeholder"), b"").unwrap();
        let store = Store::new(std::os::fd::AsFd::as_fd(&homefd), preloaded, dirs).unwrap();
        assert_eq!(store.read("a").unwrap(), None);
        store.write("a", b"AAA").unwrap();
        let path = home.join("certs").join(cert_file_name("a").unwrap().to_str().unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"AAA");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644);
        assert_eq!(store.read("l").unwrap().unwrap(), b"AAAPRE");
        let e = store.read("c1").unwrap_err();
        assert_eq!(e.to_string(), "preloaded cert lists form a cycle: c1 -> c2 -> c1");
        assert!(matches!(store.write("l", b"x"), Err(StoreError::List(_))));
        assert!(matches!(store.write("p", b"x"), Err(StoreError::PreloadedReadOnly { .. })));
        assert!(matches!(store.delete("p"), Err(StoreError::PreloadedReadOnly { .. })));
        store.delete("a").unwrap();
        store.delete("a").unwrap();
        assert!(!path.exists());
        assert_eq!(store.read("l").unwrap().unwrap(), b"PRE");
        // no temporary file left behind
        assert_eq!(std::fs::read_dir(home.join("certs")).unwrap().count(), 0);
        std::fs::remove_dir_all(home).unwrap();
        std::fs::remove_dir_all(pre).unwrap();
    }
}
