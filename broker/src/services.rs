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
    /// Descriptors the broker opened while reading the config (the TPM).
    pub extra_fds: Vec<(String, aziot_ipc::handoff::DescriptorKind, std::os::fd::OwnedFd)>,
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
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error(transparent)]
    Tpmd(#[from] aziot_tpmd::TpmdError),
    #[error("could not open the TPM")]
    Tcti(#[from] aziot_tpmd::tcti::TctiError),
}

/// Reads the config of `service` (`aziot-keyd`, ...).
pub fn setup(service: &str) -> Result<ServiceSetup, SetupError> {
    match service {
        "aziot-keyd" => keyd(),
        "aziot-tpmd" => tpmd(),
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
        "tpmd" => {
            let config: aziot_tpmd::Config = aziot_ipc::config::deserialize(&merged, |file, key| {
                tracing::warn!("unknown config key {key:?} in {} (ignored)", file.display());
            })?;
            aziot_tpmd::config::validate(&config).map_err(SetupError::Invalid)?;
            return tpmd_config_text(merged.value, &config);
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
    let mut grants = aziot_policy::Grants::default();
    // A PKCS#11 module needs its own files at run time (SoftHSM2: its config, its token store).
    if let Some(lib) = config.aziot_keys.get("pkcs11_lib_path") {
        for (path, writable) in aziot_keys::native::pkcs11_sandbox_paths(std::path::Path::new(lib)) {
            let access = if writable {
                aziot_policy::AccessSet::parse(&["rw"]).expect("\"rw\" is a known access set")
            } else {
                aziot_policy::AccessSet::read_only()
            };
            grants.paths.push(aziot_policy::PathGrant {
                path,
                access,
                origin: aziot_policy::Origin::Config("aziot_keys.pkcs11_lib_path".into()),
            });
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
        paths,
        extra_dirs: preloaded_dirs,
        extra_fds: Vec::new(),
    })
}

/// The config text for the tpmd worker. Without `[[principal]]`, tpmd serves root and the user
/// `aziotid`: the broker resolves that uid (the worker cannot read /etc/passwd) and writes it
/// in as a principal.
fn tpmd_config_text(mut merged: toml::Table, config: &aziot_tpmd::Config) -> Result<String, SetupError> {
    if config.principal.is_empty() {
        match nix::unistd::User::from_name("aziotid") {
            Ok(Some(user)) => {
                let mut p = toml::Table::new();
                p.insert("uid".into(), toml::Value::Integer(i64::from(user.uid.as_raw())));
                merged.insert("principal".into(), toml::Value::Array(vec![toml::Value::Table(p)]));
            }
            _ => tracing::warn!("user aziotid does not exist; only root may call tpmd"),
        }
    }
    Ok(toml::to_string(&merged)?)
}

fn tpmd() -> Result<ServiceSetup, SetupError> {
    let paths = ConfigPaths::from_env("tpmd");
    let merged = aziot_ipc::config::read_merged(&paths)?;
    let config: aziot_tpmd::Config = aziot_ipc::config::deserialize(&merged, |file, key| {
        tracing::warn!("unknown config key {key:?} in {} (ignored)", file.display());
    })?;
    aziot_tpmd::config::validate(&config).map_err(SetupError::Invalid)?;
    let endpoint = aziot_tpmd::endpoint(&config)?;
    // The worker never opens a device path: the broker opens the TPM (device node, or a
    // connection to a simulator) and hands the descriptor over. A simulator must be on this
    // machine: TPM commands (and the auth key's import blob) are not sent over a network.
    let target = aziot_tpmd::tcti::target(&config.tcti)?;
    if !target.is_loopback() {
        return Err(SetupError::Invalid(format!(
            "tcti {:?}: a TPM simulator must listen on a loopback address of this machine",
            config.tcti
        )));
    }
    let tpm = aziot_tpmd::tcti::open_descriptor(&config.tcti)?.ok_or_else(|| {
        SetupError::Invalid(format!(
            "tcti {:?} cannot be handed to a sandboxed worker; use device[:path] or swtpm:host=...,port=...",
            config.tcti
        ))
    })?;
    let kind = if std::fs::File::from(tpm.try_clone().map_err(|e| SetupError::Invalid(e.to_string()))?)
        .metadata()
        .map(|m| std::os::unix::fs::FileTypeExt::is_char_device(&m.file_type()))
        .unwrap_or(false)
    {
        aziot_ipc::handoff::DescriptorKind::Device
    } else {
        aziot_ipc::handoff::DescriptorKind::Socket
    };
    Ok(ServiceSetup {
        short: "tpmd",
        config_text: tpmd_config_text(merged.value.clone(), &config)?,
        endpoint,
        socket_name: aziot_tpmd::SOCKET_NAME,
        state_dir: None,
        grants: aziot_policy::Grants::default(),
        sandbox: config.sandbox,
        paths,
        extra_dirs: Vec::new(),
        extra_fds: vec![("tpm".to_owned(), kind, tpm)],
    })
}
