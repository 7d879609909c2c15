//! certd's HTTP API (spec certd.md §4, §8): the route table, authorization, and the mapping of
//! store and issuance errors to the wire.
//!
//! No lock is held across I/O to keyd or an EST server: issuance is serialized per cert ID only
//! (spec §4 Recommendation); reads and imports of other IDs go on meanwhile.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use aziot_ipc::principal::Principals;
use aziot_ipc::server::{match_route, Service};
use aziot_ipc::{ApiError, Request, Response};
use aziot_key_openssl_engine::KeydClient;
use hyper::{Method, StatusCode};
use openssl::x509::{X509Req, X509};
use serde::{Deserialize, Serialize};

use crate::config::{Config, Issuance, Method as IssuanceMethod};
use crate::issue::{self, EstIssuer, EstRequest, IssueError, Issuer};
use crate::store::{Store, StoreError};

/// certd accepts one api-version (common-http.md §5.1).
pub const API_VERSIONS: &[&str] = &["2020-09-01"];
/// What certd speaks to keyd (spec §3 step 4).
pub const KEYD_API_VERSION: &str = "2021-05-01";

/// The routes, matched in order against the raw path; the method is dispatched per route in
/// [`Api::handle_route`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// `/certificates`: POST issues.
    Certificates,
    /// `/certificates/{certId}`: GET, PUT, DELETE.
    Certificate,
}

const ROUTES: &[(&str, Route)] = &[("/certificates", Route::Certificates), ("/certificates/{}", Route::Certificate)];

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateRequest {
    cert_id: String,
    csr: String,
    #[serde(default)]
    issuer: Option<IssuerRef>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IssuerRef {
    cert_id: String,
    private_key_handle: String,
}

#[derive(Deserialize, Serialize)]
struct PemBody {
    pem: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyHandle {
    key_handle: String,
}

/// What a config reload replaces.
#[derive(Debug)]
struct Settings {
    issuance: Issuance,
    principals: Principals,
}

/// The certificates service.
pub struct Api {
    settings: RwLock<Arc<Settings>>,
    store: Arc<Store>,
    /// keyd over its socket (key-pair handles).
    keyd: aziot_ipc::client::Client,
    /// The engine's client (private-key operations of the signing keys).
    engine_keyd: Arc<KeydClient>,
    est: Option<Arc<dyn EstIssuer>>,
    /// Cert ID -> the lock serializing its issuance.
    issuing: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// 400 `parameter "<name>" has an invalid value\ncaused by: <cause>` (logged at INFO).
fn invalid_param(name: &str, cause: impl std::fmt::Display) -> ApiError {
    let message = format!("parameter \"{name}\" has an invalid value\ncaused by: {cause}");
    for line in message.lines() {
        tracing::info!("!!! {line}");
    }
    ApiError::bad_request(message)
}

/// 500 `internal error`; the cause chain goes to the log (ERROR).
fn internal(what: &str, e: &(dyn std::error::Error + 'static)) -> ApiError {
    tracing::error!("!!! {what}");
    let mut cause = Some(e);
    while let Some(c) = cause {
        tracing::error!("!!! caused by: {c}");
        cause = c.source();
    }
    ApiError::internal()
}

/// The store file name of cert `id` (for the log: an operator finds the corrupt file by it).
fn stored_file(id: &str) -> String {
    crate::store::cert_file_name(id).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn store_error(param: &str, what: &str, e: StoreError) -> ApiError {
    if e.is_invalid_id() {
        invalid_param(param, e)
    } else {
        internal(what, &e)
    }
}

/// A cert ID that reaches the store: not empty, no `/`, no `..`, no NUL, and short enough to
/// be a file name (upstream maps any ID to a file name; we refuse these with a 400 rather than
/// store them: docs/compatibility.md).
pub fn check_id(param: &str, id: &str) -> Result<(), ApiError> {
    let cause = if id.is_empty() {
        "a cert ID may not be empty"
    } else if id.contains('\0') {
        "a cert ID may not contain NUL"
    } else if id.contains('/') {
        "a cert ID may not contain \"/\""
    } else if id.contains("..") {
        "a cert ID may not contain \"..\""
    } else if crate::store::cert_file_name(id).is_err() {
        "cert id too long"
    } else {
        return Ok(());
    };
    Err(invalid_param(param, cause))
}

/// Percent-encodes a path segment (everything but unreserved characters).
fn pct(s: &str) -> String {
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

impl Api {
    pub fn new(
        config: &Config,
        store: Arc<Store>,
        keyd_socket: &std::path::Path,
        est: Option<Arc<dyn EstIssuer>>,
    ) -> Api {
        Api {
            settings: RwLock::new(Arc::new(Settings {
                issuance: config.issuance.clone(),
                principals: Principals::new(&config.principal),
            })),
            store,
            keyd: aziot_ipc::client::Client::new(keyd_socket, KEYD_API_VERSION),
            engine_keyd: Arc::new(KeydClient::new(keyd_socket)),
            est,
            issuing: Mutex::new(HashMap::new()),
        }
    }

    /// Applies a reloaded config: `[cert_issuance]`, `[preloaded_certs]`, `[[principal]]`
    /// (spec §7; the rest needs a restart).
    pub fn reload(&self, config: &Config) {
        self.store.set_preloaded(config.preloaded.clone());
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(Settings { issuance: config.issuance.clone(), principals: Principals::new(&config.principal) });
        tracing::info!("Config update finished.");
    }

    fn settings(&self) -> Arc<Settings> {
        Arc::clone(&self.settings.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// 401 unless `uid` may modify `id` (root always may).
    fn authorize(&self, uid: u32, id: &str) -> Result<(), ApiError> {
        if self.settings().principals.is_authorized(uid, id) {
            return Ok(());
        }
        let message = format!("user {uid} is not authorized to modify the cert {id}");
        tracing::info!("!!! {message}");
        Err(ApiError::new(StatusCode::UNAUTHORIZED, message))
    }

    async fn handle_route(self: Arc<Self>, mut req: Request) -> Result<Response, ApiError> {
        let Some((route, caps)) = ROUTES.iter().find_map(|(p, r)| match_route(p, &req.path).map(|c| (*r, c))) else {
            return Err(ApiError::not_found());
        };
        match (route, req.method.clone()) {
            (Route::Certificates, Method::POST) => {
                let body: CreateRequest = req.required_json().await?;
                self.create(req.uid, body).await
            }
            (Route::Certificate, Method::GET) => self.get(&caps[0]),
            (Route::Certificate, Method::PUT) => {
                let body: PemBody = req.put_json().await?;
                self.import(req.uid, &caps[0], body).await
            }
            (Route::Certificate, Method::DELETE) => {
                // A non-empty body is still decoded (422 when it is not JSON), then ignored.
                let _: Option<serde::de::IgnoredAny> = req.json().await?;
                self.delete(req.uid, &caps[0]).await
            }
            _ => Err(req.unsupported_method().await),
        }
    }

    fn get(&self, id: &str) -> Result<Response, ApiError> {
        check_id("id", id)?;
        match self.store.read(id) {
            Ok(Some(bytes)) => match String::from_utf8(bytes) {
                Ok(pem) => Ok(Response::json(StatusCode::OK, &PemBody { pem })),
                // upstream panics and drops the connection (quirk 8)
                Err(e) => Err(internal(&format!("the stored cert {id:?} is not UTF-8 text"), &e)),
            },
            Ok(None) => Err(invalid_param("id", "not found")),
            Err(e) => Err(store_error("id", &format!("could not read cert {id:?}"), e)),
        }
    }

    /// Runs a store write or delete off the serving thread (fsyncs).
    async fn on_store<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<Result<T, StoreError>, ApiError> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || op(&store)).await.map_err(|e| internal("store task failed", &e))
    }

    async fn import(&self, uid: u32, id: &str, body: PemBody) -> Result<Response, ApiError> {
        self.authorize(uid, id)?;
        check_id("id", id)?;
        let (owned_id, bytes) = (id.to_owned(), body.pem.clone().into_bytes());
        self.on_store(move |s| s.write(&owned_id, &bytes))
            .await?
            .map_err(|e| store_error("id", &format!("could not write cert {id:?}"), e))?;
        Ok(Response::json(StatusCode::CREATED, &body))
    }

    async fn delete(&self, uid: u32, id: &str) -> Result<Response, ApiError> {
        self.authorize(uid, id)?;
        check_id("id", id)?;
        let owned_id = id.to_owned();
        self.on_store(move |s| s.delete(&owned_id))
            .await?
            .map_err(|e| store_error("id", &format!("could not delete cert {id:?}"), e))?;
        Ok(Response::no_content())
    }

    /// The lock serializing issuance of `id`.
    fn issuance_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.issuing.lock().unwrap_or_else(|p| p.into_inner());
        // forget locks nobody holds or waits for
        map.retain(|_, l| Arc::strong_count(l) > 1);
        Arc::clone(map.entry(id.to_owned()).or_default())
    }

    async fn keypair_handle(&self, key_id: &str) -> Result<String, aziot_ipc::client::ClientError> {
        let h: KeyHandle =
            self.keyd.call::<(), KeyHandle>(Method::GET, &format!("/keypair/{}", pct(key_id)), None).await?;
        Ok(h.key_handle)
    }

    async fn create(&self, uid: u32, body: CreateRequest) -> Result<Response, ApiError> {
        let id = body.cert_id.as_str();
        self.authorize(uid, id)?;
        check_id("certId", id)?;
        let csr = X509Req::from_pem(body.csr.as_bytes()).map_err(|e| invalid_param("csr", e))?;
        let public = csr.public_key().map_err(|e| invalid_param("csr", e))?;
        match csr.verify(&public) {
            Ok(true) => {}
            Ok(false) => {
                return Err(invalid_param("csr", "the CSR's signature does not verify with its own public key"))
            }
            Err(e) => return Err(invalid_param("csr", e)),
        }
        let settings = self.settings();
        let options = settings.issuance.certs.get(id).cloned();
        let issuer = match (&body.issuer, &options) {
            (Some(i), _) => Issuer::Explicit { cert_id: i.cert_id.clone(), key_handle: i.private_key_handle.clone() },
            (None, None) => {
                tracing::info!("!!! issuer is required for locally-issued certs (no [cert_issuance.{id}])");
                return Err(ApiError::bad_request("issuer is required for locally-issued certs"));
            }
            (None, Some(o)) => match o.method {
                IssuanceMethod::SelfSigned => Issuer::SelfSigned,
                IssuanceMethod::LocalCa => Issuer::LocalCa,
                IssuanceMethod::Est => Issuer::Est,
            },
        };
        let _serial = self.issuance_lock(id);
        let _guard = _serial.lock().await;

        // The issuer chain and the signing key's handle.
        let (stack, key_handle): (Vec<X509>, String) = match issuer {
            Issuer::Explicit { cert_id, key_handle } => {
                check_id("issuer.certId", &cert_id)?;
                let bytes = match self.store.read(&cert_id) {
                    Ok(Some(b)) => b,
                    Ok(None) => return Err(invalid_param("issuer.certId", "not found")),
                    Err(e) => return Err(store_error("issuer.certId", "could not read the issuer cert", e)),
                };
                let stack = X509::stack_from_pem(&bytes).map_err(|e| {
                    internal(&format!("the issuer cert {cert_id:?} ({}) does not parse", stored_file(&cert_id)), &e)
                })?;
                if stack.is_empty() {
                    return Err(invalid_param("issuer.certId", "invalid issuer"));
                }
                if key_handle.contains('\0') {
                    return Err(invalid_param("issuer.privateKeyHandle", "the handle contains NUL"));
                }
                (stack, key_handle)
            }
            Issuer::SelfSigned => {
                let handle = self
                    .keypair_handle(id)
                    .await
                    .map_err(|e| internal(&format!("could not get key pair {id:?} from keyd"), &e))?;
                (Vec::new(), handle)
            }
            Issuer::LocalCa => {
                let Some(ca) = settings.issuance.local_ca.clone() else {
                    tracing::error!(
                        "!!! [cert_issuance.{id}] method = \"local_ca\" but [cert_issuance.local_ca] is not configured"
                    );
                    return Err(ApiError::internal());
                };
                let bytes = match self.store.read(&ca.cert) {
                    Ok(Some(b)) => b,
                    Ok(None) => {
                        tracing::error!("!!! the local CA cert {:?} does not exist", ca.cert);
                        return Err(ApiError::internal());
                    }
                    Err(e) => return Err(internal("could not read the local CA cert", &e)),
                };
                let stack = X509::stack_from_pem(&bytes).map_err(|e| {
                    internal(&format!("the local CA cert {:?} ({}) does not parse", ca.cert, stored_file(&ca.cert)), &e)
                })?;
                if stack.is_empty() {
                    tracing::error!("!!! the local CA cert {:?} holds no certificate", ca.cert);
                    return Err(ApiError::internal());
                }
                let handle = self
                    .keypair_handle(&ca.pk)
                    .await
                    .map_err(|e| internal(&format!("could not get the local CA key pair {:?} from keyd", ca.pk), &e))?;
                (stack, handle)
            }
            Issuer::Est => {
                let options = options.clone().expect("method = est comes from the options");
                let pem = match &self.est {
                    None => Err(IssueError::EstUnavailable),
                    Some(est) => {
                        let csr_der = csr.to_der().map_err(|e| internal("could not encode the CSR", &e))?;
                        est.issue(EstRequest { cert_id: id.to_owned(), csr_der, options }).await
                    }
                }
                .map_err(|e| {
                    // 500 as upstream, but with the EST failure in the message (no secrets in it)
                    let what = format!("could not issue cert {id:?} by EST");
                    let _ = internal(&what, &e);
                    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{what}: {}", crate::est::describe(&e)))
                })?;
                return self.store_issued(id, pem).await;
            }
        };

        // Signing makes blocking calls to keyd (the engine's twin): off the serving thread.
        let engine = Arc::clone(&self.engine_keyd);
        let pem = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, IssueError> {
            let key = aziot_key_openssl_engine::load_private_key(&engine, &key_handle).map_err(IssueError::Key)?;
            issue::build(&csr, &stack, &key, options.as_ref())
        })
        .await
        .map_err(|e| internal("issuance task failed", &e))?
        .map_err(|e| internal(&format!("could not issue cert {id:?}"), &e))?;
        self.store_issued(id, pem).await
    }

    async fn store_issued(&self, id: &str, pem: Vec<u8>) -> Result<Response, ApiError> {
        let text = String::from_utf8(pem).map_err(|e| internal("the issued PEM is not UTF-8", &e))?;
        let (owned_id, bytes) = (id.to_owned(), text.clone().into_bytes());
        self.on_store(move |s| s.write(&owned_id, &bytes))
            .await?
            .map_err(|e| internal(&format!("could not store cert {id:?}"), &e))?;
        Ok(Response::json(StatusCode::CREATED, &PemBody { pem: text }))
    }
}

impl Service for Api {
    fn api_versions(&self) -> &'static [&'static str] {
        API_VERSIONS
    }

    async fn handle(self: Arc<Self>, req: Request) -> Result<Response, ApiError> {
        self.handle_route(req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["device-id", "a.b", "x y", "ü"] {
            assert!(check_id("id", ok).is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("a/b", "\"/\""),
            ("..", "\"..\""),
            ("a..b", "\"..\""),
            ("a\0b", "NUL"),
            (&"a".repeat(200), "too long"),
        ] {
            let e = check_id("id", bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.starts_with("parameter \"id\" has an invalid value\ncaused by: "), "{e}");
            assert!(e.message.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn routes_are_matched_by_the_table() {
        let find = |p: &str| ROUTES.iter().find_map(|(pat, r)| match_route(pat, p).map(|c| (*r, c)));
        assert_eq!(find("/certificates"), Some((Route::Certificates, vec![])));
        assert_eq!(find("/certificates/a%2Fb"), Some((Route::Certificate, vec!["a/b".into()])));
        assert_eq!(find("/certificates/"), None);
        assert_eq!(find("/certificates/a/b"), None);
        assert_eq!(find("/certificates/%ff"), None);
    }
}
