//! The OSSL_STORE loader (provider-storemgmt(7)) for `aziot-keys:` URIs ([`super::uri`]):
//! one object per URI, the key pair keyd holds for the handle, passed to libcrypto **by
//! reference** (`OSSL_OBJECT_PARAM_REFERENCE`): libcrypto hands the reference to this
//! provider's key management (`load`), so the key never leaves the provider in any form.
//! Opening only parses the URI; loading asks keyd for the public parts (the engine's
//! `key::load_private`: `/parameters/*`), on the provider's keyd client (the engine's: the
//! compiled-in socket or `$AZIOT_KEYD_ENDPOINT`, docs/engine.md) — or, for the built-in provider
//! of a worker ([`super::in_process`]), on the caller's client named by the
//! `aziot-keys-in-process-client` parameter.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

use super::keymgmt::{KeyData, Kind};
use super::{desc, end, f, param_end, Table};
use crate::error::{push, Error, Func};
use crate::ffi_provider as ffi;
use crate::key::guarded;

struct StoreCtx {
    handle: String,
    expect: c_int,
    /// The in-process caller's keyd client (`super::in_process`), if it named one.
    client_id: Option<u64>,
    done: bool,
    /// The loaded key, alive while libcrypto's object callback runs (the reference is its address).
    key: Option<KeyData>,
}

unsafe extern "C" fn open(_provctx: *mut c_void, uri: *const c_char) -> *mut c_void {
    guarded(Func::ProvStoreOpen, std::ptr::null_mut(), || {
        if uri.is_null() {
            return Err(Error::BadUri("no URI".to_owned()));
        }
        // SAFETY: OpenSSL passes the NUL-terminated URI the application gave.
        let uri = unsafe { CStr::from_ptr(uri) }
            .to_str()
            .map_err(|_| Error::BadUri("not UTF-8".to_owned()))?;
        let parsed = super::uri::parse(uri)?;
        Ok(Box::into_raw(Box::new(StoreCtx {
            handle: parsed.handle,
            expect: 0,
            client_id: None,
            done: false,
            key: None,
        })) as *mut c_void)
    })
}

/// # Safety
/// `ctx` null or a StoreCtx this module allocated.
unsafe fn sctx<'a>(ctx: *mut c_void) -> Result<&'a mut StoreCtx, Error> {
    // SAFETY: per the contract.
    unsafe { super::ctx_mut(ctx, "store") }
}

unsafe extern "C" fn set_ctx_params(ctx: *mut c_void, params: *const ffi::OSSL_PARAM) -> c_int {
    guarded(Func::ProvStoreLoad, 0, || {
        // SAFETY: our context; OpenSSL's parameter array.
        unsafe {
            let c = sctx(ctx)?;
            if let Some(p) = super::locate(params, ffi::STORE_EXPECT) {
                if ffi::OSSL_PARAM_get_int(p, &mut c.expect) != 1 {
                    return Err(Error::Internal("expect is not an integer".to_owned()));
                }
            }
            if let Some(p) = super::locate(params, ffi::STORE_CLIENT_ID) {
                let mut id = 0u64;
                if ffi::OSSL_PARAM_get_uint64(p, &mut id) != 1 {
                    return Err(Error::Internal(
                        "the in-process client id is not an integer".to_owned(),
                    ));
                }
                c.client_id = Some(id);
            }
        }
        Ok(1)
    })
}

fn settable() -> &'static Table<ffi::OSSL_PARAM> {
    static T: OnceLock<Table<ffi::OSSL_PARAM>> = OnceLock::new();
    T.get_or_init(|| {
        Table(vec![
            desc(ffi::STORE_EXPECT, ffi::OSSL_PARAM_INTEGER),
            desc(ffi::STORE_CLIENT_ID, ffi::OSSL_PARAM_UNSIGNED_INTEGER),
            param_end(),
        ])
    })
}

unsafe extern "C" fn settable_ctx_params(_provctx: *mut c_void) -> *const ffi::OSSL_PARAM {
    settable().0.as_ptr()
}

unsafe extern "C" fn load(
    ctx: *mut c_void,
    object_cb: Option<ffi::OSSL_CALLBACK>,
    object_cbarg: *mut c_void,
    _pw_cb: Option<ffi::OSSL_PASSPHRASE_CALLBACK>,
    _pw_cbarg: *mut c_void,
) -> c_int {
    guarded(Func::ProvStoreLoad, 0, || {
        // SAFETY: our context.
        let c = unsafe { sctx(ctx)? };
        if c.done {
            return Ok(1);
        }
        c.done = true;
        // only key pairs here: a certificate, CRL or parameters search finds nothing
        if ![0, ffi::OSSL_STORE_INFO_PKEY, ffi::OSSL_STORE_INFO_PUBKEY].contains(&c.expect) {
            return Ok(1);
        }
        let (client, id) = match c.client_id {
            Some(id) => (super::in_process::client(id)?, Some(id)),
            None => (crate::engine::client()?, None),
        };
        let twin = match crate::key::load_private(&client, &c.handle) {
            Ok(twin) => twin,
            Err(e) => {
                // on the queue as always, and typed for the in-process caller
                push(Func::ProvStoreLoad, &e);
                if let Some(id) = id {
                    super::in_process::record_error(id, e);
                }
                return Ok(0);
            }
        };
        let key = c.key.insert(KeyData::from_twin(twin)?);
        let cb = object_cb.ok_or_else(|| Error::Internal("no object callback".to_owned()))?;
        // SAFETY: OpenSSL's callback and argument; `c.key` lives until the context is closed.
        Ok(unsafe { pass_by_reference(key, cb, object_cbarg) })
    })
}

/// Hands `key` to libcrypto by reference (the store's and the decoder's object callback):
/// libcrypto gives the reference to this provider's key management `load`, which copies the
/// key object during the call.
///
/// # Safety
/// `cb`/`cbarg` are an OSSL_CALLBACK and its argument from OpenSSL.
pub(crate) unsafe fn pass_by_reference(
    key: &KeyData,
    cb: ffi::OSSL_CALLBACK,
    cbarg: *mut c_void,
) -> c_int {
    let data_type = match key.kind {
        Kind::Ec => c"EC",
        Kind::Rsa => c"RSA",
    };
    let mut object_type = ffi::OSSL_OBJECT_PKEY;
    let mut reference: *const KeyData = key;
    // SAFETY: the parameters point at locals alive for the call; the reference is the address
    // of `key`, valid for the call (keymgmt `load` copies it).
    unsafe {
        let params = [
            ffi::OSSL_PARAM_construct_int(ffi::OBJECT_TYPE.as_ptr(), &mut object_type),
            ffi::OSSL_PARAM_construct_utf8_string(
                ffi::OBJECT_DATA_TYPE.as_ptr(),
                data_type.as_ptr() as *mut c_char,
                0,
            ),
            ffi::OSSL_PARAM_construct_octet_string(
                ffi::OBJECT_REFERENCE.as_ptr(),
                &mut reference as *mut *const KeyData as *mut c_void,
                std::mem::size_of::<*const KeyData>(),
            ),
            ffi::OSSL_PARAM_construct_utf8_string(
                ffi::OBJECT_DESC.as_ptr(),
                c"key pair held by keyd".as_ptr() as *mut c_char,
                0,
            ),
            ffi::OSSL_PARAM_construct_end(),
        ];
        cb(params.as_ptr(), cbarg)
    }
}

unsafe extern "C" fn eof(ctx: *mut c_void) -> c_int {
    // SAFETY: our context.
    match unsafe { sctx(ctx) } {
        Ok(c) => c_int::from(c.done),
        Err(e) => {
            push(Func::ProvStoreLoad, &e);
            1
        }
    }
}

unsafe extern "C" fn close(ctx: *mut c_void) -> c_int {
    if !ctx.is_null() {
        // SAFETY: a StoreCtx we allocated, closed once.
        drop(unsafe { Box::from_raw(ctx as *mut StoreCtx) });
    }
    1
}

pub(crate) fn dispatch() -> &'static Table<ffi::OSSL_DISPATCH> {
    static T: OnceLock<Table<ffi::OSSL_DISPATCH>> = OnceLock::new();
    T.get_or_init(|| {
        Table(vec![
            f(ffi::OSSL_FUNC_STORE_OPEN, open as *const ()),
            f(
                ffi::OSSL_FUNC_STORE_SETTABLE_CTX_PARAMS,
                settable_ctx_params as *const (),
            ),
            f(
                ffi::OSSL_FUNC_STORE_SET_CTX_PARAMS,
                set_ctx_params as *const (),
            ),
            f(ffi::OSSL_FUNC_STORE_LOAD, load as *const ()),
            f(ffi::OSSL_FUNC_STORE_EOF, eof as *const ()),
            f(ffi::OSSL_FUNC_STORE_CLOSE, close as *const ()),
            end(),
        ])
    })
}
