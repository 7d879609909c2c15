//! Parsing of `set_parameter` values (spec/keyd.md §7.1, §7.7): `file://` and `pkcs11:` URIs.
//!
//! Error messages never quote values: a `pkcs11:` URI can carry a PIN.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

use zeroize::Zeroizing;

use crate::{Error, Result};

/// Where a preloaded key lives.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum PreloadedLocation {
    /// An absolute file path.
    File(PathBuf),
    /// A `pkcs11:` URI (validated, stored verbatim; may carry a PIN, so zeroized on drop and
    /// printed without it).
    Pkcs11(Zeroizing<String>),
}

impl std::fmt::Debug for PreloadedLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PreloadedLocation::File(path) => f.debug_tuple("File").field(path).finish(),
            PreloadedLocation::Pkcs11(text) => match crate::pkcs11_uri::Pkcs11Uri::parse(text) {
                Ok(uri) => write!(f, "Pkcs11({uri})"),
                Err(_) => f.write_str("Pkcs11(<unparsable>)"),
            },
        }
    }
}

/// Decodes `%XX` escapes. A `%` not followed by two hex digits is an invalid parameter.
pub(crate) fn percent_decode(s: &str) -> Result<Vec<u8>> {
    crate::pkcs11_uri::percent_decode(s).ok_or_else(|| Error::invalid("URI contains an invalid percent escape"))
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &s[prefix.len()..])
}

/// Parses `file:///abs/path` (or `file://localhost/abs/path`) into a path. The path is
/// percent-decoded; as with a URL parser, it ends at `?` or `#`. It must name a file (not end
/// in `/`) and contain no NUL.
pub(crate) fn parse_file_uri(value: &str) -> Result<PathBuf> {
    let rest = strip_prefix_ignore_case(value, "file://").ok_or_else(|| Error::invalid("not a file:// URI"))?;
    let path = if rest.starts_with('/') {
        rest
    } else {
        match strip_prefix_ignore_case(rest, "localhost") {
            Some(p) if p.starts_with('/') => p,
            _ => return Err(Error::invalid("file:// URI must have an absolute path and no host")),
        }
    };
    let end = path.find(['?', '#']).unwrap_or(path.len());
    let decoded = percent_decode(&path[..end])?;
    if decoded.contains(&0) {
        return Err(Error::invalid("file:// URI path contains NUL"));
    }
    if decoded.ends_with(b"/") {
        return Err(Error::invalid("file:// URI does not name a file"));
    }
    let path = PathBuf::from(OsString::from_vec(decoded));
    if path.file_name().is_none() {
        return Err(Error::invalid("file:// URI does not name a file"));
    }
    Ok(path)
}

/// Validates a `pkcs11:` URI (see [`crate::pkcs11_uri`]): the scheme, well-formed attributes,
/// and a `slot-id`, `token` or `serial` path attribute; returns the text to keep, with a
/// `pin-source` file already read into a `pin-value` (see
/// [`crate::pkcs11_uri::Pkcs11Uri::resolve_pin_file`]).
pub(crate) fn resolve_pkcs11_uri(value: &str) -> Result<Zeroizing<String>> {
    let invalid = |e: crate::pkcs11_uri::UriError| Error::invalid(e.to_string());
    crate::pkcs11_uri::Pkcs11Uri::parse(value).map_err(invalid)?;
    crate::pkcs11_uri::Pkcs11Uri::resolve_pin_file(value).map_err(invalid)
}

/// Parses the value of `preloaded_key:<id>`.
pub(crate) fn parse_preloaded_location(value: &str) -> Result<PreloadedLocation> {
    if strip_prefix_ignore_case(value, "file:").is_some() {
        parse_file_uri(value).map(PreloadedLocation::File)
    } else if strip_prefix_ignore_case(value, "pkcs11:").is_some() {
        Ok(PreloadedLocation::Pkcs11(resolve_pkcs11_uri(value)?))
    } else {
        Err(Error::invalid("preloaded key location must be a file:// or pkcs11: URI"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%20b%2Fc%2f").unwrap(), b"a b/c/");
        assert!(percent_decode("a%2").is_err());
        assert!(percent_decode("a%zz").is_err());
        assert_eq!(percent_decode("%E2%82%AC").unwrap(), "€".as_bytes());
    }

    #[test]
    fn file_uris() {
        assert_eq!(parse_file_uri("file:///var/secrets/device-id").unwrap(), PathBuf::from("/var/secrets/device-id"));
        assert_eq!(parse_file_uri("file://localhost/a%20b").unwrap(), PathBuf::from("/a b"));
        assert_eq!(parse_file_uri("FILE:///x?query#frag").unwrap(), PathBuf::from("/x"));
        for bad in
            ["file://host/x", "file:relative", "file:///dir/", "file:///a%00b", "file:///", "file:///%zz", "http:///x"]
        {
            assert!(matches!(parse_file_uri(bad), Err(Error::InvalidParameter(_))), "{bad}");
        }
    }

    #[test]
    fn pkcs11_uris() {
        resolve_pkcs11_uri("pkcs11:token=Key%20pairs?pin-value=1234").unwrap();
        resolve_pkcs11_uri("pkcs11:slot-id=3;object=device-id").unwrap();
        for bad in
            ["pkcs11:object=x", "pkcs11:slot-id=abc", "pkcs11:token=%ff", "file:///x", "pkcs11:token=a?pin-value=%zz"]
        {
            assert!(matches!(resolve_pkcs11_uri(bad), Err(Error::InvalidParameter(_))), "{bad}");
        }
    }

    #[test]
    fn preloaded_locations() {
        assert_eq!(
            parse_preloaded_location("file:///k/device-id").unwrap(),
            PreloadedLocation::File(PathBuf::from("/k/device-id"))
        );
        assert_eq!(
            parse_preloaded_location("pkcs11:token=t;object=o").unwrap(),
            PreloadedLocation::Pkcs11(Zeroizing::new("pkcs11:token=t;object=o".into()))
        );
        assert!(matches!(parse_preloaded_location("/k/device-id"), Err(Error::InvalidParameter(_))));
        let with_pin = parse_preloaded_location("pkcs11:token=t;object=o?pin-value=hunter2").unwrap();
        assert_eq!(format!("{with_pin:?}"), "Pkcs11(pkcs11:token=t;object=o?pin-value=<redacted>)");
    }
}
