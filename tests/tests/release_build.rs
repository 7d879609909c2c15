//! The test-only attempt mode of `aziotd --worker` (feature `escape-probe`, which aziot-tests
//! enables) is in the workspace's test build and never in `cargo build --release -p aziotd`.

use std::path::Path;
use std::process::Command;

use aziot_tests::keyd::profile_dir;
use aziot_tests::worker_spawn::{assert_attempt_mode, contains, marker};

/// The release build has no attempt mode: `cargo build --release -p aziotd` compiles aziot-policy
/// without `escape-probe` (while the workspace build, which includes aziot-tests, has it); the
/// release binary, when it exists, lacks the mode's marker string. (A worker built without the
/// mode that is asked for an attempt exits with `NOT_COMPILED_IN_EXIT` instead of serving:
/// `aziot_policy::escape::run_if_requested`.)
#[test]
fn release_aziotd_has_no_attempt_mode() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    // `edges`: "normal,build,features" is what a build of binaries compiles; "features" (every
    // kind, dev too) what a build of the workspace's tests compiles.
    let features = |packages: &[&str], edges: &str| {
        let mut cmd = Command::new(&cargo);
        cmd.args([
            "tree",
            "--offline",
            "-e",
            edges,
            "-i",
            "aziot-policy",
            "--prefix",
            "none",
            "--manifest-path",
        ]);
        cmd.arg(&manifest);
        for p in packages {
            cmd.args(["-p", p]);
        }
        let out = cmd.output().expect("cargo tree");
        assert!(
            out.status.success(),
            "cargo tree: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let release = features(&["aziotd"], "normal,build,features");
    assert!(
        !release.contains("escape-probe"),
        "cargo build -p aziotd would compile the attempt mode in:\n{release}"
    );
    let workspace = features(&["aziotd", "aziot-tests"], "features");
    assert!(
        workspace.contains("aziot-policy feature \"escape-probe\""),
        "{workspace}"
    );

    // The binaries: the workspace build's has the marker, a release one must not.
    let debug_bin = profile_dir().join("aziotd");
    assert_attempt_mode(&debug_bin);
    let release_bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/aziotd");
    match std::fs::read(&release_bin) {
        Ok(bytes) => {
            assert!(
                !contains(&bytes, marker().as_bytes()),
                "{} contains the escape attempt mode: it was built together with aziot-tests \
                 (e.g. `cargo build --release -p aziotd -p aziot-tests`), which unifies the test-only \
                 feature in; the release build is `cargo build --release -p aziotd` alone (as scripts/test does)",
                release_bin.display()
            );
            println!("{}: no attempt mode (marker absent)", release_bin.display());
        }
        Err(_) => println!(
            "note: {} does not exist (cargo build --release -p aziotd); checked through cargo's feature resolution only",
            release_bin.display()
        ),
    }
}
