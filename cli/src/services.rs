//! Restarting the services through systemd (spec aziotctl.md §5.1), the last step of
//! `config apply`.

use std::io::{self, Write as _};
use std::path::Path;
use std::process::Command;

const TABLE: &[aziot_policy::services::ServiceInfo] = aziot_policy::services::SERVICES;

/// The service units (from the table of services), the first being the one started
/// explicitly (`started_by_aziotctl`; the others are socket-activated), then the others in
/// table order.
pub const SERVICES: [&str; TABLE.len()] = {
    let mut units = [""; TABLE.len()];
    let mut n = 0;
    let mut i = 0;
    while i < TABLE.len() {
        if TABLE[i].started_by_aziotctl {
            units[n] = TABLE[i].service_unit;
            n += 1;
        }
        i += 1;
    }
    assert!(n == 1, "exactly one service is started by aziotctl");
    i = 0;
    while i < TABLE.len() {
        if !TABLE[i].started_by_aziotctl {
            units[n] = TABLE[i].service_unit;
            n += 1;
        }
        i += 1;
    }
    units
};

/// The socket units, in the order of [`SERVICES`].
pub const SOCKETS: [&str; TABLE.len()] = {
    let mut units = [""; TABLE.len()];
    let mut i = 0;
    while i < TABLE.len() {
        let mut j = 0;
        while j < TABLE.len() {
            if const_eq(TABLE[j].service_unit, SERVICES[i]) {
                units[i] = TABLE[j].socket_unit;
            }
            j += 1;
        }
        i += 1;
    }
    units
};

const fn const_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_in_restart_order() {
        // identityd is started explicitly (first); the others follow in table order.
        assert_eq!(
            SERVICES,
            [
                "aziot-identityd.service",
                "aziot-keyd.service",
                "aziot-certd.service",
                "aziot-tpmd.service"
            ]
        );
        assert_eq!(
            SOCKETS,
            [
                "aziot-identityd.socket",
                "aziot-keyd.socket",
                "aziot-certd.socket",
                "aziot-tpmd.socket"
            ]
        );
    }
}
