//! The OpenSSL 3 provider `aziot_keys` (issue 16; docs/engine.md "The provider"), against a live
//! keyd started by the harness (broker + confined worker), with unmodified OpenSSL programs.
//!
//! The `openssl` CLI runs as [`APP`], a keyd principal in the socket's group, with
//! `OPENSSL_MODULES` pointing at a temporary directory holding a copy of the built cdylib as
//! `aziot_keys.so` (nothing is installed system-wide) and `AZIOT_KEYD_ENDPOINT` at the test's
//! keyd; keys are named by `aziot-keys:handle=<percent-encoded handle>` URIs. Public keys for
//! verification are built from keyd's `/parameters` by the suite itself, and every verification
//! runs in a separate `openssl` process without the provider.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aziot_key_openssl_engine::provider::uri::to_uri;
use aziot_tests::api::*;
use aziot_tests::crypto::*;
use aziot_tests::keyd::{profile_dir, Backend, TempDir, TEST_GID};
use aziot_tests::{Dep, Keyd};
use openssl::pkey::{PKey, Public};

/// The principal the OpenSSL programs run as.
const APP: u32 = 4242;
/// A uid outside the socket's group (and no principal).
const OUTSIDER: u32 = 5555;
/// `-provider aziot_keys -provider default` (the default provider does the public-key work).
const PROVIDERS: [&str; 4] = ["-provider", "aziot_keys", "-provider", "default"];

fn deps_for(backend: Backend) -> bool {
    let mut deps = vec![
        Dep::Root,
        Dep::ServiceUser(aziot_tests::keyd::SERVICE_USER),
        Dep::OpensslCli,
    ];
    if backend == Backend::SoftHsm {
        deps.push(Dep::SoftHsm);
    }
    aziot_tests::require_deps(&deps)
}

fn start_keyd(backend: Backend) -> Keyd {
    Keyd::builder()
        .backend(backend)
        .extra(&format!(
            "[[principal]]\nuid = {APP}\nkeys = [\"prov-*\"]\n"
        ))
        .start()
}

/// The built module: `$AZIOT_ENGINE_SO`, else the cdylib cargo built with this test.
fn module_so() -> PathBuf {
    if let Some(p) = std::env::var_os("AZIOT_ENGINE_SO") {
        return PathBuf::from(p);
    }
    let name = "libaziot_key_openssl_engine.so";
    let dir = profile_dir();
    [dir.join("deps").join(name), dir.join(name)]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found under {}: `cargo build -p aziot-key-engine`",
                dir.display()
            )
        })
}

/// A scratch directory with `modules/aziot_keys.so`, readable by [`APP`].
struct Scratch {
    dir: TempDir,
}

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = TempDir::new(tag);
        let modules = dir.path().join("modules");
        std::fs::create_dir(&modules).expect("mkdir modules");
        std::fs::set_permissions(&modules, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let so = modules.join("aziot_keys.so");
        std::fs::copy(module_so(), &so).expect("copy the module");
        std::fs::set_permissions(&so, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        Scratch { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, data).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        p
    }

    /// `program <args>` as `uid`/`gid` with the module directory and keyd's endpoint (and
    /// `extra_env`) in an otherwise empty environment.
    fn cmd_as(&self, program: &str, uid: u32, gid: u32, keyd: &Keyd, args: &[&str]) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(self.dir.path())
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env("OPENSSL_MODULES", self.path("modules"))
            .env(
                "AZIOT_KEYD_ENDPOINT",
                format!("unix://{}", keyd.socket().display()),
            )
            .stdin(Stdio::null());
        if uid != 0 {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// `openssl <subcommand> -provider aziot_keys -provider default <args>` as APP.
    fn with_provider(&self, keyd: &Keyd, uid: u32, gid: u32, sub: &str, args: &[&str]) -> Output {
        let mut all = vec![sub];
        all.extend_from_slice(&PROVIDERS);
        all.extend_from_slice(args);
        self.cmd_as("openssl", uid, gid, keyd, &all)
            .output()
            .expect("run openssl")
    }

    /// `openssl <args>` as root, without the provider (the verifier, the CA).
    fn openssl(&self, args: &[&str]) -> Output {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?} failed:\n{}",
            text(&out)
        );
        out
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn ok(out: Output, what: &str) -> Output {
    assert!(out.status.success(), "{what} failed:\n{}", text(&out));
    out
}

/// The public key of a key pair as keyd's `/parameters` describe it (built here).
fn public_key(api: &aziot_tests::Api, handle: &str) -> PKey<Public> {
    match api.param(handle, "algorithm").as_str() {
        "ECDSA" => PKey::from_ec_key(ec_public_from_point(&unb64(&api.param(handle, "ec-point"))))
            .expect("pkey"),
        "RSA" => PKey::from_rsa(rsa_public(
            &unb64(&api.param(handle, "rsa-modulus")),
            &unb64(&api.param(handle, "rsa-exponent")),
        ))
        .expect("pkey"),
        other => panic!("algorithm {other}"),
    }
}

/// `pkeyutl -sign` through the provider as APP, verified as root (no provider) with keyd's
/// public key; a tampered digest must not verify.
fn sign_and_verify(s: &Scratch, keyd: &Keyd, uri: &str, pubkey: &Path, opts: &[&str]) {
    let mut args = vec!["-inkey", uri, "-in", "digest"];
    args.extend_from_slice(opts);
    let out = ok(
        s.with_provider(
            keyd,
            APP,
            TEST_GID,
            "pkeyutl",
            &[&["-sign"][..], &args].concat(),
        ),
        &format!("pkeyutl -sign {opts:?}"),
    );
    assert!(!out.stdout.is_empty(), "no signature");
    s.write("sig", &out.stdout);
    let pubkey = pubkey.to_str().expect("utf-8");
    for (digest, good) in [("digest", true), ("digest.bad", false)] {
        let mut verify = vec![
            "pkeyutl", "-verify", "-pubin", "-inkey", pubkey, "-in", digest, "-sigfile", "sig",
        ];
        verify.extend_from_slice(opts);
        let out = Command::new("openssl")
            .args(&verify)
            .current_dir(s.dir.path())
            .output()
            .expect("openssl");
        assert_eq!(
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains("Signature Verified Successfully"),
            good,
            "{opts:?} {digest}: {}",
            text(&out)
        );
    }
}

/// A test CA and a server certificate for 127.0.0.1 (openssl CLI, no provider).
fn make_ca(s: &Scratch) {
    s.openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        "/CN=provider test CA",
        "-days",
        "2",
    ]);
    s.openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
        "-addext",
        "subjectAltName=IP:127.0.0.1",
    ]);
    s.openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-copy_extensions",
        "copyall",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
    ]);
    std::fs::set_permissions(s.path("ca.pem"), std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
}

/// `openssl req -new` through the provider; checks the CSR (signature, keyd's key) and issues
/// `<name>.pem` from it with the test CA.
fn csr_and_cert(s: &Scratch, keyd: &Keyd, api: &aziot_tests::Api, h: &str, name: &str) -> PathBuf {
    let uri = to_uri(h);
    let out = ok(
        s.with_provider(
            keyd,
            APP,
            TEST_GID,
            "req",
            &["-new", "-key", &uri, "-subj", &format!("/CN={name}")],
        ),
        "req -new",
    );
    let csr = s.write(&format!("{name}.csr"), &out.stdout);
    let csr_s = csr.to_str().expect("utf-8");
    let v = s.openssl(&["req", "-verify", "-noout", "-in", csr_s]);
    assert!(text(&v).contains("verify OK"), "{}", text(&v));
    let req = openssl::x509::X509Req::from_pem(&std::fs::read(&csr).expect("csr")).expect("CSR");
    assert!(
        req.public_key()
            .expect("key")
            .public_eq(&public_key(api, h)),
        "the CSR holds keyd's key"
    );
    let cert = s.path(&format!("{name}.pem"));
    s.openssl(&[
        "x509",
        "-req",
        "-in",
        csr_s,
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        cert.to_str().expect("utf-8"),
        "-days",
        "2",
    ]);
    std::fs::set_permissions(&cert, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    cert
}

/// `openssl s_server -Verify 1` (optionally `-www`) on a free loopback port, output collected.
struct SServer {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    port: u16,
    output: Arc<Mutex<String>>,
}

impl SServer {
    fn start(s: &Scratch, www: bool) -> SServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let mut cmd = Command::new("openssl");
        cmd.args([
            "s_server",
            "-accept",
            &format!("127.0.0.1:{port}"),
            "-naccept",
            "1",
            "-Verify",
            "1",
            "-verify_return_error",
            "-CAfile",
            "ca.pem",
            "-cert",
            "server.pem",
            "-key",
            "server.key",
        ]);
        if www {
            cmd.arg("-www");
        }
        let mut child = cmd
            .current_dir(s.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("spawn s_server");
        let output = Arc::new(Mutex::new(String::new()));
        for pipe in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let output = Arc::clone(&output);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut o = output.lock().expect("lock");
                    o.push_str(&line);
                    o.push('\n');
                }
            });
        }
        let stdin = child.stdin.take();
        let server = SServer {
            child,
            stdin,
            port,
            output,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !server.output().contains("ACCEPT") {
            assert!(Instant::now() < deadline, "s_server: {}", server.output());
            std::thread::sleep(Duration::from_millis(10));
        }
        server
    }

    fn output(&self) -> String {
        self.output.lock().expect("lock").clone()
    }

    /// Waits for s_server to end (it serves one connection); its output.
    fn finish(mut self) -> String {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().expect("try_wait").is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while Arc::strong_count(&self.output) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.output()
    }
}

impl Drop for SServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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
    let s = Scratch::new("provider-cli");
    s.write("digest", &sha256(b"the message signed by keyd"));
    let mut bad = sha256(b"the message signed by keyd");
    bad[0] ^= 1;
    s.write("digest.bad", &bad);
    make_ca(&s);
    for (id, alg) in [("prov-ec", "ec-p256"), ("prov-rsa", "rsa-2048")] {
        let h = api.create_keypair(id, Some(alg));
        let uri = to_uri(&h);
        let public = public_key(&api, &h);
        let pubkey = s.write(
            &format!("{id}.pub.pem"),
            &public.public_key_to_pem().expect("pem"),
        );

        // the public key, from the provider, is keyd's
        let out = ok(
            s.with_provider(&keyd, APP, TEST_GID, "pkey", &["-in", &uri, "-pubout"]),
            "pkey -pubout",
        );
        let printed = PKey::public_key_from_pem(&out.stdout).expect("a PEM public key");
        assert!(
            printed.public_eq(&public),
            "{id}: pkey -pubout printed another key"
        );
        // and the private key is not printable
        let out = s.with_provider(&keyd, APP, TEST_GID, "pkey", &["-in", &uri]);
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
            sign_and_verify(
                &s,
                &keyd,
                &uri,
                &pubkey,
                &[
                    "-pkeyopt",
                    "digest:sha256",
                    "-pkeyopt",
                    "rsa_padding_mode:pss",
                    "-pkeyopt",
                    "rsa_pss_saltlen:32",
                ],
            );
            // decryption (keyd's raw RSA + padding checked here)
            let secret = random(24);
            s.write("secret", &secret);
            for opts in [
                &[][..],
                &[
                    "-pkeyopt",
                    "rsa_padding_mode:oaep",
                    "-pkeyopt",
                    "rsa_oaep_md:sha256",
                ][..],
            ] {
                let mut enc = vec![
                    "pkeyutl",
                    "-encrypt",
                    "-pubin",
                    "-inkey",
                    pubkey.to_str().expect("utf-8"),
                    "-in",
                    "secret",
                    "-out",
                    "ct",
                ];
                enc.extend_from_slice(opts);
                s.openssl(&enc);
                std::fs::set_permissions(s.path("ct"), std::fs::Permissions::from_mode(0o644))
                    .expect("chmod");
                let mut dec = vec!["-decrypt", "-inkey", &uri, "-in", "ct"];
                dec.extend_from_slice(opts);
                let out = ok(
                    s.with_provider(&keyd, APP, TEST_GID, "pkeyutl", &dec),
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
            let port = format!("127.0.0.1:{}", server.port);
            let out = s.with_provider(
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
            let client = text(&out);
            assert!(
                out.status.success() && client.contains("CONNECTION ESTABLISHED"),
                "{id} {tls:?} ({}): s_client failed:\n{client}\n--- s_server ---\n{seen}",
                backend.name()
            );
            assert!(
                seen.contains(&format!("CN = {id}")) && seen.contains("verify return:1"),
                "{id} {tls:?}: s_server did not verify the client certificate:\n{seen}\n{client}"
            );
            assert!(!seen.contains("verify error"), "{seen}");
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
/// (curl 7.88, Debian 12's, cannot take a provider key: its `--key` reads PEM/DER files or
/// engine keys only; docs/engine.md.)
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
    let s = Scratch::new("provider-cnf");
    make_ca(&s);
    let h = api.create_keypair("prov-cnf", Some("ec-p256"));
    let cert = csr_and_cert(&s, &keyd, &api, &h, "prov-cnf");
    // the configuration docs/engine.md recommends: both providers active, and the default
    // provider preferred wherever both implement an algorithm (key generation, TLS groups)
    let cnf = s.write(
        "openssl.cnf",
        format!(
            "openssl_conf = openssl_init\n\n[openssl_init]\nproviders = provider_sect\n\
             alg_section = algorithm_sect\n\n[provider_sect]\naziot_keys = aziot_keys_sect\n\
             default = default_sect\n\n[aziot_keys_sect]\nmodule = {}\nactivate = 1\n\n\
             [default_sect]\nactivate = 1\n\n[algorithm_sect]\n\
             default_properties = ?provider=default\n",
            s.path("modules").join("aziot_keys.so").display()
        )
        .as_bytes(),
    );
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
                    &format!("127.0.0.1:{}", server.port),
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
    let s = Scratch::new("provider-bad");
    s.write("digest", &sha256(b"m"));
    let good = api.create_keypair("prov-bad-ec", Some("ec-p256"));
    let sym = api.create_key("prov-sym", "sign");
    let sign = |keyd: &Keyd, uid: u32, gid: u32, uri: &str, func: &str| -> String {
        let out = s.with_provider(
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
    let out = s.with_provider(
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
