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
        assert!(program.actual.contains("(2 filters: 10 + "), "{program:?}");
        let threads = report.findings.iter().find(|f| f.check == "seccomp").unwrap();
        assert!(threads.actual.starts_with("all 3 thread(s)"), "{threads:?}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["ok"], true);
        assert_eq!(served.finish(), "ok");
    }
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
        landlock: Default::default(),
        seccomp_mode: "kill".into(),
        degraded: false,
        warnings: vec![],
        restarts: 0,
        handed_dirs: Vec::new(),
            handed_inodes: Vec::new(),
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
