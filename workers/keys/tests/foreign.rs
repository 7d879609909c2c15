//! `ForeignLibrary` against (1) our own cdylib, which exercises both directions of the C ABI,
//! and (2) small fake C libraries that check loading errors, the 2.0.0.0 behaviour, parameter
//! marshalling and the abort on a lying length.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};

use aziot_keys::foreign::ForeignLibrary;
use aziot_keys::native::KeyStore;
use aziot_keys::{EncryptMechanism, Error, KeyBackend, KeyPairParameter, KeyUsage, SignMechanism};
use common::{cdylib_path, compile_c, crate_dir, TempDir};
use openssl::bn::BigNumContext;
use openssl::ec::{EcGroup, EcKey, EcPoint};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;

fn load_error(path: &Path) -> String {
    match ForeignLibrary::load(path) {
        Ok(lib) => panic!("loaded {lib:?}"),
        Err(e @ Error::External { .. }) => e.to_string(),
        Err(e) => panic!("unexpected error kind: {e:?}"),
    }
}

/// Builds `tests/c/fake_keys.c` with the given defines into `dir`.
fn fake_library(dir: &Path, name: &str, defines: &[&str]) -> PathBuf {
    let out = dir.join(format!("libfake_{name}.so"));
    let mut args = vec!["-shared", "-fPIC"];
    args.extend_from_slice(defines);
    compile_c(&[&crate_dir().join("tests/c/fake_keys.c")], &args, &out);
    out
}

#[test]
fn own_library_round_trip() {
    let tmp = TempDir::new("foreign");
    let home = tmp.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let lib = ForeignLibrary::load(&cdylib_path()).unwrap();
    assert_eq!(lib.version(), 0x0201_0000);
    assert!(matches!(lib.set_parameter("no_such_parameter", "x"), Err(Error::InvalidParameter(_))));
    lib.set_parameter("homedir_path", home.to_str().unwrap()).unwrap();

    // Key pair: create, parameters, ECDSA verified with OpenSSL.
    lib.create_key_pair_if_not_exists("kp", Some("ec-p256")).unwrap();
    lib.load_key_pair("kp").unwrap();
    assert_eq!(lib.get_key_pair_parameter("kp", KeyPairParameter::Algorithm).unwrap(), 1u32.to_ne_bytes());
    let point = lib.get_key_pair_parameter("kp", KeyPairParameter::EcPoint).unwrap();
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let mut ctx = BigNumContext::new().unwrap();
    let public = EcKey::from_public_key(&group, &EcPoint::from_bytes(&group, &point, &mut ctx).unwrap()).unwrap();
    let digest = openssl::sha::sha256(b"hello");
    let der = lib.sign("kp", SignMechanism::Ecdsa, &digest).unwrap();
    assert!(EcdsaSig::from_der(&der).unwrap().verify(&digest, &public).unwrap());

    // The library in the .so and the native store in this process agree on the files.
    let native = KeyStore::new();
    native.set_parameter("homedir_path", home.to_str().unwrap()).unwrap();
    assert_eq!(native.get_key_pair_parameter("kp", KeyPairParameter::EcPoint).unwrap(), point);

    // Symmetric keys: HMAC, verify, derived sign, derive_key.
    lib.create_key_if_not_exists("sym", KeyUsage::SIGN).unwrap();
    lib.load_key("sym").unwrap();
    let mac = lib.sign("sym", SignMechanism::HmacSha256, b"msg").unwrap();
    assert_eq!(mac, native.sign("sym", SignMechanism::HmacSha256, b"msg").unwrap());
    assert!(lib.verify("sym", SignMechanism::HmacSha256, b"msg", &mac).unwrap());
    assert!(!lib.verify("sym", SignMechanism::HmacSha256, b"msh", &mac).unwrap());
    let derived_mech = SignMechanism::DerivedHmacSha256 { derivation_data: b"ctx" };
    assert_eq!(lib.sign("sym", derived_mech, b"m").unwrap(), native.sign("sym", derived_mech, b"m").unwrap());
    assert_eq!(lib.derive_key("sym", b"ctx").unwrap(), native.derive_key("sym", b"ctx").unwrap());

    // Import, then AEAD (plain and derived) round trips; decryptable natively too.
    lib.import_key("aes", &[9u8; 32], KeyUsage::ENCRYPT).unwrap();
    let aead = EncryptMechanism::Aead { iv: b"123456789012", aad: b"aad" };
    let ct = lib.encrypt("aes", aead, b"attack at dawn").unwrap();
    assert_eq!(ct.len(), 1 + 14 + 16);
    assert_eq!(&lib.decrypt("aes", aead, &ct).unwrap()[..], b"attack at dawn");
    assert_eq!(&native.decrypt("aes", aead, &ct).unwrap()[..], b"attack at dawn");
    let derived_aead = EncryptMechanism::DerivedAead { derivation_data: b"ctx", iv: b"iv", aad: b"" };
    let ct = lib.encrypt("aes", derived_aead, b"x").unwrap();
    assert_eq!(&lib.decrypt("aes", derived_aead, &ct).unwrap()[..], b"x");
    let mut tampered = ct.clone();
    tampered[1] ^= 1;
    assert!(matches!(lib.decrypt("aes", derived_aead, &tampered), Err(Error::InvalidParameter(_))));

    // RSA private-key operation.
    lib.create_key_pair_if_not_exists("rsa", Some("rsa-2048")).unwrap();
    assert_eq!(lib.encrypt("rsa", EncryptMechanism::RsaPkcs1, b"digest info").unwrap().len(), 256);

    // Error mapping, move and delete.
    assert!(matches!(lib.load_key("missing"), Err(Error::InvalidParameter(_))));
    assert!(matches!(lib.load_key("nul\0id"), Err(Error::InvalidParameter(_))));
    assert!(matches!(lib.sign("sym", SignMechanism::Ecdsa, &digest), Err(Error::External { .. })));
    lib.move_key_pair("kp", "kp2").unwrap();
    assert!(matches!(lib.load_key_pair("kp"), Err(Error::InvalidParameter(_))));
    assert_eq!(lib.get_key_pair_parameter("kp2", KeyPairParameter::EcPoint).unwrap(), point);
    assert!(matches!(lib.move_key_pair("kp", "kp3"), Err(Error::External { .. })));
    lib.delete_key_pair("kp2").unwrap();
    lib.delete_key("sym").unwrap();
    assert!(matches!(lib.load_key("sym"), Err(Error::InvalidParameter(_))));
}

#[test]
fn loading_errors() {
    let tmp = TempDir::new("fake-load");
    assert!(load_error(&tmp.path().join("nonexistent.so")).starts_with("could not load libaziot-keys"));
    let cases = [
        ("null_sign", "-DFAKE_NULL_SIGN", "library does not define sign"),
        ("bad_version", "-DFAKE_BAD_VERSION", "library exports API version 0x03000000 which is not supported"),
        ("fail", "-DFAKE_FAIL", "could not get function list: 2"),
        ("no_entry", "-DFAKE_NO_ENTRY", "library does not define aziot_keys_get_function_list"),
    ];
    for (name, define, message) in cases {
        assert_eq!(load_error(&fake_library(tmp.path(), name, &[define])), message, "{name}");
    }
}

#[test]
fn version_2_0_library() {
    let tmp = TempDir::new("fake-v20");
    let lib = ForeignLibrary::load(&fake_library(tmp.path(), "v20", &["-DFAKE_V20"])).unwrap();
    assert_eq!(lib.version(), 0x0200_0000);
    // Move and delete do not exist in 2.0.0.0: silent no-ops (spec quirk 9).
    lib.move_key_pair("missing", "missing").unwrap();
    lib.delete_key_pair("missing").unwrap();
    lib.delete_key("missing").unwrap();

    // Return codes.
    lib.set_parameter("homedir_path", "/x").unwrap();
    assert!(matches!(lib.set_parameter("bad", "x"), Err(Error::InvalidParameter(_))));
    match lib.set_parameter("weird", "x") {
        Err(e @ Error::External { .. }) => assert_eq!(e.to_string(), "set_parameter returned 0x00000007"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(lib.set_parameter("external", "x"), Err(Error::External { .. })));
    assert!(matches!(lib.load_key("missing"), Err(Error::InvalidParameter(_))));
    lib.load_key_pair("kp").unwrap();
    lib.create_key_pair_if_not_exists("kp", None).unwrap();
    lib.create_key_if_not_exists("k", KeyUsage::SIGN).unwrap();
    lib.import_key("k", b"bytes", KeyUsage::SIGN).unwrap();

    // Two-call protocol: the size query says 16, the real output is 8 bytes.
    assert_eq!(lib.sign("k", SignMechanism::Ecdsa, b"d").unwrap(), b"fake-sig");
    assert!(lib.verify("k", SignMechanism::HmacSha256, b"d", b"fake-sig").unwrap());
    assert!(!lib.verify("k", SignMechanism::HmacSha256, b"d", b"other").unwrap());
    assert_eq!(lib.get_key_pair_parameter("kp", KeyPairParameter::RsaExponent).unwrap(), [5]);
    assert_eq!(&lib.derive_key("k", b"echo").unwrap()[..], b"echo");

    // Mechanism parameter marshalling.
    let derived = SignMechanism::DerivedHmacSha256 { derivation_data: b"derivation" };
    assert_eq!(lib.sign("k", derived, b"m").unwrap(), b"derivation");
    let aead = EncryptMechanism::Aead { iv: b"123456789012", aad: b"aad" };
    assert_eq!(lib.encrypt("k", aead, b"pt").unwrap(), [1, 12, 3, b'p', b't']);
    assert_eq!(&lib.decrypt("k", aead, b"ct").unwrap()[..], [1, 12, 3, b'c', b't']);
    let derived_aead = EncryptMechanism::DerivedAead { derivation_data: b"four", iv: b"iv", aad: b"" };
    assert_eq!(lib.encrypt("k", derived_aead, b"pt").unwrap(), [4, 4, 2, 0, b'p', b't']);
    assert_eq!(lib.encrypt("k", EncryptMechanism::RsaPkcs1, b"pt").unwrap(), [2, b'p', b't']);
    assert_eq!(lib.encrypt("k", EncryptMechanism::RsaNoPadding, b"pt").unwrap(), [3, b'p', b't']);
}

const LIAR_ENV: &str = "AZIOT_KEYS_TEST_LIAR_LIBRARY";

/// A library that claims to have written more than the buffer holds makes the process abort
/// (spec §6). Runs the failing call in a child process: this same test binary, filtered to
/// this test, with the library path in an environment variable.
#[test]
fn liar_library_aborts_the_process() {
    if let Ok(path) = std::env::var(LIAR_ENV) {
        let lib = ForeignLibrary::load(Path::new(&path)).unwrap();
        let result = lib.sign("k", SignMechanism::Ecdsa, b"d");
        // Reaching this point is the failure the parent detects.
        println!("sign returned {result:?}");
        std::process::exit(0);
    }
    let tmp = TempDir::new("fake-liar");
    let path = fake_library(tmp.path(), "liar", &["-DFAKE_LIAR"]);
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["liar_library_aborts_the_process", "--exact", "--test-threads=1", "--nocapture"])
        .env(LIAR_ENV, &path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{status:?}");
}
