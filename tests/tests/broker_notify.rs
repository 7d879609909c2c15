//! The broker tells systemd it is ready (sd_notify READY=1 on $NOTIFY_SOCKET) only once its
//! worker has reported the sandbox in force, and never passes NOTIFY_SOCKET or any other
//! variable on to the worker.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aziot_tests::keyd::{aziotd_bin, TempDir};

#[test]
fn ready_is_notified_after_the_sandbox_report_and_the_worker_gets_no_environment() {
    let dir = TempDir::new("broker-notify");
    let root = dir.path();
    std::fs::create_dir(root.join("home")).unwrap();
    std::fs::write(
        root.join("config.toml"),
        format!(
            "[aziot_keys]\nhomedir_path = \"{0}/home\"\n[endpoints]\naziot_keyd = \"unix://{0}/keyd.sock\"\n",
            root.display()
        ),
    )
    .unwrap();
    let notify_path = root.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let log = std::fs::File::create(root.join("keyd.log")).unwrap();
    let started = Instant::now();
    let mut child = Command::new(aziotd_bin())
        .arg("aziot-keyd")
        .env_clear()
        .env("AZIOT_KEYD_CONFIG", root.join("config.toml"))
        .env("AZIOT_KEYD_CONFIG_DIR", root.join("config.d"))
        .env("NOTIFY_SOCKET", &notify_path)
        .env("SECRET_LOOKING_VARIABLE", "must-not-reach-the-worker")
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();

    let mut buf = [0u8; 512];
    let n = notify.recv(&mut buf).expect("a notification within 10 s");
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(message.lines().any(|l| l == "READY=1"), "{message:?}");
    assert!(
        message.lines().any(|l| l == format!("MAINPID={}", child.id())),
        "MAINPID is the broker: {message:?}"
    );
    // READY comes after the worker's report, so the status file exists and the socket serves.
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("keyd.status")).expect("status file before READY")).unwrap();
    let worker = status["worker_pid"].as_i64().unwrap();
    assert!(std::os::unix::net::UnixStream::connect(root.join("keyd.sock")).is_ok());
    eprintln!("READY after {:?}", started.elapsed());

    // The worker's environment is empty.
    let environ = std::fs::read(format!("/proc/{worker}/environ")).unwrap();
    assert!(environ.is_empty(), "worker environment: {:?}", String::from_utf8_lossy(&environ));

    // The worker starts with no signal blocked (the broker blocks those it reads via signalfd).
    let worker_status = std::fs::read_to_string(format!("/proc/{worker}/status")).unwrap();
    let blocked = worker_status.lines().find_map(|l| l.strip_prefix("SigBlk:")).unwrap().trim().to_owned();
    assert_eq!(u64::from_str_radix(&blocked, 16).unwrap(), 0, "worker SigBlk");

    // SIGTERM: the broker stops its worker (promptly: the worker does not block SIGTERM) and
    // exits 0.
    let stopping = Instant::now();
    // SAFETY: plain syscall on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    eprintln!("stopped in {:?}", stopping.elapsed());
    assert!(!std::path::Path::new(&format!("/proc/{worker}")).exists(), "the worker is gone");
}
