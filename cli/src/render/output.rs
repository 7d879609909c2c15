//! The four service configs that `config apply` writes, as serializable types.
//!
//! Field order is the schema order of spec aziotctl.md §2.6.11; the TOML serializer puts scalar
//! keys before sub-tables and sorts `BTreeMap`s by key in byte order, which gives that section's
//! layout.

use std::collections::BTreeMap;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use crate::super_config::keyloc::redact_pin;
use crate::super_config::AutoRenew;

const REDACTED: &str = "<redacted>";

#[derive(Serialize)]
pub struct KeydConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<usize>,
    pub aziot_keys: BTreeMap<String, String>,
    pub preloaded_keys: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principal: Vec<KeydPrincipal>,
}

#[derive(Serialize)]
pub struct KeydPrincipal {
    pub uid: u32,
    pub keys: Vec<String>,
}

#[derive(Serialize)]
pub struct CertdConfig {
    pub homedir_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<usize>,
    pub cert_issuance: CertIssuanceOut,
    pub preloaded_certs: BTreeMap<String, PreloadedCertOut>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub principal: Vec<CertdPrincipal>,
}

#[derive(Serialize)]
pub struct CertIssuanceOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub est: Option<EstOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_ca: Option<LocalCaOut>,
    /// Cert ID → how certd issues it.
    #[serde(flatten)]
    pub certs: BTreeMap<String, CertOptionsOut>,
}

/// certd's `[cert_issuance.est]`. As in the original, an empty `trusted_certs` and an empty
/// `urls` table (every EST URL set on its own cert) are left out, not written empty.
#[derive(Serialize, Default)]
pub struct EstOut {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trusted_certs: Vec<String>,
    #[serde(flatten)]
    pub auth: AuthOut,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_auto_renew: Option<AutoRenewOut>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub urls: BTreeMap<String, String>,
}

/// EST authentication as certd sees it: credentials inline, certificates as IDs.
#[derive(Serialize, Default, Clone)]
pub struct AuthOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_cert: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity_pk: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap_identity_cert: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap_identity_pk: Option<String>,
}

#[derive(Serialize)]
pub struct LocalCaOut {
    pub cert: String,
    pub pk: String,
}

#[derive(Serialize, Clone)]
pub struct CertOptionsOut {
    pub method: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(flatten)]
    pub auth: AuthOut,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expiry_days: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub common_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<BTreeMap<String, String>>,
}

#[derive(Serialize)]
#[serde(untagged)]
pub enum PreloadedCertOut {
    Uri(String),
    Bundle(Vec<String>),
}

#[derive(Serialize)]
pub struct CertdPrincipal {
    pub uid: u32,
    pub certs: Vec<String>,
}

#[derive(Serialize)]
pub struct IdentitydConfig {
    pub hostname: String,
    pub homedir: String,
    pub prefer_module_identity_cache: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_timeout_sec: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_retries: Option<u32>,
    pub provisioning: ProvisioningOut,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub localid: Option<LocalIdOut>,
}

#[derive(Serialize, Default)]
pub struct ProvisioningOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_gateway_hostname: Option<String>,
    pub source: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iothub_hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global_endpoint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<PayloadOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authentication: Option<ManualAuthOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attestation: Option<AttestationOut>,
}

#[derive(Serialize)]
pub struct PayloadOut {
    pub uri: String,
}

#[derive(Serialize)]
#[serde(untagged)]
pub enum ManualAuthOut {
    Sas {
        method: &'static str,
        device_id_pk: String,
    },
    X509 {
        method: &'static str,
        identity_cert: String,
        identity_pk: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        csr_subject: Option<Dn>,
    },
}

#[derive(Serialize)]
#[serde(untagged)]
pub enum AttestationOut {
    SymmetricKey {
        method: &'static str,
        registration_id: String,
        symmetric_key: String,
    },
    X509 {
        method: &'static str,
        identity_cert: String,
        identity_pk: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        registration_id: Option<RegistrationIdOut>,
        #[serde(skip_serializing_if = "Option::is_none")]
        identity_auto_renew: Option<AutoRenewOut>,
    },
    Tpm {
        method: &'static str,
        registration_id: String,
    },
}

#[derive(Serialize)]
#[serde(untagged)]
pub enum RegistrationIdOut {
    Plain(String),
    Dn(Dn),
}

/// A distinguished name for identityd: `CN` first, then the other attributes, upper-cased, in
/// byte order.
pub struct Dn {
    pub cn: String,
    pub others: BTreeMap<String, String>,
}

impl Serialize for Dn {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.others.len() + 1))?;
        map.serialize_entry("CN", &self.cn)?;
        for (k, v) in &self.others {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

#[derive(Serialize, Clone, Copy, PartialEq, Eq)]
pub struct AutoRenewOut {
    pub rotate_key: bool,
    #[serde(serialize_with = "display")]
    pub threshold: crate::super_config::Policy,
    #[serde(serialize_with = "display")]
    pub retry: crate::super_config::Policy,
}

fn display<S: Serializer>(
    value: &crate::super_config::Policy,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

impl From<AutoRenew> for AutoRenewOut {
    fn from(a: AutoRenew) -> Self {
        AutoRenewOut {
            rotate_key: a.rotate_key,
            threshold: a.threshold,
            retry: a.retry,
        }
    }
}

#[derive(Serialize)]
pub struct LocalIdOut {
    pub domain: String,
}

#[derive(Serialize, Default)]
pub struct TpmdConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcti: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth_key_index: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hierarchy_authorization: Option<HierarchyAuthOut>,
}

#[derive(Serialize)]
pub struct HierarchyAuthOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endorsement: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// A service config: serializable, and redactable for `--dry-run`, where every PIN, password
/// and hierarchy authorization value is replaced.
pub trait ServiceConfig: Serialize {
    fn redact(&mut self);
}

impl ServiceConfig for KeydConfig {
    fn redact(&mut self) {
        for value in self
            .aziot_keys
            .values_mut()
            .chain(self.preloaded_keys.values_mut())
        {
            *value = redact_pin(value);
        }
    }
}

impl AuthOut {
    fn redact(&mut self) {
        if let Some(p) = &mut self.password {
            *p = REDACTED.to_owned();
        }
    }
}

impl ServiceConfig for CertdConfig {
    fn redact(&mut self) {
        if let Some(est) = &mut self.cert_issuance.est {
            est.auth.redact();
        }
        for options in self.cert_issuance.certs.values_mut() {
            options.auth.redact();
        }
    }
}

impl ServiceConfig for IdentitydConfig {
    /// identityd's config holds IDs and names only; nothing to redact.
    fn redact(&mut self) {}
}

impl ServiceConfig for TpmdConfig {
    fn redact(&mut self) {
        if let Some(h) = &mut self.hierarchy_authorization {
            for v in [&mut h.endorsement, &mut h.owner].into_iter().flatten() {
                *v = REDACTED.to_owned();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn certd_with(est: EstOut) -> toml::Table {
        let config = CertdConfig {
            homedir_path: "/var/lib/aziot/certd".to_owned(),
            max_requests: None,
            cert_issuance: CertIssuanceOut {
                est: Some(est),
                local_ca: None,
                certs: BTreeMap::new(),
            },
            preloaded_certs: BTreeMap::new(),
            principal: Vec::new(),
        };
        toml::to_string(&config).unwrap().parse().unwrap()
    }

    /// An EST section without URLs or trusted certs is written without `urls` and
    /// `trusted_certs`; with them, both are written. The always-present maps stay.
    #[test]
    fn empty_est_urls_and_trusted_certs_are_left_out() {
        let empty = certd_with(EstOut {
            auth: AuthOut {
                username: Some("u".to_owned()),
                password: Some("p".to_owned()),
                ..AuthOut::default()
            },
            ..EstOut::default()
        });
        let expected: toml::Table = "homedir_path = \"/var/lib/aziot/certd\"\n\
             [cert_issuance.est]\nusername = \"u\"\npassword = \"p\"\n[preloaded_certs]\n"
            .parse()
            .unwrap();
        assert_eq!(empty, expected);

        let full = certd_with(EstOut {
            trusted_certs: vec!["est-server-ca-1".to_owned()],
            urls: [("default".to_owned(), "https://est/".to_owned())].into(),
            ..EstOut::default()
        });
        let est = full["cert_issuance"]["est"].as_table().unwrap();
        assert_eq!(est["trusted_certs"].as_array().unwrap().len(), 1);
        assert_eq!(est["urls"]["default"].as_str(), Some("https://est/"));
    }
}
