//! The DPS registration client (cloud-protocols.md §3) on the Hub client's blocking transport
//! ([`crate::hub::transport`]: TLS with the system store, proxy, per-attempt deadline).
//!
//! One registration: (TPM only) round 1 without `Authorization`, answered 401 with the
//! activation blob, imported through tpmd; the register `PUT` (SAS signed by keyd or tpmd, or
//! the TLS client certificate); then status polls until `assigned` or `failed`.
//!
//! Deliberate differences from the original (docs/compatibility.md, DPS rows):
//! * the first status poll is sent at once (the original sleeps 5 s first); later polls wait for
//!   the `Retry-After` of the `assigning` answer when there is one (at most
//!   [`DpsTuning::max_retry_after`]), else [`DpsTuning::poll_interval`] (5 s, as the original);
//! * the whole registration is bounded ([`DpsTuning::max_total`], default 10 × `cloud_timeout_sec`):
//!   past it, provisioning fails with an error that says so (the original polls forever);
//! * a 429 with `Retry-After: <seconds>` waits that long (capped); without it the §1.5 table;
//! * a fresh SAS token for every attempt and every poll (never an expired one);
//! * a register answered 200 with a final status is accepted (the original wants 202);
//! * `failed` and other final statuses become a DPS error naming DPS's code and message;
//! * a DPS 5xx counts as a network error (identityd.md §11.3 falls back to the backup).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use openssl::ssl::SslConnector;
use serde::Deserialize;
use serde_json::Value;

use super::tpm::Tpmd;
use crate::hub::transport::{self, Authority, ClientCert, Proxy, TransportError};
use crate::hub::{sas, HubError, HubErrorKind, SasSigner};

/// The DPS api-version (§3.1).
pub const API_VERSION: &str = "2021-06-01";
/// §1.5 step 3: a 429 on attempt 5 is final.
pub const MAX_ATTEMPTS_THROTTLED: u32 = 5;

/// The TLS settings built before the sandbox (the trust store of `SSL_CERT_FILE` is read then).
static CONNECTOR: OnceLock<Arc<SslConnector>> = OnceLock::new();

/// Builds the TLS settings now (call before the lock-in).
pub fn preload() -> Result<(), openssl::error::ErrorStack> {
    if CONNECTOR.get().is_none() {
        let _ = CONNECTOR.set(Arc::new(transport::connector()?));
    }
    Ok(())
}

/// Timing of a registration. [`DpsTuning::for_timeout`] is the product's; tests shorten it.
#[derive(Clone, Debug)]
pub struct DpsTuning {
    /// §1.5 `B[n]` (n = 1..4) and its jitter bound, when a 429 has no `Retry-After`.
    pub backoff: [Duration; 4],
    pub jitter: [Duration; 4],
    /// Pause before retrying a failed (not throttled) register attempt.
    pub failure_delay: Duration,
    /// The longest `Retry-After` honoured (429 and `assigning`).
    pub max_retry_after: Duration,
    /// Between polls when `assigning` carries no `Retry-After`.
    pub poll_interval: Duration,
    /// Per poll (§3.3: 30 s, no failure retries).
    pub poll_timeout: Duration,
    /// The whole registration.
    pub max_total: Duration,
    pub sas_lifetime_secs: u64,
}

impl DpsTuning {
    /// The product's timing for `cloud_timeout_sec` = `timeout`.
    pub fn for_timeout(timeout: Duration) -> DpsTuning {
        let s = Duration::from_secs;
        DpsTuning {
            backoff: [s(60), s(120), s(180), s(300)],
            jitter: [s(10), s(20), s(30), s(30)],
            failure_delay: s(3),
            max_retry_after: s(330),
            poll_interval: s(5),
            poll_timeout: s(30),
            max_total: timeout * 10,
            sas_lifetime_secs: sas::LIFETIME_SECS,
        }
    }
}

/// How the device authenticates to DPS (§3.2).
#[derive(Clone)]
pub enum DpsAuth {
    /// SAS signed in keyd with the device's DPS key.
    Sas(Arc<dyn SasSigner>),
    /// TLS client certificate.
    X509(ClientCert),
    /// The TPM flow of §3.4 through tpmd.
    Tpm(Arc<Tpmd>),
}

/// One registration's inputs.
#[derive(Clone, Debug)]
pub struct Registration {
    pub endpoint: Authority,
    pub scope_id: String,
    pub registration_id: String,
    pub payload: Option<Value>,
}

/// DPS's answer (§3.5).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub assigned_hub: String,
    pub device_id: String,
    /// The custom allocation payload DPS returned (logged, not stored — §3.3).
    pub payload: Option<Value>,
}

/// The DPS client (settings fixed at start).
pub struct DpsClient {
    connector: Arc<SslConnector>,
    proxy: Option<Proxy>,
    timeout: Duration,
    retries: u32,
    pub tuning: DpsTuning,
}

impl std::fmt::Debug for DpsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpsClient")
            .field("proxy", &self.proxy)
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn err(kind: HubErrorKind, status: Option<u16>, message: impl Into<String>) -> HubError {
    HubError::new(kind, status, message)
}

/// The error body of §3.7: an integer `code` or `errorCode`, a string `message` or
/// `errorMessage` (both names of one field: a parse error).
#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: Option<i64>,
    #[serde(default, rename = "errorCode")]
    error_code: Option<i64>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default, rename = "errorMessage")]
    error_message: Option<String>,
}

impl ErrorBody {
    fn parse(v: &Value) -> Result<(i64, String), String> {
        let b: ErrorBody = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        let code = match (b.code, b.error_code) {
            (Some(c), None) | (None, Some(c)) => c,
            (Some(_), Some(_)) => return Err("duplicate field `code`/`errorCode`".into()),
            (None, None) => return Err("missing field `errorCode`".into()),
        };
        let message = match (b.message, b.error_message) {
            (Some(m), None) | (None, Some(m)) => m,
            (Some(_), Some(_)) => return Err("duplicate field `message`/`errorMessage`".into()),
            (None, None) => return Err("missing field `message`".into()),
        };
        Ok((code, message))
    }
}

fn uniform(max: Duration) -> Duration {
    let mut b = [0u8; 8];
    if max.is_zero() || openssl::rand::rand_bytes(&mut b).is_err() {
        return Duration::ZERO;
    }
    max.mul_f64((u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64)
}

fn retry_after(r: &transport::Response) -> Option<Duration> {
    r.header("retry-after")?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// §1.3 step 1, then the body as JSON (`InvalidData` otherwise).
fn json_body(r: &transport::Response) -> Result<Value, HubError> {
    let status = Some(r.status);
    if let Some(ct) = r.header("content-type") {
        if !ct.to_ascii_lowercase().contains("application/json") {
            return Err(err(
                HubErrorKind::InvalidData,
                status,
                format!(
                    "DPS answered {} {} with Content-Type {ct:?}; expected JSON",
                    r.status, r.reason
                ),
            ));
        }
    }
    serde_json::from_slice(&r.body).map_err(|e| {
        err(
            HubErrorKind::InvalidData,
            status,
            format!(
                "DPS answered {} {} with a body that is not valid JSON: {e}",
                r.status, r.reason
            ),
        )
    })
}

/// A 4xx/5xx answer as an error naming DPS's code and message (§3.7).
fn status_error(r: &transport::Response) -> HubError {
    let status = Some(r.status);
    // §11.3: a DPS that cannot serve right now is a network condition.
    let kind = if r.status >= 500 {
        HubErrorKind::NotConnected
    } else {
        HubErrorKind::Other
    };
    if r.body.is_empty() {
        return err(
            kind,
            status,
            format!("DPS answered HTTP error {} {}", r.status, r.reason),
        );
    }
    match json_body(r).and_then(|v| {
        ErrorBody::parse(&v).map_err(|e| {
            err(
                kind,
                status,
                format!(
                    "DPS answered HTTP error {} {}; its error body does not parse: {e}",
                    r.status, r.reason
                ),
            )
        })
    }) {
        Ok((code, message)) => err(
            kind,
            status,
            format!(
                "DPS answered HTTP error {} {}: {message} (code {code})",
                r.status, r.reason
            ),
        ),
        Err(mut e) => {
            e.kind = if kind == HubErrorKind::NotConnected {
                kind
            } else {
                e.kind
            };
            e
        }
    }
}

fn unexpected(r: &transport::Response, expected: &str) -> HubError {
    err(
        HubErrorKind::Other,
        Some(r.status),
        format!(
            "Expected one of [{expected}], got {} {}",
            r.status, r.reason
        ),
    )
}

/// A DPS operation status (§3.3): `Ok(None)` while assigning.
fn outcome(v: &Value, status: Option<u16>) -> Result<Option<Assignment>, HubError> {
    let invalid = |m: String| err(HubErrorKind::InvalidData, status, m);
    let s = v
        .get("status")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("DPS status without a string `status`: {v}")))?;
    let state = v.get("registrationState").filter(|s| s.is_object());
    match s {
        "assigning" => Ok(None),
        "assigned" => {
            let state = state
                .ok_or_else(|| invalid("DPS status `assigned` without registrationState".into()))?;
            let field = |name: &str| {
                state
                    .get(name)
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        invalid(format!(
                            "DPS status `assigned` without a string registrationState.{name}"
                        ))
                    })
            };
            Ok(Some(Assignment {
                assigned_hub: field("assignedHub")?,
                device_id: field("deviceId")?,
                payload: state.get("payload").filter(|p| !p.is_null()).cloned(),
            }))
        }
        "failed" => {
            let state = state
                .ok_or_else(|| invalid("DPS status `failed` without registrationState".into()))?;
            match ErrorBody::parse(state) {
                Ok((code, message)) => Err(err(
                    HubErrorKind::Other,
                    status,
                    format!("DPS registration failed: {message} (code {code})"),
                )),
                Err(e) => Err(invalid(format!(
                    "DPS registration failed without a usable error: {e}"
                ))),
            }
        }
        other => Err(err(
            HubErrorKind::Other,
            status,
            format!("DPS registration ended with status {other:?}"),
        )),
    }
}

/// Fuzzing entry (fuzz/fuzz_targets/iot_responses.rs): one DPS answer through the checks
/// [`DpsClient::register`] applies to it (status, Content-Type, JSON, operation status, the TPM
/// authenticationKey, `Retry-After`).
#[doc(hidden)]
pub fn classify_for_fuzzing(r: &transport::Response) -> Result<Option<Assignment>, HubError> {
    let _ = retry_after(r);
    if r.status >= 400 {
        return Err(status_error(r));
    }
    let body = json_body(r)?;
    auth_key(Some(&body))?;
    auth_key(body.get("registrationState").and_then(|s| s.get("tpm")))?;
    outcome(&body, Some(r.status))
}

/// The authenticationKey of a TPM answer (round-1 401 body, or registrationState.tpm).
fn auth_key(v: Option<&Value>) -> Result<Option<Vec<u8>>, HubError> {
    let Some(k) = v
        .and_then(|v| v.get("authenticationKey"))
        .filter(|k| !k.is_null())
    else {
        return Ok(None);
    };
    let k = k.as_str().ok_or_else(|| {
        err(
            HubErrorKind::InvalidData,
            None,
            "DPS authenticationKey is not a string",
        )
    })?;
    base64::engine::general_purpose::STANDARD
        .decode(k)
        .map(Some)
        .map_err(|e| {
            err(
                HubErrorKind::InvalidData,
                None,
                format!("DPS authenticationKey is not base64: {e}"),
            )
        })
}

/// §3.2's body, compact, in this field order.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct RegisterBody<'a> {
    registration_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    tpm: Option<TpmBody>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a Value>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct TpmBody {
    endorsement_key: String,
    storage_root_key: String,
}

struct Call {
    method: &'static str,
    path_and_query: String,
    body: Option<Vec<u8>>,
    /// Per-attempt deadline, failure retries.
    timeout: Duration,
    retries: u32,
}

impl DpsClient {
    /// A client with the product's timing for `timeout` (`cloud_timeout_sec`).
    pub fn new(
        timeout: Duration,
        retries: u32,
        proxy: Option<&str>,
    ) -> Result<DpsClient, HubError> {
        DpsClient::with_tuning(timeout, retries, proxy, DpsTuning::for_timeout(timeout))
    }

    pub fn with_tuning(
        timeout: Duration,
        retries: u32,
        proxy: Option<&str>,
        tuning: DpsTuning,
    ) -> Result<DpsClient, HubError> {
        let connector = match CONNECTOR.get() {
            Some(c) => Arc::clone(c),
            None => Arc::new(transport::connector().map_err(|e| {
                err(
                    HubErrorKind::Other,
                    None,
                    format!("could not set up TLS: {e}"),
                )
            })?),
        };
        let proxy = proxy
            .map(Proxy::parse)
            .transpose()
            .map_err(|e| err(HubErrorKind::Other, None, e))?;
        Ok(DpsClient {
            connector,
            proxy,
            timeout,
            retries,
            tuning,
        })
    }

    /// §1.5 for one DPS request: a fresh SAS per attempt, 429 back-off (Retry-After honoured),
    /// failure retries; the last deadline is the registration's.
    async fn send(
        &self,
        reg: &Registration,
        signer: Option<&dyn SasSigner>,
        cert: Option<&ClientCert>,
        call: &Call,
        until: Instant,
    ) -> Result<transport::Response, HubError> {
        let audience = format!("{}/registrations/{}", reg.scope_id, reg.registration_id);
        let mut n: u32 = 1;
        loop {
            if Instant::now() >= until {
                return Err(self.overdue());
            }
            let mut headers = Vec::new();
            if let Some(signer) = signer {
                let token = sas::header(
                    signer,
                    &audience,
                    sas::now_unix(),
                    self.tuning.sas_lifetime_secs,
                    Some("registration"),
                )
                .await
                .map_err(|e| err(HubErrorKind::Other, None, e.to_string()))?;
                headers.push(("Authorization", token));
            }
            let request = transport::Request {
                method: call.method,
                path_and_query: call.path_and_query.clone(),
                headers,
                body: call.body.clone(),
                read_body: true,
            };
            let deadline = (Instant::now() + call.timeout).min(until);
            let (connector, proxy, target, cert) = (
                Arc::clone(&self.connector),
                self.proxy.clone(),
                reg.endpoint.clone(),
                cert.cloned(),
            );
            let attempt = tokio::task::spawn_blocking(move || {
                transport::exchange(
                    &connector,
                    proxy.as_ref(),
                    &target,
                    cert.as_ref(),
                    &request,
                    deadline,
                )
            });
            let result =
                match tokio::time::timeout(call.timeout + Duration::from_secs(1), attempt).await {
                    Err(_) => Err(TransportError::TimedOut),
                    Ok(Err(join)) => Err(TransportError::Io(format!(
                        "the request task failed: {join}"
                    ))),
                    Ok(Ok(r)) => r,
                };
            match result {
                Ok(r) if r.status == 429 => {
                    if n >= MAX_ATTEMPTS_THROTTLED {
                        tracing::warn!("Final HTTP request throttled (attempt {n} of {MAX_ATTEMPTS_THROTTLED}).");
                        return Err(err(
                            HubErrorKind::Throttled,
                            Some(429),
                            format!("DPS throttled the request {n} times (429 Too Many Requests)"),
                        ));
                    }
                    let delay = match retry_after(&r) {
                        Some(d) => d.min(self.tuning.max_retry_after),
                        None => {
                            let i = (n as usize).clamp(1, 4) - 1;
                            self.tuning.backoff[i] + uniform(self.tuning.jitter[i])
                        }
                    };
                    tracing::warn!(
                        "HTTP request throttled (attempt {n} of {MAX_ATTEMPTS_THROTTLED}). Sleeping for {} seconds.",
                        delay.as_secs_f64()
                    );
                    self.sleep_until(delay, until).await?;
                }
                Ok(r) => return Ok(r),
                Err(e) => {
                    tracing::warn!(
                        "Failed to send HTTP request (attempt {n} of {}): {e}",
                        call.retries + 1
                    );
                    if n > call.retries || Instant::now() >= until {
                        let kind = match e {
                            TransportError::TimedOut => HubErrorKind::TimedOut,
                            TransportError::Connect(_) => HubErrorKind::NotConnected,
                            TransportError::Malformed(_) => HubErrorKind::InvalidData,
                            TransportError::Io(_) => HubErrorKind::Other,
                        };
                        return Err(err(
                            kind,
                            None,
                            format!("could not reach DPS at {}: {e}", reg.endpoint.text),
                        ));
                    }
                    self.sleep_until(self.tuning.failure_delay, until).await?;
                }
            }
            n += 1;
        }
    }

    fn overdue(&self) -> HubError {
        err(
            HubErrorKind::TimedOut,
            None,
            format!(
                "DPS registration did not complete within {} s",
                self.tuning.max_total.as_secs_f64()
            ),
        )
    }

    async fn sleep_until(&self, d: Duration, until: Instant) -> Result<(), HubError> {
        if Instant::now() + d > until {
            return Err(self.overdue());
        }
        tokio::time::sleep(d).await;
        Ok(())
    }

    fn register_call(&self, reg: &Registration, tpm: Option<(&[u8], &[u8])>) -> Call {
        let b = |k: &[u8]| base64::engine::general_purpose::STANDARD.encode(k);
        let body = RegisterBody {
            registration_id: &reg.registration_id,
            tpm: tpm.map(|(ek, srk)| TpmBody {
                endorsement_key: b(ek),
                storage_root_key: b(srk),
            }),
            payload: reg.payload.as_ref(),
        };
        Call {
            method: "PUT",
            path_and_query: format!(
                "/{}/registrations/{}/register?api-version={API_VERSION}",
                reg.scope_id, reg.registration_id
            ),
            body: Some(serde_json::to_vec(&body).expect("the register body serializes")),
            timeout: self.timeout,
            retries: self.retries,
        }
    }

    /// Registers with DPS (§3.2–§3.4) and returns the assignment. For TPM, DPS's keys are
    /// imported into the TPM on the way (the last one imported signs everything after).
    pub async fn register(
        &self,
        reg: &Registration,
        auth: &DpsAuth,
    ) -> Result<Assignment, HubError> {
        let until = Instant::now() + self.tuning.max_total;
        let (signer, cert): (Option<Arc<dyn SasSigner>>, Option<&ClientCert>) = match auth {
            DpsAuth::Sas(s) => (Some(Arc::clone(s)), None),
            DpsAuth::X509(c) => (None, Some(c)),
            DpsAuth::Tpm(tpmd) => {
                // §3.4 round 1: the EK and SRK, no Authorization; DPS answers 401 with the blob.
                let (ek, srk) = tpmd.keys().await.map_err(|e| {
                    err(
                        HubErrorKind::Other,
                        None,
                        format!(
                            "could not read the TPM's keys from tpmd: {}",
                            crate::keys::error_chain(&e)
                        ),
                    )
                })?;
                let call = self.register_call(reg, Some((&ek, &srk)));
                let r = self.send(reg, None, None, &call, until).await?;
                if r.status != 401 {
                    return Err(if r.status >= 400 {
                        status_error(&r)
                    } else {
                        unexpected(&r, "401")
                    });
                }
                let body = json_body(&r)?;
                let Some(blob) = auth_key(Some(&body))? else {
                    return Err(status_error(&r));
                };
                tpmd.import_auth_key(&blob).await.map_err(|e| {
                    err(
                        HubErrorKind::Other,
                        None,
                        format!(
                            "tpmd could not import DPS's authentication key: {}",
                            crate::keys::error_chain(&e)
                        ),
                    )
                })?;
                tracing::info!("Imported DPS authentication key into TPM.");
                (Some(Arc::clone(tpmd) as Arc<dyn SasSigner>), None)
            }
        };
        let signer = signer.as_deref();
        let call = self.register_call(reg, None);
        let r = self.send(reg, signer, cert, &call, until).await?;
        let operation_id = match r.status {
            202 => {
                let body = json_body(&r)?;
                body.get("operationId")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        err(
                            HubErrorKind::InvalidData,
                            Some(202),
                            "DPS accepted the registration without an operationId",
                        )
                    })?
            }
            200 => {
                // Additive (§3.3 Recommendation): a final status at once.
                let body = json_body(&r)?;
                if let Some(a) = outcome(&body, Some(200))? {
                    return self.assigned(a, &body, auth).await;
                }
                body.get("operationId")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        err(
                            HubErrorKind::InvalidData,
                            Some(200),
                            "DPS answered 200 without a final status or an operationId",
                        )
                    })?
            }
            s if s >= 400 => return Err(status_error(&r)),
            _ => return Err(unexpected(&r, "202")),
        };
        let poll = Call {
            method: "GET",
            path_and_query: format!(
                "/{}/registrations/{}/operations/{}?api-version={API_VERSION}",
                reg.scope_id, reg.registration_id, operation_id
            ),
            body: None,
            timeout: self.tuning.poll_timeout,
            retries: 0,
        };
        // The first poll at once (the original sleeps 5 s first).
        loop {
            let r = self.send(reg, signer, cert, &poll, until).await?;
            if !matches!(r.status, 200 | 202) {
                return Err(if r.status >= 400 {
                    status_error(&r)
                } else {
                    unexpected(&r, "200, 202")
                });
            }
            let body = json_body(&r)?;
            match outcome(&body, Some(r.status))? {
                Some(a) => return self.assigned(a, &body, auth).await,
                None => {
                    tracing::info!("DPS registration is still in progress.");
                    let wait = retry_after(&r).map_or(self.tuning.poll_interval, |d| {
                        d.min(self.tuning.max_retry_after)
                    });
                    self.sleep_until(wait, until).await?;
                }
            }
        }
    }

    async fn assigned(
        &self,
        a: Assignment,
        body: &Value,
        auth: &DpsAuth,
    ) -> Result<Assignment, HubError> {
        if let DpsAuth::Tpm(tpmd) = auth {
            // §3.4 step 5: a key in the result replaces the challenge's.
            if let Some(blob) = auth_key(body.get("registrationState").and_then(|s| s.get("tpm")))?
            {
                tpmd.import_auth_key(&blob).await.map_err(|e| {
                    err(
                        HubErrorKind::Other,
                        None,
                        format!(
                            "tpmd could not import DPS's authentication key: {}",
                            crate::keys::error_chain(&e)
                        ),
                    )
                })?;
                tracing::info!("Imported DPS authentication key into TPM.");
            }
        }
        if let Some(p) = &a.payload {
            tracing::info!("DPS returned a custom allocation payload: {p}");
        }
        tracing::info!("Assigned to IoT hub: {}", a.assigned_hub);
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn error_bodies() {
        assert_eq!(
            ErrorBody::parse(
                &json!({"errorCode": 401002, "message": "Unauthorized", "trackingId": "t"})
            ),
            Ok((401002, "Unauthorized".into()))
        );
        assert_eq!(
            ErrorBody::parse(&json!({"code": 1, "errorMessage": "x"})),
            Ok((1, "x".into()))
        );
        assert!(ErrorBody::parse(&json!({"code": 1, "errorCode": 2, "message": "x"})).is_err());
        assert!(
            ErrorBody::parse(&json!({"code": 1, "message": "x", "errorMessage": "y"})).is_err()
        );
        assert!(ErrorBody::parse(&json!({"message": "x"})).is_err());
        assert!(ErrorBody::parse(&json!({"code": "1", "message": "x"})).is_err());
    }

    #[test]
    fn outcomes() {
        assert_eq!(
            outcome(
                &json!({"status": "assigning", "registrationState": {"registrationId": "r"}}),
                None
            )
            .unwrap(),
            None
        );
        let a = outcome(
            &json!({"status": "assigned", "registrationState": {"assignedHub": "h:1", "deviceId": "d", "payload": {"a": 1}}}),
            None,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (a.assigned_hub.as_str(), a.device_id.as_str()),
            ("h:1", "d")
        );
        assert_eq!(a.payload, Some(json!({"a": 1})));
        let e = outcome(
            &json!({"status": "failed", "registrationState": {"errorCode": 400209, "errorMessage": "Custom allocation failed"}}),
            None,
        )
        .unwrap_err();
        assert_eq!(
            e.message,
            "DPS registration failed: Custom allocation failed (code 400209)"
        );
        assert!(!e.is_network());
        assert!(outcome(&json!({"status": "disabled"}), None)
            .unwrap_err()
            .message
            .contains("\"disabled\""));
        assert_eq!(
            outcome(&json!({"status": "assigned"}), None)
                .unwrap_err()
                .kind,
            HubErrorKind::InvalidData
        );
    }
}
