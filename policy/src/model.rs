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
    /// The worker's private mount namespace (`[mount_namespace]`): which directories a fresh
    /// tmpfs masks and which sockets (config grants) stay reachable in them.
    #[serde(default)]
    pub mount_namespace: MountNamespacePolicy,
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

/// One `[[descriptor]]` of a service's policy: a descriptor the broker may hand the worker.
///
/// How a hand-off name (the manifest's `descriptors[].name`) matches a declaration:
/// - without `handoff_prefix`, the hand-off name is exactly `name`, at most once;
/// - with `handoff_prefix` (only with `multiple = true`; it ends with `:`), the hand-off names are
///   `<handoff_prefix><id>` with a non-empty `<id>`, any number of them, each at most once
///   (e.g. `name = "preloaded-keys"`, `handoff_prefix = "preloaded-key:"` matches
///   `preloaded-key:k1`, `preloaded-key:k2`). `name` is what Landlock `fd` rules refer to.
/// - The handed descriptor's kind is `kind` or one of `alt_kinds`.
/// - A declaration without `optional = true` must be matched at least once.
///
/// Anything else — a name no declaration matches, a kind mismatch, a missing required
/// descriptor, a repeated name — is a refusal to start ([`Policy::check_handoff`]), in the broker
/// before it spawns the worker and again in the worker on receipt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DescriptorSpec {
    pub name: String,
    pub kind: DescriptorKind,
    /// Other kinds the descriptor may have (tpmd's `tpm`: a device, or a socket to a simulator).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alt_kinds: Vec<DescriptorKind>,
    /// Which config value (or unit) names the resource (documentation).
    pub source: String,
    /// Several descriptors of this declaration may be handed over (e.g. one per preloaded key
    /// file), named `<handoff_prefix><id>`.
    #[serde(default)]
    pub multiple: bool,
    /// The hand-off name prefix of a `multiple` declaration (e.g. `preloaded-key:`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff_prefix: Option<String>,
    /// The broker may hand over none.
    #[serde(default)]
    pub optional: bool,
}

impl DescriptorSpec {
    /// Whether the hand-off name `name` is one of this declaration's.
    pub fn matches(&self, name: &str) -> bool {
        match &self.handoff_prefix {
            Some(prefix) => name.strip_prefix(prefix.as_str()).is_some_and(|id| !id.is_empty()),
            None => name == self.name,
        }
    }

    /// Whether a descriptor of `kind` may be handed as this declaration.
    pub fn allows_kind(&self, kind: DescriptorKind) -> bool {
        self.kind == kind || self.alt_kinds.contains(&kind)
    }

    /// The kinds allowed, for messages: `device or socket`.
    pub fn kinds_text(&self) -> String {
        std::iter::once(self.kind).chain(self.alt_kinds.iter().copied()).map(|k| k.name()).collect::<Vec<_>>().join(" or ")
    }

    /// The hand-off name(s), for messages: `state`, `preloaded-key:<id>`.
    pub fn handoff_text(&self) -> String {
        match &self.handoff_prefix {
            Some(prefix) => format!("{prefix}<id>"),
            None => self.name.clone(),
        }
    }

    fn validate(&self) -> Result<(), String> {
        match (&self.handoff_prefix, self.multiple) {
            (Some(prefix), true) if prefix.ends_with(':') && prefix.len() > 1 => Ok(()),
            (Some(prefix), true) => Err(format!("descriptor {:?}: handoff_prefix {prefix:?} must end with ':'", self.name)),
            (Some(_), false) => Err(format!("descriptor {:?}: handoff_prefix needs multiple = true", self.name)),
            (None, true) => Err(format!("descriptor {:?}: multiple = true needs a handoff_prefix", self.name)),
            (None, false) => Ok(()),
        }
    }
}

/// Why the descriptors handed to a worker do not match its policy's `[[descriptor]]` entries.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandoffProblem {
    #[error("descriptor {name:?} ({kind}) is not declared by the policy's [[descriptor]] entries (declared: {declared})")]
    Undeclared { name: String, kind: &'static str, declared: String },
    #[error("descriptor {name:?} is a {kind}, but the policy declares {declaration:?} as {expected}")]
    WrongKind { name: String, kind: &'static str, declaration: String, expected: String },
    #[error("descriptor {name:?} is handed over more than once")]
    Repeated { name: String },
    #[error("the policy requires descriptor {name:?} ({kind}) and none was handed over")]
    Missing { name: String, kind: String },
}

impl Policy {
    /// Checks the descriptors a worker is handed (hand-off name and kind, in manifest order)
    /// against the policy's `[[descriptor]]` entries, by the rule of [`DescriptorSpec`].
    pub fn check_handoff<'a>(
        &self,
        handed: impl IntoIterator<Item = (&'a str, DescriptorKind)>,
    ) -> Result<(), PolicyError> {
        let refuse = |problem| PolicyError::Handoff { service: self.service.clone(), problem };
        let mut seen: BTreeSet<&str> = BTreeSet::new();
        let mut matched = vec![false; self.descriptors.len()];
        for (name, kind) in handed {
            let Some(i) = self.descriptors.iter().position(|d| d.matches(name)) else {
                let declared = self.descriptors.iter().map(DescriptorSpec::handoff_text).collect::<Vec<_>>().join(", ");
                return Err(refuse(HandoffProblem::Undeclared { name: name.to_owned(), kind: kind.name(), declared }));
            };
            let spec = &self.descriptors[i];
            if !spec.allows_kind(kind) {
                return Err(refuse(HandoffProblem::WrongKind {
                    name: name.to_owned(),
                    kind: kind.name(),
                    declaration: spec.name.clone(),
                    expected: spec.kinds_text(),
                }));
            }
            if !seen.insert(name) {
                return Err(refuse(HandoffProblem::Repeated { name: name.to_owned() }));
            }
            matched[i] = true;
        }
        if let Some(spec) = self.descriptors.iter().zip(&matched).find(|(d, m)| !d.optional && !**m).map(|(d, _)| d) {
            return Err(refuse(HandoffProblem::Missing { name: spec.handoff_text(), kind: spec.kinds_text() }));
        }
        Ok(())
    }
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
    /// Connect or send to a pathname unix socket (Landlock ABI 9).
    ResolveUnix,
}

impl FsRight {
    /// Every right the `landlock` crate knows (up to ABI 9's resolve-unix); all of them are
    /// requested (denied unless granted), best effort: a kernel enforces those of its ABI.
    pub const ALL: [FsRight; 17] = [
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
        FsRight::ResolveUnix,
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
            FsRight::ResolveUnix => "resolve-unix",
        }
    }

    /// Rights that apply to a file (not only to a directory's entries).
    pub fn applies_to_files(self) -> bool {
        matches!(
            self,
            FsRight::Execute | FsRight::WriteFile | FsRight::ReadFile | FsRight::Truncate | FsRight::IoctlDev | FsRight::ResolveUnix
        )
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
    /// A PKCS#11 module is configured (`[aziot_keys] pkcs11_lib_path`): the worker runs the
    /// service's `+pkcs11` seccomp program (`seccomp/keyd+pkcs11.json`: the module's file locks,
    /// ftruncate, unlink), which a worker without a module never gets.
    pub pkcs11: bool,
    /// Pathname unix sockets the worker connects to (the endpoints of the services it calls,
    /// e.g. `[endpoints] aziot_keyd`): the only sockets its private mount namespace keeps
    /// reachable beneath the masked directories.
    pub sockets: Vec<SocketGrant>,
}

/// A pathname unix socket the worker may reach (derived from config).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SocketGrant {
    pub path: PathBuf,
    pub origin: Origin,
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

/// `[mount_namespace]`: the broker gives the worker a private mount namespace in which a fresh,
/// empty tmpfs covers each `mask` directory, and only the granted sockets are bound back in, at
/// the same paths (docs/security.md, "Pathname unix sockets"). This stands in for Landlock ABI
/// 9's `resolve-unix` on kernels without it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountNamespacePolicy {
    pub enabled: bool,
    /// Directories covered by an empty tmpfs (absolute, none beneath another).
    #[serde(default)]
    pub mask: Vec<PathBuf>,
    /// The sockets the worker may reach (config grants), each with its origin.
    #[serde(default)]
    pub sockets: Vec<SocketRule>,
}

/// A pathname unix socket kept reachable in the worker's mount namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketRule {
    pub path: PathBuf,
    pub origin: Origin,
}

/// What the broker does in the worker's private mount namespace, computed from the policy
/// ([`Policy::mount_plan`]): the masks, the directories to create inside them (parents first),
/// the socket binds, and the granted sockets that need no bind (not beneath a mask).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountPlan {
    /// Each gets a fresh tmpfs (nosuid, nodev, noexec, mode 0755, small), read-only once filled.
    pub masks: Vec<PathBuf>,
    /// Directories created in the tmpfs for the binds, parents first (mode 0755, root's).
    pub dirs: Vec<PathBuf>,
    /// Sockets bound back at the same path (an empty file is the mount point).
    pub binds: Vec<PathBuf>,
    /// Granted sockets outside every mask: reachable as they are, nothing to bind.
    pub unmasked: Vec<PathBuf>,
}

impl Policy {
    /// The mount namespace plan, `None` when the policy does not ask for one.
    pub fn mount_plan(&self) -> Option<MountPlan> {
        let ns = &self.mount_namespace;
        if !ns.enabled {
            return None;
        }
        let mut plan = MountPlan { masks: ns.mask.clone(), ..MountPlan::default() };
        for socket in &ns.sockets {
            let path = &socket.path;
            let Some(mask) = ns.mask.iter().find(|m| path.starts_with(m) && path != *m) else {
                if !plan.unmasked.contains(path) {
                    plan.unmasked.push(path.clone());
                }
                continue;
            };
            if plan.binds.contains(path) {
                continue;
            }
            // The directories between the mask and the socket, parents first.
            let mut missing: Vec<PathBuf> = path.ancestors().skip(1).take_while(|a| a != mask).map(PathBuf::from).collect();
            missing.reverse();
            for d in missing {
                if !plan.dirs.contains(&d) {
                    plan.dirs.push(d);
                }
            }
            plan.binds.push(path.clone());
        }
        Some(plan)
    }
}

fn check_masks(masks: &[PathBuf]) -> Result<(), String> {
    for (i, m) in masks.iter().enumerate() {
        check_path(m)?;
        if m.parent().is_none() {
            return Err("[mount_namespace] cannot mask /".into());
        }
        if let Some(other) = masks.iter().enumerate().find(|(j, o)| *j != i && m.starts_with(o)) {
            return Err(format!("[mount_namespace] mask {} is beneath (or repeats) mask {}", m.display(), other.1.display()));
        }
    }
    Ok(())
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
    #[serde(default)]
    mount_namespace: Option<MountNamespaceFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MountNamespaceFile {
    enabled: bool,
    mask: Vec<PathBuf>,
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

pub(crate) fn builtin(service: &str) -> Result<Policy, PolicyError> {
    let info = crate::services::by_short(service).ok_or_else(|| PolicyError::UnknownService(service.to_owned()))?;
    let text = info.policy_toml;
    let file_name = info.policy_file.to_owned();
    let bad = |message: String| PolicyError::Builtin { file: file_name.clone(), source: message.into() };
    let file: ServiceFile =
        toml::from_str(text).map_err(|e| PolicyError::Builtin { file: file_name.clone(), source: Box::new(e) })?;
    if file.service != service {
        return Err(bad(format!("names service {:?}", file.service)));
    }
    if file.user != info.user {
        return Err(bad(format!("names user {:?}, the service table {:?}", file.user, info.user)));
    }
    for (i, d) in file.descriptors.iter().enumerate() {
        d.validate().map_err(&bad)?;
        if file.descriptors[..i].iter().any(|e| e.name == d.name) {
            return Err(bad(format!("descriptor {:?} is declared twice", d.name)));
        }
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
        mount_namespace: file
            .mount_namespace
            .map(|m| MountNamespacePolicy { enabled: m.enabled, mask: m.mask, sockets: Vec::new() })
            .unwrap_or_default(),
        warnings: Vec::new(),
    };
    for rule in &policy.landlock.path_rules {
        check_path(&rule.path).map_err(&bad)?;
    }
    check_masks(&policy.mount_namespace.mask).map_err(&bad)?;
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
    if grants.pkcs11 {
        policy.seccomp = SeccompPolicy::variant(&policy.service, "pkcs11")?;
    }
    for g in &grants.paths {
        check_path(&g.path).map_err(|message| PolicyError::Grant { origin: g.origin.to_string(), message })?;
        policy.landlock.path_rules.push(PathRule {
            path: g.path.clone(),
            access: g.access.clone(),
            comment: "derived from config".into(),
            origin: g.origin.clone(),
        });
    }
    for g in &grants.sockets {
        check_path(&g.path).map_err(|message| PolicyError::Grant { origin: g.origin.to_string(), message })?;
        if g.path.parent().is_none() {
            return Err(PolicyError::Grant { origin: g.origin.to_string(), message: "socket path /".into() });
        }
        // `/run/./aziot/keyd.sock` is `/run/aziot/keyd.sock`.
        let path: PathBuf = g.path.components().collect();
        if !policy.mount_namespace.sockets.iter().any(|s| s.path == path) {
            policy.mount_namespace.sockets.push(SocketRule { path, origin: g.origin.clone() });
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use DescriptorKind::*;

    fn problem(r: Result<(), PolicyError>) -> HandoffProblem {
        match r {
            Err(PolicyError::Handoff { problem, .. }) => problem,
            other => panic!("expected a hand-off refusal, got {other:?}"),
        }
    }

    #[test]
    fn declared_descriptors_are_accepted() {
        let keyd = builtin("keyd").unwrap();
        keyd.check_handoff([("listener", UnixListener)]).unwrap();
        keyd.check_handoff([
            ("listener", UnixListener),
            ("state", Directory),
            ("preloaded-key:a", Directory),
            ("preloaded-key:b", Directory),
        ])
        .unwrap();
        let tpmd = builtin("tpmd").unwrap();
        tpmd.check_handoff([("listener", UnixListener), ("tpm", Device)]).unwrap();
        tpmd.check_handoff([("listener", UnixListener), ("tpm", Socket)]).unwrap();
    }

    #[test]
    fn an_undeclared_descriptor_is_refused_by_name() {
        let keyd = builtin("keyd").unwrap();
        let err = keyd.check_handoff([("listener", UnixListener), ("extra", Directory)]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("refusing to start the keyd worker")
                && text.contains("\"extra\" (directory) is not declared")
                && text.contains("declared: listener, state, preloaded-key:<id>"),
            "{text}"
        );
        // tpmd has no preloaded keys; a declaration's own name is not a hand-off name of a
        // `multiple` entry; an empty id is no id.
        let tpmd = builtin("tpmd").unwrap();
        for (policy, name) in [(&tpmd, "preloaded-key:a"), (&keyd, "preloaded-keys"), (&keyd, "preloaded-key:")] {
            let handed = [("listener", UnixListener), (name, Directory)];
            let handed = if policy.service == "tpmd" { handed.to_vec().into_iter().chain([("tpm", Device)]).collect() } else { handed.to_vec() };
            assert!(matches!(problem(policy.check_handoff(handed)), HandoffProblem::Undeclared { .. }), "{name}");
        }
    }

    #[test]
    fn a_kind_mismatch_is_refused() {
        let keyd = builtin("keyd").unwrap();
        let p = problem(keyd.check_handoff([("listener", UnixListener), ("state", File)]));
        assert_eq!(
            p.to_string(),
            "descriptor \"state\" is a file, but the policy declares \"state\" as directory"
        );
        let p = problem(keyd.check_handoff([("listener", Socket)]));
        assert!(matches!(p, HandoffProblem::WrongKind { .. }));
        let tpmd = builtin("tpmd").unwrap();
        let p = problem(tpmd.check_handoff([("listener", UnixListener), ("tpm", Directory)]));
        assert!(p.to_string().contains("as device or socket"), "{p}");
    }

    #[test]
    fn a_missing_required_descriptor_is_refused() {
        let keyd = builtin("keyd").unwrap();
        let p = problem(keyd.check_handoff([("state", Directory)]));
        assert_eq!(p, HandoffProblem::Missing { name: "listener".into(), kind: "unix-listener".into() });
        let tpmd = builtin("tpmd").unwrap();
        let p = problem(tpmd.check_handoff([("listener", UnixListener)]));
        assert!(p.to_string().contains("requires descriptor \"tpm\" (device or socket)"), "{p}");
    }

    #[test]
    fn a_repeated_descriptor_is_refused() {
        let keyd = builtin("keyd").unwrap();
        for dup in ["listener", "preloaded-key:a"] {
            let kind = if dup == "listener" { UnixListener } else { Directory };
            let p = problem(keyd.check_handoff([("listener", UnixListener), (dup, kind), ("preloaded-key:a", Directory)]));
            assert!(matches!(p, HandoffProblem::Repeated { .. }), "{dup}: {p}");
        }
    }

    #[test]
    fn declarations_must_say_how_they_match() {
        let spec = |multiple, prefix: Option<&str>| DescriptorSpec {
            name: "d".into(),
            kind: Directory,
            alt_kinds: vec![],
            source: String::new(),
            multiple,
            handoff_prefix: prefix.map(Into::into),
            optional: true,
        };
        spec(false, None).validate().unwrap();
        spec(true, Some("d:")).validate().unwrap();
        assert!(spec(true, None).validate().unwrap_err().contains("needs a handoff_prefix"));
        assert!(spec(false, Some("d:")).validate().unwrap_err().contains("needs multiple = true"));
        assert!(spec(true, Some("d")).validate().unwrap_err().contains("must end with ':'"));
    }

    #[test]
    fn every_service_in_the_table_has_a_consistent_policy() {
        use crate::services::{by_any_name, by_program, by_short, SERVICES, SHORT_NAMES};
        assert_eq!(crate::SERVICES, SHORT_NAMES);
        for info in SERVICES {
            let policy = builtin(info.short).unwrap();
            assert_eq!(policy.user, info.user);
            assert_eq!(policy.service, info.short);
            assert_eq!(by_short(info.short), Some(info));
            assert_eq!(by_program(info.program), Some(info));
            assert_eq!(by_any_name(info.service_unit), Some(info));
            assert_eq!(info.program, format!("aziot-{}", info.short));
            assert_eq!(info.service_unit, format!("{}.service", info.program));
            assert!(info.policy_toml.contains(&format!("service = {:?}", info.short)));
            assert!(info.default_socket.starts_with("/run/aziot/"));
            // Every multiple declaration names its hand-off prefix.
            assert!(policy.descriptors.iter().all(|d| d.multiple == d.handoff_prefix.is_some()));
        }
        assert_eq!(crate::services::get("tpmd").user, "aziottpm");
        assert!(by_short("aziot-keyd").is_none() && by_program("keyd").is_none());
    }

    fn socket_grants(paths: &[&str]) -> Grants {
        Grants {
            sockets: paths
                .iter()
                .map(|p| SocketGrant { path: PathBuf::from(p), origin: Origin::Config("endpoints.aziot_keyd".into()) })
                .collect(),
            ..Grants::default()
        }
    }

    #[test]
    fn mount_plan_masks_the_policys_directories_and_binds_only_granted_sockets() {
        // keyd and tpmd have no socket() at all: no namespace.
        for svc in ["keyd", "tpmd"] {
            assert_eq!(builtin(svc).unwrap().mount_plan(), None, "{svc}");
        }
        let mut certd = builtin("certd").unwrap();
        let masks: Vec<PathBuf> = ["/run", "/tmp", "/var/tmp", "/dev/shm"].iter().map(PathBuf::from).collect();
        assert_eq!(certd.mount_plan().unwrap(), MountPlan { masks: masks.clone(), ..MountPlan::default() });
        add_grants(
            &mut certd,
            &socket_grants(&[
                "/run/aziot/keyd.sock",
                "/run/./aziot/keyd.sock", // the same socket, spelled differently
                "/tmp/aziot-test/a/b/keyd.sock",
                "/var/lib/aziot/other.sock", // not beneath a mask: reachable anyway
            ]),
        )
        .unwrap();
        let plan = certd.mount_plan().unwrap();
        let paths = |v: &[&str]| v.iter().map(PathBuf::from).collect::<Vec<_>>();
        assert_eq!(plan.masks, masks);
        assert_eq!(plan.dirs, paths(&["/run/aziot", "/tmp/aziot-test", "/tmp/aziot-test/a", "/tmp/aziot-test/a/b"]));
        assert_eq!(plan.binds, paths(&["/run/aziot/keyd.sock", "/tmp/aziot-test/a/b/keyd.sock"]));
        assert_eq!(plan.unmasked, paths(&["/var/lib/aziot/other.sock"]));
        // Each socket is recorded once, with its origin (shown by `aziotctl policy show`).
        assert_eq!(certd.mount_namespace.sockets.len(), 3);
        assert_eq!(certd.mount_namespace.sockets[0].origin, Origin::Config("endpoints.aziot_keyd".into()));
        // identityd: the same masks, three sibling sockets.
        let mut identityd = builtin("identityd").unwrap();
        add_grants(&mut identityd, &socket_grants(&["/run/aziot/keyd.sock", "/run/aziot/certd.sock", "/run/aziot/tpmd.sock"])).unwrap();
        let plan = identityd.mount_plan().unwrap();
        assert_eq!(plan.masks, masks);
        assert_eq!(plan.dirs, paths(&["/run/aziot"]));
        assert_eq!(plan.binds.len(), 3);
    }

    #[test]
    fn bad_masks_and_socket_grants_are_refused() {
        let p = |v: &[&str]| v.iter().map(PathBuf::from).collect::<Vec<_>>();
        assert!(check_masks(&p(&["/run", "/tmp"])).is_ok());
        assert!(check_masks(&p(&["/run", "/run/aziot"])).unwrap_err().contains("beneath (or repeats) mask /run"));
        assert!(check_masks(&p(&["/run", "/run"])).is_err());
        assert!(check_masks(&p(&["/"])).unwrap_err().contains("cannot mask /"));
        assert!(check_masks(&p(&["run"])).unwrap_err().contains("not absolute"));
        assert!(check_masks(&p(&["/run/../etc"])).unwrap_err().contains(".."));
        let mut certd = builtin("certd").unwrap();
        for bad in ["relative.sock", "/run/../etc/x.sock", "/"] {
            let e = add_grants(&mut certd, &socket_grants(&[bad])).unwrap_err();
            assert!(e.to_string().contains("config endpoints.aziot_keyd"), "{bad}: {e}");
        }
    }
}
