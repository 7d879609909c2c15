//! Keys whose private half stays in keyd (spec keyd.md §9.3, §9.4): an `EC_KEY`/`RSA` holding
//! only the public parts read once from `/parameters`, with this module's `EC_KEY_METHOD` /
//! `RSA_METHOD` and ex-data {client, handle}. OpenSSL 3 treats such a key as "foreign" (its
//! method is not the default one) and runs its operations through the legacy EVP_PKEY_METHOD,
//! which ends in `sign_sig` / `priv_enc` / `priv_dec` below → `POST /sign` / `POST /encrypt`.

use std::ffi::{c_int, c_uchar, c_void};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use foreign_types::ForeignType;
use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcKey, EcPoint};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private, Public};
use openssl::rsa::Rsa;
use openssl_sys::{BIGNUM, ECDSA_SIG, EC_KEY, RSA};
use serde_json::json;

use crate::client::KeydClient;
use crate::error::{push, Error, Func};
use crate::ffi;

/// DER of the P-256 OID (tag, length, value), as keyd's `ec-curve-oid` returns it.
const OID_P256: &[u8] = &[0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];
/// DER of the P-384 OID (keyd's library does not return it today; accepted should one).
const OID_P384: &[u8] = &[0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x22];

/// What a key's private operations need: where keyd is and which key.
#[derive(Debug)]
struct KeyCtx {
    client: Arc<KeydClient>,
    handle: String,
}

/// The process-wide methods and ex-data indexes, created once ([`preload`]).
struct Methods {
    ec: *mut ffi::EC_KEY_METHOD,
    rsa: *mut ffi::RSA_METHOD,
    ec_idx: c_int,
    rsa_idx: c_int,
}

// SAFETY: the method tables are written once here and only read afterwards (OpenSSL reads
// them from any thread); the indexes are plain integers.
unsafe impl Send for Methods {}
// SAFETY: as above.
unsafe impl Sync for Methods {}

fn methods() -> Result<&'static Methods, Error> {
    static METHODS: OnceLock<Result<Methods, String>> = OnceLock::new();
    METHODS
        .get_or_init(|| {
            openssl_sys::init();
            crate::error::library();
            // SAFETY: the default method is a static table; EC_KEY_METHOD_new copies it into a
            // new allocation that we own and never free (keys may hold it until exit);
            // EC_KEY_METHOD_get_sign reads three function pointers out of it.
            let ec = unsafe {
                let m = ffi::EC_KEY_METHOD_new(ffi::EC_KEY_get_default_method());
                if m.is_null() {
                    return Err("EC_KEY_METHOD_new failed".to_owned());
                }
                let (mut sign, mut setup, mut sig) = (None, None, None);
                ffi::EC_KEY_METHOD_get_sign(m, &mut sign, &mut setup, &mut sig);
                // keep OpenSSL's `sign` (it DER-encodes what sign_sig returns); no sign_setup
                // (there is no k to precompute: keyd holds the key); sign_sig → keyd.
                ffi::EC_KEY_METHOD_set_sign(m, sign, None, Some(ec_sign_sig));
                m
            };
            // SAFETY: RSA_meth_dup copies the static default method into a new allocation we
            // own and never free; the setters write into it before anyone else sees it.
            let rsa = unsafe {
                let m = ffi::RSA_meth_dup(ffi::RSA_get_default_method());
                if m.is_null() {
                    return Err("RSA_meth_dup failed".to_owned());
                }
                let ok = ffi::RSA_meth_set1_name(m, c"aziot_keys RSA (keyd)".as_ptr()) == 1
                    && ffi::RSA_meth_set_flags(m, 0) == 1
                    && ffi::RSA_meth_set_priv_enc(m, Some(rsa_priv_enc)) == 1
                    && ffi::RSA_meth_set_priv_dec(m, Some(rsa_priv_dec)) == 1;
                if !ok {
                    return Err("RSA_meth_set_* failed".to_owned());
                }
                m
            };
            // SAFETY: registers an ex-data slot for the EC_KEY / RSA classes with our dup and
            // free callbacks, which handle exactly the pointers `attach` stores there.
            let (ec_idx, rsa_idx) = unsafe {
                (
                    openssl_sys::CRYPTO_get_ex_new_index(
                        ffi::CRYPTO_EX_INDEX_EC_KEY,
                        0,
                        std::ptr::null_mut(),
                        None,
                        Some(ctx_dup),
                        Some(ctx_free),
                    ),
                    openssl_sys::CRYPTO_get_ex_new_index(
                        ffi::CRYPTO_EX_INDEX_RSA,
                        0,
                        std::ptr::null_mut(),
                        None,
                        Some(ctx_dup),
                        Some(ctx_free),
                    ),
                )
            };
            if ec_idx < 0 || rsa_idx < 0 {
                return Err("CRYPTO_get_ex_new_index failed".to_owned());
            }
            Ok(Methods {
                ec,
                rsa,
                ec_idx,
                rsa_idx,
            })
        })
        .as_ref()
        .map_err(|e| Error::Internal(e.clone()))
}

/// Creates everything the keys need that is process-wide (OpenSSL's own initialisation, the
/// error strings, the EC_KEY/RSA methods, the ex-data slots). Idempotent. A confined worker calls
/// it before it locks itself in; afterwards loading and using keys only allocates memory and
/// talks to keyd's socket.
pub fn preload() -> Result<(), Error> {
    methods().map(|_| ())
}

/// Installs `method` on the EC_KEY or RSA object `raw` and stores one strong count of `ctx` in
/// its ex-data slot `idx` (released by ctx_free when the object is freed).
///
/// # Safety
/// `raw` is a valid object of the type `set_method`/`set_ex_data` take, `method` a table that
/// lives for the process, `idx` an ex-data index of that type whose free callback is ctx_free.
unsafe fn install<K, M>(
    raw: *mut K,
    set_method: unsafe extern "C" fn(*mut K, *const M) -> c_int,
    method: *const M,
    set_ex_data: unsafe extern "C" fn(*mut K, c_int, *mut c_void) -> c_int,
    idx: c_int,
    ctx: &Arc<KeyCtx>,
) -> Result<(), Error> {
    // SAFETY: per the contract.
    unsafe {
        if set_method(raw, method) != 1 {
            return Err(Error::OpenSsl(openssl::error::ErrorStack::get()));
        }
        if set_ex_data(raw, idx, Arc::into_raw(Arc::clone(ctx)) as *mut c_void) != 1 {
            // the count was not stored: take it back
            Arc::decrement_strong_count(Arc::as_ptr(ctx));
            return Err(Error::OpenSsl(openssl::error::ErrorStack::get()));
        }
    }
    Ok(())
}

/// Both halves of a loaded key: the EVP_PKEY (public parts; private ops routed to keyd).
pub(crate) fn load_private(client: &Arc<KeydClient>, handle: &str) -> Result<PKey<Private>, Error> {
    let m = methods()?;
    let ctx = Arc::new(KeyCtx {
        client: Arc::clone(client),
        handle: handle.to_owned(),
    });
    match load_public_parts(client, handle)? {
        PublicParts::Ec(key) => {
            // SAFETY: `key.as_ptr()` is a valid EC_KEY we own through `key`; the method table
            // lives for the process; the slot is the EC_KEY ex-data index. Set before
            // EVP_PKEY_assign so that OpenSSL marks the EVP_PKEY foreign.
            unsafe {
                install(
                    key.as_ptr(),
                    ffi::EC_KEY_set_method,
                    m.ec,
                    ffi::EC_KEY_set_ex_data,
                    m.ec_idx,
                    &ctx,
                )?
            };
            // SAFETY: same object, now typed as a private key: it has no private scalar, but
            // every private operation goes through the method installed above.
            let key: EcKey<Private> = unsafe { EcKey::from_ptr(into_raw(key)) };
            Ok(PKey::from_ec_key(key)?)
        }
        PublicParts::Rsa(key) => {
            // SAFETY: as for EC above, with the RSA method and slot.
            unsafe {
                install(
                    key.as_ptr(),
                    ffi::RSA_set_method,
                    m.rsa,
                    ffi::RSA_set_ex_data,
                    m.rsa_idx,
                    &ctx,
                )?
            };
            // SAFETY: as for EC above.
            let key: Rsa<Private> = unsafe { Rsa::from_ptr(into_raw(key)) };
            Ok(PKey::from_rsa(key)?)
        }
    }
}

/// The public key only (`ENGINE_load_public_key`).
pub(crate) fn load_public(client: &KeydClient, handle: &str) -> Result<PKey<Public>, Error> {
    Ok(match load_public_parts(client, handle)? {
        PublicParts::Ec(k) => PKey::from_ec_key(k)?,
        PublicParts::Rsa(k) => PKey::from_rsa(k)?,
    })
}

enum PublicParts {
    Ec(EcKey<Public>),
    Rsa(Rsa<Public>),
}

fn param(client: &KeydClient, handle: &str, name: &str) -> Result<String, Error> {
    client.post_for(
        &format!("/parameters/{name}"),
        &json!({ "keyHandle": handle }),
        "value",
    )
}

fn param_bytes(client: &KeydClient, handle: &str, name: &str) -> Result<Vec<u8>, Error> {
    let v = param(client, handle, name)?;
    B64.decode(v.as_bytes())
        .map_err(|e| Error::Protocol(format!("{name} is not base64: {e}")))
}

fn load_public_parts(client: &KeydClient, handle: &str) -> Result<PublicParts, Error> {
    if handle.is_empty() {
        return Err(Error::BadHandle("is empty"));
    }
    match param(client, handle, "algorithm")?.as_str() {
        "ECDSA" => {
            // keyd describes only P-256 by OID (spec §5.8); its library signs with any curve it
            // holds, so a P-384 key (49-byte compressed point) is recognised by its point.
            let oid = match param_bytes(client, handle, "ec-curve-oid") {
                Ok(oid) => Some(oid),
                Err(Error::Keyd { status: 400, .. }) => None,
                Err(e) => return Err(e),
            };
            let point = param_bytes(client, handle, "ec-point")?;
            let nid = match (oid.as_deref(), point.len()) {
                (Some(OID_P256), _) => Nid::X9_62_PRIME256V1,
                (Some(OID_P384), _) | (None, 49) => Nid::SECP384R1,
                (Some(other), _) => return Err(Error::UnsupportedKey(format!("EC curve with OID {}", hex(other)))),
                (None, n) => {
                    return Err(Error::UnsupportedKey(format!(
                        "keyd does not name the key's curve and its {n}-byte point is not a P-384 point"
                    )))
                }
            };
            let group = EcGroup::from_curve_name(nid)?;
            let mut bn = BigNumContext::new()?;
            let point = EcPoint::from_bytes(&group, &point, &mut bn).map_err(|e| {
                Error::UnsupportedKey(format!("the public point is not on the curve: {e}"))
            })?;
            Ok(PublicParts::Ec(EcKey::from_public_key(&group, &point)?))
        }
        "RSA" => {
            let n = BigNum::from_slice(&param_bytes(client, handle, "rsa-modulus")?)?;
            let e = BigNum::from_slice(&param_bytes(client, handle, "rsa-exponent")?)?;
            Ok(PublicParts::Rsa(Rsa::from_public_components(n, e)?))
        }
        other => Err(Error::UnsupportedKey(format!("algorithm {other:?}"))),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The digest keyd signs: truncated to the order's byte length if longer (spec §9.4).
pub(crate) fn truncate_digest(digest: &[u8], order_bits: c_int) -> &[u8] {
    let max = usize::try_from(order_bits).unwrap_or(0).div_ceil(8);
    if max > 0 && digest.len() > max {
        &digest[..max]
    } else {
        digest
    }
}

/// Runs a callback body, turning a panic into an error (never unwinds into C).
pub(crate) fn guarded<T>(func: Func, failed: T, body: impl FnOnce() -> Result<T, Error>) -> T {
    match std::panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            push(func, &e);
            failed
        }
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_owned());
            push(func, &Error::Internal(what));
            failed
        }
    }
}

/// # Safety
/// `ptr` must be null or a pointer `Arc::into_raw` gave for a `KeyCtx` still counted.
unsafe fn ctx_of(ptr: *mut c_void) -> Result<Arc<KeyCtx>, Error> {
    if ptr.is_null() {
        return Err(Error::NoContext);
    }
    // SAFETY: per the contract, a live counted Arc<KeyCtx>; we take one more count.
    unsafe {
        Arc::increment_strong_count(ptr as *const KeyCtx);
        Ok(Arc::from_raw(ptr as *const KeyCtx))
    }
}

/// EC_KEY_METHOD `sign_sig`: `POST /sign` ECDSA over the (truncated) digest.
unsafe extern "C" fn ec_sign_sig(
    dgst: *const c_uchar,
    dlen: c_int,
    _kinv: *const BIGNUM,
    _r: *const BIGNUM,
    eckey: *mut EC_KEY,
) -> *mut ECDSA_SIG {
    guarded(Func::EcSign, std::ptr::null_mut(), || {
        let m = methods()?;
        // SAFETY: OpenSSL passes the key being used; the slot holds our KeyCtx or nothing.
        let ctx = unsafe { ctx_of(ffi::EC_KEY_get_ex_data(eckey, m.ec_idx))? };
        // SAFETY: OpenSSL passes `dlen` readable bytes at `dgst`; the group belongs to the key.
        let (digest, bits) = unsafe {
            let digest = std::slice::from_raw_parts(dgst, usize::try_from(dlen).unwrap_or(0));
            (
                digest,
                openssl_sys::EC_GROUP_order_bits(openssl_sys::EC_KEY_get0_group(eckey)),
            )
        };
        let digest = truncate_digest(digest, bits);
        let sig = ctx.client.post_for(
            "/sign",
            &json!({ "keyHandle": ctx.handle, "algorithm": "ECDSA", "parameters": { "digest": B64.encode(digest) } }),
            "signature",
        )?;
        let der = B64
            .decode(sig.as_bytes())
            .map_err(|e| Error::Protocol(format!("signature is not base64: {e}")))?;
        let sig = EcdsaSig::from_der(&der)
            .map_err(|e| Error::Protocol(format!("signature is not DER ECDSA-Sig-Value: {e}")))?;
        Ok(into_raw(sig))
    })
}

/// RSA_METHOD `priv_enc` (signatures): PKCS#1 v1.5 → `RSA-PKCS1`, none → `RSA-NO-PADDING`.
unsafe extern "C" fn rsa_priv_enc(
    flen: c_int,
    from: *const c_uchar,
    to: *mut c_uchar,
    rsa: *mut RSA,
    padding: c_int,
) -> c_int {
    guarded(Func::RsaPrivEnc, -1, || {
        let algorithm = match padding {
            openssl_sys::RSA_PKCS1_PADDING => "RSA-PKCS1",
            openssl_sys::RSA_NO_PADDING => "RSA-NO-PADDING",
            other => return Err(Error::UnsupportedPadding(other)),
        };
        // SAFETY: OpenSSL passes `flen` readable bytes at `from`.
        let input = unsafe { std::slice::from_raw_parts(from, usize::try_from(flen).unwrap_or(0)) };
        // SAFETY: `rsa` is the key in use, `to` has RSA_size(rsa) writable bytes.
        unsafe { raw_private(rsa, algorithm, input, to).map(|n| n as c_int) }
    })
}

/// RSA_METHOD `priv_dec` (upstream: not implemented). keyd has no RSA decryption, but its
/// `RSA-NO-PADDING` "encryption" is the raw private-key operation c^d mod n, i.e. RSA decryption
/// without unpadding: the padding is checked here, in the caller's process, as OpenSSL's own
/// software key would (OAEP with other digests arrives here as no-padding: OpenSSL unpads it).
unsafe extern "C" fn rsa_priv_dec(
    flen: c_int,
    from: *const c_uchar,
    to: *mut c_uchar,
    rsa: *mut RSA,
    padding: c_int,
) -> c_int {
    guarded(Func::RsaPrivDec, -1, || {
        // SAFETY: `rsa` is the key in use.
        let k = usize::try_from(unsafe { openssl_sys::RSA_size(rsa) }).unwrap_or(0);
        // SAFETY: OpenSSL passes `flen` readable bytes at `from`.
        let input = unsafe { std::slice::from_raw_parts(from, usize::try_from(flen).unwrap_or(0)) };
        if input.len() > k {
            return Err(Error::Decrypt);
        }
        // the raw operation wants exactly k bytes
        let mut block = vec![0u8; k - input.len()];
        block.extend_from_slice(input);
        let mut raw = vec![0u8; k];
        // SAFETY: `raw` has k = RSA_size bytes.
        let n = unsafe { raw_private(rsa, "RSA-NO-PADDING", &block, raw.as_mut_ptr())? };
        if n != k {
            return Err(Error::Protocol(format!(
                "raw RSA result of {n} bytes for a {k}-byte modulus"
            )));
        }
        let out = match padding {
            openssl_sys::RSA_NO_PADDING => {
                // SAFETY: `to` has RSA_size(rsa) = k writable bytes.
                unsafe { std::ptr::copy_nonoverlapping(raw.as_ptr(), to, k) };
                k as c_int
            }
            // SAFETY: `to` has k writable bytes, `raw` is the k-byte block; the check writes
            // at most k bytes and returns -1 on bad padding.
            openssl_sys::RSA_PKCS1_PADDING => unsafe {
                openssl_sys::RSA_padding_check_PKCS1_type_2(
                    to,
                    k as c_int,
                    raw.as_ptr(),
                    k as c_int,
                    k as c_int,
                )
            },
            // SAFETY: as above (no label: p = NULL, pl = 0).
            openssl_sys::RSA_PKCS1_OAEP_PADDING => unsafe {
                ffi::RSA_padding_check_PKCS1_OAEP(
                    to,
                    k as c_int,
                    raw.as_ptr(),
                    k as c_int,
                    k as c_int,
                    std::ptr::null(),
                    0,
                )
            },
            other => return Err(Error::UnsupportedPadding(other)),
        };
        if out < 0 {
            return Err(Error::Decrypt);
        }
        Ok(out)
    })
}

/// `POST /encrypt {algorithm}` over `input` with the key of `rsa`, result copied to `to`.
///
/// # Safety
/// `rsa` must be a valid RSA key and `to` must have `RSA_size(rsa)` writable bytes.
unsafe fn raw_private(
    rsa: *mut RSA,
    algorithm: &str,
    input: &[u8],
    to: *mut c_uchar,
) -> Result<usize, Error> {
    let m = methods()?;
    // SAFETY: the slot holds our KeyCtx or nothing (contract of this function: valid key).
    let ctx = unsafe { ctx_of(ffi::RSA_get_ex_data(rsa, m.rsa_idx))? };
    // SAFETY: valid key.
    let k = usize::try_from(unsafe { openssl_sys::RSA_size(rsa) }).unwrap_or(0);
    let out = ctx.client.post_for(
        "/encrypt",
        &json!({ "keyHandle": ctx.handle, "algorithm": algorithm, "plaintext": B64.encode(input) }),
        "ciphertext",
    )?;
    let out = B64
        .decode(out.as_bytes())
        .map_err(|e| Error::Protocol(format!("ciphertext is not base64: {e}")))?;
    if out.len() > k {
        return Err(Error::Protocol(format!(
            "RSA result of {} bytes for a {k}-byte modulus",
            out.len()
        )));
    }
    // SAFETY: `to` has k ≥ out.len() writable bytes (contract).
    unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), to, out.len()) };
    Ok(out.len())
}

/// Ex-data dup callback (`EC_KEY_dup`, `RSAPrivateKey_dup`, ...): the copy shares the context,
/// with one more count.
unsafe extern "C" fn ctx_dup(
    _to: *mut openssl_sys::CRYPTO_EX_DATA,
    _from: *const openssl_sys::CRYPTO_EX_DATA,
    from_d: *mut *mut c_void,
    _idx: c_int,
    _argl: std::ffi::c_long,
    _argp: *mut c_void,
) -> c_int {
    // SAFETY: OpenSSL passes a pointer to the slot value it is about to store in the copy: null
    // or a counted KeyCtx of ours.
    unsafe {
        if !from_d.is_null() && !(*from_d).is_null() {
            Arc::increment_strong_count(*from_d as *const KeyCtx);
        }
    }
    1
}

/// Ex-data free callback: releases the count the slot held.
unsafe extern "C" fn ctx_free(
    _parent: *mut c_void,
    ptr: *mut c_void,
    _ad: *mut openssl_sys::CRYPTO_EX_DATA,
    _idx: c_int,
    _argl: std::ffi::c_long,
    _argp: *mut c_void,
) {
    if !ptr.is_null() {
        // SAFETY: a non-null slot value is a counted KeyCtx stored by `load_private`/`ctx_dup`.
        unsafe { drop(Arc::from_raw(ptr as *const KeyCtx)) };
    }
}

/// Gives up ownership of an `openssl` object: its raw pointer, which the caller now owns.
pub(crate) fn into_raw<T: ForeignType>(t: T) -> *mut T::CType {
    let p = t.as_ptr();
    std::mem::forget(t);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_truncation_follows_the_order() {
        let d = [7u8; 64];
        assert_eq!(truncate_digest(&d, 256).len(), 32);
        assert_eq!(truncate_digest(&d, 384).len(), 48);
        assert_eq!(truncate_digest(&d, 521).len(), 64);
        assert_eq!(
            truncate_digest(&d[..20], 256).len(),
            20,
            "shorter digests are signed as given"
        );
    }

    #[test]
    fn methods_are_created_once() {
        preload().unwrap();
        let a = methods().unwrap() as *const Methods;
        preload().unwrap();
        assert_eq!(a, methods().unwrap() as *const Methods);
    }
}
