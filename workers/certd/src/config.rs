//! certd's configuration (spec certd.md §1, common-http.md §3).
//!
//! Read in two steps: serde reads the merged TOML into [`RawConfig`] (unknown top-level keys are
//! reported by `aziot_ipc::config::deserialize`), then [`Config::from_raw`] reads
//! `[cert_issuance]` entry by entry (so unknown keys inside them are reported too, with their
//! full path) and applies the spec's rules: required keys, reserved names, `expiry_days > 0`,
//! renewal-policy strings, absolute URLs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use aziot_ipc::principal::Principal;
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// Reserved names inside `[cert_issuance]`.
pub const LOCAL_CA: &str = "local_ca";
pub const EST: &str = "est";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("homedir_path is required (a missing or empty certd config is a startup error)")]
    NoHomedir,
    #[error("invalid config value {key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.into(), message: message.into() }
}

/// The merged config as serde reads it.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RawConfig {
    #[serde(default)]
    pub homedir_path: Option<PathBuf>,
    #[serde(default = "default_max_requests")]
    pub max_requests: usize,
    /// Read entry by entry in [`Config::from_raw`].
    #[serde(default)]
    pub cert_issuance: BTreeMap<String, toml::Value>,
    #[serde(default)]
    pub preloaded_certs: BTreeMap<String, RawPreloaded>,
    /// `[[principal]]` with `uid` and `certs`.
    #[serde(default)]
    pub principal: Vec<Principal>,
    #[serde(default)]
    pub endpoints: Endpoints,
    /// New: the broker's sandbox settings.
    #[serde(default)]
    pub sandbox: aziot_ipc::config::SandboxConfig,
}

fn default_max_requests() -> usize {
    10
}

/// `[endpoints]`: honoured in every build (upstream: debug builds only).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Endpoints {
    pub aziot_certd: Option<String>,
    pub aziot_keyd: Option<String>,
}

/// A `[preloaded_certs]` value: a URI, or a list of other cert IDs.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum RawPreloaded {
    Uri(String),
    List(Vec<String>),
}

/// A validated `[preloaded_certs]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Preloaded {
    /// `file://` URI, as a path.
    File(PathBuf),
    /// Another scheme: accepted by the parser, fails at use (500), as upstream.
    Unsupported(String),
    /// Other cert IDs, read in order and concatenated.
    List(Vec<String>),
}

/// `method` of a `[cert_issuance.<id>]` table.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Est,
    LocalCa,
    SelfSigned,
}

/// `[cert_issuance.local_ca]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct LocalCa {
    /// Cert ID of the CA certificate (chain).
    pub cert: String,
    /// keyd key-pair ID of the CA key.
    pub pk: String,
}

/// The EST auth keys, flat in `[cert_issuance.est]` and `[cert_issuance.<id>]` (spelled out in
/// both raw tables rather than `#[serde(flatten)]`: unknown keys are not reported through a
/// flattened struct).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawAuth {
    pub username: Option<String>,
    pub password: Option<String>,
    pub identity_cert: Option<String>,
    pub identity_pk: Option<String>,
    pub bootstrap_identity_cert: Option<String>,
    pub bootstrap_identity_pk: Option<String>,
}

/// EST auth with the half-configured parts dropped (spec §1: never a config error).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EstAuth {
    pub basic: Option<(String, String)>,
    pub x509: Option<X509Auth>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct X509Auth {
    pub identity_cert: String,
    pub identity_pk: String,
    /// (cert ID, key-pair ID) of the bootstrap identity.
    pub bootstrap: Option<(String, String)>,
}

impl EstAuth {
    pub fn is_empty(&self) -> bool {
        self.basic.is_none() && self.x509.is_none()
    }
}

/// A renewal threshold or retry period (`"80%"`, `"10min"`, `"2day"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenewalPolicy {
    /// Percentage of the certificate's lifetime, 1..=99.
    Percent(u64),
    /// Seconds.
    Seconds(u64),
}

impl RenewalPolicy {
    pub fn parse(s: &str) -> Option<RenewalPolicy> {
        let number = |digits: &str| -> Option<u64> {
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            digits.parse::<u64>().ok().filter(|n| *n > 0)
        };
        if let Some(n) = s.strip_suffix('%') {
            return number(n).filter(|n| *n <= 99).map(RenewalPolicy::Percent);
        }
        if let Some(n) = s.strip_suffix("min") {
            return number(n)?.checked_mul(60).map(RenewalPolicy::Seconds);
        }
        if let Some(n) = s.strip_suffix("day") {
            return number(n)?.checked_mul(86_400).map(RenewalPolicy::Seconds);
        }
        None
    }
}

#[derive(Clone, Debug, Deserialize)]
struct RawAutoRenew {
    rotate_key: bool,
    threshold: String,
    retry: String,
}

/// `[cert_issuance.est.identity_auto_renew]` (defaults: rotate, 80%, 4%).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AutoRenew {
    pub rotate_key: bool,
    pub threshold: RenewalPolicy,
    pub retry: RenewalPolicy,
}

impl Default for AutoRenew {
    fn default() -> Self {
        AutoRenew { rotate_key: true, threshold: RenewalPolicy::Percent(80), retry: RenewalPolicy::Percent(4) }
    }
}

#[derive(Clone, Debug, Deserialize)]
struct RawEst {
    #[serde(default)]
    trusted_certs: Vec<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identity_cert: Option<String>,
    #[serde(default)]
    identity_pk: Option<String>,
    #[serde(default)]
    bootstrap_identity_cert: Option<String>,
    #[serde(default)]
    bootstrap_identity_pk: Option<String>,
    #[serde(default)]
    identity_auto_renew: Option<RawAutoRenew>,
    #[serde(default)]
    urls: BTreeMap<String, String>,
}

/// `[cert_issuance.est]`: the global EST settings (used by the EST client).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Est {
    pub trusted_certs: Vec<String>,
    pub auth: EstAuth,
    pub identity_auto_renew: AutoRenew,
    /// Cert ID (or `default`) -> EST base URL.
    pub urls: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize)]
struct RawCertOptions {
    method: Method,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identity_cert: Option<String>,
    #[serde(default)]
    identity_pk: Option<String>,
    #[serde(default)]
    bootstrap_identity_cert: Option<String>,
    #[serde(default)]
    bootstrap_identity_pk: Option<String>,
    #[serde(default)]
    expiry_days: Option<i64>,
    #[serde(default)]
    common_name: Option<String>,
    #[serde(default)]
    subject: Option<BTreeMap<String, String>>,
}

/// `[cert_issuance.<id>]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertOptions {
    pub method: Method,
    /// EST only.
    pub url: Option<String>,
    /// EST only: per-cert auth; replaces the global auth wholesale when not empty.
    pub auth: EstAuth,
    /// Validity in days (> 0); default 30.
    pub expiry_days: Option<u64>,
    pub subject: Option<Subject>,
}

/// A subject override (spec §5.4).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    CommonName(String),
    /// One RDN per entry, in ascending byte order of the keys (BTreeMap order).
    Dn(BTreeMap<String, String>),
}

/// Everything `[cert_issuance]` says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Issuance {
    pub local_ca: Option<LocalCa>,
    pub est: Option<Est>,
    pub certs: BTreeMap<String, CertOptions>,
}

/// The validated config.
#[derive(Clone, Debug)]
pub struct Config {
    pub homedir_path: PathBuf,
    pub max_requests: usize,
    pub issuance: Issuance,
    pub preloaded: BTreeMap<String, Preloaded>,
    pub principal: Vec<Principal>,
    pub endpoints: Endpoints,
    pub sandbox: aziot_ipc::config::SandboxConfig,
}

/// Whether `s` is an absolute URL: `scheme:` + something (RFC 3986 scheme syntax).
pub fn is_absolute_url(s: &str) -> bool {
    let Some((scheme, rest)) = s.split_once(':') else { return false };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && !rest.is_empty()
}

/// The auth keys of a raw EST or per-cert table.
macro_rules! raw_auth {
    ($raw:expr) => {
        RawAuth {
            username: $raw.username,
            password: $raw.password,
            identity_cert: $raw.identity_cert,
            identity_pk: $raw.identity_pk,
            bootstrap_identity_cert: $raw.bootstrap_identity_cert,
            bootstrap_identity_pk: $raw.bootstrap_identity_pk,
        }
    };
}

/// Reads one sub-table with serde, reporting its unknown keys as `<prefix>.<key>`.
fn sub_table<T: DeserializeOwned>(
    id: &str,
    prefix: &str,
    value: toml::Value,
    on_unknown: &mut dyn FnMut(&[String]),
) -> Result<T, ConfigError> {
    let mut unknown = Vec::new();
    let parsed = serde_ignored::deserialize(value, |path| unknown.push(path.to_string()))
        .map_err(|e: toml::de::Error| invalid(prefix, e.message().trim().to_owned()))?;
    for key in unknown {
        let mut path = vec!["cert_issuance".to_owned(), id.to_owned()];
        path.extend(key.split('.').map(str::to_owned));
        on_unknown(&path);
    }
    Ok(parsed)
}

/// Half-configured auth is ignored with a warning (spec §1 Recommendation).
fn auth(prefix: &str, raw: RawAuth) -> EstAuth {
    let basic = match (raw.username, raw.password) {
        (Some(u), Some(p)) => Some((u, p)),
        (None, None) => None,
        _ => {
            tracing::warn!("{prefix}: username and password must be given together; basic auth is not used here");
            None
        }
    };
    let bootstrap = match (raw.bootstrap_identity_cert, raw.bootstrap_identity_pk) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        _ => {
            tracing::warn!(
                "{prefix}: bootstrap_identity_cert and bootstrap_identity_pk must be given together; no bootstrap identity here"
            );
            None
        }
    };
    let x509 = match (raw.identity_cert, raw.identity_pk) {
        (Some(identity_cert), Some(identity_pk)) => Some(X509Auth { identity_cert, identity_pk, bootstrap }),
        (None, None) => {
            if bootstrap.is_some() {
                tracing::warn!("{prefix}: a bootstrap identity without identity_cert/identity_pk is not used");
            }
            None
        }
        _ => {
            tracing::warn!(
                "{prefix}: identity_cert and identity_pk must be given together; TLS client auth is not used here"
            );
            None
        }
    };
    EstAuth { basic, x509 }
}

fn check_est_url(key: &str, url: &str) -> Result<(), ConfigError> {
    if !is_absolute_url(url) {
        return Err(invalid(key, format!("{url:?} is not an absolute URL")));
    }
    if url.len() >= 7 && url[..7].eq_ignore_ascii_case("http://") {
        // stderr, as upstream (not the log)
        eprintln!(
            "Warning: EST server URL {url:?} is configured with unencrypted HTTP: certificates and credentials \
             exchanged with it can be read and changed on the way; use https://"
        );
    }
    Ok(())
}

impl Config {
    /// Validates `raw`; unknown keys inside `[cert_issuance]` go to `on_unknown` (the key's
    /// path, one element per table level: a cert ID may contain dots).
    pub fn from_raw(raw: RawConfig, on_unknown: &mut dyn FnMut(&[String])) -> Result<Config, ConfigError> {
        let homedir_path = raw.homedir_path.filter(|p| !p.as_os_str().is_empty()).ok_or(ConfigError::NoHomedir)?;
        let mut issuance = Issuance::default();
        for (id, value) in raw.cert_issuance {
            let prefix = format!("cert_issuance.{id}");
            if !value.is_table() {
                return Err(invalid(
                    &prefix,
                    format!(
                        "must be a table (e.g. [cert_issuance.{id}] method = \"local_ca\"), not a {}",
                        value.type_str()
                    ),
                ));
            }
            match id.as_str() {
                LOCAL_CA => issuance.local_ca = Some(sub_table(&id, &prefix, value, on_unknown)?),
                EST => {
                    let raw: RawEst = sub_table(&id, &prefix, value, on_unknown)?;
                    let identity_auto_renew = match raw.identity_auto_renew {
                        None => AutoRenew::default(),
                        Some(r) => {
                            let policy = |name: &str, s: &str| {
                                RenewalPolicy::parse(s).ok_or_else(|| {
                                    invalid(
                                        format!("{prefix}.identity_auto_renew.{name}"),
                                        format!("{s:?} is not \"<n>%\" (1-99), \"<n>min\" or \"<n>day\""),
                                    )
                                })
                            };
                            AutoRenew {
                                rotate_key: r.rotate_key,
                                threshold: policy("threshold", &r.threshold)?,
                                retry: policy("retry", &r.retry)?,
                            }
                        }
                    };
                    for (name, url) in &raw.urls {
                        check_est_url(&format!("{prefix}.urls.{name}"), url)?;
                    }
                    issuance.est = Some(Est {
                        trusted_certs: raw.trusted_certs,
                        auth: auth(&prefix, raw_auth!(raw)),
                        identity_auto_renew,
                        urls: raw.urls,
                    });
                }
                _ => {
                    let raw: RawCertOptions = sub_table(&id, &prefix, value, on_unknown)?;
                    let expiry_days = match raw.expiry_days {
                        None => None,
                        Some(d) if d > 0 => Some(d as u64),
                        Some(d) => return Err(invalid(format!("{prefix}.expiry_days"), format!("{d} is not > 0"))),
                    };
                    let subject = match (raw.common_name, raw.subject) {
                        (Some(cn), Some(_)) => {
                            tracing::warn!("{prefix}: both common_name and subject are set; common_name is used");
                            Some(Subject::CommonName(cn))
                        }
                        (Some(cn), None) => Some(Subject::CommonName(cn)),
                        (None, Some(dn)) => Some(Subject::Dn(dn)),
                        (None, None) => None,
                    };
                    issuance.certs.insert(
                        id,
                        CertOptions {
                            method: raw.method,
                            url: raw.url,
                            auth: auth(&prefix, raw_auth!(raw)),
                            expiry_days,
                            subject,
                        },
                    );
                }
            }
        }
        let mut preloaded = BTreeMap::new();
        for (id, value) in raw.preloaded_certs {
            let entry = match value {
                RawPreloaded::List(ids) => Preloaded::List(ids),
                RawPreloaded::Uri(uri) => {
                    if !is_absolute_url(&uri) {
                        return Err(invalid(
                            format!("preloaded_certs.{id}"),
                            format!("{uri:?} is not an absolute URL (a file is \"file:///path\")"),
                        ));
                    }
                    match uri.strip_prefix("file://") {
                        Some(rest) => {
                            let path = aziot_ipc::endpoint::percent_decode(rest)
                                .map(PathBuf::from)
                                .filter(|p| p.is_absolute() && p.file_name().is_some());
                            match path {
                                Some(p) => Preloaded::File(p),
                                None => {
                                    return Err(invalid(
                                        format!("preloaded_certs.{id}"),
                                        format!("{uri:?} does not name a file by absolute path"),
                                    ))
                                }
                            }
                        }
                        None => Preloaded::Unsupported(uri),
                    }
                }
            };
            preloaded.insert(id, entry);
        }
        Ok(Config {
            homedir_path,
            max_requests: raw.max_requests,
            issuance,
            preloaded,
            principal: raw.principal,
            endpoints: raw.endpoints,
            sandbox: raw.sandbox,
        })
    }

    /// The preloaded `file://` certs: (id, path).
    pub fn preloaded_files(&self) -> Vec<(String, PathBuf)> {
        self.preloaded
            .iter()
            .filter_map(|(id, p)| match p {
                Preloaded::File(path) => Some((id.clone(), path.clone())),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> (Result<Config, ConfigError>, Vec<String>) {
        let raw: RawConfig = toml::from_str(text).unwrap();
        let mut unknown = Vec::new();
        let r = Config::from_raw(raw, &mut |k| unknown.push(k.join(".")));
        (r, unknown)
    }

    #[test]
    fn full_example_parses() {
        let (c, unknown) = parse(
            r#"
homedir_path = "/var/lib/aziot/certd"
max_requests = 3
[cert_issuance.local_ca]
cert = "device-ca"
pk = "device-ca"
[cert_issuance.est]
trusted_certs = ["est-server-ca"]
username = "estuser"
password = "estpwd"
identity_cert = "est-id"
identity_pk = "est-id"
[cert_issuance.est.identity_auto_renew]
rotate_key = false
threshold = "10min"
retry = "1day"
[cert_issuance.est.urls]
default = "https://est.example.com/.well-known/est"
[cert_issuance.est.auth]
username = "ignored"
[cert_issuance.device-id]
method = "est"
expiry_days = 365
common_name = "my-device"
subject = { CN = "other" }
bogus = 1
[cert_issuance.device-ca]
method = "local_ca"
subject = { L = "AQ", CN = "x", ST = "Antarctica" }
[preloaded_certs]
device-id-ca = "file:///var/secrets/device-id-ca.pem"
trust-bundle = ["device-id-ca", "est-server-ca"]
other = "https://example.com/x"
[[principal]]
uid = 1000
certs = ["test-*"]
"#,
        );
        let c = c.unwrap();
        assert_eq!(c.max_requests, 3);
        assert_eq!(c.issuance.local_ca, Some(LocalCa { cert: "device-ca".into(), pk: "device-ca".into() }));
        let est = c.issuance.est.unwrap();
        assert_eq!(est.auth.basic, Some(("estuser".into(), "estpwd".into())));
        assert_eq!(est.identity_auto_renew.threshold, RenewalPolicy::Seconds(600));
        assert_eq!(est.identity_auto_renew.retry, RenewalPolicy::Seconds(86_400));
        let id = &c.issuance.certs["device-id"];
        assert_eq!(id.method, Method::Est);
        assert_eq!(id.expiry_days, Some(365));
        assert_eq!(id.subject, Some(Subject::CommonName("my-device".into())));
        assert_eq!(c.issuance.certs["device-ca"].method, Method::LocalCa);
        assert_eq!(c.preloaded["device-id-ca"], Preloaded::File("/var/secrets/device-id-ca.pem".into()));
        assert_eq!(c.preloaded["trust-bundle"], Preloaded::List(vec!["device-id-ca".into(), "est-server-ca".into()]));
        assert_eq!(c.preloaded["other"], Preloaded::Unsupported("https://example.com/x".into()));
        assert_eq!(c.principal[0].keys, vec!["test-*".to_owned()]);
        assert!(unknown.contains(&"cert_issuance.est.auth".to_owned()), "{unknown:?}");
        assert!(unknown.contains(&"cert_issuance.device-id.bogus".to_owned()), "{unknown:?}");
    }

    #[test]
    fn errors() {
        for (text, needle) in [
            ("", "homedir_path is required"),
            ("homedir_path = \"/h\"\n[cert_issuance]\ndevice-id = \"local_ca\"\n", "must be a table"),
            ("homedir_path = \"/h\"\n[cert_issuance.x]\nexpiry_days = 3\n", "method"),
            ("homedir_path = \"/h\"\n[cert_issuance.x]\nmethod = \"x509\"\n", "cert_issuance.x"),
            ("homedir_path = \"/h\"\n[cert_issuance.x]\nmethod = \"self_signed\"\nexpiry_days = 0\n", "expiry_days"),
            ("homedir_path = \"/h\"\n[cert_issuance.local_ca]\ncert = \"a\"\n", "pk"),
            ("homedir_path = \"/h\"\n[preloaded_certs]\na = \"/var/secrets/a.pem\"\n", "not an absolute URL"),
            ("homedir_path = \"/h\"\n[cert_issuance.est.urls]\ndefault = \"est.example.com\"\n", "not an absolute URL"),
            (
                "homedir_path = \"/h\"\n[cert_issuance.est.identity_auto_renew]\nrotate_key = true\nthreshold = \"100%\"\nretry = \"4%\"\n",
                "threshold",
            ),
            ("homedir_path = \"/h\"\n[cert_issuance.est.identity_auto_renew]\nrotate_key = true\nthreshold = \"80%\"\n", "retry"),
        ] {
            let e = parse(text).0.unwrap_err().to_string();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn half_configured_auth_is_ignored() {
        let (c, _) = parse("homedir_path = \"/h\"\n[cert_issuance.est]\nusername = \"u\"\nidentity_cert = \"c\"\n");
        assert!(c.unwrap().issuance.est.unwrap().auth.is_empty());
    }

    #[test]
    fn renewal_policies() {
        assert_eq!(RenewalPolicy::parse("1%"), Some(RenewalPolicy::Percent(1)));
        assert_eq!(RenewalPolicy::parse("99%"), Some(RenewalPolicy::Percent(99)));
        assert_eq!(RenewalPolicy::parse("2day"), Some(RenewalPolicy::Seconds(172_800)));
        for bad in ["0%", "100%", "%", "-1%", "+5%", "5", "5 min", "0min", "1days", ""] {
            assert_eq!(RenewalPolicy::parse(bad), None, "{bad:?}");
        }
    }
}
