//! `aziotctl policy audit` against live processes: a probe in serve mode is a sandboxed worker
//! (service user, no capabilities, NoNewPrivs, Landlock, seccomp on every thread) with a
//! root broker and a status file, as the real broker writes it.

mod common;

use aziot_policy::{AuditReport, Status};
use common::{env, serve};

/// The audit with the test's state directory (not /var/lib/aziot/<svc>).
fn audit_service(svc: &str, status: &std::path::Path) -> AuditReport {
    aziot_policy::audit_service_with(svc, status, &[env().state_dir(svc)])
}

fn deviations(r: &AuditReport) -> Vec<String> {
    r.deviations().map(|f| format!("{} {}: {}", f.subject, f.check, f.actual)).collect()
}

#[test]
fn a_sandboxed_worker_passes_the_audit() {
    env();
    for svc in common::SERVICES {
        let served = serve(svc, "clean", &[]);
        let report = audit_service(svc, &served.status_path);
        println!("{}", report.render_human());
        assert!(report.ok(), "{svc}: {:?}", deviations(&report));
        let program = report.findings.iter().find(|f| f.check == "seccomp program").expect("seccomp finding");
        let policy = aziot_policy::builtin(svc).unwrap();
        assert!(program.ok && program.actual.contains(&policy.seccomp.digest), "{program:?}");
        assert!(program.actual.contains("(2 filters: 17 + "), "{program:?}"); // clone3_enosys: clone3 and socket(AF_NETLINK)
        let threads = report.findings.iter().find(|f| f.check == "seccomp").unwrap();
        assert!(threads.actual.starts_with("all 3 thread(s)"), "{threads:?}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["ok"], true);
        landlock_rights_are_reported(svc, &served.status_path, &report);
        assert_eq!(served.finish(), "ok");
    }
}

/// The worker asked for every right the landlock crate knows (up to ABI 10), and its report,
/// as the status file carries it, says per right what this kernel enforced; the audit prints
/// the rights this kernel does not enforce (ABI 7 here: resolve-unix, and UDP where requested).
fn landlock_rights_are_reported(svc: &str, status_path: &std::path::Path, report: &AuditReport) {
    let status = Status::read(status_path).unwrap();
    let ll = &status.landlock;
    let kernel = aziot_policy::kernel_abi();
    assert_eq!(ll.abi, kernel, "{svc}: the report's ABI is the kernel's");
    assert_eq!(ll.requested_abi, 10, "{svc}");
    let expected = aziot_policy::rights_report(&aziot_policy::builtin(svc).unwrap(), kernel);
    assert_eq!(ll.rights, expected, "{svc}: per-right report");
    let right = |name: &str| ll.rights.iter().find(|r| r.name == name).unwrap_or_else(|| panic!("{svc}: no {name}"));
    assert!(right("read-file").requested && right("read-file").enforced, "{svc}");
    assert!(right("signal").enforced, "{svc}");
    let resolve = right("resolve-unix");
    assert!(resolve.requested, "{svc}");
    assert_eq!(resolve.enforced, kernel >= 9, "{svc}: resolve-unix");
    let udp = right("connect-send-udp");
    assert_eq!(udp.requested, svc != "identityd", "{svc}: UDP requested unless DNS needs it");
    assert_eq!(udp.enforced, udp.requested && kernel >= 10, "{svc}: UDP");
    let rights = report.findings.iter().find(|f| f.check == "landlock rights").expect("landlock rights finding");
    assert!(rights.ok && rights.actual.contains(&format!("by this kernel (ABI {kernel})")), "{rights:?}");
    let listed: Vec<&str> = report
        .findings
        .iter()
        .filter(|f| f.check == "landlock right")
        .map(|f| f.actual.as_str())
        .collect();
    let not_enforced = ll.rights.iter().filter(|r| r.requested && !r.enforced).count();
    assert_eq!(listed.len(), not_enforced, "{svc}: {listed:?}");
    if kernel < 9 {
        assert!(
            listed.iter().any(|l| l.starts_with("fs resolve-unix (ABI 9): NOT enforced on this kernel")),
            "{svc}: {listed:?}"
        );
        assert!(report.render_human().contains("resolve-unix (ABI 9): NOT enforced on this kernel"));
    }
}

#[test]
fn a_worker_that_requested_other_rights_is_a_deviation() {
    env();
    let served = serve("keyd", "rights", &[]);
    let mut status = Status::read(&served.status_path).unwrap();
    // A report that says resolve-unix was not even requested (an older or tampered worker).
    for r in status.landlock.rights.iter_mut().filter(|r| r.name == "resolve-unix") {
        r.requested = false;
        r.enforced = false;
    }
    let path = served.status_path.with_extension("rights");
    status.write(&path).unwrap();
    let dev = deviations(&audit_service("keyd", &path)).join("\n");
    assert!(dev.contains("status file landlock rights: requested "), "{dev}");
    // No per-right report at all.
    status.landlock.rights.clear();
    status.write(&path).unwrap();
    let dev = deviations(&audit_service("keyd", &path)).join("\n");
    assert!(dev.contains("landlock rights: no per-right Landlock report"), "{dev}");
}

#[test]
fn the_seccomp_program_is_the_one_the_broker_chose() {
    env();
    let served = serve("keyd", "program", &[]);
    let status = Status::read(&served.status_path).unwrap();
    assert_eq!(status.seccomp_program, "keyd");
    let report = audit_service("keyd", &served.status_path);
    let variant = report.findings.iter().find(|f| f.check == "seccomp variant").unwrap();
    assert!(variant.ok && variant.actual.starts_with("keyd (the service's own)"), "{variant:?}");
    // The status file says the broker chose keyd+pkcs11: the live program (keyd's) differs.
    let mut lie = status.clone();
    lie.seccomp_program = "keyd+pkcs11".into();
    let path = served.status_path.with_extension("pkcs11");
    lie.write(&path).unwrap();
    let report = audit_service("keyd", &path);
    let program = report.findings.iter().find(|f| f.check == "seccomp program").unwrap();
    let pkcs11 = aziot_policy::effective("keyd", &aziot_policy::Grants { pkcs11: true, ..Default::default() }, None).unwrap();
    assert!(!program.ok && program.expected.contains(&pkcs11.seccomp.digest), "{program:?}");
    // A program that is not keyd's.
    lie.seccomp_program = "tpmd".into();
    lie.write(&path).unwrap();
    let dev = deviations(&audit_service("keyd", &path)).join("\n");
    assert!(dev.contains("seccomp variant: \"tpmd\" is not a program of keyd"), "{dev}");
}

#[test]
fn log_mode_and_degraded_mode_are_deviations() {
    env();
    let served = serve("keyd", "log", &["--seccomp", "log", "--allow-degraded"]);
    let status = Status::read(&served.status_path).unwrap();
    assert!(status.degraded);
    assert!(status.warnings.iter().any(|w| w.starts_with("DEGRADED: seccomp runs in log mode")), "{:?}", status.warnings);
    let report = audit_service("keyd", &served.status_path);
    let dev = deviations(&report);
    assert!(!report.ok());
    assert!(dev.iter().any(|d| d.contains("required protection: seccomp runs in log mode")), "{dev:?}");
    assert!(dev.iter().any(|d| d.contains("degraded: true")), "{dev:?}");
    // The live program is the log-mode program, and the audit says so (it matches the
    // log digest, which is not the kill digest the policy requires).
    let program = report.findings.iter().find(|f| f.check == "seccomp program").unwrap();
    assert!(program.ok, "{program:?}");
    assert!(program.actual.contains(&aziot_policy::builtin("keyd").unwrap().seccomp.log_digest));
}

#[test]
fn tampered_or_mismatched_status_is_a_deviation() {
    env();
    let served = serve("keyd", "tamper", &[]);
    // The status file lies about the program: the live dump disagrees.
    let mut status = Status::read(&served.status_path).unwrap();
    status.seccomp_digest = "0".repeat(64);
    let lie = served.status_path.with_extension("lie");
    status.write(&lie).unwrap();
    let report = audit_service("keyd", &lie);
    assert!(deviations(&report).iter().any(|d| d.starts_with(&format!("worker {} seccomp program", served.worker_pid))));

    // The keyd worker audited as certd: wrong user, groups and program.
    let report = audit_service("certd", &served.status_path);
    let dev = deviations(&report).join("\n");
    for needle in ["status file service", " uid: ", " gid: ", " groups: ", "seccomp program"] {
        assert!(dev.contains(needle), "missing {needle:?} in:\n{dev}");
    }

    // A worker that is gone.
    let mut status = Status::read(&served.status_path).unwrap();
    status.worker_pid = i32::MAX - 1;
    let gone = served.status_path.with_extension("gone");
    status.write(&gone).unwrap();
    let dev = deviations(&audit_service("keyd", &gone)).join("\n");
    assert!(dev.contains("running: not running"), "{dev}");

    // No status file at all.
    let report = audit_service("keyd", &env().prefix.join("nothing.status"));
    assert!(!report.ok());
    assert!(report.render_human().contains("DEVIATION status file"), "{}", report.render_human());
}

#[test]
fn an_unsandboxed_process_fails_the_audit() {
    env();
    // The test process itself (root, full capabilities, no seccomp) posing as a worker.
    let me = std::process::id() as i32;
    let status = Status {
        service: "keyd".into(),
        broker_pid: me,
        worker_pid: me,
        policy_digest: String::new(),
        seccomp_digest: aziot_policy::builtin("keyd").unwrap().seccomp.digest,
        seccomp_program: "keyd".into(),
        landlock: Default::default(),
        seccomp_mode: "kill".into(),
        degraded: false,
        warnings: vec![],
        restarts: 0,
        handed_dirs: Vec::new(),
            handed_inodes: Vec::new(),
        mount_namespace: None,
    };
    let path = env().prefix.join("self.status");
    status.write(&path).unwrap();
    let report = audit_service("keyd", &path);
    let dev = deviations(&report).join("\n");
    for needle in [" uid: ", " capabilities: ", " no_new_privs: ", " seccomp: ", "seccomp program", "required protection: Landlock"] {
        assert!(dev.contains(needle), "missing {needle:?} in:\n{dev}");
    }
}

#[test]
fn audit_running_finds_status_files() {
    env();
    let dir = env().prefix.join("run");
    std::fs::create_dir_all(&dir).unwrap();
    let served = serve("tpmd", "running", &[]);
    std::fs::copy(&served.status_path, aziot_policy::status_path(&dir, "tpmd")).unwrap();
    let reports = aziot_policy::audit_running(&dir);
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].service, "tpmd");
    // audit_running assumes the default state dir: the only deviation is the worker's state
    // directory descriptor, which lies elsewhere here.
    let dev = deviations(&reports[0]);
    assert_eq!(dev.len(), 1, "{dev:?}");
    assert!(dev[0].contains("descriptors: 3 -> ") && dev[0].contains("/var/lib/aziot/tpmd"), "{dev:?}");
}

#[test]
fn filters_inherited_from_a_hardened_unit_are_accounted_for() {
    env();
    // The broker carries a filter of its own (systemd SystemCallFilter=): the worker has 3.
    let served = serve("keyd", "inherited", &["--broker-seccomp"]);
    let report = audit_service("keyd", &served.status_path);
    assert!(report.ok(), "{}", report.render_human());
    let filters = report.findings.iter().find(|f| f.check == "seccomp filters" && f.subject.starts_with("worker")).unwrap();
    assert!(filters.actual.contains("Some(3)"), "{filters:?}");
    let program = report.findings.iter().find(|f| f.check == "seccomp program").unwrap();
    assert!(program.actual.contains("1 inherited from the broker"), "{program:?}");
}
