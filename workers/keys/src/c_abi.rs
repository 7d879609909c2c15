//! The exported libaziot_keys C ABI (spec/keyd.md §8): `aziot_keys_get_function_list` and the
//! functions of the 2.0.0.0 and 2.1.0.0 lists, all over one process-wide [`KeyStore`].
//!
//! Every function validates its pointers (NULL → `AZIOT_KEYS_RC_ERR_INVALID_PARAMETER`), turns
//! non-UTF-8 strings into INVALID_PARAMETER, implements the two-call buffer protocol, and runs
//! its body under `catch_unwind` so that a panic becomes `AZIOT_KEYS_RC_ERR_EXTERNAL` instead of
//! unwinding into C.

pub mod types;

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

pub use self::types::*;
use crate::native::KeyStore;
use crate::{EncryptMechanism, Error, KeyBackend, KeyPairParameter, KeyUsage, Result, SignMechanism, RC_OK};

static STORE: OnceLock<KeyStore> = OnceLock::new();

/// The process-wide store behind the C ABI.
fn store() -> &'static KeyStore {
    STORE.get_or_init(KeyStore::new)
}

static FUNCTION_LIST_2_0_0_0: FunctionList2_0_0_0 = FunctionList2_0_0_0 {
    base: FunctionListBase { version: AZIOT_KEYS_VERSION_2_0_0_0 },
    set_parameter: Some(set_parameter),
    create_key_pair_if_not_exists: Some(create_key_pair_if_not_exists),
    load_key_pair: Some(load_key_pair),
    get_key_pair_parameter: Some(get_key_pair_parameter),
    create_key_if_not_exists: Some(create_key_if_not_exists),
    load_key: Some(load_key),
    import_key: Some(import_key),
    derive_key: Some(derive_key),
    sign: Some(sign),
    verify: Some(verify),
    encrypt: Some(encrypt),
    decrypt: Some(decrypt),
};

static FUNCTION_LIST_2_1_0_0: FunctionList2_1_0_0 = FunctionList2_1_0_0 {
    base: FunctionListBase { version: AZIOT_KEYS_VERSION_2_1_0_0 },
    set_parameter: Some(set_parameter),
    create_key_pair_if_not_exists: Some(create_key_pair_if_not_exists),
    move_key_pair: Some(move_key_pair),
    load_key_pair: Some(load_key_pair),
    get_key_pair_parameter: Some(get_key_pair_parameter),
    delete_key_pair: Some(delete_key_pair),
    create_key_if_not_exists: Some(create_key_if_not_exists),
    load_key: Some(load_key),
    import_key: Some(import_key),
    delete_key: Some(delete_key),
    derive_key: Some(derive_key),
    sign: Some(sign),
    verify: Some(verify),
    encrypt: Some(encrypt),
    decrypt: Some(decrypt),
};

/// The library's single entry point.
///
/// Unknown `version` or NULL `pfunction_list` → INVALID_PARAMETER. On success
/// `*pfunction_list` points to a static list whose `version` equals the requested one.
///
/// # Safety
///
/// `pfunction_list` must be NULL or valid for writing one pointer.
#[no_mangle]
pub unsafe extern "C" fn aziot_keys_get_function_list(
    version: c_uint,
    pfunction_list: *mut *const FunctionListBase,
) -> AziotKeysRc {
    guard(|| {
        if pfunction_list.is_null() {
            return Err(Error::invalid("pfunction_list is NULL"));
        }
        let list: *const FunctionListBase = match version {
            AZIOT_KEYS_VERSION_2_0_0_0 => std::ptr::from_ref(&FUNCTION_LIST_2_0_0_0).cast(),
            AZIOT_KEYS_VERSION_2_1_0_0 => std::ptr::from_ref(&FUNCTION_LIST_2_1_0_0).cast(),
            _ => return Err(Error::invalid("unsupported API version")),
        };
        // SAFETY: checked non-NULL above; the caller guarantees it is writable.
        unsafe { pfunction_list.write(list) };
        Ok(())
    })
}

/// Runs `body`, mapping its error to an RC and a panic to EXTERNAL.
fn guard(body: impl FnOnce() -> Result<()>) -> AziotKeysRc {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => RC_OK,
        Ok(Err(e)) => e.rc(),
        Err(_) => Error::external_msg("panic").rc(),
    }
}

/// A required NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` must be NULL or point to a NUL-terminated string valid for `'a`.
unsafe fn str_arg<'a>(p: *const c_char, what: &'static str) -> Result<&'a str> {
    if p.is_null() {
        return Err(Error::invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL, and the caller guarantees NUL termination and lifetime.
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map_err(|_| Error::invalid(format!("{what} is not UTF-8")))
}

/// A required byte-buffer argument (NULL is invalid even with length 0).
///
/// # Safety
/// `p` must be NULL or valid for reading `len` bytes for `'a`.
unsafe fn bytes_arg<'a>(p: *const u8, len: usize, what: &'static str) -> Result<&'a [u8]> {
    if p.is_null() {
        return Err(Error::invalid(format!("{what} is NULL")));
    }
    if isize::try_from(len).is_err() {
        return Err(Error::invalid(format!("{what} is too long")));
    }
    // SAFETY: non-NULL, length fits in isize, and the caller guarantees readability.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// An optional byte buffer: NULL with length 0 is the empty slice.
///
/// # Safety
/// As [`bytes_arg`].
unsafe fn opt_bytes_arg<'a>(p: *const u8, len: usize, what: &'static str) -> Result<&'a [u8]> {
    if p.is_null() && len == 0 {
        return Ok(&[]);
    }
    // SAFETY: forwarded caller guarantee.
    unsafe { bytes_arg(p, len, what) }
}

/// The two-call output protocol. `out == NULL` → store `bound()` in `*out_len`; otherwise
/// compute, and either copy (setting `*out_len` to the length written) or, if `*out_len` is too
/// small, store the required length and fail with INVALID_PARAMETER.
///
/// # Safety
/// `out_len` must be NULL or valid for reading and writing; `out` must be NULL or valid for
/// writing `*out_len` bytes.
unsafe fn write_output<D: AsRef<[u8]>>(
    out: *mut u8,
    out_len: *mut usize,
    bound: impl FnOnce() -> Result<usize>,
    compute: impl FnOnce() -> Result<D>,
) -> Result<()> {
    if out_len.is_null() {
        return Err(Error::invalid("output length pointer is NULL"));
    }
    if out.is_null() {
        let n = bound()?;
        // SAFETY: checked non-NULL; caller guarantees writability.
        unsafe { out_len.write(n) };
        return Ok(());
    }
    // SAFETY: checked non-NULL; caller guarantees readability.
    let capacity = unsafe { out_len.read() };
    let data = compute()?;
    let data = data.as_ref();
    if data.len() > capacity {
        // SAFETY: `out_len` is non-NULL and writable (caller guarantee).
        unsafe { out_len.write(data.len()) };
        return Err(Error::invalid("output buffer too small"));
    }
    // SAFETY: `out` is valid for `capacity >= data.len()` bytes (caller guarantee) and cannot
    // overlap `data`, which this library allocated.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), out, data.len()) };
    // SAFETY: `out_len` is non-NULL and writable (caller guarantee).
    unsafe { out_len.write(data.len()) };
    Ok(())
}

fn key_pair_parameter(type_: c_uint) -> Result<KeyPairParameter> {
    Ok(match type_ {
        AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_ALGORITHM => KeyPairParameter::Algorithm,
        AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_EC_CURVE_OID => KeyPairParameter::EcCurveOid,
        AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_EC_POINT => KeyPairParameter::EcPoint,
        AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_RSA_MODULUS => KeyPairParameter::RsaModulus,
        AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_RSA_EXPONENT => KeyPairParameter::RsaExponent,
        _ => return Err(Error::invalid("unknown key pair parameter type")),
    })
}

/// Decodes a sign mechanism and its parameters.
///
/// # Safety
/// `parameters` must be NULL or point to the parameter struct of `mechanism`, whose buffers
/// are valid for `'a`.
unsafe fn sign_mechanism<'a>(mechanism: c_uint, parameters: *const c_void) -> Result<SignMechanism<'a>> {
    match mechanism {
        AZIOT_KEYS_SIGN_MECHANISM_ECDSA => Ok(SignMechanism::Ecdsa),
        AZIOT_KEYS_SIGN_MECHANISM_HMAC_SHA256 => Ok(SignMechanism::HmacSha256),
        AZIOT_KEYS_SIGN_MECHANISM_DERIVED => {
            if parameters.is_null() {
                return Err(Error::invalid("DERIVED parameters are NULL"));
            }
            // SAFETY: non-NULL; the caller guarantees it points to this mechanism's struct.
            let params = unsafe { &*parameters.cast::<SignDerivedParameters>() };
            if params.mechanism != AZIOT_KEYS_SIGN_MECHANISM_HMAC_SHA256 {
                return Err(Error::invalid("DERIVED sign supports only HMAC-SHA256 with the derived key"));
            }
            // SAFETY: forwarded caller guarantee for the embedded buffer.
            let derivation_data =
                unsafe { bytes_arg(params.derivation_data, params.derivation_data_len, "derivation_data")? };
            Ok(SignMechanism::DerivedHmacSha256 { derivation_data })
        }
        _ => Err(Error::invalid("unknown sign mechanism")),
    }
}

/// Reads AEAD parameters.
///
/// # Safety
/// `parameters` must be NULL or point to an `EncryptAeadParameters` whose buffers live for `'a`.
unsafe fn aead_parameters<'a>(parameters: *const c_void) -> Result<(&'a [u8], &'a [u8])> {
    if parameters.is_null() {
        return Err(Error::invalid("AEAD parameters are NULL"));
    }
    // SAFETY: non-NULL; the caller guarantees the pointee type.
    let params = unsafe { &*parameters.cast::<EncryptAeadParameters>() };
    // SAFETY: forwarded caller guarantee for the embedded buffers.
    let iv = unsafe { bytes_arg(params.iv, params.iv_len, "iv")? };
    // SAFETY: as above.
    let aad = unsafe { opt_bytes_arg(params.aad, params.aad_len, "aad")? };
    Ok((iv, aad))
}

/// Decodes an encrypt mechanism and its parameters.
///
/// # Safety
/// As [`sign_mechanism`].
unsafe fn encrypt_mechanism<'a>(mechanism: c_uint, parameters: *const c_void) -> Result<EncryptMechanism<'a>> {
    match mechanism {
        AZIOT_KEYS_ENCRYPT_MECHANISM_AEAD => {
            // SAFETY: forwarded caller guarantee.
            let (iv, aad) = unsafe { aead_parameters(parameters)? };
            Ok(EncryptMechanism::Aead { iv, aad })
        }
        AZIOT_KEYS_ENCRYPT_MECHANISM_RSA_PKCS1 => Ok(EncryptMechanism::RsaPkcs1),
        AZIOT_KEYS_ENCRYPT_MECHANISM_RSA_NO_PADDING => Ok(EncryptMechanism::RsaNoPadding),
        AZIOT_KEYS_ENCRYPT_MECHANISM_DERIVED => {
            if parameters.is_null() {
                return Err(Error::invalid("DERIVED parameters are NULL"));
            }
            // SAFETY: non-NULL; the caller guarantees the pointee type.
            let params = unsafe { &*parameters.cast::<EncryptDerivedParameters>() };
            if params.mechanism != AZIOT_KEYS_ENCRYPT_MECHANISM_AEAD {
                return Err(Error::invalid("DERIVED encrypt supports only AEAD with the derived key"));
            }
            // SAFETY: forwarded caller guarantee for the embedded buffer and nested struct.
            let derivation_data =
                unsafe { bytes_arg(params.derivation_data, params.derivation_data_len, "derivation_data")? };
            // SAFETY: as above.
            let (iv, aad) = unsafe { aead_parameters(params.parameters)? };
            Ok(EncryptMechanism::DerivedAead { derivation_data, iv, aad })
        }
        _ => Err(Error::invalid("unknown encrypt mechanism")),
    }
}

// The functions of the lists. Each is `unsafe extern "C"`: the caller (C) guarantees that
// every non-NULL pointer is valid as described in aziot-keys.h; NULLs are checked here.

unsafe extern "C" fn set_parameter(name: *const c_char, value: *const c_char) -> AziotKeysRc {
    guard(|| {
        // SAFETY: C caller contract (valid NUL-terminated strings or NULL).
        let (name, value) = unsafe { (str_arg(name, "name")?, str_arg(value, "value")?) };
        store().set_parameter(name, value)
    })
}

unsafe extern "C" fn create_key_pair_if_not_exists(
    id: *const c_char,
    preferred_algorithms: *const c_char,
) -> AziotKeysRc {
    guard(|| {
        // SAFETY: C caller contract.
        let id = unsafe { str_arg(id, "id")? };
        let algorithms = if preferred_algorithms.is_null() {
            None
        } else {
            // SAFETY: C caller contract; non-NULL.
            Some(unsafe { str_arg(preferred_algorithms, "preferred_algorithms")? })
        };
        store().create_key_pair_if_not_exists(id, algorithms)
    })
}

unsafe extern "C" fn move_key_pair(from: *const c_char, to: *const c_char) -> AziotKeysRc {
    guard(|| {
        // SAFETY: C caller contract.
        let (from, to) = unsafe { (str_arg(from, "from")?, str_arg(to, "to")?) };
        store().move_key_pair(from, to)
    })
}

unsafe extern "C" fn load_key_pair(id: *const c_char) -> AziotKeysRc {
    guard(|| {
        // SAFETY: C caller contract.
        let id = unsafe { str_arg(id, "id")? };
        store().load_key_pair(id)
    })
}

unsafe extern "C" fn get_key_pair_parameter(
    id: *const c_char,
    type_: c_uint,
    value: *mut u8,
    value_len: *mut usize,
) -> AziotKeysRc {
    guard(|| {
        // SAFETY: C caller contract.
        let id = unsafe { str_arg(id, "id")? };
        let parameter = key_pair_parameter(type_)?;
        let get = || store().get_key_pair_parameter(id, parameter);
        // SAFETY: C caller contract for the output buffer and its length.
        unsafe { write_output(value, value_len, || get().map(|v| v.len()), get) }
    })
}

unsafe extern "C" fn delete_key_pair(id: *const c_char) -> AziotKeysRc {
    guard(|| {
        // SAFETY: C caller contract.
        let id = unsafe { str_arg(id, "id")? };
        store().delete_key_pair(id)
    })
}

unsafe extern "C" fn create_key_if_not_exists(id: *const c_char, usage: c_uint) -> AziotKeysRc {
    guard(|| {
        // SAFETY: C caller contract.
        let id = unsafe { str_arg(id, "id")? };
        store().create_key_if_not_exists(id, KeyUsage(usage))
    })
}

unsafe extern "C" fn load_key(id: *const c_char) -> AziotKeysRc {
    guard(|| {
        // SAFETY: C caller contract.
        let id = unsafe { str_arg(id, "id")? };
        store().load_key(id)
    })
}

unsafe extern "C" fn import_key(id: *const c_char, bytes: *const u8, bytes_len: usize, usage: c_uint) -> AziotKeysRc {
    guard(|| {
        // SAFETY: C caller contract.
        let (id, bytes) = unsafe { (str_arg(id, "id")?, bytes_arg(bytes, bytes_len, "bytes")?) };
        store().import_key(id, bytes, KeyUsage(usage))
    })
}

unsafe extern "C" fn delete_key(id: *const c_char) -> AziotKeysRc {
    guard(|| {
        // SAFETY: C caller contract.
        let id = unsafe { str_arg(id, "id")? };
        store().delete_key(id)
    })
}

unsafe extern "C" fn derive_key(
    base_id: *const c_char,
    derivation_data: *const u8,
    derivation_data_len: usize,
    derived_key: *mut u8,
    derived_key_len: *mut usize,
) -> AziotKeysRc {
    guard(|| {
        // SAFETY: C caller contract.
        let base_id = unsafe { str_arg(base_id, "base_id")? };
        // SAFETY: C caller contract.
        let data = unsafe { bytes_arg(derivation_data, derivation_data_len, "derivation_data")? };
        let derive = || store().derive_key(base_id, data);
        // SAFETY: C caller contract for the output buffer and its length.
        unsafe { write_output(derived_key, derived_key_len, || derive().map(|k| k.len()), derive) }
    })
}

unsafe extern "C" fn sign(
    id: *const c_char,
    mechanism: c_uint,
    parameters: *const c_void,
    digest: *const u8,
    digest_len: usize,
    signature: *mut u8,
    signature_len: *mut usize,
) -> AziotKeysRc {
    guard(|| {
        // SAFETY: C caller contract.
        let id = unsafe { str_arg(id, "id")? };
        // SAFETY: C caller contract.
        let mechanism = unsafe { sign_mechanism(mechanism, parameters)? };
        // SAFETY: C caller contract.
        let digest = unsafe { bytes_arg(digest, digest_len, "digest")? };
        let s = store();
        // SAFETY: C caller contract for the output buffer and its length.
        unsafe {
            write_output(signature, signature_len, || s.sign_len_bound(id, mechanism), || s.sign(id, mechanism, digest))
        }
    })
}

#[allow(clippy::too_many_arguments)] // the C signature
unsafe extern "C" fn verify(
    id: *const c_char,
    mechanism: c_uint,
    parameters: *const c_void,
    digest: *const u8,
    digest_len: usize,
    signature: *const u8,
    signature_len: usize,
    ok: *mut c_int,
) -> AziotKeysRc {
    guard(|| {
        // SAFETY: C caller contract.
        let id = unsafe { str_arg(id, "id")? };
        // SAFETY: C caller contract.
        let mechanism = unsafe { sign_mechanism(mechanism, parameters)? };
        // SAFETY: C caller contract.
        let digest = unsafe { bytes_arg(digest, digest_len, "digest")? };
        // SAFETY: C caller contract.
        let signature = unsafe { bytes_arg(signature, signature_len, "signature")? };
        if ok.is_null() {
            return Err(Error::invalid("ok is NULL"));
        }
        let matches = store().verify(id, mechanism, digest, signature)?;
        // SAFETY: checked non-NULL; C caller contract for writability.
        unsafe { ok.write(c_int::from(matches)) };
        Ok(())
    })
}

unsafe extern "C" fn encrypt(
    id: *const c_char,
    mechanism: c_uint,
    parameters: *const c_void,
    plaintext: *const u8,
    plaintext_len: usize,
    ciphertext: *mut u8,
    ciphertext_len: *mut usize,
) -> AziotKeysRc {
    guard(|| {
        // SAFETY: C caller contract.
        let id = unsafe { str_arg(id, "id")? };
        // SAFETY: C caller contract.
        let mechanism = unsafe { encrypt_mechanism(mechanism, parameters)? };
        // SAFETY: C caller contract.
        let plaintext = unsafe { bytes_arg(plaintext, plaintext_len, "plaintext")? };
        let s = store();
        // SAFETY: C caller contract for the output buffer and its length.
        unsafe {
            write_output(
                ciphertext,
                ciphertext_len,
                || s.encrypt_len_bound(id, mechanism, plaintext.len()),
                || s.encrypt(id, mechanism, plaintext),
            )
        }
    })
}

unsafe extern "C" fn decrypt(
    id: *const c_char,
    mechanism: c_uint,
    parameters: *const c_void,
    ciphertext: *const u8,
    ciphertext_len: usize,
    plaintext: *mut u8,
    plaintext_len: *mut usize,
) -> AziotKeysRc {
    guard(|| {
        // SAFETY: C caller contract.
        let id = unsafe { str_arg(id, "id")? };
        // SAFETY: C caller contract.
        let mechanism = unsafe { encrypt_mechanism(mechanism, parameters)? };
        // SAFETY: C caller contract.
        let ciphertext = unsafe { bytes_arg(ciphertext, ciphertext_len, "ciphertext")? };
        let s = store();
        // SAFETY: C caller contract for the output buffer and its length.
        unsafe {
            write_output(
                plaintext,
                plaintext_len,
                || s.decrypt_len_bound(id, mechanism, ciphertext),
                || s.decrypt(id, mechanism, ciphertext),
            )
        }
    })
}

#[cfg(test)]
mod tests;
