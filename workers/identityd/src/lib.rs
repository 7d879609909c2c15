//! aziot-identityd: the identity service (spec identityd.md; docs/identityd.md).
//!
//! A request is traced in four files: [`aziot_ipc::server`] (accept, uid, throttle,
//! api-version, body) -> [`api`] (route table, caller class, authorisation matrix) ->
//! [`identity`] (device, module and local identities; provisioning and reconciliation) ->
//! [`keys`] (keyd, certd) / [`hub`] (IoT Hub) / [`dps`] (DPS, tpmd) / [`state`] (the home
//! directory).
//!
//! Provisioning: `manual` (SAS or X.509), `dps` (symmetric key, X.509, TPM) and `none`.

pub mod api;
pub mod config;
pub mod dps;
pub mod hub;
pub mod identity;
pub mod keys;
pub mod renew;
pub mod service;
pub mod state;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aziot_ipc::endpoint::Endpoint;

#[derive(Debug, thiserror::Error)]
pub enum IdentitydError {
    #[error(transparent)]
    Config(#[from] aziot_ipc::config::ConfigError),
    #[error("invalid config: {0}")]
    Check(#[from] config::CheckError),
    #[error(transparent)]
    Dps(#[from] dps::DpsConfigError),
    #[error("could not build the DPS client")]
    DpsClient(#[source] hub::HubError),
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
    /// An unusable `HTTPS_PROXY`/`https_proxy` (the text names the variable, never its value).
    #[error("invalid HTTPS proxy: {0}")]
    Proxy(String),
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

/// tpmd's socket (default `/run/aziot/tpmd.sock`), when DPS TPM attestation needs it.
pub fn tpmd_socket(config: &config::Config) -> Result<Option<PathBuf>, IdentitydError> {
    match dps::DpsSettings::from_source(&config.provisioning.source)? {
        Some(dps::DpsSettings { attestation: dps::Attestation::Tpm { .. }, .. }) => {
            socket_of(config, "aziot_tpmd", |e| &e.aziot_tpmd, "tpmd").map(Some)
        }
        _ => Ok(None),
    }
}

/// The DPS client for a `source = "dps"` config, through `proxy` when one is set (built before
/// the lock-in).
pub fn dps_client(
    config: &config::Config,
    proxy: Option<&Proxy>,
) -> Result<Option<Arc<dps::client::DpsClient>>, IdentitydError> {
    if !matches!(config.provisioning.source, config::Source::Dps { .. }) {
        return Ok(None);
    }
    let client = dps::client::DpsClient::new(
        Duration::from_secs(config.cloud_timeout_sec),
        config.cloud_retries,
        proxy.map(|p| p.uri.as_str()),
    )
    .map_err(IdentitydError::DpsClient)?;
    Ok(Some(Arc::new(client)))
}

/// certd's socket (default `/run/aziot/certd.sock`).
pub fn certd_socket(config: &config::Config) -> Result<PathBuf, IdentitydError> {
    socket_of(config, "aziot_certd", |e| &e.aziot_certd, "certd")
}

/// The TCP ports identityd connects to, with what each comes from: the proxy's when one is set
/// (cloud-protocols.md §1.4: all hub traffic is tunnelled through it, so the hub's and the
/// gateway's ports are not granted), else the hub's and the gateway's (`host[:port]`, 443 by
/// default).
pub fn cloud_ports(config: &config::Config, proxy: Option<&Proxy>) -> Vec<(u16, String)> {
    if let Some(p) = proxy {
        return vec![(p.authority.port, "environment HTTPS_PROXY".to_owned())];
    }
    let port = |host: &str| host.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).unwrap_or(443);
    let mut ports = Vec::new();
    if let config::Source::Manual { iothub_hostname, .. } = &config.provisioning.source {
        ports.push((port(iothub_hostname), "provisioning.iothub_hostname".to_owned()));
    }
    if let Some(g) = &config.provisioning.local_gateway_hostname {
        ports.push((port(g), "provisioning.local_gateway_hostname".to_owned()));
    }
    // DPS: its endpoint; the hub DPS assigns is reached on 443 (the policy's own).
    if let Ok(Some(d)) = dps::DpsSettings::from_source(&config.provisioning.source) {
        ports.push((d.endpoint.port, "provisioning.global_endpoint".to_owned()));
    }
    ports
}

/// The HTTPS proxy (cloud-protocols.md §1.4), as the broker passes it to the worker.
pub use hub::transport::Proxy;

/// The table the broker adds to the worker's config text: values it took, as root, from the
/// unit's environment (today the proxy: `https_proxy = "<uri>"`). Never taken from the config
/// files: the broker removes a table of that name it finds there (with the usual unknown-key
/// warning) before adding its own.
pub const BROKER_TABLE: &str = "aziot_broker_env";

/// The broker's side of §7 step 4: `HTTPS_PROXY`, else `https_proxy`, of the broker's own
/// environment (the unit's `Environment=`; broker/src/sanitize.rs keeps both), parsed. An
/// invalid value is a startup error whose text never carries the value (it may hold a password).
pub fn proxy_from_broker_env() -> Result<Option<Proxy>, IdentitydError> {
    hub::transport::proxy_from_env().map_err(IdentitydError::Proxy)
}

/// The worker's config text: the merged config without any [`BROKER_TABLE`] of the files, plus
/// the broker's own (only when it has something to say).
pub fn manifest_text(mut merged: toml::Table, proxy: Option<&Proxy>) -> Result<String, toml::ser::Error> {
    merged.remove(BROKER_TABLE);
    if let Some(p) = proxy {
        let mut table = toml::Table::new();
        table.insert("https_proxy".into(), toml::Value::String(p.uri.clone()));
        merged.insert(BROKER_TABLE.into(), toml::Value::Table(table));
    }
    toml::to_string(&merged)
}

/// The worker's side: the config and the proxy of the manifest's config text.
pub fn worker_config(text: &str) -> Result<(config::Config, Option<Proxy>), IdentitydError> {
    let config = config_from_text(text)?;
    let table: toml::Table = toml::from_str(text).map_err(aziot_ipc::config::ConfigError::Deserialize)?;
    let proxy = match table.get(BROKER_TABLE).and_then(|t| t.get("https_proxy")) {
        None => None,
        Some(toml::Value::String(uri)) => Some(Proxy::parse(uri).map_err(IdentitydError::Proxy)?),
        Some(_) => return Err(IdentitydError::Proxy(format!("{BROKER_TABLE}.https_proxy is not a string"))),
    };
    Ok((config, proxy))
}

/// Parses and validates (§6.6) the merged config; unknown keys go to `on_unknown(file, key)`.
/// `source = "dps"` is refused in this build.
pub fn parse_config(
    merged: &aziot_ipc::config::Merged,
    on_unknown: &mut dyn FnMut(&Path, &str),
) -> Result<config::Config, IdentitydError> {
    let config: config::Config = aziot_ipc::config::deserialize(merged, &mut *on_unknown)?;
    config.check()?;
    dps::DpsSettings::from_source(&config.provisioning.source)?;
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
    // The DPS client's TLS settings (the trust store is read before the sandbox).
    dps::client::preload().map_err(|e| {
        IdentitydError::DpsClient(hub::HubError::new(hub::HubErrorKind::Other, None, format!("TLS: {e}")))
    })?;
    Ok(())
}

/// The IoT Hub client of this build for `config`, through `proxy` when one is set (built before
/// the lock-in). Logs the proxy with its password masked (cloud-protocols.md §1.4).
pub fn hub_client(
    config: &config::Config,
    proxy: Option<&Proxy>,
) -> Result<Option<Arc<dyn hub::HubClient>>, IdentitydError> {
    if let Some(p) = proxy {
        tracing::info!("Detected HTTPS proxy server {}", p.display);
    }
    let settings = hub::HubSettings {
        timeout: Duration::from_secs(config.cloud_timeout_sec),
        retries: config.cloud_retries,
        proxy: proxy.map(|p| p.uri.clone()),
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
    dps: Option<Arc<dps::client::DpsClient>>,
) -> IdentitydError {
    let (keyd, certd, tpmd) = match (keyd_socket(&config), certd_socket(&config), tpmd_socket(&config)) {
        (Ok(k), Ok(c), Ok(t)) => (k, c, t),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return e,
    };
    let max_requests = config.max_requests;
    state.clean_temporaries();
    let core =
        Arc::new(identity::Core::new(config, state, &keyd, &certd, hub).with_dps(dps, tpmd.as_deref()));
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
            // §10.3: DPS X.509 with identity_auto_renew (the task ends when it is unconfigured).
            if renew::configured(background.core()) {
                tokio::spawn(renew::run(Arc::clone(background.core())));
            }
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
    let proxy = proxy_from_broker_env()?;
    let hub = hub_client(&config, proxy.as_ref())?;
    let listener = aziot_ipc::listener::open(&endpoint(&config)?, Some(service::INFO.socket_fd_name))?;
    let dps = dps_client(&config, proxy.as_ref())?;
    Err(serve(listener, config, state::State::new(OwnedFd::from(home)), None, hub, dps))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "hostname = \"h\"\nhomedir = \"/var/lib/aziot/identityd\"\n[provisioning]\nsource = \"manual\"\niothub_hostname = \"hub.example.net:8443\"\ndevice_id = \"d\"\n[provisioning.authentication]\nmethod = \"sas\"\ndevice_id_pk = \"device-id\"\n";

    /// The proxy reaches the worker through its config text; a table of that name in the config
    /// files is dropped (the environment is the only source), and none is added without a proxy.
    #[test]
    fn the_proxy_travels_in_the_manifest_text_only_from_the_broker() {
        let mut merged: toml::Table = toml::from_str(CONFIG).expect("config");
        merged.insert(
            BROKER_TABLE.into(),
            toml::Value::Table(toml::toml! { https_proxy = "http://planted:3128" }),
        );
        let text = manifest_text(merged.clone(), None).expect("text");
        let (config, proxy) = worker_config(&text).expect("worker config");
        assert!(proxy.is_none(), "a proxy from the config files is not honoured");
        assert_eq!(cloud_ports(&config, None), vec![(8443, "provisioning.iothub_hostname".to_owned())]);

        let p = Proxy::parse("http://us%40r:s3cret@127.0.0.1:3128").expect("proxy");
        let text = manifest_text(merged, Some(&p)).expect("text");
        assert!(!text.contains("planted"));
        let (config, proxy) = worker_config(&text).expect("worker config");
        assert_eq!(proxy.as_ref(), Some(&p));
        // All hub traffic goes through the proxy: only its port, not the hub's.
        assert_eq!(cloud_ports(&config, proxy.as_ref()), vec![(3128, "environment HTTPS_PROXY".to_owned())]);
    }

    /// An invalid proxy is an error whose text never quotes the value (it may hold a password).
    #[test]
    fn proxy_errors_do_not_quote_the_uri() {
        for bad in ["us3r:s3cret@proxy:3128", "http://us3r:s3/cret@proxy:3128", "socks5://us3r:s3cret@proxy:1080"] {
            let e = Proxy::parse(bad).expect_err(bad);
            assert!(!e.contains("s3cret") && !e.contains("s3/"), "{bad:?} -> {e}");
        }
        let text = format!("{CONFIG}[{BROKER_TABLE}]\nhttps_proxy = \"ftp://u:s3cret@p\"\n");
        let e = worker_config(&text).expect_err("invalid").to_string();
        assert!(!e.contains("s3cret"), "{e}");
    }
}
