//! The descriptors handed to a worker are checked against its policy's `[[descriptor]]` entries
//! (policy/services/<svc>.toml; the matching rule: `aziot_policy::DescriptorSpec`). The broker
//! checks before it spawns, and offers no route to hand over anything else (a drop-in adds path
//! rules and ports only; the config only fills declared names) — so the worker's own check is
//! tested at its boundary: this test starts `aziotd --worker` exactly as the broker does (the
//! hand-off socketpair on fd 3, privileges dropped to the service user by
//! `aziot_policy::drop_privileges_in_child` between fork and exec, the manifest with the real
//! effective policy) and hands it one descriptor the policy does not declare.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aziot_ipc::handoff::{self, DescriptorKind, Manifest};
use aziot_tests::tempdir::TempDir;
use aziot_tests::{require, Dep};
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};

const DEADLINE: Duration = Duration::from_secs(15);

/// A worker started as the broker starts one, and the broker's end of its hand-off socket.
struct Worker {
    child: Child,
    control: OwnedFd,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_worker(service: &str) -> Worker {
    let policy = aziot_policy::builtin(service).unwrap();
    let creds = aziot_policy::resolve_credentials(&policy).unwrap();
    let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
    let child_fd = theirs.as_raw_fd();
    let mut cmd = Command::new(aziot_tests::keyd::aziotd_bin());
    cmd.arg0("aziotd").arg("--worker").env_clear().stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: runs in the forked child before exec; dup2 and the policy crate's privilege drop
    // (the broker's own pre-exec step) are async-signal-safe raw calls.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(child_fd, handoff::HANDOFF_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            aziot_policy::drop_privileges_in_child(&creds)
        });
    }
    let child = cmd.spawn().unwrap();
    drop(theirs);
    Worker { child, control: ours }
}

/// The manifest the broker would send, with these descriptors (built from JSON so that fields
/// with defaults added later keep their defaults).
fn manifest(service: &str, descriptors: &[(&str, DescriptorKind)]) -> Manifest {
    let policy = aziot_policy::effective(service, &aziot_policy::Grants::default(), None).unwrap();
    serde_json::from_value(serde_json::json!({
        "version": handoff::MANIFEST_VERSION,
        "service": service,
        "config": "",
        "descriptors": descriptors.iter().map(|(n, k)| serde_json::json!({"name": n, "kind": k})).collect::<Vec<_>>(),
        "policy": serde_json::to_value(&policy).unwrap(),
        "log_filter": "info",
        "seccomp_mode": "kill",
        "allow_degraded": false,
    }))
    .unwrap()
}

/// Waits (up to a deadline: the socket's receive timeout) for the worker's report.
fn report(worker: &Worker) -> serde_json::Value {
    use nix::sys::socket::{setsockopt, sockopt::ReceiveTimeout};
    use nix::sys::time::TimeVal;
    setsockopt(&worker.control, ReceiveTimeout, &TimeVal::new(DEADLINE.as_secs() as i64, 0)).unwrap();
    handoff::recv_json(worker.control.as_fd())
        .unwrap_or_else(|e| panic!("no report from the worker within {DEADLINE:?}: {e}"))
}

/// Polls for the worker's exit; its status.
fn exit_status(worker: &mut Worker) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = worker.child.try_wait().unwrap() {
            return status;
        }
        assert!(start.elapsed() < DEADLINE, "the worker did not exit within {DEADLINE:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn listener(dir: &TempDir) -> std::os::unix::net::UnixListener {
    std::os::unix::net::UnixListener::bind(dir.path().join("keyd.sock")).unwrap()
}

#[test]
fn worker_refuses_an_undeclared_descriptor() {
    require!(Dep::Root, Dep::ServiceUser("aziotks"));
    let dir = TempDir::new("worker-descriptors");
    let listener = listener(&dir);
    let extra = std::fs::File::open(dir.path()).unwrap();

    // Control: the same hand-off without the extra descriptor starts (sandbox report ok).
    let worker = spawn_worker("keyd");
    let m = manifest("keyd", &[("listener", DescriptorKind::UnixListener)]);
    handoff::send_manifest(worker.control.as_fd(), &m, &[listener.as_fd()]).unwrap();
    let ok = report(&worker);
    assert_eq!(ok["ok"], true, "the control run must start: {ok}");
    drop(worker);

    // One descriptor the policy does not declare: a refusal to start, naming it.
    let mut worker = spawn_worker("keyd");
    let m = manifest("keyd", &[("listener", DescriptorKind::UnixListener), ("extra", DescriptorKind::Directory)]);
    handoff::send_manifest(worker.control.as_fd(), &m, &[listener.as_fd(), extra.as_fd()]).unwrap();
    let refused = report(&worker);
    assert_eq!(refused["ok"], false, "{refused}");
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(
            "refusing to start the keyd worker: descriptor \"extra\" (directory) is not declared by the policy's \
             [[descriptor]] entries (declared: listener, state, preloaded-key:<id>)"
        ),
        "{error}"
    );
    let status = exit_status(&mut worker);
    assert_eq!(status.code(), Some(1), "{status:?}");
}

#[test]
fn worker_refuses_a_declared_name_of_the_wrong_kind_and_a_missing_one() {
    require!(Dep::Root, Dep::ServiceUser("aziotks"));
    let dir = TempDir::new("worker-descriptors");
    let listener = listener(&dir);
    let file = std::fs::File::create(dir.path().join("f")).unwrap();

    // `state` is declared as a directory: a file under that name is refused.
    let mut worker = spawn_worker("keyd");
    let m = manifest("keyd", &[("listener", DescriptorKind::UnixListener), ("state", DescriptorKind::File)]);
    handoff::send_manifest(worker.control.as_fd(), &m, &[listener.as_fd(), file.as_fd()]).unwrap();
    let error = report(&worker)["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains("descriptor \"state\" is a file, but the policy declares \"state\" as directory"),
        "{error}"
    );
    assert_eq!(exit_status(&mut worker).code(), Some(1));

    // The listener is required.
    let mut worker = spawn_worker("keyd");
    let m = manifest("keyd", &[]);
    handoff::send_manifest(worker.control.as_fd(), &m, &[]).unwrap();
    let error = report(&worker)["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains("the policy requires descriptor \"listener\" (unix-listener) and none was handed over"),
        "{error}"
    );
    assert_eq!(exit_status(&mut worker).code(), Some(1));
}
