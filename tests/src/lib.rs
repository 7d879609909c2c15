//! Black-box test harness for the aziot services (keyd and tpmd).
//!
//! * [`keyd`]: starts the real `aziotd aziot-keyd` in a private temporary prefix — binding its
//!   own socket, or socket-activated by `systemd-socket-activate` when
//!   `AZIOT_TEST_ACTIVATION=systemd` — restarts it, kills it, exposes its log and status file;
//! * [`softhsm`]: a private SoftHSM2 token store (`AZIOT_TEST_BACKEND=softhsm`, PKCS#11 tests);
//! * [`tpmd`]: a fresh swtpm, and tpmd through the broker;
//! * [`tempdir`]: private temporary directories;
//! * [`http`]: a raw HTTP/1.1-over-UDS client written from the spec (no product code);
//! * [`api`]: one helper per keyd endpoint plus the response-envelope checks;
//! * [`crypto`]: local reference computations (HMAC, AES-GCM, ECDSA/RSA verification) and
//!   key-handle parsing;
//! * [`openssl_cli`]: the `openssl` CLI plumbing of the engine and provider suites (scratch
//!   directory with the cdylib, CA and certificates, `s_server`, verification with keyd's keys).
//!
//! Scenarios that must hold for every api-version are written once as `fn name(v: &str)` and
//! instantiated for both versions with [`both_versions!`].
//!
//! A test whose dependency (root, a service user, SoftHSM2, swtpm, tpm2-tools, the openssl CLI,
//! strace, systemd-socket-activate, ...) is missing FAILS naming what is missing — unless
//! `AZIOT_ALLOW_SKIP=1` is set, when it prints `SKIPPED: <test>: <what is missing>` and passes.
//! `scripts/test` never sets it. Every test states its dependencies first with [`require!`]
//! (or [`require_keyd!`] for the keyd harness), built on [`require`].

pub mod api;
pub mod certd;
pub mod crypto;
pub mod fault;
pub mod http;
pub mod identityd;
pub mod keyd;
pub mod load;
pub mod mock_dps;
pub mod mock_est;
pub mod mock_hub;
pub mod mock_tls;
pub mod openssl_cli;
pub mod softhsm;
pub mod storage_fault;
pub mod tempdir;
pub mod tpmd;
pub mod worker_spawn;

pub use api::{Api, V2020, V2021, VERSIONS};
pub use keyd::Keyd;

/// The environment variable that turns a missing dependency from a failure into a skip.
pub const ALLOW_SKIP_ENV: &str = "AZIOT_ALLOW_SKIP";

/// Something a test needs from the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dep {
    /// Running as root (the suites start brokers and switch uids).
    Root,
    /// A service user (created by `systemd-sysusers packaging/sysusers.d/aziot.conf`).
    ServiceUser(&'static str),
    /// SoftHSM2's PKCS#11 module and `softhsm2-util`.
    SoftHsm,
    /// `pkcs11-tool` (package opensc).
    Pkcs11Tool,
    /// The `swtpm` TPM simulator.
    Swtpm,
    /// tpm2-tools (`tpm2_createek`, ...).
    Tpm2Tools,
    /// The `openssl` command-line tool.
    OpensslCli,
    /// `strace`.
    Strace,
    /// `systemd-socket-activate` (package systemd).
    SocketActivate,
    /// `python3` (a client in another uid).
    Python3,
    /// `curl` (a client in another uid).
    Curl,
}

impl Dep {
    /// `None` when present; else what is missing and how to get it.
    pub fn missing(self) -> Option<String> {
        let program = |name: &str, package: &str| {
            (!on_path(name)).then(|| format!("{name} is not installed (apt-get install {package})"))
        };
        match self {
            Dep::Root => (!nix::unistd::geteuid().is_root())
                .then(|| "root (the test starts services and switches uids): run it as root".to_owned()),
            Dep::ServiceUser(user) => match nix::unistd::User::from_name(user) {
                Ok(Some(_)) => None,
                _ => Some(format!(
                    "the service user {user} (run `systemd-sysusers packaging/sysusers.d/aziot.conf` as root)"
                )),
            },
            Dep::SoftHsm => {
                if !std::path::Path::new(softhsm::SOFTHSM_MODULE).is_file() {
                    Some(format!("SoftHSM2 ({} is missing; apt-get install softhsm2)", softhsm::SOFTHSM_MODULE))
                } else {
                    program("softhsm2-util", "softhsm2")
                }
            }
            Dep::Pkcs11Tool => program("pkcs11-tool", "opensc"),
            Dep::Swtpm => program("swtpm", "swtpm swtpm-tools"),
            Dep::Tpm2Tools => program("tpm2_createek", "tpm2-tools"),
            Dep::OpensslCli => program("openssl", "openssl"),
            Dep::Strace => program("strace", "strace"),
            Dep::SocketActivate => (!keyd::socket_activate_available())
                .then(|| "systemd-socket-activate is not installed (apt-get install systemd)".to_owned()),
            Dep::Python3 => program("python3", "python3"),
            Dep::Curl => program("curl", "curl"),
        }
    }
}

/// Whether `name` is an executable file in a `$PATH` directory (or /usr/bin, /bin, /usr/sbin).
pub fn on_path(name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/bin", "/usr/sbin", "/sbin"].map(std::path::PathBuf::from))
        .map(|d| d.join(name))
        .any(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The running test's name (libtest names each test's thread after it).
pub fn current_test() -> String {
    std::thread::current().name().unwrap_or("<unnamed test>").to_owned()
}

/// The one rule for missing dependencies: `present` → true. Missing → with
/// `AZIOT_ALLOW_SKIP=1`, prints `SKIPPED: <test>: <what>` and returns false (the caller returns);
/// otherwise panics naming what is missing (a failure, never a silent pass).
pub fn require(what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    let test = current_test();
    if std::env::var(ALLOW_SKIP_ENV).is_ok_and(|v| v == "1") {
        println!("SKIPPED: {test}: {what}");
        false
    } else {
        panic!("{test}: missing {what} ({ALLOW_SKIP_ENV}=1 turns this failure into a skip; scripts/test never sets it)")
    }
}

/// [`require`] for each dependency in turn; false (after `SKIPPED: ...`) at the first missing one.
pub fn require_deps(deps: &[Dep]) -> bool {
    deps.iter().all(|d| match d.missing() {
        None => true,
        Some(what) => require(&what, false),
    })
}

/// Polls `cond` every 50 ms until it holds (true) or `timeout` passes (false): the suites' way
/// to wait for a state, never a fixed sleep.
pub fn wait_for(timeout: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= until {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `require!(Dep::Root, Dep::Swtpm)`: at the top of a test; returns from it (skip) when a
/// dependency is missing and `AZIOT_ALLOW_SKIP=1`, fails naming it otherwise.
#[macro_export]
macro_rules! require {
    ($($dep:expr),+ $(,)?) => {
        if !$crate::require_deps(&[$($dep),+]) {
            return;
        }
    };
}

/// `require_keyd!()`: the dependencies of the keyd harness as this run configures it (root,
/// the service user, SoftHSM2 for `AZIOT_TEST_BACKEND=softhsm`, systemd-socket-activate for
/// `AZIOT_TEST_ACTIVATION=systemd`): [`keyd::harness_deps`].
#[macro_export]
macro_rules! require_keyd {
    () => {
        if !$crate::require_deps(&$crate::keyd::harness_deps()) {
            return;
        }
    };
}

/// `both_versions!(a, b)` turns each `fn a(v: &'static str)` into two tests,
/// `a::v2020_09_01` and `a::v2021_05_01`. Both start with [`require_keyd!`]: the scenarios are
/// keyd's.
#[macro_export]
macro_rules! both_versions {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn v2020_09_01() {
                    $crate::require_keyd!();
                    super::$name($crate::api::V2020)
                }
                #[test]
                fn v2021_05_01() {
                    $crate::require_keyd!();
                    super::$name($crate::api::V2021)
                }
            }
        )*
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one rule, both ways (one test: it sets the process-wide variable).
    #[test]
    fn missing_dependency_fails_unless_skips_are_allowed() {
        std::env::remove_var(ALLOW_SKIP_ENV);
        assert!(require("present", true));
        let failed = std::panic::catch_unwind(|| require("frobnicator (apt-get install frob)", false));
        let message = failed.expect_err("a missing dependency must fail the test");
        let text = message.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(text.contains("missing frobnicator (apt-get install frob)"), "{text}");
        assert!(text.contains("missing_dependency_fails_unless_skips_are_allowed"), "names the test: {text}");
        for not_one in ["0", "yes", ""] {
            std::env::set_var(ALLOW_SKIP_ENV, not_one);
            assert!(std::panic::catch_unwind(|| require("x", false)).is_err(), "{ALLOW_SKIP_ENV}={not_one:?}");
        }
        std::env::set_var(ALLOW_SKIP_ENV, "1");
        assert!(!require("frobnicator", false), "skipped: the caller returns");
        assert!(!require_deps(&[Dep::ServiceUser("aziot-no-such-user")]));
        std::env::remove_var(ALLOW_SKIP_ENV);
        assert!(Dep::ServiceUser("aziot-no-such-user").missing().is_some_and(|m| m.contains("systemd-sysusers")));
        assert_eq!(Dep::Root.missing().is_none(), nix::unistd::geteuid().is_root());
    }
}
