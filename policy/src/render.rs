//! `aziotctl policy show`: the effective policy, each rule with where it came from.

use std::fmt::Write as _;

use crate::model::{FsRight, Origin, Policy};

fn origin(o: &Origin) -> String {
    format!("[{o}]")
}

/// The policy as text: user, descriptors, Landlock rules, seccomp rules with their comments,
/// rlimits, requirements and warnings; each rule followed by its origin.
pub fn render_human(policy: &Policy) -> String {
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
    let _ = writeln!(w, "  not restrictable by Landlock (ABI 7), left to seccomp: UDP, pathname unix connect, TCP addresses");

    let sc = &policy.seccomp;
    let _ = writeln!(
        w,
        "\nseccomp ({}, {} syscalls allowed, sha256 {}) [built-in]:",
        sc.arch,
        sc.syscall_count(),
        sc.digest
    );
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
        };
        let text = render_human(&crate::effective("keyd", &grants, None).unwrap());
        println!("{text}");
        assert!(text.contains("beneath /usr/lib/softhsm/libsofthsm2.so [config aziot_keys.pkcs11_lib_path]"), "{text}");
        assert!(text.contains("beneath descriptor \"state\" [built-in]"), "{text}");
        assert!(text.contains("    accept4           # tokio UnixListener::accept"), "{text}");
        assert!(text.contains("clone             if arg0 & 0x10000 == 0x10000 (flags & CLONE_THREAD)  # glibc pthread_create"), "{text}");
        assert!(text.contains("filter clone3_enosys: default allow, on match errno ENOSYS"), "{text}");
        assert!(text.contains("tcp: no bind; connect only to the ports below"), "{text}");
        // keyd has no socket(): the port grant is flagged as having no effect.
        assert!(text.contains("TCP port 8443 (config cert_issuance.est.url) has no effect"), "{text}");
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
            assert_eq!(v["landlock"]["fd_rules"][0]["origin"], "builtin");
        }
    }
}
