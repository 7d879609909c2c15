//! Parsing of the super-config's top level, `[provisioning]`, `[tpm]` and the simple maps
//! (spec aziotctl.md §2.5). Certificate shapes are in `issuance`.

use std::collections::BTreeMap;

use super::issuance::{cert_issuance, x509_identity};
use super::keyloc;
use super::reader::{Field, SchemaError, Table};
use super::values::{decode_key, ConnectionString};
use super::{
    CertIssuance, DpsAttestation, ManualAuth, MaxRequests, PreloadedCert, Provisioning,
    SuperConfig, SymmetricKey, Tpm, DEFAULT_AUTH_KEY_INDEX, DEFAULT_CLOUD_RETRIES,
    DEFAULT_CLOUD_TIMEOUT_SEC, DEFAULT_MAX_REQUESTS, DEFAULT_TCTI, KEYD_HOMEDIR,
};
use crate::warnings::Warnings;

/// The keyd library parameters that keyd understands (spec keyd.md §2).
const KNOWN_AZIOT_KEYS: [&str; 3] = ["homedir_path", "pkcs11_lib_path", "pkcs11_base_slot"];
const MAX_AUTH_KEY_INDEX: u32 = 0x7F_FF_FF;

/// Parses and validates a super-config.
pub fn parse(text: &str, w: &mut Warnings) -> Result<SuperConfig, SchemaError> {
    let table: toml::Table = text.parse().map_err(|e| syntax_error(text, &e))?;
    let mut root = Table::new(String::new(), &table);

    let hostname = root.opt("hostname").map(|f| f.owned_string()).transpose()?;
    let gateway = root
        .opt("local_gateway_hostname")
        .map(|f| f.owned_string())
        .transpose()?;
    let parent = root
        .opt("parent_hostname")
        .map(|f| f.owned_string())
        .transpose()?;
    if gateway.is_some() && parent.is_some() {
        return Err(root.err("duplicate field `parent_hostname`"));
    }
    let parent_hostname = parent.or(gateway);

    let cloud_timeout_sec = match root.opt("cloud_timeout_sec") {
        Some(f) => f.integer("u64")?,
        None => DEFAULT_CLOUD_TIMEOUT_SEC,
    };
    if cloud_timeout_sec < DEFAULT_CLOUD_TIMEOUT_SEC {
        return Err(root.err("cloud_timeout_sec must be at least 70 seconds"));
    }
    let cloud_retries = match root.opt("cloud_retries") {
        Some(f) => f.integer("u32")?,
        None => DEFAULT_CLOUD_RETRIES,
    };
    let prefer_module_identity_cache = match root.opt("prefer_module_identity_cache") {
        Some(f) => f.boolean()?,
        None => false,
    };
    let max_requests = match root.opt("aziot_max_requests") {
        Some(f) => max_requests(f.table()?, w)?,
        None => MaxRequests {
            keyd: DEFAULT_MAX_REQUESTS,
            certd: DEFAULT_MAX_REQUESTS,
            tpmd: DEFAULT_MAX_REQUESTS,
            identityd: DEFAULT_MAX_REQUESTS,
        },
    };
    let provisioning = provisioning(root.req("provisioning")?.table()?, w)?;
    let localid = match root.opt("localid") {
        Some(f) => {
            let mut t = f.table()?;
            let domain = t.req("domain")?.owned_string()?;
            t.finish(w);
            Some(domain)
        }
        None => None,
    };
    let aziot_keys = match root.opt("aziot_keys") {
        Some(f) => aziot_keys(&f, w)?,
        None => BTreeMap::new(),
    };
    let mut preloaded_keys = BTreeMap::new();
    if let Some(f) = root.opt("preloaded_keys") {
        for (id, field) in f.table()?.entries() {
            preloaded_keys.insert(id.to_owned(), key_location(&field, w)?);
        }
    }
    let cert_issuance = match root.opt("cert_issuance") {
        Some(f) => cert_issuance(f.table()?, w)?,
        None => CertIssuance::default(),
    };
    let mut preloaded_certs = BTreeMap::new();
    if let Some(f) = root.opt("preloaded_certs") {
        for (id, field) in f.table()?.entries() {
            preloaded_certs.insert(id.to_owned(), preloaded_cert(&field)?);
        }
    }
    let tpm = match root.opt("tpm") {
        Some(f) => tpm(f.table()?, w)?,
        None => Tpm {
            tcti: DEFAULT_TCTI.to_owned(),
            auth_key_index: DEFAULT_AUTH_KEY_INDEX,
            endorsement: String::new(),
            owner: String::new(),
        },
    };
    root.ignore(
        "endpoints",
        "service endpoints are fixed in release builds and never written to service configs",
        w,
    );
    root.finish(w);

    Ok(SuperConfig {
        hostname,
        parent_hostname,
        cloud_timeout_sec,
        cloud_retries,
        prefer_module_identity_cache,
        max_requests,
        provisioning,
        localid,
        aziot_keys,
        preloaded_keys,
        cert_issuance,
        preloaded_certs,
        tpm,
    })
}

/// A TOML syntax error, located by line and column but without quoting the offending line
/// (which may hold a secret).
fn syntax_error(text: &str, e: &toml::de::Error) -> SchemaError {
    let message = e.message().trim_end();
    match e.span() {
        Some(span) => {
            let before = &text.as_bytes()[..span.start.min(text.len())];
            let line = before.iter().filter(|b| **b == b'\n').count() + 1;
            let column = before.iter().rev().take_while(|b| **b != b'\n').count() + 1;
            SchemaError::new(
                "",
                format!("TOML error at line {line}, column {column}: {message}"),
            )
        }
        None => SchemaError::new("", format!("TOML error: {message}")),
    }
}

/// A WHATWG URL, returned in normalized form. The value is not quoted in errors.
pub fn url(f: &Field<'_>) -> Result<String, SchemaError> {
    let s = f.string()?;
    url::Url::parse(s)
        .map(String::from)
        .map_err(|e| f.err(format!("invalid URL: {e}")))
}

/// Prints the upstream warning for an unencrypted EST URL (spec aziotctl.md §2.5.7).
pub fn warn_if_http(url: &str, w: &mut Warnings) {
    if url.starts_with("http:") {
        let quoted = serde_json::to_string(url).unwrap_or_else(|_| format!("\"{url}\""));
        w.push(format!(
            "EST server URL {quoted} is configured with unencrypted HTTP, which may expose device \
             to man-in-the-middle attacks. To clear this warning, configure HTTPS for your EST \
             server and update the URL."
        ));
    }
}

/// A key location in canonical form; warns when PKCS#11 attributes are dropped.
pub fn key_location(f: &Field<'_>, w: &mut Warnings) -> Result<String, SchemaError> {
    let canonical = keyloc::canonicalize(f.string()?).map_err(|e| f.err(e.to_string()))?;
    if !canonical.dropped.is_empty() {
        w.push(format!(
            "`{}`: PKCS#11 URI attributes not supported by keyd were dropped: {}; keyd will \
             look the key up by slot-id or token, object and pin-value only",
            f.path,
            canonical.dropped.join(", ")
        ));
    }
    Ok(canonical.location)
}

fn max_requests(mut t: Table<'_>, w: &mut Warnings) -> Result<MaxRequests, SchemaError> {
    let mut get = |key: &str| -> Result<usize, SchemaError> {
        match t.opt(key) {
            Some(f) => f.integer("usize"),
            None => Ok(DEFAULT_MAX_REQUESTS),
        }
    };
    let max = MaxRequests {
        keyd: get("keyd")?,
        certd: get("certd")?,
        tpmd: get("tpmd")?,
        identityd: get("identityd")?,
    };
    t.finish(w);
    Ok(max)
}

fn unknown_variant(f: &Field<'_>, value: &str, expected: &str) -> SchemaError {
    f.err(format!("unknown variant `{value}`, expected {expected}"))
}

fn provisioning(mut t: Table<'_>, w: &mut Warnings) -> Result<Provisioning, SchemaError> {
    let source = t.req("source")?;
    let provisioning = match source.string()? {
        "manual" => manual(&mut t, w)?,
        "dps" => dps(&mut t, w)?,
        "none" => Provisioning::None,
        other => {
            return Err(unknown_variant(
                &source,
                other,
                "one of `manual`, `dps`, `none`",
            ))
        }
    };
    t.finish(w);
    Ok(provisioning)
}

fn manual(t: &mut Table<'_>, w: &mut Warnings) -> Result<Provisioning, SchemaError> {
    if let Some(f) = t.opt("connection_string") {
        let f = f.secret();
        let cs = ConnectionString::parse(f.string()?).map_err(|e| f.err(e.to_string()))?;
        for name in &cs.ignored {
            let hint = if name == "GatewayHostName" {
                " (set `local_gateway_hostname` instead)"
            } else {
                ""
            };
            w.push(format!(
                "`{}`: connection string parameter \"{name}\" is ignored{hint}",
                f.path
            ));
        }
        if cs.malformed_parts > 0 {
            w.push(format!(
                "`{}`: {} part(s) of the connection string without `=` are ignored",
                f.path, cs.malformed_parts
            ));
        }
        for key in ["iothub_hostname", "device_id", "authentication"] {
            t.ignore(key, "`connection_string` is set and takes precedence", w);
        }
        return Ok(Provisioning::Manual {
            iothub_hostname: cs.host_name,
            device_id: cs.device_id,
            authentication: ManualAuth::Sas(SymmetricKey::Inline(cs.key)),
        });
    }

    if !["iothub_hostname", "device_id", "authentication"]
        .iter()
        .any(|k| t.has(k))
    {
        return Err(t.err(
            "source = \"manual\" needs either `connection_string`, or `iothub_hostname`, \
             `device_id` and `[provisioning.authentication]`",
        ));
    }
    let iothub_hostname = t.req("iothub_hostname")?.owned_string()?;
    let device_id = t.req("device_id")?.owned_string()?;
    let mut auth = t.req("authentication")?.table()?;
    let method = auth.req("method")?;
    let authentication = match method.string()? {
        "sas" => ManualAuth::Sas(symmetric_key(auth.req("device_id_pk")?, w)?),
        "x509" => ManualAuth::X509(x509_identity(&mut auth, w)?),
        other => return Err(unknown_variant(&method, other, "`sas` or `x509`")),
    };
    auth.finish(w);
    Ok(Provisioning::Manual {
        iothub_hostname,
        device_id,
        authentication,
    })
}

fn dps(t: &mut Table<'_>, w: &mut Warnings) -> Result<Provisioning, SchemaError> {
    let global_endpoint = url(&t.req("global_endpoint")?)?;
    let id_scope = t.req("id_scope")?.owned_string()?;
    let payload_uri = match t.opt("payload") {
        Some(f) => {
            let mut p = f.table()?;
            let uri = url(&p.req("uri")?)?;
            p.finish(w);
            Some(uri)
        }
        None => None,
    };
    let mut att = t.req("attestation")?.table()?;
    let method = att.req("method")?;
    let attestation = match method.string()? {
        "symmetric_key" => DpsAttestation::SymmetricKey {
            registration_id: att.req("registration_id")?.owned_string()?,
            key: symmetric_key(att.req("symmetric_key")?, w)?,
        },
        "x509" => DpsAttestation::X509 {
            registration_id: att
                .opt("registration_id")
                .map(|f| f.owned_string())
                .transpose()?,
            identity: x509_identity(&mut att, w)?,
        },
        "tpm" => DpsAttestation::Tpm {
            registration_id: att.req("registration_id")?.owned_string()?,
        },
        other => {
            return Err(unknown_variant(
                &method,
                other,
                "one of `symmetric_key`, `x509`, `tpm`",
            ))
        }
    };
    att.finish(w);
    Ok(Provisioning::Dps {
        global_endpoint,
        id_scope,
        payload_uri,
        attestation,
    })
}

/// `{ value = "<base64>" }` or `{ uri = "<key location>" }`.
fn symmetric_key(f: Field<'_>, w: &mut Warnings) -> Result<SymmetricKey, SchemaError> {
    const EXPECTED: &str =
        "a table with either `value` (an inline base64 key) or `uri` (a key location)";
    let f = f.secret();
    if !matches!(f.value, toml::Value::Table(_)) {
        return Err(f.invalid_type(EXPECTED));
    }
    let mut t = f.table()?;
    let key = if let Some(v) = t.opt("value") {
        let v = v.secret();
        let key = decode_key(v.string()?).map_err(|e| {
            v.err(format!(
                "could not decode the symmetric key from base64: {e}"
            ))
        })?;
        t.ignore("uri", "`value` is set and takes precedence", w);
        SymmetricKey::Inline(key)
    } else if let Some(uri) = t.opt("uri") {
        SymmetricKey::Preloaded(key_location(&uri, w)?)
    } else {
        return Err(f.err(format!("expected {EXPECTED}")));
    };
    t.finish(w);
    Ok(key)
}

fn aziot_keys(f: &Field<'_>, w: &mut Warnings) -> Result<BTreeMap<String, String>, SchemaError> {
    let mut map = BTreeMap::new();
    for (name, field) in f.table()?.entries() {
        let value = field.secret().owned_string()?;
        if name == "homedir_path" && value != KEYD_HOMEDIR {
            w.push(format!(
                "`aziot_keys.homedir_path` is replaced by \"{KEYD_HOMEDIR}\", which aziotctl \
                 always sets"
            ));
        } else if !KNOWN_AZIOT_KEYS.contains(&name) {
            w.push(format!(
                "`{}` is not a parameter that keyd understands; keyd will refuse to start with \
                 it",
                super::reader::join("aziot_keys", name)
            ));
        }
        map.insert(name.to_owned(), value);
    }
    Ok(map)
}

fn preloaded_cert(f: &Field<'_>) -> Result<PreloadedCert, SchemaError> {
    match f.value {
        toml::Value::String(_) => Ok(PreloadedCert::Uri(url(f)?)),
        toml::Value::Array(_) => Ok(PreloadedCert::Bundle(
            f.array()?
                .iter()
                .map(Field::owned_string)
                .collect::<Result<_, _>>()?,
        )),
        _ => Err(f.invalid_type("a URL string or an array of cert IDs")),
    }
}

fn tpm(mut t: Table<'_>, w: &mut Warnings) -> Result<Tpm, SchemaError> {
    let no_nul = |f: &Field<'_>| -> Result<String, SchemaError> {
        let s = f.owned_string()?;
        if s.contains('\0') {
            return Err(f.err("must not contain NUL characters"));
        }
        Ok(s)
    };
    let tcti = match t.opt("tcti") {
        Some(f) => no_nul(&f)?,
        None => DEFAULT_TCTI.to_owned(),
    };
    let auth_key_index = match t.opt("auth_key_index") {
        Some(f) => auth_key_index(&f, w)?,
        None => DEFAULT_AUTH_KEY_INDEX,
    };
    let (mut endorsement, mut owner) = (String::new(), String::new());
    if let Some(f) = t.opt("hierarchy_authorization") {
        let mut h = f.table()?;
        if let Some(f) = h.opt("endorsement") {
            endorsement = no_nul(&f.secret())?;
        }
        if let Some(f) = h.opt("owner") {
            owner = no_nul(&f.secret())?;
        }
        h.finish(w);
    }
    t.finish(w);
    Ok(Tpm {
        tcti,
        auth_key_index,
        endorsement,
        owner,
    })
}

/// An integer up to 0x7F_FF_FF. A string holding a TOML integer literal (as the upstream
/// template wrongly shows) is accepted too, with a warning.
fn auth_key_index(f: &Field<'_>, w: &mut Warnings) -> Result<u32, SchemaError> {
    let value: i64 = match f.value {
        toml::Value::String(s) => {
            let parsed = parse_integer_literal(s).ok_or_else(|| f.invalid_type("u32"))?;
            w.push(format!(
                "`{}` is a string; write it as a TOML integer, e.g. auth_key_index = 0x00_01_00",
                f.path
            ));
            parsed
        }
        _ => f.integer("i64")?,
    };
    let value = u32::try_from(value)
        .map_err(|_| f.err(format!("invalid value: integer `{value}`, expected u32")))?;
    if value > MAX_AUTH_KEY_INDEX {
        return Err(f.err(format!(
            "invalid value: integer `{value}`, expected integer in range 0x00_00_00..=0x7F_FF_FF"
        )));
    }
    Ok(value)
}

/// A TOML integer literal: decimal, or `0x`/`0o`/`0b` with optional `_` separators.
fn parse_integer_literal(s: &str) -> Option<i64> {
    let (digits, radix) = if let Some(d) = s.strip_prefix("0x") {
        (d, 16)
    } else if let Some(d) = s.strip_prefix("0o") {
        (d, 8)
    } else if let Some(d) = s.strip_prefix("0b") {
        (d, 2)
    } else {
        (s, 10)
    };
    if digits.is_empty()
        || digits.starts_with('_')
        || digits.ends_with('_')
        || digits.contains("__")
    {
        return None;
    }
    let digits: String = digits.chars().filter(|c| *c != '_').collect();
    if digits.starts_with(['+', '-']) && radix != 10 {
        return None;
    }
    i64::from_str_radix(&digits, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integer_literals() {
        assert_eq!(parse_integer_literal("0x00_01_00"), Some(256));
        assert_eq!(parse_integer_literal("1_000"), Some(1000));
        assert_eq!(parse_integer_literal("0b101"), Some(5));
        assert_eq!(parse_integer_literal("0x"), None);
        assert_eq!(parse_integer_literal("1__0"), None);
        assert_eq!(parse_integer_literal("abc"), None);
    }

    #[test]
    fn syntax_errors_do_not_quote_the_line() {
        let text = "a = 1\nconnection_string = \"s3cret\n";
        let mut w = Warnings::new();
        let msg = parse(text, &mut w).err().unwrap().to_string();
        assert!(msg.starts_with("TOML error at line 2"), "{msg}");
        assert!(!msg.contains("s3cret"), "{msg}");
    }
}
