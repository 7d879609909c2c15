//! Parsing of the certificate-related shapes of the super-config: cert issuance options, EST
//! authentication, auto-renewal, `[cert_issuance]` and X.509 identities (spec aziotctl.md §2.5.4,
//! §2.5.5).

use std::collections::BTreeMap;

use super::parse::{key_location, url, warn_if_http};
use super::reader::{Field, SchemaError, Table};
use super::{
    AutoRenew, BasicAuth, CertIssuance, CertIssuanceOptions, Est, EstAuth, EstX509, IssuanceMethod,
    LocalCa, Policy, Subject, X509Identity,
};
use crate::warnings::Warnings;

/// Keys of the cert issuance options that only mean something with `method = "est"`.
const EST_ONLY_KEYS: [&str; 7] = [
    "url",
    "username",
    "password",
    "identity_cert",
    "identity_pk",
    "bootstrap_identity_cert",
    "bootstrap_identity_pk",
];

/// An X.509 identity: `identity_cert` is a table (issued) or a URL with `identity_pk`
/// (preloaded). Reads from `t`, which may hold other keys too.
pub fn x509_identity(t: &mut Table<'_>, w: &mut Warnings) -> Result<X509Identity, SchemaError> {
    let cert = t.req("identity_cert")?;
    match cert.value {
        toml::Value::Table(_) => {
            let options = cert_issuance_options(cert.table()?, w)?;
            t.ignore(
                "identity_pk",
                "`identity_cert` is a table of cert issuance options, so the key is generated",
                w,
            );
            Ok(X509Identity::Issued(options))
        }
        toml::Value::String(_) => Ok(X509Identity::Preloaded {
            cert: url(&cert)?,
            pk: key_location(&t.req("identity_pk")?, w)?,
        }),
        _ => Err(cert.invalid_type("a URL string or a table of cert issuance options")),
    }
}

/// The table form of `identity_cert` and of `cert_issuance.local_ca.cert`.
pub fn cert_issuance_options(
    mut t: Table<'_>,
    w: &mut Warnings,
) -> Result<CertIssuanceOptions, SchemaError> {
    let method_field = t.req("method")?;
    let method = match method_field.string()? {
        "est" => {
            let url = match t.opt("url") {
                Some(f) => {
                    let u = url(&f)?;
                    warn_if_http(&u, w);
                    Some(u)
                }
                None => None,
            };
            IssuanceMethod::Est {
                url,
                auth: est_auth(&mut t, w)?,
            }
        }
        "local_ca" => IssuanceMethod::LocalCa,
        "self_signed" => IssuanceMethod::SelfSigned,
        other => {
            return Err(method_field.err(format!(
                "unknown variant `{other}`, expected one of `est`, `local_ca`, `self_signed`"
            )))
        }
    };
    if !matches!(method, IssuanceMethod::Est { .. }) {
        for key in EST_ONLY_KEYS {
            t.ignore(key, "it is only used with method = \"est\"", w);
        }
    }

    let expiry_days = match t.opt("expiry_days") {
        Some(f) => {
            let days: u32 = f.integer("u32")?;
            if days == 0 {
                return Err(f.err("expiry_days must be greater than 0"));
            }
            Some(days)
        }
        None => None,
    };

    let common_name = t.opt("common_name").map(|f| f.owned_string()).transpose()?;
    let dn = match t.opt("subject") {
        Some(f) => Some(string_map(&f)?),
        None => None,
    };
    let subject = match (common_name, dn) {
        (Some(cn), dn) => {
            if dn.is_some() {
                w.push(format!(
                    "`{}` is ignored: `common_name` is also set and takes precedence",
                    super::reader::join(t.path(), "subject")
                ));
            }
            Some(Subject::CommonName(cn))
        }
        (None, Some(dn)) => Some(Subject::Dn(dn)),
        (None, None) => None,
    };

    let auto_renew = match t.opt("auto_renew") {
        Some(f) => Some(auto_renew(f.table()?, w)?),
        None => None,
    };

    t.finish(w);
    Ok(CertIssuanceOptions {
        method,
        expiry_days,
        subject,
        auto_renew,
    })
}

/// EST authentication fields, read from `t` (cert issuance options or `cert_issuance.est.auth`).
pub fn est_auth(t: &mut Table<'_>, w: &mut Warnings) -> Result<EstAuth, SchemaError> {
    let username = t.opt("username").map(|f| f.owned_string()).transpose()?;
    let password = t
        .opt("password")
        .map(|f| f.secret().owned_string())
        .transpose()?;
    let basic = match (username, password) {
        (Some(username), Some(password)) => Some(BasicAuth { username, password }),
        (Some(_), None) => {
            warn_half(t.path(), "username", "password", w);
            None
        }
        (None, Some(_)) => {
            warn_half(t.path(), "password", "username", w);
            None
        }
        (None, None) => None,
    };

    let identity = cert_pair(t, "identity_cert", "identity_pk", w)?;
    let bootstrap = cert_pair(t, "bootstrap_identity_cert", "bootstrap_identity_pk", w)?;
    let x509 = match (bootstrap, identity) {
        (Some((cert, pk)), identity) => {
            if identity.is_some() {
                w.push(format!(
                    "`{}` and `{}` are ignored: the bootstrap identity takes precedence",
                    super::reader::join(t.path(), "identity_cert"),
                    super::reader::join(t.path(), "identity_pk"),
                ));
            }
            Some(EstX509::Bootstrap { cert, pk })
        }
        (None, Some((cert, pk))) => Some(EstX509::Identity { cert, pk }),
        (None, None) => None,
    };
    Ok(EstAuth { basic, x509 })
}

fn warn_half(path: &str, present: &str, missing: &str, w: &mut Warnings) {
    w.push(format!(
        "`{}` is ignored: `{missing}` is missing, and both are needed",
        super::reader::join(path, present)
    ));
}

/// A certificate URL and key location that only count together.
fn cert_pair(
    t: &mut Table<'_>,
    cert_key: &str,
    pk_key: &str,
    w: &mut Warnings,
) -> Result<Option<(String, String)>, SchemaError> {
    let cert = t.opt(cert_key).map(|f| url(&f)).transpose()?;
    let pk = match t.opt(pk_key) {
        Some(f) => Some(key_location(&f, w)?),
        None => None,
    };
    match (cert, pk) {
        (Some(cert), Some(pk)) => Ok(Some((cert, pk))),
        (Some(_), None) => {
            warn_half(t.path(), cert_key, pk_key, w);
            Ok(None)
        }
        (None, Some(_)) => {
            warn_half(t.path(), pk_key, cert_key, w);
            Ok(None)
        }
        (None, None) => Ok(None),
    }
}

/// An auto-renew table. `rotate_key` defaults to `true` (upstream requires it).
pub fn auto_renew(mut t: Table<'_>, w: &mut Warnings) -> Result<AutoRenew, SchemaError> {
    let rotate_key = match t.opt("rotate_key") {
        Some(f) => f.boolean()?,
        None => true,
    };
    let threshold = policy(&t.req("threshold")?)?;
    let retry = policy(&t.req("retry")?)?;
    t.finish(w);
    Ok(AutoRenew {
        rotate_key,
        threshold,
        retry,
    })
}

fn policy(f: &Field<'_>) -> Result<Policy, SchemaError> {
    f.string()?.parse().map_err(|e| f.err(format!("{e}")))
}

/// A table of string values (a DN).
fn string_map(f: &Field<'_>) -> Result<BTreeMap<String, String>, SchemaError> {
    let mut t = f.table()?;
    t.entries()
        .into_iter()
        .map(|(k, v)| Ok((k.to_owned(), v.owned_string()?)))
        .collect()
}

/// `[cert_issuance]`.
pub fn cert_issuance(mut t: Table<'_>, w: &mut Warnings) -> Result<CertIssuance, SchemaError> {
    let est = match t.opt("est") {
        Some(f) => Some(est(f.table()?, w)?),
        None => None,
    };
    let local_ca = match t.opt("local_ca") {
        Some(f) => Some(local_ca(f.table()?, w)?),
        None => None,
    };
    t.finish(w);
    Ok(CertIssuance { est, local_ca })
}

fn est(mut t: Table<'_>, w: &mut Warnings) -> Result<Est, SchemaError> {
    let trusted_certs = match t.opt("trusted_certs") {
        Some(f) => f.array()?.iter().map(url).collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    let auth = match t.opt("auth") {
        Some(f) => {
            let mut auth_table = f.table()?;
            let auth = est_auth(&mut auth_table, w)?;
            auth_table.finish(w);
            auth
        }
        None => EstAuth::default(),
    };
    let identity_auto_renew = match t.opt("identity_auto_renew") {
        Some(f) => auto_renew(f.table()?, w)?,
        None => AutoRenew::DEFAULT,
    };
    let mut urls = BTreeMap::new();
    if let Some(f) = t.opt("urls") {
        for (id, field) in f.table()?.entries() {
            let u = url(&field)?;
            warn_if_http(&u, w);
            urls.insert(id.to_owned(), u);
        }
    }
    t.finish(w);
    Ok(Est {
        trusted_certs,
        auth,
        identity_auto_renew,
        urls,
    })
}

fn local_ca(mut t: Table<'_>, w: &mut Warnings) -> Result<LocalCa, SchemaError> {
    let cert = t.req("cert")?;
    let local_ca = match cert.value {
        toml::Value::Table(_) => {
            let options = cert_issuance_options(cert.table()?, w)?;
            t.ignore(
                "pk",
                "`cert` is a table of cert issuance options, so the key is generated",
                w,
            );
            LocalCa::Issued(options)
        }
        toml::Value::String(_) => LocalCa::Preloaded {
            cert: url(&cert)?,
            pk: key_location(&t.req("pk")?, w)?,
        },
        _ => return Err(cert.invalid_type("a URL string or a table of cert issuance options")),
    };
    t.finish(w);
    Ok(local_ca)
}
