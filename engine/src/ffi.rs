//! The libcrypto entry points `openssl-sys` does not declare (ENGINE, EC_KEY_METHOD, RSA_METHOD,
//! legacy ex-data, the legacy EVP_PKEY_METHOD lookup, the dynamic-engine ABI). Everything else
//! comes from `openssl`/`openssl-sys`. Each declaration carries its C prototype (OpenSSL 3.0,
//! checked against /usr/include/openssl/{engine,ec,rsa,evp}.h). The EC_KEY/RSA method and
//! ex-data functions are deprecated in OpenSSL 3 but present and supported: they are how a
//! "foreign" legacy key routes its private operations elsewhere.

#![allow(non_camel_case_types, non_snake_case)]

use std::ffi::{c_char, c_int, c_uchar, c_ulong, c_void};

pub use openssl_sys::{BIGNUM, ECDSA_SIG, EC_KEY, ENGINE, EVP_PKEY, RSA, RSA_METHOD};

/// `typedef struct ec_key_method_st EC_KEY_METHOD;`
#[repr(C)]
pub struct EC_KEY_METHOD {
    _private: [u8; 0],
}

/// `typedef struct evp_pkey_method_st EVP_PKEY_METHOD;`
#[repr(C)]
pub struct EVP_PKEY_METHOD {
    _private: [u8; 0],
}

/// `typedef struct ui_method_st UI_METHOD;`
#[repr(C)]
pub struct UI_METHOD {
    _private: [u8; 0],
}

/// engine.h: `#define OSSL_DYNAMIC_VERSION (unsigned long)0x00030000`
pub const OSSL_DYNAMIC_VERSION: c_ulong = 0x0003_0000;
/// engine.h: `#define OSSL_DYNAMIC_OLDEST (unsigned long)0x00030000`
pub const OSSL_DYNAMIC_OLDEST: c_ulong = 0x0003_0000;
/// engine.h: `#define ENGINE_FLAGS_BY_ID_COPY (int)0x0004`
pub const ENGINE_FLAGS_BY_ID_COPY: c_int = 0x0004;
/// crypto.h: `#define CRYPTO_EX_INDEX_EC_KEY 8`
pub const CRYPTO_EX_INDEX_EC_KEY: c_int = 8;
/// crypto.h: `#define CRYPTO_EX_INDEX_RSA 9`
pub const CRYPTO_EX_INDEX_RSA: c_int = 9;
/// crypto.h: `#define OPENSSL_INIT_NO_ATEXIT 0x00080000L`
pub const OPENSSL_INIT_NO_ATEXIT: u64 = 0x0008_0000;

/// engine.h: `typedef struct st_dynamic_MEM_fns { dyn_MEM_malloc_fn malloc_fn;
/// dyn_MEM_realloc_fn realloc_fn; dyn_MEM_free_fn free_fn; } dynamic_MEM_fns;`
#[repr(C)]
pub struct dynamic_MEM_fns {
    pub malloc_fn: Option<unsafe extern "C" fn(usize, *const c_char, c_int) -> *mut c_void>,
    pub realloc_fn:
        Option<unsafe extern "C" fn(*mut c_void, usize, *const c_char, c_int) -> *mut c_void>,
    pub free_fn: Option<unsafe extern "C" fn(*mut c_void, *const c_char, c_int)>,
}

/// engine.h: `typedef struct st_dynamic_fns { void *static_state; dynamic_MEM_fns mem_fns; } dynamic_fns;`
#[repr(C)]
pub struct dynamic_fns {
    pub static_state: *mut c_void,
    pub mem_fns: dynamic_MEM_fns,
}

/// `typedef int (*ENGINE_GEN_INT_FUNC_PTR)(ENGINE *);`
pub type ENGINE_GEN_INT_FUNC_PTR = unsafe extern "C" fn(*mut ENGINE) -> c_int;
/// `typedef EVP_PKEY *(*ENGINE_LOAD_KEY_PTR)(ENGINE *, const char *, UI_METHOD *ui_method, void *callback_data);`
pub type ENGINE_LOAD_KEY_PTR =
    unsafe extern "C" fn(*mut ENGINE, *const c_char, *mut UI_METHOD, *mut c_void) -> *mut EVP_PKEY;
/// `typedef int (*ENGINE_PKEY_METHS_PTR)(ENGINE *, EVP_PKEY_METHOD **, const int **, int);`
pub type ENGINE_PKEY_METHS_PTR =
    unsafe extern "C" fn(*mut ENGINE, *mut *mut EVP_PKEY_METHOD, *mut *const c_int, c_int) -> c_int;

/// `int (*sign)(int type, const unsigned char *dgst, int dlen, unsigned char *sig,
/// unsigned int *siglen, const BIGNUM *kinv, const BIGNUM *r, EC_KEY *eckey)`
pub type EcSignFn = unsafe extern "C" fn(
    c_int,
    *const c_uchar,
    c_int,
    *mut c_uchar,
    *mut std::ffi::c_uint,
    *const BIGNUM,
    *const BIGNUM,
    *mut EC_KEY,
) -> c_int;
/// `int (*sign_setup)(EC_KEY *eckey, BN_CTX *ctx_in, BIGNUM **kinvp, BIGNUM **rp)`
pub type EcSignSetupFn = unsafe extern "C" fn(
    *mut EC_KEY,
    *mut openssl_sys::BN_CTX,
    *mut *mut BIGNUM,
    *mut *mut BIGNUM,
) -> c_int;
/// `ECDSA_SIG *(*sign_sig)(const unsigned char *dgst, int dgst_len, const BIGNUM *in_kinv,
/// const BIGNUM *in_r, EC_KEY *eckey)`
pub type EcSignSigFn = unsafe extern "C" fn(
    *const c_uchar,
    c_int,
    *const BIGNUM,
    *const BIGNUM,
    *mut EC_KEY,
) -> *mut ECDSA_SIG;
/// `int (*priv_enc)(int flen, const unsigned char *from, unsigned char *to, RSA *rsa, int padding)`
/// (also the shape of `priv_dec`)
pub type RsaPrivFn =
    unsafe extern "C" fn(c_int, *const c_uchar, *mut c_uchar, *mut RSA, c_int) -> c_int;

extern "C" {
    // --- the dynamic-engine ABI and ENGINE setters (engine.h) ---
    /// `void *ENGINE_get_static_state(void);`
    pub fn ENGINE_get_static_state() -> *mut c_void;
    /// `int ENGINE_set_id(ENGINE *e, const char *id);`
    pub fn ENGINE_set_id(e: *mut ENGINE, id: *const c_char) -> c_int;
    /// `int ENGINE_set_name(ENGINE *e, const char *name);`
    pub fn ENGINE_set_name(e: *mut ENGINE, name: *const c_char) -> c_int;
    /// `int ENGINE_set_init_function(ENGINE *e, ENGINE_GEN_INT_FUNC_PTR init_f);`
    pub fn ENGINE_set_init_function(e: *mut ENGINE, f: Option<ENGINE_GEN_INT_FUNC_PTR>) -> c_int;
    /// `int ENGINE_set_destroy_function(ENGINE *e, ENGINE_GEN_INT_FUNC_PTR destroy_f);`
    pub fn ENGINE_set_destroy_function(e: *mut ENGINE, f: Option<ENGINE_GEN_INT_FUNC_PTR>)
        -> c_int;
    /// `int ENGINE_set_load_privkey_function(ENGINE *e, ENGINE_LOAD_KEY_PTR loadpriv_f);`
    pub fn ENGINE_set_load_privkey_function(
        e: *mut ENGINE,
        f: Option<ENGINE_LOAD_KEY_PTR>,
    ) -> c_int;
    /// `int ENGINE_set_load_pubkey_function(ENGINE *e, ENGINE_LOAD_KEY_PTR loadpub_f);`
    pub fn ENGINE_set_load_pubkey_function(e: *mut ENGINE, f: Option<ENGINE_LOAD_KEY_PTR>)
        -> c_int;
    /// `int ENGINE_set_pkey_meths(ENGINE *e, ENGINE_PKEY_METHS_PTR f);`
    pub fn ENGINE_set_pkey_meths(e: *mut ENGINE, f: Option<ENGINE_PKEY_METHS_PTR>) -> c_int;
    /// `int ENGINE_set_flags(ENGINE *e, int flags);`
    pub fn ENGINE_set_flags(e: *mut ENGINE, flags: c_int) -> c_int;
    /// `const char *ENGINE_get_id(const ENGINE *e);`
    #[cfg(test)]
    pub fn ENGINE_get_id(e: *const ENGINE) -> *const c_char;
    /// `const char *ENGINE_get_name(const ENGINE *e);`
    #[cfg(test)]
    pub fn ENGINE_get_name(e: *const ENGINE) -> *const c_char;
    /// `ENGINE *ENGINE_new(void);`
    #[cfg(test)]
    pub fn ENGINE_new() -> *mut ENGINE;
    /// `int ENGINE_free(ENGINE *e);`
    #[cfg(test)]
    pub fn ENGINE_free(e: *mut ENGINE) -> c_int;
    /// `int ENGINE_init(ENGINE *e);`
    #[cfg(test)]
    pub fn ENGINE_init(e: *mut ENGINE) -> c_int;
    /// `int ENGINE_finish(ENGINE *e);`
    #[cfg(test)]
    pub fn ENGINE_finish(e: *mut ENGINE) -> c_int;
    /// `EVP_PKEY *ENGINE_load_private_key(ENGINE *e, const char *key_id, UI_METHOD *ui_method, void *callback_data);`
    #[cfg(test)]
    pub fn ENGINE_load_private_key(
        e: *mut ENGINE,
        key_id: *const c_char,
        ui: *mut UI_METHOD,
        cb: *mut c_void,
    ) -> *mut EVP_PKEY;
    /// `int EVP_PKEY_set1_engine(EVP_PKEY *pkey, ENGINE *e);`
    pub fn EVP_PKEY_set1_engine(pkey: *mut EVP_PKEY, e: *mut ENGINE) -> c_int;
    /// `const EVP_PKEY_METHOD *EVP_PKEY_meth_find(int type);`
    pub fn EVP_PKEY_meth_find(ty: c_int) -> *const EVP_PKEY_METHOD;
    /// `int CRYPTO_set_mem_functions(CRYPTO_malloc_fn malloc_fn, CRYPTO_realloc_fn realloc_fn, CRYPTO_free_fn free_fn);`
    pub fn CRYPTO_set_mem_functions(
        m: Option<unsafe extern "C" fn(usize, *const c_char, c_int) -> *mut c_void>,
        r: Option<unsafe extern "C" fn(*mut c_void, usize, *const c_char, c_int) -> *mut c_void>,
        f: Option<unsafe extern "C" fn(*mut c_void, *const c_char, c_int)>,
    ) -> c_int;

    /// `int OPENSSL_init_crypto(uint64_t opts, const OPENSSL_INIT_SETTINGS *settings);`
    pub fn OPENSSL_init_crypto(opts: u64, settings: *const c_void) -> c_int;

    // --- EC_KEY_METHOD (ec.h) ---
    /// `const EC_KEY_METHOD *EC_KEY_get_default_method(void);`
    pub fn EC_KEY_get_default_method() -> *const EC_KEY_METHOD;
    /// `EC_KEY_METHOD *EC_KEY_METHOD_new(const EC_KEY_METHOD *meth);`
    pub fn EC_KEY_METHOD_new(meth: *const EC_KEY_METHOD) -> *mut EC_KEY_METHOD;
    /// `void EC_KEY_METHOD_get_sign(const EC_KEY_METHOD *meth, int (**psign)(...),
    /// int (**psign_setup)(...), ECDSA_SIG *(**psign_sig)(...));`
    pub fn EC_KEY_METHOD_get_sign(
        meth: *const EC_KEY_METHOD,
        psign: *mut Option<EcSignFn>,
        psign_setup: *mut Option<EcSignSetupFn>,
        psign_sig: *mut Option<EcSignSigFn>,
    );
    /// `void EC_KEY_METHOD_set_sign(EC_KEY_METHOD *meth, int (*sign)(...), int (*sign_setup)(...),
    /// ECDSA_SIG *(*sign_sig)(...));`
    pub fn EC_KEY_METHOD_set_sign(
        meth: *mut EC_KEY_METHOD,
        sign: Option<EcSignFn>,
        sign_setup: Option<EcSignSetupFn>,
        sign_sig: Option<EcSignSigFn>,
    );
    /// `int EC_KEY_set_method(EC_KEY *key, const EC_KEY_METHOD *meth);`
    pub fn EC_KEY_set_method(key: *mut EC_KEY, meth: *const EC_KEY_METHOD) -> c_int;
    /// `int EC_KEY_set_ex_data(EC_KEY *key, int idx, void *arg);`
    pub fn EC_KEY_set_ex_data(key: *mut EC_KEY, idx: c_int, arg: *mut c_void) -> c_int;
    /// `void *EC_KEY_get_ex_data(const EC_KEY *key, int idx);`
    pub fn EC_KEY_get_ex_data(key: *const EC_KEY, idx: c_int) -> *mut c_void;

    // --- RSA_METHOD (rsa.h) ---
    /// `const RSA_METHOD *RSA_get_default_method(void);`
    pub fn RSA_get_default_method() -> *const RSA_METHOD;
    /// `RSA_METHOD *RSA_meth_dup(const RSA_METHOD *meth);`
    pub fn RSA_meth_dup(meth: *const RSA_METHOD) -> *mut RSA_METHOD;
    /// `int RSA_meth_set1_name(RSA_METHOD *meth, const char *name);`
    pub fn RSA_meth_set1_name(meth: *mut RSA_METHOD, name: *const c_char) -> c_int;
    /// `int RSA_meth_set_flags(RSA_METHOD *meth, int flags);`
    pub fn RSA_meth_set_flags(meth: *mut RSA_METHOD, flags: c_int) -> c_int;
    /// `int RSA_meth_set_priv_enc(RSA_METHOD *rsa, int (*priv_enc)(int flen, const unsigned char *from,
    /// unsigned char *to, RSA *rsa, int padding));`
    pub fn RSA_meth_set_priv_enc(meth: *mut RSA_METHOD, f: Option<RsaPrivFn>) -> c_int;
    /// `int RSA_meth_set_priv_dec(RSA_METHOD *rsa, int (*priv_dec)(int flen, const unsigned char *from,
    /// unsigned char *to, RSA *rsa, int padding));`
    pub fn RSA_meth_set_priv_dec(meth: *mut RSA_METHOD, f: Option<RsaPrivFn>) -> c_int;
    /// `int RSA_set_method(RSA *rsa, const RSA_METHOD *meth);`
    pub fn RSA_set_method(rsa: *mut RSA, meth: *const RSA_METHOD) -> c_int;
    /// `int RSA_set_ex_data(RSA *r, int idx, void *arg);`
    pub fn RSA_set_ex_data(r: *mut RSA, idx: c_int, arg: *mut c_void) -> c_int;
    /// `void *RSA_get_ex_data(const RSA *r, int idx);`
    pub fn RSA_get_ex_data(r: *const RSA, idx: c_int) -> *mut c_void;
    /// `int RSA_padding_check_PKCS1_OAEP(unsigned char *to, int tlen, const unsigned char *f, int fl,
    /// int rsa_len, const unsigned char *p, int pl);`
    pub fn RSA_padding_check_PKCS1_OAEP(
        to: *mut c_uchar,
        tlen: c_int,
        f: *const c_uchar,
        fl: c_int,
        rsa_len: c_int,
        p: *const c_uchar,
        pl: c_int,
    ) -> c_int;
}
