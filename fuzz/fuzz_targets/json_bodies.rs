//! Every service's JSON request bodies, each decoded by the service's own serde types and
//! checked by its own validation, through the real handler of the route that takes it:
//! keyd (create, key pair, import, derive, export, sign, encrypt, decrypt), certd (create,
//! import, delete) and identityd (device, modules, module update/delete, reprovision) as an
//! HTTP request with the input as its body; tpmd's bodies (import, sign: a TPM is needed to
//! serve them) by its serde types, whose base64 must be canonical.
//!
//! Input: byte 0 picks the route and the caller; the rest is the body.

#![no_main]

use aziot_fuzz::{check_responses, exchange, Services, UIDS};
use libfuzzer_sys::fuzz_target;

/// (service, method, path and query)
const ROUTES: &[(u8, &str, &str)] = &[
    (0, "POST", "/key?api-version=2020-09-01"),
    (0, "POST", "/keypair?api-version=2020-09-01"),
    (0, "POST", "/derivedkey?api-version=2020-09-01"),
    (0, "POST", "/derivedkey/export?api-version=2020-09-01"),
    (0, "POST", "/sign?api-version=2020-09-01"),
    (0, "POST", "/encrypt?api-version=2020-09-01"),
    (0, "POST", "/decrypt?api-version=2020-09-01"),
    (0, "POST", "/key/a1?api-version=2020-09-01"),
    (0, "POST", "/keypair/a1?api-version=2021-05-01"),
    (1, "POST", "/certificates?api-version=2020-09-01"),
    (1, "PUT", "/certificates/a1?api-version=2020-09-01"),
    (1, "DELETE", "/certificates/a1?api-version=2020-09-01"),
    (2, "POST", "/identities/device?api-version=2020-09-01"),
    (2, "POST", "/identities/modules?api-version=2020-09-01"),
    (2, "PUT", "/identities/modules/amod?api-version=2020-09-01&type=aziot"),
    (2, "DELETE", "/identities/modules/amod?api-version=2020-09-01&type=aziot"),
    (2, "POST", "/identities/device/reprovision?api-version=2020-09-01"),
    (3, "", "import"),
    (3, "", "sign"),
];

fuzz_target!(|data: &[u8]| {
    let [pick, body @ ..] = data else { return };
    let (service, method, path) = ROUTES[usize::from(*pick) % ROUTES.len()];
    let uid = UIDS[usize::from(*pick) / ROUTES.len() % UIDS.len()];
    if service == 3 {
        if path == "import" {
            let _ = serde_json::from_slice::<aziot_tpmd::api::ImportAuthKeyRequest>(body);
        } else {
            let _ = serde_json::from_slice::<aziot_tpmd::api::SignRequest>(body);
        }
        // Canonical base64 only: what decodes re-encodes to the same text.
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
            if let Some(text) = v.get("data").and_then(|d| d.as_str()) {
                if let Ok(req) = serde_json::from_slice::<aziot_tpmd::api::SignRequest>(body) {
                    use base64::Engine as _;
                    assert_eq!(base64::engine::general_purpose::STANDARD.encode(&req.data.0), text);
                }
            }
        }
        return;
    }
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: fuzz\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    let services = Services::get();
    let out = match service {
        0 => exchange(&services.keyd, uid, request.len(), &request),
        1 => exchange(&services.certd, uid, request.len(), &request),
        _ => exchange(&services.identityd, uid, request.len(), &request),
    };
    check_responses(&out);
    // Exactly one answer to one complete request.
    assert!(out.starts_with(b"HTTP/1.1 "), "no answer to a complete request: {:?}", String::from_utf8_lossy(&out));
});
