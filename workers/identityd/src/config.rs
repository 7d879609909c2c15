//! identityd's configuration (spec identityd.md §6, common-http.md §3): the serde shape of the
//! merged `config.toml` + `config.d/*.toml`, its validation (§6.6) and the uid map (§4.1).
//!
//! Unknown keys are reported (file and key) by `aziot_ipc::config::deserialize` and otherwise
//! ignored, as upstream ignores them.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

/// `cloud_timeout_sec` may not be lower (§6.1).
pub const MIN_CLOUD_TIMEOUT_SEC: u64 = 70;

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Config {
    pub hostname: String,
    pub homedir: PathBuf,
    #[serde(default, skip_serializing_if = "is_false")]
    pub prefer_module_identity_cache: bool,
    #[serde(default = "default_max_requests", skip_serializing_if = "is_default_max_requests")]
    pub max_requests: usize,
    #[serde(
        default = "default_cloud_timeout",
        deserialize_with = "cloud_timeout",
        skip_serializing_if = "is_default_cloud_timeout"
    )]
    pub cloud_timeout_sec: u64,
    #[serde(default = "default_cloud_retries", skip_serializing_if = "is_default_cloud_retries")]
    pub cloud_retries: u32,
    pub provisioning: Provisioning,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principal: Vec<Principal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub localid: Option<LocalId>,
    /// Honoured in every build (upstream: debug builds only), like keyd's and certd's; never
    /// written to `prev_state`.
    #[serde(default, skip_serializing)]
    pub endpoints: Option<Endpoints>,
    /// New: the broker's sandbox settings; never written to `prev_state`.
    #[serde(default, skip_serializing)]
    pub sandbox: aziot_ipc::config::SandboxConfig,
}

fn is_false(b: &bool) -> bool {
    !*b
}
fn default_max_requests() -> usize {
    10
}
fn is_default_max_requests(n: &usize) -> bool {
    *n == 10
}
fn default_cloud_timeout() -> u64 {
    MIN_CLOUD_TIMEOUT_SEC
}
fn is_default_cloud_timeout(n: &u64) -> bool {
    *n == MIN_CLOUD_TIMEOUT_SEC
}
fn default_cloud_retries() -> u32 {
    1
}
fn is_default_cloud_retries(n: &u32) -> bool {
    *n == 1
}

fn cloud_timeout<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = u64::deserialize(d)?;
    if v < MIN_CLOUD_TIMEOUT_SEC {
        return Err(serde::de::Error::custom("cloud_timeout_sec must be at least 70 seconds"));
    }
    Ok(v)
}

/// `[endpoints]`: all four required when the table is present (§6.1).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Endpoints {
    pub aziot_certd: String,
    pub aziot_identityd: String,
    pub aziot_keyd: String,
    pub aziot_tpmd: String,
}

/// `[provisioning]` (§6.2).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Provisioning {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_gateway_hostname: Option<String>,
    #[serde(flatten)]
    pub source: Source,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(tag = "source", rename_all = "lowercase")]
pub enum Source {
    Manual {
        iothub_hostname: String,
        device_id: String,
        authentication: ManualAuth,
    },
    /// Parsed so that a DPS config is recognised; this build cannot provision with DPS.
    Dps {
        global_endpoint: String,
        scope_id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        payload: Option<toml::Value>,
        attestation: toml::Value,
    },
    None,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(tag = "method", rename_all = "lowercase")]
pub enum ManualAuth {
    Sas {
        device_id_pk: String,
    },
    X509 {
        identity_cert: String,
        identity_pk: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        csr_subject: Option<CsrSubject>,
    },
}

/// `csr_subject`: a CN string, or a table of RDN name → value (`CN` mandatory).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum CsrSubject {
    CommonName(String),
    Subject(BTreeMap<String, String>),
}

impl CsrSubject {
    /// The RDNs with names upper-cased and the CN replaced by `cn` (§6.2: when identityd creates
    /// the cert, the CN is always the device ID).
    pub fn with_cn(subject: Option<&CsrSubject>, cn: &str) -> Vec<(String, String)> {
        let mut rdns = vec![("CN".to_owned(), cn.to_owned())];
        if let Some(CsrSubject::Subject(map)) = subject {
            for (k, v) in map {
                let k = k.to_ascii_uppercase();
                if k != "CN" {
                    rdns.push((k, v.clone()));
                }
            }
        }
        rdns
    }
}

/// `[localid]` (§6.4).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct LocalId {
    pub domain: String,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum IdType {
    Device,
    Module,
    Local,
}

/// `localid = { type = "x509", attributes = "client"|"server" }`.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum LocalIdOpts {
    X509 {
        #[serde(default)]
        attributes: LocalIdAttributes,
    },
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LocalIdAttributes {
    #[default]
    Client,
    Server,
}

impl LocalIdOpts {
    pub fn attributes(&self) -> LocalIdAttributes {
        match self {
            LocalIdOpts::X509 { attributes } => *attributes,
        }
    }
}

/// `[[principal]]` (§6.5).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Principal {
    pub uid: u32,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idtype: Option<Vec<IdType>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub localid: Option<LocalIdOpts>,
}

impl Principal {
    pub fn has(&self, t: IdType) -> bool {
        self.idtype.as_ref().is_some_and(|v| v.contains(&t))
    }
}

/// A validation failure (§6.6), with the spec's message.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct CheckError(pub String);

impl Config {
    /// §6.6, rules 1–4, in principal order.
    pub fn check(&self) -> Result<(), CheckError> {
        let mut names = std::collections::HashSet::new();
        for p in &self.principal {
            if !names.insert(p.name.as_str()) {
                return Err(CheckError(format!("duplicate module name: {}", p.name)));
            }
            if p.idtype.is_none() {
                continue;
            }
            if p.has(IdType::Local) {
                if self.localid.is_none() {
                    return Err(CheckError(format!(
                        "invalid config for {}: local id type requires localid config",
                        p.name
                    )));
                }
            } else if p.localid.is_some() {
                return Err(CheckError(format!(
                    "invalid config for {}: local identity options specified for non-local identity",
                    p.name
                )));
            }
            if matches!(self.provisioning.source, Source::None) && (p.has(IdType::Module) || p.has(IdType::Device)) {
                return Err(CheckError(format!(
                    "invalid config for {}: module or device identity requires provisioning with IoT Hub",
                    p.name
                )));
            }
        }
        Ok(())
    }

    /// The names of every principal whose idtype contains `module` (§12 step 2).
    pub fn module_names(&self) -> std::collections::BTreeSet<String> {
        self.principal.iter().filter(|p| p.has(IdType::Module)).map(|p| p.name.clone()).collect()
    }

    /// The principal declaring local identity `name`, if any.
    pub fn local_principal(&self, name: &str) -> Option<&Principal> {
        self.principal.iter().find(|p| p.name == name && p.has(IdType::Local))
    }
}

/// The caller class of a uid (§4.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    HostProcess(Principal),
    Daemon,
    LocalRoot,
    Unknown,
}

/// uid → principal, built as §4.1 says: the first principal without `idtype` is the Daemon
/// (later ones are dropped with a warning); among the accepted ones the last per uid wins.
#[derive(Clone, Debug, Default)]
pub struct Callers {
    by_uid: HashMap<u32, Principal>,
}

impl Callers {
    pub fn new(principals: &[Principal]) -> Callers {
        let mut by_uid = HashMap::new();
        let mut daemon_seen = false;
        for p in principals {
            if p.idtype.is_none() {
                if daemon_seen {
                    tracing::warn!(
                        "Principal \"{}\" is not authorized. Please ensure there is only one principal without a type in the config.toml",
                        p.name
                    );
                    continue;
                }
                daemon_seen = true;
            }
            by_uid.insert(p.uid, p.clone());
        }
        Callers { by_uid }
    }

    pub fn class(&self, uid: u32) -> Caller {
        match self.by_uid.get(&uid) {
            Some(p) if p.idtype.is_some() => Caller::HostProcess(p.clone()),
            Some(_) => Caller::Daemon,
            None if uid == 0 => Caller::LocalRoot,
            None => Caller::Unknown,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    const BASE: &str = "hostname = \"h\"\nhomedir = \"/x\"\n[provisioning]\nsource = \"manual\"\niothub_hostname = \"hub\"\ndevice_id = \"d\"\n[provisioning.authentication]\nmethod = \"sas\"\ndevice_id_pk = \"device-id\"\n";

    #[test]
    fn manual_sas_defaults() {
        let c = parse(BASE).unwrap();
        assert_eq!(c.cloud_timeout_sec, 70);
        assert_eq!(c.cloud_retries, 1);
        assert_eq!(c.max_requests, 10);
        assert!(!c.prefer_module_identity_cache);
        assert!(matches!(c.provisioning.source, Source::Manual { authentication: ManualAuth::Sas { .. }, .. }));
        // prev_state omits defaults
        let text = toml::to_string(&c).unwrap();
        assert!(!text.contains("cloud_timeout_sec") && !text.contains("max_requests") && !text.contains("principal"));
        assert_eq!(parse(&text).unwrap(), c);
    }

    #[test]
    fn cloud_timeout_minimum() {
        let e = parse(&format!("cloud_timeout_sec = 69\n{BASE}")).unwrap_err();
        assert!(e.to_string().contains("cloud_timeout_sec must be at least 70 seconds"), "{e}");
        assert_eq!(parse(&format!("cloud_timeout_sec = 70\n{BASE}")).unwrap().cloud_timeout_sec, 70);
    }

    #[test]
    fn idtype_must_be_an_array() {
        assert!(parse(&format!("{BASE}[[principal]]\nuid = 1\nname = \"m\"\nidtype = \"module\"\n")).is_err());
        let c = parse(&format!(
            "{BASE}[localid]\ndomain = \"d\"\n[[principal]]\nuid = 1\nname = \"m\"\nidtype = [\"module\", \"local\"]\nlocalid = {{ type = \"x509\", attributes = \"server\" }}\n"
        ))
        .unwrap();
        assert_eq!(c.principal[0].localid.unwrap().attributes(), LocalIdAttributes::Server);
    }

    #[test]
    fn validation_rules() {
        let with = |extra: &str| parse(&format!("{BASE}{extra}")).unwrap().check();
        assert_eq!(
            with("[[principal]]\nuid = 1\nname = \"a\"\n[[principal]]\nuid = 2\nname = \"a\"\nidtype = [\"module\"]\n"),
            Err(CheckError("duplicate module name: a".into()))
        );
        assert_eq!(
            with("[[principal]]\nuid = 1\nname = \"a\"\nidtype = [\"local\"]\n"),
            Err(CheckError("invalid config for a: local id type requires localid config".into()))
        );
        assert_eq!(
            with("[[principal]]\nuid = 1\nname = \"a\"\nidtype = [\"module\"]\nlocalid = { type = \"x509\" }\n"),
            Err(CheckError("invalid config for a: local identity options specified for non-local identity".into()))
        );
        let none = "hostname = \"h\"\nhomedir = \"/x\"\n[provisioning]\nsource = \"none\"\n[[principal]]\nuid = 1\nname = \"a\"\nidtype = [\"device\"]\n";
        assert_eq!(
            parse(none).unwrap().check(),
            Err(CheckError(
                "invalid config for a: module or device identity requires provisioning with IoT Hub".into()
            ))
        );
        // a principal without idtype skips rules 2-4
        assert_eq!(with("[[principal]]\nuid = 1\nname = \"a\"\nlocalid = { type = \"x509\" }\n"), Ok(()));
    }

    #[test]
    fn caller_classes() {
        let p =
            |uid, name: &str, idtype: Option<Vec<IdType>>| Principal { uid, name: name.into(), idtype, localid: None };
        let callers = Callers::new(&[
            p(5, "daemon", None),
            p(6, "second-daemon", None),
            p(7, "m", Some(vec![IdType::Module])),
            p(7, "m2", Some(vec![IdType::Device])),
            p(0, "root-restricted", Some(vec![])),
        ]);
        assert_eq!(callers.class(5), Caller::Daemon);
        assert_eq!(callers.class(6), Caller::Unknown, "only the first principal without idtype is the daemon");
        assert!(matches!(callers.class(7), Caller::HostProcess(p) if p.name == "m2"), "last one wins");
        assert!(matches!(callers.class(0), Caller::HostProcess(p) if p.name == "root-restricted"));
        assert_eq!(Callers::new(&[]).class(0), Caller::LocalRoot);
        assert_eq!(Callers::new(&[]).class(1000), Caller::Unknown);
    }

    #[test]
    fn csr_subject_cn_is_replaced() {
        let s = CsrSubject::Subject(BTreeMap::from([("cn".into(), "x".into()), ("l".into(), "AQ".into())]));
        assert_eq!(CsrSubject::with_cn(Some(&s), "dev"), vec![("CN".into(), "dev".into()), ("L".into(), "AQ".into())]);
        assert_eq!(
            CsrSubject::with_cn(Some(&CsrSubject::CommonName("x".into())), "dev"),
            vec![("CN".into(), "dev".into())]
        );
    }
}
