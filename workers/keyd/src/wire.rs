//! Request and response bodies of keyd's HTTP API (spec keyd.md §5), field names exact.

use base64::engine::general_purpose::STANDARD as B64_ENGINE;
use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bytes as standard base64 with mandatory canonical padding.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct B64(pub Vec<u8>);

impl<'de> Deserialize<'de> for B64 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        B64_ENGINE.decode(s.as_bytes()).map(B64).map_err(serde::de::Error::custom)
    }
}

impl Serialize for B64 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64_ENGINE.encode(&self.0))
    }
}

/// `usage`: comma-separated `derive`, `encrypt`, `sign`; exact words, no empty elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage(pub u32);

impl<'de> Deserialize<'de> for Usage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let mut bits = 0;
        for word in s.split(',') {
            bits |= match word {
                "derive" | "sign" => aziot_keys::KeyUsage::DERIVE.0,
                "encrypt" => aziot_keys::KeyUsage::ENCRYPT.0,
                other => {
                    return Err(serde::de::Error::invalid_value(
                        serde::de::Unexpected::Str(other),
                        &"derive, encrypt or sign",
                    ))
                }
            };
        }
        Ok(Usage(bits))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateKeyRequest {
    pub key_id: String,
    pub usage: Usage,
    #[serde(default)]
    pub key_bytes: Option<B64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateKeyPairRequest {
    pub key_id: String,
    #[serde(default)]
    pub preferred_algorithms: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HandleRequest {
    pub key_handle: String,
}

#[derive(Deserialize)]
pub struct MoveRequest {
    pub from: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateDerivedKeyRequest {
    pub base_key_handle: String,
    pub derivation_data: B64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignRequest {
    pub key_handle: String,
    #[serde(flatten)]
    pub algorithm: SignAlgorithm,
}

#[derive(Deserialize)]
#[serde(tag = "algorithm", content = "parameters")]
pub enum SignAlgorithm {
    #[serde(rename = "ECDSA")]
    Ecdsa { digest: B64 },
    #[serde(rename = "HMAC-SHA256")]
    HmacSha256 { message: B64 },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EncryptRequest {
    pub key_handle: String,
    #[serde(flatten)]
    pub algorithm: EncryptAlgorithm,
    pub plaintext: B64,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecryptRequest {
    pub key_handle: String,
    #[serde(flatten)]
    pub algorithm: EncryptAlgorithm,
    pub ciphertext: B64,
}

#[derive(Deserialize)]
#[serde(tag = "algorithm", content = "parameters")]
pub enum EncryptAlgorithm {
    #[serde(rename = "AEAD")]
    Aead { iv: B64, aad: B64 },
    #[serde(rename = "RSA-PKCS1")]
    RsaPkcs1,
    #[serde(rename = "RSA-NO-PADDING")]
    RsaNoPadding,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyHandleResponse {
    pub key_handle: String,
}

#[derive(Serialize)]
pub struct ValueResponse {
    pub value: String,
}

#[derive(Serialize)]
pub struct SignResponse {
    pub signature: B64,
}

#[derive(Serialize)]
pub struct EncryptResponse {
    pub ciphertext: B64,
}

#[derive(Serialize)]
pub struct DecryptResponse {
    pub plaintext: B64,
}

#[derive(Serialize)]
pub struct ExportResponse {
    pub key: B64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_bodies() {
        let r: SignRequest = serde_json::from_str(r#"{"keyHandle":"h","algorithm":"ECDSA","parameters":{"digest":"AAEC"}}"#).unwrap();
        assert!(matches!(r.algorithm, SignAlgorithm::Ecdsa { digest } if digest.0 == [0, 1, 2]));
        let r: SignRequest = serde_json::from_str(r#"{"algorithm":"HMAC-SHA256","keyHandle":"h","parameters":{"message":"AA=="},"x":1}"#).unwrap();
        assert!(matches!(r.algorithm, SignAlgorithm::HmacSha256 { .. }));
        assert!(serde_json::from_str::<SignRequest>(r#"{"keyHandle":"h","algorithm":"ECDSA"}"#).is_err());
        assert!(serde_json::from_str::<SignRequest>(r#"{"keyHandle":"h","algorithm":"RSA","parameters":{}}"#).is_err());
        assert!(serde_json::from_str::<SignRequest>(r#"{"keyHandle":"h","algorithm":"ECDSA","parameters":{"message":"AA=="}}"#).is_err());
        // Canonical padding is mandatory.
        assert!(serde_json::from_str::<SignRequest>(r#"{"keyHandle":"h","algorithm":"HMAC-SHA256","parameters":{"message":"AA"}}"#).is_err());
        assert!(serde_json::from_str::<SignRequest>(r#"{"keyHandle":"h","algorithm":"HMAC-SHA256","parameters":{"message":"AA= ="}}"#).is_err());
    }

    #[test]
    fn encrypt_bodies() {
        let ok = |s: &str| serde_json::from_str::<EncryptRequest>(s).map(|r| r.algorithm);
        assert!(matches!(ok(r#"{"keyHandle":"h","algorithm":"RSA-PKCS1","plaintext":"AA=="}"#), Ok(EncryptAlgorithm::RsaPkcs1)));
        assert!(matches!(ok(r#"{"keyHandle":"h","algorithm":"RSA-PKCS1","parameters":null,"plaintext":"AA=="}"#), Ok(EncryptAlgorithm::RsaPkcs1)));
        assert!(ok(r#"{"keyHandle":"h","algorithm":"RSA-PKCS1","parameters":{},"plaintext":"AA=="}"#).is_err());
        assert!(matches!(ok(r#"{"keyHandle":"h","algorithm":"AEAD","parameters":{"iv":"AA==","aad":""},"plaintext":"AA=="}"#), Ok(EncryptAlgorithm::Aead { .. })));
        assert!(ok(r#"{"keyHandle":"h","algorithm":"AEAD","plaintext":"AA=="}"#).is_err());
    }

    #[test]
    fn usage_words() {
        let u = |s: &str| serde_json::from_str::<Usage>(&format!("{s:?}")).map(|u| u.0);
        assert_eq!(u("sign").unwrap(), 1);
        assert_eq!(u("derive,sign").unwrap(), 1);
        assert_eq!(u("encrypt").unwrap(), 16);
        assert_eq!(u("derive,encrypt").unwrap(), 17);
        assert!(u("").is_err());
        assert!(u("sign,").is_err());
        assert!(u("Sign").is_err());
        assert!(u("sign, encrypt").is_err());
    }
}
