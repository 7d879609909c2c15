//! A third-party `libaziot_keys.so` loaded at run time (spec/keyd.md §1 step 2, §6, §8).
//!
//! The C API requires calls to be serialized, so every call (including both halves of a
//! two-call buffer exchange) runs under one mutex. The library is never unloaded: a module may
//! have started threads or registered handlers that would outlive its code.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use zeroize::Zeroizing;

use crate::c_abi::types::*;
use crate::{EncryptMechanism, Error, KeyBackend, KeyPairParameter, KeyUsage, Result, SignMechanism};

/// Outputs longer than this reported by a size query are treated as a library failure rather
/// than allocated.
const MAX_OUTPUT_LEN: usize = 64 << 20;

/// The function pointers of the loaded list; the 2.1-only ones are `None` for a 2.0 library.
struct Functions {
    set_parameter: SetParameterFn,
    create_key_pair_if_not_exists: CreateKeyPairIfNotExistsFn,
    move_key_pair: Option<MoveKeyPairFn>,
    load_key_pair: LoadKeyPairFn,
    get_key_pair_parameter: GetKeyPairParameterFn,
    delete_key_pair: Option<DeleteKeyPairFn>,
    create_key_if_not_exists: CreateKeyIfNotExistsFn,
    load_key: LoadKeyFn,
    import_key: ImportKeyFn,
    delete_key: Option<DeleteKeyFn>,
    derive_key: DeriveKeyFn,
    sign: SignFn,
    verify: VerifyFn,
    encrypt: EncryptFn,
    decrypt: DecryptFn,
}

/// A libaziot_keys implementation loaded with `dlopen`.
pub struct ForeignLibrary {
    version: u32,
    functions: Mutex<Functions>,
}

impl std::fmt::Debug for ForeignLibrary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForeignLibrary").field("version", &format_args!("0x{:08x}", self.version)).finish()
    }
}

fn required<T>(f: Option<T>, name: &'static str) -> Result<T> {
    f.ok_or_else(|| Error::external_msg(format!("library does not define {name}")))
}

fn dlerror_message() -> String {
    // SAFETY: dlerror has no preconditions; it returns NULL or a NUL-terminated string that
    // stays valid until the next dl* call on this thread, and is copied immediately.
    let msg = unsafe { libc::dlerror() };
    if msg.is_null() {
        return "unknown error".to_owned();
    }
    // SAFETY: non-NULL, NUL-terminated (see above).
    unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned()
}

/// Maps a library return code to our error type.
fn check(rc: AziotKeysRc, function: &'static str) -> Result<()> {
    match rc {
        crate::RC_OK => Ok(()),
        crate::RC_ERR_INVALID_PARAMETER => {
            Err(Error::invalid(format!("{function} returned AZIOT_KEYS_RC_ERR_INVALID_PARAMETER")))
        }
        crate::RC_ERR_EXTERNAL => Err(Error::external_msg(format!("{function} returned AZIOT_KEYS_RC_ERR_EXTERNAL"))),
        other => Err(Error::external_msg(format!("{function} returned 0x{other:08x}"))),
    }
}

fn c_string(s: &str, what: &'static str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::invalid(format!("{what} contains NUL")))
}

/// The two-call protocol against the library: size query with a NULL buffer, allocate, call
/// again. A library that then claims to have written more than the buffer holds has corrupted
/// memory: abort, as keyd does (spec §6).
fn two_call(
    function: &'static str,
    mut call: impl FnMut(*mut u8, *mut usize) -> AziotKeysRc,
) -> Result<Zeroizing<Vec<u8>>> {
    let mut len = 0usize;
    check(call(std::ptr::null_mut(), &mut len), function)?;
    if len > MAX_OUTPUT_LEN {
        return Err(Error::external_msg(format!("{function} reported an implausible output length")));
    }
    let mut buf = Zeroizing::new(vec![0u8; len]);
    let mut written = len;
    check(call(buf.as_mut_ptr(), &mut written), function)?;
    if written > len {
        // The library wrote (or claims to have written) past our buffer.
        std::process::abort();
    }
    buf.truncate(written);
    Ok(buf)
}

fn plain(mut z: Zeroizing<Vec<u8>>) -> Vec<u8> {
    std::mem::take(&mut *z)
}

impl ForeignLibrary {
    /// Loads the library at `path` (`RTLD_NOW | RTLD_LOCAL`), asks for function list 2.1.0.0,
    /// then 2.0.0.0, and checks the reported version and that every function of that version is
    /// defined. Errors are EXTERNAL with the messages of spec §1.
    pub fn load(path: &Path) -> Result<Self> {
        let c_path =
            CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::invalid("library path contains NUL"))?;
        // SAFETY: `c_path` is a valid NUL-terminated string. Loading runs the library's
        // initializers; choosing to trust the configured library is the operator's decision.
        let handle = unsafe { libc::dlopen(c_path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(Error::external_msg(format!("could not load libaziot-keys: {}", dlerror_message())));
        }
        // SAFETY: `handle` is a live handle from dlopen; the name is NUL-terminated.
        let symbol = unsafe { libc::dlsym(handle, c"aziot_keys_get_function_list".as_ptr()) };
        if symbol.is_null() {
            return Err(Error::external_msg("library does not define aziot_keys_get_function_list"));
        }
        // SAFETY: the C API defines this symbol with exactly this signature (spec §8.3); a
        // data pointer from dlsym and a function pointer have the same size on POSIX.
        let get_function_list: GetFunctionListFn =
            unsafe { std::mem::transmute::<*mut c_void, GetFunctionListFn>(symbol) };

        let mut list: *const FunctionListBase = std::ptr::null();
        // SAFETY: `list` is a valid out-pointer for the duration of the call.
        let mut rc = unsafe { get_function_list(AZIOT_KEYS_VERSION_2_1_0_0, &mut list) };
        if rc != crate::RC_OK {
            // SAFETY: as above.
            rc = unsafe { get_function_list(AZIOT_KEYS_VERSION_2_0_0_0, &mut list) };
        }
        if rc != crate::RC_OK {
            return Err(Error::external_msg(format!("could not get function list: {rc}")));
        }
        if list.is_null() {
            return Err(Error::external_msg("could not get function list: library returned NULL"));
        }
        // SAFETY: non-NULL; the library returns a pointer to a static list beginning with the
        // base struct, valid for the life of the (never unloaded) library.
        let version = unsafe { (*list).version };
        let functions = match version {
            AZIOT_KEYS_VERSION_2_1_0_0 => {
                // SAFETY: the version field says the static list has the 2.1.0.0 layout.
                let l = unsafe { &*list.cast::<FunctionList2_1_0_0>() };
                Functions {
                    set_parameter: required(l.set_parameter, "set_parameter")?,
                    create_key_pair_if_not_exists: required(
                        l.create_key_pair_if_not_exists,
                        "create_key_pair_if_not_exists",
                    )?,
                    move_key_pair: Some(required(l.move_key_pair, "move_key_pair")?),
                    load_key_pair: required(l.load_key_pair, "load_key_pair")?,
                    get_key_pair_parameter: required(l.get_key_pair_parameter, "get_key_pair_parameter")?,
                    delete_key_pair: Some(required(l.delete_key_pair, "delete_key_pair")?),
                    create_key_if_not_exists: required(l.create_key_if_not_exists, "create_key_if_not_exists")?,
                    load_key: required(l.load_key, "load_key")?,
                    import_key: required(l.import_key, "import_key")?,
                    delete_key: Some(required(l.delete_key, "delete_key")?),
                    derive_key: required(l.derive_key, "derive_key")?,
                    sign: required(l.sign, "sign")?,
                    verify: required(l.verify, "verify")?,
                    encrypt: required(l.encrypt, "encrypt")?,
                    decrypt: required(l.decrypt, "decrypt")?,
                }
            }
            AZIOT_KEYS_VERSION_2_0_0_0 => {
                // SAFETY: the version field says the static list has the 2.0.0.0 layout.
                let l = unsafe { &*list.cast::<FunctionList2_0_0_0>() };
                Functions {
                    set_parameter: required(l.set_parameter, "set_parameter")?,
                    create_key_pair_if_not_exists: required(
                        l.create_key_pair_if_not_exists,
                        "create_key_pair_if_not_exists",
                    )?,
                    move_key_pair: None,
                    load_key_pair: required(l.load_key_pair, "load_key_pair")?,
                    get_key_pair_parameter: required(l.get_key_pair_parameter, "get_key_pair_parameter")?,
                    delete_key_pair: None,
                    create_key_if_not_exists: required(l.create_key_if_not_exists, "create_key_if_not_exists")?,
                    load_key: required(l.load_key, "load_key")?,
                    import_key: required(l.import_key, "import_key")?,
                    delete_key: None,
                    derive_key: required(l.derive_key, "derive_key")?,
                    sign: required(l.sign, "sign")?,
                    verify: required(l.verify, "verify")?,
                    encrypt: required(l.encrypt, "encrypt")?,
                    decrypt: required(l.decrypt, "decrypt")?,
                }
            }
            other => {
                return Err(Error::external_msg(format!(
                    "library exports API version 0x{other:08x} which is not supported"
                )))
            }
        };
        Ok(ForeignLibrary { version, functions: Mutex::new(functions) })
    }

    fn lock(&self) -> MutexGuard<'_, Functions> {
        self.functions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Calls a `(const char *id) -> RC` function.
    fn call_id(
        &self,
        id: &str,
        pick: impl FnOnce(&Functions) -> unsafe extern "C" fn(*const c_char) -> AziotKeysRc,
        name: &'static str,
    ) -> Result<()> {
        let id = c_string(id, "id")?;
        let f = self.lock();
        let function = pick(&f);
        // SAFETY: a function of the library's list (see `load`); `id` is a valid C string for
        // the duration of the call; calls are serialized by the held lock.
        check(unsafe { function(id.as_ptr()) }, name)
    }
}

/// The C form of a sign mechanism; owns the parameter struct the pointer refers to.
enum SignParams {
    None(c_uint),
    Derived(SignDerivedParameters),
}

impl SignParams {
    fn new(mechanism: SignMechanism<'_>) -> Self {
        match mechanism {
            SignMechanism::Ecdsa => SignParams::None(AZIOT_KEYS_SIGN_MECHANISM_ECDSA),
            SignMechanism::HmacSha256 => SignParams::None(AZIOT_KEYS_SIGN_MECHANISM_HMAC_SHA256),
            SignMechanism::DerivedHmacSha256 { derivation_data } => SignParams::Derived(SignDerivedParameters {
                derivation_data: derivation_data.as_ptr(),
                derivation_data_len: derivation_data.len(),
                mechanism: AZIOT_KEYS_SIGN_MECHANISM_HMAC_SHA256,
                parameters: std::ptr::null(),
            }),
        }
    }

    fn raw(&self) -> (c_uint, *const c_void) {
        match self {
            SignParams::None(m) => (*m, std::ptr::null()),
            SignParams::Derived(p) => (AZIOT_KEYS_SIGN_MECHANISM_DERIVED, std::ptr::from_ref(p).cast()),
        }
    }
}

/// The C form of an encrypt mechanism. Boxed so that the nested pointer of the DERIVED
/// parameters to the AEAD parameters stays valid when this value moves.
enum EncryptParams {
    None(c_uint),
    Aead(Box<EncryptAeadParameters>),
    Derived(Box<(EncryptAeadParameters, EncryptDerivedParameters)>),
}

fn aead_params(iv: &[u8], aad: &[u8]) -> EncryptAeadParameters {
    EncryptAeadParameters { iv: iv.as_ptr(), iv_len: iv.len(), aad: aad.as_ptr(), aad_len: aad.len() }
}

impl EncryptParams {
    fn new(mechanism: EncryptMechanism<'_>) -> Self {
        match mechanism {
            EncryptMechanism::Aead { iv, aad } => EncryptParams::Aead(Box::new(aead_params(iv, aad))),
            EncryptMechanism::RsaPkcs1 => EncryptParams::None(AZIOT_KEYS_ENCRYPT_MECHANISM_RSA_PKCS1),
            EncryptMechanism::RsaNoPadding => EncryptParams::None(AZIOT_KEYS_ENCRYPT_MECHANISM_RSA_NO_PADDING),
            EncryptMechanism::DerivedAead { derivation_data, iv, aad } => {
                let mut boxed = Box::new((
                    aead_params(iv, aad),
                    EncryptDerivedParameters {
                        derivation_data: derivation_data.as_ptr(),
                        derivation_data_len: derivation_data.len(),
                        mechanism: AZIOT_KEYS_ENCRYPT_MECHANISM_AEAD,
                        parameters: std::ptr::null(),
                    },
                ));
                boxed.1.parameters = std::ptr::from_ref(&boxed.0).cast();
                EncryptParams::Derived(boxed)
            }
        }
    }

    fn raw(&self) -> (c_uint, *const c_void) {
        match self {
            EncryptParams::None(m) => (*m, std::ptr::null()),
            EncryptParams::Aead(p) => (AZIOT_KEYS_ENCRYPT_MECHANISM_AEAD, std::ptr::from_ref(&**p).cast()),
            EncryptParams::Derived(p) => (AZIOT_KEYS_ENCRYPT_MECHANISM_DERIVED, std::ptr::from_ref(&p.1).cast()),
        }
    }
}

impl KeyBackend for ForeignLibrary {
    fn version(&self) -> u32 {
        self.version
    }

    fn set_parameter(&self, name: &str, value: &str) -> Result<()> {
        let (name, value) = (c_string(name, "name")?, c_string(value, "value")?);
        let f = self.lock();
        // SAFETY: function from the library's list; valid C strings; serialized by the lock.
        check(unsafe { (f.set_parameter)(name.as_ptr(), value.as_ptr()) }, "set_parameter")
    }

    fn create_key_pair_if_not_exists(&self, id: &str, preferred_algorithms: Option<&str>) -> Result<()> {
        let id = c_string(id, "id")?;
        let algorithms = preferred_algorithms.map(|a| c_string(a, "preferred_algorithms")).transpose()?;
        let algorithms_ptr = algorithms.as_ref().map_or(std::ptr::null(), |a| a.as_ptr());
        let f = self.lock();
        // SAFETY: function from the library's list; valid C strings or NULL (allowed: "*");
        // serialized by the lock.
        check(
            unsafe { (f.create_key_pair_if_not_exists)(id.as_ptr(), algorithms_ptr) },
            "create_key_pair_if_not_exists",
        )
    }

    fn move_key_pair(&self, from: &str, to: &str) -> Result<()> {
        let (from, to) = (c_string(from, "from")?, c_string(to, "to")?);
        let f = self.lock();
        // A 2.0.0.0 library cannot move: silently succeed, as upstream keyd (spec §10 quirk 9).
        let Some(move_key_pair) = f.move_key_pair else { return Ok(()) };
        // SAFETY: function from the library's list; valid C strings; serialized by the lock.
        check(unsafe { move_key_pair(from.as_ptr(), to.as_ptr()) }, "move_key_pair")
    }

    fn load_key_pair(&self, id: &str) -> Result<()> {
        self.call_id(id, |f| f.load_key_pair, "load_key_pair")
    }

    fn get_key_pair_parameter(&self, id: &str, parameter: KeyPairParameter) -> Result<Vec<u8>> {
        let id = c_string(id, "id")?;
        let f = self.lock();
        let out = two_call("get_key_pair_parameter", |buf, len| {
            // SAFETY: function from the library's list; `buf` is NULL or valid for `*len`
            // bytes, `len` is a valid pointer; serialized by the held lock.
            unsafe { (f.get_key_pair_parameter)(id.as_ptr(), parameter as c_uint, buf, len) }
        })?;
        Ok(plain(out))
    }

    fn delete_key_pair(&self, id: &str) -> Result<()> {
        let id = c_string(id, "id")?;
        let f = self.lock();
        // 2.0.0.0: silent no-op (spec §10 quirk 9).
        let Some(delete) = f.delete_key_pair else { return Ok(()) };
        // SAFETY: function from the library's list; valid C string; serialized by the lock.
        check(unsafe { delete(id.as_ptr()) }, "delete_key_pair")
    }

    fn create_key_if_not_exists(&self, id: &str, usage: KeyUsage) -> Result<()> {
        let id = c_string(id, "id")?;
        let f = self.lock();
        // SAFETY: function from the library's list; valid C string; serialized by the lock.
        check(unsafe { (f.create_key_if_not_exists)(id.as_ptr(), usage.0) }, "create_key_if_not_exists")
    }

    fn load_key(&self, id: &str) -> Result<()> {
        self.call_id(id, |f| f.load_key, "load_key")
    }

    fn import_key(&self, id: &str, bytes: &[u8], usage: KeyUsage) -> Result<()> {
        let id = c_string(id, "id")?;
        let f = self.lock();
        // SAFETY: function from the library's list; `bytes` valid for its length; serialized.
        check(unsafe { (f.import_key)(id.as_ptr(), bytes.as_ptr(), bytes.len(), usage.0) }, "import_key")
    }

    fn delete_key(&self, id: &str) -> Result<()> {
        let id = c_string(id, "id")?;
        let f = self.lock();
        // 2.0.0.0: silent no-op (spec §10 quirk 9).
        let Some(delete) = f.delete_key else { return Ok(()) };
        // SAFETY: function from the library's list; valid C string; serialized by the lock.
        check(unsafe { delete(id.as_ptr()) }, "delete_key")
    }

    fn derive_key(&self, base_id: &str, derivation_data: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let base_id = c_string(base_id, "base_id")?;
        let f = self.lock();
        two_call("derive_key", |buf, len| {
            // SAFETY: function from the library's list; input valid for its length; `buf` NULL
            // or valid for `*len` bytes; serialized by the held lock.
            unsafe { (f.derive_key)(base_id.as_ptr(), derivation_data.as_ptr(), derivation_data.len(), buf, len) }
        })
    }

    fn sign(&self, id: &str, mechanism: SignMechanism<'_>, data: &[u8]) -> Result<Vec<u8>> {
        let id = c_string(id, "id")?;
        let params = SignParams::new(mechanism);
        let (mechanism, parameters) = params.raw();
        let f = self.lock();
        let out = two_call("sign", |buf, len| {
            // SAFETY: function from the library's list; `parameters` is NULL or points to the
            // mechanism's struct owned by `params`; buffers valid as described; serialized.
            unsafe { (f.sign)(id.as_ptr(), mechanism, parameters, data.as_ptr(), data.len(), buf, len) }
        })?;
        Ok(plain(out))
    }

    fn verify(&self, id: &str, mechanism: SignMechanism<'_>, data: &[u8], signature: &[u8]) -> Result<bool> {
        let id = c_string(id, "id")?;
        let params = SignParams::new(mechanism);
        let (mechanism, parameters) = params.raw();
        let mut ok: c_int = 0;
        let f = self.lock();
        // SAFETY: function from the library's list; pointers valid for the call; serialized.
        let rc = unsafe {
            (f.verify)(
                id.as_ptr(),
                mechanism,
                parameters,
                data.as_ptr(),
                data.len(),
                signature.as_ptr(),
                signature.len(),
                &mut ok,
            )
        };
        check(rc, "verify")?;
        Ok(ok != 0)
    }

    fn encrypt(&self, id: &str, mechanism: EncryptMechanism<'_>, plaintext: &[u8]) -> Result<Vec<u8>> {
        let id = c_string(id, "id")?;
        let params = EncryptParams::new(mechanism);
        let (mechanism, parameters) = params.raw();
        let f = self.lock();
        let out = two_call("encrypt", |buf, len| {
            // SAFETY: function from the library's list; `parameters` points into `params`
            // (alive for the call); buffers valid as described; serialized by the held lock.
            unsafe { (f.encrypt)(id.as_ptr(), mechanism, parameters, plaintext.as_ptr(), plaintext.len(), buf, len) }
        })?;
        Ok(plain(out))
    }

    fn decrypt(&self, id: &str, mechanism: EncryptMechanism<'_>, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        let id = c_string(id, "id")?;
        let params = EncryptParams::new(mechanism);
        let (mechanism, parameters) = params.raw();
        let f = self.lock();
        two_call("decrypt", |buf, len| {
            // SAFETY: as in `encrypt`.
            unsafe { (f.decrypt)(id.as_ptr(), mechanism, parameters, ciphertext.as_ptr(), ciphertext.len(), buf, len) }
        })
    }
}
