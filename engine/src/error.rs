//! Errors: a typed enum for the Rust API, and their place on OpenSSL's error queue (spec keyd.md
//! §9.3) under the library name `aziot_key_openssl_engine`, with the function names of the spec
//! and the cause as the error's data text.
//!
//! OpenSSL 3 has no function codes any more: the function name is a string given with
//! `ERR_set_debug`, the library name and the reason texts are registered once with
//! `ERR_load_strings` under a library number from `ERR_get_next_error_library`.

use std::ffi::{c_int, CStr, CString};
use std::sync::OnceLock;

/// What went wrong talking to keyd or building a key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("keyd is unreachable at {path}: {source}")]
    Unreachable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("lost the connection to keyd at {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("keyd answered HTTP {status}: {message}")]
    Keyd { status: u16, message: String },
    #[error("keyd sent a malformed response: {0}")]
    Protocol(String),
    #[error("unsupported key: {0}")]
    UnsupportedKey(String),
    #[error("unsupported RSA padding {0} (only PKCS#1 v1.5 and none; PSS and OAEP are done by OpenSSL above this)")]
    UnsupportedPadding(c_int),
    #[error("invalid keyd endpoint {0:?} (expected unix:///absolute/path)")]
    Endpoint(String),
    #[error("the key handle {0}")]
    BadHandle(&'static str),
    #[error(
        "invalid aziot-keys URI: {0} (expected aziot-keys:handle=<percent-encoded key handle>)"
    )]
    BadUri(String),
    #[error("RSA decryption failed")]
    Decrypt,
    #[error("this key has no keyd handle attached (not loaded through aziot_keys)")]
    NoContext,
    #[error("OpenSSL: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
    #[error("internal error in the engine (a bug: {0})")]
    Internal(String),
}

/// Reason codes (the second field of the packed error code) and their texts.
const REASONS: &[(c_int, &CStr)] = &[
    (100, c"keyd unreachable"),
    (101, c"connection to keyd lost"),
    (102, c"keyd refused the request"),
    (103, c"malformed response from keyd"),
    (104, c"unsupported key"),
    (105, c"unsupported padding"),
    (106, c"invalid keyd endpoint"),
    (107, c"invalid key handle"),
    (108, c"decryption failed"),
    (109, c"key not loaded through aziot_keys"),
    (110, c"OpenSSL call failed"),
    (111, c"internal error"),
    (112, c"invalid key URI"),
];

impl Error {
    fn reason(&self) -> c_int {
        match self {
            Error::Unreachable { .. } => 100,
            Error::Io { .. } => 101,
            Error::Keyd { .. } => 102,
            Error::Protocol(_) => 103,
            Error::UnsupportedKey(_) => 104,
            Error::UnsupportedPadding(_) => 105,
            Error::Endpoint(_) => 106,
            Error::BadHandle(_) => 107,
            Error::Decrypt => 108,
            Error::NoContext => 109,
            Error::OpenSsl(_) => 110,
            Error::Internal(_) => 111,
            Error::BadUri(_) => 112,
        }
    }
}

/// The function names of spec §9.3 (the `ERR_set_debug` function field).
#[derive(Clone, Copy, Debug)]
pub enum Func {
    LoadPrivkey,
    LoadPubkey,
    PkeyMeths,
    EcSign,
    RsaPrivEnc,
    /// Not in upstream (its `priv_dec` always fails): our RSA decryption (docs/compatibility.md).
    RsaPrivDec,
    Bind,
    Init,
    Destroy,
    /// The OpenSSL 3 provider `aziot_keys` (docs/engine.md "The provider").
    ProvStoreOpen,
    ProvStoreLoad,
    ProvKeymgmt,
    ProvSign,
    ProvVerify,
    ProvDecrypt,
    /// The provider's key reference file decoders (provider/decoder.rs).
    ProvDecode,
}

impl Func {
    fn name(self) -> &'static CStr {
        match self {
            Func::LoadPrivkey => c"aziot_key_engine_load_privkey",
            Func::LoadPubkey => c"aziot_key_engine_load_pubkey",
            Func::PkeyMeths => c"aziot_key_engine_pkey_meths",
            Func::EcSign => c"aziot_key_ec_sign",
            Func::RsaPrivEnc => c"aziot_key_rsa_priv_enc",
            Func::RsaPrivDec => c"aziot_key_rsa_priv_dec",
            Func::Bind => c"aziot_key_engine_shared_bind",
            Func::Init => c"aziot_key_engine_shared_init",
            Func::Destroy => c"aziot_key_engine_shared_destroy",
            Func::ProvStoreOpen => c"aziot_keys_provider_store_open",
            Func::ProvStoreLoad => c"aziot_keys_provider_store_load",
            Func::ProvKeymgmt => c"aziot_keys_provider_keymgmt",
            Func::ProvSign => c"aziot_keys_provider_sign",
            Func::ProvVerify => c"aziot_keys_provider_verify",
            Func::ProvDecrypt => c"aziot_keys_provider_decrypt",
            Func::ProvDecode => c"aziot_keys_provider_decode",
        }
    }
}

/// The library name on the error queue.
pub const LIBRARY_NAME: &CStr = c"aziot_key_openssl_engine";

/// The dynamic library number, registered with its strings on first use.
pub(crate) fn library() -> c_int {
    static LIB: OnceLock<c_int> = OnceLock::new();
    *LIB.get_or_init(|| {
        openssl_sys::init();
        // SAFETY: no preconditions; returns a fresh library number (≥ ERR_LIB_USER).
        let lib = unsafe { openssl_sys::ERR_get_next_error_library() };
        // OpenSSL keeps (and patches: ORs the library into `error`) these arrays for the life of
        // the process: they are leaked on purpose, once. The strings are 'static.
        let mut reasons: Vec<openssl_sys::ERR_STRING_DATA> = REASONS
            .iter()
            .map(|(code, text)| openssl_sys::ERR_STRING_DATA {
                error: openssl_sys::ERR_PACK(0, 0, *code),
                string: text.as_ptr(),
            })
            .collect();
        reasons.push(openssl_sys::ERR_STRING_DATA {
            error: 0,
            string: std::ptr::null(),
        });
        let names = vec![
            // the library's own entry: code ERR_PACK(lib, 0, 0) (3.0's err_patch stops at a 0 code)
            openssl_sys::ERR_STRING_DATA {
                error: openssl_sys::ERR_PACK(lib, 0, 0),
                string: LIBRARY_NAME.as_ptr(),
            },
            openssl_sys::ERR_STRING_DATA {
                error: 0,
                string: std::ptr::null(),
            },
        ];
        // SAFETY: both arrays are NULL-terminated, leaked (valid for the rest of the process),
        // and their strings are 'static C strings; ERR_load_strings is thread-safe.
        unsafe {
            openssl_sys::ERR_load_strings(lib, Box::leak(reasons.into_boxed_slice()).as_mut_ptr());
            openssl_sys::ERR_load_strings(lib, Box::leak(names.into_boxed_slice()).as_mut_ptr());
        }
        lib
    })
}

/// Puts `e` on the calling thread's OpenSSL error queue, in function `func`, with the whole
/// cause chain as the data text (one line: keyd's multi-line messages are joined with "; ").
#[track_caller]
pub fn push(func: Func, e: &Error) {
    let lib = library();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        // `Unreachable`/`Io` already print their io::Error; OpenSsl prints its stack.
        if !text.contains(&s.to_string()) {
            text.push_str(": ");
            text.push_str(&s.to_string());
        }
        source = s.source();
    }
    let text = CString::new(text.replace('\n', "; ").replace('\0', "\\0")).unwrap_or_default();
    let loc = std::panic::Location::caller();
    let file = CString::new(loc.file()).unwrap_or_default();
    // SAFETY: ERR_new starts a new error record on this thread's queue; ERR_set_debug gets
    // NUL-terminated strings that live for the rest of the process (`func` is 'static, `file` is
    // interned below), so it does not matter whether OpenSSL copies them; ERR_set_error's format
    // is "%s" with exactly one C string argument, alive for the call.
    unsafe {
        openssl_sys::ERR_new();
        openssl_sys::ERR_set_debug(leak_file(file), loc.line() as c_int, func.name().as_ptr());
        openssl_sys::ERR_set_error(lib, e.reason(), c"%s".as_ptr(), text.as_ptr());
    }
}

/// The error record keeps the file pointer: a few distinct source paths, interned for good.
fn leak_file(file: CString) -> *const std::ffi::c_char {
    static FILES: std::sync::Mutex<Vec<&'static CStr>> = std::sync::Mutex::new(Vec::new());
    let mut files = FILES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(f) = files.iter().find(|f| **f == file.as_c_str()) {
        return f.as_ptr();
    }
    let leaked: &'static CStr = Box::leak(file.into_boxed_c_str());
    files.push(leaked);
    leaked.as_ptr()
}
