//! Step 2–3 of the broker, per service: read and validate the config as root, and derive what
//! the worker needs — its listener, its state directory, and the policy grants the config implies.

use std::path::PathBuf;

use aziot_ipc::config::{ConfigPaths, SandboxConfig};
use aziot_ipc::endpoint::Endpoint;

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
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Config(#[from] aziot_ipc::config::ConfigError),
    #[error(transparent)]
    Keyd(#[from] aziot_keyd::KeydError),
    #[error("could not render the merged config")]
    Render(#[from] toml::ser::Error),
    #[error("{0} is not part of this build yet")]
    NotBuilt(String),
}

/// Reads the config of `service` (`aziot-keyd`, ...).
pub fn setup(service: &str) -> Result<ServiceSetup, SetupError> {
    match service {
        "aziot-keyd" => keyd(),
        other => Err(SetupError::NotBuilt(other.to_owned())),
    }
}

fn keyd() -> Result<ServiceSetup, SetupError> {
    let merged = aziot_ipc::config::read_merged(&ConfigPaths::from_env("keyd"))?;
    let config: aziot_keyd::config::Config = aziot_ipc::config::deserialize(&merged, |file, key| {
        tracing::warn!("unknown config key {key:?} in {} (ignored)", file.display());
    })?;
    // Fail here, as root, on what the worker would fail on later.
    let endpoint = aziot_keyd::endpoint(&config)?;
    let state_dir = config.aziot_keys.get("homedir_path").map(PathBuf::from);
    let mut grants = aziot_policy::Grants::default();
    for (id, uri) in &config.preloaded_keys {
        if let Some(path) = uri.strip_prefix("file://").and_then(aziot_ipc::endpoint::percent_decode) {
            // Landlock rules bind to inodes: grant the directory, so that a key file replaced by
            // rename stays readable.
            let dir = std::path::Path::new(&path).parent().map(|p| p.to_path_buf()).unwrap_or_default();
            grants.paths.push(aziot_policy::PathGrant::read_only(dir, format!("preloaded_keys.{id}")));
        }
    }
    Ok(ServiceSetup {
        short: "keyd",
        config_text: toml::to_string(&merged.value)?,
        endpoint,
        socket_name: aziot_keyd::SOCKET_NAME,
        state_dir,
        grants,
        sandbox: config.sandbox,
    })
}
