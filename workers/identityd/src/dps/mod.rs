//! DPS provisioning (spec identityd.md §6.2, §10, §11; cloud-protocols.md §3): the typed
//! `[provisioning] source = "dps"` settings ([`DpsSettings`]), the DPS registration client
//! ([`client`]) and identityd's tpmd client ([`tpm`]: EK/SRK, the activation blob's import, SAS
//! signatures by the TPM's auth key).
//!
//! The payload file (`payload = { uri = "file:///..." }`) is read by the **broker** (root: the
//! config names it) at start and at each reload, and handed to the worker inside its config as
//! `payload.json` ([`inline_payload`]); the confined worker cannot (and need not) open it. The
//! unconfined run reads the file itself.

pub mod client;
pub mod tpm;

use serde::Deserialize;
use serde_json::Value;

use crate::config::{CsrSubject, Source};
use crate::hub::transport::Authority;

/// `payload.json`: the key of the inlined payload (written by the broker only).
pub const PAYLOAD_JSON_KEY: &str = "json";
/// A payload file larger than this is refused.
pub const MAX_PAYLOAD_LEN: u64 = 64 * 1024;

/// `[provisioning.attestation]` (§6.2).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum Attestation {
    SymmetricKey {
        registration_id: String,
        /// keyd key ID of the device's DPS key (for a group enrollment: the derived device key).
        symmetric_key: String,
    },
    X509 {
        identity_cert: String,
        identity_pk: String,
        #[serde(default)]
        registration_id: Option<CsrSubject>,
        /// §10.3: identityd renews the identity cert through certd and re-registers
        /// ([`crate::renew`]).
        #[serde(default)]
        identity_auto_renew: Option<crate::renew::AutoRenew>,
    },
    Tpm {
        registration_id: String,
    },
}

impl Attestation {
    /// E2's `auth` (§3.3).
    pub fn name(&self) -> &'static str {
        match self {
            Attestation::SymmetricKey { .. } => "symmetric_key",
            Attestation::X509 { .. } => "x509",
            Attestation::Tpm { .. } => "tpm",
        }
    }
}

/// The DPS settings of a `source = "dps"` config, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct DpsSettings {
    /// Scheme, host and port of `global_endpoint` (the path is replaced on every request).
    pub endpoint: Authority,
    /// `global_endpoint` normalised (`https://host[:port]/`), for E2.
    pub endpoint_url: String,
    pub scope_id: String,
    pub attestation: Attestation,
    /// `payload.uri`, when configured.
    pub payload_uri: Option<String>,
    /// The payload as the broker read it (`payload.json`).
    pub payload_json: Option<String>,
}

/// A `[provisioning]` DPS section that cannot be used, with the reason.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error("[provisioning] source = \"dps\": {0}")]
pub struct DpsConfigError(pub String);

fn bad(s: impl Into<String>) -> DpsConfigError {
    DpsConfigError(s.into())
}

/// `file:///abs/path` → `/abs/path` (percent-decoded).
pub fn payload_path(uri: &str) -> Result<std::path::PathBuf, DpsConfigError> {
    let rest = uri
        .strip_prefix("file://")
        .ok_or_else(|| bad(format!("payload uri {uri:?} is not a file:// URL")))?;
    // `file://localhost/abs` or `file:///abs`
    let path = rest.strip_prefix("localhost").unwrap_or(rest);
    if !path.starts_with('/') {
        return Err(bad(format!(
            "payload uri {uri:?} is not an absolute file:// URL"
        )));
    }
    let decoded = aziot_ipc::endpoint::percent_decode(path)
        .ok_or_else(|| bad(format!("payload uri {uri:?} has an invalid percent escape")))?;
    Ok(std::path::PathBuf::from(decoded))
}

impl DpsSettings {
    /// The DPS settings of `source`; `None` for other sources.
    pub fn from_source(source: &Source) -> Result<Option<DpsSettings>, DpsConfigError> {
        let Source::Dps {
            global_endpoint,
            scope_id,
            payload,
            attestation,
        } = source
        else {
            return Ok(None);
        };
        let (scheme, rest) = global_endpoint.split_once("://").ok_or_else(|| {
            bad(format!(
                "global_endpoint {global_endpoint:?} is not an absolute URL"
            ))
        })?;
        if !scheme.eq_ignore_ascii_case("https") {
            return Err(bad(format!(
                "global_endpoint {global_endpoint:?} must be an https:// URL"
            )));
        }
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let endpoint =
            Authority::parse(authority, 443).map_err(|e| bad(format!("global_endpoint: {e}")))?;
        if scope_id.is_empty() || scope_id.contains(['/', '?', '#', ' ']) {
            return Err(bad(format!("invalid scope_id {scope_id:?}")));
        }
        let attestation: Attestation =
            attestation
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| {
                    bad(format!("[provisioning.attestation]: {}", e.message()))
                })?;
        match &attestation {
            Attestation::SymmetricKey {
                registration_id, ..
            }
            | Attestation::Tpm { registration_id } => {
                check_registration_id(registration_id)?;
            }
            Attestation::X509 {
                registration_id,
                identity_auto_renew,
                ..
            } => {
                if let Some(id) = registration_id.as_ref().and_then(registration_cn) {
                    check_registration_id(&id)?;
                } else if let Some(CsrSubject::Subject(_)) = registration_id {
                    return Err(bad("registration_id table without CN"));
                }
                let _ = identity_auto_renew; // checked while parsing (crate::renew::Period)
            }
        }
        let (payload_uri, payload_json) = match payload {
            None => (None, None),
            Some(p) => {
                let uri = p
                    .get("uri")
                    .and_then(toml::Value::as_str)
                    .ok_or_else(|| bad("payload must be { uri = \"file:///...\" }"))?;
                payload_path(uri)?;
                let json = p
                    .get(PAYLOAD_JSON_KEY)
                    .and_then(toml::Value::as_str)
                    .map(str::to_owned);
                (Some(uri.to_owned()), json)
            }
        };
        Ok(Some(DpsSettings {
            endpoint_url: format!("https://{}/", endpoint.text),
            endpoint,
            scope_id: scope_id.clone(),
            attestation,
            payload_uri,
            payload_json,
        }))
    }

    /// The configured registration ID (for X.509 without one: `None`, the cert's CN is used).
    pub fn registration_id(&self) -> Option<String> {
        match &self.attestation {
            Attestation::SymmetricKey {
                registration_id, ..
            }
            | Attestation::Tpm { registration_id } => Some(registration_id.clone()),
            Attestation::X509 {
                registration_id, ..
            } => registration_id.as_ref().and_then(registration_cn),
        }
    }

    /// The payload (§3.2): the broker's inlined copy, else the file itself (unconfined run).
    pub fn payload(&self) -> Result<Option<Value>, DpsConfigError> {
        if let Some(text) = &self.payload_json {
            return serde_json::from_str(text)
                .map(Some)
                .map_err(|e| bad(format!("payload: {e}")));
        }
        match &self.payload_uri {
            None => Ok(None),
            Some(uri) => read_payload(&payload_path(uri)?).map(Some),
        }
    }

    /// What identifies this provisioning configuration (endpoint, scope, attestation, payload
    /// file): stored with the `device_info` backup, which is not used after a change.
    pub fn fingerprint(&self) -> String {
        let text = format!(
            "dps\n{}\n{}\n{:?}\n{:?}",
            self.endpoint.text, self.scope_id, self.attestation, self.payload_uri
        );
        crate::state::hex(&openssl::sha::sha256(text.as_bytes()))
    }
}

fn check_registration_id(id: &str) -> Result<(), DpsConfigError> {
    if id.is_empty() || id.contains(['/', '?', '#', ' ', '%']) || id.chars().any(char::is_control) {
        return Err(bad(format!("invalid registration_id {id:?}")));
    }
    Ok(())
}

/// The CN of an X.509 `registration_id` (string form, or the table's `CN`, any case).
pub fn registration_cn(subject: &CsrSubject) -> Option<String> {
    match subject {
        CsrSubject::CommonName(cn) => Some(cn.clone()),
        CsrSubject::Subject(map) => map
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("CN"))
            .map(|(_, v)| v.clone()),
    }
}

/// Reads and parses a payload file: a regular file (the last component not a symlink), at most
/// [`MAX_PAYLOAD_LEN`] bytes, JSON of any type.
pub fn read_payload(path: &std::path::Path) -> Result<Value, DpsConfigError> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            bad(format!(
                "could not open the payload file {}: {e}",
                path.display()
            ))
        })?;
    let meta = file
        .metadata()
        .map_err(|e| bad(format!("payload file {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(bad(format!(
            "payload file {} is not a regular file",
            path.display()
        )));
    }
    // Root reads it: only a file root owns (never one another user could swap in).
    if nix::unistd::geteuid().is_root() && meta.uid() != 0 {
        return Err(bad(format!(
            "payload file {} is not owned by root",
            path.display()
        )));
    }
    let mut text = Vec::new();
    file.take(MAX_PAYLOAD_LEN + 1)
        .read_to_end(&mut text)
        .map_err(|e| {
            bad(format!(
                "could not read the payload file {}: {e}",
                path.display()
            ))
        })?;
    if text.len() as u64 > MAX_PAYLOAD_LEN {
        return Err(bad(format!(
            "payload file {} is larger than {MAX_PAYLOAD_LEN} bytes",
            path.display()
        )));
    }
    serde_json::from_slice(&text)
        .map_err(|e| bad(format!("payload file {} is not JSON: {e}", path.display())))
}

/// Broker side: reads the payload file named by a DPS config's `payload.uri` and stores its
/// (compact) JSON as `payload.json` in `merged` (the config text the worker gets); any
/// `payload.json` the files set is replaced. No-op for other sources.
pub fn inline_payload(
    merged: &mut toml::Table,
    settings: Option<&DpsSettings>,
) -> Result<(), DpsConfigError> {
    let Some(uri) = settings.and_then(|s| s.payload_uri.as_deref()) else {
        return Ok(());
    };
    let value = read_payload(&payload_path(uri)?)?;
    let payload = merged
        .get_mut("provisioning")
        .and_then(|p| p.get_mut("payload"))
        .and_then(toml::Value::as_table_mut)
        .ok_or_else(|| bad("payload must be a table"))?;
    payload.insert(
        PAYLOAD_JSON_KEY.to_owned(),
        toml::Value::String(value.to_string()),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(text: &str) -> Result<Option<DpsSettings>, DpsConfigError> {
        let c: crate::config::Config = toml::from_str(&format!(
            "hostname = \"h\"\nhomedir = \"/x\"\n[provisioning]\nsource = \"dps\"\n{text}"
        ))
        .expect("parses");
        DpsSettings::from_source(&c.provisioning.source)
    }

    #[test]
    fn attestation_methods() {
        let s = settings("global_endpoint = \"https://127.0.0.1:8443/x?y\"\nscope_id = \"0ne\"\n[provisioning.attestation]\nmethod = \"symmetric_key\"\nregistration_id = \"r1\"\nsymmetric_key = \"device-id\"\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            (s.endpoint.host.as_str(), s.endpoint.port),
            ("127.0.0.1", 8443)
        );
        assert_eq!(s.endpoint_url, "https://127.0.0.1:8443/");
        assert_eq!(s.registration_id().as_deref(), Some("r1"));
        let t = settings("global_endpoint = \"https://dps.example\"\nscope_id = \"0ne\"\n[provisioning.attestation]\nmethod = \"tpm\"\nregistration_id = \"r2\"\n").unwrap().unwrap();
        assert_eq!((t.attestation.name(), t.endpoint.port), ("tpm", 443));
        assert_ne!(s.fingerprint(), t.fingerprint());
        let x = settings("global_endpoint = \"https://dps\"\nscope_id = \"0ne\"\n[provisioning.attestation]\nmethod = \"x509\"\nidentity_cert = \"c\"\nidentity_pk = \"k\"\n[provisioning.attestation.registration_id]\nCN = \"r3\"\nL = \"AQ\"\n").unwrap().unwrap();
        assert_eq!(x.registration_id().as_deref(), Some("r3"));
        let e = settings("global_endpoint = \"http://dps\"\nscope_id = \"0ne\"\n[provisioning.attestation]\nmethod = \"tpm\"\nregistration_id = \"r\"\n").unwrap_err();
        assert!(e.0.contains("https://"), "{e}");
        let e = settings("global_endpoint = \"https://dps\"\nscope_id = \"0ne\"\n[provisioning.attestation]\nmethod = \"tpm\"\n").unwrap_err();
        assert!(e.0.contains("registration_id"), "{e}");
        let a = settings("global_endpoint = \"https://dps\"\nscope_id = \"0ne\"\n[provisioning.attestation]\nmethod = \"x509\"\nidentity_cert = \"c\"\nidentity_pk = \"k\"\nidentity_auto_renew = { rotate_key = true, threshold = \"80%\", retry = \"4%\" }\n").unwrap().unwrap();
        assert!(matches!(a.attestation, Attestation::X509 { identity_auto_renew: Some(_), .. }));
        for bad in ["threshold = \"0%\", retry = \"4%\"", "threshold = \"100%\", retry = \"4%\"", "threshold = \"80\", retry = \"4%\"", "threshold = \"0min\", retry = \"4%\""] {
            let e = settings(&format!("global_endpoint = \"https://dps\"\nscope_id = \"0ne\"\n[provisioning.attestation]\nmethod = \"x509\"\nidentity_cert = \"c\"\nidentity_pk = \"k\"\nidentity_auto_renew = {{ rotate_key = true, {bad} }}\n")).unwrap_err();
            assert!(e.0.contains("threshold"), "{bad}: {e}");
        }
    }

    /// The sandbox grants (service.rs): tpmd's socket only with TPM attestation; the DPS
    /// endpoint's port when it is not 443.
    #[test]
    fn sandbox_grants_follow_the_attestation() {
        let config = |attestation: &str| -> crate::config::Config {
            toml::from_str(&format!(
                "hostname = \"h\"\nhomedir = \"/x\"\n[provisioning]\nsource = \"dps\"\nglobal_endpoint = \"https://127.0.0.1:8443/\"\nscope_id = \"0ne\"\n[provisioning.attestation]\n{attestation}\n"
            ))
            .expect("config")
        };
        let sockets = |c: &crate::config::Config| -> Vec<String> {
            crate::service::grants(c, None)
                .expect("grants")
                .sockets
                .iter()
                .map(|s| s.path.display().to_string())
                .collect()
        };
        let tpm = config("method = \"tpm\"\nregistration_id = \"r\"");
        assert_eq!(
            sockets(&tpm),
            [
                "/run/aziot/keyd.sock",
                "/run/aziot/certd.sock",
                "/run/aziot/tpmd.sock"
            ]
        );
        let sym =
            config("method = \"symmetric_key\"\nregistration_id = \"r\"\nsymmetric_key = \"k\"");
        assert_eq!(
            sockets(&sym),
            ["/run/aziot/keyd.sock", "/run/aziot/certd.sock"]
        );
        let ports: Vec<u16> = crate::service::grants(&sym, None)
            .expect("grants")
            .tcp_ports
            .iter()
            .map(|p| p.port)
            .collect();
        assert_eq!(ports, [8443]);
    }

    #[test]
    fn payload_uris() {
        assert_eq!(
            payload_path("file:///a/b%20c.json").unwrap(),
            std::path::PathBuf::from("/a/b c.json")
        );
        assert!(payload_path("http://x/y").is_err());
        assert!(payload_path("file://rel").is_err());
    }
}
