//! keyd as the broker and the worker entry see it ([`aziot_ipc::service::ServiceImpl`]): what the
//! broker reads and opens as root, and what the worker pre-loads before it locks itself in.

use std::convert::Infallible;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use aziot_ipc::config::ConfigPaths;
use aziot_ipc::service::{BrokerSetup, Handed, LockIn, ServiceError, ServiceImpl, ServiceInfo};

/// keyd's entry in the table of services.
pub const INFO: &ServiceInfo = aziot_ipc::service::services::get("keyd");

/// Hand-off names (policy/services/keyd.toml `[[descriptor]]`).
const LISTENER: &str = "listener";
const STATE: &str = "state";
/// `handoff_prefix` of the `preloaded-keys` declaration.
const PRELOADED_PREFIX: &str = "preloaded-key:";

/// The keys service.
#[derive(Debug)]
pub struct Keyd;

fn warn_unknown(file: &std::path::Path, key: &str) {
    tracing::warn!("unknown config key {key:?} in {} (ignored)", file.display());
}

impl ServiceImpl for Keyd {
    fn info(&self) -> &'static ServiceInfo {
        INFO
    }

    fn setup(&self, paths: &ConfigPaths) -> Result<BrokerSetup, ServiceError> {
        let merged = aziot_ipc::config::read_merged(paths)?;
        let config: crate::config::Config = aziot_ipc::config::deserialize(&merged, warn_unknown)?;
        // Fail here, as root, on what the worker would fail on later.
        let endpoint = crate::endpoint(&config).map_err(ServiceError::service)?;
        let state_dir = config.aziot_keys.get("homedir_path").map(PathBuf::from);
        // Preloaded key files are reached through their directories, opened by the broker and
        // handed over.
        let extra_dirs = aziot_ipc::service::preloaded_dirs(PRELOADED_PREFIX, crate::preloaded_files(&config));
        let mut grants = aziot_ipc::service::Grants::default();
        // A PKCS#11 module needs its own files at run time (SoftHSM2: its config, its token store).
        if let Some(lib) = config.aziot_keys.get("pkcs11_lib_path") {
            // ... and syscalls the file backend never makes: the keyd+pkcs11 seccomp program.
            grants.pkcs11 = true;
            for (path, writable) in aziot_keys::native::pkcs11_sandbox_paths(std::path::Path::new(lib)) {
                let access = if writable {
                    aziot_ipc::service::AccessSet::parse(&["rw"]).expect("\"rw\" is a known access set")
                } else {
                    aziot_ipc::service::AccessSet::read_only()
                };
                grants.paths.push(aziot_ipc::service::PathGrant {
                    path,
                    access,
                    origin: aziot_ipc::service::Origin::Config("aziot_keys.pkcs11_lib_path".into()),
                });
            }
        }
        Ok(BrokerSetup {
            config_text: toml::to_string(&merged.value)?,
            endpoint,
            state_dir,
            grants,
            sandbox: config.sandbox,
            extra_dirs,
            extra_fds: Vec::new(),
        })
    }

    fn reload(&self, paths: &ConfigPaths) -> Result<String, ServiceError> {
        let merged = aziot_ipc::config::read_merged(paths)?;
        let _: crate::config::Config = aziot_ipc::config::deserialize(&merged, warn_unknown)?;
        Ok(toml::to_string(&merged.value)?)
    }

    fn serve(
        &self,
        config: &str,
        mut handed: Handed,
        lock_in: LockIn<'_>,
        control: OwnedFd,
    ) -> Result<Infallible, ServiceError> {
        openssl::init();
        let config: crate::config::Config = toml::from_str(config)?;
        let listener = handed.require(LISTENER)?;
        let home = handed.take(STATE);
        let mut preloaded = Vec::new();
        for (id, path) in crate::preloaded_files(&config) {
            let (Some(fd), Some(file_name)) = (handed.take(&format!("{PRELOADED_PREFIX}{id}")), path.file_name())
            else {
                continue;
            };
            preloaded.push((id, fd, file_name.to_string_lossy().into_owned()));
        }
        // Landlock rules are made on the same directories (by declaration name).
        let mut rule_dirs = Vec::new();
        for (name, fd) in
            home.iter().map(|fd| (STATE, fd)).chain(preloaded.iter().map(|(_, fd, _)| ("preloaded-keys", fd)))
        {
            let dup = fd.try_clone().map_err(|source| ServiceError::Dup { name: name.to_owned(), source })?;
            rule_dirs.push((name, dup));
        }
        // Pre-load: the key library (a replacement .so is dlopen'ed here, before seccomp
        // forbids PROT_EXEC).
        let backend = crate::backend(&config, crate::HandedDirs { home, preloaded }).map_err(ServiceError::service)?;
        {
            let dirs: Vec<(&str, std::os::fd::BorrowedFd<'_>)> =
                rule_dirs.iter().map(|(n, fd)| (*n, fd.as_fd())).collect();
            lock_in(&dirs)?;
        }
        // the duplicates served only to make the Landlock rules
        drop(rule_dirs);
        let listener = std::os::unix::net::UnixListener::from(listener);
        Err(ServiceError::service(crate::serve(listener, &config, backend, Some(control))))
    }

    fn run_unconfined(&self) -> Result<(), ServiceError> {
        crate::run().map_err(ServiceError::service)
    }
}
