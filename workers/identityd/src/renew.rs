//! Identity certificate auto-renewal for DPS X.509 attestation (spec identityd.md §10.3,
//! `[provisioning.attestation.identity_auto_renew]`; scheduling as certd.md §6.4).
//!
//! One task on the background runtime ([`run`]) sleeps until the device identity cert's renewal
//! deadline, then renews through certd and keyd and re-registers with DPS:
//!
//! 1. the key: `<identity_pk>-temp` created afresh when `rotate_key`, else `identity_pk`;
//! 2. a CSR with the old leaf's subject and no extensions, issued by certd as
//!    `<identity_cert>-temp` (certd's `[cert_issuance.<identity_cert>-temp]` decides: EST, local
//!    CA, ...), which is deleted again at once (a failure is only logged);
//! 3. DPS registration with the new cert and key ([`Core::reprovision_with`], atomic like E9: a
//!    failure keeps the old device, its backup and its module cache);
//! 4. the new chain stored as `<identity_cert>` (`PUT`), the key moved onto `identity_pk` when
//!    rotated, and the in-memory device's credentials reloaded.
//!
//! A failure of steps 1–3 is retried after the `retry` period with the old identity untouched.
//! No lock is held across any of this I/O but [`Core::reprovision_with`]'s own (which serialises
//! state changes only). Upstream's quirk (step 4 failing after step 3) remains: DPS knows the new
//! cert while certd/keyd hold the old one; it is logged and step 4 is retried with the retry
//! period (no marker survives a restart).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::x509::{X509ReqBuilder, X509};
use serde::Deserialize;

use crate::identity::{Core, Credentials, IdentityError};
use crate::keys::error_chain;

/// `threshold` / `retry`: a percentage of the leaf's lifetime (1–99) or a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Period {
    Percent(u64),
    Secs(u64),
}

impl TryFrom<String> for Period {
    type Error = String;

    fn try_from(s: String) -> Result<Period, String> {
        let bad = || {
            format!("identity_auto_renew threshold/retry {s:?}: expected \"NN%\" (1-99), \"Nmin\" or \"Nday\" (N > 0)")
        };
        let num = |t: &str| t.trim().parse::<u64>().ok().filter(|n| *n > 0);
        if let Some(p) = s.strip_suffix('%') {
            return num(p)
                .filter(|p| *p < 100)
                .map(Period::Percent)
                .ok_or_else(bad);
        }
        if let Some(m) = s.strip_suffix("min") {
            return num(m)
                .and_then(|m| m.checked_mul(60))
                .map(Period::Secs)
                .ok_or_else(bad);
        }
        if let Some(d) = s.strip_suffix("day") {
            return num(d)
                .and_then(|d| d.checked_mul(86_400))
                .map(Period::Secs)
                .ok_or_else(bad);
        }
        Err(bad())
    }
}

/// `[provisioning.attestation.identity_auto_renew]` (§6.2): all three keys required.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoRenew {
    pub rotate_key: bool,
    pub threshold: Period,
    pub retry: Period,
}

impl AutoRenew {
    /// The renewal deadline of a leaf valid from `nb` to `na` (Unix seconds), certd.md §6.4.
    pub fn deadline(&self, nb: i64, na: i64) -> i64 {
        let life = (na - nb).max(0);
        match self.threshold {
            Period::Percent(p) => na - (life - life * p as i64 / 100),
            Period::Secs(t) => na - t as i64,
        }
    }

    /// The retry period for that leaf (at least 1 s).
    pub fn retry_secs(&self, nb: i64, na: i64) -> u64 {
        let life = (na - nb).max(0) as u64;
        match self.retry {
            Period::Percent(r) => life * r / 100,
            Period::Secs(t) => t,
        }
        .max(1)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("the device is not provisioned with an X.509 identity")]
    NoX509Device,
    #[error("{0}")]
    Keyd(String),
    #[error("{0}")]
    Certd(String),
    #[error("could not build the renewal CSR")]
    Csr(#[from] openssl::error::ErrorStack),
    #[error("the renewed identity cert holds no certificate")]
    EmptyChain,
    #[error("could not re-register with DPS using the renewed cert: {0}")]
    Reprovision(String),
    #[error("DPS accepted the renewed cert but it could not be committed: {0}")]
    Commit(String),
}

fn unix(t: &openssl::asn1::Asn1TimeRef) -> i64 {
    let epoch = openssl::asn1::Asn1Time::from_unix(0).expect("the epoch is a valid time");
    epoch
        .diff(t)
        .map(|d| i64::from(d.days) * 86_400 + i64::from(d.secs))
        .unwrap_or(0)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The renewal settings of the current config: (identity_cert, identity_pk, policy).
fn settings(core: &Core) -> Option<(String, String, AutoRenew)> {
    let settings = core.settings();
    let dps = crate::dps::DpsSettings::from_source(&settings.config.provisioning.source)
        .ok()
        .flatten()?;
    match dps.attestation {
        crate::dps::Attestation::X509 {
            identity_cert,
            identity_pk,
            identity_auto_renew: Some(policy),
            ..
        } => Some((identity_cert, identity_pk, policy)),
        _ => None,
    }
}

/// Whether the current config asks for auto-renewal.
pub fn configured(core: &Core) -> bool {
    settings(core).is_some()
}

/// The renewal task: runs while the config asks for auto-renewal (re-checked on every round, so
/// a reload that removes it ends the task at its next deadline).
pub async fn run(core: Arc<Core>) {
    tracing::info!("Identity cert auto-renewal started.");
    let mut pending_commit: Option<(String, Credentials)> = None;
    loop {
        let Some((cert_id, pk_id, policy)) = settings(&core) else {
            tracing::info!("Identity cert auto-renewal is no longer configured; stopping.");
            return;
        };
        let Some(leaf) = core.device_x509_leaf() else {
            tracing::warn!(
                "Identity cert auto-renewal: the device has no X.509 identity; stopping."
            );
            return;
        };
        let (nb, na) = (unix(leaf.not_before()), unix(leaf.not_after()));
        let retry = Duration::from_secs(policy.retry_secs(nb, na));
        if let Some((pem, creds)) = pending_commit.take() {
            match commit(&core, &cert_id, &pk_id, policy.rotate_key, &pem).await {
                Ok(()) => tracing::info!("Committed the renewed identity cert {cert_id:?}."),
                Err(e) => {
                    tracing::warn!(
                        "Tried to renew {cert_id}, but {}. Retrying in {} s.",
                        error_chain(&e),
                        retry.as_secs()
                    );
                    pending_commit = Some((pem, creds));
                    tokio::time::sleep(retry).await;
                }
            }
            continue;
        }
        let wait = policy.deadline(nb, na) - now();
        if wait > 0 {
            tracing::info!("Identity cert {cert_id:?} will be renewed in {wait} s.");
            tokio::time::sleep(Duration::from_secs(wait as u64)).await;
            continue; // re-read the config and the device: either may have changed meanwhile
        }
        match renew(&core, &cert_id, &pk_id, policy.rotate_key, &leaf).await {
            Ok(()) => {
                tracing::info!("Renewed the identity cert {cert_id:?} and re-registered with DPS.")
            }
            Err((e, pending)) => {
                tracing::warn!(
                    "Tried to renew {cert_id}, but {}. Retrying in {} s.",
                    error_chain(&e),
                    retry.as_secs()
                );
                pending_commit = pending;
                tokio::time::sleep(retry).await;
            }
        }
    }
}

type Pending = Option<(String, Credentials)>;

/// Steps 1–4. An error after DPS accepted the new cert returns it as pending (step 4 only is
/// retried).
async fn renew(
    core: &Core,
    cert_id: &str,
    pk_id: &str,
    rotate: bool,
    old_leaf: &X509,
) -> Result<(), (RenewError, Pending)> {
    let (keyd, certd, engine) = core.clients();
    // 1. the key
    let key_id = if rotate {
        format!("{pk_id}-temp")
    } else {
        pk_id.to_owned()
    };
    if rotate {
        if let Ok(old) = keyd.keypair_handle(&key_id).await {
            keyd.delete_keypair(&old).await.map_err(|e| {
                (
                    RenewError::Keyd(format!(
                        "could not delete the old {key_id:?}: {}",
                        error_chain(&e)
                    )),
                    None,
                )
            })?;
        }
    }
    let handle = if rotate {
        keyd.create_keypair(&key_id).await
    } else {
        keyd.keypair_handle(&key_id).await
    }
    .map_err(|e| {
        (
            RenewError::Keyd(format!(
                "could not get key pair {key_id:?}: {}",
                error_chain(&e)
            )),
            None,
        )
    })?;
    let key = load_key(&engine, &handle).await.map_err(|e| (e, None))?;
    // 2. the CSR, the old leaf's subject, no extensions; issued as <cert>-temp
    let csr = csr(&key, old_leaf).map_err(|e| (e, None))?;
    let temp_cert = format!("{cert_id}-temp");
    let pem = certd.issue(&temp_cert, &csr).await.map_err(|e| {
        (
            RenewError::Certd(format!(
                "certd could not issue {temp_cert:?}: {}",
                error_chain(&e)
            )),
            None,
        )
    })?;
    if let Err(e) = certd.delete(&temp_cert).await {
        tracing::warn!(
            "Could not delete {temp_cert:?} from certd: {}",
            error_chain(&e)
        );
    }
    let chain = X509::stack_from_pem(pem.as_bytes()).map_err(|e| (RenewError::Csr(e), None))?;
    if chain.is_empty() {
        return Err((RenewError::EmptyChain, None));
    }
    let creds = Credentials::X509 {
        cert_id: cert_id.to_owned(),
        keypair_handle: handle,
        chain,
        key,
    };
    // 3. DPS with the new credentials
    core.reprovision_with(Some(creds.clone()))
        .await
        .map_err(|e: IdentityError| (RenewError::Reprovision(e.message()), None))?;
    // 4. commit
    commit(core, cert_id, pk_id, rotate, &pem)
        .await
        .map_err(|e| {
            tracing::warn!(
                "DPS knows the renewed identity cert but certd/keyd still hold the old one."
            );
            (e, Some((pem, creds)))
        })
}

/// Step 4: the new chain as `<cert>`, the key moved onto `<pk>` when rotated, the device's
/// credentials reloaded from them.
async fn commit(
    core: &Core,
    cert_id: &str,
    pk_id: &str,
    rotate: bool,
    pem: &str,
) -> Result<(), RenewError> {
    let (keyd, certd, engine) = core.clients();
    certd.put(cert_id, pem).await.map_err(|e| {
        RenewError::Commit(format!(
            "certd could not store {cert_id:?}: {}",
            error_chain(&e)
        ))
    })?;
    if rotate {
        let temp = format!("{pk_id}-temp");
        // Already moved by an earlier attempt when the temp key is gone and the key is there.
        if keyd.keypair_handle(&temp).await.is_ok() {
            keyd.move_keypair(&temp, pk_id).await.map_err(|e| {
                RenewError::Commit(format!(
                    "keyd could not move {temp:?} to {pk_id:?}: {}",
                    error_chain(&e)
                ))
            })?;
        }
    }
    let handle = keyd.keypair_handle(pk_id).await.map_err(|e| {
        RenewError::Commit(format!(
            "could not get key pair {pk_id:?}: {}",
            error_chain(&e)
        ))
    })?;
    let key = load_key(&engine, &handle).await?;
    let chain = X509::stack_from_pem(pem.as_bytes())?;
    core.replace_credentials(Credentials::X509 {
        cert_id: cert_id.to_owned(),
        keypair_handle: handle,
        chain,
        key,
    });
    Ok(())
}

async fn load_key(
    engine: &Arc<aziot_key_openssl_engine::KeydClient>,
    handle: &str,
) -> Result<PKey<Private>, RenewError> {
    let (engine, h) = (Arc::clone(engine), handle.to_owned());
    tokio::task::spawn_blocking(move || aziot_key_openssl_engine::load_private_key(&engine, &h))
        .await
        .map_err(|e| RenewError::Keyd(format!("key task failed: {e}")))?
        .map_err(|e| {
            RenewError::Keyd(format!(
                "could not load the identity key: {}",
                error_chain(&e)
            ))
        })
}

/// §10.3 step 2: the old leaf's subject, no extensions, SHA-256.
fn csr(key: &PKey<Private>, old_leaf: &X509) -> Result<String, RenewError> {
    let mut req = X509ReqBuilder::new()?;
    req.set_version(0)?;
    req.set_subject_name(old_leaf.subject_name())?;
    req.set_pubkey(key)?;
    req.sign(key, MessageDigest::sha256())?;
    Ok(String::from_utf8_lossy(&req.build().to_pem()?).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_and_deadlines_follow_certd_6_4() {
        assert_eq!(Period::try_from("80%".to_owned()), Ok(Period::Percent(80)));
        assert_eq!(Period::try_from("5min".to_owned()), Ok(Period::Secs(300)));
        assert_eq!(
            Period::try_from("2day".to_owned()),
            Ok(Period::Secs(172_800))
        );
        for bad in ["0%", "100%", "80", "0min", "-1day", "x%", ""] {
            assert!(Period::try_from(bad.to_owned()).is_err(), "{bad}");
        }
        let p = AutoRenew {
            rotate_key: true,
            threshold: Period::Percent(80),
            retry: Period::Percent(4),
        };
        assert_eq!(p.deadline(1000, 2000), 1800);
        assert_eq!(p.retry_secs(1000, 2000), 40);
        assert_eq!(p.retry_secs(1000, 1010), 1, "at least 1 s");
        let t = AutoRenew {
            rotate_key: false,
            threshold: Period::Secs(300),
            retry: Period::Secs(60),
        };
        assert_eq!(t.deadline(0, 10_000), 9_700);
        assert_eq!(t.retry_secs(0, 10_000), 60);
    }
}
