//! A mock IoT Hub: the module identity REST API of cloud-protocols.md §4 / §7.4 in memory,
//! over real TLS with its own CA ([`crate::mock_tls`]).
//!
//! * Authenticates every request exactly (§7.0, §7.4): a SAS token is parsed from
//!   `Authorization: SharedAccessSignature ...`, its signature checked over `sr` **as received**
//!   with the device key, its expiry `se` must be in the future, its percent-decoded `sr` must
//!   equal `{hub_name}/devices/{device}` case-insensitively, and a device token carries no `skn`;
//!   or, for an X.509 device, the TLS client certificate must match a registered thumbprint
//!   (SHA-1 or SHA-256) or chain to a registered CA with subject CN = the device ID.
//! * Stores devices and their modules (hub order = creation order), with `generationId`s unique
//!   per creation and the keys the client uploads.
//! * A module's own call: `POST /devices/{d}/modules/{m}/messages/events` (a device-to-cloud
//!   message, 204) is authenticated with a module SAS (`sr` = `{hub_name}/devices/{d}/modules/{m}`)
//!   signed with the module's stored primary or secondary key, so a module can show that the
//!   token it built with the key handle identityd gave it works at the hub (scripts/demo).
//! * Test hooks: a queue of [`Fault`]s, one consumed per request (401, 404, 429 with or without
//!   `Retry-After`, 500 with a JSON `Message` or a text body, malformed JSON, a slow answer, a
//!   hang-up); every request is recorded ([`Recorded`]) with the outcome of its SAS check.
//!
//! [`HubState::handle`] answers one parsed request, so a DPS mock can serve the hub paths on its
//! own server (cloud-protocols.md §7.0: one port for both).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use openssl::hash::MessageDigest;
use openssl::stack::Stack;
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{X509StoreContext, X509};
use serde_json::json;

use crate::mock_tls::{thumbprint, Handler, MockServer, Request, Response, TestCa};

/// The only api-version served (cloud-protocols.md §4.1).
pub const API_VERSION: &str = "2017-11-08-preview";

/// How a device authenticates.
#[derive(Clone)]
pub enum DeviceCredential {
    /// SAS tokens signed with this key.
    Sas(Vec<u8>),
    /// A TLS client certificate whose SHA-1 or SHA-256 thumbprint (hex, any case) is this.
    Thumbprint(String),
    /// A TLS client certificate that chains to this CA, with subject CN = the device ID.
    Ca(X509),
}

/// A module as the mock stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredModule {
    pub module_id: String,
    pub device_id: String,
    pub generation_id: String,
    pub etag: String,
    pub managed_by: Option<String>,
    /// Base64 keys as uploaded (`None` until an update sets them).
    pub primary_key: Option<String>,
    pub secondary_key: Option<String>,
    /// `authentication.type` (`sas` unless set otherwise, e.g. `selfSigned`).
    pub auth_type: String,
}

impl StoredModule {
    /// The §7.4 `<module>` object.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "moduleId": self.module_id,
            "deviceId": self.device_id,
            "generationId": self.generation_id,
            "etag": self.etag,
            "managedBy": self.managed_by,
            "connectionState": "Disconnected",
            "authentication": {
                "symmetricKey": {"primaryKey": self.primary_key, "secondaryKey": self.secondary_key},
                "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null},
                "type": self.auth_type,
            },
        })
    }
}

/// A test hook, consumed by the next request (after it is recorded and authenticated, so
/// the token it carried is checked and recorded too).
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer this status with this JSON body (or an empty body) and extra headers.
    Status { status: u16, body: Option<serde_json::Value>, headers: Vec<(String, String)> },
    /// 200 `application/json` whose body is not JSON.
    MalformedJson,
    /// Process the request normally but answer only after this long.
    Slow(Duration),
    /// Close the connection without answering.
    HangUp,
}

impl Fault {
    /// 401 with the hub's unauthorised body.
    pub fn unauthorized() -> Fault {
        Fault::Status { status: 401, body: Some(unauthorized_body()), headers: Vec::new() }
    }
    /// 429, with `Retry-After: <secs>` when given.
    pub fn throttled(retry_after_secs: Option<u64>) -> Fault {
        Fault::Status {
            status: 429,
            body: Some(json!({"Message": "ErrorCode:ThrottlingException;Throttled", "ExceptionMessage": "mock"})),
            headers: retry_after_secs.map(|s| vec![("Retry-After".to_owned(), s.to_string())]).unwrap_or_default(),
        }
    }
    /// 500 with a JSON `Message` (network-class, cloud-protocols.md §4.5).
    pub fn server_error() -> Fault {
        Fault::Status { status: 500, body: Some(json!({"Message": "ErrorCode:ServerError;mock"})), headers: Vec::new() }
    }
    /// 404 `DeviceNotFound`.
    pub fn not_found() -> Fault {
        Fault::Status { status: 404, body: Some(json!({"Message": "ErrorCode:DeviceNotFound;mock"})), headers: Vec::new() }
    }
}

fn unauthorized_body() -> serde_json::Value {
    json!({"Message": "ErrorCode:IotHubUnauthorizedAccess;Unauthorized", "ExceptionMessage": "mock"})
}

/// The outcome of checking one SAS token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SasCheck {
    /// `sr` as received.
    pub sr: String,
    /// `se`.
    pub expiry: u64,
    /// `se` was not in the future when the request arrived.
    pub expired: bool,
    /// `Ok` when the token is accepted; else why not.
    pub verdict: Result<(), String>,
}

/// One request as the mock saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path and query as sent.
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The SAS check, when an `Authorization` header was present.
    pub sas: Option<SasCheck>,
    /// SHA-256 thumbprint of the client certificate, when one was presented.
    pub client_cert_sha256: Option<String>,
    /// The status answered (0 for a hang-up).
    pub status: u16,
    /// When it arrived.
    pub at: SystemTime,
    pub at_instant: Instant,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

struct Device {
    credential: DeviceCredential,
    modules: Vec<StoredModule>,
}

struct State {
    hub_name: String,
    devices: BTreeMap<String, Device>,
    faults: VecDeque<Fault>,
    requests: Vec<Recorded>,
    next_generation: u64,
    log: bool,
}

/// The hub's state and request logic (without a server).
pub struct HubState {
    state: Mutex<State>,
}

/// `%XX` decoding (invalid escapes are kept literally).
pub fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(hex, 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space).
pub fn form_decode(s: &str) -> Vec<u8> {
    percent_decode(&s.replace('+', " "))
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let pkey = openssl::pkey::PKey::hmac(key).expect("hmac key");
    let mut s = openssl::sign::Signer::new(MessageDigest::sha256(), &pkey).expect("signer");
    s.update(data).expect("update");
    s.sign_to_vec().expect("sign")
}

fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Verifies `Authorization` value `header` as cloud-protocols.md §7.0 says, for `audience` and
/// `key`; `skn` is the required `skn` (`Some("registration")` for DPS, `None`: must be absent).
pub fn verify_sas(header: &str, audience: &str, key: &[u8], skn: Option<&str>) -> SasCheck {
    let mut check = SasCheck { sr: String::new(), expiry: 0, expired: false, verdict: Ok(()) };
    let fail = |mut c: SasCheck, why: &str| {
        c.verdict = Err(why.to_owned());
        c
    };
    let Some(token) = header.strip_prefix("SharedAccessSignature ") else {
        return fail(check, "not a SharedAccessSignature");
    };
    let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
    for kv in token.split('&') {
        let Some((k, v)) = kv.split_once('=') else { return fail(check, "a token field without '='") };
        if fields.insert(k, v).is_some() {
            return fail(check, "a repeated token field");
        }
    }
    let (Some(sr), Some(sig), Some(se)) = (fields.get("sr"), fields.get("sig"), fields.get("se")) else {
        return fail(check, "sr, sig or se missing");
    };
    check.sr = (*sr).to_owned();
    let Ok(expiry) = se.parse::<u64>() else { return fail(check, "se is not a number") };
    check.expiry = expiry;
    if fields.keys().any(|k| !matches!(*k, "sr" | "sig" | "se" | "skn")) {
        return fail(check, "unknown token field");
    }
    if fields.get("skn").copied() != skn {
        return fail(check, "wrong skn");
    }
    if expiry <= now_unix() {
        check.expired = true;
        return fail(check, "token expired");
    }
    let Ok(sig) = base64::engine::general_purpose::STANDARD.decode(form_decode(sig)) else {
        return fail(check, "sig is not base64");
    };
    let expected = hmac_sha256(key, format!("{sr}\n{se}").as_bytes());
    if expected.len() != sig.len() || !openssl::memcmp::eq(&expected, &sig) {
        return fail(check, "bad signature");
    }
    let decoded = String::from_utf8(percent_decode(sr)).unwrap_or_default();
    if !decoded.eq_ignore_ascii_case(audience) {
        return fail(check, &format!("audience {decoded:?} is not {audience:?}"));
    }
    check
}

enum Route {
    List(String),
    One(String, String),
    /// A module's device-to-cloud message.
    Events(String, String),
}

fn route(path: &str) -> Option<Route> {
    let rest = path.strip_prefix("/devices/")?;
    let (d, rest) = rest.split_once("/modules")?;
    let d = String::from_utf8(percent_decode(d)).ok()?;
    if d.is_empty() {
        return None;
    }
    if rest.is_empty() {
        return Some(Route::List(d));
    }
    let m = rest.strip_prefix('/')?;
    let (m, events) = match m.strip_suffix("/messages/events") {
        Some(m) => (m, true),
        None => (m, false),
    };
    let m = String::from_utf8(percent_decode(m)).ok()?;
    if m.is_empty() {
        return None;
    }
    Some(if events { Route::Events(d, m) } else { Route::One(d, m) })
}

fn error(status: u16, code: &str) -> Response {
    Response::json(status, &json!({"Message": format!("ErrorCode:{code};mock"), "ExceptionMessage": "mock"}))
}

impl HubState {
    pub fn new(hub_name: &str) -> HubState {
        HubState {
            state: Mutex::new(State {
                hub_name: hub_name.to_owned(),
                devices: BTreeMap::new(),
                faults: VecDeque::new(),
                requests: Vec::new(),
                next_generation: 638_000_000_000_000_000,
                log: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers one request (records it first).
    pub fn handle(&self, req: &Request) -> Response {
        let mut st = self.lock();
        let (response, sas) = Self::answer(&mut st, req);
        let status = if response.hang_up { 0 } else { response.status };
        if st.log {
            println!(
                "{} {} -> {}{}",
                req.method,
                req.target,
                status,
                sas.as_ref().and_then(|s| s.verdict.as_ref().err()).map(|e| format!(" (SAS: {e})")).unwrap_or_default()
            );
        }
        st.requests.push(Recorded {
            method: req.method.clone(),
            target: req.target.clone(),
            headers: req.headers.clone(),
            body: req.body.clone(),
            sas,
            client_cert_sha256: req.client_chain.first().map(|c| thumbprint(c, MessageDigest::sha256())),
            status,
            at: SystemTime::now(),
            at_instant: Instant::now(),
        });
        response
    }

    fn authenticate(st: &State, device: &str, req: &Request) -> (Result<(), Response>, Option<SasCheck>) {
        let Some(dev) = st.devices.get(device) else {
            return (Err(error(404, "DeviceNotFound")), None);
        };
        let unauthorized = || Response::json(401, &unauthorized_body());
        match &dev.credential {
            DeviceCredential::Sas(key) => {
                let Some(h) = req.header("authorization") else { return (Err(unauthorized()), None) };
                let check = verify_sas(h, &format!("{}/devices/{}", st.hub_name, device), key, None);
                let ok = check.verdict.is_ok();
                (if ok { Ok(()) } else { Err(unauthorized()) }, Some(check))
            }
            DeviceCredential::Thumbprint(t) => {
                let ok = req.client_chain.first().is_some_and(|leaf| {
                    thumbprint(leaf, MessageDigest::sha1()).eq_ignore_ascii_case(t)
                        || thumbprint(leaf, MessageDigest::sha256()).eq_ignore_ascii_case(t)
                });
                (if ok { Ok(()) } else { Err(unauthorized()) }, None)
            }
            DeviceCredential::Ca(ca) => {
                let ok = req.client_chain.first().is_some_and(|leaf| chains_to(leaf, &req.client_chain[1..], ca) && cn_is(leaf, device));
                (if ok { Ok(()) } else { Err(unauthorized()) }, None)
            }
        }
    }

    /// A module SAS, checked with the module's stored primary key, then its secondary key.
    fn authenticate_module(st: &State, device: &str, module: &str, req: &Request) -> (Result<(), Response>, Option<SasCheck>) {
        let Some(stored) = st.devices.get(device).and_then(|dev| dev.modules.iter().find(|x| x.module_id == module)) else {
            return (Err(error(404, "ModuleNotFound")), None);
        };
        let Some(h) = req.header("authorization") else { return (Err(Response::json(401, &unauthorized_body())), None) };
        let audience = format!("{}/devices/{device}/modules/{module}", st.hub_name);
        let mut check = None;
        for key in [&stored.primary_key, &stored.secondary_key].into_iter().flatten() {
            let key = base64::engine::general_purpose::STANDARD.decode(key).unwrap_or_default();
            let c = verify_sas(h, &audience, &key, None);
            let ok = c.verdict.is_ok();
            check = Some(c);
            if ok {
                return (Ok(()), check);
            }
        }
        (Err(Response::json(401, &unauthorized_body())), check)
    }

    fn answer(st: &mut State, req: &Request) -> (Response, Option<SasCheck>) {
        let Some(route) = route(req.path()) else { return (error(404, "NotFound"), None) };
        let (auth, sas) = match &route {
            Route::List(d) | Route::One(d, _) => Self::authenticate(st, d, req),
            Route::Events(d, m) => Self::authenticate_module(st, d, m, req),
        };
        if let Some(fault) = st.faults.pop_front() {
            match fault {
                Fault::Status { status, body, headers } => {
                    let mut r = match body {
                        Some(b) => Response::json(status, &b),
                        None => Response::new(status),
                    };
                    r.headers.extend(headers);
                    return (r, sas);
                }
                Fault::MalformedJson => {
                    return (Response::new(200).with_body("application/json", b"{\"moduleId\": ".to_vec()), sas)
                }
                Fault::HangUp => {
                    let mut r = Response::new(0);
                    r.hang_up = true;
                    return (r, sas);
                }
                Fault::Slow(d) => {
                    let (r, _) = Self::serve(st, req, &route, auth);
                    return (r.delayed(d), sas);
                }
            }
        }
        let (r, _) = Self::serve(st, req, &route, auth);
        (r, sas)
    }

    fn serve(st: &mut State, req: &Request, route: &Route, auth: Result<(), Response>) -> (Response, ()) {
        if let Err(r) = auth {
            return (r, ());
        }
        if req.query_param("api-version") != Some(API_VERSION) {
            return (error(400, "InvalidProtocolVersion"), ());
        }
        let if_match = req.header("if-match");
        let next_generation = &mut st.next_generation;
        let r = match (req.method.as_str(), route) {
            ("GET", Route::List(d)) => {
                let dev = st.devices.get(d).expect("authenticated device");
                Response::json(200, &serde_json::Value::Array(dev.modules.iter().map(StoredModule::to_json).collect()))
            }
            ("GET", Route::One(d, m)) => {
                let dev = st.devices.get(d).expect("authenticated device");
                match dev.modules.iter().find(|x| x.module_id == *m) {
                    Some(x) => Response::json(200, &x.to_json()),
                    None => error(404, "ModuleNotFound"),
                }
            }
            ("PUT", Route::One(d, m)) => {
                if !req.header("content-type").is_some_and(|c| c.to_ascii_lowercase().starts_with("application/json")) {
                    return (error(400, "ArgumentInvalid;Content-Type"), ());
                }
                let Ok(body) = serde_json::from_slice::<serde_json::Value>(&req.body) else {
                    return (error(400, "ArgumentInvalid;body"), ());
                };
                if body.get("moduleId").and_then(|v| v.as_str()) != Some(m) || body.get("deviceId").and_then(|v| v.as_str()) != Some(d) {
                    return (error(400, "ArgumentInvalid;moduleId/deviceId"), ());
                }
                let dev = st.devices.get_mut(d).expect("authenticated device");
                let existing = dev.modules.iter().position(|x| x.module_id == *m);
                match (if_match, existing) {
                    (None, Some(_)) => error(409, "ModuleAlreadyExistsOnDevice"),
                    (None, None) => {
                        *next_generation += 1;
                        let module = StoredModule {
                            module_id: m.clone(),
                            device_id: d.clone(),
                            generation_id: next_generation.to_string(),
                            etag: format!("e{next_generation}"),
                            managed_by: None,
                            primary_key: None,
                            secondary_key: None,
                            auth_type: "sas".into(),
                        };
                        let r = Response::json(200, &module.to_json());
                        dev.modules.push(module);
                        r
                    }
                    (Some(_), None) => error(404, "ModuleNotFound"),
                    (Some("*"), Some(i)) => {
                        let auth = body.get("authentication");
                        let key = |name: &str| -> Result<Option<String>, ()> {
                            match auth.and_then(|a| a.get("symmetricKey")).and_then(|s| s.get(name)) {
                                None | Some(serde_json::Value::Null) => Ok(None),
                                Some(serde_json::Value::String(k)) => base64::engine::general_purpose::STANDARD
                                    .decode(k)
                                    .map(|_| Some(k.clone()))
                                    .map_err(|_| ()),
                                Some(_) => Err(()),
                            }
                        };
                        let (Ok(primary), Ok(secondary)) = (key("primaryKey"), key("secondaryKey")) else {
                            return (error(400, "ArgumentInvalid;symmetricKey"), ());
                        };
                        *next_generation += 1;
                        let x = &mut dev.modules[i];
                        x.primary_key = primary;
                        x.secondary_key = secondary;
                        if let Some(t) = auth.and_then(|a| a.get("type")).and_then(|t| t.as_str()) {
                            x.auth_type = t.to_owned();
                        }
                        x.etag = format!("e{next_generation}");
                        Response::json(200, &x.to_json())
                    }
                    (Some(_), Some(_)) => error(412, "PreconditionFailed"),
                }
            }
            ("POST", Route::Events(..)) => Response::new(204),
            ("DELETE", Route::One(d, m)) => {
                if if_match != Some("*") {
                    return (error(412, "PreconditionFailed"), ());
                }
                let dev = st.devices.get_mut(d).expect("authenticated device");
                match dev.modules.iter().position(|x| x.module_id == *m) {
                    Some(i) => {
                        dev.modules.remove(i);
                        Response::new(204)
                    }
                    None => error(404, "ModuleNotFound"),
                }
            }
            _ => error(405, "MethodNotAllowed"),
        };
        (r, ())
    }

    // ---- test-side API ----

    pub fn hub_name(&self) -> String {
        self.lock().hub_name.clone()
    }
    pub fn set_hub_name(&self, name: &str) {
        self.lock().hub_name = name.to_owned();
    }
    /// Print each request and its status to stdout (the `mock-hub` bin).
    pub fn set_logging(&self, on: bool) {
        self.lock().log = on;
    }
    /// Registers (or replaces the credential of) a device.
    pub fn add_device(&self, device_id: &str, credential: DeviceCredential) {
        let mut st = self.lock();
        match st.devices.get_mut(device_id) {
            Some(d) => d.credential = credential,
            None => {
                st.devices.insert(device_id.to_owned(), Device { credential, modules: Vec::new() });
            }
        }
    }
    /// Puts a module straight into the hub (e.g. one identityd does not manage, or an X.509
    /// module with `auth_type = "selfSigned"`).
    pub fn insert_module(&self, module: StoredModule) {
        let mut st = self.lock();
        let dev = st.devices.get_mut(&module.device_id).expect("insert_module: unknown device");
        dev.modules.retain(|m| m.module_id != module.module_id);
        dev.modules.push(module);
    }
    /// A fresh generation ID (for [`HubState::insert_module`]).
    pub fn new_generation_id(&self) -> String {
        let mut st = self.lock();
        st.next_generation += 1;
        st.next_generation.to_string()
    }
    /// The device's modules in hub order.
    pub fn modules(&self, device_id: &str) -> Vec<StoredModule> {
        self.lock().devices.get(device_id).map(|d| d.modules.clone()).unwrap_or_default()
    }
    /// The device's module IDs, sorted.
    pub fn module_ids(&self, device_id: &str) -> Vec<String> {
        let mut ids: Vec<String> = self.modules(device_id).into_iter().map(|m| m.module_id).collect();
        ids.sort();
        ids
    }
    pub fn module(&self, device_id: &str, module_id: &str) -> Option<StoredModule> {
        self.modules(device_id).into_iter().find(|m| m.module_id == module_id)
    }
    /// Queues a fault for a later request (FIFO, one per request).
    pub fn push_fault(&self, fault: Fault) {
        self.lock().faults.push_back(fault);
    }
    /// Faults not yet consumed.
    pub fn pending_faults(&self) -> usize {
        self.lock().faults.len()
    }
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }
    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }
    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }
    /// Checks a module-scoped SAS (what an agent builds with the module key handle identityd
    /// hands out) against the stored primary key: audience `{hub}/devices/{d}/modules/{m}`.
    pub fn verify_module_sas(&self, device_id: &str, module_id: &str, header: &str) -> SasCheck {
        let hub = self.hub_name();
        let key = self
            .module(device_id, module_id)
            .and_then(|m| m.primary_key)
            .map(|k| base64::engine::general_purpose::STANDARD.decode(k).expect("stored keys are base64"))
            .unwrap_or_default();
        verify_sas(header, &format!("{hub}/devices/{device_id}/modules/{module_id}"), &key, None)
    }
}

fn chains_to(leaf: &X509, extra: &[X509], ca: &X509) -> bool {
    let Ok(mut store) = X509StoreBuilder::new() else { return false };
    if store.add_cert(ca.clone()).is_err() {
        return false;
    }
    let store = store.build();
    let Ok(mut chain) = Stack::new() else { return false };
    for c in extra {
        if chain.push(c.clone()).is_err() {
            return false;
        }
    }
    let Ok(mut ctx) = X509StoreContext::new() else { return false };
    ctx.init(&store, leaf, &chain, |c| c.verify_cert()).unwrap_or(false)
}

fn cn_is(cert: &X509, expected: &str) -> bool {
    cert.subject_name()
        .entries_by_nid(openssl::nid::Nid::COMMONNAME)
        .next()
        .is_some_and(|e| e.data().to_string().is_ok_and(|cn| cn == expected))
}

impl Handler for HubState {
    fn handle(&self, request: &Request) -> Response {
        HubState::handle(self, request)
    }
}

/// The mock hub on its own HTTPS server (127.0.0.1, certificate for `localhost` and
/// `127.0.0.1` from its own CA). The hub name defaults to `localhost:<port>`. Dereferences to
/// its [`HubState`].
pub type MockHub = MockServer<HubState>;

impl MockServer<HubState> {
    /// Starts on any free port.
    pub fn start() -> std::io::Result<MockHub> {
        MockHub::start_on(0)
    }

    /// Starts on `port` (0: any) with a CA of its own.
    pub fn start_on(port: u16) -> std::io::Result<MockHub> {
        MockHub::start_with_ca(TestCa::new("aziot mock IoT Hub CA"), port)
    }

    /// Starts on `port` (0: any) with its server certificate issued by `ca` (several mocks in one
    /// test process can then share one `SSL_CERT_FILE`).
    pub fn start_with_ca(ca: TestCa, port: u16) -> std::io::Result<MockHub> {
        let server_cert = ca.issue_server(&["localhost", "127.0.0.1"]);
        let hub = MockServer::serve(ca, server_cert, port, HubState::new("localhost"))?;
        hub.set_hub_name(&hub.host());
        Ok(hub)
    }

    /// `localhost:<port>`: the host to configure as the hub (and gateway).
    pub fn host(&self) -> String {
        format!("localhost:{}", self.port())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(sr: &str, se: u64, key: &[u8], skn: Option<&str>) -> String {
        let sig = base64::engine::general_purpose::STANDARD.encode(hmac_sha256(key, format!("{sr}\n{se}").as_bytes()));
        let sig = sig.replace('+', "%2B").replace('/', "%2F").replace('=', "%3D");
        let mut t = format!("SharedAccessSignature sr={sr}&sig={sig}&se={se}");
        if let Some(s) = skn {
            t.push_str(&format!("&skn={s}"));
        }
        t
    }

    /// The verifier accepts a good token and rejects each kind of bad one.
    #[test]
    fn sas_verification() {
        let key = b"0123456789abcdef0123456789abcdef";
        let se = now_unix() + 60;
        let aud = "localhost:1/devices/Dev 1";
        let good = token("localhost:1/devices/dev%201", se, key, None);
        assert_eq!(verify_sas(&good, aud, key, None).verdict, Ok(()));
        assert!(verify_sas(&good, aud, b"another key", None).verdict.is_err());
        assert!(verify_sas(&good, "localhost:1/devices/dev2", key, None).verdict.is_err());
        assert!(verify_sas(&good, aud, key, Some("registration")).verdict.is_err());
        let with_skn = token("localhost:1/devices/dev%201", se, key, Some("registration"));
        assert!(verify_sas(&with_skn, aud, key, None).verdict.is_err());
        assert_eq!(verify_sas(&with_skn, aud, key, Some("registration")).verdict, Ok(()));
        let expired = token("localhost:1/devices/dev%201", now_unix() - 1, key, None);
        let c = verify_sas(&expired, aud, key, None);
        assert!(c.expired && c.verdict.is_err());
        // The signature covers sr as received: re-encoding it breaks the token.
        let tampered = good.replace("dev%201", "dev%20%31");
        assert!(verify_sas(&tampered, aud, key, None).verdict.is_err());
        assert!(verify_sas("Basic abc", aud, key, None).verdict.is_err());
    }

    #[test]
    fn routes() {
        assert!(matches!(route("/devices/d/modules"), Some(Route::List(d)) if d == "d"));
        assert!(matches!(route("/devices/d%20x/modules/m%3D1"), Some(Route::One(d, m)) if d == "d x" && m == "m=1"));
        assert!(route("/devices//modules").is_none());
        assert!(route("/devices/d/modules/").is_none());
        assert!(route("/twins/d").is_none());
        assert!(matches!(route("/devices/d/modules/m%2F1/messages/events"), Some(Route::Events(d, m)) if d == "d" && m == "m/1"));
        assert!(route("/devices/d/modules//messages/events").is_none());
    }

    /// A module's message is accepted with its own SAS (primary or secondary key) and refused
    /// with the device's token, another module's key, or none.
    #[test]
    fn module_events_need_the_module_sas() {
        let hub = HubState::new("localhost:1");
        let dev_key = b"device key 0123456789abcdef01234";
        hub.add_device("d", DeviceCredential::Sas(dev_key.to_vec()));
        let (pk, sk) = (b"primary 0123456789abcdef01234567", b"secondary 0123456789abcdef012345");
        let b64 = |k: &[u8]| base64::engine::general_purpose::STANDARD.encode(k);
        hub.insert_module(StoredModule {
            module_id: "m".into(),
            device_id: "d".into(),
            generation_id: "1".into(),
            etag: "e1".into(),
            managed_by: None,
            primary_key: Some(b64(pk)),
            secondary_key: Some(b64(sk)),
            auth_type: "sas".into(),
        });
        let post = |path: &str, auth: Option<String>| {
            let req = Request {
                method: "POST".into(),
                target: format!("{path}?api-version={API_VERSION}"),
                headers: auth.map(|a| ("authorization".to_owned(), a)).into_iter().collect(),
                body: b"{}".to_vec(),
                client_chain: Vec::new(),
                peer: "127.0.0.1:1".parse().unwrap(),
            };
            hub.handle(&req).status
        };
        let se = now_unix() + 60;
        let events = "/devices/d/modules/m/messages/events";
        let sr = "localhost:1/devices/d/modules/m";
        assert_eq!(post(events, Some(token(sr, se, pk, None))), 204);
        assert_eq!(post(events, Some(token(sr, se, sk, None))), 204);
        assert_eq!(post(events, Some(token(sr, se, dev_key, None))), 401);
        assert_eq!(post(events, Some(token("localhost:1/devices/d", se, dev_key, None))), 401);
        assert_eq!(post(events, None), 401);
        assert_eq!(post("/devices/d/modules/other/messages/events", Some(token(sr, se, pk, None))), 404);
        let recorded = hub.requests();
        assert_eq!(recorded[0].sas.as_ref().map(|s| s.verdict.clone()), Some(Ok(())));
    }
}
