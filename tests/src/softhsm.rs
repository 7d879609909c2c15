//! A private SoftHSM2 token store for the keyd suites run with `AZIOT_TEST_BACKEND=softhsm`
//! and the PKCS#11 tests: its config, one initialized token, and pkcs11-tool against it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::keyd::{service_user, BACKEND_ENV};

/// SoftHSM2's PKCS#11 module (Debian/Ubuntu package softhsm2).
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// A private SoftHSM2 token store: `<dir>/softhsm2.conf` (`directories.tokendir = <dir>/tokens`,
/// `objectstore.backend = file`) with one initialized token, everything owned by
/// [`SERVICE_USER`](crate::keyd::SERVICE_USER) (the worker opens the token files as that user).
pub struct SoftHsm {
    dir: PathBuf,
    pub label: String,
    pub pin: String,
    pub so_pin: String,
}

impl SoftHsm {
    /// Token label of every test token.
    pub const LABEL: &'static str = "aziot-test";

    /// Creates `dir` and a token [`SoftHsm::LABEL`] with a fresh random PIN. Panics (test
    /// failure) if softhsm2-util is missing or fails.
    pub fn create(dir: &Path) -> SoftHsm {
        assert!(
            Path::new(SOFTHSM_MODULE).is_file(),
            "{BACKEND_ENV}=softhsm needs {SOFTHSM_MODULE} (apt-get install softhsm2)"
        );
        let tokens = dir.join("tokens");
        fs::create_dir_all(&tokens).unwrap_or_else(|e| panic!("mkdir {}: {e}", tokens.display()));
        let mut rnd = [0u8; 8];
        openssl::rand::rand_bytes(&mut rnd).expect("rand");
        let pin = format!("{:016}", u64::from_le_bytes(rnd) % 10_000_000_000_000_000);
        openssl::rand::rand_bytes(&mut rnd).expect("rand");
        let so_pin = format!("{:016}", u64::from_le_bytes(rnd) % 10_000_000_000_000_000);
        let hsm = SoftHsm { dir: dir.to_path_buf(), label: Self::LABEL.to_owned(), pin, so_pin };
        fs::write(
            hsm.conf(),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("write softhsm2.conf");
        fs::set_permissions(hsm.conf(), fs::Permissions::from_mode(0o644)).expect("chmod conf");
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", hsm.conf())
            .args(["--init-token", "--free", "--label", &hsm.label, "--pin", &hsm.pin, "--so-pin", &hsm.so_pin])
            .output()
            .unwrap_or_else(|e| panic!("softhsm2-util (apt-get install softhsm2): {e}"));
        assert!(
            out.status.success(),
            "softhsm2-util --init-token failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        hsm.chown_to_service_user();
        hsm
    }

    /// chown -R the token store to [`SERVICE_USER`](crate::keyd::SERVICE_USER) (after a root tool wrote into it).
    pub fn chown_to_service_user(&self) {
        let (uid, gid) = service_user();
        let (uid, gid) = (Some(nix::unistd::Uid::from_raw(uid)), Some(nix::unistd::Gid::from_raw(gid)));
        fn walk(p: &Path, uid: Option<nix::unistd::Uid>, gid: Option<nix::unistd::Gid>) {
            nix::unistd::chown(p, uid, gid).unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
            if p.is_dir() {
                for e in fs::read_dir(p).expect("read token dir").flatten() {
                    walk(&e.path(), uid, gid);
                }
            }
        }
        walk(&self.dir.join("tokens"), uid, gid);
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.join("softhsm2.conf")
    }

    pub fn token_dir(&self) -> PathBuf {
        self.dir.join("tokens")
    }

    /// `CKA_LABEL`s of every object on the token (`pkcs11-tool --list-objects`), one entry
    /// per object (a key pair shows twice: private and public).
    pub fn labels(&self) -> Vec<String> {
        let out = self.pkcs11_tool(&["--list-objects"]);
        String::from_utf8_lossy(&out)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("label:").map(|v| v.trim().to_owned()))
            .collect()
    }

    /// `pkcs11:token=<label>?pin-value=<pin>`.
    pub fn base_slot(&self) -> String {
        format!("pkcs11:token={}?pin-value={}", self.label, self.pin)
    }

    /// Runs `pkcs11-tool --module <softhsm> --token-label <label> --login --pin <pin> <args>`
    /// (as root, `SOFTHSM2_CONF` set; the store is chowned back to aziotks afterwards);
    /// stdout. Panics with the output when it fails.
    pub fn pkcs11_tool(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", self.conf())
            .args(["--module", SOFTHSM_MODULE, "--token-label", &self.label, "--login", "--pin", &self.pin])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("pkcs11-tool (apt-get install opensc): {e}"));
        self.chown_to_service_user();
        assert!(
            out.status.success(),
            "pkcs11-tool {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}
