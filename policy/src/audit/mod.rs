//! `aziotctl policy audit`: compares a running service (broker + worker, from /proc, ptrace and
//! the status file) with its policy. Every check is a [`Finding`]; any deviation fails the audit.

mod filters;
mod procfs;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::model::{DescriptorKind, Policy};
use crate::seccomp::{digest_of, SeccompMode};
use crate::status::Status;
use crate::Credentials;
use procfs::{FdClass, TaskStatus};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// `broker 12`, `worker 34`, `status file`...
    pub subject: String,
    /// What was compared, e.g. `capabilities`, `seccomp program`.
    pub check: String,
    pub expected: String,
    pub actual: String,
    pub ok: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct AuditReport {
    pub service: String,
    pub status_path: PathBuf,
    pub ok: bool,
    pub findings: Vec<Finding>,
}

impl AuditReport {
    /// No deviation.
    pub fn ok(&self) -> bool {
        self.findings.iter().all(|f| f.ok)
    }

    pub fn deviations(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| !f.ok)
    }

    pub fn render_human(&self) -> String {
        let mut out = String::new();
        let n = self.deviations().count();
        let verdict = if n == 0 { "ok".to_owned() } else { format!("{n} DEVIATION(S)") };
        let _ = writeln!(out, "{}: {verdict} ({})", self.service, self.status_path.display());
        for f in &self.findings {
            let mark = if f.ok { "ok       " } else { "DEVIATION" };
            let _ = writeln!(out, "  {mark} {:<12} {:<22} {}", f.subject, f.check, f.actual);
            if !f.ok {
                let _ = writeln!(out, "  {:<9} {:<12} {:<22} expected: {}", "", "", "", f.expected);
            }
        }
        out
    }

    fn push(&mut self, subject: &str, check: &str, expected: impl Into<String>, actual: impl Into<String>, ok: bool) {
        self.findings.push(Finding {
            subject: subject.to_owned(),
            check: check.to_owned(),
            expected: expected.into(),
            actual: actual.into(),
            ok,
        });
    }
}

/// Audits every service whose status file exists in `run_dir` (e.g. /run/aziot).
pub fn audit_running(run_dir: &Path) -> Vec<AuditReport> {
    crate::SERVICES
        .iter()
        .map(|svc| crate::status_path(run_dir, svc))
        .filter(|p| p.exists())
        .map(|p| {
            let svc = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_owned();
            audit_service(&svc, &p)
        })
        .collect()
}

/// The default state directory of `service`: `/var/lib/aziot/<svc>`
/// ([`crate::services::ServiceInfo::default_state_dir`]).
pub fn default_state_dir(service: &str) -> PathBuf {
    match crate::services::by_short(service) {
        Some(info) => PathBuf::from(info.default_state_dir),
        None => PathBuf::from(format!("/var/lib/aziot/{service}")),
    }
}

/// Compares the running `service` described by `status_path` with its built-in policy, the
/// worker's state directory being the default one ([`default_state_dir`]).
pub fn audit_service(service: &str, status_path: &Path) -> AuditReport {
    audit_service_with(service, status_path, &[default_state_dir(service)])
}

/// As [`audit_service`], with the state directories the config names (files the worker has
/// open must lie beneath one of them or beneath a path rule of the policy).
pub fn audit_service_with(service: &str, status_path: &Path, state_dirs: &[PathBuf]) -> AuditReport {
    let mut r = AuditReport { service: service.to_owned(), status_path: status_path.to_owned(), ok: false, findings: Vec::new() };
    run(&mut r, service, status_path, state_dirs);
    r.ok = r.ok();
    r
}

fn run(r: &mut AuditReport, service: &str, status_path: &Path, state_dirs: &[PathBuf]) {
    let policy = match crate::builtin(service) {
        Ok(p) => p,
        Err(e) => return r.push("policy", "built-in policy", "a policy", e.to_string(), false),
    };
    let status = match Status::read(status_path) {
        Ok(s) => s,
        Err(e) => return r.push("status file", "readable", "written by a running broker", error_chain(&e), false),
    };
    r.push("status file", "service", service, &status.service, status.service == service);
    // The program the broker chose from config (a PKCS#11 module selects keyd+pkcs11): the live
    // program must be that one, and it must be one of this service's.
    let mut policy = policy;
    let program = if status.seccomp_program.is_empty() { service } else { status.seccomp_program.as_str() };
    let variants = crate::SeccompPolicy::variants_of(service);
    let chosen = if program == service {
        Ok(policy.seccomp.clone())
    } else if variants.contains(&program) {
        let variant = program.strip_prefix(service).and_then(|v| v.strip_prefix('+')).unwrap_or_default();
        crate::SeccompPolicy::variant(service, variant).map_err(|e| e.to_string())
    } else {
        Err(format!("{program:?} is not a program of {service}"))
    };
    let known = std::iter::once(service).chain(variants.iter().copied()).collect::<Vec<_>>().join(", ");
    match chosen {
        Ok(sp) => {
            let why = if sp.variant_when.is_empty() { "the service's own".to_owned() } else { sp.variant_when.clone() };
            r.push("status file", "seccomp variant", format!("one of {known}"), format!("{program} ({why})"), true);
            policy.seccomp = sp;
        }
        // The other checks still run, against the service's own program.
        Err(e) => r.push("status file", "seccomp variant", format!("one of {known}"), e, false),
    }
    let creds = match crate::resolve_credentials(&policy) {
        Ok(c) => c,
        Err(e) => return r.push("policy", "worker user", &policy.user, error_chain(&e), false),
    };
    // Filters the broker carries (systemd's SystemCallFilter=, say) are inherited by the worker
    // and come first in its filter list; the worker's own two follow.
    let inherited = broker(r, &status);
    let mode = status.seccomp_mode.parse::<SeccompMode>().ok();
    worker_tasks(r, &status, &creds, mode, inherited);
    worker_fds(r, &policy, &status, state_dirs);
    seccomp_program(r, &policy, &status, mode, inherited);
    mount_namespace(r, &policy, &status);
    sandbox_report(r, &policy, &status, mode);
}

/// The worker's private mount namespace, from outside: its /proc/<pid>/ns/mnt is not the
/// broker's, and its /proc/<pid>/mountinfo shows a hardened tmpfs over each of the policy's masks
/// with exactly the recorded socket binds on top (`crate::mountns::check_mounts`).
fn mount_namespace(r: &mut AuditReport, policy: &Policy, status: &Status) {
    let subject = format!("worker {}", status.worker_pid);
    if !policy.mount_namespace.enabled {
        return r.push(&subject, "mount namespace", "none (the policy has none)", "not used", true);
    }
    let Some(rec) = &status.mount_namespace else {
        return r.push(&subject, "mount namespace", "a private mount namespace", "none recorded in the status file", false);
    };
    if !rec.in_force {
        return r.push(&subject, "mount namespace", "a private mount namespace", format!("NOT in force: {}", rec.not_in_force), false);
    }
    let mut masks: Vec<&PathBuf> = rec.masks.iter().chain(&rec.absent_masks).collect();
    masks.sort();
    let mut want: Vec<&PathBuf> = policy.mount_namespace.mask.iter().collect();
    want.sort();
    let show = |v: &[PathBuf]| v.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    r.push(
        "status file",
        "masked directories",
        format!("the policy's: {}", show(&policy.mount_namespace.mask)),
        format!("{} (absent here: {})", show(&rec.masks), if rec.absent_masks.is_empty() { "none".to_owned() } else { show(&rec.absent_masks) }),
        masks == want,
    );
    let ns = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).map(|p| p.display().to_string());
    if rec.made_by == crate::mountns::MadeBy::Unit {
        return unit_mount_namespace(r, policy, status, rec, &subject);
    }
    match (ns(status.worker_pid), ns(status.broker_pid)) {
        (Ok(w), Ok(b)) => r.push(&subject, "mount namespace", format!("its own (not the broker's {b})"), w.clone(), w != b),
        (w, b) => r.push(&subject, "mount namespace", "readable", format!("worker {w:?}, broker {b:?}"), false),
    }
    match std::fs::read_to_string(format!("/proc/{}/mountinfo", status.worker_pid)) {
        Ok(text) => {
            let problems = crate::mountns::check_mounts(rec, &crate::mountns::parse_mountinfo(&text));
            let expected = format!(
                "a tmpfs ro,nosuid,nodev,noexec over each mask; on it only the sockets {}",
                if rec.binds.is_empty() { "(none)".to_owned() } else { show(&rec.binds) }
            );
            let actual = if problems.is_empty() {
                format!("tmpfs over {}; sockets bound: {}", show(&rec.masks), if rec.binds.is_empty() { "none".to_owned() } else { show(&rec.binds) })
            } else {
                problems.join("; ")
            };
            r.push(&subject, "mounts", expected, actual, problems.is_empty());
        }
        Err(e) => r.push(&subject, "mounts", "/proc/<pid>/mountinfo readable", e.to_string(), false),
    }
}

/// A namespace systemd made for the unit (`made_by: unit`), which broker and worker share: it
/// is not the auditor's (the host's), and seen through /proc/<pid>/root it hides every socket
/// the worker's user may connect to but the granted ones and those the status file lists as
/// the broker's or siblings (`crate::mountns::verify_view`, the broker's own check, re-run).
fn unit_mount_namespace(r: &mut AuditReport, policy: &Policy, status: &Status, rec: &crate::mountns::MountNsRecord, subject: &str) {
    let pid = status.worker_pid;
    let ns = |p: String| std::fs::read_link(p).map(|p| p.display().to_string());
    match (ns(format!("/proc/{pid}/ns/mnt")), ns("/proc/self/ns/mnt".into())) {
        (Ok(w), Ok(me)) => r.push(subject, "mount namespace", format!("made by the unit (systemd), not the host's {me}"), w.clone(), w != me),
        (w, me) => r.push(subject, "mount namespace", "readable", format!("worker {w:?}, aziotctl {me:?}"), false),
    }
    // The granted sockets: the policy's, and those of the config's grants the broker recorded.
    let mut granted = policy.mount_plan().map(|p| p.binds).unwrap_or_default();
    granted.extend(rec.binds.iter().cloned());
    let checked = crate::mountns::Reach::of_process(pid)
        .map_err(|e| vec![format!("/proc/{pid}/status: {e}")])
        .and_then(|who| {
            let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).map_err(|e| vec![format!("/proc/{pid}/mountinfo: {e}")])?;
            crate::mountns::verify_view(Path::new(&format!("/proc/{pid}/root")), &mountinfo, &policy.mount_namespace.mask, &granted, &rec.also_reachable, &who)
        });
    let show = |v: &[PathBuf]| if v.is_empty() { "none".to_owned() } else { v.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ") };
    match checked {
        Ok(view) => r.push(
            subject,
            "mounts",
            "each mask a mount of its own; the only sockets its user may connect to beneath them: granted, the broker's, siblings of granted ones",
            format!("masked: {}; granted sockets: {}; also reachable: {}", show(&view.masks), show(&view.binds), show(&view.also_reachable)),
            true,
        ),
        Err(problems) => r.push(subject, "mounts", "only the granted sockets reachable beneath the masks", problems.join("; "), false),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let _ = write!(s, ": {c}");
        cur = c.source();
    }
    s
}

/// Checks the broker; returns the number of seccomp filters it has (inherited by the worker).
fn broker(r: &mut AuditReport, status: &Status) -> u32 {
    let subject = format!("broker {}", status.broker_pid);
    let tasks = match procfs::tasks(status.broker_pid) {
        Ok(t) => t,
        Err(e) => {
            r.push(&subject, "running", "alive", format!("not running ({e})"), false);
            return 0;
        }
    };
    let main = &tasks[0];
    r.push(&subject, "running", "alive", format!("{} thread(s)", tasks.len()), true);
    let root = main.uids.first() == Some(&0);
    r.push(&subject, "uid", "0 (the broker is root)", format!("{:?}", main.uids), root);
    let leaks = tasks.iter().all(|t| t.cap_inh == 0 && t.cap_amb == 0);
    r.push(&subject, "inheritable caps", "CapInh = CapAmb = 0 (nothing passes exec)", format!("{:#x}/{:#x}", main.cap_inh, main.cap_amb), leaks);
    let filters = main.seccomp_filters.unwrap_or(0);
    r.push(&subject, "seccomp filters", "", format!("{filters} (inherited by the worker)"), true);
    filters
}

fn worker_tasks(r: &mut AuditReport, status: &Status, creds: &Credentials, mode: Option<SeccompMode>, inherited: u32) {
    let subject = format!("worker {}", status.worker_pid);
    let tasks = match procfs::tasks(status.worker_pid) {
        Ok(t) => t,
        Err(e) => return r.push(&subject, "running", "alive", format!("not running ({e})"), false),
    };
    let n = tasks.len();
    let ppid = tasks[0].ppid;
    r.push(&subject, "parent", format!("the broker {}", status.broker_pid), ppid.to_string(), ppid == status.broker_pid);
    let mut groups = creds.groups.clone();
    groups.sort_unstable();
    let expect_filters = match mode {
        Some(SeccompMode::Skip) | None => None,
        Some(_) => Some(inherited + 2),
    };
    type Check = (&'static str, String, fn(&TaskStatus, &Credentials, &[u32], Option<u32>) -> bool, fn(&TaskStatus) -> String);
    let checks: Vec<Check> = vec![
        ("uid", format!("{} (real, effective, saved, fs)", creds.uid), |t, c, _, _| t.uids.len() == 4 && t.uids.iter().all(|u| *u == c.uid && *u != 0), |t| format!("{:?}", t.uids)),
        ("gid", format!("{}", creds.gid), |t, c, _, _| t.gids.len() == 4 && t.gids.iter().all(|g| *g == c.gid && *g != 0), |t| format!("{:?}", t.gids)),
        ("groups", format!("{groups:?}"), |t, _, g, _| {
            let mut have = t.groups.clone();
            have.sort_unstable();
            have == g
        }, |t| format!("{:?}", t.groups)),
        ("capabilities", "CapInh, CapPrm, CapEff, CapBnd, CapAmb all 0".into(), |t, _, _, _| t.cap_inh == 0 && t.cap_prm == 0 && t.cap_eff == 0 && t.cap_bnd == 0 && t.cap_amb == 0,
            |t| format!("{:x}/{:x}/{:x}/{:x}/{:x}", t.cap_inh, t.cap_prm, t.cap_eff, t.cap_bnd, t.cap_amb)),
        ("no_new_privs", "1".into(), |t, _, _, _| t.no_new_privs == Some(1), |t| format!("{:?}", t.no_new_privs)),
        ("seccomp", "2 (filter) on every thread".into(), |t, _, _, _| t.seccomp == Some(2), |t| format!("{:?}", t.seccomp)),
        ("seccomp filters", format!("{expect_filters:?} per thread"), |t, _, _, e| e.is_some() && t.seccomp_filters == e, |t| format!("{:?}", t.seccomp_filters)),
    ];
    for (check, expected, pass, show) in checks {
        let bad: Vec<String> = tasks
            .iter()
            .filter(|t| !pass(t, creds, &groups, expect_filters))
            .map(|t| format!("thread {}: {}", t.tid, show(t)))
            .collect();
        if bad.is_empty() {
            r.push(&subject, check, expected, format!("all {n} thread(s): {}", show(&tasks[0])), true);
        } else {
            r.push(&subject, check, expected, bad.join("; "), false);
        }
    }
}

fn worker_fds(r: &mut AuditReport, policy: &Policy, status: &Status, state_dirs: &[PathBuf]) {
    let subject = format!("worker {}", status.worker_pid);
    let pid = status.worker_pid;
    let fds = match procfs::fds(pid) {
        Ok(f) => f,
        Err(e) => return r.push(&subject, "descriptors", "readable", e.to_string(), false),
    };
    let tables = procfs::socket_tables(pid);
    let tcp_ok = policy.seccomp.allows("socket") && policy.landlock.restrict_tcp;
    let udp_ok = allows_dgram(policy);
    let paths: Vec<&PathBuf> = state_dirs
        .iter()
        .chain(status.handed_dirs.iter())
        .chain(policy.landlock.path_rules.iter().map(|p| &p.path))
        .collect();
    // Stdio the worker inherited from its broker (a log file under a test harness, the journal
    // under systemd) is as expected as /dev/null.
    let broker_fds = procfs::fds(status.broker_pid).unwrap_or_default();
    let (mut seen, mut unexpected) = (Vec::new(), Vec::new());
    let mut listening = 0;
    for (fd, link) in &fds {
        let class = procfs::classify(link, &tables);
        let inherited_stdio = *fd <= 2 && broker_fds.iter().any(|(bfd, blink)| bfd == fd && blink == link);
        let handed = std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                status.handed_inodes.contains(&(m.dev(), m.ino()))
            })
            .unwrap_or(false);
        let by_class = match &class {
            FdClass::Stdio(_) | FdClass::Runtime(_) => true,
            FdClass::Unix { listening: l } => {
                listening += usize::from(*l);
                true
            }
            FdClass::Tcp => tcp_ok,
            FdClass::Udp => udp_ok,
            FdClass::Path(p) => paths.iter().any(|d| p.starts_with(d)),
            // A client socket may close between the listing and the table read: recheck.
            FdClass::OtherSocket(kind) if kind == "unknown" => !procfs::still_open(pid, *fd, link),
            FdClass::OtherSocket(_) | FdClass::OtherAnon(_) => false,
        };
        let ok = inherited_stdio || handed || by_class;
        if ok {
            seen.push(format!("{fd}"));
        } else {
            unexpected.push(format!("{fd} -> {link}"));
        }
    }
    let allowed = format!(
        "stdio, runtime (epoll/eventfd/timerfd), unix sockets{}{}, files beneath {:?}",
        if tcp_ok { ", tcp" } else { "" },
        if udp_ok { ", udp" } else { "" },
        paths
    );
    r.push(
        &subject,
        "descriptors",
        allowed,
        if unexpected.is_empty() { format!("{} descriptors, all expected", fds.len()) } else { unexpected.join(", ") },
        unexpected.is_empty(),
    );
    let wants_listener = policy.descriptors.iter().any(|d| d.kind == DescriptorKind::UnixListener && !d.optional);
    if wants_listener {
        r.push(&subject, "listener", "a listening unix socket", format!("{listening} listening"), listening >= 1);
    }
}

fn allows_dgram(policy: &Policy) -> bool {
    crate::apply::allows_udp(policy)
}

/// The worker's per-right Landlock report: the rights it requested must be the policy's (else a
/// deviation), and each requested right this kernel does not enforce is listed (not a deviation:
/// best effort above the policy's baseline ABI; a baseline right missing is a required
/// protection, checked by `unmet`).
fn landlock_rights(r: &mut AuditReport, policy: &Policy, ll: &crate::LandlockReport) {
    let expected: Vec<String> = crate::apply::rights_report(policy, ll.abi)
        .into_iter()
        .filter(|x| x.requested)
        .map(|x| format!("{} {}", x.kind.name(), x.name))
        .collect();
    let requested: Vec<String> =
        ll.rights.iter().filter(|x| x.requested).map(|x| format!("{} {}", x.kind.name(), x.name)).collect();
    let enforced = ll.rights.iter().filter(|x| x.requested && x.enforced).count();
    r.push(
        "status file",
        "landlock rights",
        format!("the policy's {} rights requested", expected.len()),
        if requested == expected {
            format!("{} requested (up to ABI {}), {enforced} enforced by this kernel (ABI {})", requested.len(), ll.requested_abi, ll.abi)
        } else if ll.rights.is_empty() {
            "no per-right Landlock report".to_owned()
        } else {
            format!("requested {}", requested.join(", "))
        },
        requested == expected,
    );
    for x in ll.not_enforced() {
        r.push(
            "status file",
            "landlock right",
            "enforced where the kernel can",
            format!("{} {} (ABI {}): NOT enforced on this kernel ({})", x.kind.name(), x.name, x.since_abi, x.note),
            true,
        );
    }
}

fn seccomp_program(r: &mut AuditReport, policy: &Policy, status: &Status, mode: Option<SeccompMode>, inherited: u32) {
    let subject = format!("worker {}", status.worker_pid);
    let Some(mode) = mode else {
        return r.push(&subject, "seccomp mode", "kill", format!("unknown mode {:?}", status.seccomp_mode), false);
    };
    let expected = policy.seccomp.digest_for(mode).to_owned();
    if mode == SeccompMode::Skip {
        return r.push(&subject, "seccomp program", &policy.seccomp.digest, "none installed (skip mode)", false);
    }
    match filters::dump(status.worker_pid) {
        Ok(all) => {
            let programs = all.get(inherited as usize..).unwrap_or_default();
            let live = digest_of(programs.iter().map(Vec::as_slice));
            let ok = live == expected && live == status.seccomp_digest;
            let sizes: Vec<String> = programs.iter().map(|p| (p.len() / 8).to_string()).collect();
            let actual = format!(
                "sha256 {live} ({} filters: {} instructions; {} inherited from the broker)",
                programs.len(),
                sizes.join(" + "),
                all.len() - programs.len()
            );
            let expect = format!("sha256 {expected} ({mode} mode; status file says {})", status.seccomp_digest);
            r.push(&subject, "seccomp program", expect, actual, ok);
        }
        Err(e) => r.push(&subject, "seccomp program", &expected, format!("could not dump it: {e}"), false),
    }
}

fn sandbox_report(r: &mut AuditReport, policy: &Policy, status: &Status, mode: Option<SeccompMode>) {
    let ll = &status.landlock;
    let names: Vec<&str> = ll.fs_rights_handled.iter().map(|x| x.name()).collect();
    r.push(
        "status file",
        "landlock",
        "enforced as the policy requires",
        format!("ABI {} (requested ABI {}), {}, {} fs rights handled, tcp {}, ports {:?}, scopes {:?}", ll.abi, ll.requested_abi, ll.status, names.len(), ll.tcp_restricted, ll.tcp_connect_ports, ll.scopes),
        true,
    );
    landlock_rights(r, policy, ll);
    let (unmet, notes) = crate::apply::unmet(policy, ll, mode.unwrap_or(SeccompMode::Skip));
    for u in unmet {
        r.push("status file", "required protection", "enforced", u, false);
    }
    for n in notes {
        r.push("status file", "protection", "(not required)", n, true);
    }
    r.push("status file", "degraded", "false", status.degraded.to_string(), !status.degraded);
    for w in &status.warnings {
        r.push("status file", "warning", "", w, true);
    }
    r.push("status file", "policy digest", "", &status.policy_digest, true);
    r.push("status file", "restarts", "", status.restarts.to_string(), true);
}
