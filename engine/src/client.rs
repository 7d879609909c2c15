//! The synchronous keyd client of the engine (spec common-http.md §4.4): HTTP/1.1 over the unix
//! socket, `POST <path>?api-version=2021-05-01`, JSON body with `content-type` and
//! `content-length`, no Host header. Unlike upstream (a new connection per call) it keeps its
//! connections: a small pool of idle keep-alive connections, so one signature costs one
//! request on an open socket; a kept connection that turns out closed is replaced once.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::error::Error;

/// The api-version the engine speaks (spec keyd.md §9.2).
pub const API_VERSION: &str = "2021-05-01";
/// The compiled-in endpoint (spec keyd.md §9.2).
pub const DEFAULT_ENDPOINT: &str = "unix:///run/aziot/keyd.sock";
/// The override for tests and non-default installs; ignored in setuid/setgid processes
/// (read with secure_getenv semantics). Not in upstream: docs/compatibility.md.
pub const ENDPOINT_ENV: &str = "AZIOT_KEYD_ENDPOINT";

/// How long one request may wait for keyd (a stuck keyd must not hang a TLS handshake forever).
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per client.
const MAX_IDLE: usize = 4;
/// Headers read per response at most (keyd sends a handful).
const MAX_HEADERS: usize = 32;

/// A keyd client. Thread-safe: concurrent calls use separate connections.
#[derive(Debug)]
pub struct KeydClient {
    socket: PathBuf,
    idle: Mutex<Vec<BufReader<UnixStream>>>,
}

impl KeydClient {
    /// A client of the keyd listening at `socket` (no connection is made yet).
    pub fn new(socket: impl Into<PathBuf>) -> KeydClient {
        KeydClient {
            socket: socket.into(),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// A client for an endpoint URL `unix:///path`.
    pub fn from_endpoint(url: &str) -> Result<KeydClient, Error> {
        Ok(KeydClient::new(socket_of(url)?))
    }

    /// The endpoint of the dynamic engine: `$AZIOT_KEYD_ENDPOINT` unless the process is
    /// setuid/setgid (AT_SECURE), else [`DEFAULT_ENDPOINT`].
    pub fn from_environment() -> Result<KeydClient, Error> {
        // SAFETY: getauxval has no preconditions; AT_SECURE is nonzero for set[ug]id/capability
        // transitions, exactly when glibc's secure_getenv returns NULL.
        let secure = unsafe { libc::getauxval(libc::AT_SECURE) } != 0;
        match std::env::var(ENDPOINT_ENV) {
            Ok(url) if !secure && !url.is_empty() => KeydClient::from_endpoint(&url),
            _ => KeydClient::from_endpoint(DEFAULT_ENDPOINT),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Connects now (used to keep a first connection ready, e.g. before a sandbox forbids
    /// new sockets); the connection joins the idle pool.
    pub fn warm_up(&self) -> Result<(), Error> {
        let conn = self.connect()?;
        self.put_back(conn);
        Ok(())
    }

    /// `POST <path>` with a JSON body; the JSON answer of a 200/201.
    pub fn post(&self, path: &str, body: &serde_json::Value) -> Result<serde_json::Value, Error> {
        let body = serde_json::to_vec(body).map_err(|e| Error::Internal(e.to_string()))?;
        let mut head = format!(
            "POST {path}?api-version={API_VERSION} HTTP/1.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        head.extend_from_slice(&body);
        let (status, body) = self.exchange(&head)?;
        match status {
            200 | 201 => serde_json::from_slice(&body)
                .map_err(|e| Error::Protocol(format!("body is not JSON: {e}"))),
            _ => {
                let message = serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
                    .unwrap_or_else(|| format!("HTTP error {status}"));
                Err(Error::Keyd { status, message })
            }
        }
    }

    /// `POST <path>` and the string member `field` of the answer.
    pub fn post_for(
        &self,
        path: &str,
        body: &serde_json::Value,
        field: &str,
    ) -> Result<String, Error> {
        let v = self.post(path, body)?;
        v.get(field)
            .and_then(|s| s.as_str())
            .map(str::to_owned)
            .ok_or_else(|| Error::Protocol(format!("no string {field:?} in the answer to {path}")))
    }

    fn connect(&self) -> Result<BufReader<UnixStream>, Error> {
        let unreachable = |source| Error::Unreachable {
            path: self.socket.display().to_string(),
            source,
        };
        let s = UnixStream::connect(&self.socket).map_err(unreachable)?;
        s.set_read_timeout(Some(IO_TIMEOUT)).map_err(unreachable)?;
        s.set_write_timeout(Some(IO_TIMEOUT)).map_err(unreachable)?;
        Ok(BufReader::new(s))
    }

    fn take_idle(&self) -> Option<BufReader<UnixStream>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()
    }

    fn put_back(&self, conn: BufReader<UnixStream>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    fn exchange(&self, request: &[u8]) -> Result<(u16, Vec<u8>), Error> {
        let io = |source| Error::Io {
            path: self.socket.display().to_string(),
            source,
        };
        // A kept connection keyd has closed meanwhile (idle timeout, restart) fails at once with
        // EPIPE/ECONNRESET or an EOF before the status line: retried once on a new connection.
        if let Some(mut conn) = self.take_idle() {
            match round_trip(&mut conn, request) {
                Ok((status, body, keep)) => {
                    if keep {
                        self.put_back(conn);
                    }
                    return Ok((status, body));
                }
                Err(RoundTrip::Stale) => {}
                Err(RoundTrip::Failed(e)) => return Err(io(e)),
            }
        }
        let mut conn = self.connect()?;
        match round_trip(&mut conn, request) {
            Ok((status, body, keep)) => {
                if keep {
                    self.put_back(conn);
                }
                Ok((status, body))
            }
            Err(RoundTrip::Stale) => Err(io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "keyd closed the connection without answering",
            ))),
            Err(RoundTrip::Failed(e)) => Err(io(e)),
        }
    }
}

/// `unix:///path` → `/path`.
fn socket_of(url: &str) -> Result<PathBuf, Error> {
    match url.strip_prefix("unix://") {
        Some(p) if p.starts_with('/') => Ok(PathBuf::from(p)),
        _ => Err(Error::Endpoint(url.to_owned())),
    }
}

enum RoundTrip {
    /// Nothing came back on a connection that may have been closed by the peer.
    Stale,
    Failed(std::io::Error),
}

/// Writes the request, reads one response: (status, body, connection reusable).
fn round_trip(
    conn: &mut BufReader<UnixStream>,
    request: &[u8],
) -> Result<(u16, Vec<u8>, bool), RoundTrip> {
    use std::io::ErrorKind::*;
    let stale = |e: std::io::Error| match e.kind() {
        BrokenPipe | ConnectionReset | ConnectionAborted | UnexpectedEof => RoundTrip::Stale,
        _ => RoundTrip::Failed(e),
    };
    conn.get_mut().write_all(request).map_err(stale)?;
    let mut line = String::new();
    match conn.read_line(&mut line) {
        Ok(0) => return Err(RoundTrip::Stale),
        Ok(_) => {}
        Err(e) => return Err(stale(e)),
    }
    read_rest(conn, &line).map_err(RoundTrip::Failed)
}

fn read_rest(
    conn: &mut BufReader<UnixStream>,
    status_line: &str,
) -> std::io::Result<(u16, Vec<u8>, bool)> {
    let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
    let mut parts = status_line.split_whitespace();
    let status: u16 = match (parts.next(), parts.next().and_then(|s| s.parse().ok())) {
        (Some(v), Some(s)) if v.starts_with("HTTP/1.") => s,
        _ => return Err(bad(format!("bad status line {:?}", status_line.trim_end()))),
    };
    let mut content_length = None;
    let mut content_type = None;
    let mut keep = true;
    let mut line = String::new();
    for _ in 0..MAX_HEADERS {
        line.clear();
        if conn.read_line(&mut line)? == 0 {
            return Err(bad("truncated response headers".to_owned()));
        }
        let l = line.trim_end();
        if l.is_empty() {
            if status == 204 {
                return Ok((status, Vec::new(), keep));
            }
            if content_type.as_deref() != Some("application/json") {
                return Err(bad(format!(
                    "content-type {content_type:?}, expected application/json (HTTP {status})"
                )));
            }
            let body = match content_length {
                Some(n) => {
                    let mut body = vec![0; n];
                    conn.read_exact(&mut body)?;
                    body
                }
                None => {
                    keep = false;
                    let mut body = Vec::new();
                    conn.read_to_end(&mut body)?;
                    body
                }
            };
            return Ok((status, body, keep));
        }
        let (name, value) = l
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header line {l:?}")))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| bad(format!("bad content-length {value:?}")))?,
            );
        } else if name.eq_ignore_ascii_case("content-type") {
            content_type = Some(value.to_owned());
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            keep = false;
        }
    }
    Err(bad(format!("more than {MAX_HEADERS} response headers")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A one-thread server answering each request on a connection with the next canned response;
    /// returns the socket path and a counter of accepted connections.
    fn serve(
        dir: &Path,
        responses: Vec<String>,
        close_after_each: bool,
    ) -> (PathBuf, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        let sock = dir.join("s.sock");
        let listener = UnixListener::bind(&sock).unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        std::thread::spawn(move || {
            let mut responses = responses.into_iter();
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut r = BufReader::new(stream);
                loop {
                    // read one request: headers, then content-length bytes
                    let mut len = 0;
                    let mut line = String::new();
                    let mut first = true;
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            break;
                        }
                        if first {
                            assert!(
                                line.starts_with("POST /sign?api-version=2021-05-01 HTTP/1.1"),
                                "{line}"
                            );
                            first = false;
                        }
                        assert!(
                            !line.to_ascii_lowercase().starts_with("host:"),
                            "no Host header (common-http §4.4)"
                        );
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap();
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    if first {
                        break;
                    }
                    let mut body = vec![0; len];
                    r.read_exact(&mut body).unwrap();
                    let Some(resp) = responses.next() else { return };
                    r.get_mut().write_all(resp.as_bytes()).unwrap();
                    if close_after_each {
                        break;
                    }
                }
            }
        });
        (sock, accepted)
    }

    fn tmp(tag: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("aziot-engine-client-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn resp(status: &str, ct: &str, body: &str) -> String {
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: {ct}\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    #[test]
    fn one_connection_is_reused() {
        let d = tmp("reuse");
        let ok = resp("200 OK", "application/json", r#"{"signature":"AA"}"#);
        let (sock, accepted) = serve(&d, vec![ok.clone(), ok.clone(), ok], false);
        let c = KeydClient::new(&sock);
        for _ in 0..3 {
            assert_eq!(
                c.post_for("/sign", &serde_json::json!({}), "signature")
                    .unwrap(),
                "AA"
            );
        }
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "three calls, one connection"
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn a_closed_idle_connection_is_replaced_and_errors_carry_keyd_message() {
        let d = tmp("stale");
        let ok = resp("200 OK", "application/json", r#"{"signature":"BB"}"#);
        let err = resp(
            "400 Bad Request",
            "application/json",
            r#"{"message":"parameter \"handle\" has an invalid value\ncaused by: invalid handle"}"#,
        );
        let (sock, accepted) = serve(&d, vec![ok, err], true);
        let c = KeydClient::new(&sock);
        assert_eq!(
            c.post_for("/sign", &serde_json::json!({}), "signature")
                .unwrap(),
            "BB"
        );
        // the server closed that connection: the next call notices and reconnects once
        match c.post("/sign", &serde_json::json!({})) {
            Err(Error::Keyd {
                status: 400,
                message,
            }) => {
                assert_eq!(
                    message,
                    "parameter \"handle\" has an invalid value\ncaused by: invalid handle"
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn wrong_content_type_and_no_server_are_errors() {
        let d = tmp("ct");
        let html = resp("200 OK", "text/html", "hi");
        let (sock, _) = serve(&d, vec![html], false);
        let c = KeydClient::new(&sock);
        assert!(matches!(
            c.post("/sign", &serde_json::json!({})),
            Err(Error::Io { .. })
        ));
        let c = KeydClient::new(d.join("nobody-listens.sock"));
        match c.post("/sign", &serde_json::json!({})) {
            Err(e @ Error::Unreachable { .. }) => {
                assert!(e.to_string().contains("nobody-listens.sock"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_of("unix:///run/aziot/keyd.sock").unwrap(),
            PathBuf::from("/run/aziot/keyd.sock")
        );
        assert!(matches!(
            socket_of("http://localhost:8080"),
            Err(Error::Endpoint(_))
        ));
        assert!(matches!(
            socket_of("unix://relative.sock"),
            Err(Error::Endpoint(_))
        ));
    }
}
