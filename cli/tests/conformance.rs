//! Runs every `config apply` corpus case through the real binary with `--root`:
//!
//! * the shared conformance corpus, `../shared/conformance/config-apply/` (must exist);
//! * this crate's own cases, `tests/cases/` (the ones spec aziotctl.md §2.8 suggests adding).
//!
//! Each case folder holds `config.toml`, the expected `keyd.toml`, `certd.toml`,
//! `identityd.toml`, `tpmd.toml` (bodies without the header, compared as parsed TOML), and, when
//! a key file is expected, `device-id` (compared byte for byte; when it is absent, no key file
//! may be written). The comparison is strict ([`toml_diff`]): the same tables, keys, value types
//! and values, arrays in the same order; an extra key or table in the output, even an empty one
//! (`[cert_issuance.est.urls]` with no URL in it) or a key at its default value, is a failure. An optional `warnings` file lists, one per line, text that must appear in
//! the warnings on stderr; without it, stderr must be empty. Owners and modes of every written
//! file are checked too.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use common::{owner_mode, stderr, stdout, Root, KS, SERVICES};

/// Every difference between two parsed TOML documents, one line each, naming the dotted path:
/// keys missing from `actual`, keys only in `actual` (an empty table included), values of another
/// type or value, arrays of another length. Key order within a table does not matter (TOML gives
/// it no meaning); element order within an array does. Empty when the documents are equal.
fn toml_diff(expected: &toml::Table, actual: &toml::Table) -> Vec<String> {
    let mut out = Vec::new();
    diff_tables("", expected, actual, &mut out);
    out
}

fn join_path(path: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let key = if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    };
    if path.is_empty() {
        key
    } else {
        format!("{path}.{key}")
    }
}

fn describe(value: &toml::Value) -> String {
    match value {
        toml::Value::Table(t) if t.is_empty() => "an empty table".to_owned(),
        toml::Value::Table(_) => "a table".to_owned(),
        toml::Value::Array(a) if a.is_empty() => "an empty array".to_owned(),
        other => format!("{} `{other}`", other.type_str()),
    }
}

fn diff_tables(path: &str, expected: &toml::Table, actual: &toml::Table, out: &mut Vec<String>) {
    for (key, e) in expected {
        let p = join_path(path, key);
        match actual.get(key) {
            Some(a) => diff_values(&p, e, a, out),
            None => out.push(format!("`{p}` is missing (expected {})", describe(e))),
        }
    }
    for (key, a) in actual {
        if !expected.contains_key(key) {
            let p = join_path(path, key);
            out.push(format!("`{p}` is not expected (got {})", describe(a)));
        }
    }
}

fn diff_values(path: &str, expected: &toml::Value, actual: &toml::Value, out: &mut Vec<String>) {
    use toml::Value::{Array, Table};
    match (expected, actual) {
        (Table(e), Table(a)) => diff_tables(path, e, a, out),
        (Array(e), Array(a)) => {
            if e.len() != a.len() {
                out.push(format!(
                    "`{path}` has {} elements, expected {}: got {actual}, expected {expected}",
                    a.len(),
                    e.len()
                ));
                return;
            }
            for (i, (e, a)) in e.iter().zip(a).enumerate() {
                diff_values(&format!("{path}[{i}]"), e, a, out);
            }
        }
        (e, a) if e.type_str() != a.type_str() => out.push(format!(
            "`{path}` is {}, expected {}",
            describe(a),
            describe(e)
        )),
        (e, a) if e != a => out.push(format!("`{path}` is `{a}`, expected `{e}`")),
        _ => {}
    }
}

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

    for (svc, _) in SERVICES {
        let expected_text =
            fs::read_to_string(case.join(format!("{svc}.toml"))).map_err(|e| e.to_string())?;
        let expected: toml::Table = expected_text
            .parse()
            .map_err(|e| format!("{svc}: expected file does not parse: {e}"))?;
        let actual = root.service(svc)?;
        let diff = toml_diff(&expected, &actual);
        // `toml_diff` is the explanation; plain equality stays as a second, independent check.
        if !diff.is_empty() || actual != expected {
            return Err(format!(
                "{svc}.toml differs:\n  {}\n--- expected:\n{expected}\n--- actual:\n{actual}",
                diff.join("\n  ")
            ));
        }
        // root:root 0600: the root broker reads it (docs/compatibility.md)
        let mode = owner_mode(&root.service_path(svc));
        if mode != (0, 0, 0o600) {
            return Err(format!(
                "{svc}: owner/group/mode {mode:?}, expected (0, 0, 0o600)"
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
        37,
    );
}

/// The comparator is strict: these pairs differ only by an empty table, a key at its default
/// value, an empty array, a value type or an element order, and each must be reported.
#[test]
fn toml_diff_is_strict() {
    fn diff(expected: &str, actual: &str) -> Vec<String> {
        toml_diff(&expected.parse().unwrap(), &actual.parse().unwrap())
    }
    let est = "[cert_issuance.est]\ntrusted_certs = [\"est-server-ca-1\"]\n";

    // An extra empty table in the output: the EST `urls` table with every URL on its cert.
    let d = diff(est, &format!("{est}\n[cert_issuance.est.urls]\n"));
    assert_eq!(
        d,
        ["`cert_issuance.est.urls` is not expected (got an empty table)"]
    );
    // ... and the reverse: an empty table the output leaves out (`[preloaded_keys]` is always
    // written).
    let d = diff("[preloaded_keys]\n", "");
    assert_eq!(d, ["`preloaded_keys` is missing (expected an empty table)"]);
    // An empty table inside an array of tables.
    let d = diff(
        "[[principal]]\nuid = 1\n",
        "[[principal]]\nuid = 1\n[principal.extra]\n",
    );
    assert_eq!(
        d,
        ["`principal[0].extra` is not expected (got an empty table)"]
    );
    // A key written at its default value, and an empty array.
    assert_eq!(
        diff("a = 1\n", "a = 1\nmax_requests = 10\n"),
        ["`max_requests` is not expected (got integer `10`)"]
    );
    assert_eq!(
        diff(est, &format!("{est}urls = []\n")),
        ["`cert_issuance.est.urls` is not expected (got an empty array)"]
    );
    // Same number, other type; same elements, other order; other value.
    assert_eq!(
        diff("expiry_days = 365\n", "expiry_days = 365.0\n"),
        ["`expiry_days` is float `365.0`, expected integer `365`"]
    );
    assert_eq!(
        diff("keys = [\"a\", \"b\"]\n", "keys = [\"b\", \"a\"]\n"),
        [
            "`keys[0]` is `\"b\"`, expected `\"a\"`",
            "`keys[1]` is `\"a\"`, expected `\"b\"`"
        ]
    );
    assert_eq!(diff("[t]\nx = \"a\"\n", "[t]\nx = \"b\"\n").len(), 1);
    assert_eq!(diff("k = [1]\n", "k = [1, 1]\n").len(), 1);
    // Keys that are not bare are quoted in the path.
    assert_eq!(
        diff("[a]\n", "[a]\n\"b.c\" = {}\n"),
        ["`a.\"b.c\"` is not expected (got an empty table)"]
    );

    // Layout that TOML gives no meaning is not a difference: key order, dotted keys vs headers,
    // inline vs standard tables.
    assert!(diff(
        "[x]\nb = 2\na = 1\n[x.y]\nc = 3\n",
        "x = { a = 1, b = 2, y.c = 3 }\n"
    )
    .is_empty());
    assert!(diff(
        "[cert_issuance.device-id]\nmethod = \"est\"\n",
        "[cert_issuance]\n\n[cert_issuance.device-id]\nmethod = \"est\"\n"
    )
    .is_empty());
}

/// A temporary copy of one of the own cases, removed on drop.
struct CaseCopy(PathBuf);

impl CaseCopy {
    fn new(name: &str) -> CaseCopy {
        let src = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/cases")).join(name);
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dst =
            std::env::temp_dir().join(format!("aziotctl-case-{}-{n}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dst);
        fs::create_dir(&dst).unwrap();
        for entry in fs::read_dir(&src).unwrap() {
            let entry = entry.unwrap();
            fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
        }
        CaseCopy(dst)
    }

    fn edit(&self, file: &str, from: &str, to: &str) {
        let path = self.0.join(file);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file} does not contain {from:?}");
        fs::write(&path, text.replacen(from, to, 1)).unwrap();
    }
}

impl Drop for CaseCopy {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The harness itself, run on a case whose expectation was edited, fails and names the table:
/// once when the real output has an (empty) table the expectation lacks, once the reverse.
#[test]
fn harness_fails_on_an_extra_or_missing_empty_table() {
    let unchanged = CaseCopy::new("source-none");
    run_case(&unchanged.0).expect("the unedited copy passes");

    let case = CaseCopy::new("source-none");
    case.edit("keyd.toml", "[preloaded_keys]\n", "");
    let err = run_case(&case.0).expect_err("output has [preloaded_keys], expectation does not");
    assert!(
        err.contains("`preloaded_keys` is not expected (got an empty table)"),
        "{err}"
    );

    let case = CaseCopy::new("source-none");
    case.edit(
        "certd.toml",
        "[cert_issuance]\n",
        "[cert_issuance.est.urls]\n",
    );
    let err = run_case(&case.0).expect_err("expectation has a table the output lacks");
    assert!(
        err.contains("`cert_issuance.est` is missing (expected a table)"),
        "{err}"
    );
}
