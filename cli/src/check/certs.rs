//! Checks 9–12 (certificate expiry, preloaded certificates) and 17–20 (certs and key pairs
//! read from the services, EST URLs, cert/key match) (spec aziotctl.md §4.4).

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aziot_certd::config::{Config as CertdConfig, Preloaded};
use openssl::x509::X509;
use serde_json::{json, Value};

use super::info::{rfc3339, unix_now, utc_display};
use super::{Ctx, Outcome};
use crate::users::ServiceUser;

/// Whether `user` may read `path` by its uid, primary and supplementary groups and the mode
/// bits (the recommendation of §4.4: upstream ignores supplementary groups). The directories
/// above the file are not examined: the broker opens a preloaded file's directory itself
/// (as root) and hands it to the worker.
pub fn readable_by(user: &ServiceUser, path: &Path) -> Result<bool, std::io::Error> {
    let meta = std::fs::metadata(path)?;
    let mode = meta.mode();
    Ok(if meta.uid() == user.uid {
        mode & 0o400 != 0
    } else if user.in_group(meta.gid()) {
        mode & 0o040 != 0
    } else {
        mode & 0o004 != 0
    })
}

/// certd's file name for an issued or imported cert: `<alnum id>-<sha256 hex>.cer`.
pub fn cert_file(certd: &CertdConfig, id: &str) -> PathBuf {
    let alnum: String = id.chars().filter(char::is_ascii_alphanumeric).collect();
    let digest = openssl::sha::sha256(id.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    certd
        .homedir_path
        .join("certs")
        .join(format!("{alnum}-{hex}.cer"))
}

/// Whether certd issues `id` itself (it is then fine that it is not issued yet).
fn issued_by_certd(certd: &CertdConfig, id: &str) -> bool {
    let issuance = &certd.issuance;
    if issuance.certs.contains_key(id) {
        return true;
    }
    if issuance.local_ca.as_ref().is_some_and(|ca| ca.cert == id) {
        return true;
    }
    // An EST identity that has a bootstrap identity is obtained by certd (recommendation of
    // §4.4 check 10).
    let est_identities = issuance
        .est
        .iter()
        .map(|e| &e.auth)
        .chain(issuance.certs.values().map(|c| &c.auth))
        .filter_map(|a| a.x509.as_ref());
    for x in est_identities {
        if x.identity_cert == id && x.bootstrap.is_some() {
            return true;
        }
    }
    false
}

/// Validates the cert `id` (named `name` in messages): readability by aziotcs, parse, dates.
/// The result and its `certificate_info`.
fn validate_cert(ctx: &mut Ctx<'_>, certd: &CertdConfig, id: &str, name: &str) -> (Outcome, Value) {
    let path = match certd.preloaded.get(id) {
        Some(Preloaded::File(p)) => p.clone(),
        Some(Preloaded::Unsupported(uri)) => {
            let scheme = uri.split_once(':').map(|(s, _)| s).unwrap_or(uri);
            return (
                Outcome::error(format!(
                    "preloaded cert \"{id}\" does not have a valid URI: unrecognized scheme \"{scheme}\""
                )),
                Value::Null,
            );
        }
        Some(Preloaded::List(_)) => {
            return (
                Outcome::error(format!(
                    "preloaded cert \"{id}\" is a list of IDs, not a single URI"
                )),
                Value::Null,
            )
        }
        None => cert_file(certd, id),
    };
    if !path.exists() {
        if certd.preloaded.contains_key(id) || !issued_by_certd(certd, id) {
            return (
                Outcome::error(format!(
                    "{name} certificate is neither preloaded nor configured to be dynamically issued, and thus cannot be used."
                )),
                Value::Null,
            );
        }
        return (Outcome::Ok, Value::Null);
    }
    let users = match ctx.users() {
        Ok(u) => u,
        Err(e) => return (Outcome::Error(e), Value::Null),
    };
    let cs = &users.certd;
    match readable_by(cs, &path) {
        Ok(true) => {}
        Ok(false) => {
            return (
                Outcome::error(format!(
                    "{} is not readable by user {} (uid {}, gid {}), see https://aka.ms/iotedge/cert-permissions",
                    path.display(),
                    cs.name,
                    cs.uid,
                    cs.gid
                )),
                Value::Null,
            )
        }
        Err(e) => {
            return (
                Outcome::Error(super::with_causes(
                    "Could not open cert file.",
                    &Msg(format!("operation on file {}: {e}", path.display())),
                )),
                Value::Null,
            )
        }
    }
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) => {
            return (
                Outcome::Error(vec![
                    "Could not read cert file.".into(),
                    format!("operation on file {}", path.display()),
                    e.to_string(),
                ]),
                Value::Null,
            )
        }
    };
    let cert = match X509::stack_from_pem(&bytes)
        .ok()
        .and_then(|v| v.into_iter().next())
    {
        Some(c) => c,
        None => {
            return (
                Outcome::error(format!(
                    "could not parse {} as a valid .pem",
                    path.display()
                )),
                Value::Null,
            )
        }
    };
    let (Some(not_before), Some(not_after)) =
        (asn1_unix(cert.not_before()), asn1_unix(cert.not_after()))
    else {
        return (
            Outcome::error(format!(
                "could not parse {} as a valid .pem",
                path.display()
            )),
            Value::Null,
        );
    };
    let info = json!({
        "cert_name": name,
        "cert_id": id,
        "not_after": rfc3339(not_after),
        "not_before": rfc3339(not_before),
    });
    let now = unix_now();
    let outcome = if not_before > now {
        Outcome::error(format!(
            "{name} '{id}' has not-before time {} which is in the future",
            utc_display(not_before)
        ))
    } else if not_after < now {
        Outcome::error(format!(
            "{name} '{id}' expired at {}",
            utc_display(not_after)
        ))
    } else if not_after < now + 7 * 86400 {
        Outcome::warning(format!(
            "{name} '{id}' will expire soon ({}, in {} days)",
            utc_display(not_after),
            (not_after - now) / 86400
        ))
    } else {
        Outcome::Ok
    };
    (outcome, info)
}

/// A plain message as an error (a cause line).
#[derive(Debug)]
struct Msg(String);
impl std::fmt::Display for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Msg {}

/// Seconds since the epoch of an ASN.1 time.
fn asn1_unix(t: &openssl::asn1::Asn1TimeRef) -> Option<i64> {
    let epoch = openssl::asn1::Asn1Time::from_unix(0).ok()?;
    let d = epoch.diff(t).ok()?;
    Some(i64::from(d.days) * 86400 + i64::from(d.secs))
}

pub fn identity_expiry(ctx: &mut Ctx<'_>) -> Outcome {
    use aziot_identityd::config::{ManualAuth, Source};
    let Some(identityd) = ctx.identityd.clone() else {
        ctx.set("provisioning_mode", Value::Null);
        ctx.set("certificate_info", Value::Null);
        return Outcome::Skipped;
    };
    let (mode, cert) = match &identityd.provisioning.source {
        Source::Manual {
            authentication: ManualAuth::X509 { identity_cert, .. },
            ..
        } => (
            "manual-x509",
            Some((identity_cert.clone(), "Manual identity")),
        ),
        Source::Manual { .. } => ("manual-other", None),
        Source::Dps { attestation, .. }
            if attestation.get("method").and_then(|m| m.as_str()) == Some("x509") =>
        {
            let id = attestation
                .get("identity_cert")
                .and_then(|c| c.as_str())
                .map(str::to_owned);
            ("dps-x509", id.map(|id| (id, "DPS identity")))
        }
        Source::Dps { .. } => ("dps-other", None),
        Source::None => ("none", None),
    };
    ctx.set("provisioning_mode", mode);
    ctx.set("certificate_info", Value::Null);
    let Some((id, name)) = cert else {
        return Outcome::Ignored;
    };
    let Some(certd) = ctx.certd.clone() else {
        return Outcome::Skipped;
    };
    let (outcome, info) = validate_cert(ctx, &certd, &id, name);
    ctx.set("certificate_info", info);
    outcome
}

pub fn est_expiry(ctx: &mut Ctx<'_>) -> Outcome {
    ctx.set("identity_certificate_info", Value::Null);
    ctx.set("bootstrap_certificate_info", Value::Null);
    let Some(certd) = ctx.certd.clone() else {
        return Outcome::Skipped;
    };
    // The global EST identity, then every per-cert one (recommendation of §4.4 check 10).
    let identities: Vec<_> = certd
        .issuance
        .est
        .iter()
        .map(|e| &e.auth)
        .chain(certd.issuance.certs.values().map(|c| &c.auth))
        .filter_map(|a| a.x509.clone())
        .collect();
    if identities.is_empty() {
        return Outcome::Ignored;
    }
    for x in identities {
        let (outcome, info) = validate_cert(ctx, &certd, &x.identity_cert, "x509 identity");
        if ctx
            .additional
            .get("identity_certificate_info")
            .is_none_or(Value::is_null)
        {
            ctx.set("identity_certificate_info", info);
        }
        if outcome != Outcome::Ok {
            return outcome;
        }
        if let Some((bootstrap, _)) = &x.bootstrap {
            let (outcome, info) = validate_cert(ctx, &certd, bootstrap, "x509 bootstrap");
            if ctx
                .additional
                .get("bootstrap_certificate_info")
                .is_none_or(Value::is_null)
            {
                ctx.set("bootstrap_certificate_info", info);
            }
            if outcome != Outcome::Ok {
                return outcome;
            }
        }
    }
    Outcome::Ok
}

pub fn local_ca_expiry(ctx: &mut Ctx<'_>) -> Outcome {
    ctx.set("certificate_info", Value::Null);
    let Some(certd) = ctx.certd.clone() else {
        return Outcome::Skipped;
    };
    let Some(ca) = &certd.issuance.local_ca else {
        return Outcome::Ignored;
    };
    let (outcome, info) = validate_cert(ctx, &certd, &ca.cert, "Local CA");
    ctx.set("certificate_info", info);
    outcome
}

pub fn preloaded(ctx: &mut Ctx<'_>) -> Outcome {
    let Some(certd) = ctx.certd.clone() else {
        return Outcome::Skipped;
    };
    let mut checked = BTreeSet::new();
    for id in certd.preloaded.keys() {
        let mut path = Vec::new();
        let outcome = preloaded_one(ctx, &certd, id, &mut checked, &mut path);
        if outcome != Outcome::Ok {
            return outcome;
        }
    }
    Outcome::Ok
}

/// One entry; `stack` holds the bundles being expanded (a cycle is an error, not a crash).
fn preloaded_one(
    ctx: &mut Ctx<'_>,
    certd: &CertdConfig,
    id: &str,
    checked: &mut BTreeSet<String>,
    stack: &mut Vec<String>,
) -> Outcome {
    match certd.preloaded.get(id) {
        None => Outcome::Ok,
        Some(Preloaded::Unsupported(_)) => Outcome::error(format!(
            "preloaded cert \"{id}\" has a scheme other than `file://`"
        )),
        Some(Preloaded::File(_)) => {
            if !checked.insert(id.to_owned()) {
                return Outcome::Ok;
            }
            validate_cert(ctx, certd, id, "").0
        }
        Some(Preloaded::List(ids)) => {
            if stack.iter().any(|s| s == id) {
                stack.push(id.to_owned());
                return Outcome::error(format!(
                    "preloaded certs form a cycle: {}",
                    stack.join(" -> ")
                ));
            }
            stack.push(id.to_owned());
            for member in ids {
                let outcome = preloaded_one(ctx, certd, member, checked, stack);
                if outcome != Outcome::Ok {
                    return outcome;
                }
            }
            stack.pop();
            Outcome::Ok
        }
    }
}

/// A URI path segment: everything but unreserved characters percent-encoded.
fn encode(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

pub fn certs_read(ctx: &mut Ctx<'_>) -> Outcome {
    let Some(certd) = ctx.certd.clone() else {
        return Outcome::Skipped;
    };
    if !ctx.running.contains("certd") {
        return Outcome::Skipped;
    }
    let client =
        aziot_ipc::client::BlockingClient::new(super::daemons::socket(ctx, "certd"), "2020-09-01");
    let mut errors = Vec::new();
    for id in certd.preloaded.keys() {
        let result: Result<Value, _> =
            client.call::<(), Value>("GET", &format!("/certificates/{}", encode(id)), None);
        match result {
            Ok(v) => {
                let pem = v.get("pem").and_then(Value::as_str).unwrap_or_default();
                match X509::stack_from_pem(pem.as_bytes()) {
                    Ok(certs) if certs.is_empty() => errors.push(format!(
                        "could not load cert with ID \"{id}\": cert is empty"
                    )),
                    Ok(certs) => {
                        ctx.certs.insert(id.clone(), certs);
                    }
                    Err(e) => errors.push(format!(
                        "could not load cert with ID \"{id}\"\n\nCaused by:\n    {e}"
                    )),
                }
            }
            Err(e) => errors.push(format!(
                "could not load cert with ID \"{id}\"\n\nCaused by:\n    {}",
                chain_text(&e)
            )),
        }
    }
    if errors.is_empty() {
        Outcome::Ok
    } else {
        Outcome::error(errors.join("\n"))
    }
}

fn chain_text(e: &(dyn std::error::Error + 'static)) -> String {
    super::with_causes(String::new(), e)
        .into_iter()
        .skip(1)
        .collect::<Vec<_>>()
        .join(": ")
}

pub fn key_pairs_read(ctx: &mut Ctx<'_>) -> Outcome {
    let Some(keyd) = ctx.keyd.clone() else {
        return Outcome::Skipped;
    };
    if !ctx.running.contains("keyd") {
        return Outcome::Skipped;
    }
    let socket = super::daemons::socket(ctx, "keyd");
    let api = aziot_ipc::client::BlockingClient::new(socket.clone(), "2021-05-01");
    let engine = Arc::new(aziot_key_openssl_engine::KeydClient::new(socket));
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    for (id, location) in &keyd.preloaded_keys {
        if let Some(path) = location
            .strip_prefix("file://")
            .or_else(|| location.strip_prefix("file:"))
        {
            let path = aziot_ipc::endpoint::percent_decode(path).unwrap_or_else(|| path.to_owned());
            let users = match ctx.users() {
                Ok(u) => u,
                Err(e) => return Outcome::Error(e),
            };
            let ks = &users.keyd;
            match readable_by(ks, Path::new(&path)) {
                Ok(true) => {}
                Ok(false) => {
                    errors.push(format!(
                        "{path} is not readable by user {} (uid {}, gid {})",
                        ks.name, ks.uid, ks.gid
                    ));
                    continue;
                }
                Err(e) => {
                    errors.push(format!("could not read preloaded key file {path}: {e}"));
                    continue;
                }
            }
        }
        // A symmetric key has no key pair: any error here is not the check's business.
        let Ok(v) = api.call::<(), Value>("GET", &format!("/keypair/{}", encode(id)), None) else {
            continue;
        };
        let Some(handle) = v.get("keyHandle").and_then(Value::as_str) else {
            continue;
        };
        let key = match aziot_key_openssl_engine::load_private_key(&engine, handle) {
            Ok(k) => k,
            Err(_) => {
                errors.push(format!(
                    "could not load preloaded private key with ID \"{id}\""
                ));
                continue;
            }
        };
        if let Ok(rsa) = key.rsa() {
            let bits = rsa.size() * 8;
            if bits < 2048 {
                warnings.push(format!(
                    "RSA key {id} has length {bits} (min recommended: 2048)"
                ));
            }
        } else if let Ok(ec) = key.ec_key() {
            if ec.group().curve_name() != Some(openssl::nid::Nid::X9_62_PRIME256V1) {
                warnings.push(format!(
                    "EC key {id} not using recommended curve (recommended: P-256)"
                ));
            }
        } else {
            warnings.push(format!(
                "Key {id} not using recommended algorithm (recommended: RSA, EC)"
            ));
        }
        ctx.keys.insert(id.clone(), key);
    }
    if !errors.is_empty() {
        Outcome::error(errors.join("\n"))
    } else if !warnings.is_empty() {
        Outcome::warning(warnings.join("\n"))
    } else {
        Outcome::Ok
    }
}

/// A pure config check: no running certd is needed (recommendation of §4.4 check 19).
pub fn est_https(ctx: &mut Ctx<'_>) -> Outcome {
    let Some(certd) = &ctx.certd else {
        return Outcome::Skipped;
    };
    let urls = certd
        .issuance
        .est
        .iter()
        .flat_map(|e| e.urls.values())
        .chain(certd.issuance.certs.values().filter_map(|c| c.url.as_ref()));
    let mut lines = Vec::new();
    for url in urls {
        let scheme = url
            .split_once(':')
            .map(|(s, _)| s.to_ascii_lowercase())
            .unwrap_or_default();
        if scheme != "https" {
            lines.push(format!(
                "EST server URL \"{url}\" is configured with unencrypted HTTP, which may expose device to man-in-the-middle attacks."
            ));
            lines.push(
                "To clear this warning, configure HTTPS for your EST server and update the URL."
                    .to_owned(),
            );
        }
    }
    if lines.is_empty() {
        Outcome::Ok
    } else {
        Outcome::warning(lines.join("\n"))
    }
}

pub fn certs_match_keys(ctx: &mut Ctx<'_>) -> Outcome {
    if !(ctx.running.contains("certd") && ctx.running.contains("keyd")) {
        return Outcome::Skipped;
    }
    let mut lines = Vec::new();
    for (id, certs) in &ctx.certs {
        let (Some(key), Some(cert)) = (ctx.keys.get(id), certs.first()) else {
            continue;
        };
        let matches = cert.public_key().is_ok_and(|public| public.public_eq(key));
        if !matches {
            lines.push(format!(
                "preloaded cert with ID \"{id}\" does not match preloaded private key with ID \"{id}\""
            ));
        }
    }
    if lines.is_empty() {
        Outcome::Ok
    } else {
        Outcome::error(lines.join("\n"))
    }
}
