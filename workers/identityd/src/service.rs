//! identityd as the broker and the worker entry see it ([`aziot_ipc::service::ServiceImpl`]):
//! what the broker reads and opens as root (the state directory), what it grants (keyd's and
//! certd's sockets, the hub's TCP ports), and what the worker pre-loads before it locks itself
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
    Ok((merged.value, config))
}

impl ServiceImpl for Identityd {
    fn info(&self) -> &'static ServiceInfo {
        INFO
    }

    fn setup(&self, paths: &ConfigPaths) -> Result<BrokerSetup, ServiceError> {
        let (merged, config) = read(paths)?;
        let endpoint = crate::endpoint(&config).map_err(ServiceError::service)?;
        let mut grants = Grants::default();
        // The sibling sockets identityd connects to: keyd (keys, signatures) and certd (identity
        // and local-identity certs). tpmd is only needed by DPS TPM attestation, which this build
        // does not provide.
        let sockets = [
            (crate::keyd_socket(&config).map_err(ServiceError::service)?, "endpoints.aziot_keyd"),
            (crate::certd_socket(&config).map_err(ServiceError::service)?, "endpoints.aziot_certd"),
        ];
        let resolve = AccessSet::parse(&["resolve-unix"]).map_err(ServiceError::Invalid)?;
        for (path, key) in sockets {
            let origin = Origin::Config(key.into());
            if let Some(dir) = path.parent() {
                grants.paths.push(PathGrant {
                    path: dir.to_path_buf(),
                    access: resolve.clone(),
                    origin: origin.clone(),
                });
            }
            grants.sockets.push(aziot_policy::SocketGrant { path, origin });
        }
        // TCP: the hub's and the gateway's ports when not the policy's 443.
        for (port, key) in crate::cloud_ports(&config) {
            if port != 443 && !grants.tcp_ports.iter().any(|g| g.port == port) {
                grants.tcp_ports.push(PortGrant { port, origin: Origin::Config(key.into()) });
            }
        }
        Ok(BrokerSetup {
            config_text: toml::to_string(&merged)?,
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
        Ok(toml::to_string(&merged)?)
    }

    fn serve(
        &self,
        config: &str,
        mut handed: Handed,
        lock_in: LockIn<'_>,
        control: OwnedFd,
    ) -> Result<Infallible, ServiceError> {
        crate::preload().map_err(ServiceError::service)?;
        let config = crate::config_from_text(config).map_err(ServiceError::service)?;
        let listener = handed.require(LISTENER)?;
        let home = handed.require(STATE)?;
        // Pre-load: the resolver (so that its files and modules are in memory before Landlock
        // and seccomp: getaddrinfo of localhost loads NSS), the hub client.
        let _ = std::net::ToSocketAddrs::to_socket_addrs(&("localhost", 443));
        let hub = crate::hub_client(&config).map_err(ServiceError::service)?;
        let rule_home = home.try_clone().map_err(|source| ServiceError::Dup { name: STATE.into(), source })?;
        lock_in(&[(STATE, rule_home.as_fd())])?;
        drop(rule_home);
        let listener = std::os::unix::net::UnixListener::from(listener);
        Err(ServiceError::service(crate::serve(listener, config, crate::state::State::new(home), Some(control), hub)))
    }

    fn run_unconfined(&self) -> Result<(), ServiceError> {
        crate::run().map_err(ServiceError::service)
    }
}
