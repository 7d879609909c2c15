//! The mapping from a super-config to the four service configs (spec aziotctl.md §2.6).

pub mod output;

use std::collections::{BTreeMap, BTreeSet};

use zeroize::Zeroizing;

use crate::super_config::{
    AutoRenew, CertIssuanceOptions, DpsAttestation, EstAuth, EstX509, IssuanceMethod, LocalCa,
    ManualAuth, PreloadedCert, Provisioning, Subject, SuperConfig, SymmetricKey, X509Identity,
    DEFAULT_AUTH_KEY_INDEX, DEFAULT_CLOUD_RETRIES, DEFAULT_CLOUD_TIMEOUT_SEC, DEFAULT_MAX_REQUESTS,
    DEFAULT_TCTI, KEYD_HOMEDIR,
};
use crate::warnings::Warnings;
use output::{
    AttestationOut, AuthOut, AutoRenewOut, CertIssuanceOut, CertOptionsOut, CertdConfig,
    CertdPrincipal, Dn, EstOut, HierarchyAuthOut, IdentitydConfig, KeydConfig, KeydPrincipal,
    LocalCaOut, LocalIdOut, ManualAuthOut, PayloadOut, PreloadedCertOut, ProvisioningOut,
    RegistrationIdOut, TpmdConfig,
};

/// Where the inline symmetric key is written, and how keyd finds it.
pub const DEVICE_ID_KEY_PATH: &str = "/var/secrets/aziot/keyd/device-id";
pub const DEVICE_ID_KEY_URI: &str = "file:///var/secrets/aziot/keyd/device-id";

const DEVICE_ID: &str = "device-id";
const DEVICE_ID_TEMP: &str = "device-id-temp";
const IDENTITYD_MASTER_KEY: &str = "aziot_identityd_master_id";
const LOCAL_CA: &str = "local-ca";
const EST_ID: &str = "est-id";
const EST_ID_TEMP: &str = "est-id-temp";
const EST_BOOTSTRAP_ID: &str = "est-bootstrap-id";

const CERTD_HOMEDIR: &str = "/var/lib/aziot/certd";
const IDENTITYD_HOMEDIR: &str = "/var/lib/aziot/identityd";

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("DPS provisioning is not supported in nested mode")]
    NestedDps,
}

/// The numeric uids that appear in principals.
pub struct PrincipalUids {
    pub aziotcs: u32,
    pub aziotid: u32,
}

/// Everything `config apply` derives from a super-config.
pub struct Rendered {
    pub keyd: KeydConfig,
    pub certd: CertdConfig,
    pub identityd: IdentitydConfig,
    pub tpmd: TpmdConfig,
    /// The raw bytes for [`DEVICE_ID_KEY_PATH`], when the key is inline.
    pub device_id_key: Option<Zeroizing<Vec<u8>>>,
}

fn max_requests(value: usize) -> Option<usize> {
    (value != DEFAULT_MAX_REQUESTS).then_some(value)
}

/// Maps a super-config to the service configs. `hostname` is the configured or detected one.
pub fn render(
    config: &SuperConfig,
    hostname: String,
    uids: &PrincipalUids,
    w: &mut Warnings,
) -> Result<Rendered, RenderError> {
    let mut b = Builder {
        preloaded_keys: config.preloaded_keys.clone(),
        preloaded_certs: config
            .preloaded_certs
            .iter()
            .map(|(id, cert)| {
                let out = match cert {
                    PreloadedCert::Uri(uri) => PreloadedCertOut::Uri(uri.clone()),
                    PreloadedCert::Bundle(ids) => PreloadedCertOut::Bundle(ids.clone()),
                };
                (id.clone(), out)
            })
            .collect(),
        user_keys: config.preloaded_keys.keys().cloned().collect(),
        user_certs: config.preloaded_certs.keys().cloned().collect(),
        aziotid_keys: vec![IDENTITYD_MASTER_KEY.to_owned()],
        aziotcs_keys: Vec::new(),
        aziotid_certs: Vec::new(),
        certs: BTreeMap::new(),
        device_id_key: None,
        w,
    };

    let provisioning = b.provisioning(config)?;
    let est = config
        .cert_issuance
        .est
        .as_ref()
        .map(|est| b.global_est(est));
    let local_ca = config
        .cert_issuance
        .local_ca
        .as_ref()
        .map(|ca| b.local_ca(ca));
    b.warn_cross_references(config);

    let mut aziot_keys = config.aziot_keys.clone();
    aziot_keys.insert("homedir_path".to_owned(), KEYD_HOMEDIR.to_owned());

    let mut keyd_principals = vec![KeydPrincipal {
        uid: uids.aziotid,
        keys: b.aziotid_keys,
    }];
    if !b.aziotcs_keys.is_empty() {
        keyd_principals.push(KeydPrincipal {
            uid: uids.aziotcs,
            keys: b.aziotcs_keys,
        });
    }
    let certd_principals = if b.aziotid_certs.is_empty() {
        Vec::new()
    } else {
        vec![CertdPrincipal {
            uid: uids.aziotid,
            certs: b.aziotid_certs,
        }]
    };

    let keyd = KeydConfig {
        max_requests: max_requests(config.max_requests.keyd),
        aziot_keys,
        preloaded_keys: b.preloaded_keys,
        principal: keyd_principals,
    };
    let certd = CertdConfig {
        homedir_path: CERTD_HOMEDIR.to_owned(),
        max_requests: max_requests(config.max_requests.certd),
        cert_issuance: CertIssuanceOut {
            est,
            local_ca,
            certs: b.certs,
        },
        preloaded_certs: b.preloaded_certs,
        principal: certd_principals,
    };
    let identityd = IdentitydConfig {
        hostname,
        homedir: IDENTITYD_HOMEDIR.to_owned(),
        prefer_module_identity_cache: config.prefer_module_identity_cache,
        max_requests: max_requests(config.max_requests.identityd),
        cloud_timeout_sec: (config.cloud_timeout_sec != DEFAULT_CLOUD_TIMEOUT_SEC)
            .then_some(config.cloud_timeout_sec),
        cloud_retries: (config.cloud_retries != DEFAULT_CLOUD_RETRIES)
            .then_some(config.cloud_retries),
        provisioning,
        localid: config.localid.as_ref().map(|domain| LocalIdOut {
            domain: domain.clone(),
        }),
    };
    let tpm = &config.tpm;
    let non_empty = |s: &String| (!s.is_empty()).then(|| s.clone());
    let hierarchy = HierarchyAuthOut {
        endorsement: non_empty(&tpm.endorsement),
        owner: non_empty(&tpm.owner),
    };
    let tpmd = TpmdConfig {
        max_requests: max_requests(config.max_requests.tpmd),
        tcti: (tpm.tcti != DEFAULT_TCTI).then(|| tpm.tcti.clone()),
        auth_key_index: (tpm.auth_key_index != DEFAULT_AUTH_KEY_INDEX)
            .then_some(tpm.auth_key_index),
        hierarchy_authorization: (hierarchy.endorsement.is_some() || hierarchy.owner.is_some())
            .then_some(hierarchy),
    };

    Ok(Rendered {
        keyd,
        certd,
        identityd,
        tpmd,
        device_id_key: b.device_id_key,
    })
}

struct Builder<'w> {
    preloaded_keys: BTreeMap<String, String>,
    preloaded_certs: BTreeMap<String, PreloadedCertOut>,
    user_keys: BTreeSet<String>,
    user_certs: BTreeSet<String>,
    aziotid_keys: Vec<String>,
    aziotcs_keys: Vec<String>,
    aziotid_certs: Vec<String>,
    certs: BTreeMap<String, CertOptionsOut>,
    device_id_key: Option<Zeroizing<Vec<u8>>>,
    w: &'w mut Warnings,
}

impl Builder<'_> {
    fn preload_key(&mut self, id: &str, location: &str) {
        if self.user_keys.contains(id) {
            self.w.push(format!(
                "`preloaded_keys.{id}` is replaced: aziotctl generates the key ID `{id}` from \
                 the rest of the configuration"
            ));
        }
        self.preloaded_keys
            .insert(id.to_owned(), location.to_owned());
    }

    fn preload_cert(&mut self, id: &str, url: &str) {
        if self.user_certs.contains(id) {
            self.w.push(format!(
                "`preloaded_certs.{id}` is replaced: aziotctl generates the cert ID `{id}` from \
                 the rest of the configuration"
            ));
        }
        self.preloaded_certs
            .insert(id.to_owned(), PreloadedCertOut::Uri(url.to_owned()));
    }

    fn provisioning(&mut self, config: &SuperConfig) -> Result<ProvisioningOut, RenderError> {
        let local_gateway_hostname = config.parent_hostname.clone();
        let out = match &config.provisioning {
            Provisioning::Manual {
                iothub_hostname,
                device_id,
                authentication,
            } => {
                let authentication = match authentication {
                    ManualAuth::Sas(key) => {
                        self.device_symmetric_key(key);
                        ManualAuthOut::Sas {
                            method: "sas",
                            device_id_pk: DEVICE_ID.to_owned(),
                        }
                    }
                    ManualAuth::X509(identity) => {
                        let csr_subject = match identity {
                            X509Identity::Preloaded { cert, pk } => {
                                self.device_preloaded_identity(cert, pk);
                                None
                            }
                            X509Identity::Issued(options) => {
                                let out = self.device_issued_identity(options);
                                if options.auto_renew.is_some() {
                                    self.w.push(
                                        "`auto_renew` of the device identity certificate is \
                                         ignored: only DPS X.509 provisioning renews it",
                                    );
                                }
                                self.certs.insert(DEVICE_ID.to_owned(), out);
                                self.aziotid_certs.push(DEVICE_ID.to_owned());
                                match &options.subject {
                                    Some(Subject::Dn(dn)) => {
                                        Some(identity_dn(device_id, dn, self.w))
                                    }
                                    _ => None,
                                }
                            }
                        };
                        ManualAuthOut::X509 {
                            method: "x509",
                            identity_cert: DEVICE_ID.to_owned(),
                            identity_pk: DEVICE_ID.to_owned(),
                            csr_subject,
                        }
                    }
                };
                ProvisioningOut {
                    local_gateway_hostname,
                    source: "manual",
                    iothub_hostname: Some(iothub_hostname.clone()),
                    device_id: Some(device_id.clone()),
                    authentication: Some(authentication),
                    ..ProvisioningOut::default()
                }
            }
            Provisioning::Dps {
                global_endpoint,
                id_scope,
                payload_uri,
                attestation,
            } => {
                if local_gateway_hostname.is_some() {
                    return Err(RenderError::NestedDps);
                }
                ProvisioningOut {
                    source: "dps",
                    global_endpoint: Some(global_endpoint.clone()),
                    scope_id: Some(id_scope.clone()),
                    payload: payload_uri
                        .as_ref()
                        .map(|uri| PayloadOut { uri: uri.clone() }),
                    attestation: Some(self.dps_attestation(attestation)),
                    ..ProvisioningOut::default()
                }
            }
            Provisioning::None => ProvisioningOut {
                local_gateway_hostname,
                source: "none",
                ..ProvisioningOut::default()
            },
        };
        Ok(out)
    }

    fn dps_attestation(&mut self, attestation: &DpsAttestation) -> AttestationOut {
        match attestation {
            DpsAttestation::SymmetricKey {
                registration_id,
                key,
            } => {
                self.device_symmetric_key(key);
                AttestationOut::SymmetricKey {
                    method: "symmetric_key",
                    registration_id: registration_id.clone(),
                    symmetric_key: DEVICE_ID.to_owned(),
                }
            }
            DpsAttestation::Tpm { registration_id } => AttestationOut::Tpm {
                method: "tpm",
                registration_id: registration_id.clone(),
            },
            DpsAttestation::X509 {
                registration_id,
                identity,
            } => {
                let (registration_id, identity_auto_renew) = match identity {
                    X509Identity::Preloaded { cert, pk } => {
                        self.device_preloaded_identity(cert, pk);
                        (registration_id.clone().map(RegistrationIdOut::Plain), None)
                    }
                    X509Identity::Issued(options) => {
                        let out = self.device_issued_identity(options);
                        if let Some(renew) = &options.auto_renew {
                            self.certs.insert(DEVICE_ID_TEMP.to_owned(), out.clone());
                            self.aziotid_certs.push(DEVICE_ID_TEMP.to_owned());
                            if renew.rotate_key {
                                self.aziotid_keys.push(DEVICE_ID_TEMP.to_owned());
                            }
                        }
                        self.certs.insert(DEVICE_ID.to_owned(), out);
                        self.aziotid_certs.push(DEVICE_ID.to_owned());
                        // Upstream drops `registration_id` when there is no subject; here it is
                        // written as a plain string, as with `common_name`.
                        let registration_id =
                            registration_id.as_ref().map(|id| match &options.subject {
                                Some(Subject::Dn(dn)) => {
                                    RegistrationIdOut::Dn(identity_dn(id, dn, self.w))
                                }
                                _ => RegistrationIdOut::Plain(id.clone()),
                            });
                        (registration_id, options.auto_renew.map(AutoRenewOut::from))
                    }
                };
                AttestationOut::X509 {
                    method: "x509",
                    identity_cert: DEVICE_ID.to_owned(),
                    identity_pk: DEVICE_ID.to_owned(),
                    registration_id,
                    identity_auto_renew,
                }
            }
        }
    }

    /// §2.6.3: the device's symmetric key becomes KS key `device-id`.
    fn device_symmetric_key(&mut self, key: &SymmetricKey) {
        match key {
            SymmetricKey::Inline(bytes) => {
                self.preload_key(DEVICE_ID, DEVICE_ID_KEY_URI);
                self.device_id_key = Some(bytes.clone());
            }
            SymmetricKey::Preloaded(location) => self.preload_key(DEVICE_ID, location),
        }
        self.aziotid_keys.push(DEVICE_ID.to_owned());
    }

    /// §2.6.4: a preloaded device certificate and key.
    fn device_preloaded_identity(&mut self, cert: &str, pk: &str) {
        self.preload_key(DEVICE_ID, pk);
        self.preload_cert(DEVICE_ID, cert);
        self.aziotid_keys.push(DEVICE_ID.to_owned());
    }

    /// §2.6.5 / §2.6.6 steps 1-2: per-cert EST auth, then the KS grant; returns certd's options.
    fn device_issued_identity(&mut self, options: &CertIssuanceOptions) -> CertOptionsOut {
        let auth = match &options.method {
            IssuanceMethod::Est { auth, .. } => self.per_cert_est_auth(DEVICE_ID, auth),
            _ => AuthOut::default(),
        };
        self.aziotid_keys.push(DEVICE_ID.to_owned());
        cert_options(options, auth)
    }

    /// §2.6.7: inline EST auth of cert `c`.
    fn per_cert_est_auth(&mut self, c: &str, auth: &EstAuth) -> AuthOut {
        let mut out = basic_auth(auth);
        match &auth.x509 {
            Some(EstX509::Bootstrap { cert, pk }) => {
                let bootstrap = format!("{EST_BOOTSTRAP_ID}-{c}");
                let id = format!("{EST_ID}-{c}");
                self.preload_cert(&bootstrap, cert);
                self.preload_key(&bootstrap, pk);
                self.aziotcs_keys
                    .extend([bootstrap.clone(), format!("{id}-temp"), id.clone()]);
                out.identity_cert = Some(id.clone());
                out.identity_pk = Some(id);
                out.bootstrap_identity_cert = Some(bootstrap.clone());
                out.bootstrap_identity_pk = Some(bootstrap);
            }
            Some(EstX509::Identity { cert, pk }) => {
                let id = format!("{EST_ID}-{c}");
                self.preload_cert(&id, cert);
                self.preload_key(&id, pk);
                self.aziotcs_keys.push(id.clone());
                out.identity_cert = Some(id.clone());
                out.identity_pk = Some(id);
            }
            None => {}
        }
        out
    }

    /// §2.6.8 step 1: `[cert_issuance.est]`.
    fn global_est(&mut self, est: &crate::super_config::Est) -> EstOut {
        let mut auth = basic_auth(&est.auth);
        match &est.auth.x509 {
            Some(EstX509::Bootstrap { cert, pk }) => {
                self.preload_cert(EST_BOOTSTRAP_ID, cert);
                self.preload_key(EST_BOOTSTRAP_ID, pk);
                self.aziotcs_keys
                    .extend([EST_BOOTSTRAP_ID.to_owned(), EST_ID.to_owned()]);
                if est.identity_auto_renew.rotate_key {
                    self.aziotcs_keys.push(EST_ID_TEMP.to_owned());
                }
                auth.identity_cert = Some(EST_ID.to_owned());
                auth.identity_pk = Some(EST_ID.to_owned());
                auth.bootstrap_identity_cert = Some(EST_BOOTSTRAP_ID.to_owned());
                auth.bootstrap_identity_pk = Some(EST_BOOTSTRAP_ID.to_owned());
            }
            Some(EstX509::Identity { cert, pk }) => {
                self.preload_cert(EST_ID, cert);
                self.preload_key(EST_ID, pk);
                self.aziotcs_keys.push(EST_ID.to_owned());
                auth.identity_cert = Some(EST_ID.to_owned());
                auth.identity_pk = Some(EST_ID.to_owned());
            }
            None => {}
        }
        let mut trusted_certs = Vec::with_capacity(est.trusted_certs.len());
        for (i, url) in est.trusted_certs.iter().enumerate() {
            let id = format!("est-server-ca-{}", i + 1);
            self.preload_cert(&id, url);
            trusted_certs.push(id);
        }
        EstOut {
            trusted_certs,
            auth,
            identity_auto_renew: (est.identity_auto_renew != AutoRenew::DEFAULT)
                .then(|| est.identity_auto_renew.into()),
            urls: est.urls.clone(),
        }
    }

    /// §2.6.8 step 2: `[cert_issuance.local_ca]`.
    fn local_ca(&mut self, local_ca: &LocalCa) -> LocalCaOut {
        match local_ca {
            LocalCa::Issued(options) => {
                if let IssuanceMethod::Est { auth, .. } = &options.method {
                    if auth.basic.is_some() || auth.x509.is_some() {
                        self.w.push(
                            "the EST authentication of `cert_issuance.local_ca.cert` is ignored: \
                             certd issues the local CA with the global `[cert_issuance.est]` \
                             settings",
                        );
                    }
                }
                if options.auto_renew.is_some() {
                    self.w.push(
                        "`cert_issuance.local_ca.cert.auto_renew` is ignored: the local CA \
                         certificate is not auto-renewed",
                    );
                }
                self.aziotcs_keys.push(LOCAL_CA.to_owned());
                self.certs.insert(
                    LOCAL_CA.to_owned(),
                    cert_options(options, AuthOut::default()),
                );
            }
            LocalCa::Preloaded { cert, pk } => {
                self.preload_cert(LOCAL_CA, cert);
                self.preload_key(LOCAL_CA, pk);
                self.aziotcs_keys.push(LOCAL_CA.to_owned());
            }
        }
        LocalCaOut {
            cert: LOCAL_CA.to_owned(),
            pk: LOCAL_CA.to_owned(),
        }
    }

    /// Issued certs that certd will not be able to issue (spec §2.7 recommends warnings).
    fn warn_cross_references(&mut self, config: &SuperConfig) {
        let est_urls = config.cert_issuance.est.as_ref().map(|e| &e.urls);
        for (id, options) in &self.certs {
            match options.method {
                "est"
                    if options.url.is_none()
                        && !est_urls
                            .is_some_and(|u| u.contains_key("default") || u.contains_key(id)) =>
                {
                    self.w.push(format!(
                        "cert `{id}` is issued with method = \"est\" but no EST URL is \
                         configured for it (set its `url`, or `default` in \
                         `[cert_issuance.est.urls]`); certd will fail to issue it"
                    ));
                }
                "local_ca" if config.cert_issuance.local_ca.is_none() => {
                    self.w.push(format!(
                        "cert `{id}` is issued with method = \"local_ca\" but \
                         `[cert_issuance.local_ca]` is not configured; certd will fail to issue it"
                    ));
                }
                _ => {}
            }
        }
    }
}

fn basic_auth(auth: &EstAuth) -> AuthOut {
    AuthOut {
        username: auth.basic.as_ref().map(|b| b.username.clone()),
        password: auth.basic.as_ref().map(|b| b.password.clone()),
        ..AuthOut::default()
    }
}

/// certd's options for one issued cert; `auto_renew` is not part of them.
fn cert_options(options: &CertIssuanceOptions, auth: AuthOut) -> CertOptionsOut {
    let (common_name, subject) = match &options.subject {
        Some(Subject::CommonName(cn)) => (Some(cn.clone()), None),
        Some(Subject::Dn(dn)) => (None, Some(dn.clone())),
        None => (None, None),
    };
    CertOptionsOut {
        method: options.method.name(),
        url: match &options.method {
            IssuanceMethod::Est { url, .. } => url.clone(),
            _ => None,
        },
        auth,
        expiry_days: options.expiry_days,
        common_name,
        subject,
    }
}

/// identityd's DN: `CN` = `cn`, the other attributes upper-cased, any `cn` dropped.
fn identity_dn(cn: &str, subject: &BTreeMap<String, String>, w: &mut Warnings) -> Dn {
    let mut others = BTreeMap::new();
    for (key, value) in subject {
        let upper = key.to_ascii_uppercase();
        if upper == "CN" {
            if value != cn {
                w.push(format!(
                "the `{key}` of the identity certificate's `subject` is replaced by the device \
                 or registration ID"
                ));
            }
            continue;
        }
        if others.insert(upper.clone(), value.clone()).is_some() {
            w.push(format!(
                "the identity certificate's `subject` names `{upper}` more than once (ignoring \
                 case); identityd gets only one of them"
            ));
        }
    }
    Dn {
        cn: cn.to_owned(),
        others,
    }
}
