//! The EST client (RFC 7030; spec certd.md §6, docs/certd.md "EST"): `method = "est"`
//! issuance, the bootstrap of EST identity certificates, and their auto-renewal on a timer.
//!
//! Everything that talks to an EST server or keyd runs on a blocking thread: the TLS client
//! key may be held by keyd, and the engine's in-process twin makes each of its signatures a
//! blocking call to keyd. No lock shared between requests is held across that I/O: the
//! registered identities (`creds`) are locked only to read or update a schedule; what is held
//! across a renewal or a bootstrap is the lock of that one identity.
//!
//! Deliberate differences from upstream (docs/compatibility.md, "certd: EST"): renewal posts to
//! `/simplereenroll` with the whole current chain; 202 + `Retry-After` is honoured (bounded);
//! `trusted_certs`, when given, is the only trust store; an answer must hold a certificate for
//! the CSR's key; a failed key move after a renewal is a retryable error; startup never waits for
//! or fails on an EST server; host names are IP literals or `localhost`.

pub mod http;
pub mod renew;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use aziot_ipc::client::{BlockingClient, ClientError};
use aziot_key_openssl_engine::KeydClient;
use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, PKeyRef, Private, Public};
use openssl::stack::Stack;
use openssl::x509::extension::ExtendedKeyUsage;
use openssl::x509::{X509NameRef, X509Req, X509ReqBuilder, X509};

use crate::config::{CertOptions, Config, Est, EstAuth, Method, X509Auth};
use crate::issue::{EstIssuer, EstRequest, IssueError};
use crate::store::{Store, StoreError};
use http::{HttpError, Identity, Proxy, Tls, Url};
use renew::Credential;

/// The whole of one HTTP exchange (connect, TLS, request, response) must end within this.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(20);
/// 202 answers accepted for one enrollment before giving up.
pub const MAX_DEFERRALS: u32 = 5;
/// The longest `Retry-After` honoured (seconds); a longer one ends the enrollment with an error.
pub const MAX_RETRY_AFTER: u64 = 60;
/// Algorithms of the key pairs certd creates in keyd for EST identities (spec §6.3).
pub const KEY_ALGORITHMS: &str = "ec-p256:rsa-4096:*";
/// The proxy variables, in order (spec §6.5).
pub const PROXY_VARS: &[&str] = &["HTTPS_PROXY", "https_proxy"];

#[derive(Debug, thiserror::Error)]
pub enum EstError {
    #[error("no EST URL for cert {0:?} (neither its url, urls[{0:?}] nor urls.default)")]
    NoUrl(String),
    #[error("EST auth is not configured for cert {0:?}")]
    NoAuth(String),
    #[error("EST bootstrap identity is not configured for the EST identity cert {0:?}")]
    NoBootstrap(String),
    #[error("invalid EST URL")]
    Url(#[source] HttpError),
    #[error("HTTPS_PROXY is not usable: {0}")]
    Proxy(String),
    #[error("EST request to {url} failed")]
    Http {
        url: String,
        #[source]
        source: HttpError,
    },
    #[error("EST endpoint did not return successful response: {status} {body}")]
    Status { status: u16, body: String },
    #[error("EST endpoint {url} deferred the enrollment {MAX_DEFERRALS} times (202 Accepted); giving up")]
    Deferred { url: String },
    #[error("EST endpoint answered 202 with Retry-After {0:?}: not a delay in seconds of at most {MAX_RETRY_AFTER}")]
    RetryAfter(String),
    #[error("bad answer from {url}")]
    Wire {
        url: String,
        #[source]
        source: wire::WireError,
    },
    #[error("the certificate the EST endpoint issued is not for the CSR's public key")]
    KeyMismatch,
    #[error("trusted cert {0:?} (cert_issuance.est.trusted_certs) is missing or holds no PEM certificate")]
    Trust(String),
    #[error("could not get EST bootstrap identity cert {0:?}: missing or holds no PEM certificate")]
    BootstrapCert(String),
    #[error("EST identity cert {0:?} is not usable: {1}")]
    IdentityCert(String, String),
    #[error("certificate has changed since last renewal")]
    Changed,
    #[error("could not read cert {0:?}")]
    Read(String, #[source] StoreError),
    #[error("could not store cert {0:?}")]
    Write(String, #[source] StoreError),
    #[error("keyd: {0}")]
    Keyd(String, #[source] ClientError),
    #[error("could not load key pair {0:?} from keyd")]
    Engine(String, #[source] aziot_key_openssl_engine::Error),
    #[error("OpenSSL")]
    OpenSsl(#[from] ErrorStack),
    #[error("EST task failed: {0}")]
    Task(String),
}

/// `e` and its causes, joined by ": ".
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// The proxy of this process's environment (`HTTPS_PROXY`, else `https_proxy`), if any.
pub fn proxy_from_env() -> Result<Option<Proxy>, String> {
    for var in PROXY_VARS {
        if let Ok(v) = std::env::var(var) {
            if v.is_empty() {
                continue;
            }
            return Proxy::parse(&v).map(Some).map_err(|e| format!("{var}: {}", describe(&e)));
        }
    }
    Ok(None)
}

/// The TCP ports certd connects to for EST: the proxy's when one is set (all EST traffic goes
/// through it), else those of every configured EST URL. With the config key of each.
pub fn tcp_ports(config: &Config, proxy: Option<&Proxy>) -> Vec<(u16, String)> {
    if let Some(p) = proxy {
        return vec![(p.url.port, "environment HTTPS_PROXY".into())];
    }
    let mut out = Vec::new();
    let mut add = |key: String, url: &str| match Url::parse(url) {
        Ok(u) => out.push((u.port, key)),
        Err(e) => tracing::warn!("{key}: {e}; no TCP port is granted for it"),
    };
    if let Some(est) = &config.issuance.est {
        for (name, url) in &est.urls {
            add(format!("cert_issuance.est.urls.{name}"), url);
        }
    }
    for (id, opts) in &config.issuance.certs {
        if let (Method::Est, Some(url)) = (opts.method, &opts.url) {
            add(format!("cert_issuance.{id}.url"), url);
        }
    }
    out
}

/// What a config reload replaces.
#[derive(Debug, Default)]
struct Settings {
    est: Est,
    certs: BTreeMap<String, CertOptions>,
}

impl Settings {
    fn from_config(config: &Config) -> Settings {
        Settings { est: config.issuance.est.clone().unwrap_or_default(), certs: config.issuance.certs.clone() }
    }

    /// The per-cert auth when it has any, else the global (spec §6.1).
    fn auth(&self, id: &str) -> EstAuth {
        match self.certs.get(id) {
            Some(o) if !o.auth.is_empty() => o.auth.clone(),
            _ => self.est.auth.clone(),
        }
    }

    /// Per-cert `url`, else `urls[id]`, else `urls.default` (spec §6.1).
    fn url(&self, id: &str) -> Result<String, EstError> {
        self.certs
            .get(id)
            .and_then(|o| o.url.clone())
            .or_else(|| self.est.urls.get(id).cloned())
            .or_else(|| self.est.urls.get("default").cloned())
            .ok_or_else(|| EstError::NoUrl(id.to_owned()))
    }
}

struct Inner {
    settings: RwLock<Arc<Settings>>,
    store: Arc<Store>,
    keyd: BlockingClient,
    engine: Arc<KeydClient>,
    proxy: Result<Option<Proxy>, String>,
    /// Registered identities by (cert ID, key ID).
    creds: Mutex<BTreeMap<(String, String), Credential>>,
    /// Identity cert ID -> the lock serializing its bootstrap and renewal.
    identity_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    wake: tokio::sync::Notify,
    reregister: AtomicBool,
}

/// The EST client: [`EstIssuer`] for `POST /certificates`, and the renewal timer.
#[derive(Clone)]
pub struct EstClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EstClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EstClient")
    }
}

/// A failure of one renewal: retried after the retry period, or fatal (the identity is no
/// longer auto-renewed until a restart or reload).
struct RenewFailure {
    error: EstError,
    fatal: bool,
}

fn retryable(error: EstError) -> RenewFailure {
    RenewFailure { error, fatal: false }
}
fn fatal(error: EstError) -> RenewFailure {
    RenewFailure { error, fatal: true }
}

/// Unix time of an ASN.1 time.
fn unix(t: &openssl::asn1::Asn1TimeRef) -> Result<i64, ErrorStack> {
    let d = openssl::asn1::Asn1Time::from_unix(0)?.diff(t)?;
    Ok(i64::from(d.days) * 86_400 + i64::from(d.secs))
}

/// Percent-encodes a path segment.
fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An EST identity CSR (spec §6.3 step 4): version 1, `subject`, extendedKeyUsage clientAuth,
/// signed with `key` (held by keyd) using SHA-256.
pub fn identity_csr(subject: &X509NameRef, key: &PKeyRef<Private>) -> Result<Vec<u8>, ErrorStack> {
    let mut b = X509ReqBuilder::new()?;
    b.set_version(0)?;
    b.set_subject_name(subject)?;
    b.set_pubkey(key)?;
    let mut exts = Stack::new()?;
    exts.push(ExtendedKeyUsage::new().client_auth().build()?)?;
    b.add_extensions(&exts)?;
    b.sign(key, MessageDigest::sha256())?;
    b.build().to_der()
}

impl EstClient {
    /// The client for `config` (the proxy is read from this process's environment).
    pub fn new(config: &Config, store: Arc<Store>, keyd_socket: &std::path::Path) -> EstClient {
        let proxy = proxy_from_env();
        match &proxy {
            Ok(Some(p)) => tracing::info!("Detected HTTPS proxy server {}", p.url.masked()),
            Ok(None) => {}
            Err(e) => tracing::error!("!!! {e}: EST requests will fail"),
        }
        EstClient {
            inner: Arc::new(Inner {
                settings: RwLock::new(Arc::new(Settings::from_config(config))),
                store,
                keyd: BlockingClient::new(keyd_socket, crate::api::KEYD_API_VERSION),
                engine: Arc::new(KeydClient::new(keyd_socket)),
                proxy,
                creds: Mutex::new(BTreeMap::new()),
                identity_locks: Mutex::new(HashMap::new()),
                wake: tokio::sync::Notify::new(),
                reregister: AtomicBool::new(true),
            }),
        }
    }

    /// Applies a reloaded config: new settings, and the identities registered again (spec §7).
    pub fn reload(&self, config: &Config) {
        *self.inner.settings.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Settings::from_config(config));
        self.inner.creds.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.inner.reregister.store(true, Ordering::SeqCst);
        self.inner.wake.notify_one();
    }

    /// Starts the renewal timer on a thread of its own (its own single-threaded runtime): it
    /// registers the configured identities whose certs exist, then renews each when due.
    pub fn start_renewal(&self) -> std::io::Result<()> {
        let inner = Arc::clone(&self.inner);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::Builder::new()
            .name("aziot-est-renew".into())
            .spawn(move || runtime.block_on(renewal_task(inner)))?;
        Ok(())
    }

    /// The registered identities (cert ID, next attempt), for tests and logs.
    pub fn registered(&self) -> Vec<(String, i64)> {
        self.inner.creds.lock().unwrap_or_else(|p| p.into_inner()).values().map(|c| (c.cert.clone(), c.next)).collect()
    }
}

async fn renewal_task(inner: Arc<Inner>) {
    loop {
        if inner.reregister.swap(false, Ordering::SeqCst) {
            let i = Arc::clone(&inner);
            let _ = tokio::task::spawn_blocking(move || i.register_configured()).await;
        }
        let next = inner.creds.lock().unwrap_or_else(|p| p.into_inner()).values().map(|c| c.next).min();
        let now = renew::now();
        match next {
            Some(t) if t <= now => {
                let i = Arc::clone(&inner);
                let _ = tokio::task::spawn_blocking(move || i.renew_due()).await;
            }
            Some(t) => {
                let wait = Duration::from_secs((t - now) as u64);
                let _ = tokio::time::timeout(wait, inner.wake.notified()).await;
            }
            None => inner.wake.notified().await,
        }
    }
}

impl EstIssuer for EstClient {
    fn issue<'a>(
        &'a self,
        request: EstRequest,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, IssueError>> + Send + 'a>> {
        let inner = Arc::clone(&self.inner);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || inner.issue(&request))
                .await
                .map_err(|e| EstError::Task(e.to_string()))
                .and_then(|r| r)
                .map_err(|e| IssueError::Est(Box::new(e)))
        })
    }
}

impl Inner {
    fn settings(&self) -> Arc<Settings> {
        Arc::clone(&self.settings.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn identity_lock(&self, cert: &str) -> Arc<Mutex<()>> {
        let mut map = self.identity_locks.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(map.entry(cert.to_owned()).or_default())
    }

    // ---- keyd ----

    /// The handle of key pair `id`, `None` when keyd has none.
    fn key_handle(&self, id: &str) -> Result<Option<String>, EstError> {
        let path = format!("/keypair/{}", pct(id));
        let (status, body) =
            self.keyd.raw("GET", &path, None).map_err(|e| EstError::Keyd(format!("GET /keypair/{id}"), e))?;
        match status {
            200 => {
                let v: serde_json::Value = serde_json::from_slice(&body)
                    .map_err(|e| EstError::Keyd(format!("GET /keypair/{id}"), ClientError::Json(e)))?;
                let h = v["keyHandle"].as_str().ok_or_else(|| {
                    EstError::Keyd(format!("GET /keypair/{id}"), ClientError::Protocol("no keyHandle".into()))
                })?;
                Ok(Some(h.to_owned()))
            }
            // keyd answers 400 "a parameter has an invalid value" for a missing key pair
            400 | 404 => Ok(None),
            _ => Err(EstError::Keyd(
                format!("GET /keypair/{id}"),
                ClientError::Http { status, message: String::from_utf8_lossy(&body).into_owned() },
            )),
        }
    }

    fn require_handle(&self, id: &str) -> Result<String, EstError> {
        self.key_handle(id)?.ok_or_else(|| {
            EstError::Keyd(
                format!("GET /keypair/{id}"),
                ClientError::Http { status: 400, message: format!("keyd has no key pair {id:?}") },
            )
        })
    }

    fn load_key(&self, id: &str, handle: &str) -> Result<PKey<Private>, EstError> {
        aziot_key_openssl_engine::load_private_key(&self.engine, handle).map_err(|e| EstError::Engine(id.to_owned(), e))
    }

    /// Deletes key pair `id` if it exists, then creates it (spec §6.3 step 3).
    fn fresh_key_pair(&self, id: &str) -> Result<PKey<Private>, EstError> {
        if let Some(h) = self.key_handle(id)? {
            self.keyd
                .call::<_, ()>("DELETE", "/keypair", Some(&serde_json::json!({ "keyHandle": h })))
                .map_err(|e| EstError::Keyd(format!("DELETE /keypair {id}"), e))?;
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Created {
            key_handle: String,
        }
        let created: Created = self
            .keyd
            .call("POST", "/keypair", Some(&serde_json::json!({ "keyId": id, "preferredAlgorithms": KEY_ALGORITHMS })))
            .map_err(|e| EstError::Keyd(format!("POST /keypair {id}"), e))?;
        self.load_key(id, &created.key_handle)
    }

    // ---- store ----

    /// The PEM certificates of `id`: `Ok(None)` when it does not exist.
    fn read_chain(&self, id: &str) -> Result<Option<Vec<X509>>, EstError> {
        match self.store.read(id).map_err(|e| EstError::Read(id.to_owned(), e))? {
            None => Ok(None),
            Some(bytes) => Ok(Some(X509::stack_from_pem(&bytes).unwrap_or_default())),
        }
    }

    /// The trust store: `trusted_certs` when given (the only anchors), else the system's.
    fn trust(&self, settings: &Settings) -> Result<Option<Vec<X509>>, EstError> {
        if settings.est.trusted_certs.is_empty() {
            return Ok(None);
        }
        let mut out = Vec::new();
        for id in &settings.est.trusted_certs {
            match self.read_chain(id)? {
                Some(certs) if !certs.is_empty() => out.extend(certs),
                _ => return Err(EstError::Trust(id.clone())),
            }
        }
        Ok(Some(out))
    }

    // ---- the wire ----

    /// One EST enrollment (`op` = `simpleenroll` or `simplereenroll`) at `base`, with
    /// `/cacerts` fetched concurrently. Returns the PEM of the issued certificates followed by
    /// the CA certificates, after checking that the first is for `expected`.
    fn enroll(
        &self,
        base: &str,
        op: &str,
        csr_der: &[u8],
        tls: &Tls,
        basic: Option<&(String, String)>,
        expected: &PKeyRef<Public>,
    ) -> Result<Vec<u8>, EstError> {
        let proxy = self.proxy.clone().map_err(EstError::Proxy)?;
        let base = if base.ends_with('/') { base.to_owned() } else { format!("{base}/") };
        let enroll_url = Url::parse(&format!("{base}{op}")).map_err(EstError::Url)?;
        let cacerts_url = Url::parse(&format!("{base}cacerts")).map_err(EstError::Url)?;
        let mut headers = Vec::new();
        if let Some((u, p)) = basic {
            headers.push((
                "Authorization",
                format!("Basic {}", openssl::base64::encode_block(format!("{u}:{p}").as_bytes())),
            ));
        }
        let fetch_cacerts = || -> Result<Vec<X509>, EstError> {
            let url = cacerts_url.masked();
            let r = http::exchange(&cacerts_url, "GET", &headers, b"", tls, proxy.as_ref(), EXCHANGE_TIMEOUT)
                .map_err(|source| EstError::Http { url: url.clone(), source })?;
            accept(&url, &r)
        };
        let enroll = || -> Result<Vec<X509>, EstError> {
            let url = enroll_url.masked();
            let mut h = headers.clone();
            h.push(("Content-Type", "application/pkcs10".into()));
            h.push(("Content-Transfer-Encoding", "base64".into()));
            let body = wire::enroll_body(csr_der);
            for _ in 0..MAX_DEFERRALS {
                let r = http::exchange(&enroll_url, "POST", &h, &body, tls, proxy.as_ref(), EXCHANGE_TIMEOUT)
                    .map_err(|source| EstError::Http { url: url.clone(), source })?;
                if r.status == 202 {
                    let value = r.header("retry-after").unwrap_or("").to_owned();
                    let delay = wire::retry_after(Some(&value))
                        .filter(|d| *d <= MAX_RETRY_AFTER)
                        .ok_or(EstError::RetryAfter(value))?;
                    tracing::info!("EST endpoint {url} deferred the enrollment (202); retrying in {delay} s");
                    std::thread::sleep(Duration::from_secs(delay));
                    continue;
                }
                return accept(&url, &r);
            }
            Err(EstError::Deferred { url })
        };
        let (issued, cacerts) = std::thread::scope(|s| {
            let ca = s.spawn(fetch_cacerts);
            let issued = enroll();
            (issued, ca.join().unwrap_or_else(|_| Err(EstError::Task("the /cacerts thread panicked".into()))))
        });
        let issued = issued?;
        let cacerts = cacerts?;
        let leaf = issued
            .first()
            .ok_or(EstError::Wire { url: enroll_url.masked(), source: wire::WireError::NoCertificate })?;
        if !leaf.public_key()?.public_eq(expected) {
            return Err(EstError::KeyMismatch);
        }
        let mut pem = Vec::new();
        for c in issued.iter().chain(cacerts.iter()) {
            pem.extend(c.to_pem()?);
        }
        Ok(pem)
    }

    // ---- issuance ----

    fn issue(&self, req: &EstRequest) -> Result<Vec<u8>, EstError> {
        let settings = self.settings();
        let id = req.cert_id.as_str();
        let auth = if req.options.auth.is_empty() { settings.est.auth.clone() } else { req.options.auth.clone() };
        if auth.is_empty() {
            return Err(EstError::NoAuth(id.to_owned()));
        }
        let url = settings.url(id)?;
        let csr = X509Req::from_der(&req.csr_der)?;
        let identity = match &auth.x509 {
            None => None,
            Some(x) => {
                // renewal resolves URL and auth as for the cert whose table names the identity
                let lookup = if req.options.auth.is_empty() { x.identity_cert.clone() } else { id.to_owned() };
                Some(self.identity(&settings, x, &lookup, &url, auth.basic.as_ref(), &req.options, &csr)?)
            }
        };
        let tls = Tls { trust: self.trust(&settings)?, identity };
        let expected = csr.public_key()?;
        self.enroll(&url, "simpleenroll", &req.csr_der, &tls, auth.basic.as_ref(), &expected)
    }

    /// The TLS client identity of `x`: the registered (or existing) identity cert, renewed
    /// first when due, else a new one by bootstrap (spec §6.2 step 1).
    #[allow(clippy::too_many_arguments)]
    fn identity(
        &self,
        settings: &Settings,
        x: &X509Auth,
        lookup: &str,
        url: &str,
        basic: Option<&(String, String)>,
        options: &CertOptions,
        csr: &X509Req,
    ) -> Result<Identity, EstError> {
        let lock = self.identity_lock(&x.identity_cert);
        let _serial = lock.lock().unwrap_or_else(|p| p.into_inner());
        let key = (x.identity_cert.clone(), x.identity_pk.clone());
        let mut registered = self.creds.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
        if registered.is_none() {
            match self.read_chain(&x.identity_cert)? {
                Some(chain) if !chain.is_empty() => match self.register(&x.identity_cert, &x.identity_pk, lookup) {
                    Ok(c) => registered = Some(c),
                    Err(e) => tracing::warn!(
                        "EST identity cert {:?} is not usable ({}); bootstrapping a new one",
                        x.identity_cert,
                        describe(&e)
                    ),
                },
                _ => {}
            }
        }
        if let Some(cred) = registered {
            let now = renew::now();
            let policy = settings.est.identity_auto_renew;
            if renew::should_renew(&policy, cred.not_before, cred.not_after, now) {
                self.renew_locked(&key, cred.clone());
            }
            let chain = self.read_chain(&x.identity_cert)?.unwrap_or_default();
            let valid = chain.first().map(|l| unix(l.not_after()).map(|na| na > now)).transpose()?.unwrap_or(false);
            if valid {
                let handle = self.require_handle(&x.identity_pk)?;
                return Ok(Identity { chain, key: self.load_key(&x.identity_pk, &handle)? });
            }
            tracing::warn!(
                "EST identity cert {:?} has expired and could not be renewed; bootstrapping a new one",
                x.identity_cert
            );
        }
        // bootstrap (spec §6.3)
        let (boot_cert, boot_pk) = x.bootstrap.clone().ok_or_else(|| EstError::NoBootstrap(x.identity_cert.clone()))?;
        let boot_chain = match self.read_chain(&boot_cert)? {
            Some(c) if !c.is_empty() => c,
            _ => return Err(EstError::BootstrapCert(boot_cert)),
        };
        let boot_key = self.load_key(&boot_pk, &self.require_handle(&boot_pk)?)?;
        let subject = match &options.subject {
            Some(s) => crate::issue::subject_name(s).map_err(|e| EstError::Task(describe(&e)))?,
            None => csr.subject_name().to_owned()?,
        };
        let key = self.fresh_key_pair(&x.identity_pk)?;
        let csr_der = identity_csr(&subject, &key)?;
        let tls = Tls { trust: self.trust(settings)?, identity: Some(Identity { chain: boot_chain, key: boot_key }) };
        let public = PKey::public_key_from_der(&key.public_key_to_der()?)?;
        let pem = self.enroll(url, "simpleenroll", &csr_der, &tls, basic, &public)?;
        self.store.write(&x.identity_cert, &pem).map_err(|e| EstError::Write(x.identity_cert.clone(), e))?;
        tracing::info!("Bootstrapped EST identity cert {:?}", x.identity_cert);
        if let Err(e) = self.register(&x.identity_cert, &x.identity_pk, lookup) {
            tracing::warn!("Failed to add {} to cert auto-renewal: {}", x.identity_cert, describe(&e));
        }
        let chain = X509::stack_from_pem(&pem)?;
        Ok(Identity { chain, key })
    }

    // ---- renewal ----

    /// Registers identity (`cert`, `pk`) for auto-renewal from its cert in the store.
    fn register(&self, cert: &str, pk: &str, lookup: &str) -> Result<Credential, EstError> {
        let chain = self.read_chain(cert)?.ok_or_else(|| EstError::IdentityCert(cert.into(), "not found".into()))?;
        let cred = self.credential(cert, pk, lookup, &chain)?;
        self.creds.lock().unwrap_or_else(|p| p.into_inner()).insert((cert.into(), pk.into()), cred.clone());
        self.wake.notify_one();
        Ok(cred)
    }

    fn credential(&self, cert: &str, pk: &str, lookup: &str, chain: &[X509]) -> Result<Credential, EstError> {
        let leaf =
            chain.first().ok_or_else(|| EstError::IdentityCert(cert.into(), "holds no PEM certificate".into()))?;
        let (nb, na) = (unix(leaf.not_before())?, unix(leaf.not_after())?);
        if nb >= na {
            return Err(EstError::IdentityCert(cert.into(), "notBefore is not before notAfter".into()));
        }
        let policy = self.settings().est.identity_auto_renew;
        Ok(Credential {
            cert: cert.into(),
            pk: pk.into(),
            lookup: lookup.into(),
            leaf_hash: openssl::sha::sha256(&leaf.to_der()?).to_vec(),
            not_before: nb,
            not_after: na,
            next: renew::schedule(&policy, nb, na, renew::now()),
            retry: renew::retry_period(&policy, nb, na),
        })
    }

    /// Registers the configured identities whose certs exist (spec §3 step 5), without
    /// renewing here: the timer does that at once for those already due.
    fn register_configured(&self) {
        let settings = self.settings();
        let mut wanted: Vec<(String, String, String)> = Vec::new();
        if let Some(x) = &settings.est.auth.x509 {
            wanted.push((x.identity_cert.clone(), x.identity_pk.clone(), x.identity_cert.clone()));
        }
        for (id, o) in &settings.certs {
            if let (Method::Est, Some(x)) = (o.method, &o.auth.x509) {
                wanted.push((x.identity_cert.clone(), x.identity_pk.clone(), id.clone()));
            }
        }
        let mut seen = Vec::new();
        for (cert, pk, lookup) in wanted {
            if seen.contains(&(cert.clone(), pk.clone())) {
                continue;
            }
            seen.push((cert.clone(), pk.clone()));
            match self.read_chain(&cert) {
                Ok(None) => continue,
                Ok(Some(_)) => {}
                Err(e) => {
                    tracing::warn!("Failed to add {cert} to cert auto-renewal: {}", describe(&e));
                    continue;
                }
            }
            match self.register(&cert, &pk, &lookup) {
                Ok(c) => tracing::info!(
                    "EST identity cert {cert:?} registered for auto-renewal; next renewal at unix time {}",
                    c.next
                ),
                Err(e) => tracing::warn!("Failed to add {cert} to cert auto-renewal: {}", describe(&e)),
            }
        }
    }

    /// Renews every registered identity that is due, earliest first.
    fn renew_due(&self) {
        let now = renew::now();
        let mut due: Vec<Credential> =
            self.creds.lock().unwrap_or_else(|p| p.into_inner()).values().filter(|c| c.next <= now).cloned().collect();
        due.sort_by_key(|c| c.next);
        for cred in due {
            let key = (cred.cert.clone(), cred.pk.clone());
            let lock = self.identity_lock(&cred.cert);
            let _serial = lock.lock().unwrap_or_else(|p| p.into_inner());
            // still registered, and not renewed meanwhile by an issuance?
            let current = self.creds.lock().unwrap_or_else(|p| p.into_inner()).get(&key).cloned();
            match current {
                Some(c) if c.next <= renew::now() => self.renew_locked(&key, c),
                _ => {}
            }
        }
    }

    /// Renews one identity (its lock held) and updates its registration.
    fn renew_locked(&self, key: &(String, String), cred: Credential) {
        let result = self.renew(&cred);
        let mut creds = self.creds.lock().unwrap_or_else(|p| p.into_inner());
        // a reload meanwhile cleared the registrations: it re-registers from the store
        let registered = creds.contains_key(key);
        match result {
            Ok(new) => {
                tracing::info!("Renewed EST identity cert {:?}; next renewal at unix time {}", new.cert, new.next);
                if registered {
                    creds.insert(key.clone(), new);
                }
            }
            Err(RenewFailure { error, fatal: false }) => {
                let at = renew::now() + cred.retry;
                tracing::warn!("Tried to renew {}, but {}. Retrying at unix time {at}.", cred.cert, describe(&error));
                if registered {
                    creds.insert(key.clone(), Credential { next: at, ..cred });
                }
            }
            Err(RenewFailure { error, fatal: true }) => {
                tracing::warn!(
                    "Tried to renew {}, but {}. {} will no longer be auto-renewed.",
                    cred.cert,
                    describe(&error),
                    cred.cert
                );
                creds.remove(key);
            }
        }
        drop(creds);
        self.wake.notify_one();
    }

    /// The renewal procedure (spec §6.4), with `/simplereenroll`.
    fn renew(&self, cred: &Credential) -> Result<Credential, RenewFailure> {
        let settings = self.settings();
        let policy = settings.est.identity_auto_renew;
        let old = match self.store.read(&cred.cert) {
            Ok(Some(b)) => b,
            Ok(None) => return Err(fatal(EstError::IdentityCert(cred.cert.clone(), "not found".into()))),
            Err(e) => return Err(retryable(EstError::Read(cred.cert.clone(), e))),
        };
        let chain = X509::stack_from_pem(&old).unwrap_or_default();
        let Some(leaf) = chain.first() else {
            return Err(fatal(EstError::IdentityCert(cred.cert.clone(), "holds no PEM certificate".into())));
        };
        let hash = leaf.to_der().map(|d| openssl::sha::sha256(&d).to_vec()).map_err(|e| fatal(e.into()))?;
        if hash != cred.leaf_hash {
            return Err(fatal(EstError::Changed));
        }
        let auth = settings.auth(&cred.lookup);
        let url = settings.url(&cred.lookup).map_err(fatal)?;
        let now = renew::now();
        let expired = cred.not_after <= now;
        // the TLS identity: the current chain and key, or the bootstrap identity once expired
        let (identity, op) = if expired {
            let Some((bc, bk)) = auth.x509.as_ref().and_then(|x| x.bootstrap.clone()) else {
                return Err(fatal(EstError::NoBootstrap(cred.cert.clone())));
            };
            let chain = match self.read_chain(&bc).map_err(retryable)? {
                Some(c) if !c.is_empty() => c,
                _ => return Err(retryable(EstError::BootstrapCert(bc))),
            };
            let key = self.require_handle(&bk).and_then(|h| self.load_key(&bk, &h)).map_err(retryable)?;
            (Identity { chain, key }, "simpleenroll")
        } else {
            let key = self.require_handle(&cred.pk).and_then(|h| self.load_key(&cred.pk, &h)).map_err(retryable)?;
            (Identity { chain: chain.clone(), key }, "simplereenroll")
        };
        let temp = format!("{}-temp", cred.pk);
        let new_key = if policy.rotate_key {
            self.fresh_key_pair(&temp).map_err(retryable)?
        } else {
            identity_key_for(&identity, expired)
                .map_or_else(|| self.require_handle(&cred.pk).and_then(|h| self.load_key(&cred.pk, &h)), Ok)
                .map_err(retryable)?
        };
        let csr_der = identity_csr(leaf.subject_name(), &new_key).map_err(|e| retryable(e.into()))?;
        let public =
            new_key.public_key_to_der().and_then(|d| PKey::public_key_from_der(&d)).map_err(|e| retryable(e.into()))?;
        let tls = Tls { trust: self.trust(&settings).map_err(retryable)?, identity: Some(identity) };
        let pem = self.enroll(&url, op, &csr_der, &tls, auth.basic.as_ref(), &public).map_err(retryable)?;
        let new_chain = X509::stack_from_pem(&pem).map_err(|e| retryable(e.into()))?;
        let new_cred = self.credential(&cred.cert, &cred.pk, &cred.lookup, &new_chain).map_err(retryable)?;
        // commit: the cert, then the key (restoring the old cert if the key cannot follow)
        self.store.write(&cred.cert, &pem).map_err(|e| retryable(EstError::Write(cred.cert.clone(), e)))?;
        if policy.rotate_key {
            let moved = self
                .keyd
                .call::<_, ()>(
                    "POST",
                    &format!("/keypair/{}", pct(&cred.pk)),
                    Some(&serde_json::json!({ "from": temp })),
                )
                .map_err(|e| EstError::Keyd(format!("POST /keypair/{} (move from {temp})", cred.pk), e));
            if let Err(e) = moved {
                if let Err(w) = self.store.write(&cred.cert, &old) {
                    tracing::error!("!!! could not restore EST identity cert {:?}: {}", cred.cert, describe(&w));
                }
                return Err(retryable(e));
            }
        }
        Ok(new_cred)
    }
}

/// Without key rotation the new CSR is signed by the current key: the one already loaded for
/// TLS when the identity has not expired.
fn identity_key_for(identity: &Identity, expired: bool) -> Option<PKey<Private>> {
    if expired {
        None
    } else {
        Some(identity.key.clone())
    }
}

/// Checks an EST answer (200, content type, PKCS#7) and returns its certificates.
fn accept(url: &str, r: &http::Response) -> Result<Vec<X509>, EstError> {
    if r.status != 200 {
        let body: String = String::from_utf8_lossy(&r.body).chars().take(512).collect();
        return Err(EstError::Status { status: r.status, body });
    }
    wire::check_content_type(r.header("content-type")).map_err(|source| EstError::Wire { url: url.into(), source })?;
    wire::certificates(&r.body).map_err(|source| EstError::Wire { url: url.into(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_and_auth_resolution() {
        let raw: crate::config::RawConfig = toml::from_str(
            r#"
homedir_path = "/h"
[cert_issuance.est]
username = "g"
password = "gp"
[cert_issuance.est.urls]
default = "https://127.0.0.1:1/.well-known/est"
other = "https://127.0.0.1:2/est"
[cert_issuance.a]
method = "est"
url = "https://127.0.0.1:3/est/"
identity_cert = "a-id"
identity_pk = "a-id"
[cert_issuance.other]
method = "est"
[cert_issuance.third]
method = "est"
"#,
        )
        .unwrap();
        let config = Config::from_raw(raw, &mut |_| {}).unwrap();
        let s = Settings::from_config(&config);
        assert_eq!(s.url("a").unwrap(), "https://127.0.0.1:3/est/");
        assert_eq!(s.url("other").unwrap(), "https://127.0.0.1:2/est");
        assert_eq!(s.url("third").unwrap(), "https://127.0.0.1:1/.well-known/est");
        // per-cert auth replaces the global wholesale
        assert!(s.auth("a").basic.is_none());
        assert_eq!(s.auth("a").x509.unwrap().identity_cert, "a-id");
        assert_eq!(s.auth("third").basic, Some(("g".into(), "gp".into())));
        let mut ports: Vec<u16> = tcp_ports(&config, None).into_iter().map(|(p, _)| p).collect();
        ports.sort();
        assert_eq!(ports, [1, 2, 3]);
        let proxy = Proxy::parse("http://u:p@127.0.0.1:3128").unwrap();
        assert_eq!(tcp_ports(&config, Some(&proxy)), vec![(3128, "environment HTTPS_PROXY".into())]);
    }

    #[test]
    fn identity_csr_is_v1_with_client_auth() {
        let key = PKey::from_ec_key(
            openssl::ec::EcKey::generate(
                &openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
        let mut name = openssl::x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "est-id").unwrap();
        let der = identity_csr(&name.build(), &key).unwrap();
        let req = X509Req::from_der(&der).unwrap();
        assert_eq!(req.version(), 0);
        assert!(req.verify(&key).unwrap());
        let exts = req.extensions().unwrap();
        assert_eq!(exts.len(), 1);
        let text = String::from_utf8(req.to_text().unwrap()).unwrap();
        assert!(text.contains("TLS Web Client Authentication"), "{text}");
    }
}
