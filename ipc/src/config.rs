//! Service configuration: `config.toml`, then `config.d/*.toml` merged in order
//! (spec common-http §3.1), with a warning for every key the service does not know.

use std::path::{Path, PathBuf};

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

/// The merged config and the files it came from (in merge order), kept to name the file of an
/// unknown key.
#[derive(Clone, Debug)]
pub struct Merged {
    pub value: toml::Table,
    pub files: Vec<(PathBuf, toml::Table)>,
}

/// Reads and merges the config exactly as spec common-http §3.1.
pub fn read_merged(paths: &ConfigPaths) -> Result<Merged, ConfigError> {
    let mut files = Vec::new();
    if let Some(table) = read_table(&paths.main, true)? {
        files.push((paths.main.clone(), table));
    }
    match std::fs::read_dir(&paths.dir) {
        Ok(entries) => {
            let mut dropins = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|source| ConfigError::ListDir { path: paths.dir.clone(), source })?;
                let file_type = entry
                    .file_type()
                    .map_err(|source| ConfigError::ListDir { path: paths.dir.clone(), source })?;
                let path = entry.path();
                // Regular files only (symlinks are not followed), extension exactly `toml`.
                if file_type.is_file() && path.extension().is_some_and(|e| e == "toml") {
                    dropins.push(path);
                }
            }
            dropins.sort();
            for path in dropins {
                if let Some(table) = read_table(&path, false)? {
                    files.push((path, table));
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(ConfigError::ListDir { path: paths.dir.clone(), source }),
    }
    let mut value = toml::Table::new();
    for (_, table) in &files {
        merge_tables(&mut value, table.clone());
    }
    Ok(Merged { value, files })
}

fn read_table(path: &Path, missing_ok: bool) -> Result<Option<toml::Table>, ConfigError> {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).map_err(|e| ConfigError::Read {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?,
        Err(e) if missing_ok && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(ConfigError::Read { path: path.to_owned(), source }),
    };
    let table = text
        .parse::<toml::Table>()
        .map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
    Ok(Some(table))
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
}
