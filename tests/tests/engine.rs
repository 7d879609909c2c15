//! The OpenSSL engine `aziot_keys.so` and its in-process twin (spec keyd.md §9; docs/engine.md),
//! against a live keyd started by the harness (broker + confined worker).
//!
//! The `openssl` CLI runs as [`APP`], a keyd principal in the socket's group (like an IoT Edge
//! module would), with `OPENSSL_ENGINES` pointing at a temporary directory holding a copy of the
//! built cdylib as `aziot_keys.so` (nothing is installed system-wide) and `AZIOT_KEYD_ENDPOINT`
//! at the test's keyd. Public keys for verification are built from `/parameters` by the suite
//! itself, not by the engine.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aziot_key_openssl_engine::{load_private_key, KeydClient};
use aziot_tests::api::*;
use aziot_tests::crypto::*;
use aziot_tests::keyd::{Backend, TEST_GID};
use aziot_tests::openssl_cli::{
    self, assert_mtls, assert_signature_verifies, deps_for, encrypt_secret, issue, ok, text,
    write_public, Plugin, SServer, OAEP_SHA256, PSS_SHA256,
};
use aziot_tests::{Dep, Keyd};
use openssl::pkey::{PKey, Private, Public};

/// The principal the openssl CLI runs as.
const APP: u32 = 4242;
/// A uid outside the socket's group (and no principal).
const OUTSIDER: u32 = 5555;
/// `-engine aziot_keys -keyform engine`: the key is an engine key (a keyd handle).
const ENGINE: [&str; 4] = ["-engine", "aziot_keys", "-keyform", "engine"];

type Scratch = openssl_cli::Scratch;

fn start_keyd(backend: Backend) -> Keyd {
    openssl_cli::start_keyd(backend, APP, "engine-*")
}

/// A scratch directory with `engines/aziot_keys.so`, readable by [`APP`].
fn scratch(tag: &str) -> Scratch {
    Scratch::new(tag, Plugin::Engine)
}

/// `openssl <head> -engine aziot_keys -keyform engine <tail>` as `uid`/`gid` with the engine
/// directory and keyd's endpoint in the environment.
fn with_engine(
    s: &Scratch,
    keyd: &Keyd,
    uid: u32,
    gid: u32,
    head: &[&str],
    tail: &[&str],
) -> Output {
    s.openssl_as(uid, gid, keyd, &[head, &ENGINE[..], tail].concat())
}

/// The public key of a key pair as keyd's `/parameters` describe it (built here, not by the
/// engine); an EC key's curve, by its OID, is P-256.
fn public_key(api: &aziot_tests::Api, handle: &str) -> PKey<Public> {
    if api.param(handle, "algorithm") == "ECDSA" {
        assert_eq!(
            unb64(&api.param(handle, "ec-curve-oid")),
            [0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07]
        );
    }
    openssl_cli::public_key(api, handle)
}

/// sign with the engine as APP (`pkeyutl -sign`), verify as root with the public key from keyd.
fn sign_and_verify(s: &Scratch, keyd: &Keyd, handle: &str, pubkey: &Path, opts: &[&str]) {
    let out = ok(
        with_engine(
            s,
            keyd,
            APP,
            TEST_GID,
            &["pkeyutl", "-sign"],
            &[&["-inkey", handle, "-in", "digest"][..], opts].concat(),
        ),
        &format!("pkeyutl -sign {opts:?}"),
    );
    assert!(!out.stdout.is_empty(), "no signature");
    s.write("sig", &out.stdout);
    assert_signature_verifies(s, pubkey, opts);
}

/// A CSR for `CN=<cn>` holding `key`'s public key, signed (SHA-256) with it.
fn csr_signed_with(key: &PKey<Private>, cn: &str) -> openssl::x509::X509Req {
    let mut req = openssl::x509::X509ReqBuilder::new().expect("req");
    let mut name = openssl::x509::X509NameBuilder::new().expect("name");
    name.append_entry_by_text("CN", cn).expect("cn");
    req.set_subject_name(&name.build()).expect("subject");
    req.set_pubkey(key).expect("pubkey");
    req.sign(key, openssl::hash::MessageDigest::sha256())
        .expect("sign the CSR through keyd");
    req.build()
}

fn make_ca(s: &Scratch) {
    openssl_cli::make_ca(s, "engine test CA");
}

/// spec §9.3/§9.4: `pkeyutl -sign` with EC P-256 (sign_sig), RSA-2048 PKCS#1 v1.5 and PSS
/// (priv_enc with PKCS1 / no padding), RSA-4096; verified against keyd's public parameters.
#[test]
fn pkeyutl_sign_ec_rsa_pss_verify_with_keyd_public_key() {
    if !deps_for(Backend::from_env()) {
        return;
    }
    let keyd = start_keyd(Backend::from_env());
    let api = keyd.api(V2021);
    let s = scratch("engine-pkeyutl");
    s.write("digest", &sha256(b"the message signed by keyd"));

    let ec = api.create_keypair("engine-ec", Some("ec-p256"));
    let ec_pub = write_public(&s, "ec.pub.pem", &public_key(&api, &ec));
    sign_and_verify(&s, &keyd, &ec, &ec_pub, &[]);
    sign_and_verify(&s, &keyd, &ec, &ec_pub, &["-pkeyopt", "digest:sha256"]);

    for (id, alg) in [("engine-rsa", "rsa-2048"), ("engine-rsa4k", "rsa-4096")] {
        let h = api.create_keypair(id, Some(alg));
        let p = write_public(&s, &format!("{id}.pub.pem"), &public_key(&api, &h));
        sign_and_verify(&s, &keyd, &h, &p, &["-pkeyopt", "digest:sha256"]);
        sign_and_verify(&s, &keyd, &h, &p, &PSS_SHA256);
    }
}

/// `openssl req -new` with the engine key: the CSR's self-signature verifies and carries keyd's
/// public key.
#[test]
fn req_new_with_engine_key_verifies() {
    if !deps_for(Backend::from_env()) {
        return;
    }
    let keyd = start_keyd(Backend::from_env());
    let api = keyd.api(V2021);
    let s = scratch("engine-req");
    for (id, alg) in [("engine-req-ec", "ec-p256"), ("engine-req-rsa", "rsa-2048")] {
        let h = api.create_keypair(id, Some(alg));
        let out = ok(
            with_engine(
                &s,
                &keyd,
                APP,
                TEST_GID,
                &["req", "-new"],
                &["-key", &h, "-subj", "/CN=x"],
            ),
            "req -new",
        );
        let csr = s.write(&format!("{id}.csr"), &out.stdout);
        let out = s.openssl(&[
            "req",
            "-verify",
            "-noout",
            "-in",
            csr.to_str().expect("utf-8"),
        ]);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("verify OK")
                || String::from_utf8_lossy(&out.stdout).contains("verify OK"),
            "{}",
            text(&out)
        );
        let req = openssl::x509::X509Req::from_pem(&std::fs::read(&csr).expect("csr"))
            .expect("parse CSR");
        assert!(
            req.public_key()
                .expect("key")
                .public_eq(&public_key(&api, &h)),
            "the CSR holds keyd's key"
        );
    }
}

/// mTLS: a client certificate for the keyd key (CSR made through the engine), `s_client` with
/// the engine key completes the handshake, and `s_server -Verify 1` saw and verified the cert.
fn s_client_mtls(backend: Backend) {
    if !deps_for(backend) {
        return;
    }
    let keyd = start_keyd(backend);
    let api = keyd.api(V2021);
    let s = scratch("engine-mtls");
    make_ca(&s);
    for (id, alg) in [("engine-tls-ec", "ec-p256"), ("engine-tls-rsa", "rsa-2048")] {
        let h = api.create_keypair(id, Some(alg));
        let csr = ok(
            with_engine(
                &s,
                &keyd,
                APP,
                TEST_GID,
                &["req", "-new"],
                &["-key", &h, "-subj", &format!("/CN={id}")],
            ),
            "req -new",
        );
        let cert = issue(&s, id, &csr.stdout);
        for tls in ["-tls1_3", "-tls1_2"] {
            let server = SServer::start(&s, false);
            let out = with_engine(
                &s,
                &keyd,
                APP,
                TEST_GID,
                &[
                    "s_client",
                    "-connect",
                    &format!("127.0.0.1:{}", server.port()),
                    tls,
                ],
                &[
                    "-key",
                    &h,
                    "-cert",
                    cert.to_str().expect("utf-8"),
                    "-CAfile",
                    "ca.pem",
                    "-verify_return_error",
                    "-brief",
                ],
            );
            let seen = server.finish();
            assert_mtls(&out, &seen, id, &format!("{id} {tls} ({})", backend.name()));
        }
    }
}

#[test]
fn s_client_mtls_file_backend() {
    s_client_mtls(Backend::File);
}

#[test]
fn s_client_mtls_softhsm_backend() {
    s_client_mtls(Backend::SoftHsm);
}

/// The in-process twin: an `openssl::ssl::SslConnector` holding a keyd key (no ENGINE) completes
/// mTLS against `openssl s_server`; its CSR is signed through the twin by `X509ReqBuilder`.
#[test]
fn twin_mtls_in_process() {
    if !deps_for(Backend::from_env()) {
        return;
    }
    let keyd = start_keyd(Backend::from_env());
    let api = keyd.api(V2021);
    let s = scratch("engine-twin");
    make_ca(&s);
    aziot_key_openssl_engine::preload().expect("preload");
    let client = Arc::new(KeydClient::new(keyd.socket()));
    for (id, alg) in [
        ("engine-twin-ec", "ec-p256"),
        ("engine-twin-rsa", "rsa-2048"),
    ] {
        let h = api.create_keypair(id, Some(alg));
        let key = load_private_key(&client, &h).unwrap_or_else(|e| panic!("load {id}: {e}"));
        assert!(key.public_eq(&public_key(&api, &h)));
        // the twin is a key of the built-in provider (issue 16), not a legacy foreign key
        assert_eq!(
            aziot_key_openssl_engine::provider_of(&key).as_deref(),
            Some("aziot_keys"),
            "{id}"
        );
        // the process's own keys still come from the default provider (?provider=default;
        // aziot_keys cannot generate keys)
        let own = PKey::ec_gen("prime256v1").expect("EVP key generation");
        assert_eq!(
            aziot_key_openssl_engine::provider_of(&own).as_deref(),
            Some("default")
        );
        // CSR signed through keyd
        let req = csr_signed_with(&key, id);
        assert!(
            req.verify(&public_key(&api, &h)).expect("verify"),
            "CSR signature"
        );
        let cert = issue(&s, id, &req.to_pem().expect("pem"));

        for version in [
            openssl::ssl::SslVersion::TLS1_3,
            openssl::ssl::SslVersion::TLS1_2,
        ] {
            let server = SServer::start(&s, false);
            let mut b = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls_client())
                .expect("connector");
            b.set_ca_file(s.path("ca.pem")).expect("ca");
            b.set_certificate_file(&cert, openssl::ssl::SslFiletype::PEM)
                .expect("cert");
            b.set_private_key(&key).expect("key");
            b.check_private_key()
                .expect("the certificate matches the keyd key");
            b.set_min_proto_version(Some(version)).expect("min");
            b.set_max_proto_version(Some(version)).expect("max");
            let connector = b.build();
            let tcp = std::net::TcpStream::connect(("127.0.0.1", server.port())).expect("connect");
            let mut tls = connector.connect("127.0.0.1", tcp).unwrap_or_else(|e| {
                panic!(
                    "{id} {version:?}: handshake: {e}\n--- s_server ---\n{}",
                    server.output()
                )
            });
            use std::io::Write as _;
            tls.write_all(b"hello from the twin\n").expect("write");
            server.wait_for("hello from the twin", Duration::from_secs(10));
            let _ = tls.shutdown();
            drop(tls);
            let seen = server.finish();
            assert!(
                seen.contains(&format!("CN = {id}")) && seen.contains("verify return:1"),
                "{id} {version:?}:\n{seen}"
            );
        }
    }
}

/// RSA decryption (upstream: `priv_dec` not implemented): keyd's raw RSA operation + padding
/// checked in the caller, PKCS#1 v1.5 and OAEP (SHA-256).
#[test]
fn rsa_decrypt_through_the_engine() {
    if !deps_for(Backend::from_env()) {
        return;
    }
    let keyd = start_keyd(Backend::from_env());
    let api = keyd.api(V2021);
    let s = scratch("engine-decrypt");
    let h = api.create_keypair("engine-dec", Some("rsa-2048"));
    let pubkey = write_public(&s, "dec.pub.pem", &public_key(&api, &h));
    let secret = random(24);
    s.write("secret", &secret);
    for opts in [&[][..], &OAEP_SHA256[..]] {
        encrypt_secret(&s, &pubkey, opts);
        let out = ok(
            with_engine(
                &s,
                &keyd,
                APP,
                TEST_GID,
                &["pkeyutl", "-decrypt"],
                &[&["-inkey", &h, "-in", "ct"][..], opts].concat(),
            ),
            "pkeyutl -decrypt",
        );
        assert_eq!(out.stdout, secret, "{opts:?}");
    }
    // a corrupted ciphertext fails with the engine's error, not garbage
    let mut ct = std::fs::read(s.path("ct")).expect("ct");
    ct[5] ^= 0x40;
    s.write("ct", &ct);
    let out = with_engine(
        &s,
        &keyd,
        APP,
        TEST_GID,
        &["pkeyutl", "-decrypt"],
        &[&["-inkey", &h, "-in", "ct"][..], &OAEP_SHA256[..]].concat(),
    );
    assert!(
        !out.status.success() && out.stdout.is_empty(),
        "{}",
        text(&out)
    );
}

/// Bad input: each case exits non-zero (never a signal) and openssl's output shows the engine's
/// error — library, function (spec §9.3) and cause.
#[test]
fn bad_input_fails_with_a_clear_error() {
    let backend = aziot_tests::keyd::file_backend_only("bad_input_fails_with_a_clear_error");
    if !deps_for(backend) {
        return;
    }
    let mut keyd = start_keyd(backend);
    let api = keyd.api(V2021);
    let s = scratch("engine-bad");
    s.write("digest", &sha256(b"m"));
    let good = api.create_keypair("engine-bad-ec", Some("ec-p256"));
    let sym = api.create_key("engine-sym", "sign");
    let sign = |keyd: &Keyd, uid: u32, gid: u32, handle: &str| -> String {
        let out = with_engine(
            &s,
            keyd,
            uid,
            gid,
            &["pkeyutl", "-sign"],
            &["-inkey", handle, "-in", "digest"],
        );
        assert!(
            out.status.code().is_some(),
            "openssl died by a signal: {}",
            text(&out)
        );
        assert!(
            !out.status.success(),
            "signing with {handle:?} succeeded: {}",
            text(&out)
        );
        assert!(
            out.stdout.is_empty(),
            "a signature came out: {}",
            text(&out)
        );
        let all = text(&out);
        assert!(
            all.contains("aziot_key_openssl_engine:aziot_key_engine_load_privkey:"),
            "{all}"
        );
        all
    };
    // unknown / forged handle
    let forged = tamper(&good, "sig");
    let e = sign(&keyd, APP, TEST_GID, &forged);
    assert!(
        e.contains("keyd refused the request")
            && e.contains("HTTP 400")
            && e.contains("invalid handle"),
        "{e}"
    );
    let e = sign(&keyd, APP, TEST_GID, "not-a-handle");
    assert!(e.contains("invalid handle"), "{e}");
    // a symmetric key's handle
    let e = sign(&keyd, APP, TEST_GID, &sym);
    assert!(e.contains("handle is not for a key pair"), "{e}");
    // a key the caller may not use: a (validly MACed) handle for the reserved handle-validation key → 401
    let hvk = std::fs::read(keyd.keys_dir().join(
        "handlevalidationkey-40f1ca41fe8b50f53e10f3e3a580dcae24087f37aa498ba9903f2612b03e90ba.key",
    ))
    .expect("the file backend's handle-validation key");
    let reserved = mint_handle(&hvk, r#"{"KeyPair":"handle-validation-key"}"#);
    let e = sign(&keyd, APP, TEST_GID, &reserved);
    assert!(
        e.contains("HTTP 401") && e.contains(&unauthorized(APP, "handle-validation-key")),
        "{e}"
    );
    // a caller outside the socket's group: connect() is refused
    let e = sign(&keyd, OUTSIDER, OUTSIDER, &good);
    assert!(
        e.contains("keyd unreachable") && e.contains("Permission denied"),
        "{e}"
    );
    // the good handle works (so the failures above are the inputs' fault)
    let out = with_engine(
        &s,
        &keyd,
        APP,
        TEST_GID,
        &["pkeyutl", "-sign"],
        &["-inkey", &good, "-in", "digest"],
    );
    assert!(out.status.success(), "{}", text(&out));
    // keyd down
    keyd.stop();
    let e = sign(&keyd, APP, TEST_GID, &good);
    assert!(
        e.contains("keyd unreachable") && e.contains(&keyd.socket().display().to_string()),
        "{e}"
    );
}

/// The twin reports the same causes as a typed error.
#[test]
fn twin_errors_are_typed() {
    let backend = aziot_tests::keyd::file_backend_only("twin_errors_are_typed");
    if !deps_for(backend) {
        return;
    }
    let mut keyd = start_keyd(backend);
    let api = keyd.api(V2021);
    let client = Arc::new(KeydClient::new(keyd.socket()));
    let sym = api.create_key("engine-twin-sym", "sign");
    match load_private_key(&client, &sym) {
        Err(aziot_key_openssl_engine::Error::Keyd {
            status: 400,
            message,
        }) => assert!(
            message.contains("handle is not for a key pair"),
            "{message}"
        ),
        other => panic!("{:?}", other.map(|_| "a key")),
    }
    keyd.stop();
    let good = "sr=eyJrZXlfaWQiOnsiS2V5UGFpciI6ImsifSwibm9uY2UiOiIifQ==&sig=AA==";
    match load_private_key(&client, good) {
        Err(aziot_key_openssl_engine::Error::Unreachable { path, .. }) => {
            assert_eq!(Path::new(&path), keyd.socket())
        }
        other => panic!("{:?}", other.map(|_| "a key")),
    }
}

/// P-384 (upstream: unusable through the engine, keyd names no curve but P-256): a preloaded
/// P-384 file key is recognised by its 49-byte compressed point and signs through the engine.
#[test]
fn p384_preloaded_key_signs_through_the_engine() {
    let backend =
        aziot_tests::keyd::file_backend_only("p384_preloaded_key_signs_through_the_engine");
    if !deps_for(backend) {
        return;
    }
    let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::SECP384R1).expect("P-384");
    let local = openssl::ec::EcKey::generate(&group).expect("generate");
    let b = Keyd::builder().backend(backend);
    let path = b.dir().join("p384.pem");
    std::fs::write(&path, local.private_key_to_pem().expect("pem")).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let (uid, gid) = aziot_tests::keyd::service_user();
    nix::unistd::chown(
        &path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .expect("chown");
    let keyd = b
        .extra(&format!(
            "[preloaded_keys]\nengine-p384 = {}\n\n[[principal]]\nuid = {APP}\nkeys = [\"engine-*\"]\n",
            aziot_tests::keyd::toml_str(&format!("file://{}", path.display()))
        ))
        .start();
    let api = keyd.api(V2021);
    let h = api.get_keypair("engine-p384");
    // why upstream fails: keyd cannot name the curve (spec keyd.md §5.8)
    expect_err(&api.param_resp(&h, "ec-curve-oid"), 400, LIB_INVALID);
    assert_eq!(unb64(&api.param(&h, "ec-point")).len(), 49);
    let s = scratch("engine-p384");
    let public = PKey::from_ec_key(
        openssl::ec::EcKey::from_public_key(&group, local.public_key()).expect("pub"),
    )
    .expect("pkey");
    let p = write_public(&s, "p384.pub.pem", &public);
    s.write("digest", &sha256(b"the message signed by keyd"));
    // SHA-384-sized digest too (not truncated: the order is 384 bits)
    sign_and_verify(&s, &keyd, &h, &p, &[]);
}

/// `AZIOT_KEYD_ENDPOINT` is honoured by an ordinary process and ignored by a set-group-ID one
/// (AT_SECURE, the rule of secure_getenv): there the engine goes to the compiled-in socket.
#[test]
fn endpoint_override_is_ignored_when_setgid() {
    let backend = aziot_tests::keyd::file_backend_only("endpoint_override_is_ignored_when_setgid");
    if !deps_for(backend) {
        return;
    }
    let keyd = start_keyd(backend);
    let h = keyd
        .api(V2021)
        .create_keypair("engine-secure", Some("ec-p256"));
    let s = scratch("engine-setgid");
    s.write("digest", &sha256(b"m"));
    let openssl_bin = ["/usr/bin/openssl", "/bin/openssl"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .expect("openssl binary");
    let so = s.plugin_so();
    let args = [
        "pkeyutl",
        "-sign",
        "-engine",
        so.to_str().expect("utf-8"),
        "-keyform",
        "engine",
        "-inkey",
        &h,
        "-in",
        "digest",
    ];
    let run = |bin: &Path, gid: u32| {
        // The copy below was just written: a child forked meanwhile by another test thread may
        // still hold its write descriptor (ETXTBSY) until it execs; retry until it has.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Command::new(bin)
                .args(args)
                .current_dir(s.dir())
                .env_clear()
                .env(
                    "AZIOT_KEYD_ENDPOINT",
                    format!("unix://{}", keyd.socket().display()),
                )
                .uid(APP)
                .gid(gid)
                .stdin(Stdio::null())
                .output()
            {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => break other.expect("run openssl"),
            }
        }
    };
    // control: an ordinary process uses the override
    let out = run(Path::new(openssl_bin), TEST_GID);
    assert!(out.status.success(), "{}", text(&out));
    // the same program set-group-ID (to the socket's group, so it could connect to the test keyd)
    let setgid = s.path("openssl-setgid");
    std::fs::copy(openssl_bin, &setgid).expect("copy openssl");
    nix::unistd::chown(
        &setgid,
        Some(nix::unistd::Uid::from_raw(0)),
        Some(nix::unistd::Gid::from_raw(TEST_GID)),
    )
    .expect("chown");
    std::fs::set_permissions(&setgid, std::fs::Permissions::from_mode(0o2755)).expect("chmod g+s");
    let out = run(&setgid, OUTSIDER);
    let all = text(&out);
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "{all}"
    );
    assert!(
        !all.contains(&keyd.socket().display().to_string()),
        "the override was used: {all}"
    );
    if !Path::new("/run/aziot/keyd.sock").exists() {
        assert!(
            all.contains("keyd unreachable") && all.contains("/run/aziot/keyd.sock"),
            "{all}"
        );
    }
}

/// The twin inside a confined worker: `aziotd --worker` started as the broker starts
/// identityd's worker — the service that holds mTLS connections to DPS and IoT Hub with keys in
/// keyd — (hand-off socket on fd 3, user aziotid with its groups, empty environment, identityd's
/// real effective policy with the s_server port granted as a hub port would be), locked in
/// (rlimits, Landlock, seccomp in kill mode), then the escape-probe attempt `tls-client`
/// (`aziot_policy::escape::attempts`) loads the keyd key and completes mTLS against
/// `openssl s_server` — TLS 1.3, then TLS 1.2 forced by the server (the twin is a key of the
/// built-in provider; with an EC certificate, TLS 1.2 needs the NIST groups the default provider
/// keeps, docs/engine.md Limits). keyd's socket keeps the owner keyd gives it (group aziotks, of
/// which aziotid is a member, as in production).
#[test]
fn twin_mtls_in_a_confined_identityd_worker() {
    use aziot_ipc::handoff::{
        self, DescriptorEntry, DescriptorKind, Manifest, MANIFEST_VERSION,
    };
    use std::os::fd::{AsFd, OwnedFd};
    if !aziot_tests::require_deps(&[
        Dep::Root,
        Dep::ServiceUser(aziot_tests::keyd::SERVICE_USER),
        Dep::ServiceUser("aziotid"),
        Dep::OpensslCli,
    ]) {
        return;
    }
    let keyd = Keyd::builder()
        .backend(Backend::from_env())
        .keep_socket_owner()
        .start();
    let api = keyd.api(V2021);
    let s = scratch("engine-confined");
    make_ca(&s);
    aziot_key_openssl_engine::preload().expect("preload");
    let client = Arc::new(KeydClient::new(keyd.socket()));
    let svc_user = nix::unistd::User::from_name("aziotid")
        .expect("getpwnam")
        .expect("aziotid");
    for (id, alg) in [
        ("engine-confined-ec", "ec-p256"),
        ("engine-confined-rsa", "rsa-2048"),
    ] {
        let h = api.create_keypair(id, Some(alg));
        // the client certificate, from a CSR signed through the twin in this process
        let key = load_private_key(&client, &h).expect("load");
        let cert = issue(&s, id, &csr_signed_with(&key, id).to_pem().expect("pem"));

        // identityd's state directory (aziotid, 0700) with the inputs of the attempt
        let state = s.path(&format!("state-{id}"));
        std::fs::create_dir(&state).expect("mkdir state");
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        for (name, data) in [
            ("tls-client.handle", h.clone().into_bytes()),
            (
                "tls-client.ca.pem",
                std::fs::read(s.path("ca.pem")).expect("ca"),
            ),
            ("tls-client.cert.pem", std::fs::read(&cert).expect("cert")),
            ("", Vec::new()),
        ] {
            let p = if name.is_empty() {
                state.clone()
            } else {
                state.join(name)
            };
            if !name.is_empty() {
                std::fs::write(&p, data).expect("write");
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                    .expect("chmod");
            }
            nix::unistd::chown(&p, Some(svc_user.uid), Some(svc_user.gid)).expect("chown");
        }

        // TLS 1.3, then TLS 1.2 forced by the server (an EC certificate: the NIST groups must
        // stay usable with the provider loaded, docs/engine.md Limits)
        for server_opts in [&[][..], &["-tls1_2"][..]] {
            let server = SServer::start_with(&s, false, server_opts);
            let mut grants = aziot_policy::Grants::default();
            grants.tcp_ports.push(aziot_policy::PortGrant {
                port: server.port(),
                origin: aziot_policy::Origin::Config(
                    "engine suite: the s_server port, as a hub port".into(),
                ),
            });
            let policy = aziot_policy::effective("identityd", &grants, None)
                .expect("identityd's effective policy");
            let creds = aziot_policy::resolve_credentials(&policy).expect("credentials");
            let listener_path = s.path(&format!("identityd-{id}-{}.sock", server_opts.len()));
            let listener = std::os::unix::net::UnixListener::bind(&listener_path).expect("bind");
            let fds: Vec<OwnedFd> = vec![
                listener.into(),
                std::fs::File::open(&state).expect("open state").into(),
            ];
            let manifest = Manifest {
                version: MANIFEST_VERSION,
                service: "identityd".to_owned(),
                // identityd's worker parses its config before lock-in: the smallest one that needs no
                // cloud (as the escape suite's).
                config: format!(
                    "hostname = \"engine\"\nhomedir = {:?}\n[provisioning]\nsource = \"none\"\n",
                    state.display().to_string()
                ),
                descriptors: vec![
                    DescriptorEntry {
                        name: "listener".into(),
                        kind: DescriptorKind::UnixListener,
                    },
                    DescriptorEntry {
                        name: "state".into(),
                        kind: DescriptorKind::Directory,
                    },
                ],
                policy: serde_json::to_value(&policy).expect("policy"),
                log_filter: String::new(),
                seccomp_mode: "kill".to_owned(),
                allow_degraded: false,
                escape: Some(aziot_policy::escape::EscapeAttempt {
                    name: "tls-client".into(),
                    arg: Some(format!("{}|{}", keyd.socket().display(), server.port())),
                }),
            };
            let aziot_tests::worker_spawn::Spawned { mut child, sock: ours } =
                aziot_tests::worker_spawn::spawn(&manifest, fds, creds, None, false);
            let report: Option<serde_json::Value> = handoff::recv_json(ours.as_fd()).ok();
            let mut messages = Vec::new();
            while let Ok(m) = handoff::recv_json::<serde_json::Value>(ours.as_fd()) {
                messages.push(m);
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            let status = loop {
                if let Some(st) = child.try_wait().expect("try_wait") {
                    break st;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    break child.wait().expect("wait");
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            let mut out = String::new();
            let _ = child
                .stdout
                .take()
                .expect("stdout")
                .read_to_string(&mut out);
            let _ = child
                .stderr
                .take()
                .expect("stderr")
                .read_to_string(&mut out);
            let seen = server.finish();
            let transcript = format!("report: {report:?}\nmessages: {messages:?}\nexit: {status:?}\noutput: {out}\n--- s_server ---\n{seen}");
            let report = report.unwrap_or_else(|| panic!("no sandbox report\n{transcript}"));
            assert_eq!(
                report["ok"], true,
                "the worker did not lock in\n{transcript}"
            );
            let outcome = messages
                .iter()
                .find_map(|m| m["escape_outcome"].as_str().map(str::to_owned));
            assert_eq!(
                outcome.as_deref(),
                Some("ok"),
                "{id} {server_opts:?}: the tls-client attempt (an aziotd built without the escape-probe feature? `cargo build --workspace --bins`)\n{transcript}"
            );
            assert!(
                seen.contains("hello from the confined worker"),
                "{transcript}"
            );
            assert!(
                seen.contains(&format!("CN = {id}")) && seen.contains("verify return:1"),
                "{transcript}"
            );
        }
    }
}
