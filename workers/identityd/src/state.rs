//! Persistent state in the home directory (spec identityd.md §14): `device_info`, `prev_state`
//! and the module identity cache `modules/<H>-<D>/<S>-<M>`.
//!
//! Every operation is relative to the home directory's descriptor (handed over by the broker;
//! the path itself may not even be visible in the worker's mount namespace). Names come from
//! hashes and ASCII alphanumerics only: module IDs never become paths. Every write is atomic
//! (temporary file in the same directory, fsync, rename, fsync the directory). No file holds a
//! secret.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{openat, renameat, OFlag};
use nix::sys::stat::{mkdirat, Mode};
use nix::unistd::{fsync, unlinkat, UnlinkatFlags};
use serde::{Deserialize, Serialize};

use crate::hub::Module;

pub const DEVICE_INFO: &str = "device_info";
pub const PREV_STATE: &str = "prev_state";
pub const MODULES: &str = "modules";
const TMP_PREFIX: &str = ".tmp-";
/// State files are small; a larger one is corrupt.
const MAX_FILE_LEN: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
#[error("{what} {name:?}")]
pub struct StateError {
    pub what: &'static str,
    pub name: String,
    #[source]
    pub source: std::io::Error,
}

fn err(what: &'static str, name: &str, e: impl Into<std::io::Error>) -> StateError {
    StateError { what, name: name.to_owned(), source: e.into() }
}

fn errno(e: Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `modules/<H>-<D>`: hex SHA-256 of the hub host name and of the device ID.
pub fn device_dir(hub: &str, device_id: &str) -> String {
    format!(
        "{MODULES}/{}-{}",
        hex(&openssl::sha::sha256(hub.as_bytes())),
        hex(&openssl::sha::sha256(device_id.as_bytes()))
    )
}

/// `<S>-<M>`: the module ID's ASCII alphanumerics, then hex SHA-256 of the module ID.
pub fn module_file(module_id: &str) -> String {
    let s: String = module_id.chars().filter(char::is_ascii_alphanumeric).collect();
    format!("{s}-{}", hex(&openssl::sha::sha256(module_id.as_bytes())))
}

/// `device_info` (§14): all three keys required.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct DeviceInfo {
    pub hub_name: String,
    pub local_gateway_hostname: String,
    pub device_id: String,
    /// New (DPS only): the fingerprint of the `[provisioning]` section the device was
    /// provisioned with (`dps::DpsSettings::fingerprint`); a backup whose fingerprint differs
    /// from the current config's is not used at start. Absent in upstream's files (accepted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provisioning: Option<String>,
}

impl DeviceInfo {
    /// The same hub, gateway and device (§12 step 3), whatever the fingerprint.
    pub fn same_device(&self, other: &DeviceInfo) -> bool {
        self.hub_name == other.hub_name
            && self.local_gateway_hostname == other.local_gateway_hostname
            && self.device_id == other.device_id
    }
}

/// The home directory.
#[derive(Debug)]
pub struct State {
    home: OwnedFd,
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful openat: valid and owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Splits `a/b/c` into (`a/b`, `c`).
fn split(rel: &str) -> (Option<&str>, &str) {
    match rel.rsplit_once('/') {
        Some((d, f)) => (Some(d), f),
        None => (None, rel),
    }
}

impl State {
    pub fn new(home: OwnedFd) -> State {
        State { home }
    }

    fn open_dir(&self, rel: Option<&str>) -> Result<OwnedFd, Errno> {
        let path = rel.unwrap_or(".");
        openat(
            Some(self.home.as_raw_fd()),
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::empty(),
        )
        .map(owned)
    }

    /// The content of `rel`, `None` when it does not exist. Only regular files are read: a FIFO
    /// or device planted in its place is refused without blocking (O_NONBLOCK).
    pub fn read(&self, rel: &str) -> Result<Option<Vec<u8>>, StateError> {
        let fd = match openat(
            Some(self.home.as_raw_fd()),
            rel,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
            Mode::empty(),
        ) {
            Ok(fd) => owned(fd),
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(err("could not open", rel, errno(e))),
        };
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| err("could not stat", rel, errno(e)))?;
        if nix::sys::stat::SFlag::from_bits_truncate(st.st_mode) & nix::sys::stat::SFlag::S_IFMT
            != nix::sys::stat::SFlag::S_IFREG
        {
            return Err(err("not a regular file:", rel, std::io::Error::from(std::io::ErrorKind::InvalidData)));
        }
        let mut bytes = Vec::new();
        std::fs::File::from(fd)
            .take(MAX_FILE_LEN)
            .read_to_end(&mut bytes)
            .map_err(|e| err("could not read", rel, e))?;
        Ok(Some(bytes))
    }

    /// Replaces `rel` atomically with `bytes` (mode 0644: no secrets).
    pub fn write(&self, rel: &str, bytes: &[u8]) -> Result<(), StateError> {
        let (dir, name) = split(rel);
        let dir = self.open_dir(dir).map_err(|e| err("could not open the directory of", rel, errno(e)))?;
        let mut random = [0u8; 8];
        openssl::rand::rand_bytes(&mut random)
            .map_err(|e| err("could not name a temporary file for", rel, std::io::Error::other(e)))?;
        let tmp = format!("{TMP_PREFIX}{}", hex(&random));
        let fd = openat(
            Some(dir.as_raw_fd()),
            tmp.as_str(),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
            Mode::from_bits_truncate(0o644),
        )
        .map(owned)
        .map_err(|e| err("could not create a temporary file for", rel, errno(e)))?;
        let mut file = std::fs::File::from(fd);
        let written = file.write_all(bytes).and_then(|()| file.sync_all());
        drop(file);
        let renamed = written
            .and_then(|()| renameat(Some(dir.as_raw_fd()), tmp.as_str(), Some(dir.as_raw_fd()), name).map_err(errno));
        if let Err(e) = renamed {
            let _ = unlinkat(Some(dir.as_raw_fd()), tmp.as_str(), UnlinkatFlags::NoRemoveDir);
            return Err(err("could not write", rel, e));
        }
        fsync(dir.as_raw_fd()).map_err(|e| err("could not sync the directory of", rel, errno(e)))
    }

    /// Removes file `rel`; absent is fine.
    pub fn remove(&self, rel: &str) -> Result<(), StateError> {
        match unlinkat(Some(self.home.as_raw_fd()), rel, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(err("could not remove", rel, errno(e))),
        }
    }

    fn exists_dir(&self, rel: &str) -> bool {
        self.open_dir(Some(rel)).is_ok()
    }

    fn mkdir(&self, rel: &str) -> Result<(), StateError> {
        match mkdirat(Some(self.home.as_raw_fd()), rel, Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => Ok(()),
            Err(e) => Err(err("could not create", rel, errno(e))),
        }
    }

    /// The names in directory `rel` (regular entries only, no temporaries).
    pub fn list(&self, rel: &str) -> Result<Vec<String>, StateError> {
        let fd = self.open_dir(Some(rel)).map_err(|e| err("could not open", rel, errno(e)))?;
        let mut dir = nix::dir::Dir::from_fd(fd.as_raw_fd()).map_err(|e| err("could not list", rel, errno(e)))?;
        std::mem::forget(fd); // the Dir owns it now
        let mut names = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(|e| err("could not list", rel, errno(e)))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "." || name == ".." || name.starts_with(TMP_PREFIX) {
                continue;
            }
            names.push(name);
        }
        names.sort();
        Ok(names)
    }

    /// Removes directory `rel` and everything beneath it; absent is fine.
    fn remove_tree(&self, rel: &str) -> Result<(), StateError> {
        let names = match self.list(rel) {
            Ok(n) => n,
            Err(e) if e.source.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for name in names {
            let child = format!("{rel}/{name}");
            match unlinkat(Some(self.home.as_raw_fd()), child.as_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(Errno::ENOENT) => {}
                Err(Errno::EISDIR) => self.remove_tree(&child)?,
                Err(e) => return Err(err("could not remove", &child, errno(e))),
            }
        }
        match unlinkat(Some(self.home.as_raw_fd()), rel, UnlinkatFlags::RemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(err("could not remove", rel, errno(e))),
        }
    }

    /// Removes temporary files a killed write left behind (home and the module cache).
    pub fn clean_temporaries(&self) {
        let mut dirs = vec![".".to_owned()];
        if let Ok(devices) = self.list(MODULES) {
            dirs.extend(devices.into_iter().map(|d| format!("{MODULES}/{d}")));
        }
        for d in dirs {
            let Ok(fd) = self.open_dir(Some(&d)) else { continue };
            let Ok(mut dir) = nix::dir::Dir::from_fd(fd.as_raw_fd()) else { continue };
            let raw = fd.as_raw_fd();
            std::mem::forget(fd);
            let stale: Vec<String> = dir
                .iter()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(TMP_PREFIX))
                .collect();
            for n in stale {
                let _ = unlinkat(Some(raw), n.as_str(), UnlinkatFlags::NoRemoveDir);
            }
        }
    }

    // ---- device_info / prev_state ----

    /// `rel`'s content; `None` when absent, or unreadable (logged, naming the file).
    fn read_or_warn(&self, rel: &str) -> Option<Vec<u8>> {
        match self.read(rel) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!("Ignoring the unreadable state file: {e}: {}", e.source);
                None
            }
        }
    }

    /// `device_info`: `None` when absent, `unprovisioned` (legacy), unreadable or unparsable
    /// (the last two logged, naming the file).
    pub fn device_info(&self) -> Option<DeviceInfo> {
        let bytes = self.read_or_warn(DEVICE_INFO)?;
        let text = String::from_utf8_lossy(&bytes);
        if text.trim() == "unprovisioned" {
            return None;
        }
        match toml::from_str(&text) {
            Ok(info) => Some(info),
            Err(e) => {
                tracing::warn!("Ignoring the invalid device info backup {DEVICE_INFO:?}: {}", e.message());
                None
            }
        }
    }

    pub fn write_device_info(&self, info: &DeviceInfo) -> Result<(), StateError> {
        let text =
            toml::to_string(info).map_err(|e| err("could not serialize", DEVICE_INFO, std::io::Error::other(e)))?;
        self.write(DEVICE_INFO, text.as_bytes())
    }

    /// The module names of `prev_state` (§12 step 3), `None` when absent or unparsable.
    pub fn prev_modules(&self) -> Option<BTreeSet<String>> {
        let bytes = self.read_or_warn(PREV_STATE)?;
        let table: toml::Table = match std::str::from_utf8(&bytes).ok().map(str::parse) {
            Some(Ok(t)) => t,
            _ => {
                tracing::warn!("Ignoring invalid previous state file {PREV_STATE:?}");
                return None;
            }
        };
        let mut set = BTreeSet::new();
        for p in table.get("principal").and_then(|v| v.as_array()).into_iter().flatten() {
            let is_module = p
                .get("idtype")
                .and_then(|v| v.as_array())
                .is_some_and(|a| a.iter().any(|t| t.as_str() == Some("module")));
            if let (true, Some(name)) = (is_module, p.get("name").and_then(|v| v.as_str())) {
                set.insert(name.to_owned());
            }
        }
        Some(set)
    }

    // ---- the module cache ----

    /// Makes `modules/<H>-<D>` the current device's cache directory; when it does not exist
    /// yet, the whole `modules/` tree goes first (switching devices drops old caches).
    pub fn set_device(&self, hub: &str, device_id: &str) -> Result<(), StateError> {
        let dir = device_dir(hub, device_id);
        if self.exists_dir(&dir) {
            return Ok(());
        }
        self.remove_tree(MODULES)?;
        self.mkdir(MODULES)?;
        self.mkdir(&dir)
    }

    /// Drops the cache of one device (E9 clears the device state).
    pub fn clear_device(&self, hub: &str, device_id: &str) -> Result<(), StateError> {
        self.remove_tree(&device_dir(hub, device_id))
    }

    pub fn write_module(&self, hub: &str, device_id: &str, module: &Module) -> Result<(), StateError> {
        let rel = format!("{}/{}", device_dir(hub, device_id), module_file(&module.module_id));
        let bytes =
            serde_json::to_vec(module).map_err(|e| err("could not serialize", &rel, std::io::Error::other(e)))?;
        self.write(&rel, &bytes)
    }

    pub fn read_module(&self, hub: &str, device_id: &str, module_id: &str) -> Result<Option<Module>, StateError> {
        let rel = format!("{}/{}", device_dir(hub, device_id), module_file(module_id));
        match self.read(&rel)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                err("invalid module cache file", &rel, std::io::Error::new(std::io::ErrorKind::InvalidData, e))
            }),
        }
    }

    pub fn delete_module(&self, hub: &str, device_id: &str, module_id: &str) -> Result<(), StateError> {
        self.remove(&format!("{}/{}", device_dir(hub, device_id), module_file(module_id)))
    }

    /// Every cached module of the device; one bad file fails the listing (§14).
    pub fn list_modules(&self, hub: &str, device_id: &str) -> Result<Vec<Module>, StateError> {
        let dir = device_dir(hub, device_id);
        let mut modules = Vec::new();
        for name in self.list(&dir)? {
            let rel = format!("{dir}/{name}");
            let bytes = self.read(&rel)?.unwrap_or_default();
            modules.push(serde_json::from_slice(&bytes).map_err(|e| {
                err("invalid module cache file", &rel, std::io::Error::new(std::io::ErrorKind::InvalidData, e))
            })?);
        }
        Ok(modules)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_spec_example() {
        assert_eq!(
            format!("{}/{}", device_dir("myhub.azure-devices.net", "dev1"), module_file("my-mod_1$x")),
            "modules/7d4a2c5ea3b698a673926d4ebb8c0d2034c367424a491480224fbd729008150e-cf4b9c1f5eb31deb9ea41f56faa757b68be9cab8b73f463229df17036bdfa13e/mymod1x-b430ce0895af5ae4ccadfd73d655c1ccbc685eabb723ab2d4d8efc6f6f7e60c4"
        );
    }

    fn temp_state() -> (std::path::PathBuf, State) {
        let dir = std::env::temp_dir().join(format!(
            "aziot-identityd-state-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let fd = std::fs::File::open(&dir).unwrap();
        (dir, State::new(OwnedFd::from(fd)))
    }

    #[test]
    fn cache_round_trip_and_device_switch() {
        let (dir, state) = temp_state();
        state.set_device("hub", "d1").unwrap();
        let m = Module {
            module_id: "m$1".into(),
            device_id: "d1".into(),
            managed_by: None,
            generation_id: Some("g".into()),
        };
        state.write_module("hub", "d1", &m).unwrap();
        assert_eq!(state.read_module("hub", "d1", "m$1").unwrap(), Some(m.clone()));
        let text = std::fs::read_to_string(dir.join(device_dir("hub", "d1")).join(module_file("m$1"))).unwrap();
        assert_eq!(text, r#"{"moduleId":"m$1","deviceId":"d1","generationId":"g"}"#);
        assert_eq!(state.list_modules("hub", "d1").unwrap(), vec![m]);
        state.set_device("hub", "d1").unwrap();
        assert_eq!(state.list_modules("hub", "d1").unwrap().len(), 1, "same device keeps its cache");
        state.set_device("hub", "d2").unwrap();
        assert!(state.list(MODULES).unwrap() == vec![device_dir("hub", "d2")[MODULES.len() + 1..].to_owned()]);
        state.delete_module("hub", "d2", "nope").unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn device_info_and_prev_state() {
        let (dir, state) = temp_state();
        assert_eq!(state.device_info(), None);
        let info = DeviceInfo { hub_name: "h".into(), local_gateway_hostname: "h".into(), device_id: "d".into(), provisioning: None };
        state.write_device_info(&info).unwrap();
        assert_eq!(state.device_info(), Some(info));
        state.write(DEVICE_INFO, b"unprovisioned").unwrap();
        assert_eq!(state.device_info(), None);
        state
            .write(PREV_STATE, b"[[principal]]\nuid = 1\nname = \"a\"\nidtype = [\"module\"]\n[[principal]]\nuid = 2\nname = \"b\"\nidtype = [\"local\"]\n")
            .unwrap();
        assert_eq!(state.prev_modules(), Some(BTreeSet::from(["a".to_owned()])));
        let names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert!(names.iter().all(|n| !n.starts_with(TMP_PREFIX)), "{names:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A FIFO or a directory planted where a state file belongs is refused at once, naming the
    /// file (before: opening a FIFO blocked the reconciling thread forever).
    #[test]
    fn non_regular_state_files_are_refused_without_blocking() {
        let (dir, state) = temp_state();
        nix::unistd::mkfifo(&dir.join(DEVICE_INFO), Mode::from_bits_truncate(0o644)).unwrap();
        std::fs::create_dir(dir.join(PREV_STATE)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let e = state.read(DEVICE_INFO).unwrap_err();
            let info = state.device_info();
            let prev = state.read(PREV_STATE).unwrap_err();
            tx.send((e.to_string(), info, prev.to_string())).unwrap();
        });
        let (e, info, prev) = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("read blocked on a FIFO");
        assert_eq!(e, "not a regular file: \"device_info\"");
        assert_eq!(info, None);
        assert!(prev.contains("\"prev_state\""), "{prev}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
