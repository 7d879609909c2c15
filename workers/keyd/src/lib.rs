//! aziot-keyd: the keys service (spec keyd.md).
//!
//! A request is traced in four files: [`aziot_ipc::server`] (accept, uid, throttle, api-version,
//! body) -> [`api`] (route, authorize, handle check) -> [`handle`] (MAC) -> the key library
//! (`aziot_keys::native`, file backend) -> disk.

pub mod api;
pub mod config;
pub mod service;
pub mod handle;
pub mod wire;

use std::sync::Arc;

use aziot_ipc::endpoint::Endpoint;
use aziot_ipc::principal::Principals;
use aziot_keys::KeyBackend;

/// Name of the socket in systemd's `LISTEN_FDNAMES` (`FileDescriptorName=` of the unit).
pub const SOCKET_NAME: &str = service::INFO.socket_fd_name;

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
    #[error(transparent)]
    Serve(#[from] aziot_ipc::server::WorkerServeError),
}

/// Builds the key backend from config: the built-in library, or a replacement `.so`.
/// With `dirs`, the state directory and the directories of preloaded key files are the given
/// descriptors (the sandboxed worker has no path access) and are not opened again.
pub fn backend(config: &config::Config, dirs: HandedDirs) -> Result<Arc<dyn KeyBackend>, KeydError> {
    let skip_homedir_path = dirs.home.is_some() && config.aziot_keys_library.is_none();
    let mut native = None;
    let backend: Arc<dyn KeyBackend> = match &config.aziot_keys_library {
        None => {
            let store = Arc::new(aziot_keys::native::KeyStore::new());
            if let Some(fd) = dirs.home {
                store.set_homedir_fd(fd);
            }
            native = Some(Arc::clone(&store));
            store
        }
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
        if skip_homedir_path && name == "homedir_path" {
            continue;
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
    if let Some(store) = native {
        // Load and C_Initialize a PKCS#11 module now: a sandboxed worker cannot map code later.
        store
            .pkcs11_preload()
            .map_err(|source| KeydError::Parameter { name: "pkcs11_lib_path".into(), source })?;
        for (id, dir, file_name) in dirs.preloaded {
            store
                .set_preloaded_key_dir(&id, dir, &file_name)
                .map_err(|source| KeydError::Parameter { name: format!("preloaded_key:{id}"), source })?;
        }
    }
    Ok(backend)
}

/// Directories handed over by the broker: the state directory, and per preloaded `file://`
/// key its directory and file name.
#[derive(Debug, Default)]
pub struct HandedDirs {
    pub home: Option<std::os::fd::OwnedFd>,
    pub preloaded: Vec<(String, std::os::fd::OwnedFd, String)>,
}

/// The preloaded `file://` keys of the config: (id, path).
pub fn preloaded_files(config: &config::Config) -> Vec<(String, std::path::PathBuf)> {
    config
        .preloaded_keys
        .iter()
        .filter_map(|(id, uri)| {
            let path = uri.strip_prefix("file://").and_then(aziot_ipc::endpoint::percent_decode)?;
            Some((id.clone(), std::path::PathBuf::from(path)))
        })
        .collect()
}

/// The listener endpoint from config (default `unix:///run/aziot/keyd.sock`).
pub fn endpoint(config: &config::Config) -> Result<Endpoint, KeydError> {
    Ok(match &config.endpoints.aziot_keyd {
        Some(uri) => Endpoint::parse(uri)?,
        None => aziot_ipc::service::default_endpoint(service::INFO),
    })
}

/// Reads keyd's config from the usual places.
pub fn load_config() -> Result<config::Config, KeydError> {
    Ok(aziot_ipc::config::load(&aziot_ipc::service::config_paths(service::INFO))?)
}

/// Serves on `listener` until the server fails. Builds the runtime: call only once the
/// sandbox is in place (the runtime's threads inherit it).
/// With `control`, a thread applies the config updates the broker sends (principals only).
pub fn serve(
    listener: std::os::unix::net::UnixListener,
    config: &config::Config,
    backend: Arc<dyn KeyBackend>,
    control: Option<std::os::fd::OwnedFd>,
) -> KeydError {
    let api = Arc::new(api::Api::new(backend, Principals::new(&config.principal)));
    // Only [[principal]] is applied on reload, as upstream.
    let reload = |api: &api::Api, config: config::Config| api.set_principals(Principals::new(&config.principal));
    aziot_ipc::server::serve_worker(listener, api, config.max_requests, control, reload).into()
}

/// Runs keyd unconfined in this process (no broker): config, library, listener, serve.
pub fn run() -> Result<(), KeydError> {
    openssl::init();
    tracing::info!("Starting service...");
    tracing::info!("Version - {}", env!("CARGO_PKG_VERSION"));
    let config = load_config()?;
    let backend = backend(&config, HandedDirs::default())?;
    let listener = aziot_ipc::listener::open(&endpoint(&config)?, Some(SOCKET_NAME))?;
    Err(serve(listener, &config, backend, None))
}
