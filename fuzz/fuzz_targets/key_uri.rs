//! The OpenSSL provider's key URI parser (engine/src/provider/uri.rs): `aziot-keys:handle=...`.
//! Checks: no panic; a parsed URI's handle is not empty, and `to_uri` of it parses back to the
//! same handle; `to_uri` of any text parses back to that text (when within the length cap).

#![no_main]

use aziot_key_openssl_engine::provider::uri;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(parsed) = uri::parse(text) {
        assert!(!parsed.handle.is_empty());
        let printed = uri::to_uri(&parsed.handle);
        if printed.len() <= uri::MAX_URI {
            assert_eq!(uri::parse(&printed).expect("a printed URI parses").handle, parsed.handle);
        }
    }
    if !text.is_empty() {
        let printed = uri::to_uri(text);
        if printed.len() <= uri::MAX_URI {
            assert_eq!(uri::parse(&printed).expect("a printed URI parses").handle, text);
        }
    }
});
