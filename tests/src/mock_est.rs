//! A mock EST server (RFC 7030) for the certd suites and for trying EST by hand
//! (`cargo run -p aziot-tests --bin mock-est`).
//!
//! Real TLS (OpenSSL) with its own CA, generated at start into a directory ([`MockEst::dir`]:
//! `ca.pem`, `ca.key`, `server.pem`, `server.key`); the server certificate is for `localhost`
//! and `127.0.0.1`. It speaks the wire format of spec certd.md §6.5 and RFC 7030 §4:
//! `GET <any prefix>/cacerts`, `POST <any prefix>/simpleenroll` and `/simplereenroll` with a
//! base64 DER PKCS#10 body, answers certs-only PKCS#7 (DER, base64, `Content-Transfer-Encoding:
//! base64`). Authentication: HTTP basic (when configured) and/or a TLS client certificate issued
//! by its CA (when required; one is always requested). Faults on request ([`Mode`]): 202 +
//! `Retry-After` for the first N enrollments, garbage, slowness, an HTTP error status. Every
//! request is recorded ([`Recorded`]) with the client certificate it came with.
//!
//! The PKCS#7 answer is encoded here by hand (DER) rather than by the product's code.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
use openssl::x509::{X509Builder, X509NameBuilder, X509NameRef, X509Req, X509};

/// How enrollment requests (`/simpleenroll`, `/simplereenroll`) are answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Issue.
    Normal,
    /// 202 Accepted with `Retry-After: <retry_after>` for the next `times` enrollments, then
    /// issue.
    Defer { times: u32, retry_after: u64 },
    /// 200 with `application/pkcs7-mime` and a body that is not PKCS#7 (every endpoint).
    Garbage,
    /// Wait this long before answering (every endpoint).
    Slow(Duration),
    /// Answer with this status and a text body.
    Status(u16),
}

/// The validity of the certificates issued by one endpoint: notBefore = now − `backdate`,
/// notAfter = notBefore + `lifetime`.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub backdate: Duration,
    pub lifetime: Duration,
}

impl Default for Validity {
    fn default() -> Self {
        Validity { backdate: Duration::ZERO, lifetime: Duration::from_secs(30 * 86_400) }
    }
}

/// Options fixed at start.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Required HTTP basic credentials.
    pub basic: Option<(String, String)>,
    /// Require a client certificate issued by this server's CA.
    pub require_client_cert: bool,
    /// Listen on this port (0: any).
    pub port: u16,
    /// Generate the CA into (and keep) this directory; else a temporary one removed on drop.
    pub dir: Option<PathBuf>,
}

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// The path's last segment: `cacerts`, `simpleenroll`, `simplereenroll`, ...
    pub op: String,
    pub path: String,
    /// The client certificate presented (leaf), if any.
    pub client_cert: Option<X509>,
    /// The user name of a basic `Authorization` header.
    pub basic_user: Option<String>,
    /// The DER CSR of an enrollment (decoded from the base64 body), if it decoded and parsed.
    pub csr_der: Option<Vec<u8>>,
    pub content_type: Option<String>,
    pub content_transfer_encoding: Option<String>,
    /// The status answered.
    pub status: u16,
}

impl Recorded {
    /// The CSR of an enrollment.
    pub fn csr(&self) -> Option<X509Req> {
        self.csr_der.as_deref().and_then(|d| X509Req::from_der(d).ok())
    }
}

struct State {
    ca: X509,
    ca_key: PKey<Private>,
    options: Options,
    mode: Mutex<Mode>,
    enroll_validity: Mutex<Validity>,
    reenroll_validity: Mutex<Validity>,
    recorded: Mutex<Vec<Recorded>>,
    stop: AtomicBool,
}

/// A running mock EST server.
pub struct MockEst {
    state: Arc<State>,
    addr: SocketAddr,
    dir: PathBuf,
    _temp: Option<crate::tempdir::TempDir>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

fn ec_key() -> PKey<Private> {
    PKey::from_ec_key(EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap()).unwrap()
}

fn name(cn: &str) -> openssl::x509::X509Name {
    let mut n = X509NameBuilder::new().unwrap();
    n.append_entry_by_text("CN", cn).unwrap();
    n.build()
}

fn serial() -> openssl::asn1::Asn1Integer {
    let mut bn = BigNum::new().unwrap();
    bn.rand(120, MsbOption::MAYBE_ZERO, false).unwrap();
    bn.to_asn1_integer().unwrap()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A self-signed CA certificate and its key.
pub fn new_ca(cn: &str) -> (X509, PKey<Private>) {
    let key = ec_key();
    let mut b = X509Builder::new().unwrap();
    b.set_version(2).unwrap();
    b.set_serial_number(&serial()).unwrap();
    b.set_subject_name(&name(cn)).unwrap();
    b.set_issuer_name(&name(cn)).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::from_unix(unix_now() - 3600).unwrap()).unwrap();
    b.set_not_after(&Asn1Time::days_from_now(3650).unwrap()).unwrap();
    b.append_extension(BasicConstraints::new().critical().ca().build().unwrap()).unwrap();
    b.append_extension(KeyUsage::new().critical().key_cert_sign().crl_sign().build().unwrap()).unwrap();
    let skid = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None)).unwrap();
    b.append_extension(skid).unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    (b.build(), key)
}

/// A certificate for `public` with `subject`, issued by `ca`/`ca_key`, valid per `v`.
fn issue(
    ca: &X509,
    ca_key: &PKey<Private>,
    subject: &X509NameRef,
    public: &PKey<openssl::pkey::Public>,
    v: Validity,
    server: bool,
) -> X509 {
    let nb = unix_now() - v.backdate.as_secs() as i64;
    let mut b = X509Builder::new().unwrap();
    b.set_version(2).unwrap();
    b.set_serial_number(&serial()).unwrap();
    b.set_subject_name(subject).unwrap();
    b.set_issuer_name(ca.subject_name()).unwrap();
    b.set_pubkey(public).unwrap();
    b.set_not_before(&Asn1Time::from_unix(nb).unwrap()).unwrap();
    b.set_not_after(&Asn1Time::from_unix(nb + v.lifetime.as_secs() as i64).unwrap()).unwrap();
    b.append_extension(BasicConstraints::new().build().unwrap()).unwrap();
    if server {
        b.append_extension(ExtendedKeyUsage::new().server_auth().build().unwrap()).unwrap();
        let san = SubjectAlternativeName::new()
            .dns("localhost")
            .ip("127.0.0.1")
            .build(&b.x509v3_context(Some(ca), None))
            .unwrap();
        b.append_extension(san).unwrap();
    } else {
        b.append_extension(ExtendedKeyUsage::new().client_auth().build().unwrap()).unwrap();
    }
    b.sign(ca_key, MessageDigest::sha256()).unwrap();
    b.build()
}

fn der_len(n: usize) -> Vec<u8> {
    if n < 0x80 {
        vec![n as u8]
    } else {
        let bytes: Vec<u8> = n.to_be_bytes().iter().copied().skip_while(|b| *b == 0).collect();
        let mut v = vec![0x80 | bytes.len() as u8];
        v.extend(bytes);
        v
    }
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend(der_len(content.len()));
    v.extend_from_slice(content);
    v
}

/// A degenerate (certs-only) PKCS#7 SignedData holding `certs` (RFC 7030 §4.1.3, RFC 5652).
pub fn certs_only(certs: &[X509]) -> Vec<u8> {
    const SIGNED_DATA: &[u8] = &[0x06, 0x09, 0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x07, 0x02];
    const DATA: &[u8] = &[0x06, 0x09, 0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x07, 0x01];
    let mut all = Vec::new();
    for c in certs {
        all.extend(c.to_der().unwrap());
    }
    let mut sd = vec![0x02, 0x01, 0x01, 0x31, 0x00];
    sd.extend(der(0x30, DATA));
    sd.extend(der(0xA0, &all));
    sd.extend([0x31, 0x00]);
    let mut ci = SIGNED_DATA.to_vec();
    ci.extend(der(0xA0, &der(0x30, &sd)));
    der(0x30, &ci)
}

fn base64_lines(der: &[u8]) -> Vec<u8> {
    let b64 = openssl::base64::encode_block(der);
    let mut out = Vec::new();
    for line in b64.as_bytes().chunks(64) {
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    out
}

struct HttpRequest {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpRequest {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone())
    }
}

fn read_request<R: BufRead>(r: &mut R) -> Option<HttpRequest> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).ok()? == 0 {
            return None;
        }
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':')?;
        headers.push((n.trim().to_owned(), v.trim().to_owned()));
    }
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len.min(1 << 20)];
    r.read_exact(&mut body).ok()?;
    Some(HttpRequest { method, path, headers, body })
}

struct Answer {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

fn text(status: u16, body: &str) -> Answer {
    Answer { status, headers: vec![("Content-Type", "text/plain".into())], body: body.as_bytes().to_vec() }
}

fn pkcs7(certs: &[X509]) -> Answer {
    Answer {
        status: 200,
        headers: vec![
            ("Content-Type", "application/pkcs7-mime; smime-type=certs-only".into()),
            ("Content-Transfer-Encoding", "base64".into()),
        ],
        body: base64_lines(&certs_only(certs)),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

impl State {
    fn handle(&self, req: &HttpRequest, client_cert: Option<&X509>, rec: &mut Recorded) -> Answer {
        let mode = self.mode.lock().unwrap().clone();
        if let Mode::Slow(d) = mode {
            std::thread::sleep(d);
        }
        // authentication
        if let Some((u, p)) = &self.options.basic {
            let expected = format!("Basic {}", openssl::base64::encode_block(format!("{u}:{p}").as_bytes()));
            if req.header("authorization").as_deref() != Some(expected.as_str()) {
                let mut a = text(401, "basic authentication required");
                a.headers.push(("WWW-Authenticate", "Basic realm=\"mock-est\"".into()));
                return a;
            }
        }
        if self.options.require_client_cert {
            let ok = client_cert.is_some_and(|c| {
                c.verify(&self.ca_key).unwrap_or(false) && c.not_after() > Asn1Time::days_from_now(0).unwrap()
            });
            if !ok {
                return text(401, "a client certificate issued by this server's CA is required");
            }
        }
        if mode == Mode::Garbage {
            let mut a = pkcs7(&[]);
            a.body = b"this is not a PKCS#7 message".to_vec();
            return a;
        }
        if let Mode::Status(s) = mode {
            return text(s, "mock EST server: forced error");
        }
        match (req.method.as_str(), rec.op.as_str()) {
            ("GET", "cacerts") => pkcs7(std::slice::from_ref(&self.ca)),
            ("POST", "simpleenroll" | "simplereenroll") => {
                if let Mode::Defer { times, retry_after } = mode {
                    if times > 0 {
                        *self.mode.lock().unwrap() = Mode::Defer { times: times - 1, retry_after };
                        let mut a = text(202, "");
                        a.headers.push(("Retry-After", retry_after.to_string()));
                        return a;
                    }
                }
                let Some(csr) = rec.csr() else { return text(400, "the body is not a base64 DER PKCS#10 CSR") };
                let Ok(public) = csr.public_key() else { return text(400, "no public key in the CSR") };
                if !csr.verify(&public).unwrap_or(false) {
                    return text(400, "the CSR's signature does not verify");
                }
                let v = if rec.op == "simplereenroll" {
                    *self.reenroll_validity.lock().unwrap()
                } else {
                    *self.enroll_validity.lock().unwrap()
                };
                let cert = issue(&self.ca, &self.ca_key, csr.subject_name(), &public, v, false);
                pkcs7(&[cert])
            }
            _ => text(404, "not an EST operation"),
        }
    }
}

fn serve_connection(state: Arc<State>, acceptor: Arc<SslAcceptor>, stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(tls) = acceptor.accept(stream) else { return };
    let client_cert = tls.ssl().peer_certificate();
    let mut reader = BufReader::new(tls);
    let Some(req) = read_request(&mut reader) else { return };
    let path_only = req.path.split('?').next().unwrap_or("").to_owned();
    let op = path_only.rsplit('/').next().unwrap_or("").to_owned();
    let csr = (req.method == "POST").then(|| {
        let compact: String = req.body.iter().filter(|b| !b.is_ascii_whitespace()).map(|b| char::from(*b)).collect();
        openssl::base64::decode_block(&compact).ok().filter(|d| X509Req::from_der(d).is_ok())
    });
    let basic_user = req.header("authorization").and_then(|a| {
        let b = openssl::base64::decode_block(a.strip_prefix("Basic ")?).ok()?;
        Some(String::from_utf8_lossy(&b).split(':').next().unwrap_or("").to_owned())
    });
    let mut rec = Recorded {
        method: req.method.clone(),
        op,
        path: req.path.clone(),
        client_cert: client_cert.clone(),
        basic_user,
        csr_der: csr.flatten(),
        content_type: req.header("content-type"),
        content_transfer_encoding: req.header("content-transfer-encoding"),
        status: 0,
    };
    let answer = state.handle(&req, client_cert.as_ref(), &mut rec);
    rec.status = answer.status;
    state.recorded.lock().unwrap().push(rec);
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        answer.status,
        reason(answer.status),
        answer.body.len()
    );
    for (n, v) in &answer.headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let tls = reader.get_mut();
    let _ = tls.write_all(head.as_bytes());
    let _ = tls.write_all(&answer.body);
    let _ = tls.flush();
    let _ = tls.shutdown();
}

impl MockEst {
    /// Generates the CA and server certificate, binds 127.0.0.1 and serves.
    pub fn start(options: Options) -> MockEst {
        let (temp, dir) = match &options.dir {
            Some(d) => {
                std::fs::create_dir_all(d).expect("create the mock's directory");
                (None, d.clone())
            }
            None => {
                let t = crate::tempdir::TempDir::new("mock-est");
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let (ca, ca_key) = new_ca("Mock EST CA");
        let server_key = ec_key();
        let server_public = PKey::public_key_from_der(&server_key.public_key_to_der().unwrap()).unwrap();
        let server_cert = issue(
            &ca,
            &ca_key,
            &name("localhost"),
            &server_public,
            Validity { backdate: Duration::from_secs(3600), lifetime: Duration::from_secs(400 * 86_400) },
            true,
        );
        let write = |file: &str, bytes: Vec<u8>| std::fs::write(dir.join(file), bytes).expect("write the mock's PKI");
        write("ca.pem", ca.to_pem().unwrap());
        write("ca.key", ca_key.private_key_to_pem_pkcs8().unwrap());
        write("server.pem", server_cert.to_pem().unwrap());
        write("server.key", server_key.private_key_to_pem_pkcs8().unwrap());

        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).unwrap();
        b.set_private_key(&server_key).unwrap();
        b.set_certificate(&server_cert).unwrap();
        b.add_extra_chain_cert(ca.clone()).unwrap();
        // request (never require) a client certificate; it is checked per request
        b.set_verify_callback(SslVerifyMode::PEER, |_, _| true);
        let acceptor = Arc::new(b.build());

        let listener = TcpListener::bind(("127.0.0.1", options.port)).expect("bind the mock EST server");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            ca,
            ca_key,
            options,
            mode: Mutex::new(Mode::Normal),
            enroll_validity: Mutex::new(Validity::default()),
            reenroll_validity: Mutex::new(Validity::default()),
            recorded: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let s = Arc::clone(&state);
        let handle = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = conn {
                    let (s, a) = (Arc::clone(&s), Arc::clone(&acceptor));
                    std::thread::spawn(move || serve_connection(s, a, stream));
                }
            }
        });
        MockEst { state, addr, dir, _temp: temp, acceptor: Some(handle) }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
    /// `https://127.0.0.1:<port>/.well-known/est`
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/.well-known/est", self.port())
    }
    /// Where `ca.pem` etc. are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn ca(&self) -> &X509 {
        &self.state.ca
    }
    pub fn ca_pem(&self) -> String {
        String::from_utf8(self.state.ca.to_pem().unwrap()).unwrap()
    }
    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = mode;
    }
    pub fn mode(&self) -> Mode {
        self.state.mode.lock().unwrap().clone()
    }
    pub fn set_enroll_validity(&self, v: Validity) {
        *self.state.enroll_validity.lock().unwrap() = v;
    }
    pub fn set_reenroll_validity(&self, v: Validity) {
        *self.state.reenroll_validity.lock().unwrap() = v;
    }
    /// A client certificate for `csr` signed by this server's CA (e.g. a bootstrap identity).
    pub fn sign(&self, csr: &X509Req, v: Validity) -> X509 {
        issue(&self.state.ca, &self.state.ca_key, csr.subject_name(), &csr.public_key().unwrap(), v, false)
    }
    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.recorded.lock().unwrap().clone()
    }
    /// The requests for `op` so far.
    pub fn requests_for(&self, op: &str) -> Vec<Recorded> {
        self.requests().into_iter().filter(|r| r.op == op).collect()
    }
    /// Polls until `pred` holds for the recorded requests (max `timeout`).
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&[Recorded]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.requests()) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    /// Stops accepting (a later connection is refused).
    pub fn stop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
    }
}

impl Drop for MockEst {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certs_only_parses_with_openssl() {
        let (ca, _) = new_ca("x");
        let der = certs_only(&[ca.clone(), ca.clone()]);
        let p7 = openssl::pkcs7::Pkcs7::from_der(&der).unwrap();
        let certs = p7.signed().unwrap().certificates().unwrap();
        assert_eq!(certs.len(), 2);
        assert_eq!(certs.get(0).unwrap().to_der().unwrap(), ca.to_der().unwrap());
    }
}
