//! Key locations (`file:` and `pkcs11:` URIs) and the canonical form that keyd receives
//! (spec aziotctl.md §2.6.9).

/// Why a key location was rejected. Messages never quote the location (it may hold a PIN).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyLocationError {
    #[error("missing scheme")]
    MissingScheme,
    #[error("unrecognized scheme")]
    UnrecognizedScheme,
    #[error("invalid file URL: {0}")]
    InvalidFileUrl(url::ParseError),
    #[error("cannot convert to file path")]
    NotAFilePath,
    #[error(transparent)]
    Pkcs11(#[from] Pkcs11Error),
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Pkcs11Error {
    #[error("URI does not have pkcs11 scheme")]
    NotPkcs11,
    #[error("URI has neither [slot-id] nor [token] components")]
    NoSlotOrToken,
    /// The wording is upstream's (sic): it is raised for a bad `slot-id`.
    #[error("pin-value path component has malformed value [{0}]")]
    MalformedSlotId(String),
    #[error("URI component with key [{0}] is not valid UTF-8")]
    NotUtf8(String),
    #[error("URI component with key [{0}] has an invalid percent-encoding")]
    BadPercentEncoding(String),
    #[error("URI has a component that is not of the form key=value")]
    NoValue,
}

/// A key location in canonical form, and the PKCS#11 attributes that canonicalization dropped.
#[derive(Debug, PartialEq, Eq)]
pub struct Canonical {
    pub location: String,
    pub dropped: Vec<String>,
}

/// Parses a key location and returns its canonical form.
pub fn canonicalize(location: &str) -> Result<Canonical, KeyLocationError> {
    let Some((scheme, _)) = location.split_once(':') else {
        return Err(KeyLocationError::MissingScheme);
    };
    if scheme.eq_ignore_ascii_case("file") {
        let url = url::Url::parse(location).map_err(KeyLocationError::InvalidFileUrl)?;
        let path = url
            .to_file_path()
            .map_err(|()| KeyLocationError::NotAFilePath)?;
        let url = url::Url::from_file_path(&path).map_err(|()| KeyLocationError::NotAFilePath)?;
        Ok(Canonical {
            location: url.into(),
            dropped: Vec::new(),
        })
    } else if scheme.eq_ignore_ascii_case("pkcs11") {
        Ok(canonical_pkcs11(location)?)
    } else {
        Err(KeyLocationError::UnrecognizedScheme)
    }
}

/// Parses an RFC 7512 URI, keeping only `slot-id` (which wins over `token`), `token`, `object`
/// and the query attribute `pin-value`.
fn canonical_pkcs11(uri: &str) -> Result<Canonical, Pkcs11Error> {
    let rest = match uri.split_once(':') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("pkcs11") => rest,
        _ => return Err(Pkcs11Error::NotPkcs11),
    };
    let (path, query) = match rest.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (rest, None),
    };

    let mut slot_id = None;
    let mut token = None;
    let mut object = None;
    let mut pin = None;
    let mut dropped = Vec::new();

    for component in path.split(';').filter(|c| !c.is_empty()) {
        let (key, value) = component.split_once('=').ok_or(Pkcs11Error::NoValue)?;
        match key {
            "slot-id" => {
                let value = decode_utf8(key, value)?;
                let id = value
                    .parse::<u64>()
                    .map_err(|_| Pkcs11Error::MalformedSlotId(value.clone()))?;
                note_duplicate(&mut dropped, key, slot_id.replace(id).is_some());
            }
            "token" => {
                let value = decode_utf8(key, value)?;
                note_duplicate(&mut dropped, key, token.replace(value).is_some());
            }
            "object" => {
                let value = decode_utf8(key, value)?;
                note_duplicate(&mut dropped, key, object.replace(value).is_some());
            }
            other => dropped.push(other.to_owned()),
        }
    }
    for component in query.into_iter().flat_map(|q| q.split('&')) {
        if component.is_empty() {
            continue;
        }
        let (key, value) = component.split_once('=').ok_or(Pkcs11Error::NoValue)?;
        if key == "pin-value" {
            let value = decode_utf8(key, value)?;
            note_duplicate(&mut dropped, key, pin.replace(value).is_some());
        } else {
            dropped.push(format!("{key} (query attribute)"));
        }
    }

    let mut location = String::from("pkcs11:");
    match (slot_id, token) {
        (Some(id), token) => {
            location.push_str(&format!("slot-id={id}"));
            if token.is_some() {
                dropped.push("token (slot-id takes precedence)".to_owned());
            }
        }
        (None, Some(token)) => {
            location.push_str("token=");
            location.push_str(&encode(&token));
        }
        (None, None) => return Err(Pkcs11Error::NoSlotOrToken),
    }
    if let Some(object) = object {
        location.push_str(";object=");
        location.push_str(&encode(&object));
    }
    if let Some(pin) = pin {
        location.push_str("?pin-value=");
        location.push_str(&encode(&pin));
    }
    Ok(Canonical { location, dropped })
}

fn note_duplicate(dropped: &mut Vec<String>, key: &str, was_set: bool) {
    if was_set {
        dropped.push(format!("{key} (all but the last occurrence)"));
    }
}

fn decode_utf8(key: &str, value: &str) -> Result<String, Pkcs11Error> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Pkcs11Error::BadPercentEncoding(key.to_owned()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Pkcs11Error::NotUtf8(key.to_owned()))
}

/// Percent-encodes every byte that is not an ASCII letter or digit (upper-case hex).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Replaces the value of every `pin-value=` attribute with `<redacted>`, for display.
pub fn redact_pin(value: &str) -> String {
    const ATTR: &str = "pin-value=";
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find(ATTR) {
        let value_start = start + ATTR.len();
        out.push_str(&rest[..value_start]);
        out.push_str("<redacted>");
        let tail = &rest[value_start..];
        let end = tail.find(['&', ';']).unwrap_or(tail.len());
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canon(s: &str) -> Canonical {
        canonicalize(s).unwrap()
    }

    #[test]
    fn pkcs11_canonical_form() {
        let c = canon("pkcs11:slot-id=0;object=est-id?pin-value=1234");
        assert_eq!(
            c.location,
            "pkcs11:slot-id=0;object=est%2Did?pin-value=1234"
        );
        assert!(c.dropped.is_empty());
        let c = canon("pkcs11:token=Key%20pairs;object=device%20id;id=%01;type=private?module-path=/x.so&pin-value=a-b");
        assert_eq!(
            c.location,
            "pkcs11:token=Key%20pairs;object=device%20id?pin-value=a%2Db"
        );
        assert_eq!(c.dropped, ["id", "type", "module-path (query attribute)"]);
        let c = canon("pkcs11:token=t;slot-id=3");
        assert_eq!(c.location, "pkcs11:slot-id=3");
        assert_eq!(c.dropped, ["token (slot-id takes precedence)"]);
    }

    #[test]
    fn pkcs11_errors() {
        let e = |s: &str| canonicalize(s).unwrap_err().to_string();
        assert_eq!(
            e("pkcs11:object=x"),
            "URI has neither [slot-id] nor [token] components"
        );
        assert_eq!(
            e("pkcs11:slot-id=abc"),
            "pin-value path component has malformed value [abc]"
        );
        assert_eq!(
            e("pkcs11:token=%ff"),
            "URI component with key [token] is not valid UTF-8"
        );
        assert_eq!(
            e("pkcs11:token=%f"),
            "URI component with key [token] has an invalid percent-encoding"
        );
        assert_eq!(
            canonical_pkcs11("file:x").unwrap_err(),
            Pkcs11Error::NotPkcs11
        );
    }

    #[test]
    fn file_locations() {
        assert_eq!(
            canon("file:///var/secrets/k.pem").location,
            "file:///var/secrets/k.pem"
        );
        assert_eq!(canon("file://localhost/a%20b").location, "file:///a%20b");
        assert_eq!(canon("FILE:/a b").location, "file:///a%20b");
        let e = |s: &str| canonicalize(s).unwrap_err().to_string();
        assert_eq!(e("file://host/x"), "cannot convert to file path");
        assert_eq!(e("/var/secrets/x"), "missing scheme");
        assert_eq!(e("tpm:foo"), "unrecognized scheme");
    }

    #[test]
    fn redaction() {
        assert_eq!(
            redact_pin("pkcs11:slot-id=0;object=a?pin-value=1234&x=y"),
            "pkcs11:slot-id=0;object=a?pin-value=<redacted>&x=y"
        );
        assert_eq!(
            redact_pin("pkcs11:slot-id=0?pin-value=1"),
            "pkcs11:slot-id=0?pin-value=<redacted>"
        );
        assert_eq!(redact_pin("/usr/lib/x.so"), "/usr/lib/x.so");
    }
}
