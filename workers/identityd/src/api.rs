//! identityd's HTTP API (spec identityd.md §2, §4, §5): the route table, the caller classes
//! and the authorisation matrix, and the mapping of errors to the wire (§2.1).
//!
//! Order per request, as upstream: the body is decoded by the framework (400/415/422), then the
//! caller is authenticated and the operation authorised (401), then `type` and the other
//! parameters are validated (400).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use aziot_ipc::server::{match_route, Service};
use aziot_ipc::{ApiError, Request, Response};
use hyper::{Method, StatusCode};
use serde::Deserialize;
use serde_json::Value;

use crate::config::{Caller, IdType, LocalIdAttributes, LocalIdOpts};
use crate::identity::{Core, IdentityError};

/// Accepted api-versions (§2).
pub const API_VERSIONS: &[&str] = &["2020-09-01", "2021-12-01", "2022-08-01"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Identity,
    Provisioning,
    Device,
    Reprovision,
    Modules,
    Module,
    TrustBundle,
}

/// Pattern, route, lowest api-version serving it (versions compare as ISO dates).
const ROUTES: &[(&str, Route, &str)] = &[
    ("/identities/identity", Route::Identity, "2020-09-01"),
    ("/identities/provisioning", Route::Provisioning, "2021-12-01"),
    ("/identities/device", Route::Device, "2020-09-01"),
    ("/identities/device/reprovision", Route::Reprovision, "2020-09-01"),
    ("/identities/modules", Route::Modules, "2020-09-01"),
    ("/identities/modules/{}", Route::Module, "2020-09-01"),
    ("/trust-bundle", Route::TrustBundle, "2020-09-01"),
];

/// The operations of §4.2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Operation<'a> {
    GetDevice,
    GetModule(&'a str),
    /// GetAllHubModules, CreateModule, UpdateModule, DeleteModule, ReprovisionDevice.
    Administer,
    GetTrustBundle,
}

/// The authorisation matrix (§4.2).
fn allowed(caller: &Caller, op: Operation<'_>) -> bool {
    match (caller, op) {
        (_, Operation::GetTrustBundle) => true,
        (Caller::LocalRoot | Caller::Daemon, _) => true,
        (Caller::Unknown, _) => false,
        (Caller::HostProcess(p), Operation::GetDevice) => p.has(IdType::Device),
        (Caller::HostProcess(p), Operation::GetModule(m)) => {
            p.name == m && (p.has(IdType::Module) || p.has(IdType::Local))
        }
        (Caller::HostProcess(_), Operation::Administer) => false,
    }
}

fn to_api(e: IdentityError) -> ApiError {
    let message = e.message();
    match &e {
        IdentityError::Internal(detail) => tracing::error!("!!! {detail}"),
        _ => {
            for line in message.lines() {
                tracing::info!("!!! {line}");
            }
        }
    }
    ApiError::new(e.status(), message)
}

/// The first `name=` parameter of a query string, percent-decoded.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    for pair in query?.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == name {
            return Some(aziot_ipc::endpoint::percent_decode(&v.replace('+', " ")).unwrap_or_else(|| v.to_owned()));
        }
    }
    None
}

/// `type` of E4/E6/E7/E8: missing or invalid → 400.
fn id_type(query: Option<&str>) -> Result<String, IdentityError> {
    match query_param(query, "type") {
        None => Err(IdentityError::InvalidParameter("type", "missing parameter".into())),
        Some(t) if t == "aziot" || t == "local" => Ok(t),
        Some(t) => Err(IdentityError::InvalidParameter("type", format!("invalid type: {t}"))),
    }
}

fn only_aziot(t: &str) -> Result<(), IdentityError> {
    if t == "aziot" {
        Ok(())
    } else {
        Err(IdentityError::InvalidParameter("type", format!("invalid type: {t}")))
    }
}

#[derive(Deserialize)]
struct TypeBody {
    #[serde(rename = "type")]
    _type: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateBody {
    #[serde(rename = "type")]
    id_type: String,
    module_id: String,
    #[serde(default)]
    local_id_opts: Option<Value>,
}

/// The identity service.
pub struct Api {
    core: Arc<Core>,
    /// Startup provisioning and reconciliation finished (§7: device and module calls wait).
    ready: AtomicBool,
    ready_tx: tokio::sync::watch::Sender<bool>,
}

impl Api {
    pub fn new(core: Arc<Core>) -> Api {
        let (ready_tx, _) = tokio::sync::watch::channel(false);
        Api { core, ready: AtomicBool::new(false), ready_tx }
    }

    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Startup is over: device and module calls are answered from now on.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
        self.ready_tx.send_replace(true);
    }

    async fn wait_ready(&self) {
        if self.ready.load(Ordering::Acquire) {
            return;
        }
        let mut rx = self.ready_tx.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    fn authorize(&self, uid: u32, op: Operation<'_>) -> Result<Caller, IdentityError> {
        let caller = self.core.settings().callers.class(uid);
        if allowed(&caller, op) {
            Ok(caller)
        } else {
            Err(IdentityError::Authorization)
        }
    }

    async fn route(self: Arc<Self>, mut req: Request) -> Result<Response, Failure> {
        let Some((route, caps)) = ROUTES.iter().find_map(|(pattern, route, min)| {
            (req.api_version >= *min).then(|| match_route(pattern, &req.path).map(|c| (*route, c))).flatten()
        }) else {
            return Err(Failure::Rejected(ApiError::not_found()));
        };
        let query = req.query.clone();
        let query = query.as_deref();
        let uid = req.uid;
        let ok = |v: Value| Ok(Response::json(StatusCode::OK, &v));
        match (route, req.method.clone()) {
            (Route::TrustBundle, Method::GET) => {
                self.authorize(uid, Operation::GetTrustBundle)?;
                ok(serde_json::json!({"certificate": ""}))
            }
            (Route::Provisioning, Method::GET) => ok(self.core.provisioning_info()),
            (Route::Identity, Method::GET) => {
                let caller = self.core.settings().callers.class(uid);
                self.wait_ready().await;
                if allowed(&caller, Operation::GetDevice) {
                    return ok(self.core.device_identity().await?);
                }
                match &caller {
                    Caller::HostProcess(p) if allowed(&caller, Operation::GetModule(&p.name)) => {
                        ok(self.core.module_identity(&p.name).await?)
                    }
                    _ => Err(IdentityError::Authorization.into()),
                }
            }
            (Route::Device, Method::POST) => {
                let _: TypeBody = req.required_json().await.map_err(Rejected)?;
                self.authorize(uid, Operation::GetDevice)?;
                self.wait_ready().await;
                ok(self.core.device_identity().await?)
            }
            (Route::Reprovision, Method::POST) => {
                let _: Option<serde::de::IgnoredAny> = req.json().await.map_err(Rejected)?;
                self.authorize(uid, Operation::Administer)?;
                self.wait_ready().await;
                self.core.reprovision().await?;
                Ok(Response::no_content())
            }
            (Route::Modules, Method::GET) => {
                self.authorize(uid, Operation::Administer)?;
                only_aziot(&id_type(query)?)?;
                self.wait_ready().await;
                ok(self.core.module_identities().await?)
            }
            (Route::Modules, Method::POST) => {
                let body: CreateBody = req.required_json().await.map_err(Rejected)?;
                self.authorize(uid, Operation::Administer)?;
                match body.id_type.as_str() {
                    "aziot" => {
                        self.wait_ready().await;
                        ok(self.core.create_module(&body.module_id).await?)
                    }
                    "local" => {
                        if self.core.local_principal(&body.module_id).is_some() {
                            return Err(IdentityError::InvalidParameter(
                                "moduleId",
                                format!("local identity for {} already exists", body.module_id),
                            )
                            .into());
                        }
                        // A malformed localIdOpts is ignored (§5 E5 quirk): a client cert.
                        let attributes = body
                            .local_id_opts
                            .and_then(|v| serde_json::from_value::<LocalIdOpts>(v).ok())
                            .map_or(LocalIdAttributes::Client, |o| o.attributes());
                        ok(self.core.local_identity(&body.module_id, attributes).await?)
                    }
                    other => Err(IdentityError::InvalidParameter("type", format!("invalid type: {other}")).into()),
                }
            }
            (Route::Module, Method::GET) => {
                let id = caps[0].as_str();
                self.authorize(uid, Operation::GetModule(id))?;
                match id_type(query)?.as_str() {
                    "aziot" => {
                        self.wait_ready().await;
                        ok(self.core.module_identity(id).await?)
                    }
                    _ => {
                        let Some(p) = self.core.local_principal(id) else {
                            return Err(IdentityError::InvalidParameter(
                                "moduleId",
                                format!("local identity for {id} doesn't exist"),
                            )
                            .into());
                        };
                        let attributes = p.localid.map_or(LocalIdAttributes::Client, |o| o.attributes());
                        ok(self.core.local_identity(id, attributes).await?)
                    }
                }
            }
            (Route::Module, Method::PUT) => {
                let _: serde::de::IgnoredAny = req.put_json().await.map_err(Rejected)?;
                self.authorize(uid, Operation::Administer)?;
                only_aziot(&id_type(query)?)?;
                self.wait_ready().await;
                ok(self.core.update_module(&caps[0]).await?)
            }
            (Route::Module, Method::DELETE) => {
                let _: Option<serde::de::IgnoredAny> = req.json().await.map_err(Rejected)?;
                self.authorize(uid, Operation::Administer)?;
                only_aziot(&id_type(query)?)?;
                self.wait_ready().await;
                self.core.delete_module(&caps[0]).await?;
                Ok(Response::no_content())
            }
            _ => Err(Failure::Rejected(req.unsupported_method().await)),
        }
    }
}

/// A framework error (body decoding, method), answered as is.
struct Rejected(ApiError);

/// Why a request failed: the framework's answer, or identityd's error (§2.1).
enum Failure {
    Rejected(ApiError),
    Identity(IdentityError),
}

impl From<Rejected> for Failure {
    fn from(r: Rejected) -> Self {
        Failure::Rejected(r.0)
    }
}

impl From<IdentityError> for Failure {
    fn from(e: IdentityError) -> Self {
        Failure::Identity(e)
    }
}

impl Service for Api {
    fn api_versions(&self) -> &'static [&'static str] {
        API_VERSIONS
    }

    async fn handle(self: Arc<Self>, req: Request) -> Result<Response, ApiError> {
        match self.route(req).await {
            Ok(r) => Ok(r),
            Err(Failure::Rejected(e)) => Err(e),
            Err(Failure::Identity(e)) => Err(to_api(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Principal;

    fn hp(name: &str, idtype: &[IdType]) -> Caller {
        Caller::HostProcess(Principal { uid: 1, name: name.into(), idtype: Some(idtype.to_vec()), localid: None })
    }

    #[test]
    fn authorisation_matrix() {
        use Operation::*;
        for c in [Caller::LocalRoot, Caller::Daemon] {
            for op in [GetDevice, GetModule("x"), Administer, GetTrustBundle] {
                assert!(allowed(&c, op), "{c:?} {op:?}");
            }
        }
        for op in [GetDevice, GetModule("x"), Administer] {
            assert!(!allowed(&Caller::Unknown, op));
        }
        assert!(allowed(&Caller::Unknown, GetTrustBundle));
        assert!(allowed(&hp("m", &[IdType::Device]), GetDevice));
        assert!(!allowed(&hp("m", &[IdType::Module]), GetDevice));
        assert!(allowed(&hp("m", &[IdType::Module]), GetModule("m")));
        assert!(allowed(&hp("m", &[IdType::Local]), GetModule("m")));
        assert!(!allowed(&hp("m", &[IdType::Module]), GetModule("other")));
        assert!(!allowed(&hp("m", &[IdType::Device]), GetModule("m")));
        assert!(!allowed(&hp("m", &[IdType::Device, IdType::Module, IdType::Local]), Administer));
        assert!(!allowed(&hp("m", &[]), GetDevice) && !allowed(&hp("m", &[]), GetModule("m")));
        assert!(allowed(&hp("m", &[]), GetTrustBundle));
    }

    #[test]
    fn type_parameter() {
        assert_eq!(id_type(Some("api-version=x&type=aziot")).unwrap(), "aziot");
        assert_eq!(id_type(Some("type=local&type=aziot")).unwrap(), "local", "the first one counts");
        assert_eq!(
            id_type(None).unwrap_err().message(),
            "parameter \"type\" has an invalid value\ncaused by: missing parameter"
        );
        assert_eq!(
            id_type(Some("type=x")).unwrap_err().message(),
            "parameter \"type\" has an invalid value\ncaused by: invalid type: x"
        );
    }

    #[test]
    fn routes_by_version() {
        let find = |v: &str, p: &str| {
            ROUTES.iter().find_map(|(pat, r, min)| (v >= *min).then(|| match_route(pat, p).map(|_| *r)).flatten())
        };
        assert_eq!(find("2020-09-01", "/identities/provisioning"), None);
        assert_eq!(find("2021-12-01", "/identities/provisioning"), Some(Route::Provisioning));
        assert_eq!(find("2020-09-01", "/identities/modules/a%2Fb"), Some(Route::Module));
        assert_eq!(find("2020-09-01", "/identities/modules/%ff"), None);
        assert_eq!(find("2022-08-01", "/identities/device/reprovision"), Some(Route::Reprovision));
    }
}
