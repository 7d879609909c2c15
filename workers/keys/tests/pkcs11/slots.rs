//! Slot selection, configuration errors, PIN hygiene, preloaded token keys and the fallback of
//! symmetric keys to the file backend.

use aziot_keys::native::KeyStore;
use aziot_keys::{Error, KeyBackend, KeyUsage, SignMechanism};

use crate::common::TempDir;
use crate::{fresh_token, is_invalid, pkcs11_tool, softhsm, MODULE, PIN};

fn store_for(base: &str) -> aziot_keys::Result<KeyStore> {
    let store = KeyStore::new();
    store.set_parameter("pkcs11_lib_path", MODULE)?;
    store.set_parameter("pkcs11_base_slot", base)?;
    Ok(store)
}

#[test]
fn slot_selection_by_label_serial_and_slot_id() {
    if softhsm().is_none() {
        return;
    }
    // SoftHSM numbers slots by token serial (and renumbers when a token is re-initialized), so
    // the numbers are unpredictable; the label selects the right one whatever they are.
    let (first, first_slot) = fresh_token();
    let (second, second_slot) = fresh_token();
    assert_ne!(first_slot, second_slot);

    let by_label = store_for(&format!("pkcs11:token={second}?pin-value={PIN}")).unwrap();
    by_label.create_key_pair_if_not_exists("k", Some("ec-p256")).unwrap();
    let listing =
        String::from_utf8(pkcs11_tool(&["--token-label", &second, "--login", "--pin", PIN, "--list-objects"])).unwrap();
    assert!(listing.contains("label:      k"), "{listing}");
    let listing =
        String::from_utf8(pkcs11_tool(&["--token-label", &first, "--login", "--pin", PIN, "--list-objects"])).unwrap();
    assert!(!listing.contains("label:      k"), "{listing}");

    let by_slot = store_for(&format!("pkcs11:slot-id={second_slot}?pin-value={PIN}")).unwrap();
    by_slot.load_key_pair("k").unwrap();
    // slot-id wins over token (spec §7.7).
    let both = store_for(&format!("pkcs11:token={first};slot-id={second_slot}?pin-value={PIN}")).unwrap();
    both.load_key_pair("k").unwrap();

    let info = String::from_utf8(pkcs11_tool(&["--list-token-slots"])).unwrap();
    let serial = info
        .split("token label        : ")
        .skip(1)
        .find(|s| s.starts_with(&second))
        .and_then(|s| s.split("serial num         : ").nth(1))
        .and_then(|s| s.lines().next())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| panic!("serial of {second} in {info}"));
    let by_serial = store_for(&format!("pkcs11:serial={serial}?pin-value={PIN}")).unwrap();
    by_serial.load_key_pair("k").unwrap();
}

#[test]
fn configuration_errors_are_clear_and_the_store_keeps_working() {
    let Some(_) = softhsm() else { return };
    let home = TempDir::new("p11-errors");
    let store = KeyStore::new();
    store.set_parameter("homedir_path", home.path().to_str().unwrap()).unwrap();
    store.create_key_if_not_exists("file-key", KeyUsage::SIGN).unwrap();
    store.set_parameter("pkcs11_lib_path", MODULE).unwrap();

    // Malformed URIs: INVALID_PARAMETER naming the attribute.
    match store.set_parameter("pkcs11_base_slot", "pkcs11:token=a;slot-id=x") {
        Err(Error::InvalidParameter(msg)) => assert!(msg.contains("slot-id"), "{msg}"),
        other => panic!("{other:?}"),
    }
    match store.set_parameter("preloaded_key:p", "pkcs11:token=%zz") {
        Err(Error::InvalidParameter(msg)) => assert!(msg.contains("\"token\""), "{msg}"),
        other => panic!("{other:?}"),
    }
    // A token that does not exist: EXTERNAL at set_parameter (eager slot lookup, spec §7.1).
    match store.set_parameter("pkcs11_base_slot", "pkcs11:token=no-such-token-label") {
        Err(Error::External { context, .. }) => assert!(context.contains("token"), "{context}"),
        other => panic!("{other:?}"),
    }
    // ... and the file keys keep working.
    store.load_key("file-key").unwrap();
    store.sign("file-key", SignMechanism::HmacSha256, b"x").unwrap();

    // A wrong PIN is found at first use (login is lazy) and only affects that token's keys.
    let (good, _) = fresh_token();
    let (bad, _) = fresh_token();
    store.set_parameter("preloaded_key:good", &format!("pkcs11:token={good};object=good?pin-value={PIN}")).unwrap();
    store.set_parameter("preloaded_key:bad", &format!("pkcs11:token={bad};object=bad?pin-value=wrong-pin")).unwrap();
    store.create_key_if_not_exists("good", KeyUsage::SIGN).unwrap();
    match store.create_key_if_not_exists("bad", KeyUsage::SIGN) {
        Err(Error::External { context, .. }) => {
            assert!(context.contains("PIN is incorrect"), "{context}")
        }
        other => panic!("{other:?}"),
    }
    store.sign("good", SignMechanism::HmacSha256, b"x").unwrap();
    store.sign("file-key", SignMechanism::HmacSha256, b"x").unwrap();
    // A preloaded token key that does not exist is INVALID_PARAMETER, not a fallback to files.
    store.set_parameter("preloaded_key:absent", &format!("pkcs11:token={good};object=absent?pin-value={PIN}")).unwrap();
    assert!(is_invalid(store.load_key("absent")));
    assert!(is_invalid(store.load_key_pair("absent")));
    // Moves between the filesystem and a token are refused.
    assert!(is_invalid(store.move_key_pair("good", "file-key")));
}

#[test]
fn the_pin_appears_in_no_error_or_debug_text() {
    let Some(_) = softhsm() else { return };
    const SECRET: &str = "Zq9-very-secret-PIN";
    let (token, _) = fresh_token();
    let store = store_for(&format!("pkcs11:token={token}?pin-value={SECRET}")).unwrap();
    store.set_parameter("preloaded_key:pre", &format!("pkcs11:token={token};object=pre?pin-value={SECRET}")).unwrap();
    let mut texts = vec![format!("{store:?}")];
    let mut record = |r: Result<(), Error>| {
        let e = r.expect_err("a wrong PIN must fail");
        let mut text = format!("{e} {e:?}");
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(&format!(" {s} {s:?}"));
            source = s.source();
        }
        texts.push(text);
    };
    record(store.create_key_pair_if_not_exists("k", None));
    record(store.create_key_if_not_exists("k", KeyUsage::SIGN));
    record(store.load_key("pre"));
    record(store.sign("k", SignMechanism::Ecdsa, &[0; 32]).map(drop));
    record(store.set_parameter("pkcs11_base_slot", &format!("pkcs11:token=missing?pin-value={SECRET}")));
    record(store.set_parameter("preloaded_key:x", &format!("pkcs11:token=a;slot-id=q?pin-value={SECRET}")));
    record(store.set_parameter("preloaded_key:x", &format!("pkcs11:token=a?pin-value={SECRET}%zz")));
    let uri = aziot_keys::pkcs11_uri::Pkcs11Uri::parse(&format!("pkcs11:token=a?pin-value={SECRET}")).unwrap();
    texts.push(format!("{uri} {uri:?}"));
    for text in &texts {
        assert!(!text.contains(SECRET), "{text}");
    }
    assert!(texts.iter().any(|t| t.contains("PIN is incorrect")), "{texts:?}");
}

/// The token is the first candidate of a dynamic key, the home directory the second (spec §7.2):
/// keys made in the home directory before a base slot was configured stay usable, deletes reach
/// both, and new keys go to the token.
///
/// The *creation* fallback (token answers `CKR_FUNCTION_NOT_SUPPORTED`/`CKR_MECHANISM_INVALID`
/// to `C_GenerateKey`, or refuses `C_CreateObject`) needs a token without those mechanisms:
/// see `fallback.rs`.
#[test]
fn the_home_directory_is_the_second_candidate() {
    let Some(_) = softhsm() else { return };
    let home = TempDir::new("p11-second");
    let (token, _) = fresh_token();
    let files_only = KeyStore::new();
    files_only.set_parameter("homedir_path", home.path().to_str().unwrap()).unwrap();
    files_only.create_key_if_not_exists("old", KeyUsage::SIGN).unwrap();
    let old_mac = files_only.sign("old", SignMechanism::HmacSha256, b"m").unwrap();
    files_only.create_key_pair_if_not_exists("old-pair", Some("ec-p256")).unwrap();

    let store = KeyStore::new();
    store.set_parameter("homedir_path", home.path().to_str().unwrap()).unwrap();
    store.set_parameter("pkcs11_lib_path", MODULE).unwrap();
    store.set_parameter("pkcs11_base_slot", &format!("pkcs11:token={token}?pin-value={PIN}")).unwrap();
    // Found in the second candidate; not re-created on the token.
    store.create_key_if_not_exists("old", KeyUsage::SIGN).unwrap();
    assert_eq!(store.sign("old", SignMechanism::HmacSha256, b"m").unwrap(), old_mac);
    store.load_key_pair("old-pair").unwrap();
    store.sign("old-pair", SignMechanism::Ecdsa, &[3; 32]).unwrap();
    let listing =
        String::from_utf8(pkcs11_tool(&["--token-label", &token, "--login", "--pin", PIN, "--list-objects"])).unwrap();
    assert!(!listing.contains("label:      old"), "{listing}");
    // New keys go to the token.
    store.create_key_if_not_exists("new", KeyUsage::SIGN).unwrap();
    assert_eq!(std::fs::read_dir(home.path().join("keys")).unwrap().count(), 2);
    // Delete reaches every candidate.
    store.delete_key("old").unwrap();
    assert!(is_invalid(store.load_key("old")));
    assert!(is_invalid(files_only.load_key("old")));
    store.delete_key_pair("old-pair").unwrap();
    assert!(is_invalid(store.load_key_pair("old-pair")));

    // A usage the token cannot give a key (not exactly SIGN or ENCRYPT) is refused outright,
    // not sent to the file backend.
    assert!(is_invalid(store.create_key_if_not_exists("both", KeyUsage(17))));
    assert!(is_invalid(files_only.load_key("both")));
}

#[test]
fn preload_and_sandbox_paths() {
    let Some(conf) = softhsm() else { return };
    let (_home, store, _) = crate::token_store("preload").unwrap();
    store.pkcs11_preload().unwrap();
    let paths = aziot_keys::native::pkcs11_sandbox_paths(std::path::Path::new(MODULE));
    assert_eq!(paths[0], (conf.to_path_buf(), false));
    assert_eq!(paths[1], (conf.parent().unwrap().join("tokens"), true));
    assert!(aziot_keys::native::pkcs11_sandbox_paths(std::path::Path::new("/usr/lib/other-hsm.so")).is_empty());
}

/// `C_CloseAllSessions` of the (already loaded) module, called behind the store's back.
fn close_all_sessions(slot: u64) {
    let path = std::ffi::CString::new(MODULE).unwrap();
    // SAFETY: dlopen with a valid C string; RTLD_NOLOAD only returns the handle of the library
    // the store loaded already (the reference is released below).
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    assert!(!handle.is_null());
    // SAFETY: a valid handle and a NUL-terminated symbol name.
    let sym = unsafe { libc::dlsym(handle, c"C_CloseAllSessions".as_ptr()) };
    assert!(!sym.is_null());
    // SAFETY: C_CloseAllSessions has the PKCS#11 signature CK_RV (CK_SLOT_ID), both unsigned long.
    let f: extern "C" fn(libc::c_ulong) -> libc::c_ulong = unsafe { std::mem::transmute(sym) };
    assert_eq!(f(slot as libc::c_ulong), 0);
    // SAFETY: the handle from dlopen above, closed once.
    unsafe { libc::dlclose(handle) };
}

#[test]
fn lost_sessions_and_logins_are_recovered() {
    let Some(_) = softhsm() else { return };
    let (token, slot) = fresh_token();
    let store = store_for(&format!("pkcs11:token={token}?pin-value={PIN}")).unwrap();
    store.create_key_pair_if_not_exists("k", Some("ec-p256")).unwrap();
    store.create_key_if_not_exists("m", KeyUsage::SIGN).unwrap();
    let mac = store.sign("m", SignMechanism::HmacSha256, b"x").unwrap();

    // Every session of the store dies (and with them the login), as when a token is pulled and
    // put back: the next call reopens, logs in again and succeeds.
    close_all_sessions(slot);
    assert_eq!(store.sign("m", SignMechanism::HmacSha256, b"x").unwrap(), mac);
    store.sign("k", SignMechanism::Ecdsa, &[9; 32]).unwrap();

    // Logged out behind the store's back (login state is per application and token): the
    // next call finds its session public again and logs in before using it.
    let ctx = cryptoki::context::Pkcs11::new(MODULE).unwrap();
    let _ = ctx.initialize(cryptoki::context::CInitializeArgs::new(cryptoki::context::CInitializeFlags::OS_LOCKING_OK));
    let session = ctx.open_ro_session(cryptoki::slot::Slot::try_from(slot).unwrap()).unwrap();
    session.logout().unwrap();
    assert_eq!(store.sign("m", SignMechanism::HmacSha256, b"x").unwrap(), mac);
    store.sign("k", SignMechanism::Ecdsa, &[9; 32]).unwrap();
}
