//! EST answers as certd's EST client reads them (workers/certd/src/est/wire.rs): the
//! Content-Type check, the certs-only PKCS#7 body of /simpleenroll, /simplereenroll and
//! /cacerts (tried as PEM, then base64 with any whitespace, then DER), `Retry-After`; and the
//! EST URL and proxy parsers of the config.
//!
//! Input: byte 0 picks what the rest is.
//! Checks: no panic; every certificate returned re-encodes to DER that parses again.

#![no_main]

use aziot_certd::est::{http, wire};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [pick, rest @ ..] = data else { return };
    match pick % 4 {
        0 | 1 => {
            if let Ok(certs) = wire::certificates(rest) {
                for c in certs {
                    let der = c.to_der().expect("a returned certificate encodes");
                    openssl::x509::X509::from_der(&der).expect("its DER parses");
                }
            }
        }
        2 => {
            let Ok(text) = std::str::from_utf8(rest) else { return };
            let _ = wire::check_content_type(Some(text));
            if let Some(n) = wire::retry_after(Some(text)) {
                // delta-seconds only: digits, nothing else
                assert!(text.trim().bytes().all(|b| b.is_ascii_digit()));
                assert_eq!(text.trim().parse::<u64>().ok(), Some(n));
            }
        }
        _ => {
            let Ok(text) = std::str::from_utf8(rest) else { return };
            if let Ok(url) = http::Url::parse(text) {
                let _ = url.authority();
                // The log form never carries the user info.
                let masked = url.masked();
                if url.userinfo.is_some() {
                    assert!(masked.contains("://***:***@"), "user info not masked: {masked:?}");
                }
            }
            let _ = http::Proxy::parse(text);
        }
    }
});
