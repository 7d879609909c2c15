//! keyd with a PKCS#11 token (SoftHSM2), through the broker, the worker confined: key pairs live
//! on the token (checked with pkcs11-tool, signatures verified with the openssl CLI), the PIN
//! never reaches the log, and configuration errors are fatal while a wrong PIN is not
//! (login is lazy, keyd.md §7.1). Runs whatever `AZIOT_TEST_BACKEND` says.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use aziot_tests::api::*;
use aziot_tests::crypto::*;
use aziot_tests::keyd::{toml_str, Backend, SoftHsm};
use aziot_tests::keyd::SERVICE_USER;
use aziot_tests::{Dep, Keyd};
use serde_json::json;

fn openssl_cli(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("openssl CLI: {e}"))
}

fn assert_no_pin(keyd: &Keyd, pins: &[&str]) {
    let log = keyd.log();
    assert!(!log.is_empty(), "keyd wrote no log at all");
    for pin in pins {
        assert!(!log.contains(pin), "the PIN {pin} appears in keyd's log:\n{log}");
    }
}

#[test]
fn token_key_pair_is_listed_and_its_signature_verifies_with_openssl() {
    aziot_tests::require!(Dep::Root, Dep::ServiceUser(SERVICE_USER), Dep::SoftHsm, Dep::Pkcs11Tool, Dep::OpensslCli);
    let keyd = Keyd::builder().backend(Backend::SoftHsm).log_level("debug").start();
    let hsm = keyd.softhsm().expect("token");
    let api = keyd.api(V2021);
    let h = api.create_keypair("device-id", Some("ec-p256"));
    assert_eq!(api.param(&h, "algorithm"), "ECDSA");

    // pkcs11-tool sees a private and a public object labelled with the key id, and no file
    let listing = String::from_utf8_lossy(&hsm.pkcs11_tool(&["--list-objects"])).into_owned();
    assert!(listing.contains("Private Key Object; EC"), "{listing}");
    assert!(listing.contains("Public Key Object; EC"), "{listing}");
    assert_eq!(hsm.labels().iter().filter(|l| *l == "device-id").count(), 2, "{listing}");
    assert!(
        !keyd.keys_dir().join(key_file_name("device-id")).exists(),
        "a token pair must not also be a file"
    );

    // the public key as pkcs11-tool exports it (DER SubjectPublicKeyInfo)
    let work = keyd.dir();
    let der = work.join("pub.der");
    hsm.pkcs11_tool(&[
        "--read-object",
        "--type",
        "pubkey",
        "--label",
        "device-id",
        "-o",
        der.to_str().expect("utf-8"),
    ]);
    let spki = fs::read(&der).expect("pub.der");
    let pk = openssl::pkey::PKey::public_key_from_der(&spki).expect("pkcs11-tool wrote a DER SPKI");
    assert_eq!(
        unb64(&api.param(&h, "ec-point")),
        ec_compressed_point_pub(&pk),
        "keyd's ec-point is the token's public key"
    );

    // ECDSA through keyd, verified by the openssl CLI over the message
    let msg = b"signed by a key on the token, through the broker";
    fs::write(work.join("msg"), msg).expect("msg");
    fs::write(work.join("other"), b"another message").expect("other");
    let sig = api.sign_ecdsa(&h, &sha256(msg));
    fs::write(work.join("sig.der"), &sig).expect("sig");
    let verify = |file: &str| {
        openssl_cli(
            &["dgst", "-sha256", "-keyform", "DER", "-verify", "pub.der", "-signature", "sig.der", file],
            work,
        )
    };
    let ok = verify("msg");
    assert!(
        ok.status.success() && String::from_utf8_lossy(&ok.stdout).contains("Verified OK"),
        "openssl dgst -verify: {}{}",
        String::from_utf8_lossy(&ok.stdout),
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(!verify("other").status.success(), "the signature must not verify another message");

    // a second handle (GET) names the same token pair
    let g = api.get_keypair("device-id");
    let sig2 = api.sign_ecdsa(&g, &sha256(msg));
    assert!(ecdsa_verify(&unb64(&api.param(&g, "ec-point")), &sha256(msg), &sig2));

    // the PIN (pin-value in config.toml) never reaches the log, at debug level
    assert!(keyd.log().contains("DBUG"), "debug logging was on");
    assert_no_pin(&keyd, &[&hsm.pin, &hsm.so_pin]);
}

/// Compressed SEC1 point of a public key.
fn ec_compressed_point_pub(pk: &openssl::pkey::PKey<openssl::pkey::Public>) -> Vec<u8> {
    let ec = pk.ec_key().expect("EC public key");
    let mut ctx = openssl::bn::BigNumContext::new().expect("bn");
    ec.public_key()
        .to_bytes(ec.group(), openssl::ec::PointConversionForm::COMPRESSED, &mut ctx)
        .expect("point")
}

#[test]
fn malformed_base_slot_uri_refuses_to_start() {
    aziot_tests::require!(Dep::Root, Dep::ServiceUser(SERVICE_USER), Dep::SoftHsm, Dep::Pkcs11Tool, Dep::OpensslCli);
    for (uri, what) in [
        ("pkcs11:token=aziot-test;token=again?pin-value=1234", "repeated token"),
        ("pkcs11:token=aziot-test?pin-value=1234&pin-source=file:/x", "pin-value and pin-source"),
        ("pkcs11:token=aziot%zztest?pin-value=1234", "bad escape"),
        ("https://example.com/token", "not a pkcs11 URI"),
    ] {
        let (status, log) = Keyd::builder()
            .backend(Backend::SoftHsm)
            .pkcs11_base_slot(uri)
            .start_expecting_exit();
        assert_eq!(status.code(), Some(1), "{what}: {uri}: exit status {status}\n{log}");
        assert!(
            log.contains("pkcs11_base_slot"),
            "{what}: the message must name pkcs11_base_slot\n{log}"
        );
        assert!(!log.contains("1234"), "{what}: the PIN appears in the log\n{log}");
    }
}

#[test]
fn missing_token_label_refuses_to_start() {
    aziot_tests::require!(Dep::Root, Dep::ServiceUser(SERVICE_USER), Dep::SoftHsm, Dep::Pkcs11Tool, Dep::OpensslCli);
    let b = Keyd::builder().backend(Backend::SoftHsm);
    let (status, log) = b.pkcs11_base_slot("pkcs11:token=no-such-token?pin-value=98765432").start_expecting_exit();
    assert_eq!(status.code(), Some(1), "exit status {status}\n{log}");
    // (the message names the parameter whose setting loaded the module, pkcs11_lib_path)
    assert!(
        log.contains("the worker refused to start")
            && log.contains("no initialized PKCS#11 token matches the URI's token/serial"),
        "the message must say that no token matches\n{log}"
    );
    assert!(!log.contains("98765432"), "the PIN appears in the log\n{log}");
}

/// keyd with a preloaded file key and a base slot whose PIN is wrong.
fn start_with_wrong_pin(wrong: &str) -> (Keyd, Vec<u8>) {
    let b = Keyd::builder().backend(Backend::SoftHsm);
    // a preloaded file key (owned by aziotks, 0600, as `aziotctl config apply` leaves it)
    let path = b.dir().join("pre-sym");
    let sym = random(32);
    fs::write(&path, &sym).expect("write");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
    let (uid, gid) = aziot_tests::keyd::service_user();
    nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(uid)), Some(nix::unistd::Gid::from_raw(gid)))
        .expect("chown");
    let keyd = b
        .extra(&format!("[preloaded_keys]\npre-sym = {}\n", toml_str(&format!("file://{}", path.display()))))
        .pkcs11_base_slot(&format!("pkcs11:token={}?pin-value={wrong}", SoftHsm::LABEL))
        .start();
    (keyd, sym)
}

/// Start succeeds with a wrong PIN (login is lazy, spec §7.1), and the PIN is not logged.
#[test]
fn wrong_pin_still_starts() {
    aziot_tests::require!(Dep::Root, Dep::ServiceUser(SERVICE_USER), Dep::SoftHsm, Dep::Pkcs11Tool, Dep::OpensslCli);
    let wrong = "11112222333344445555";
    let (keyd, _sym) = start_with_wrong_pin(wrong);
    // the worker set the parameters, loaded the module, found the token, reported ready
    assert!(
        keyd.wait_log("of keyd ready", std::time::Duration::from_secs(10)),
        "no worker became ready\n{}",
        keyd.log()
    );
    // Still the first worker, and serving: a request is answered by the same pid (no fixed
    // wait for a death that should not come).
    let worker = keyd.worker_pid();
    let r = keyd
        .raw(b"GET /nonexistent?api-version=2021-05-01 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("a request to the worker");
    assert!(r.status >= 400 && r.status < 500, "{r}");
    assert_eq!(keyd.worker_pid(), worker, "the worker was replaced\n{}", keyd.log());
    let log = keyd.log();
    assert!(!log.contains("restarted") && !log.contains("killed"), "the worker died\n{log}");
    let hsm = keyd.softhsm().expect("token");
    assert_no_pin(&keyd, &[wrong, &hsm.pin, &hsm.so_pin]);
}

/// A wrong PIN for the base slot: keyd stays up (SoftHSM2's syslog() of the failed C_Login
/// goes through aziotd's syslog shim, not a socket the sandbox forbids), every request that
/// needs the token fails with an error and a clear cause in the log, and no PIN is logged.
/// The handle-validation key lives in the base slot when one is configured (spec keyd.md
/// §4.2), so with a wrong base-slot PIN no handle can be minted or checked — for file keys
/// too; that a wrong PIN on one token leaves other keys working is shown by
/// `a_wrong_pin_or_a_missing_token_fails_only_its_own_keys` below.
#[test]
fn wrong_pin_fails_token_requests_and_keyd_stays_up() {
    aziot_tests::require!(Dep::Root, Dep::ServiceUser(SERVICE_USER), Dep::SoftHsm, Dep::Pkcs11Tool, Dep::OpensslCli);
    let wrong = "11112222333344445555";
    let (mut keyd, _sym) = start_with_wrong_pin(wrong);
    let api = keyd.api(V2021);
    for id in ["pair-1", "pair-2"] {
        let r = api.post("/keypair", &json!({"keyId": id, "preferredAlgorithms": "ec-p256"}));
        assert!(r.status >= 400, "key pair with a wrong PIN\n{r}");
    }
    let r = api.get("/key/pre-sym");
    assert_eq!(r.status, 500, "the handle-validation key is on the token\n{r}");
    assert!(keyd.is_running(), "keyd died\n{}", keyd.log());
    let log = keyd.log();
    assert!(!log.contains("restarted") && !log.contains("killed"), "the worker died\n{log}");
    assert!(log.contains("PKCS#11 login failed: the PIN is incorrect"), "a clear cause in the log\n{log}");
    let hsm = keyd.softhsm().expect("token");
    assert!(hsm.labels().is_empty(), "nothing on the token");
    assert_no_pin(&keyd, &[wrong, &hsm.pin, &hsm.so_pin]);
}

/// Two bad preloaded locations beside a good token: a key on a second token whose PIN in the
/// URI is wrong, and a key on a token that does not exist. Each fails on its own requests with
/// its cause in the log; keys on the base slot keep being created and used, and keyd stays up.
#[test]
fn a_wrong_pin_or_a_missing_token_fails_only_its_own_keys() {
    aziot_tests::require!(Dep::Root, Dep::ServiceUser(SERVICE_USER), Dep::SoftHsm, Dep::Pkcs11Tool, Dep::OpensslCli);
    let mut keyd = Keyd::builder().backend(Backend::SoftHsm).start();
    keyd.stop();
    // a second token in the same store, holding an EC pair "k", made with its right PIN
    let hsm = keyd.softhsm().expect("token");
    let (other_pin, wrong_pin) = ("5555666677778888", "5555666677770000");
    let init = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", hsm.conf())
        .args(["--init-token", "--free", "--label", "aziot-other", "--pin", other_pin, "--so-pin", "1234123412341234"])
        .output()
        .expect("softhsm2-util");
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let gen = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", hsm.conf())
        .args(["--module", aziot_tests::keyd::SOFTHSM_MODULE, "--token-label", "aziot-other", "--login", "--pin", other_pin])
        .args(["--keypairgen", "--key-type", "EC:prime256v1", "--label", "k"])
        .output()
        .expect("pkcs11-tool");
    assert!(gen.status.success(), "{}", String::from_utf8_lossy(&gen.stderr));
    hsm.chown_to_service_user();
    fs::create_dir_all(keyd.config_dir()).expect("config.d");
    fs::write(
        keyd.config_dir().join("50-preloaded.toml"),
        format!(
            "[preloaded_keys]\non-other = {}\non-missing = {}\n",
            toml_str(&format!("pkcs11:token=aziot-other;object=k?pin-value={wrong_pin}")),
            toml_str("pkcs11:token=no-such-token;object=x?pin-value=24682468"),
        ),
    )
    .expect("config.d/50-preloaded.toml");
    keyd.start_again();

    let api = keyd.api(V2021);
    // a token failure is the library's EXTERNAL error: 500 `internal error` on the wire (spec
    // keyd.md §4), the cause in the log
    for (id, what) in [("on-other", "a key behind a wrong PIN"), ("on-missing", "a key on a missing token")] {
        let r = api.get(&format!("/keypair/{id}"));
        assert_eq!(r.status, 500, "{what}\n{r}");
        assert_eq!(r.json()["message"], "internal error", "{what}\n{r}");
    }

    // the base slot works: a pair is created on it and signs, before and after the failures
    let h = api.create_keypair("fresh", Some("ec-p256"));
    let digest = sha256(b"still serving");
    let sig = api.sign_ecdsa(&h, &digest);
    assert!(ecdsa_verify(&unb64(&api.param(&h, "ec-point")), &digest, &sig));
    assert_eq!(api.get("/keypair/on-other").status, 500);
    assert!(ecdsa_verify(&unb64(&api.param(&h, "ec-point")), &digest, &api.sign_ecdsa(&h, &digest)));

    assert!(keyd.is_running(), "keyd died\n{}", keyd.log());
    let log = keyd.log();
    assert!(!log.contains("restarted") && !log.contains("killed"), "the worker died\n{log}");
    assert!(log.contains("PKCS#11 login failed: the PIN is incorrect"), "the wrong PIN's cause\n{log}");
    assert!(log.contains("no initialized PKCS#11 token matches"), "the missing token's cause\n{log}");
    let hsm = keyd.softhsm().expect("token");
    assert_no_pin(&keyd, &[wrong_pin, other_pin, "24682468", &hsm.pin, &hsm.so_pin]);
}

/// `pin-source=file:` (RFC 7512; the original reads only `pin-value`): the worker reads the PIN
/// file while it pre-loads, before Landlock would forbid the path, so token keys work from the
/// confined worker; an unreadable PIN file stops keyd at start with the file named, the PIN
/// nowhere in the log.
#[test]
fn a_pin_source_file_is_read_before_the_sandbox_locks() {
    aziot_tests::require!(Dep::Root, Dep::ServiceUser(SERVICE_USER), Dep::SoftHsm, Dep::Pkcs11Tool, Dep::OpensslCli);
    let b = Keyd::builder().backend(Backend::SoftHsm);
    let pin_file = b.dir().join("hsm-pin");
    let keyd = b
        .pkcs11_base_slot(&format!(
            "pkcs11:token={}?pin-source=file:{}",
            SoftHsm::LABEL,
            pin_file.display()
        ))
        .softhsm_pin_file("hsm-pin")
        .start();
    let api = keyd.api(V2021);
    let h = api.create_keypair("via-pin-file", Some("ec-p256"));
    let digest = sha256(b"pin from a file");
    assert!(ecdsa_verify(&unb64(&api.param(&h, "ec-point")), &digest, &api.sign_ecdsa(&h, &digest)));
    let hsm = keyd.softhsm().expect("token");
    assert_eq!(hsm.labels().iter().filter(|l| *l == "via-pin-file").count(), 2, "the pair is on the token");
    assert_no_pin(&keyd, &[&hsm.pin, &hsm.so_pin]);

    let missing = Keyd::builder()
        .backend(Backend::SoftHsm)
        .pkcs11_base_slot(&format!("pkcs11:token={}?pin-source=file:/nonexistent/hsm-pin", SoftHsm::LABEL));
    let (status, log) = missing.start_expecting_exit();
    assert_eq!(status.code(), Some(1), "{status}\n{log}");
    assert!(log.contains("/nonexistent/hsm-pin"), "the message names the PIN file\n{log}");
}
