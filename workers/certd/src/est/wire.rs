//! The EST wire format (RFC 7030 §4; spec certd.md §6.5): the enrollment body, the
//! certs-only PKCS#7 answer, `Retry-After`.

use openssl::pkcs7::Pkcs7;
use openssl::x509::X509;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("EST endpoint returned Content-Type {0:?}, not application/pkcs7-mime")]
    ContentType(String),
    #[error("EST endpoint returned a body that is not a PKCS#7 certs-only message (neither PEM, base64 DER nor DER)")]
    NotPkcs7,
    #[error("EST endpoint returned a PKCS#7 message that is not SignedData")]
    NotSignedData,
    #[error("EST endpoint returned no certificate")]
    NoCertificate,
}

/// The body of `/simpleenroll` and `/simplereenroll`: base64 of the DER CSR in lines of 64
/// characters, each ending in `\n`.
pub fn enroll_body(csr_der: &[u8]) -> Vec<u8> {
    let b64 = openssl::base64::encode_block(csr_der);
    let mut out = Vec::with_capacity(b64.len() + b64.len() / 64 + 1);
    for line in b64.as_bytes().chunks(64) {
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out
}

/// Checks the Content-Type of an answer (`application/pkcs7-mime`, with or without
/// parameters; compared case-sensitively, as upstream).
pub fn check_content_type(content_type: Option<&str>) -> Result<(), WireError> {
    let ct = content_type.unwrap_or("");
    if ct == "application/pkcs7-mime" || ct.starts_with("application/pkcs7-mime;") {
        Ok(())
    } else {
        Err(WireError::ContentType(ct.chars().take(100).collect()))
    }
}

/// The certificates of a certs-only PKCS#7 answer, in encoded order: tried as PEM, then as
/// base64 (any whitespace ignored; the usual `Content-Transfer-Encoding: base64`), then as DER
/// (a server sending binary).
pub fn certificates(body: &[u8]) -> Result<Vec<X509>, WireError> {
    let p7 = match Pkcs7::from_pem(body) {
        Ok(p) => p,
        Err(_) => {
            let compact: String = body.iter().filter(|b| !b.is_ascii_whitespace()).map(|b| char::from(*b)).collect();
            let der = openssl::base64::decode_block(&compact).ok();
            match der.as_deref().and_then(|d| Pkcs7::from_der(d).ok()) {
                Some(p) => p,
                None => Pkcs7::from_der(body).map_err(|_| WireError::NotPkcs7)?,
            }
        }
    };
    // parsing failures above leave entries on OpenSSL's error queue
    let _ = openssl::error::ErrorStack::get();
    let signed = p7.signed().ok_or(WireError::NotSignedData)?;
    Ok(signed.certificates().map(|s| s.iter().map(|c| c.to_owned()).collect()).unwrap_or_default())
}

/// `Retry-After` as delta-seconds (an HTTP-date is not accepted: an EST server answers 202
/// with a delay).
pub fn retry_after(value: Option<&str>) -> Option<u64> {
    value.map(str::trim).filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())).and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_lines_are_64_characters() {
        let body = enroll_body(&[7u8; 100]);
        let text = String::from_utf8(body).unwrap();
        let lines: Vec<&str> = text.split_terminator('\n').collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[..2].iter().all(|l| l.len() == 64));
        assert!(text.ends_with('\n'));
        assert_eq!(openssl::base64::decode_block(&lines.concat()).unwrap(), vec![7u8; 100]);
    }

    #[test]
    fn content_types() {
        assert!(check_content_type(Some("application/pkcs7-mime")).is_ok());
        assert!(check_content_type(Some("application/pkcs7-mime; smime-type=certs-only")).is_ok());
        for bad in [None, Some("text/plain"), Some("Application/PKCS7-mime"), Some("application/pkcs7-mimex")] {
            assert!(check_content_type(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn garbage_is_not_pkcs7() {
        assert!(matches!(certificates(b"hello, world"), Err(WireError::NotPkcs7)));
        assert!(matches!(certificates(b""), Err(WireError::NotPkcs7)));
    }

    #[test]
    fn retry_after_values() {
        assert_eq!(retry_after(Some(" 3 ")), Some(3));
        assert_eq!(retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT")), None);
        assert_eq!(retry_after(Some("-1")), None);
        assert_eq!(retry_after(None), None);
    }
}
