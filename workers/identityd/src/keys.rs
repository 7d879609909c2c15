//! identityd's calls to keyd and certd (spec identityd.md §15), the device's SAS signer, and the
//! module key derivation of §8.2.
//!
//! Keys never pass through identityd except the two derived module keys it uploads to the hub
//! on create/update (§8.1 step 3): the device key signs in keyd (`POST /sign`), X.509 device
//! keys sign through the engine's in-process twin.

use std::sync::{Arc, Mutex};

use aziot_ipc::client::{Client, ClientError};
use base64::Engine as _;
use hyper::Method;
use serde::{Deserialize, Serialize};

use crate::hub::{BoxFuture, SasSigner, SignError};

/// What identityd speaks to keyd and certd (§7 step 5).
pub const KEYD_API_VERSION: &str = "2021-05-01";
pub const CERTD_API_VERSION: &str = "2020-09-01";
/// The master key of module keys (§8.2).
pub const MASTER_KEY_ID: &str = "aziot_identityd_master_id";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Derivation data of a module key (§8.2): `"{moduleId}:{generationId}:primary|secondary"`.
pub fn derivation_data(module_id: &str, generation_id: &str, primary: bool) -> String {
    format!("{module_id}:{generation_id}:{}", if primary { "primary" } else { "secondary" })
}

/// Percent-encodes a path segment (everything but unreserved characters).
pub fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HandleBody {
    key_handle: String,
}

#[derive(Deserialize)]
struct KeyBody {
    key: String,
}

#[derive(Deserialize)]
struct SignatureBody {
    signature: String,
}

#[derive(Deserialize, Serialize)]
pub struct PemBody {
    pub pem: String,
}

/// keyd, as identityd uses it.
#[derive(Debug)]
pub struct Keyd {
    client: Client,
    /// The master key's handle, once known (handles never expire).
    master: Mutex<Option<String>>,
}

impl Keyd {
    pub fn new(socket: &std::path::Path) -> Keyd {
        Keyd { client: Client::new(socket, KEYD_API_VERSION), master: Mutex::new(None) }
    }

    /// `GET /key/{id}`.
    pub async fn key_handle(&self, id: &str) -> Result<String, ClientError> {
        let h: HandleBody = self.client.call::<(), _>(Method::GET, &format!("/key/{}", pct(id)), None).await?;
        Ok(h.key_handle)
    }

    /// `GET /keypair/{id}`.
    pub async fn keypair_handle(&self, id: &str) -> Result<String, ClientError> {
        let h: HandleBody = self.client.call::<(), _>(Method::GET, &format!("/keypair/{}", pct(id)), None).await?;
        Ok(h.key_handle)
    }

    /// `POST /keypair {"keyId", "preferredAlgorithms": "rsa-2048:*"}`.
    pub async fn create_keypair(&self, id: &str) -> Result<String, ClientError> {
        let body = serde_json::json!({"keyId": id, "preferredAlgorithms": "rsa-2048:*"});
        let h: HandleBody = self.client.call(Method::POST, "/keypair", Some(&body)).await?;
        Ok(h.key_handle)
    }

    /// `DELETE /keypair {"keyHandle"}`.
    pub async fn delete_keypair(&self, handle: &str) -> Result<(), ClientError> {
        self.client.call(Method::DELETE, "/keypair", Some(&serde_json::json!({"keyHandle": handle}))).await
    }

    /// `POST /keypair/{to} {"from"}`: moves key pair `from` onto `to`.
    pub async fn move_keypair(&self, from: &str, to: &str) -> Result<(), ClientError> {
        let body = serde_json::json!({"from": from});
        self.client.call(Method::POST, &format!("/keypair/{}", pct(to)), Some(&body)).await
    }

    /// The master key's handle: `GET /key/aziot_identityd_master_id`, else generate it
    /// (`POST /key`, usage derive + sign). Cached.
    pub async fn master_handle(&self) -> Result<String, ClientError> {
        if let Some(h) = self.master.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(h);
        }
        let handle = match self.key_handle(MASTER_KEY_ID).await {
            Ok(h) => h,
            Err(_) => {
                let body = serde_json::json!({"keyId": MASTER_KEY_ID, "keyBytes": null, "usage": "derive,sign"});
                let h: HandleBody = self.client.call(Method::POST, "/key", Some(&body)).await?;
                h.key_handle
            }
        };
        *self.master.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle.clone());
        Ok(handle)
    }

    /// `POST /derivedkey`: the handle of the key derived from `base` with `data`.
    pub async fn derived_handle(&self, base: &str, data: &str) -> Result<String, ClientError> {
        let body = serde_json::json!({"baseKeyHandle": base, "derivationData": b64(data.as_bytes())});
        let h: HandleBody = self.client.call(Method::POST, "/derivedkey", Some(&body)).await?;
        Ok(h.key_handle)
    }

    /// `POST /derivedkey/export`: the derived key's bytes, base64 (as keyd returns them).
    pub async fn export_derived(&self, handle: &str) -> Result<String, ClientError> {
        let k: KeyBody = self
            .client
            .call(Method::POST, "/derivedkey/export", Some(&serde_json::json!({"keyHandle": handle})))
            .await?;
        Ok(k.key)
    }

    /// `POST /sign` HMAC-SHA256 of `message`: the raw MAC.
    pub async fn sign_hmac(&self, handle: &str, message: &[u8]) -> Result<Vec<u8>, ClientError> {
        let body = serde_json::json!({
            "keyHandle": handle,
            "algorithm": "HMAC-SHA256",
            "parameters": {"message": b64(message)},
        });
        let s: SignatureBody = self.client.call(Method::POST, "/sign", Some(&body)).await?;
        base64::engine::general_purpose::STANDARD
            .decode(s.signature)
            .map_err(|e| ClientError::Protocol(format!("keyd's signature is not base64: {e}")))
    }
}

/// certd, as identityd uses it.
#[derive(Debug)]
pub struct Certd {
    client: Client,
}

impl Certd {
    pub fn new(socket: &std::path::Path) -> Certd {
        Certd { client: Client::new(socket, CERTD_API_VERSION) }
    }

    /// `GET /certificates/{id}`: `None` when certd answers 400 (not found).
    pub async fn get(&self, id: &str) -> Result<Option<String>, ClientError> {
        match self.client.call::<(), PemBody>(Method::GET, &format!("/certificates/{}", pct(id)), None).await {
            Ok(b) => Ok(Some(b.pem)),
            Err(ClientError::Http { status: 400, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST /certificates {"certId", "csr"}` with no issuer: certd's `[cert_issuance.<id>]`
    /// decides.
    pub async fn issue(&self, id: &str, csr_pem: &str) -> Result<String, ClientError> {
        let body = serde_json::json!({"certId": id, "csr": csr_pem});
        let b: PemBody = self.client.call(Method::POST, "/certificates", Some(&body)).await?;
        Ok(b.pem)
    }

    /// `PUT /certificates/{id} {"pem"}`.
    pub async fn put(&self, id: &str, pem: &str) -> Result<(), ClientError> {
        let body = serde_json::json!({"pem": pem});
        let _: serde_json::Value = self.client.call(Method::PUT, &format!("/certificates/{}", pct(id)), Some(&body)).await?;
        Ok(())
    }

    /// `DELETE /certificates/{id}`.
    pub async fn delete(&self, id: &str) -> Result<(), ClientError> {
        self.client.call::<(), ()>(Method::DELETE, &format!("/certificates/{}", pct(id)), None).await
    }
}

/// The device's SAS signer: HMAC-SHA256 in keyd with the device key `key_id` (its handle is
/// fetched once).
pub struct KeydSigner {
    keyd: Arc<Keyd>,
    key_id: String,
    handle: Mutex<Option<String>>,
}

impl KeydSigner {
    pub fn new(keyd: Arc<Keyd>, key_id: String) -> KeydSigner {
        KeydSigner { keyd, key_id, handle: Mutex::new(None) }
    }

    /// The device key's handle (`GET /key/{id}`, cached once fetched).
    pub async fn handle(&self) -> Result<String, ClientError> {
        if let Some(h) = self.handle.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(h);
        }
        let h = self.keyd.key_handle(&self.key_id).await?;
        *self.handle.lock().unwrap_or_else(|p| p.into_inner()) = Some(h.clone());
        Ok(h)
    }
}

impl SasSigner for KeydSigner {
    fn sign<'a>(&'a self, data: &'a [u8]) -> BoxFuture<'a, Result<Vec<u8>, SignError>> {
        Box::pin(async move {
            let handle = self.handle().await.map_err(|e| SignError(error_chain(&e)))?;
            self.keyd.sign_hmac(&handle, data).await.map_err(|e| SignError(error_chain(&e)))
        })
    }
}

/// `e` and its causes, `: `-separated.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::hash::MessageDigest;
    use openssl::pkey::PKey;
    use openssl::sign::Signer;

    /// §8.2's test vector, recomputed here with OpenSSL's HMAC (what keyd's file backend does)
    /// over the derivation data this module builds.
    #[test]
    fn module_key_derivation_vector() {
        let master = PKey::hmac(&[0x11; 32]).unwrap();
        let derive = |data: &str| {
            let mut s = Signer::new(MessageDigest::sha256(), &master).unwrap();
            s.update(data.as_bytes()).unwrap();
            b64(&s.sign_to_vec().unwrap())
        };
        let primary = derivation_data("mod1", "638000000000000000", true);
        let secondary = derivation_data("mod1", "638000000000000000", false);
        assert_eq!(primary, "mod1:638000000000000000:primary");
        assert_eq!(secondary, "mod1:638000000000000000:secondary");
        assert_eq!(derive(&primary), "e5k5RFQ6Yjee3H53K2bAsCEkY6NEDfZJUYPmFxlGgVM=");
        assert_eq!(derive(&secondary), "Zvf1Tlo98kauMyv5HbqyvYTKXHmHHK17rV3tZfIVXvE=");
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(pct("a/b c$"), "a%2Fb%20c%24");
        assert_eq!(pct("device-id_1.x~"), "device-id_1.x~");
    }
}
