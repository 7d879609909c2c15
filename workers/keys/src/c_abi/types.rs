//! The C types of `aziot-keys.h` (spec/keyd.md §8.2–§8.4), `#[repr(C)]` with the header's field
//! order. Shared by the exporting side ([`super`]) and the importing side
//! ([`crate::foreign`]).

use std::ffi::{c_char, c_int, c_uint, c_void};

/// `AZIOT_KEYS_RC`.
pub type AziotKeysRc = c_uint;

pub const AZIOT_KEYS_VERSION_2_0_0_0: c_uint = 0x0200_0000;
pub const AZIOT_KEYS_VERSION_2_1_0_0: c_uint = 0x0201_0000;

pub const AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_ALGORITHM: c_uint = 1;
pub const AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_EC_CURVE_OID: c_uint = 2;
pub const AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_EC_POINT: c_uint = 3;
pub const AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_RSA_MODULUS: c_uint = 4;
pub const AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_RSA_EXPONENT: c_uint = 5;

pub const AZIOT_KEYS_SIGN_MECHANISM_ECDSA: c_uint = 1;
pub const AZIOT_KEYS_SIGN_MECHANISM_HMAC_SHA256: c_uint = 2;
pub const AZIOT_KEYS_SIGN_MECHANISM_DERIVED: c_uint = 3;

pub const AZIOT_KEYS_ENCRYPT_MECHANISM_AEAD: c_uint = 1;
pub const AZIOT_KEYS_ENCRYPT_MECHANISM_RSA_PKCS1: c_uint = 2;
pub const AZIOT_KEYS_ENCRYPT_MECHANISM_RSA_NO_PADDING: c_uint = 3;
pub const AZIOT_KEYS_ENCRYPT_MECHANISM_DERIVED: c_uint = 4;

/// `AZIOT_KEYS_FUNCTION_LIST`: the common head of every versioned function list.
#[repr(C)]
#[derive(Debug)]
pub struct FunctionListBase {
    pub version: c_uint,
}

/// `AZIOT_KEYS_SIGN_DERIVED_PARAMETERS`.
#[repr(C)]
#[derive(Debug)]
pub struct SignDerivedParameters {
    pub derivation_data: *const u8,
    pub derivation_data_len: usize,
    pub mechanism: c_uint,
    pub parameters: *const c_void,
}

/// `AZIOT_KEYS_ENCRYPT_AEAD_PARAMETERS`.
#[repr(C)]
#[derive(Debug)]
pub struct EncryptAeadParameters {
    pub iv: *const u8,
    pub iv_len: usize,
    pub aad: *const u8,
    pub aad_len: usize,
}

/// `AZIOT_KEYS_ENCRYPT_DERIVED_PARAMETERS`.
#[repr(C)]
#[derive(Debug)]
pub struct EncryptDerivedParameters {
    pub derivation_data: *const u8,
    pub derivation_data_len: usize,
    pub mechanism: c_uint,
    pub parameters: *const c_void,
}

pub type SetParameterFn = unsafe extern "C" fn(name: *const c_char, value: *const c_char) -> AziotKeysRc;
pub type CreateKeyPairIfNotExistsFn =
    unsafe extern "C" fn(id: *const c_char, preferred_algorithms: *const c_char) -> AziotKeysRc;
pub type MoveKeyPairFn = unsafe extern "C" fn(from: *const c_char, to: *const c_char) -> AziotKeysRc;
pub type LoadKeyPairFn = unsafe extern "C" fn(id: *const c_char) -> AziotKeysRc;
pub type GetKeyPairParameterFn =
    unsafe extern "C" fn(id: *const c_char, type_: c_uint, value: *mut u8, value_len: *mut usize) -> AziotKeysRc;
pub type DeleteKeyPairFn = unsafe extern "C" fn(id: *const c_char) -> AziotKeysRc;
pub type CreateKeyIfNotExistsFn = unsafe extern "C" fn(id: *const c_char, usage: c_uint) -> AziotKeysRc;
pub type LoadKeyFn = unsafe extern "C" fn(id: *const c_char) -> AziotKeysRc;
pub type ImportKeyFn =
    unsafe extern "C" fn(id: *const c_char, bytes: *const u8, bytes_len: usize, usage: c_uint) -> AziotKeysRc;
pub type DeleteKeyFn = unsafe extern "C" fn(id: *const c_char) -> AziotKeysRc;
pub type DeriveKeyFn = unsafe extern "C" fn(
    base_id: *const c_char,
    derivation_data: *const u8,
    derivation_data_len: usize,
    derived_key: *mut u8,
    derived_key_len: *mut usize,
) -> AziotKeysRc;
pub type SignFn = unsafe extern "C" fn(
    id: *const c_char,
    mechanism: c_uint,
    parameters: *const c_void,
    digest: *const u8,
    digest_len: usize,
    signature: *mut u8,
    signature_len: *mut usize,
) -> AziotKeysRc;
pub type VerifyFn = unsafe extern "C" fn(
    id: *const c_char,
    mechanism: c_uint,
    parameters: *const c_void,
    digest: *const u8,
    digest_len: usize,
    signature: *const u8,
    signature_len: usize,
    ok: *mut c_int,
) -> AziotKeysRc;
pub type EncryptFn = unsafe extern "C" fn(
    id: *const c_char,
    mechanism: c_uint,
    parameters: *const c_void,
    plaintext: *const u8,
    plaintext_len: usize,
    ciphertext: *mut u8,
    ciphertext_len: *mut usize,
) -> AziotKeysRc;
pub type DecryptFn = unsafe extern "C" fn(
    id: *const c_char,
    mechanism: c_uint,
    parameters: *const c_void,
    ciphertext: *const u8,
    ciphertext_len: usize,
    plaintext: *mut u8,
    plaintext_len: *mut usize,
) -> AziotKeysRc;

/// `AZIOT_KEYS_FUNCTION_LIST_2_0_0_0`. `Option<fn>` has the layout of a nullable function
/// pointer, so a foreign list with NULL entries is represented faithfully.
#[repr(C)]
#[derive(Debug)]
pub struct FunctionList2_0_0_0 {
    pub base: FunctionListBase,
    pub set_parameter: Option<SetParameterFn>,
    pub create_key_pair_if_not_exists: Option<CreateKeyPairIfNotExistsFn>,
    pub load_key_pair: Option<LoadKeyPairFn>,
    pub get_key_pair_parameter: Option<GetKeyPairParameterFn>,
    pub create_key_if_not_exists: Option<CreateKeyIfNotExistsFn>,
    pub load_key: Option<LoadKeyFn>,
    pub import_key: Option<ImportKeyFn>,
    pub derive_key: Option<DeriveKeyFn>,
    pub sign: Option<SignFn>,
    pub verify: Option<VerifyFn>,
    pub encrypt: Option<EncryptFn>,
    pub decrypt: Option<DecryptFn>,
}

/// `AZIOT_KEYS_FUNCTION_LIST_2_1_0_0`.
#[repr(C)]
#[derive(Debug)]
pub struct FunctionList2_1_0_0 {
    pub base: FunctionListBase,
    pub set_parameter: Option<SetParameterFn>,
    pub create_key_pair_if_not_exists: Option<CreateKeyPairIfNotExistsFn>,
    pub move_key_pair: Option<MoveKeyPairFn>,
    pub load_key_pair: Option<LoadKeyPairFn>,
    pub get_key_pair_parameter: Option<GetKeyPairParameterFn>,
    pub delete_key_pair: Option<DeleteKeyPairFn>,
    pub create_key_if_not_exists: Option<CreateKeyIfNotExistsFn>,
    pub load_key: Option<LoadKeyFn>,
    pub import_key: Option<ImportKeyFn>,
    pub delete_key: Option<DeleteKeyFn>,
    pub derive_key: Option<DeriveKeyFn>,
    pub sign: Option<SignFn>,
    pub verify: Option<VerifyFn>,
    pub encrypt: Option<EncryptFn>,
    pub decrypt: Option<DecryptFn>,
}

/// The signature of `aziot_keys_get_function_list`.
pub type GetFunctionListFn =
    unsafe extern "C" fn(version: c_uint, pfunction_list: *mut *const FunctionListBase) -> AziotKeysRc;
