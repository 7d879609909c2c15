//! RSA asymmetric cipher (provider-asym_cipher(7)): decryption with a keyd key (PKCS#1 v1.5,
//! OAEP, none) runs the legacy `EVP_PKEY_decrypt` on the twin — keyd does the raw RSA operation
//! (`RSA-NO-PADDING`, the engine's `priv_dec`) and OpenSSL checks the padding in this process;
//! encryption is the default provider's, with the public key.

use std::ffi::{c_int, c_uchar, c_void};
use std::sync::OnceLock;

use openssl::md::Md;
use openssl::pkey_ctx::{PkeyCtx, PkeyCtxRef};
use openssl::rsa::Padding;

use super::keymgmt::{key_ref, KeyData};
use super::{bytes, ctx_mut, desc, end, f, get_pad_mode, get_utf8, locate, param_end, put, Table};
use crate::error::{Error, Func};
use crate::ffi_provider as ffi;
use crate::key::guarded;

#[derive(Clone, Default)]
struct CipherCtx {
    key: Option<KeyData>,
    pad: Option<c_int>,
    oaep_md: Option<String>,
    mgf1: Option<String>,
    label: Option<Vec<u8>>,
}

impl CipherCtx {
    /// # Safety
    /// `params` null or a valid OSSL_PARAM array.
    unsafe fn set(&mut self, params: *const ffi::OSSL_PARAM) -> Result<(), Error> {
        if params.is_null() {
            return Ok(());
        }
        // SAFETY: per the contract.
        unsafe {
            if let Some(pad) = get_pad_mode(
                params,
                &[
                    ("none", openssl_sys::RSA_NO_PADDING),
                    ("pkcs1", openssl_sys::RSA_PKCS1_PADDING),
                    ("oaep", openssl_sys::RSA_PKCS1_OAEP_PADDING),
                ],
            )? {
                self.pad = Some(pad);
            }
            if let Some(md) = get_utf8(params, ffi::SIG_DIGEST)? {
                Md::fetch(None, &md, None)?;
                self.oaep_md = Some(md);
            }
            if let Some(md) = get_utf8(params, ffi::SIG_MGF1_DIGEST)? {
                Md::fetch(None, &md, None)?;
                self.mgf1 = Some(md);
            }
            if let Some(p) = locate(params, ffi::CIPHER_OAEP_LABEL) {
                let mut v: *const c_void = std::ptr::null();
                let mut n = 0usize;
                if ffi::OSSL_PARAM_get_octet_string_ptr(p, &mut v, &mut n) != 1 {
                    return Err(Error::Internal(
                        "oaep-label is not an octet string".to_owned(),
                    ));
                }
                self.label = Some(if v.is_null() {
                    Vec::new()
                } else {
                    std::slice::from_raw_parts(v as *const u8, n).to_vec()
                });
            }
        }
        Ok(())
    }

    fn apply<T>(&self, ctx: &mut PkeyCtxRef<T>) -> Result<(), Error> {
        let pad = self.pad.unwrap_or(openssl_sys::RSA_PKCS1_PADDING);
        ctx.set_rsa_padding(Padding::from_raw(pad))?;
        if pad == openssl_sys::RSA_PKCS1_OAEP_PADDING {
            if let Some(md) = &self.oaep_md {
                let fetched = Md::fetch(None, md, None)?;
                ctx.set_rsa_oaep_md(&fetched)?;
            }
            if let Some(md) = &self.mgf1 {
                let fetched = Md::fetch(None, md, None)?;
                ctx.set_rsa_mgf1_md(&fetched)?;
            }
            if let Some(l) = &self.label {
                if !l.is_empty() {
                    ctx.set_rsa_oaep_label(l)?;
                }
            }
        }
        Ok(())
    }

    fn key(&self) -> Result<&KeyData, Error> {
        self.key
            .as_ref()
            .ok_or_else(|| Error::Internal("cipher context not initialised".to_owned()))
    }
}

/// # Safety
/// `ctx` null or a CipherCtx this module allocated.
unsafe fn cctx<'a>(ctx: *mut c_void) -> Result<&'a mut CipherCtx, Error> {
    // SAFETY: per the contract.
    unsafe { ctx_mut(ctx, "cipher") }
}

unsafe extern "C" fn newctx(_provctx: *mut c_void) -> *mut c_void {
    Box::into_raw(Box::<CipherCtx>::default()) as *mut c_void
}

unsafe extern "C" fn freectx(ctx: *mut c_void) {
    if !ctx.is_null() {
        // SAFETY: a CipherCtx we allocated, freed once.
        drop(unsafe { Box::from_raw(ctx as *mut CipherCtx) });
    }
}

unsafe extern "C" fn dupctx(ctx: *mut c_void) -> *mut c_void {
    // SAFETY: OpenSSL passes one of our contexts.
    match unsafe { cctx(ctx) } {
        Ok(c) => Box::into_raw(Box::new(c.clone())) as *mut c_void,
        Err(_) => std::ptr::null_mut(),
    }
}

/// `encrypt_init` and `decrypt_init` alike.
unsafe extern "C" fn init(
    ctx: *mut c_void,
    provkey: *mut c_void,
    params: *const ffi::OSSL_PARAM,
) -> c_int {
    guarded(Func::ProvDecrypt, 0, || {
        // SAFETY: our context, one of our keys, OpenSSL's parameter array.
        unsafe {
            let c = cctx(ctx)?;
            *c = CipherCtx {
                key: Some(key_ref(provkey)?.clone()),
                ..CipherCtx::default()
            };
            c.set(params)?;
        }
        Ok(1)
    })
}

/// # Safety
/// OpenSSL's buffers per provider-asym_cipher(7).
unsafe fn run(
    decrypt: bool,
    ctx: *mut c_void,
    out: *mut c_uchar,
    outlen: *mut usize,
    outsize: usize,
    input: *const c_uchar,
    inlen: usize,
) -> c_int {
    guarded(Func::ProvDecrypt, 0, || {
        // SAFETY: per the contract.
        unsafe {
            let c = cctx(ctx)?;
            let key = c.key()?;
            let size = key.public()?.size();
            if out.is_null() {
                *outlen = size;
                return Ok(1);
            }
            let input = bytes(input, inlen);
            let mut buf = Vec::new();
            if decrypt {
                let mut p = PkeyCtx::new(key.twin()?)?;
                p.decrypt_init()?;
                c.apply(&mut p)?;
                p.decrypt_to_vec(input, &mut buf)
                    .map_err(|_| Error::Decrypt)?;
            } else {
                let mut p = super::default_ctx(key.public()?)?;
                p.encrypt_init()?;
                c.apply(&mut p)?;
                p.encrypt_to_vec(input, &mut buf)?;
            }
            put(out, outlen, outsize, &buf, "output")
        }
    })
}

unsafe extern "C" fn encrypt(
    ctx: *mut c_void,
    out: *mut c_uchar,
    outlen: *mut usize,
    outsize: usize,
    input: *const c_uchar,
    inlen: usize,
) -> c_int {
    // SAFETY: forwarded from OpenSSL.
    unsafe { run(false, ctx, out, outlen, outsize, input, inlen) }
}

unsafe extern "C" fn decrypt(
    ctx: *mut c_void,
    out: *mut c_uchar,
    outlen: *mut usize,
    outsize: usize,
    input: *const c_uchar,
    inlen: usize,
) -> c_int {
    // SAFETY: forwarded from OpenSSL.
    unsafe { run(true, ctx, out, outlen, outsize, input, inlen) }
}

unsafe extern "C" fn set_ctx_params(ctx: *mut c_void, params: *const ffi::OSSL_PARAM) -> c_int {
    guarded(Func::ProvDecrypt, 0, || {
        // SAFETY: our context; OpenSSL's parameter array.
        unsafe { cctx(ctx)?.set(params)? };
        Ok(1)
    })
}

fn settable() -> &'static Table<ffi::OSSL_PARAM> {
    static T: OnceLock<Table<ffi::OSSL_PARAM>> = OnceLock::new();
    T.get_or_init(|| {
        Table(vec![
            desc(ffi::SIG_PAD_MODE, ffi::OSSL_PARAM_UTF8_STRING),
            desc(ffi::SIG_DIGEST, ffi::OSSL_PARAM_UTF8_STRING),
            desc(ffi::SIG_MGF1_DIGEST, ffi::OSSL_PARAM_UTF8_STRING),
            desc(ffi::CIPHER_OAEP_LABEL, ffi::OSSL_PARAM_OCTET_STRING),
            param_end(),
        ])
    })
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
            f(ffi::OSSL_FUNC_ASYM_CIPHER_NEWCTX, newctx as *const ()),
            f(ffi::OSSL_FUNC_ASYM_CIPHER_FREECTX, freectx as *const ()),
            f(ffi::OSSL_FUNC_ASYM_CIPHER_DUPCTX, dupctx as *const ()),
            f(ffi::OSSL_FUNC_ASYM_CIPHER_ENCRYPT_INIT, init as *const ()),
            f(ffi::OSSL_FUNC_ASYM_CIPHER_ENCRYPT, encrypt as *const ()),
            f(ffi::OSSL_FUNC_ASYM_CIPHER_DECRYPT_INIT, init as *const ()),
            f(ffi::OSSL_FUNC_ASYM_CIPHER_DECRYPT, decrypt as *const ()),
            f(
                ffi::OSSL_FUNC_ASYM_CIPHER_SET_CTX_PARAMS,
                set_ctx_params as *const (),
            ),
            f(
                ffi::OSSL_FUNC_ASYM_CIPHER_SETTABLE_CTX_PARAMS,
                settable_ctx_params as *const (),
            ),
            end(),
        ])
    })
}
