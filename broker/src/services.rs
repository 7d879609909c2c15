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
    /// Where the config lives (watched for changes).
    pub paths: ConfigPaths,
    /// Further directories to hand over, by descriptor name (e.g. `preloaded-key:<id>`).
    pub extra_dirs: Vec<(String, PathBuf)>,
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

/// Re-reads and validates the config of a running service (`short` name); the new merged
/// config as TOML text.
pub fn reload(short: &str, paths: &ConfigPaths) -> Result<String, SetupError> {
    let merged = aziot_ipc::config::read_merged(paths)?;
    match short {
        "keyd" => {
            let _: aziot_keyd::config::Config = aziot_ipc::config::deserialize(&merged, |file, key| {
                tracing::warn!("unknown config key {key:?} in {} (ignored)", file.display());
            })?;
        }
        other => return Err(SetupError::NotBuilt(other.to_owned())),
    }
    Ok(toml::to_string(&merged.value)?)
}

fn keyd() -> Result<ServiceSetup, SetupError> {
    let paths = ConfigPaths::from_env("keyd");
    let merged = aziot_ipc::config::read_merged(&paths)?;
    let config: aziot_keyd::config::Config = aziot_ipc::config::deserialize(&merged, |file, key| {
        tracing::warn!("unknown config key {key:?} in {} (ignored)", file.display());
    })?;
    // Fail here, as root, on what the worker would fail on later.
    let endpoint = aziot_keyd::endpoint(&config)?;
    let state_dir = config.aziot_keys.get("homedir_path").map(PathBuf::from);
    // Preloaded key files are reached through their directories, opened here and handed over.
    let preloaded_dirs = aziot_keyd::preloaded_files(&config)
        .into_iter()
        .filter_map(|(id, path)| Some((format!("preloaded-key:{id}"), path.parent()?.to_path_buf())))
        .collect();
    let grants = aziot_policy::Grants::default();
    Ok(ServiceSetup {
        short: "keyd",
        config_text: toml::to_string(&merged.value)?,
        endpoint,
        socket_name: aziot_keyd::SOCKET_NAME,
        state_dir,
        grants,
        sandbox: config.sandbox,
        paths,
        extra_dirs: preloaded_dirs,
    })
}
