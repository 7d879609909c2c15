//! aziot-policy: each service's sandbox as data, the code that applies it, and the audit that
//! compares a live service with it (DESIGN.md §1, §3).
//!
//! - The data: `services/<svc>.toml` (user, descriptors, Landlock rules, requirements, rlimits)
//!   and `seccomp/<svc>.json` (the allowlist in seccompiler's JSON format, a comment per rule
//!   naming its caller), compiled into this crate; the BPF is compiled by `build.rs`.
//! - [`builtin`] and [`effective`] (built-in + config [`Grants`] + admin drop-ins
//!   `/etc/aziot/<svc>/policy.d/*.toml`), [`render_human`] and `Serialize` for `aziotctl policy show`.
//! - In the broker: [`resolve_credentials`] before fork, [`drop_privileges_in_child`] between
//!   fork and exec.
//! - In the worker, after pre-loading: [`apply_rlimits`], [`apply_landlock`], [`apply_seccomp`],
//!   then [`check_required`] (fail closed unless degraded mode is allowed).
//! - [`Status`] (`/run/aziot/<svc>.status`) and [`audit_service`] for `aziotctl policy audit`.

mod apply;
pub mod audit;
mod creds;
mod dropin;
/// The escape suite's attempt mode of the worker (test-only; feature `escape-probe`).
pub mod escape;
mod model;
/// The worker's private mount namespace: prepared by the broker, entered between fork and exec.
pub mod mountns;
mod render;
mod seccomp;
mod sigsys;
/// The one table of services (names, users, sockets, config and policy files): [`services::SERVICES`].
pub mod services;
mod status;
/// Opening root's inputs: root-owned files, paths walked without following links.
pub mod trusted;

use std::path::{Path, PathBuf};

pub use apply::{applied_nofile, apply_landlock, apply_rlimits, check_required, kernel_abi, rights_report, LandlockReport, RightKind, RightReport};
pub use audit::{audit_running, audit_service, audit_service_with, default_state_dir, AuditReport, Finding};
pub use creds::{drop_privileges_in_child, resolve_credentials, Credentials};
pub use model::{
    AccessSet, DescriptorKind, DescriptorSpec, FdRule, FsRight, Grants, LandlockPolicy, MountNamespacePolicy, MountPlan,
    Origin, PathGrant, PathRule, Policy, PortGrant, PortRule, Requirements, Rlimit, RlimitResource, Scope, SocketGrant,
    SocketRule,
};
pub use render::{render_for_kernel, render_human};
pub use seccomp::{
    apply_seccomp, syscall_name, ArgCondition, ProcessState, SeccompFilterDoc, SeccompMode, SeccompPolicy, SeccompReport,
    SeccompRuleDoc,
};
pub use sigsys::{parse_violation, report_seccomp_violations_to, SeccompViolation, AUDIT_ARCH};
pub use status::{status_path, Status};

/// The short names of the services of [`services::SERVICES`] (every one has a policy), in the
/// order `aziotctl policy` lists them.
pub const SERVICES: &[&str] = &services::SHORT_NAMES;

/// Where the admin's drop-ins for `service` live: `/etc/aziot/<svc>/policy.d`
/// ([`services::ServiceInfo::policy_d`]).
pub fn default_policy_d(service: &str) -> PathBuf {
    match services::by_short(service) {
        Some(info) => PathBuf::from(info.policy_d),
        None => PathBuf::from(format!("/etc/aziot/{service}/policy.d")),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("no sandbox policy for service {0:?} (known: {known})", known = SERVICES.join(", "))]
    UnknownService(String),
    #[error("built-in policy {file} is invalid")]
    Builtin { file: String, #[source] source: Box<dyn std::error::Error + Send + Sync> },
    #[error("policy drop-in {}: {message}", path.display())]
    DropIn { path: PathBuf, message: String },
    #[error("could not read the policy drop-in directory {}", path.display())]
    DropInDir { path: PathBuf, #[source] source: std::io::Error },
    #[error("invalid grant from config ({origin}): {message}")]
    Grant { origin: String, message: String },
    #[error("the service user {0:?} does not exist (run systemd-sysusers)")]
    UserMissing(String),
    #[error("refusing to run the {service} worker as root ({what})")]
    Root { service: String, what: String },
    #[error("could not look up the user or groups of {user}")]
    Lookup { user: String, #[source] source: nix::Error },
    #[error("could not set rlimit {resource}")]
    Rlimit { resource: String, #[source] source: nix::Error },
    #[error("the policy names descriptor {0:?} but the worker was not handed one")]
    MissingDescriptor(String),
    #[error("refusing to start the {service} worker: {problem}")]
    Handoff { service: String, problem: model::HandoffProblem },
    #[error("{what} must happen before any thread exists ({threads} threads)")]
    Threads { what: &'static str, threads: usize },
    #[error("Landlock failed")]
    Landlock(#[from] landlock::RulesetError),
    #[error("could not open {} for a Landlock rule", path.display())]
    LandlockPath { path: PathBuf, #[source] source: std::io::Error },
    #[error("no compiled seccomp program for {service} on {arch}")]
    NoProgram { service: String, arch: String },
    #[error("the policy's seccomp digest {policy} does not match the compiled program {compiled}")]
    SeccompDigest { policy: String, compiled: String },
    #[error("could not install the seccomp filter")]
    Seccomp(#[source] std::io::Error),
    #[error("could not read the process state")]
    Process(#[source] std::io::Error),
    #[error("required protections are not enforced: {}; refusing to start ({})", .0.join("; "), ways_out(.0))]
    NotEnforced(Vec<String>),
    #[error("the privileges were not dropped: {0}")]
    Privileges(String),
    #[error("status file {}", path.display())]
    Status { path: PathBuf, #[source] source: std::io::Error },
    #[error("status file {} is not valid", path.display())]
    StatusJson { path: PathBuf, #[source] source: serde_json::Error },
}

/// What the admin can do about a [`PolicyError::NotEnforced`] (docs/compatibility.md, "Kernel").
fn ways_out(unmet: &[String]) -> &'static str {
    if unmet.iter().any(|u| u.contains("Landlock")) {
        "this kernel's Landlock lacks them: boot a kernel whose Landlock enforces them (Linux 6.12 or \
         later covers every service; on Debian 12: bookworm-backports' linux-image-amd64), or set \
         `allow_degraded = true` under [sandbox] in the service's config to run without them, \
         knowingly; `aziotctl check` (sandbox-kernel) lists what each service lacks"
    } else {
        "degraded mode is not allowed in config"
    }
}

/// The prefix of the warnings [`check_required`] returns for a protection that is missing but
/// allowed by degraded mode.
pub const DEGRADED_PREFIX: &str = "DEGRADED: ";

/// Whether the warnings of [`check_required`] say the worker runs degraded (the status file's
/// `degraded`). Other warnings (a skipped path rule, a protection the policy does not require)
/// are not degradation.
pub fn is_degraded(warnings: &[String]) -> bool {
    warnings.iter().any(|w| w.starts_with(DEGRADED_PREFIX))
}

/// The built-in policy of `service` (`keyd`, `certd`, `identityd`, `tpmd`).
pub fn builtin(service: &str) -> Result<Policy, PolicyError> {
    model::builtin(service)
}

/// The effective policy: built-in + grants derived from config + the admin's drop-ins
/// (`policy_d`, e.g. [`default_policy_d`]; a missing directory means none). Drop-ins are read in
/// file-name order and may add path rules and TCP ports only, never syscalls; an unknown key is
/// a warning naming the file and key (in [`Policy::warnings`]); a bad file is an error naming it.
pub fn effective(service: &str, grants: &Grants, policy_d: Option<&Path>) -> Result<Policy, PolicyError> {
    let mut policy = model::builtin(service)?;
    model::add_grants(&mut policy, grants)?;
    if let Some(dir) = policy_d {
        dropin::apply_dir(&mut policy, dir)?;
    }
    model::finish(&mut policy);
    Ok(policy)
}
