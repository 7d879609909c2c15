//! aziot-keyd: the keys service (spec keyd.md).
//!
//! A request is traced in four files: [`aziot_ipc::server`] (accept, uid, throttle, api-version,
//! body) -> [`api`] (route, authorize, handle check) -> [`handle`] (MAC) -> the key library
//! (`aziot_keys::native`, file backend) -> disk.

pub mod api;
pub mod config;
pub mod handle;
pub mod wire;

use std::sync::Arc;

use aziot_ipc::config::ConfigPaths;
use aziot_ipc::endpoint::Endpoint;
use aziot_ipc::principal::Principals;
use aziot_ipc::server::ServerConfig;
use aziot_keys::KeyBackend;

/// Name of the socket in systemd's `LISTEN_FDNAMES` (`FileDescriptorName=` of the unit).
pub const SOCKET_NAME: &str = "aziot-keyd.socket";

#[derive(Debug, thiserror::Error)]
pub enum KeydError {
    #[error(transparent)]
    Config(#[from] aziot_ipc::config::ConfigError),
    #[error("could not load libaziot-keys from {path}")]
    Library { path: std::path::PathBuf, #[source] source: aziot_keys::Error },
    #[error("could not set {name} parameter on library")]
    Parameter { name: String, #[source] source: aziot_keys::Error },
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("invalid endpoint")]
    Endpoint(#[from] aziot_ipc::endpoint::EndpointError),
    #[error("could not open the listening socket")]
    Listener(#[from] aziot_ipc::listener::ListenerError),
    #[error("could not start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("the server stopped")]
    Serve(#[source] std::io::Error),
}

/// Builds the key backend from config: the built-in library, or a replacement `.so`.
pub fn backend(config: &config::Config) -> Result<Arc<dyn KeyBackend>, KeydError> {
    let backend: Arc<dyn KeyBackend> = match &config.aziot_keys_library {
        None => Arc::new(aziot_keys::native::KeyStore::new()),
        Some(path) => Arc::new(
            aziot_keys::foreign::ForeignLibrary::load(path)
                .map_err(|source| KeydError::Library { path: path.clone(), source })?,
        ),
    };
    tracing::info!("Loaded libaziot-keys with version 0x{:08x}", backend.version());
    for (name, value) in &config.aziot_keys {
        if name.contains('\0') || value.contains('\0') {
            return Err(KeydError::Invalid(format!("[aziot_keys] {name:?} contains a NUL character")));
        }
        backend
            .set_parameter(name, value)
            .map_err(|source| KeydError::Parameter { name: name.clone(), source })?;
    }
    for (id, location) in &config.preloaded_keys {
        if id.contains('\0') || location.contains('\0') {
            return Err(KeydError::Invalid(format!("[preloaded_keys] {id:?} contains a NUL character")));
        }
        let name = format!("preloaded_key:{id}");
        backend
            .set_parameter(&name, location)
            .map_err(|source| KeydError::Parameter { name, source })?;
    }
    Ok(backend)
}

/// Runs keyd in this process until it fails: config, library, listener, then serve.
pub fn run() -> Result<(), KeydError> {
    openssl::init();
    tracing::info!("Starting service...");
    tracing::info!("Version - {}", env!("CARGO_PKG_VERSION"));
    let paths = ConfigPaths::from_env("keyd");
    let config: config::Config = aziot_ipc::config::load(&paths)?;
    let backend = backend(&config)?;
    let api = Arc::new(api::Api::new(backend, Principals::new(&config.principal)));
    let endpoint = match &config.endpoints.aziot_keyd {
        Some(uri) => Endpoint::parse(uri)?,
        None => Endpoint::default_for("keyd"),
    };
    let listener = aziot_ipc::listener::open(&endpoint, Some(SOCKET_NAME))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(4)
        .enable_all()
        .build()
        .map_err(KeydError::Runtime)?;
    let server_config = ServerConfig { max_requests: config.max_requests, ..ServerConfig::default() };
    tracing::info!("Starting server...");
    let err = runtime.block_on(aziot_ipc::server::serve(listener, api, server_config));
    Err(KeydError::Serve(err))
}
