//! PKCS#11 URIs (RFC 7512), the subset keyd uses (spec/keyd.md §7.7), parsed by our own code.
//!
//! Path attributes (`;`-separated): `token`, `slot-id`, `serial`, `object`, `id` (raw bytes),
//! `type` (`private` | `public` | `secret-key` | `cert` | `data`). Query attributes
//! (`&`-separated): `pin-value`, `pin-source` (a `file:` path whose first line is the PIN; the
//! key store reads it once, when the parameter is set: [`Pkcs11Uri::resolve_pin_file`]). Other RFC 7512 attributes (`manufacturer`, `model`, `library-*`, `module-*`, ...)
//! are accepted and ignored, as upstream does. Values are percent-decoded; text values must be
//! UTF-8. A repeated attribute is an error (RFC 7512 §2.3).
//!
//! The PIN is kept in a [`Zeroizing`] buffer, and neither [`Display`](std::fmt::Display) nor
//! `Debug` nor any [`UriError`] prints it (errors name the attribute, never a value).

use std::fmt;
use std::path::PathBuf;

use zeroize::Zeroizing;

/// Why a `pkcs11:` URI was refused. Names the attribute, never quotes a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    #[error("not a pkcs11: URI")]
    Scheme,
    #[error("pkcs11: URI attribute {0:?} has an invalid percent escape")]
    PercentEscape(String),
    #[error("pkcs11: URI attribute {0:?} is not UTF-8")]
    NotUtf8(String),
    #[error("pkcs11: URI attribute {0:?} is given more than once")]
    Duplicate(String),
    #[error("pkcs11: URI attribute {0:?} has no '='")]
    MissingValue(String),
    #[error("pkcs11: URI slot-id is not a decimal number")]
    SlotId,
    #[error("pkcs11: URI type must be private, public, secret-key, cert or data")]
    ObjectType,
    #[error("pkcs11: URI pin-source must be a file: URI with an absolute path")]
    PinSource,
    #[error("pkcs11: URI has both pin-value and pin-source")]
    TwoPins,
    #[error("pkcs11: URI names neither a token, a serial nor a slot-id")]
    NoSlot,
    #[error("reading the PIN from pin-source failed: {0}")]
    PinRead(String),
}

/// The `type` path attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectType {
    Private,
    Public,
    SecretKey,
    Cert,
    Data,
}

/// Where the user PIN comes from.
#[derive(Clone)]
pub enum PinSource {
    /// `pin-value=`.
    Value(Zeroizing<String>),
    /// `pin-source=file:...`: read (first line, trailing newline removed) by [`Pkcs11Uri::pin`];
    /// the key store turns it into a `Value` at `set_parameter` ([`Pkcs11Uri::resolve_pin_file`]).
    File(PathBuf),
}

impl fmt::Debug for PinSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinSource::Value(_) => f.write_str("Value(<redacted>)"),
            PinSource::File(path) => f.debug_tuple("File").field(path).finish(),
        }
    }
}

/// A parsed `pkcs11:` URI.
#[derive(Clone, Debug, Default)]
pub struct Pkcs11Uri {
    pub token: Option<String>,
    pub slot_id: Option<u64>,
    pub serial: Option<String>,
    pub object: Option<String>,
    pub id: Option<Vec<u8>>,
    pub object_type: Option<ObjectType>,
    pub pin: Option<PinSource>,
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes `%XX` escapes; `None` when a `%` is not followed by two hex digits. The one decoder
/// of the key library's URIs (`pkcs11:` here, `file://` in `native::params`).
pub(crate) fn percent_decode(value: &str) -> Option<Vec<u8>> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = bytes.get(i + 1).copied().and_then(hex_digit)?;
            let lo = bytes.get(i + 2).copied().and_then(hex_digit)?;
            out.push(hi << 4 | lo);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

fn decode(name: &str, value: &str) -> Result<Vec<u8>, UriError> {
    percent_decode(value).ok_or_else(|| UriError::PercentEscape(name.to_owned()))
}

fn decode_text(name: &str, value: &str) -> Result<String, UriError> {
    String::from_utf8(decode(name, value)?).map_err(|_| UriError::NotUtf8(name.to_owned()))
}

fn set<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<(), UriError> {
    if slot.is_some() {
        return Err(UriError::Duplicate(name.to_owned()));
    }
    *slot = Some(value);
    Ok(())
}

/// Attribute names are bounded so that an error never carries a huge string.
fn attr_name(name: &str) -> &str {
    let mut end = name.len().min(32);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    &name[..end]
}

impl Pkcs11Uri {
    /// Parses a URI. Requires a slot selector (`token`, `serial` or `slot-id`) as keyd's
    /// parameters do; use [`Pkcs11Uri::parse_any`] for a URI without one.
    pub fn parse(s: &str) -> Result<Self, UriError> {
        let uri = Self::parse_any(s)?;
        if uri.token.is_none() && uri.slot_id.is_none() && uri.serial.is_none() {
            return Err(UriError::NoSlot);
        }
        Ok(uri)
    }

    /// Parses a URI without requiring a slot selector.
    pub fn parse_any(s: &str) -> Result<Self, UriError> {
        let rest = match s.get(..7) {
            Some(head) if head.eq_ignore_ascii_case("pkcs11:") => &s[7..],
            _ => return Err(UriError::Scheme),
        };
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let mut uri = Pkcs11Uri::default();
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (name, value) = attr.split_once('=').ok_or_else(|| UriError::MissingValue(attr_name(attr).into()))?;
            let name = attr_name(name);
            match name {
                "token" => set(&mut uri.token, name, decode_text(name, value)?)?,
                "serial" => set(&mut uri.serial, name, decode_text(name, value)?)?,
                "object" => set(&mut uri.object, name, decode_text(name, value)?)?,
                "id" => set(&mut uri.id, name, decode(name, value)?)?,
                "slot-id" => {
                    let text = decode_text(name, value)?;
                    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(UriError::SlotId);
                    }
                    set(&mut uri.slot_id, name, text.parse().map_err(|_| UriError::SlotId)?)?
                }
                "type" => {
                    let t = match decode_text(name, value)?.as_str() {
                        "private" => ObjectType::Private,
                        "public" => ObjectType::Public,
                        "secret-key" => ObjectType::SecretKey,
                        "cert" => ObjectType::Cert,
                        "data" => ObjectType::Data,
                        _ => return Err(UriError::ObjectType),
                    };
                    set(&mut uri.object_type, name, t)?
                }
                // Other RFC 7512 attributes are valid but do not select anything for us; their
                // escapes must still be well-formed.
                _ => drop(decode(name, value)?),
            }
        }
        for attr in query.into_iter().flat_map(|q| q.split('&')).filter(|a| !a.is_empty()) {
            let (name, value) = attr.split_once('=').ok_or_else(|| UriError::MissingValue(attr_name(attr).into()))?;
            let name = attr_name(name);
            match name {
                "pin-value" => {
                    let pin = Zeroizing::new(decode_text(name, value)?);
                    if uri.pin.is_some() {
                        return Err(if matches!(uri.pin, Some(PinSource::File(_))) {
                            UriError::TwoPins
                        } else {
                            UriError::Duplicate(name.into())
                        });
                    }
                    uri.pin = Some(PinSource::Value(pin));
                }
                "pin-source" => {
                    let text = decode_text(name, value)?;
                    let path = text
                        .strip_prefix("file://")
                        .or_else(|| text.strip_prefix("file:"))
                        .filter(|p| p.starts_with('/'))
                        .ok_or(UriError::PinSource)?;
                    if uri.pin.is_some() {
                        return Err(if matches!(uri.pin, Some(PinSource::Value(_))) {
                            UriError::TwoPins
                        } else {
                            UriError::Duplicate(name.into())
                        });
                    }
                    uri.pin = Some(PinSource::File(PathBuf::from(path)));
                }
                _ => drop(decode(name, value)?),
            }
        }
        Ok(uri)
    }

    /// `text`, a `pkcs11:` URI, with its `pin-source=file:` attribute replaced by a `pin-value`
    /// holding the file's PIN, read now. The keys service does this while it starts (in
    /// `set_parameter`), so a worker reads its PIN file before its sandbox forbids the path and
    /// a missing or unreadable file is an error at start, not at the first login. A URI without
    /// a PIN file comes back unchanged. The result carries a PIN: it is zeroized on drop and
    /// reserved up front so that no reallocation leaves a copy behind.
    pub fn resolve_pin_file(text: &str) -> Result<Zeroizing<String>, UriError> {
        let uri = Self::parse_any(text)?;
        if !matches!(uri.pin, Some(PinSource::File(_))) {
            return Ok(Zeroizing::new(text.to_owned()));
        }
        let pin = uri.pin()?.unwrap_or_default();
        // a PIN file is a query attribute, so there is a '?'
        let (path, query) = text.split_once('?').unwrap_or((text, ""));
        let mut out = Zeroizing::new(String::with_capacity(text.len() + 3 * pin.len() + 16));
        out.push_str(path);
        out.push('?');
        for attr in query.split('&').filter(|a| !a.is_empty()) {
            let name = attr.split_once('=').map_or(attr, |(n, _)| n);
            if attr_name(name) != "pin-source" {
                out.push_str(attr);
                out.push('&');
            }
        }
        out.push_str("pin-value=");
        for &b in pin.as_bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                out.push(char::from(b));
            } else {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                out.push('%');
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 15)]));
            }
        }
        Ok(out)
    }

    /// This URI with `object` set to `label` (the dynamic-key location of spec §7.2).
    pub fn with_object(&self, label: &str) -> Self {
        Pkcs11Uri { object: Some(label.to_owned()), ..self.clone() }
    }

    /// The user PIN, if the URI carries one (`pin-source` files are read now).
    pub fn pin(&self) -> Result<Option<Zeroizing<String>>, UriError> {
        match &self.pin {
            None => Ok(None),
            Some(PinSource::Value(pin)) => Ok(Some(pin.clone())),
            Some(PinSource::File(path)) => {
                let content = Zeroizing::new(
                    std::fs::read(path).map_err(|e| UriError::PinRead(format!("{}: {}", path.display(), e.kind())))?,
                );
                let text =
                    std::str::from_utf8(&content).map_err(|_| UriError::PinRead("the PIN is not UTF-8".into()))?;
                let line = text.split(['\n', '\r']).next().unwrap_or("");
                Ok(Some(Zeroizing::new(line.to_owned())))
            }
        }
    }
}

fn encode(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~:[]@!$'()*+,".contains(&b) {
            write!(f, "{}", b as char)?;
        } else {
            write!(f, "%{b:02X}")?;
        }
    }
    Ok(())
}

/// Prints the URI with its PIN replaced by `<redacted>` (a `pin-source` path is printed).
impl fmt::Display for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("pkcs11:")?;
        let mut sep = "";
        let mut attr = |f: &mut fmt::Formatter<'_>, name: &str, value: &[u8]| -> fmt::Result {
            write!(f, "{sep}{name}=")?;
            sep = ";";
            encode(f, value)
        };
        if let Some(v) = &self.token {
            attr(f, "token", v.as_bytes())?;
        }
        if let Some(v) = &self.serial {
            attr(f, "serial", v.as_bytes())?;
        }
        if let Some(v) = self.slot_id {
            attr(f, "slot-id", v.to_string().as_bytes())?;
        }
        if let Some(v) = &self.object {
            attr(f, "object", v.as_bytes())?;
        }
        if let Some(v) = &self.id {
            attr(f, "id", v)?;
        }
        if let Some(t) = self.object_type {
            let t = match t {
                ObjectType::Private => "private",
                ObjectType::Public => "public",
                ObjectType::SecretKey => "secret-key",
                ObjectType::Cert => "cert",
                ObjectType::Data => "data",
            };
            attr(f, "type", t.as_bytes())?;
        }
        match &self.pin {
            None => Ok(()),
            Some(PinSource::Value(_)) => f.write_str("?pin-value=<redacted>"),
            Some(PinSource::File(path)) => {
                f.write_str("?pin-source=file:")?;
                encode(f, path.as_os_str().as_encoded_bytes())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_all_attributes() {
        let uri = Pkcs11Uri::parse(
            "pkcs11:token=Key%20pairs;serial=abc;slot-id=7;object=device-id;id=%01%ff;type=private;model=x?pin-value=12%2034&module-name=y",
        )
        .unwrap();
        assert_eq!(uri.token.as_deref(), Some("Key pairs"));
        assert_eq!(uri.serial.as_deref(), Some("abc"));
        assert_eq!(uri.slot_id, Some(7));
        assert_eq!(uri.object.as_deref(), Some("device-id"));
        assert_eq!(uri.id.as_deref(), Some(&[1u8, 0xff][..]));
        assert_eq!(uri.object_type, Some(ObjectType::Private));
        assert_eq!(uri.pin().unwrap().as_deref().map(String::as_str), Some("12 34"));
    }

    #[test]
    fn errors_name_the_attribute() {
        let cases: &[(&str, UriError)] = &[
            ("file:///x", UriError::Scheme),
            ("pkcs11:object=x", UriError::NoSlot),
            ("pkcs11:slot-id=abc", UriError::SlotId),
            ("pkcs11:slot-id=-1", UriError::SlotId),
            ("pkcs11:slot-id=99999999999999999999999", UriError::SlotId),
            ("pkcs11:token=%ff", UriError::NotUtf8("token".into())),
            ("pkcs11:token=a;object=%zz", UriError::PercentEscape("object".into())),
            ("pkcs11:token=a;token=b", UriError::Duplicate("token".into())),
            ("pkcs11:token=a;type=key", UriError::ObjectType),
            ("pkcs11:token", UriError::MissingValue("token".into())),
            ("pkcs11:token=a?pin-value=1&pin-source=file:/p", UriError::TwoPins),
            ("pkcs11:token=a?pin-source=/p", UriError::PinSource),
            ("pkcs11:token=a?pin-value=%2", UriError::PercentEscape("pin-value".into())),
        ];
        for (input, expected) in cases {
            assert_eq!(&Pkcs11Uri::parse(input).unwrap_err(), expected, "{input}");
        }
        assert!(Pkcs11Uri::parse_any("PKCS11:object=x").is_ok());
    }

    #[test]
    fn display_round_trips_and_redacts_the_pin() {
        let text = "pkcs11:token=a%3Bb;slot-id=3;object=%E2%82%AC;id=%00?pin-value=s3cr3t-PIN";
        let uri = Pkcs11Uri::parse(text).unwrap();
        let shown = uri.to_string();
        assert!(!shown.contains("s3cr3t-PIN"), "{shown}");
        assert!(!format!("{uri:?}").contains("s3cr3t-PIN"));
        assert!(shown.ends_with("?pin-value=<redacted>"), "{shown}");
        let reparsed = Pkcs11Uri::parse(shown.split('?').next().unwrap()).unwrap();
        assert_eq!(reparsed.token.as_deref(), Some("a;b"));
        assert_eq!(reparsed.object.as_deref(), Some("€"));
        assert_eq!(reparsed.id.as_deref(), Some(&[0u8][..]));
        assert_eq!(reparsed.slot_id, Some(3));
        assert!(reparsed.pin.is_none());
    }

    #[test]
    fn pin_source_is_read_at_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        let uri = Pkcs11Uri::parse(&format!("pkcs11:token=t?pin-source=file:{}", path.display())).unwrap();
        assert!(matches!(uri.pin(), Err(UriError::PinRead(_))));
        std::fs::write(&path, "4321\n").unwrap();
        assert_eq!(uri.pin().unwrap().as_deref().map(String::as_str), Some("4321"));
        std::fs::write(&path, "9999").unwrap();
        assert_eq!(uri.pin().unwrap().as_deref().map(String::as_str), Some("9999"));
        assert_eq!(uri.with_object("k").object.as_deref(), Some("k"));
    }

    #[test]
    fn a_pin_file_is_resolved_into_a_pin_value() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, "12 34&=%\nsecond line\n").unwrap();
        let text = format!("pkcs11:token=t;object=o?module-name=m&pin-source=file:{}&x=1", path.display());
        let resolved = Pkcs11Uri::resolve_pin_file(&text).unwrap();
        assert!(!resolved.contains("pin-source") && !resolved.contains(&*path.to_string_lossy()), "{}", *resolved);
        let uri = Pkcs11Uri::parse(&resolved).unwrap();
        assert!(matches!(uri.pin, Some(PinSource::Value(_))));
        assert_eq!(uri.pin().unwrap().as_deref().map(String::as_str), Some("12 34&=%"));
        assert_eq!((uri.token.as_deref(), uri.object.as_deref()), (Some("t"), Some("o")));
        // read once: a later change of the file does not matter any more
        std::fs::write(&path, "9999").unwrap();
        assert_eq!(uri.pin().unwrap().as_deref().map(String::as_str), Some("12 34&=%"));
        // without a PIN file the text is kept as it is
        for plain in ["pkcs11:token=t?pin-value=1%202", "pkcs11:slot-id=3;object=k"] {
            assert_eq!(*Pkcs11Uri::resolve_pin_file(plain).unwrap(), plain);
        }
        // a missing file is an error that names it
        let missing = format!("pkcs11:token=t?pin-source=file:{}/nope", dir.path().display());
        let e = Pkcs11Uri::resolve_pin_file(&missing).unwrap_err();
        assert!(matches!(e, UriError::PinRead(_)) && e.to_string().contains("/nope"), "{e}");
    }
}
