//! The OpenSSL 3 provider `aziot_keys` (issue 16; docs/engine.md "The provider"): the same
//! keys as the engine, for OpenSSL's provider API (ENGINEs are deprecated in OpenSSL 3).
//!
//! The cdylib exports `OSSL_provider_init` beside the engine's `bind_engine`/`v_check`: one
//! `.so`, installed both as `<openssl version -e>/aziot_keys.so` (engine) and as
//! `<openssl version -m>/aziot_keys.so` (provider).
//!
//! What it offers (property `provider=aziot_keys`):
//! * OSSL_STORE loader for the scheme `aziot-keys` ([`uri`]): `aziot-keys:handle=<handle>`
//!   loads a keyd key pair by reference ([`store`]);
//! * key management for `EC` (P-256, P-384) and `RSA` keys held by keyd ([`keymgmt`]): public
//!   parts only (params, import/export of the public key, match); `has(private)` is true for a
//!   key loaded from keyd, but nothing private ever exists in the process;
//! * signature `ECDSA` and `RSA` (PKCS#1 v1.5, PSS, none) ([`signature`]);
//! * asymmetric cipher `RSA` (decryption: PKCS#1 v1.5, OAEP, none) ([`cipher`]);
//! * decoders for a *key reference file* (`-----BEGIN AZIOT KEY-----`), for programs that only
//!   read key files ([`decoder`]).
//!
//! Inside the product's workers the same provider is built in ([`in_process`]): the twin.
//!
//! No second copy of the key logic: a loaded key is the engine's *twin* (an `EC_KEY`/`RSA` with
//! this crate's methods, `key::load_private`), and every private operation of the provider is a
//! legacy `EVP_PKEY_sign`/`EVP_PKEY_decrypt` on the twin, which ends in the engine's `sign_sig` /
//! `priv_enc` / `priv_dec` → keyd. Public-key work (verification, encryption, parameters,
//! encoding) is delegated to the default provider with an explicit `provider=default` query, so
//! the default provider must be loaded too (`-provider aziot_keys -provider default`).

pub mod cipher;
pub mod decoder;
pub mod in_process;
pub mod keymgmt;
pub mod signature;
pub mod store;
pub mod uri;

use std::ffi::{c_char, c_int, c_uchar, c_void, CStr};
use std::sync::OnceLock;

use foreign_types::{ForeignType, ForeignTypeRef};
use openssl::pkey::{PKey, PKeyRef};
use openssl::pkey_ctx::PkeyCtx;

use crate::error::Error;
use crate::ffi_provider as ffi;

/// The provider's name (what `-provider` / `OSSL_PROVIDER_load` take).
pub const PROVIDER_NAME: &CStr = c"aziot_keys";
/// The property every algorithm of the provider carries.
const PROPS: &CStr = c"provider=aziot_keys";
/// The query that sends public-key work to the default provider (never back to us).
pub(crate) const DEFAULT_PROPQ: &CStr = c"provider=default";

/// A table OpenSSL keeps pointers into for the life of the process (built once, never freed).
pub(crate) struct Table<T>(pub Vec<T>);
// SAFETY: the tables hold function pointers and pointers to 'static C strings; they are
// written once (OnceLock) and only read afterwards, from any thread.
unsafe impl<T> Send for Table<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for Table<T> {}

/// One dispatch entry: the function id and the function's address.
pub(crate) fn f(id: c_int, p: *const ()) -> ffi::OSSL_DISPATCH {
    ffi::OSSL_DISPATCH {
        function_id: id,
        function: p as *const c_void,
    }
}

/// The terminating entry of a dispatch table.
pub(crate) fn end() -> ffi::OSSL_DISPATCH {
    ffi::OSSL_DISPATCH {
        function_id: 0,
        function: std::ptr::null(),
    }
}

/// A parameter descriptor (for the gettable/settable lists).
pub(crate) fn desc(key: &'static CStr, data_type: std::ffi::c_uint) -> ffi::OSSL_PARAM {
    ffi::OSSL_PARAM {
        key: key.as_ptr(),
        data_type,
        data: std::ptr::null_mut(),
        data_size: 0,
        return_size: ffi::OSSL_PARAM_UNMODIFIED,
    }
}

/// The terminating entry of a parameter list.
pub(crate) fn param_end() -> ffi::OSSL_PARAM {
    ffi::OSSL_PARAM {
        key: std::ptr::null(),
        data_type: 0,
        data: std::ptr::null_mut(),
        data_size: 0,
        return_size: 0,
    }
}

/// The entry of parameter `key` in `params`, if `params` is not null and has one.
///
/// # Safety
/// `params` must be null or a valid OSSL_PARAM array.
pub(crate) unsafe fn locate(
    params: *const ffi::OSSL_PARAM,
    key: &CStr,
) -> Option<*const ffi::OSSL_PARAM> {
    if params.is_null() {
        return None;
    }
    // SAFETY: per the contract; the located entry belongs to the array.
    let p = unsafe { ffi::OSSL_PARAM_locate_const(params, key.as_ptr()) };
    (!p.is_null()).then_some(p)
}

/// The UTF-8 string value of parameter `key` in `params`, if present.
///
/// # Safety
/// `params` must be null or a valid OSSL_PARAM array.
pub(crate) unsafe fn get_utf8(
    params: *const ffi::OSSL_PARAM,
    key: &CStr,
) -> Result<Option<String>, Error> {
    // SAFETY: per the contract; the located entry belongs to the array.
    unsafe {
        let Some(p) = locate(params, key) else {
            return Ok(None);
        };
        let mut s: *const c_char = std::ptr::null();
        if ffi::OSSL_PARAM_get_utf8_string_ptr(p, &mut s) != 1 || s.is_null() {
            return Err(Error::Internal(format!(
                "parameter {key:?} is not a UTF-8 string"
            )));
        }
        Ok(Some(CStr::from_ptr(s).to_string_lossy().into_owned()))
    }
}

/// A parameter that may come as an integer or as its string name (pad-mode, saltlen).
pub(crate) enum IntOrName {
    Int(c_int),
    Name(String),
}

/// # Safety
/// `params` must be null or a valid OSSL_PARAM array.
pub(crate) unsafe fn get_int_or_name(
    params: *const ffi::OSSL_PARAM,
    key: &CStr,
) -> Result<Option<IntOrName>, Error> {
    // SAFETY: per the contract.
    unsafe {
        let Some(p) = locate(params, key) else {
            return Ok(None);
        };
        if (*p).data_type == ffi::OSSL_PARAM_UTF8_STRING {
            return get_utf8(params, key).map(|s| s.map(IntOrName::Name));
        }
        let mut v: c_int = 0;
        if ffi::OSSL_PARAM_get_int(p, &mut v) != 1 {
            return Err(Error::Internal(format!(
                "parameter {key:?} is neither an integer nor a string"
            )));
        }
        Ok(Some(IntOrName::Int(v)))
    }
}

/// The `pad-mode` parameter in `params`, if present: an integer, or one of the `names`.
///
/// # Safety
/// `params` must be null or a valid OSSL_PARAM array.
pub(crate) unsafe fn get_pad_mode(
    params: *const ffi::OSSL_PARAM,
    names: &[(&str, c_int)],
) -> Result<Option<c_int>, Error> {
    // SAFETY: per the contract.
    let mode = unsafe { get_int_or_name(params, ffi::SIG_PAD_MODE)? };
    mode.map(|m| match m {
        IntOrName::Int(i) => Ok(i),
        IntOrName::Name(n) => names
            .iter()
            .find(|(name, _)| *name == n)
            .map(|&(_, v)| v)
            .ok_or_else(|| Error::Internal(format!("unknown pad-mode {n:?}"))),
    })
    .transpose()
}

/// One of this provider's operation contexts (`what` names its kind in the error when null).
///
/// # Safety
/// `ctx` must be null or a `T` that the caller's module allocated and has not freed; OpenSSL
/// does not use one context from two threads at once.
pub(crate) unsafe fn ctx_mut<'a, T>(ctx: *mut c_void, what: &str) -> Result<&'a mut T, Error> {
    if ctx.is_null() {
        return Err(Error::Internal(format!("no {what} context")));
    }
    // SAFETY: per the contract.
    Ok(unsafe { &mut *(ctx as *mut T) })
}

/// OpenSSL's input buffer as a slice (empty when null).
///
/// # Safety
/// `p` null or `n` readable bytes.
pub(crate) unsafe fn bytes<'a>(p: *const c_uchar, n: usize) -> &'a [u8] {
    if p.is_null() || n == 0 {
        &[]
    } else {
        // SAFETY: per the contract.
        unsafe { std::slice::from_raw_parts(p, n) }
    }
}

/// Writes `data` (a `what`) to OpenSSL's output buffer, refusing one that is too small.
///
/// # Safety
/// `out` has `outsize` writable bytes; `outlen` writable.
pub(crate) unsafe fn put(
    out: *mut c_uchar,
    outlen: *mut usize,
    outsize: usize,
    data: &[u8],
    what: &str,
) -> Result<c_int, Error> {
    if data.len() > outsize {
        return Err(Error::Internal(format!(
            "{what} of {} bytes for a {outsize}-byte buffer",
            data.len()
        )));
    }
    // SAFETY: per the contract.
    unsafe {
        std::ptr::copy_nonoverlapping(data.as_ptr(), out, data.len());
        *outlen = data.len();
    }
    Ok(1)
}

/// A context for public-key work on `pkey` by the default provider (never this one).
pub(crate) fn default_ctx<T>(pkey: &PKeyRef<T>) -> Result<PkeyCtx<T>, Error> {
    // SAFETY: `pkey` is a valid key (up-referenced by the new context); the query is 'static.
    let ctx = unsafe {
        ffi::EVP_PKEY_CTX_new_from_pkey(std::ptr::null_mut(), pkey.as_ptr(), DEFAULT_PROPQ.as_ptr())
    };
    if ctx.is_null() {
        return Err(Error::OpenSsl(openssl::error::ErrorStack::get()));
    }
    // SAFETY: a new context we own.
    Ok(unsafe { PkeyCtx::from_ptr(ctx) })
}

/// A default-provider ("provider-native") copy of a public key, whose parameters
/// `EVP_PKEY_get_params` answers fully (a legacy key answers only a few).
pub(crate) fn native_public<T: openssl::pkey::HasPublic>(
    key: &PKeyRef<T>,
) -> Result<PKey<openssl::pkey::Public>, Error> {
    let der = key.public_key_to_der()?;
    Ok(PKey::public_key_from_der(&der)?)
}

unsafe extern "C" fn teardown(_provctx: *mut c_void) {}

fn gettable() -> &'static Table<ffi::OSSL_PARAM> {
    static T: OnceLock<Table<ffi::OSSL_PARAM>> = OnceLock::new();
    T.get_or_init(|| {
        Table(vec![
            desc(ffi::PROV_NAME, ffi::OSSL_PARAM_UTF8_PTR),
            desc(ffi::PROV_VERSION, ffi::OSSL_PARAM_UTF8_PTR),
            desc(ffi::PROV_BUILDINFO, ffi::OSSL_PARAM_UTF8_PTR),
            desc(ffi::PROV_STATUS, ffi::OSSL_PARAM_INTEGER),
            param_end(),
        ])
    })
}

unsafe extern "C" fn gettable_params(_provctx: *mut c_void) -> *const ffi::OSSL_PARAM {
    gettable().0.as_ptr()
}

unsafe extern "C" fn get_params(_provctx: *mut c_void, params: *mut ffi::OSSL_PARAM) -> c_int {
    const VERSION: &CStr =
        match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
            Ok(v) => v,
            Err(_) => c"unknown",
        };
    // SAFETY: OpenSSL passes a valid parameter array; the strings are 'static.
    unsafe {
        for (key, value) in [
            (
                ffi::PROV_NAME,
                c"aziot_keys: keys held by the Azure IoT Keys Service (keyd)",
            ),
            (ffi::PROV_VERSION, VERSION),
            (ffi::PROV_BUILDINFO, VERSION),
        ] {
            let p = ffi::OSSL_PARAM_locate(params, key.as_ptr());
            if !p.is_null() && ffi::OSSL_PARAM_set_utf8_ptr(p, value.as_ptr()) != 1 {
                return 0;
            }
        }
        let p = ffi::OSSL_PARAM_locate(params, ffi::PROV_STATUS.as_ptr());
        if !p.is_null() && ffi::OSSL_PARAM_set_int(p, 1) != 1 {
            return 0;
        }
    }
    1
}

fn algorithms(op: c_int) -> Option<&'static Table<ffi::OSSL_ALGORITHM>> {
    fn alg(
        names: &'static CStr,
        imp: &'static Table<ffi::OSSL_DISPATCH>,
        description: &'static CStr,
    ) -> ffi::OSSL_ALGORITHM {
        ffi::OSSL_ALGORITHM {
            algorithm_names: names.as_ptr(),
            property_definition: PROPS.as_ptr(),
            implementation: imp.0.as_ptr(),
            algorithm_description: description.as_ptr(),
        }
    }
    fn alg_end() -> ffi::OSSL_ALGORITHM {
        ffi::OSSL_ALGORITHM {
            algorithm_names: std::ptr::null(),
            property_definition: std::ptr::null(),
            implementation: std::ptr::null(),
            algorithm_description: std::ptr::null(),
        }
    }
    const EC: &CStr = c"EC:id-ecPublicKey:1.2.840.10045.2.1";
    const RSA: &CStr = c"RSA:rsaEncryption:1.2.840.113549.1.1.1";
    static KEYMGMT: OnceLock<Table<ffi::OSSL_ALGORITHM>> = OnceLock::new();
    static SIGNATURE: OnceLock<Table<ffi::OSSL_ALGORITHM>> = OnceLock::new();
    static CIPHER: OnceLock<Table<ffi::OSSL_ALGORITHM>> = OnceLock::new();
    static STORE: OnceLock<Table<ffi::OSSL_ALGORITHM>> = OnceLock::new();
    static DECODER: OnceLock<Table<ffi::OSSL_ALGORITHM>> = OnceLock::new();
    fn decoder_alg(
        names: &'static CStr,
        props: &'static CStr,
        imp: &'static Table<ffi::OSSL_DISPATCH>,
        description: &'static CStr,
    ) -> ffi::OSSL_ALGORITHM {
        ffi::OSSL_ALGORITHM {
            algorithm_names: names.as_ptr(),
            property_definition: props.as_ptr(),
            implementation: imp.0.as_ptr(),
            algorithm_description: description.as_ptr(),
        }
    }
    Some(match op {
        ffi::OSSL_OP_KEYMGMT => KEYMGMT.get_or_init(|| {
            Table(vec![
                alg(EC, keymgmt::ec_dispatch(), c"EC key pair held by keyd"),
                alg(RSA, keymgmt::rsa_dispatch(), c"RSA key pair held by keyd"),
                alg_end(),
            ])
        }),
        ffi::OSSL_OP_SIGNATURE => SIGNATURE.get_or_init(|| {
            Table(vec![
                alg(c"ECDSA", signature::dispatch(), c"ECDSA by keyd"),
                alg(RSA, signature::dispatch(), c"RSA signatures by keyd"),
                alg_end(),
            ])
        }),
        ffi::OSSL_OP_ASYM_CIPHER => CIPHER.get_or_init(|| {
            Table(vec![
                alg(RSA, cipher::dispatch(), c"RSA decryption by keyd"),
                alg_end(),
            ])
        }),
        ffi::OSSL_OP_STORE => STORE.get_or_init(|| {
            Table(vec![
                alg(
                    uri::SCHEME_C,
                    store::dispatch(),
                    c"keyd key pairs by handle",
                ),
                alg_end(),
            ])
        }),
        ffi::OSSL_OP_DECODER => DECODER.get_or_init(|| {
            const PEM: &CStr = c"provider=aziot_keys,input=pem";
            const DER: &CStr = c"provider=aziot_keys,input=der";
            Table(vec![
                decoder_alg(
                    c"DER",
                    PEM,
                    decoder::pem_dispatch(),
                    c"AZIOT KEY reference file, PEM to DER",
                ),
                decoder_alg(
                    EC,
                    DER,
                    decoder::key_dispatch(),
                    c"keyd EC key by reference file",
                ),
                decoder_alg(
                    RSA,
                    DER,
                    decoder::key_dispatch(),
                    c"keyd RSA key by reference file",
                ),
                alg_end(),
            ])
        }),
        _ => return None,
    })
}

unsafe extern "C" fn query_operation(
    _provctx: *mut c_void,
    operation_id: c_int,
    no_cache: *mut c_int,
) -> *const ffi::OSSL_ALGORITHM {
    if !no_cache.is_null() {
        // SAFETY: OpenSSL passes a writable int.
        unsafe { *no_cache = 0 };
    }
    algorithms(operation_id).map_or(std::ptr::null(), |t| t.0.as_ptr())
}

fn provider_dispatch() -> &'static Table<ffi::OSSL_DISPATCH> {
    static T: OnceLock<Table<ffi::OSSL_DISPATCH>> = OnceLock::new();
    T.get_or_init(|| {
        Table(vec![
            f(ffi::OSSL_FUNC_PROVIDER_TEARDOWN, teardown as *const ()),
            f(
                ffi::OSSL_FUNC_PROVIDER_GETTABLE_PARAMS,
                gettable_params as *const (),
            ),
            f(ffi::OSSL_FUNC_PROVIDER_GET_PARAMS, get_params as *const ()),
            f(
                ffi::OSSL_FUNC_PROVIDER_QUERY_OPERATION,
                query_operation as *const (),
            ),
            end(),
        ])
    })
}

/// The provider's entry point (provider-base(7)): OpenSSL calls it after loading
/// `<modulesdir or $OPENSSL_MODULES>/aziot_keys.so`. No core function is needed: the module links the same libcrypto.
/// The provider context is unused (the keyd client is per process: the engine's).
///
/// # Safety
/// Called by OpenSSL with valid `out` and `provctx` pointers.
#[no_mangle]
pub unsafe extern "C" fn OSSL_provider_init(
    _handle: *const ffi::OSSL_CORE_HANDLE,
    core_in: *const ffi::OSSL_DISPATCH,
    out: *mut *const ffi::OSSL_DISPATCH,
    provctx: *mut *mut c_void,
) -> c_int {
    // error strings, methods, ex-data slots: what every key needs (idempotent)
    if let Err(e) = crate::key::preload() {
        crate::error::push(crate::error::Func::Init, &e);
        return 0;
    }
    // SAFETY: per the contract.
    unsafe {
        decoder::take_core_functions(core_in);
        *out = provider_dispatch().0.as_ptr();
        *provctx = provider_dispatch() as *const _ as *mut c_void;
    }
    1
}
