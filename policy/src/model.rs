//! The policy types, the built-in service files (`services/<svc>.toml`) and config grants.

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::seccomp::SeccompPolicy;
use crate::PolicyError;

/// One service's sandbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// `keyd`, `certd`, `identityd` or `tpmd`.
    pub service: String,
    /// The worker's user (`aziotks`, ...); its groups come from /etc/group.
    pub user: String,
    /// What the broker opens and hands over.
    pub descriptors: Vec<DescriptorSpec>,
    pub landlock: LandlockPolicy,
    pub seccomp: SeccompPolicy,
    pub rlimits: Vec<Rlimit>,
    /// What must be enforced for the worker to start (unless degraded mode is allowed).
    pub require: Requirements,
    /// Things the admin should know (unknown drop-in keys, grants without effect).
    #[serde(default)]
    pub warnings: Vec<String>,
}

impl Policy {
    /// sha256 (hex) of the policy's JSON form: the `policy_digest` of the status file.
    pub fn digest(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        crate::seccomp::sha256_hex(&json)
    }
}

/// Where a rule came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// Compiled into aziot-policy (`policy/services/<svc>.toml`, `policy/seccomp/<svc>.json`).
    Builtin,
    /// Derived from a config value, e.g. `aziot_keys.pkcs11_lib_path`.
    Config(String),
    /// An admin drop-in, `/etc/aziot/<svc>/policy.d/*.toml`.
    DropIn(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Builtin => f.write_str("built-in"),
            Origin::Config(key) => write!(f, "config {key}"),
            Origin::DropIn(path) => write!(f, "drop-in {}", path.display()),
        }
    }
}

/// What a handed-over descriptor is (same names as the hand-off manifest's kinds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DescriptorKind {
    UnixListener,
    Directory,
    File,
    Device,
    Socket,
}

impl DescriptorKind {
    pub fn name(self) -> &'static str {
        match self {
            DescriptorKind::UnixListener => "unix-listener",
            DescriptorKind::Directory => "directory",
            DescriptorKind::File => "file",
            DescriptorKind::Device => "device",
            DescriptorKind::Socket => "socket",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescriptorSpec {
    pub name: String,
    pub kind: DescriptorKind,
    /// Which config value (or unit) names the resource (documentation).
    pub source: String,
    /// Several descriptors of this name may be handed over (e.g. one per preloaded key file).
    #[serde(default)]
    pub multiple: bool,
    /// The broker may hand over none.
    #[serde(default)]
    pub optional: bool,
}

/// A Landlock filesystem right (the `landlock` crate's `AccessFs`, kebab-case).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FsRight {
    Execute,
    WriteFile,
    ReadFile,
    ReadDir,
    RemoveDir,
    RemoveFile,
    MakeChar,
    MakeDir,
    MakeReg,
    MakeSock,
    MakeFifo,
    MakeBlock,
    MakeSym,
    Refer,
    Truncate,
    IoctlDev,
}

impl FsRight {
    /// Every right Landlock ABI 7 knows; all of them are handled (denied unless granted).
    pub const ALL: [FsRight; 16] = [
        FsRight::Execute,
        FsRight::WriteFile,
        FsRight::ReadFile,
        FsRight::ReadDir,
        FsRight::RemoveDir,
        FsRight::RemoveFile,
        FsRight::MakeChar,
        FsRight::MakeDir,
        FsRight::MakeReg,
        FsRight::MakeSock,
        FsRight::MakeFifo,
        FsRight::MakeBlock,
        FsRight::MakeSym,
        FsRight::Refer,
        FsRight::Truncate,
        FsRight::IoctlDev,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FsRight::Execute => "execute",
            FsRight::WriteFile => "write-file",
            FsRight::ReadFile => "read-file",
            FsRight::ReadDir => "read-dir",
            FsRight::RemoveDir => "remove-dir",
            FsRight::RemoveFile => "remove-file",
            FsRight::MakeChar => "make-char",
            FsRight::MakeDir => "make-dir",
            FsRight::MakeReg => "make-reg",
            FsRight::MakeSock => "make-sock",
            FsRight::MakeFifo => "make-fifo",
            FsRight::MakeBlock => "make-block",
            FsRight::MakeSym => "make-sym",
            FsRight::Refer => "refer",
            FsRight::Truncate => "truncate",
            FsRight::IoctlDev => "ioctl-dev",
        }
    }

    /// Rights that apply to a file (not only to a directory's entries).
    pub fn applies_to_files(self) -> bool {
        matches!(self, FsRight::Execute | FsRight::WriteFile | FsRight::ReadFile | FsRight::Truncate | FsRight::IoctlDev)
    }

    fn parse(s: &str) -> Option<FsRight> {
        FsRight::ALL.into_iter().find(|r| r.name() == s)
    }
}

/// A set of filesystem rights. In TOML: a list of right names, where `"ro"` stands for
/// read-file + read-dir and `"rw"` for ro + write-file, make-reg, make-dir, remove-file,
/// remove-dir, truncate; a single string is accepted for one name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "AccessList", into = "Vec<FsRight>")]
pub struct AccessSet(pub BTreeSet<FsRight>);

impl AccessSet {
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<AccessSet, String> {
        let mut set = BTreeSet::new();
        for name in names {
            match name.as_ref() {
                "ro" => set.extend([FsRight::ReadFile, FsRight::ReadDir]),
                "rw" => set.extend([
                    FsRight::ReadFile,
                    FsRight::ReadDir,
                    FsRight::WriteFile,
                    FsRight::MakeReg,
                    FsRight::MakeDir,
                    FsRight::RemoveFile,
                    FsRight::RemoveDir,
                    FsRight::Truncate,
                ]),
                other => {
                    let right = FsRight::parse(other).ok_or_else(|| {
                        let known: Vec<&str> = FsRight::ALL.iter().map(|r| r.name()).collect();
                        format!("unknown access right {other:?} (known: ro, rw, {})", known.join(", "))
                    })?;
                    set.insert(right);
                }
            }
        }
        if set.is_empty() {
            return Err("an empty access list grants nothing".into());
        }
        Ok(AccessSet(set))
    }

    /// Read-only: read-file + read-dir.
    pub fn read_only() -> AccessSet {
        AccessSet([FsRight::ReadFile, FsRight::ReadDir].into_iter().collect())
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.0.iter().map(|r| r.name()).collect()
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum AccessList {
    One(String),
    Many(Vec<String>),
}

impl TryFrom<AccessList> for AccessSet {
    type Error = String;
    fn try_from(list: AccessList) -> Result<Self, String> {
        match list {
            AccessList::One(s) => AccessSet::parse(&[s]),
            AccessList::Many(v) => AccessSet::parse(&v),
        }
    }
}

impl From<AccessSet> for Vec<FsRight> {
    fn from(set: AccessSet) -> Self {
        set.0.into_iter().collect()
    }
}

/// Rights beneath a directory the broker hands over, named by its descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdRule {
    pub descriptor: String,
    pub access: AccessSet,
    pub comment: String,
    pub origin: Origin,
}

/// Rights beneath a path (opened with O_PATH by the worker when it applies Landlock).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathRule {
    pub path: PathBuf,
    pub access: AccessSet,
    pub comment: String,
    pub origin: Origin,
}

/// A TCP port the worker may connect to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRule {
    pub port: u16,
    pub comment: String,
    pub origin: Origin,
}

/// Landlock scopes (ABI 6): IPC the worker may not direct outside its domain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scope {
    /// connect/send to abstract unix sockets created outside the sandbox.
    AbstractUnixSocket,
    /// signals to processes outside the sandbox.
    Signal,
}

impl Scope {
    pub fn name(self) -> &'static str {
        match self {
            Scope::AbstractUnixSocket => "abstract-unix-socket",
            Scope::Signal => "signal",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LandlockPolicy {
    /// Every filesystem right is handled: what no rule grants is denied.
    pub fd_rules: Vec<FdRule>,
    pub path_rules: Vec<PathRule>,
    /// Handle TCP bind and connect: only `tcp_connect` ports may be connected to, nothing bound.
    pub restrict_tcp: bool,
    pub tcp_connect: Vec<PortRule>,
    pub scopes: Vec<Scope>,
}

/// Protections without which the worker refuses to start (unless degraded mode is allowed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    pub landlock_fs: bool,
    pub landlock_tcp: bool,
    pub landlock_scopes: bool,
    pub seccomp: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RlimitResource {
    Core,
    Nofile,
    Fsize,
    Memlock,
    Stack,
}

impl RlimitResource {
    pub fn name(self) -> &'static str {
        match self {
            RlimitResource::Core => "core",
            RlimitResource::Nofile => "nofile",
            RlimitResource::Fsize => "fsize",
            RlimitResource::Memlock => "memlock",
            RlimitResource::Stack => "stack",
        }
    }
}

/// A resource limit, applied by lowering only (the worker has no capability to raise).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rlimit {
    pub resource: RlimitResource,
    pub soft: u64,
    pub hard: u64,
    #[serde(default)]
    pub comment: String,
}

/// Grants derived from config by the broker (e.g. the PKCS#11 module's directory, an EST port),
/// each with `Origin::Config(key)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants {
    pub paths: Vec<PathGrant>,
    pub tcp_ports: Vec<PortGrant>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathGrant {
    pub path: PathBuf,
    pub access: AccessSet,
    pub origin: Origin,
}

/// A TCP port the worker may connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortGrant {
    pub port: u16,
    pub origin: Origin,
}

// ---- the built-in service files ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceFile {
    service: String,
    user: String,
    #[serde(rename = "descriptor")]
    descriptors: Vec<DescriptorSpec>,
    landlock: LandlockFile,
    require: Requirements,
    #[serde(rename = "rlimit", default)]
    rlimits: Vec<Rlimit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LandlockFile {
    restrict_tcp: bool,
    #[serde(default)]
    scopes: Vec<Scope>,
    #[serde(default)]
    fd: Vec<RuleFile<String>>,
    #[serde(default)]
    path: Vec<RuleFile<PathBuf>>,
    #[serde(default)]
    tcp_connect: Vec<PortFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile<T> {
    #[serde(alias = "descriptor", alias = "path")]
    target: T,
    access: AccessSet,
    comment: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PortFile {
    port: u16,
    comment: String,
}

fn service_file(service: &str) -> Option<&'static str> {
    Some(match service {
        "keyd" => include_str!("../services/keyd.toml"),
        "certd" => include_str!("../services/certd.toml"),
        "identityd" => include_str!("../services/identityd.toml"),
        "tpmd" => include_str!("../services/tpmd.toml"),
        _ => return None,
    })
}

pub(crate) fn builtin(service: &str) -> Result<Policy, PolicyError> {
    let text = service_file(service).ok_or_else(|| PolicyError::UnknownService(service.to_owned()))?;
    let file_name = format!("services/{service}.toml");
    let bad = |message: String| PolicyError::Builtin { file: file_name.clone(), source: message.into() };
    let file: ServiceFile =
        toml::from_str(text).map_err(|e| PolicyError::Builtin { file: file_name.clone(), source: Box::new(e) })?;
    if file.service != service {
        return Err(bad(format!("names service {:?}", file.service)));
    }
    let ll = file.landlock;
    let fd_rules: Vec<FdRule> = ll
        .fd
        .into_iter()
        .map(|r| FdRule { descriptor: r.target, access: r.access, comment: r.comment, origin: Origin::Builtin })
        .collect();
    for rule in &fd_rules {
        let spec = file.descriptors.iter().find(|d| d.name == rule.descriptor);
        if !spec.is_some_and(|d| d.kind == DescriptorKind::Directory) {
            return Err(bad(format!("fd rule names {:?}, which is not a directory descriptor", rule.descriptor)));
        }
    }
    let mut policy = Policy {
        service: file.service,
        user: file.user,
        descriptors: file.descriptors,
        landlock: LandlockPolicy {
            fd_rules,
            path_rules: ll
                .path
                .into_iter()
                .map(|r| PathRule { path: r.target, access: r.access, comment: r.comment, origin: Origin::Builtin })
                .collect(),
            restrict_tcp: ll.restrict_tcp,
            tcp_connect: ll
                .tcp_connect
                .into_iter()
                .map(|p| PortRule { port: p.port, comment: p.comment, origin: Origin::Builtin })
                .collect(),
            scopes: ll.scopes,
        },
        seccomp: SeccompPolicy::builtin(service)?,
        rlimits: file.rlimits,
        require: file.require,
        warnings: Vec::new(),
    };
    for rule in &policy.landlock.path_rules {
        check_path(&rule.path).map_err(&bad)?;
    }
    finish(&mut policy);
    Ok(policy)
}

pub(crate) fn check_path(path: &std::path::Path) -> Result<(), String> {
    if !path.is_absolute() {
        return Err(format!("path {} is not absolute", path.display()));
    }
    if path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(format!("path {} contains ..", path.display()));
    }
    Ok(())
}

pub(crate) fn add_grants(policy: &mut Policy, grants: &Grants) -> Result<(), PolicyError> {
    for g in &grants.paths {
        check_path(&g.path).map_err(|message| PolicyError::Grant { origin: g.origin.to_string(), message })?;
        policy.landlock.path_rules.push(PathRule {
            path: g.path.clone(),
            access: g.access.clone(),
            comment: "derived from config".into(),
            origin: g.origin.clone(),
        });
    }
    for g in &grants.tcp_ports {
        if g.port == 0 {
            return Err(PolicyError::Grant { origin: g.origin.to_string(), message: "TCP port 0".into() });
        }
        policy.landlock.tcp_connect.push(PortRule {
            port: g.port,
            comment: "derived from config".into(),
            origin: g.origin.clone(),
        });
    }
    Ok(())
}

/// Final touches: duplicate ports removed (first origin kept), warnings for rules without effect.
pub(crate) fn finish(policy: &mut Policy) {
    let mut seen = BTreeSet::new();
    policy.landlock.tcp_connect.retain(|p| seen.insert(p.port));
    let has_socket = policy.seccomp.allows("socket");
    for p in &policy.landlock.tcp_connect {
        let warning = if !has_socket {
            format!(
                "TCP port {} ({}) has no effect: the {} allowlist has no socket()",
                p.port, p.origin, policy.service
            )
        } else if !policy.landlock.restrict_tcp {
            format!("TCP port {} ({}) has no effect: TCP is not restricted for {}", p.port, p.origin, policy.service)
        } else {
            continue;
        };
        if !policy.warnings.contains(&warning) {
            policy.warnings.push(warning);
        }
    }
}
