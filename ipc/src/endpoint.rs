//! Endpoint URIs (`[endpoints]` values): `unix:///abs/path.sock`, `fd://<n>`, `fd://<name>`.

use std::path::PathBuf;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket at this path.
    Unix(PathBuf),
    /// An inherited descriptor, by number.
    FdNumber(i32),
    /// An inherited descriptor, by systemd `LISTEN_FDNAMES` name.
    FdName(String),
}

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("malformed URI {uri:?}: unrecognized scheme {scheme:?}")]
    Scheme { uri: String, scheme: String },
    #[error("malformed URI {uri:?}: {reason}")]
    Malformed { uri: String, reason: &'static str },
    #[error("servers can only use `unix://` connectors, not `http://` connectors")]
    Tcp,
}

impl Endpoint {
    pub fn parse(uri: &str) -> Result<Self, EndpointError> {
        let Some((scheme, rest)) = uri.split_once("://") else {
            return Err(EndpointError::Malformed { uri: uri.to_owned(), reason: "missing scheme" });
        };
        match scheme {
            "unix" => {
                let path = percent_decode(rest)
                    .ok_or(EndpointError::Malformed { uri: uri.to_owned(), reason: "bad percent-encoding" })?;
                if !path.starts_with('/') {
                    return Err(EndpointError::Malformed { uri: uri.to_owned(), reason: "path must be absolute" });
                }
                Ok(Endpoint::Unix(PathBuf::from(path)))
            }
            "fd" => {
                if rest.is_empty() {
                    return Err(EndpointError::Malformed { uri: uri.to_owned(), reason: "empty fd" });
                }
                Ok(match rest.parse::<i32>() {
                    Ok(n) => Endpoint::FdNumber(n),
                    Err(_) => Endpoint::FdName(rest.to_owned()),
                })
            }
            "http" => Err(EndpointError::Tcp),
            other => Err(EndpointError::Scheme { uri: uri.to_owned(), scheme: other.to_owned() }),
        }
    }

    /// The default endpoint of a service: `unix:///run/aziot/<service>.sock`.
    pub fn default_for(service: &str) -> Self {
        Endpoint::Unix(PathBuf::from(format!("{}/{service}.sock", crate::SOCKET_DIR)))
    }
}

/// Percent-decodes a URI component as UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        assert_eq!(Endpoint::parse("unix:///run/aziot/keyd.sock").unwrap(), Endpoint::Unix("/run/aziot/keyd.sock".into()));
        assert_eq!(Endpoint::parse("unix:///a%20b").unwrap(), Endpoint::Unix("/a b".into()));
        assert_eq!(Endpoint::parse("fd://3").unwrap(), Endpoint::FdNumber(3));
        assert_eq!(Endpoint::parse("fd://aziot-keyd.socket").unwrap(), Endpoint::FdName("aziot-keyd.socket".into()));
        assert!(Endpoint::parse("http://localhost:80").unwrap_err().to_string().contains("only use `unix://`"));
        assert!(Endpoint::parse("ftp://x").unwrap_err().to_string().contains("unrecognized scheme \"ftp\""));
        assert!(Endpoint::parse("unix://relative").is_err());
        assert!(Endpoint::parse("nothing").is_err());
    }

    #[test]
    fn decode() {
        assert_eq!(percent_decode("a%2Fb").as_deref(), Some("a/b"));
        assert_eq!(percent_decode("%e2%82%ac").as_deref(), Some("€"));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%ff"), None);
        assert_eq!(percent_decode("%4"), None);
    }
}
