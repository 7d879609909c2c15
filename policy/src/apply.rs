//! In the worker: rlimits, Landlock, and the fail-closed check of what was enforced.
//! (seccomp is in `seccomp.rs`.)

use std::fs::OpenOptions;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::OpenOptionsExt;

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, LandlockStatus, NetPort, PathBeneath, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetStatus, ABI,
};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use serde::{Deserialize, Serialize};

use crate::model::{AccessSet, FsRight, Policy, RlimitResource, Scope};
use crate::seccomp::{ProcessState, SeccompMode, SeccompReport};
use crate::PolicyError;

/// The Landlock ABI whose rights the policy is written for (DESIGN §3: ABI 7 here).
const TARGET_ABI: ABI = ABI::V7;

/// What [`apply_landlock`] enforced, as the kernel answered. The broker records it in the
/// status file (Landlock cannot be read from outside the process).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LandlockReport {
    /// The Landlock ABI used (0: Landlock unavailable).
    pub abi: u32,
    /// `fully-enforced`, `partially-enforced` or `not-enforced`.
    pub status: String,
    /// Filesystem rights denied unless a rule grants them.
    pub fs_rights_handled: Vec<FsRight>,
    /// Rights the policy handles that this kernel cannot restrict.
    pub fs_rights_unsupported: Vec<FsRight>,
    /// TCP bind/connect restricted to `tcp_connect_ports` (ABI >= 4).
    pub tcp_restricted: bool,
    pub tcp_connect_ports: Vec<u16>,
    /// Scopes in force (ABI >= 6).
    pub scopes: Vec<Scope>,
    pub scopes_unsupported: Vec<Scope>,
    /// Number of rules added (fd, path, port).
    pub rules: u32,
    /// Path rules whose path does not exist (nothing granted for them).
    pub skipped: Vec<String>,
}

fn to_access_fs(right: FsRight) -> AccessFs {
    match right {
        FsRight::Execute => AccessFs::Execute,
        FsRight::WriteFile => AccessFs::WriteFile,
        FsRight::ReadFile => AccessFs::ReadFile,
        FsRight::ReadDir => AccessFs::ReadDir,
        FsRight::RemoveDir => AccessFs::RemoveDir,
        FsRight::RemoveFile => AccessFs::RemoveFile,
        FsRight::MakeChar => AccessFs::MakeChar,
        FsRight::MakeDir => AccessFs::MakeDir,
        FsRight::MakeReg => AccessFs::MakeReg,
        FsRight::MakeSock => AccessFs::MakeSock,
        FsRight::MakeFifo => AccessFs::MakeFifo,
        FsRight::MakeBlock => AccessFs::MakeBlock,
        FsRight::MakeSym => AccessFs::MakeSym,
        FsRight::Refer => AccessFs::Refer,
        FsRight::Truncate => AccessFs::Truncate,
        FsRight::IoctlDev => AccessFs::IoctlDev,
    }
}

fn access_flags(set: &AccessSet, files_only: bool) -> BitFlags<AccessFs> {
    let mut flags = BitFlags::empty();
    for r in &set.0 {
        if !files_only || r.applies_to_files() {
            flags |= to_access_fs(*r);
        }
    }
    flags
}

/// Lowers the policy's resource limits (never raises: the worker has no capability for it).
pub fn apply_rlimits(policy: &Policy) -> Result<(), PolicyError> {
    refuse_root(policy)?;
    for limit in &policy.rlimits {
        let resource = match limit.resource {
            RlimitResource::Core => Resource::RLIMIT_CORE,
            RlimitResource::Nofile => Resource::RLIMIT_NOFILE,
            RlimitResource::Fsize => Resource::RLIMIT_FSIZE,
            RlimitResource::Memlock => Resource::RLIMIT_MEMLOCK,
            RlimitResource::Stack => Resource::RLIMIT_STACK,
        };
        let err = |source| PolicyError::Rlimit { resource: limit.resource.name().into(), source };
        let (_, cur_hard) = getrlimit(resource).map_err(err)?;
        let hard = limit.hard.min(cur_hard);
        let soft = limit.soft.min(hard);
        setrlimit(resource, soft, hard).map_err(err)?;
    }
    Ok(())
}

/// Restricts the calling (only) thread with the policy's Landlock rules, best effort, and reports
/// what the kernel enforced. `dirs`: the handed-over directory descriptors by name.
pub fn apply_landlock(policy: &Policy, dirs: &[(&str, BorrowedFd<'_>)]) -> Result<LandlockReport, PolicyError> {
    refuse_root(policy)?;
    let threads = thread_count().map_err(PolicyError::Process)?;
    if threads != 1 {
        return Err(PolicyError::Threads { what: "Landlock (it restricts the calling thread only)", threads });
    }
    let ll = &policy.landlock;
    let mut ruleset = Ruleset::default().set_compatibility(CompatLevel::BestEffort);
    ruleset = ruleset.handle_access(AccessFs::from_all(TARGET_ABI))?;
    if ll.restrict_tcp {
        ruleset = ruleset.handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)?;
    }
    let mut scopes = BitFlags::<landlock::Scope>::empty();
    for s in &ll.scopes {
        scopes |= match s {
            Scope::AbstractUnixSocket => landlock::Scope::AbstractUnixSocket,
            Scope::Signal => landlock::Scope::Signal,
        };
    }
    if !scopes.is_empty() {
        ruleset = ruleset.scope(scopes)?;
    }
    let mut created = ruleset.create()?;
    let mut rules = 0u32;
    for rule in &ll.fd_rules {
        // A rule applies to every handed-over directory of its descriptor name (a `multiple`
        // descriptor may come several times); an `optional` descriptor may be absent.
        let mut matched = false;
        for (_, fd) in dirs.iter().filter(|(name, _)| *name == rule.descriptor) {
            created = created.add_rule(PathBeneath::new(*fd, access_flags(&rule.access, false)))?;
            rules += 1;
            matched = true;
        }
        let optional = policy.descriptors.iter().any(|d| d.name == rule.descriptor && d.optional);
        if !matched && !optional {
            return Err(PolicyError::MissingDescriptor(rule.descriptor.clone()));
        }
    }
    let mut skipped = Vec::new();
    for rule in &ll.path_rules {
        let file = match OpenOptions::new().read(true).custom_flags(libc::O_PATH | libc::O_CLOEXEC).open(&rule.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                skipped.push(format!("{} ({}): does not exist, nothing granted", rule.path.display(), rule.origin));
                continue;
            }
            Err(source) => return Err(PolicyError::LandlockPath { path: rule.path.clone(), source }),
        };
        let is_dir = file
            .metadata()
            .map_err(|source| PolicyError::LandlockPath { path: rule.path.clone(), source })?
            .is_dir();
        created = created.add_rule(PathBeneath::new(file, access_flags(&rule.access, !is_dir)))?;
        rules += 1;
    }
    if ll.restrict_tcp {
        for p in &ll.tcp_connect {
            created = created.add_rule(NetPort::new(p.port, AccessNet::ConnectTcp))?;
            rules += 1;
        }
    }
    let status = created.restrict_self()?;

    let abi = match status.landlock {
        LandlockStatus::Available { effective_abi, .. } => effective_abi,
        _ => ABI::Unsupported,
    };
    let enforced = status.ruleset != RulesetStatus::NotEnforced;
    let abi_num = if enforced { abi as u32 } else { 0 };
    let supported = AccessFs::from_all(abi);
    let (mut handled, mut unsupported) = (Vec::new(), Vec::new());
    for right in FsRight::ALL {
        if enforced && supported.contains(to_access_fs(right)) {
            handled.push(right);
        } else {
            unsupported.push(right);
        }
    }
    let tcp_restricted = ll.restrict_tcp && enforced && abi_num >= 4;
    let scopes_supported = enforced && abi_num >= 6;
    let (scopes_on, scopes_off) = if scopes_supported { (ll.scopes.clone(), vec![]) } else { (vec![], ll.scopes.clone()) };
    Ok(LandlockReport {
        abi: abi_num,
        status: match status.ruleset {
            RulesetStatus::FullyEnforced => "fully-enforced",
            RulesetStatus::PartiallyEnforced => "partially-enforced",
            RulesetStatus::NotEnforced => "not-enforced",
        }
        .into(),
        fs_rights_handled: handled,
        fs_rights_unsupported: unsupported,
        tcp_restricted,
        tcp_connect_ports: if tcp_restricted { ll.tcp_connect.iter().map(|p| p.port).collect() } else { vec![] },
        scopes: scopes_on,
        scopes_unsupported: scopes_off,
        rules,
        skipped,
    })
}

/// Requirements of the policy that `landlock` and `mode` do not meet (each a sentence), and
/// notes about protections that are missing but not required.
pub(crate) fn unmet(policy: &Policy, landlock: &LandlockReport, mode: SeccompMode) -> (Vec<String>, Vec<String>) {
    let (mut unmet, mut notes) = (Vec::new(), Vec::new());
    let mut check = |required: bool, missing: Option<String>| {
        if let Some(m) = missing {
            if required {
                unmet.push(m);
            } else {
                notes.push(format!("{m} (not required by the {} policy)", policy.service));
            }
        }
    };
    let fs_missing = if landlock.abi == 0 || landlock.status == "not-enforced" {
        Some("Landlock is not enforced (kernel without Landlock)".to_owned())
    } else if !landlock.fs_rights_unsupported.is_empty() {
        let names: Vec<&str> = landlock.fs_rights_unsupported.iter().map(|r| r.name()).collect();
        Some(format!("Landlock ABI {} cannot restrict {}", landlock.abi, names.join(", ")))
    } else {
        None
    };
    check(policy.require.landlock_fs, fs_missing);
    let tcp_missing = (policy.landlock.restrict_tcp && !landlock.tcp_restricted)
        .then(|| format!("Landlock TCP port rules are not enforced (ABI {} < 4)", landlock.abi));
    check(policy.require.landlock_tcp, tcp_missing);
    let scopes_missing = (!landlock.scopes_unsupported.is_empty()).then(|| {
        let names: Vec<&str> = landlock.scopes_unsupported.iter().map(|s| s.name()).collect();
        format!("Landlock scopes {} are not enforced (ABI {} < 6)", names.join(", "), landlock.abi)
    });
    check(policy.require.landlock_scopes, scopes_missing);
    let seccomp_missing = (mode != SeccompMode::Kill).then(|| format!("seccomp runs in {mode} mode, not kill"));
    check(policy.require.seccomp, seccomp_missing);
    (unmet, notes)
}

/// Fails closed: refuses a worker that runs as root or kept any capability (never degradable),
/// or lacks a protection the policy requires, unless `allow_degraded` (then each missing
/// protection is a `DEGRADED:` warning, to be logged at every start). Returns the warnings.
pub fn check_required(
    policy: &Policy,
    landlock: &LandlockReport,
    seccomp: &SeccompReport,
    allow_degraded: bool,
) -> Result<Vec<String>, PolicyError> {
    let p = &seccomp.process;
    if p.uids.contains(&0) || p.gids.contains(&0) {
        return Err(PolicyError::Root {
            service: policy.service.clone(),
            what: format!("uids {:?}, gids {:?}", p.uids, p.gids),
        });
    }
    let caps = [
        ("inheritable", p.cap_inheritable),
        ("permitted", p.cap_permitted),
        ("effective", p.cap_effective),
        ("bounding", p.cap_bounding),
        ("ambient", p.cap_ambient),
    ];
    for (set, value) in caps {
        if value != 0 {
            return Err(PolicyError::Privileges(format!("capability set {set} is {value:#x}, not empty")));
        }
    }
    if !p.no_new_privs {
        return Err(PolicyError::Privileges("no_new_privs is not set".into()));
    }
    let (unmet, notes) = unmet(policy, landlock, seccomp.mode);
    let mut warnings: Vec<String> = landlock.skipped.iter().map(|s| format!("Landlock path rule skipped: {s}")).collect();
    warnings.extend(notes);
    if !unmet.is_empty() {
        if !allow_degraded {
            return Err(PolicyError::NotEnforced(unmet));
        }
        warnings.extend(unmet.into_iter().map(|u| format!("{}{u}", crate::DEGRADED_PREFIX)));
    }
    Ok(warnings)
}

fn refuse_root(policy: &Policy) -> Result<(), PolicyError> {
    let (uids, gids) = ids().map_err(PolicyError::Process)?;
    if uids.contains(&0) || gids.contains(&0) {
        return Err(PolicyError::Root { service: policy.service.clone(), what: format!("uids {uids:?}, gids {gids:?}") });
    }
    Ok(())
}

fn ids() -> std::io::Result<([u32; 3], [u32; 3])> {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: getresuid writes three uid_t through valid pointers to locals.
    if unsafe { libc::getresuid(&mut r, &mut e, &mut s) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (mut rg, mut eg, mut sg) = (0, 0, 0);
    // SAFETY: as above, for gid_t.
    if unsafe { libc::getresgid(&mut rg, &mut eg, &mut sg) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(([r, e, s], [rg, eg, sg]))
}

fn thread_count() -> std::io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no Threads: line in /proc/self/status"))
}

pub(crate) fn set_no_new_privs() -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1) takes no pointers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reads the calling thread's ids, five capability sets and no_new_privs through syscalls
/// (no /proc: Landlock is already in force when seccomp is applied).
pub(crate) fn process_state() -> std::io::Result<ProcessState> {
    let (uids, gids) = ids()?;
    let mut header = CapHeader { version: 0x2008_0522, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget(version 3) writes two cap_user_data structs into `data`, which has room
    // for exactly two; `header` is a valid header.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut _, data.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let join = |lo: u32, hi: u32| (u64::from(hi) << 32) | u64::from(lo);
    let mut bounding = 0u64;
    let mut ambient = 0u64;
    for cap in 0..64u64 {
        // SAFETY: PR_CAPBSET_READ takes a capability number, no pointers.
        let b = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) };
        if b < 0 {
            break; // EINVAL: past the kernel's last capability
        }
        if b == 1 {
            bounding |= 1 << cap;
        }
        // SAFETY: PR_CAP_AMBIENT_IS_SET takes a capability number, no pointers.
        let a = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_IS_SET, cap, 0, 0) };
        if a == 1 {
            ambient |= 1 << cap;
        }
    }
    // SAFETY: PR_GET_NO_NEW_PRIVS takes no pointers.
    let nnp = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
    Ok(ProcessState {
        uids,
        gids,
        cap_inheritable: join(data[0].inheritable, data[1].inheritable),
        cap_permitted: join(data[0].permitted, data[1].permitted),
        cap_effective: join(data[0].effective, data[1].effective),
        cap_bounding: bounding,
        cap_ambient: ambient,
        no_new_privs: nnp == 1,
    })
}

/// `struct __user_cap_header_struct` (linux/capability.h).
#[repr(C)]
pub(crate) struct CapHeader {
    pub(crate) version: u32,
    pub(crate) pid: i32,
}

/// `struct __user_cap_data_struct` (linux/capability.h).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct CapData {
    pub(crate) effective: u32,
    pub(crate) permitted: u32,
    pub(crate) inheritable: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(policy: &Policy) -> LandlockReport {
        LandlockReport {
            abi: 7,
            status: "fully-enforced".into(),
            fs_rights_handled: FsRight::ALL.to_vec(),
            fs_rights_unsupported: vec![],
            tcp_restricted: true,
            tcp_connect_ports: policy.landlock.tcp_connect.iter().map(|p| p.port).collect(),
            scopes: policy.landlock.scopes.clone(),
            scopes_unsupported: vec![],
            rules: 1,
            skipped: vec![],
        }
    }

    fn seccomp(mode: SeccompMode) -> SeccompReport {
        SeccompReport {
            mode,
            filters: 2,
            digest: String::new(),
            arch: "x86_64".into(),
            process: ProcessState { uids: [995; 3], gids: [995; 3], no_new_privs: true, ..ProcessState::default() },
        }
    }

    #[test]
    fn everything_enforced_passes_without_warnings() {
        let p = crate::builtin("certd").unwrap();
        assert_eq!(check_required(&p, &full(&p), &seccomp(SeccompMode::Kill), false).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn missing_required_protections_fail_closed_unless_degraded_is_allowed() {
        let p = crate::builtin("certd").unwrap();
        let mut ll = full(&p);
        ll.abi = 3;
        ll.fs_rights_unsupported = vec![FsRight::IoctlDev];
        ll.tcp_restricted = false;
        ll.scopes_unsupported = ll.scopes.drain(..).collect();
        let e = check_required(&p, &ll, &seccomp(SeccompMode::Log), false).unwrap_err().to_string();
        for needle in ["cannot restrict ioctl-dev", "TCP port rules", "scopes abstract-unix-socket, signal", "log mode"] {
            assert!(e.contains(needle), "{needle}: {e}");
        }
        let w = check_required(&p, &ll, &seccomp(SeccompMode::Log), true).unwrap();
        assert_eq!(w.iter().filter(|w| w.starts_with("DEGRADED: ")).count(), 4, "{w:?}");
    }

    #[test]
    fn protections_not_required_are_notes_not_failures() {
        // keyd does not require Landlock TCP or scopes (seccomp has no socket() and no kill).
        let p = crate::builtin("keyd").unwrap();
        let mut ll = full(&p);
        ll.abi = 5;
        ll.tcp_restricted = true;
        ll.scopes_unsupported = ll.scopes.drain(..).collect();
        let w = check_required(&p, &ll, &seccomp(SeccompMode::Kill), false).unwrap();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("not required by the keyd policy"), "{w:?}");
        ll.status = "not-enforced".into();
        ll.abi = 0;
        let e = check_required(&p, &ll, &seccomp(SeccompMode::Kill), false).unwrap_err().to_string();
        assert!(e.contains("Landlock is not enforced"), "{e}");
    }

    #[test]
    fn root_and_capabilities_are_never_degradable() {
        let p = crate::builtin("keyd").unwrap();
        let ll = full(&p);
        let mut sc = seccomp(SeccompMode::Kill);
        sc.process.uids = [995, 0, 995];
        assert!(matches!(check_required(&p, &ll, &sc, true), Err(PolicyError::Root { .. })));
        let mut sc = seccomp(SeccompMode::Kill);
        sc.process.cap_bounding = 1 << 21;
        let e = check_required(&p, &ll, &sc, true).unwrap_err().to_string();
        assert!(e.contains("bounding is 0x200000"), "{e}");
        let mut sc = seccomp(SeccompMode::Kill);
        sc.process.no_new_privs = false;
        assert!(matches!(check_required(&p, &ll, &sc, true), Err(PolicyError::Privileges(_))));
    }
}
