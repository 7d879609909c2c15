//! DPS and IoT Hub answers as identityd reads them: the raw HTTP/1.1 response through the
//! transport's reader (`hub::transport::read_response`: status line, headers, Content-Length,
//! chunked, 1xx skipped, size caps), then the DPS checks (status errors and their JSON bodies,
//! operation status, assignment, the TPM authenticationKey) or the Hub's module checks (lenient
//! module objects, symmetric keys in base64, error bodies).
//!
//! Input: byte 0 picks DPS or Hub and whether a body is read; the rest is the response bytes.
//! Checks: no panic; a response read has a 3-digit status and lower-case header names; an
//! assigned DPS registration names a hub and a device.

#![no_main]

use std::time::{Duration, Instant};

use aziot_identityd::hub::transport::read_response;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [pick, rest @ ..] = data else { return };
    let mut reader = rest;
    let deadline = Instant::now() + Duration::from_secs(10);
    let Ok(response) = read_response(&mut reader, pick & 2 == 0, pick & 4 != 0, deadline) else { return };
    assert!((200..1000).contains(&response.status), "status {}", response.status);
    for (name, _) in &response.headers {
        assert_eq!(*name, name.to_ascii_lowercase());
    }
    if pick & 1 == 0 {
        if let Ok(Some(a)) = aziot_identityd::dps::client::classify_for_fuzzing(&response) {
            assert!(!a.assigned_hub.is_empty() && !a.device_id.is_empty());
        }
    } else {
        let _ = aziot_identityd::hub::client::classify_for_fuzzing(&response);
    }
});
