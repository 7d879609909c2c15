//! What a service *does*, as the broker and the worker entry point (`aziotd`) see it: the
//! [`ServiceImpl`] trait, implemented once per service in the service's own crate
//! (`aziot_keyd::service::Keyd`, `aziot_tpmd::service::Tpmd`). What a service *is* (names, user,
//! socket, config and policy files) is data: [`ServiceInfo`], one entry per service in
//! [`aziot_policy::services::SERVICES`].
//!
//! The broker holds one registry of implementations (broker/src/services.rs); the generic steps
//! (descriptor checks, rlimits → Landlock → seccomp, the report) stay in the broker's worker
//! entry and reach the implementation as the [`LockIn`] callback.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;

pub use aziot_policy::services::{self, ServiceInfo};
/// The grant types a service's [`ServiceImpl::setup`] derives from its config.
pub use aziot_policy::{AccessSet, Grants, Origin, PathGrant, PortGrant};

use crate::config::{ConfigPaths, SandboxConfig};
use crate::endpoint::Endpoint;
use crate::handoff::DescriptorKind;

/// What the broker derives from a service's config, read and validated as root.
#[derive(Debug)]
pub struct BrokerSetup {
    /// The merged config, as TOML text, for the worker's manifest.
    pub config_text: String,
    pub endpoint: Endpoint,
    /// The state directory to create (owned by the service user) and hand over as `state`.
    pub state_dir: Option<PathBuf>,
    /// Policy grants the config implies (e.g. a PKCS#11 module's files).
    pub grants: aziot_policy::Grants,
    pub sandbox: SandboxConfig,
    /// Further directories to open and hand over, by hand-off name (e.g. `preloaded-key:<id>`).
    pub extra_dirs: Vec<(String, PathBuf)>,
    /// Descriptors already opened while reading the config (the TPM), by hand-off name.
    pub extra_fds: Vec<(String, DescriptorKind, OwnedFd)>,
}

/// [`BrokerSetup::extra_dirs`] for preloaded files: each `(id, path)`'s directory, to be opened by
/// the broker and handed over as `<prefix><id>` (a path without a parent is skipped).
pub fn preloaded_dirs(prefix: &str, files: Vec<(String, PathBuf)>) -> Vec<(String, PathBuf)> {
    files
        .into_iter()
        .filter_map(|(id, path)| Some((format!("{prefix}{id}"), path.parent()?.to_path_buf())))
        .collect()
}

/// A service's own error (its crate's typed error), kept with its source chain.
#[derive(Debug)]
pub struct ServiceFailure(Box<dyn std::error::Error + Send + Sync + 'static>);

impl std::fmt::Display for ServiceFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ServiceFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("could not render the merged config")]
    Render(#[from] toml::ser::Error),
    #[error("invalid config in the manifest")]
    ManifestConfig(#[from] toml::de::Error),
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("the manifest has no descriptor {0:?}")]
    Missing(String),
    #[error("could not duplicate descriptor {name:?}")]
    Dup {
        name: String,
        #[source]
        source: std::io::Error,
    },
    /// The broker's lock-in (rlimits, Landlock, seccomp, report) failed.
    #[error(transparent)]
    LockIn(ServiceFailure),
    #[error(transparent)]
    Service(ServiceFailure),
    #[error("{0} has no implementation in this build")]
    NotBuilt(&'static str),
}

impl ServiceError {
    /// Wraps a service crate's own error.
    pub fn service(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        ServiceError::Service(ServiceFailure(Box::new(e)))
    }

    /// Wraps the broker's lock-in error.
    pub fn lock_in(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        ServiceError::LockIn(ServiceFailure(Box::new(e)))
    }
}

/// The descriptors the worker was handed, by hand-off name, already checked against the policy
/// (declared, right kind) by the worker entry.
#[derive(Debug, Default)]
pub struct Handed {
    fds: Vec<(String, OwnedFd)>,
}

impl Handed {
    pub fn new(fds: Vec<(String, OwnedFd)>) -> Self {
        Handed { fds }
    }

    /// Takes the descriptor named `name`, if it was handed over.
    pub fn take(&mut self, name: &str) -> Option<OwnedFd> {
        self.fds.iter().position(|(n, _)| n == name).map(|i| self.fds.remove(i).1)
    }

    /// Takes the descriptor named `name`; an error naming it when it was not handed over.
    pub fn require(&mut self, name: &str) -> Result<OwnedFd, ServiceError> {
        self.take(name).ok_or_else(|| ServiceError::Missing(name.to_owned()))
    }

    /// The names not taken yet.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.fds.iter().map(|(n, _)| n.as_str())
    }
}

/// The worker entry's lock-in, called by [`ServiceImpl::serve`] once its pre-load is done and
/// before it starts any thread: rlimits, Landlock (with these directories for the policy's fd
/// rules, by declaration name, e.g. `state`, `preloaded-keys`), seccomp, then the report to the
/// broker. After it returns, the worker may only serve.
pub type LockIn<'a> = &'a mut dyn FnMut(&[(&str, BorrowedFd<'_>)]) -> Result<(), ServiceError>;

/// One service's behaviour. Implemented once, in the service's crate; data lives in [`ServiceInfo`].
pub trait ServiceImpl: Send + Sync {
    /// The service's entry in the table.
    fn info(&self) -> &'static ServiceInfo;

    /// Broker, as root: reads and validates the config at `paths`, and derives what the broker
    /// opens and grants. Fails here on what the worker would fail on later.
    fn setup(&self, paths: &ConfigPaths) -> Result<BrokerSetup, ServiceError>;

    /// Broker: re-reads and validates the config of the running service; the new merged config
    /// (TOML text) for the worker.
    fn reload(&self, paths: &ConfigPaths) -> Result<String, ServiceError>;

    /// Worker (service user, no capabilities, not yet confined): parses `config` (from the
    /// manifest), pre-loads on the `handed` descriptors, calls `lock_in` exactly once, then serves
    /// on the listener, applying the broker's config updates from `control`. Returns only on
    /// failure.
    fn serve(
        &self,
        config: &str,
        handed: Handed,
        lock_in: LockIn<'_>,
        control: OwnedFd,
    ) -> Result<std::convert::Infallible, ServiceError>;

    /// `aziotd --unconfined <program>`: the service in one process, without broker or sandbox.
    fn run_unconfined(&self) -> Result<(), ServiceError> {
        Err(ServiceError::NotBuilt(self.info().program))
    }
}

/// Where the config of `info` lives: its environment variables, else its default paths.
pub fn config_paths(info: &ServiceInfo) -> ConfigPaths {
    ConfigPaths { main: info.config_path(), dir: info.config_dir() }
}

/// The listener when `[endpoints]` names none.
pub fn default_endpoint(info: &ServiceInfo) -> Endpoint {
    Endpoint::Unix(PathBuf::from(info.default_socket))
}
