//! The status file the broker writes after each (re)start of its worker:
//! `/run/aziot/<svc>.status` (JSON), read by `aziotctl policy audit`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::apply::LandlockReport;
use crate::PolicyError;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub service: String,
    pub broker_pid: i32,
    pub worker_pid: i32,
    /// [`crate::Policy::digest`] of the effective policy the worker was given.
    pub policy_digest: String,
    /// The digest of the seccomp programs the worker reported installed.
    pub seccomp_digest: String,
    /// The seccomp program the broker chose from config (`keyd`, or `keyd+pkcs11` when a
    /// PKCS#11 module is configured): the audit expects its digest. Empty: the service's own.
    #[serde(default)]
    pub seccomp_program: String,
    /// What the worker reported Landlock enforced (untrusted: recorded, never obeyed).
    pub landlock: LandlockReport,
    /// `kill`, `log` or `skip`.
    pub seccomp_mode: String,
    /// Degraded mode was allowed and used: some required protection is missing.
    pub degraded: bool,
    pub warnings: Vec<String>,
    pub restarts: u32,
    /// The directories the broker handed over (state directory, preloaded key directories):
    /// the worker may hold descriptors beneath them.
    #[serde(default)]
    pub handed_dirs: Vec<std::path::PathBuf>,
    /// (st_dev, st_ino) of every descriptor the broker handed over (listener, TPM, ...): the
    /// worker may hold these whatever their type.
    #[serde(default)]
    pub handed_inodes: Vec<(u64, u64)>,
    /// The worker's private mount namespace as the broker set it up (`None`: the policy asks
    /// for none): checked by the audit against /proc/<pid>/ns/mnt and /proc/<pid>/mountinfo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount_namespace: Option<crate::mountns::MountNsRecord>,
}

/// `<run_dir>/<service>.status`, e.g. `/run/aziot/keyd.status`.
pub fn status_path(run_dir: &Path, service: &str) -> PathBuf {
    run_dir.join(format!("{service}.status"))
}

impl Status {
    /// Writes the file atomically (temp file in the same directory, fsync, rename), mode 0644.
    pub fn write(&self, path: &Path) -> Result<(), PolicyError> {
        let err = |source| PolicyError::Status { path: path.to_owned(), source };
        let json = serde_json::to_vec_pretty(self).map_err(|e| err(std::io::Error::other(e)))?;
        let tmp = path.with_extension(format!("status.tmp{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o644).open(&tmp).map_err(err)?;
        f.write_all(&json).and_then(|()| f.write_all(b"\n")).and_then(|()| f.sync_all()).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)?;
        if let Some(dir) = path.parent() {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    pub fn read(path: &Path) -> Result<Status, PolicyError> {
        let text = std::fs::read(path).map_err(|source| PolicyError::Status { path: path.to_owned(), source })?;
        serde_json::from_slice(&text).map_err(|source| PolicyError::StatusJson { path: path.to_owned(), source })
    }
}
