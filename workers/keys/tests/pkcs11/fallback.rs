//! The symmetric-key creation fallback of spec/keyd.md §7.6, on a token that cannot hold HMAC
//! keys: `tests/c/p11_no_secrets.c` is SoftHSM2 whose `C_GenerateKey` answers
//! `CKR_MECHANISM_INVALID` to `CKM_GENERIC_SECRET_KEY_GEN` and whose `C_CreateObject` refuses
//! secret keys. Such keys must land in the home directory (the second candidate) while key
//! pairs and generated AES keys stay on the token.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use aziot_keys::native::KeyStore;
use aziot_keys::{EncryptMechanism, Error, KeyBackend, KeyUsage, SignMechanism};
use openssl::symm::{decrypt_aead, Cipher};

use crate::common::{compile_c, crate_dir, TempDir};
use crate::keys::hmac;
use crate::{fresh_token, is_invalid, pkcs11_tool, softhsm, MODULE, PIN};

/// The shim module, compiled once per test process (kept for the process: the store caches
/// loaded modules).
fn shim() -> &'static Path {
    static SHIM: OnceLock<(TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = SHIM.get_or_init(|| {
        let dir = TempDir::new("p11-shim");
        let out = dir.path().join("libp11_no_secrets.so");
        let define = format!("-DSOFTHSM_PATH=\"{MODULE}\"");
        compile_c(&[&crate_dir().join("tests/c/p11_no_secrets.c")], &["-shared", "-fPIC", &define, "-ldl"], &out);
        (dir, out)
    });
    path
}

/// `<S>-<H>.key` of spec §7.2, computed independently of the library.
fn key_file(home: &Path, id: &str) -> PathBuf {
    let s: String = id.chars().filter(char::is_ascii_alphanumeric).collect();
    let h: String = openssl::sha::sha256(id.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    home.join("keys").join(format!("{s}-{h}.key"))
}

fn store(home: Option<&Path>, token: &str) -> KeyStore {
    let store = KeyStore::new();
    if let Some(home) = home {
        store.set_parameter("homedir_path", home.to_str().unwrap()).unwrap();
    }
    store.set_parameter("pkcs11_lib_path", shim().to_str().unwrap()).unwrap();
    store.set_parameter("pkcs11_base_slot", &format!("pkcs11:token={token}?pin-value={PIN}")).unwrap();
    store
}

fn token_labels(token: &str) -> String {
    String::from_utf8(pkcs11_tool(&["--token-label", token, "--login", "--pin", PIN, "--list-objects"])).unwrap()
}

#[test]
fn hmac_keys_fall_back_to_the_home_directory() {
    let Some(_) = softhsm() else { return };
    let (token, _) = fresh_token();
    let home = TempDir::new("p11-fallback");
    let store = store(Some(home.path()), &token);

    // Generated: the token answers CKR_MECHANISM_INVALID, the key is a 32-byte file.
    store.create_key_if_not_exists("mac", KeyUsage::SIGN).unwrap();
    let file = key_file(home.path(), "mac");
    let bytes = std::fs::read(&file).expect("the HMAC key is a file in the home directory");
    assert_eq!(bytes.len(), 32);
    assert_eq!(store.sign("mac", SignMechanism::HmacSha256, b"data").unwrap(), hmac(&bytes, b"data"));
    assert_eq!(&*store.derive_key("mac", b"dd").unwrap(), &hmac(&bytes, b"dd")[..]);
    // Found again in the second candidate, not re-generated.
    store.create_key_if_not_exists("mac", KeyUsage::SIGN).unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), bytes);

    // Imported: C_CreateObject refuses, the bytes are stored as given.
    let known = b"imported bytes, any length";
    store.import_key("imp", known, KeyUsage::SIGN).unwrap();
    assert_eq!(std::fs::read(key_file(home.path(), "imp")).unwrap(), known);
    assert_eq!(store.sign("imp", SignMechanism::HmacSha256, b"x").unwrap(), hmac(known, b"x"));
    let aes_bytes = [9u8; 32];
    store.import_key("aes-imp", &aes_bytes, KeyUsage::ENCRYPT).unwrap();
    assert_eq!(std::fs::read(key_file(home.path(), "aes-imp")).unwrap(), aes_bytes);
    let ct = store.encrypt("aes-imp", EncryptMechanism::Aead { iv: b"iv", aad: b"" }, b"pt").unwrap();
    let (body, tag) = ct[1..].split_at(ct.len() - 17);
    assert_eq!(decrypt_aead(Cipher::aes_256_gcm(), &aes_bytes, Some(b"iv"), b"", body, tag).unwrap(), b"pt");

    // Generated AES keys and key pairs are still the token's.
    store.create_key_if_not_exists("aes", KeyUsage::ENCRYPT).unwrap();
    store.create_key_pair_if_not_exists("pair", Some("ec-p256")).unwrap();
    store.sign("pair", SignMechanism::Ecdsa, &[1; 32]).unwrap();
    assert!(!key_file(home.path(), "aes").exists() && !key_file(home.path(), "pair").exists());
    let listing = token_labels(&token);
    for (label, on_token) in [("aes", true), ("pair", true), ("mac", false), ("imp", false), ("aes-imp", false)] {
        assert_eq!(listing.contains(&format!("label:      {label}\n")), on_token, "{label}: {listing}");
    }

    // Delete reaches the file.
    store.delete_key("mac").unwrap();
    assert!(!file.exists());
    assert!(is_invalid(store.load_key("mac")));
}

#[test]
fn without_a_home_directory_there_is_no_next_candidate() {
    let Some(_) = softhsm() else { return };
    let (token, _) = fresh_token();
    let store = store(None, &token);
    for result in [store.create_key_if_not_exists("mac", KeyUsage::SIGN), store.import_key("imp", b"k", KeyUsage::SIGN)]
    {
        match result {
            Err(Error::External { context, .. }) => assert!(context.contains("no valid location"), "{context}"),
            other => panic!("expected EXTERNAL `no valid location for symmetric key`, got {other:?}"),
        }
    }
    // What the token can do still works.
    store.create_key_if_not_exists("aes", KeyUsage::ENCRYPT).unwrap();
    store.create_key_pair_if_not_exists("pair", Some("ec-p256")).unwrap();
}
