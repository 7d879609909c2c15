//! Supervision that always stops, and diagnoses that work under the shipped unit:
//!
//! - SIGTERM is honoured at every wait of the broker: during a crash loop (a worker that dies at
//!   start, again and again), in its longest restart backoff, and while the first worker has not
//!   reported yet — the broker exits 0 within 1 s and leaves no worker behind;
//! - kill -9 of the broker takes its worker with it within 1 s (PR_SET_PDEATHSIG);
//! - a worker killed by seccomp is named by syscall number and name, and restarted, with the
//!   broker running under the sandbox properties of `packaging/systemd/aziot-keyd.service` that
//!   hide the kernel log (PrivateDevices, ProtectKernelLogs, ProtectProc/ProcSubset,
//!   CapabilityBoundingSet, NoNewPrivileges, UMask), applied by this harness (there is no systemd
//!   as PID 1 here).
//!
//! The crash loop is a real one, without any test hook in the product: the broker re-reads a
//! config that it accepts (it does not open the key library) but that every new worker refuses
//! (`aziot_keys_library` names a file that does not exist); the running worker keeps serving
//! (only `[[principal]]` is applied live), so the loop starts when it is killed.

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aziot_tests::api::{Api, V2021};
use aziot_tests::keyd::{aziotd_bin, service_user, toml_str, TempDir};
use aziot_tests::{require, require_keyd, Dep, Keyd};

mod inject;

/// The promise: `systemctl stop` returns within this (the broker's own exit).
const STOP_WITHIN: Duration = Duration::from_secs(1);

fn alive(pid: i32) -> bool {
    // A zombie still has a /proc entry; it is not running any more.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

/// Polls until `pid` is gone; how long that took, or `None` after `timeout`.
fn wait_gone(pid: i32, timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    while alive(pid) {
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Some(start.elapsed())
}

/// Running processes (not zombies) whose parent is `ppid`.
fn children_of(ppid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let Some((_, rest)) = stat.rsplit_once(')') else { continue };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.get(1).and_then(|p| p.parse::<i32>().ok()) == Some(ppid) && f.first() != Some(&"Z") {
            out.push(pid);
        }
    }
    out
}

/// SIGKILLs `pid` on drop if it still runs (a worker must not outlive a failed test).
struct KillOnDrop(i32);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if alive(self.0) {
            // SAFETY: plain syscall on a process this test started (through the broker).
            unsafe {
                libc::kill(self.0, libc::SIGKILL);
            }
        }
    }
}

/// A keyd whose every new worker refuses to start (see the module doc), with its first worker
/// killed: the broker is in its crash loop when this returns. Returns the killed worker's pid.
fn crash_looping_keyd() -> (Keyd, i32) {
    let keyd = Keyd::start("");
    let first = keyd.worker_pid();
    let missing = keyd.dir().join("no-such-libaziot_keys.so");
    std::fs::write(
        keyd.config_dir().join("50-library.toml"),
        format!("aziot_keys_library = {}\n", toml_str(missing.to_str().expect("utf-8"))),
    )
    .expect("write the drop-in");
    keyd.signal_broker(libc::SIGHUP);
    // The broker re-reads the config synchronously after logging this, before it looks at the
    // next signal (the SIGCHLD of the kill below).
    assert!(
        keyd.wait_log("Detected change in config files. Updating config.", Duration::from_secs(10)),
        "the broker did not re-read its config\n{}",
        keyd.log()
    );
    // SAFETY: plain syscall on the worker of the keyd this test started.
    assert_eq!(unsafe { libc::kill(first, libc::SIGKILL) }, 0, "kill -9 {first}");
    (keyd, first)
}

/// The number of worker starts the broker logged as refused.
fn refused_starts(log: &str) -> usize {
    log.lines().filter(|l| l.contains("the worker refused to start")).count()
}

/// SIGTERM to the broker; asserts it exits 0 within [`STOP_WITHIN`] and that none of its
/// workers is left. The time it took.
fn sigterm_and_expect_prompt_exit(keyd: &mut Keyd) -> Duration {
    let broker = i32::try_from(keyd.pid()).expect("pid");
    let workers = children_of(broker);
    let started = Instant::now();
    keyd.signal_broker(libc::SIGTERM);
    let status = keyd.wait_exit(Duration::from_secs(10));
    let took = started.elapsed();
    println!("broker exited {status} {took:?} after SIGTERM");
    assert!(took <= STOP_WITHIN, "the broker took {took:?} to exit after SIGTERM (> {STOP_WITHIN:?})\n{}", keyd.log());
    assert_eq!(status.code(), Some(0), "broker exit status\n{}", keyd.log());
    for w in workers {
        assert!(!alive(w), "worker {w} outlived its broker");
    }
    took
}

/// A worker that dies at start, again and again: SIGTERM during the crash loop stops the broker
/// within 1 s (it may arrive during a backoff, a spawn or the wait for a report: every wait
/// listens to the signalfd).
#[test]
fn sigterm_during_a_crash_loop_stops_within_a_second() {
    require_keyd!();
    let (mut keyd, first) = crash_looping_keyd();
    let deadline = Instant::now() + Duration::from_secs(20);
    while refused_starts(&keyd.log()) < 3 {
        assert!(Instant::now() < deadline, "no crash loop\n{}", keyd.log());
        std::thread::sleep(Duration::from_millis(5));
    }
    let log = keyd.log();
    assert!(log.contains(&format!("worker {first} was killed by SIGKILL")), "{log}");
    assert!(log.contains("no-such-libaziot_keys.so"), "the refusal names the library:\n{log}");
    sigterm_and_expect_prompt_exit(&mut keyd);
}

/// SIGTERM while the broker waits out its longest backoff (5 s) is honoured at once.
#[test]
fn sigterm_during_the_longest_backoff_stops_within_a_second() {
    require_keyd!();
    let (mut keyd, _) = crash_looping_keyd();
    // 50 ms, 100 ms, ... 3.2 s, then 5 s: about 6.5 s of backoff before the longest one.
    assert!(
        keyd.wait_log("restarting the worker of keyd in 5s", Duration::from_secs(30)),
        "the broker never reached its longest backoff\n{}",
        keyd.log()
    );
    let took = sigterm_and_expect_prompt_exit(&mut keyd);
    assert!(keyd.log().contains("while waiting to restart the worker; exiting"), "{}", keyd.log());
    println!("stopped {took:?} into a 5 s backoff");
}

/// SIGTERM while the first worker has not reported its sandbox (it hangs opening its key
/// library, a FIFO nobody writes): the broker kills that worker and exits 0, within 1 s.
#[test]
fn sigterm_during_the_first_start_kills_the_worker_and_exits() {
    require_keyd!();
    let builder = Keyd::builder();
    let fifo = builder.dir().join("stuck-libaziot_keys.so");
    let c = CString::new(fifo.to_str().expect("utf-8")).expect("no NUL");
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo: {}", std::io::Error::last_os_error());
    let mut keyd = builder.extra(&format!("aziot_keys_library = {}", toml_str(fifo.to_str().unwrap()))).start_unready();
    let broker = i32::try_from(keyd.pid()).expect("pid");
    let (ks_uid, _) = service_user();
    // the worker exists (the broker has handed over and waits for its report)
    let deadline = Instant::now() + Duration::from_secs(10);
    let worker = loop {
        let found = children_of(broker).into_iter().find(|&p| {
            std::fs::read_to_string(format!("/proc/{p}/status")).is_ok_and(|s| {
                s.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some(&ks_uid.to_string()))
            })
        });
        if let Some(w) = found {
            break w;
        }
        assert!(Instant::now() < deadline, "no worker was started\n{}", keyd.log());
        std::thread::sleep(Duration::from_millis(2));
    };
    let _guard = KillOnDrop(worker);
    assert!(keyd.status().is_none(), "the worker cannot have reported: {:?}", keyd.status());
    sigterm_and_expect_prompt_exit(&mut keyd);
    assert!(wait_gone(worker, STOP_WITHIN).is_some(), "worker {worker} still running");
    assert!(keyd.log().contains("while the first worker was starting"), "{}", keyd.log());
}

/// kill -9 of the broker: the kernel kills its worker (PR_SET_PDEATHSIG, set after the uid
/// change that would clear it); polled, gone within 1 s.
#[test]
fn broker_kill9_takes_its_worker_within_a_second() {
    require_keyd!();
    let keyd = Keyd::start("");
    let broker = i32::try_from(keyd.pid()).expect("pid");
    let worker = keyd.worker_pid();
    let _guard = KillOnDrop(worker);
    let status = std::fs::read_to_string(format!("/proc/{worker}/status")).expect("worker status");
    assert!(status.lines().any(|l| l.starts_with("PPid:") && l.ends_with(&format!("\t{broker}"))), "{status}");
    // SAFETY: plain syscall on the broker this test started.
    assert_eq!(unsafe { libc::kill(broker, libc::SIGKILL) }, 0);
    match wait_gone(worker, STOP_WITHIN) {
        Some(took) => println!("worker {worker} gone {took:?} after kill -9 of broker {broker}"),
        None => panic!("worker {worker} still running {STOP_WITHIN:?} after its broker was killed"),
    }
}

// ---- under the unit's sandbox ----

/// The unit whose sandbox the broker runs under here.
fn unit_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/systemd/aziot-keyd.service")
}

/// `Key=value` lines of the unit's [Service] section.
fn unit_settings() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(unit_file()).expect("read the unit");
    let mut in_service = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service && !line.starts_with('#') {
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
    }
    out
}

/// The capability numbers of `linux/capability.h` for the names a unit may list.
fn cap_number(name: &str) -> u32 {
    const CAPS: &[&str] = &[
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_LINUX_IMMUTABLE",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_BROADCAST",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_IPC_LOCK",
        "CAP_IPC_OWNER",
        "CAP_SYS_MODULE",
        "CAP_SYS_RAWIO",
        "CAP_SYS_CHROOT",
        "CAP_SYS_PTRACE",
        "CAP_SYS_PACCT",
        "CAP_SYS_ADMIN",
        "CAP_SYS_BOOT",
        "CAP_SYS_NICE",
        "CAP_SYS_RESOURCE",
        "CAP_SYS_TIME",
        "CAP_SYS_TTY_CONFIG",
        "CAP_MKNOD",
        "CAP_LEASE",
        "CAP_AUDIT_WRITE",
        "CAP_AUDIT_CONTROL",
        "CAP_SETFCAP",
        "CAP_MAC_OVERRIDE",
        "CAP_MAC_ADMIN",
        "CAP_SYSLOG",
        "CAP_WAKE_ALARM",
        "CAP_BLOCK_SUSPEND",
        "CAP_AUDIT_READ",
        "CAP_PERFMON",
        "CAP_BPF",
        "CAP_CHECKPOINT_RESTORE",
    ];
    CAPS.iter().position(|c| *c == name).unwrap_or_else(|| panic!("unknown capability {name} in the unit")) as u32
}

/// What the harness applies, read from the unit.
struct UnitSandbox {
    /// CapabilityBoundingSet= as a mask.
    caps: u64,
}

impl UnitSandbox {
    fn from_unit() -> UnitSandbox {
        let settings = unit_settings();
        let get = |key: &str| settings.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).last();
        // The properties this test is about; if the unit drops one, the test no longer proves
        // what docs/security.md says.
        for (key, want) in [
            ("PrivateDevices", "yes"),
            ("ProtectKernelLogs", "yes"),
            ("NoNewPrivileges", "yes"),
            ("ProtectProc", "invisible"),
            ("ProcSubset", "pid"),
            ("UMask", "0077"),
        ] {
            assert_eq!(get(key), Some(want), "{}: {key}", unit_file().display());
        }
        let caps = get("CapabilityBoundingSet").expect("CapabilityBoundingSet in the unit");
        let caps = caps.split_whitespace().fold(0u64, |m, name| m | 1 << cap_number(name));
        UnitSandbox { caps }
    }

    /// Makes `cmd` exec inside the unit's sandbox: a private mount namespace; /dev a fresh tmpfs
    /// holding only null, zero, full, random, urandom, tty (PrivateDevices); /proc a new procfs
    /// with hidepid=invisible,subset=pid (ProtectProc=invisible, ProcSubset=pid — /proc/kmsg is
    /// not in it: ProtectKernelLogs' /proc half; /dev/kmsg is not in the new /dev: its other
    /// half); the capability bounding set cut to CapabilityBoundingSet (so a root exec gets
    /// exactly those); NoNewPrivileges; UMask=0077.
    fn apply(&self, cmd: &mut Command) {
        let last_cap: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .expect("cap_last_cap")
            .trim()
            .parse()
            .expect("cap_last_cap");
        let keep = self.caps;
        let cstr = |s: &str| CString::new(s).expect("no NUL");
        let (root, dev, proc_, tmpfs, procfs) = (cstr("/"), cstr("/dev"), cstr("/proc"), cstr("tmpfs"), cstr("proc"));
        let (dev_opts, proc_opts) = (cstr("mode=0755,size=64k"), cstr("hidepid=invisible,subset=pid"));
        let nodes: Vec<(CString, u32, u32)> =
            [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9), ("tty", 5, 0)]
                .into_iter()
                .map(|(n, major, minor)| (cstr(&format!("/dev/{n}")), major, minor))
                .collect();
        // SAFETY: runs in the forked child before exec; only raw syscalls on the CStrings and
        // values prepared above (no allocation, no lock).
        unsafe {
            cmd.pre_exec(move || {
                let check = |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) };
                check(libc::unshare(libc::CLONE_NEWNS))?;
                check(libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ))?;
                check(libc::mount(
                    tmpfs.as_ptr(),
                    dev.as_ptr(),
                    tmpfs.as_ptr(),
                    libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_STRICTATIME,
                    dev_opts.as_ptr().cast(),
                ))?;
                libc::umask(0);
                for (path, major, minor) in &nodes {
                    check(libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(*major, *minor)))?;
                }
                check(libc::mount(
                    procfs.as_ptr(),
                    proc_.as_ptr(),
                    procfs.as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    proc_opts.as_ptr().cast(),
                ))?;
                for cap in 0..=last_cap {
                    if keep & (1u64 << cap) == 0 {
                        check(libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0))?;
                    }
                }
                check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
                libc::umask(0o077);
                Ok(())
            });
        }
    }
}

/// A broker started by hand (not the Keyd harness: it needs its own pre_exec), killed on drop.
struct UnitBroker {
    child: std::process::Child,
    dir: TempDir,
}

impl UnitBroker {
    fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(self.dir.path().join("keyd.log")).unwrap_or_default()).into_owned()
    }
    fn status(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&std::fs::read(self.dir.path().join("keyd.status")).ok()?).ok()
    }
    /// Polls the status file until it names this broker and a worker other than `not`.
    fn wait_worker(&self, not: Option<i32>, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.status() {
                let ours = s["broker_pid"].as_u64() == Some(u64::from(self.child.id()));
                let worker = s["worker_pid"].as_i64().and_then(|p| i32::try_from(p).ok());
                if ours && worker.is_some() && worker != not {
                    return s;
                }
            }
            assert!(Instant::now() < deadline, "no new worker recorded within {timeout:?}\n{}", self.log());
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

impl Drop for UnitBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- broker log ---\n{}\n--- end ---", self.log());
        }
    }
}

fn start_under_unit_sandbox(sandbox: &UnitSandbox) -> UnitBroker {
    let dir = TempDir::new("broker-unit-sandbox");
    let root = dir.path();
    std::fs::create_dir(root.join("config.d")).expect("mkdir config.d");
    std::fs::write(
        root.join("config.toml"),
        format!(
            "[aziot_keys]\nhomedir_path = {}\n[endpoints]\naziot_keyd = {}\n",
            toml_str(root.join("home").to_str().expect("utf-8")),
            toml_str(&format!("unix://{}", root.join("keyd.sock").display())),
        ),
    )
    .expect("write config.toml");
    let log = std::fs::File::create(root.join("keyd.log")).expect("log file");
    let mut cmd = Command::new(aziotd_bin());
    cmd.arg("aziot-keyd")
        .env_clear()
        .env("AZIOT_KEYD_CONFIG", root.join("config.toml"))
        .env("AZIOT_KEYD_CONFIG_DIR", root.join("config.d"))
        .env("AZIOT_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log);
    sandbox.apply(&mut cmd);
    let child = cmd.spawn().expect("spawn the broker under the unit's sandbox");
    UnitBroker { child, dir }
}

fn status_field(pid: i32, name: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
}

/// The broker runs under the unit's sandbox (checked from outside: its mount namespace has no
/// /dev/kmsg and no /proc/kmsg, its capabilities are the unit's, NoNewPrivs); a forbidden
/// syscall injected into its worker is named by number and name in the broker's log — from
/// the worker's SIGSYS handler's record, the kernel log being out of reach — and the worker is
/// restarted and serves.
#[cfg(target_arch = "x86_64")]
#[test]
fn seccomp_death_is_named_under_the_units_sandbox() {
    require!(Dep::Root, Dep::ServiceUser("aziotks"));
    let sandbox = UnitSandbox::from_unit();
    let broker = start_under_unit_sandbox(&sandbox);
    let status = broker.wait_worker(None, Duration::from_secs(10));
    let bpid = i32::try_from(broker.child.id()).expect("pid");
    let old = i32::try_from(status["worker_pid"].as_i64().expect("worker_pid")).expect("pid");
    let _guard = KillOnDrop(old);

    // The sandbox is in force, seen from outside.
    let ns = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).expect("mnt ns");
    assert_ne!(ns(bpid), ns(std::process::id() as i32), "the broker has its own mount namespace");
    assert_eq!(ns(old), ns(bpid), "the worker shares the broker's");
    let in_ns = |path: &str| PathBuf::from(format!("/proc/{bpid}/root{path}"));
    for hidden in ["/dev/kmsg", "/proc/kmsg"] {
        assert!(std::fs::symlink_metadata(in_ns(hidden)).is_err(), "{hidden} exists in the broker's namespace");
    }
    let mut devs: Vec<String> = std::fs::read_dir(in_ns("/dev"))
        .expect("the broker's /dev")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    devs.sort();
    assert_eq!(devs, ["full", "null", "random", "tty", "urandom", "zero"], "the broker's /dev");
    let hex = |v: String| u64::from_str_radix(&v, 16).expect("hex");
    assert_eq!(hex(status_field(bpid, "CapBnd")), sandbox.caps, "broker CapBnd = the unit's CapabilityBoundingSet");
    assert_eq!(hex(status_field(bpid, "CapEff")), sandbox.caps, "broker CapEff");
    assert_eq!(status_field(bpid, "NoNewPrivs"), "1", "broker NoNewPrivs");
    assert_eq!(hex(status_field(old, "CapEff")), 0, "worker CapEff");

    let api = Api::new(broker.dir.path().join("keyd.sock"), V2021);
    let h = api.create_key("k", "sign");
    inject::inject_forbidden_syscall(old);
    let (nr, name) = inject::FORBIDDEN;
    assert!(wait_gone(old, Duration::from_secs(10)).is_some(), "worker {old} survived a forbidden syscall");
    let status = broker.wait_worker(Some(old), Duration::from_secs(20));
    assert_eq!(status["restarts"], serde_json::json!(1), "{status}");
    let line = format!("worker {old} was killed by seccomp (SIGSYS): forbidden syscall {nr} ({name})");
    assert!(broker.wait_log(&line, Duration::from_secs(5)), "the broker logs `{line}`:\n{}", broker.log());
    // and serves again, with the same key
    assert_eq!(api.sign_hmac(&h, b"m").len(), 32);
}
