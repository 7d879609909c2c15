//! The key URI of the provider's store loader:
//!
//! ```text
//! aziot-keys:handle=<percent-encoded keyd key-pair handle>
//! ```
//!
//! The scheme is matched case-insensitively (OpenSSL fetches the loader by the scheme name); the
//! rest is `;`-separated `name=value` attributes (the shape of RFC 7512 PKCS#11 URIs). The only
//! attribute is `handle`, exactly once; its value is percent-decoded (`%XX`, both hex cases) and
//! must be non-empty UTF-8; other characters but `;`, `%`, `?`, `#` are taken literally (so a
//! raw handle usually works too, but `%` and `;` in it must be escaped). Anything else — an unknown attribute, a repeated one, a bad escape,
//! a `?query` or `#fragment`, a URI longer than [`MAX_URI`] — is an error naming the problem.
//! A keyd handle (`sr=<base64>&sig=<base64>`) contains `=`, `&`, `+`, `/`: [`to_uri`] escapes
//! every byte but `A-Z a-z 0-9 - . _ ~`.

use std::ffi::CStr;

use crate::error::Error;

/// The scheme (and store algorithm name).
pub const SCHEME: &str = "aziot-keys";
pub(crate) const SCHEME_C: &CStr = c"aziot-keys";
/// Longest URI accepted (a keyd handle is a few hundred bytes).
pub const MAX_URI: usize = 16 * 1024;

/// What a URI names.
#[derive(Debug, PartialEq, Eq)]
pub struct KeyUri {
    pub handle: String,
}

/// Parses an `aziot-keys:` URI.
pub fn parse(uri: &str) -> Result<KeyUri, Error> {
    let bad = |m: String| Err(Error::BadUri(m));
    if uri.len() > MAX_URI {
        return bad(format!("longer than {MAX_URI} bytes"));
    }
    let Some((scheme, rest)) = uri.split_once(':') else {
        return bad("no scheme".to_owned());
    };
    if !scheme.eq_ignore_ascii_case(SCHEME) {
        return bad(format!("scheme {scheme:?} is not {SCHEME:?}"));
    }
    if rest.starts_with("//") {
        return bad("an authority (//) is not allowed".to_owned());
    }
    if rest.contains(['?', '#']) {
        return bad("a query or fragment is not allowed".to_owned());
    }
    let mut handle = None;
    for attr in rest.split(';') {
        let Some((name, value)) = attr.split_once('=') else {
            return bad(format!("attribute {:?} has no value", shorten(attr)));
        };
        match name {
            "handle" => {
                if handle.is_some() {
                    return bad("attribute \"handle\" given twice".to_owned());
                }
                let v = decode(value)?;
                if v.is_empty() {
                    return bad("the handle is empty".to_owned());
                }
                handle = Some(v);
            }
            other => return bad(format!("unknown attribute {:?}", shorten(other))),
        }
    }
    match handle {
        Some(handle) => Ok(KeyUri { handle }),
        None => bad("no handle attribute".to_owned()),
    }
}

/// The URI naming `handle`.
pub fn to_uri(handle: &str) -> String {
    let mut s = String::with_capacity(SCHEME.len() + 8 + handle.len() * 3);
    s.push_str(SCHEME);
    s.push_str(":handle=");
    for b in handle.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

fn shorten(s: &str) -> String {
    s.chars().take(40).collect()
}

fn decode(v: &str) -> Result<String, Error> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .filter(|_| b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit());
            match hex {
                Some(x) => out.push(x),
                None => {
                    return Err(Error::BadUri(format!(
                        "bad percent escape at byte {} of the handle",
                        i
                    )))
                }
            }
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Error::BadUri("the handle is not UTF-8".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "sr=eyJrZXlfaWQiOnsiS2V5UGFpciI6ImsifSwibm9uY2UiOiIifQ==&sig=a+b/c=";

    #[test]
    fn round_trip_and_case() {
        let u = to_uri(H);
        assert!(u.starts_with("aziot-keys:handle=sr%3D"), "{u}");
        assert!(!u[SCHEME.len() + 1..].contains(['&', '+', '/']), "{u}");
        assert_eq!(parse(&u).unwrap().handle, H);
        // the scheme in any case, lowercase hex escapes
        let other = u
            .replacen("aziot-keys", "Aziot-Keys", 1)
            .replace("%3D", "%3d");
        assert_eq!(parse(&other).unwrap().handle, H);
    }

    #[test]
    fn rejects_with_a_reason() {
        for (uri, why) in [
            ("file:/etc/passwd", "is not"),
            ("aziot-keys", "no scheme"),
            ("aziot-keys:", "has no value"),
            ("aziot-keys:handle=", "empty"),
            ("aziot-keys:handle=a;handle=b", "twice"),
            ("aziot-keys:id=device", "unknown attribute \"id\""),
            (
                "aziot-keys:handle=a;object=b",
                "unknown attribute \"object\"",
            ),
            ("aziot-keys:handle=%zz", "percent escape"),
            ("aziot-keys:handle=%4", "percent escape"),
            ("aziot-keys:handle=%+1", "percent escape"),
            ("aziot-keys:handle=%ff", "not UTF-8"),
            ("aziot-keys://host/handle=a", "authority"),
            ("aziot-keys:handle=a?x=1", "query"),
            ("aziot-keys:handle=a#f", "fragment"),
        ] {
            match parse(uri) {
                Err(e @ Error::BadUri(_)) => {
                    assert!(e.to_string().contains(why), "{uri}: {e}")
                }
                other => panic!("{uri}: {other:?}"),
            }
        }
        assert!(parse(&format!("aziot-keys:handle={}", "a".repeat(MAX_URI))).is_err());
    }

    /// The URI parser's fuzz target, run as a test (no fuzzing crate in the workspace): a
    /// deterministic xorshift generator mutates valid URIs (byte flips, inserted separators,
    /// truncation, splices) and draws random strings; the parser must never panic, must accept
    /// only URIs that start with `aziot-keys:handle=` and name a non-empty handle, and every accepted handle must round-trip
    /// through `to_uri`.
    #[test]
    fn fuzz_the_uri_parser() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet: &[u8] = b"aziot-keys:handle=;%0123456789abcdefABCDEF&+/=?#\xc3\xa9\x00 ";
        let seeds = [to_uri(H), to_uri("k"), "aziot-keys:handle=x".to_owned()];
        let mut accepted = 0;
        for round in 0..20_000 {
            let mut bytes: Vec<u8> = if round % 4 == 0 {
                (0..(next() % 64))
                    .map(|_| alphabet[(next() as usize) % alphabet.len()])
                    .collect()
            } else {
                seeds[(next() as usize) % seeds.len()].clone().into_bytes()
            };
            for _ in 0..(next() % 4) {
                if bytes.is_empty() {
                    break;
                }
                let at = (next() as usize) % bytes.len();
                match next() % 4 {
                    0 => bytes[at] = alphabet[(next() as usize) % alphabet.len()],
                    1 => bytes.insert(at, alphabet[(next() as usize) % alphabet.len()]),
                    2 => bytes.truncate(at),
                    _ => {
                        let tail = bytes[at..].to_vec();
                        bytes.extend_from_slice(&tail);
                    }
                }
            }
            let Ok(s) = String::from_utf8(bytes) else {
                continue;
            };
            if let Ok(k) = parse(&s) {
                accepted += 1;
                assert!(!k.handle.is_empty(), "{s:?}");
                assert_eq!(parse(&to_uri(&k.handle)).unwrap(), k, "{s:?}");
                assert!(
                    s.to_ascii_lowercase().starts_with("aziot-keys:handle="),
                    "{s:?}"
                );
            }
        }
        assert!(
            accepted > 100,
            "the mutations kept too few valid URIs: {accepted}"
        );
    }
}
