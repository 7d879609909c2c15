//! aziot-certd: the certificates service (spec certd.md; docs/certd.md).
//!
//! A request is traced in four files: [`aziot_ipc::server`] (accept, uid, throttle,
//! api-version, body) -> [`api`] (route table, authorize, check the ID) -> [`store`] (one file
//! per ID beneath the state directory) or [`issue`] (a certificate signed by a key in keyd,
//! through the engine's in-process twin).
//!
//! EST (`method = "est"`) plugs in as an [`issue::EstIssuer`]: [`est::EstClient`], which also
//! renews EST identity certs on a timer.

pub mod api;
pub mod config;
pub mod est;
pub mod issue;
pub mod service;
pub mod store;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aziot_ipc::endpoint::Endpoint;

/// Name of the socket in systemd's `LISTEN_FDNAMES` (`FileDescriptorName=` of the unit).
pub const SOCKET_NAME: &str = service::INFO.socket_fd_name;

#[derive(Debug, thiserror::Error)]
pub enum CertdError {
    #[error(transparent)]
    Config(#[from] aziot_ipc::config::ConfigError),
    #[error("invalid config")]
    Invalid(#[from] config::ConfigError),
    #[error("invalid endpoint")]
    Endpoint(#[from] aziot_ipc::endpoint::EndpointError),
    #[error("[endpoints] aziot_keyd must be a unix:// endpoint, not {0:?}")]
    KeydEndpoint(String),
    #[error("could not open the listening socket")]
    Listener(#[from] aziot_ipc::listener::ListenerError),
    #[error("could not create the home directory {}", path.display())]
    Home {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not open the certificate store")]
    Store(#[from] store::StoreError),
    #[error("could not prepare the keyd engine")]
    Engine(#[from] aziot_key_openssl_engine::Error),
    #[error(transparent)]
    Serve(#[from] aziot_ipc::server::WorkerServeError),
}

/// The listener endpoint (default `unix:///run/aziot/certd.sock`).
pub fn endpoint(config: &config::Config) -> Result<Endpoint, CertdError> {
    Ok(match &config.endpoints.aziot_certd {
        Some(uri) => Endpoint::parse(uri)?,
        None => aziot_ipc::service::default_endpoint(service::INFO),
    })
}

/// keyd's socket (default `/run/aziot/keyd.sock`).
pub fn keyd_socket(config: &config::Config) -> Result<PathBuf, CertdError> {
    match &config.endpoints.aziot_keyd {
        None => Ok(PathBuf::from(aziot_ipc::service::services::get("keyd").default_socket)),
        Some(uri) => match Endpoint::parse(uri)? {
            Endpoint::Unix(path) => Ok(path),
            _ => Err(CertdError::KeydEndpoint(uri.clone())),
        },
    }
}

/// Parses the merged config; unknown keys (top level and inside `[cert_issuance]`) go to
/// `on_unknown(file, key)`.
pub fn parse_config(
    merged: &aziot_ipc::config::Merged,
    on_unknown: &mut dyn FnMut(&Path, &str),
) -> Result<config::Config, CertdError> {
    let raw: config::RawConfig = aziot_ipc::config::deserialize(merged, &mut *on_unknown)?;
    let mut nested = Vec::new();
    let config = config::Config::from_raw(raw, &mut |path| nested.push(path.to_vec()))?;
    for path in nested {
        let key = path.join(".");
        let files: Vec<&Path> =
            merged.files.iter().filter(|(_, t)| table_has(t, &path)).map(|(f, _)| f.as_path()).collect();
        if files.is_empty() {
            on_unknown(Path::new("<merged config>"), &key);
        }
        for f in files {
            on_unknown(f, &key);
        }
    }
    Ok(config)
}

/// Whether `table` has the key at `path` (one element per table level).
fn table_has(table: &toml::Table, path: &[String]) -> bool {
    let Some((first, rest)) = path.split_first() else { return false };
    let mut current = match table.get(first) {
        Some(v) => v,
        None => return false,
    };
    for part in rest {
        match current.as_table().and_then(|t| t.get(part)) {
            Some(v) => current = v,
            None => return false,
        }
    }
    true
}

/// Parses the config text of the broker's manifest (already validated by the broker, whose
/// log has the unknown-key warnings).
pub fn config_from_text(text: &str) -> Result<config::Config, CertdError> {
    let raw: config::RawConfig = toml::from_str(text).map_err(aziot_ipc::config::ConfigError::Deserialize)?;
    Ok(config::Config::from_raw(raw, &mut |_| {})?)
}

/// Pre-loads what signing needs (OpenSSL, the engine's key methods) before the sandbox
/// forbids loading code.
pub fn preload() -> Result<(), CertdError> {
    openssl::init();
    aziot_key_openssl_engine::preload()?;
    Ok(())
}

/// Serves on `listener` until the server fails. Builds the runtime: call only once the
/// sandbox is in place. With `control`, the broker's config updates are applied
/// (`[cert_issuance]`, `[preloaded_certs]`, `[[principal]]`).
pub fn serve(
    listener: std::os::unix::net::UnixListener,
    config: &config::Config,
    store: store::Store,
    control: Option<OwnedFd>,
) -> CertdError {
    let keyd = match keyd_socket(config) {
        Ok(k) => k,
        Err(e) => return e,
    };
    let store = Arc::new(store);
    // EST (workers/certd/src/est): the issuer of `method = "est"` and the renewal timer.
    let est = est::EstClient::new(config, Arc::clone(&store), &keyd);
    if let Err(e) = est.start_renewal() {
        return CertdError::Serve(aziot_ipc::server::WorkerServeError::Runtime(e));
    }
    let issuer: Arc<dyn issue::EstIssuer> = Arc::new(est.clone());
    let api = Arc::new(api::Api::new(config, store, &keyd, Some(issuer)));
    let reload = move |api: &api::Api, raw: config::RawConfig| match config::Config::from_raw(raw, &mut |_| {}) {
        Ok(c) => {
            api.reload(&c);
            est.reload(&c);
        }
        Err(e) => tracing::warn!("Config update failed. Error: {e}"),
    };
    aziot_ipc::server::serve_worker(listener, api, config.max_requests, control, reload).into()
}

/// Runs certd unconfined in this process (no broker): config, store, listener, serve.
pub fn run() -> Result<(), CertdError> {
    preload()?;
    tracing::info!("Starting service...");
    tracing::info!("Version - {}", env!("CARGO_PKG_VERSION"));
    let paths = aziot_ipc::service::config_paths(service::INFO);
    let merged = aziot_ipc::config::read_merged(&paths)?;
    let config = parse_config(&merged, &mut |file, key| {
        tracing::warn!("unknown config key {key:?} in {} (ignored)", file.display());
    })?;
    std::fs::create_dir_all(&config.homedir_path)
        .map_err(|source| CertdError::Home { path: config.homedir_path.clone(), source })?;
    let home = store::Store::open_dir(&config.homedir_path)?;
    let mut dirs = HashMap::new();
    for (_, path) in config.preloaded_files() {
        if let Some(parent) = path.parent() {
            if !dirs.contains_key(parent) {
                match store::Store::open_dir(parent) {
                    Ok(fd) => {
                        dirs.insert(parent.to_path_buf(), fd);
                    }
                    Err(e) => tracing::warn!("{e}"),
                }
            }
        }
    }
    let store = store::Store::new(std::os::fd::AsFd::as_fd(&home), config.preloaded.clone(), dirs)?;
    let listener = aziot_ipc::listener::open(&endpoint(&config)?, Some(SOCKET_NAME))?;
    Err(serve(listener, &config, store, None))
}
