//! Clients over unix sockets, with keep-alive: [`Client`] (async, hyper) for services talking
//! to each other, [`BlockingClient`] (std only) for the OpenSSL engine and other synchronous
//! callers. Both speak the wire of spec common-http §4.4: JSON bodies, `{"message"}` errors.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Mutex;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("could not talk to {path}")]
    Io { path: PathBuf, #[source] source: std::io::Error },
    #[error("HTTP error {status}: {message}")]
    Http { status: u16, message: String },
    #[error("malformed response: {0}")]
    Protocol(String),
    #[error("could not encode or decode a JSON body")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
}

/// Turns a status and body into the caller's type, or the `{"message"}` of an error.
fn decode<T: DeserializeOwned>(status: u16, body: &[u8]) -> Result<T, ClientError> {
    if (200..300).contains(&status) {
        let body: &[u8] = if body.is_empty() { b"null" } else { body };
        return Ok(serde_json::from_slice(body)?);
    }
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        message: String,
    }
    let message = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(b) => b.message,
        Err(_) if body.is_empty() => format!("HTTP error {status}"),
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    };
    Err(ClientError::Http { status, message })
}

fn uri(path: &str, api_version: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    format!("{path}{sep}api-version={api_version}")
}

/// Async client. Idle connections are kept and reused.
#[derive(Debug)]
pub struct Client {
    socket: PathBuf,
    api_version: &'static str,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

impl Client {
    pub fn new(socket: impl Into<PathBuf>, api_version: &'static str) -> Self {
        Client { socket: socket.into(), api_version, idle: Mutex::new(Vec::new()) }
    }

    /// A kept connection (`true`) or a new one (`false`).
    async fn connection(&self) -> Result<(SendRequest<Full<Bytes>>, bool), ClientError> {
        loop {
            let candidate = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            match candidate {
                Some(mut sender) if !sender.is_closed() => {
                    if sender.ready().await.is_ok() {
                        return Ok((sender, true));
                    }
                }
                Some(_) => {}
                None => break,
            }
        }
        Ok((self.connect().await?, false))
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let io_err = |source| ClientError::Io { path: self.socket.clone(), source };
        let stream = tokio::net::UnixStream::connect(&self.socket).await.map_err(io_err)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Sends one request and returns the status and body.
    pub async fn raw(&self, method: hyper::Method, path: &str, body: Option<Vec<u8>>) -> Result<(u16, Bytes), ClientError> {
        let (mut sender, reused) = self.connection().await?;
        let json = body.is_some();
        let body = Bytes::from(body.unwrap_or_default());
        let request = || {
            let mut builder =
                hyper::Request::builder().method(method.clone()).uri(uri(path, self.api_version)).header("host", "localhost");
            if json {
                builder = builder.header("content-type", "application/json");
            }
            builder.body(Full::new(body.clone())).map_err(|e| ClientError::Protocol(e.to_string()))
        };
        let res = match sender.send_request(request()?).await {
            Ok(res) => res,
            // A kept connection the server closed before this request went out (its EOF not
            // seen yet, e.g. the service restarted): the request was not delivered, so it goes
            // once on a new connection — whose failure names the socket (tests/tests/
            // fault_process.rs, a dependency down). As BlockingClient does.
            Err(e) if reused && never_delivered(&e) => {
                sender = self.connect().await?;
                sender.send_request(request()?).await?
            }
            Err(e) => return Err(e.into()),
        };
        let status = res.status().as_u16();
        let body = res.into_body().collect().await?.to_bytes();
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).push(sender);
        Ok((status, body))
    }

    /// A JSON call: `body` serialized when present, the response decoded as `T` (`()` for 204).
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let body = body.map(serde_json::to_vec).transpose()?;
        let (status, bytes) = self.raw(method, path, body).await?;
        decode(status, &bytes)
    }
}

/// Whether a request that failed with `e` cannot have been served: hyper dropped it unsent (the
/// connection was closed), or writing it failed with EPIPE (the peer had closed its end before
/// the request was written whole).
fn never_delivered(e: &hyper::Error) -> bool {
    if e.is_canceled() {
        return true;
    }
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::BrokenPipe;
        }
        cause = c.source();
    }
    false
}

/// Blocking client: writes HTTP/1.1 by hand over a std unix stream and keeps the connection
/// for the next call when the server allows it.
#[derive(Debug)]
pub struct BlockingClient {
    socket: PathBuf,
    api_version: &'static str,
    conn: Mutex<Option<BufReader<UnixStream>>>,
}

struct RawResponse {
    status: u16,
    body: Vec<u8>,
    keep_alive: bool,
}

impl BlockingClient {
    pub fn new(socket: impl Into<PathBuf>, api_version: &'static str) -> Self {
        BlockingClient { socket: socket.into(), api_version, conn: Mutex::new(None) }
    }

    /// Sends one request; a kept connection that turns out dead is replaced once.
    pub fn raw(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<(u16, Vec<u8>), ClientError> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let reused = guard.is_some();
        let io_err = |source| ClientError::Io { path: self.socket.clone(), source };
        let attempt = |conn: &mut Option<BufReader<UnixStream>>| -> Result<RawResponse, std::io::Error> {
            if conn.is_none() {
                *conn = Some(BufReader::new(UnixStream::connect(&self.socket)?));
            }
            let stream = conn.as_mut().expect("connection just set");
            let mut head = format!("{method} {} HTTP/1.1\r\nhost: localhost\r\n", uri(path, self.api_version));
            if let Some(b) = body {
                head.push_str(&format!("content-type: application/json\r\ncontent-length: {}\r\n", b.len()));
            }
            head.push_str("\r\n");
            let mut msg = head.into_bytes();
            msg.extend_from_slice(body.unwrap_or_default());
            stream.get_mut().write_all(&msg)?;
            read_response(stream, method == "HEAD")
        };
        let result = match attempt(&mut guard) {
            Err(_) if reused => {
                *guard = None;
                attempt(&mut guard)
            }
            r => r,
        };
        match result {
            Ok(r) => {
                if !r.keep_alive {
                    *guard = None;
                }
                Ok((r.status, r.body))
            }
            Err(e) => {
                *guard = None;
                Err(io_err(e))
            }
        }
    }

    pub fn call<B: Serialize, T: DeserializeOwned>(&self, method: &str, path: &str, body: Option<&B>) -> Result<T, ClientError> {
        let body = body.map(serde_json::to_vec).transpose()?;
        let (status, bytes) = self.raw(method, path, body.as_deref())?;
        decode(status, &bytes)
    }
}

fn read_response(stream: &mut BufReader<UnixStream>, head_only: bool) -> std::io::Result<RawResponse> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_owned());
    let mut line = String::new();
    if stream.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let mut content_length = None;
    let mut keep_alive = true;
    for _ in 0..64 {
        line.clear();
        if stream.read_line(&mut line)? == 0 {
            return Err(bad("truncated headers"));
        }
        let l = line.trim_end();
        if l.is_empty() {
            let no_body = head_only || status == 204 || status == 304 || (100..200).contains(&status);
            let body = if no_body {
                Vec::new()
            } else if let Some(n) = content_length {
                let mut body = vec![0; n];
                stream.read_exact(&mut body)?;
                body
            } else {
                keep_alive = false;
                let mut body = Vec::new();
                stream.read_to_end(&mut body)?;
                body
            };
            return Ok(RawResponse { status, body, keep_alive });
        }
        let (name, value) = l.split_once(':').ok_or_else(|| bad("bad header"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(value.parse::<usize>().map_err(|_| bad("bad content-length"))?);
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            keep_alive = false;
        }
    }
    Err(bad("too many headers"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{Service, ServerConfig};
    use crate::{ApiError, Request, Response};
    use std::sync::Arc;

    struct Echo;

    impl Service for Echo {
        fn api_versions(&self) -> &'static [&'static str] {
            &["2020-09-01"]
        }
        async fn handle(self: Arc<Self>, mut req: Request) -> Result<Response, ApiError> {
            match (req.method.as_str(), req.path.as_str()) {
                ("POST", "/echo") => {
                    let v = req.required_json::<serde_json::Value>().await?;
                    Ok(Response::json(hyper::StatusCode::OK, &serde_json::json!({"uid": req.uid, "got": v})))
                }
                ("DELETE", "/thing") => Ok(Response::no_content()),
                _ => Err(ApiError::not_found()),
            }
        }
    }

    #[test]
    fn both_clients_against_the_server() {
        let dir = std::env::temp_dir().join(format!("aziot-ipc-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s.sock");
        let listener = crate::listener::bind(&sock).unwrap();
        std::thread::spawn(move || crate::server::run(listener, Arc::new(Echo), ServerConfig::default()));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();

        let blocking = BlockingClient::new(&sock, "2020-09-01");
        for i in 0..3 {
            let v: serde_json::Value = blocking.call("POST", "/echo", Some(&serde_json::json!({"i": i}))).unwrap();
            assert_eq!(v["got"]["i"], i);
            assert_eq!(v["uid"], nix::unistd::getuid().as_raw());
        }
        let () = blocking.call::<(), ()>("DELETE", "/thing", None).unwrap();
        match blocking.call::<(), serde_json::Value>("GET", "/nope", None) {
            Err(ClientError::Http { status: 404, message }) => assert_eq!(message, "not found"),
            other => panic!("{other:?}"),
        }
        match blocking.call::<(), serde_json::Value>("POST", "/echo", None) {
            Err(ClientError::Http { status: 400, message }) => assert_eq!(message, "missing request body"),
            other => panic!("{other:?}"),
        }

        let client = Client::new(&sock, "2020-09-01");
        rt.block_on(async {
            for i in 0..3 {
                let v: serde_json::Value = client.call(hyper::Method::POST, "/echo", Some(&serde_json::json!({"i": i}))).await.unwrap();
                assert_eq!(v["got"]["i"], i);
            }
            assert_eq!(client.idle.lock().unwrap().len(), 1, "the connection is kept and reused");
            let err = client.call::<(), serde_json::Value>(hyper::Method::GET, "/nope", None).await.unwrap_err();
            assert!(matches!(err, ClientError::Http { status: 404, .. }));
        });
        std::fs::remove_dir_all(dir).unwrap();
    }
}
