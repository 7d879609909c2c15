//! All-or-nothing replacement of a set of files.
//!
//! 1. Stage: every new file is written to a temporary file in its target's directory, created
//!    with `O_CREAT|O_EXCL` and mode 0600, then given its final owner and mode *before* any
//!    content is written, then fsynced. A failure here removes the temporaries; nothing else has
//!    changed.
//! 2. Back up: every existing target (and every file to remove) gets a hard link next to it, so
//!    the previous version, inode, owner and mode included, can be put back.
//! 3. Commit: rename each temporary over its target, remove the files to remove, fsync each
//!    directory. A failure here renames the backups back (or removes targets that did not exist),
//!    so every previous file is byte-identical again.
//! 4. Remove the backups.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use zeroize::Zeroizing;

use crate::warnings::Warnings;

/// A file to write.
pub struct NewFile {
    pub path: PathBuf,
    pub contents: Zeroizing<Vec<u8>>,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("could not create {}", .path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not set ownership on {}", .path.display())]
    Chown {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not set permissions on {}", .path.display())]
    Chmod {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not back up {} before replacing it", .path.display())]
    Backup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not remove {}", .path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("could not sync directory {}", .path.display())]
    SyncDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "restoring the previous files failed; restore them by hand: {}",
        .failures.join("; ")
    )]
    RollbackFailed {
        failures: Vec<String>,
        #[source]
        cause: Box<WriteError>,
    },
}

/// Replaces every file in `files` and removes every file in `removals`, or changes nothing.
pub fn replace_all(
    files: &[NewFile],
    removals: &[PathBuf],
    w: &mut Warnings,
) -> Result<(), WriteError> {
    // 1. Stage.
    let mut staged = Vec::with_capacity(files.len());
    for file in files {
        match stage(file) {
            Ok(tmp) => staged.push(tmp),
            Err(e) => {
                remove_quietly(&staged);
                return Err(e);
            }
        }
    }

    // 2. Back up.
    let targets: Vec<&Path> = files
        .iter()
        .map(|f| f.path.as_path())
        .chain(removals.iter().map(PathBuf::as_path))
        .collect();
    let mut backups = Vec::with_capacity(targets.len());
    for target in &targets {
        match backup(target) {
            Ok(b) => backups.push(b),
            Err(e) => {
                remove_quietly(&staged);
                remove_quietly(backups.iter().flatten());
                return Err(e);
            }
        }
    }

    // 3. Commit.
    let mut done = 0;
    let mut commit = || -> Result<(), WriteError> {
        for (file, tmp) in files.iter().zip(&staged) {
            fs::rename(tmp, &file.path).map_err(|source| WriteError::Create {
                path: file.path.clone(),
                source,
            })?;
            done += 1;
        }
        for path in removals {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(WriteError::Remove {
                        path: path.clone(),
                        source,
                    })
                }
            }
            done += 1;
        }
        sync_dirs(&targets)
    };
    if let Err(e) = commit() {
        remove_quietly(&staged[done.min(staged.len())..]);
        // Backups of targets that were changed are renamed back; one that could not be is
        // kept, since it may be the only copy. The others are spare links to unchanged files.
        let failures = roll_back(&targets[..done], &backups[..done]);
        let _ = sync_dirs(&targets);
        remove_quietly(backups[done..].iter().flatten());
        if failures.is_empty() {
            return Err(e);
        }
        return Err(WriteError::RollbackFailed {
            failures,
            cause: Box::new(e),
        });
    }

    // 4. Clean up.
    for b in backups.iter().flatten() {
        if let Err(e) = fs::remove_file(b) {
            w.push(format!(
                "could not remove the backup {} of the previous file: {e}; remove it by hand",
                b.display()
            ));
        }
    }
    Ok(())
}

fn split(path: &Path) -> io::Result<(&Path, String)> {
    let invalid = || io::Error::new(io::ErrorKind::InvalidInput, "not a file path");
    let dir = path.parent().ok_or_else(invalid)?;
    let name = path.file_name().ok_or_else(invalid)?.to_string_lossy();
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    Ok((dir, name.into_owned()))
}

/// A fresh, unique path beside `path`, created by `create` (which must fail with
/// `AlreadyExists` when the path is taken).
fn unique_sibling<T>(
    path: &Path,
    suffix: &str,
    mut create: impl FnMut(&Path) -> io::Result<T>,
) -> io::Result<(PathBuf, T)> {
    let (dir, name) = split(path)?;
    let pid = std::process::id();
    let mut n = 0u32;
    loop {
        let candidate = dir.join(format!(".{name}.aziotctl-{pid}-{n}.{suffix}"));
        match create(&candidate) {
            Ok(t) => return Ok((candidate, t)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) => return Err(e),
        }
    }
}

fn stage(file: &NewFile) -> Result<PathBuf, WriteError> {
    let create_err = |source| WriteError::Create {
        path: file.path.clone(),
        source,
    };
    let (tmp, mut handle) = unique_sibling(&file.path, "tmp", |p| {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(p)
    })
    .map_err(create_err)?;

    let mut fill = || -> Result<(), WriteError> {
        std::os::unix::fs::fchown(&handle, Some(file.uid), Some(file.gid)).map_err(|source| {
            WriteError::Chown {
                path: file.path.clone(),
                source,
            }
        })?;
        handle
            .set_permissions(Permissions::from_mode(file.mode))
            .map_err(|source| WriteError::Chmod {
                path: file.path.clone(),
                source,
            })?;
        handle.write_all(&file.contents).map_err(create_err)?;
        handle.sync_all().map_err(create_err)
    };
    match fill() {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Hard-links an existing non-directory `target` to a backup name. Directories get no backup:
/// renaming a file over one fails, and that failure rolls the transaction back.
fn backup(target: &Path) -> Result<Option<PathBuf>, WriteError> {
    match fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => return Ok(None),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(WriteError::Backup {
                path: target.to_owned(),
                source,
            })
        }
    }
    unique_sibling(target, "bak", |p| fs::hard_link(target, p))
        .map(|(path, ())| Some(path))
        .map_err(|source| WriteError::Backup {
            path: target.to_owned(),
            source,
        })
}

/// Puts every changed target back as it was; returns what could not be restored.
fn roll_back(targets: &[&Path], backups: &[Option<PathBuf>]) -> Vec<String> {
    let mut failures = Vec::new();
    for (target, backup) in targets.iter().zip(backups) {
        let result = match backup {
            Some(b) => fs::rename(b, target),
            None => match fs::remove_file(target) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
        };
        if let Err(e) = result {
            failures.push(match backup {
                Some(b) => format!("{} from {}: {e}", target.display(), b.display()),
                None => format!("remove {}: {e}", target.display()),
            });
        }
    }
    failures
}

fn sync_dirs(targets: &[&Path]) -> Result<(), WriteError> {
    let mut dirs: Vec<&Path> = targets.iter().filter_map(|t| t.parent()).collect();
    dirs.sort();
    dirs.dedup();
    for dir in dirs {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| WriteError::SyncDir {
                path: dir.to_owned(),
                source,
            })?;
    }
    Ok(())
}

fn remove_quietly<'a>(paths: impl IntoIterator<Item = &'a PathBuf>) {
    for p in paths {
        let _ = fs::remove_file(p);
    }
}
