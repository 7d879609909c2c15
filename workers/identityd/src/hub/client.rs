//! The IoT Hub module REST client (cloud-protocols.md §4) on the blocking [`transport`]: the
//! retry / throttling loop of §1.5, response handling of §1.3, lenient module parsing of §4.3,
//! error classification of §4.5.
//!
//! No lock is held across cloud I/O: the client is immutable after construction; each call owns
//! its attempt. SAS tokens are built per attempt (cloud-protocols.md §2.4 Recommendation).
//!
//! Deliberate differences from the original (reported in docs/compatibility.md by identityd):
//! * a 429 carrying `Retry-After: <seconds>` waits that long (at most [`Tuning::max_retry_after`])
//!   instead of the fixed back-off; without it, the §1.5 table `B[n]` applies unchanged;
//! * a fresh SAS token for every attempt (never an expired one on a retry);
//! * `authentication.type` may be any string (§4.3 Recommendation).

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use openssl::ssl::SslConnector;
use serde::{Deserialize, Serialize};

use super::transport::{self, Authority, ClientCert, Proxy, TransportError};
use super::{
    sas, BoxFuture, DeviceAuth, HubClient, HubDevice, HubError, HubErrorKind, HubSettings, Module, ModuleKeys,
    API_VERSION,
};

/// Throttled attempts allowed per request (§1.5 step 3: a 429 on attempt 5 is final).
pub const MAX_ATTEMPTS_THROTTLED: u32 = 5;

/// The retry schedule. [`Tuning::default`] is cloud-protocols.md §1.5 exactly; tests shorten it
/// (the Recommendation there: make the back-off table injectable).
#[derive(Clone, Debug)]
pub struct Tuning {
    /// `B[n]` base for n = 1..4.
    pub backoff: [Duration; 4],
    /// `B[n]` jitter bound: `U(0, jitter[n])` is added.
    pub jitter: [Duration; 4],
    /// The pause before retrying a failed (not throttled) attempt.
    pub failure_delay: Duration,
    /// The longest `Retry-After` honoured.
    pub max_retry_after: Duration,
    /// SAS token lifetime in seconds (§2.1: 30).
    pub sas_lifetime_secs: u64,
}

impl Default for Tuning {
    fn default() -> Tuning {
        let s = Duration::from_secs;
        Tuning {
            backoff: [s(60), s(120), s(180), s(300)],
            jitter: [s(10), s(20), s(30), s(30)],
            failure_delay: s(3),
            max_retry_after: s(330),
            sas_lifetime_secs: sas::LIFETIME_SECS,
        }
    }
}

/// The IoT Hub client.
pub struct Client {
    connector: Arc<SslConnector>,
    proxy: Option<Proxy>,
    timeout: Duration,
    retries: u32,
    tuning: Tuning,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("proxy", &self.proxy)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .finish()
    }
}

/// The error body of §4.5.
#[derive(Deserialize)]
struct ErrorBody {
    #[serde(rename = "Message", alias = "errorMessage")]
    message: String,
    #[serde(rename = "networkError", default)]
    network_error: Option<bool>,
}

/// The hub's module object, parsed leniently (§4.3).
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireModule {
    module_id: String,
    device_id: String,
    #[serde(default)]
    managed_by: Option<String>,
    #[serde(default)]
    generation_id: Option<String>,
    #[serde(default)]
    authentication: Option<serde_json::Value>,
}

impl WireModule {
    /// §4.3: non-null symmetric keys must be standard base64; `type` may be any string
    /// (Recommendation); other shapes under `authentication` are ignored.
    fn into_module(self) -> Result<Module, String> {
        if let Some(auth) = self.authentication.as_ref().filter(|a| !a.is_null()) {
            let auth = auth.as_object().ok_or("module authentication is not an object")?;
            if let Some(t) = auth.get("type").filter(|t| !t.is_null()) {
                t.as_str().ok_or("module authentication type is not a string")?;
            }
            if let Some(sym) = auth.get("symmetricKey").filter(|s| !s.is_null()) {
                let sym = sym.as_object().ok_or("symmetricKey is not an object")?;
                for name in ["primaryKey", "secondaryKey"] {
                    match sym.get(name) {
                        None | Some(serde_json::Value::Null) => {}
                        Some(serde_json::Value::String(k)) => {
                            base64::engine::general_purpose::STANDARD
                                .decode(k)
                                .map_err(|e| format!("symmetricKey.{name} is not base64: {e}"))?;
                        }
                        Some(_) => return Err(format!("symmetricKey.{name} is not a string")),
                    }
                }
            }
        }
        Ok(Module {
            module_id: self.module_id,
            device_id: self.device_id,
            managed_by: self.managed_by,
            generation_id: self.generation_id,
        })
    }
}

/// Request body of create (no `authentication`) and update (§4.2): compact, in this field order.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ModuleBody<'a> {
    module_id: &'a str,
    device_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    authentication: Option<AuthBody<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct AuthBody<'a> {
    symmetric_key: SymKeyBody<'a>,
    #[serde(rename = "type")]
    kind: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SymKeyBody<'a> {
    primary_key: &'a str,
    secondary_key: &'a str,
}

/// One call's shape.
struct Call {
    method: &'static str,
    path_and_query: String,
    if_match: bool,
    body: Option<Vec<u8>>,
    read_body: bool,
}

fn uniform(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    let mut b = [0u8; 8];
    if openssl::rand::rand_bytes(&mut b).is_err() {
        return Duration::ZERO;
    }
    let frac = (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64;
    max.mul_f64(frac)
}

/// `Retry-After` in delta-seconds (an HTTP-date is not honoured: the table applies).
fn retry_after(r: &transport::Response) -> Option<Duration> {
    r.header("retry-after")?.trim().parse::<u64>().ok().map(Duration::from_secs)
}

impl Client {
    /// A client with [`Tuning::default`]. Builds the TLS settings now (the trust store is read
    /// before the sandbox locks in).
    pub fn new(settings: &HubSettings) -> Result<Client, HubError> {
        Client::with_tuning(settings, Tuning::default())
    }

    pub fn with_tuning(settings: &HubSettings, tuning: Tuning) -> Result<Client, HubError> {
        let connector = transport::connector()
            .map_err(|e| HubError::new(HubErrorKind::Other, None, format!("could not set up TLS: {e}")))?;
        let proxy = match &settings.proxy {
            Some(uri) => Some(Proxy::parse(uri).map_err(|e| HubError::new(HubErrorKind::Other, None, e))?),
            None => None,
        };
        Ok(Client {
            connector: Arc::new(connector),
            proxy,
            timeout: settings.timeout,
            retries: settings.retries,
            tuning,
        })
    }

    /// The proxy in use (password masked), for the start-up log.
    pub fn proxy_display(&self) -> Option<&str> {
        self.proxy.as_ref().map(|p| p.display.as_str())
    }

    fn throttle_delay(&self, n: u32, response: &transport::Response) -> Duration {
        if let Some(d) = retry_after(response) {
            return d.min(self.tuning.max_retry_after);
        }
        let i = (n as usize).clamp(1, 4) - 1;
        self.tuning.backoff[i] + uniform(self.tuning.jitter[i])
    }

    /// §1.5: attempts until a non-429 response, a final 429, or a final failure.
    async fn send(&self, device: &HubDevice, call: Call) -> Result<transport::Response, HubError> {
        let target =
            Authority::parse(&device.gateway_host, 443).map_err(|e| HubError::new(HubErrorKind::Other, None, e))?;
        let cert = match &device.auth {
            DeviceAuth::X509 { chain, key } => Some(ClientCert { chain: chain.clone(), key: key.clone() }),
            DeviceAuth::Sas(_) => None,
        };
        let audience = sas::hub_audience(&device.hub_name, &device.device_id);
        let mut n: u32 = 1;
        loop {
            let mut headers = Vec::new();
            if let DeviceAuth::Sas(signer) = &device.auth {
                // A new token for this attempt: never one that expired during a back-off.
                let token =
                    sas::header(signer.as_ref(), &audience, sas::now_unix(), self.tuning.sas_lifetime_secs, None)
                        .await
                        .map_err(|e| HubError::new(HubErrorKind::Other, None, e.to_string()))?;
                headers.push(("Authorization", token));
            }
            if call.if_match {
                headers.push(("If-Match", "*".to_owned()));
            }
            let request = transport::Request {
                method: call.method,
                path_and_query: call.path_and_query.clone(),
                headers,
                body: call.body.clone(),
                read_body: call.read_body,
            };
            let deadline = Instant::now() + self.timeout;
            let (connector, proxy, target, cert) =
                (self.connector.clone(), self.proxy.clone(), target.clone(), cert.clone());
            let attempt = tokio::task::spawn_blocking(move || {
                transport::exchange(&connector, proxy.as_ref(), &target, cert.as_ref(), &request, deadline)
            });
            // The blocking exchange ends by `deadline` on its own; this bound is a second guard.
            let result = match tokio::time::timeout(self.timeout + Duration::from_secs(1), attempt).await {
                Err(_) => Err(TransportError::TimedOut),
                Ok(Err(join)) => Err(TransportError::Io(format!("the request task failed: {join}"))),
                Ok(Ok(r)) => r,
            };
            match result {
                Ok(response) if response.status == 429 => {
                    if n >= MAX_ATTEMPTS_THROTTLED {
                        tracing::warn!("Final HTTP request throttled (attempt {n} of {MAX_ATTEMPTS_THROTTLED}).");
                        return Err(HubError::new(HubErrorKind::Throttled, Some(429), "429: Too many requests"));
                    }
                    let delay = self.throttle_delay(n, &response);
                    tracing::warn!(
                        "HTTP request throttled (attempt {n} of {MAX_ATTEMPTS_THROTTLED}). Sleeping for {} seconds.",
                        delay.as_secs_f64()
                    );
                    tokio::time::sleep(delay).await;
                }
                Ok(response) => return Ok(response),
                Err(e) => {
                    tracing::warn!("Failed to send HTTP request (attempt {n} of {}): {e}", self.retries + 1);
                    if n > self.retries {
                        let kind = match e {
                            TransportError::TimedOut => HubErrorKind::TimedOut,
                            TransportError::Connect(_) => HubErrorKind::NotConnected,
                            TransportError::Malformed(_) => HubErrorKind::InvalidData,
                            TransportError::Io(_) => HubErrorKind::Other,
                        };
                        return Err(HubError::new(kind, None, e.to_string()));
                    }
                    tokio::time::sleep(self.tuning.failure_delay).await;
                }
            }
            n += 1;
        }
    }

    fn module_path(device: &HubDevice, module_id: Option<&str>) -> String {
        let d = sas::percent_encode(&device.device_id);
        match module_id {
            Some(m) => format!("/devices/{d}/modules/{}?api-version={API_VERSION}", sas::percent_encode(m)),
            None => format!("/devices/{d}/modules?api-version={API_VERSION}"),
        }
    }

    async fn json_call<T: serde::de::DeserializeOwned>(
        &self,
        device: &HubDevice,
        call: Call,
        expected: &[u16],
    ) -> Result<T, HubError> {
        let response = self.send(device, call).await?;
        parse_response(&response, expected)
    }
}

/// §1.3 for a JSON call.
fn parse_response<T: serde::de::DeserializeOwned>(r: &transport::Response, expected: &[u16]) -> Result<T, HubError> {
    let status = Some(r.status);
    if let Some(ct) = r.header("content-type") {
        if !ct.to_ascii_lowercase().contains("application/json") {
            return Err(HubError::new(HubErrorKind::InvalidData, status, "invalid Content-Type; expected JSON"));
        }
    }
    if expected.contains(&r.status) {
        return serde_json::from_slice(&r.body).map_err(|e| {
            HubError::new(HubErrorKind::InvalidData, status, format!("could not parse the hub's response: {e}"))
        });
    }
    if (400..600).contains(&r.status) {
        if r.body.is_empty() {
            return Err(HubError::new(HubErrorKind::Other, status, format!("HTTP error {} {}", r.status, r.reason)));
        }
        let body: ErrorBody = serde_json::from_slice(&r.body).map_err(|e| {
            HubError::new(
                HubErrorKind::InvalidData,
                status,
                format!("HTTP error {} {}; could not parse the error body: {e}", r.status, r.reason),
            )
        })?;
        // §4.5: a parsed 500 (a gateway that cannot reach the hub) and networkError are network.
        let kind = if r.status == 500 || body.network_error == Some(true) {
            HubErrorKind::NotConnected
        } else {
            HubErrorKind::Other
        };
        return Err(HubError::new(kind, status, body.message));
    }
    let codes: Vec<String> = expected.iter().map(u16::to_string).collect();
    Err(HubError::new(
        HubErrorKind::Other,
        status,
        format!("Expected one of [{}], got {} {}", codes.join(", "), r.status, r.reason),
    ))
}

/// Fuzzing entry (fuzz/fuzz_targets/iot_responses.rs): one hub answer through the checks of
/// the module calls: a list (`list_modules`) when the body starts with `[`, else one module.
#[doc(hidden)]
pub fn classify_for_fuzzing(r: &transport::Response) -> Result<Vec<Module>, HubError> {
    if r.body.first() == Some(&b'[') {
        let wire: Vec<WireModule> = parse_response(r, &[200])?;
        wire.into_iter().map(module_from).collect()
    } else {
        let wire: WireModule = parse_response(r, &[200, 201])?;
        Ok(vec![module_from(wire)?])
    }
}

fn module_from(wire: WireModule) -> Result<Module, HubError> {
    wire.into_module().map_err(|e| {
        HubError::new(HubErrorKind::InvalidData, Some(200), format!("could not parse the hub's module: {e}"))
    })
}

impl HubClient for Client {
    fn list_modules<'a>(&'a self, device: &'a HubDevice) -> BoxFuture<'a, Result<Vec<Module>, HubError>> {
        Box::pin(async move {
            let call = Call {
                method: "GET",
                path_and_query: Self::module_path(device, None),
                if_match: false,
                body: None,
                read_body: true,
            };
            let wire: Vec<WireModule> = self.json_call(device, call, &[200]).await?;
            wire.into_iter().map(module_from).collect()
        })
    }

    fn get_module<'a>(&'a self, device: &'a HubDevice, module_id: &'a str) -> BoxFuture<'a, Result<Module, HubError>> {
        Box::pin(async move {
            let call = Call {
                method: "GET",
                path_and_query: Self::module_path(device, Some(module_id)),
                if_match: false,
                body: None,
                read_body: true,
            };
            module_from(self.json_call(device, call, &[200]).await?)
        })
    }

    fn create_module<'a>(
        &'a self,
        device: &'a HubDevice,
        module_id: &'a str,
    ) -> BoxFuture<'a, Result<Module, HubError>> {
        Box::pin(async move {
            let body = ModuleBody { module_id, device_id: &device.device_id, authentication: None };
            let call = Call {
                method: "PUT",
                path_and_query: Self::module_path(device, Some(module_id)),
                if_match: false,
                body: Some(serde_json::to_vec(&body).expect("module body serializes")),
                read_body: true,
            };
            module_from(self.json_call(device, call, &[200]).await?)
        })
    }

    fn update_module<'a>(
        &'a self,
        device: &'a HubDevice,
        module_id: &'a str,
        keys: &'a ModuleKeys,
    ) -> BoxFuture<'a, Result<Module, HubError>> {
        Box::pin(async move {
            let body = ModuleBody {
                module_id,
                device_id: &device.device_id,
                authentication: Some(AuthBody {
                    symmetric_key: SymKeyBody { primary_key: &keys.primary, secondary_key: &keys.secondary },
                    kind: "sas",
                }),
            };
            let call = Call {
                method: "PUT",
                path_and_query: Self::module_path(device, Some(module_id)),
                if_match: true,
                body: Some(serde_json::to_vec(&body).expect("module body serializes")),
                read_body: true,
            };
            module_from(self.json_call(device, call, &[200]).await?)
        })
    }

    fn delete_module<'a>(&'a self, device: &'a HubDevice, module_id: &'a str) -> BoxFuture<'a, Result<(), HubError>> {
        Box::pin(async move {
            let call = Call {
                method: "DELETE",
                path_and_query: Self::module_path(device, Some(module_id)),
                if_match: true,
                body: None,
                read_body: false,
            };
            let response = self.send(device, call).await?;
            // §4.2: exactly 204; the body is not read.
            if response.status == 204 {
                Ok(())
            } else {
                Err(HubError::new(
                    HubErrorKind::Other,
                    Some(response.status),
                    format!("unexpected HTTP status code: {}", response.status),
                ))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16, ct: Option<&str>, body: &str) -> transport::Response {
        transport::Response {
            status,
            reason: transport_reason(status).into(),
            headers: ct.map(|c| vec![("content-type".to_owned(), c.to_owned())]).unwrap_or_default(),
            body: body.as_bytes().to_vec(),
        }
    }

    fn transport_reason(s: u16) -> &'static str {
        match s {
            200 => "OK",
            404 => "Not Found",
            500 => "Internal Server Error",
            _ => "X",
        }
    }

    fn module(r: &transport::Response) -> Result<Module, HubError> {
        parse_response::<WireModule>(r, &[200]).and_then(module_from)
    }

    /// §4.3: unknown fields ignored; any auth type accepted (Recommendation); keys must be base64.
    #[test]
    fn lenient_module_parsing() {
        let body = r#"{"moduleId":"m","deviceId":"d","generationId":"1","etag":"e","connectionState":"x",
            "authentication":{"symmetricKey":{"primaryKey":null,"secondaryKey":null},
            "x509Thumbprint":{"primaryThumbprint":"AB"},"type":"selfSigned"}}"#;
        let m = module(&resp(200, Some("application/json; charset=utf-8"), body)).expect("parses");
        assert_eq!(
            m,
            Module { module_id: "m".into(), device_id: "d".into(), managed_by: None, generation_id: Some("1".into()) }
        );
        let m =
            module(&resp(200, None, r#"{"moduleId":"m","deviceId":"d","authentication":null,"managedBy":"iotedge"}"#))
                .expect("parses");
        assert_eq!(m.managed_by.as_deref(), Some("iotedge"));
        let e = module(&resp(
            200,
            None,
            r#"{"moduleId":"m","deviceId":"d","authentication":{"symmetricKey":{"primaryKey":"!!"}}}"#,
        ))
        .expect_err("bad base64");
        assert_eq!(e.kind, HubErrorKind::InvalidData);
        assert_eq!(
            module(&resp(200, None, r#"{"deviceId":"d"}"#)).expect_err("no moduleId").kind,
            HubErrorKind::InvalidData
        );
    }

    /// §1.3 / §4.5 classification.
    #[test]
    fn response_classification() {
        let e = module(&resp(200, Some("text/html"), "{}")).expect_err("content type");
        assert_eq!((e.kind, e.message.as_str()), (HubErrorKind::InvalidData, "invalid Content-Type; expected JSON"));
        let e = module(&resp(404, None, "")).expect_err("404");
        assert_eq!(
            (e.kind, e.status, e.message.as_str()),
            (HubErrorKind::Other, Some(404), "HTTP error 404 Not Found")
        );
        assert!(e.is_not_found() && !e.is_network());
        let e = module(&resp(
            401,
            Some("application/json"),
            r#"{"Message":"ErrorCode:IotHubUnauthorizedAccess;Unauthorized","ExceptionMessage":"t"}"#,
        ))
        .expect_err("401");
        assert_eq!(
            (e.kind, e.message.as_str()),
            (HubErrorKind::Other, "ErrorCode:IotHubUnauthorizedAccess;Unauthorized")
        );
        let e = module(&resp(500, None, r#"{"Message":"upstream down"}"#)).expect_err("500");
        assert!(e.is_network(), "a parsed 500 is network: {e:?}");
        let e = module(&resp(500, None, "oops")).expect_err("500 text");
        assert_eq!(e.kind, HubErrorKind::InvalidData);
        let e = module(&resp(503, None, r#"{"errorMessage":"x","networkError":true}"#)).expect_err("503");
        assert!(e.is_network());
        let e = module(&resp(202, None, "{}")).expect_err("202");
        assert_eq!(e.message, "Expected one of [200], got 202 X");
    }

    /// §4.2 bodies, compact, field order as in the spec.
    #[test]
    fn request_bodies() {
        let create = ModuleBody { module_id: "m", device_id: "d", authentication: None };
        assert_eq!(serde_json::to_string(&create).expect("json"), r#"{"moduleId":"m","deviceId":"d"}"#);
        let update = ModuleBody {
            module_id: "m",
            device_id: "d",
            authentication: Some(AuthBody {
                symmetric_key: SymKeyBody { primary_key: "cA==", secondary_key: "cw==" },
                kind: "sas",
            }),
        };
        assert_eq!(
            serde_json::to_string(&update).expect("json"),
            r#"{"moduleId":"m","deviceId":"d","authentication":{"symmetricKey":{"primaryKey":"cA==","secondaryKey":"cw=="},"type":"sas"}}"#
        );
    }

    fn ec_key() -> openssl::pkey::PKey<openssl::pkey::Private> {
        let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).expect("group");
        openssl::pkey::PKey::from_ec_key(openssl::ec::EcKey::generate(&group).expect("key")).expect("pkey")
    }

    #[test]
    fn module_paths_encode_ids() {
        let device = HubDevice {
            hub_name: "h".into(),
            gateway_host: "h".into(),
            device_id: "dev 1".into(),
            auth: DeviceAuth::X509 { chain: Vec::new(), key: ec_key() },
        };
        assert_eq!(Client::module_path(&device, None), "/devices/dev%201/modules?api-version=2017-11-08-preview");
        assert_eq!(
            Client::module_path(&device, Some("$edge/a=b")),
            "/devices/dev%201/modules/$edge/a%3Db?api-version=2017-11-08-preview"
        );
    }
}
