//! The mock EST server of the certd suites, by hand:
//!
//! ```text
//! cargo run -p aziot-tests --bin mock-est -- [--port N] [--dir DIR] [--user U --password P]
//!     [--require-client-cert] [--mode normal|garbage|slow:SECS|defer:N:SECS|status:CODE]
//! ```
//!
//! Prints where its CA is (`<dir>/ca.pem`: import it into certd as the `trusted_certs` cert) and
//! a certd config that enrolls against it, then serves until killed.

use std::time::Duration;

use aziot_tests::mock_est::{MockEst, Mode, Options};

fn usage() -> ! {
    eprintln!(
        "usage: mock-est [--port N] [--dir DIR] [--user U --password P] [--require-client-cert]\n                \
         [--mode normal|garbage|slow:SECS|defer:N:SECS|status:CODE]"
    );
    std::process::exit(2)
}

fn parse_mode(s: &str) -> Option<Mode> {
    let parts: Vec<&str> = s.split(':').collect();
    Some(match parts.as_slice() {
        ["normal"] => Mode::Normal,
        ["garbage"] => Mode::Garbage,
        ["slow", secs] => Mode::Slow(Duration::from_secs(secs.parse().ok()?)),
        ["defer", n, secs] => Mode::Defer { times: n.parse().ok()?, retry_after: secs.parse().ok()? },
        ["status", code] => Mode::Status(code.parse().ok()?),
        _ => return None,
    })
}

fn main() {
    let mut options = Options::default();
    let mut mode = Mode::Normal;
    let (mut user, mut password) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--port" => options.port = value().parse().unwrap_or_else(|_| usage()),
            "--dir" => options.dir = Some(value().into()),
            "--user" => user = Some(value()),
            "--password" => password = Some(value()),
            "--require-client-cert" => options.require_client_cert = true,
            "--mode" => mode = parse_mode(&value()).unwrap_or_else(|| usage()),
            _ => usage(),
        }
    }
    options.basic = match (user, password) {
        (Some(u), Some(p)) => Some((u, p)),
        (None, None) => None,
        _ => usage(),
    };
    let basic = options.basic.clone();
    if options.dir.is_none() {
        options.dir = Some(std::env::temp_dir().join(format!("mock-est-{}", std::process::id())));
    }
    let est = MockEst::start(options);
    est.set_mode(mode.clone());
    let ca = est.dir().join("ca.pem");
    println!("mock EST server: {} (mode {mode:?})", est.url());
    println!("its CA and server certificate: {}", est.dir().display());
    println!();
    println!("# certd: import its CA, then enroll (see docs/certd.md \"EST\")");
    println!("#   curl --unix-socket /run/aziot/certd.sock -X PUT -H 'content-type: application/json' \\");
    println!("#     --data \"$(jq -Rs '{{pem: .}}' {})\" 'http://localhost/certificates/est-server-ca?api-version=2020-09-01'", ca.display());
    println!("[cert_issuance.est]");
    println!("trusted_certs = [\"est-server-ca\"]");
    if let Some((u, p)) = &basic {
        println!("username = {u:?}\npassword = {p:?}");
    }
    println!("[cert_issuance.est.urls]\ndefault = {:?}", est.url());
    println!("[cert_issuance.my-device]\nmethod = \"est\"");
    loop {
        std::thread::park();
    }
}
