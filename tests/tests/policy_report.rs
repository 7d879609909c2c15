//! The sandbox report of the real broker and worker (issue 10 §4): per Landlock right, what the
//! worker asked for (every right the landlock crate knows) and what this kernel enforced, in the
//! status file and in `aziotctl policy show` / `policy audit`; the seccomp program the broker
//! chose from config (keyd, or keyd+pkcs11 when a PKCS#11 module is configured); key
//! operations served off the runtime's threads.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use aziot_tests::api::V2021;
use aziot_tests::crypto::{random, sha256};
use aziot_tests::keyd::{aziotctl_bin, Backend};
use aziot_tests::Keyd;

fn aziotctl(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(aziotctl_bin()).args(args).output().expect("run aziotctl");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code(), text)
}

fn audit(run_dir: &Path) -> (Option<i32>, String) {
    aziotctl(&["policy", "audit", "--run-dir", &run_dir.display().to_string()])
}

/// The right named `name` in the status file's Landlock report.
fn right<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["landlock"]["rights"]
        .as_array()
        .expect("landlock.rights in the status file")
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no right {name} in {}", status["landlock"]))
}

#[test]
fn landlock_rights_are_reported_per_right_by_the_worker_show_and_audit() {
    let keyd = Keyd::builder().backend(Backend::File).start();
    let status = keyd.status().expect("status file");
    let kernel = aziot_policy::kernel_abi();
    assert!(kernel >= 1, "this test needs a kernel with Landlock");
    let ll = &status["landlock"];
    assert_eq!(ll["abi"], kernel, "{ll}");
    assert_eq!(ll["requested_abi"], 10, "{ll}");
    // The worker's report is exactly what the policy asks for, as this kernel enforces it.
    let expected = aziot_policy::rights_report(&aziot_policy::builtin("keyd").unwrap(), kernel);
    assert_eq!(ll["rights"], serde_json::to_value(&expected).unwrap());
    for (name, since) in [("read-file", 1), ("ioctl-dev", 5), ("connect-tcp", 4), ("signal", 6), ("resolve-unix", 9), ("bind-udp", 10)] {
        let r = right(&status, name);
        assert_eq!(r["requested"], true, "{name}: {r}");
        assert_eq!(r["since_abi"], since, "{name}: {r}");
        assert_eq!(r["enforced"], kernel >= since, "{name} on a kernel with ABI {kernel}: {r}");
    }

    // `policy audit` prints the rights this kernel does not enforce, and still passes.
    let (code, out) = audit(keyd.dir());
    assert_eq!(code, Some(0), "{out}\n{}", keyd.log());
    assert!(out.contains("landlock rights"), "{out}");
    let missing: Vec<&serde_json::Value> =
        ll["rights"].as_array().unwrap().iter().filter(|r| r["requested"] == true && r["enforced"] == false).collect();
    for r in &missing {
        let line = format!("{} {} (ABI {}): NOT enforced on this kernel", r["kind"].as_str().unwrap(), r["name"].as_str().unwrap(), r["since_abi"]);
        assert!(out.contains(&line), "missing {line:?} in:\n{out}");
    }
    if kernel < 9 {
        assert!(out.contains("fs resolve-unix (ABI 9): NOT enforced on this kernel"), "{out}");
    }

    // `policy show` says the same for this kernel.
    let (code, out) = aziotctl(&["policy", "show", "keyd"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("this kernel: Landlock ABI {kernel}")), "{out}");
    if kernel < 10 {
        assert!(out.contains(&format!("NOT enforced on this kernel (Landlock ABI {kernel}), left to seccomp: ")), "{out}");
        assert!(out.contains("bind-udp (ABI 10)"), "{out}");
    }
}

#[test]
fn keyd_without_pkcs11_runs_the_smaller_program() {
    let keyd = Keyd::builder().backend(Backend::File).start();
    let status = keyd.status().expect("status file");
    let plain = aziot_policy::builtin("keyd").unwrap();
    let pkcs11 =
        aziot_policy::effective("keyd", &aziot_policy::Grants { pkcs11: true, ..Default::default() }, None).unwrap();
    assert_eq!(status["seccomp_program"], "keyd", "{status}");
    assert_eq!(status["seccomp_digest"], plain.seccomp.digest.as_str(), "{status}");
    assert_ne!(plain.seccomp.digest, pkcs11.seccomp.digest);
    // The smaller program: none of the module's syscalls.
    assert!(plain.seccomp.syscall_count() < pkcs11.seccomp.syscall_count());
    for syscall in ["ftruncate", "unlink"] {
        assert!(!plain.seccomp.allows(syscall) && pkcs11.seccomp.allows(syscall), "{syscall}");
    }
    // The live program (dumped by the audit) is that one.
    let (code, out) = audit(keyd.dir());
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&format!("sha256 {}", plain.seccomp.digest)), "{out}");
    assert!(out.contains("seccomp variant        keyd (the service's own)"), "{out}");
}

#[test]
fn keyd_with_a_pkcs11_module_runs_the_pkcs11_program() {
    let keyd = Keyd::builder().backend(Backend::SoftHsm).start();
    let status = keyd.status().expect("status file");
    let pkcs11 =
        aziot_policy::effective("keyd", &aziot_policy::Grants { pkcs11: true, ..Default::default() }, None).unwrap();
    assert_eq!(status["seccomp_program"], "keyd+pkcs11", "{status}");
    assert_eq!(status["seccomp_digest"], pkcs11.seccomp.digest.as_str(), "{status}");
    // The module works under it: key pair in the token, sign, delete (C_DestroyObject: unlink).
    let api = keyd.api(V2021);
    let pair = api.create_keypair("p11-pair", Some("ec-p256"));
    assert!(!api.sign_ecdsa(&pair, &sha256(b"m")).is_empty());
    let key = api.create_key("p11-key", "sign");
    assert_eq!(api.sign_hmac(&key, b"m").len(), 32);
    let (code, out) = audit(keyd.dir());
    assert_eq!(code, Some(0), "{out}\n{}", keyd.log());
    assert!(out.contains(&format!("sha256 {}", pkcs11.seccomp.digest)), "{out}");
    assert!(out.contains("seccomp variant        keyd+pkcs11 (a PKCS#11 module is configured"), "{out}");
}

/// The names of the worker's threads (`comm`).
fn thread_names(pid: i32) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir").flatten() {
        if let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) {
            names.push(comm.trim().to_owned());
        }
    }
    names
}

fn has_pool_thread(pid: i32) -> bool {
    thread_names(pid).iter().any(|n| n.starts_with("tokio"))
}

/// Polls (up to `timeout`) until the worker has a blocking-pool thread (`want`) or none.
fn wait_pool_thread(pid: i32, want: bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if has_pool_thread(pid) == want {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A key operation that may be slow runs on tokio's blocking pool (thread "tokio-rt-worker"),
/// not on the serving thread; one the key library calls quick (a file key in memory, a short
/// input) runs inline, since handing it over would cost more than it does.
#[test]
fn key_operations_that_may_be_slow_run_off_the_serving_threads() {
    let keyd = Keyd::builder().backend(Backend::File).start();
    let worker = keyd.worker_pid();
    let api = keyd.api(V2021);
    let key = api.create_key("k", "sign");
    assert!(!has_pool_thread(worker), "{:?}", thread_names(worker));
    // The first sign after a write reads the keys from disk: the pool. Then the keys are in
    // memory; idle pool threads exit after 10 s.
    assert_eq!(api.sign_hmac(&key, b"warm").len(), 32);
    assert!(wait_pool_thread(worker, false, Duration::from_secs(15)), "{:?}", thread_names(worker));
    for _ in 0..20 {
        assert_eq!(api.sign_hmac(&key, &random(64)).len(), 32);
    }
    assert!(!has_pool_thread(worker), "quick HMACs left the serving thread: {:?}", thread_names(worker));
    // A long input (> 64 KiB) may take a while: the pool.
    assert_eq!(api.sign_hmac(&key, &random(100 * 1024)).len(), 32);
    assert!(wait_pool_thread(worker, true, Duration::from_secs(5)), "{:?}", thread_names(worker));
}

/// With a base slot every key is looked up on the token first: every operation goes to the pool.
#[test]
fn every_key_operation_with_a_pkcs11_base_slot_runs_off_the_serving_threads() {
    let keyd = Keyd::builder().backend(Backend::SoftHsm).start();
    let worker = keyd.worker_pid();
    let api = keyd.api(V2021);
    let key = api.create_key("k", "sign");
    assert!(!has_pool_thread(worker), "{:?}", thread_names(worker));
    assert_eq!(api.sign_hmac(&key, b"m").len(), 32);
    assert!(wait_pool_thread(worker, true, Duration::from_secs(5)), "{:?}", thread_names(worker));
}
