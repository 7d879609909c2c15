//! Key handles (spec keyd.md §4): `sr=<B64(SR)>&sig=<B64(HMAC-SHA256(SR))>`, where SR is
//! `{"key_id":<KeyId>,"nonce":"<B64(64 random bytes)>"}` and the MAC key is the library key
//! `handle-validation-key`, which no caller can reach.

use aziot_keys::{KeyBackend, KeyUsage, SignMechanism, HANDLE_VALIDATION_KEY_ID};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// What a handle names. Serialized externally tagged, exactly as upstream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyId {
    KeyPair(String),
    Key(String),
    /// (complete base handle string, derivation data)
    Derived(String, Vec<u8>),
}

#[derive(Serialize)]
struct SrOut<'a> {
    key_id: &'a KeyId,
    nonce: &'a str,
}

#[derive(Deserialize)]
struct SrIn {
    key_id: KeyId,
    #[allow(dead_code)]
    nonce: String,
}

/// A validated handle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Validated {
    KeyPair(String),
    Key(String),
    /// The base key's library ID, the base's kind, and the derivation data.
    Derived { base_id: String, base_is_pair: bool, derivation_data: Vec<u8> },
}

impl Validated {
    /// The ID the library is called with.
    pub fn library_id(&self) -> &str {
        match self {
            Validated::KeyPair(id) | Validated::Key(id) => id,
            Validated::Derived { base_id, .. } => base_id,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// The handle is malformed or its MAC does not verify.
    #[error("invalid handle")]
    Invalid,
    #[error("nested derived keys are not supported, import the outer derived key first")]
    NestedDerived,
    /// The handle-validation key could not be created or used.
    #[error("could not use the handle-validation key")]
    Mac(#[source] aziot_keys::Error),
}

fn ensure_mac_key(backend: &dyn KeyBackend) -> Result<(), HandleError> {
    backend
        .create_key_if_not_exists(HANDLE_VALIDATION_KEY_ID, KeyUsage::SIGN)
        .map_err(HandleError::Mac)
}

/// Mints a new handle for `key_id` (fresh random nonce each time).
pub fn mint(backend: &dyn KeyBackend, key_id: &KeyId) -> Result<String, HandleError> {
    let mut nonce = [0u8; 64];
    openssl::rand::rand_bytes(&mut nonce).map_err(|e| {
        HandleError::Mac(aziot_keys::Error::external("could not generate a handle nonce", e))
    })?;
    let nonce = B64.encode(nonce);
    let sr = serde_json::to_vec(&SrOut { key_id, nonce: &nonce })
        .map_err(|e| HandleError::Mac(aziot_keys::Error::external("could not serialize a handle", e)))?;
    ensure_mac_key(backend)?;
    let sig = backend
        .sign(HANDLE_VALIDATION_KEY_ID, SignMechanism::HmacSha256, &sr)
        .map_err(HandleError::Mac)?;
    Ok(format!("sr={}&sig={}", B64.encode(&sr), B64.encode(sig)))
}

/// Validates `handle` (spec keyd.md §4.3).
pub fn validate(backend: &dyn KeyBackend, handle: &str) -> Result<Validated, HandleError> {
    match validate_one(backend, handle)? {
        KeyId::KeyPair(id) => Ok(Validated::KeyPair(id)),
        KeyId::Key(id) => Ok(Validated::Key(id)),
        KeyId::Derived(base, derivation_data) => {
            let (base_id, base_is_pair) = match validate_one(backend, &base)? {
                KeyId::Key(id) => (id, false),
                KeyId::KeyPair(id) => (id, true),
                KeyId::Derived(..) => return Err(HandleError::NestedDerived),
            };
            Ok(Validated::Derived { base_id, base_is_pair, derivation_data })
        }
    }
}

fn validate_one(backend: &dyn KeyBackend, handle: &str) -> Result<KeyId, HandleError> {
    let mut sr = None;
    let mut sig = None;
    for piece in handle.split('&') {
        if let Some(v) = piece.strip_prefix("sr=") {
            let bytes = B64.decode(v).map_err(|_| HandleError::Invalid)?;
            sr = Some(String::from_utf8(bytes).map_err(|_| HandleError::Invalid)?);
        } else if let Some(v) = piece.strip_prefix("sig=") {
            sig = Some(B64.decode(v).map_err(|_| HandleError::Invalid)?);
        }
    }
    let (Some(sr), Some(sig)) = (sr, sig) else { return Err(HandleError::Invalid) };
    ensure_mac_key(backend)?;
    let ok = backend
        .verify(HANDLE_VALIDATION_KEY_ID, SignMechanism::HmacSha256, sr.as_bytes(), &sig)
        .map_err(HandleError::Mac)?;
    if !ok {
        return Err(HandleError::Invalid);
    }
    let parsed: SrIn = serde_json::from_str(&sr).map_err(|_| HandleError::Invalid)?;
    let ids: &[&str] = match &parsed.key_id {
        KeyId::KeyPair(id) | KeyId::Key(id) => &[id],
        KeyId::Derived(..) => &[],
    };
    if ids.iter().any(|id| id.contains('\0')) {
        return Err(HandleError::Invalid);
    }
    Ok(parsed.key_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sr_serialization_is_exact() {
        let sr = serde_json::to_string(&SrOut { key_id: &KeyId::KeyPair("device-id".into()), nonce: "q1w2..==" }).unwrap();
        assert_eq!(sr, r#"{"key_id":{"KeyPair":"device-id"},"nonce":"q1w2..=="}"#);
        assert_eq!(
            B64.encode(&sr),
            "eyJrZXlfaWQiOnsiS2V5UGFpciI6ImRldmljZS1pZCJ9LCJub25jZSI6InExdzIuLj09In0="
        );
        let d = serde_json::to_string(&SrOut { key_id: &KeyId::Derived("sr=a&sig=b".into(), vec![1, 255]), nonce: "n" }).unwrap();
        assert_eq!(d, r#"{"key_id":{"Derived":["sr=a&sig=b",[1,255]]},"nonce":"n"}"#);
        let k = serde_json::to_string(&SrOut { key_id: &KeyId::Key("k".into()), nonce: "n" }).unwrap();
        assert_eq!(k, r#"{"key_id":{"Key":"k"},"nonce":"n"}"#);
    }
}
