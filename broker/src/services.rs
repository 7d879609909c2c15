//! Step 2–3 of the broker, per service: read and validate the config as root, and derive what
//! the worker needs — its listener, its state directory, and the policy grants the config implies.
//!
//! The facts about a service (names, user, socket, config paths) come from the one table,
//! [`aziot_policy::services::SERVICES`]; what it does comes from its crate's
//! [`ServiceImpl`], found in [`REGISTRY`] — the only place that maps a service to its code.

use std::path::PathBuf;

use aziot_ipc::config::{ConfigPaths, SandboxConfig};
use aziot_ipc::endpoint::Endpoint;
use aziot_ipc::service::{ServiceError, ServiceImpl};

/// The services this build implements. Adding a service: docs/adding-a-service.md.
pub static REGISTRY: &[&dyn ServiceImpl] = &[
    &aziot_keyd::service::Keyd,
    &aziot_tpmd::service::Tpmd,
    &aziot_certd::service::Certd,
    &aziot_identityd::service::Identityd,
];

/// The implementation of the service of short name `short`.
pub fn implementation(short: &str) -> Option<&'static dyn ServiceImpl> {
    REGISTRY.iter().copied().find(|s| s.info().short == short)
}

/// Everything the broker knows about one service after reading its config.
#[derive(Debug)]
pub struct ServiceSetup {
    /// `keyd`, `certd`, `identityd`, `tpmd`.
    pub short: &'static str,
    /// The merged config, as TOML text, for the worker.
    pub config_text: String,
    pub endpoint: Endpoint,
    /// `FileDescriptorName=` of the socket unit.
    pub socket_name: &'static str,
    pub state_dir: Option<PathBuf>,
    pub grants: aziot_policy::Grants,
    pub sandbox: SandboxConfig,
    /// Where the config lives (watched for changes).
    pub paths: ConfigPaths,
    /// Further directories to hand over, by descriptor name (e.g. `preloaded-key:<id>`).
    pub extra_dirs: Vec<(String, PathBuf)>,
    /// Descriptors the broker opened while reading the config (the TPM).
    pub extra_fds: Vec<(String, aziot_ipc::handoff::DescriptorKind, std::os::fd::OwnedFd)>,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("{0} is not part of this build yet")]
    NotBuilt(String),
}

/// Reads the config of `program` (`aziot-keyd`, ...).
pub fn setup(program: &str) -> Result<ServiceSetup, SetupError> {
    let info = aziot_policy::services::by_program(program).ok_or_else(|| SetupError::NotBuilt(program.to_owned()))?;
    let service = implementation(info.short).ok_or_else(|| SetupError::NotBuilt(program.to_owned()))?;
    let paths = aziot_ipc::service::config_paths(info);
    let setup = service.setup(&paths)?;
    Ok(ServiceSetup {
        short: info.short,
        config_text: setup.config_text,
        endpoint: setup.endpoint,
        socket_name: info.socket_fd_name,
        state_dir: setup.state_dir,
        grants: setup.grants,
        sandbox: setup.sandbox,
        paths,
        extra_dirs: setup.extra_dirs,
        extra_fds: setup.extra_fds,
    })
}

/// Re-reads and validates the config of a running service (`short` name); the new merged
/// config as TOML text.
pub fn reload(short: &str, paths: &ConfigPaths) -> Result<String, SetupError> {
    let service = implementation(short).ok_or_else(|| SetupError::NotBuilt(short.to_owned()))?;
    Ok(service.reload(paths)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_entries_are_in_the_table_once() {
        for (i, s) in REGISTRY.iter().enumerate() {
            let info = s.info();
            assert_eq!(aziot_policy::services::by_short(info.short), Some(info));
            assert!(REGISTRY[..i].iter().all(|o| o.info().short != info.short), "{} registered twice", info.short);
            // every implemented service has a policy
            aziot_policy::builtin(info.short).unwrap();
        }
        assert!(implementation("keyd").is_some() && implementation("tpmd").is_some());
        assert!(implementation("certd").is_some() && implementation("identityd").is_some());
    }

    #[test]
    fn unbuilt_and_unknown_services_are_refused() {
        assert!(matches!(setup("bogus"), Err(SetupError::NotBuilt(_))));
    }
}
