//! The worker's credentials: resolved in the broker before fork, applied in the child before
//! exec (async-signal-safe).

use std::ffi::CString;
use std::io;

use nix::unistd::{getgrouplist, Gid, User};

use crate::apply::{CapData, CapHeader};
use crate::model::Policy;
use crate::PolicyError;

/// Who the worker runs as; computed before fork so that the child only makes raw syscalls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub uid: u32,
    /// Primary group.
    pub gid: u32,
    /// Every group of the user (primary first, then /etc/group memberships).
    pub groups: Vec<u32>,
    /// The kernel's last capability number (/proc/sys/kernel/cap_last_cap).
    pub last_cap: u32,
}

/// Looks up the policy's user and groups. Errors when the user is missing, or when the user or
/// one of its groups is root (refuse to run a worker as root).
pub fn resolve_credentials(policy: &Policy) -> Result<Credentials, PolicyError> {
    let lookup = |source| PolicyError::Lookup { user: policy.user.clone(), source };
    let user = User::from_name(&policy.user).map_err(lookup)?.ok_or_else(|| PolicyError::UserMissing(policy.user.clone()))?;
    let root = |what: String| PolicyError::Root { service: policy.service.clone(), what };
    if user.uid.is_root() {
        return Err(root(format!("user {} has uid 0", policy.user)));
    }
    if user.gid == Gid::from_raw(0) {
        return Err(root(format!("user {} has gid 0", policy.user)));
    }
    let name = CString::new(policy.user.as_str()).map_err(|_| PolicyError::UserMissing(policy.user.clone()))?;
    let mut groups = vec![user.gid.as_raw()];
    for g in getgrouplist(&name, user.gid).map_err(lookup)? {
        if !groups.contains(&g.as_raw()) {
            groups.push(g.as_raw());
        }
    }
    if groups.contains(&0) {
        return Err(root(format!("user {} is in group 0", policy.user)));
    }
    Ok(Credentials { uid: user.uid.as_raw(), gid: user.gid.as_raw(), groups, last_cap: last_cap()? })
}

fn last_cap() -> Result<u32, PolicyError> {
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap") {
        if let Ok(n) = s.trim().parse() {
            return Ok(n);
        }
    }
    // No /proc: the last capability is the last one PR_CAPBSET_READ accepts.
    let mut last = None;
    for cap in 0..64 {
        // SAFETY: PR_CAPBSET_READ takes a capability number, no pointers.
        if unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) } < 0 {
            break;
        }
        last = Some(cap as u32);
    }
    last.ok_or_else(|| PolicyError::Process(io::Error::other("cannot determine the last capability")))
}

fn check(rc: libc::c_long) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Drops every privilege of the calling process for good, for a child between fork and exec
/// (`CommandExt::pre_exec`): only raw syscalls, no allocation, no locks.
///
/// Order: empty the capability bounding set, clear the ambient set, setgroups, setresgid,
/// setresuid (which empties the permitted and effective sets), empty the inheritable set,
/// PR_SET_PDEATHSIG(SIGKILL) (after the uid change, which would clear it; exits if the parent
/// is already gone), PR_SET_NO_NEW_PRIVS. Dumpable is left set (the audit reads /proc).
/// Then verifies: every uid and gid is the target's and none is 0, all capability sets empty.
///
/// # Safety
/// Call only in a single-threaded child after fork (e.g. from `pre_exec`): it changes the
/// credentials of the calling thread only, with raw syscalls that bypass glibc's
/// all-threads set*id machinery.
pub unsafe fn drop_privileges_in_child(creds: &Credentials) -> io::Result<()> {
    // Every call below is a raw syscall or prctl taking integers or pointers to live locals or
    // to `creds.groups`, which outlives the calls.
    // SAFETY: no arguments.
    let parent = unsafe { libc::getppid() };
    for cap in 0..=creds.last_cap {
        // SAFETY: integer arguments only.
        check(unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) }.into())?;
    }
    // SAFETY: integer arguments only.
    check(unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) }.into())?;
    // SAFETY: `groups` points at `groups.len()` gid_t values.
    check(unsafe { libc::syscall(libc::SYS_setgroups, creds.groups.len(), creds.groups.as_ptr()) })?;
    // SAFETY: integer arguments only.
    check(unsafe { libc::syscall(libc::SYS_setresgid, creds.gid, creds.gid, creds.gid) })?;
    // SAFETY: integer arguments only.
    check(unsafe { libc::syscall(libc::SYS_setresuid, creds.uid, creds.uid, creds.uid) })?;
    let mut header = CapHeader { version: 0x2008_0522, pid: 0 };
    let empty = [CapData::default(); 2];
    // SAFETY: capset(version 3) reads two cap_user_data structs from `empty`.
    check(unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut CapHeader, empty.as_ptr()) })?;
    // SAFETY: integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) }.into())?;
    // SAFETY: no arguments.
    if unsafe { libc::getppid() } != parent {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }.into())?;

    // Verify.
    let denied = io::Error::from_raw_os_error(libc::EPERM);
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: writes three uid_t into locals.
    check(unsafe { libc::getresuid(&mut r, &mut e, &mut s) }.into())?;
    if [r, e, s].iter().any(|&u| u == 0 || u != creds.uid) {
        return Err(denied);
    }
    // SAFETY: writes three gid_t into locals.
    check(unsafe { libc::getresgid(&mut r, &mut e, &mut s) }.into())?;
    if [r, e, s].iter().any(|&g| g == 0 || g != creds.gid) {
        return Err(denied);
    }
    let mut now = [CapData::default(); 2];
    // SAFETY: capget(version 3) writes two cap_user_data structs into `now`.
    check(unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut CapHeader, now.as_mut_ptr()) })?;
    if now.iter().any(|d| d.effective != 0 || d.permitted != 0 || d.inheritable != 0) {
        return Err(denied);
    }
    for cap in 0..=creds.last_cap {
        // SAFETY: integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            return Err(denied);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_root_and_missing_users() {
        let mut p = crate::builtin("keyd").unwrap();
        p.user = "root".into();
        let e = resolve_credentials(&p).unwrap_err();
        assert!(matches!(e, PolicyError::Root { .. }), "{e}");
        assert!(e.to_string().contains("refusing to run the keyd worker as root"), "{e}");
        p.user = "aziot-no-such-user".into();
        assert!(matches!(resolve_credentials(&p), Err(PolicyError::UserMissing(_))));
    }

    #[test]
    fn resolves_the_service_users_groups() {
        // The service users exist once the integration tests ran systemd-sysusers; here only
        // a user every system has is needed to check the shape.
        let mut p = crate::builtin("keyd").unwrap();
        p.user = "nobody".into();
        let c = resolve_credentials(&p).unwrap();
        assert_ne!(c.uid, 0);
        assert_eq!(c.groups[0], c.gid);
        assert!(c.last_cap >= 36, "last_cap {}", c.last_cap);
    }
}
