//! The machine hostname that identityd gets when the super-config does not set one.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("could not get machine hostname")]
pub struct HostnameError(#[source] Cause);

#[derive(Debug, thiserror::Error)]
enum Cause {
    #[error("could not read {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{} holds no hostname", .0.display())]
    Empty(PathBuf),
    #[error("gethostname() failed")]
    System(#[source] nix::Error),
    #[error("the hostname is not valid UTF-8")]
    NotUtf8,
}

/// `gethostname()`, or with `--root DIR` the first line of `DIR/etc/hostname`.
pub fn machine_hostname(root: Option<&Path>) -> Result<String, HostnameError> {
    match root {
        Some(root) => {
            let path = root.join("etc/hostname");
            let text = std::fs::read_to_string(&path)
                .map_err(|e| HostnameError(Cause::Read(path.clone(), e)))?;
            text.lines()
                .map(str::trim)
                .find(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned)
                .ok_or(HostnameError(Cause::Empty(path)))
        }
        None => nix::unistd::gethostname()
            .map_err(|e| HostnameError(Cause::System(e)))?
            .into_string()
            .map_err(|_| HostnameError(Cause::NotUtf8)),
    }
}
