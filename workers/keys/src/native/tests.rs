//! Unit tests of the file backend: file-name mapping, on-disk formats and modes, ID traversal,
//! configuration, the quirk-3 refusals and cache behaviour. Crypto operations are in
//! `tests_ops.rs`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::files::{hex, key_file_name};
use super::*;

/// A temporary directory removed on drop.
pub(super) struct TempDir(PathBuf);

impl TempDir {
    pub(super) fn new() -> TempDir {
        let mut random = [0u8; 8];
        openssl::rand::rand_bytes(&mut random).unwrap();
        let path = std::env::temp_dir().join(format!("aziot-keys-test-{}", hex(&random)));
        fs::create_dir(&path).unwrap();
        TempDir(path)
    }

    pub(super) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A store whose home directory is `<tmp>/home`.
pub(super) fn store() -> (TempDir, KeyStore) {
    let tmp = TempDir::new();
    let home = tmp.path().join("home");
    fs::create_dir(&home).unwrap();
    let store = KeyStore::new();
    store.set_parameter("homedir_path", home.to_str().unwrap()).unwrap();
    (tmp, store)
}

pub(super) fn key_path(tmp: &TempDir, id: &str) -> PathBuf {
    tmp.path().join("home/keys").join(key_file_name(id).unwrap().to_str().unwrap())
}

pub(super) fn is_invalid<T: std::fmt::Debug>(r: Result<T>) -> bool {
    matches!(r, Err(Error::InvalidParameter(_)))
}

pub(super) fn is_external<T: std::fmt::Debug>(r: Result<T>) -> bool {
    matches!(r, Err(Error::External { .. }))
}

fn sorted_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    names
}

#[test]
fn file_names_follow_the_spec() {
    assert_eq!(
        key_file_name("device-id").unwrap().to_str().unwrap(),
        "deviceid-bd732105ef89cf8edd2606a5309c8a26b7b5599a4e124a0fe6199b6b2f60e655.key"
    );
    assert_eq!(
        key_file_name("handle-validation-key").unwrap().to_str().unwrap(),
        "handlevalidationkey-40f1ca41fe8b50f53e10f3e3a580dcae24087f37aa498ba9903f2612b03e90ba.key"
    );
    // S keeps only ASCII alphanumerics; H hashes the full UTF-8 bytes.
    let name = key_file_name("ключ/../Ab9").unwrap().into_string().unwrap();
    let expected_hash = hex(&openssl::sha::sha256("ключ/../Ab9".as_bytes()));
    assert_eq!(name, format!("Ab9-{expected_hash}.key"));
    assert_eq!(
        key_file_name("").unwrap().to_str().unwrap(),
        "-e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855.key"
    );
}

#[test]
fn over_long_ids_are_invalid_parameters() {
    // 186 alphanumerics + "-" + 64 + ".key" = 255 bytes: the longest possible name.
    assert_eq!(key_file_name(&"a".repeat(186)).unwrap().as_bytes().len(), 255);
    assert!(is_invalid(key_file_name(&"a".repeat(187))));
    // Non-alphanumerics do not count, so a 10 kB ID of punctuation is fine.
    assert_eq!(key_file_name(&"/.".repeat(5000)).unwrap().as_bytes().len(), 69);

    let (_tmp, store) = store();
    match store.create_key_if_not_exists(&"a".repeat(10_000), KeyUsage::SIGN) {
        Err(Error::InvalidParameter(msg)) => assert_eq!(msg, "key id too long"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn hostile_ids_create_nothing_outside_keys_dir() {
    let (tmp, store) = store();
    let long = "../".repeat(3400);
    let ids = ["../x", "a/b", "/etc/passwd", "..", ".", "ключ", "\u{0}nul", "../../../../tmp/evil", long.as_str()];
    for id in ids {
        store.create_key_if_not_exists(id, KeyUsage::SIGN).unwrap();
        store.sign(id, SignMechanism::HmacSha256, b"m").unwrap();
    }
    let pair_ids = ["../y", "b/c/d"];
    for id in pair_ids {
        store.create_key_pair_if_not_exists(id, None).unwrap();
    }
    assert!(is_invalid(store.create_key_pair_if_not_exists(&"x".repeat(10_000), None)));

    // Only `home` in the temp root, only `keys` in home, and exactly the mapped names in keys.
    assert_eq!(sorted_entries(tmp.path()), ["home"]);
    assert_eq!(sorted_entries(&tmp.path().join("home")), ["keys"]);
    let mut expected: Vec<String> =
        ids.iter().chain(pair_ids.iter()).map(|id| key_file_name(id).unwrap().into_string().unwrap()).collect();
    expected.sort();
    assert_eq!(sorted_entries(&tmp.path().join("home/keys")), expected);
    for id in ids {
        assert_eq!(fs::read(key_path(&tmp, id)).unwrap().len(), 32);
    }
}

#[test]
fn formats_and_modes() {
    let (tmp, store) = store();
    store.create_key_if_not_exists("sym", KeyUsage::ENCRYPT).unwrap();
    store.create_key_pair_if_not_exists("ec", Some("ec-p256")).unwrap();
    store.create_key_pair_if_not_exists("rsa", Some("rsa-2048")).unwrap();
    store.import_key("imported", b"\x00\x01raw key bytes\xff", KeyUsage::SIGN).unwrap();

    let keys_dir = tmp.path().join("home/keys");
    assert_eq!(fs::metadata(&keys_dir).unwrap().permissions().mode() & 0o7777, 0o700);
    for id in ["sym", "ec", "rsa", "imported"] {
        let meta = fs::metadata(key_path(&tmp, id)).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "{id}");
    }
    assert_eq!(fs::read(key_path(&tmp, "sym")).unwrap().len(), 32);
    assert_eq!(fs::read(key_path(&tmp, "imported")).unwrap(), b"\x00\x01raw key bytes\xff");
    for id in ["ec", "rsa"] {
        let pem = fs::read_to_string(key_path(&tmp, id)).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
        assert!(openssl::pkey::PKey::private_key_from_pem(pem.as_bytes()).is_ok());
    }
    let ec = openssl::pkey::PKey::private_key_from_pem(&fs::read(key_path(&tmp, "ec")).unwrap()).unwrap();
    assert_eq!(ec.id(), openssl::pkey::Id::EC);
    let rsa = openssl::pkey::PKey::private_key_from_pem(&fs::read(key_path(&tmp, "rsa")).unwrap()).unwrap();
    assert_eq!(rsa.rsa().unwrap().size(), 256);
    // No temp file is left behind by successful writes.
    assert!(sorted_entries(&keys_dir).iter().all(|n| !n.starts_with(".tmp-")));
}

#[test]
fn traditional_pem_formats_load() {
    let (tmp, store) = store();
    store.create_key_if_not_exists("warmup", KeyUsage::SIGN).unwrap(); // creates keys/
    let group = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::X9_62_PRIME256V1).unwrap();
    let ec = openssl::ec::EcKey::generate(&group).unwrap();
    fs::write(key_path(&tmp, "trad-ec"), ec.private_key_to_pem().unwrap()).unwrap();
    let rsa = openssl::rsa::Rsa::generate(2048).unwrap();
    fs::write(key_path(&tmp, "trad-rsa"), rsa.private_key_to_pem().unwrap()).unwrap();
    assert!(fs::read_to_string(key_path(&tmp, "trad-ec")).unwrap().starts_with("-----BEGIN EC PRIVATE KEY"));
    assert!(fs::read_to_string(key_path(&tmp, "trad-rsa")).unwrap().starts_with("-----BEGIN RSA PRIVATE KEY"));

    store.load_key_pair("trad-ec").unwrap();
    store.load_key_pair("trad-rsa").unwrap();
    assert_eq!(store.get_key_pair_parameter("trad-rsa", KeyPairParameter::RsaModulus).unwrap(), rsa.n().to_vec());
    let mut ctx = openssl::bn::BigNumContext::new().unwrap();
    let point = ec.public_key().to_bytes(&group, openssl::ec::PointConversionForm::COMPRESSED, &mut ctx).unwrap();
    assert_eq!(store.get_key_pair_parameter("trad-ec", KeyPairParameter::EcPoint).unwrap(), point);
    // An existing traditional-format pair is kept by create-if-not-exists.
    store.create_key_pair_if_not_exists("trad-ec", Some("rsa-2048")).unwrap();
    assert!(fs::read_to_string(key_path(&tmp, "trad-ec")).unwrap().starts_with("-----BEGIN EC PRIVATE KEY"));
}

#[test]
fn empty_files() {
    let (tmp, store) = store();
    store.create_key_if_not_exists("warmup", KeyUsage::SIGN).unwrap();
    for id in ["e1", "e2"] {
        fs::write(key_path(&tmp, id), b"").unwrap();
    }
    match store.load_key("e1") {
        Err(Error::External { context, .. }) => {
            assert!(context.starts_with("key file is empty: "), "{context}");
            let file = key_file_name("e1").unwrap().into_string().unwrap();
            assert!(context.contains(&file), "names the file: {context}");
        }
        other => panic!("{other:?}"),
    }
    assert!(is_external(store.load_key_pair("e1")));
    assert!(is_external(store.sign("e1", SignMechanism::HmacSha256, b"x")));
    assert!(is_external(store.derive_key("e1", b"x")));
    // Empty counts as missing for create-if-not-exists.
    store.create_key_if_not_exists("e1", KeyUsage::SIGN).unwrap();
    assert_eq!(fs::read(key_path(&tmp, "e1")).unwrap().len(), 32);
    store.create_key_pair_if_not_exists("e2", None).unwrap();
    store.load_key_pair("e2").unwrap();
}

#[test]
fn a_key_pair_is_never_used_as_a_symmetric_key() {
    let (tmp, store) = store();
    store.create_key_pair_if_not_exists("pair", None).unwrap();
    let before = fs::read(key_path(&tmp, "pair")).unwrap();
    assert!(is_invalid(store.load_key("pair")));
    assert!(is_invalid(store.create_key_if_not_exists("pair", KeyUsage::SIGN)));
    assert!(is_invalid(store.sign("pair", SignMechanism::HmacSha256, b"m")));
    assert!(is_invalid(store.verify("pair", SignMechanism::HmacSha256, b"m", &[0; 32])));
    assert!(is_invalid(store.derive_key("pair", b"d")));
    let aead = EncryptMechanism::Aead { iv: b"123456789012", aad: b"" };
    assert!(is_invalid(store.encrypt("pair", aead, b"p")));
    assert!(is_invalid(store.import_key("pair", b"sym bytes", KeyUsage::SIGN)));
    assert_eq!(fs::read(key_path(&tmp, "pair")).unwrap(), before);

    // Importing PEM private-key text as a "symmetric key" is refused too.
    assert!(is_invalid(store.import_key("other", &before, KeyUsage::SIGN)));
    assert!(!key_path(&tmp, "other").exists());
}

#[test]
fn a_symmetric_key_is_never_overwritten_by_a_key_pair() {
    let (tmp, store) = store();
    store.create_key_if_not_exists("sym", KeyUsage::SIGN).unwrap();
    store.create_key_pair_if_not_exists("pair", None).unwrap();
    let before = fs::read(key_path(&tmp, "sym")).unwrap();
    assert!(is_invalid(store.create_key_pair_if_not_exists("sym", None)));
    assert!(is_external(store.load_key_pair("sym")));
    assert!(is_external(store.get_key_pair_parameter("sym", KeyPairParameter::Algorithm)));
    assert!(is_external(store.sign("sym", SignMechanism::Ecdsa, &[1; 32])));
    assert!(is_invalid(store.move_key_pair("pair", "sym")));
    assert_eq!(fs::read(key_path(&tmp, "sym")).unwrap(), before);
    store.load_key_pair("pair").unwrap();
}

#[test]
fn cached_keys_do_not_touch_the_filesystem() {
    let (tmp, store) = store();
    store.import_key("k", b"first key", KeyUsage::SIGN).unwrap();
    store.create_key_pair_if_not_exists("p", None).unwrap();
    // Every write clears the cache; these two reads populate it.
    let mac1 = store.sign("k", SignMechanism::HmacSha256, b"m").unwrap();
    let point = store.get_key_pair_parameter("p", KeyPairParameter::EcPoint).unwrap();
    // Remove the whole keys directory behind the store's back: cached keys keep working.
    fs::remove_dir_all(tmp.path().join("home/keys")).unwrap();
    assert_eq!(store.sign("k", SignMechanism::HmacSha256, b"m").unwrap(), mac1);
    store.create_key_if_not_exists("k", KeyUsage::SIGN).unwrap();
    store.sign("p", SignMechanism::Ecdsa, &[7; 32]).unwrap();
    assert_eq!(store.get_key_pair_parameter("p", KeyPairParameter::EcPoint).unwrap(), point);
}

#[test]
fn writes_invalidate_the_cache() {
    let (tmp, store) = store();
    store.import_key("k", b"key A", KeyUsage::SIGN).unwrap();
    let mac_a = store.sign("k", SignMechanism::HmacSha256, b"m").unwrap();
    assert_eq!(mac_a, super::crypto::hmac_sha256(b"key A", b"m").unwrap());
    store.import_key("k", b"key B", KeyUsage::SIGN).unwrap();
    assert_eq!(
        store.sign("k", SignMechanism::HmacSha256, b"m").unwrap(),
        super::crypto::hmac_sha256(b"key B", b"m").unwrap()
    );

    store.delete_key("k").unwrap();
    assert!(is_invalid(store.sign("k", SignMechanism::HmacSha256, b"m")));
    assert!(!key_path(&tmp, "k").exists());
    store.delete_key("k").unwrap(); // absent: still success

    store.create_key_pair_if_not_exists("a", None).unwrap();
    let point_a = store.get_key_pair_parameter("a", KeyPairParameter::EcPoint).unwrap();
    store.create_key_pair_if_not_exists("b", Some("rsa-2048")).unwrap();
    store.load_key_pair("b").unwrap();
    store.move_key_pair("a", "b").unwrap();
    assert!(is_invalid(store.load_key_pair("a")));
    assert_eq!(store.get_key_pair_parameter("b", KeyPairParameter::EcPoint).unwrap(), point_a);
    store.delete_key_pair("b").unwrap();
    assert!(is_invalid(store.load_key_pair("b")));
    store.delete_key_pair("b").unwrap();

    // A write through the store also drops keys changed on disk behind its back.
    store.import_key("c", b"key C", KeyUsage::SIGN).unwrap();
    store.sign("c", SignMechanism::HmacSha256, b"m").unwrap();
    fs::write(key_path(&tmp, "c"), b"key D").unwrap();
    store.import_key("unrelated", b"x", KeyUsage::SIGN).unwrap();
    assert_eq!(
        store.sign("c", SignMechanism::HmacSha256, b"m").unwrap(),
        super::crypto::hmac_sha256(b"key D", b"m").unwrap()
    );
}

#[test]
fn move_errors() {
    let (_tmp, store) = store();
    assert!(is_external(store.move_key_pair("missing", "dest")));
    assert!(is_invalid(store.move_key_pair(&"a".repeat(300), "dest")));
    let unconfigured = KeyStore::new();
    assert!(is_invalid(unconfigured.move_key_pair("a", "b")));
}

#[test]
fn stale_temp_files_are_removed_when_keys_dir_is_opened() {
    let tmp = TempDir::new();
    let keys = tmp.path().join("keys");
    fs::create_dir(&keys).unwrap();
    fs::write(keys.join(".tmp-0123456789abcdef"), b"torn").unwrap();
    fs::write(keys.join(".tmp-x"), b"torn").unwrap();
    fs::write(keys.join("other.key"), b"keep").unwrap();
    let store = KeyStore::new();
    store.set_parameter("homedir_path", tmp.path().to_str().unwrap()).unwrap();
    assert!(is_invalid(store.load_key("absent")));
    assert_eq!(sorted_entries(&keys), ["other.key"]);
}

#[test]
fn homedir_from_an_open_fd() {
    let tmp = TempDir::new();
    let store = KeyStore::new();
    store.set_homedir_fd(files::open_dir(tmp.path()).unwrap());
    store.create_key_if_not_exists("device-id", KeyUsage::SIGN).unwrap();
    assert!(tmp
        .path()
        .join("keys/deviceid-bd732105ef89cf8edd2606a5309c8a26b7b5599a4e124a0fe6199b6b2f60e655.key")
        .is_file());
}

#[test]
fn parameters() {
    let store = KeyStore::new();
    match store.load_key("k") {
        Err(Error::InvalidParameter(msg)) => assert_eq!(msg, "no way to create keys"),
        other => panic!("{other:?}"),
    }
    assert!(is_invalid(store.set_parameter("unknown", "x")));
    assert!(is_invalid(store.set_parameter("preloaded_key:", "file:///x")));
    assert!(is_invalid(store.set_parameter("preloaded_key:k", "/not/a/uri")));
    assert!(is_invalid(store.set_parameter("preloaded_key:k", "file://remote/x")));
    assert!(is_invalid(store.set_parameter("homedir_path", "")));
    assert!(is_external(store.set_parameter("homedir_path", "/nonexistent/aziot-keys-test")));
    assert!(is_invalid(store.set_parameter("pkcs11_base_slot", "pkcs11:object=x")));
    assert!(is_invalid(store.set_parameter("pkcs11_lib_path", "")));
}

#[test]
fn preloaded_file_keys() {
    let tmp = TempDir::new();
    let dir = tmp.path().join("pre loaded");
    fs::create_dir(&dir).unwrap();
    let pkey = super::crypto::generate_key_pair(super::crypto::Algorithm::EcP256).unwrap();
    fs::write(dir.join("device-id"), pkey.private_key_to_pem_pkcs8().unwrap()).unwrap();
    let uri = |name: &str| format!("file://{}/{name}", dir.to_str().unwrap().replace(' ', "%20"));

    // No home directory at all: preloaded keys still work.
    let store = KeyStore::new();
    store.set_parameter("preloaded_key:device-id", &uri("device-id")).unwrap();
    store.load_key_pair("device-id").unwrap();
    store.sign("device-id", SignMechanism::Ecdsa, &[1; 32]).unwrap();
    assert!(is_invalid(store.load_key_pair("not-preloaded")));

    // A preloaded location that does not exist yet is where the key gets created.
    store.set_parameter("preloaded_key:new", &uri("new-key")).unwrap();
    store.create_key_if_not_exists("new", KeyUsage::SIGN).unwrap();
    let meta = fs::metadata(dir.join("new-key")).unwrap();
    assert_eq!(meta.len(), 32);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    // Re-pointing a preloaded ID takes effect (the cache is dropped).
    store.set_parameter("preloaded_key:device-id", &uri("new-key")).unwrap();
    assert!(is_external(store.load_key_pair("device-id")));
    store.load_key("device-id").unwrap();
}

#[test]
fn pkcs11_with_a_module_that_does_not_load() {
    let (_tmp, store) = store();
    store.set_parameter("preloaded_key:hsm", "pkcs11:token=t;object=o?pin-value=1").unwrap();
    match store.load_key_pair("hsm") {
        Err(Error::InvalidParameter(msg)) => assert!(msg.contains("PKCS#11 lib path"), "{msg}"),
        other => panic!("{other:?}"),
    }
    store.create_key_if_not_exists("file-key", KeyUsage::SIGN).unwrap();
    store.set_parameter("pkcs11_lib_path", "/usr/lib/libfake-pkcs11.so").unwrap();
    match store.load_key_pair("hsm") {
        Err(Error::External { context, .. }) => {
            assert!(context.contains("PKCS#11 module"), "{context}")
        }
        other => panic!("{other:?}"),
    }
    // Lib path alone: dynamic keys still live in the home directory.
    store.load_key("file-key").unwrap();
    // With both set, the module is loaded eagerly (spec §7.1): the failure shows here, and the
    // previous configuration stays in force.
    assert!(is_external(store.set_parameter("pkcs11_base_slot", "pkcs11:token=Key%20pairs?pin-value=1234")));
    store.load_key("file-key").unwrap();
    store.create_key_pair_if_not_exists("new", None).unwrap();
}

#[test]
fn preloaded_key_through_a_handed_over_directory() {
    let dir = std::env::temp_dir().join(format!("aziot-keys-preload-dir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dev.key"), b"0123456789abcdef0123456789abcdef").unwrap();
    let store = KeyStore::new();
    let uri = format!("file://{}/dev.key", dir.display());
    store.set_parameter("preloaded_key:dev", &uri).unwrap();
    let fd: std::os::fd::OwnedFd = std::fs::File::open(&dir).unwrap().into();
    // A name that is not the URI's file name is refused.
    let wrong: std::os::fd::OwnedFd = std::fs::File::open(&dir).unwrap().into();
    assert!(matches!(store.set_preloaded_key_dir("dev", wrong, "other.key"), Err(Error::InvalidParameter(_))));
    store.set_preloaded_key_dir("dev", fd, "dev.key").unwrap();
    // Move the directory away: the store keeps reading through its descriptor.
    let moved = dir.with_extension("moved");
    std::fs::rename(&dir, &moved).unwrap();
    store.load_key("dev").unwrap();
    let mac = store.sign("dev", crate::SignMechanism::HmacSha256, b"m").unwrap();
    assert_eq!(mac, super::crypto::hmac_sha256(b"0123456789abcdef0123456789abcdef", b"m").unwrap());
    std::fs::remove_dir_all(moved).unwrap();
}
