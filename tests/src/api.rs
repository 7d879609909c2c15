//! Thin, spec-shaped helpers over the raw client: one function per keyd endpoint
//! (keyd.md §5). Every response is checked for the envelope rules of common-http.md §4.3/§6.1
//! before it is returned.

use std::path::PathBuf;

use serde_json::{json, Value};

use crate::crypto::{b64, unb64};
use crate::http::{self, build_request, build_request_ct, Response};
use crate::keyd::exchange_as;

pub const V2020: &str = "2020-09-01";
pub const V2021: &str = "2021-05-01";
pub const VERSIONS: [&str; 2] = [V2020, V2021];

/// Message of "400 lib" (keyd.md §5.15).
pub const LIB_INVALID: &str = "a parameter has an invalid value";
/// Message of a forged/garbage handle (keyd.md §4.3).
pub const INVALID_HANDLE: &str =
    "parameter \"handle\" has an invalid value\ncaused by: invalid handle";
pub const NOT_FOR_KEY: &str =
    "parameter \"handle\" has an invalid value\ncaused by: handle is not for a key";
pub const NOT_FOR_KEY_PAIR: &str =
    "parameter \"handle\" has an invalid value\ncaused by: handle is not for a key pair";
pub const NOT_FOR_DERIVED: &str =
    "parameter \"handle\" has an invalid value\ncaused by: handle is not for a derived key";
pub const BAD_MECHANISM: &str =
    "parameter \"mechanism\" has an invalid value\ncaused by: mechanism cannot be used with this key type";
pub const HANDLE_PREFIX: &str = "parameter \"handle\" has an invalid value";

pub fn unauthorized(uid: u32, id: &str) -> String {
    format!("user {uid} is not authorized to access the key {id}")
}

/// Check the response envelope (common-http.md §4.3, §4.4, §6.1). Panics with details.
pub fn check_envelope(r: &Response, what: &str) {
    assert_eq!(r.version, "HTTP/1.1", "{what}: response version\n{r}");
    assert!(
        r.headers.len() <= 16,
        "{what}: more than 16 response headers\n{r}"
    );
    if r.status == 204 {
        assert!(r.body.is_empty(), "{what}: 204 with a body\n{r}");
        return;
    }
    assert_eq!(
        r.header_count("content-type"),
        1,
        "{what}: exactly one Content-Type\n{r}"
    );
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{what}: Content-Type must be exactly application/json\n{r}"
    );
    assert!(
        !r.chunked,
        "{what}: JSON body must be Content-Length delimited, not chunked\n{r}"
    );
    let cl = r
        .header("content-length")
        .unwrap_or_else(|| panic!("{what}: no Content-Length\n{r}"));
    assert_eq!(
        cl.parse::<usize>().ok(),
        Some(r.body.len()),
        "{what}: Content-Length\n{r}"
    );
    let v: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("{what}: body is not JSON ({e})\n{r}"));
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{what}: body is not a JSON object\n{r}"));
    if r.status >= 400 {
        assert!(
            obj.len() == 1 && obj.get("message").is_some_and(Value::is_string),
            "{what}: error body must be exactly {{\"message\": string}}\n{r}"
        );
    }
}

/// A client for one socket, one api-version, and one caller uid (None = this process, root).
#[derive(Clone)]
pub struct Api {
    sock: PathBuf,
    pub version: &'static str,
    uid: Option<u32>,
}

impl Api {
    pub fn new(sock: PathBuf, version: &'static str) -> Api {
        Api {
            sock,
            version,
            uid: None,
        }
    }

    /// The same client, but every request is made by a child process running as `uid`.
    pub fn as_uid(&self, uid: u32) -> Api {
        Api {
            uid: Some(uid),
            ..self.clone()
        }
    }

    pub fn target(&self, path: &str) -> String {
        format!("{path}?api-version={}", self.version)
    }

    /// Send exact request bytes (as this client's uid) on a fresh connection.
    pub fn exchange(&self, req: &[u8]) -> Response {
        match self.uid {
            None => http::raw_once(&self.sock, req).unwrap_or_else(|e| {
                panic!("request failed: {e}\n{}", String::from_utf8_lossy(req))
            }),
            Some(uid) => exchange_as(uid, &self.sock, req).unwrap_or_else(|e| {
                panic!(
                    "request as uid {uid} failed: {e}\n{}",
                    String::from_utf8_lossy(req)
                )
            }),
        }
    }

    /// A JSON request; the envelope of the answer is checked.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        let body = body.map(|b| serde_json::to_vec(b).expect("json"));
        self.call_bytes(method, path, body.as_deref())
    }

    /// Arbitrary body bytes with `Content-Type: application/json`; envelope checked.
    pub fn call_bytes(&self, method: &str, path: &str, body: Option<&[u8]>) -> Response {
        let req = build_request(method, &self.target(path), body);
        let r = self.exchange(&req);
        check_envelope(&r, &format!("{method} {path} ({})", self.version));
        r
    }

    /// Body with a chosen (or no) Content-Type; envelope checked.
    pub fn call_ct(&self, method: &str, path: &str, body: &[u8], ct: Option<&str>) -> Response {
        let req = build_request_ct(method, &self.target(path), Some(body), ct);
        let r = self.exchange(&req);
        check_envelope(&r, &format!("{method} {path} ({})", self.version));
        r
    }

    pub fn post(&self, path: &str, body: &Value) -> Response {
        self.call("POST", path, Some(body))
    }

    pub fn get(&self, path: &str) -> Response {
        self.call("GET", path, None)
    }

    pub fn delete(&self, path: &str, body: &Value) -> Response {
        self.call("DELETE", path, Some(body))
    }

    // ----- typed helpers: assert success and return the interesting field -----

    pub fn create_key(&self, id: &str, usage: &str) -> String {
        let r = self.post("/key", &json!({"keyId": id, "usage": usage}));
        handle_of(&r, &format!("POST /key {id}"))
    }

    pub fn import_key(&self, id: &str, bytes: &[u8]) -> String {
        let r = self.post(
            "/key",
            &json!({"keyId": id, "usage": "derive,sign", "keyBytes": b64(bytes)}),
        );
        handle_of(&r, &format!("POST /key (import) {id}"))
    }

    /// POST /key with keyBytes and this usage (a PKCS#11 token makes an AES key for
    /// `encrypt` and a generic secret for `sign`/`derive`; the file backend stores bytes).
    pub fn import_key_usage(&self, id: &str, bytes: &[u8], usage: &str) -> String {
        let r = self.post(
            "/key",
            &json!({"keyId": id, "usage": usage, "keyBytes": b64(bytes)}),
        );
        handle_of(&r, &format!("POST /key (import, {usage}) {id}"))
    }

    pub fn get_key(&self, id: &str) -> String {
        let r = self.get(&format!("/key/{}", pct(id)));
        handle_of(&r, &format!("GET /key/{id}"))
    }

    pub fn create_keypair(&self, id: &str, algs: Option<&str>) -> String {
        let body = match algs {
            Some(a) => json!({"keyId": id, "preferredAlgorithms": a}),
            None => json!({"keyId": id}),
        };
        let r = self.post("/keypair", &body);
        handle_of(&r, &format!("POST /keypair {id}"))
    }

    pub fn get_keypair(&self, id: &str) -> String {
        let r = self.get(&format!("/keypair/{}", pct(id)));
        handle_of(&r, &format!("GET /keypair/{id}"))
    }

    pub fn param_resp(&self, handle: &str, name: &str) -> Response {
        self.post(
            &format!("/parameters/{name}"),
            &json!({"keyHandle": handle}),
        )
    }

    pub fn param(&self, handle: &str, name: &str) -> String {
        let r = self.param_resp(handle, name);
        expect_ok(&r, &format!("/parameters/{name}"));
        r.json()["value"]
            .as_str()
            .unwrap_or_else(|| panic!("no string value: {r}"))
            .to_owned()
    }

    pub fn sign_hmac_resp(&self, handle: &str, msg: &[u8]) -> Response {
        self.post(
            "/sign",
            &json!({"keyHandle": handle, "algorithm": "HMAC-SHA256", "parameters": {"message": b64(msg)}}),
        )
    }

    pub fn sign_hmac(&self, handle: &str, msg: &[u8]) -> Vec<u8> {
        let r = self.sign_hmac_resp(handle, msg);
        b64_field(&r, "signature", "/sign HMAC-SHA256")
    }

    pub fn sign_ecdsa_resp(&self, handle: &str, digest: &[u8]) -> Response {
        self.post(
            "/sign",
            &json!({"keyHandle": handle, "algorithm": "ECDSA", "parameters": {"digest": b64(digest)}}),
        )
    }

    pub fn sign_ecdsa(&self, handle: &str, digest: &[u8]) -> Vec<u8> {
        let r = self.sign_ecdsa_resp(handle, digest);
        b64_field(&r, "signature", "/sign ECDSA")
    }

    pub fn encrypt_aead_resp(&self, handle: &str, iv: &[u8], aad: &[u8], pt: &[u8]) -> Response {
        self.post(
            "/encrypt",
            &json!({"keyHandle": handle, "algorithm": "AEAD",
                    "parameters": {"iv": b64(iv), "aad": b64(aad)}, "plaintext": b64(pt)}),
        )
    }

    pub fn encrypt_aead(&self, handle: &str, iv: &[u8], aad: &[u8], pt: &[u8]) -> Vec<u8> {
        let r = self.encrypt_aead_resp(handle, iv, aad, pt);
        b64_field(&r, "ciphertext", "/encrypt AEAD")
    }

    pub fn decrypt_aead_resp(&self, handle: &str, iv: &[u8], aad: &[u8], ct: &[u8]) -> Response {
        self.post(
            "/decrypt",
            &json!({"keyHandle": handle, "algorithm": "AEAD",
                    "parameters": {"iv": b64(iv), "aad": b64(aad)}, "ciphertext": b64(ct)}),
        )
    }

    pub fn decrypt_aead(&self, handle: &str, iv: &[u8], aad: &[u8], ct: &[u8]) -> Vec<u8> {
        let r = self.decrypt_aead_resp(handle, iv, aad, ct);
        b64_field(&r, "plaintext", "/decrypt AEAD")
    }

    pub fn encrypt_rsa_resp(&self, handle: &str, alg: &str, pt: &[u8]) -> Response {
        self.post(
            "/encrypt",
            &json!({"keyHandle": handle, "algorithm": alg, "plaintext": b64(pt)}),
        )
    }

    pub fn encrypt_rsa(&self, handle: &str, alg: &str, pt: &[u8]) -> Vec<u8> {
        let r = self.encrypt_rsa_resp(handle, alg, pt);
        b64_field(&r, "ciphertext", &format!("/encrypt {alg}"))
    }

    pub fn derive_resp(&self, base: &str, data: &[u8]) -> Response {
        self.post(
            "/derivedkey",
            &json!({"baseKeyHandle": base, "derivationData": b64(data)}),
        )
    }

    pub fn derive(&self, base: &str, data: &[u8]) -> String {
        let r = self.derive_resp(base, data);
        handle_of(&r, "/derivedkey")
    }

    pub fn export_resp(&self, handle: &str) -> Response {
        self.post("/derivedkey/export", &json!({"keyHandle": handle}))
    }

    pub fn export(&self, handle: &str) -> Vec<u8> {
        let r = self.export_resp(handle);
        b64_field(&r, "key", "/derivedkey/export")
    }

    pub fn delete_key(&self, handle: &str) -> Response {
        self.delete("/key", &json!({"keyHandle": handle}))
    }

    pub fn delete_keypair(&self, handle: &str) -> Response {
        self.delete("/keypair", &json!({"keyHandle": handle}))
    }

    pub fn move_keypair(&self, from: &str, to: &str) -> Response {
        self.post(&format!("/keypair/{}", pct(to)), &json!({"from": from}))
    }
}

/// Percent-encode everything but unreserved characters (one path segment).
pub fn pct(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

pub fn expect_ok(r: &Response, what: &str) {
    assert_eq!(r.status, 200, "{what}: expected 200\n{r}");
}

/// Assert an error status and exact message.
#[track_caller]
pub fn expect_err(r: &Response, status: u16, message: &str) {
    assert_eq!(
        (r.status, r.message().as_str()),
        (status, message),
        "unexpected error response\n{r}"
    );
}

/// Assert an error status and a message prefix.
#[track_caller]
pub fn expect_err_prefix(r: &Response, status: u16, prefix: &str) {
    assert_eq!(r.status, status, "unexpected status\n{r}");
    let m = r.message();
    assert!(
        m.starts_with(prefix),
        "message {m:?} should start with {prefix:?}\n{r}"
    );
}

pub fn handle_of(r: &Response, what: &str) -> String {
    expect_ok(r, what);
    let v = r.json();
    let obj = v.as_object().expect("object");
    assert_eq!(obj.len(), 1, "{what}: exactly one member expected: {v}");
    obj["keyHandle"]
        .as_str()
        .unwrap_or_else(|| panic!("{what}: keyHandle missing: {v}"))
        .to_owned()
}

pub fn b64_field(r: &Response, field: &str, what: &str) -> Vec<u8> {
    expect_ok(r, what);
    let v = r.json();
    unb64(
        v[field]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {field} missing: {v}")),
    )
}
