//! The provider inside the product's own workers (issue 16 item 2): the twin
//! (`aziot_key_openssl_engine::load_private_key`) is a key of this provider, added to the
//! process as a **built-in** provider (`OSSL_PROVIDER_add_builtin`: no `dlopen`, which a
//! Landlocked, seccomp-filtered worker could not do) and loaded by [`load`] (from
//! `crate::preload`, before lock-in) together with `default`, with the default property query
//! `?provider=default`: the worker's own key generation and libssl's TLS groups keep using the
//! default provider (docs/engine.md "Limits"), while a key loaded here stays this provider's.
//!
//! A key is loaded through `OSSL_STORE_open_ex` with its `aziot-keys:` URI and one private
//! parameter: the id of the caller's [`KeydClient`] in this module's registry (the worker's
//! client, with its socket and kept connections — not the dynamic engine's endpoint). A number,
//! not a pointer: another copy of this provider (the dynamic module loaded by an openssl.cnf)
//! does not know the id and refuses the load. The store records its typed error under the same
//! id, so the twin still returns [`Error`] values (`twin_errors_are_typed`).

use std::ffi::{c_int, c_void, CString};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use foreign_types::ForeignType;
use openssl::error::ErrorStack;
use openssl::pkey::{PKey, Private};

use crate::client::KeydClient;
use crate::error::Error;
use crate::ffi_provider as ffi;

/// One load in progress: the caller's client and, if the store failed, why.
struct Pending {
    id: u64,
    client: Arc<KeydClient>,
    error: Option<Error>,
}

static PENDING: Mutex<Vec<Pending>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn pending() -> std::sync::MutexGuard<'static, Vec<Pending>> {
    PENDING.lock().unwrap_or_else(|p| p.into_inner())
}

/// The client registered under `id` (the store's `aziot-keys-in-process-client` parameter).
pub(crate) fn client(id: u64) -> Result<Arc<KeydClient>, Error> {
    pending()
        .iter()
        .find(|p| p.id == id)
        .map(|p| Arc::clone(&p.client))
        .ok_or_else(|| {
            Error::Internal(format!(
                "no in-process keyd client #{id} (the aziot_keys provider answering is not the \
                 built-in one of this process)"
            ))
        })
}

/// Keeps the store's typed error for the caller of [`load_key`].
pub(crate) fn record_error(id: u64, e: Error) {
    if let Some(p) = pending().iter_mut().find(|p| p.id == id) {
        p.error = Some(e);
    }
}

/// The built-in provider's entry point: the module's, with the provider context marking it
/// as the in-process one.
unsafe extern "C" fn builtin_init(
    handle: *const ffi::OSSL_CORE_HANDLE,
    core_in: *const ffi::OSSL_DISPATCH,
    out: *mut *const ffi::OSSL_DISPATCH,
    provctx: *mut *mut c_void,
) -> c_int {
    // SAFETY: OpenSSL's arguments, passed on unchanged.
    unsafe { super::OSSL_provider_init(handle, core_in, out, provctx) }
}

/// Adds and loads the built-in `aziot_keys` and the `default` provider into the default library
/// context and sets `?provider=default` as its default property query. Once per process;
/// called by `crate::preload` before a worker locks itself in.
pub(crate) fn load() -> Result<(), Error> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            openssl_sys::init();
            // SAFETY: the name is a 'static C string and builtin_init has the init prototype;
            // the providers stay loaded for the life of the process (never unloaded).
            unsafe {
                if ffi::OSSL_PROVIDER_add_builtin(
                    std::ptr::null_mut(),
                    super::PROVIDER_NAME.as_ptr(),
                    builtin_init,
                ) != 1
                {
                    return Err(format!("OSSL_PROVIDER_add_builtin: {}", ErrorStack::get()));
                }
                // `default` first: loading any provider explicitly ends the implicit fallback
                // to it.
                for name in [c"default", super::PROVIDER_NAME] {
                    if openssl_sys::OSSL_PROVIDER_load(std::ptr::null_mut(), name.as_ptr())
                        .is_null()
                    {
                        return Err(format!(
                            "OSSL_PROVIDER_load({name:?}): {}",
                            ErrorStack::get()
                        ));
                    }
                }
                if ffi::EVP_set_default_properties(
                    std::ptr::null_mut(),
                    c"?provider=default".as_ptr(),
                ) != 1
                {
                    return Err(format!("EVP_set_default_properties: {}", ErrorStack::get()));
                }
            }
            Ok(())
        })
        .clone()
        .map_err(Error::Internal)
}

/// Loads the key pair `handle` as a key of the built-in provider, using `client` for keyd.
pub(crate) fn load_key(client: &Arc<KeydClient>, handle: &str) -> Result<PKey<Private>, Error> {
    load()?;
    if handle.is_empty() {
        return Err(Error::BadHandle("is empty"));
    }
    let uri = CString::new(super::uri::to_uri(handle))
        .map_err(|_| Error::BadHandle("contains a NUL byte"))?;
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    pending().push(Pending {
        id,
        client: Arc::clone(client),
        error: None,
    });
    let result = open_and_load(&uri, id);
    let recorded = {
        let mut p = pending();
        let at = p.iter().position(|p| p.id == id);
        at.and_then(|i| p.swap_remove(i).error)
    };
    match (result, recorded) {
        (Ok(key), _) => {
            // a search may leave notes of what it tried on the queue: not this caller's errors
            let _ = ErrorStack::get();
            Ok(key)
        }
        (Err(_), Some(e)) => {
            let _ = ErrorStack::get();
            Err(e)
        }
        (Err(e), None) => Err(e),
    }
}

fn open_and_load(uri: &CString, id: u64) -> Result<PKey<Private>, Error> {
    let mut id_param = id;
    // SAFETY: the parameter array points at `id_param`, alive across the open (which copies
    // the value); the URI and property query are NUL-terminated and outlive the calls; the
    // store context and every info are freed here; get1_PKEY returns a counted reference we own.
    unsafe {
        let params = [
            ffi::OSSL_PARAM_construct_uint64(ffi::STORE_CLIENT_ID.as_ptr(), &mut id_param),
            ffi::OSSL_PARAM_construct_end(),
        ];
        let ctx = ffi::OSSL_STORE_open_ex(
            uri.as_ptr(),
            std::ptr::null_mut(),
            c"provider=aziot_keys".as_ptr(),
            std::ptr::null(),
            std::ptr::null_mut(),
            params.as_ptr(),
            std::ptr::null(),
            std::ptr::null_mut(),
        );
        if ctx.is_null() {
            return Err(Error::OpenSsl(ErrorStack::get()));
        }
        let mut key = None;
        while key.is_none() && ffi::OSSL_STORE_eof(ctx) == 0 {
            let info = ffi::OSSL_STORE_load(ctx);
            if info.is_null() {
                break;
            }
            if ffi::OSSL_STORE_INFO_get_type(info) == ffi::OSSL_STORE_INFO_PKEY {
                let pkey = ffi::OSSL_STORE_INFO_get1_PKEY(info);
                if !pkey.is_null() {
                    key = Some(PKey::<Private>::from_ptr(pkey));
                }
            }
            ffi::OSSL_STORE_INFO_free(info);
        }
        ffi::OSSL_STORE_close(ctx);
        key.ok_or_else(|| Error::OpenSsl(ErrorStack::get()))
    }
}
