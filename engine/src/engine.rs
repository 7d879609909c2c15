//! The dynamic engine (spec keyd.md §9.1–§9.3): `v_check` and `bind_engine` as
//! `IMPLEMENT_DYNAMIC_CHECK_FN` / `IMPLEMENT_DYNAMIC_BIND_FN` define them, and the ENGINE
//! callbacks. Loaded by `ENGINE_by_id("aziot_keys")` from `<ENGINESDIR or $OPENSSL_ENGINES>/aziot_keys.so`.

use std::ffi::{c_char, c_int, c_ulong, c_void, CStr};
use std::sync::{Arc, OnceLock};

use crate::client::KeydClient;
use crate::error::{push, Error, Func};
use crate::ffi;
use crate::key;

/// The engine's id once bound (spec §9.1).
pub const ENGINE_ID: &CStr = c"aziot-key-openssl-engine";
/// The engine's name (spec §9.1).
pub const ENGINE_NAME: &CStr = c"An openssl engine that talks to the Azure IoT Keys Service";

/// The keyd client of the dynamic engine: one per process, made by the first `ENGINE_init`
/// (endpoint: [`KeydClient::from_environment`]); every key loaded through the engine shares it
/// and its kept connections.
static CLIENT: OnceLock<Result<Arc<KeydClient>, String>> = OnceLock::new();

pub(crate) fn client() -> Result<Arc<KeydClient>, Error> {
    match CLIENT.get_or_init(|| {
        KeydClient::from_environment()
            .map(Arc::new)
            .map_err(|e| e.to_string())
    }) {
        Ok(c) => Ok(Arc::clone(c)),
        Err(e) => Err(Error::Endpoint(e.clone())),
    }
}

/// `IMPLEMENT_DYNAMIC_CHECK_FN()`: `unsigned long v_check(unsigned long v);`
#[no_mangle]
pub extern "C" fn v_check(v: c_ulong) -> c_ulong {
    if v >= ffi::OSSL_DYNAMIC_OLDEST {
        ffi::OSSL_DYNAMIC_VERSION
    } else {
        0
    }
}

/// `IMPLEMENT_DYNAMIC_BIND_FN(fn)`: `int bind_engine(ENGINE *e, const char *id, const dynamic_fns *fns);`
///
/// # Safety
/// Called by OpenSSL's dynamic engine loader with a fresh ENGINE and its `dynamic_fns`.
#[no_mangle]
pub unsafe extern "C" fn bind_engine(
    e: *mut ffi::ENGINE,
    _id: *const c_char,
    fns: *const ffi::dynamic_fns,
) -> c_int {
    // As the macro does: a loader with another copy of libcrypto hands us its allocator.
    // SAFETY: `fns` is the loader's valid dynamic_fns (or null from a direct caller).
    unsafe {
        if !fns.is_null() && ffi::ENGINE_get_static_state() != (*fns).static_state {
            let m = &(*fns).mem_fns;
            ffi::CRYPTO_set_mem_functions(m.malloc_fn, m.realloc_fn, m.free_fn);
            ffi::OPENSSL_init_crypto(ffi::OPENSSL_INIT_NO_ATEXIT, std::ptr::null());
        }
    }
    // SAFETY: `e` is the ENGINE being bound (spec §9.1: id, name, init/destroy, loaders, pkey
    // meths, BY_ID_COPY; no ENGINE_add, the loader does it). The strings are 'static.
    match unsafe { bind(e) } {
        Ok(()) => 1,
        Err(err) => {
            push(Func::Bind, &err);
            0
        }
    }
}

/// Sets up `e` as the aziot_keys engine (the body of `bind_engine`; also usable to make a
/// static ENGINE in a process that links this crate).
///
/// # Safety
/// `e` must be a valid ENGINE not yet in use.
pub unsafe fn bind(e: *mut ffi::ENGINE) -> Result<(), Error> {
    key::preload()?;
    // SAFETY: per the contract; the callbacks are the extern "C" fns below, the strings 'static.
    let ok = unsafe {
        ffi::ENGINE_set_id(e, ENGINE_ID.as_ptr()) == 1
            && ffi::ENGINE_set_name(e, ENGINE_NAME.as_ptr()) == 1
            && ffi::ENGINE_set_init_function(e, Some(engine_init)) == 1
            && ffi::ENGINE_set_destroy_function(e, Some(engine_destroy)) == 1
            && ffi::ENGINE_set_load_privkey_function(e, Some(load_privkey)) == 1
            && ffi::ENGINE_set_load_pubkey_function(e, Some(load_pubkey)) == 1
            && ffi::ENGINE_set_pkey_meths(e, Some(pkey_meths)) == 1
            && ffi::ENGINE_set_flags(e, ffi::ENGINE_FLAGS_BY_ID_COPY) == 1
    };
    if ok {
        Ok(())
    } else {
        Err(Error::OpenSsl(openssl::error::ErrorStack::get()))
    }
}

/// ENGINE init: resolves keyd's endpoint (no connection yet: keys connect on first use).
unsafe extern "C" fn engine_init(_e: *mut ffi::ENGINE) -> c_int {
    match std::panic::catch_unwind(client) {
        Ok(Ok(_)) => 1,
        Ok(Err(err)) => {
            push(Func::Init, &err);
            0
        }
        Err(_) => {
            push(Func::Init, &Error::Internal("panic in init".to_owned()));
            0
        }
    }
}

/// ENGINE destroy: nothing to release (the methods and the client live as long as any key may).
unsafe extern "C" fn engine_destroy(_e: *mut ffi::ENGINE) -> c_int {
    1
}

fn key_id(key_id: *const c_char) -> Result<String, Error> {
    if key_id.is_null() {
        return Err(Error::BadHandle("is missing (no key id given)"));
    }
    // SAFETY: OpenSSL passes the NUL-terminated key id the application gave.
    let s = unsafe { CStr::from_ptr(key_id) };
    s.to_str()
        .map(str::to_owned)
        .map_err(|_| Error::BadHandle("is not UTF-8"))
}

/// `ENGINE_load_private_key`: key id = the complete keyd handle; UI and callback ignored.
unsafe extern "C" fn load_privkey(
    e: *mut ffi::ENGINE,
    id: *const c_char,
    _ui: *mut ffi::UI_METHOD,
    _cb: *mut c_void,
) -> *mut ffi::EVP_PKEY {
    let r = std::panic::catch_unwind(|| -> Result<*mut ffi::EVP_PKEY, Error> {
        let handle = key_id(id)?;
        let pkey = key::load_private(&client()?, &handle)?;
        let raw = key::into_raw(pkey);
        // SAFETY: `raw` is the EVP_PKEY we just made (owned now by the caller); the engine is
        // the one OpenSSL called us with (set1 takes its own functional reference).
        if unsafe { ffi::EVP_PKEY_set1_engine(raw, e) } != 1 {
            // SAFETY: ours to free on failure.
            unsafe { openssl_sys::EVP_PKEY_free(raw) };
            return Err(Error::OpenSsl(openssl::error::ErrorStack::get()));
        }
        Ok(raw)
    });
    finish(Func::LoadPrivkey, r)
}

/// `ENGINE_load_public_key`: the public key only.
unsafe extern "C" fn load_pubkey(
    _e: *mut ffi::ENGINE,
    id: *const c_char,
    _ui: *mut ffi::UI_METHOD,
    _cb: *mut c_void,
) -> *mut ffi::EVP_PKEY {
    let r = std::panic::catch_unwind(|| -> Result<*mut ffi::EVP_PKEY, Error> {
        let handle = key_id(id)?;
        Ok(key::into_raw(key::load_public(&*client()?, &handle)?))
    });
    finish(Func::LoadPubkey, r)
}

fn finish(
    func: Func,
    r: std::thread::Result<Result<*mut ffi::EVP_PKEY, Error>>,
) -> *mut ffi::EVP_PKEY {
    match r {
        Ok(Ok(p)) => p,
        Ok(Err(err)) => {
            push(func, &err);
            std::ptr::null_mut()
        }
        Err(_) => {
            push(
                func,
                &Error::Internal("panic while loading a key".to_owned()),
            );
            std::ptr::null_mut()
        }
    }
}

static PKEY_NIDS: [c_int; 2] = [openssl_sys::EVP_PKEY_EC, openssl_sys::EVP_PKEY_RSA];

/// pkey methods: EC and RSA, each OpenSSL's default EVP_PKEY_METHOD (spec §9.4).
unsafe extern "C" fn pkey_meths(
    _e: *mut ffi::ENGINE,
    pmeth: *mut *mut ffi::EVP_PKEY_METHOD,
    nids: *mut *const c_int,
    nid: c_int,
) -> c_int {
    if pmeth.is_null() {
        if !nids.is_null() {
            // SAFETY: OpenSSL asks for the list: a pointer to our static array.
            unsafe { *nids = PKEY_NIDS.as_ptr() };
        }
        return PKEY_NIDS.len() as c_int;
    }
    if PKEY_NIDS.contains(&nid) {
        // SAFETY: EVP_PKEY_meth_find returns a static table (never freed); OpenSSL's API wants
        // it non-const here but does not modify a method it got from an engine.
        unsafe { *pmeth = ffi::EVP_PKEY_meth_find(nid) as *mut ffi::EVP_PKEY_METHOD };
        // SAFETY: just written.
        if unsafe { !(*pmeth).is_null() } {
            return 1;
        }
    }
    // SAFETY: `pmeth` is non-null (checked above).
    unsafe { *pmeth = std::ptr::null_mut() };
    push(
        Func::PkeyMeths,
        &Error::UnsupportedKey(format!("no pkey method for NID {nid}")),
    );
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Binds an ENGINE the way the dynamic loader does (same libcrypto: no allocator swap), checks
    /// the ids of spec §9.1, and that a key load without a reachable keyd fails with the cause on
    /// the error queue under the spec's library and function names — no crash, NULL key.
    #[test]
    fn bind_ids_and_an_unreachable_keyd_on_the_error_queue() {
        let dir = std::env::temp_dir().join(format!("aziot-engine-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("no-keyd-here.sock");
        // the only test of this crate that sets it (the engine's client is per process)
        std::env::set_var(
            crate::client::ENDPOINT_ENV,
            format!("unix://{}", sock.display()),
        );
        assert_eq!(v_check(0x0002_0000), 0, "too old a loader");
        assert_eq!(
            v_check(ffi::OSSL_DYNAMIC_VERSION),
            ffi::OSSL_DYNAMIC_VERSION
        );
        // SAFETY: a fresh ENGINE, bound as the loader would, then initialised, used and freed;
        // the error queue is this thread's.
        unsafe {
            let e = ffi::ENGINE_new();
            assert!(!e.is_null());
            let fns = ffi::dynamic_fns {
                static_state: ffi::ENGINE_get_static_state(),
                mem_fns: ffi::dynamic_MEM_fns {
                    malloc_fn: None,
                    realloc_fn: None,
                    free_fn: None,
                },
            };
            assert_eq!(bind_engine(e, c"aziot_keys".as_ptr(), &fns), 1);
            assert_eq!(CStr::from_ptr(ffi::ENGINE_get_id(e)), ENGINE_ID);
            assert_eq!(CStr::from_ptr(ffi::ENGINE_get_name(e)), ENGINE_NAME);
            assert_eq!(ffi::ENGINE_init(e), 1);
            openssl_sys::ERR_clear_error();
            let pkey = ffi::ENGINE_load_private_key(
                e,
                c"sr=abc&sig=def".as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            );
            assert!(pkey.is_null());
            let errors = openssl::error::ErrorStack::get();
            let text = errors.to_string();
            let ours = errors
                .errors()
                .iter()
                .find(|e| e.library() == Some("aziot_key_openssl_engine"))
                .unwrap_or_else(|| panic!("no error of the engine's library: {text}"));
            assert_eq!(
                ours.function(),
                Some("aziot_key_engine_load_privkey"),
                "{text}"
            );
            assert_eq!(ours.reason(), Some("keyd unreachable"), "{text}");
            let data = ours.data().unwrap_or_default();
            assert!(
                data.contains("no-keyd-here.sock") && data.contains("No such file"),
                "{data}"
            );
            ffi::ENGINE_finish(e);
            ffi::ENGINE_free(e);
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
