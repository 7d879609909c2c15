//! certd as the broker and the worker entry see it ([`aziot_ipc::service::ServiceImpl`]): what the
//! broker reads and opens as root (the state directory, the directories of preloaded cert
//! files), what it grants (keyd's socket), and what the worker pre-loads before it locks itself
//! in (OpenSSL, the engine's key methods, the store).

use std::collections::HashMap;
use std::convert::Infallible;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use aziot_ipc::config::ConfigPaths;
use aziot_ipc::service::{BrokerSetup, Handed, LockIn, ServiceError, ServiceImpl, ServiceInfo};

/// certd's entry in the table of services.
pub const INFO: &ServiceInfo = aziot_ipc::service::services::get("certd");

/// Hand-off names (policy/services/certd.toml `[[descriptor]]`).
const LISTENER: &str = "listener";
const STATE: &str = "state";
/// The `preloaded-certs` declaration (Landlock rules name it) and its `handoff_prefix`.
const PRELOADED: &str = "preloaded-certs";
const PRELOADED_PREFIX: &str = "preloaded-cert:";

/// The certificates service.
#[derive(Debug)]
pub struct Certd;

fn warn_unknown(file: &std::path::Path, key: &str) {
    tracing::warn!("unknown config key {key:?} in {} (ignored)", file.display());
}

/// Reads and validates the config at `paths` (as the worker will parse it).
fn read(paths: &ConfigPaths) -> Result<(toml::Table, crate::config::Config), ServiceError> {
    let merged = aziot_ipc::config::read_merged(paths)?;
    let config = crate::parse_config(&merged, &mut warn_unknown).map_err(ServiceError::service)?;
    crate::keyd_socket(&config).map_err(ServiceError::service)?;
    Ok((merged.value, config))
}

impl ServiceImpl for Certd {
    fn info(&self) -> &'static ServiceInfo {
        INFO
    }

    fn setup(&self, paths: &ConfigPaths) -> Result<BrokerSetup, ServiceError> {
        let (merged, config) = read(paths)?;
        let endpoint = crate::endpoint(&config).map_err(ServiceError::service)?;
        // Preloaded cert files are reached through their directories, opened by the broker
        // (read only for the worker: policy/services/certd.toml).
        let extra_dirs = aziot_ipc::service::preloaded_dirs(PRELOADED_PREFIX, config.preloaded_files());
        // keyd's socket is the one pathname socket certd connects to.
        let keyd = crate::keyd_socket(&config).map_err(ServiceError::service)?;
        let mut grants = aziot_ipc::service::Grants::default();
        let origin = aziot_ipc::service::Origin::Config("endpoints.aziot_keyd".into());
        if let Some(dir) = keyd.parent() {
            grants.paths.push(aziot_ipc::service::PathGrant {
                path: dir.to_path_buf(),
                access: aziot_ipc::service::AccessSet::parse(&["resolve-unix"]).map_err(ServiceError::Invalid)?,
                origin: origin.clone(),
            });
        }
        grants.sockets.push(aziot_policy::SocketGrant { path: keyd, origin });
        // EST: TCP connect to the port of every configured EST URL, or only to the proxy's
        // (HTTPS_PROXY, which the broker keeps for the worker) when one is set.
        let proxy = crate::est::proxy_from_env().map_err(ServiceError::Invalid)?;
        for (port, key) in crate::est::tcp_ports(&config, proxy.as_ref()) {
            grants.tcp_ports.push(aziot_ipc::service::PortGrant { port, origin: aziot_ipc::service::Origin::Config(key) });
        }
        Ok(BrokerSetup {
            config_text: toml::to_string(&merged)?,
            endpoint,
            state_dir: Some(config.homedir_path.clone()),
            grants,
            sandbox: config.sandbox,
            extra_dirs,
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
        // One descriptor per preloaded file's directory (by path; several IDs may share one).
        let mut dirs: HashMap<PathBuf, OwnedFd> = HashMap::new();
        for (id, path) in config.preloaded_files() {
            let (Some(fd), Some(parent)) = (handed.take(&format!("{PRELOADED_PREFIX}{id}")), path.parent()) else {
                continue;
            };
            dirs.entry(parent.to_path_buf()).or_insert(fd);
        }
        let mut rule_dirs =
            vec![(STATE, home.try_clone().map_err(|source| ServiceError::Dup { name: STATE.into(), source })?)];
        for fd in dirs.values() {
            let dup = fd.try_clone().map_err(|source| ServiceError::Dup { name: PRELOADED.into(), source })?;
            rule_dirs.push((PRELOADED, dup));
        }
        // Pre-load: the store (creates certs/, removes leftovers of a killed write).
        let store =
            crate::store::Store::new(home.as_fd(), config.preloaded.clone(), dirs).map_err(ServiceError::service)?;
        drop(home);
        {
            let named: Vec<(&str, std::os::fd::BorrowedFd<'_>)> =
                rule_dirs.iter().map(|(n, fd)| (*n, fd.as_fd())).collect();
            lock_in(&named)?;
        }
        drop(rule_dirs);
        let listener = std::os::unix::net::UnixListener::from(listener);
        Err(ServiceError::service(crate::serve(listener, &config, store, Some(control))))
    }

    fn run_unconfined(&self) -> Result<(), ServiceError> {
        crate::run().map_err(ServiceError::service)
    }
}
