//! tpmd as the broker and the worker entry see it ([`aziot_ipc::service::ServiceImpl`]): the
//! broker validates the config and opens the TPM as root; the worker starts the TPM on the
//! handed descriptor before it locks itself in.

use std::convert::Infallible;
use std::os::fd::OwnedFd;

use aziot_ipc::config::ConfigPaths;
use aziot_ipc::handoff::DescriptorKind;
use aziot_ipc::service::{BrokerSetup, Handed, LockIn, ServiceError, ServiceImpl, ServiceInfo};

/// tpmd's entry in the table of services.
pub const INFO: &ServiceInfo = aziot_ipc::service::services::get("tpmd");

/// Hand-off names (policy/services/tpmd.toml `[[descriptor]]`).
const LISTENER: &str = "listener";
const TPM: &str = "tpm";

/// Without `[[principal]]`, tpmd serves root and this user (identityd's).
const DEFAULT_CALLER: &str = aziot_ipc::service::services::get("identityd").user;

/// The TPM service.
#[derive(Debug)]
pub struct Tpmd;

fn warn_unknown(file: &std::path::Path, key: &str) {
    tracing::warn!("unknown config key {key:?} in {} (ignored)", file.display());
}

/// Reads and validates the config at `paths`.
fn read(paths: &ConfigPaths) -> Result<(toml::Table, crate::Config), ServiceError> {
    let merged = aziot_ipc::config::read_merged(paths)?;
    let config: crate::Config = aziot_ipc::config::deserialize(&merged, warn_unknown)?;
    crate::config::validate(&config).map_err(ServiceError::Invalid)?;
    Ok((merged.value, config))
}

/// The config text for the worker. Without `[[principal]]`, tpmd serves root and the user
/// `aziotid`: the broker resolves that uid (the worker cannot read /etc/passwd) and writes it
/// in as a principal.
fn config_text(mut merged: toml::Table, config: &crate::Config) -> Result<String, ServiceError> {
    if config.principal.is_empty() {
        match nix::unistd::User::from_name(DEFAULT_CALLER) {
            Ok(Some(user)) => {
                let mut p = toml::Table::new();
                p.insert("uid".into(), toml::Value::Integer(i64::from(user.uid.as_raw())));
                merged.insert("principal".into(), toml::Value::Array(vec![toml::Value::Table(p)]));
            }
            _ => tracing::warn!("user {DEFAULT_CALLER} does not exist; only root may call tpmd"),
        }
    }
    Ok(toml::to_string(&merged)?)
}

impl ServiceImpl for Tpmd {
    fn info(&self) -> &'static ServiceInfo {
        INFO
    }

    fn setup(&self, paths: &ConfigPaths) -> Result<BrokerSetup, ServiceError> {
        let (merged, config) = read(paths)?;
        let endpoint = crate::endpoint(&config).map_err(ServiceError::service)?;
        // The worker never opens a device path: the broker opens the TPM (device node, or a
        // connection to a simulator) and hands the descriptor over. A simulator must be on this
        // machine: TPM commands (and the auth key's import blob) are not sent over a network.
        let target = crate::tcti::target(&config.tcti).map_err(|e| ServiceError::service(OpenTpm(e)))?;
        if !target.is_loopback() {
            return Err(ServiceError::Invalid(format!(
                "tcti {:?}: a TPM simulator must listen on a loopback address of this machine",
                config.tcti
            )));
        }
        let tpm = crate::tcti::open_descriptor(&config.tcti)
            .map_err(|e| ServiceError::service(OpenTpm(e)))?
            .ok_or_else(|| {
                ServiceError::Invalid(format!(
                    "tcti {:?} cannot be handed to a sandboxed worker; use device[:path] or swtpm:host=...,port=...",
                    config.tcti
                ))
            })?;
        let is_char_device = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&tpm))
            .map(|st| st.st_mode & libc::S_IFMT == libc::S_IFCHR)
            .unwrap_or(false);
        let kind = if is_char_device { DescriptorKind::Device } else { DescriptorKind::Socket };
        Ok(BrokerSetup {
            config_text: config_text(merged, &config)?,
            endpoint,
            state_dir: None,
            grants: aziot_ipc::service::Grants::default(),
            sandbox: config.sandbox,
            extra_dirs: Vec::new(),
            extra_fds: vec![(TPM.to_owned(), kind, tpm)],
        })
    }

    fn reload(&self, paths: &ConfigPaths) -> Result<String, ServiceError> {
        let (merged, config) = read(paths)?;
        config_text(merged, &config)
    }

    fn serve(
        &self,
        config: &str,
        mut handed: Handed,
        lock_in: LockIn<'_>,
        control: OwnedFd,
    ) -> Result<Infallible, ServiceError> {
        let config: crate::Config = toml::from_str(config)?;
        let listener = handed.require(LISTENER)?;
        let tpm_fd = handed.require(TPM)?;
        // Pre-load: start the TPM (EK, SRK) on the handed-over descriptor.
        let tpm = crate::init_tpm_fd(&config, tpm_fd).map_err(ServiceError::service)?;
        lock_in(&[])?;
        let listener = std::os::unix::net::UnixListener::from(listener);
        Err(ServiceError::service(crate::serve(listener, &config, tpm, Some(control))))
    }
}

/// The broker could not open the TPM (kept as the message the broker printed before).
#[derive(Debug, thiserror::Error)]
#[error("could not open the TPM")]
struct OpenTpm(#[source] crate::tcti::TctiError);
