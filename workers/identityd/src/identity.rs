//! The identity core (spec identityd.md §3, §8–§12): the provisioned device, module identities
//! (hub + cache + derived keys), local identities, provisioning and reconciliation.
//!
//! Locks: settings and the device are swapped behind `RwLock`s (held for a clone of an `Arc`
//! only); `changing` serialises state *changes* (reconciliation, reprovisioning) but no lock is
//! held by a read path across I/O, so E2, E10 and identity reads never wait for the cloud
//! (§2 Recommendation).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use aziot_ipc::client::ClientError;
use hyper::StatusCode;
use openssl::asn1::Asn1Time;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::stack::Stack;
use openssl::x509::extension::{BasicConstraints, ExtendedKeyUsage, KeyUsage};
use openssl::x509::{X509NameBuilder, X509ReqBuilder, X509};
use serde_json::{json, Value};

use crate::config::{Callers, Config, IdType, LocalIdAttributes, ManualAuth, Source};
use crate::dps::client::{DpsAuth, DpsClient, Registration};
use crate::dps::tpm::Tpmd;
use crate::dps::{Attestation, DpsSettings};
use crate::hub::{DeviceAuth, HubClient, HubDevice, HubError, Module, ModuleKeys};
use crate::keys::{derivation_data, error_chain, Certd, Keyd, KeydSigner};
use crate::state::{DeviceInfo, State, StateError};

/// identityd's errors as the API answers them (§2.1).
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("authorization error")]
    Authorization,
    #[error("parameter \"{0}\" has an invalid value")]
    InvalidParameter(&'static str, String),
    #[error("device identity not found")]
    DeviceNotFound,
    #[error("module identity not found")]
    ModuleNotFound,
    #[error("Hub client error")]
    Hub(#[source] HubError),
    /// DPS registration failed (cloud-protocols.md §3.7: 404 `DPS client error` to callers).
    #[error("DPS client error")]
    Dps(#[source] HubError),
    /// This build has no IoT Hub client (hub/mod.rs).
    #[error("IoT Hub client unavailable")]
    HubUnavailable,
    #[error("Key client error")]
    KeyClient(#[source] ClientError),
    #[error("internal error")]
    Internal(String),
}

impl IdentityError {
    pub fn internal(what: &str, e: &(dyn std::error::Error + 'static)) -> Self {
        IdentityError::Internal(format!("{what}: {}", error_chain(e)))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            IdentityError::Authorization => StatusCode::UNAUTHORIZED,
            IdentityError::InvalidParameter(..) | IdentityError::DeviceNotFound | IdentityError::ModuleNotFound => {
                StatusCode::BAD_REQUEST
            }
            IdentityError::Hub(_) | IdentityError::Dps(_) | IdentityError::KeyClient(_) => StatusCode::NOT_FOUND,
            IdentityError::HubUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            IdentityError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The message: the first line, then `caused by:` lines (internal details only in the log).
    pub fn message(&self) -> String {
        match self {
            IdentityError::InvalidParameter(name, cause) => {
                format!("parameter \"{name}\" has an invalid value\ncaused by: {cause}")
            }
            IdentityError::Hub(e) => format!("Hub client error\ncaused by: {e}"),
            IdentityError::Dps(e) => format!("DPS client error\ncaused by: {e}"),
            IdentityError::KeyClient(e) => {
                let mut m = "Key client error".to_owned();
                let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
                while let Some(c) = cause {
                    m.push_str(&format!("\ncaused by: {c}"));
                    cause = c.source();
                }
                m
            }
            other => other.to_string(),
        }
    }
}

fn invalid(name: &'static str, cause: impl Into<String>) -> IdentityError {
    IdentityError::InvalidParameter(name, cause.into())
}

/// The device's credentials as identityd holds them (§10.1).
#[derive(Clone)]
pub enum Credentials {
    Sas(Arc<KeydSigner>),
    X509 { cert_id: String, keypair_handle: String, chain: Vec<X509>, key: PKey<Private> },
    /// DPS TPM attestation: tpmd signs with the auth key DPS imported last.
    Tpm(Arc<Tpmd>),
}

/// The provisioned device.
#[derive(Clone)]
pub struct Device {
    pub hub_name: String,
    pub gateway_host: String,
    pub device_id: String,
    pub credentials: Credentials,
    /// DPS: the provisioning config's fingerprint, kept in the `device_info` backup.
    pub fingerprint: Option<String>,
}

impl Device {
    fn hub_device(&self) -> HubDevice {
        HubDevice {
            hub_name: self.hub_name.clone(),
            gateway_host: self.gateway_host.clone(),
            device_id: self.device_id.clone(),
            auth: match &self.credentials {
                Credentials::Sas(s) => DeviceAuth::Sas(Arc::clone(s) as Arc<dyn crate::hub::SasSigner>),
                Credentials::X509 { chain, key, .. } => DeviceAuth::X509 { chain: chain.clone(), key: key.clone() },
                Credentials::Tpm(t) => DeviceAuth::Sas(Arc::clone(t) as Arc<dyn crate::hub::SasSigner>),
            },
        }
    }

    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            hub_name: self.hub_name.clone(),
            local_gateway_hostname: self.gateway_host.clone(),
            device_id: self.device_id.clone(),
            provisioning: self.fingerprint.clone(),
        }
    }
}

/// What a config reload replaces (§13).
#[derive(Debug)]
pub struct Settings {
    pub config: Config,
    pub callers: Callers,
}

impl Settings {
    pub fn new(config: Config) -> Settings {
        let callers = Callers::new(&config.principal);
        Settings { config, callers }
    }
}

/// Why provisioning or reconciliation was started (§11.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    Startup,
    ConfigurationFileUpdate,
    Api,
}

pub struct Core {
    settings: RwLock<Arc<Settings>>,
    device: RwLock<Option<Arc<Device>>>,
    state: State,
    keyd: Arc<Keyd>,
    certd: Certd,
    engine_keyd: Arc<aziot_key_openssl_engine::KeydClient>,
    hub: Option<Arc<dyn HubClient>>,
    /// The DPS client (`source = "dps"`) and tpmd (TPM attestation): [`Core::with_dps`].
    dps: Option<Arc<DpsClient>>,
    tpmd: Option<Arc<Tpmd>>,
    /// (module, generationId) → the derived primary key's handle (handles never expire).
    derived: Mutex<HashMap<(String, String), String>>,
    /// Serialises state changes (reconcile, reprovision); never taken by a read.
    changing: tokio::sync::Mutex<()>,
}

impl Core {
    pub fn new(
        config: Config,
        state: State,
        keyd_socket: &std::path::Path,
        certd_socket: &std::path::Path,
        hub: Option<Arc<dyn HubClient>>,
    ) -> Core {
        Core {
            settings: RwLock::new(Arc::new(Settings::new(config))),
            device: RwLock::new(None),
            state,
            keyd: Arc::new(Keyd::new(keyd_socket)),
            certd: Certd::new(certd_socket),
            engine_keyd: Arc::new(aziot_key_openssl_engine::KeydClient::new(keyd_socket)),
            hub,
            dps: None,
            tpmd: None,
            derived: Mutex::new(HashMap::new()),
            changing: tokio::sync::Mutex::new(()),
        }
    }

    /// The DPS client and tpmd's socket (DPS provisioning; tpmd only for TPM attestation).
    pub fn with_dps(mut self, dps: Option<Arc<DpsClient>>, tpmd_socket: Option<&std::path::Path>) -> Core {
        self.dps = dps;
        self.tpmd = tpmd_socket.map(|p| Arc::new(Tpmd::new(p)));
        self
    }

    pub fn settings(&self) -> Arc<Settings> {
        Arc::clone(&self.settings.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Applies a reloaded config (§13, with the Recommendation: validated before anything is
    /// swapped). The caller then reconciles.
    pub fn set_settings(&self, config: Config) -> Result<(), crate::config::CheckError> {
        config.check()?;
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Settings::new(config));
        Ok(())
    }

    fn device(&self) -> Option<Arc<Device>> {
        self.device.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn require_device(&self) -> Result<Arc<Device>, IdentityError> {
        self.device().ok_or(IdentityError::DeviceNotFound)
    }

    fn hub(&self) -> Result<&Arc<dyn HubClient>, IdentityError> {
        self.hub.as_ref().ok_or(IdentityError::HubUnavailable)
    }

    // ---- identities (§3) ----

    /// The device identity (E1, E3).
    pub async fn device_identity(&self) -> Result<Value, IdentityError> {
        let device = self.require_device()?;
        let auth = match &device.credentials {
            Credentials::Sas(signer) => {
                let handle = signer.handle().await.map_err(IdentityError::KeyClient)?;
                json!({"type": "sas", "keyHandle": handle})
            }
            Credentials::X509 { cert_id, keypair_handle, .. } => {
                json!({"type": "x509", "keyHandle": keypair_handle, "certId": cert_id})
            }
            // §3.1: no handle, no cert.
            Credentials::Tpm(_) => json!({"type": "tpm"}),
        };
        Ok(json!({"type": "aziot", "spec": {
            "hubName": device.hub_name,
            "gatewayHost": device.gateway_host,
            "deviceId": device.device_id,
            "auth": auth,
        }}))
    }

    fn module_json(device: &Device, module: &Module, auth: Option<Value>) -> Value {
        let mut spec = serde_json::Map::new();
        spec.insert("hubName".into(), json!(device.hub_name));
        spec.insert("gatewayHost".into(), json!(device.gateway_host));
        spec.insert("deviceId".into(), json!(module.device_id));
        spec.insert("moduleId".into(), json!(module.module_id));
        if let Some(g) = &module.generation_id {
            spec.insert("genId".into(), json!(g));
        }
        if let Some(a) = auth {
            spec.insert("auth".into(), a);
        }
        json!({"type": "aziot", "spec": Value::Object(spec)})
    }

    /// The derived primary key's handle of `module` (§8.2; read paths need only the primary).
    async fn primary_handle(&self, module_id: &str, generation_id: &str) -> Result<String, IdentityError> {
        let key = (module_id.to_owned(), generation_id.to_owned());
        if let Some(h) = self.derived.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
            return Ok(h.clone());
        }
        let master =
            self.keyd.master_handle().await.map_err(|e| IdentityError::internal("could not get the master key", &e))?;
        let handle = self
            .keyd
            .derived_handle(&master, &derivation_data(module_id, generation_id, true))
            .await
            .map_err(|e| IdentityError::internal("could not derive the module key", &e))?;
        self.derived.lock().unwrap_or_else(|p| p.into_inner()).insert(key, handle.clone());
        Ok(handle)
    }

    /// Both derived keys' handles and exported bytes (§8.1 step 3).
    async fn module_keys(&self, module_id: &str, generation_id: &str) -> Result<(String, ModuleKeys), IdentityError> {
        let internal = |e: ClientError| IdentityError::internal("could not derive the module keys", &e);
        let master = self.keyd.master_handle().await.map_err(internal)?;
        let primary = self
            .keyd
            .derived_handle(&master, &derivation_data(module_id, generation_id, true))
            .await
            .map_err(internal)?;
        let secondary = self
            .keyd
            .derived_handle(&master, &derivation_data(module_id, generation_id, false))
            .await
            .map_err(internal)?;
        let keys = ModuleKeys {
            primary: self.keyd.export_derived(&primary).await.map_err(internal)?,
            secondary: self.keyd.export_derived(&secondary).await.map_err(internal)?,
        };
        self.derived
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((module_id.to_owned(), generation_id.to_owned()), primary.clone());
        Ok((primary, keys))
    }

    async fn identity_with_auth(&self, device: &Device, module: &Module) -> Result<Value, IdentityError> {
        let gen = module.generation_id.as_deref().ok_or(IdentityError::ModuleNotFound)?;
        let handle = self.primary_handle(&module.module_id, gen).await?;
        Ok(Self::module_json(device, module, Some(json!({"type": "sas", "keyHandle": handle}))))
    }

    fn cache_write(&self, device: &Device, module: &Module) {
        if let Err(e) = self.state.write_module(&device.hub_name, &device.device_id, module) {
            tracing::warn!("Could not write the module cache of {:?}: {}", module.module_id, error_chain(&e));
        }
    }

    fn cache_delete(&self, device: &Device, module_id: &str) {
        if let Err(e) = self.state.delete_module(&device.hub_name, &device.device_id, module_id) {
            tracing::warn!("Could not delete the module cache of {module_id:?}: {}", error_chain(&e));
        }
    }

    /// The cached record; `None` when absent, or unreadable or corrupt (logged, naming the file).
    fn cache_read(&self, device: &Device, module_id: &str) -> Option<Module> {
        match self.state.read_module(&device.hub_name, &device.device_id, module_id) {
            Ok(module) => module,
            Err(e) => {
                tracing::warn!("Ignoring the module cache of {module_id:?}: {}", error_chain(&e));
                None
            }
        }
    }

    /// One module record (§8.3): hub first (refreshing the cache; an explicit hub 404 purges
    /// it), the cache on other failures; or the cache first with `prefer_module_identity_cache`.
    async fn module_record(&self, device: &Device, module_id: &str) -> Result<Module, IdentityError> {
        let prefer_cache = self.settings().config.prefer_module_identity_cache;
        if prefer_cache {
            if let Some(m) = self.cache_read(device, module_id) {
                return Ok(m);
            }
        }
        let hub_result = match &self.hub {
            None => Err(IdentityError::HubUnavailable),
            Some(hub) => hub.get_module(&device.hub_device(), module_id).await.map_err(IdentityError::Hub),
        };
        match hub_result {
            Ok(m) => {
                self.cache_write(device, &m);
                Ok(m)
            }
            Err(IdentityError::Hub(e)) if e.is_not_found() => {
                self.cache_delete(device, module_id);
                Err(IdentityError::Hub(e))
            }
            Err(e) => {
                if !prefer_cache {
                    if let Some(m) = self.cache_read(device, module_id) {
                        return Ok(m);
                    }
                }
                match e {
                    IdentityError::Hub(h) => Err(IdentityError::Hub(HubError::new(
                        h.kind,
                        h.status,
                        format!("module {module_id} not found"),
                    ))),
                    other => Err(other),
                }
            }
        }
    }

    /// A hub module identity with `auth` (E6 `aziot`, E1 for module principals).
    pub async fn module_identity(&self, module_id: &str) -> Result<Value, IdentityError> {
        let device = self.require_device()?;
        let module = self.module_record(&device, module_id).await?;
        self.identity_with_auth(&device, &module).await
    }

    /// Every hub module of the device, without `auth` (E4).
    pub async fn module_identities(&self) -> Result<Value, IdentityError> {
        let device = self.require_device()?;
        let from_cache = || self.state.list_modules(&device.hub_name, &device.device_id);
        let modules = if self.settings().config.prefer_module_identity_cache {
            match from_cache() {
                Ok(m) => m,
                Err(_) => self.list_from_hub(&device).await?,
            }
        } else {
            match self.list_from_hub(&device).await {
                Ok(m) => m,
                Err(hub_error) => from_cache().map_err(|e| {
                    tracing::warn!("The module cache is unreadable: {}", error_chain(&e));
                    hub_error
                })?,
            }
        };
        let identities: Vec<Value> = modules.iter().map(|m| Self::module_json(&device, m, None)).collect();
        Ok(json!({"identities": identities}))
    }

    async fn list_from_hub(&self, device: &Device) -> Result<Vec<Module>, IdentityError> {
        let modules = self.hub()?.list_modules(&device.hub_device()).await.map_err(IdentityError::Hub)?;
        for m in &modules {
            self.cache_write(device, m);
        }
        Ok(modules)
    }

    /// E5 `aziot` and reconciliation (§8.1 create).
    pub async fn create_module(&self, module_id: &str) -> Result<Value, IdentityError> {
        if module_id.trim().is_empty() {
            return Err(invalid("module_id", "module name cannot be empty"));
        }
        let device = self.require_device()?;
        self.create_module_of(&device, module_id).await
    }

    async fn create_module_of(&self, device: &Device, module_id: &str) -> Result<Value, IdentityError> {
        let hub = self.hub()?;
        let hd = device.hub_device();
        let created = hub.create_module(&hd, module_id).await.map_err(IdentityError::Hub)?;
        self.set_module_keys(device, created).await
    }

    /// E7 (§8.1 update).
    pub async fn update_module(&self, module_id: &str) -> Result<Value, IdentityError> {
        let device = self.require_device()?;
        let hub = self.hub()?;
        let current = hub.get_module(&device.hub_device(), module_id).await.map_err(IdentityError::Hub)?;
        self.set_module_keys(&device, current).await
    }

    async fn set_module_keys(&self, device: &Device, module: Module) -> Result<Value, IdentityError> {
        let gen = module.generation_id.clone().ok_or(IdentityError::ModuleNotFound)?;
        let (primary, keys) = self.module_keys(&module.module_id, &gen).await?;
        let updated = self
            .hub()?
            .update_module(&device.hub_device(), &module.module_id, &keys)
            .await
            .map_err(IdentityError::Hub)?;
        self.cache_write(device, &updated);
        Ok(Self::module_json(device, &updated, Some(json!({"type": "sas", "keyHandle": primary}))))
    }

    /// E8 and reconciliation.
    pub async fn delete_module(&self, module_id: &str) -> Result<(), IdentityError> {
        let device = self.require_device()?;
        self.delete_module_of(&device, module_id).await
    }

    async fn delete_module_of(&self, device: &Device, module_id: &str) -> Result<(), IdentityError> {
        self.hub()?.delete_module(&device.hub_device(), module_id).await.map_err(IdentityError::Hub)?;
        self.cache_delete(device, module_id);
        Ok(())
    }

    // ---- local identities (§9) ----

    /// Issues a local identity for `module_id` with `attributes`.
    pub async fn local_identity(&self, module_id: &str, attributes: LocalIdAttributes) -> Result<Value, IdentityError> {
        let settings = self.settings();
        let Some(localid) = settings.config.localid.clone() else {
            return Err(IdentityError::Internal("[localid] is not configured".into()));
        };
        // §9 Recommendation: the device identity cert's IDs are not local identity IDs.
        if let Source::Manual { authentication: ManualAuth::X509 { identity_cert, .. }, .. } =
            &settings.config.provisioning.source
        {
            if module_id == identity_cert || *module_id == format!("{identity_cert}-temp") {
                return Err(invalid(
                    "moduleId",
                    format!("local identity ID {module_id:?} is reserved for the device identity certificate"),
                ));
            }
        }
        let mut cn = format!("{module_id}.{}.{}", settings.config.hostname, localid.domain);
        while cn.len() > 64 {
            cn.pop();
        }
        let (key_pem, csr_pem) = tokio::task::spawn_blocking(move || local_csr(&cn, attributes))
            .await
            .map_err(|e| IdentityError::internal("key generation task failed", &e))?
            .map_err(|e| IdentityError::internal("could not build the local identity CSR", &e))?;
        let pem =
            self.certd.issue(module_id, &csr_pem).await.map_err(|e| {
                IdentityError::internal(&format!("certd could not issue local identity {module_id:?}"), &e)
            })?;
        let leaf = X509::stack_from_pem(pem.as_bytes())
            .ok()
            .and_then(|s| s.into_iter().next())
            .ok_or_else(|| IdentityError::Internal("certd returned no certificate".into()))?;
        let expiration = rfc3339(leaf.not_after()).map_err(|e| IdentityError::internal("bad notAfter", &e))?;
        Ok(json!({"type": "local", "spec": {
            "moduleId": module_id,
            "auth": {"privateKey": key_pem, "certificate": pem, "expiration": expiration},
        }}))
    }

    // ---- provisioning (§10, §11) ----

    /// Builds the device from the current config's `[provisioning]` (manual: no cloud call).
    /// DPS: with `use_backup` (Startup), a valid `device_info` backup made with the same
    /// provisioning config is used without a DPS call (§11.1 step 3).
    /// `credential_override`: DPS X.509 registers with these (§10.3 renewal) instead of certd's.
    async fn provisioned_device(
        &self,
        config: &Config,
        use_backup: bool,
        credential_override: Option<Credentials>,
    ) -> Result<Option<Device>, IdentityError> {
        let gateway = |hub: &str| config.provisioning.local_gateway_hostname.clone().unwrap_or_else(|| hub.to_owned());
        match &config.provisioning.source {
            Source::None => {
                tracing::info!("Skipping provisioning with IoT Hub.");
                Ok(None)
            }
            Source::Dps { .. } => self.dps_device(config, use_backup, credential_override).await.map(Some),
            Source::Manual { iothub_hostname, device_id, authentication } => {
                let credentials = match authentication {
                    ManualAuth::Sas { device_id_pk } => {
                        Credentials::Sas(Arc::new(KeydSigner::new(Arc::clone(&self.keyd), device_id_pk.clone())))
                    }
                    ManualAuth::X509 { identity_cert, identity_pk, csr_subject } => {
                        let subject = crate::config::CsrSubject::with_cn(csr_subject.as_ref(), device_id);
                        self.x509_credentials(identity_cert, identity_pk, &subject).await?
                    }
                };
                Ok(Some(Device {
                    hub_name: iothub_hostname.clone(),
                    gateway_host: gateway(iothub_hostname),
                    device_id: device_id.clone(),
                    credentials,
                    fingerprint: None,
                }))
            }
        }
    }

    /// §11.1 for `source = "dps"`: the credentials (§10.1), then the backup or a registration.
    async fn dps_device(
        &self,
        config: &Config,
        use_backup: bool,
        credential_override: Option<Credentials>,
    ) -> Result<Device, IdentityError> {
        if config.provisioning.local_gateway_hostname.is_some() {
            return Err(IdentityError::Internal("DPS provisioning is not supported in nested mode".into()));
        }
        let settings = DpsSettings::from_source(&config.provisioning.source)
            .map_err(|e| IdentityError::Internal(e.to_string()))?
            .ok_or_else(|| IdentityError::Internal("not a DPS config".into()))?;
        let fingerprint = settings.fingerprint();
        let (credentials, registration_id, auth) = match &settings.attestation {
            Attestation::SymmetricKey { registration_id, symmetric_key } => {
                let signer = Arc::new(KeydSigner::new(Arc::clone(&self.keyd), symmetric_key.clone()));
                let auth = DpsAuth::Sas(Arc::clone(&signer) as Arc<dyn crate::hub::SasSigner>);
                (Credentials::Sas(signer), registration_id.clone(), auth)
            }
            Attestation::X509 { identity_cert, identity_pk, registration_id, .. } => {
                let subject = match registration_id.as_ref().and_then(crate::dps::registration_cn) {
                    Some(cn) => crate::config::CsrSubject::with_cn(registration_id.as_ref(), &cn),
                    None => Vec::new(),
                };
                let credentials = match credential_override {
                    Some(c @ Credentials::X509 { .. }) => c,
                    _ => self.x509_credentials(identity_cert, identity_pk, &subject).await?,
                };
                let Credentials::X509 { chain, key, .. } = &credentials else { unreachable!("x509 credentials") };
                let id = match settings.registration_id() {
                    Some(id) => id,
                    None => leaf_cn(&chain[0]).ok_or_else(|| {
                        IdentityError::Internal("the identity certificate has no CN to register with".into())
                    })?,
                };
                let cert = crate::hub::transport::ClientCert { chain: chain.clone(), key: key.clone() };
                (credentials, id, DpsAuth::X509(cert))
            }
            Attestation::Tpm { registration_id } => {
                let tpmd = self.tpmd.clone().ok_or_else(|| IdentityError::Internal("tpmd is not configured".into()))?;
                (Credentials::Tpm(Arc::clone(&tpmd)), registration_id.clone(), DpsAuth::Tpm(tpmd))
            }
        };
        if use_backup {
            match self.state.device_info() {
                Some(info) if info.provisioning.as_deref().is_none_or(|f| f == fingerprint) => {
                    tracing::info!("Provisioned with backup for {}.", info.device_id);
                    return Ok(Device {
                        hub_name: info.hub_name,
                        gateway_host: info.local_gateway_hostname,
                        device_id: info.device_id,
                        credentials,
                        // A backup of upstream's (no fingerprint) is adopted as this config's.
                        fingerprint: Some(fingerprint),
                    });
                }
                Some(_) => tracing::info!(
                    "The device info backup was made with another provisioning configuration; registering with DPS."
                ),
                None => {
                    if self.state.read(crate::state::DEVICE_INFO).ok().flatten().is_some() {
                        tracing::warn!("Ignoring invalid device info backup.");
                        let _ = self.state.remove(crate::state::DEVICE_INFO);
                    }
                }
            }
        }
        let dps = self.dps.as_ref().ok_or_else(|| IdentityError::Internal("the DPS client is not available".into()))?;
        let payload = settings.payload().map_err(|e| IdentityError::InvalidParameter("provisioning.payload", e.to_string()))?;
        let registration = Registration {
            endpoint: settings.endpoint.clone(),
            scope_id: settings.scope_id.clone(),
            registration_id,
            payload,
        };
        let assignment = dps.register(&registration, &auth).await.map_err(IdentityError::Dps)?;
        tracing::info!("Successfully provisioned with DPS.");
        Ok(Device {
            gateway_host: assignment.assigned_hub.clone(),
            hub_name: assignment.assigned_hub,
            device_id: assignment.device_id,
            credentials,
            fingerprint: Some(fingerprint),
        })
    }

    /// §10.2: the identity cert from certd (created through certd when missing) and its key in
    /// keyd, loaded through the engine's twin.
    async fn x509_credentials(
        &self,
        cert_id: &str,
        key_id: &str,
        subject: &[(String, String)],
    ) -> Result<Credentials, IdentityError> {
        let existing_key = self.keyd.keypair_handle(key_id).await;
        let cert = self
            .certd
            .get(cert_id)
            .await
            .map_err(|e| IdentityError::internal(&format!("could not get identity cert {cert_id:?}"), &e))?;
        let (pem, handle) = match cert {
            Some(pem) => {
                let handle = existing_key
                    .map_err(|e| IdentityError::internal(&format!("could not get identity key pair {key_id:?}"), &e))?;
                (pem, handle)
            }
            None if subject.is_empty() => {
                return Err(IdentityError::Internal(
                    "identity cert does not exist; cannot create new cert as registration ID is unknown".into(),
                ))
            }
            None => {
                if let Ok(old) = existing_key {
                    self.keyd
                        .delete_keypair(&old)
                        .await
                        .map_err(|e| IdentityError::internal("could not delete the old identity key pair", &e))?;
                }
                let handle = self
                    .keyd
                    .create_keypair(key_id)
                    .await
                    .map_err(|e| IdentityError::internal("could not create the identity key pair", &e))?;
                let (engine, h, subject) = (Arc::clone(&self.engine_keyd), handle.clone(), subject.to_vec());
                let csr =
                    tokio::task::spawn_blocking(move || -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
                        let key = aziot_key_openssl_engine::load_private_key(&engine, &h)?;
                        Ok(identity_csr(&key, &subject)?)
                    })
                    .await
                    .map_err(|e| IdentityError::internal("CSR task failed", &e))?
                    .map_err(|e| IdentityError::Internal(format!("could not build the identity CSR: {e}")))?;
                let pem = self
                    .certd
                    .issue(cert_id, &csr)
                    .await
                    .map_err(|e| IdentityError::internal("certd could not issue the identity cert", &e))?;
                (pem, handle)
            }
        };
        let chain = X509::stack_from_pem(pem.as_bytes()).map_err(|e| IdentityError::internal("identity cert", &e))?;
        if chain.is_empty() {
            return Err(IdentityError::Internal(format!("identity cert {cert_id:?} holds no certificate")));
        }
        let (engine, h) = (Arc::clone(&self.engine_keyd), handle.clone());
        let key = tokio::task::spawn_blocking(move || aziot_key_openssl_engine::load_private_key(&engine, &h))
            .await
            .map_err(|e| IdentityError::internal("key task failed", &e))?
            .map_err(|e| IdentityError::internal("could not load the identity key", &e))?;
        Ok(Credentials::X509 { cert_id: cert_id.to_owned(), keypair_handle: handle, chain, key })
    }

    /// keyd, certd and the engine's keyd client (the identity cert's renewal, crate::renew).
    pub(crate) fn clients(&self) -> (Arc<Keyd>, &Certd, Arc<aziot_key_openssl_engine::KeydClient>) {
        (Arc::clone(&self.keyd), &self.certd, Arc::clone(&self.engine_keyd))
    }

    /// The leaf of the current device's X.509 identity.
    pub(crate) fn device_x509_leaf(&self) -> Option<X509> {
        match &self.device()?.credentials {
            Credentials::X509 { chain, .. } => chain.first().cloned(),
            _ => None,
        }
    }

    /// Swaps the current device's credentials (same device: no state change, no I/O).
    pub(crate) fn replace_credentials(&self, credentials: Credentials) {
        let mut slot = self.device.write().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = slot.as_ref() {
            let mut d = (**d).clone();
            d.credentials = credentials;
            *slot = Some(Arc::new(d));
        }
    }

    fn set_device(&self, device: Option<Device>) -> Result<(), IdentityError> {
        if let Some(d) = &device {
            self.state
                .set_device(&d.hub_name, &d.device_id)
                .map_err(|e| IdentityError::internal("could not prepare the module cache", &e))?;
        }
        *self.device.write().unwrap_or_else(|p| p.into_inner()) = device.map(Arc::new);
        Ok(())
    }

    /// Startup (§7 steps 7–8, §11.3).
    pub async fn start(&self) -> Result<(), IdentityError> {
        let _changing = self.changing.lock().await;
        tracing::info!("Provisioning starting. Reason: Startup");
        let config = self.settings().config.clone();
        let device = self.provisioned_device(&config, true, None).await?;
        self.set_device(device)?;
        tracing::info!("Provisioning complete.");
        self.reconcile_with_fallback(Trigger::Startup).await
    }

    /// A config reload: reconcile only (§11.2); failures are logged.
    pub async fn config_changed(&self) {
        let _changing = self.changing.lock().await;
        if let Err(e) = self.reconcile_with_fallback(Trigger::ConfigurationFileUpdate).await {
            tracing::warn!(
                "Failed to reprovision device. Running offline. Reprovisioning failure reason: {}.",
                error_chain(&e)
            );
        }
    }

    /// E9 (§11.2 Api), atomic (§11.3 Recommendation, quirk 8): the new device is provisioned
    /// (DPS: registered) and reconciled as upstream does after clearing its state (no `prev`:
    /// the configured modules are recreated), and only then replaces the old one. Any failure
    /// leaves the old device, its `device_info` backup and its module cache as they were.
    pub async fn reprovision(&self) -> Result<(), IdentityError> {
        self.reprovision_with(None).await
    }

    /// E9, or the identity cert's renewal (§10.3 step 3) with the new credentials.
    pub async fn reprovision_with(&self, credential_override: Option<Credentials>) -> Result<(), IdentityError> {
        let _changing = self.changing.lock().await;
        tracing::info!("Provisioning starting. Reason: Api");
        let config = self.settings().config.clone();
        let device = self.provisioned_device(&config, false, credential_override).await?;
        tracing::info!("Provisioning complete.");
        tracing::info!("Identity reconciliation started. Reason: Api");
        match &device {
            Some(new) => self.reconcile_device(new, true).await?,
            None => {
                let _ = self.state.remove(crate::state::DEVICE_INFO);
            }
        }
        let moved = match (self.device(), &device) {
            (Some(old), Some(new)) => !old.info().same_device(&new.info()),
            _ => true,
        };
        self.derived.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.set_device(device)?;
        if moved {
            // The new device's module cache (its directory exists only now).
            if let Some(new) = self.device() {
                if let Err(e) = self.list_from_hub(&new).await {
                    tracing::warn!("Could not fill the module cache of the new device: {}", error_chain(&e));
                }
            }
        }
        tracing::info!("Identity reconciliation complete.");
        Ok(())
    }

    async fn reconcile_with_fallback(&self, trigger: Trigger) -> Result<(), IdentityError> {
        tracing::info!("Identity reconciliation started. Reason: {trigger:?}");
        match self.reconcile().await {
            Ok(()) => {}
            Err(IdentityError::HubUnavailable) => {
                tracing::warn!("IoT Hub client unavailable in this build: module identities are not reconciled.");
            }
            Err(IdentityError::Hub(e)) if e.is_network() => {
                tracing::warn!(
                    "Network not available for Identity reconciliation. Using offline backup from last run."
                );
            }
            Err(IdentityError::Hub(e)) => {
                tracing::info!("Could not reconcile Identities with current device data. Reprovisioning. ({e})");
                let config = self.settings().config.clone();
                match self.provisioned_device(&config, false, None).await {
                    Err(IdentityError::Dps(e)) if e.is_network() => {
                        tracing::warn!(
                            "Reprovisioning failed to communicate with DPS. Using offline backup from last run. ({e})"
                        );
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                    Ok(device) => {
                        self.set_device(device)?;
                        self.reconcile().await?;
                    }
                }
            }
            Err(e) => return Err(e),
        }
        tracing::info!("Identity reconciliation complete.");
        Ok(())
    }

    /// §12.
    async fn reconcile(&self) -> Result<(), IdentityError> {
        let Some(device) = self.device() else {
            tracing::info!("reconcilation skipped since device is not provisioned");
            return Ok(());
        };
        self.reconcile_device(&device, false).await
    }

    /// §12 for `device` (the current one, or E9's new one before it replaces the current);
    /// `fresh`: no `prev` (E9: upstream cleared `device_info` first).
    async fn reconcile_device(&self, device: &Device, fresh: bool) -> Result<(), IdentityError> {
        let settings = self.settings();
        settings.config.check().map_err(|e| IdentityError::Internal(e.to_string()))?;
        let mut current: BTreeSet<String> = settings.config.module_names();
        let prev = match (fresh, self.state.device_info(), self.state.prev_modules()) {
            (false, Some(info), Some(prev)) if info.same_device(&device.info()) => prev,
            _ => BTreeSet::new(),
        };
        let hub = self.hub()?;
        let hd = device.hub_device();
        let modules = hub.list_modules(&hd).await.map_err(IdentityError::Hub)?;
        for m in &modules {
            self.cache_write(device, m);
        }
        for m in &modules {
            let id = &m.module_id;
            match (current.contains(id), prev.contains(id)) {
                (false, true) => {
                    self.delete_module_of(device, id).await?;
                    tracing::info!("Hub identity {id:?} removed");
                }
                (true, true) => {
                    current.remove(id);
                    tracing::info!("Hub identity {id:?} already exists");
                }
                (true, false) => {
                    self.delete_module_of(device, id).await?;
                    tracing::info!("Hub identity {id:?} will be recreated");
                }
                (false, false) => {}
            }
        }
        for id in &current {
            self.create_module_of(device, id).await?;
            tracing::info!("Hub identity {id:?} added");
        }
        self.state.write_device_info(&device.info()).map_err(state_error)?;
        let prev_state = toml::to_string(&settings.config).map_err(|e| IdentityError::internal("prev_state", &e))?;
        self.state.write(crate::state::PREV_STATE, prev_state.as_bytes()).map_err(state_error)?;
        Ok(())
    }

    /// The provisioning info (E2, §3.3).
    pub fn provisioning_info(&self) -> Value {
        match &self.settings().config.provisioning.source {
            Source::None => json!({"source": "none"}),
            Source::Manual { authentication, .. } => json!({"source": "manual", "auth": match authentication {
                ManualAuth::Sas { .. } => "sas",
                ManualAuth::X509 { .. } => "x509",
            }}),
            source @ Source::Dps { .. } => match DpsSettings::from_source(source) {
                Ok(Some(dps)) => {
                    // X.509 without a configured ID: the CN of the identity cert in use.
                    let registration_id = dps.registration_id().or_else(|| match self.device().as_deref() {
                        Some(Device { credentials: Credentials::X509 { chain, .. }, .. }) => leaf_cn(&chain[0]),
                        _ => None,
                    });
                    let payload = dps.payload().unwrap_or_else(|e| {
                        tracing::warn!("{e}");
                        None
                    });
                    json!({
                        "source": "dps",
                        "auth": dps.attestation.name(),
                        "endpoint": dps.endpoint_url,
                        "scope_id": dps.scope_id,
                        "registration_id": registration_id,
                        "payload": payload,
                    })
                }
                _ => json!({"source": "dps"}),
            },
        }
    }

    /// Whether a principal named `name` declares a local identity.
    pub fn local_principal(&self, name: &str) -> Option<crate::config::Principal> {
        self.settings().config.local_principal(name).cloned()
    }

    pub fn has_idtype(p: &crate::config::Principal, t: IdType) -> bool {
        p.has(t)
    }
}

fn state_error(e: StateError) -> IdentityError {
    IdentityError::internal("could not write the state", &e)
}

/// A fresh RSA-2048 key (PKCS#8 PEM) and a CSR for `cn` with §9's extensions.
fn local_csr(cn: &str, attributes: LocalIdAttributes) -> Result<(String, String), openssl::error::ErrorStack> {
    let key = PKey::from_rsa(Rsa::generate(2048)?)?;
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_text("CN", cn)?;
    let mut req = X509ReqBuilder::new()?;
    req.set_version(0)?;
    req.set_subject_name(&name.build())?;
    req.set_pubkey(&key)?;
    let mut exts = Stack::new()?;
    exts.push(BasicConstraints::new().critical().build()?)?;
    exts.push(KeyUsage::new().critical().digital_signature().non_repudiation().key_encipherment().build()?)?;
    let mut eku = ExtendedKeyUsage::new();
    eku.critical().client_auth();
    if attributes == LocalIdAttributes::Server {
        eku.server_auth();
    }
    exts.push(eku.build()?)?;
    req.add_extensions(&exts)?;
    req.sign(&key, MessageDigest::sha256())?;
    let key_pem = String::from_utf8_lossy(&key.private_key_to_pem_pkcs8()?).into_owned();
    let csr_pem = String::from_utf8_lossy(&req.build().to_pem()?).into_owned();
    Ok((key_pem, csr_pem))
}

/// The device identity CSR (§10.2: subject, no extensions, SHA-256).
fn identity_csr(key: &PKey<Private>, subject: &[(String, String)]) -> Result<String, openssl::error::ErrorStack> {
    let mut name = X509NameBuilder::new()?;
    for (k, v) in subject {
        name.append_entry_by_text(k, v)?;
    }
    let mut req = X509ReqBuilder::new()?;
    req.set_version(0)?;
    req.set_subject_name(&name.build())?;
    req.set_pubkey(key)?;
    req.sign(key, MessageDigest::sha256())?;
    Ok(String::from_utf8_lossy(&req.build().to_pem()?).into_owned())
}

/// The subject CN of `cert`.
fn leaf_cn(cert: &X509) -> Option<String> {
    cert.subject_name()
        .entries_by_nid(openssl::nid::Nid::COMMONNAME)
        .next()
        .and_then(|e| e.data().to_string().ok())
}

/// An ASN.1 time as RFC 3339 UTC with `+00:00` and whole seconds.
pub fn rfc3339(t: &openssl::asn1::Asn1TimeRef) -> Result<String, openssl::error::ErrorStack> {
    let epoch = Asn1Time::from_unix(0)?;
    let d = epoch.diff(t)?;
    let secs = i64::from(d.days) * 86_400 + i64::from(d.secs);
    Ok(format_unix(secs))
}

/// Unix seconds → `YYYY-MM-DDTHH:MM:SS+00:00` (proleptic Gregorian, civil-from-days).
pub fn format_unix(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}+00:00", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(format_unix(0), "1970-01-01T00:00:00+00:00");
        assert_eq!(format_unix(1_714_564_800), "2024-05-01T12:00:00+00:00");
        assert_eq!(format_unix(951_782_400), "2000-02-29T00:00:00+00:00");
        let t = Asn1Time::from_unix(1_700_000_030).unwrap();
        assert_eq!(rfc3339(&t).unwrap(), "2023-11-14T22:13:50+00:00");
    }

    #[test]
    fn local_csr_has_the_spec_extensions() {
        let (key, csr) = local_csr("m.host.example.com", LocalIdAttributes::Server).unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let req = openssl::x509::X509Req::from_pem(csr.as_bytes()).unwrap();
        assert!(req.verify(&req.public_key().unwrap()).unwrap());
        let text = String::from_utf8(
            std::process::Command::new("openssl")
                .args(["req", "-noout", "-text"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    use std::io::Write;
                    c.stdin.take().unwrap().write_all(csr.as_bytes())?;
                    c.wait_with_output()
                })
                .unwrap()
                .stdout,
        )
        .unwrap();
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(text.contains("Version: 1 (0x0)") && text.contains("Subject: CN = m.host.example.com"), "{text}");
        assert!(text.contains("X509v3 Basic Constraints: critical CA:FALSE"), "{text}");
        assert!(
            text.contains("X509v3 Key Usage: critical Digital Signature, Non Repudiation, Key Encipherment"),
            "{text}"
        );
        assert!(
            text.contains(
                "X509v3 Extended Key Usage: critical TLS Web Client Authentication, TLS Web Server Authentication"
            ),
            "{text}"
        );
        assert!(text.contains("Signature Algorithm: sha256WithRSAEncryption"), "{text}");
    }
}
