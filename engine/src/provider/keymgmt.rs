//! Key management (provider-keymgmt(7)) for `EC` and `RSA` keys held by keyd.
//!
//! A key object ([`KeyData`]) holds the public key as a default-provider key (parameters,
//! export, matching are answered by it) and, for a key loaded from keyd, the engine's twin (the
//! private operations). Rules that keep private keys out of this provider and this provider out
//! of other keys' way:
//! * `export` refuses any selection with the private key (nothing to export), silently: that is
//!   how libcrypto learns to run signatures here instead of in the default provider.
//! * `import` takes public keys only (a certificate's key, to compare or to verify with) and
//!   silently refuses a private key: a software key then keeps using the default provider.
//! * no key generation: a process that generates EC/RSA keys itself should prefer the default
//!   provider's (`default_properties = ?provider=default`, docs/engine.md).

use std::ffi::{c_int, c_void, CStr};
use std::sync::OnceLock;

use foreign_types::ForeignType;
use openssl::pkey::{Id, PKey, Private, Public};

use super::{desc, end, f, param_end, Table};
use crate::error::{Error, Func};
use crate::ffi_provider as ffi;
use crate::key::guarded;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Ec,
    Rsa,
}

impl Kind {
    pub(crate) fn name(self) -> &'static CStr {
        match self {
            Kind::Ec => c"EC",
            Kind::Rsa => c"RSA",
        }
    }
}

/// The provider's key object.
#[derive(Clone)]
pub(crate) struct KeyData {
    pub kind: Kind,
    /// The public key, a default-provider key; None until imported/loaded.
    pub public: Option<PKey<Public>>,
    /// The twin (private operations → keyd); None for an imported public key.
    pub twin: Option<PKey<Private>>,
}

impl KeyData {
    /// A key object for a key loaded from keyd (the twin from `key::load_private`).
    pub(crate) fn from_twin(twin: PKey<Private>) -> Result<KeyData, Error> {
        let kind = match twin.id() {
            Id::EC => Kind::Ec,
            Id::RSA => Kind::Rsa,
            other => return Err(Error::UnsupportedKey(format!("key type {other:?}"))),
        };
        Ok(KeyData {
            kind,
            public: Some(super::native_public(&twin)?),
            twin: Some(twin),
        })
    }

    pub(crate) fn public(&self) -> Result<&PKey<Public>, Error> {
        self.public
            .as_ref()
            .ok_or_else(|| Error::Internal("empty key object".to_owned()))
    }

    /// The twin, or why there is none.
    pub(crate) fn twin(&self) -> Result<&PKey<Private>, Error> {
        self.twin.as_ref().ok_or(Error::NoContext)
    }
}

/// # Safety
/// `p` must be null or a KeyData pointer this module handed out and not yet freed.
pub(crate) unsafe fn key_ref<'a>(p: *const c_void) -> Result<&'a KeyData, Error> {
    if p.is_null() {
        return Err(Error::Internal("no key object".to_owned()));
    }
    // SAFETY: per the contract.
    Ok(unsafe { &*(p as *const KeyData) })
}

unsafe extern "C" fn ec_new(_provctx: *mut c_void) -> *mut c_void {
    Box::into_raw(Box::new(KeyData {
        kind: Kind::Ec,
        public: None,
        twin: None,
    })) as *mut c_void
}

unsafe extern "C" fn rsa_new(_provctx: *mut c_void) -> *mut c_void {
    Box::into_raw(Box::new(KeyData {
        kind: Kind::Rsa,
        public: None,
        twin: None,
    })) as *mut c_void
}

unsafe extern "C" fn free(keydata: *mut c_void) {
    if !keydata.is_null() {
        // SAFETY: a KeyData we allocated (new/load/dup) and OpenSSL frees once.
        drop(unsafe { Box::from_raw(keydata as *mut KeyData) });
    }
}

/// Load by reference (from this provider's store only: libcrypto calls `load` only with a
/// reference made by a loader of the same provider): the reference is the address of the
/// store's KeyData, alive during the store's object callback.
unsafe extern "C" fn load(reference: *const c_void, size: usize) -> *mut c_void {
    guarded(Func::ProvKeymgmt, std::ptr::null_mut(), || {
        if reference.is_null() || size != std::mem::size_of::<*const KeyData>() {
            return Err(Error::Internal("bad key reference".to_owned()));
        }
        // SAFETY: `reference` points at the pointer-sized value store.rs passed (see above).
        let p = unsafe { std::ptr::read_unaligned(reference as *const *const KeyData) };
        // SAFETY: that value is the address of a live KeyData owned by the store context.
        let key = unsafe { key_ref(p as *const c_void)? }.clone();
        Ok(Box::into_raw(Box::new(key)) as *mut c_void)
    })
}

unsafe extern "C" fn get_params(keydata: *mut c_void, params: *mut ffi::OSSL_PARAM) -> c_int {
    guarded(Func::ProvKeymgmt, 0, || {
        // SAFETY: OpenSSL passes one of our key objects.
        let key = unsafe { key_ref(keydata)? };
        // SAFETY: a valid key and OpenSSL's parameter array: the default provider fills what
        // it knows of the public key (bits, security-bits, max-size, default-digest, group,
        // pub, encoded-pub-key, point-format, n, e, ...).
        Ok(unsafe { ffi::EVP_PKEY_get_params(key.public()?.as_ptr(), params) })
    })
}

fn ec_public_params() -> &'static Table<ffi::OSSL_PARAM> {
    static T: OnceLock<Table<ffi::OSSL_PARAM>> = OnceLock::new();
    T.get_or_init(|| {
        Table(vec![
            desc(ffi::PKEY_GROUP_NAME, ffi::OSSL_PARAM_UTF8_STRING),
            desc(ffi::PKEY_PUB_KEY, ffi::OSSL_PARAM_OCTET_STRING),
            param_end(),
        ])
    })
}

fn rsa_public_params() -> &'static Table<ffi::OSSL_PARAM> {
    static T: OnceLock<Table<ffi::OSSL_PARAM>> = OnceLock::new();
    T.get_or_init(|| {
        Table(vec![
            desc(ffi::PKEY_RSA_N, ffi::OSSL_PARAM_UNSIGNED_INTEGER),
            desc(ffi::PKEY_RSA_E, ffi::OSSL_PARAM_UNSIGNED_INTEGER),
            param_end(),
        ])
    })
}

fn gettable(kind: Kind) -> &'static Table<ffi::OSSL_PARAM> {
    static EC: OnceLock<Table<ffi::OSSL_PARAM>> = OnceLock::new();
    static RSA: OnceLock<Table<ffi::OSSL_PARAM>> = OnceLock::new();
    let common = || {
        vec![
            desc(ffi::PKEY_BITS, ffi::OSSL_PARAM_INTEGER),
            desc(ffi::PKEY_SECURITY_BITS, ffi::OSSL_PARAM_INTEGER),
            desc(ffi::PKEY_MAX_SIZE, ffi::OSSL_PARAM_INTEGER),
            desc(ffi::PKEY_DEFAULT_DIGEST, ffi::OSSL_PARAM_UTF8_STRING),
        ]
    };
    match kind {
        Kind::Ec => EC.get_or_init(|| {
            let mut v = common();
            v.extend([
                desc(ffi::PKEY_GROUP_NAME, ffi::OSSL_PARAM_UTF8_STRING),
                desc(ffi::PKEY_PUB_KEY, ffi::OSSL_PARAM_OCTET_STRING),
                desc(ffi::PKEY_ENCODED_PUB_KEY, ffi::OSSL_PARAM_OCTET_STRING),
                desc(ffi::PKEY_POINT_FORMAT, ffi::OSSL_PARAM_UTF8_STRING),
                param_end(),
            ]);
            Table(v)
        }),
        Kind::Rsa => RSA.get_or_init(|| {
            let mut v = common();
            v.extend([
                desc(ffi::PKEY_RSA_N, ffi::OSSL_PARAM_UNSIGNED_INTEGER),
                desc(ffi::PKEY_RSA_E, ffi::OSSL_PARAM_UNSIGNED_INTEGER),
                param_end(),
            ]);
            Table(v)
        }),
    }
}

unsafe extern "C" fn ec_gettable(_provctx: *mut c_void) -> *const ffi::OSSL_PARAM {
    gettable(Kind::Ec).0.as_ptr()
}

unsafe extern "C" fn rsa_gettable(_provctx: *mut c_void) -> *const ffi::OSSL_PARAM {
    gettable(Kind::Rsa).0.as_ptr()
}

unsafe extern "C" fn ec_types(_selection: c_int) -> *const ffi::OSSL_PARAM {
    ec_public_params().0.as_ptr()
}

unsafe extern "C" fn rsa_types(_selection: c_int) -> *const ffi::OSSL_PARAM {
    rsa_public_params().0.as_ptr()
}

unsafe extern "C" fn ec_operation_name(op: c_int) -> *const std::ffi::c_char {
    match op {
        ffi::OSSL_OP_SIGNATURE => c"ECDSA".as_ptr(),
        _ => std::ptr::null(),
    }
}

unsafe extern "C" fn rsa_operation_name(op: c_int) -> *const std::ffi::c_char {
    match op {
        ffi::OSSL_OP_SIGNATURE | ffi::OSSL_OP_ASYM_CIPHER => c"RSA".as_ptr(),
        _ => std::ptr::null(),
    }
}

unsafe extern "C" fn has(keydata: *const c_void, selection: c_int) -> c_int {
    // SAFETY: OpenSSL passes one of our key objects (or null).
    let Ok(key) = (unsafe { key_ref(keydata) }) else {
        return 0;
    };
    let mut ok = true;
    if selection & ffi::OSSL_KEYMGMT_SELECT_PUBLIC_KEY != 0 {
        ok &= key.public.is_some();
    }
    if selection & ffi::OSSL_KEYMGMT_SELECT_PRIVATE_KEY != 0 {
        // in keyd: usable through this provider, never present here
        ok &= key.twin.is_some();
    }
    if selection & ffi::OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS != 0 {
        ok &= key.public.is_some();
    }
    c_int::from(ok)
}

unsafe extern "C" fn match_(k1: *const c_void, k2: *const c_void, selection: c_int) -> c_int {
    // SAFETY: OpenSSL passes two of our key objects.
    let (Ok(a), Ok(b)) = (unsafe { key_ref(k1) }, unsafe { key_ref(k2) }) else {
        return 0;
    };
    let (Some(pa), Some(pb)) = (&a.public, &b.public) else {
        return 0;
    };
    if a.kind != b.kind {
        return 0;
    }
    if selection & (ffi::OSSL_KEYMGMT_SELECT_PUBLIC_KEY | ffi::OSSL_KEYMGMT_SELECT_PRIVATE_KEY) != 0
    {
        return c_int::from(pa.public_eq(pb));
    }
    // parameters only: same group / size
    c_int::from(pa.bits() == pb.bits())
}

unsafe extern "C" fn import(
    keydata: *mut c_void,
    selection: c_int,
    params: *const ffi::OSSL_PARAM,
) -> c_int {
    if keydata.is_null() || params.is_null() {
        return 0;
    }
    // SAFETY: OpenSSL passes one of our (fresh) key objects and a parameter array.
    let key = unsafe { &mut *(keydata as *mut KeyData) };
    // A private key cannot live here: refuse without an error (see the module comment).
    for private in [ffi::PKEY_PRIV_KEY, ffi::PKEY_RSA_D] {
        // SAFETY: valid array, 'static key.
        if unsafe { !ffi::OSSL_PARAM_locate_const(params, private.as_ptr()).is_null() } {
            return 0;
        }
    }
    if selection & ffi::OSSL_KEYMGMT_SELECT_PUBLIC_KEY == 0 {
        return 0;
    }
    // SAFETY: the default provider builds a public key from the same parameters (it does not
    // modify the array despite the non-const prototype); the context is freed here.
    let pkey = unsafe {
        let ctx = ffi::EVP_PKEY_CTX_new_from_name(
            std::ptr::null_mut(),
            key.kind.name().as_ptr(),
            super::DEFAULT_PROPQ.as_ptr(),
        );
        if ctx.is_null() {
            return 0;
        }
        let mut out: *mut ffi::EVP_PKEY = std::ptr::null_mut();
        let ok = ffi::EVP_PKEY_fromdata_init(ctx) == 1
            && ffi::EVP_PKEY_fromdata(
                ctx,
                &mut out,
                ffi::EVP_PKEY_PUBLIC_KEY,
                params as *mut ffi::OSSL_PARAM,
            ) == 1;
        openssl_sys::EVP_PKEY_CTX_free(ctx);
        if !ok || out.is_null() {
            return 0;
        }
        PKey::<Public>::from_ptr(out)
    };
    key.public = Some(pkey);
    key.twin = None;
    1
}

unsafe extern "C" fn export(
    keydata: *mut c_void,
    selection: c_int,
    cb: Option<ffi::OSSL_CALLBACK>,
    cbarg: *mut c_void,
) -> c_int {
    // Nothing private to export (and refusing is what routes private operations here).
    if selection & ffi::OSSL_KEYMGMT_SELECT_PRIVATE_KEY != 0 {
        return 0;
    }
    // SAFETY: OpenSSL passes one of our key objects.
    let Ok(key) = (unsafe { key_ref(keydata) }) else {
        return 0;
    };
    let Some(public) = &key.public else { return 0 };
    // SAFETY: the default provider exports its public key to OpenSSL's callback.
    unsafe { ffi::EVP_PKEY_export(public.as_ptr(), selection, cb, cbarg) }
}

unsafe extern "C" fn dup(keydata: *const c_void, _selection: c_int) -> *mut c_void {
    // SAFETY: OpenSSL passes one of our key objects.
    match unsafe { key_ref(keydata) } {
        Ok(k) => Box::into_raw(Box::new(k.clone())) as *mut c_void,
        Err(_) => std::ptr::null_mut(),
    }
}

fn table(kind: Kind) -> Vec<ffi::OSSL_DISPATCH> {
    let (new, gettable, types, opname) = match kind {
        Kind::Ec => (
            ec_new as *const (),
            ec_gettable as *const (),
            ec_types as *const (),
            ec_operation_name as *const (),
        ),
        Kind::Rsa => (
            rsa_new as *const (),
            rsa_gettable as *const (),
            rsa_types as *const (),
            rsa_operation_name as *const (),
        ),
    };
    vec![
        f(ffi::OSSL_FUNC_KEYMGMT_NEW, new),
        f(ffi::OSSL_FUNC_KEYMGMT_FREE, free as *const ()),
        f(ffi::OSSL_FUNC_KEYMGMT_LOAD, load as *const ()),
        f(ffi::OSSL_FUNC_KEYMGMT_GET_PARAMS, get_params as *const ()),
        f(ffi::OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, gettable),
        f(ffi::OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, opname),
        f(ffi::OSSL_FUNC_KEYMGMT_HAS, has as *const ()),
        f(ffi::OSSL_FUNC_KEYMGMT_MATCH, match_ as *const ()),
        f(ffi::OSSL_FUNC_KEYMGMT_IMPORT, import as *const ()),
        f(ffi::OSSL_FUNC_KEYMGMT_IMPORT_TYPES, types),
        f(ffi::OSSL_FUNC_KEYMGMT_EXPORT, export as *const ()),
        f(ffi::OSSL_FUNC_KEYMGMT_EXPORT_TYPES, types),
        f(ffi::OSSL_FUNC_KEYMGMT_DUP, dup as *const ()),
        end(),
    ]
}

pub(crate) fn ec_dispatch() -> &'static Table<ffi::OSSL_DISPATCH> {
    static T: OnceLock<Table<ffi::OSSL_DISPATCH>> = OnceLock::new();
    T.get_or_init(|| Table(table(Kind::Ec)))
}

pub(crate) fn rsa_dispatch() -> &'static Table<ffi::OSSL_DISPATCH> {
    static T: OnceLock<Table<ffi::OSSL_DISPATCH>> = OnceLock::new();
    T.get_or_init(|| Table(table(Kind::Rsa)))
}
