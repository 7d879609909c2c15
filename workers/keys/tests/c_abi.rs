//! Compiles `tests/c/keys_test.c` against `include/aziot-keys.h` and our cdylib, runs it on a
//! temporary home directory, and checks what it printed with OpenSSL.

mod common;

use std::collections::HashMap;

use common::{cdylib_path, compile_c, crate_dir, from_hex, TempDir};
use openssl::bn::BigNumContext;
use openssl::ec::{EcGroup, EcKey, EcPoint};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;

#[test]
fn c_program_drives_the_library() {
    let tmp = TempDir::new("c-abi");
    let lib = cdylib_path();
    let lib_dir = lib.parent().unwrap().to_str().unwrap().to_owned();
    let exe = tmp.path().join("keys_test");
    compile_c(
        &[&crate_dir().join("tests/c/keys_test.c")],
        &["-L", &lib_dir, &format!("-Wl,-rpath,{lib_dir}"), "-laziot_keys"],
        &exe,
    );
    let home = tmp.path().join("home");
    std::fs::create_dir(&home).unwrap();

    let output = std::process::Command::new(&exe).arg(&home).output().unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "keys_test failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", output.status);
    assert!(stdout.lines().any(|l| l == "OK 0"), "{stdout}");

    let values: HashMap<&str, Vec<u8>> = stdout
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(k, _)| *k != "OK")
        .map(|(k, v)| (k, from_hex(v)))
        .collect();

    // The ECDSA signature made through the C ABI verifies against the EC point it reported.
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    let mut ctx = BigNumContext::new().unwrap();
    let point = EcPoint::from_bytes(&group, &values["POINT"], &mut ctx).unwrap();
    let public = EcKey::from_public_key(&group, &point).unwrap();
    let sig = EcdsaSig::from_der(&values["SIGNATURE"]).unwrap();
    assert!(sig.verify(&values["DIGEST"], &public).unwrap());
    let mut other = values["DIGEST"].clone();
    other[0] ^= 1;
    assert!(!sig.verify(&other, &public).unwrap());

    // derive_key = HMAC-SHA256(base key "Jefe", "ctx").
    let key = openssl::pkey::PKey::hmac(b"Jefe").unwrap();
    let mut signer = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &key).unwrap();
    signer.update(b"ctx").unwrap();
    assert_eq!(values["DERIVED"], signer.sign_to_vec().unwrap());

    // The files landed in <home>/keys with mode 0600, and nothing else was created.
    use std::os::unix::fs::PermissionsExt;
    let entries: Vec<_> = std::fs::read_dir(&home).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries, ["keys"]);
    let mut count = 0;
    for entry in std::fs::read_dir(home.join("keys")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        assert!(name.ends_with(".key") && !name.starts_with('.'), "{name}");
        assert_eq!(entry.metadata().unwrap().permissions().mode() & 0o777, 0o600, "{name}");
        count += 1;
    }
    // jefe, derived and aes remain (kp moved then deleted, sym deleted).
    assert_eq!(count, 3);
}
