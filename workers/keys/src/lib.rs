//! The key library behind keyd.
//!
//! One Rust-level contract, [`KeyBackend`], mirrors the libaziot_keys C API 2.1.0.0
//! (spec/keyd.md §8) with Rust types. Two implementations:
//! - [`native::KeyStore`]: our own library (file backend today; PKCS#11 later). Thread-safe
//!   without a global lock: parsed keys are cached in memory, writes are serialized per store.
//! - [`foreign::ForeignLibrary`]: a third-party `libaziot_keys.so` loaded with dlopen; every
//!   call is serialized, as that C API requires.
//!
//! The C ABI that we export (`aziot_keys_get_function_list`, built into `libaziot_keys.so`)
//! lives in [`c_abi`] and is a thin wrapper around one global [`native::KeyStore`].

use std::borrow::Cow;

use zeroize::Zeroizing;

pub mod c_abi;
pub mod foreign;
pub mod native;
pub mod pkcs11_uri;

/// The ID of the key that MACs key handles. Never reachable by an HTTP caller.
pub const HANDLE_VALIDATION_KEY_ID: &str = "handle-validation-key";

/// `AZIOT_KEYS_RC_*`.
pub const RC_OK: u32 = 0;
pub const RC_ERR_INVALID_PARAMETER: u32 = 1;
pub const RC_ERR_EXTERNAL: u32 = 2;

/// Errors of the key library. `InvalidParameter` maps to `AZIOT_KEYS_RC_ERR_INVALID_PARAMETER`
/// (HTTP 400 in keyd), `External` to `AZIOT_KEYS_RC_ERR_EXTERNAL` (HTTP 500).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input, or a key that does not exist. The string says which parameter and why
    /// (for the log; keyd's wire message stays "a parameter has an invalid value").
    #[error("invalid parameter: {0}")]
    InvalidParameter(Cow<'static, str>),
    /// I/O, crypto-library or token failure.
    #[error("{context}")]
    External {
        context: Cow<'static, str>,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl Error {
    pub fn invalid(msg: impl Into<Cow<'static, str>>) -> Self {
        Error::InvalidParameter(msg.into())
    }

    pub fn external(
        context: impl Into<Cow<'static, str>>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Error::External { context: context.into(), source: Some(source.into()) }
    }

    pub fn external_msg(context: impl Into<Cow<'static, str>>) -> Self {
        Error::External { context: context.into(), source: None }
    }

    /// The C return code for this error.
    pub fn rc(&self) -> u32 {
        match self {
            Error::InvalidParameter(_) => RC_ERR_INVALID_PARAMETER,
            Error::External { .. } => RC_ERR_EXTERNAL,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `AZIOT_KEYS_KEY_USAGE_*` bits (`SIGN == DERIVE == 1`, `ENCRYPT == 16`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyUsage(pub u32);

impl KeyUsage {
    pub const DERIVE: KeyUsage = KeyUsage(1);
    pub const SIGN: KeyUsage = KeyUsage(1);
    pub const ENCRYPT: KeyUsage = KeyUsage(16);
}

/// `AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyPairParameter {
    /// 4 bytes, native-endian `unsigned int`: 1 = EC, 2 = RSA.
    Algorithm = 1,
    /// DER OID including tag and length.
    EcCurveOid = 2,
    /// X9.62 point, compressed form.
    EcPoint = 3,
    /// Big-endian, minimal length.
    RsaModulus = 4,
    /// Big-endian, minimal length.
    RsaExponent = 5,
}

pub const ALGORITHM_EC: u32 = 1;
pub const ALGORITHM_RSA: u32 = 2;

/// A key operation as [`KeyBackend::runs_quickly`] classifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuickOp {
    /// HMAC, derived HMAC or AEAD with a symmetric key, over `input_len` bytes.
    Symmetric { input_len: usize },
    /// A private-key operation of a key pair (ECDSA sign, RSA encrypt).
    Pair,
}

/// The longest input a symmetric operation may have to count as quick (HMAC-SHA256 or
/// AES-GCM over 64 KiB: tens of microseconds).
pub const QUICK_INPUT_MAX: usize = 64 * 1024;

/// Sign mechanisms (`AZIOT_KEYS_SIGN_MECHANISM_*`).
#[derive(Clone, Copy, Debug)]
pub enum SignMechanism<'a> {
    /// Key pairs: sign the digest as given, DER `ECDSA-Sig-Value` out.
    Ecdsa,
    /// Symmetric keys: HMAC-SHA256 over the message, 32 bytes out.
    HmacSha256,
    /// Symmetric base key: derive `HMAC-SHA256(base, derivation_data)`, then HMAC-SHA256 the
    /// message with the derived key (the only nested mechanism upstream supports).
    DerivedHmacSha256 { derivation_data: &'a [u8] },
}

/// Encrypt mechanisms (`AZIOT_KEYS_ENCRYPT_MECHANISM_*`).
#[derive(Clone, Copy, Debug)]
pub enum EncryptMechanism<'a> {
    /// AES-256-GCM, caller IV (non-empty) and AAD; output format version 0x02 (spec §7.5).
    Aead { iv: &'a [u8], aad: &'a [u8] },
    /// RSA private-key operation with PKCS#1 v1.5 type-1 padding.
    RsaPkcs1,
    /// Raw RSA private-key operation; input must be modulus-length.
    RsaNoPadding,
    /// AEAD with the key `HMAC-SHA256(base, derivation_data)`.
    DerivedAead { derivation_data: &'a [u8], iv: &'a [u8], aad: &'a [u8] },
}

/// The libaziot_keys 2.1.0.0 contract in Rust types. Implementations are `Send + Sync`; the
/// native one runs calls concurrently, the foreign one serializes them.
pub trait KeyBackend: Send + Sync {
    /// The C API version this backend implements (`0x02000000` or `0x02010000`). With a
    /// 2.0.0.0 foreign library, `move_key_pair`, `delete_key_pair` and `delete_key` are
    /// silent no-ops (spec quirk 9).
    fn version(&self) -> u32;
    fn set_parameter(&self, name: &str, value: &str) -> Result<()>;
    fn create_key_pair_if_not_exists(&self, id: &str, preferred_algorithms: Option<&str>) -> Result<()>;
    fn move_key_pair(&self, from: &str, to: &str) -> Result<()>;
    fn load_key_pair(&self, id: &str) -> Result<()>;
    fn get_key_pair_parameter(&self, id: &str, parameter: KeyPairParameter) -> Result<Vec<u8>>;
    fn delete_key_pair(&self, id: &str) -> Result<()>;
    fn create_key_if_not_exists(&self, id: &str, usage: KeyUsage) -> Result<()>;
    fn load_key(&self, id: &str) -> Result<()>;
    fn import_key(&self, id: &str, bytes: &[u8], usage: KeyUsage) -> Result<()>;
    fn delete_key(&self, id: &str) -> Result<()>;
    /// `HMAC-SHA256(base key, derivation_data)`, 32 bytes.
    fn derive_key(&self, base_id: &str, derivation_data: &[u8]) -> Result<Zeroizing<Vec<u8>>>;
    fn sign(&self, id: &str, mechanism: SignMechanism<'_>, data: &[u8]) -> Result<Vec<u8>>;
    /// Only `HmacSha256` need be supported; constant-time comparison.
    fn verify(&self, id: &str, mechanism: SignMechanism<'_>, data: &[u8], signature: &[u8]) -> Result<bool>;
    fn encrypt(&self, id: &str, mechanism: EncryptMechanism<'_>, plaintext: &[u8]) -> Result<Vec<u8>>;
    fn decrypt(&self, id: &str, mechanism: EncryptMechanism<'_>, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>>;

    /// Whether `op` on key `id` is known to take only microseconds, so that a server may run it
    /// on its async runtime's thread (handing it to another thread costs more than it does):
    /// a software operation on a key already in memory, on a bounded input, with no PKCS#11
    /// token involved. Anything else (a token, an RSA private-key operation, a key still on
    /// disk, a long input, a replacement key library) may be slow. Default: false.
    fn runs_quickly(&self, id: &str, op: QuickOp) -> bool {
        let _ = (id, op);
        false
    }
}
