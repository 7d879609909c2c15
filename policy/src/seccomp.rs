//! The seccomp part: the allowlists compiled by build.rs, their digest, the rules for display,
//! and installation in the worker.
//!
//! Two filters are installed, in this order, both with SECCOMP_FILTER_FLAG_TSYNC:
//! 1. `clone3_enosys` (default allow; clone3 -> ENOSYS): glibc then falls back to clone, whose
//!    flags the allowlist can check (clone3 passes them in memory); also socket(AF_NETLINK) ->
//!    ENOSYS, so that an allowlist letting it through (identityd's: getaddrinfo's sorting) gets
//!    an error glibc falls back from, never a netlink socket;
//! 2. `allowlist` (default SECCOMP_RET_TRAP, or SECCOMP_RET_LOG in log mode), which must itself
//!    allow clone3 so that filter 1 decides (the kernel applies the most restrictive answer).
//!    A trap runs the SIGSYS handler of `sigsys.rs`: it reports the syscall to the broker and
//!    the process dies by SIGSYS, as with KillProcess.
//!
//! Digest: sha256 over the filters in the order PTRACE_SECCOMP_GET_FILTER returns them (index 0
//! = the first installed, as the kernel's get_nth_filter counts: clone3_enosys, then allowlist),
//! each as its instruction count (u32, little endian) followed by its `struct sock_filter` array
//! (8 bytes per instruction, little endian). The audit dumps the live programs and hashes them
//! the same way.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Policy, PolicyError};

mod programs {
    include!(concat!(env!("OUT_DIR"), "/programs.rs"));
}

/// The seccomp part of a policy, as shown by `aziotctl policy show` and hashed by the audit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompPolicy {
    pub service: String,
    /// The compiled program the worker installs: the service's own (`keyd`), or a variant the
    /// broker selects from config (`keyd+pkcs11`: `keyd.json` plus `seccomp/keyd+pkcs11.json`).
    #[serde(default)]
    pub program: String,
    /// For a variant: the config that selects it (the variant file's `when`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub variant_when: String,
    /// Architecture the programs were compiled for (`x86_64`, `aarch64`).
    pub arch: String,
    /// Default action of the allowlist: `trap` (SIGSYS to the reporting handler, then death by
    /// SIGSYS).
    pub default_action: String,
    /// sha256 of the installed programs in kill mode (what the audit expects).
    pub digest: String,
    /// sha256 of the installed programs in log mode (field triage).
    pub log_digest: String,
    /// The filters in installation order, with their rules and comments.
    pub filters: Vec<SeccompFilterDoc>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompFilterDoc {
    pub name: String,
    pub default_action: String,
    pub match_action: String,
    pub rules: Vec<SeccompRuleDoc>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompRuleDoc {
    pub syscall: String,
    /// All must hold (AND); several rules for one syscall are alternatives (OR).
    #[serde(default)]
    pub args: Vec<ArgCondition>,
    pub comment: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArgCondition {
    pub index: u8,
    /// `dword` (low 32 bits) or `qword`.
    pub width: String,
    /// e.g. `== 15`, `& 0x4 == 0x0`.
    pub test: String,
    pub comment: String,
}

// The JSON as written (seccompiler's format), for display.
#[derive(Deserialize)]
struct JsonFilter {
    mismatch_action: serde_json::Value,
    match_action: serde_json::Value,
    filter: Vec<JsonRule>,
}

#[derive(Deserialize)]
struct JsonRule {
    syscall: String,
    #[serde(default)]
    args: Vec<JsonArg>,
    comment: String,
}

#[derive(Deserialize)]
struct JsonArg {
    index: u8,
    #[serde(rename = "type")]
    width: String,
    op: serde_json::Value,
    val: u64,
    comment: String,
}

fn json_source(service: &str) -> Option<&'static str> {
    crate::services::by_short(service).map(|info| info.seccomp_json)
}

fn action_name(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.replace('_', "-"),
        serde_json::Value::Object(m) => match m.iter().next() {
            Some((k, n)) if k == "errno" => format!("errno {}", errno_name(n.as_i64().unwrap_or(0) as i32)),
            Some((k, n)) => format!("{k} {n}"),
            None => "?".into(),
        },
        other => other.to_string(),
    }
}

fn errno_name(n: i32) -> String {
    match n {
        libc::ENOSYS => "ENOSYS".into(),
        libc::EPERM => "EPERM".into(),
        other => other.to_string(),
    }
}

fn docs(name: &str, text: &str) -> Result<SeccompFilterDoc, PolicyError> {
    let bad = |e: serde_json::Error| PolicyError::Builtin { file: format!("seccomp/{name}"), source: Box::new(e) };
    let map: std::collections::BTreeMap<String, JsonFilter> = serde_json::from_str(text).map_err(bad)?;
    let (filter_name, f) = map.into_iter().next().ok_or_else(|| PolicyError::Builtin {
        file: format!("seccomp/{name}"),
        source: "no filter".into(),
    })?;
    let rules = f
        .filter
        .into_iter()
        .map(|r| SeccompRuleDoc {
            syscall: r.syscall,
            args: r
                .args
                .into_iter()
                .map(|a| {
                    let test = match &a.op {
                        serde_json::Value::String(op) => format!("{} {}", op_symbol(op), a.val),
                        serde_json::Value::Object(m) => match m.get("masked_eq").and_then(|v| v.as_u64()) {
                            Some(mask) => format!("& {mask:#x} == {:#x}", a.val),
                            None => format!("{} {}", a.op, a.val),
                        },
                        other => format!("{other} {}", a.val),
                    };
                    ArgCondition { index: a.index, width: a.width, test, comment: a.comment }
                })
                .collect(),
            comment: r.comment,
        })
        .collect();
    Ok(SeccompFilterDoc {
        name: filter_name,
        default_action: action_name(&f.mismatch_action),
        match_action: action_name(&f.match_action),
        rules,
    })
}

fn op_symbol(op: &str) -> &str {
    match op {
        "eq" => "==",
        "ne" => "!=",
        "ge" => ">=",
        "gt" => ">",
        "le" => "<=",
        "lt" => "<",
        other => other,
    }
}

/// The name of syscall `nr` on this architecture (e.g. to log why seccomp killed a worker).
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    let table = programs::SYSCALL_NAMES;
    table.binary_search_by_key(&nr, |(n, _)| *n).ok().map(|i| table[i].1)
}

/// The compiled programs for `service` in installation order.
fn programs(service: &str, log: bool) -> Result<[&'static [u8]; 2], PolicyError> {
    let allowlist = programs::allowlist(service, log)
        .ok_or_else(|| PolicyError::NoProgram { service: service.to_owned(), arch: programs::ARCH.to_owned() })?;
    Ok([programs::CLONE3_ENOSYS, allowlist])
}

/// The digest of `service`'s installed pair, computed by build.rs with [`digest_of`]'s
/// construction (no hashing, hence no OpenSSL, at run time).
fn compiled_digest(service: &str, log: bool) -> Result<&'static str, PolicyError> {
    programs::digest(service, log)
        .ok_or_else(|| PolicyError::NoProgram { service: service.to_owned(), arch: programs::ARCH.to_owned() })
}

/// Digest of filters given in dump order (= installation order), see the module doc.
pub(crate) fn digest_of<'a>(dump_order: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut data = Vec::new();
    for program in dump_order {
        data.extend_from_slice(&((program.len() / 8) as u32).to_le_bytes());
        data.extend_from_slice(program);
    }
    sha256_hex(&data)
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    let digest = openssl::sha::sha256(data);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl SeccompPolicy {
    pub(crate) fn builtin(service: &str) -> Result<SeccompPolicy, PolicyError> {
        let text = json_source(service).ok_or_else(|| PolicyError::UnknownService(service.to_owned()))?;
        Ok(SeccompPolicy {
            service: service.to_owned(),
            program: service.to_owned(),
            variant_when: String::new(),
            arch: programs::ARCH.to_owned(),
            default_action: "trap".into(),
            digest: compiled_digest(service, false)?.to_owned(),
            log_digest: compiled_digest(service, true)?.to_owned(),
            filters: vec![
                docs("clone3.json", include_str!("../seccomp/clone3.json"))?,
                docs(&format!("{service}.json"), text)?,
            ],
        })
    }

    /// `service`'s variant program `<service>+<variant>` (e.g. `keyd+pkcs11`): the service's
    /// allowlist plus the variant file's rules, with the variant's own build-time digests.
    pub(crate) fn variant(service: &str, variant: &str) -> Result<SeccompPolicy, PolicyError> {
        let name = format!("{service}+{variant}");
        let (_, _, text) = programs::VARIANTS
            .iter()
            .find(|(n, base, _)| *n == name && *base == service)
            .ok_or_else(|| PolicyError::NoProgram { service: name.clone(), arch: programs::ARCH.to_owned() })?;
        let bad = |e: serde_json::Error| PolicyError::Builtin { file: format!("seccomp/{name}.json"), source: Box::new(e) };
        let ext: serde_json::Value = serde_json::from_str(text).map_err(bad)?;
        let wrapped = serde_json::json!({ "allowlist": { "mismatch_action": "trap", "match_action": "allow", "filter": ext["filter"] } });
        let extra = docs(&format!("{name}.json"), &wrapped.to_string())?;
        let mut policy = SeccompPolicy::builtin(service)?;
        policy.program = name.clone();
        policy.variant_when = ext["when"].as_str().unwrap_or_default().to_owned();
        policy.digest = compiled_digest(&name, false)?.to_owned();
        policy.log_digest = compiled_digest(&name, true)?.to_owned();
        if let Some(allowlist) = policy.filters.iter_mut().find(|f| f.name == "allowlist") {
            allowlist.rules.extend(extra.rules);
        }
        Ok(policy)
    }

    /// The variant programs of `service` (`keyd+pkcs11`, ...).
    pub fn variants_of(service: &str) -> Vec<&'static str> {
        programs::VARIANTS.iter().filter(|(_, base, _)| *base == service).map(|(n, _, _)| *n).collect()
    }

    /// The program name (`keyd`, `keyd+pkcs11`); a policy serialized before programs had names
    /// runs its service's own.
    pub fn program_name(&self) -> &str {
        if self.program.is_empty() {
            &self.service
        } else {
            &self.program
        }
    }

    /// The digest the installed programs have in `mode` (empty for `Skip`).
    pub fn digest_for(&self, mode: SeccompMode) -> &str {
        match mode {
            SeccompMode::Kill => &self.digest,
            SeccompMode::Log => &self.log_digest,
            SeccompMode::Skip => "",
        }
    }

    /// Whether the allowlist has a rule for `syscall`.
    pub fn allows(&self, syscall: &str) -> bool {
        self.filters.iter().any(|f| f.name == "allowlist" && f.rules.iter().any(|r| r.syscall == syscall))
    }

    /// Number of distinct syscalls the allowlist names.
    pub fn syscall_count(&self) -> usize {
        let mut names: Vec<&str> = self
            .filters
            .iter()
            .filter(|f| f.name == "allowlist")
            .flat_map(|f| f.rules.iter().map(|r| r.syscall.as_str()))
            .collect();
        names.sort_unstable();
        names.dedup();
        names.len()
    }
}

/// How the allowlist is enforced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SeccompMode {
    /// Default action SECCOMP_RET_TRAP + the reporting SIGSYS handler: a violation kills the
    /// process by SIGSYS, as KillProcess would (production).
    Kill,
    /// Default action SECCOMP_RET_LOG: nothing is denied, violations are logged (field triage;
    /// degraded).
    Log,
    /// No filter (degraded).
    Skip,
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SeccompMode::Kill => "kill",
            SeccompMode::Log => "log",
            SeccompMode::Skip => "skip",
        })
    }
}

impl FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kill" => Ok(SeccompMode::Kill),
            "log" => Ok(SeccompMode::Log),
            "skip" | "off" => Ok(SeccompMode::Skip),
            other => Err(format!("unknown seccomp mode {other:?} (kill, log, skip or off)")),
        }
    }
}

/// The worker's credentials and privileges as read from inside, just before the filter was
/// installed (the last moment it can read them: the allowlist has no getuid/capget).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessState {
    pub uids: [u32; 3],
    pub gids: [u32; 3],
    pub cap_inheritable: u64,
    pub cap_permitted: u64,
    pub cap_effective: u64,
    pub cap_bounding: u64,
    pub cap_ambient: u64,
    pub no_new_privs: bool,
}

/// What [`apply_seccomp`] installed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeccompReport {
    pub mode: SeccompMode,
    /// Number of filters installed (2, or 0 in skip mode).
    pub filters: u32,
    /// sha256 of the installed programs (empty in skip mode).
    pub digest: String,
    pub arch: String,
    pub process: ProcessState,
}

/// Installs the policy's seccomp filters on every thread (TSYNC); call it after Landlock and
/// before any thread exists. `Kill`: default action SECCOMP_RET_TRAP, with the SIGSYS handler
/// of [`crate::sigsys`] installed first (it reports the syscall on the descriptor given to
/// [`crate::report_seccomp_violations_to`], then the process dies by SIGSYS).
pub fn apply_seccomp(policy: &Policy, mode: SeccompMode) -> Result<SeccompReport, PolicyError> {
    let log = mode == SeccompMode::Log;
    let progs = programs(policy.seccomp.program_name(), log)?;
    let compiled_kill = compiled_digest(policy.seccomp.program_name(), false)?;
    if compiled_kill != policy.seccomp.digest {
        return Err(PolicyError::SeccompDigest { policy: policy.seccomp.digest.clone(), compiled: compiled_kill.to_owned() });
    }
    crate::apply::set_no_new_privs().map_err(PolicyError::Seccomp)?;
    let process = crate::apply::process_state().map_err(PolicyError::Process)?;
    if process.uids.contains(&0) || process.gids.contains(&0) {
        return Err(PolicyError::Root {
            service: policy.service.clone(),
            what: format!("uids {:?}, gids {:?}", process.uids, process.gids),
        });
    }
    if mode == SeccompMode::Skip {
        return Ok(SeccompReport { mode, filters: 0, digest: String::new(), arch: programs::ARCH.into(), process });
    }
    if mode == SeccompMode::Kill {
        // Before the filter: a forbidden syscall traps into this handler, which reports it
        // (crate::sigsys) and dies by SIGSYS.
        crate::sigsys::install_handler().map_err(PolicyError::Seccomp)?;
    }
    for program in progs {
        install(program).map_err(PolicyError::Seccomp)?;
    }
    Ok(SeccompReport {
        mode,
        filters: progs.len() as u32,
        digest: compiled_digest(policy.seccomp.program_name(), log)?.to_owned(),
        arch: programs::ARCH.into(),
        process,
    })
}

/// A compiled program (little-endian `struct sock_filter` array) as the kernel takes it.
pub(crate) fn to_sock_filter(program: &[u8]) -> Vec<libc::sock_filter> {
    program
        .chunks_exact(8)
        .map(|c| libc::sock_filter {
            code: u16::from_le_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect()
}

/// `service`'s kill-mode programs in installation order (for the SIGSYS handler's test).
#[cfg(test)]
pub(crate) fn programs_for_test(service: &str) -> [&'static [u8]; 2] {
    programs(service, false).expect("compiled programs")
}

fn install(program: &[u8]) -> std::io::Result<()> {
    let filter = to_sock_filter(program);
    let prog = libc::sock_fprog { len: filter.len() as u16, filter: filter.as_ptr() as *mut libc::sock_filter };
    // SAFETY: seccomp(SECCOMP_SET_MODE_FILTER) copies the program from `prog`, which points at
    // `filter`, alive for the duration of the call; no_new_privs was set by the caller.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_TSYNC,
            &prog as *const libc::sock_fprog,
        )
    };
    match rc {
        0 => Ok(()),
        r if r > 0 => Err(std::io::Error::other(format!("thread {r} could not be synchronized (TSYNC)"))),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_has_programs_and_distinct_digests() {
        let mut digests = Vec::new();
        for svc in crate::SERVICES {
            let p = SeccompPolicy::builtin(svc).unwrap();
            assert_eq!(p.digest.len(), 64);
            assert_ne!(p.digest, p.log_digest);
            assert!(p.filters[1].rules.iter().all(|r| !r.comment.is_empty()));
            assert!(p.allows("clone3") && p.allows("clone"), "{svc}: clone3 must reach the ENOSYS filter");
            digests.push(p.digest);
        }
        digests.sort();
        digests.dedup();
        assert_eq!(digests.len(), 4);
    }

    #[test]
    fn build_time_digests_hash_the_installed_programs() {
        for svc in crate::SERVICES {
            for log in [false, true] {
                let progs = programs(svc, log).unwrap();
                assert_eq!(compiled_digest(svc, log).unwrap(), digest_of(progs.iter().copied()), "{svc} log={log}");
            }
        }
    }

    #[test]
    fn keyd_has_no_network_and_no_exec() {
        let p = SeccompPolicy::builtin("keyd").unwrap();
        for forbidden in ["socket", "connect", "execve", "kill", "ptrace", "bind", "listen"] {
            assert!(!p.allows(forbidden), "keyd allows {forbidden}");
        }
        // 52 without a PKCS#11 module; keyd+pkcs11 adds ftruncate and unlink (and fcntl locks).
        assert_eq!(p.syscall_count(), 52);
        let pkcs11 = SeccompPolicy::variant("keyd", "pkcs11").unwrap();
        assert_eq!(pkcs11.syscall_count(), 54);
        assert_eq!(pkcs11.program_name(), "keyd+pkcs11");
        assert_ne!(pkcs11.digest, p.digest);
        assert!(!p.allows("ftruncate") && !p.allows("unlink") && pkcs11.allows("ftruncate") && pkcs11.allows("unlink"));
        let locks = |sp: &SeccompPolicy| {
            sp.filters[1].rules.iter().filter(|r| r.syscall == "fcntl" && r.args[0].test.starts_with("== ")).map(|r| r.args[0].test.clone()).collect::<Vec<_>>()
        };
        for lock in ["== 5", "== 6", "== 7"] {
            assert!(!locks(&p).iter().any(|t| t == lock) && locks(&pkcs11).iter().any(|t| t == lock), "F_*LK {lock}");
        }
        assert_eq!(SeccompPolicy::variants_of("keyd"), ["keyd+pkcs11"]);
        assert!(SeccompPolicy::variants_of("tpmd").is_empty());
        assert!(SeccompPolicy::variant("tpmd", "pkcs11").is_err());
        let mmap = p.filters[1].rules.iter().find(|r| r.syscall == "mmap").unwrap();
        assert_eq!(mmap.args[0].test, "& 0x4 == 0x0");
    }

    #[test]
    fn digest_depends_on_order_and_content() {
        let a: &[u8] = &[1, 0, 0, 0, 0, 0, 0, 0];
        let b: &[u8] = &[6, 0, 0, 0, 0, 0, 0xff, 0x7f];
        assert_ne!(digest_of([a, b]), digest_of([b, a]));
        assert_eq!(digest_of([a, b]), digest_of([a, b]));
    }

    #[test]
    fn names_syscalls() {
        assert_eq!(syscall_name(libc::SYS_execve), Some("execve"));
        assert_eq!(syscall_name(libc::SYS_clone3), Some("clone3"));
        assert_eq!(syscall_name(libc::SYS_openat), Some("openat"));
        assert_eq!(syscall_name(-1), None);
        assert_eq!(syscall_name(100_000), None);
    }

    #[test]
    fn mode_parses() {
        assert_eq!("kill".parse::<SeccompMode>().unwrap(), SeccompMode::Kill);
        assert_eq!("off".parse::<SeccompMode>().unwrap(), SeccompMode::Skip);
        assert_eq!(SeccompMode::Log.to_string(), "log");
        assert!("allow".parse::<SeccompMode>().is_err());
    }
}
