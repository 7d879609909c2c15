//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let mut random = [0u8; 8];
        openssl::rand::rand_bytes(&mut random).unwrap();
        let suffix: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let path = std::env::temp_dir().join(format!("aziot-keys-{tag}-{suffix}"));
        std::fs::create_dir(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The cargo profile directory (`target/<profile>`) of the running test binary, which lives
/// in `target/<profile>/deps/`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).expect("test binary is in target/<profile>/deps").to_owned()
}

/// Our own cdylib, built by cargo alongside the test binaries.
pub fn cdylib_path() -> PathBuf {
    let dir = profile_dir();
    for candidate in [dir.join("libaziot_keys.so"), dir.join("deps/libaziot_keys.so")] {
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("libaziot_keys.so not found in {}", dir.display());
}

/// The crate's directory (for `include/` and `tests/c/`).
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Compiles C sources with `cc` into `output`, with `include/` on the include path.
pub fn compile_c(sources: &[&Path], extra_args: &[&str], output: &Path) {
    let status = std::process::Command::new("cc")
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-g"])
        .arg("-I")
        .arg(crate_dir().join("include"))
        .args(sources)
        .args(extra_args)
        .arg("-o")
        .arg(output)
        .status()
        .expect("cc runs");
    assert!(status.success(), "cc failed for {sources:?}");
}

pub fn from_hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}
