//! TLS plumbing shared by the cloud mocks (the IoT Hub mock [`crate::mock_hub`] today, the DPS
//! mock next): a private test CA that issues server and client certificates, a threaded
//! HTTPS/1.1 server that hands each parsed request to a [`Handler`] together with the client
//! certificate chain the peer offered, and a tiny HTTP `CONNECT` proxy that records what it
//! tunnels.
//!
//! The server *requests* a client certificate and accepts any at the TLS layer
//! (cloud-protocols.md §7.0): whether a certificate is good enough is the mock's business.
//! One request per connection (`Connection: close`), as the product's client does (§1.1).
//! Everything listens on 127.0.0.1 only.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::ssl::{SslAcceptor, SslMethod, SslVerifyMode};
use openssl::x509::extension::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName, SubjectKeyIdentifier,
};
use openssl::x509::{X509Builder, X509NameBuilder, X509};

/// A certificate and its private key.
#[derive(Clone)]
pub struct CertKey {
    pub cert: X509,
    pub key: PKey<Private>,
}

impl CertKey {
    pub fn cert_pem(&self) -> Vec<u8> {
        self.cert.to_pem().expect("cert to PEM")
    }
    pub fn key_pem(&self) -> Vec<u8> {
        self.key.private_key_to_pem_pkcs8().expect("key to PEM")
    }
    /// Upper-case hex SHA-1 of the DER certificate: the thumbprint form IoT Hub registers.
    pub fn thumbprint_sha1(&self) -> String {
        thumbprint(&self.cert, MessageDigest::sha1())
    }
    pub fn thumbprint_sha256(&self) -> String {
        thumbprint(&self.cert, MessageDigest::sha256())
    }
}

/// Upper-case hex digest of a certificate's DER encoding.
pub fn thumbprint(cert: &X509, md: MessageDigest) -> String {
    cert.digest(md).expect("digest").iter().map(|b| format!("{b:02X}")).collect()
}

fn new_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("P-256");
    PKey::from_ec_key(EcKey::generate(&group).expect("ec key")).expect("pkey")
}

fn builder(cn: &str, key: &PKey<Private>, days: u32) -> X509Builder {
    let mut name = X509NameBuilder::new().expect("name");
    name.append_entry_by_nid(Nid::COMMONNAME, cn).expect("CN");
    let name = name.build();
    let mut b = X509Builder::new().expect("x509 builder");
    b.set_version(2).expect("version");
    let mut serial = BigNum::new().expect("bn");
    serial.rand(127, MsbOption::MAYBE_ZERO, false).expect("serial");
    b.set_serial_number(&serial.to_asn1_integer().expect("serial")).expect("serial");
    b.set_subject_name(&name).expect("subject");
    b.set_pubkey(key).expect("pubkey");
    b.set_not_before(&Asn1Time::days_from_now(0).expect("time")).expect("nbf");
    b.set_not_after(&Asn1Time::days_from_now(days).expect("time")).expect("naf");
    b
}

/// A private certificate authority (P-256, self-signed, valid 30 days).
#[derive(Clone)]
pub struct TestCa {
    pub ca: CertKey,
}

impl TestCa {
    pub fn new(cn: &str) -> TestCa {
        let key = new_key();
        let mut b = builder(cn, &key, 30);
        let subject = {
            let mut name = X509NameBuilder::new().expect("name");
            name.append_entry_by_nid(Nid::COMMONNAME, cn).expect("CN");
            name.build()
        };
        b.set_issuer_name(&subject).expect("issuer");
        b.append_extension(BasicConstraints::new().critical().ca().build().expect("bc")).expect("bc");
        b.append_extension(KeyUsage::new().critical().key_cert_sign().crl_sign().build().expect("ku"))
            .expect("ku");
        let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None)).expect("ski");
        b.append_extension(ski).expect("ski");
        b.sign(&key, MessageDigest::sha256()).expect("sign CA");
        TestCa { ca: CertKey { cert: b.build(), key } }
    }

    fn issue(&self, cn: &str, server_names: Option<&[&str]>) -> CertKey {
        let key = new_key();
        let mut b = builder(cn, &key, 30);
        b.set_issuer_name(self.ca.cert.subject_name()).expect("issuer");
        b.append_extension(BasicConstraints::new().build().expect("bc")).expect("bc");
        b.append_extension(KeyUsage::new().critical().digital_signature().build().expect("ku")).expect("ku");
        match server_names {
            Some(names) => {
                b.append_extension(ExtendedKeyUsage::new().server_auth().build().expect("eku")).expect("eku");
                let mut san = SubjectAlternativeName::new();
                for n in names {
                    if n.parse::<std::net::IpAddr>().is_ok() {
                        san.ip(n);
                    } else {
                        san.dns(n);
                    }
                }
                let san = san.build(&b.x509v3_context(Some(&self.ca.cert), None)).expect("san");
                b.append_extension(san).expect("san");
            }
            None => {
                b.append_extension(ExtendedKeyUsage::new().client_auth().build().expect("eku")).expect("eku");
            }
        }
        b.sign(&self.ca.key, MessageDigest::sha256()).expect("sign leaf");
        CertKey { cert: b.build(), key }
    }

    /// An intermediate CA issued by this one.
    pub fn issue_intermediate(&self, cn: &str) -> TestCa {
        let key = new_key();
        let mut b = builder(cn, &key, 30);
        b.set_issuer_name(self.ca.cert.subject_name()).expect("issuer");
        b.append_extension(BasicConstraints::new().critical().ca().build().expect("bc")).expect("bc");
        b.append_extension(KeyUsage::new().critical().key_cert_sign().crl_sign().build().expect("ku"))
            .expect("ku");
        b.sign(&self.ca.key, MessageDigest::sha256()).expect("sign intermediate");
        TestCa { ca: CertKey { cert: b.build(), key } }
    }

    /// A server certificate for `names` (DNS names or IP addresses, also the SANs).
    pub fn issue_server(&self, names: &[&str]) -> CertKey {
        self.issue(names.first().copied().unwrap_or("localhost"), Some(names))
    }

    /// A TLS client certificate with subject CN `cn`.
    pub fn issue_client(&self, cn: &str) -> CertKey {
        self.issue(cn, None)
    }

    pub fn cert_pem(&self) -> Vec<u8> {
        self.ca.cert_pem()
    }

    /// Writes the CA certificate (PEM) to `path`, e.g. for `SSL_CERT_FILE`.
    pub fn write_cert(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, self.cert_pem())
    }
}

/// A self-signed client certificate (an IoT Hub "self-signed" X.509 device).
pub fn self_signed_client(cn: &str) -> CertKey {
    let key = new_key();
    let mut b = builder(cn, &key, 30);
    let subject = {
        let mut name = X509NameBuilder::new().expect("name");
        name.append_entry_by_nid(Nid::COMMONNAME, cn).expect("CN");
        name.build()
    };
    b.set_issuer_name(&subject).expect("issuer");
    b.append_extension(ExtendedKeyUsage::new().client_auth().build().expect("eku")).expect("eku");
    b.sign(&key, MessageDigest::sha256()).expect("sign");
    CertKey { cert: b.build(), key }
}

/// One parsed HTTP/1.1 request.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// The request target as sent (path and query, still percent-encoded).
    pub target: String,
    /// Header names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The client certificate chain the peer presented (leaf first); empty when none.
    pub client_chain: Vec<X509>,
    pub peer: SocketAddr,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }
    /// The path part of the target.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
    /// The raw query string (without `?`), if any.
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }
    /// The value of query parameter `name` (not decoded).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query()?.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then_some(v)
        })
    }
}

/// What the server writes back.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Waited before anything is written (a slow server).
    pub delay: Duration,
    /// Close the connection without writing a response.
    pub hang_up: bool,
}

impl Response {
    pub fn new(status: u16) -> Response {
        Response { status, headers: Vec::new(), body: Vec::new(), delay: Duration::ZERO, hang_up: false }
    }
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        Response::new(status).with_body("application/json; charset=utf-8", value.to_string().into_bytes())
    }
    pub fn with_body(mut self, content_type: &str, body: Vec<u8>) -> Response {
        self.headers.push(("Content-Type".into(), content_type.into()));
        self.body = body;
        self
    }
    pub fn with_header(mut self, name: &str, value: &str) -> Response {
        self.headers.push((name.into(), value.into()));
        self
    }
    pub fn delayed(mut self, delay: Duration) -> Response {
        self.delay = delay;
        self
    }
}

/// Answers one request. Called on the connection's own thread.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, request: &Request) -> Response;
}

/// The standard reason phrase of the statuses the mocks use.
pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        412 => "Precondition Failed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// A threaded HTTPS/1.1 server on 127.0.0.1 (one thread per connection). Stops on drop.
pub struct TlsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    connections: Arc<AtomicU32>,
}

/// The longest a connection waits for the client's request.
const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// The largest request head or body accepted.
const MAX_REQUEST: usize = 1 << 20;

impl TlsServer {
    /// Listens on `127.0.0.1:port` (0: any free port) with `server` (its certificate, then
    /// `chain` as extra certificates) and hands requests to `handler`.
    pub fn start(
        port: u16,
        server: &CertKey,
        chain: &[X509],
        handler: Arc<dyn Handler>,
    ) -> io::Result<TlsServer> {
        let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).map_err(io::Error::other)?;
        acceptor.set_certificate(&server.cert).map_err(io::Error::other)?;
        for c in chain {
            acceptor.add_extra_chain_cert(c.clone()).map_err(io::Error::other)?;
        }
        acceptor.set_private_key(&server.key).map_err(io::Error::other)?;
        acceptor.check_private_key().map_err(io::Error::other)?;
        // Request, never require, a client certificate, and accept any at the TLS layer.
        acceptor.set_verify_callback(SslVerifyMode::PEER, |_, _| true);
        let acceptor = Arc::new(acceptor.build());

        let listener = TcpListener::bind(("127.0.0.1", port))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicU32::new(0));
        let accept = {
            let stop = stop.clone();
            let connections = connections.clone();
            std::thread::Builder::new().name(format!("mock-tls-{}", addr.port())).spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(tcp) = conn else { continue };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let acceptor = acceptor.clone();
                    let handler = handler.clone();
                    let stop = stop.clone();
                    let _ = std::thread::Builder::new().name("mock-tls-conn".into()).spawn(move || {
                        let _ = serve_one(&acceptor, tcp, &*handler, &stop);
                    });
                }
            })?
        };
        Ok(TlsServer { addr, stop, accept: Some(accept), connections })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
    /// TCP connections accepted so far (including ones that failed the handshake).
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// A mock cloud service: its state `S` (which answers the requests) on its own HTTPS server on
/// 127.0.0.1, with the CA that issued the server's certificate. The mocks' types
/// (`mock_dps::MockDps`, `mock_hub::MockHub`) are this with their own state and constructors;
/// it dereferences to the state.
pub struct MockServer<S> {
    pub ca: TestCa,
    pub server_cert: CertKey,
    state: Arc<S>,
    server: TlsServer,
}

impl<S: Handler> MockServer<S> {
    /// Serves `state` on `port` (0: any free port) with `server_cert` (issued by `ca`).
    pub fn serve(ca: TestCa, server_cert: CertKey, port: u16, state: S) -> io::Result<MockServer<S>> {
        let state = Arc::new(state);
        let server = TlsServer::start(port, &server_cert, &[], state.clone())?;
        Ok(MockServer { ca, server_cert, state, server })
    }
}

impl<S> MockServer<S> {
    pub fn port(&self) -> u16 {
        self.server.port()
    }
    /// TCP connections accepted so far.
    pub fn connections(&self) -> u32 {
        self.server.connections()
    }
    pub fn state(&self) -> &Arc<S> {
        &self.state
    }
    /// Polls `cond` on the state until it holds or `timeout` passes; true when it held.
    pub fn wait_for(&self, timeout: Duration, mut cond: impl FnMut(&S) -> bool) -> bool {
        let until = Instant::now() + timeout;
        loop {
            if cond(&self.state) {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl<S> std::ops::Deref for MockServer<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.state
    }
}

fn serve_one(acceptor: &SslAcceptor, tcp: TcpStream, handler: &dyn Handler, stop: &AtomicBool) -> io::Result<()> {
    tcp.set_read_timeout(Some(READ_TIMEOUT))?;
    tcp.set_write_timeout(Some(READ_TIMEOUT))?;
    let peer = tcp.peer_addr()?;
    let mut tls = acceptor.accept(tcp).map_err(io::Error::other)?;
    let mut client_chain = Vec::new();
    if let Some(leaf) = tls.ssl().peer_certificate() {
        client_chain.push(leaf);
        if let Some(rest) = tls.ssl().peer_cert_chain() {
            // Server side: the chain excludes the leaf.
            client_chain.extend(rest.iter().map(|c| c.to_owned()));
        }
    }
    let (method, target, headers, body) = {
        let mut reader = BufReader::new(&mut tls);
        read_request(&mut reader)?
    };
    let request = Request { method, target, headers, body, client_chain, peer };
    let response = handler.handle(&request);
    // Sleep in slices so that dropping the server does not wait for a long delay.
    let until = Instant::now() + response.delay;
    while Instant::now() < until && !stop.load(Ordering::SeqCst) {
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(50)));
    }
    if response.hang_up || stop.load(Ordering::SeqCst) {
        let _ = tls.get_ref().shutdown(Shutdown::Both);
        return Ok(());
    }
    tls.write_all(&render_response(&response))?;
    tls.flush()?;
    let _ = tls.shutdown();
    Ok(())
}

/// A request as read: method, target, headers (names lower-cased), body.
pub type RawRequest = (String, String, Vec<(String, String)>, Vec<u8>);

/// Reads one request head and its `Content-Length` body (chunked bodies are refused).
pub fn read_request<R: BufRead>(reader: &mut R) -> io::Result<RawRequest> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
    let mut line = String::new();
    let mut total = 0usize;
    reader.read_line(&mut line)?;
    let mut parts = line.trim_end().splitn(3, ' ');
    let method = parts.next().filter(|m| !m.is_empty()).ok_or_else(|| bad("no method"))?.to_owned();
    let target = parts.next().ok_or_else(|| bad("no target"))?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        let n = reader.read_line(&mut h)?;
        total += n;
        if n == 0 || total > MAX_REQUEST {
            return Err(bad("truncated or oversized head"));
        }
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        let (name, value) = h.split_once(':').ok_or_else(|| bad("bad header"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    if headers.iter().any(|(n, v)| n == "transfer-encoding" && !v.eq_ignore_ascii_case("identity")) {
        return Err(bad("chunked request bodies are not supported"));
    }
    let len = match headers.iter().find(|(n, _)| n == "content-length") {
        Some((_, v)) => v.parse::<usize>().map_err(|_| bad("bad content-length"))?,
        None => 0,
    };
    if len > MAX_REQUEST {
        return Err(bad("body too large"));
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    Ok((method, target, headers, body))
}

/// The bytes of `response` (with `Content-Length` and `Connection: close`).
pub fn render_response(response: &Response) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {} {}\r\n", response.status, reason(response.status)).into_bytes();
    for (n, v) in &response.headers {
        out.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
    }
    out.extend_from_slice(format!("Content-Length: {}\r\nConnection: close\r\n\r\n", response.body.len()).as_bytes());
    out.extend_from_slice(&response.body);
    out
}

/// One tunnel the proxy opened.
#[derive(Clone, Debug)]
pub struct ProxiedConnect {
    /// The `CONNECT` authority (`host:port`).
    pub authority: String,
    /// The `Proxy-Authorization` header, if sent.
    pub proxy_authorization: Option<String>,
}

/// A plain-HTTP `CONNECT` proxy on 127.0.0.1 that tunnels to 127.0.0.1 only (whatever host the
/// client names, the port is kept) and records each `CONNECT`. With `required_auth`, a
/// `CONNECT` without exactly that `Proxy-Authorization` value gets 407.
pub struct ConnectProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    log: Arc<Mutex<Vec<ProxiedConnect>>>,
}

impl ConnectProxy {
    pub fn start(required_auth: Option<String>) -> io::Result<ConnectProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let accept = {
            let (stop, log) = (stop.clone(), log.clone());
            std::thread::Builder::new().name("mock-proxy".into()).spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(tcp) = conn else { continue };
                    let (log, required_auth) = (log.clone(), required_auth.clone());
                    let _ = std::thread::Builder::new()
                        .name("mock-proxy-conn".into())
                        .spawn(move || {
                            let _ = tunnel(tcp, &log, required_auth.as_deref());
                        });
                }
            })?
        };
        Ok(ConnectProxy { addr, stop, accept: Some(accept), log })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Every `CONNECT` seen so far.
    pub fn connects(&self) -> Vec<ProxiedConnect> {
        self.log.lock().expect("proxy log").clone()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn tunnel(mut client: TcpStream, log: &Mutex<Vec<ProxiedConnect>>, required_auth: Option<&str>) -> io::Result<()> {
    client.set_read_timeout(Some(READ_TIMEOUT))?;
    let (method, target, headers, _) = {
        let mut reader = BufReader::new(&mut client);
        // The client sends nothing after the head until it has our answer, so nothing is lost
        // in the reader's buffer.
        read_request(&mut reader)?
    };
    let proxy_authorization =
        headers.iter().find(|(n, _)| n == "proxy-authorization").map(|(_, v)| v.clone());
    log.lock().expect("proxy log").push(ProxiedConnect { authority: target.clone(), proxy_authorization: proxy_authorization.clone() });
    if method != "CONNECT" {
        client.write_all(&render_response(&Response::new(405)))?;
        return Ok(());
    }
    if required_auth.is_some() && proxy_authorization.as_deref() != required_auth {
        client.write_all(&render_response(&Response::new(407)))?;
        return Ok(());
    }
    let port: u16 = target.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(443);
    let upstream = match TcpStream::connect(("127.0.0.1", port)) {
        Ok(s) => s,
        Err(_) => {
            client.write_all(&render_response(&Response::new(502)))?;
            return Ok(());
        }
    };
    client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    client.set_read_timeout(None)?;
    let (mut c2, mut u2) = (client.try_clone()?, upstream.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut c2, &mut u2);
        let _ = u2.shutdown(Shutdown::Write);
    });
    let (mut u, mut c) = (upstream, client);
    let _ = io::copy(&mut u, &mut c);
    let _ = c.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}

/// Loads a PEM certificate file and key file into a [`CertKey`] (the mock bins' `--cert`/`--key`).
pub fn load_cert_key(cert: &Path, key: &Path) -> io::Result<CertKey> {
    let cert = X509::from_pem(&std::fs::read(cert)?).map_err(io::Error::other)?;
    let key = PKey::private_key_from_pem(&std::fs::read(key)?).map_err(io::Error::other)?;
    Ok(CertKey { cert, key })
}
