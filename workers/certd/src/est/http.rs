//! A small blocking HTTP/1.1 client for EST (spec certd.md §6.5): one connection per request,
//! TLS by OpenSSL with an explicit trust store, a client certificate whose key may be held by
//! keyd (the engine's in-process twin: its signatures are blocking calls to keyd, which is why
//! the whole exchange runs on a blocking thread), HTTP `CONNECT` through a proxy, and a deadline
//! for the whole exchange (connect, handshake, request, response).
//!
//! Host names: this build connects to IP literals and `localhost` only (no resolver in the
//! worker: its seccomp filter allows no UDP socket; docs/certd.md "EST").

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use openssl::pkey::{PKey, Private};
use openssl::ssl::{HandshakeError, Ssl, SslContext, SslContextBuilder, SslMethod, SslVerifyMode, SslVersion};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::X509;

/// The longest response body accepted (a certificate chain is a few KiB).
pub const MAX_BODY: usize = 1 << 20;
/// Longest header line, and most header lines, of a response.
const MAX_LINE: usize = 16 * 1024;
const MAX_HEADERS: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("invalid URL {0:?}: {1}")]
    Url(String, &'static str),
    #[error(
        "cannot resolve host name {0:?}: certd connects to IP addresses and \"localhost\" only (no DNS in its sandbox)"
    )]
    HostName(String),
    #[error("could not connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {host} failed: {detail}")]
    Tls { host: String, detail: String },
    #[error("could not set up TLS")]
    TlsSetup(#[from] openssl::error::ErrorStack),
    #[error("timed out after {0:?} ({1})")]
    Timeout(Duration, &'static str),
    #[error("I/O error talking to {host}")]
    Io {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed HTTP response from {host}: {what}")]
    Protocol { host: String, what: String },
    #[error("the proxy refused the tunnel to {target}: {status_line}")]
    Proxy { target: String, status_line: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

/// An absolute `http(s)://` URL as this client needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    pub scheme: Scheme,
    /// Without brackets for IPv6.
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
    /// Percent-decoded `user:password` of the authority, if any.
    pub userinfo: Option<(String, String)>,
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl Url {
    pub fn parse(s: &str) -> Result<Url, HttpError> {
        let bad = |why| HttpError::Url(s.to_owned(), why);
        let (scheme, rest) = s.split_once("://").ok_or_else(|| bad("not an absolute http(s) URL"))?;
        let scheme = if scheme.eq_ignore_ascii_case("https") {
            Scheme::Https
        } else if scheme.eq_ignore_ascii_case("http") {
            Scheme::Http
        } else {
            return Err(bad("the scheme is neither http nor https"));
        };
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let path = path.split('#').next().unwrap_or("/");
        let path = if path.starts_with('?') { format!("/{path}") } else { path.to_owned() };
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, ""));
                let user = percent_decode(user).ok_or_else(|| bad("bad percent-encoding in the user name"))?;
                let pass = percent_decode(pass).ok_or_else(|| bad("bad percent-encoding in the password"))?;
                (Some((user, pass)), h)
            }
            None => (None, authority),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unterminated IPv6 address"))?;
            (h, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let default_port = if scheme == Scheme::Https { 443 } else { 80 };
        let port = match port {
            None | Some("") => default_port,
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| bad("bad port"))?,
        };
        Ok(Url { scheme, host: host.to_owned(), port, path, userinfo })
    }

    /// `host:port` as in a Host header or a CONNECT target (IPv6 in brackets).
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The URL without its user info (for logs).
    pub fn masked(&self) -> String {
        let scheme = if self.scheme == Scheme::Https { "https" } else { "http" };
        let user = if self.userinfo.is_some() { "***:***@" } else { "" };
        format!("{scheme}://{user}{}{}", self.authority(), self.path)
    }
}

/// The addresses of `host`: an IP literal, or `localhost` (RFC 6761: the loopback addresses).
pub fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, HttpError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.eq_ignore_ascii_case("localhost") {
        return Ok(vec![
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
        ]);
    }
    Err(HttpError::HostName(host.to_owned()))
}

/// A client certificate chain (leaf first) and its private key.
#[derive(Clone)]
pub struct Identity {
    pub chain: Vec<X509>,
    pub key: PKey<Private>,
}

/// TLS settings of one exchange.
#[derive(Clone, Default)]
pub struct Tls {
    /// The only trust anchors; `None`: OpenSSL's default verify paths (the system store).
    pub trust: Option<Vec<X509>>,
    pub identity: Option<Identity>,
}

impl Tls {
    fn context(&self) -> Result<SslContext, HttpError> {
        let mut b = SslContextBuilder::new(SslMethod::tls_client())?;
        b.set_min_proto_version(Some(SslVersion::TLS1_2))?;
        b.set_verify(SslVerifyMode::PEER);
        match &self.trust {
            Some(certs) => {
                let mut store = X509StoreBuilder::new()?;
                for c in certs {
                    // a duplicate is not an error (spec §6.5)
                    if store.add_cert(c.clone()).is_err() {
                        let _ = openssl::error::ErrorStack::get();
                    }
                }
                b.set_cert_store(store.build());
            }
            // The system store as one file (OpenSSL's default CA file, e.g. /usr/lib/ssl/cert.pem
            // -> /etc/ssl/certs/ca-certificates.crt): no hashed-directory lookups, which would
            // list /etc/ssl/certs (getdents64, not in certd's seccomp filter).
            None => b.set_ca_file(default_ca_file())?,
        }
        if let Some(id) = &self.identity {
            if let Some((leaf, rest)) = id.chain.split_first() {
                b.set_certificate(leaf)?;
                for c in rest {
                    b.add_extra_chain_cert(c.clone())?;
                }
                b.set_private_key(&id.key)?;
            }
        }
        Ok(b.build())
    }
}

/// OpenSSL's default CA file (`OPENSSLDIR/cert.pem`).
fn default_ca_file() -> std::path::PathBuf {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: X509_get_default_cert_file returns a pointer to a static NUL-terminated string
    // owned by OpenSSL; it is only read here.
    let file = unsafe { std::ffi::CStr::from_ptr(openssl_sys::X509_get_default_cert_file()) };
    std::path::PathBuf::from(std::ffi::OsStr::from_bytes(file.to_bytes()))
}

/// An HTTP(S) proxy (`HTTPS_PROXY`): every EST exchange goes through it.
#[derive(Clone, Debug)]
pub struct Proxy {
    pub url: Url,
}

impl Proxy {
    pub fn parse(s: &str) -> Result<Proxy, HttpError> {
        Ok(Proxy { url: Url::parse(s)? })
    }

    fn authorization(&self) -> Option<String> {
        self.url
            .userinfo
            .as_ref()
            .map(|(u, p)| format!("Basic {}", openssl::base64::encode_block(format!("{u}:{p}").as_bytes())))
    }
}

/// One response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// The socket under every layer, for per-read deadlines.
struct Deadline {
    socket: TcpStream,
    until: Instant,
    total: Duration,
}

impl Deadline {
    fn arm(&self, what: &'static str) -> Result<(), HttpError> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HttpError::Timeout(self.total, what));
        }
        let io = |source| HttpError::Io { host: String::new(), source };
        self.socket.set_read_timeout(Some(left)).map_err(io)?;
        self.socket.set_write_timeout(Some(left)).map_err(io)?;
        Ok(())
    }

    fn map(&self, host: &str, what: &'static str, e: std::io::Error) -> HttpError {
        if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            HttpError::Timeout(self.total, what)
        } else {
            HttpError::Io { host: host.to_owned(), source: e }
        }
    }
}

fn connect_tcp(host: &str, port: u16, deadline: Instant, total: Duration) -> Result<TcpStream, HttpError> {
    let mut last = None;
    for addr in resolve(host, port)? {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HttpError::Timeout(total, "connect"));
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return Err(HttpError::Timeout(total, "connect")),
            Err(e) => last = Some(HttpError::Connect { addr: addr.to_string(), source: e }),
        }
    }
    Err(last.unwrap_or_else(|| HttpError::HostName(host.to_owned())))
}

fn tls_connect(tls: &SslContext, host: &str, inner: Box<dyn Stream>) -> Result<Box<dyn Stream>, HttpError> {
    let mut ssl = Ssl::new(tls)?;
    match host.parse::<IpAddr>() {
        Ok(ip) => ssl.param_mut().set_ip(ip)?,
        Err(_) => {
            ssl.set_hostname(host)?;
            ssl.param_mut().set_host(host)?;
        }
    }
    match ssl.connect(inner) {
        Ok(s) => Ok(Box::new(s)),
        Err(HandshakeError::Failure(mid)) => {
            let verify = mid.ssl().verify_result();
            let detail = if verify != openssl::x509::X509VerifyResult::OK {
                format!("server certificate verification failed: {}", verify.error_string())
            } else {
                mid.error().to_string()
            };
            Err(HttpError::Tls { host: host.to_owned(), detail })
        }
        Err(HandshakeError::SetupFailure(e)) => Err(HttpError::TlsSetup(e)),
        Err(HandshakeError::WouldBlock(_)) => Err(HttpError::Tls { host: host.to_owned(), detail: "timed out".into() }),
    }
}

/// Reads a response head byte by byte (a CONNECT answer: nothing after it may be consumed).
fn read_connect_answer(s: &mut dyn Stream, host: &str) -> Result<String, std::io::Error> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > MAX_LINE {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{host}: answer too long")));
        }
        if s.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the proxy closed the connection"));
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_owned())
}

/// Sends one request to `url` (through `proxy` when given) and reads the whole response, all
/// within `timeout`.
pub fn exchange(
    url: &Url,
    method: &str,
    headers: &[(&str, String)],
    body: &[u8],
    tls: &Tls,
    proxy: Option<&Proxy>,
    timeout: Duration,
) -> Result<Response, HttpError> {
    let until = Instant::now() + timeout;
    let ctx = tls.context()?;
    let (first_host, first_port) = match proxy {
        Some(p) => (p.url.host.as_str(), p.url.port),
        None => (url.host.as_str(), url.port),
    };
    let socket = connect_tcp(first_host, first_port, until, timeout)?;
    let deadline = Deadline {
        socket: socket.try_clone().map_err(|e| HttpError::Io { host: first_host.into(), source: e })?,
        until,
        total: timeout,
    };
    deadline.arm("TLS handshake")?;
    let mut stream: Box<dyn Stream> = Box::new(socket);
    let mut absolute_form = false;
    if let Some(p) = proxy {
        if p.url.scheme == Scheme::Https {
            stream = tls_connect(&ctx, &p.url.host, stream)?;
        }
        match url.scheme {
            Scheme::Https => {
                let mut req = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n", url.authority());
                if let Some(a) = p.authorization() {
                    req.push_str(&format!("Proxy-Authorization: {a}\r\n"));
                }
                req.push_str("\r\n");
                deadline.arm("proxy CONNECT")?;
                stream.write_all(req.as_bytes()).map_err(|e| deadline.map(&p.url.host, "proxy CONNECT", e))?;
                let line = read_connect_answer(&mut *stream, &p.url.host)
                    .map_err(|e| deadline.map(&p.url.host, "proxy CONNECT", e))?;
                let ok = line.split_whitespace().nth(1).is_some_and(|s| s.len() == 3 && s.starts_with('2'));
                if !ok {
                    return Err(HttpError::Proxy { target: url.authority(), status_line: line });
                }
            }
            Scheme::Http => absolute_form = true,
        }
    }
    if url.scheme == Scheme::Https {
        deadline.arm("TLS handshake")?;
        stream = tls_connect(&ctx, &url.host, stream)?;
    }
    let target = if absolute_form { format!("http://{}{}", url.authority(), url.path) } else { url.path.clone() };
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {}\r\nUser-Agent: aziot-certd/{}\r\nConnection: close\r\nContent-Length: {}\r\n",
        url.authority(),
        env!("CARGO_PKG_VERSION"),
        body.len()
    );
    if absolute_form {
        if let Some(a) = proxy.and_then(Proxy::authorization) {
            head.push_str(&format!("Proxy-Authorization: {a}\r\n"));
        }
    }
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let mut msg = head.into_bytes();
    msg.extend_from_slice(body);
    deadline.arm("sending the request")?;
    stream
        .write_all(&msg)
        .and_then(|()| stream.flush())
        .map_err(|e| deadline.map(&url.host, "sending the request", e))?;
    deadline.arm("reading the response")?;
    let mut reader = BufReader::new(stream);
    read_response(&mut reader, &url.host, &deadline)
}

fn read_line(r: &mut BufReader<Box<dyn Stream>>, host: &str, deadline: &Deadline) -> Result<String, HttpError> {
    let mut buf = Vec::new();
    loop {
        deadline.arm("reading the response")?;
        let available = r.fill_buf().map_err(|e| deadline.map(host, "reading the response", e))?;
        if available.is_empty() {
            return Err(HttpError::Protocol {
                host: host.into(),
                what: "connection closed in the response head".into(),
            });
        }
        match available.iter().position(|b| *b == b'\n') {
            Some(i) => {
                buf.extend_from_slice(&available[..=i]);
                r.consume(i + 1);
                break;
            }
            None => {
                let n = available.len();
                buf.extend_from_slice(available);
                r.consume(n);
            }
        }
        if buf.len() > MAX_LINE {
            return Err(HttpError::Protocol { host: host.into(), what: "header line too long".into() });
        }
    }
    Ok(String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']).to_owned())
}

fn read_exact_body(
    r: &mut BufReader<Box<dyn Stream>>,
    host: &str,
    deadline: &Deadline,
    n: usize,
    out: &mut Vec<u8>,
) -> Result<(), HttpError> {
    let start = out.len();
    out.resize(start + n, 0);
    let mut done = 0;
    while done < n {
        deadline.arm("reading the response body")?;
        let k = r.read(&mut out[start + done..]).map_err(|e| deadline.map(host, "reading the response body", e))?;
        if k == 0 {
            return Err(HttpError::Protocol { host: host.into(), what: "connection closed in the body".into() });
        }
        done += k;
    }
    Ok(())
}

fn read_response(r: &mut BufReader<Box<dyn Stream>>, host: &str, deadline: &Deadline) -> Result<Response, HttpError> {
    let bad = |what: &str| HttpError::Protocol { host: host.into(), what: what.into() };
    let status_line = read_line(r, host, deadline)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(bad(&format!(
            "not an HTTP/1.x status line: {:?}",
            status_line.chars().take(80).collect::<String>()
        )));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or_else(|| bad("bad status code"))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(r, host, deadline)?;
        if line.is_empty() {
            break;
        }
        if headers.len() >= MAX_HEADERS {
            return Err(bad("too many headers"));
        }
        let (n, v) = line.split_once(':').ok_or_else(|| bad("bad header line"))?;
        headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let get = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let mut body = Vec::new();
    if status == 204 || status == 304 || (100..200).contains(&status) {
        // no body
    } else if get("transfer-encoding").is_some_and(|t| t.to_ascii_lowercase().contains("chunked")) {
        loop {
            let size_line = read_line(r, host, deadline)?;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                // trailers
                while !read_line(r, host, deadline)?.is_empty() {}
                break;
            }
            if body.len() + size > MAX_BODY {
                return Err(bad("body too large"));
            }
            read_exact_body(r, host, deadline, size, &mut body)?;
            if !read_line(r, host, deadline)?.is_empty() {
                return Err(bad("bad chunk terminator"));
            }
        }
    } else if let Some(len) = get("content-length") {
        let n: usize = len.parse().map_err(|_| bad("bad content-length"))?;
        if n > MAX_BODY {
            return Err(bad("body too large"));
        }
        read_exact_body(r, host, deadline, n, &mut body)?;
    } else {
        loop {
            deadline.arm("reading the response body")?;
            let mut chunk = [0u8; 8192];
            let k = match r.read(&mut chunk) {
                Ok(k) => k,
                // a TLS peer closing without close_notify: the body ends here
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
                Err(e) => return Err(deadline.map(host, "reading the response body", e)),
            };
            if k == 0 {
                break;
            }
            if body.len() + k > MAX_BODY {
                return Err(bad("body too large"));
            }
            body.extend_from_slice(&chunk[..k]);
        }
    }
    Ok(Response { status, headers, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("https://127.0.0.1:8443/.well-known/est").unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port, u.path.as_str()),
            (Scheme::Https, "127.0.0.1", 8443, "/.well-known/est")
        );
        let u = Url::parse("http://us%40r:p%3Ass@[::1]:3128").unwrap();
        assert_eq!(u.host, "::1");
        assert_eq!(u.port, 3128);
        assert_eq!(u.path, "/");
        assert_eq!(u.userinfo, Some(("us@r".into(), "p:ss".into())));
        assert_eq!(u.authority(), "[::1]:3128");
        assert_eq!(u.masked(), "http://***:***@[::1]:3128/");
        assert_eq!(Url::parse("https://est.example.com").unwrap().port, 443);
        assert_eq!(Url::parse("http://est.example.com").unwrap().port, 80);
        for bad in ["est.example.com", "ftp://x/", "https://:1/", "https://h:0/", "https://h:99999/", "https://[::1/"] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    /// A self-signed server certificate for 127.0.0.1 and its key.
    fn server_identity() -> (X509, PKey<Private>) {
        use openssl::x509::extension::SubjectAlternativeName;
        let key = PKey::from_ec_key(
            openssl::ec::EcKey::generate(
                &openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
        let mut name = openssl::x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "test server").unwrap();
        let name = name.build();
        let mut b = openssl::x509::X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_pubkey(&key).unwrap();
        b.set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap()).unwrap();
        b.set_not_after(&openssl::asn1::Asn1Time::days_from_now(1).unwrap()).unwrap();
        let san = SubjectAlternativeName::new().ip("127.0.0.1").build(&b.x509v3_context(None, None)).unwrap();
        b.append_extension(san).unwrap();
        b.sign(&key, openssl::hash::MessageDigest::sha256()).unwrap();
        (b.build(), key)
    }

    /// One HTTPS answer on 127.0.0.1 (any port), returning its port.
    fn tls_server(cert: X509, key: PKey<Private>) -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut b = openssl::ssl::SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).unwrap();
            b.set_certificate(&cert).unwrap();
            b.set_private_key(&key).unwrap();
            let acceptor = b.build();
            let (tcp, _) = listener.accept().unwrap();
            let mut tls = acceptor.accept(tcp).unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && tls.read(&mut byte).unwrap() == 1 {
                head.push(byte[0]);
            }
            let body = format!("seen: {}", String::from_utf8_lossy(&head).lines().next().unwrap());
            let answer =
                format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n", body.len());
            tls.write_all(answer.as_bytes()).unwrap();
            let _ = tls.shutdown();
        });
        port
    }

    /// A CONNECT proxy for one tunnel; sends the request head it got.
    fn connect_proxy() -> (u16, std::sync::mpsc::Receiver<String>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (mut client, _) = listener.accept().unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && client.read(&mut byte).unwrap() == 1 {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let target = head.split_whitespace().nth(1).unwrap().to_owned();
            tx.send(head).unwrap();
            let upstream = TcpStream::connect(target).unwrap();
            client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").unwrap();
            let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            let t = std::thread::spawn(move || {
                let _ = std::io::copy(&mut u2, &mut c2);
                let _ = c2.shutdown(std::net::Shutdown::Write);
            });
            let mut u = upstream;
            let _ = std::io::copy(&mut client, &mut u);
            let _ = t.join();
        });
        (port, rx)
    }

    #[test]
    fn https_through_a_connect_proxy_with_credentials_and_an_explicit_trust_store() {
        let (cert, key) = server_identity();
        let port = tls_server(cert.clone(), key);
        let (proxy_port, seen) = connect_proxy();
        let proxy = Proxy::parse(&format!("http://us%65r:p%40ss@127.0.0.1:{proxy_port}")).unwrap();
        let url = Url::parse(&format!("https://127.0.0.1:{port}/.well-known/est/cacerts")).unwrap();
        let tls = Tls { trust: Some(vec![cert]), identity: None };
        let r = exchange(&url, "GET", &[], b"", &tls, Some(&proxy), Duration::from_secs(10)).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(String::from_utf8(r.body).unwrap(), "seen: GET /.well-known/est/cacerts HTTP/1.1");
        let head = seen.recv().unwrap();
        assert!(head.starts_with(&format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n")), "{head}");
        let creds = openssl::base64::encode_block(b"user:p@ss");
        assert!(head.contains(&format!("Proxy-Authorization: Basic {creds}\r\n")), "{head}");
    }

    #[test]
    fn an_untrusted_server_or_a_silent_one_fails_clearly() {
        let (cert, key) = server_identity();
        let port = tls_server(cert, key);
        let (other, _) = server_identity();
        let url = Url::parse(&format!("https://127.0.0.1:{port}/x")).unwrap();
        let tls = Tls { trust: Some(vec![other]), identity: None };
        match exchange(&url, "GET", &[], b"", &tls, None, Duration::from_secs(10)) {
            Err(HttpError::Tls { detail, .. }) => assert!(detail.contains("verification failed"), "{detail}"),
            r => panic!("{r:?}"),
        }
        // a server that accepts and never answers: the deadline ends the exchange
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = Url::parse(&format!("https://127.0.0.1:{}/x", silent.local_addr().unwrap().port())).unwrap();
        let started = std::time::Instant::now();
        match exchange(&url, "GET", &[], b"", &Tls::default(), None, Duration::from_millis(500)) {
            Err(HttpError::Tls { .. } | HttpError::Timeout(..)) => {}
            r => panic!("{r:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn resolution_is_literal_or_localhost() {
        assert_eq!(resolve("10.0.0.1", 5).unwrap(), vec!["10.0.0.1:5".parse().unwrap()]);
        assert_eq!(resolve("LOCALHOST.", 5).unwrap().len(), 2);
        assert!(matches!(resolve("est.example.com", 5), Err(HttpError::HostName(_))));
    }
}
