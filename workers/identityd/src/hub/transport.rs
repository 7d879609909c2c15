//! One HTTPS/1.1 exchange, blocking, bounded by a deadline (cloud-protocols.md §1.1–§1.5):
//! a fresh TCP connection (direct, or an HTTP `CONNECT` tunnel through the proxy of §1.4), TLS
//! with the system trust store (`SSL_CERT_FILE`/`SSL_CERT_DIR` honoured), SNI and host-name
//! verification, optionally a client certificate, one request, one response.
//!
//! Blocking on purpose: an X.509 device key is the engine's in-process twin, whose signature
//! during the handshake is a blocking keyd call. The async client runs each exchange on
//! tokio's blocking pool. Every socket operation is given only the time left before the
//! attempt's deadline, so the whole attempt (connect, TLS, request, response head and body) ends
//! by it (§1.5 step 1).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use base64::Engine as _;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{SslConnector, SslMethod, SslStream};
use openssl::x509::X509;

/// The largest response head or body read.
const MAX_RESPONSE: usize = 16 << 20;

/// Why an exchange failed (the kinds of §1.5 / §4.5).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The deadline passed.
    #[error("the request timed out")]
    TimedOut,
    /// DNS, TCP connect, proxy tunnel or TLS handshake failed.
    #[error("could not connect: {0}")]
    Connect(String),
    /// The connection failed after it was set up (writing the request, reading the response).
    #[error("{0}")]
    Io(String),
    /// The response is not HTTP/1.x.
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
}

/// `host[:port]` as in a URL authority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authority {
    pub host: String,
    pub port: u16,
    /// As written (for `Host` and `CONNECT`): the host, with `:port` when one was given.
    pub text: String,
}

impl Authority {
    /// Parses `host`, `host:port`, `[v6]` or `[v6]:port`; `default_port` when none.
    pub fn parse(s: &str, default_port: u16) -> Result<Authority, String> {
        let bad = || format!("invalid host {s:?}");
        if s.is_empty() || s.contains(['/', '?', '#', '@', ' ']) {
            return Err(bad());
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (h, after) = rest.split_once(']').ok_or_else(bad)?;
            match after.strip_prefix(':') {
                Some(p) => (h.to_owned(), p.parse().map_err(|_| bad())?),
                None if after.is_empty() => (h.to_owned(), default_port),
                None => return Err(bad()),
            }
        } else {
            match s.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| bad())?),
                None => (s.to_owned(), default_port),
            }
        };
        if host.is_empty() {
            return Err(bad());
        }
        Ok(Authority { host, port, text: s.to_owned() })
    }

    fn connect_target(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// An `HTTPS_PROXY` value (§1.4): `http://` or `https://`, optional `user:pass@` (sent as
/// `Proxy-Authorization: Basic`, percent-decoded first).
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    pub tls: bool,
    pub authority: Authority,
    /// The `Proxy-Authorization` header value.
    pub authorization: Option<String>,
    /// The URI with its password masked (for the log).
    pub display: String,
    /// The URI as given (for [`super::HubSettings::proxy`]; carries the password: never log it).
    pub uri: String,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or("truncated percent escape")?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| "invalid percent escape")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "percent escape is not UTF-8".to_owned())
}

impl Proxy {
    pub fn parse(uri: &str) -> Result<Proxy, String> {
        // The error texts never quote the URI: its userinfo may hold a password.
        let (scheme, rest) =
            uri.split_once("://").ok_or_else(|| "the proxy is not an absolute URI (http://... or https://...)".to_owned())?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "http" => false,
            "https" => true,
            other => return Err(format!("proxy scheme {other:?} is not supported (http or https)")),
        };
        let authority_part = rest.split(['/', '?', '#']).next().unwrap_or("");
        let (userinfo, hostport) = match authority_part.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority_part),
        };
        // A password holding an unencoded '/' ends the authority early: not quoted either.
        let authority = Authority::parse(hostport, if tls { 443 } else { 80 })
            .map_err(|_| "the proxy's host[:port] is not valid".to_owned())?;
        let (authorization, display) = match userinfo {
            Some(u) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, ""));
                let creds = format!("{}:{}", percent_decode(user)?, percent_decode(pass)?);
                let header = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(creds));
                let masked = if u.contains(':') { format!("{user}:***") } else { user.to_owned() };
                (Some(header), format!("{scheme}://{masked}@{}", authority.text))
            }
            None => (None, format!("{scheme}://{}", authority.text)),
        };
        Ok(Proxy { tls, authority, authorization, display, uri: uri.to_owned() })
    }
}

/// The proxy variables, in order of preference (§1.4; `NO_PROXY`/`HTTP_PROXY` are ignored).
pub const PROXY_VARS: [&str; 2] = ["HTTPS_PROXY", "https_proxy"];

/// §1.4 at start: `HTTPS_PROXY`, else `https_proxy`, checked with [`Proxy::parse`] (an invalid
/// value is a startup error). `Ok(None)` when neither is set.
pub fn proxy_from_env() -> Result<Option<Proxy>, String> {
    for var in PROXY_VARS {
        if let Some(value) = std::env::var_os(var) {
            let value = value.into_string().map_err(|_| format!("{var} is not UTF-8"))?;
            return Proxy::parse(&value).map(Some).map_err(|e| format!("{var}: {e}"));
        }
    }
    Ok(None)
}

/// A TLS client certificate: `chain[0]` the leaf, then extra chain certificates.
#[derive(Clone)]
pub struct ClientCert {
    pub chain: Vec<X509>,
    pub key: PKey<Private>,
}

/// One request.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: &'static str,
    /// Path and query, already encoded.
    pub path_and_query: String,
    /// Extra headers (`Authorization`, `If-Match`); `Host`, `Content-Type` and `Content-Length`
    /// are added here.
    pub headers: Vec<(&'static str, String)>,
    pub body: Option<Vec<u8>>,
    /// Read the response body (false for Hub DELETE, §4.2).
    pub read_body: bool,
}

/// One response.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// The TLS settings every exchange uses: the system trust store (OpenSSL's default paths, so
/// `SSL_CERT_FILE`/`SSL_CERT_DIR` apply), peer and host-name verification, SNI. Built once at
/// start.
pub fn connector() -> Result<SslConnector, openssl::error::ErrorStack> {
    let mut b = SslConnector::builder(SslMethod::tls_client())?;
    // HTTP/1.1 only (§1.1): no ALPN is offered.
    b.set_default_verify_paths()?;
    Ok(b.build())
}

/// A TCP stream whose every read and write gets only the time left before `deadline`.
struct DeadlineStream {
    tcp: TcpStream,
    deadline: Instant,
}

impl DeadlineStream {
    fn arm(&self) -> io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
        }
        self.tcp.set_read_timeout(Some(left))?;
        self.tcp.set_write_timeout(Some(left))
    }
}

impl Read for DeadlineStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.arm()?;
        self.tcp.read(buf).map_err(timeout_kind)
    }
}

impl Write for DeadlineStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.arm()?;
        self.tcp.write(buf).map_err(timeout_kind)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.tcp.flush()
    }
}

/// A socket timeout surfaces as WouldBlock on Linux.
fn timeout_kind(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, "deadline passed")
    } else {
        e
    }
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)
}

fn io_err(e: io::Error, deadline: Instant) -> TransportError {
    if is_timeout(&e) || Instant::now() >= deadline {
        TransportError::TimedOut
    } else {
        TransportError::Io(e.to_string())
    }
}

fn connect_tcp(a: &Authority, deadline: Instant) -> Result<TcpStream, TransportError> {
    let addrs = a
        .connect_target()
        .to_socket_addrs()
        .map_err(|e| TransportError::Connect(format!("could not resolve {}: {e}", a.host)))?;
    let mut last = format!("{} resolved to no address", a.host);
    for addr in addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TransportError::TimedOut);
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) if is_timeout(&e) => return Err(TransportError::TimedOut),
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    Err(TransportError::Connect(last))
}

fn tls<S: Stream + std::fmt::Debug + 'static>(
    connector: &SslConnector,
    stream: S,
    host: &str,
    cert: Option<&ClientCert>,
    deadline: Instant,
) -> Result<SslStream<S>, TransportError> {
    let mut config = connector.configure().map_err(|e| TransportError::Connect(e.to_string()))?;
    if let Some(cert) = cert {
        let leaf =
            cert.chain.first().ok_or_else(|| TransportError::Connect("empty client certificate chain".into()))?;
        config.set_certificate(leaf).map_err(|e| TransportError::Connect(e.to_string()))?;
        for extra in &cert.chain[1..] {
            config.add_chain_cert(extra.clone()).map_err(|e| TransportError::Connect(e.to_string()))?;
        }
        config.set_private_key(&cert.key).map_err(|e| TransportError::Connect(e.to_string()))?;
    }
    config.connect(host, stream).map_err(|e| {
        if Instant::now() >= deadline {
            TransportError::TimedOut
        } else {
            TransportError::Connect(format!("TLS handshake with {host} failed: {e}"))
        }
    })
}

/// Sends `CONNECT target` on `stream` and reads the proxy's answer (2xx → tunnel open).
fn open_tunnel(
    stream: &mut dyn Stream,
    target: &Authority,
    proxy: &Proxy,
    deadline: Instant,
) -> Result<(), TransportError> {
    let mut head = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n", target.connect_target());
    if let Some(auth) = &proxy.authorization {
        head.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).map_err(|e| io_err(e, deadline))?;
    stream.flush().map_err(|e| io_err(e, deadline))?;
    // Read the answer byte by byte: nothing past its blank line may be consumed (TLS follows).
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        if answer.len() > 64 * 1024 {
            return Err(TransportError::Connect("proxy answer too long".into()));
        }
        match stream.read(&mut byte) {
            Ok(0) => return Err(TransportError::Connect("proxy closed the connection during CONNECT".into())),
            Ok(_) => answer.push(byte[0]),
            Err(e) => return Err(io_err(e, deadline)),
        }
    }
    let line = String::from_utf8_lossy(&answer);
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok()).unwrap_or(0);
    if !(200..300).contains(&status) {
        return Err(TransportError::Connect(format!(
            "proxy {} refused CONNECT {}: {}",
            proxy.display,
            target.text,
            line.lines().next().unwrap_or("")
        )));
    }
    Ok(())
}

/// One exchange with `https://{target}{request.path_and_query}`, finished by `deadline`.
pub fn exchange(
    connector: &SslConnector,
    proxy: Option<&Proxy>,
    target: &Authority,
    cert: Option<&ClientCert>,
    request: &Request,
    deadline: Instant,
) -> Result<Response, TransportError> {
    let mut stream: Box<dyn Stream> = match proxy {
        None => {
            let tcp = DeadlineStream { tcp: connect_tcp(target, deadline)?, deadline };
            Box::new(tls(connector, tcp, &target.host, cert, deadline)?)
        }
        Some(p) => {
            let tcp = DeadlineStream { tcp: connect_tcp(&p.authority, deadline)?, deadline };
            let mut to_proxy: Box<dyn Stream> = if p.tls {
                // §1.4: the same TLS settings, client certificate included.
                Box::new(tls(connector, tcp, &p.authority.host, cert, deadline)?)
            } else {
                Box::new(tcp)
            };
            open_tunnel(&mut *to_proxy, target, p, deadline)?;
            Box::new(tls(connector, BoxedStream(to_proxy), &target.host, cert, deadline)?)
        }
    };

    let mut head = format!("{} {} HTTP/1.1\r\nHost: {}\r\n", request.method, request.path_and_query, target.text);
    for (name, value) in &request.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = &request.body {
        head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    if let Some(body) = &request.body {
        out.extend_from_slice(body);
    }
    stream.write_all(&out).map_err(|e| io_err(e, deadline))?;
    stream.flush().map_err(|e| io_err(e, deadline))?;

    let mut reader = BufReader::new(stream);
    read_response(&mut reader, request.read_body, request.method == "HEAD", deadline)
}

/// A boxed stream as a concrete type (TLS over the tunnel).
struct BoxedStream(Box<dyn Stream>);

impl std::fmt::Debug for BoxedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BoxedStream")
    }
}
impl Read for BoxedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}
impl Write for BoxedStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl std::fmt::Debug for DeadlineStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadlineStream").field("tcp", &self.tcp).finish()
    }
}

fn read_line<R: BufRead>(r: &mut R, deadline: Instant) -> Result<String, TransportError> {
    let mut line = Vec::new();
    let n = r.by_ref().take(64 * 1024).read_until(b'\n', &mut line).map_err(|e| io_err(e, deadline))?;
    if n == 0 {
        return Err(TransportError::Io("connection closed before the response was complete".into()));
    }
    if !line.ends_with(b"\n") {
        return Err(TransportError::Malformed("header line too long".into()));
    }
    String::from_utf8(line)
        .map(|s| s.trim_end_matches(['\r', '\n']).to_owned())
        .map_err(|_| TransportError::Malformed("header is not UTF-8".into()))
}

/// Reads a status line, headers and (when `read_body`) the body: `Content-Length`, chunked, or
/// up to the end of the connection. 1xx interim responses are skipped.
pub fn read_response<R: BufRead>(
    r: &mut R,
    read_body: bool,
    head_only: bool,
    deadline: Instant,
) -> Result<Response, TransportError> {
    loop {
        let status_line = read_line(r, deadline)?;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        if !version.starts_with("HTTP/1.") {
            return Err(TransportError::Malformed(format!("status line {status_line:?}")));
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .filter(|s| (100..1000).contains(s))
            .ok_or_else(|| TransportError::Malformed(format!("status line {status_line:?}")))?;
        let reason = parts.next().unwrap_or("").to_owned();
        let mut headers = Vec::new();
        let mut size = 0usize;
        loop {
            let line = read_line(r, deadline)?;
            size += line.len();
            if size > MAX_RESPONSE {
                return Err(TransportError::Malformed("response head too large".into()));
            }
            if line.is_empty() {
                break;
            }
            let (n, v) = line.split_once(':').ok_or_else(|| TransportError::Malformed(format!("header {line:?}")))?;
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        if (100..200).contains(&status) {
            continue;
        }
        let mut response = Response { status, reason, headers, body: Vec::new() };
        if !read_body || head_only || status == 204 || status == 304 {
            return Ok(response);
        }
        let chunked = response
            .header("transfer-encoding")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("chunked")));
        if chunked {
            response.body = read_chunked(r, deadline)?;
        } else if let Some(len) = response.header("content-length") {
            let len: usize = len.parse().map_err(|_| TransportError::Malformed(format!("content-length {len:?}")))?;
            if len > MAX_RESPONSE {
                return Err(TransportError::Malformed("response body too large".into()));
            }
            let mut body = vec![0u8; len];
            r.read_exact(&mut body).map_err(|e| io_err(e, deadline))?;
            response.body = body;
        } else {
            let mut body = Vec::new();
            r.take(MAX_RESPONSE as u64 + 1).read_to_end(&mut body).map_err(|e| io_err(e, deadline))?;
            if body.len() > MAX_RESPONSE {
                return Err(TransportError::Malformed("response body too large".into()));
            }
            response.body = body;
        }
        return Ok(response);
    }
}

fn read_chunked<R: BufRead>(r: &mut R, deadline: Instant) -> Result<Vec<u8>, TransportError> {
    let mut body = Vec::new();
    loop {
        let line = read_line(r, deadline)?;
        let size_text = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| TransportError::Malformed(format!("chunk size {size_text:?}")))?;
        if size == 0 {
            // Trailers, up to the blank line.
            while !read_line(r, deadline)?.is_empty() {}
            return Ok(body);
        }
        if body.len() + size > MAX_RESPONSE {
            return Err(TransportError::Malformed("response body too large".into()));
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..]).map_err(|e| io_err(e, deadline))?;
        if !read_line(r, deadline)?.is_empty() {
            return Err(TransportError::Malformed("chunk not followed by CRLF".into()));
        }
    }
}

/// The time left before `deadline` (zero when passed).
pub fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities() {
        let a = Authority::parse("hub.example.net", 443).expect("parse");
        assert_eq!((a.host.as_str(), a.port, a.text.as_str()), ("hub.example.net", 443, "hub.example.net"));
        let a = Authority::parse("localhost:8443", 443).expect("parse");
        assert_eq!((a.host.as_str(), a.port), ("localhost", 8443));
        let a = Authority::parse("[::1]:9", 443).expect("parse");
        assert_eq!((a.host.as_str(), a.port, a.connect_target().as_str()), ("::1", 9, "[::1]:9"));
        for bad in ["", "host:", "host:99999", "a/b", "user@host", ":443"] {
            assert!(Authority::parse(bad, 443).is_err(), "{bad:?}");
        }
    }

    /// §1.4: userinfo is percent-decoded and sent as Basic; the password is masked in the log.
    #[test]
    fn proxies() {
        let p = Proxy::parse("http://us%40er:p%3Ass@proxy.local:3128/").expect("parse");
        assert!(!p.tls);
        assert_eq!(p.authority.port, 3128);
        let expected = base64::engine::general_purpose::STANDARD.encode("us@er:p:ss");
        assert_eq!(p.authorization.as_deref(), Some(format!("Basic {expected}").as_str()));
        assert_eq!(p.display, "http://us%40er:***@proxy.local:3128");
        assert!(!format!("{p:?}").contains("p%3Ass"));
        let p = Proxy::parse("https://proxy.local").expect("parse");
        assert!(p.tls && p.authority.port == 443 && p.authorization.is_none());
        assert_eq!(Proxy::parse("http://proxy").expect("parse").authority.port, 80);
        assert!(Proxy::parse("socks5://proxy:1080").is_err());
        assert!(Proxy::parse("proxy:3128").is_err());
    }

    fn parse(raw: &[u8], read_body: bool) -> Result<Response, TransportError> {
        read_response(&mut BufReader::new(raw), read_body, false, Instant::now() + Duration::from_secs(5))
    }

    #[test]
    fn responses() {
        let r = parse(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n[]", true)
            .expect("parse");
        assert_eq!((r.status, r.reason.as_str(), r.body.as_slice()), (200, "OK", &b"[]"[..]));
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        let r = parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n[]\r\n3;x=y\r\n   \r\n0\r\nT: v\r\n\r\n", true)
            .expect("parse");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"[]   "[..]));
        let r = parse(b"HTTP/1.0 404 Not Found\r\n\r\n{\"Message\":\"x\"}", true).expect("parse");
        assert_eq!((r.status, r.body.as_slice()), (404, &b"{\"Message\":\"x\"}"[..]));
        let r = parse(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", false).expect("no body read");
        assert_eq!(r.status, 204);
        assert!(matches!(parse(b"SSH-2.0-x\r\n\r\n", true), Err(TransportError::Malformed(_))));
        assert!(matches!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n[]", true), Err(TransportError::Io(_))));
    }
}
