//! The seam between identityd and its IoT Hub client (spec identityd.md §8, §12;
//! cloud-protocols.md §4).
//!
//! identityd owns this trait and its types; the HTTPS client of this directory implements
//! [`HubClient`] ([`client::Client`] on the blocking [`transport`]: SAS and X.509 device auth,
//! retries, 429 back-off, timeouts, the proxy: cloud-protocols.md §1, §2, §4), and [`client`]
//! builds it once at start. The proxy comes from the broker (workers/identityd/src/lib.rs
//! `BROKER_TABLE`), never from the worker's environment. `identity::Core` still takes an
//! `Option`: `None` (no client, as in unit tests) makes every hub-backed endpoint answer 503
//! `IoT Hub client unavailable`.
//!
//! Rules for an implementation:
//! * no lock is held across cloud I/O (several calls may be in flight at once);
//! * a SAS token is built per attempt through [`DeviceAuth::Sas`]'s signer (the device key never
//!   leaves keyd); the audience host is [`HubDevice::hub_name`], requests go to
//!   [`HubDevice::gateway_host`];
//! * unknown module `authentication.type` values are accepted (cloud-protocols.md §4.3);
//! * errors carry their [`HubErrorKind`]: identityd's offline behaviour (§11.3) and the module
//!   cache purge on a hub 404 (§8.3 Recommendation) are decided from it.

pub mod client;
pub mod sas;
pub mod transport;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openssl::pkey::{PKey, Private};
use openssl::x509::X509;
use serde::{Deserialize, Serialize};

/// A boxed `Send` future (the trait is used as `dyn`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The Hub module REST api-version (cloud-protocols.md §4.1).
pub const API_VERSION: &str = "2017-11-08-preview";

/// A hub module record as identityd keeps it: what the module cache files hold (spec §14:
/// the hub's module object without `authentication`). Clients parse the hub's object leniently
/// (unknown fields and auth types ignored) into this.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Module {
    pub module_id: String,
    pub device_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation_id: Option<String>,
}

/// The module keys identityd uploads (spec §8.1 step 4): standard padded base64.
#[derive(Clone, PartialEq, Eq)]
pub struct ModuleKeys {
    pub primary: String,
    pub secondary: String,
}

impl std::fmt::Debug for ModuleKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ModuleKeys(<redacted>)")
    }
}

/// Why a signature could not be made (keyd's error, as text).
#[derive(Debug, thiserror::Error)]
#[error("could not sign the SAS token: {0}")]
pub struct SignError(pub String);

/// Signs a SAS `string_to_sign` with the device key: HMAC-SHA256 made by keyd (`POST /sign`);
/// the raw 32-byte MAC is returned (the client base64-encodes it, cloud-protocols.md §2.1).
pub trait SasSigner: Send + Sync {
    fn sign<'a>(&'a self, data: &'a [u8]) -> BoxFuture<'a, Result<Vec<u8>, SignError>>;
}

/// How the device authenticates to the hub (cloud-protocols.md §4.4).
#[derive(Clone)]
pub enum DeviceAuth {
    /// `Authorization: SharedAccessSignature ...`, a fresh token per attempt.
    Sas(Arc<dyn SasSigner>),
    /// TLS client certificate: `chain[0]` is the leaf, the rest extra chain certificates; `key`
    /// is the engine's in-process twin of the keyd key pair (its private operations are blocking
    /// calls to keyd).
    X509 { chain: Vec<X509>, key: PKey<Private> },
}

impl std::fmt::Debug for DeviceAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceAuth::Sas(_) => f.write_str("Sas"),
            DeviceAuth::X509 { chain, .. } => write!(f, "X509({} certs)", chain.len()),
        }
    }
}

/// The device whose modules are managed.
#[derive(Clone, Debug)]
pub struct HubDevice {
    /// The hub host name (may carry `:port`): the SAS audience host.
    pub hub_name: String,
    /// Where requests go: `local_gateway_hostname`, else the hub (may carry `:port`).
    pub gateway_host: String,
    pub device_id: String,
    pub auth: DeviceAuth,
}

/// Client settings from identityd's config, fixed at start (spec §13: restart-only).
#[derive(Clone, Debug)]
pub struct HubSettings {
    /// `cloud_timeout_sec`: per attempt.
    pub timeout: Duration,
    /// `cloud_retries`: extra attempts after the first for non-429 failures.
    pub retries: u32,
    /// The proxy URI (`HTTPS_PROXY` / `https_proxy` of the unit, read and checked by the broker
    /// at start; it may carry a password: never log it, log [`transport::Proxy::display`]).
    pub proxy: Option<String>,
}

/// The error classes identityd acts on (cloud-protocols.md §1.5, §4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HubErrorKind {
    /// The attempt deadline passed (network).
    TimedOut,
    /// Connect, DNS or TLS failure; a hub 500 with a JSON error body; `networkError: true`
    /// (network).
    NotConnected,
    /// 429 on the last allowed attempt.
    Throttled,
    /// A response that does not parse.
    InvalidData,
    /// Anything else (an HTTP error status with a message, an unexpected status).
    Other,
}

/// A failed hub call: its kind, the HTTP status when the hub answered, and a message (the hub's
/// `Message`/`errorMessage`, or the transport error).
#[derive(Clone, Debug, thiserror::Error)]
#[error("{message}")]
pub struct HubError {
    pub kind: HubErrorKind,
    pub status: Option<u16>,
    pub message: String,
}

impl HubError {
    pub fn new(kind: HubErrorKind, status: Option<u16>, message: impl Into<String>) -> Self {
        HubError { kind, status, message: message.into() }
    }

    /// identityd.md §11.3: a network error lets reconciliation fall back to the offline backup.
    pub fn is_network(&self) -> bool {
        matches!(self.kind, HubErrorKind::TimedOut | HubErrorKind::NotConnected)
    }

    /// The hub answered 404 (the module does not exist; §8.3 Recommendation purges the cache).
    pub fn is_not_found(&self) -> bool {
        self.status == Some(404)
    }
}

/// The Hub module REST operations identityd uses (cloud-protocols.md §4.2), for one device.
pub trait HubClient: Send + Sync {
    /// `GET /devices/{d}/modules`: every module of the device, in hub order.
    fn list_modules<'a>(&'a self, device: &'a HubDevice) -> BoxFuture<'a, Result<Vec<Module>, HubError>>;

    /// `GET /devices/{d}/modules/{m}`.
    fn get_module<'a>(&'a self, device: &'a HubDevice, module_id: &'a str) -> BoxFuture<'a, Result<Module, HubError>>;

    /// `PUT /devices/{d}/modules/{m}` without `If-Match`, body `{"moduleId","deviceId"}`
    /// (creation; the answer carries the `generationId`).
    fn create_module<'a>(
        &'a self,
        device: &'a HubDevice,
        module_id: &'a str,
    ) -> BoxFuture<'a, Result<Module, HubError>>;

    /// `PUT /devices/{d}/modules/{m}` with `If-Match: *` and the SAS keys.
    fn update_module<'a>(
        &'a self,
        device: &'a HubDevice,
        module_id: &'a str,
        keys: &'a ModuleKeys,
    ) -> BoxFuture<'a, Result<Module, HubError>>;

    /// `DELETE /devices/{d}/modules/{m}` with `If-Match: *` (exactly 204).
    fn delete_module<'a>(&'a self, device: &'a HubDevice, module_id: &'a str) -> BoxFuture<'a, Result<(), HubError>>;
}

/// The IoT Hub client, built once at start, before the lock-in (the TLS settings and the trust
/// store are loaded now). Always `Some` in this build.
pub fn client(settings: &HubSettings) -> Result<Option<Arc<dyn HubClient>>, HubError> {
    Ok(Some(Arc::new(client::Client::new(settings)?)))
}
