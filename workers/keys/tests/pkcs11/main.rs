//! The PKCS#11 backend against a real SoftHSM2 token, through the `KeyBackend` trait, with
//! cross-checks by tools we did not write (`pkcs11-tool`, OpenSSL).
//!
//! SoftHSM2 is a process-wide singleton that reads `SOFTHSM2_CONF` at `C_Initialize`, so this
//! test binary sets one temporary configuration for the whole process, and each test creates its
//! own token (unique label) in it with `softhsm2-util`. Fails if SoftHSM2 is not installed,
//! unless `AZIOT_ALLOW_SKIP=1` (then each test prints `SKIPPED: ...`).

mod c_abi;
mod fallback;
#[path = "../common/mod.rs"]
mod common;
mod keys;
mod slots;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use aziot_keys::native::KeyStore;
use aziot_keys::KeyBackend;
use common::TempDir;

pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const PIN: &str = "1234-user-pin";
const SO_PIN: &str = "5678-so-pin";

/// The configuration's directory and path, and the pre-made tokens `(label, slot ID)`.
type Pool = (TempDir, PathBuf, Vec<(String, u64)>);

static TOKEN_POOL: OnceLock<Option<Pool>> = OnceLock::new();

/// The process-wide SoftHSM2 configuration. SoftHSM2 missing: the calling test FAILS naming it,
/// unless `AZIOT_ALLOW_SKIP=1` (then it prints `SKIPPED: <test>: ...` and gets `None`, and
/// returns) — the rule of `aziot_tests::require`, which this crate cannot depend on.
pub fn softhsm() -> Option<&'static Path> {
    let conf = TOKEN_POOL
        .get_or_init(|| {
            if !Path::new(MODULE).exists() {
                return None;
            }
            let dir = TempDir::new("softhsm");
            let tokens = dir.path().join("tokens");
            std::fs::create_dir(&tokens).unwrap();
            let conf = dir.path().join("softhsm2.conf");
            std::fs::write(
                &conf,
                format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n", tokens.display()),
            )
            .unwrap();
            // Set before any module is loaded in this process (SoftHSM reads it at C_Initialize).
            std::env::set_var("SOFTHSM2_CONF", &conf);
            let tokens = (0..TOKENS)
                .map(|i| {
                    let label = label(&format!("t{i}"));
                    let slot = init_token(&conf, &label);
                    (label, slot)
                })
                .collect();
            Some((dir, conf, tokens))
        })
        .as_ref()
        .map(|(_, conf, _)| conf.as_path());
    if conf.is_none() {
        let what = format!("SoftHSM2 ({MODULE} is missing; apt-get install softhsm2)");
        let test = std::thread::current().name().unwrap_or("<unnamed test>").to_owned();
        if std::env::var("AZIOT_ALLOW_SKIP").is_ok_and(|v| v == "1") {
            println!("SKIPPED: {test}: {what}");
        } else {
            panic!("{test}: missing {what} (AZIOT_ALLOW_SKIP=1 turns this failure into a skip; scripts/test never sets it)");
        }
    }
    conf
}

/// Tokens made before the module is first loaded: SoftHSM2 does not see tokens that
/// `softhsm2-util` creates after this process called `C_Initialize`.
const TOKENS: usize = 20;

fn init_token(conf: &Path, label: &str) -> u64 {
    let out = Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", conf)
        .args(["--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", SO_PIN])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "softhsm2-util: {text} {}", String::from_utf8_lossy(&out.stderr));
    text.split_whitespace().last().and_then(|w| w.parse().ok()).unwrap_or_else(|| panic!("slot id in {text:?}"))
}

/// A token of its own for the calling test: `(label, slot ID as SoftHSM assigned it)`.
pub fn fresh_token() -> (String, u64) {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let tokens = &TOKEN_POOL.get().expect("softhsm() first").as_ref().expect("SoftHSM2 installed").2;
    let i = NEXT.fetch_add(1, Ordering::Relaxed);
    tokens.get(i).cloned().expect("raise TOKENS")
}

/// A store with a home directory and a base slot on a fresh token.
pub fn token_store(tag: &str) -> Option<(TempDir, KeyStore, String)> {
    softhsm()?;
    let _ = tag;
    let (label, _) = fresh_token();
    let home = TempDir::new("p11-home");
    let store = KeyStore::new();
    store.set_parameter("homedir_path", home.path().to_str().unwrap()).unwrap();
    store.set_parameter("pkcs11_lib_path", MODULE).unwrap();
    store.set_parameter("pkcs11_base_slot", &format!("pkcs11:token={label}?pin-value={PIN}")).unwrap();
    Some((home, store, label))
}

/// Runs `pkcs11-tool` on the test configuration; stdout bytes.
pub fn pkcs11_tool(args: &[&str]) -> Vec<u8> {
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", softhsm().unwrap())
        .arg("--module")
        .arg(MODULE)
        .args(args)
        .output()
        .expect("pkcs11-tool (package opensc) must be installed");
    assert!(out.status.success(), "pkcs11-tool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

pub fn is_invalid<T: std::fmt::Debug>(r: aziot_keys::Result<T>) -> bool {
    matches!(r, Err(aziot_keys::Error::InvalidParameter(_)))
}

pub fn is_external<T: std::fmt::Debug>(r: aziot_keys::Result<T>) -> bool {
    matches!(r, Err(aziot_keys::Error::External { .. }))
}

/// A unique token label (tokens of earlier runs never collide).
fn label(tag: &str) -> String {
    let mut random = [0u8; 4];
    openssl::rand::rand_bytes(&mut random).unwrap();
    format!("{tag}-{:02x}{:02x}{:02x}{:02x}", random[0], random[1], random[2], random[3])
}
