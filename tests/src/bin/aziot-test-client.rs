//! Helper for the test suite: performs exactly one HTTP exchange on a unix socket and prints
//! the outcome as JSON on stdout. The suite spawns it with `Command::uid/gid` to act as another
//! user (the socket peer credentials are then that uid).
//!
//! Usage: `aziot-test-client <socket>`; the raw request bytes are read from stdin.
//! Output: the response (`aziot_tests::http::response_to_json`) or `{"error": "..."}`.

use std::io::Read as _;

fn main() {
    let sock = std::env::args_os()
        .nth(1)
        .expect("usage: aziot-test-client <socket>");
    let mut req = Vec::new();
    std::io::stdin().read_to_end(&mut req).expect("read stdin");
    let out = match aziot_tests::http::Conn::connect(std::path::Path::new(&sock)) {
        Err(e) => serde_json::json!({ "error": format!("connect: {e}") }),
        Ok(mut c) => match c.send_raw(&req).and_then(|()| c.read_response()) {
            Ok(r) => aziot_tests::http::response_to_json(&r),
            Err(e) => serde_json::json!({ "error": format!("exchange: {e} ({:?})", e.kind()) }),
        },
    };
    println!("{out}");
}
