//! The escape suite's attempt mode of the real worker (TEST-ONLY, behind the cargo feature
//! `escape-probe`).
//!
//! `tests/tests/escape.rs` starts `aziotd --worker` exactly as the broker does and puts an
//! [`EscapeAttempt`] into the manifest. The worker runs its real start — descriptor checks,
//! pre-load, `lock_in` (rlimits, Landlock, seccomp), the sandbox report — and then calls
//! [`run_if_requested`], which performs the ONE action the attempt names, sends its outcome on the
//! hand-off socket (`{"escape_outcome": "ok" | "errno=N (...)" | "setup-failed: ..."}`) and
//! exits. A forbidden syscall kills the worker by SIGSYS, which the test reads from the exit
//! status.
//!
//! Without the feature (the release build: `cargo build --release -p aziotd` does not enable it)
//! the attempt code is not compiled in: [`run_if_requested`] with no attempt does nothing, and a
//! manifest that asks for one makes the worker exit with [`NOT_COMPILED_IN_EXIT`] instead of
//! serving. The feature is enabled for the workspace build through `aziot-tests`, which depends
//! on `aziot-policy` with it (cargo unifies features across the packages of one build); never in
//! `cargo build --release -p aziotd`.

use std::os::fd::BorrowedFd;

use serde::{Deserialize, Serialize};

#[cfg(feature = "escape-probe")]
pub mod attempts;

/// What the manifest asks the worker to try once it is locked in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscapeAttempt {
    /// One of `attempts::names` (with the feature).
    pub name: String,
    /// The attempt's argument (a path, a port, a pid), if it takes one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arg: Option<String>,
}

/// The worker's last message on the hand-off socket in attempt mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscapeOutcome {
    pub escape_outcome: String,
}

/// The exit code of a worker asked for an attempt it was built without.
pub const NOT_COMPILED_IN_EXIT: i32 = 78;

/// A string present in the binary only when the attempt mode is compiled in: the release check
/// (`tests/tests/escape.rs` `release_aziotd_has_no_attempt_mode`) looks for it.
#[cfg(feature = "escape-probe")]
pub const MARKER: &str = "aziot-escape-probe:attempt-mode-compiled-in";

/// Whether this build has the attempt mode.
pub const fn compiled_in() -> bool {
    cfg!(feature = "escape-probe")
}

/// Called by the worker right after `lock_in` and its sandbox report. `None`: returns at once
/// (every real start). `Some`: runs the attempt (with the feature) or refuses (without), and
/// never returns. `handed` are descriptors the worker still holds, by hand-off name (`state`,
/// `listener`), for the attempts that use them.
pub fn run_if_requested(attempt: Option<&EscapeAttempt>, sock: BorrowedFd<'_>, handed: &[(&str, BorrowedFd<'_>)]) {
    let Some(attempt) = attempt else {
        return;
    };
    #[cfg(feature = "escape-probe")]
    {
        // Keeps MARKER in the binary (the release check reads the binary for it).
        let marker = std::hint::black_box(MARKER);
        let outcome = match attempts::run_in_worker(attempt, handed) {
            Ok(outcome) => outcome.to_string(),
            Err(e) => format!("setup-failed: {e}"),
        };
        println!("{marker}: {} -> {outcome}", attempt.name);
        send_outcome(sock, &outcome);
        std::process::exit(0);
    }
    #[cfg(not(feature = "escape-probe"))]
    {
        let _ = handed;
        let outcome = format!(
            "setup-failed: the escape attempt {:?} was requested but this aziotd is built without the escape-probe feature",
            attempt.name
        );
        eprintln!("{outcome}");
        send_outcome(sock, &outcome);
        std::process::exit(NOT_COMPILED_IN_EXIT);
    }
}

fn send_outcome(sock: BorrowedFd<'_>, outcome: &str) {
    use std::os::fd::AsRawFd;
    let bytes = serde_json::to_vec(&EscapeOutcome { escape_outcome: outcome.to_owned() }).unwrap_or_default();
    let _ = nix::sys::socket::sendmsg::<()>(
        sock.as_raw_fd(),
        &[std::io::IoSlice::new(&bytes)],
        &[],
        nix::sys::socket::MsgFlags::empty(),
        None,
    );
}
