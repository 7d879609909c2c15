//! aziot-tpmd: the TPM service (spec tpmd.md) as a library.
//!
//! A request is traced in these files: [`aziot_ipc::server`] (accept, uid, throttle,
//! api-version, body) -> [`api`] (route, authorize, error mapping) -> [`tpm`] (the command
//! sequences of spec §5–§8) -> [`esys`] (safe calls into tpm2-tss ESYS, which [`tss_lib`]
//! loads at run time; types from tss-esapi) -> the TCTI: [`fd_tcti`] on a descriptor, or
//! tpm2-tss's loader ([`tcti`] explains both and what the sandbox must allow).
//!
//! For the broker: [`load_config`], then before the sandbox locks [`init_tpm_fd`] (fd opened
//! by the broker; preferred) or [`init_tpm`] (config `tcti` string), then [`serve`].

pub mod api;
pub mod blob;
pub mod config;
pub mod esys;
pub mod service;
pub mod fd_tcti;
#[cfg(feature = "test-support")]
pub mod dps_blob;
pub mod tcti;
pub mod tpm;
pub mod tss_lib;

use std::sync::Arc;
use std::os::fd::OwnedFd;

use aziot_ipc::endpoint::Endpoint;

pub use config::Config;
pub use tpm::{Tpm, TpmError, TpmSettings};

/// Name of the socket in systemd's `LISTEN_FDNAMES` (`FileDescriptorName=` of the unit).
pub const SOCKET_NAME: &str = service::INFO.socket_fd_name;

#[derive(Debug, thiserror::Error)]
pub enum TpmdError {
    #[error(transparent)]
    Config(#[from] aziot_ipc::config::ConfigError),
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("could not initialize TPM")]
    Tpm(#[from] TpmError),
    #[error("invalid endpoint")]
    Endpoint(#[from] aziot_ipc::endpoint::EndpointError),
    #[error("could not open the listening socket")]
    Listener(#[from] aziot_ipc::listener::ListenerError),
    #[error(transparent)]
    Serve(#[from] aziot_ipc::server::WorkerServeError),
}

/// Reads tpmd's config from the usual places (`$AZIOT_TPMD_CONFIG`, `..._DIR`) and validates it.
pub fn load_config() -> Result<Config, TpmdError> {
    let config: Config = aziot_ipc::config::load(&aziot_ipc::service::config_paths(service::INFO))?;
    config::validate(&config).map_err(TpmdError::Invalid)?;
    Ok(config)
}

/// The TPM settings of a config.
pub fn settings(config: &Config) -> TpmSettings {
    TpmSettings {
        auth_key_index: config.auth_key_index,
        endorsement_auth: config.hierarchy_authorization.endorsement.clone(),
        owner_auth: config.hierarchy_authorization.owner.clone(),
    }
}

/// Opens the TCTI of the config and runs the startup sequence (spec §5). Call before the
/// sandbox locks: the TCTI module is loaded (dlopen) and the device or socket is opened here.
pub fn init_tpm(config: &Config) -> Result<Tpm, TpmdError> {
    config::validate(config).map_err(TpmdError::Invalid)?;
    let esys = tpm::open_tcti(&config.tcti)?;
    Ok(Tpm::initialize(esys, &settings(config))?)
}

/// Like [`init_tpm`], on a descriptor the broker opened (`/dev/tpmrm0`, or a stream socket to
/// a TPM speaking the raw command stream); the config's `tcti` is not used. The worker then
/// never opens a path for the TPM ([`fd_tcti`]).
pub fn init_tpm_fd(config: &Config, fd: OwnedFd) -> Result<Tpm, TpmdError> {
    config::validate(config).map_err(TpmdError::Invalid)?;
    let esys = tpm::open_fd(fd)?;
    Ok(Tpm::initialize(esys, &settings(config))?)
}

/// The listener endpoint from config (default `unix:///run/aziot/tpmd.sock`).
pub fn endpoint(config: &Config) -> Result<Endpoint, TpmdError> {
    Ok(match &config.endpoints.aziot_tpmd {
        Some(uri) => Endpoint::parse(uri)?,
        None => aziot_ipc::service::default_endpoint(service::INFO),
    })
}

/// Serves on `listener` until the server fails. Builds the runtime: call only once the
/// sandbox is in place. With `control`, a thread applies the config updates the broker sends
/// (the allowed uids only: tpmd has no runtime reload of anything else).
pub fn serve(
    listener: std::os::unix::net::UnixListener,
    config: &Config,
    tpm: Tpm,
    control: Option<std::os::fd::OwnedFd>,
) -> TpmdError {
    let api = Arc::new(api::Api::new(tpm, config::allowed_uids(config)));
    let reload = |api: &api::Api, config: Config| api.set_allowed_uids(config::allowed_uids(&config));
    aziot_ipc::server::serve_worker(listener, api, config.max_requests, control, reload).into()
}

/// Runs tpmd unconfined in this process (no broker): config, TPM, listener, serve.
pub fn run() -> Result<(), TpmdError> {
    tracing::info!("Starting service...");
    tracing::info!("Version - {}", env!("CARGO_PKG_VERSION"));
    let config = load_config()?;
    let tpm = init_tpm(&config)?;
    let listener = aziot_ipc::listener::open(&endpoint(&config)?, Some(SOCKET_NAME))?;
    Err(serve(listener, &config, tpm, None))
}
