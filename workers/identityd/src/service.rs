//! identityd as the broker and the worker entry see it ([`aziot_ipc::service::ServiceImpl`]):
//! what the broker reads and opens as root (the state directory), what it grants (keyd's and
//! certd's sockets, the hub's or the proxy's TCP port; the proxy itself goes to the worker in its
//! config text, [`crate::BROKER_TABLE`]), and what the worker pre-loads before it locks itself
//! in (OpenSSL, the engine's key methods, the IoT Hub client).

use std::convert::Infallible;
use std::os::fd::{AsFd, OwnedFd};

use aziot_ipc::config::ConfigPaths;
use aziot_ipc::service::{
    AccessSet, BrokerSetup, Grants, Handed, LockIn, Origin, PathGrant, PortGrant, ServiceError, ServiceImpl,
    ServiceInfo,
};

/// identityd's entry in the table of services.
pub const INFO: &ServiceInfo = aziot_ipc::service::services::get("identityd");

const LISTENER: &str = "listener";
const STATE: &str = "state";

/// The identity service.
#[derive(Debug)]
pub struct Identityd;

fn warn_unknown(file: &std::path::Path, key: &str) {
    tracing::warn!("unknown config key {key:?} in {} (ignored)", file.display());
}

fn read(paths: &ConfigPaths) -> Result<(toml::Table, crate::config::Config), ServiceError> {
    let merged = aziot_ipc::config::read_merged(paths)?;
    let config = crate::parse_config(&merged, &mut warn_unknown).map_err(ServiceError::service)?;
    let mut value = merged.value;
    // The DPS payload file, read as root (the config names it) into the worker's config text.
    let dps = crate::dps::DpsSettings::from_source(&config.provisioning.source).map_err(ServiceError::service)?;
    crate::dps::inline_payload(&mut value, dps.as_ref()).map_err(ServiceError::service)?;
    Ok((value, config))
}

/// What identityd's config (and the proxy of the unit's environment) adds to its policy: keyd's
/// and certd's sockets, and TCP connect to the proxy's port when a proxy is set, else to the
/// hub's and the gateway's ports (443, the policy's own, is not repeated).
pub fn grants(config: &crate::config::Config, proxy: Option<&crate::Proxy>) -> Result<Grants, ServiceError> {
    let mut grants = Grants::default();
    // The sibling sockets identityd connects to: keyd (keys, signatures) and certd (identity
    // and local-identity certs); tpmd only with DPS TPM attestation (EK/SRK, the activation
    // blob's import, SAS signatures).
    let mut sockets = vec![
        (crate::keyd_socket(config).map_err(ServiceError::service)?, "endpoints.aziot_keyd"),
        (crate::certd_socket(config).map_err(ServiceError::service)?, "endpoints.aziot_certd"),
    ];
    if let Some(tpmd) = crate::tpmd_socket(config).map_err(ServiceError::service)? {
        sockets.push((tpmd, "endpoints.aziot_tpmd"));
    }
    let resolve = AccessSet::parse(&["resolve-unix"]).map_err(ServiceError::Invalid)?;
    for (path, key) in sockets {
        let origin = Origin::Config(key.into());
        if let Some(dir) = path.parent() {
            grants.paths.push(PathGrant { path: dir.to_path_buf(), access: resolve.clone(), origin: origin.clone() });
        }
        grants.sockets.push(aziot_policy::SocketGrant { path, origin });
    }
    for (port, key) in crate::cloud_ports(config, proxy) {
        if port != 443 && !grants.tcp_ports.iter().any(|g| g.port == port) {
            grants.tcp_ports.push(PortGrant { port, origin: Origin::Config(key) });
        }
    }
    Ok(grants)
}

impl ServiceImpl for Identityd {
    fn info(&self) -> &'static ServiceInfo {
        INFO
    }

    fn setup(&self, paths: &ConfigPaths) -> Result<BrokerSetup, ServiceError> {
        let (merged, config) = read(paths)?;
        let endpoint = crate::endpoint(&config).map_err(ServiceError::service)?;
        // §7 step 4, as root: the unit's proxy, validated here (an invalid one stops the start)
        // and handed to the worker in its config text, not in its environment.
        let proxy = crate::proxy_from_broker_env().map_err(ServiceError::service)?;
        let grants = grants(&config, proxy.as_ref())?;
        Ok(BrokerSetup {
            config_text: crate::manifest_text(merged, proxy.as_ref())?,
            endpoint,
            state_dir: Some(config.homedir.clone()),
            grants,
            sandbox: config.sandbox,
            extra_dirs: Vec::new(),
            extra_fds: Vec::new(),
        })
    }

    fn reload(&self, paths: &ConfigPaths) -> Result<String, ServiceError> {
        let (merged, _) = read(paths)?;
        // The broker keeps this text for the next worker it starts: the proxy stays in it. The
        // environment is the broker's own, unchanged since setup validated it.
        let proxy = crate::proxy_from_broker_env().map_err(ServiceError::service)?;
        Ok(crate::manifest_text(merged, proxy.as_ref())?)
    }

    fn serve(
        &self,
        config: &str,
        mut handed: Handed,
        lock_in: LockIn<'_>,
        control: OwnedFd,
    ) -> Result<Infallible, ServiceError> {
        crate::preload().map_err(ServiceError::service)?;
        let (config, proxy) = crate::worker_config(config).map_err(ServiceError::service)?;
        let listener = handed.require(LISTENER)?;
        let home = handed.require(STATE)?;
        // Pre-load: the resolver (so that its files and modules are in memory before Landlock
        // and seccomp: getaddrinfo of localhost loads NSS), the hub client.
        let _ = std::net::ToSocketAddrs::to_socket_addrs(&("localhost", 443));
        let hub = crate::hub_client(&config, proxy.as_ref()).map_err(ServiceError::service)?;
        let dps = crate::dps_client(&config, proxy.as_ref()).map_err(ServiceError::service)?;
        let rule_home = home.try_clone().map_err(|source| ServiceError::Dup { name: STATE.into(), source })?;
        lock_in(&[(STATE, rule_home.as_fd())])?;
        drop(rule_home);
        let listener = std::os::unix::net::UnixListener::from(listener);
        Err(ServiceError::service(crate::serve(listener, config, crate::state::State::new(home), Some(control), hub, dps)))
    }

    fn run_unconfined(&self) -> Result<(), ServiceError> {
        crate::run().map_err(ServiceError::service)
    }
}
