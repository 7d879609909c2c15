//! Our own key library: the file backend of spec/keyd.md §7 and, in [`pkcs11`] (routed by
//! `route`), the PKCS#11 backend.
//!
//! Concurrency: there is no global lock around crypto. Parsed keys are cached in memory
//! (`RwLock<HashMap<id, Arc<CachedKey>>>`), so a sign/encrypt on a cached key only takes a
//! read lock for a map lookup and never touches the filesystem. Mutations (create, import,
//! move, delete, set_parameter) are serialized by one mutex and clear the cache; a generation
//! counter keeps a reader that raced with a mutation from re-inserting what it read before.
//! Keys changed behind the store's back (by hand, on disk) are seen once they drop out of the
//! cache, i.e. after the next mutation through the store.

mod crypto;
mod files;
mod hmac;
mod params;
mod pkcs11;
mod route;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_ops;

use std::collections::HashMap;
use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use zeroize::Zeroizing;

use self::crypto::{KeyPair, RsaMode, SymmetricKey};
use self::params::PreloadedLocation;
use crate::{EncryptMechanism, Error, KeyBackend, KeyPairParameter, KeyUsage, Result, SignMechanism};

/// The C API version the native library implements.
pub const VERSION_2_1_0_0: u32 = 0x0201_0000;

/// The cache is cleared rather than grown past this many entries.
const MAX_CACHED_KEYS: usize = 4096;

pub use self::pkcs11::sandbox_paths as pkcs11_sandbox_paths;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

/// The configured home directory and, once first needed, its `keys` subdirectory.
struct HomeDir {
    fd: OwnedFd,
    keys: Mutex<Option<Arc<OwnedFd>>>,
}

impl HomeDir {
    fn keys_dir(&self) -> Result<Arc<OwnedFd>> {
        let mut keys = lock(&self.keys);
        if let Some(fd) = &*keys {
            return Ok(Arc::clone(fd));
        }
        let fd = Arc::new(files::open_keys_dir(self.fd.as_fd())?);
        *keys = Some(Arc::clone(&fd));
        Ok(fd)
    }
}

#[derive(Default)]
struct Config {
    homedir: Option<Arc<HomeDir>>,
    pkcs11_lib_path: Option<Zeroizing<String>>,
    /// May carry a PIN: zeroized on drop, never printed.
    pkcs11_base_slot: Option<Zeroizing<String>>,
    preloaded: HashMap<String, PreloadedLocation>,
    /// Preloaded `file://` keys whose directory was handed over already open (sandbox).
    preloaded_dirs: HashMap<String, (Arc<OwnedFd>, CString)>,
    /// The loaded module and the base slot's token (set eagerly by `set_parameter`).
    pkcs11: Option<Pkcs11State>,
}

struct Pkcs11State {
    module: Arc<pkcs11::Module>,
    base: Option<(crate::pkcs11_uri::Pkcs11Uri, Arc<pkcs11::Token>)>,
}

enum DirFd {
    Keys(Arc<OwnedFd>),
    Own(OwnedFd),
}

/// The file that holds a key: a directory fd and a single-component file name.
struct Location {
    dir: DirFd,
    name: CString,
}

impl Location {
    fn dir(&self) -> BorrowedFd<'_> {
        match &self.dir {
            DirFd::Keys(fd) => fd.as_fd(),
            DirFd::Own(fd) => fd.as_fd(),
        }
    }

    fn read(&self) -> Result<Option<Zeroizing<Vec<u8>>>> {
        files::read_file(self.dir(), &self.name)
    }
}

/// A parsed key file. A file that parses as a PEM private key is a key pair; any other
/// non-empty content is a symmetric key.
enum CachedKey {
    Pair(KeyPair),
    Symmetric(Box<SymmetricKey>),
}

impl CachedKey {
    fn parse(bytes: Zeroizing<Vec<u8>>) -> Result<Self> {
        match crypto::parse_private_key_pem(&bytes) {
            Some(pkey) => Ok(CachedKey::Pair(KeyPair::new(pkey)?)),
            None => Ok(CachedKey::Symmetric(Box::new(SymmetricKey::new(bytes)?))),
        }
    }
}

/// What the location of an ID holds.
enum Stored {
    Missing,
    Empty,
    Key(Arc<CachedKey>),
}

/// The native key store (file backend).
pub struct KeyStore {
    config: RwLock<Config>,
    cache: RwLock<HashMap<String, Arc<CachedKey>>>,
    /// Bumped (under the cache write lock) by every invalidation.
    generation: AtomicU64,
    /// Serializes mutations.
    write_lock: Mutex<()>,
}

impl Default for KeyStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore").finish_non_exhaustive()
    }
}

impl KeyStore {
    /// A store with nothing configured: every key operation fails with "no way to create keys"
    /// until a home directory (or a preloaded key) is set.
    pub fn new() -> KeyStore {
        KeyStore {
            config: RwLock::new(Config::default()),
            cache: RwLock::new(HashMap::new()),
            generation: AtomicU64::new(0),
            write_lock: Mutex::new(()),
        }
    }

    /// Uses an already-open directory as the home directory (equivalent to `homedir_path`,
    /// for a sandboxed process that receives the directory from a broker and has no path
    /// access). Key files live in its `keys` subdirectory, created on demand with mode 0700.
    pub fn set_homedir_fd(&self, dir: OwnedFd) {
        let _w = lock(&self.write_lock);
        write(&self.config).homedir = Some(Arc::new(HomeDir { fd: dir, keys: Mutex::new(None) }));
        self.invalidate();
    }

    /// Gives the already-open parent directory of the preloaded `file://` key `id` (a sandboxed
    /// process cannot open the path itself). `id` must have been set with
    /// `set_parameter("preloaded_key:<id>", "file://...")`, and `file_name` must be that URI's
    /// last path component.
    pub fn set_preloaded_key_dir(&self, id: &str, dir: OwnedFd, file_name: &str) -> Result<()> {
        let _w = lock(&self.write_lock);
        let mut config = write(&self.config);
        match config.preloaded.get(id) {
            Some(PreloadedLocation::File(path))
                if path.file_name().is_some_and(|n| n.as_bytes() == file_name.as_bytes()) => {}
            _ => return Err(Error::invalid("the directory does not match a preloaded file:// key")),
        }
        let name = CString::new(file_name).map_err(|_| Error::invalid("file name contains NUL"))?;
        config.preloaded_dirs.insert(id.to_owned(), (Arc::new(dir), name));
        drop(config);
        self.invalidate();
        Ok(())
    }

    fn invalidate(&self) {
        let mut cache = write(&self.cache);
        cache.clear();
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn cache_get(&self, id: &str) -> Option<Arc<CachedKey>> {
        read(&self.cache).get(id).cloned()
    }

    fn cache_insert(&self, id: &str, generation: u64, key: &Arc<CachedKey>) {
        let mut cache = write(&self.cache);
        if self.generation.load(Ordering::Acquire) != generation {
            return;
        }
        if cache.len() >= MAX_CACHED_KEYS {
            cache.clear();
        }
        cache.insert(id.to_owned(), Arc::clone(key));
    }

    /// The single location of `id` (spec §7.2): its preloaded file, else the home directory.
    fn resolve(&self, id: &str) -> Result<Location> {
        let config = read(&self.config);
        if let Some((dir, name)) = config.preloaded_dirs.get(id) {
            return Ok(Location { dir: DirFd::Keys(Arc::clone(dir)), name: name.clone() });
        }
        if let Some(location) = config.preloaded.get(id) {
            return match location {
                PreloadedLocation::File(path) => {
                    let (dir, name) = files::open_parent(path)?;
                    Ok(Location { dir: DirFd::Own(dir), name })
                }
                // Routed to the token before any file access (see `route`).
                PreloadedLocation::Pkcs11(_) => Err(Error::invalid("the key is a preloaded PKCS#11 key")),
            };
        }
        // With a PKCS#11 base slot, the home directory is the second candidate (spec §7.2).
        let home = config.homedir.clone().ok_or_else(|| Error::invalid("no way to create keys"))?;
        drop(config);
        let name = files::key_file_name(id)?;
        Ok(Location { dir: DirFd::Keys(home.keys_dir()?), name })
    }

    /// What the location of `id` holds, from the cache if possible.
    fn stored(&self, id: &str) -> Result<Stored> {
        if let Some(key) = self.cache_get(id) {
            return Ok(Stored::Key(key));
        }
        let generation = self.generation.load(Ordering::Acquire);
        let location = self.resolve(id)?;
        let stored = Self::parse_stored(location.read()?)?;
        if let Stored::Key(key) = &stored {
            self.cache_insert(id, generation, key);
        }
        Ok(stored)
    }

    fn parse_stored(bytes: Option<Zeroizing<Vec<u8>>>) -> Result<Stored> {
        match bytes {
            None => Ok(Stored::Missing),
            Some(b) if b.is_empty() => Ok(Stored::Empty),
            Some(b) => Ok(Stored::Key(Arc::new(CachedKey::parse(b)?))),
        }
    }

    /// Runs `f` on key pair `id`. Missing → invalid parameter (as upstream); empty or not a
    /// PEM private key → EXTERNAL (a corrupt pair, as upstream).
    fn with_pair<T>(&self, id: &str, f: impl FnOnce(&KeyPair) -> Result<T>) -> Result<T> {
        match self.stored(id)? {
            Stored::Missing => Err(Error::invalid("key pair not found")),
            Stored::Empty => Err(self.corrupt(id, "key file is empty")),
            Stored::Key(key) => match &*key {
                CachedKey::Pair(pair) => f(pair),
                CachedKey::Symmetric(_) => Err(self.corrupt(id, "key file is not a valid PEM private key")),
            },
        }
    }

    /// An EXTERNAL error for the corrupt file of `id`, naming the file (for the log).
    fn corrupt(&self, id: &str, what: &'static str) -> Error {
        match self.resolve(id) {
            Ok(location) => Error::external_msg(format!("{what}: {:?} (key {id:?})", location.name)),
            Err(_) => Error::external_msg(what),
        }
    }

    /// Runs `f` on symmetric key `id`. Missing → invalid parameter; empty → EXTERNAL.
    fn with_symmetric<T>(&self, id: &str, f: impl FnOnce(&SymmetricKey) -> Result<T>) -> Result<T> {
        match self.stored(id)? {
            Stored::Missing => Err(Error::invalid("key not found")),
            Stored::Empty => Err(self.corrupt(id, "key file is empty")),
            Stored::Key(key) => match &*key {
                CachedKey::Symmetric(sym) => f(sym),
                // Upstream would use the PEM text as a symmetric key (spec §10 quirk 3); we
                // follow the recommendation and refuse (see docs/compatibility.md).
                CachedKey::Pair(_) => Err(Error::invalid("id holds a key pair, not a symmetric key")),
            },
        }
    }

    /// Whether the file location of `id` holds a symmetric key (the second candidate of a
    /// dynamic key, spec §7.2).
    fn file_has_symmetric(&self, id: &str) -> Result<bool> {
        Ok(matches!(self.stored(id)?, Stored::Key(key) if matches!(&*key, CachedKey::Symmetric(_))))
    }

    /// Whether the file location of `id` holds a key pair.
    fn file_has_pair(&self, id: &str) -> Result<bool> {
        Ok(matches!(self.stored(id)?, Stored::Key(key) if matches!(&*key, CachedKey::Pair(_))))
    }

    /// Writes `bytes` to the location of `id` and drops every cached key. Caller holds
    /// `write_lock`.
    fn store_bytes(&self, location: &Location, bytes: &[u8]) -> Result<()> {
        let result = files::write_atomic(location.dir(), &location.name, bytes);
        self.invalidate();
        result
    }

    /// Reads the current content of `location` from disk (not the cache). Caller holds
    /// `write_lock`.
    fn stored_on_disk(location: &Location) -> Result<Stored> {
        Self::parse_stored(location.read()?)
    }

    fn set_homedir_path(&self, value: &str) -> Result<()> {
        if value.is_empty() {
            return Err(Error::invalid("homedir_path is empty"));
        }
        let fd = files::open_dir(Path::new(value))?;
        self.set_homedir_fd(fd);
        Ok(())
    }

    /// Upper bound of the output of `sign` (the size query of the C API's two-call protocol).
    /// Validates the key and mechanism like `sign` does, without signing.
    pub(crate) fn sign_len_bound(&self, id: &str, mechanism: SignMechanism<'_>) -> Result<usize> {
        if let Some(v) = self.p11_sign_len_bound(id, mechanism)? {
            return Ok(v);
        }
        match mechanism {
            SignMechanism::Ecdsa => self.with_pair(id, KeyPair::ecdsa_signature_len_bound),
            SignMechanism::HmacSha256 | SignMechanism::DerivedHmacSha256 { .. } => {
                self.with_symmetric(id, |_| Ok(crypto::HMAC_SHA256_LEN))
            }
        }
    }

    /// Upper bound of the output of `encrypt`; validates like `encrypt` without encrypting.
    pub(crate) fn encrypt_len_bound(
        &self,
        id: &str,
        mechanism: EncryptMechanism<'_>,
        plaintext_len: usize,
    ) -> Result<usize> {
        if let Some(v) = self.p11_encrypt_len_bound(id, mechanism, plaintext_len)? {
            return Ok(v);
        }
        match mechanism {
            EncryptMechanism::Aead { iv, .. } | EncryptMechanism::DerivedAead { iv, .. } => {
                if iv.is_empty() {
                    return Err(Error::invalid("AEAD IV is empty"));
                }
                self.with_symmetric(id, |_| crypto::aead_ciphertext_len(plaintext_len))
            }
            EncryptMechanism::RsaPkcs1 | EncryptMechanism::RsaNoPadding => self.with_pair(id, KeyPair::rsa_len),
        }
    }

    /// Exact output length of `decrypt`; validates the ciphertext framing and the key.
    pub(crate) fn decrypt_len_bound(
        &self,
        id: &str,
        mechanism: EncryptMechanism<'_>,
        ciphertext: &[u8],
    ) -> Result<usize> {
        if let Some(v) = self.p11_decrypt_len_bound(id, mechanism, ciphertext)? {
            return Ok(v);
        }
        match mechanism {
            EncryptMechanism::Aead { .. } | EncryptMechanism::DerivedAead { .. } => {
                let len = crypto::aead_plaintext_len(ciphertext)?;
                self.with_symmetric(id, |_| Ok(len))
            }
            EncryptMechanism::RsaPkcs1 | EncryptMechanism::RsaNoPadding => {
                Err(Error::invalid("RSA decryption is not supported"))
            }
        }
    }
}

impl KeyBackend for KeyStore {
    fn runs_quickly(&self, id: &str, op: crate::QuickOp) -> bool {
        // A key whose first candidate is a token (a preloaded pkcs11: key, or any key once a
        // base slot is configured) is looked up on the token, at least.
        if !matches!(self.p11_key(id), Ok(None)) {
            return false;
        }
        match (op, self.cache_get(id).as_deref()) {
            (crate::QuickOp::Symmetric { input_len }, Some(CachedKey::Symmetric(_))) => input_len <= crate::QUICK_INPUT_MAX,
            (crate::QuickOp::Pair, Some(CachedKey::Pair(pair))) => pair.is_p256(),
            _ => false,
        }
    }

    fn version(&self) -> u32 {
        VERSION_2_1_0_0
    }

    fn set_parameter(&self, name: &str, value: &str) -> Result<()> {
        match name {
            "homedir_path" => self.set_homedir_path(value),
            "pkcs11_lib_path" | "pkcs11_base_slot" => {
                if value.is_empty() {
                    return Err(Error::invalid(format!("{name} is empty")));
                }
                let value = if name == "pkcs11_base_slot" {
                    params::resolve_pkcs11_uri(value)?
                } else {
                    Zeroizing::new(value.to_owned())
                };
                let _w = lock(&self.write_lock);
                let mut config = write(&self.config);
                let slot =
                    if name == "pkcs11_lib_path" { &mut config.pkcs11_lib_path } else { &mut config.pkcs11_base_slot };
                let previous = slot.replace(value);
                let previous_state = config.pkcs11.take();
                let both = config.pkcs11_lib_path.is_some() && config.pkcs11_base_slot.is_some();
                drop(config);
                self.invalidate();
                // Spec §7.1: with both known, load the module, find the slot and open a session
                // now. On failure the previous configuration stays in force.
                if both {
                    if let Err(e) = self.pkcs11_preload() {
                        let mut config = write(&self.config);
                        let slot = if name == "pkcs11_lib_path" {
                            &mut config.pkcs11_lib_path
                        } else {
                            &mut config.pkcs11_base_slot
                        };
                        *slot = previous;
                        config.pkcs11 = previous_state;
                        return Err(e);
                    }
                }
                Ok(())
            }
            _ => match name.strip_prefix("preloaded_key:") {
                Some("") => Err(Error::invalid("preloaded key id is empty")),
                Some(id) => {
                    let location = params::parse_preloaded_location(value)?;
                    let _w = lock(&self.write_lock);
                    let mut config = write(&self.config);
                    config.preloaded_dirs.remove(id);
                    config.preloaded.insert(id.to_owned(), location);
                    drop(config);
                    self.invalidate();
                    Ok(())
                }
                None => Err(Error::invalid(format!("unknown parameter {name:?}"))),
            },
        }
    }

    fn create_key_pair_if_not_exists(&self, id: &str, preferred_algorithms: Option<&str>) -> Result<()> {
        // PKCS#11 tries every listed algorithm; the file backend only the first (spec §7.4).
        let algorithms = crypto::parse_preferred_algorithms(preferred_algorithms)?;
        if algorithms.is_empty() {
            return Err(Error::invalid("preferred_algorithms names no supported algorithm"));
        }
        if let Some(key) = self.cache_get(id) {
            if let CachedKey::Pair(_) = &*key {
                return Ok(());
            }
        }
        if self.p11_create_key_pair(id, &algorithms)? {
            return Ok(());
        }
        let algorithm = algorithms[0];
        let _w = lock(&self.write_lock);
        let location = self.resolve(id)?;
        match Self::stored_on_disk(&location)? {
            Stored::Key(key) => match &*key {
                CachedKey::Pair(_) => return Ok(()),
                // Upstream treats an unparsable file as missing and overwrites it, destroying
                // a symmetric key of the same ID (spec §10 quirk 3). We follow the
                // recommendation and refuse (see docs/compatibility.md).
                CachedKey::Symmetric(_) => {
                    return Err(Error::invalid(
                        "id holds a symmetric key (or an unreadable key pair); refusing to overwrite it",
                    ))
                }
            },
            Stored::Missing | Stored::Empty => {}
        }
        let pkey = crypto::generate_key_pair(algorithm)?;
        let pem = crypto::key_pair_to_pem(&pkey)?;
        self.store_bytes(&location, &pem)
    }

    fn move_key_pair(&self, from: &str, to: &str) -> Result<()> {
        if self.p11_move_key_pair(from, to)? {
            return Ok(());
        }
        let _w = lock(&self.write_lock);
        let source = self.resolve(from)?;
        let destination = self.resolve(to)?;
        // Upstream renames over any destination. Replacing a key pair is what a move is for,
        // but replacing a symmetric key of the destination ID would be the quirk-3 overwrite
        // (spec §10); refused like create_key_pair_if_not_exists does (see docs/compatibility.md).
        if let Stored::Key(key) = Self::stored_on_disk(&destination)? {
            if let CachedKey::Symmetric(_) = &*key {
                return Err(Error::invalid("destination id holds a symmetric key; refusing to overwrite it"));
            }
        }
        let result = files::rename_file(source.dir(), &source.name, destination.dir(), &destination.name);
        self.invalidate();
        result
    }

    fn load_key_pair(&self, id: &str) -> Result<()> {
        if self.p11_pair(id)?.is_some() {
            return Ok(());
        }
        self.with_pair(id, |_| Ok(()))
    }

    fn get_key_pair_parameter(&self, id: &str, parameter: KeyPairParameter) -> Result<Vec<u8>> {
        if let Some(v) = self.p11_pair_parameter(id, parameter)? {
            return Ok(v);
        }
        self.with_pair(id, |pair| pair.parameter(parameter))
    }

    fn delete_key_pair(&self, id: &str) -> Result<()> {
        if self.p11_delete(id, true)? {
            return Ok(());
        }
        let _w = lock(&self.write_lock);
        let location = self.resolve(id)?;
        let result = files::remove_file(location.dir(), &location.name);
        self.invalidate();
        result.map(drop)
    }

    fn create_key_if_not_exists(&self, id: &str, usage: KeyUsage) -> Result<()> {
        // Usage is neither stored nor enforced by the file backend (spec §7.6).
        // Fast path: keyd calls this before every handle mint/verification.
        if let Some(key) = self.cache_get(id) {
            if let CachedKey::Symmetric(_) = &*key {
                return Ok(());
            }
        }
        if self.p11_create_key(id, usage, None)? {
            return Ok(());
        }
        let _w = lock(&self.write_lock);
        let location = self.resolve(id)?;
        match Self::stored_on_disk(&location)? {
            Stored::Key(key) => match &*key {
                CachedKey::Symmetric(_) => Ok(()),
                // Upstream would accept the PEM file as an existing symmetric key (spec §10
                // quirk 3); we refuse (see docs/compatibility.md).
                CachedKey::Pair(_) => Err(Error::invalid("id holds a key pair, not a symmetric key")),
            },
            Stored::Missing | Stored::Empty => {
                let key = crypto::random_symmetric_key()?;
                self.store_bytes(&location, &key)
            }
        }
    }

    fn load_key(&self, id: &str) -> Result<()> {
        if self.p11_secret(id)?.is_some() {
            return Ok(());
        }
        self.with_symmetric(id, |_| Ok(()))
    }

    fn import_key(&self, id: &str, bytes: &[u8], usage: KeyUsage) -> Result<()> {
        if bytes.is_empty() {
            // An empty key file would read back as "missing"/"empty"; refuse it outright.
            return Err(Error::invalid("key bytes are empty"));
        }
        if bytes.len() > files::MAX_KEY_FILE_LEN {
            return Err(Error::invalid("key bytes are too long"));
        }
        if crypto::parse_private_key_pem(bytes).is_some() {
            // Stored as is, this would read back as a key pair, not as the symmetric key asked
            // for (spec §10 quirk 3; see docs/compatibility.md).
            return Err(Error::invalid("key bytes are a PEM private key, not a symmetric key"));
        }
        if self.p11_create_key(id, usage, Some(bytes))? {
            return Ok(());
        }
        let _w = lock(&self.write_lock);
        let location = self.resolve(id)?;
        if let Stored::Key(key) = Self::stored_on_disk(&location)? {
            if let CachedKey::Pair(_) = &*key {
                // Upstream overwrites; we refuse to replace a key pair with a symmetric key
                // (spec §10 quirk 3; see docs/compatibility.md).
                return Err(Error::invalid("id holds a key pair; refusing to overwrite it"));
            }
        }
        self.store_bytes(&location, bytes)
    }

    fn delete_key(&self, id: &str) -> Result<()> {
        if self.p11_delete(id, false)? {
            return Ok(());
        }
        let _w = lock(&self.write_lock);
        let location = self.resolve(id)?;
        let result = files::remove_file(location.dir(), &location.name);
        self.invalidate();
        result.map(drop)
    }

    fn derive_key(&self, base_id: &str, derivation_data: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        if let Some(v) = self.p11_derive_key(base_id, derivation_data)? {
            return Ok(v);
        }
        self.with_symmetric(base_id, |base| base.derive(derivation_data))
    }

    fn sign(&self, id: &str, mechanism: SignMechanism<'_>, data: &[u8]) -> Result<Vec<u8>> {
        if let Some(v) = self.p11_sign(id, mechanism, data)? {
            return Ok(v);
        }
        match mechanism {
            SignMechanism::Ecdsa => self.with_pair(id, |pair| pair.ecdsa_sign(data)),
            SignMechanism::HmacSha256 => self.with_symmetric(id, |key| key.hmac_sha256(data)),
            SignMechanism::DerivedHmacSha256 { derivation_data } => self.with_symmetric(id, |base| {
                let derived = base.derive(derivation_data)?;
                crypto::hmac_sha256(&derived, data)
            }),
        }
    }

    fn verify(&self, id: &str, mechanism: SignMechanism<'_>, data: &[u8], signature: &[u8]) -> Result<bool> {
        if let Some(v) = self.p11_verify(id, mechanism, data, signature)? {
            return Ok(v);
        }
        match mechanism {
            SignMechanism::HmacSha256 => {
                self.with_symmetric(id, |key| Ok(crypto::mac_matches(&key.hmac_sha256(data)?, signature)))
            }
            // Upstream supports only HMAC-SHA256 verification (spec §8.5).
            SignMechanism::Ecdsa | SignMechanism::DerivedHmacSha256 { .. } => {
                Err(Error::invalid("verify supports only HMAC-SHA256"))
            }
        }
    }

    fn encrypt(&self, id: &str, mechanism: EncryptMechanism<'_>, plaintext: &[u8]) -> Result<Vec<u8>> {
        if let Some(v) = self.p11_encrypt(id, mechanism, plaintext)? {
            return Ok(v);
        }
        match mechanism {
            EncryptMechanism::Aead { iv, aad } => {
                self.with_symmetric(id, |key| crypto::aead_encrypt(key.bytes(), iv, aad, plaintext))
            }
            EncryptMechanism::DerivedAead { derivation_data, iv, aad } => self.with_symmetric(id, |base| {
                let derived = base.derive(derivation_data)?;
                crypto::aead_encrypt(&derived, iv, aad, plaintext)
            }),
            EncryptMechanism::RsaPkcs1 => {
                self.with_pair(id, |pair| pair.rsa_private_encrypt(RsaMode::Pkcs1, plaintext))
            }
            EncryptMechanism::RsaNoPadding => {
                self.with_pair(id, |pair| pair.rsa_private_encrypt(RsaMode::NoPadding, plaintext))
            }
        }
    }

    fn decrypt(&self, id: &str, mechanism: EncryptMechanism<'_>, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        if let Some(v) = self.p11_decrypt(id, mechanism, ciphertext)? {
            return Ok(v);
        }
        match mechanism {
            EncryptMechanism::Aead { iv, aad } => {
                self.with_symmetric(id, |key| crypto::aead_decrypt(key.bytes(), iv, aad, ciphertext))
            }
            EncryptMechanism::DerivedAead { derivation_data, iv, aad } => self.with_symmetric(id, |base| {
                let derived = base.derive(derivation_data)?;
                crypto::aead_decrypt(&derived, iv, aad, ciphertext)
            }),
            // Public-key operations are the caller's job (spec §5.13).
            EncryptMechanism::RsaPkcs1 | EncryptMechanism::RsaNoPadding => {
                Err(Error::invalid("RSA decryption is not supported"))
            }
        }
    }
}
