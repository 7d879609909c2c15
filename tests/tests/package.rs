//! The Debian package: built by `scripts/package` (one command; the release aziotd is reused
//! when up to date, cargo decides), its `dpkg-deb -c` listing compared entry by entry — path,
//! kind, mode, owner, link target — with the layout of spec packaging.md §3 as this product
//! installs it (docs/packaging.md), its control fields and maintainer scripts, and lintian
//! without errors. Slow on a cold tree (a release build).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn on_path(program: &str) -> bool {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|d| d.join(program).is_file())
}

/// Fails naming what is missing, unless AZIOT_ALLOW_SKIP=1.
fn require_tools() -> bool {
    let missing: Vec<&str> = [
        ("dpkg-deb", "dpkg"),
        ("dpkg-shlibdeps", "dpkg-dev"),
        ("lintian", "lintian"),
        ("cargo", "rustup"),
    ]
    .into_iter()
    .filter(|(p, _)| !on_path(p))
    .map(|(_, pkg)| pkg)
    .collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "the package test needs {} (scripts/deps.sh installs them)",
        missing.join(", ")
    );
    if std::env::var("AZIOT_ALLOW_SKIP").as_deref() == Ok("1") {
        eprintln!("SKIPPED: package: {msg}");
        return false;
    }
    panic!("{msg}");
}

/// `scripts/package` into a private output directory: the .deb.
fn build() -> (aziot_tests::tempdir::TempDir, PathBuf) {
    let out = aziot_tests::tempdir::TempDir::new("package");
    let status = Command::new(workspace().join("scripts/package"))
        .env("AZIOT_PACKAGE_OUT", out.path())
        // lintian is run (and asserted on) below, with its output in the failure message
        .env("AZIOT_PACKAGE_NO_LINTIAN", "1")
        .current_dir(workspace())
        .status()
        .expect("run scripts/package");
    assert!(status.success(), "scripts/package failed: {status}");
    let debs: Vec<PathBuf> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "{debs:?}");
    let deb = debs[0].clone();
    (out, deb)
}

/// One line of `dpkg-deb -c`: mode string, owner/group, link target.
#[derive(Debug, PartialEq, Eq)]
struct Entry {
    mode: String,
    owner: String,
    link: Option<String>,
}

fn listing(deb: &Path) -> BTreeMap<String, Entry> {
    let out = Command::new("dpkg-deb")
        .arg("-c")
        .arg(deb)
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut entries = BTreeMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        // drwxr-xr-x root/root         0 2026-01-01 00:00 ./etc/aziot/
        let mut f = line.split_whitespace();
        let (mode, owner) = (f.next().unwrap().to_owned(), f.next().unwrap().to_owned());
        let rest: Vec<&str> = f.skip(3).collect();
        let rest = rest.join(" ");
        let (path, link) = match rest.split_once(" -> ") {
            Some((p, l)) => (p.to_owned(), Some(l.to_owned())),
            None => (rest, None),
        };
        let path = path
            .trim_start_matches('.')
            .trim_end_matches('/')
            .to_owned();
        entries.insert(
            if path.is_empty() {
                "/".to_owned()
            } else {
                path
            },
            Entry { mode, owner, link },
        );
    }
    entries
}

/// `openssl version -e` (`-m`): the engines (modules) directory.
fn openssl_dir(flag: &str) -> String {
    let out = Command::new("openssl")
        .args(["version", flag])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.split('"').nth(1).expect("DIR: \"...\"").to_owned()
}

/// The expected contents (spec packaging.md §3 as this product installs it; docs/packaging.md).
fn expected() -> BTreeMap<String, Entry> {
    let mut e = BTreeMap::new();
    let mut add = |path: &str, mode: &str, link: Option<&str>| {
        e.insert(
            path.to_owned(),
            Entry {
                mode: mode.into(),
                owner: "root/root".into(),
                link: link.map(Into::into),
            },
        );
    };
    let (dir, exe, file, dir700, link) = (
        "drwxr-xr-x",
        "-rwxr-xr-x",
        "-rw-r--r--",
        "drwx------",
        "lrwxrwxrwx",
    );
    add("/usr/bin/aziotctl", exe, None);
    add("/usr/libexec/aziot/aziotd", exe, None);
    for svc in ["certd", "identityd", "keyd", "tpmd"] {
        add(
            &format!("/usr/libexec/aziot/aziot-{svc}"),
            link,
            Some("aziotd"),
        );
    }
    add("/usr/libexec/aziot-identity-service", link, Some("aziot"));
    add("/usr/lib/libaziot_keys.so", file, None);
    // The engine, and the same .so as the OpenSSL 3 provider (docs/engine.md).
    let (engines, modules) = (openssl_dir("-e"), openssl_dir("-m"));
    add(&format!("{engines}/aziot_keys.so"), file, None);
    let relative = {
        let (e, m): (Vec<&str>, Vec<&str>) =
            (engines.split('/').collect(), modules.split('/').collect());
        let common = e.iter().zip(&m).take_while(|(a, b)| a == b).count();
        let mut r: Vec<&str> = vec![".."; m.len() - common];
        r.extend(&e[common..]);
        format!("{}/aziot_keys.so", r.join("/"))
    };
    add(&format!("{modules}/aziot_keys.so"), link, Some(&relative));
    add(
        "/usr/include/aziot-identity-service/aziot-keys.h",
        file,
        None,
    );
    for doc in ["README.md", "copyright", "changelog.Debian.gz"] {
        add(
            &format!("/usr/share/doc/aziot-identity-service/{doc}"),
            file,
            None,
        );
    }
    add(
        "/usr/share/lintian/overrides/aziot-identity-service",
        file,
        None,
    );
    add("/etc/aziot", dir, None);
    add("/etc/aziot/config.toml.template", file, None);
    for svc in ["keyd", "certd", "identityd", "tpmd"] {
        add(&format!("/etc/aziot/{svc}"), dir, None);
        add(&format!("/etc/aziot/{svc}/config.toml.default"), file, None);
        add(&format!("/etc/aziot/{svc}/config.d"), dir700, None);
        add(&format!("/var/lib/aziot/{svc}"), dir700, None);
        for kind in ["service", "socket"] {
            add(
                &format!("/lib/systemd/system/aziot-{svc}.{kind}"),
                file,
                None,
            );
        }
    }
    add("/var/lib/aziot", dir, None);
    add("/usr/lib/sysusers.d/aziot.conf", file, None);
    add("/usr/lib/tmpfiles.d/aziot.conf", file, None);
    // Every parent directory: root's, 0755.
    let paths: Vec<String> = e.keys().cloned().collect();
    for p in paths {
        let mut cur = Path::new(&p).to_path_buf();
        while cur.pop() {
            let d = cur.to_str().unwrap();
            let d = if d.is_empty() { "/" } else { d };
            e.entry(d.to_owned()).or_insert(Entry {
                mode: dir.into(),
                owner: "root/root".into(),
                link: None,
            });
        }
    }
    e
}

fn control_field(deb: &Path, field: &str) -> String {
    let out = Command::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .arg(field)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

#[test]
fn package_layout_control_scripts_and_lintian() {
    if !require_tools() {
        return;
    }
    let (_out, deb) = build();
    let name = deb.file_name().unwrap().to_str().unwrap().to_owned();
    assert!(
        name.starts_with(&format!(
            "aziot-identity-service_{}-1_",
            env!("CARGO_PKG_VERSION")
        )),
        "{name}"
    );

    // 1. Contents: every entry, nothing more, nothing less.
    let actual = listing(&deb);
    let expected = expected();
    let mut diffs = Vec::new();
    for (path, want) in &expected {
        match actual.get(path) {
            Some(got) if got == want => {}
            Some(got) => diffs.push(format!("{path}: expected {want:?}, found {got:?}")),
            None => diffs.push(format!("{path}: missing")),
        }
    }
    for path in actual.keys().filter(|p| !expected.contains_key(*p)) {
        diffs.push(format!("{path}: not expected ({:?})", actual[path]));
    }
    assert!(
        diffs.is_empty(),
        "dpkg-deb -c differs from the spec's layout:\n{}",
        diffs.join("\n")
    );

    // 2. Control: dependencies from the ELF files (libssl3) and the dlopened tpm2-tss.
    assert_eq!(control_field(&deb, "Package"), "aziot-identity-service");
    assert_eq!(control_field(&deb, "Section"), "admin");
    let depends = control_field(&deb, "Depends");
    for dep in [
        "libc6",
        "libssl3",
        "libtss2-esys-3.0.2-0",
        "libtss2-mu0",
        "libtss2-tctildr0",
        "systemd",
    ] {
        assert!(
            depends
                .split(", ")
                .any(|d| d == dep || d.starts_with(&format!("{dep} "))),
            "Depends lacks {dep}: {depends}"
        );
    }
    assert_eq!(control_field(&deb, "Conflicts"), "iotedge, libiothsm-std");

    // 3. Maintainer scripts and conffiles.
    let ctrl = aziot_tests::tempdir::TempDir::new("package-control");
    assert!(Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(ctrl.path().join("c"))
        .status()
        .unwrap()
        .success());
    let c = ctrl.path().join("c");
    for script in ["postinst", "prerm", "postrm"] {
        let path = c.join(script);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o755, "{script}");
        assert!(
            Command::new("sh")
                .arg("-n")
                .arg(&path)
                .status()
                .unwrap()
                .success(),
            "{script}: sh -n"
        );
    }
    let postinst = std::fs::read_to_string(c.join("postinst")).unwrap();
    assert!(postinst.contains("systemd-sysusers /usr/lib/sysusers.d/aziot.conf"));
    assert!(postinst.contains("systemd-tmpfiles --create /usr/lib/tmpfiles.d/aziot.conf"));
    for socket in [
        "aziot-keyd.socket",
        "aziot-certd.socket",
        "aziot-identityd.socket",
        "aziot-tpmd.socket",
    ] {
        assert!(postinst.contains(socket), "postinst enables {socket}");
    }
    let postrm = std::fs::read_to_string(c.join("postrm")).unwrap();
    for gone in [
        "/etc/aziot",
        "/run/aziot",
        "/var/lib/aziot",
        "/var/secrets/aziot",
        "log-level.conf",
        "userdel",
    ] {
        assert!(postrm.contains(gone), "purge removes {gone}");
    }
    let conffiles = std::fs::read_to_string(c.join("conffiles")).unwrap();
    assert_eq!(
        conffiles.lines().collect::<Vec<_>>(),
        [
            "/etc/aziot/certd/config.toml.default",
            "/etc/aziot/config.toml.template",
            "/etc/aziot/identityd/config.toml.default",
            "/etc/aziot/keyd/config.toml.default",
            "/etc/aziot/tpmd/config.toml.default",
        ]
    );

    // 4. lintian: no errors.
    let out = Command::new("lintian")
        .args(["--fail-on", "error"])
        .arg(&deb)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !report.lines().any(|l| l.starts_with("E: ")),
        "lintian reports errors:\n{report}"
    );
}
