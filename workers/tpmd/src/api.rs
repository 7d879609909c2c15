//! tpmd's HTTP API (spec tpmd.md §4): routing, caller authorization, error mapping.

use std::sync::{Arc, Mutex};

use aziot_ipc::server::{match_route, Service};
use aziot_ipc::{ApiError, Request, Response};
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use crate::tpm::{Tpm, TpmError};

pub const API_VERSIONS: &[&str] = &["2020-09-01"];

/// Bytes as standard base64 with mandatory canonical padding.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct B64(pub Vec<u8>);

impl<'de> Deserialize<'de> for B64 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use base64::Engine as _;
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(s.as_bytes()).map(B64).map_err(serde::de::Error::custom)
    }
}

impl Serialize for B64 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use base64::Engine as _;
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

#[derive(Serialize, Deserialize, Debug)]
pub struct TpmKeysResponse {
    pub endorsement_key: B64,
    pub storage_root_key: B64,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct ImportAuthKeyRequest {
    pub key: B64,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct SignRequest {
    pub data: B64,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct SignResponse {
    pub digest: B64,
}

#[derive(Serialize)]
struct Empty {}

/// The TPM service: one lock around the TPM context, requests strictly serialised.
pub struct Api {
    tpm: Arc<Mutex<Tpm>>,
    allowed_uids: std::sync::RwLock<Vec<u32>>,
}

impl Api {
    pub fn new(tpm: Tpm, allowed_uids: Vec<u32>) -> Self {
        Api { tpm: Arc::new(Mutex::new(tpm)), allowed_uids: std::sync::RwLock::new(allowed_uids) }
    }

    /// Replaces the allowed uids (config update from the broker).
    pub fn set_allowed_uids(&self, uids: Vec<u32>) {
        *self.allowed_uids.write().unwrap_or_else(|p| p.into_inner()) = uids;
    }

    fn authorize(&self, uid: u32) -> Result<(), ApiError> {
        if uid == 0 || self.allowed_uids.read().unwrap_or_else(|p| p.into_inner()).contains(&uid) {
            return Ok(());
        }
        tracing::info!("!!! user {uid} is not authorized to use the TPM service");
        Err(ApiError::new(StatusCode::UNAUTHORIZED, format!("user {uid} is not authorized to use the TPM service")))
    }

    /// Runs a TPM operation on a blocking thread under the TPM lock.
    async fn with_tpm<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&mut Tpm) -> Result<T, TpmError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let tpm = Arc::clone(&self.tpm);
        let result = tokio::task::spawn_blocking(move || {
            let mut tpm = tpm.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut tpm)
        })
        .await
        .map_err(|e| {
            tracing::error!("!!! {what}");
            tracing::error!("!!! TPM task failed: {e}");
            ApiError::internal()
        })?;
        result.map_err(|e| tpm_error(what, &e))
    }

    async fn route(&self, mut req: Request) -> Result<Response, ApiError> {
        let path = req.path.clone();
        let method = req.method.clone();
        if match_route("/get_tpm_keys", &path).is_some() {
            return match method {
                Method::GET => {
                    self.authorize(req.uid)?;
                    let (ek, srk) = self.with_tpm("could not get TPM keys", Tpm::get_tpm_keys).await?;
                    Ok(Response::json(StatusCode::OK, &TpmKeysResponse { endorsement_key: B64(ek), storage_root_key: B64(srk) }))
                }
                _ => Err(req.unsupported_method().await),
            };
        }
        if match_route("/import_auth_key", &path).is_some() {
            return match method {
                Method::POST => {
                    self.authorize(req.uid)?;
                    let body: ImportAuthKeyRequest = req.required_json().await?;
                    let key = body.key.0;
                    self.with_tpm("could not import auth key", move |tpm| tpm.import_auth_key(&key)).await?;
                    Ok(Response::json(StatusCode::OK, &Empty {}))
                }
                _ => Err(req.unsupported_method().await),
            };
        }
        if match_route("/sign_with_auth_key", &path).is_some() {
            return match method {
                Method::POST => {
                    self.authorize(req.uid)?;
                    let body: SignRequest = req.required_json().await?;
                    let data = body.data.0;
                    let digest = self.with_tpm("could not sign with auth key", move |tpm| tpm.sign_with_auth_key(&data)).await?;
                    Ok(Response::json(StatusCode::OK, &SignResponse { digest: B64(digest) }))
                }
                _ => Err(req.unsupported_method().await),
            };
        }
        Err(ApiError::not_found())
    }
}

impl Service for Api {
    fn api_versions(&self) -> &'static [&'static str] {
        API_VERSIONS
    }

    async fn handle(self: Arc<Self>, req: Request) -> Result<Response, ApiError> {
        self.route(req).await
    }
}

/// Bad input (a malformed or foreign blob, too much data) → 400 with the cause chain; TPM
/// failures → 500 `internal error`, chain logged at ERROR with `!!! `.
fn tpm_error(what: &'static str, e: &TpmError) -> ApiError {
    let mut chain = vec![what.to_owned()];
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        chain.push(err.to_string());
        current = err.source();
    }
    if e.is_bad_input() {
        for line in &chain {
            tracing::info!("!!! {line}");
        }
        ApiError::bad_request(chain.join("\ncaused by: "))
    } else {
        for line in &chain {
            tracing::error!("!!! {line}");
        }
        ApiError::internal()
    }
}
