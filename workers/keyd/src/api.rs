//! keyd's HTTP API (spec keyd.md §3, §5): routing, authorization, handle checks, and the
//! mapping of library errors to the wire (§6).

use std::sync::Arc;

use aziot_ipc::principal::Principals;
use aziot_ipc::server::{match_route, Service};
use aziot_ipc::{ApiError, Request, Response};
use aziot_keys::{EncryptMechanism, KeyBackend, KeyPairParameter, QuickOp, SignMechanism, HANDLE_VALIDATION_KEY_ID};
use hyper::{Method, StatusCode};

use crate::handle::{self, HandleError, KeyId, Validated};
use crate::wire::*;

pub const API_VERSIONS: &[&str] = &["2020-09-01", "2021-05-01"];

/// The keys service.
pub struct Api {
    backend: Arc<dyn KeyBackend>,
    principals: std::sync::RwLock<Principals>,
}

impl Api {
    pub fn new(backend: Arc<dyn KeyBackend>, principals: Principals) -> Self {
        Api { backend, principals: std::sync::RwLock::new(principals) }
    }

    /// Replaces the principals (config reload).
    pub fn set_principals(&self, principals: Principals) {
        *self.principals.write().unwrap_or_else(|p| p.into_inner()) = principals;
    }

    /// 401 unless `uid` may use `id`. The handle-validation key is refused to everyone,
    /// root included (spec keyd.md §4.2 Recommendation).
    fn authorize(&self, uid: u32, id: &str) -> Result<(), ApiError> {
        let allowed = id != HANDLE_VALIDATION_KEY_ID
            && self.principals.read().unwrap_or_else(|p| p.into_inner()).is_authorized(uid, id);
        if allowed {
            Ok(())
        } else {
            tracing::info!("!!! user {uid} is not authorized to access the key {id}");
            Err(ApiError::new(StatusCode::UNAUTHORIZED, format!("user {uid} is not authorized to access the key {id}")))
        }
    }

    fn mint(&self, key_id: &KeyId) -> Result<Response, ApiError> {
        let key_handle = handle::mint(&*self.backend, key_id).map_err(handle_error)?;
        Ok(Response::json(StatusCode::OK, &KeyHandleResponse { key_handle }))
    }

    fn validate(&self, uid: u32, key_handle: &str) -> Result<Validated, ApiError> {
        let v = handle::validate(&*self.backend, key_handle).map_err(handle_error)?;
        if v.library_id() == HANDLE_VALIDATION_KEY_ID {
            return Err(self.authorize(uid, HANDLE_VALIDATION_KEY_ID).unwrap_err());
        }
        Ok(v)
    }

    /// Runs a key operation (sign, encrypt, decrypt) so that it never holds up the other
    /// connections of this serving thread: on the runtime's blocking pool, unless the key
    /// library says it takes microseconds (a file key in memory, HMAC/AEAD on a bounded input
    /// or EC P-256; [`KeyBackend::runs_quickly`]) — handing those to another thread would cost
    /// more than they do. A PKCS#11 token, an RSA private key, a key still on disk, a long input
    /// or a replacement key library always go to the pool. The handle check, itself a MAC with
    /// keyd's own key, goes with the operation when that key is not quick. Pool threads are
    /// created on demand (clone with CLONE_THREAD: every worker's seccomp program allows it)
    /// and exit after 10 s idle.
    async fn key_op<B: Send + 'static>(
        self: &Arc<Self>,
        uid: u32,
        body: B,
        handle: fn(&B) -> &str,
        cost: fn(&Validated, &B) -> Option<(String, QuickOp)>,
        op: fn(&Api, &Validated, B) -> Result<Response, ApiError>,
    ) -> Result<Response, ApiError> {
        let quick_mac = QuickOp::Symmetric { input_len: handle(&body).len() };
        if !self.backend.runs_quickly(HANDLE_VALIDATION_KEY_ID, quick_mac) {
            return self
                .off_runtime(move |api| {
                    let key = api.validate(uid, handle(&body))?;
                    op(api, &key, body)
                })
                .await;
        }
        let key = self.validate(uid, handle(&body))?;
        if cost(&key, &body).is_some_and(|(id, q)| self.backend.runs_quickly(&id, q)) {
            return op(self, &key, body);
        }
        self.off_runtime(move |api| op(api, &key, body)).await
    }

    async fn off_runtime<F>(self: &Arc<Self>, f: F) -> Result<Response, ApiError>
    where
        F: FnOnce(&Api) -> Result<Response, ApiError> + Send + 'static,
    {
        let api = Arc::clone(self);
        tokio::task::spawn_blocking(move || f(&api)).await.map_err(|e| {
            tracing::error!("!!! key operation task failed: {e}");
            ApiError::internal()
        })?
    }

    async fn route(self: &Arc<Self>, mut req: Request) -> Result<Response, ApiError> {
        let path = req.path.clone();
        let m = req.method.clone();
        let uid = req.uid;
        if match_route("/key", &path).is_some() {
            return match m {
                Method::POST => self.create_key(uid, req.required_json().await?),
                Method::DELETE => {
                    let body: HandleRequest = req.required_json().await?;
                    match self.validate(uid, &body.key_handle)? {
                        Validated::Key(id) => lib(self.backend.delete_key(&id)).map(|()| Response::no_content()),
                        _ => Err(bad_handle("handle is not for a key")),
                    }
                }
                _ => Err(req.unsupported_method().await),
            };
        }
        if let Some(caps) = match_route("/key/{}", &path) {
            let id = &caps[0];
            return match m {
                Method::GET => {
                    self.authorize(uid, id)?;
                    check_id(id)?;
                    lib(self.backend.load_key(id))?;
                    self.mint(&KeyId::Key(id.clone()))
                }
                Method::POST => {
                    let body: MoveRequest = req.required_json().await?;
                    if &body.from == id {
                        Err(ApiError::bad_request("source and destination for move are identical"))
                    } else {
                        Err(ApiError::bad_request("invalid type \"key\""))
                    }
                }
                _ => Err(req.unsupported_method().await),
            };
        }
        if match_route("/keypair", &path).is_some() {
            return match m {
                Method::POST => {
                    let body: CreateKeyPairRequest = req.required_json().await?;
                    self.authorize(uid, &body.key_id)?;
                    check_id(&body.key_id)?;
                    let backend = Arc::clone(&self.backend);
                    let (id, algs) = (body.key_id.clone(), body.preferred_algorithms.clone());
                    // Key generation (RSA-4096: seconds) must not stall the connection threads.
                    let created = tokio::task::spawn_blocking(move || {
                        backend.create_key_pair_if_not_exists(&id, algs.as_deref())
                    })
                    .await
                    .map_err(|e| {
                        tracing::error!("!!! key generation task failed: {e}");
                        ApiError::internal()
                    })?;
                    lib(created)?;
                    self.mint(&KeyId::KeyPair(body.key_id))
                }
                Method::DELETE => {
                    let body: HandleRequest = req.required_json().await?;
                    match self.validate(uid, &body.key_handle)? {
                        Validated::KeyPair(id) => lib(self.backend.delete_key_pair(&id)).map(|()| Response::no_content()),
                        _ => Err(bad_handle("handle is not for a key pair")),
                    }
                }
                _ => Err(req.unsupported_method().await),
            };
        }
        if let Some(caps) = match_route("/keypair/{}", &path) {
            let id = &caps[0];
            return match m {
                Method::GET => {
                    self.authorize(uid, id)?;
                    check_id(id)?;
                    lib(self.backend.load_key_pair(id))?;
                    self.mint(&KeyId::KeyPair(id.clone()))
                }
                Method::POST => {
                    let body: MoveRequest = req.required_json().await?;
                    if &body.from == id {
                        return Err(ApiError::bad_request("source and destination for move are identical"));
                    }
                    self.authorize(uid, &body.from)?;
                    self.authorize(uid, id)?;
                    check_id(&body.from)?;
                    check_id(id)?;
                    lib(self.backend.move_key_pair(&body.from, id))?;
                    Ok(Response::no_content())
                }
                _ => Err(req.unsupported_method().await),
            };
        }
        if let Some(caps) = match_route("/parameters/{}", &path) {
            return match m {
                Method::POST => {
                    let body: HandleRequest = req.required_json().await?;
                    self.parameter(uid, &caps[0], &body.key_handle)
                }
                _ => Err(req.unsupported_method().await),
            };
        }
        if match_route("/derivedkey", &path).is_some() {
            return match m {
                Method::POST => {
                    let body: CreateDerivedKeyRequest = req.required_json().await?;
                    match self.validate(uid, &body.base_key_handle)? {
                        Validated::Key(_) => {
                            self.mint(&KeyId::Derived(body.base_key_handle, body.derivation_data.0))
                        }
                        // Upstream accepts a key-pair base (quirk); we refuse it (compatibility.md).
                        Validated::KeyPair(_) => Err(bad_handle("derived keys need a symmetric base key")),
                        Validated::Derived { .. } => Err(bad_handle(&HandleError::NestedDerived.to_string())),
                    }
                }
                _ => Err(req.unsupported_method().await),
            };
        }
        if match_route("/derivedkey/export", &path).is_some() {
            return match m {
                Method::POST => {
                    let body: HandleRequest = req.required_json().await?;
                    match self.validate(uid, &body.key_handle)? {
                        Validated::Derived { base_id, derivation_data, .. } => {
                            let key = lib(self.backend.derive_key(&base_id, &derivation_data))?;
                            Ok(Response::json(StatusCode::OK, &ExportResponse { key: B64(key.to_vec()) }))
                        }
                        _ => Err(bad_handle("handle is not for a derived key")),
                    }
                }
                _ => Err(req.unsupported_method().await),
            };
        }
        if match_route("/sign", &path).is_some() {
            return match m {
                Method::POST => {
                    let body: SignRequest = req.required_json().await?;
                    self.key_op(uid, body, |b| &b.key_handle, sign_cost, Api::sign).await
                }
                _ => Err(req.unsupported_method().await),
            };
        }
        if match_route("/encrypt", &path).is_some() {
            return match m {
                Method::POST => {
                    let body: EncryptRequest = req.required_json().await?;
                    self.key_op(uid, body, |b| &b.key_handle, encrypt_cost, Api::encrypt).await
                }
                _ => Err(req.unsupported_method().await),
            };
        }
        if match_route("/decrypt", &path).is_some() {
            return match m {
                Method::POST => {
                    let body: DecryptRequest = req.required_json().await?;
                    self.key_op(uid, body, |b| &b.key_handle, decrypt_cost, Api::decrypt).await
                }
                _ => Err(req.unsupported_method().await),
            };
        }
        Err(ApiError::not_found())
    }

    fn create_key(&self, uid: u32, body: CreateKeyRequest) -> Result<Response, ApiError> {
        self.authorize(uid, &body.key_id)?;
        check_id(&body.key_id)?;
        let usage = aziot_keys::KeyUsage(body.usage.0);
        match body.key_bytes {
            Some(bytes) => lib(self.backend.import_key(&body.key_id, &bytes.0, usage))?,
            None => lib(self.backend.create_key_if_not_exists(&body.key_id, usage))?,
        }
        self.mint(&KeyId::Key(body.key_id))
    }

    fn parameter(&self, uid: u32, name: &str, key_handle: &str) -> Result<Response, ApiError> {
        let id = match self.validate(uid, key_handle)? {
            Validated::KeyPair(id) => id,
            // Upstream answers 500 here (quirk 7); we answer 400 (compatibility.md).
            _ => return Err(bad_handle("handle is not for a key pair")),
        };
        let parameter = match name {
            "algorithm" => KeyPairParameter::Algorithm,
            "ec-curve-oid" => KeyPairParameter::EcCurveOid,
            "ec-point" => KeyPairParameter::EcPoint,
            "rsa-modulus" => KeyPairParameter::RsaModulus,
            "rsa-exponent" => KeyPairParameter::RsaExponent,
            other => {
                tracing::info!("!!! unknown key pair parameter {other:?}");
                return Err(ApiError::bad_request("a parameter has an invalid value"));
            }
        };
        let bytes = lib(self.backend.get_key_pair_parameter(&id, parameter))?;
        let value = if parameter == KeyPairParameter::Algorithm {
            let raw: [u8; 4] = bytes.as_slice().try_into().map_err(|_| {
                tracing::error!("!!! the key library returned an algorithm of {} bytes", bytes.len());
                ApiError::internal()
            })?;
            match u32::from_ne_bytes(raw) {
                aziot_keys::ALGORITHM_EC => "ECDSA".to_owned(),
                aziot_keys::ALGORITHM_RSA => "RSA".to_owned(),
                other => {
                    tracing::error!("!!! the key library returned unknown algorithm {other}");
                    return Err(ApiError::internal());
                }
            }
        } else {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(&bytes)
        };
        Ok(Response::json(StatusCode::OK, &ValueResponse { value }))
    }

    fn sign(&self, key: &Validated, body: SignRequest) -> Result<Response, ApiError> {
        let signature = match (key, &body.algorithm) {
            (Validated::KeyPair(id), SignAlgorithm::Ecdsa { digest }) => {
                self.backend.sign(id, SignMechanism::Ecdsa, &digest.0)
            }
            (Validated::Key(id), SignAlgorithm::HmacSha256 { message }) => {
                self.backend.sign(id, SignMechanism::HmacSha256, &message.0)
            }
            (Validated::Derived { base_id, derivation_data, .. }, SignAlgorithm::HmacSha256 { message }) => self
                .backend
                .sign(base_id, SignMechanism::DerivedHmacSha256 { derivation_data }, &message.0),
            _ => return Err(bad_mechanism()),
        };
        let signature = lib(signature)?;
        Ok(Response::json(StatusCode::OK, &SignResponse { signature: B64(signature) }))
    }

    fn encrypt(&self, key: &Validated, body: EncryptRequest) -> Result<Response, ApiError> {
        let pt = &body.plaintext.0;
        let ciphertext = match (key, &body.algorithm) {
            (Validated::Key(id), EncryptAlgorithm::Aead { iv, aad }) => {
                self.backend.encrypt(id, EncryptMechanism::Aead { iv: &iv.0, aad: &aad.0 }, pt)
            }
            (Validated::Derived { base_id, derivation_data, .. }, EncryptAlgorithm::Aead { iv, aad }) => {
                self.backend.encrypt(
                    base_id,
                    EncryptMechanism::DerivedAead { derivation_data, iv: &iv.0, aad: &aad.0 },
                    pt,
                )
            }
            (Validated::KeyPair(id), EncryptAlgorithm::RsaPkcs1) => self.backend.encrypt(id, EncryptMechanism::RsaPkcs1, pt),
            (Validated::KeyPair(id), EncryptAlgorithm::RsaNoPadding) => {
                self.backend.encrypt(id, EncryptMechanism::RsaNoPadding, pt)
            }
            _ => return Err(bad_mechanism()),
        };
        let ciphertext = lib(ciphertext)?;
        Ok(Response::json(StatusCode::OK, &EncryptResponse { ciphertext: B64(ciphertext) }))
    }

    fn decrypt(&self, key: &Validated, body: DecryptRequest) -> Result<Response, ApiError> {
        let ct = &body.ciphertext.0;
        let plaintext = match (key, &body.algorithm) {
            (Validated::Key(id), EncryptAlgorithm::Aead { iv, aad }) => {
                self.backend.decrypt(id, EncryptMechanism::Aead { iv: &iv.0, aad: &aad.0 }, ct)
            }
            (Validated::Derived { base_id, derivation_data, .. }, EncryptAlgorithm::Aead { iv, aad }) => {
                self.backend.decrypt(
                    base_id,
                    EncryptMechanism::DerivedAead { derivation_data, iv: &iv.0, aad: &aad.0 },
                    ct,
                )
            }
            _ => return Err(bad_mechanism()),
        };
        let plaintext = lib(plaintext)?;
        Ok(Response::json(StatusCode::OK, &DecryptResponse { plaintext: B64(plaintext.to_vec()) }))
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

/// The key a sign request uses and how the key library classifies the operation (None: a
/// combination `sign` refuses anyway).
fn sign_cost(key: &Validated, body: &SignRequest) -> Option<(String, QuickOp)> {
    match (key, &body.algorithm) {
        (Validated::KeyPair(id), SignAlgorithm::Ecdsa { .. }) => Some((id.clone(), QuickOp::Pair)),
        (Validated::Key(id), SignAlgorithm::HmacSha256 { message })
        | (Validated::Derived { base_id: id, .. }, SignAlgorithm::HmacSha256 { message }) => {
            Some((id.clone(), QuickOp::Symmetric { input_len: message.0.len() }))
        }
        _ => None,
    }
}

fn encrypt_cost(key: &Validated, body: &EncryptRequest) -> Option<(String, QuickOp)> {
    match (key, &body.algorithm) {
        (Validated::Key(id) | Validated::Derived { base_id: id, .. }, EncryptAlgorithm::Aead { .. }) => {
            Some((id.clone(), QuickOp::Symmetric { input_len: body.plaintext.0.len() }))
        }
        (Validated::KeyPair(id), _) => Some((id.clone(), QuickOp::Pair)),
        _ => None,
    }
}

fn decrypt_cost(key: &Validated, body: &DecryptRequest) -> Option<(String, QuickOp)> {
    match (key, &body.algorithm) {
        (Validated::Key(id) | Validated::Derived { base_id: id, .. }, EncryptAlgorithm::Aead { .. }) => {
            Some((id.clone(), QuickOp::Symmetric { input_len: body.ciphertext.0.len() }))
        }
        _ => None,
    }
}

/// An ID with a NUL cannot reach the C API.
fn check_id(id: &str) -> Result<(), ApiError> {
    if id.contains('\0') {
        return Err(ApiError::bad_request("parameter \"id\" has an invalid value\ncaused by: the ID contains a NUL character"));
    }
    Ok(())
}

fn bad_handle(reason: &str) -> ApiError {
    ApiError::bad_request(format!("parameter \"handle\" has an invalid value\ncaused by: {reason}"))
}

fn bad_mechanism() -> ApiError {
    ApiError::bad_request("parameter \"mechanism\" has an invalid value\ncaused by: mechanism cannot be used with this key type")
}

fn handle_error(e: HandleError) -> ApiError {
    match e {
        HandleError::Mac(cause) => {
            log_chain(tracing::Level::ERROR, &HandleError::Mac(cause));
            ApiError::internal()
        }
        other => {
            tracing::info!("!!! {other}");
            bad_handle(&other.to_string())
        }
    }
}

/// Maps a library result to the wire: invalid parameter -> 400, anything else -> 500, with the
/// full cause chain in the log (`!!! ` per element).
fn lib<T>(r: aziot_keys::Result<T>) -> Result<T, ApiError> {
    r.map_err(|e| match e {
        aziot_keys::Error::InvalidParameter(_) => {
            log_chain(tracing::Level::INFO, &e);
            ApiError::bad_request("a parameter has an invalid value")
        }
        aziot_keys::Error::External { .. } => {
            log_chain(tracing::Level::ERROR, &e);
            ApiError::internal()
        }
    })
}

fn log_chain(level: tracing::Level, e: &(dyn std::error::Error + 'static)) {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if level == tracing::Level::ERROR {
            tracing::error!("!!! {err}");
        } else {
            tracing::info!("!!! {err}");
        }
        current = err.source();
    }
}
