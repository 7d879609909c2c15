//! identityd benchmark: `GET /identities/identity` as the device (a `device` principal) and as a
//! module principal, at c=1 and c=8, side by side with the hyper floor keyd-bench uses
//! (`keyd-bench --floor`: a trivial hyper server on a unix socket answering 200 with a small JSON
//! body), and the RSS of the idle identityd worker. Prints figures; never asserts on time.
//!
//! ```text
//! identityd-bench [--duration SECS]   (as root; keyd-bench beside it; AZIOTD_BIN or <target>/<profile>/aziotd)
//! ```
//!
//! identityd runs as in production: root broker + confined `aziotid` worker, with keyd and certd
//! beside it (aziot_tests::identityd), manual SAS provisioning against the mock IoT Hub
//! (tests/src/mock_hub.rs, real TLS), which holds the module `mod-a` after the startup
//! reconciliation. The module principal's E1 is answered from the module cache
//! (`prefer_module_identity_cache = true`; without it every module E1 is a hub round trip, as
//! upstream, and measures the hub). Callers are other uids: each row runs in a child process
//! (this program, `--client`) running as the caller's uid, one keep-alive connection per client
//! thread; the floor rows use the same client (as root).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aziot_tests::http::build_request;
use aziot_tests::load::{closed_loop, rss_kib};
use aziot_tests::identityd::{Identityd, DEVICE_ID, DEVICE_KEY, DEVICE_UID, HOSTNAME, MODULE_UID, V2021};
use aziot_tests::keyd::{profile_dir, TempDir, TEST_GID};
use aziot_tests::mock_hub::{DeviceCredential, MockHub};
use aziot_tests::mock_tls::TestCa;

const PRINCIPALS: &str = "[[principal]]\nuid = 5101\nname = \"mod-a\"\nidtype = [\"module\"]\n\n[[principal]]\nuid = 5103\nname = \"dev-p\"\nidtype = [\"device\"]\n";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--client") {
        return client_main(&args[2..]);
    }
    let mut duration = Duration::from_secs(3);
    if let Some(i) = args.iter().position(|a| a == "--duration") {
        duration = Duration::from_secs_f64(args.get(i + 1).and_then(|s| s.parse().ok()).expect("--duration SECS"));
    }
    let warmup = Duration::from_millis(500);
    assert!(nix::unistd::geteuid().is_root(), "identityd-bench starts brokers: run it as root");

    let floor_dir = TempDir::new("identityd-bench-floor");
    let floor_sock = floor_dir.path().join("floor.sock");
    let mut floor = Command::new(profile_dir().join("keyd-bench"))
        .arg("--floor")
        .arg(&floor_sock)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn `keyd-bench --floor` (build the tests package's bins)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&floor_sock).is_err() {
        assert!(Instant::now() < deadline, "floor server did not start");
        std::thread::sleep(Duration::from_millis(5));
    }

    // The mock hub's CA, trusted by identityd through SSL_CERT_FILE (the harness passes it on).
    let ca = TestCa::new("aziot identityd-bench CA");
    // Not under /tmp: the worker has its own empty /tmp (its mount namespace).
    let ca_path = profile_dir().join(format!("identityd-bench-ca-{}.pem", std::process::id()));
    ca.write_cert(&ca_path).expect("write the CA");
    std::fs::set_permissions(&ca_path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod the CA");
    std::env::set_var("SSL_CERT_FILE", &ca_path);
    let hub = MockHub::start_with_ca(ca, 0).expect("start the mock hub");
    let name = format!("127.0.0.1:{}", hub.port());
    hub.set_hub_name(&name);
    hub.add_device(DEVICE_ID, DeviceCredential::Sas(DEVICE_KEY.to_vec()));

    let config = format!(
        "hostname = \"{HOSTNAME}\"\nprefer_module_identity_cache = true\n[provisioning]\nsource = \"manual\"\niothub_hostname = \"{name}\"\ndevice_id = \"{DEVICE_ID}\"\n[provisioning.authentication]\nmethod = \"sas\"\ndevice_id_pk = \"device-id\"\n{PRINCIPALS}"
    );
    let mut stack = Identityd::prepare(&config);
    stack.start_identityd().unwrap_or_else(|e| panic!("identityd: {e}"));
    assert!(
        hub.wait_for(Duration::from_secs(60), |h| h.module(DEVICE_ID, "mod-a").is_some_and(|m| m.primary_key.is_some())),
        "mod-a not reconciled\n{}",
        stack.log()
    );
    // Idle: reconciled, no request served yet.
    let idle_rss = rss_kib(stack.worker_pid());
    // Both callers are answered (200) before anything is measured.
    for uid in [DEVICE_UID, MODULE_UID] {
        let r = stack.client(Some(uid), V2021).get("/identities/identity");
        assert_eq!(r.status, 200, "uid {uid}: {r}");
    }

    let get = build_request("GET", &format!("/identities/identity?api-version={V2021}"), None);
    println!("identityd-bench: GET /identities/identity, {duration:?} per row");
    println!("  aziotd: {}", aziot_tests::keyd::aziotd_bin().display());
    let mut table = Vec::new();
    for conc in [1, 8] {
        let f = measure("floor (hyper, 2 workers)", None, &floor_sock, &get, conc, warmup, duration);
        let d = measure("identityd E1 as the device", Some(DEVICE_UID), &stack.socket(), &get, conc, warmup, duration);
        let m = measure("identityd E1 as a module", Some(MODULE_UID), &stack.socket(), &get, conc, warmup, duration);
        table.push((conc, f, d, m));
    }
    println!("summary:");
    for (conc, f, d, m) in &table {
        let ratio = |x: f64| if *f > 0.0 { x / f } else { 0.0 };
        let verdict = |x: f64| match (*conc, ratio(x) >= 0.3) {
            (8, true) => " (target >= 0.30: met)",
            (8, false) => " (target >= 0.30: NOT met)",
            _ => "",
        };
        println!(
            "  c={conc}: floor {f:>9.0} req/s | device {d:>9.0} req/s, {:.2}x floor{} | module {m:>9.0} req/s, {:.2}x floor{}",
            ratio(*d),
            verdict(*d),
            ratio(*m),
            verdict(*m)
        );
    }
    match idle_rss {
        Some(kib) => println!("  idle identityd worker RSS: {kib} KiB (VmRSS, after start and reconciliation)"),
        None => println!("  idle identityd worker RSS: unavailable"),
    }
    drop(stack);
    let _ = std::fs::remove_file(&ca_path);
    let _ = floor.kill();
    let _ = floor.wait();
}

/// Runs one row in a child process as `uid` (None: root) with group TEST_GID (identityd's
/// socket group in the harness); returns its requests per second.
fn measure(
    name: &str,
    uid: Option<u32>,
    sock: &Path,
    req: &[u8],
    conc: usize,
    warmup: Duration,
    duration: Duration,
) -> f64 {
    let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
    cmd.arg("--client")
        .arg(sock)
        .arg(conc.to_string())
        .arg(warmup.as_millis().to_string())
        .arg(duration.as_millis().to_string())
        .arg(String::from_utf8_lossy(req).into_owned())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(uid) = uid {
        std::os::unix::process::CommandExt::uid(&mut cmd, uid);
        std::os::unix::process::CommandExt::gid(&mut cmd, TEST_GID);
    }
    let out = cmd.output().expect("run the client");
    assert!(out.status.success(), "{name}: client failed ({:?})", out.status);
    let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let v: Vec<f64> = line.split_whitespace().map(|x| x.parse().expect("client output")).collect();
    let (rps, p50, p99, errors) = (v[0], v[1], v[2], v[3]);
    let who = uid.map_or("root".to_owned(), |u| format!("uid {u}"));
    println!(
        "  {name:<28} ({who:<8}) c={conc:<2} {rps:>9.0} req/s  p50 {p50:>8.1} µs  p99 {p99:>8.1} µs  errors {errors}"
    );
    rps
}

/// `--client SOCK CONC WARMUP_MS DURATION_MS REQUEST`: prints `rps p50_us p99_us errors`.
fn client_main(args: &[String]) {
    let sock = Path::new(&args[0]).to_path_buf();
    let conc: usize = args[1].parse().expect("conc");
    let warmup = Duration::from_millis(args[2].parse().expect("warmup"));
    let duration = Duration::from_millis(args[3].parse().expect("duration"));
    let l = closed_loop(&sock, args[4].as_bytes(), conc, warmup, duration);
    println!("{} {} {} {}", l.rps, l.p50_us, l.p99_us, l.errors);
}
