//! tpmd's configuration (spec tpmd.md §3), plus the new `[[principal]]` list.

use serde::{Deserialize, Deserializer};

use crate::tpm::{EK_HANDLE, PERSISTENT_BASE, SRK_HANDLE};

/// Largest `auth_key_index` (the persistent range ends at `0x81FFFFFF`... upstream caps at
/// `0x7FFFFF`).
pub const MAX_AUTH_KEY_INDEX: u32 = 0x7F_FF_FF;

#[derive(Clone, Debug, Deserialize)]
pub struct Config {
    /// TCTI loader string (default `device`).
    #[serde(default = "default_tcti")]
    pub tcti: String,
    /// Offset from `0x81000000` of the auth key's persistent handle (default `0x000100`).
    #[serde(default = "default_auth_key_index", deserialize_with = "auth_key_index")]
    pub auth_key_index: u32,
    #[serde(default)]
    pub hierarchy_authorization: HierarchyAuthorization,
    #[serde(default = "default_max_requests")]
    pub max_requests: usize,
    /// New: uids allowed to call tpmd besides root. Absent: the uid of user `aziotid`.
    #[serde(default)]
    pub principal: Vec<TpmPrincipal>,
    #[serde(default)]
    pub endpoints: Endpoints,
    /// New: the broker's sandbox settings.
    #[serde(default)]
    pub sandbox: aziot_ipc::config::SandboxConfig,
}

impl Default for Config {
    fn default() -> Self {
        toml::from_str("").expect("the empty config is valid")
    }
}

/// `[hierarchy_authorization]`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct HierarchyAuthorization {
    #[serde(default)]
    pub endorsement: String,
    #[serde(default)]
    pub owner: String,
}

/// `[[principal]]` of tpmd: a uid allowed to call every endpoint.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct TpmPrincipal {
    pub uid: u32,
}

/// `[endpoints]`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Endpoints {
    pub aziot_tpmd: Option<String>,
}

fn default_tcti() -> String {
    "device".to_owned()
}
fn default_auth_key_index() -> u32 {
    0x00_01_00
}
fn default_max_requests() -> usize {
    10
}

/// A TOML integer (as upstream), or additively a hex string `"0x00_01_00"` (the form the
/// shipped super-config template shows).
fn auth_key_index<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(i64),
        Str(String),
    }
    let value = match Raw::deserialize(d)? {
        Raw::Int(i) => i,
        Raw::Str(s) => {
            let digits: String = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")).unwrap_or("").replace('_', "");
            if digits.is_empty() {
                return Err(serde::de::Error::custom(format!("invalid value: string {s:?}, expected a hex string 0x...")));
            }
            i64::from_str_radix(&digits, 16).map_err(|_| serde::de::Error::custom(format!("invalid value: string {s:?}, expected a hex string 0x...")))?
        }
    };
    if !(0..=i64::from(MAX_AUTH_KEY_INDEX)).contains(&value) {
        return Err(serde::de::Error::custom(format!(
            "invalid value: integer `{value}`, expected integer in range 0x00_00_00..=0x7F_FF_FF"
        )));
    }
    Ok(value as u32)
}

/// Semantic checks (spec §3 Recommendation): the auth key must not take the SRK's handle nor
/// the TCG EK range `0x81010000..=0x8101FFFF`; the TCTI must not contain NUL.
pub fn validate(config: &Config) -> Result<(), String> {
    let handle = PERSISTENT_BASE + config.auth_key_index;
    if handle == SRK_HANDLE {
        return Err(format!("auth_key_index 0x{:06x} would place the auth key on the SRK handle 0x{SRK_HANDLE:08x}", config.auth_key_index));
    }
    if (0x8101_0000..=0x8101_FFFF).contains(&handle) {
        return Err(format!(
            "auth_key_index 0x{:06x} would place the auth key in the EK range (EK handle 0x{EK_HANDLE:08x})",
            config.auth_key_index
        ));
    }
    if config.tcti.contains('\0') {
        return Err("tcti contains a NUL character".to_owned());
    }
    Ok(())
}

/// The uids allowed to call tpmd: root, the configured principals, and — when none are
/// configured — the uid of user `aziotid` if it exists (resolved once, at start).
pub fn allowed_uids(config: &Config) -> Vec<u32> {
    let mut uids = vec![0];
    if config.principal.is_empty() {
        match nix::unistd::User::from_name("aziotid") {
            Ok(Some(user)) => uids.push(user.uid.as_raw()),
            Ok(None) => tracing::warn!("user aziotid does not exist; only root may call tpmd"),
            Err(e) => tracing::warn!("could not look up user aziotid ({e}); only root may call tpmd"),
        }
    } else {
        uids.extend(config.principal.iter().map(|p| p.uid));
    }
    uids.sort_unstable();
    uids.dedup();
    uids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(s)
    }

    #[test]
    fn defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.tcti, "device");
        assert_eq!(c.auth_key_index, 0x100);
        assert_eq!(c.max_requests, 10);
        assert!(validate(&c).is_ok());
    }

    #[test]
    fn example_and_hex_string() {
        let c = parse("tcti = \"swtpm:port=2321\"\nauth_key_index = 0x10_10_10\n[hierarchy_authorization]\nendorsement = \"hello\"\nowner = \"world\"\n[[principal]]\nuid = 1000\n").unwrap();
        assert_eq!(c.auth_key_index, 0x101010);
        assert_eq!(c.hierarchy_authorization.owner, "world");
        assert_eq!(allowed_uids(&c), vec![0, 1000]);
        assert_eq!(parse("auth_key_index = \"0x00_01_00\"").unwrap().auth_key_index, 0x100);
    }

    #[test]
    fn range_and_collisions() {
        let e = parse("auth_key_index = 0x800000").unwrap_err().to_string();
        assert!(e.contains("expected integer in range 0x00_00_00..=0x7F_FF_FF"), "{e}");
        assert!(parse("auth_key_index = -1").is_err());
        assert!(parse("auth_key_index = \"abc\"").is_err());
        assert!(validate(&parse("auth_key_index = 1").unwrap()).is_err());
        assert!(validate(&parse("auth_key_index = 0x010001").unwrap()).is_err());
        assert!(validate(&parse("auth_key_index = 0x01FFFF").unwrap()).is_err());
        assert!(validate(&parse("auth_key_index = 0x020000").unwrap()).is_ok());
    }
}
