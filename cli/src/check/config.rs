//! Checks 1–6: the service configs are well-formed, up to date with the super-config, and
//! identityd's hostname is valid (spec aziotctl.md §4.4).
//!
//! A config is validated by the service's own code (`ServiceImpl::reload`: read and merge as
//! root, root-owned files only, deserialize, validate), exactly what its broker runs at start,
//! and with the same paths (`AZIOT_<SVC>_CONFIG`, `AZIOT_<SVC>_CONFIG_DIR`).

use std::path::{Path, PathBuf};

use aziot_ipc::config::ConfigError;
use aziot_ipc::service::{ServiceError, ServiceImpl};

use super::{Ctx, Outcome};

/// The super-config (spec §2.1).
pub const SUPER_CONFIG: &str = "/etc/aziot/config.toml";

fn implementation(short: &str) -> &'static dyn ServiceImpl {
    match short {
        "keyd" => &aziot_keyd::service::Keyd,
        "certd" => &aziot_certd::service::Certd,
        "identityd" => &aziot_identityd::service::Identityd,
        _ => &aziot_tpmd::service::Tpmd,
    }
}

/// Validates `short`'s config: the merged TOML text, or the check's failure.
fn validate(ctx: &Ctx<'_>, short: &str) -> Result<String, Outcome> {
    let info = aziot_policy::services::by_short(short).expect("a service of the table");
    let paths = aziot_ipc::service::config_paths(info);
    implementation(short)
        .reload(&paths)
        .map_err(|e| failure(ctx, short, &e))
}

fn failure(ctx: &Ctx<'_>, short: &str, e: &ServiceError) -> Outcome {
    let denied = |path: &Path, source: &std::io::Error| {
        Outcome::Fatal(vec![
            "Could not open file. You might need to run this command as root.".to_owned(),
            format!("error in file {}", path.display()),
            source.to_string(),
        ])
    };
    match e {
        ServiceError::Config(
            ConfigError::Read { path, source } | ConfigError::ListDir { path, source },
        ) if source.kind() == std::io::ErrorKind::PermissionDenied => {
            return denied(path, source);
        }
        _ => {}
    }
    let message = if ctx.opts.verbose {
        format!(
            "{short}'s configuration is not well-formed.\nNote: In case of syntax errors, the error may not be exactly at the reported line number and position."
        )
    } else {
        format!("{short}'s configuration file is not well-formed.")
    };
    Outcome::error_from(message, e)
}

pub fn keyd_well_formed(ctx: &mut Ctx<'_>) -> Outcome {
    let text = match validate(ctx, "keyd") {
        Ok(t) => t,
        Err(o) => return o,
    };
    match toml::from_str(&text) {
        Ok(c) => {
            ctx.keyd = Some(c);
            Outcome::Ok
        }
        Err(e) => Outcome::error_from("keyd's configuration file is not well-formed.", &e),
    }
}

pub fn certd_well_formed(ctx: &mut Ctx<'_>) -> Outcome {
    let text = match validate(ctx, "certd") {
        Ok(t) => t,
        Err(o) => return o,
    };
    let parsed = toml::from_str::<aziot_certd::config::RawConfig>(&text)
        .map_err(|e| Outcome::error_from("certd's configuration file is not well-formed.", &e))
        .and_then(|raw| {
            aziot_certd::config::Config::from_raw(raw, &mut |_| {}).map_err(|e| {
                Outcome::error_from("certd's configuration file is not well-formed.", &e)
            })
        });
    match parsed {
        Ok(c) => {
            ctx.certd = Some(c);
            Outcome::Ok
        }
        Err(o) => o,
    }
}

pub fn tpmd_well_formed(ctx: &mut Ctx<'_>) -> Outcome {
    let text = match validate(ctx, "tpmd") {
        Ok(t) => t,
        Err(o) => return o,
    };
    match toml::from_str(&text) {
        Ok(c) => {
            ctx.tpmd = Some(c);
            Outcome::Ok
        }
        Err(e) => Outcome::error_from("tpmd's configuration file is not well-formed.", &e),
    }
}

pub fn identityd_well_formed(ctx: &mut Ctx<'_>) -> Outcome {
    let text = match validate(ctx, "identityd") {
        Ok(t) => t,
        Err(o) => return o,
    };
    match aziot_identityd::config_from_text(&text) {
        Ok(c) => {
            // The previous config, loaded quietly and ignored when invalid (§4.2).
            let prev = std::fs::read_to_string(c.homedir.join("prev_state")).ok();
            ctx.prev_identityd = prev.and_then(|t| aziot_identityd::config_from_text(&t).ok());
            ctx.identityd = Some(c);
            Outcome::Ok
        }
        Err(e) => Outcome::error_from("identityd's configuration file is not well-formed.", &e),
    }
}

/// The program name in messages (§1.5).
pub fn program_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "aziotctl".to_owned())
}

pub fn up_to_date(_ctx: &mut Ctx<'_>) -> Outcome {
    let super_meta = match std::fs::metadata(SUPER_CONFIG) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Outcome::Ignored,
        Err(e) => {
            return Outcome::error_from(format!("could not read metadata of {SUPER_CONFIG}"), &e)
        }
    };
    let prog = program_name();
    for short in ["keyd", "certd", "identityd", "tpmd"] {
        let info = aziot_policy::services::by_short(short).expect("a service of the table");
        let generated: PathBuf = info.config_dir().join("00-super.toml");
        let meta = match std::fs::metadata(&generated) {
            Ok(m) => m,
            Err(_) => {
                return Outcome::warning(format!(
                    "{} does not exist.\nDid you run '{prog} config apply'?",
                    generated.display()
                ))
            }
        };
        if let (Ok(s), Ok(g)) = (super_meta.modified(), meta.modified()) {
            if s > g {
                return Outcome::warning(format!(
                    "{SUPER_CONFIG} was modified after {short}'s config\nYou must run '{prog} config apply' to update {short}'s config with the latest config.toml"
                ));
            }
        }
    }
    Outcome::Ok
}

pub fn hostname(ctx: &mut Ctx<'_>) -> Outcome {
    let Some(config) = &ctx.identityd else {
        return Outcome::Skipped;
    };
    let configured = config.hostname.clone();
    ctx.set("config_hostname", configured.clone());
    if configured.parse::<std::net::IpAddr>().is_ok() {
        ctx.set("machine_hostname", configured);
        return Outcome::Ok;
    }
    let machine = match crate::hostname::machine_hostname(None) {
        Ok(h) => h,
        Err(e) => {
            ctx.set("machine_hostname", serde_json::Value::Null);
            return Outcome::error_from("could not get machine hostname", &e);
        }
    };
    ctx.set("machine_hostname", machine.clone());
    let (cfg, mach) = (
        configured.to_ascii_lowercase(),
        machine.to_ascii_lowercase(),
    );
    if cfg != mach && !cfg.starts_with(&format!("{mach}.")) {
        return Outcome::error(format!(
            "identityd config has hostname {cfg} but device reports hostname {mach}.\nHostname in identityd config must either be identical to the device hostname or be a fully-qualified domain name that has the device hostname as the first component."
        ));
    }
    if !rfc1035(&configured) {
        return Outcome::warning(format!(
            "identityd config has hostname {configured} which does not comply with RFC 1035.\n\n\
             - Hostname must be between 1 and 255 octets inclusive.\n\
             - Each label in the hostname (component separated by \".\") must be between 1 and 63 octets inclusive.\n\
             - Each label must start with an ASCII alphabet character (a-z, A-Z), end with an ASCII alphanumeric character (a-z, A-Z, 0-9), and must contain only ASCII alphanumeric characters or hyphens (a-z, A-Z, 0-9, \"-\").\n\n\
             Not complying with RFC 1035 may cause errors during the TLS handshake with modules and downstream devices."
        ));
    }
    if configured.is_empty() || configured.len() > 64 {
        return Outcome::warning(format!(
            "identityd config hostname {configured} is too long to be used as a certificate issuer"
        ));
    }
    Outcome::Ok
}

/// RFC 1035 host name syntax (§4.4 check 6).
pub fn rfc1035(name: &str) -> bool {
    if name.is_empty() || name.len() > 255 {
        return false;
    }
    name.split('.').all(|label| {
        let b = label.as_bytes();
        !b.is_empty()
            && b.len() <= 63
            && b[0].is_ascii_alphabetic()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
    })
}

#[cfg(test)]
mod tests {
    use super::rfc1035;

    #[test]
    fn rfc1035_rules() {
        assert!(rfc1035("host-1.example.com"));
        assert!(!rfc1035("1host"));
        assert!(!rfc1035("host-"));
        assert!(!rfc1035("a..b"));
        assert!(!rfc1035("under_score"));
        assert!(!rfc1035(&"a".repeat(64)));
    }
}
