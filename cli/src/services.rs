//! Restarting the services through systemd (spec aziotctl.md §5.1), the last step of
//! `config apply`.

use std::io::{self, Write as _};
use std::path::Path;
use std::process::Command;

/// The service units, the first being the one started explicitly (the others are
/// socket-activated).
pub const SERVICES: [&str; 4] = [
    "aziot-identityd.service",
    "aziot-keyd.service",
    "aziot-certd.service",
    "aziot-tpmd.service",
];
pub const SOCKETS: [&str; 4] = [
    "aziot-identityd.socket",
    "aziot-keyd.socket",
    "aziot-certd.socket",
    "aziot-tpmd.socket",
];

#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error("Failed to call systemctl {0}")]
    Spawn(&'static str, #[source] io::Error),
    #[error("could not restart the services: systemctl failed for {}", .0.join(", "))]
    UnitsFailed(Vec<String>),
}

/// Whether systemd is the running init system.
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// Stops every service, starts every socket, then starts identityd. Every step is attempted;
/// the result is an error if any unit operation failed.
pub fn restart() -> Result<(), RestartError> {
    let mut failed = Vec::new();
    for service in SERVICES {
        step("Stopping", "stop", service, "Stopped!", &mut failed)?;
    }
    for unit in SOCKETS.into_iter().chain([SERVICES[0]]) {
        step("Starting", "start", unit, "Started!", &mut failed)?;
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(RestartError::UnitsFailed(failed))
    }
}

fn step(
    doing: &str,
    verb: &'static str,
    unit: &str,
    done: &str,
    failed: &mut Vec<String>,
) -> Result<(), RestartError> {
    print!("{doing} {unit}...");
    let _ = io::stdout().flush();
    let output = Command::new("systemctl")
        .arg(verb)
        .arg(unit)
        .output()
        .map_err(|e| RestartError::Spawn(verb, e))?;
    if output.status.success() {
        println!("{done}");
    } else {
        println!();
        // Unlike upstream, the child's output goes to stderr, where diagnostics belong.
        let mut err = io::stderr().lock();
        let _ = writeln!(err, "systemctl exited with non-zero status code.");
        let _ = writeln!(err, "stdout:\n=======");
        let _ = err.write_all(&output.stdout);
        let _ = writeln!(err, "stderr:\n=======");
        let _ = err.write_all(&output.stderr);
        let _ = writeln!(err);
        failed.push(format!("{verb} {unit}"));
    }
    Ok(())
}
