//! Signatures (provider-signature(7)): `ECDSA` and `RSA` (PKCS#1 v1.5, PSS, none) with keys
//! held by keyd.
//!
//! Signing runs the legacy `EVP_PKEY_sign` on the key's twin with the context's digest, padding,
//! salt length and MGF1 digest: OpenSSL's own RSA/EC code does the encoding (DigestInfo, PSS,
//! DER) and the twin's methods send the private operation to keyd — the engine's code, not a
//! copy. `digest_sign_*` hashes in this process (the default provider's digests) and then signs
//! the digest. Verification, and the `algorithm-id` that X.509/CSR signing asks for, are done
//! by the default provider on the public key.

use std::ffi::{c_int, c_uchar, c_void, CStr};
use std::sync::OnceLock;

use foreign_types::ForeignType;
use openssl::md::Md;
use openssl::md_ctx::MdCtx;
use openssl::pkey_ctx::{PkeyCtx, PkeyCtxRef};
use openssl::rsa::Padding;
use openssl::sign::RsaPssSaltlen;

use super::keymgmt::{key_ref, KeyData, Kind};
use super::{
    bytes, ctx_mut, desc, end, f, get_int_or_name, get_pad_mode, get_utf8, param_end, put,
    IntOrName, Table,
};
use crate::error::{Error, Func};
use crate::ffi_provider as ffi;
use crate::key::guarded;

/// The operation parameters of a signature context.
#[derive(Clone, Default)]
pub(crate) struct Params {
    md: Option<String>,
    pad: Option<c_int>,
    saltlen: Option<c_int>,
    mgf1: Option<String>,
}

impl Params {
    /// Reads what `params` sets (unknown names are ignored, as OpenSSL's providers do).
    ///
    /// # Safety
    /// `params` must be null or a valid OSSL_PARAM array.
    unsafe fn set(&mut self, params: *const ffi::OSSL_PARAM) -> Result<(), Error> {
        // SAFETY: per the contract.
        unsafe {
            if let Some(md) = get_utf8(params, ffi::SIG_DIGEST)? {
                Md::fetch(None, &md, None)?;
                self.md = Some(md);
            }
            if let Some(m) = get_utf8(params, ffi::SIG_MGF1_DIGEST)? {
                Md::fetch(None, &m, None)?;
                self.mgf1 = Some(m);
            }
            if let Some(pad) = get_pad_mode(
                params,
                &[
                    ("none", openssl_sys::RSA_NO_PADDING),
                    ("pkcs1", openssl_sys::RSA_PKCS1_PADDING),
                    ("pss", openssl_sys::RSA_PKCS1_PSS_PADDING),
                    ("x931", 5),
                ],
            )? {
                self.pad = Some(pad);
            }
            if let Some(s) = get_int_or_name(params, ffi::SIG_PSS_SALTLEN)? {
                self.saltlen = Some(match s {
                    IntOrName::Int(i) => i,
                    IntOrName::Name(n) => match n.as_str() {
                        "digest" => -1,
                        "auto" => -2,
                        "max" => -3,
                        num => num
                            .parse()
                            .map_err(|_| Error::Internal(format!("unknown saltlen {num:?}")))?,
                    },
                });
            }
        }
        Ok(())
    }

    /// Sets the parameters on an initialised (sign or verify) context.
    fn apply<T>(&self, ctx: &mut PkeyCtxRef<T>, kind: Kind) -> Result<(), Error> {
        if let Some(md) = &self.md {
            let fetched = Md::fetch(None, md, None)?;
            ctx.set_signature_md(&fetched)?;
        }
        if kind == Kind::Rsa {
            if let Some(pad) = self.pad {
                ctx.set_rsa_padding(Padding::from_raw(pad))?;
                if pad == openssl_sys::RSA_PKCS1_PSS_PADDING {
                    if let Some(s) = self.saltlen {
                        ctx.set_rsa_pss_saltlen(RsaPssSaltlen::custom(s))?;
                    }
                    if let Some(m) = &self.mgf1 {
                        let fetched = Md::fetch(None, m, None)?;
                        ctx.set_rsa_mgf1_md(&fetched)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Signs `tbs` (a digest, or raw input without a digest set) with keyd, through the twin.
pub(crate) fn sign_with(key: &KeyData, params: &Params, tbs: &[u8]) -> Result<Vec<u8>, Error> {
    // The twin is a "foreign" legacy key: this context runs OpenSSL's legacy RSA/EC code,
    // whose private operation is the engine's method → keyd. No provider is fetched.
    let mut ctx = PkeyCtx::new(key.twin()?)?;
    ctx.sign_init()?;
    params.apply(&mut ctx, key.kind)?;
    let mut sig = Vec::new();
    ctx.sign_to_vec(tbs, &mut sig)?;
    Ok(sig)
}

/// Verifies with the public key, in the default provider.
fn verify_with(key: &KeyData, params: &Params, sig: &[u8], tbs: &[u8]) -> Result<bool, Error> {
    let mut ctx = super::default_ctx(key.public()?)?;
    ctx.verify_init()?;
    params.apply(&mut ctx, key.kind)?;
    let ok = ctx.verify(tbs, sig).unwrap_or(false);
    // a mismatch is an answer, not an error
    let _ = openssl::error::ErrorStack::get();
    Ok(ok)
}

struct SigCtx {
    key: Option<KeyData>,
    params: Params,
    md: Option<MdCtx>,
}

impl SigCtx {
    fn key(&self) -> Result<&KeyData, Error> {
        self.key
            .as_ref()
            .ok_or_else(|| Error::Internal("signature context not initialised".to_owned()))
    }

    /// # Safety
    /// `provkey` must be one of this provider's key objects, `params` null or valid.
    unsafe fn init(
        &mut self,
        provkey: *mut c_void,
        mdname: Option<&CStr>,
        params: *const ffi::OSSL_PARAM,
    ) -> Result<(), Error> {
        // SAFETY: per the contract.
        let key = unsafe { key_ref(provkey)? }.clone();
        self.params = Params::default();
        self.md = None;
        if let Some(md) = mdname.map(|m| m.to_string_lossy().into_owned()) {
            if !md.is_empty() {
                self.params.md = Some(md);
            }
        }
        // SAFETY: per the contract.
        unsafe { self.params.set(params)? };
        self.key = Some(key);
        Ok(())
    }

    fn start_digest(&mut self) -> Result<(), Error> {
        let name = self
            .params
            .md
            .get_or_insert_with(|| "SHA256".to_owned())
            .clone();
        let mut md = MdCtx::new()?;
        let fetched = Md::fetch(None, &name, None)?;
        md.digest_init(&fetched)?;
        self.md = Some(md);
        Ok(())
    }

    fn finish_digest(&mut self) -> Result<Vec<u8>, Error> {
        let md = self
            .md
            .as_mut()
            .ok_or_else(|| Error::Internal("no digest in progress".to_owned()))?;
        let mut out = vec![0u8; 64];
        let n = md.digest_final(&mut out)?;
        out.truncate(n);
        Ok(out)
    }
}

/// # Safety
/// `ctx` must be null or a SigCtx this module allocated.
unsafe fn sctx<'a>(ctx: *mut c_void) -> Result<&'a mut SigCtx, Error> {
    // SAFETY: per the contract.
    unsafe { ctx_mut(ctx, "signature") }
}

/// # Safety
/// `p` must be null or a NUL-terminated string.
unsafe fn opt_cstr<'a>(p: *const std::ffi::c_char) -> Option<&'a CStr> {
    // SAFETY: per the contract.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) })
}

unsafe extern "C" fn newctx(_provctx: *mut c_void, _propq: *const std::ffi::c_char) -> *mut c_void {
    Box::into_raw(Box::new(SigCtx {
        key: None,
        params: Params::default(),
        md: None,
    })) as *mut c_void
}

unsafe extern "C" fn freectx(ctx: *mut c_void) {
    if !ctx.is_null() {
        // SAFETY: a SigCtx we allocated, freed once by OpenSSL.
        drop(unsafe { Box::from_raw(ctx as *mut SigCtx) });
    }
}

unsafe extern "C" fn dupctx(ctx: *mut c_void) -> *mut c_void {
    guarded(Func::ProvSign, std::ptr::null_mut(), || {
        // SAFETY: OpenSSL passes one of our contexts.
        let c = unsafe { sctx(ctx)? };
        let md = match &c.md {
            None => None,
            Some(m) => {
                let copy = MdCtx::new()?;
                // SAFETY: two valid digest contexts; the copy gets the state of the original.
                if unsafe { ffi::EVP_MD_CTX_copy_ex(copy.as_ptr(), m.as_ptr()) } != 1 {
                    return Err(Error::OpenSsl(openssl::error::ErrorStack::get()));
                }
                Some(copy)
            }
        };
        Ok(Box::into_raw(Box::new(SigCtx {
            key: c.key.clone(),
            params: c.params.clone(),
            md,
        })) as *mut c_void)
    })
}

/// The `*_init` functions: (re)initialises the context with `provkey` and the digest `mdname`
/// (the `digest_*` ones, which also start the digest); signing needs the key's twin.
///
/// # Safety
/// As the `*_init` functions of provider-signature(7): our context, one of our keys, a
/// parameter array; `mdname` null or a C string.
unsafe fn init_op(
    func: Func,
    ctx: *mut c_void,
    mdname: Option<*const std::ffi::c_char>,
    provkey: *mut c_void,
    params: *const ffi::OSSL_PARAM,
) -> c_int {
    guarded(func, 0, || {
        // SAFETY: per the contract.
        unsafe {
            let c = sctx(ctx)?;
            c.init(provkey, mdname.and_then(|m| opt_cstr(m)), params)?;
            if matches!(func, Func::ProvSign) {
                c.key()?.twin()?;
            }
            if mdname.is_some() {
                c.start_digest()?;
            }
        }
        Ok(1)
    })
}

unsafe extern "C" fn sign_init(
    ctx: *mut c_void,
    provkey: *mut c_void,
    params: *const ffi::OSSL_PARAM,
) -> c_int {
    // SAFETY: forwarded from OpenSSL.
    unsafe { init_op(Func::ProvSign, ctx, None, provkey, params) }
}

unsafe extern "C" fn verify_init(
    ctx: *mut c_void,
    provkey: *mut c_void,
    params: *const ffi::OSSL_PARAM,
) -> c_int {
    // SAFETY: forwarded from OpenSSL.
    unsafe { init_op(Func::ProvVerify, ctx, None, provkey, params) }
}

unsafe extern "C" fn sign(
    ctx: *mut c_void,
    sig: *mut c_uchar,
    siglen: *mut usize,
    sigsize: usize,
    tbs: *const c_uchar,
    tbslen: usize,
) -> c_int {
    guarded(Func::ProvSign, 0, || {
        // SAFETY: OpenSSL's buffers per provider-signature(7).
        unsafe {
            let c = sctx(ctx)?;
            let key = c.key()?;
            if sig.is_null() {
                *siglen = key.public()?.size();
                return Ok(1);
            }
            let s = sign_with(key, &c.params, bytes(tbs, tbslen))?;
            put(sig, siglen, sigsize, &s, "signature")
        }
    })
}

unsafe extern "C" fn verify(
    ctx: *mut c_void,
    sig: *const c_uchar,
    siglen: usize,
    tbs: *const c_uchar,
    tbslen: usize,
) -> c_int {
    guarded(Func::ProvVerify, 0, || {
        // SAFETY: OpenSSL's buffers per provider-signature(7).
        unsafe {
            let c = sctx(ctx)?;
            Ok(c_int::from(verify_with(
                c.key()?,
                &c.params,
                bytes(sig, siglen),
                bytes(tbs, tbslen),
            )?))
        }
    })
}

unsafe extern "C" fn digest_sign_init(
    ctx: *mut c_void,
    mdname: *const std::ffi::c_char,
    provkey: *mut c_void,
    params: *const ffi::OSSL_PARAM,
) -> c_int {
    // SAFETY: forwarded from OpenSSL.
    unsafe { init_op(Func::ProvSign, ctx, Some(mdname), provkey, params) }
}

unsafe extern "C" fn digest_verify_init(
    ctx: *mut c_void,
    mdname: *const std::ffi::c_char,
    provkey: *mut c_void,
    params: *const ffi::OSSL_PARAM,
) -> c_int {
    // SAFETY: forwarded from OpenSSL.
    unsafe { init_op(Func::ProvVerify, ctx, Some(mdname), provkey, params) }
}

unsafe extern "C" fn digest_update(ctx: *mut c_void, data: *const c_uchar, len: usize) -> c_int {
    guarded(Func::ProvSign, 0, || {
        // SAFETY: our context; `len` readable bytes at `data`.
        unsafe {
            let c = sctx(ctx)?;
            c.md.as_mut()
                .ok_or_else(|| Error::Internal("no digest in progress".to_owned()))?
                .digest_update(bytes(data, len))?;
        }
        Ok(1)
    })
}

unsafe extern "C" fn digest_sign_final(
    ctx: *mut c_void,
    sig: *mut c_uchar,
    siglen: *mut usize,
    sigsize: usize,
) -> c_int {
    guarded(Func::ProvSign, 0, || {
        // SAFETY: OpenSSL's buffers per provider-signature(7).
        unsafe {
            let c = sctx(ctx)?;
            if sig.is_null() {
                *siglen = c.key()?.public()?.size();
                return Ok(1);
            }
            let digest = c.finish_digest()?;
            let s = sign_with(c.key()?, &c.params, &digest)?;
            put(sig, siglen, sigsize, &s, "signature")
        }
    })
}

unsafe extern "C" fn digest_verify_final(
    ctx: *mut c_void,
    sig: *const c_uchar,
    siglen: usize,
) -> c_int {
    guarded(Func::ProvVerify, 0, || {
        // SAFETY: OpenSSL's buffers per provider-signature(7).
        unsafe {
            let c = sctx(ctx)?;
            let digest = c.finish_digest()?;
            Ok(c_int::from(verify_with(
                c.key()?,
                &c.params,
                bytes(sig, siglen),
                &digest,
            )?))
        }
    })
}

/// `algorithm-id` (the AlgorithmIdentifier DER for X.509/CSR signing), `digest`, `pad-mode`,
/// `saltlen`: answered by a default-provider context on the public key with the same settings.
unsafe extern "C" fn get_ctx_params(ctx: *mut c_void, params: *mut ffi::OSSL_PARAM) -> c_int {
    guarded(Func::ProvSign, 0, || {
        // SAFETY: our context; OpenSSL's parameter array.
        unsafe {
            let c = sctx(ctx)?;
            let key = c.key()?;
            let mut d = super::default_ctx(key.public()?)?;
            d.verify_init()?;
            c.params.apply(&mut d, key.kind)?;
            Ok(ffi::EVP_PKEY_CTX_get_params(d.as_ptr(), params))
        }
    })
}

unsafe extern "C" fn set_ctx_params(ctx: *mut c_void, params: *const ffi::OSSL_PARAM) -> c_int {
    guarded(Func::ProvSign, 0, || {
        // SAFETY: our context; OpenSSL's parameter array.
        unsafe { sctx(ctx)?.params.set(params)? };
        Ok(1)
    })
}

fn gettable() -> &'static Table<ffi::OSSL_PARAM> {
    static T: OnceLock<Table<ffi::OSSL_PARAM>> = OnceLock::new();
    T.get_or_init(|| {
        Table(vec![
            desc(ffi::SIG_ALGORITHM_ID, ffi::OSSL_PARAM_OCTET_STRING),
            desc(ffi::SIG_DIGEST, ffi::OSSL_PARAM_UTF8_STRING),
            desc(ffi::SIG_PAD_MODE, ffi::OSSL_PARAM_UTF8_STRING),
            desc(ffi::SIG_PSS_SALTLEN, ffi::OSSL_PARAM_UTF8_STRING),
            param_end(),
        ])
    })
}

fn settable() -> &'static Table<ffi::OSSL_PARAM> {
    static T: OnceLock<Table<ffi::OSSL_PARAM>> = OnceLock::new();
    T.get_or_init(|| {
        Table(vec![
            desc(ffi::SIG_DIGEST, ffi::OSSL_PARAM_UTF8_STRING),
            desc(ffi::SIG_PROPERTIES, ffi::OSSL_PARAM_UTF8_STRING),
            desc(ffi::SIG_PAD_MODE, ffi::OSSL_PARAM_UTF8_STRING),
            desc(ffi::SIG_PSS_SALTLEN, ffi::OSSL_PARAM_UTF8_STRING),
            desc(ffi::SIG_MGF1_DIGEST, ffi::OSSL_PARAM_UTF8_STRING),
            param_end(),
        ])
    })
}

unsafe extern "C" fn gettable_ctx_params(
    _ctx: *mut c_void,
    _provctx: *mut c_void,
) -> *const ffi::OSSL_PARAM {
    gettable().0.as_ptr()
}

unsafe extern "C" fn settable_ctx_params(
    _ctx: *mut c_void,
    _provctx: *mut c_void,
) -> *const ffi::OSSL_PARAM {
    settable().0.as_ptr()
}

pub(crate) fn dispatch() -> &'static Table<ffi::OSSL_DISPATCH> {
    static T: OnceLock<Table<ffi::OSSL_DISPATCH>> = OnceLock::new();
    T.get_or_init(|| {
        Table(vec![
            f(ffi::OSSL_FUNC_SIGNATURE_NEWCTX, newctx as *const ()),
            f(ffi::OSSL_FUNC_SIGNATURE_FREECTX, freectx as *const ()),
            f(ffi::OSSL_FUNC_SIGNATURE_DUPCTX, dupctx as *const ()),
            f(ffi::OSSL_FUNC_SIGNATURE_SIGN_INIT, sign_init as *const ()),
            f(ffi::OSSL_FUNC_SIGNATURE_SIGN, sign as *const ()),
            f(
                ffi::OSSL_FUNC_SIGNATURE_VERIFY_INIT,
                verify_init as *const (),
            ),
            f(ffi::OSSL_FUNC_SIGNATURE_VERIFY, verify as *const ()),
            f(
                ffi::OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT,
                digest_sign_init as *const (),
            ),
            f(
                ffi::OSSL_FUNC_SIGNATURE_DIGEST_SIGN_UPDATE,
                digest_update as *const (),
            ),
            f(
                ffi::OSSL_FUNC_SIGNATURE_DIGEST_SIGN_FINAL,
                digest_sign_final as *const (),
            ),
            f(
                ffi::OSSL_FUNC_SIGNATURE_DIGEST_VERIFY_INIT,
                digest_verify_init as *const (),
            ),
            f(
                ffi::OSSL_FUNC_SIGNATURE_DIGEST_VERIFY_UPDATE,
                digest_update as *const (),
            ),
            f(
                ffi::OSSL_FUNC_SIGNATURE_DIGEST_VERIFY_FINAL,
                digest_verify_final as *const (),
            ),
            f(
                ffi::OSSL_FUNC_SIGNATURE_GET_CTX_PARAMS,
                get_ctx_params as *const (),
            ),
            f(
                ffi::OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS,
                gettable_ctx_params as *const (),
            ),
            f(
                ffi::OSSL_FUNC_SIGNATURE_SET_CTX_PARAMS,
                set_ctx_params as *const (),
            ),
            f(
                ffi::OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS,
                settable_ctx_params as *const (),
            ),
            end(),
        ])
    })
}
