//! identityd's tpmd client (spec tpmd.md §4, identityd.md §15): the EK and SRK publics for the
//! DPS TPM challenge, the import of DPS's activation blob, and HMAC-SHA256 by the imported auth
//! key — the signer of DPS and IoT Hub SAS tokens of a TPM device. The key never leaves the TPM.

use aziot_ipc::client::{Client, ClientError};
use base64::Engine as _;
use hyper::Method;
use serde::Deserialize;

use crate::hub::{BoxFuture, SasSigner, SignError};
use crate::keys::error_chain;

/// What identityd speaks to tpmd (§7 step 5).
pub const TPMD_API_VERSION: &str = "2020-09-01";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn unb64(s: &str, what: &str) -> Result<Vec<u8>, ClientError> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| ClientError::Protocol(format!("tpmd's {what} is not base64: {e}")))
}

#[derive(Deserialize)]
struct KeysBody {
    endorsement_key: String,
    storage_root_key: String,
}

#[derive(Deserialize)]
struct DigestBody {
    digest: String,
}

/// tpmd, as identityd uses it.
#[derive(Debug)]
pub struct Tpmd {
    client: Client,
}

impl Tpmd {
    pub fn new(socket: &std::path::Path) -> Tpmd {
        Tpmd {
            client: Client::new(socket, TPMD_API_VERSION),
        }
    }

    /// `GET /get_tpm_keys`: (EK, SRK) as marshaled `TPM2B_PUBLIC`s.
    pub async fn keys(&self) -> Result<(Vec<u8>, Vec<u8>), ClientError> {
        let k: KeysBody = self
            .client
            .call::<(), _>(Method::GET, "/get_tpm_keys", None)
            .await?;
        Ok((
            unb64(&k.endorsement_key, "endorsement_key")?,
            unb64(&k.storage_root_key, "storage_root_key")?,
        ))
    }

    /// `POST /import_auth_key {"key"}`: DPS's activation blob.
    pub async fn import_auth_key(&self, blob: &[u8]) -> Result<(), ClientError> {
        let _: serde::de::IgnoredAny = self
            .client
            .call(
                Method::POST,
                "/import_auth_key",
                Some(&serde_json::json!({"key": b64(blob)})),
            )
            .await?;
        Ok(())
    }

    /// `POST /sign_with_auth_key {"data"}`: HMAC-SHA256 by the imported key.
    pub async fn sign(&self, data: &[u8]) -> Result<Vec<u8>, ClientError> {
        let d: DigestBody = self
            .client
            .call(
                Method::POST,
                "/sign_with_auth_key",
                Some(&serde_json::json!({"data": b64(data)})),
            )
            .await?;
        unb64(&d.digest, "digest")
    }
}

impl SasSigner for Tpmd {
    fn sign<'a>(&'a self, data: &'a [u8]) -> BoxFuture<'a, Result<Vec<u8>, SignError>> {
        Box::pin(async move {
            Tpmd::sign(self, data)
                .await
                .map_err(|e| SignError(error_chain(&e)))
        })
    }
}
