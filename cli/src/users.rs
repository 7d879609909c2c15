//! The four service users, looked up in the system user database or, with `--root DIR`, in
//! `DIR/etc/passwd` and `DIR/etc/group` (the image being configured, not the host).

use std::path::{Path, PathBuf};

use aziot_policy::services::get;

/// The build-time user names (spec aziotctl.md, build-time constants), from the table of
/// services.
pub const AZIOTKS: &str = get("keyd").user;
pub const AZIOTCS: &str = get("certd").user;
pub const AZIOTID: &str = get("identityd").user;
pub const AZIOTTPM: &str = get("tpmd").user;

#[derive(Clone, Debug)]
pub struct ServiceUser {
    pub name: &'static str,
    pub uid: u32,
    /// The primary group.
    pub gid: u32,
    /// Every group the user is in, primary included.
    pub groups: Vec<u32>,
}

impl ServiceUser {
    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

#[derive(Debug)]
pub struct ServiceUsers {
    pub keyd: ServiceUser,
    pub certd: ServiceUser,
    pub identityd: ServiceUser,
    /// Looked up so that a missing `aziottpm` fails `config apply` as the original does (spec
    /// order KS, CS, IS, TPMS); nothing is owned by it since the configs are root's.
    #[allow(dead_code)]
    pub tpmd: ServiceUser,
}

#[derive(Debug, thiserror::Error)]
#[error("could not query {name} user information")]
pub struct UserError {
    name: &'static str,
    #[source]
    cause: LookupError,
}

#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("could not read {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    #[error("there is no such user in {}", .0.display())]
    NotInFile(PathBuf),
    #[error("{}: the entry is malformed", .0.display())]
    Malformed(PathBuf),
    #[error("there is no such user")]
    NoSuchUser,
    #[error("the user database lookup failed")]
    System(#[source] nix::Error),
}

/// Looks up the four users in the order KS, CS, IS, TPMS.
pub fn resolve(root: Option<&Path>) -> Result<ServiceUsers, UserError> {
    // An unreadable file is reported against the first user looked up.
    let files = match root {
        Some(root) => Some(Files::read(root).map_err(|cause| UserError {
            name: AZIOTKS,
            cause,
        })?),
        None => None,
    };
    let lookup = |name: &'static str| -> Result<ServiceUser, UserError> {
        let result = match &files {
            Some(files) => files.lookup(name),
            None => system_lookup(name),
        };
        result.map_err(|cause| UserError { name, cause })
    };
    Ok(ServiceUsers {
        keyd: lookup(AZIOTKS)?,
        certd: lookup(AZIOTCS)?,
        identityd: lookup(AZIOTID)?,
        tpmd: lookup(AZIOTTPM)?,
    })
}

fn system_lookup(name: &'static str) -> Result<ServiceUser, LookupError> {
    let user = nix::unistd::User::from_name(name)
        .map_err(LookupError::System)?
        .ok_or(LookupError::NoSuchUser)?;
    let cname = std::ffi::CString::new(name).map_err(|_| LookupError::NoSuchUser)?;
    let groups = nix::unistd::getgrouplist(&cname, user.gid)
        .map_err(LookupError::System)?
        .into_iter()
        .map(|g| g.as_raw())
        .collect();
    Ok(ServiceUser {
        name,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        groups,
    })
}

/// `etc/passwd` and `etc/group` of an image.
struct Files {
    passwd_path: PathBuf,
    passwd: String,
    group: String,
}

impl Files {
    fn read(root: &Path) -> Result<Files, LookupError> {
        let read = |rel: &str| {
            let path = root.join(rel);
            std::fs::read_to_string(&path)
                .map(|text| (path.clone(), text))
                .map_err(|e| LookupError::Read(path, e))
        };
        let (passwd_path, passwd) = read("etc/passwd")?;
        let (_, group) = read("etc/group")?;
        Ok(Files {
            passwd_path,
            passwd,
            group,
        })
    }

    fn lookup(&self, name: &'static str) -> Result<ServiceUser, LookupError> {
        let fields = entries(&self.passwd)
            .find(|f| f[0] == name)
            .ok_or_else(|| LookupError::NotInFile(self.passwd_path.clone()))?;
        let malformed = || LookupError::Malformed(self.passwd_path.clone());
        let uid = fields
            .get(2)
            .and_then(|s| s.parse().ok())
            .ok_or_else(malformed)?;
        let gid = fields
            .get(3)
            .and_then(|s| s.parse().ok())
            .ok_or_else(malformed)?;
        let mut groups = vec![gid];
        for group in entries(&self.group) {
            let Some(group_gid) = group.get(2).and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let is_member = group
                .get(3)
                .is_some_and(|members| members.split(',').any(|m| m.trim() == name));
            if is_member && !groups.contains(&group_gid) {
                groups.push(group_gid);
            }
        }
        Ok(ServiceUser {
            name,
            uid,
            gid,
            groups,
        })
    }
}

/// The `:`-separated fields of each entry of a passwd/group file.
fn entries(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(str::trim_end)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_passwd_and_group() {
        let files = Files {
            passwd_path: "p".into(),
            passwd:
                "# c\nroot:x:0:0::/root:/bin/sh\naziotcs:x:5555:5550::/:/sbin/nologin\nbad:x:y:1\n"
                    .into(),
            group: "aziotks:x:5554:aziotcs\naziotcs:x:5550:\nother:x:7:a,aziotcs\n".into(),
        };
        let u = files.lookup("aziotcs").unwrap();
        assert_eq!((u.uid, u.gid), (5555, 5550));
        assert_eq!(u.groups, [5550, 5554, 7]);
        assert!(matches!(
            files.lookup("aziotid"),
            Err(LookupError::NotInFile(_))
        ));
    }
}
