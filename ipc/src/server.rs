//! The HTTP/1.1 server over a unix-socket listener, and the request pipeline shared by every
//! service (spec common-http §5–7): caller identity at accept, per-uid connection throttling,
//! api-version checks, JSON bodies with a size cap and a read deadline, and the
//! `{"message": ...}` error body.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Upstream has no body cap; we answer 413 above this (spec common-http §4.3 Recommendation).
pub const DEFAULT_BODY_LIMIT: usize = 16 * 1024 * 1024;
/// The whole body must arrive within this time of the handler starting to read it.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Per-uid simultaneous connection limit (`max_requests`, default 10).
    pub max_requests: usize,
    pub body_limit: usize,
    pub body_timeout: Duration,
    /// Threads serving connections (each a single-threaded runtime).
    pub threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig { max_requests: 10, body_limit: DEFAULT_BODY_LIMIT, body_timeout: BODY_TIMEOUT, threads: 2 }
    }
}

/// A service: its api-versions and a handler. The pipeline has already checked the
/// api-version when `handle` runs; routing and method dispatch are the service's. An error is
/// answered as its status and `{"message": ...}`.
pub trait Service: Send + Sync + 'static {
    /// Accepted `api-version` values, exact strings.
    fn api_versions(&self) -> &'static [&'static str];
    fn handle(self: Arc<Self>, req: Request) -> impl Future<Output = Result<Response, ApiError>> + Send;
}

/// An error answered as `status` + `{"message": message}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into() }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
    pub fn not_found() -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "not found")
    }
    /// Upstream answers an unsupported method with 400, never 405.
    pub fn method_not_allowed() -> Self {
        ApiError::bad_request("method not allowed")
    }
    pub fn missing_body() -> Self {
        ApiError::bad_request("missing request body")
    }
    /// 500 with the fixed message; the cause belongs in the log only.
    pub fn internal() -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

/// A response ready to send.
#[derive(Debug)]
pub struct Response(hyper::Response<Full<Bytes>>);

impl Response {
    /// `status` with a JSON body, `Content-Type: application/json` and `Content-Length`.
    pub fn json<T: Serialize>(status: StatusCode, body: &T) -> Self {
        match serde_json::to_vec(body) {
            Ok(bytes) => Response::raw_json(status, bytes),
            Err(e) => {
                tracing::error!("!!! could not serialize response: {e}");
                ApiError::internal().into()
            }
        }
    }

    fn raw_json(status: StatusCode, bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        let mut res = hyper::Response::new(Full::new(Bytes::from(bytes)));
        *res.status_mut() = status;
        res.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        res.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(len));
        Response(res)
    }

    /// 204 with an empty body.
    pub fn no_content() -> Self {
        let mut res = hyper::Response::new(Full::new(Bytes::new()));
        *res.status_mut() = StatusCode::NO_CONTENT;
        Response(res)
    }

    pub fn status(&self) -> StatusCode {
        self.0.status()
    }
}

impl From<ApiError> for Response {
    fn from(e: ApiError) -> Self {
        #[derive(Serialize)]
        struct Body<'a> {
            message: &'a str,
        }
        Response::json(e.status, &Body { message: &e.message })
    }
}

/// One request, after the api-version checks.
#[derive(Debug)]
pub struct Request {
    pub method: Method,
    /// The raw (still percent-encoded) path.
    pub path: String,
    /// The raw query string (identityd reads its `type` parameter).
    pub query: Option<String>,
    pub api_version: &'static str,
    /// Caller identity, read with `SO_PEERCRED` at accept.
    pub uid: u32,
    pub pid: i32,
    content_type: Option<String>,
    content_length: Option<u64>,
    body: Option<Incoming>,
    body_limit: usize,
    body_timeout: Duration,
}

impl Request {
    /// Reads the whole body within the deadline and the size cap.
    pub async fn read_body(&mut self) -> Result<Bytes, ApiError> {
        let Some(body) = self.body.take() else { return Ok(Bytes::new()) };
        let too_large = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body too large (the limit is {} bytes)", self.body_limit),
            )
        };
        if self.content_length.is_some_and(|n| n > self.body_limit as u64) {
            return Err(too_large());
        }
        let collect = Limited::new(body, self.body_limit).collect();
        match tokio::time::timeout(self.body_timeout, collect).await {
            Err(_) => Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "deadline has elapsed")),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
            Ok(Err(e)) => Err(ApiError::bad_request(e.to_string())),
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
        }
    }

    fn content_type_is_json(&self) -> bool {
        match &self.content_type {
            None => true,
            Some(ct) => ct.split(';').next().unwrap_or("").trim() == "application/json",
        }
    }

    /// The body of a POST or DELETE: `None` when empty or not JSON-typed (spec §5 step 5),
    /// 422 with the parser's message when it does not decode.
    pub async fn json<T: DeserializeOwned>(&mut self) -> Result<Option<T>, ApiError> {
        let bytes = self.read_body().await?;
        if bytes.is_empty() || !self.content_type_is_json() {
            return Ok(None);
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))
    }

    /// Like [`Request::json`], answering 400 `missing request body` when there is none.
    pub async fn required_json<T: DeserializeOwned>(&mut self) -> Result<T, ApiError> {
        self.json().await?.ok_or_else(ApiError::missing_body)
    }

    /// The answer for a method the route does not implement: like upstream, a PUT body is
    /// still decoded first (415/422) and a POST/DELETE body too (422), then 400
    /// `method not allowed` (common-http §5).
    pub async fn unsupported_method(&mut self) -> ApiError {
        let decoded = match self.method {
            Method::PUT => self.put_json::<serde::de::IgnoredAny>().await.map(|_| ()),
            Method::POST | Method::DELETE => self.json::<serde::de::IgnoredAny>().await.map(|_| ()),
            _ => Ok(()),
        };
        decoded.err().unwrap_or_else(ApiError::method_not_allowed)
    }

    /// The body of a PUT: 415 unless JSON-typed; an empty body is a decode error (422).
    pub async fn put_json<T: DeserializeOwned>(&mut self) -> Result<T, ApiError> {
        if !self.content_type_is_json() {
            return Err(ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "request body must be application/json"));
        }
        let bytes = self.read_body().await?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))
    }
}

/// Extracts `api-version` from a query string (`application/x-www-form-urlencoded`; the last
/// occurrence wins).
pub fn api_version_of(query: Option<&str>) -> Option<String> {
    let mut found = None;
    for pair in query?.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if form_decode(k).as_deref() == Some("api-version") {
            found = form_decode(v);
        }
    }
    found
}

fn form_decode(s: &str) -> Option<String> {
    crate::endpoint::percent_decode(&s.replace('+', " "))
}

/// Matches a raw path against a route pattern of literal segments and `{}` captures
/// (`[^/]+`); captures are percent-decoded as UTF-8, and a capture that does not decode makes
/// the route not match (spec common-http §5 step 4).
pub fn match_route(pattern: &str, path: &str) -> Option<Vec<String>> {
    let mut captures = Vec::new();
    let mut p = pattern.split('/');
    let mut s = path.split('/');
    loop {
        match (p.next(), s.next()) {
            (None, None) => return Some(captures),
            (Some("{}"), Some(seg)) if !seg.is_empty() => captures.push(crate::endpoint::percent_decode(seg)?),
            (Some(lit), Some(seg)) if lit == seg => {}
            _ => return None,
        }
    }
}

/// Per-uid simultaneous-connection counters (spec common-http §7.3).
#[derive(Debug)]
struct Throttle {
    max: usize,
    in_use: Mutex<HashMap<u32, usize>>,
}

impl Throttle {
    fn acquire(self: &Arc<Self>, uid: u32) -> Option<ThrottleGuard> {
        let mut map = self.in_use.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(uid).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ThrottleGuard { throttle: Arc::clone(self), uid })
    }
}

struct ThrottleGuard {
    throttle: Arc<Throttle>,
    uid: u32,
}

impl Drop for ThrottleGuard {
    fn drop(&mut self) {
        let mut map = self.throttle.in_use.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.uid) {
            *n = n.saturating_sub(1);
        }
    }
}

/// A connection on its way from the acceptor to the thread that will serve it.
struct Accepted {
    stream: std::os::unix::net::UnixStream,
    uid: u32,
    pid: i32,
    guard: ThrottleGuard,
    slot: Slot,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Connections a worker holds at most: its descriptor limit less a reserve for what serving a
/// request opens (key and cert files, connections to keyd/certd/tpmd, TLS to the cloud), so an
/// admitted request never fails for want of a descriptor. Connections beyond it wait in the
/// listen backlog until one closes. `None` (no cap) outside a locked-in worker.
fn connection_budget(nofile: Option<u64>) -> Option<usize> {
    let limit = usize::try_from(nofile?).ok()?;
    let reserve = (limit / 8).max(32);
    Some(limit.saturating_sub(reserve).max(1))
}

/// Why a worker's [`serve_worker`] returned.
#[derive(Debug, thiserror::Error)]
pub enum WorkerServeError {
    #[error("could not start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("the server stopped")]
    Serve(#[source] std::io::Error),
}

/// A worker's serving loop, the same for every service: with `control` (the hand-off socket),
/// a thread parses each config the broker sends as `C` and gives it to `reload` (which applies
/// what the service hot-reloads, as upstream: the callers); then `service` is served on
/// `listener` with `max_requests` connections per uid. Builds the runtime: call only once the
/// sandbox is in place (the runtime's threads inherit it). Returns only on failure.
pub fn serve_worker<S: Service, C: DeserializeOwned>(
    listener: std::os::unix::net::UnixListener,
    service: Arc<S>,
    max_requests: usize,
    control: Option<std::os::fd::OwnedFd>,
    reload: impl Fn(&S, C) + Send + 'static,
) -> WorkerServeError {
    let target = Arc::clone(&service);
    let applied = crate::handoff::spawn_control(control, move |text| {
        let config = toml::from_str::<C>(text).map_err(|e| e.to_string())?;
        reload(&target, config);
        Ok(())
    });
    if let Err(e) = applied {
        return WorkerServeError::Runtime(e);
    }
    tracing::info!("Starting server...");
    WorkerServeError::Serve(run(listener, service, ServerConfig { max_requests, ..ServerConfig::default() }))
}

/// Serves `service` on `listener` until the acceptor fails. Runs `config.threads`
/// single-threaded runtimes (this thread is the first): this thread accepts, and each
/// connection is handed to the least-loaded thread, which serves it to the end — no
/// cross-thread wake-up per request. Accept errors are logged and the loop goes on
/// (upstream dies on them).
pub fn run<S: Service>(listener: std::os::unix::net::UnixListener, service: Arc<S>, config: ServerConfig) -> std::io::Error {
    let threads = config.threads.max(1);
    let throttle = Arc::new(Throttle { max: config.max_requests, in_use: Mutex::new(HashMap::new()) });
    let config = Arc::new(config);
    let load: Arc<Vec<std::sync::atomic::AtomicUsize>> =
        Arc::new((0..threads).map(|_| std::sync::atomic::AtomicUsize::new(0)).collect());
    let mut senders = Vec::with_capacity(threads - 1);
    for i in 1..threads {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Accepted>();
        senders.push(tx);
        let (service, config) = (Arc::clone(&service), Arc::clone(&config));
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(r) => r,
            Err(e) => return e,
        };
        let spawned = std::thread::Builder::new().name(format!("aziot-http-{i}")).spawn(move || {
            runtime.block_on(async move {
                while let Some(accepted) = rx.recv().await {
                    match tokio::net::UnixStream::from_std(accepted.stream) {
                        Ok(stream) => {
                            let guards = (accepted.guard, accepted.slot, accepted.permit);
                            tokio::spawn(connection(Arc::clone(&service), Arc::clone(&config), stream, accepted.uid, accepted.pid, guards));
                        }
                        Err(e) => tracing::warn!("could not register a connection: {e}"),
                    }
                }
            })
        });
        if let Err(e) = spawned {
            return e;
        }
    }
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return e,
    };
    runtime.block_on(accept_loop(listener, service, config, throttle, load, senders))
}

/// Decrements its thread's connection count when the connection ends.
struct Slot {
    load: Arc<Vec<std::sync::atomic::AtomicUsize>>,
    index: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.load[self.index].fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn accept_loop<S: Service>(
    listener: std::os::unix::net::UnixListener,
    service: Arc<S>,
    config: Arc<ServerConfig>,
    throttle: Arc<Throttle>,
    load: Arc<Vec<std::sync::atomic::AtomicUsize>>,
    senders: Vec<tokio::sync::mpsc::UnboundedSender<Accepted>>,
) -> std::io::Error {
    use std::sync::atomic::Ordering;
    if let Err(e) = listener.set_nonblocking(true) {
        return e;
    }
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => return e,
    };
    let budget = connection_budget(aziot_policy::applied_nofile());
    let open = budget.map(|n| Arc::new(tokio::sync::Semaphore::new(n)));
    let mut at_budget = false;
    loop {
        let permit = match &open {
            Some(open) => {
                if open.available_permits() == 0 && !at_budget {
                    at_budget = true;
                    tracing::warn!(
                        "{} connections open, as many as this worker's descriptor limit allows: new connections wait until one closes",
                        budget.unwrap_or(0)
                    );
                }
                match Arc::clone(open).acquire_owned().await {
                    Ok(p) => Some(p),
                    Err(_) => None,
                }
            }
            None => None,
        };
        if open.as_ref().is_some_and(|o| o.available_permits() > 0) {
            at_budget = false;
        }
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("could not accept a connection: {e}");
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
        };
        let cred = match stream.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("could not read the credentials of a connection: {e}");
                continue;
            }
        };
        let (uid, pid) = (cred.uid(), cred.pid().unwrap_or(0));
        let Some(guard) = throttle.acquire(uid) else {
            tracing::info!("Max simultaneous connections reached for user {uid}");
            drop(stream);
            // A uid reconnecting in a loop must not monopolise this thread: the connections it
            // serves get their turn between two refusals (tests/tests/load.rs, load-bench fairness).
            tokio::task::yield_now().await;
            continue;
        };
        // The least-loaded thread takes it (this one on ties).
        let index = (0..load.len()).min_by_key(|&i| load[i].load(Ordering::Relaxed)).unwrap_or(0);
        load[index].fetch_add(1, Ordering::Relaxed);
        let slot = Slot { load: Arc::clone(&load), index };
        if index == 0 {
            tokio::spawn(connection(Arc::clone(&service), Arc::clone(&config), stream, uid, pid, (guard, slot, permit)));
            continue;
        }
        match stream.into_std() {
            Ok(stream) => {
                // On failure the connection (with its guard and slot) is dropped: the client
                // sees the connection closed.
                let _ = senders[index - 1].send(Accepted { stream, uid, pid, guard, slot, permit });
            }
            Err(e) => tracing::warn!("could not hand a connection over: {e}"),
        }
    }
}

async fn connection<S: Service, G: Send + 'static, I>(
    service: Arc<S>,
    config: Arc<ServerConfig>,
    stream: I,
    uid: u32,
    pid: i32,
    guards: G,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let _guards = guards;
    let svc = hyper::service::service_fn(move |req| {
        let service = Arc::clone(&service);
        let config = Arc::clone(&config);
        async move { Ok::<_, Infallible>(dispatch(service, req, uid, pid, &config).await.0) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await {
        tracing::debug!("connection from uid {uid} ended: {e}");
    }
}

/// Fuzzing entry (fuzz/fuzz_targets/http_request.rs): serves one connection on any byte
/// stream (an in-memory pipe) through the same hyper HTTP/1 connection and pipeline as
/// [`run`], as caller `uid`/`pid`, without the acceptor's throttle.
#[doc(hidden)]
pub async fn serve_connection<S: Service, I>(service: Arc<S>, config: ServerConfig, stream: I, uid: u32, pid: i32)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    connection(service, Arc::new(config), stream, uid, pid, ()).await
}

async fn dispatch<S: Service>(
    service: Arc<S>,
    req: hyper::Request<Incoming>,
    uid: u32,
    pid: i32,
    config: &ServerConfig,
) -> Response {
    tracing::debug!("<-- {} {:?} from uid {uid}", req.method(), req.uri());
    let response = pipeline(service, req, uid, pid, config).await;
    tracing::debug!("--> {}", response.status());
    response
}

async fn pipeline<S: Service>(
    service: Arc<S>,
    req: hyper::Request<Incoming>,
    uid: u32,
    pid: i32,
    config: &ServerConfig,
) -> Response {
    let Some(version) = api_version_of(req.uri().query()) else {
        return ApiError::bad_request("api-version not specified").into();
    };
    let Some(api_version) = service.api_versions().iter().copied().find(|v| *v == version) else {
        return ApiError::bad_request(format!("invalid api-version {version:?}")).into();
    };
    let (parts, body) = req.into_parts();
    let header_str = |name| parts.headers.get(name).and_then(|v: &HeaderValue| v.to_str().ok());
    let request = Request {
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        api_version,
        uid,
        pid,
        content_type: header_str(CONTENT_TYPE).map(str::to_owned),
        content_length: header_str(CONTENT_LENGTH).and_then(|v| v.parse().ok()),
        method: parts.method,
        body: Some(body),
        body_limit: config.body_limit,
        body_timeout: config.body_timeout,
    };
    service.handle(request).await.unwrap_or_else(Response::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_budget_keeps_a_reserve() {
        assert_eq!(connection_budget(None), None);
        assert_eq!(connection_budget(Some(4096)), Some(4096 - 512));
        assert_eq!(connection_budget(Some(1024)), Some(1024 - 128));
        assert_eq!(connection_budget(Some(48)), Some(16));
        assert_eq!(connection_budget(Some(20)), Some(1));
    }

    #[test]
    fn api_version_parsing() {
        assert_eq!(api_version_of(Some("api-version=2020-09-01")).as_deref(), Some("2020-09-01"));
        assert_eq!(api_version_of(Some("a=b&api-version=1&api-version=2")).as_deref(), Some("2"));
        assert_eq!(api_version_of(Some("api%2Dversion=x+y")).as_deref(), Some("x y"));
        assert_eq!(api_version_of(Some("x=1")), None);
        assert_eq!(api_version_of(None), None);
    }

    #[test]
    fn routes() {
        assert_eq!(match_route("/key", "/key"), Some(vec![]));
        assert_eq!(match_route("/key/{}", "/key/a%2Fb"), Some(vec!["a/b".to_owned()]));
        assert_eq!(match_route("/key/{}", "/key/"), None);
        assert_eq!(match_route("/key", "/key/"), None);
        assert_eq!(match_route("/key/{}", "/key/a/b"), None);
        assert_eq!(match_route("/key/{}", "/key/%ff"), None);
        assert_eq!(match_route("/derivedkey/export", "/derivedkey/export"), Some(vec![]));
    }

    #[test]
    fn throttle_counts_per_uid() {
        let t = Arc::new(Throttle { max: 2, in_use: Mutex::new(HashMap::new()) });
        let a = t.acquire(5).unwrap();
        let _b = t.acquire(5).unwrap();
        assert!(t.acquire(5).is_none());
        assert!(t.acquire(6).is_some());
        drop(a);
        assert!(t.acquire(5).is_some());
        let zero = Arc::new(Throttle { max: 0, in_use: Mutex::new(HashMap::new()) });
        assert!(zero.acquire(0).is_none());
    }
}
