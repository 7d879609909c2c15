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
//! relative path, port 0, a symbolic link, or a file (or the directory itself) that is not
//! root-owned or is writable by group/others is an error naming the file, its owner and mode and
//! the fix ([`crate::trusted`]).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::trusted::{self, TrustError, TrustedDir};
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

/// The drop-in directory, checked ([`crate::trusted::open_root_owned_dir`]), and its `*.toml`
/// names (not starting with `.`), sorted; a missing directory holds none.
fn files(dir: &Path) -> Result<Option<(TrustedDir, Vec<OsString>)>, PolicyError> {
    let trusted = match trusted::open_root_owned_dir(dir) {
        Ok(t) => t,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(PolicyError::DropIn { path: dir.to_owned(), message: untrusted_message(e) }),
    };
    let entries = trusted
        .entries()
        .map_err(|e| PolicyError::DropIn { path: dir.to_owned(), message: untrusted_message(e) })?;
    let mut names: Vec<OsString> = entries
        .into_iter()
        .map(|e| e.name)
        .filter(|n| {
            let n = n.to_string_lossy();
            n.ends_with(".toml") && !n.starts_with('.')
        })
        .collect();
    names.sort();
    Ok(Some((trusted, names)))
}

/// The error's own text (the path is named by [`PolicyError::DropIn`] already, the cause chain
/// is flattened into the message).
fn untrusted_message(e: TrustError) -> String {
    match e {
        TrustError::Open { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

pub(crate) fn apply_dir(policy: &mut Policy, dir: &Path) -> Result<(), PolicyError> {
    let Some((trusted, names)) = files(dir)? else { return Ok(()) };
    for name in names {
        apply_file(policy, &trusted, &name)?;
    }
    Ok(())
}

fn apply_file(policy: &mut Policy, dir: &TrustedDir, name: &std::ffi::OsStr) -> Result<(), PolicyError> {
    let path = &dir.path().join(name);
    let err = |message: String| PolicyError::DropIn { path: path.to_owned(), message };
    // Not through a link, a regular file, root-owned, not group/other-writable: checked on the
    // descriptor that is read.
    let mut file = dir.open_file(name).map_err(|e| err(untrusted_message(e)))?;
    let mut text = String::new();
    std::io::Read::read_to_string(&mut file, &mut text).map_err(|e| err(e.to_string()))?;
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
        // drop-in directories must not be group/other-writable, whatever the umask
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
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
    fn drop_ins_of_the_service_user_or_through_links_are_refused() {
        assert!(root(), "drop-ins must be root-owned: run the tests as root");
        let user = nix::unistd::User::from_name("aziotks")
            .unwrap()
            .expect("user aziotks (systemd-sysusers packaging/sysusers.d/aziot.conf)");
        // a file owned by the service user: named, with its owner, mode and the fix
        let dir = temp_dir("theirs");
        let f = write(&dir, "50-theirs.toml", "[[tcp_connect]]\nport = 22\n");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        nix::unistd::chown(&f, Some(user.uid), Some(user.gid)).unwrap();
        let e = crate::effective("certd", &crate::Grants::default(), Some(&dir)).unwrap_err().to_string();
        let p = f.display();
        assert!(e.contains(&format!("{p} is owned by uid {} (aziotks) with mode 0600", user.uid)), "{e}");
        assert!(e.contains(&format!("`chown root:root {p}` and `chmod 0600 {p}`")), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();

        // a link to a good root-owned file is not followed
        let dir = temp_dir("link");
        let elsewhere = temp_dir("link-target");
        let good = write(&elsewhere, "good.toml", "[[tcp_connect]]\nport = 22\n");
        std::os::unix::fs::symlink(&good, dir.join("10-link.toml")).unwrap();
        let e = crate::effective("certd", &crate::Grants::default(), Some(&dir)).unwrap_err().to_string();
        assert!(e.contains("10-link.toml is a symbolic link"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&elsewhere).unwrap();

        // the directory itself writable by the service user
        let dir = temp_dir("dir");
        nix::unistd::chown(&dir, Some(user.uid), Some(user.gid)).unwrap();
        let e = crate::effective("certd", &crate::Grants::default(), Some(&dir)).unwrap_err().to_string();
        assert!(e.contains(&format!("{} is owned by uid {} (aziotks)", dir.display(), user.uid)), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_directory_means_no_drop_ins() {
        let p = crate::effective("tpmd", &crate::Grants::default(), Some(Path::new("/nonexistent/policy.d"))).unwrap();
        assert_eq!(p, crate::builtin("tpmd").unwrap());
    }
}
