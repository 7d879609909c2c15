//! `aziotctl policy show`: the effective policy, each rule with where it came from.

use std::fmt::Write as _;

use crate::model::{FsRight, Origin, Policy};

fn origin(o: &Origin) -> String {
    format!("[{o}]")
}

/// The policy as text: user, descriptors, Landlock rules (and, per right, whether the running
/// kernel enforces it), seccomp rules with their comments, rlimits, requirements and warnings;
/// each rule followed by its origin.
pub fn render_human(policy: &Policy) -> String {
    render_for_kernel(policy, crate::apply::kernel_abi())
}

/// As [`render_human`], for a kernel whose Landlock ABI is `kernel_abi` (0: no Landlock).
pub fn render_for_kernel(policy: &Policy, kernel_abi: u32) -> String {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "service {}", policy.service);
    let _ = writeln!(w, "  worker user: {} (and its /etc/group memberships); never root", policy.user);
    let _ = writeln!(w, "\ndescriptors handed over by the broker:");
    for d in &policy.descriptors {
        let mut flags = Vec::new();
        if d.multiple {
            flags.push("several");
        }
        if d.optional {
            flags.push("optional");
        }
        let flags = if flags.is_empty() { String::new() } else { format!(" ({})", flags.join(", ")) };
        let _ = writeln!(w, "  {:<16} {}{flags}", d.name, d.kind.name());
        let _ = writeln!(w, "  {:<16} from {}", "", d.source);
    }

    let ll = &policy.landlock;
    let all: Vec<&str> = FsRight::ALL.iter().map(|r| r.name()).collect();
    let _ = writeln!(w, "\nlandlock:");
    let _ = writeln!(w, "  filesystem: denied unless granted below ({})", all.join(", "));
    for r in &ll.fd_rules {
        let _ = writeln!(w, "  allow {} beneath descriptor {:?} {}", r.access.names().join(","), r.descriptor, origin(&r.origin));
        if !r.comment.is_empty() {
            let _ = writeln!(w, "      # {}", r.comment);
        }
    }
    for r in &ll.path_rules {
        let _ = writeln!(w, "  allow {} beneath {} {}", r.access.names().join(","), r.path.display(), origin(&r.origin));
        if !r.comment.is_empty() {
            let _ = writeln!(w, "      # {}", r.comment);
        }
    }
    if ll.restrict_tcp {
        if ll.tcp_connect.is_empty() {
            let _ = writeln!(w, "  tcp: no bind, no connect");
        } else {
            let _ = writeln!(w, "  tcp: no bind; connect only to the ports below");
        }
        for p in &ll.tcp_connect {
            let comment = if p.comment.is_empty() { String::new() } else { format!("  # {}", p.comment) };
            let _ = writeln!(w, "  allow tcp connect to port {} {}{comment}", p.port, origin(&p.origin));
        }
    } else {
        let _ = writeln!(w, "  tcp: not restricted by Landlock");
    }
    let scopes: Vec<&str> = ll.scopes.iter().map(|s| s.name()).collect();
    let _ = writeln!(
        w,
        "  scopes: {} (no IPC of these kinds with processes outside the sandbox)",
        if scopes.is_empty() { "none".to_owned() } else { scopes.join(", ") }
    );
    render_rights(w, &crate::apply::rights_report(policy, kernel_abi), kernel_abi);
    let _ = writeln!(w, "  never restrictable by Landlock, left to seccomp: TCP/UDP destination addresses");
    render_mount_namespace(w, policy);

    let sc = &policy.seccomp;
    let _ = writeln!(
        w,
        "\nseccomp program {} ({}, {} syscalls allowed, sha256 {}) [built-in]:",
        sc.program_name(),
        sc.arch,
        sc.syscall_count(),
        sc.digest
    );
    if !sc.variant_when.is_empty() {
        let _ = writeln!(w, "  selected because {}", sc.variant_when);
    }
    let variants = crate::SeccompPolicy::variants_of(&policy.service);
    if sc.variant_when.is_empty() && !variants.is_empty() {
        let _ = writeln!(w, "  (other programs of {}, selected by config: {})", policy.service, variants.join(", "));
    }
    for f in &sc.filters {
        let _ = writeln!(w, "  filter {}: default {}, on match {}", f.name, f.default_action, f.match_action);
        for r in &f.rules {
            let args: Vec<String> =
                r.args.iter().map(|a| format!("arg{} {} ({})", a.index, a.test, a.comment)).collect();
            let cond = if args.is_empty() { String::new() } else { format!("if {}  ", args.join(" and ")) };
            let _ = writeln!(w, "    {:<18}{cond}# {}", r.syscall, r.comment);
        }
    }

    let _ = writeln!(w, "\nrlimits [built-in] (lowered only, never raised):");
    for r in &policy.rlimits {
        let _ = writeln!(w, "  {:<8} soft {} hard {}  # {}", r.resource.name(), r.soft, r.hard, r.comment);
    }
    let rq = &policy.require;
    let _ = writeln!(
        w,
        "\nrequired to start (else refuse, unless degraded mode is allowed in config): landlock fs {}, landlock tcp {}, landlock scopes {}, seccomp kill {}",
        yes(rq.landlock_fs),
        yes(rq.landlock_tcp),
        yes(rq.landlock_scopes),
        yes(rq.seccomp)
    );
    if !policy.warnings.is_empty() {
        let _ = writeln!(w, "\nwarnings:");
        for warning in &policy.warnings {
            let _ = writeln!(w, "  {warning}");
        }
    }
    out
}

/// `[mount_namespace]`: the masks, and each granted socket with its origin and how it stays
/// reachable (bound back beneath a mask, or outside every mask).
fn render_mount_namespace(w: &mut String, policy: &Policy) {
    let Some(plan) = policy.mount_plan() else {
        let _ = writeln!(w, "\nmount namespace: none (the worker shares the broker's)");
        return;
    };
    let _ = writeln!(
        w,
        "\nmount namespace: the worker's own, made by the broker (pathname unix sockets: what Landlock ABI 9's resolve-unix does, on any kernel):"
    );
    let masks: Vec<String> = plan.masks.iter().map(|m| m.display().to_string()).collect();
    let _ = writeln!(w, "  empty read-only tmpfs (nosuid,nodev,noexec) over {} [built-in]", masks.join(", "));
    for s in &policy.mount_namespace.sockets {
        let how = if plan.binds.contains(&s.path) {
            "bound back at the same path"
        } else {
            "reachable as it is (not beneath a mask)"
        };
        let _ = writeln!(w, "  allow socket {}: {how} {}", s.path.display(), origin(&s.origin));
    }
    if policy.mount_namespace.sockets.is_empty() {
        let _ = writeln!(w, "  no socket granted: nothing beneath the masks is reachable");
    }
}

/// Per right: since which ABI, requested or not, enforced here or not; then the requested rights
/// this kernel does not enforce, in one line (what seccomp alone must cover).
pub(crate) fn render_rights(w: &mut String, rights: &[crate::RightReport], kernel_abi: u32) {
    let here = if kernel_abi == 0 { "no Landlock".to_owned() } else { format!("Landlock ABI {kernel_abi}") };
    let _ = writeln!(w, "  rights (requested up to the landlock crate's highest ABI; this kernel: {here}):");
    for r in rights {
        let state = match (r.requested, r.enforced) {
            (false, _) => "not requested",
            (true, true) => "enforced",
            (true, false) => "NOT ENFORCED",
        };
        let note = if r.note.is_empty() { String::new() } else { format!("  ({})", r.note) };
        let _ = writeln!(w, "    {:<5} {:<22} ABI {:>2}  {state}{note}", r.kind.name(), r.name, r.since_abi);
    }
    let missing: Vec<String> =
        rights.iter().filter(|r| r.requested && !r.enforced).map(|r| format!("{} (ABI {})", r.name, r.since_abi)).collect();
    if missing.is_empty() {
        let _ = writeln!(w, "  every requested right is enforced on this kernel");
    } else {
        let _ = writeln!(w, "  NOT enforced on this kernel ({here}), left to seccomp: {}", missing.join(", "));
    }
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AccessSet, Grants, PathGrant, PortGrant};
    use std::path::PathBuf;

    #[test]
    fn shows_origins_and_seccomp_comments() {
        let grants = Grants {
            paths: vec![PathGrant {
                path: PathBuf::from("/usr/lib/softhsm/libsofthsm2.so"),
                access: AccessSet::read_only(),
                origin: Origin::Config("aziot_keys.pkcs11_lib_path".into()),
            }],
            tcp_ports: vec![PortGrant { port: 8443, origin: Origin::Config("cert_issuance.est.url".into()) }],
            pkcs11: true,
            sockets: vec![],
        };
        let text = render_human(&crate::effective("keyd", &grants, None).unwrap());
        println!("{text}");
        assert!(text.contains("beneath /usr/lib/softhsm/libsofthsm2.so [config aziot_keys.pkcs11_lib_path]"), "{text}");
        assert!(text.contains("beneath descriptor \"state\" [built-in]"), "{text}");
        assert!(text.contains("    accept4           # tokio UnixListener::accept"), "{text}");
        assert!(text.contains("clone             if arg0 & 0x10000 == 0x10000 (flags & CLONE_THREAD)  # glibc pthread_create"), "{text}");
        assert!(text.contains("filter clone3_enosys: default allow, on match errno ENOSYS"), "{text}");
        assert!(text.contains("tcp: no bind; connect only to the ports below"), "{text}");
        // A PKCS#11 module is configured: the keyd+pkcs11 program, its rules shown with the others.
        assert!(text.contains("\nseccomp program keyd+pkcs11 (x86_64, ") || text.contains("\nseccomp program keyd+pkcs11 (aarch64, "), "{text}");
        assert!(text.contains("  selected because a PKCS#11 module is configured"), "{text}");
        assert!(text.contains("    ftruncate         # PKCS#11 module SoftHSM2 rewrites token object files"), "{text}");
        let plain = render_human(&crate::builtin("keyd").unwrap());
        assert!(plain.contains("(other programs of keyd, selected by config: keyd+pkcs11)"), "{plain}");
        assert!(!plain.contains("ftruncate"), "{plain}");
        // keyd has no socket(): the port grant is flagged as having no effect.
        assert!(text.contains("TCP port 8443 (config cert_issuance.est.url) has no effect"), "{text}");
    }

    #[test]
    fn shows_per_right_what_the_kernel_enforces() {
        let keyd = crate::builtin("keyd").unwrap();
        // ABI 7 (this machine): resolve-unix (9) and UDP (10) are requested but not enforced.
        let text = render_for_kernel(&keyd, 7);
        println!("{text}");
        assert!(text.contains("this kernel: Landlock ABI 7"), "{text}");
        assert!(text.contains("    fs    read-file              ABI  1  enforced\n"), "{text}");
        assert!(text.contains("    fs    resolve-unix           ABI  9  NOT ENFORCED  (this kernel has Landlock ABI 7; needs ABI 9)"), "{text}");
        assert!(text.contains("    net   connect-tcp            ABI  4  enforced\n"), "{text}");
        assert!(text.contains("    net   bind-udp               ABI 10  NOT ENFORCED"), "{text}");
        assert!(text.contains("    scope signal                 ABI  6  enforced\n"), "{text}");
        assert!(
            text.contains("NOT enforced on this kernel (Landlock ABI 7), left to seccomp: resolve-unix (ABI 9), bind-udp (ABI 10), connect-send-udp (ABI 10)"),
            "{text}"
        );
        // A kernel with ABI 10 enforces everything keyd requests.
        let text = render_for_kernel(&keyd, 10);
        assert!(text.contains("every requested right is enforced on this kernel"), "{text}");
        assert!(!text.contains("NOT ENFORCED"), "{text}");
        // identityd sends DNS over UDP: Landlock UDP is not requested for it, and says why.
        let text = render_for_kernel(&crate::builtin("identityd").unwrap(), 10);
        assert!(text.contains("net   bind-udp               ABI 10  not requested  (the policy lets the worker send UDP (DNS)"), "{text}");
        // No Landlock at all.
        let text = render_for_kernel(&keyd, 0);
        assert!(text.contains("this kernel: no Landlock"), "{text}");
        assert!(text.contains("read-file              ABI  1  NOT ENFORCED  (Landlock is not enforced)"), "{text}");
    }

    #[test]
    fn shows_the_mount_namespace_and_each_socket_with_its_origin() {
        let grants = Grants {
            sockets: vec![crate::model::SocketGrant {
                path: PathBuf::from("/run/aziot/keyd.sock"),
                origin: Origin::Config("endpoints.aziot_keyd".into()),
            }],
            ..Grants::default()
        };
        let text = render_human(&crate::effective("certd", &grants, None).unwrap());
        assert!(text.contains("\nmount namespace: the worker's own, made by the broker"), "{text}");
        assert!(text.contains("  empty read-only tmpfs (nosuid,nodev,noexec) over /run, /tmp, /var/tmp, /dev/shm [built-in]"), "{text}");
        assert!(text.contains("  allow socket /run/aziot/keyd.sock: bound back at the same path [config endpoints.aziot_keyd]"), "{text}");
        let text = render_human(&crate::builtin("keyd").unwrap());
        assert!(text.contains("\nmount namespace: none (the worker shares the broker's)"), "{text}");
    }

    #[test]
    fn json_round_trips() {
        for svc in crate::SERVICES {
            let p = crate::builtin(svc).unwrap();
            let json = serde_json::to_string(&p).unwrap();
            let back: Policy = serde_json::from_str(&json).unwrap();
            assert_eq!(back, p);
            assert_eq!(back.digest(), p.digest());
            let v: serde_json::Value = serde_json::from_str(&json).unwrap();
            // tpmd has no state directory, hence no fd rule (its state lives in the TPM).
            match v["landlock"]["fd_rules"].get(0) {
                Some(rule) => assert_eq!(rule["origin"], "builtin"),
                None => assert_eq!(*svc, "tpmd"),
            }
        }
    }
}
