//! Runs every `config apply` corpus case through the real binary with `--root`:
//!
//! * the shared conformance corpus, `../shared/conformance/config-apply/` (must exist);
//! * this crate's own cases, `tests/cases/` (the ones spec aziotctl.md §2.8 suggests adding).
//!
//! Each case folder holds `config.toml`, the expected `keyd.toml`, `certd.toml`,
//! `identityd.toml`, `tpmd.toml` (bodies without the header, compared as parsed TOML), and, when
//! a key file is expected, `device-id` (compared byte for byte; when it is absent, no key file
//! may be written). An optional `warnings` file lists, one per line, text that must appear in
//! the warnings on stderr; without it, stderr must be empty. Owners and modes of every written
//! file are checked too.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{owner_mode, stderr, stdout, Root, KS, SERVICES};

fn cases(dir: &Path) -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("corpus directory {} is unreadable: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    cases
}

fn run_case(case: &Path) -> Result<(), String> {
    let root = Root::new();
    let config = fs::read_to_string(case.join("config.toml")).map_err(|e| e.to_string())?;
    root.config(&config);
    let out = root.apply(&[]);
    if !out.status.success() {
        return Err(format!(
            "apply failed ({:?})\nstdout:\n{}stderr:\n{}",
            out.status,
            stdout(&out),
            stderr(&out)
        ));
    }

    let err = stderr(&out);
    match fs::read_to_string(case.join("warnings")) {
        Ok(expected) => {
            let expected: Vec<&str> = expected.lines().filter(|l| !l.is_empty()).collect();
            let actual: Vec<&str> = err.lines().collect();
            if actual.len() != expected.len()
                || !actual.iter().all(|l| l.starts_with("Warning: "))
                || !expected.iter().all(|e| err.contains(e))
            {
                return Err(format!("expected warnings {expected:#?}\nstderr:\n{err}"));
            }
        }
        Err(_) if !err.is_empty() => return Err(format!("unexpected stderr:\n{err}")),
        Err(_) => {}
    }

    for (svc, (uid, gid)) in SERVICES {
        let expected_text =
            fs::read_to_string(case.join(format!("{svc}.toml"))).map_err(|e| e.to_string())?;
        let expected: toml::Table = expected_text
            .parse()
            .map_err(|e| format!("{svc}: expected file does not parse: {e}"))?;
        let actual = root.service(svc)?;
        if actual != expected {
            return Err(format!(
                "{svc}.toml differs\n--- expected:\n{expected}\n--- actual:\n{actual}"
            ));
        }
        let mode = owner_mode(&root.service_path(svc));
        if mode != (uid, gid, 0o600) {
            return Err(format!(
                "{svc}: owner/group/mode {mode:?}, expected ({uid}, {gid}, 0o600)"
            ));
        }
    }

    match fs::read(case.join("device-id")) {
        Ok(expected) => {
            let actual = fs::read(root.key_path()).map_err(|e| format!("device-id: {e}"))?;
            if actual != expected {
                return Err("device-id bytes differ".to_owned());
            }
            let mode = owner_mode(&root.key_path());
            if mode != (KS.0, KS.1, 0o600) {
                return Err(format!("device-id: owner/group/mode {mode:?}"));
            }
            let dir_mode = owner_mode(root.key_path().parent().unwrap());
            if dir_mode != (KS.0, KS.1, 0o700) {
                return Err(format!("key directory: owner/group/mode {dir_mode:?}"));
            }
        }
        Err(_) => {
            if root.key_path().exists() {
                return Err("a device-id key file was written but none is expected".to_owned());
            }
        }
    }
    Ok(())
}

fn run_corpus(dir: &Path, min_cases: usize) {
    let cases = cases(dir);
    assert!(
        cases.len() >= min_cases,
        "{}: found {} cases, expected at least {min_cases}",
        dir.display(),
        cases.len()
    );
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            run_case(case).err().map(|e| {
                format!(
                    "=== case {}:\n{e}",
                    case.file_name().unwrap().to_string_lossy()
                )
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    println!("{}: {} cases passed", dir.display(), cases.len());
}

#[test]
fn shared_conformance_corpus() {
    // The shared corpus has 11 cases; all of them must be present and pass.
    run_corpus(&common::conformance_dir().join("config-apply"), 11);
}

#[test]
fn own_corpus() {
    run_corpus(
        Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cases")),
        20,
    );
}
