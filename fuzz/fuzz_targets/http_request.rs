//! The HTTP request path of the shared server (ipc/src/server.rs): raw bytes, as one or more
//! pipelined requests, through the real hyper HTTP/1 connection (`serve_connection`, the code
//! `run` serves every accepted socket with) on an in-memory stream, into the real pipeline
//! (api-version, Content-Type, Content-Length, the 4 KiB body cap here, the body deadline) and
//! the real route tables of keyd, certd and identityd (file-backed keys in a scratch directory;
//! certd's and identityd's calls to keyd fail: no socket).
//!
//! Input: byte 0 picks the service (mod 3) and the caller (/3 mod 3: root, a principal, a
//! stranger), byte 1 how many bytes the server reads at a time; the rest is the connection.
//! Checks: no panic, no hang (libFuzzer's -timeout), the server writes only HTTP/1.1 responses.

#![no_main]

use aziot_fuzz::{check_responses, exchange, Services, UIDS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [pick, chunk, rest @ ..] = data else { return };
    let services = Services::get();
    let uid = UIDS[usize::from(pick / 3) % UIDS.len()];
    let chunk = usize::from(*chunk) * 16 + 1;
    let out = match pick % 3 {
        0 => exchange(&services.keyd, uid, chunk, rest),
        1 => exchange(&services.certd, uid, chunk, rest),
        _ => exchange(&services.identityd, uid, chunk, rest),
    };
    check_responses(&out);
});
