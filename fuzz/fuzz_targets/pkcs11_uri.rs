//! Fuzzes the PKCS#11 URI parser: it must never panic, a parsed URI must print without its PIN,
//! and the printed form (without the query) must parse again to the same path attributes.
//!
//! Run: `scripts/fuzz pkcs11_uri` (docs/fuzzing.md).

#![no_main]

use aziot_keys::pkcs11_uri::{PinSource, Pkcs11Uri};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(uri) = Pkcs11Uri::parse_any(text) else {
        return;
    };
    let shown = uri.to_string();
    if let Some(PinSource::Value(_)) = &uri.pin {
        assert_eq!(shown.split_once('?').map(|(_, q)| q), Some("pin-value=<redacted>"));
    }
    let path_only = shown.split('?').next().unwrap();
    let again = Pkcs11Uri::parse_any(path_only).expect("the printed form parses");
    assert_eq!(again.token, uri.token);
    assert_eq!(again.serial, uri.serial);
    assert_eq!(again.slot_id, uri.slot_id);
    assert_eq!(again.object, uri.object);
    assert_eq!(again.id, uri.id);
    assert_eq!(again.object_type, uri.object_type);
});
