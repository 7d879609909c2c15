//! The OpenSSL 3 provider `aziot_keys` (issue 16; docs/engine.md "The provider"), against a live
//! keyd started by the harness (broker + confined worker), with unmodified OpenSSL programs.
//!
//! The `openssl` CLI runs as [`APP`], a keyd principal in the socket's group, with
//! `OPENSSL_MODULES` pointing at a temporary directory holding a copy of the built cdylib as
//! `aziot_keys.so` (nothing is installed system-wide) and `AZIOT_KEYD_ENDPOINT` at the test's
//! keyd; keys are named by `aziot-keys:handle=<percent-encoded handle>` URIs. Public keys for
//! verification are built from keyd's `/parameters` by the suite itself, and every verification
//! runs in a separate `openssl` process without the provider.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use aziot_key_openssl_engine::provider::uri::to_uri;
use aziot_tests::api::*;
use aziot_tests::crypto::*;
use aziot_tests::keyd::{Backend, TEST_GID};
use aziot_tests::openssl_cli::{
    self, assert_mtls, assert_signature_verifies, deps_for, encrypt_secret, issue, ok, public_key,
    text, write_public, Plugin, SServer, OAEP_SHA256, PSS_SHA256,
};
use aziot_tests::Keyd;
use openssl::pkey::PKey;

/// The principal the OpenSSL programs run as.
const APP: u32 = 4242;
/// A uid outside the socket's group (and no principal).
const OUTSIDER: u32 = 5555;
/// `-provider aziot_keys -provider default` (the default provider does the public-key work).
const PROVIDERS: [&str; 4] = ["-provider", "aziot_keys", "-provider", "default"];

type Scratch = openssl_cli::Scratch;

fn start_keyd(backend: Backend) -> Keyd {
    openssl_cli::start_keyd(backend, APP, "prov-*")
}

/// A scratch directory with `modules/aziot_keys.so`, readable by [`APP`].
fn scratch(tag: &str) -> Scratch {
    Scratch::new(tag, Plugin::Provider)
}

/// `openssl <subcommand> -provider aziot_keys -provider default <args>` as `uid`/`gid` with the
/// module directory and keyd's endpoint in an otherwise empty environment.
fn with_provider(s: &Scratch, keyd: &Keyd, uid: u32, gid: u32, sub: &str, args: &[&str]) -> Output {
    s.openssl_as(uid, gid, keyd, &[&[sub][..], &PROVIDERS[..], args].concat())
}

/// `pkeyutl -sign` through the provider as APP, verified as root (no provider) with keyd's
/// public key; a tampered digest must not verify.
fn sign_and_verify(s: &Scratch, keyd: &Keyd, uri: &str, pubkey: &Path, opts: &[&str]) {
    let out = ok(
        with_provider(
            s,
            keyd,
            APP,
            TEST_GID,
            "pkeyutl",
            &[&["-sign", "-inkey", uri, "-in", "digest"][..], opts].concat(),
        ),
        &format!("pkeyutl -sign {opts:?}"),
    );
    assert!(!out.stdout.is_empty(), "no signature");
    s.write("sig", &out.stdout);
    assert_signature_verifies(s, pubkey, opts);
}

fn make_ca(s: &Scratch) {
    openssl_cli::make_ca(s, "provider test CA");
}

/// `openssl req -new` through the provider; checks the CSR (signature, keyd's key) and issues
/// `<name>.pem` from it with the test CA.
fn csr_and_cert(s: &Scratch, keyd: &Keyd, api: &aziot_tests::Api, h: &str, name: &str) -> PathBuf {
    let uri = to_uri(h);
    let out = ok(
        with_provider(
            s,
            keyd,
            APP,
            TEST_GID,
            "req",
            &["-new", "-key", &uri, "-subj", &format!("/CN={name}")],
        ),
        "req -new",
    );
    let csr = s.write(&format!("{name}.csr"), &out.stdout);
    let v = s.openssl(&[
        "req",
        "-verify",
        "-noout",
        "-in",
        csr.to_str().expect("utf-8"),
    ]);
    assert!(text(&v).contains("verify OK"), "{}", text(&v));
    let req = openssl::x509::X509Req::from_pem(&out.stdout).expect("CSR");
    assert!(
        req.public_key()
            .expect("key")
            .public_eq(&public_key(api, h)),
        "the CSR holds keyd's key"
    );
    issue(s, name, &out.stdout)
}

/// Everything the issue asks of the CLI, on one backend: `pkey -pubout`, `pkeyutl -sign` (EC,
/// RSA PKCS#1 v1.5, RSA-PSS), `pkeyutl -decrypt` (RSA, PKCS#1 v1.5 and OAEP), `req -new`, and
/// `s_client` mTLS (TLS 1.3 and 1.2) against `s_server -Verify 1`, which sees the client cert.
fn provider_cli(backend: Backend) {
    if !deps_for(backend) {
        return;
    }
    let keyd = start_keyd(backend);
    let api = keyd.api(V2021);
    let s = scratch("provider-cli");
    s.write("digest", &sha256(b"the message signed by keyd"));
    make_ca(&s);
    for (id, alg) in [("prov-ec", "ec-p256"), ("prov-rsa", "rsa-2048")] {
        let h = api.create_keypair(id, Some(alg));
        let uri = to_uri(&h);
        let public = public_key(&api, &h);
        let pubkey = write_public(&s, &format!("{id}.pub.pem"), &public);

        // the public key, from the provider, is keyd's
        let out = ok(
            with_provider(&s, &keyd, APP, TEST_GID, "pkey", &["-in", &uri, "-pubout"]),
            "pkey -pubout",
        );
        let printed = PKey::public_key_from_pem(&out.stdout).expect("a PEM public key");
        assert!(
            printed.public_eq(&public),
            "{id}: pkey -pubout printed another key"
        );
        // and the private key is not printable
        let out = with_provider(&s, &keyd, APP, TEST_GID, "pkey", &["-in", &uri]);
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("PRIVATE KEY"),
            "{id}: a private key was printed: {}",
            text(&out)
        );

        if alg.starts_with("ec") {
            sign_and_verify(&s, &keyd, &uri, &pubkey, &[]);
            sign_and_verify(&s, &keyd, &uri, &pubkey, &["-pkeyopt", "digest:sha256"]);
        } else {
            sign_and_verify(&s, &keyd, &uri, &pubkey, &["-pkeyopt", "digest:sha256"]);
            sign_and_verify(&s, &keyd, &uri, &pubkey, &PSS_SHA256);
            // decryption (keyd's raw RSA + padding checked here)
            let secret = random(24);
            s.write("secret", &secret);
            for opts in [&[][..], &OAEP_SHA256[..]] {
                encrypt_secret(&s, &pubkey, opts);
                let mut dec = vec!["-decrypt", "-inkey", &uri, "-in", "ct"];
                dec.extend_from_slice(opts);
                let out = ok(
                    with_provider(&s, &keyd, APP, TEST_GID, "pkeyutl", &dec),
                    "pkeyutl -decrypt",
                );
                assert_eq!(out.stdout, secret, "{opts:?}");
            }
        }

        let cert = csr_and_cert(&s, &keyd, &api, &h, id);
        // TLS 1.2 with EC groups needs the default provider preferred for the key exchange
        // (docs/engine.md "The provider", Limits): the documented `-propquery`.
        for tls in [
            &["-tls1_3"][..],
            &["-tls1_2", "-propquery", "?provider=default"][..],
        ] {
            let server = SServer::start(&s, false);
            let port = format!("127.0.0.1:{}", server.port());
            let out = with_provider(
                &s,
                &keyd,
                APP,
                TEST_GID,
                "s_client",
                &[
                    &["-connect", &port][..],
                    tls,
                    &[
                        "-key",
                        &uri,
                        "-cert",
                        cert.to_str().expect("utf-8"),
                        "-CAfile",
                        "ca.pem",
                        "-verify_return_error",
                        "-brief",
                    ][..],
                ]
                .concat(),
            );
            let seen = server.finish();
            assert_mtls(
                &out,
                &seen,
                id,
                &format!("{id} {tls:?} ({})", backend.name()),
            );
        }
    }
}

#[test]
fn provider_cli_file_backend() {
    provider_cli(Backend::File);
}

#[test]
fn provider_cli_softhsm_backend() {
    provider_cli(Backend::SoftHsm);
}

/// An `openssl.cnf` that activates the provider (and the default one), used through
/// `OPENSSL_CONF` by a program given no provider option: `openssl s_client` with the key URI
/// sends an HTTP request over mTLS to `openssl s_server -www -Verify 1` and gets its page.
/// (curl 7.88, Debian 12's, reads `--key` as a file: `curl_mtls_with_a_key_reference_file`.)
#[test]
fn openssl_cnf_activates_the_provider_for_an_unmodified_client() {
    let backend = aziot_tests::keyd::file_backend_only(
        "openssl_cnf_activates_the_provider_for_an_unmodified_client",
    );
    if !deps_for(backend) {
        return;
    }
    let keyd = start_keyd(backend);
    let api = keyd.api(V2021);
    let s = scratch("provider-cnf");
    make_ca(&s);
    let h = api.create_keypair("prov-cnf", Some("ec-p256"));
    let cert = csr_and_cert(&s, &keyd, &api, &h, "prov-cnf");
    let cnf = provider_cnf(&s);
    for tls in ["-tls1_3", "-tls1_2"] {
        let server = SServer::start(&s, true);
        let mut child = s
            .cmd_as(
                "openssl",
                APP,
                TEST_GID,
                &keyd,
                &[
                    "s_client",
                    "-connect",
                    &format!("127.0.0.1:{}", server.port()),
                    tls,
                    "-key",
                    &to_uri(&h),
                    "-cert",
                    cert.to_str().expect("utf-8"),
                    "-CAfile",
                    "ca.pem",
                    "-verify_return_error",
                    "-quiet",
                ],
            )
            .env_remove("OPENSSL_MODULES")
            .env("OPENSSL_CONF", &cnf)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn s_client");
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin
                .write_all(b"GET / HTTP/1.0\r\n\r\n")
                .expect("write the request");
        }
        let out = child.wait_with_output().expect("s_client");
        let seen = server.finish();
        let page = String::from_utf8_lossy(&out.stdout);
        assert!(
            page.contains("HTTP/1.0 200 ok")
                && page.contains("Client certificate")
                && page.contains("Subject: CN=prov-cnf"),
            "{tls}: no page showing the client certificate:\n{}\n--- s_server ---\n{seen}",
            text(&out)
        );
    }
}

/// Bad input: each case exits non-zero (never a signal), prints no signature, and shows the
/// provider's error — library, function, reason and cause.
#[test]
fn provider_bad_input_fails_with_a_clear_error() {
    let backend =
        aziot_tests::keyd::file_backend_only("provider_bad_input_fails_with_a_clear_error");
    if !deps_for(backend) {
        return;
    }
    let mut keyd = start_keyd(backend);
    let api = keyd.api(V2021);
    let s = scratch("provider-bad");
    s.write("digest", &sha256(b"m"));
    let good = api.create_keypair("prov-bad-ec", Some("ec-p256"));
    let sym = api.create_key("prov-sym", "sign");
    let sign = |keyd: &Keyd, uid: u32, gid: u32, uri: &str, func: &str| -> String {
        let out = with_provider(
            &s,
            keyd,
            uid,
            gid,
            "pkeyutl",
            &["-sign", "-inkey", uri, "-in", "digest"],
        );
        let all = text(&out);
        assert!(
            out.status.code().is_some(),
            "openssl died by a signal: {all}"
        );
        assert!(
            !out.status.success(),
            "signing with {uri:?} succeeded: {all}"
        );
        assert!(out.stdout.is_empty(), "a signature came out: {all}");
        assert!(
            all.contains(&format!("aziot_key_openssl_engine:{func}:")),
            "{func}: {all}"
        );
        all
    };
    // URI errors: at open, naming the problem
    for (uri, why) in [
        (
            "aziot-keys:id=prov-bad-ec".to_owned(),
            "unknown attribute \"id\"",
        ),
        (
            format!("{};pin=1234", to_uri(&good)),
            "unknown attribute \"pin\"",
        ),
        ("aziot-keys:handle=%G0".to_owned(), "bad percent escape"),
        ("aziot-keys:handle=".to_owned(), "the handle is empty"),
    ] {
        let e = sign(&keyd, APP, TEST_GID, &uri, "aziot_keys_provider_store_open");
        assert!(
            e.contains("invalid key URI") && e.contains(why),
            "{uri}: {e}"
        );
    }
    // keyd's refusals: at load
    let load = "aziot_keys_provider_store_load";
    let e = sign(&keyd, APP, TEST_GID, &to_uri(&tamper(&good, "sig")), load);
    assert!(
        e.contains("keyd refused the request")
            && e.contains("HTTP 400")
            && e.contains("invalid handle"),
        "{e}"
    );
    let e = sign(&keyd, APP, TEST_GID, &to_uri("not-a-handle"), load);
    assert!(e.contains("invalid handle"), "{e}");
    let e = sign(&keyd, APP, TEST_GID, &to_uri(&sym), load);
    assert!(e.contains("handle is not for a key pair"), "{e}");
    // a caller outside the socket's group
    let e = sign(&keyd, OUTSIDER, OUTSIDER, &to_uri(&good), load);
    assert!(
        e.contains("keyd unreachable") && e.contains("Permission denied"),
        "{e}"
    );
    // the good URI works (so the failures above are the inputs' fault)
    let out = with_provider(
        &s,
        &keyd,
        APP,
        TEST_GID,
        "pkeyutl",
        &["-sign", "-inkey", &to_uri(&good), "-in", "digest"],
    );
    assert!(out.status.success(), "{}", text(&out));
    // keyd down
    keyd.stop();
    let e = sign(&keyd, APP, TEST_GID, &to_uri(&good), load);
    assert!(
        e.contains("keyd unreachable") && e.contains(&keyd.socket().display().to_string()),
        "{e}"
    );
}

/// The documented shell one-liner for a key reference file (docs/engine.md "Key reference
/// files"), run as written: `openssl asn1parse` DER-encodes the URI as a UTF8String, `base64`
/// wraps it at 64 columns.
fn key_reference_file(s: &Scratch, name: &str, uri: &str) -> PathBuf {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(
            "openssl asn1parse -genstr \"UTF8:$K\" -noout -out - | \
             { echo '-----BEGIN AZIOT KEY-----'; base64 -w 64; echo '-----END AZIOT KEY-----'; }",
        )
        .env("K", uri)
        .output()
        .expect("sh");
    assert!(out.status.success(), "{}", text(&out));
    s.write(name, &out.stdout)
}

/// The openssl.cnf docs/engine.md recommends: both providers active, and the default provider
/// preferred wherever both implement an algorithm (key generation, TLS groups).
fn provider_cnf(s: &Scratch) -> PathBuf {
    s.write(
        "openssl.cnf",
        format!(
            "openssl_conf = openssl_init\n\n[openssl_init]\nproviders = provider_sect\n\
             alg_section = algorithm_sect\n\n[provider_sect]\naziot_keys = aziot_keys_sect\n\
             default = default_sect\n\n[aziot_keys_sect]\nmodule = {}\nactivate = 1\n\n\
             [default_sect]\nactivate = 1\n\n[algorithm_sect]\n\
             default_properties = ?provider=default\n",
            s.plugin_so().display()
        )
        .as_bytes(),
    )
}

/// `program args` as APP under `OPENSSL_CONF` (no module directory, no provider option).
fn under_cnf(s: &Scratch, keyd: &Keyd, cnf: &Path, program: &str, args: &[&str]) -> Output {
    s.cmd_as(program, APP, TEST_GID, keyd, args)
        .env_remove("OPENSSL_MODULES")
        .env("OPENSSL_CONF", cnf)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

/// An unmodified program that only reads key *files*: Debian 12's curl 7.88 (`--key` is
/// `SSL_CTX_use_PrivateKey_file`, PEM through OpenSSL's decoders) given a key reference file
/// and the openssl.cnf that activates the provider completes an mTLS request (TLS 1.3 and 1.2)
/// to `openssl s_server -www -Verify 1`, whose page shows the client certificate; `openssl pkey
/// -in <file> -pubout` prints keyd's public key. EC P-256 and RSA-2048. The one-liner's file is
/// byte-for-byte what `provider::decoder::key_file` writes.
#[test]
fn curl_mtls_with_a_key_reference_file() {
    let backend = aziot_tests::keyd::file_backend_only("curl_mtls_with_a_key_reference_file");
    if !deps_for(backend) || !aziot_tests::require_deps(&[aziot_tests::Dep::Curl]) {
        return;
    }
    let keyd = start_keyd(backend);
    let api = keyd.api(V2021);
    let s = scratch("provider-curl");
    make_ca(&s);
    let cnf = provider_cnf(&s);
    for (id, alg) in [("prov-curl-ec", "ec-p256"), ("prov-curl-rsa", "rsa-2048")] {
        let h = api.create_keypair(id, Some(alg));
        let cert = csr_and_cert(&s, &keyd, &api, &h, id);
        let file = key_reference_file(&s, &format!("{id}.key.pem"), &to_uri(&h));
        assert_eq!(
            std::fs::read_to_string(&file).expect("read"),
            aziot_key_openssl_engine::provider::decoder::key_file(&h),
            "the documented one-liner and key_file agree"
        );
        let file = file.to_str().expect("utf-8");

        let out = ok(
            under_cnf(
                &s,
                &keyd,
                &cnf,
                "openssl",
                &["pkey", "-in", file, "-pubout"],
            ),
            "pkey -in <key reference file> -pubout",
        );
        let printed = PKey::public_key_from_pem(&out.stdout).expect("a PEM public key");
        assert!(
            printed.public_eq(&public_key(&api, &h)),
            "{id}: another key"
        );

        for (tls, server_opt) in [
            (&["--tlsv1.3"][..], "-tls1_3"),
            (&["--tlsv1.2", "--tls-max", "1.2"][..], "-tls1_2"),
        ] {
            let server = SServer::start_with(&s, true, &[server_opt]);
            let url = format!("https://127.0.0.1:{}/", server.port());
            let out = under_cnf(
                &s,
                &keyd,
                &cnf,
                "curl",
                &[
                    &["-sS", "--fail", "--cacert", "ca.pem"][..],
                    tls,
                    &["--cert", cert.to_str().expect("utf-8"), "--key", file, &url][..],
                ]
                .concat(),
            );
            let seen = server.finish();
            let page = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success()
                    && page.contains("Client certificate")
                    && page.contains(&format!("Subject: CN={id}")),
                "{id} {server_opt}: curl got no page showing the client certificate:\n{}\n--- s_server ---\n{seen}",
                text(&out)
            );
        }
    }
}

/// A bad key reference file — garbage inside the label, a URI with an unknown attribute, a
/// forged handle, keyd down — fails with the provider's error (function
/// `aziot_keys_provider_decode`, reason, cause) in `openssl pkey`, and curl refuses it with a
/// non-zero exit; nothing dies by a signal. A file with another PEM label is not the
/// provider's business (OpenSSL's own error, no provider error).
#[test]
fn bad_key_reference_file_fails_with_a_clear_error() {
    let backend =
        aziot_tests::keyd::file_backend_only("bad_key_reference_file_fails_with_a_clear_error");
    if !deps_for(backend) || !aziot_tests::require_deps(&[aziot_tests::Dep::Curl]) {
        return;
    }
    let mut keyd = start_keyd(backend);
    let api = keyd.api(V2021);
    let s = scratch("provider-badfile");
    make_ca(&s);
    let cnf = provider_cnf(&s);
    let good = api.create_keypair("prov-badfile-ec", Some("ec-p256"));
    let cert = csr_and_cert(&s, &keyd, &api, &good, "prov-badfile-ec");
    let pem = |body: &str| format!("-----BEGIN AZIOT KEY-----\n{body}\n-----END AZIOT KEY-----\n");
    let b64 = |uri: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .encode(aziot_key_openssl_engine::provider::decoder::der_string(uri))
    };
    // curl connects before it reads the key: a listener whose backlog completes the connection
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!(
        "https://127.0.0.1:{}/",
        listener.local_addr().expect("addr").port()
    );
    let check = |keyd: &Keyd, name: &str, contents: &str, why: &[&str]| {
        let file = s.write(name, contents.as_bytes());
        let file = file.to_str().expect("utf-8");
        let out = under_cnf(&s, keyd, &cnf, "openssl", &["pkey", "-in", file, "-pubout"]);
        let all = text(&out);
        assert!(
            out.status.code().is_some(),
            "{name}: openssl died by a signal: {all}"
        );
        assert!(
            !out.status.success() && !all.contains("BEGIN PUBLIC KEY"),
            "{name}: {all}"
        );
        for w in why {
            assert!(all.contains(w), "{name}: no {w:?} in: {all}");
        }
        let out = under_cnf(
            &s,
            keyd,
            &cnf,
            "curl",
            &[
                "-sS",
                "--cacert",
                "ca.pem",
                "--cert",
                cert.to_str().expect("utf-8"),
                "--key",
                file,
                &url,
            ],
        );
        assert!(
            out.status.code().is_some(),
            "{name}: curl died by a signal: {}",
            text(&out)
        );
        // 58: "problem with the local client certificate" (the key is refused before connecting)
        assert_eq!(out.status.code(), Some(58), "{name}: {}", text(&out));
    };
    let decode = "aziot_key_openssl_engine:aziot_keys_provider_decode:";
    check(
        &keyd,
        "garbage.pem",
        &pem("this is not base64!"),
        &[decode, "not base64"],
    );
    check(
        &keyd,
        "empty.pem",
        &pem(""),
        &[decode, "the block is empty"],
    );
    check(
        &keyd,
        "attr.pem",
        &pem(&b64(&format!("{};pin=1", to_uri(&good)))),
        &[decode, "invalid key URI", "unknown attribute \"pin\""],
    );
    check(
        &keyd,
        "forged.pem",
        &pem(&b64(&to_uri(&tamper(&good, "sig")))),
        &[decode, "keyd refused the request", "invalid handle"],
    );
    // not ours: no provider error, OpenSSL's own
    let other = "-----BEGIN FOO-----\nAAAA\n-----END FOO-----\n";
    let file = s.write("other.pem", other.as_bytes());
    let out = under_cnf(
        &s,
        &keyd,
        &cnf,
        "openssl",
        &["pkey", "-in", file.to_str().expect("utf-8")],
    );
    assert!(
        out.status.code().is_some() && !out.status.success(),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains(decode), "{}", text(&out));
    // the good key works (the failures above are the files' fault); then keyd goes down
    let good_file = pem(&b64(&to_uri(&good)));
    let file = s.write("good.pem", good_file.as_bytes());
    ok(
        under_cnf(
            &s,
            &keyd,
            &cnf,
            "openssl",
            &["pkey", "-in", file.to_str().expect("utf-8"), "-pubout"],
        ),
        "pkey with the good file",
    );
    keyd.stop();
    let sock = keyd.socket().display().to_string();
    check(
        &keyd,
        "down.pem",
        &good_file,
        &[decode, "keyd unreachable", &sock],
    );
}
