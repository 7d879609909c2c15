//! The environment each worker receives from its broker: only its own list of the one service
//! table (policy/src/services.rs `worker_env`; broker/src/sanitize.rs `worker_env`), whatever
//! the unit's environment holds. Each broker is started with the proxy variables, SoftHSM2's
//! config variable, the trust store variables and an unrelated one set; the worker's
//! `/proc/<pid>/environ` (read as root) is compared with what that worker needs.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aziot_tests::keyd::{aziotd_bin, toml_str, TempDir};
use aziot_tests::tpmd::Swtpm;
use aziot_tests::{require, Dep};

/// What the unit's environment (the broker's) holds in every test.
const UNIT_ENV: [(&str, &str); 7] = [
    ("HTTPS_PROXY", "http://127.0.0.1:3128"),
    ("https_proxy", "http://127.0.0.1:3129"),
    ("SOFTHSM2_CONF", "/nonexistent/softhsm2.conf"),
    ("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"),
    ("SSL_CERT_DIR", "/etc/ssl/certs"),
    ("OPENSSL_CONF", "/nonexistent/openssl.cnf"),
    ("AZIOT_WORKER_ENV_TEST", "1"),
];

/// A broker of ours, killed (with its process group) on drop.
struct Broker(Child);

impl Drop for Broker {
    fn drop(&mut self) {
        let pid = self.0.id() as libc::pid_t;
        // SAFETY: plain syscalls on our own child and its process group.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.0.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: as above.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

/// Starts `aziotd <program>` on `config` (in `dir`) with [`UNIT_ENV`], waits for `<short>.status`
/// in `dir` (the socket's directory) and returns the broker and its worker's environment.
fn start(
    dir: &Path,
    program: &str,
    short: &str,
    config: &str,
) -> (Broker, BTreeMap<String, String>) {
    let upper = short.to_ascii_uppercase();
    let config_path = dir.join(format!("{short}.toml"));
    fs::write(&config_path, config).expect("write config");
    fs::create_dir_all(dir.join(format!("{short}.d"))).expect("mkdir config.d");
    let log_path = dir.join(format!("{short}.log"));
    let log = fs::File::create(&log_path).expect("log");
    let mut cmd = Command::new(aziotd_bin());
    cmd.arg(program)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env(format!("AZIOT_{upper}_CONFIG"), &config_path)
        .env(
            format!("AZIOT_{upper}_CONFIG_DIR"),
            dir.join(format!("{short}.d")),
        )
        .envs(UNIT_ENV)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().expect("dup log")))
        .stderr(Stdio::from(log))
        .process_group(0);
    let mut broker = Broker(cmd.spawn().expect("spawn aziotd"));
    let status = dir.join(format!("{short}.status"));
    let deadline = Instant::now() + Duration::from_secs(20);
    let pid = loop {
        if let Some(pid) = fs::read(&status)
            .ok()
            .and_then(|s| serde_json::from_slice::<serde_json::Value>(&s).ok())
            .and_then(|s| s["worker_pid"].as_i64())
        {
            break pid;
        }
        let log = || fs::read_to_string(&log_path).unwrap_or_default();
        if let Ok(Some(s)) = broker.0.try_wait() {
            panic!("{program} exited ({s}) before it was ready:\n{}", log());
        }
        assert!(Instant::now() < deadline, "{program} not ready:\n{}", log());
        std::thread::sleep(Duration::from_millis(20));
    };
    let environ = fs::read(format!("/proc/{pid}/environ")).expect("read the worker's environ");
    let env = environ
        .split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=').unwrap_or((&kv, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    (broker, env)
}

fn unix(p: PathBuf) -> String {
    toml_str(&format!("unix://{}", p.display()))
}

/// The names in `env`, and that each value is the unit's.
fn names(env: &BTreeMap<String, String>) -> Vec<&str> {
    for (k, v) in env {
        let unit = UNIT_ENV.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
        assert_eq!(unit, Some(v.as_str()), "{k} is not the unit's value");
    }
    env.keys().map(String::as_str).collect()
}

/// The worker's environment is exactly its row of the service table.
fn assert_table_row(short: &str, env: &BTreeMap<String, String>) {
    let info = aziot_policy::services::by_short(short).expect("service");
    let mut row: Vec<&str> = info.worker_env.to_vec();
    row.sort_unstable();
    assert_eq!(names(env), row, "{short}'s worker environment");
}

#[test]
fn keyd_worker_gets_softhsm2_conf_only() {
    require!(Dep::Root, Dep::ServiceUser("aziotks"));
    let dir = TempDir::new("worker-env-keyd");
    let config = format!(
        "[aziot_keys]\nhomedir_path = {}\n[endpoints]\naziot_keyd = {}\n",
        toml_str(dir.path().join("home").to_str().unwrap()),
        unix(dir.path().join("keyd.sock")),
    );
    let (_broker, env) = start(dir.path(), "aziot-keyd", "keyd", &config);
    assert_eq!(names(&env), ["SOFTHSM2_CONF"], "{env:?}");
    assert_table_row("keyd", &env);
}

#[test]
fn certd_worker_gets_the_proxy_and_the_trust_store() {
    require!(Dep::Root, Dep::ServiceUser("aziotcs"));
    // certd's broker grants its worker keyd's socket: a keyd must be there
    let keyd = aziot_tests::keyd::Keyd::builder()
        .keep_socket_owner()
        .start();
    let dir = TempDir::new("worker-env-certd");
    let config = format!(
        "homedir_path = {}\n[endpoints]\naziot_certd = {}\naziot_keyd = {}\n",
        toml_str(dir.path().join("home").to_str().unwrap()),
        unix(dir.path().join("certd.sock")),
        unix(keyd.socket().to_path_buf()),
    );
    let (_broker, env) = start(dir.path(), "aziot-certd", "certd", &config);
    assert_eq!(
        names(&env),
        [
            "HTTPS_PROXY",
            "SSL_CERT_DIR",
            "SSL_CERT_FILE",
            "https_proxy"
        ],
        "{env:?}"
    );
    assert_table_row("certd", &env);
}

#[test]
fn tpmd_worker_gets_an_empty_environment() {
    require!(Dep::Root, Dep::ServiceUser("aziottpm"), Dep::Swtpm);
    let dir = TempDir::new("worker-env-tpmd");
    let swtpm = Swtpm::start(&dir.path().join("swtpm"));
    let config = format!(
        "tcti = {}\n[endpoints]\naziot_tpmd = {}\n",
        toml_str(&swtpm.tcti()),
        unix(dir.path().join("tpmd.sock")),
    );
    let (broker, env) = start(dir.path(), "aziot-tpmd", "tpmd", &config);
    assert!(env.is_empty(), "{env:?}");
    assert_table_row("tpmd", &env);
    drop(broker);
    drop(swtpm);
}

/// identityd's worker gets the trust store only: the proxy is validated by the broker and
/// reaches the worker in its config text (identityd.md), never in its environment.
#[test]
fn identityd_worker_gets_the_trust_store_but_not_the_proxy() {
    aziot_tests::require_identityd!();
    let mut stack =
        aziot_tests::identityd::Identityd::prepare(&aziot_tests::identityd::default_config(""));
    for (k, v) in UNIT_ENV {
        stack.set_broker_env(k, v);
    }
    stack
        .start_identityd()
        .unwrap_or_else(|e| panic!("identityd: {e}"));
    let environ = fs::read(format!("/proc/{}/environ", stack.worker_pid()))
        .expect("read the worker's environ");
    let env: BTreeMap<String, String> = environ
        .split(|b| *b == 0)
        .filter(|kv| !kv.is_empty())
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    assert_eq!(names(&env), ["SSL_CERT_DIR", "SSL_CERT_FILE"], "{env:?}");
    assert_table_row("identityd", &env);
}
