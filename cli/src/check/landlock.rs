//! `sandbox-kernel` (ours): can this kernel's Landlock enforce every right the services' sandbox
//! policies require? On a kernel that cannot, every worker refuses to start (fail closed) unless
//! its config sets `[sandbox] allow_degraded = true` — this check says so before the services
//! are needed, names the kernel's Landlock ABI, the rights it lacks, and the two ways out
//! (docs/compatibility.md, "Kernel"). Debian 12's stock kernel (6.1) has ABI 2.

use super::{Ctx, Outcome};

/// The first mainline kernel of each Landlock ABI (Documentation/userspace-api/landlock.rst).
const FIRST_KERNEL: &[(u32, &str)] = &[
    (1, "5.13"),
    (2, "5.19"),
    (3, "6.2"),
    (4, "6.7"),
    (5, "6.10"),
    (6, "6.12"),
    (7, "6.15"),
];

/// Rights of ABIs after this one are best effort in every policy (recorded, never required:
/// policy/src/apply.rs `BASELINE_ABI`).
const BASELINE_ABI: u32 = 7;

/// The rights `policy` requires that a kernel with Landlock `abi` does not enforce, as
/// `(name, since_abi)` — what the worker's fail-closed check (`aziot_policy::check_required`)
/// refuses on.
pub fn missing_rights(policy: &aziot_policy::Policy, abi: u32) -> Vec<(String, u32)> {
    use aziot_policy::RightKind;
    let req = &policy.require;
    aziot_policy::rights_report(policy, abi)
        .into_iter()
        .filter(|r| r.requested && !r.enforced)
        .filter(|r| match r.kind {
            RightKind::Fs => req.landlock_fs && r.since_abi <= BASELINE_ABI,
            RightKind::Net => req.landlock_tcp && r.name.ends_with("tcp"),
            RightKind::Scope => req.landlock_scopes,
        })
        .map(|r| (r.name, r.since_abi))
        .collect()
}

/// The verdict for a kernel with Landlock `abi` and the services `(short name, policy,
/// allow_degraded)`.
pub fn assess(abi: u32, services: &[(&str, aziot_policy::Policy, bool)]) -> Outcome {
    let mut refused = Vec::new();
    let mut degraded = Vec::new();
    let mut needed = 0;
    for (short, policy, allow_degraded) in services {
        let missing = missing_rights(policy, abi);
        if missing.is_empty() {
            continue;
        }
        needed = needed.max(missing.iter().map(|m| m.1).max().unwrap_or(0));
        let names: Vec<String> = missing
            .iter()
            .map(|(n, a)| format!("{n} (ABI {a})"))
            .collect();
        let line = format!("{short}: lacks {}", names.join(", "));
        if *allow_degraded {
            degraded.push(format!("{line}; runs degraded (allow_degraded = true)"));
        } else {
            refused.push(format!("{line}; its worker refuses to start"));
        }
    }
    if refused.is_empty() && degraded.is_empty() {
        return Outcome::Ok;
    }
    let kernel = FIRST_KERNEL
        .iter()
        .find(|(a, _)| *a == needed)
        .map(|(_, k)| *k)
        .unwrap_or("a newer");
    let have = if abi == 0 {
        "no Landlock (not built in, or not in the lsm= list)".to_owned()
    } else {
        format!("Landlock ABI {abi}")
    };
    let ways_out = format!(
        "either boot a kernel with Landlock ABI {needed} or later (Linux {kernel}+; on Debian 12 \
         bookworm-backports' linux-image-amd64, then reboot), or set `allow_degraded = true` under \
         [sandbox] in the service's config to run without these protections, knowingly"
    );
    let mut lines = Vec::new();
    if refused.is_empty() {
        lines.push(format!(
            "this kernel has {have}: the sandboxes run degraded ({ways_out})"
        ));
        lines.extend(degraded);
        Outcome::Warning(vec![lines.join("\n")])
    } else {
        lines.push(format!(
            "this kernel has {have}, which cannot enforce what the sandbox policies require: {ways_out}"
        ));
        lines.extend(refused);
        lines.extend(degraded);
        Outcome::Error(vec![lines.join("\n")])
    }
}

pub fn sandbox_kernel(ctx: &mut Ctx<'_>) -> Outcome {
    let abi = aziot_policy::kernel_abi();
    ctx.set("landlock_abi", abi);
    let degraded = |short: &str| match short {
        "keyd" => ctx.keyd.as_ref().map(|c| c.sandbox.allow_degraded),
        "certd" => ctx.certd.as_ref().map(|c| c.sandbox.allow_degraded),
        "tpmd" => ctx.tpmd.as_ref().map(|c| c.sandbox.allow_degraded),
        _ => ctx.identityd.as_ref().map(|c| c.sandbox.allow_degraded),
    };
    let mut services = Vec::new();
    for short in ["keyd", "certd", "identityd", "tpmd"] {
        match aziot_policy::builtin(short) {
            Ok(p) => services.push((short, p, degraded(short).unwrap_or(false))),
            Err(e) => return Outcome::error(format!("{short}'s built-in policy: {e}")),
        }
    }
    assess(abi, &services)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(allow_degraded: bool) -> Vec<(&'static str, aziot_policy::Policy, bool)> {
        ["keyd", "certd", "identityd", "tpmd"]
            .iter()
            .map(|s| (*s, aziot_policy::builtin(s).unwrap(), allow_degraded))
            .collect()
    }

    fn text(o: &Outcome) -> String {
        match o {
            Outcome::Error(l) | Outcome::Warning(l) => l.join("\n"),
            other => format!("{other:?}"),
        }
    }

    /// Debian 12's stock 6.1 (ABI 2): an error naming the ABI, each service's missing rights,
    /// the kernel that has them and both ways out; with allow_degraded a warning; ABI 6 and 7
    /// (bookworm-backports' 6.12, this machine): ok.
    #[test]
    fn a_kernel_without_the_required_landlock_rights_fails_with_the_ways_out() {
        let o = assess(2, &all(false));
        let t = text(&o);
        assert!(matches!(o, Outcome::Error(_)), "{t}");
        for needle in [
            "this kernel has Landlock ABI 2",
            "keyd: lacks truncate (ABI 3), ioctl-dev (ABI 5)",
            "connect-tcp (ABI 4)",
            "abstract-unix-socket (ABI 6), signal (ABI 6); its worker refuses to start",
            "Landlock ABI 6 or later (Linux 6.12+; on Debian 12 bookworm-backports' linux-image-amd64",
            "`allow_degraded = true` under [sandbox]",
        ] {
            assert!(t.contains(needle), "{needle:?} not in:\n{t}");
        }
        for svc in ["keyd:", "certd:", "identityd:", "tpmd:"] {
            assert!(t.contains(svc), "{svc} not in:\n{t}");
        }
        let w = assess(2, &all(true));
        assert!(matches!(w, Outcome::Warning(_)), "{}", text(&w));
        assert!(text(&w).contains("runs degraded (allow_degraded = true)"));
        let none = assess(0, &all(false));
        assert!(text(&none).contains("no Landlock"), "{}", text(&none));
        assert_eq!(assess(6, &all(false)), Outcome::Ok);
        assert_eq!(assess(7, &all(false)), Outcome::Ok);
        // The worker's refusal (the journal line) names the same ways out.
        let refusal = aziot_policy::PolicyError::NotEnforced(vec![
            "Landlock ABI 2 cannot restrict truncate, ioctl-dev".into(),
        ])
        .to_string();
        for needle in [
            "Landlock ABI 2 cannot restrict truncate, ioctl-dev; refusing to start",
            "bookworm-backports' linux-image-amd64",
            "`allow_degraded = true` under [sandbox]",
            "aziotctl check` (sandbox-kernel)",
        ] {
            assert!(refusal.contains(needle), "{needle:?} not in {refusal}");
        }
        let seccomp = aziot_policy::PolicyError::NotEnforced(vec![
            "seccomp runs in log mode, not kill".into(),
        ]);
        assert!(seccomp
            .to_string()
            .ends_with("(degraded mode is not allowed in config)"));
        // resolve-unix (ABI 9) and the UDP rights (ABI 10) are never required.
        assert!(missing_rights(&aziot_policy::builtin("certd").unwrap(), 8).is_empty());
    }
}
