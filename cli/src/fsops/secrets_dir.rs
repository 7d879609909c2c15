//! The directory of the inline symmetric key, `/var/secrets/aziot/keyd` (spec aziotctl.md §2.4,
//! with its recommendations):
//!
//! * missing parents are created `root:root 0755`;
//! * the leaf is created if missing, and (every run) set to `aziotks:<primary group> 0700`;
//! * existing ancestors are left alone unless aziotks cannot traverse them (supplementary groups
//!   count); then only `o+x` is added, with a warning. `o+r` is never added.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use crate::users::ServiceUser;
use crate::warnings::Warnings;

/// The key directory, relative to the file-system root.
const KEY_DIR: [&str; 4] = ["var", "secrets", "aziot", "keyd"];

#[derive(Debug, thiserror::Error)]
pub enum SecretsDirError {
    #[error("could not create {} directory", .0.display())]
    Create(PathBuf, #[source] io::Error),
    #[error("could not set ownership on {} directory", .0.display())]
    Chown(PathBuf, #[source] io::Error),
    #[error("could not set permissions on {} directory", .0.display())]
    ChmodLeaf(PathBuf, #[source] io::Error),
    #[error("could not stat {}", .0.display())]
    Stat(PathBuf, #[source] io::Error),
    #[error("could not set permissions on {}", .0.display())]
    Chmod(PathBuf, #[source] io::Error),
}

/// One change to the file system.
pub enum DirAction {
    /// Create a missing parent, `root:root 0755`.
    CreateParent(PathBuf),
    /// Create the key directory.
    CreateLeaf(PathBuf),
    /// Set the key directory to `aziotks:<primary group> 0700`.
    SecureLeaf(PathBuf),
    /// Add `o+x` to an existing ancestor that aziotks cannot traverse.
    AddTraverse { path: PathBuf, mode: u32 },
}

impl fmt::Display for DirAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirAction::CreateParent(p) => {
                write!(f, "create directory {} (root:root 0755)", p.display())
            }
            DirAction::CreateLeaf(p) => write!(f, "create directory {}", p.display()),
            DirAction::SecureLeaf(p) => {
                write!(f, "set directory {} to aziotks, mode 0700", p.display())
            }
            DirAction::AddTraverse { path, mode } => write!(
                f,
                "add o+x to {} (mode {:04o} -> {:04o}) so that aziotks can reach its key",
                path.display(),
                mode & 0o7777,
                (mode | 0o001) & 0o7777
            ),
        }
    }
}

/// The path of the key directory under `root`.
pub fn key_dir(root: &Path) -> PathBuf {
    KEY_DIR.iter().fold(root.to_owned(), |p, c| p.join(c))
}

/// Works out what has to change, without changing anything.
pub fn plan(root: &Path, keyd: &ServiceUser) -> Result<Vec<DirAction>, SecretsDirError> {
    let mut actions = Vec::new();
    let mut path = root.to_owned();
    // Ancestors from `root` down to the key directory's parent.
    let mut ancestors = vec![root.to_owned()];
    for component in &KEY_DIR[..KEY_DIR.len() - 1] {
        path = path.join(component);
        ancestors.push(path.clone());
    }
    for dir in &ancestors {
        match fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => {
                if !can_traverse(&meta, keyd) {
                    actions.push(DirAction::AddTraverse {
                        path: dir.clone(),
                        mode: meta.mode(),
                    });
                }
            }
            Ok(_) => {
                return Err(SecretsDirError::Create(
                    dir.clone(),
                    io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "it exists and is not a directory",
                    ),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                actions.push(DirAction::CreateParent(dir.clone()));
            }
            Err(e) => return Err(SecretsDirError::Stat(dir.clone(), e)),
        }
    }
    let leaf = key_dir(root);
    match fs::metadata(&leaf) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(SecretsDirError::Create(
                leaf,
                io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "it exists and is not a directory",
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            actions.push(DirAction::CreateLeaf(leaf.clone()));
        }
        Err(e) => return Err(SecretsDirError::Stat(leaf, e)),
    }
    actions.push(DirAction::SecureLeaf(leaf));
    Ok(actions)
}

/// Whether `user` may search a directory (the execute bit that applies to it).
fn can_traverse(meta: &fs::Metadata, user: &ServiceUser) -> bool {
    let mode = meta.mode();
    if meta.uid() == user.uid {
        mode & 0o100 != 0
    } else if user.in_group(meta.gid()) {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

/// Carries out a plan from [`plan`].
pub fn execute(
    actions: &[DirAction],
    keyd: &ServiceUser,
    w: &mut Warnings,
) -> Result<(), SecretsDirError> {
    for action in actions {
        match action {
            DirAction::CreateParent(p) => {
                create_dir(p, 0o755)?;
                std::os::unix::fs::chown(p, Some(0), Some(0))
                    .map_err(|e| SecretsDirError::Chown(p.clone(), e))?;
                fs::set_permissions(p, fs::Permissions::from_mode(0o755))
                    .map_err(|e| SecretsDirError::ChmodLeaf(p.clone(), e))?;
            }
            DirAction::CreateLeaf(p) => create_dir(p, 0o700)?,
            DirAction::SecureLeaf(p) => {
                std::os::unix::fs::chown(p, Some(keyd.uid), Some(keyd.gid))
                    .map_err(|e| SecretsDirError::Chown(p.clone(), e))?;
                fs::set_permissions(p, fs::Permissions::from_mode(0o700))
                    .map_err(|e| SecretsDirError::ChmodLeaf(p.clone(), e))?;
            }
            DirAction::AddTraverse { path, mode } => {
                fs::set_permissions(path, fs::Permissions::from_mode((mode | 0o001) & 0o7777))
                    .map_err(|e| SecretsDirError::Chmod(path.clone(), e))?;
                w.push(format!(
                    "{}: added o+x (mode {:04o} -> {:04o}) so that aziotks can reach \
                     /var/secrets/aziot/keyd",
                    path.display(),
                    mode & 0o7777,
                    (mode | 0o001) & 0o7777
                ));
            }
        }
    }
    Ok(())
}

fn create_dir(path: &Path, mode: u32) -> Result<(), SecretsDirError> {
    match fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => Ok(()),
        // Created concurrently: the later steps still set owner and mode.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        Err(e) => Err(SecretsDirError::Create(path.to_owned(), e)),
    }
}
