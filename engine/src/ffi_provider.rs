//! The OpenSSL 3 provider ABI the provider needs and `openssl-sys` does not declare (or declares
//! opaquely): OSSL_DISPATCH, OSSL_ALGORITHM, OSSL_PARAM and the functions that read and write
//! them, plus the few EVP entry points that take an OSSL_PARAM array or a property query. Each
//! declaration carries its C prototype (OpenSSL 3.0, checked against /usr/include/openssl/
//! {core,core_dispatch,core_names,params,evp,provider,store}.h). Numeric ids are the `#define`s
//! of core_dispatch.h; parameter names are those of core_names.h.

#![allow(non_camel_case_types, non_snake_case, dead_code)]

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};

pub use openssl_sys::{EVP_MD_CTX, EVP_PKEY, EVP_PKEY_CTX};

/// core.h: `struct ossl_dispatch_st { int function_id; void (*function)(void); };`
#[repr(C)]
pub struct OSSL_DISPATCH {
    pub function_id: c_int,
    pub function: *const c_void,
}

/// core.h: `struct ossl_algorithm_st { const char *algorithm_names; const char *property_definition;
/// const OSSL_DISPATCH *implementation; const char *algorithm_description; };`
#[repr(C)]
pub struct OSSL_ALGORITHM {
    pub algorithm_names: *const c_char,
    pub property_definition: *const c_char,
    pub implementation: *const OSSL_DISPATCH,
    pub algorithm_description: *const c_char,
}

/// core.h: `struct ossl_param_st { const char *key; unsigned int data_type; void *data;
/// size_t data_size; size_t return_size; };`
#[repr(C)]
#[derive(Clone, Copy)]
pub struct OSSL_PARAM {
    pub key: *const c_char,
    pub data_type: c_uint,
    pub data: *mut c_void,
    pub data_size: usize,
    pub return_size: usize,
}

/// `typedef struct ossl_core_handle_st OSSL_CORE_HANDLE;`
#[repr(C)]
pub struct OSSL_CORE_HANDLE {
    _private: [u8; 0],
}

/// `typedef struct ossl_lib_ctx_st OSSL_LIB_CTX;`
pub use openssl_sys::OSSL_LIB_CTX;

/// `typedef int (OSSL_CALLBACK)(const OSSL_PARAM params[], void *arg);`
pub type OSSL_CALLBACK = unsafe extern "C" fn(params: *const OSSL_PARAM, arg: *mut c_void) -> c_int;
/// `typedef int (OSSL_PASSPHRASE_CALLBACK)(char *pass, size_t pass_size, size_t *pass_len,
/// const OSSL_PARAM params[], void *arg);`
pub type OSSL_PASSPHRASE_CALLBACK =
    unsafe extern "C" fn(*mut c_char, usize, *mut usize, *const OSSL_PARAM, *mut c_void) -> c_int;

// core.h: OSSL_PARAM data types
pub const OSSL_PARAM_INTEGER: c_uint = 1;
pub const OSSL_PARAM_UNSIGNED_INTEGER: c_uint = 2;
pub const OSSL_PARAM_UTF8_STRING: c_uint = 4;
pub const OSSL_PARAM_OCTET_STRING: c_uint = 5;
pub const OSSL_PARAM_UTF8_PTR: c_uint = 6;
/// params.h: `#define OSSL_PARAM_UNMODIFIED ((size_t)-1)`
pub const OSSL_PARAM_UNMODIFIED: usize = usize::MAX;

// core_dispatch.h: operations
pub const OSSL_OP_KEYMGMT: c_int = 10;
pub const OSSL_OP_SIGNATURE: c_int = 12;
pub const OSSL_OP_ASYM_CIPHER: c_int = 13;
pub const OSSL_OP_DECODER: c_int = 21;
pub const OSSL_OP_STORE: c_int = 22;

// core_dispatch.h: functions the core offers a provider (the `in` table of OSSL_provider_init)
/// `OSSL_CORE_MAKE_FUNC(int, BIO_read_ex, (OSSL_CORE_BIO *bio, void *data, size_t data_len,
/// size_t *bytes_read))`
pub const OSSL_FUNC_BIO_READ_EX: c_int = 42;
pub type OSSL_FUNC_BIO_read_ex_fn = unsafe extern "C" fn(
    bio: *mut OSSL_CORE_BIO,
    data: *mut c_void,
    len: usize,
    read: *mut usize,
) -> c_int;

/// `typedef struct ossl_core_bio_st OSSL_CORE_BIO;`
#[repr(C)]
pub struct OSSL_CORE_BIO {
    _private: [u8; 0],
}

// core_dispatch.h: decoder
pub const OSSL_FUNC_DECODER_NEWCTX: c_int = 1;
pub const OSSL_FUNC_DECODER_FREECTX: c_int = 2;
pub const OSSL_FUNC_DECODER_DOES_SELECTION: c_int = 10;
pub const OSSL_FUNC_DECODER_DECODE: c_int = 11;

/// core.h: `typedef int (OSSL_provider_init_fn)(const OSSL_CORE_HANDLE *handle,
/// const OSSL_DISPATCH *in, const OSSL_DISPATCH **out, void **provctx);`
pub type OSSL_provider_init_fn = unsafe extern "C" fn(
    handle: *const OSSL_CORE_HANDLE,
    r#in: *const OSSL_DISPATCH,
    out: *mut *const OSSL_DISPATCH,
    provctx: *mut *mut c_void,
) -> c_int;

/// `typedef struct ossl_store_ctx_st OSSL_STORE_CTX;`
#[repr(C)]
pub struct OSSL_STORE_CTX {
    _private: [u8; 0],
}
/// `typedef struct ossl_store_info_st OSSL_STORE_INFO;`
#[repr(C)]
pub struct OSSL_STORE_INFO {
    _private: [u8; 0],
}

// core_dispatch.h: provider functions
pub const OSSL_FUNC_PROVIDER_TEARDOWN: c_int = 1024;
pub const OSSL_FUNC_PROVIDER_GETTABLE_PARAMS: c_int = 1025;
pub const OSSL_FUNC_PROVIDER_GET_PARAMS: c_int = 1026;
pub const OSSL_FUNC_PROVIDER_QUERY_OPERATION: c_int = 1027;

// core_dispatch.h: key management
pub const OSSL_KEYMGMT_SELECT_PRIVATE_KEY: c_int = 0x01;
pub const OSSL_KEYMGMT_SELECT_PUBLIC_KEY: c_int = 0x02;
pub const OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS: c_int = 0x04;
pub const OSSL_KEYMGMT_SELECT_OTHER_PARAMETERS: c_int = 0x80;
/// evp.h: `#define EVP_PKEY_PUBLIC_KEY (EVP_PKEY_KEY_PARAMETERS | OSSL_KEYMGMT_SELECT_PUBLIC_KEY)`
pub const EVP_PKEY_PUBLIC_KEY: c_int = 0x86;
pub const OSSL_FUNC_KEYMGMT_NEW: c_int = 1;
pub const OSSL_FUNC_KEYMGMT_LOAD: c_int = 8;
pub const OSSL_FUNC_KEYMGMT_FREE: c_int = 10;
pub const OSSL_FUNC_KEYMGMT_GET_PARAMS: c_int = 11;
pub const OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS: c_int = 12;
pub const OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME: c_int = 20;
pub const OSSL_FUNC_KEYMGMT_HAS: c_int = 21;
pub const OSSL_FUNC_KEYMGMT_MATCH: c_int = 23;
pub const OSSL_FUNC_KEYMGMT_IMPORT: c_int = 40;
pub const OSSL_FUNC_KEYMGMT_IMPORT_TYPES: c_int = 41;
pub const OSSL_FUNC_KEYMGMT_EXPORT: c_int = 42;
pub const OSSL_FUNC_KEYMGMT_EXPORT_TYPES: c_int = 43;
pub const OSSL_FUNC_KEYMGMT_DUP: c_int = 44;

// core_dispatch.h: signature
pub const OSSL_FUNC_SIGNATURE_NEWCTX: c_int = 1;
pub const OSSL_FUNC_SIGNATURE_SIGN_INIT: c_int = 2;
pub const OSSL_FUNC_SIGNATURE_SIGN: c_int = 3;
pub const OSSL_FUNC_SIGNATURE_VERIFY_INIT: c_int = 4;
pub const OSSL_FUNC_SIGNATURE_VERIFY: c_int = 5;
pub const OSSL_FUNC_SIGNATURE_DIGEST_SIGN_INIT: c_int = 8;
pub const OSSL_FUNC_SIGNATURE_DIGEST_SIGN_UPDATE: c_int = 9;
pub const OSSL_FUNC_SIGNATURE_DIGEST_SIGN_FINAL: c_int = 10;
pub const OSSL_FUNC_SIGNATURE_DIGEST_VERIFY_INIT: c_int = 12;
pub const OSSL_FUNC_SIGNATURE_DIGEST_VERIFY_UPDATE: c_int = 13;
pub const OSSL_FUNC_SIGNATURE_DIGEST_VERIFY_FINAL: c_int = 14;
pub const OSSL_FUNC_SIGNATURE_FREECTX: c_int = 16;
pub const OSSL_FUNC_SIGNATURE_DUPCTX: c_int = 17;
pub const OSSL_FUNC_SIGNATURE_GET_CTX_PARAMS: c_int = 18;
pub const OSSL_FUNC_SIGNATURE_GETTABLE_CTX_PARAMS: c_int = 19;
pub const OSSL_FUNC_SIGNATURE_SET_CTX_PARAMS: c_int = 20;
pub const OSSL_FUNC_SIGNATURE_SETTABLE_CTX_PARAMS: c_int = 21;

// core_dispatch.h: asymmetric cipher
pub const OSSL_FUNC_ASYM_CIPHER_NEWCTX: c_int = 1;
pub const OSSL_FUNC_ASYM_CIPHER_ENCRYPT_INIT: c_int = 2;
pub const OSSL_FUNC_ASYM_CIPHER_ENCRYPT: c_int = 3;
pub const OSSL_FUNC_ASYM_CIPHER_DECRYPT_INIT: c_int = 4;
pub const OSSL_FUNC_ASYM_CIPHER_DECRYPT: c_int = 5;
pub const OSSL_FUNC_ASYM_CIPHER_FREECTX: c_int = 6;
pub const OSSL_FUNC_ASYM_CIPHER_DUPCTX: c_int = 7;
pub const OSSL_FUNC_ASYM_CIPHER_SET_CTX_PARAMS: c_int = 10;
pub const OSSL_FUNC_ASYM_CIPHER_SETTABLE_CTX_PARAMS: c_int = 11;

// core_dispatch.h: store
pub const OSSL_FUNC_STORE_OPEN: c_int = 1;
pub const OSSL_FUNC_STORE_SETTABLE_CTX_PARAMS: c_int = 3;
pub const OSSL_FUNC_STORE_SET_CTX_PARAMS: c_int = 4;
pub const OSSL_FUNC_STORE_LOAD: c_int = 5;
pub const OSSL_FUNC_STORE_EOF: c_int = 6;
pub const OSSL_FUNC_STORE_CLOSE: c_int = 7;

/// core_object.h: `#define OSSL_OBJECT_PKEY 2`
pub const OSSL_OBJECT_PKEY: c_int = 2;
/// store.h: `#define OSSL_STORE_INFO_PUBKEY 3`, `#define OSSL_STORE_INFO_PKEY 4`
pub const OSSL_STORE_INFO_PUBKEY: c_int = 3;
pub const OSSL_STORE_INFO_PKEY: c_int = 4;

// core_names.h: parameter names
pub const PROV_NAME: &CStr = c"name";
pub const PROV_VERSION: &CStr = c"version";
pub const PROV_BUILDINFO: &CStr = c"buildinfo";
pub const PROV_STATUS: &CStr = c"status";
pub const OBJECT_TYPE: &CStr = c"type";
pub const OBJECT_DATA_TYPE: &CStr = c"data-type";
pub const OBJECT_REFERENCE: &CStr = c"reference";
pub const OBJECT_DESC: &CStr = c"desc";
pub const STORE_EXPECT: &CStr = c"expect";
pub const OBJECT_DATA: &CStr = c"data";
pub const OBJECT_DATA_STRUCTURE: &CStr = c"data-structure";
/// Not OpenSSL's: the in-process provider's store takes the id of the caller's keyd client
/// (provider::in_process) under this name; any other copy of the provider refuses it.
pub const STORE_CLIENT_ID: &CStr = c"aziot-keys-in-process-client";
pub const PKEY_BITS: &CStr = c"bits";
pub const PKEY_SECURITY_BITS: &CStr = c"security-bits";
pub const PKEY_MAX_SIZE: &CStr = c"max-size";
pub const PKEY_DEFAULT_DIGEST: &CStr = c"default-digest";
pub const PKEY_GROUP_NAME: &CStr = c"group";
pub const PKEY_PUB_KEY: &CStr = c"pub";
pub const PKEY_ENCODED_PUB_KEY: &CStr = c"encoded-pub-key";
pub const PKEY_POINT_FORMAT: &CStr = c"point-format";
pub const PKEY_PRIV_KEY: &CStr = c"priv";
pub const PKEY_RSA_N: &CStr = c"n";
pub const PKEY_RSA_E: &CStr = c"e";
pub const PKEY_RSA_D: &CStr = c"d";
pub const SIG_ALGORITHM_ID: &CStr = c"algorithm-id";
pub const SIG_DIGEST: &CStr = c"digest";
pub const SIG_PROPERTIES: &CStr = c"properties";
pub const SIG_PAD_MODE: &CStr = c"pad-mode";
pub const SIG_PSS_SALTLEN: &CStr = c"saltlen";
pub const SIG_MGF1_DIGEST: &CStr = c"mgf1-digest";
pub const CIPHER_OAEP_LABEL: &CStr = c"oaep-label";

extern "C" {
    // --- params.h ---
    /// `OSSL_PARAM *OSSL_PARAM_locate(OSSL_PARAM *p, const char *key);`
    pub fn OSSL_PARAM_locate(p: *mut OSSL_PARAM, key: *const c_char) -> *mut OSSL_PARAM;
    /// `const OSSL_PARAM *OSSL_PARAM_locate_const(const OSSL_PARAM *p, const char *key);`
    pub fn OSSL_PARAM_locate_const(p: *const OSSL_PARAM, key: *const c_char) -> *const OSSL_PARAM;
    /// `int OSSL_PARAM_get_int(const OSSL_PARAM *p, int *val);`
    pub fn OSSL_PARAM_get_int(p: *const OSSL_PARAM, val: *mut c_int) -> c_int;
    /// `int OSSL_PARAM_set_int(OSSL_PARAM *p, int val);`
    pub fn OSSL_PARAM_set_int(p: *mut OSSL_PARAM, val: c_int) -> c_int;
    /// `int OSSL_PARAM_set_utf8_ptr(OSSL_PARAM *p, const char *val);`
    pub fn OSSL_PARAM_set_utf8_ptr(p: *mut OSSL_PARAM, val: *const c_char) -> c_int;
    /// `int OSSL_PARAM_set_utf8_string(OSSL_PARAM *p, const char *val);`
    pub fn OSSL_PARAM_set_utf8_string(p: *mut OSSL_PARAM, val: *const c_char) -> c_int;
    /// `int OSSL_PARAM_get_utf8_string_ptr(const OSSL_PARAM *p, const char **val);`
    pub fn OSSL_PARAM_get_utf8_string_ptr(p: *const OSSL_PARAM, val: *mut *const c_char) -> c_int;
    /// `int OSSL_PARAM_get_octet_string_ptr(const OSSL_PARAM *p, const void **val, size_t *used_len);`
    pub fn OSSL_PARAM_get_octet_string_ptr(
        p: *const OSSL_PARAM,
        val: *mut *const c_void,
        used_len: *mut usize,
    ) -> c_int;
    /// `OSSL_PARAM OSSL_PARAM_construct_int(const char *key, int *buf);`
    pub fn OSSL_PARAM_construct_int(key: *const c_char, buf: *mut c_int) -> OSSL_PARAM;
    /// `OSSL_PARAM OSSL_PARAM_construct_utf8_string(const char *key, char *buf, size_t bsize);`
    pub fn OSSL_PARAM_construct_utf8_string(
        key: *const c_char,
        buf: *mut c_char,
        bsize: usize,
    ) -> OSSL_PARAM;
    /// `OSSL_PARAM OSSL_PARAM_construct_octet_string(const char *key, void *buf, size_t bsize);`
    pub fn OSSL_PARAM_construct_octet_string(
        key: *const c_char,
        buf: *mut c_void,
        bsize: usize,
    ) -> OSSL_PARAM;
    /// `OSSL_PARAM OSSL_PARAM_construct_uint64(const char *key, uint64_t *buf);`
    pub fn OSSL_PARAM_construct_uint64(key: *const c_char, buf: *mut u64) -> OSSL_PARAM;
    /// `int OSSL_PARAM_get_uint64(const OSSL_PARAM *p, uint64_t *val);`
    pub fn OSSL_PARAM_get_uint64(p: *const OSSL_PARAM, val: *mut u64) -> c_int;
    /// `OSSL_PARAM OSSL_PARAM_construct_end(void);`
    pub fn OSSL_PARAM_construct_end() -> OSSL_PARAM;

    // --- provider.h ---
    /// `int OSSL_PROVIDER_add_builtin(OSSL_LIB_CTX *, const char *name, OSSL_provider_init_fn *init_fn);`
    pub fn OSSL_PROVIDER_add_builtin(
        libctx: *mut OSSL_LIB_CTX,
        name: *const c_char,
        init_fn: OSSL_provider_init_fn,
    ) -> c_int;

    /// `const char *OSSL_PROVIDER_get0_name(const OSSL_PROVIDER *prov);`
    pub fn OSSL_PROVIDER_get0_name(prov: *const openssl_sys::OSSL_PROVIDER) -> *const c_char;
    /// `const OSSL_PROVIDER *EVP_PKEY_get0_provider(const EVP_PKEY *key);`
    pub fn EVP_PKEY_get0_provider(key: *const EVP_PKEY) -> *const openssl_sys::OSSL_PROVIDER;

    // --- store.h ---
    /// `OSSL_STORE_CTX *OSSL_STORE_open_ex(const char *uri, OSSL_LIB_CTX *libctx, const char *propq,
    /// const UI_METHOD *ui_method, void *ui_data, const OSSL_PARAM params[],
    /// OSSL_STORE_post_process_info_fn post_process, void *post_process_data);`
    pub fn OSSL_STORE_open_ex(
        uri: *const c_char,
        libctx: *mut OSSL_LIB_CTX,
        propq: *const c_char,
        ui_method: *const c_void,
        ui_data: *mut c_void,
        params: *const OSSL_PARAM,
        post_process: *const c_void,
        post_process_data: *mut c_void,
    ) -> *mut OSSL_STORE_CTX;
    /// `OSSL_STORE_INFO *OSSL_STORE_load(OSSL_STORE_CTX *ctx);`
    pub fn OSSL_STORE_load(ctx: *mut OSSL_STORE_CTX) -> *mut OSSL_STORE_INFO;
    /// `int OSSL_STORE_eof(OSSL_STORE_CTX *ctx);`
    pub fn OSSL_STORE_eof(ctx: *mut OSSL_STORE_CTX) -> c_int;
    /// `int OSSL_STORE_close(OSSL_STORE_CTX *ctx);`
    pub fn OSSL_STORE_close(ctx: *mut OSSL_STORE_CTX) -> c_int;
    /// `int OSSL_STORE_INFO_get_type(const OSSL_STORE_INFO *info);`
    pub fn OSSL_STORE_INFO_get_type(info: *const OSSL_STORE_INFO) -> c_int;
    /// `EVP_PKEY *OSSL_STORE_INFO_get1_PKEY(const OSSL_STORE_INFO *info);`
    pub fn OSSL_STORE_INFO_get1_PKEY(info: *const OSSL_STORE_INFO) -> *mut EVP_PKEY;
    /// `void OSSL_STORE_INFO_free(OSSL_STORE_INFO *info);`
    pub fn OSSL_STORE_INFO_free(info: *mut OSSL_STORE_INFO);

    // --- evp.h ---
    /// `int EVP_set_default_properties(OSSL_LIB_CTX *libctx, const char *propq);`
    pub fn EVP_set_default_properties(libctx: *mut OSSL_LIB_CTX, propq: *const c_char) -> c_int;
    /// `int EVP_PKEY_get_params(const EVP_PKEY *pkey, OSSL_PARAM params[]);`
    pub fn EVP_PKEY_get_params(pkey: *const EVP_PKEY, params: *mut OSSL_PARAM) -> c_int;
    /// `int EVP_PKEY_export(const EVP_PKEY *pkey, int selection, OSSL_CALLBACK *export_cb,
    /// void *export_cbarg);`
    pub fn EVP_PKEY_export(
        pkey: *const EVP_PKEY,
        selection: c_int,
        export_cb: Option<OSSL_CALLBACK>,
        export_cbarg: *mut c_void,
    ) -> c_int;
    /// `EVP_PKEY_CTX *EVP_PKEY_CTX_new_from_name(OSSL_LIB_CTX *libctx, const char *name,
    /// const char *propquery);`
    pub fn EVP_PKEY_CTX_new_from_name(
        libctx: *mut OSSL_LIB_CTX,
        name: *const c_char,
        propquery: *const c_char,
    ) -> *mut EVP_PKEY_CTX;
    /// `EVP_PKEY_CTX *EVP_PKEY_CTX_new_from_pkey(OSSL_LIB_CTX *libctx, EVP_PKEY *pkey,
    /// const char *propquery);`
    pub fn EVP_PKEY_CTX_new_from_pkey(
        libctx: *mut OSSL_LIB_CTX,
        pkey: *mut EVP_PKEY,
        propquery: *const c_char,
    ) -> *mut EVP_PKEY_CTX;
    /// `int EVP_PKEY_fromdata_init(EVP_PKEY_CTX *ctx);`
    pub fn EVP_PKEY_fromdata_init(ctx: *mut EVP_PKEY_CTX) -> c_int;
    /// `int EVP_PKEY_fromdata(EVP_PKEY_CTX *ctx, EVP_PKEY **ppkey, int selection, OSSL_PARAM params[]);`
    pub fn EVP_PKEY_fromdata(
        ctx: *mut EVP_PKEY_CTX,
        ppkey: *mut *mut EVP_PKEY,
        selection: c_int,
        params: *mut OSSL_PARAM,
    ) -> c_int;
    /// `int EVP_PKEY_CTX_get_params(EVP_PKEY_CTX *ctx, OSSL_PARAM *params);`
    pub fn EVP_PKEY_CTX_get_params(ctx: *mut EVP_PKEY_CTX, params: *mut OSSL_PARAM) -> c_int;
    /// `int EVP_MD_CTX_copy_ex(EVP_MD_CTX *out, const EVP_MD_CTX *in);`
    pub fn EVP_MD_CTX_copy_ex(out: *mut EVP_MD_CTX, input: *const EVP_MD_CTX) -> c_int;
}
