//! The super-config (`/etc/aziot/config.toml`): its schema as validated types (spec aziotctl.md
//! §2.5). [`parse`] turns TOML text into a [`SuperConfig`], collecting warnings on the way.
//!
//! Every URL below is already WHATWG-normalized and every key location already canonical
//! (§2.6.9), so the mapping into service configs never has to validate anything.

mod issuance;
pub mod keyloc;
mod parse;
pub mod reader;
pub mod values;

use std::collections::BTreeMap;

use zeroize::Zeroizing;

pub use parse::parse;
pub use values::Policy;

pub struct SuperConfig {
    pub hostname: Option<String>,
    /// `parent_hostname`, or its alias `local_gateway_hostname`.
    pub parent_hostname: Option<String>,
    pub cloud_timeout_sec: u64,
    pub cloud_retries: u32,
    pub prefer_module_identity_cache: bool,
    pub max_requests: MaxRequests,
    pub provisioning: Provisioning,
    pub localid: Option<String>,
    pub aziot_keys: BTreeMap<String, String>,
    /// Key ID → canonical key location.
    pub preloaded_keys: BTreeMap<String, String>,
    pub cert_issuance: CertIssuance,
    pub preloaded_certs: BTreeMap<String, PreloadedCert>,
    pub tpm: Tpm,
}

pub const DEFAULT_MAX_REQUESTS: usize = 10;
pub const DEFAULT_CLOUD_TIMEOUT_SEC: u64 = 70;
pub const DEFAULT_CLOUD_RETRIES: u32 = 1;
pub const DEFAULT_TCTI: &str = "device";
pub const DEFAULT_AUTH_KEY_INDEX: u32 = 0x00_01_00;
/// keyd's `aziot_keys.homedir_path`, which `config apply` always sets.
pub const KEYD_HOMEDIR: &str = "/var/lib/aziot/keyd";

pub struct MaxRequests {
    pub keyd: usize,
    pub certd: usize,
    pub tpmd: usize,
    pub identityd: usize,
}

pub enum Provisioning {
    Manual {
        iothub_hostname: String,
        device_id: String,
        authentication: ManualAuth,
    },
    Dps {
        global_endpoint: String,
        id_scope: String,
        payload_uri: Option<String>,
        attestation: DpsAttestation,
    },
    None,
}

pub enum ManualAuth {
    Sas(SymmetricKey),
    X509(X509Identity),
}

pub enum DpsAttestation {
    SymmetricKey {
        registration_id: String,
        key: SymmetricKey,
    },
    X509 {
        registration_id: Option<String>,
        identity: X509Identity,
    },
    Tpm {
        registration_id: String,
    },
}

pub enum SymmetricKey {
    /// Decoded key bytes (from `{ value = ... }` or a connection string).
    Inline(Zeroizing<Vec<u8>>),
    /// A canonical key location.
    Preloaded(String),
}

pub enum X509Identity {
    Issued(CertIssuanceOptions),
    Preloaded { cert: String, pk: String },
}

/// How certd obtains one certificate.
#[derive(Clone)]
pub struct CertIssuanceOptions {
    pub method: IssuanceMethod,
    pub expiry_days: Option<u32>,
    pub subject: Option<Subject>,
    pub auto_renew: Option<AutoRenew>,
}

#[derive(Clone)]
pub enum IssuanceMethod {
    Est { url: Option<String>, auth: EstAuth },
    LocalCa,
    SelfSigned,
}

impl IssuanceMethod {
    pub fn name(&self) -> &'static str {
        match self {
            IssuanceMethod::Est { .. } => "est",
            IssuanceMethod::LocalCa => "local_ca",
            IssuanceMethod::SelfSigned => "self_signed",
        }
    }
}

#[derive(Clone)]
pub enum Subject {
    CommonName(String),
    /// Attribute name (as written) → value.
    Dn(BTreeMap<String, String>),
}

/// EST authentication: optional basic auth plus an optional client-certificate pair.
#[derive(Clone, Default)]
pub struct EstAuth {
    pub basic: Option<BasicAuth>,
    pub x509: Option<EstX509>,
}

#[derive(Clone)]
pub struct BasicAuth {
    pub username: String,
    pub password: String,
}

/// A client certificate (URL) and its key (canonical key location).
#[derive(Clone)]
pub enum EstX509 {
    Identity { cert: String, pk: String },
    Bootstrap { cert: String, pk: String },
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct AutoRenew {
    pub rotate_key: bool,
    pub threshold: Policy,
    pub retry: Policy,
}

impl AutoRenew {
    /// The default of `cert_issuance.est.identity_auto_renew`.
    pub const DEFAULT: AutoRenew = AutoRenew {
        rotate_key: true,
        threshold: Policy::Percentage(80),
        retry: Policy::Percentage(4),
    };
}

#[derive(Default)]
pub struct CertIssuance {
    pub est: Option<Est>,
    pub local_ca: Option<LocalCa>,
}

pub struct Est {
    pub trusted_certs: Vec<String>,
    pub auth: EstAuth,
    pub identity_auto_renew: AutoRenew,
    /// Cert ID (or `default`) → URL.
    pub urls: BTreeMap<String, String>,
}

pub enum LocalCa {
    Issued(CertIssuanceOptions),
    Preloaded { cert: String, pk: String },
}

pub enum PreloadedCert {
    Uri(String),
    Bundle(Vec<String>),
}

pub struct Tpm {
    pub tcti: String,
    pub auth_key_index: u32,
    pub endorsement: String,
    pub owner: String,
}
