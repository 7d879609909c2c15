//! aziot-identityd: the identity service (spec identityd.md; docs/identityd.md).
//!
//! A request is traced in four files: [`aziot_ipc::server`] (accept, uid, throttle,
//! api-version, body) -> [`api`] (route table, caller class, authorisation matrix) ->
//! [`identity`] (device, module and local identities; provisioning and reconciliation) ->
//! [`keys`] (keyd, certd) / [`hub`] (IoT Hub) / [`state`] (the home directory).
//!
//! Provisioning: `manual` (SAS or X.509) and `none`. `dps` is refused at start in this build
//! ([`DPS_UNAVAILABLE`]).

pub mod api;
pub mod config;
pub mod hub;
pub mod identity;
pub mod keys;
pub mod service;
pub mod state;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aziot_ipc::endpoint::Endpoint;

/// The startup error of a `source = "dps"` config.
pub const DPS_UNAVAILABLE: &str =
    "provisioning source \"dps\" is not available in this build (use source = \"manual\" or \"none\")";

#[derive(Debug, thiserror::Error)]
pub enum IdentitydError {
    #[error(transparent)]
    Config(#[from] aziot_ipc::config::ConfigError),
    #[error("invalid config: {0}")]
    Check(#[from] config::CheckError),
    #[error("{DPS_UNAVAILABLE}")]
    DpsUnavailable,
    #[error("invalid endpoint")]
    Endpoint(#[from] aziot_ipc::endpoint::EndpointError),
    #[error("[endpoints] {0} must be a unix:// endpoint, not {1:?}")]
    NotUnix(&'static str, String),
    #[error("could not open the listening socket")]
    Listener(#[from] aziot_ipc::listener::ListenerError),
    #[error("could not create the home directory {}", path.display())]
    Home {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not prepare the keyd engine")]
    Engine(#[from] aziot_key_openssl_engine::Error),
    #[error("could not build the IoT Hub client")]
    Hub(#[from] hub::HubError),
    #[error("could not start the background runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Serve(#[from] aziot_ipc::server::WorkerServeError),
}

/// The listener endpoint (default `unix:///run/aziot/identityd.sock`).
pub fn endpoint(config: &config::Config) -> Result<Endpoint, IdentitydError> {
    Ok(match &config.endpoints {
        Some(e) => Endpoint::parse(&e.aziot_identityd)?,
        None => aziot_ipc::service::default_endpoint(service::INFO),
    })
}

fn socket_of(
    config: &config::Config,
    key: &'static str,
    pick: fn(&config::Endpoints) -> &String,
    short: &str,
) -> Result<PathBuf, IdentitydError> {
    match &config.endpoints {
        None => Ok(PathBuf::from(aziot_ipc::service::services::get(short).default_socket)),
        Some(e) => match Endpoint::parse(pick(e))? {
            Endpoint::Unix(path) => Ok(path),
            _ => Err(IdentitydError::NotUnix(key, pick(e).clone())),
        },
    }
}

/// keyd's socket (default `/run/aziot/keyd.sock`).
pub fn keyd_socket(config: &config::Config) -> Result<PathBuf, IdentitydError> {
    socket_of(config, "aziot_keyd", |e| &e.aziot_keyd, "keyd")
}

/// certd's socket (default `/run/aziot/certd.sock`).
pub fn certd_socket(config: &config::Config) -> Result<PathBuf, IdentitydError> {
    socket_of(config, "aziot_certd", |e| &e.aziot_certd, "certd")
}

/// The TCP ports identityd connects to: the hub's and the gateway's (`host[:port]`, 443 by
/// default).
pub fn cloud_ports(config: &config::Config) -> Vec<(u16, &'static str)> {
    let port = |host: &str| host.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).unwrap_or(443);
    let mut ports = Vec::new();
    if let config::Source::Manual { iothub_hostname, .. } = &config.provisioning.source {
        ports.push((port(iothub_hostname), "provisioning.iothub_hostname"));
    }
    if let Some(g) = &config.provisioning.local_gateway_hostname {
        ports.push((port(g), "provisioning.local_gateway_hostname"));
    }
    ports
}

/// Parses and validates (§6.6) the merged config; unknown keys go to `on_unknown(file, key)`.
/// `source = "dps"` is refused in this build.
pub fn parse_config(
    merged: &aziot_ipc::config::Merged,
    on_unknown: &mut dyn FnMut(&Path, &str),
) -> Result<config::Config, IdentitydError> {
    let config: config::Config = aziot_ipc::config::deserialize(merged, &mut *on_unknown)?;
    config.check()?;
    if matches!(config.provisioning.source, config::Source::Dps { .. }) {
        return Err(IdentitydError::DpsUnavailable);
    }
    Ok(config)
}

/// The config text of the broker's manifest (already validated by the broker).
pub fn config_from_text(text: &str) -> Result<config::Config, IdentitydError> {
    Ok(toml::from_str(text).map_err(aziot_ipc::config::ConfigError::Deserialize)?)
}

/// Pre-loads OpenSSL and the engine's key methods before the sandbox forbids loading code.
pub fn preload() -> Result<(), IdentitydError> {
    openssl::init();
    aziot_key_openssl_engine::preload()?;
    Ok(())
}

/// The IoT Hub client of this build for `config` (built before the lock-in).
pub fn hub_client(config: &config::Config) -> Result<Option<Arc<dyn hub::HubClient>>, IdentitydError> {
    let settings = hub::HubSettings {
        timeout: Duration::from_secs(config.cloud_timeout_sec),
        retries: config.cloud_retries,
        proxy: None,
    };
    Ok(hub::client(&settings)?)
}

/// Serves on `listener` until the server fails. Builds the runtimes: call only once the
/// sandbox is in place. Startup provisioning and reconciliation (§7 steps 7–8) and the
/// reconciliations of config updates run on a background thread; device and module calls wait
/// for the first to finish, E2 and E10 never wait. A startup failure exits 1 (§7).
pub fn serve(
    listener: std::os::unix::net::UnixListener,
    config: config::Config,
    state: state::State,
    control: Option<OwnedFd>,
    hub: Option<Arc<dyn hub::HubClient>>,
) -> IdentitydError {
    let (keyd, certd) = match (keyd_socket(&config), certd_socket(&config)) {
        (Ok(k), Ok(c)) => (k, c),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let max_requests = config.max_requests;
    state.clean_temporaries();
    let core = Arc::new(identity::Core::new(config, state, &keyd, &certd, hub));
    let api = Arc::new(api::Api::new(Arc::clone(&core)));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => return IdentitydError::Runtime(e),
    };
    let background = Arc::clone(&api);
    let spawned = std::thread::Builder::new().name("aziot-identityd-bg".into()).spawn(move || {
        runtime.block_on(async move {
            if let Err(e) = background.core().start().await {
                tracing::error!(
                    "Failed to provision with IoT Hub, and no valid device backup was found: {}",
                    e.message()
                );
                if let identity::IdentityError::Internal(detail) = &e {
                    tracing::error!("!!! {detail}");
                }
                std::process::exit(1);
            }
            background.set_ready();
            while rx.recv().await.is_some() {
                background.core().config_changed().await;
            }
        })
    });
    if let Err(e) = spawned {
        return IdentitydError::Runtime(e);
    }
    let reload = move |api: &api::Api, config: config::Config| match api.core().set_settings(config) {
        Ok(()) => {
            tracing::info!("Config update applied; reconciling.");
            let _ = tx.send(());
        }
        Err(e) => tracing::warn!("Detected config file update, but new config failed to validate. Error: {e}"),
    };
    aziot_ipc::server::serve_worker(listener, api, max_requests, control, reload).into()
}

/// Runs identityd unconfined in this process (no broker).
pub fn run() -> Result<(), IdentitydError> {
    preload()?;
    tracing::info!("Starting service...");
    tracing::info!("Version - {}", env!("CARGO_PKG_VERSION"));
    let paths = aziot_ipc::service::config_paths(service::INFO);
    let merged = aziot_ipc::config::read_merged(&paths)?;
    let config = parse_config(&merged, &mut |file, key| {
        tracing::warn!("unknown config key {key:?} in {} (ignored)", file.display());
    })?;
    std::fs::create_dir_all(&config.homedir)
        .map_err(|source| IdentitydError::Home { path: config.homedir.clone(), source })?;
    let home = std::fs::File::open(&config.homedir)
        .map_err(|source| IdentitydError::Home { path: config.homedir.clone(), source })?;
    let hub = hub_client(&config)?;
    let listener = aziot_ipc::listener::open(&endpoint(&config)?, Some(service::INFO.socket_fd_name))?;
    Err(serve(listener, config, state::State::new(OwnedFd::from(home)), None, hub))
}
