//! Admin drop-ins: `/etc/aziot/<svc>/policy.d/*.toml`, read in file-name order. They may add
//! Landlock path rules and TCP connect ports, nothing else (never syscalls):
//!
//! ```toml
//! [[path]]
//! path = "/usr/lib/softhsm"
//! access = "ro"                 # or a list: ["read-file", "read-dir"]; "rw" for read-write
//! comment = "SoftHSM token store"
//!
//! [[tcp_connect]]
//! port = 8443
//! comment = "EST server"
//! ```
//!
//! An unknown key is a warning naming the file and the key; an unreadable or malformed file, a
//! relative path, port 0, or a file that is not root-owned or is writable by group/others is an
//! error naming the file.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::model::{check_path, AccessSet, Origin, PathRule, Policy, PortRule};
use crate::PolicyError;

#[derive(Deserialize)]
struct DropIn {
    #[serde(default)]
    path: Vec<PathEntry>,
    #[serde(default)]
    tcp_connect: Vec<PortEntry>,
}

#[derive(Deserialize)]
struct PathEntry {
    path: PathBuf,
    access: AccessSet,
    #[serde(default)]
    comment: String,
}

#[derive(Deserialize)]
struct PortEntry {
    port: u16,
    #[serde(default)]
    comment: String,
}

/// The `*.toml` files of `dir`, sorted by name; a missing directory holds none.
fn files(dir: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(PolicyError::DropInDir { path: dir.to_owned(), source }),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| PolicyError::DropInDir { path: dir.to_owned(), source })?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".toml") && !name.starts_with('.') {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

pub(crate) fn apply_dir(policy: &mut Policy, dir: &Path) -> Result<(), PolicyError> {
    for path in files(dir)? {
        apply_file(policy, &path)?;
    }
    Ok(())
}

fn apply_file(policy: &mut Policy, path: &Path) -> Result<(), PolicyError> {
    let err = |message: String| PolicyError::DropIn { path: path.to_owned(), message };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(err(format!(
            "must be owned by root and not writable by group or others (owner uid {}, mode {:o})",
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let mut unknown = Vec::new();
    let de = toml::Deserializer::new(&text);
    let file: DropIn = serde_ignored::deserialize(de, |p| unknown.push(p.to_string())).map_err(|e| err(e.to_string()))?;
    for key in unknown {
        let why = match key.split('.').next().unwrap_or("") {
            "seccomp" | "syscalls" | "syscall" => "drop-ins cannot change the seccomp allowlist",
            "user" | "group" | "groups" | "rlimit" | "rlimits" | "scopes" | "require" => {
                "drop-ins may only add path rules and TCP ports"
            }
            _ => "unknown key",
        };
        policy.warnings.push(format!("{}: {why}: `{key}` ignored", path.display()));
    }
    let origin = Origin::DropIn(path.to_owned());
    for entry in file.path {
        check_path(&entry.path).map_err(&err)?;
        policy.landlock.path_rules.push(PathRule {
            path: entry.path,
            access: entry.access,
            comment: entry.comment,
            origin: origin.clone(),
        });
    }
    for entry in file.tcp_connect {
        if entry.port == 0 {
            return Err(err("TCP port 0".into()));
        }
        policy.landlock.tcp_connect.push(PortRule { port: entry.port, comment: entry.comment, origin: origin.clone() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("aziot-policy-dropin-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        p
    }

    fn root() -> bool {
        nix::unistd::geteuid().is_root()
    }

    #[test]
    fn adds_paths_and_ports_in_name_order_with_origins() {
        assert!(root(), "drop-ins must be root-owned: run the tests as root");
        let dir = temp_dir("order");
        let b = write(&dir, "20-b.toml", "[[tcp_connect]]\nport = 9000\n[[tcp_connect]]\nport = 8443\n");
        let a = write(&dir, "10-a.toml", "[[path]]\npath = \"/opt/x\"\naccess = \"ro\"\ncomment = \"x\"\n[[tcp_connect]]\nport = 8443\n");
        write(&dir, "ignored.conf", "garbage");
        let p = crate::effective("certd", &crate::Grants::default(), Some(&dir)).unwrap();
        let rule = p.landlock.path_rules.iter().find(|r| r.path == Path::new("/opt/x")).unwrap();
        assert_eq!(rule.origin, Origin::DropIn(a.clone()));
        assert_eq!(rule.access, AccessSet::read_only());
        let ports: Vec<(u16, Origin)> = p.landlock.tcp_connect.iter().map(|p| (p.port, p.origin.clone())).collect();
        assert_eq!(ports, vec![(8443, Origin::DropIn(a)), (9000, Origin::DropIn(b))]);
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_keys_warn_and_syscalls_are_never_added() {
        assert!(root(), "drop-ins must be root-owned: run the tests as root");
        let dir = temp_dir("unknown");
        let f = write(&dir, "x.toml", "colour = 1\n[seccomp]\nallow = [\"execve\"]\n[[path]]\npath = \"/opt\"\naccess = \"ro\"\nmode = 1\n");
        let p = crate::effective("keyd", &crate::Grants::default(), Some(&dir)).unwrap();
        let joined = p.warnings.join("\n");
        assert!(joined.contains(&format!("{}: unknown key: `colour` ignored", f.display())), "{joined}");
        assert!(joined.contains("cannot change the seccomp allowlist: `seccomp` ignored"), "{joined}");
        assert!(joined.contains("`path.0.mode` ignored"), "{joined}");
        assert!(!p.seccomp.allows("execve"));
        assert_eq!(p.seccomp, crate::builtin("keyd").unwrap().seccomp);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_files_are_errors_naming_them() {
        assert!(root(), "drop-ins must be root-owned: run the tests as root");
        for (name, text, needle) in [
            ("bad.toml", "[[path]\n", "bad.toml"),
            ("rel.toml", "[[path]]\npath = \"opt\"\naccess = \"ro\"\n", "not absolute"),
            ("right.toml", "[[path]]\npath = \"/opt\"\naccess = [\"fly\"]\n", "unknown access right"),
            ("zero.toml", "[[tcp_connect]]\nport = 0\n", "TCP port 0"),
            ("big.toml", "[[tcp_connect]]\nport = 70000\n", "big.toml"),
        ] {
            let dir = temp_dir(name);
            write(&dir, name, text);
            let e = crate::effective("certd", &crate::Grants::default(), Some(&dir)).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains(needle), "{name}: {e}");
            std::fs::remove_dir_all(&dir).unwrap();
        }
        let dir = temp_dir("perm");
        let f = write(&dir, "w.toml", "");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = crate::effective("certd", &crate::Grants::default(), Some(&dir)).unwrap_err().to_string();
        assert!(e.contains("w.toml") && e.contains("not writable"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_directory_means_no_drop_ins() {
        let p = crate::effective("tpmd", &crate::Grants::default(), Some(Path::new("/nonexistent/policy.d"))).unwrap();
        assert_eq!(p, crate::builtin("tpmd").unwrap());
    }
}
