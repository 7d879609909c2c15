//! Service configuration: `config.toml`, then `config.d/*.toml` merged in order
//! (spec common-http §3.1), with a warning for every key the service does not know. Every file
//! and the drop-in directory must be root's ([`read_merged`]).

use std::path::{Path, PathBuf};

/// Re-exported for the workers that open paths on the broker's behalf (tpmd's device walk).
pub use aziot_policy::trusted;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read config from {path}")]
    Read { path: PathBuf, #[source] source: std::io::Error },
    #[error("could not parse config file {path}")]
    Parse { path: PathBuf, #[source] source: toml::de::Error },
    #[error("could not list config directory {path}")]
    ListDir { path: PathBuf, #[source] source: std::io::Error },
    #[error("could not read config")]
    Deserialize(#[source] toml::de::Error),
    /// A config file or directory the broker must not act on (not root's, writable by others,
    /// a symbolic link, not a regular file): the message names it, its owner and mode, and the fix.
    #[error(transparent)]
    Untrusted(aziot_policy::trusted::TrustError),
}

/// `[sandbox]`: how the broker confines the worker. Read by the broker only.
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct SandboxConfig {
    /// Start even when a protection the policy requires is not enforced (warned at every
    /// start, reported by `aziotctl policy audit`).
    #[serde(default)]
    pub allow_degraded: bool,
    /// `kill` (default), `log` (SECCOMP_RET_LOG, for field triage; degraded), or `off`
    /// (no seccomp; degraded, for tests).
    #[serde(default)]
    pub seccomp: Option<String>,
}

/// Where a service's config lives.
#[derive(Clone, Debug)]
pub struct ConfigPaths {
    pub main: PathBuf,
    pub dir: PathBuf,
}

impl ConfigPaths {
    /// `AZIOT_<SVC>_CONFIG` / `AZIOT_<SVC>_CONFIG_DIR`, defaulting to `/etc/aziot/<svc>/…`.
    /// `service` is the short name: `keyd`, `certd`, `identityd`, `tpmd`.
    pub fn from_env(service: &str) -> Self {
        if let Some(info) = aziot_policy::services::by_short(service) {
            return crate::service::config_paths(info);
        }
        let upper = service.to_ascii_uppercase();
        let main = std::env::var_os(format!("AZIOT_{upper}_CONFIG"))
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(format!("/etc/aziot/{service}/config.toml")));
        let dir = std::env::var_os(format!("AZIOT_{upper}_CONFIG_DIR"))
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(format!("/etc/aziot/{service}/config.d")));
        ConfigPaths { main, dir }
    }
}

/// The admin's policy drop-ins of `service` (short name): `AZIOT_<SVC>_POLICY_DIR`, defaulting
/// to `/etc/aziot/<svc>/policy.d` ([`aziot_policy::default_policy_d`]). Like the config paths,
/// the variable comes from the unit's environment, i.e. from root.
pub fn policy_dir(service: &str) -> PathBuf {
    if let Some(info) = aziot_policy::services::by_short(service) {
        return info.policy_dir();
    }
    std::env::var_os(format!("AZIOT_{}_POLICY_DIR", service.to_ascii_uppercase()))
        .map(PathBuf::from)
        .unwrap_or_else(|| aziot_policy::default_policy_d(service))
}

/// The merged config and the files it came from (in merge order), kept to name the file of an
/// unknown key.
#[derive(Clone, Debug)]
pub struct Merged {
    pub value: toml::Table,
    pub files: Vec<(PathBuf, toml::Table)>,
}

/// Reads and merges the config exactly as spec common-http §3.1, with one addition: every file
/// read, and the drop-in directory, must be owned by root and not writable by group or others
/// (checked on the opened descriptor, [`aziot_policy::trusted`]); the main file must not be a
/// symbolic link. A symlinked `.toml` in the drop-in directory is skipped, as the spec says.
/// The broker acts on this config as root: it must not come from anyone but root.
pub fn read_merged(paths: &ConfigPaths) -> Result<Merged, ConfigError> {
    let mut files = Vec::new();
    if let Some(table) = read_table(&paths.main)? {
        files.push((paths.main.clone(), table));
    }
    match trusted::open_root_owned_dir(&paths.dir) {
        Ok(dir) => {
            let entries = dir.entries().map_err(|e| match e {
                trusted::TrustError::Open { source, .. } => ConfigError::ListDir { path: paths.dir.clone(), source },
                other => ConfigError::Untrusted(other),
            })?;
            // Regular files only (symlinks are not followed), extension exactly `toml`.
            let mut dropins: Vec<_> = entries
                .into_iter()
                .filter(|e| e.is_file && Path::new(&e.name).extension().is_some_and(|x| x == "toml"))
                .map(|e| e.name)
                .collect();
            dropins.sort();
            for name in dropins {
                let path = paths.dir.join(&name);
                let file = dir.open_file(&name).map_err(|e| ConfigError::from_trust(&path, e))?;
                files.push((path.clone(), parse_table(&path, file)?));
            }
        }
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(ConfigError::from_trust(&paths.dir, e)),
    }
    let mut value = toml::Table::new();
    for (_, table) in &files {
        merge_tables(&mut value, table.clone());
    }
    Ok(Merged { value, files })
}

/// The main config file; `None` when it does not exist.
fn read_table(path: &Path) -> Result<Option<toml::Table>, ConfigError> {
    match trusted::open_root_owned(path) {
        Ok(file) => Ok(Some(parse_table(path, file)?)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(ConfigError::from_trust(path, e)),
    }
}

fn parse_table(path: &Path, mut file: std::fs::File) -> Result<toml::Table, ConfigError> {
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut bytes)
        .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
    let text = String::from_utf8(bytes).map_err(|e| ConfigError::Read {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    text.parse::<toml::Table>().map_err(|source| ConfigError::Parse { path: path.to_owned(), source })
}

impl ConfigError {
    fn from_trust(path: &Path, e: trusted::TrustError) -> ConfigError {
        match e {
            trusted::TrustError::Open { source, .. } => ConfigError::Read { path: path.to_owned(), source },
            other => ConfigError::Untrusted(other),
        }
    }
}

/// Tables merge recursively, arrays append, anything else is replaced.
pub fn merge_tables(base: &mut toml::Table, patch: toml::Table) {
    for (key, value) in patch {
        match base.get_mut(&key) {
            Some(existing) => merge_values(existing, value),
            None => {
                base.insert(key, value);
            }
        }
    }
}

fn merge_values(base: &mut toml::Value, patch: toml::Value) {
    match (base, patch) {
        (toml::Value::Table(b), toml::Value::Table(p)) => merge_tables(b, p),
        (toml::Value::Array(b), toml::Value::Array(p)) => b.extend(p),
        (b, p) => *b = p,
    }
}

/// Deserializes the merged config. Every key the type does not know is reported through
/// `on_unknown(file, key path)` (the file that set it; several if several did) and otherwise
/// ignored, as upstream ignores it.
pub fn deserialize<T: DeserializeOwned>(
    merged: &Merged,
    mut on_unknown: impl FnMut(&Path, &str),
) -> Result<T, ConfigError> {
    let mut unknown = Vec::new();
    let value = toml::Value::Table(merged.value.clone());
    let config: T = serde_ignored::deserialize(value, |path| unknown.push(path.to_string()))
        .map_err(ConfigError::Deserialize)?;
    for key in unknown {
        let mut found = false;
        for (file, table) in &merged.files {
            if table_has_path(table, &key) {
                on_unknown(file, &key);
                found = true;
            }
        }
        if !found {
            on_unknown(Path::new("<merged config>"), &key);
        }
    }
    Ok(config)
}

/// Reads, merges and deserializes, logging unknown keys as warnings.
pub fn load<T: DeserializeOwned>(paths: &ConfigPaths) -> Result<T, ConfigError> {
    let merged = read_merged(paths)?;
    deserialize(&merged, |file, key| {
        tracing::warn!("unknown config key {key:?} in {} (ignored)", file.display());
    })
}

/// `serde_ignored` paths look like `a.b.c` or `principal.0.x`.
fn table_has_path(table: &toml::Table, path: &str) -> bool {
    let mut parts = path.split('.');
    let Some(first) = parts.next() else { return false };
    let Some(mut current) = table.get(first) else { return false };
    for part in parts {
        let next = match current {
            toml::Value::Table(t) => t.get(part),
            // Array indices refer to the merged array; any element of this file's array counts.
            toml::Value::Array(a) => match part.parse::<usize>() {
                Ok(_) => a.first(),
                Err(_) => None,
            },
            _ => None,
        };
        match next {
            Some(v) => current = v,
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "aziot-ipc-config-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
        ));
        std::fs::create_dir_all(dir.join("config.d")).unwrap();
        // whatever the umask: the broker refuses group/other-writable config directories
        for d in [dir.clone(), dir.join("config.d")] {
            std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        }
        dir
    }

    #[derive(serde::Deserialize, Debug)]
    struct Cfg {
        #[serde(default)]
        max_requests: Option<usize>,
        #[serde(default)]
        principal: Vec<crate::principal::Principal>,
        #[serde(default)]
        table: toml::Table,
    }

    #[test]
    fn merge_order_and_arrays() {
        let dir = tempdir();
        std::fs::write(dir.join("config.toml"), "max_requests = 1\n[[principal]]\nuid = 1\nkeys = [\"a\"]\n[table]\nx = 1\n").unwrap();
        std::fs::write(dir.join("config.d/10-b.toml"), "max_requests = 3\n[[principal]]\nuid = 2\nkeys = [\"b\"]\n").unwrap();
        std::fs::write(dir.join("config.d/00-a.toml"), "max_requests = 2\n[table]\ny = 2\n").unwrap();
        std::fs::write(dir.join("config.d/ignored.TOML"), "max_requests = 99\n").unwrap();
        std::os::unix::fs::symlink(dir.join("config.d/00-a.toml"), dir.join("config.d/99-link.toml")).unwrap();
        let paths = ConfigPaths { main: dir.join("config.toml"), dir: dir.join("config.d") };
        let merged = read_merged(&paths).unwrap();
        let mut warnings = Vec::new();
        let cfg: Cfg = deserialize(&merged, |f, k| warnings.push((f.to_owned(), k.to_owned()))).unwrap();
        assert_eq!(cfg.max_requests, Some(3));
        assert_eq!(cfg.principal.len(), 2);
        assert_eq!(cfg.table.len(), 2);
        assert!(warnings.is_empty(), "{warnings:?}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_main_file_is_empty_and_unknown_keys_warn() {
        let dir = tempdir();
        std::fs::write(dir.join("config.d/50-x.toml"), "bogus = 1\n[[principal]]\nuid = 5\nkeys = []\nextra = true\n").unwrap();
        let paths = ConfigPaths { main: dir.join("nope.toml"), dir: dir.join("config.d") };
        let merged = read_merged(&paths).unwrap();
        let mut warnings = Vec::new();
        let _: Cfg = deserialize(&merged, |f, k| warnings.push((f.to_owned(), k.to_owned()))).unwrap();
        let keys: Vec<_> = warnings.iter().map(|(_, k)| k.as_str()).collect();
        assert!(keys.contains(&"bogus"), "{warnings:?}");
        assert!(keys.iter().any(|k| k.ends_with("extra")), "{warnings:?}");
        assert!(warnings.iter().all(|(f, _)| f.ends_with("50-x.toml")));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn syntax_error_names_file() {
        let dir = tempdir();
        std::fs::write(dir.join("config.d/bad.toml"), "x = = 1").unwrap();
        let paths = ConfigPaths { main: dir.join("config.toml"), dir: dir.join("config.d") };
        let err = read_merged(&paths).unwrap_err();
        assert!(err.to_string().contains("bad.toml"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn set_mode(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    }

    #[test]
    fn files_not_roots_are_refused_naming_file_owner_mode_and_fix() {
        assert!(nix::unistd::geteuid().is_root(), "these tests give files other owners: run them as root");
        let user = nix::unistd::User::from_name("aziotks")
            .unwrap()
            .expect("user aziotks (systemd-sysusers packaging/sysusers.d/aziot.conf)");
        let dir = tempdir();
        let paths = ConfigPaths { main: dir.join("config.toml"), dir: dir.join("config.d") };
        std::fs::write(&paths.main, "max_requests = 1\n").unwrap();
        set_mode(&paths.main, 0o644);
        let super_toml = dir.join("config.d/00-super.toml");
        std::fs::write(&super_toml, "[sandbox]\nseccomp = \"off\"\nallow_degraded = true\n").unwrap();
        set_mode(&super_toml, 0o600);

        // the service user's drop-in (what the original's `config apply` writes)
        nix::unistd::chown(&super_toml, Some(user.uid), Some(user.gid)).unwrap();
        let e = read_merged(&paths).unwrap_err();
        assert!(matches!(e, ConfigError::Untrusted(_)), "{e:?}");
        let p = super_toml.display();
        assert_eq!(
            e.to_string(),
            format!(
                "{p} is owned by uid {} (aziotks) with mode 0600: the broker acts only on files owned by \
                 root and not writable by group or others; fix it with `chown root:root {p}` and `chmod 0600 {p}`",
                user.uid
            )
        );
        // root's, but world-writable
        nix::unistd::chown(&super_toml, Some(nix::unistd::Uid::from_raw(0)), Some(nix::unistd::Gid::from_raw(0))).unwrap();
        set_mode(&super_toml, 0o666);
        let e = read_merged(&paths).unwrap_err().to_string();
        assert!(e.contains(&format!("{p} is owned by uid 0 (root) with mode 0666")), "{e}");
        set_mode(&super_toml, 0o600);
        assert_eq!(read_merged(&paths).unwrap().files.len(), 2);

        // the main file group-writable, then a symbolic link to a good file
        set_mode(&paths.main, 0o664);
        let e = read_merged(&paths).unwrap_err().to_string();
        assert!(e.contains("config.toml is owned by uid 0 (root) with mode 0664"), "{e}");
        set_mode(&paths.main, 0o644);
        let link = dir.join("link.toml");
        std::os::unix::fs::symlink(&paths.main, &link).unwrap();
        let e = read_merged(&ConfigPaths { main: link, dir: paths.dir.clone() }).unwrap_err().to_string();
        assert!(e.contains("link.toml is a symbolic link"), "{e}");

        // the drop-in directory writable by others, or the service user's
        set_mode(&paths.dir, 0o777);
        let e = read_merged(&paths).unwrap_err().to_string();
        assert!(e.contains(&format!("{} is owned by uid 0 (root) with mode 0777", paths.dir.display())), "{e}");
        assert!(e.contains(&format!("`chmod go-w {}`", paths.dir.display())), "{e}");
        set_mode(&paths.dir, 0o755);
        nix::unistd::chown(&paths.dir, Some(user.uid), None).unwrap();
        let e = read_merged(&paths).unwrap_err().to_string();
        assert!(e.contains("(aziotks) with mode 0755"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
