//! A mock Device Provisioning Service (cloud-protocols.md §3, §5.3, §7.0–§7.3) over real TLS
//! ([`crate::mock_tls`]), serving the IoT Hub paths of the hubs it assigns on the same port
//! (§7.0): each hub is a [`HubState`] of [`crate::mock_hub`], chosen by the request's `Host`
//! (by default two hubs, `localhost:<port>` and `127.0.0.1:<port>`, so a test can tell which one
//! the device landed on).
//!
//! * Enrollments: individual (symmetric key, X.509 by thumbprint or CA, TPM with its EK pinned or
//!   registered on first use) and group (symmetric key: the device key is derived as §3.6,
//!   `HMAC-SHA256(groupKey, registrationId)`; X.509 CA). Each names its hub and device ID.
//! * Authentication exactly as §7.0: SAS (`skn=registration`, audience
//!   `{scope}/registrations/{id}`, signature over `sr` as received, expiry in the future) on the
//!   register and on every poll; the TLS client certificate (leaf CN = registration ID) for X.509.
//! * TPM (§7.3): round 1 answers 401 with an activation blob for a fresh key K1, built from the
//!   device's EK and SRK by aziot-tpmd's test-support builder (§5.3, verified against swtpm);
//!   round 2 and the polls must be signed with K1; `assigned` carries a blob for a new K2, which
//!   becomes the hub device's key.
//! * On `assigned` the device is registered in its hub with the credential DPS verified, so the
//!   hub then authenticates it (and its modules) exactly.
//! * Custom allocation: the request `payload` is recorded and echoed in the result as
//!   `{"received": <payload>}` (or an enrollment's own result payload).
//! * Test hooks: `assigning` for N polls (with `Retry-After`), a queue of [`DpsFault`]s (401, 429
//!   with `Retry-After`, 500, malformed JSON, a hang-up) consumed one per DPS request, a forced
//!   `failed` result; every DPS request is recorded ([`DpsRecorded`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use base64::Engine as _;
use openssl::hash::MessageDigest;
use openssl::stack::Stack;
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{X509StoreContext, X509};
use serde_json::{json, Value};

use crate::mock_hub::{percent_decode, verify_sas, DeviceCredential, HubState, SasCheck};
use crate::mock_tls::{thumbprint, CertKey, Handler, MockServer, Request, Response, TestCa};

/// The only api-version served (§3.1).
pub const API_VERSION: &str = "2021-06-01";

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let pkey = openssl::pkey::PKey::hmac(key).expect("hmac key");
    let mut s = openssl::sign::Signer::new(MessageDigest::sha256(), &pkey).expect("signer");
    s.update(data).expect("update");
    s.sign_to_vec().expect("sign")
}

/// §3.6: the per-device key of a symmetric-key group enrollment.
pub fn derive_device_key(group_key: &[u8], registration_id: &str) -> Vec<u8> {
    hmac_sha256(group_key, registration_id.as_bytes())
}

fn random(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    openssl::rand::rand_bytes(&mut b).expect("random");
    b
}

/// How an individual enrollment attests.
#[derive(Clone)]
pub enum Attestation {
    /// SAS with this key.
    SymmetricKey(Vec<u8>),
    /// A client certificate whose SHA-1 or SHA-256 thumbprint is this (hex, any case).
    X509Thumbprint(String),
    /// A client certificate chaining to this CA.
    X509Ca(X509),
    /// TPM: this EK (marshaled `TPM2B_PUBLIC`), or `None` to take the first one presented.
    Tpm(Option<Vec<u8>>),
}

/// An individual enrollment.
#[derive(Clone)]
pub struct Enrollment {
    pub attestation: Attestation,
    /// The hub name to assign (one of [`DpsState::hub_names`]).
    pub hub: String,
    /// The device ID to assign (default: the registration ID).
    pub device_id: Option<String>,
}

/// A group enrollment: any registration ID whose credential verifies.
#[derive(Clone)]
pub enum Group {
    SymmetricKey { group_key: Vec<u8>, hub: String },
    X509Ca { ca: X509, hub: String },
}

/// A test hook for the next DPS request (hub requests do not consume them).
#[derive(Clone, Debug)]
pub enum DpsFault {
    /// This status, this JSON body (or none), these headers.
    Status {
        status: u16,
        body: Option<Value>,
        headers: Vec<(String, String)>,
    },
    /// 202 (register) / 200 (poll) `application/json` that is not JSON.
    MalformedJson,
    /// Close the connection without answering.
    HangUp,
}

impl DpsFault {
    /// 401 with DPS's unauthorised body.
    pub fn unauthorized() -> DpsFault {
        DpsFault::Status {
            status: 401,
            body: Some(unauthorized_body()),
            headers: Vec::new(),
        }
    }
    /// 429 with `Retry-After: <secs>` when given.
    pub fn throttled(retry_after_secs: Option<u64>) -> DpsFault {
        DpsFault::Status {
            status: 429,
            body: Some(
                json!({"errorCode": 429001, "trackingId": "t", "message": "Operations are being throttled for this tenant.", "timestampUtc": "2024-01-01T00:00:00Z"}),
            ),
            headers: retry_after_secs
                .map(|s| vec![("Retry-After".to_owned(), s.to_string())])
                .unwrap_or_default(),
        }
    }
    /// 500 with a DPS error body.
    pub fn server_error() -> DpsFault {
        DpsFault::Status {
            status: 500,
            body: Some(
                json!({"errorCode": 500000, "trackingId": "t", "message": "Internal server error (mock)"}),
            ),
            headers: Vec::new(),
        }
    }
}

fn unauthorized_body() -> Value {
    json!({"errorCode": 401002, "trackingId": "t", "message": "Unauthorized", "timestampUtc": "2024-01-01T00:00:00Z"})
}

fn dps_error(status: u16, code: u32, message: &str) -> Response {
    Response::json(
        status,
        &json!({"errorCode": code, "trackingId": "t", "message": message}),
    )
}

/// One DPS request as the mock saw it.
#[derive(Clone, Debug)]
pub struct DpsRecorded {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The SAS check, when an `Authorization` header was present and a key was known.
    pub sas: Option<SasCheck>,
    pub client_cert_sha256: Option<String>,
    /// The status answered (0: hung up).
    pub status: u16,
    pub at: Instant,
}

impl DpsRecorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn is_poll(&self) -> bool {
        self.method == "GET" && self.target.contains("/operations/")
    }
}

/// What a registration's credential is, once verified (what the hub will know the device by).
#[derive(Clone)]
enum Verified {
    Key(Vec<u8>),
    Cert(DeviceCredential),
    /// TPM: the EK and SRK, the challenge key K1.
    Tpm {
        ek: Vec<u8>,
        srk: Vec<u8>,
        k1: Vec<u8>,
    },
}

struct Operation {
    registration_id: String,
    polls_left: u32,
    verified: Verified,
    hub: String,
    device_id: String,
    payload: Option<Value>,
    failed: Option<(u32, String)>,
}

/// TPM round 1: (EK, SRK, K1).
type Challenge = (Vec<u8>, Vec<u8>, Vec<u8>);
/// A verified registration: what it verified as, its hub, its device ID, the SAS check.
type Authenticated = (Verified, String, String, Option<SasCheck>);
/// A refused one: the answer and the SAS check.
type Refusal = Box<(Response, Option<SasCheck>)>;

struct St {
    scope_id: String,
    individual: BTreeMap<String, Enrollment>,
    groups: Vec<Group>,
    /// TPM round 1 state: registration ID → (EK, SRK, K1).
    challenges: BTreeMap<String, Challenge>,
    operations: BTreeMap<String, Operation>,
    hubs: BTreeMap<String, Arc<HubState>>,
    faults: VecDeque<DpsFault>,
    fail_next: Option<(u32, String)>,
    assigning_polls: u32,
    assigning_retry_after: Option<u64>,
    result_payload: Option<Value>,
    send_result_tpm_key: bool,
    requests: Vec<DpsRecorded>,
    /// The TPM device keys the mock made (K1, K2, ...), in order.
    tpm_keys: Vec<Vec<u8>>,
    next_op: u64,
    log: bool,
}

/// The DPS state and request logic (without a server).
pub struct DpsState {
    st: Mutex<St>,
}

enum DpsRoute {
    Register(String),
    Poll(String, String),
}

fn dps_route(path: &str, scope: &str) -> Option<DpsRoute> {
    let rest = path.strip_prefix('/')?;
    let (s, rest) = rest.split_once("/registrations/")?;
    if String::from_utf8(percent_decode(s)).ok()? != scope {
        return None;
    }
    let (reg, rest) = rest.split_once('/')?;
    let reg = String::from_utf8(percent_decode(reg)).ok()?;
    if rest == "register" {
        return Some(DpsRoute::Register(reg));
    }
    let op = rest.strip_prefix("operations/")?;
    (!op.is_empty() && !op.contains('/')).then(|| DpsRoute::Poll(reg, op.to_owned()))
}

fn chains_to(leaf: &X509, extra: &[X509], ca: &X509) -> bool {
    let Ok(mut store) = X509StoreBuilder::new() else {
        return false;
    };
    if store.add_cert(ca.clone()).is_err() {
        return false;
    }
    let store = store.build();
    let Ok(mut chain) = Stack::new() else {
        return false;
    };
    for c in extra {
        if chain.push(c.clone()).is_err() {
            return false;
        }
    }
    let Ok(mut ctx) = X509StoreContext::new() else {
        return false;
    };
    ctx.init(&store, leaf, &chain, |c| c.verify_cert())
        .unwrap_or(false)
}

fn cn_of(cert: &X509) -> Option<String> {
    cert.subject_name()
        .entries_by_nid(openssl::nid::Nid::COMMONNAME)
        .next()
        .and_then(|e| e.data().to_string().ok())
}

impl DpsState {
    pub fn new(scope_id: &str) -> DpsState {
        DpsState {
            st: Mutex::new(St {
                scope_id: scope_id.to_owned(),
                individual: BTreeMap::new(),
                groups: Vec::new(),
                challenges: BTreeMap::new(),
                operations: BTreeMap::new(),
                hubs: BTreeMap::new(),
                faults: VecDeque::new(),
                fail_next: None,
                assigning_polls: 0,
                assigning_retry_after: Some(1),
                result_payload: None,
                send_result_tpm_key: true,
                requests: Vec::new(),
                tpm_keys: Vec::new(),
                next_op: 1,
                log: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Answers one request: a hub path goes to the hub its `Host` names; a DPS path is recorded
    /// and answered here.
    pub fn handle(&self, req: &Request) -> Response {
        if req.path().starts_with("/devices/") {
            let hub = {
                let st = self.lock();
                let host = req.header("host").unwrap_or("");
                st.hubs
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(host))
                    .map(|(_, h)| Arc::clone(h))
            };
            return match hub {
                Some(h) => h.handle(req),
                None => Response::json(
                    404,
                    &json!({"Message": "ErrorCode:IotHubNotFound;no such hub (mock DPS)"}),
                ),
            };
        }
        let mut st = self.lock();
        let (response, sas) = Self::answer(&mut st, req);
        let status = if response.hang_up { 0 } else { response.status };
        if st.log {
            println!(
                "DPS {} {} -> {status}{}",
                req.method,
                req.target,
                sas.as_ref()
                    .and_then(|s| s.verdict.as_ref().err())
                    .map(|e| format!(" (SAS: {e})"))
                    .unwrap_or_default()
            );
        }
        st.requests.push(DpsRecorded {
            method: req.method.clone(),
            target: req.target.clone(),
            headers: req.headers.clone(),
            body: req.body.clone(),
            sas,
            client_cert_sha256: req
                .client_chain
                .first()
                .map(|c| thumbprint(c, MessageDigest::sha256())),
            status,
            at: Instant::now(),
        });
        response
    }

    fn answer(st: &mut St, req: &Request) -> (Response, Option<SasCheck>) {
        if let Some(fault) = st.faults.pop_front() {
            return match fault {
                DpsFault::Status {
                    status,
                    body,
                    headers,
                } => {
                    let mut r = match body {
                        Some(b) => Response::json(status, &b),
                        None => Response::new(status),
                    };
                    r.headers.extend(headers);
                    (r, None)
                }
                DpsFault::MalformedJson => {
                    let status = if req.method == "PUT" { 202 } else { 200 };
                    (
                        Response::new(status)
                            .with_body("application/json", b"{\"operationId\": ".to_vec()),
                        None,
                    )
                }
                DpsFault::HangUp => {
                    let mut r = Response::new(0);
                    r.hang_up = true;
                    (r, None)
                }
            };
        }
        let scope = st.scope_id.clone();
        let Some(route) = dps_route(req.path(), &scope) else {
            return (dps_error(404, 404000, "Not found (mock DPS)"), None);
        };
        if req.query_param("api-version") != Some(API_VERSION) {
            return (dps_error(400, 400001, "Invalid api-version"), None);
        }
        match route {
            DpsRoute::Register(reg) if req.method == "PUT" => Self::register(st, req, &reg),
            DpsRoute::Poll(reg, op) if req.method == "GET" => Self::poll(st, req, &reg, &op),
            _ => (dps_error(405, 405000, "Method not allowed"), None),
        }
    }

    /// Checks a SAS for `reg` with `key`.
    fn check_sas(st: &St, req: &Request, reg: &str, key: &[u8]) -> Result<SasCheck, SasCheck> {
        let Some(h) = req.header("authorization") else {
            return Err(SasCheck {
                sr: String::new(),
                expiry: 0,
                expired: false,
                verdict: Err("no Authorization".into()),
            });
        };
        let check = verify_sas(
            h,
            &format!("{}/registrations/{reg}", st.scope_id),
            key,
            Some("registration"),
        );
        if check.verdict.is_ok() {
            Ok(check)
        } else {
            Err(check)
        }
    }

    /// The credential of `reg` on this request: what it verified as, and where it goes.
    fn authenticate(
        st: &mut St,
        req: &Request,
        reg: &str,
        body: &Value,
    ) -> Result<Authenticated, Refusal> {
        let unauthorized = |sas| Box::new((Response::json(401, &unauthorized_body()), sas));
        let leaf_ok = |check: &dyn Fn(&X509) -> bool| {
            req.client_chain
                .first()
                .is_some_and(|leaf| cn_of(leaf).as_deref() == Some(reg) && check(leaf))
        };
        if let Some(e) = st.individual.get(reg).cloned() {
            let device = e.device_id.clone().unwrap_or_else(|| reg.to_owned());
            return match e.attestation {
                Attestation::SymmetricKey(key) => match Self::check_sas(st, req, reg, &key) {
                    Ok(c) => Ok((Verified::Key(key), e.hub, device, Some(c))),
                    Err(c) => Err(unauthorized(Some(c))),
                },
                Attestation::X509Thumbprint(t) => {
                    let ok = leaf_ok(&|leaf| {
                        thumbprint(leaf, MessageDigest::sha1()).eq_ignore_ascii_case(&t)
                            || thumbprint(leaf, MessageDigest::sha256()).eq_ignore_ascii_case(&t)
                    });
                    if ok {
                        Ok((
                            Verified::Cert(DeviceCredential::Thumbprint(t)),
                            e.hub,
                            device,
                            None,
                        ))
                    } else {
                        Err(unauthorized(None))
                    }
                }
                Attestation::X509Ca(ca) => {
                    if leaf_ok(&|leaf| chains_to(leaf, &req.client_chain[1..], &ca)) {
                        Ok((
                            Verified::Cert(DeviceCredential::Ca(ca)),
                            e.hub,
                            device,
                            None,
                        ))
                    } else {
                        Err(unauthorized(None))
                    }
                }
                Attestation::Tpm(pinned) => Self::tpm(st, req, reg, body, pinned, e.hub, device),
            };
        }
        for g in st.groups.clone() {
            match g {
                Group::SymmetricKey { group_key, hub } => {
                    let key = derive_device_key(&group_key, reg);
                    if let Ok(c) = Self::check_sas(st, req, reg, &key) {
                        return Ok((Verified::Key(key), hub, reg.to_owned(), Some(c)));
                    }
                }
                Group::X509Ca { ca, hub } => {
                    if leaf_ok(&|leaf| chains_to(leaf, &req.client_chain[1..], &ca)) {
                        return Ok((
                            Verified::Cert(DeviceCredential::Ca(ca)),
                            hub,
                            reg.to_owned(),
                            None,
                        ));
                    }
                }
            }
        }
        // Record why a SAS failed against the first symmetric group (if any), for the test.
        let sas = st.groups.iter().find_map(|g| match g {
            Group::SymmetricKey { group_key, .. } => {
                Self::check_sas(st, req, reg, &derive_device_key(group_key, reg)).err()
            }
            Group::X509Ca { .. } => None,
        });
        Err(unauthorized(sas))
    }

    /// §7.3: round 1 (no Authorization, `tpm` in the body) → 401 with the blob for K1; round 2
    /// and polls: a SAS signed with K1.
    fn tpm(
        st: &mut St,
        req: &Request,
        reg: &str,
        body: &Value,
        pinned: Option<Vec<u8>>,
        hub: String,
        device: String,
    ) -> Result<Authenticated, Refusal> {
        if req.header("authorization").is_none() {
            let tpm = body.get("tpm");
            let key = |name: &str| {
                tpm.and_then(|t| t.get(name))
                    .and_then(Value::as_str)
                    .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
            };
            let (Some(ek), Some(srk)) = (key("endorsementKey"), key("storageRootKey")) else {
                return Err(Box::new((Response::json(401, &unauthorized_body()), None)));
            };
            match &pinned {
                Some(p) if *p != ek => {
                    return Err(Box::new((
                        dps_error(401, 401002, "EK does not match the enrollment"),
                        None,
                    )))
                }
                Some(_) => {}
                None => {
                    // Register on first use.
                    if let Some(e) = st.individual.get_mut(reg) {
                        e.attestation = Attestation::Tpm(Some(ek.clone()));
                    }
                }
            }
            let k1 = random(32);
            let blob = match aziot_tpmd::dps_blob::build(&ek, &srk, &k1) {
                Ok(b) => b,
                Err(e) => {
                    return Err(Box::new((
                        dps_error(400, 400004, &format!("unsupported TPM keys: {e}")),
                        None,
                    )))
                }
            };
            st.tpm_keys.push(k1.clone());
            st.challenges.insert(reg.to_owned(), (ek, srk, k1));
            return Err(Box::new((
                Response::json(
                    401,
                    &json!({"authenticationKey": b64(&blob), "keyName": "registration"}),
                ),
                None,
            )));
        }
        let Some((ek, srk, k1)) = st.challenges.get(reg).cloned() else {
            return Err(Box::new((
                dps_error(401, 401002, "no TPM challenge for this registration"),
                None,
            )));
        };
        match Self::check_sas(st, req, reg, &k1) {
            Ok(c) => Ok((Verified::Tpm { ek, srk, k1 }, hub, device, Some(c))),
            Err(c) => Err(Box::new((
                Response::json(401, &unauthorized_body()),
                Some(c),
            ))),
        }
    }

    fn register(st: &mut St, req: &Request, reg: &str) -> (Response, Option<SasCheck>) {
        let Ok(body) = serde_json::from_slice::<Value>(&req.body) else {
            return (dps_error(400, 400002, "body is not JSON"), None);
        };
        if body.get("registrationId").and_then(Value::as_str) != Some(reg) {
            return (
                dps_error(400, 400003, "registrationId does not match the path"),
                None,
            );
        }
        let (verified, hub, device_id, sas) = match Self::authenticate(st, req, reg, &body) {
            Ok(v) => v,
            Err(refusal) => return *refusal,
        };
        let op_id = format!(
            "4.{:016x}.{}",
            st.next_op,
            random(4)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        );
        st.next_op += 1;
        let failed = st.fail_next.take();
        st.operations.insert(
            op_id.clone(),
            Operation {
                registration_id: reg.to_owned(),
                polls_left: st.assigning_polls,
                verified,
                hub,
                device_id,
                payload: body.get("payload").cloned(),
                failed,
            },
        );
        (
            Response::json(202, &json!({"operationId": op_id, "status": "assigning"})),
            sas,
        )
    }

    fn poll(st: &mut St, req: &Request, reg: &str, op_id: &str) -> (Response, Option<SasCheck>) {
        let Some(op) = st.operations.get(op_id) else {
            return (dps_error(404, 404201, "Operation not found"), None);
        };
        if op.registration_id != reg {
            return (dps_error(404, 404201, "Operation not found"), None);
        }
        let verified = op.verified.clone();
        // The same credential as the register.
        let sas = match &verified {
            Verified::Key(key) | Verified::Tpm { k1: key, .. } => {
                match Self::check_sas(st, req, reg, key) {
                    Ok(c) => Some(c),
                    Err(c) => return (Response::json(401, &unauthorized_body()), Some(c)),
                }
            }
            Verified::Cert(cred) => {
                let ok = req.client_chain.first().is_some_and(|leaf| {
                    cn_of(leaf).as_deref() == Some(reg)
                        && match cred {
                            DeviceCredential::Thumbprint(t) => {
                                thumbprint(leaf, MessageDigest::sha1()).eq_ignore_ascii_case(t)
                                    || thumbprint(leaf, MessageDigest::sha256())
                                        .eq_ignore_ascii_case(t)
                            }
                            DeviceCredential::Ca(ca) => chains_to(leaf, &req.client_chain[1..], ca),
                            DeviceCredential::Sas(_) => false,
                        }
                });
                if !ok {
                    return (Response::json(401, &unauthorized_body()), None);
                }
                None
            }
        };
        let retry_after = st.assigning_retry_after;
        let op = st.operations.get_mut(op_id).expect("looked up");
        if op.polls_left > 0 {
            op.polls_left -= 1;
            let mut r = Response::json(
                202,
                &json!({"operationId": op_id, "status": "assigning", "registrationState": {"registrationId": reg, "status": "assigning"}}),
            );
            if let Some(s) = retry_after {
                r = r.with_header("Retry-After", &s.to_string());
            }
            return (r, sas);
        }
        if let Some((code, message)) = op.failed.clone() {
            return (
                Response::json(
                    200,
                    &json!({"operationId": op_id, "status": "failed", "registrationState": {"registrationId": reg, "status": "failed", "errorCode": code, "errorMessage": message}}),
                ),
                sas,
            );
        }
        let (hub_name, device_id, payload) =
            (op.hub.clone(), op.device_id.clone(), op.payload.clone());
        let Some(hub) = st.hubs.get(&hub_name).cloned() else {
            return (
                dps_error(
                    500,
                    500001,
                    &format!("enrollment names unknown hub {hub_name}"),
                ),
                sas,
            );
        };
        let mut state = json!({
            "registrationId": reg,
            "assignedHub": hub_name,
            "deviceId": device_id,
            "status": "assigned",
            "substatus": "initialAssignment",
            "createdDateTimeUtc": "2024-01-01T00:00:00Z",
            "etag": "mock",
        });
        let credential = match verified {
            Verified::Key(k) => DeviceCredential::Sas(k),
            Verified::Cert(c) => c,
            Verified::Tpm { ek, srk, k1 } => {
                if st.send_result_tpm_key {
                    // §5.4: a different key in the result proves the device signs with the last one.
                    let k2 = random(32);
                    let blob = aziot_tpmd::dps_blob::build(&ek, &srk, &k2)
                        .expect("the EK and SRK were accepted before");
                    st.tpm_keys.push(k2.clone());
                    state["tpm"] = json!({"authenticationKey": b64(&blob)});
                    DeviceCredential::Sas(k2)
                } else {
                    DeviceCredential::Sas(k1)
                }
            }
        };
        hub.add_device(&device_id, credential);
        if let Some(p) = st.result_payload.clone() {
            state["payload"] = p;
        } else if let Some(p) = payload {
            state["payload"] = json!({"received": p});
        }
        (
            Response::json(
                200,
                &json!({"operationId": op_id, "status": "assigned", "registrationState": state}),
            ),
            sas,
        )
    }

    // ---- test-side API ----

    pub fn scope_id(&self) -> String {
        self.lock().scope_id.clone()
    }
    /// Print each DPS request and its status (the `mock-dps` bin); also turns on the hubs' log.
    pub fn set_logging(&self, on: bool) {
        let mut st = self.lock();
        st.log = on;
        for h in st.hubs.values() {
            h.set_logging(on);
        }
    }
    /// A hub DPS can assign, served on this port for requests whose `Host` is `name`.
    pub fn add_hub(&self, name: &str) -> Arc<HubState> {
        let hub = Arc::new(HubState::new(name));
        self.lock().hubs.insert(name.to_owned(), Arc::clone(&hub));
        hub
    }
    pub fn hub(&self, name: &str) -> Arc<HubState> {
        self.lock()
            .hubs
            .get(name)
            .cloned()
            .unwrap_or_else(|| panic!("no hub {name}"))
    }
    pub fn hub_names(&self) -> Vec<String> {
        self.lock().hubs.keys().cloned().collect()
    }
    pub fn enroll(&self, registration_id: &str, enrollment: Enrollment) {
        self.lock()
            .individual
            .insert(registration_id.to_owned(), enrollment);
    }
    pub fn enroll_group(&self, group: Group) {
        self.lock().groups.push(group);
    }
    /// `assigning` for the next `n` polls of each new operation, with `Retry-After: secs`
    /// (`None`: no header).
    pub fn set_assigning_polls(&self, n: u32, retry_after_secs: Option<u64>) {
        let mut st = self.lock();
        st.assigning_polls = n;
        st.assigning_retry_after = retry_after_secs;
    }
    /// The next registration ends `failed` with this code and message.
    pub fn fail_next(&self, code: u32, message: &str) {
        self.lock().fail_next = Some((code, message.to_owned()));
    }
    /// The `payload` of every `assigned` result (instead of the echo of the request's).
    pub fn set_result_payload(&self, payload: Option<Value>) {
        self.lock().result_payload = payload;
    }
    /// Whether `assigned` carries a new TPM key K2 (default) or leaves K1 in place.
    pub fn set_result_tpm_key(&self, on: bool) {
        self.lock().send_result_tpm_key = on;
    }
    pub fn push_fault(&self, fault: DpsFault) {
        self.lock().faults.push_back(fault);
    }
    pub fn pending_faults(&self) -> usize {
        self.lock().faults.len()
    }
    pub fn requests(&self) -> Vec<DpsRecorded> {
        self.lock().requests.clone()
    }
    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }
    /// The TPM keys the mock generated (K1 of each challenge, K2 of each TPM assignment), in order.
    pub fn tpm_keys(&self) -> Vec<Vec<u8>> {
        self.lock().tpm_keys.clone()
    }
}

impl Handler for DpsState {
    fn handle(&self, request: &Request) -> Response {
        DpsState::handle(self, request)
    }
}

/// The mock DPS on its own HTTPS server (127.0.0.1; certificate for `localhost` and
/// `127.0.0.1`), with two hubs on the same port: [`MockServer::hub_a`] = `localhost:<port>`,
/// [`MockServer::hub_b`] = `127.0.0.1:<port>`. Dereferences to its [`DpsState`].
pub type MockDps = MockServer<DpsState>;

impl MockServer<DpsState> {
    /// Starts on `port` (0: any) with its server certificate from `ca`, scope `scope_id`.
    pub fn start_with_ca(ca: TestCa, port: u16, scope_id: &str) -> std::io::Result<MockDps> {
        let server_cert = ca.issue_server(&["localhost", "127.0.0.1"]);
        MockDps::start_with_cert(ca, server_cert, port, scope_id)
    }

    /// Starts with a given server certificate (e.g. one from a CA the client does not trust).
    pub fn start_with_cert(
        ca: TestCa,
        server_cert: CertKey,
        port: u16,
        scope_id: &str,
    ) -> std::io::Result<MockDps> {
        let dps = MockServer::serve(ca, server_cert, port, DpsState::new(scope_id))?;
        dps.add_hub(&dps.hub_a());
        dps.add_hub(&dps.hub_b());
        Ok(dps)
    }

    /// `https://127.0.0.1:<port>/`: the `global_endpoint`.
    pub fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}/", self.port())
    }
    /// `localhost:<port>`.
    pub fn hub_a(&self) -> String {
        format!("localhost:{}", self.port())
    }
    /// `127.0.0.1:<port>`.
    pub fn hub_b(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cloud-protocols.md §3.6's vector.
    #[test]
    fn group_key_derivation_vector() {
        let group: Vec<u8> = (0u8..32).collect();
        assert_eq!(
            b64(&derive_device_key(&group, "my-device")),
            "5/aSVLVT+UJYYPEpfGdrbDxkAinp0J5XbJU0TJiD0CY="
        );
    }

    #[test]
    fn routes() {
        assert!(
            matches!(dps_route("/0ne/registrations/r1/register", "0ne"), Some(DpsRoute::Register(r)) if r == "r1")
        );
        assert!(
            matches!(dps_route("/0ne/registrations/r1/operations/op", "0ne"), Some(DpsRoute::Poll(r, o)) if r == "r1" && o == "op")
        );
        assert!(dps_route("/other/registrations/r1/register", "0ne").is_none());
        assert!(dps_route("/0ne/registrations/r1/operations/", "0ne").is_none());
    }
}
