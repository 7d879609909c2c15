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

/// The highest Landlock ABI the `landlock` crate knows: every right up to it is requested, best
/// effort (a kernel enforces the rights of its own ABI; the report says which).
const REQUESTED_ABI: ABI = ABI::V10;
/// The ABI the policy's requirements are written for (DESIGN §3): `[require] landlock_fs` means
/// the filesystem rights of this ABI. Rights of later ABIs are recorded, never required.
pub(crate) const BASELINE_ABI: u32 = 7;

/// What [`apply_landlock`] enforced, as the kernel answered. The broker records it in the
/// status file (Landlock cannot be read from outside the process).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LandlockReport {
    /// The Landlock ABI used (0: Landlock unavailable).
    pub abi: u32,
    /// The ABI whose rights were requested (the highest the `landlock` crate knows).
    #[serde(default)]
    pub requested_abi: u32,
    /// `fully-enforced`, `partially-enforced` or `not-enforced`.
    pub status: String,
    /// Every right the crate knows, requested or not, and whether this kernel enforces it.
    #[serde(default)]
    pub rights: Vec<RightReport>,
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

impl LandlockReport {
    /// The rights that were requested but that this kernel does not enforce.
    pub fn not_enforced(&self) -> impl Iterator<Item = &RightReport> {
        self.rights.iter().filter(|r| r.requested && !r.enforced)
    }
}

/// Which Landlock mechanism a right belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RightKind {
    /// A filesystem access right (`handled_access_fs`).
    Fs,
    /// A network access right (`handled_access_net`).
    Net,
    /// An IPC scope (`scoped`).
    Scope,
}

impl RightKind {
    pub fn name(self) -> &'static str {
        match self {
            RightKind::Fs => "fs",
            RightKind::Net => "net",
            RightKind::Scope => "scope",
        }
    }
}

/// One Landlock right: whether the policy asked for it and whether the kernel enforces it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RightReport {
    pub kind: RightKind,
    /// `read-file`, `resolve-unix`, `connect-tcp`, `bind-udp`, `signal`, ...
    pub name: String,
    /// The Landlock ABI that introduced it.
    pub since_abi: u32,
    /// The policy handles it (denied unless a rule grants it).
    pub requested: bool,
    /// The running kernel enforces it (requested, Landlock in force and its ABI >= `since_abi`).
    pub enforced: bool,
    /// Why it is not requested, or not enforced.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// The Landlock ABI that introduced a filesystem right.
pub(crate) fn fs_right_abi(right: FsRight) -> u32 {
    match right {
        FsRight::Refer => 2,
        FsRight::Truncate => 3,
        FsRight::IoctlDev => 5,
        FsRight::ResolveUnix => 9,
        _ => 1,
    }
}

/// The network rights the crate knows: (name, since ABI).
const NET_RIGHTS: [(&str, u32); 4] = [("bind-tcp", 4), ("connect-tcp", 4), ("bind-udp", 10), ("connect-send-udp", 10)];

/// Whether the policy's seccomp allowlist lets the worker create datagram sockets (UDP for DNS):
/// then Landlock's UDP rights are not requested (the policy has no UDP port rules).
pub(crate) fn allows_udp(policy: &Policy) -> bool {
    policy.seccomp.filters.iter().flat_map(|f| f.rules.iter()).any(|rule| {
        rule.syscall == "socket" && rule.args.iter().any(|a| a.index == 1 && a.test == "& 0xf == 0x2")
    })
}

/// Every right the crate knows, with what `policy` requests, as enforced by a kernel whose
/// effective Landlock ABI is `abi` (0: no Landlock, or the ruleset was not enforced).
pub fn rights_report(policy: &Policy, abi: u32) -> Vec<RightReport> {
    let ll = &policy.landlock;
    let udp = !allows_udp(policy);
    let mut out = Vec::new();
    let mut push = |kind, name: &str, since_abi: u32, requested: bool, why_not: &str| {
        let enforced = requested && abi >= since_abi;
        let note = if !requested {
            why_not.to_owned()
        } else if abi == 0 {
            "Landlock is not enforced".to_owned()
        } else if !enforced {
            format!("this kernel has Landlock ABI {abi}; needs ABI {since_abi}")
        } else {
            String::new()
        };
        out.push(RightReport { kind, name: name.to_owned(), since_abi, requested, enforced, note });
    };
    for right in FsRight::ALL {
        push(RightKind::Fs, right.name(), fs_right_abi(right), true, "");
    }
    for (name, since) in NET_RIGHTS {
        let (requested, why) = if name.ends_with("tcp") {
            (ll.restrict_tcp, "the policy does not restrict TCP (restrict_tcp = false)")
        } else {
            (udp, "the policy lets the worker send UDP (DNS): no Landlock UDP port rules")
        };
        push(RightKind::Net, name, since, requested, why);
    }
    for scope in [Scope::AbstractUnixSocket, Scope::Signal] {
        push(RightKind::Scope, scope.name(), 6, ll.scopes.contains(&scope), "not in the policy's scopes");
    }
    out
}

/// The Landlock ABI of the running kernel (0: Landlock not built in or not enabled), capped at
/// the highest ABI the `landlock` crate knows.
pub fn kernel_abi() -> u32 {
    // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) takes no memory
    // and only returns the ABI version (or -1 with errno).
    let v = unsafe {
        libc::syscall(libc::SYS_landlock_create_ruleset, std::ptr::null::<libc::c_void>(), 0usize, 1u32)
    };
    if v <= 0 {
        0
    } else {
        (v as u32).min(REQUESTED_ABI as u32)
    }
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
        FsRight::ResolveUnix => AccessFs::ResolveUnix,
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
    // Recorded for the server's connection budget (ipc::server): once seccomp is in place the
    // worker cannot ask the kernel (no prlimit64 in any filter).
    if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) {
        APPLIED_NOFILE.store(soft, std::sync::atomic::Ordering::Relaxed);
    }
    Ok(())
}

static APPLIED_NOFILE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The descriptor limit (`RLIMIT_NOFILE` soft) in force after [`apply_rlimits`]; `None` in a
/// process that did not lock itself in.
pub fn applied_nofile() -> Option<u64> {
    match APPLIED_NOFILE.load(std::sync::atomic::Ordering::Relaxed) {
        0 => None,
        n => Some(n),
    }
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
    ruleset = ruleset.handle_access(AccessFs::from_all(REQUESTED_ABI))?;
    let mut net = BitFlags::<AccessNet>::empty();
    if ll.restrict_tcp {
        net |= AccessNet::BindTcp | AccessNet::ConnectTcp;
    }
    if !allows_udp(policy) {
        // No port rule: no UDP at all (a second layer under seccomp, which has no UDP socket).
        net |= AccessNet::BindUdp | AccessNet::ConnectSendUdp;
    }
    if !net.is_empty() {
        ruleset = ruleset.handle_access(net)?;
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
    let rights = rights_report(policy, abi_num);
    let (mut handled, mut unsupported) = (Vec::new(), Vec::new());
    for right in FsRight::ALL {
        if abi_num >= fs_right_abi(right) {
            handled.push(right);
        } else {
            unsupported.push(right);
        }
    }
    let tcp_restricted = ll.restrict_tcp && abi_num >= 4;
    let scopes_supported = abi_num >= 6;
    let (scopes_on, scopes_off) = if scopes_supported { (ll.scopes.clone(), vec![]) } else { (vec![], ll.scopes.clone()) };
    Ok(LandlockReport {
        abi: abi_num,
        requested_abi: REQUESTED_ABI as u32,
        status: match status.ruleset {
            RulesetStatus::FullyEnforced => "fully-enforced",
            RulesetStatus::PartiallyEnforced => "partially-enforced",
            RulesetStatus::NotEnforced => "not-enforced",
        }
        .into(),
        rights,
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
    } else if landlock.fs_rights_unsupported.iter().any(|r| fs_right_abi(*r) <= BASELINE_ABI) {
        // Rights of ABIs after the baseline (resolve-unix) are best effort: recorded, not required.
        let names: Vec<&str> = landlock
            .fs_rights_unsupported
            .iter()
            .filter(|r| fs_right_abi(**r) <= BASELINE_ABI)
            .map(|r| r.name())
            .collect();
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
            abi: 10,
            requested_abi: 10,
            rights: rights_report(policy, 10),
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

    /// What this machine's kernel (ABI 7) reports: rights of later ABIs are requested, recorded
    /// as not enforced, and never a reason to refuse (the baseline is ABI 7).
    fn abi7(policy: &Policy) -> LandlockReport {
        let mut ll = full(policy);
        ll.abi = 7;
        ll.status = "partially-enforced".into();
        ll.rights = rights_report(policy, 7);
        ll.fs_rights_handled.retain(|r| fs_right_abi(*r) <= 7);
        ll.fs_rights_unsupported = vec![FsRight::ResolveUnix];
        ll
    }

    #[test]
    fn rights_of_later_abis_are_recorded_not_required() {
        for svc in ["keyd", "tpmd", "certd"] {
            let p = crate::builtin(svc).unwrap();
            let ll = abi7(&p);
            let missing: Vec<(&str, u32)> = ll.not_enforced().map(|r| (r.name.as_str(), r.since_abi)).collect();
            assert_eq!(missing, [("resolve-unix", 9), ("bind-udp", 10), ("connect-send-udp", 10)], "{svc}");
            assert_eq!(check_required(&p, &ll, &seccomp(SeccompMode::Kill), false).unwrap(), Vec::<String>::new(), "{svc}");
        }
        // A baseline right the kernel lacks is still a refusal (ioctl-dev is ABI 5).
        let p = crate::builtin("keyd").unwrap();
        let mut ll = abi7(&p);
        ll.abi = 4;
        ll.fs_rights_unsupported = vec![FsRight::IoctlDev, FsRight::ResolveUnix];
        let e = check_required(&p, &ll, &seccomp(SeccompMode::Kill), false).unwrap_err().to_string();
        assert!(e.contains("Landlock ABI 4 cannot restrict ioctl-dev;") || e.ends_with("cannot restrict ioctl-dev"), "{e}");
        assert!(!e.contains("resolve-unix"), "{e}");
    }

    #[test]
    fn per_right_report_follows_the_policy_and_the_kernel_abi() {
        let keyd = crate::builtin("keyd").unwrap();
        let at = |rights: &[RightReport], name: &str| rights.iter().find(|r| r.name == name).cloned().unwrap();
        let r7 = rights_report(&keyd, 7);
        assert_eq!(r7.len(), FsRight::ALL.len() + 4 + 2);
        assert!(r7.iter().all(|r| r.requested), "keyd requests every right: {r7:?}");
        assert!(at(&r7, "ioctl-dev").enforced && at(&r7, "connect-tcp").enforced && at(&r7, "signal").enforced);
        assert!(!at(&r7, "resolve-unix").enforced && !at(&r7, "connect-send-udp").enforced);
        let r5 = rights_report(&keyd, 5);
        assert!(!at(&r5, "abstract-unix-socket").enforced && at(&r5, "bind-tcp").enforced);
        assert!(rights_report(&keyd, 0).iter().all(|r| !r.enforced && r.note == "Landlock is not enforced"));
        // identityd's seccomp allows UDP sockets (DNS): Landlock UDP is not requested.
        let id = rights_report(&crate::builtin("identityd").unwrap(), 10);
        assert!(!at(&id, "bind-udp").requested && !at(&id, "bind-udp").enforced);
        assert!(at(&id, "connect-tcp").enforced && at(&id, "resolve-unix").enforced);
        // JSON names, as the status file carries them.
        let v = serde_json::to_value(at(&r7, "resolve-unix")).unwrap();
        assert_eq!(v["kind"], "fs");
        assert_eq!(v["since_abi"], 9);
        assert_eq!(v["enforced"], false);
    }

    /// Runs `action` in a forked child under `program`'s compiled kill-mode pair; returns the
    /// signal that killed the child, or None if it exited normally.
    fn under_program(program: &str, fd: i32, action: fn(i32)) -> Option<i32> {
        let filters: Vec<Vec<libc::sock_filter>> =
            crate::seccomp::programs_for_test(program).iter().map(|p| crate::seccomp::to_sock_filter(p)).collect();
        let progs: Vec<libc::sock_fprog> = filters
            .iter()
            .map(|f| libc::sock_fprog { len: f.len() as u16, filter: f.as_ptr() as *mut libc::sock_filter })
            .collect();
        // SAFETY: the child makes raw syscalls only (prctl, seccomp, the action's, _exit) on
        // memory prepared before fork; the parent waits for it.
        unsafe {
            match libc::fork() {
                0 => {
                    libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                    for prog in &progs {
                        if libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, prog as *const libc::sock_fprog) != 0 {
                            libc::_exit(99);
                        }
                    }
                    action(fd);
                    libc::_exit(0)
                }
                pid => {
                    assert!(pid > 0, "fork failed");
                    let mut status = 0;
                    assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
                    if libc::WIFSIGNALED(status) {
                        Some(libc::WTERMSIG(status))
                    } else {
                        assert_eq!(libc::WEXITSTATUS(status), 0, "the child could not install the filter");
                        None
                    }
                }
            }
        }
    }

    #[test]
    fn pkcs11_syscalls_only_in_the_pkcs11_program() {
        let path = std::env::temp_dir().join(format!("aziot-policy-lock-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        let lock: fn(i32) = |fd| {
            // SAFETY: F_SETLK with a valid struct flock on a live descriptor.
            unsafe {
                let mut fl: libc::flock = std::mem::zeroed();
                fl.l_type = libc::F_WRLCK as i16;
                libc::fcntl(fd, libc::F_SETLK, &fl);
            }
        };
        // SAFETY: ftruncate on a live descriptor.
        let truncate: fn(i32) = |fd| unsafe {
            libc::ftruncate(fd, 0);
        };
        for (what, action) in [("fcntl(F_SETLK)", lock), ("ftruncate", truncate)] {
            assert_eq!(under_program("keyd", fd, action), Some(libc::SIGSYS), "keyd without PKCS#11: {what}");
            assert_eq!(under_program("keyd+pkcs11", fd, action), None, "keyd+pkcs11: {what}");
        }
        // Both programs allow what every keyd needs (F_GETFL).
        // SAFETY: F_GETFL takes no pointer.
        let getfl: fn(i32) = |fd| unsafe {
            libc::fcntl(fd, libc::F_GETFL);
        };
        assert_eq!(under_program("keyd", fd, getfl), None);
        drop(file);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn tgkill_only_with_sigabrt() {
        // abort() (panic=abort, glibc) still dies of SIGABRT under every worker's program...
        let abort: fn(i32) = |_| unsafe { libc::abort() };
        // SAFETY (below): tgkill of the calling thread, integer arguments only.
        let zero: fn(i32) = |_| unsafe {
            libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), 0);
        };
        let usr1: fn(i32) = |_| unsafe {
            libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::gettid(), libc::SIGUSR1);
        };
        for svc in crate::SERVICES {
            assert_eq!(under_program(svc, -1, abort), Some(libc::SIGABRT), "{svc}: abort()");
            // ... and any other signal (0: the probe for a pid) is a violation.
            assert_eq!(under_program(svc, -1, zero), Some(libc::SIGSYS), "{svc}: tgkill sig 0");
            assert_eq!(under_program(svc, -1, usr1), Some(libc::SIGSYS), "{svc}: tgkill SIGUSR1");
        }
    }

    #[test]
    fn kernel_abi_matches_the_crate_view() {
        // This machine: ABI 7 (DESIGN §3); any kernel: the value is what landlock reports, capped.
        let abi = kernel_abi();
        assert!(abi <= 10);
        let raw = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
        if raw.contains("landlock") {
            assert!(abi >= 1, "Landlock is in the LSM list but kernel_abi() says {abi}");
        }
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
