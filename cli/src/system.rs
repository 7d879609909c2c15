//! `aziotctl system restart|stop|status|logs|set-log-level|reprovision` (spec aziotctl.md §5).
//!
//! The units are driven with the `systemctl` and `journalctl` commands (not D-Bus): they are
//! what an administrator runs by hand, they need no new crate, and the command lines are the
//! spec's own. Every command but `reprovision` first asks `systemctl is-system-running`; when
//! systemd is not the init system ("offline"), it stops with a clear error instead of running
//! commands that cannot work. Unlike upstream, a failed unit operation makes the command exit
//! 1, and a child's stderr stays on stderr (docs/compatibility.md).

use std::ffi::OsString;
use std::io::{self, Write as _};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::services::{SERVICES, SOCKETS};

#[derive(Debug, clap::Subcommand)]
pub enum SystemCommand {
    /// Restart the services (stop them, start the sockets, start identityd)
    Restart,
    /// Stop the services (their sockets stop with them)
    Stop,
    /// Show the state of the services
    Status,
    /// Show the services' logs (journalctl); arguments after `--` replace the default `-e --no-pager`
    Logs {
        #[arg(last = true, value_name = "ARGS")]
        args: Vec<OsString>,
    },
    /// Set the log level of every service (takes effect at the next restart)
    SetLogLevel {
        #[arg(value_enum)]
        level: LogLevel,
    },
    /// Ask identityd to provision the device again
    Reprovision,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    fn upper(self) -> &'static str {
        match self {
            LogLevel::Error => "ERROR",
            LogLevel::Warn => "WARN",
            LogLevel::Info => "INFO",
            LogLevel::Debug => "DEBUG",
            LogLevel::Trace => "TRACE",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error(
        "systemd is not running as the init system (PID 1) of this machine (`systemctl is-system-running` says {0:?}): \
         `aziotctl system` manages the services through systemd units and cannot work here"
    )]
    NoSystemd(String),
    #[error("Failed to call {program} {verb}")]
    Spawn {
        program: String,
        verb: String,
        #[source]
        source: io::Error,
    },
    #[error("systemctl failed for {}", .0.join(", "))]
    UnitsFailed(Vec<String>),
    #[error("not every service can run: {} is down", .0.join(", "))]
    NotRunning(Vec<String>),
    #[error("journalctl exited with {0}")]
    Journal(std::process::ExitStatus),
    #[error("could not write the log-level drop-ins")]
    DropIn(#[source] crate::fsops::atomic::WriteError),
    #[error("could not create {}", .0.display())]
    DropInDir(PathBuf, #[source] io::Error),
    #[error("could not run systemctl daemon-reload")]
    DaemonReload,
    #[error("Failed to reprovision: {0}")]
    Reprovision(String),
}

/// The programs run and where the log-level drop-ins go (tests point them elsewhere).
#[derive(Debug, Clone)]
pub struct Tools {
    pub systemctl: OsString,
    pub journalctl: OsString,
    pub dropin_base: PathBuf,
}

impl Default for Tools {
    fn default() -> Self {
        Tools {
            systemctl: "systemctl".into(),
            journalctl: "journalctl".into(),
            dropin_base: PathBuf::from("/etc/systemd/system"),
        }
    }
}

pub fn run(command: SystemCommand) -> Result<(), SystemError> {
    run_with(command, &Tools::default())
}

pub fn run_with(command: SystemCommand, tools: &Tools) -> Result<(), SystemError> {
    if let SystemCommand::Reprovision = command {
        return reprovision();
    }
    require_systemd(tools)?;
    match command {
        SystemCommand::Restart => restart(tools),
        SystemCommand::Stop => stop(tools),
        SystemCommand::Status => status(tools),
        SystemCommand::Logs { args } => logs(tools, args),
        SystemCommand::SetLogLevel { level } => set_log_level(tools, level),
        SystemCommand::Reprovision => unreachable!("handled above"),
    }
}

fn spawn_error(tools: &Tools, verb: &str) -> impl FnOnce(io::Error) -> SystemError {
    let program = tools.systemctl.to_string_lossy().into_owned();
    let verb = verb.to_owned();
    move |source| SystemError::Spawn {
        program,
        verb,
        source,
    }
}

/// `systemctl is-system-running`: "offline" means systemd is not PID 1.
fn require_systemd(tools: &Tools) -> Result<(), SystemError> {
    let out = Command::new(&tools.systemctl)
        .arg("is-system-running")
        .stdin(Stdio::null())
        .output()
        .map_err(spawn_error(tools, "is-system-running"))?;
    let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if state == "offline" || state.is_empty() || stderr.contains("not been booted with systemd") {
        return Err(SystemError::NoSystemd(if state.is_empty() {
            stderr.trim().to_owned()
        } else {
            state
        }));
    }
    Ok(())
}

/// `systemctl <verb> <unit>` with `<doing> <unit>...<done>` on stdout; a failure is reported
/// on stderr and recorded in `failed`.
fn unit_op(
    tools: &Tools,
    verb: &str,
    unit: &str,
    doing: &str,
    done: &str,
    failed: &mut Vec<String>,
) -> Result<(), SystemError> {
    print!("{doing} {unit}...");
    let _ = io::stdout().flush();
    let output = Command::new(&tools.systemctl)
        .arg(verb)
        .arg(unit)
        .stdin(Stdio::null())
        .output()
        .map_err(spawn_error(tools, verb))?;
    if output.status.success() {
        println!("{done}");
    } else {
        println!();
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

fn stop_all(tools: &Tools, failed: &mut Vec<String>) -> Result<(), SystemError> {
    for service in SERVICES {
        unit_op(tools, "stop", service, "Stopping", "Stopped!", failed)?;
    }
    Ok(())
}

fn stop(tools: &Tools) -> Result<(), SystemError> {
    let mut failed = Vec::new();
    stop_all(tools, &mut failed)?;
    if failed.is_empty() {
        Ok(())
    } else {
        Err(SystemError::UnitsFailed(failed))
    }
}

/// §5.1: stop every service, start every socket, then the primary service.
fn restart(tools: &Tools) -> Result<(), SystemError> {
    let mut failed = Vec::new();
    stop_all(tools, &mut failed)?;
    for unit in SOCKETS.into_iter().chain([SERVICES[0]]) {
        unit_op(tools, "start", unit, "Starting", "Started!", &mut failed)?;
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(SystemError::UnitsFailed(failed))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    Active,
    Inactive,
    Failed(String),
}

fn is_active(tools: &Tools, unit: &str) -> Result<State, SystemError> {
    let out = Command::new(&tools.systemctl)
        .args(["is-active", unit])
        .stdin(Stdio::null())
        .output()
        .map_err(spawn_error(tools, "is-active"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    Ok(match stdout.as_str() {
        "active" => State::Active,
        "inactive" => State::Inactive,
        _ => State::Failed(format!(
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    })
}

fn journal_tail(tools: &Tools, unit: &str) -> Result<(), SystemError> {
    let _ = io::stdout().flush();
    Command::new(&tools.journalctl)
        .args(["-u", unit, "--no-pager", "-e", "-n", "10"])
        .status()
        .map_err(|source| SystemError::Spawn {
            program: tools.journalctl.to_string_lossy().into_owned(),
            verb: "-u".into(),
            source,
        })?;
    Ok(())
}

/// §5.3, with its recommendation: a service whose socket is not active is down, whatever the
/// service's own state. Exit status 1 when a service is down.
fn status(tools: &Tools) -> Result<(), SystemError> {
    let prog = crate::check::program_name();
    let mut states = Vec::new();
    for (service, socket) in SERVICES.iter().zip(SOCKETS) {
        states.push((
            *service,
            is_active(tools, service)?,
            socket,
            is_active(tools, socket)?,
        ));
    }
    let effective = |service: &State, socket: &State| -> State {
        match socket {
            State::Active => service.clone(),
            State::Inactive => State::Failed("socket inactive".into()),
            State::Failed(m) => State::Failed(format!("socket {m}")),
        }
    };
    println!("System services:");
    for (service, s, _, k) in &states {
        let name = service.trim_end_matches(".service");
        let shown = match effective(s, k) {
            State::Active => "Running".to_owned(),
            State::Inactive => "Ready".to_owned(),
            State::Failed(m) => format!("Down - {m}"),
        };
        println!("    {name:<24}{shown}");
    }
    println!();
    let mut down = Vec::new();
    for (service, s, socket, k) in &states {
        if !matches!(effective(s, k), State::Failed(_)) {
            continue;
        }
        let name = service.trim_end_matches(".service");
        down.push(name.to_owned());
        println!("{name} is in a bad state because:");
        let display = |st: &State| match st {
            State::Active => "Running".to_owned(),
            State::Inactive => "Down - inactive".to_owned(),
            State::Failed(m) => format!("Down - {m}"),
        };
        if matches!(s, State::Failed(_)) {
            println!("{service}: {}: Printing the last 10 log lines.", display(s));
            journal_tail(tools, service)?;
            println!();
        }
        if *k != State::Active {
            println!("{socket}: {}: Printing the last 10 log lines.", display(k));
            journal_tail(tools, socket)?;
            println!();
        }
    }
    println!("Use '{prog} system logs' to check for non-fatal errors.");
    println!("Use '{prog} check' to diagnose connectivity and configuration issues.");
    if down.is_empty() {
        Ok(())
    } else {
        Err(SystemError::NotRunning(down))
    }
}

/// §5.4: the four services' journal; extra arguments replace `-e --no-pager`.
fn logs(tools: &Tools, args: Vec<OsString>) -> Result<(), SystemError> {
    let mut cmd = Command::new(&tools.journalctl);
    for service in SERVICES {
        cmd.args(["-u", service]);
    }
    if args.is_empty() {
        cmd.args(["-e", "--no-pager"]);
    } else {
        cmd.args(args);
    }
    let status = cmd.status().map_err(|source| SystemError::Spawn {
        program: tools.journalctl.to_string_lossy().into_owned(),
        verb: "-u".into(),
        source,
    })?;
    if status.success() {
        Ok(())
    } else {
        Err(SystemError::Journal(status))
    }
}

/// §5.5: `<base>/<service>.d/log-level.conf` for every service, written atomically (root,
/// 0644, with a final newline), then `systemctl daemon-reload`.
fn set_log_level(tools: &Tools, level: LogLevel) -> Result<(), SystemError> {
    let upper = level.upper();
    let mut files = Vec::new();
    for service in SERVICES {
        let dir = tools.dropin_base.join(format!("{service}.d"));
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&dir)
            .map_err(|e| SystemError::DropInDir(dir.clone(), e))?;
        files.push(crate::fsops::atomic::NewFile {
            path: dir.join("log-level.conf"),
            contents: zeroize::Zeroizing::new(
                format!("[Service]\nEnvironment=AZIOT_LOG={upper}\n").into_bytes(),
            ),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            mode: 0o644,
        });
    }
    let mut warnings = crate::warnings::Warnings::new();
    crate::fsops::atomic::replace_all(&files, &[], &mut warnings).map_err(SystemError::DropIn)?;
    warnings.flush_to_stderr();
    let reload = Command::new(&tools.systemctl)
        .arg("daemon-reload")
        .stdin(Stdio::null())
        .status()
        .map_err(spawn_error(tools, "daemon-reload"))?;
    let prog = crate::check::program_name();
    println!(
        "Set log level to {upper} for all services. Run the `{prog} system restart` command for the changes to take effect."
    );
    if reload.success() {
        Ok(())
    } else {
        Err(SystemError::DaemonReload)
    }
}

use std::os::unix::fs::DirBuilderExt as _;

/// §5.6: `POST /identities/device/reprovision` to identityd's socket (the one its config
/// names, else `/run/aziot/identityd.sock`).
fn reprovision() -> Result<(), SystemError> {
    let info = aziot_policy::services::get("identityd");
    let socket = aziot_ipc::service::ServiceImpl::reload(
        &aziot_identityd::service::Identityd,
        &aziot_ipc::service::config_paths(info),
    )
    .ok()
    .and_then(|text| aziot_identityd::config_from_text(&text).ok())
    .and_then(|c| aziot_identityd::endpoint(&c).ok())
    .and_then(|e| match e {
        aziot_ipc::endpoint::Endpoint::Unix(p) => Some(p),
        _ => None,
    })
    .unwrap_or_else(|| PathBuf::from(info.default_socket));
    let client = aziot_ipc::client::BlockingClient::new(socket, "2021-12-01");
    match client.raw(
        "POST",
        "/identities/device/reprovision",
        Some(br#"{"type":"aziot"}"#),
    ) {
        Ok((204, _)) => {
            println!("Successfully reprovisioned with IoT Hub.");
            Ok(())
        }
        Ok((status, body)) => {
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            Err(SystemError::Reprovision(format!(
                "identityd answered {status}: {message}"
            )))
        }
        Err(e) => {
            let mut detail = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                detail.push_str(&format!(": {s}"));
                src = s.source();
            }
            Err(SystemError::Reprovision(detail))
        }
    }
}

#[cfg(test)]
mod tests {
    //! The command lines each subcommand runs, recorded by fake `systemctl`/`journalctl`
    //! scripts (only here, in the test's own directory).
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    struct Fake {
        dir: PathBuf,
    }

    impl Fake {
        /// `inactive_units`: units the fake reports `inactive` (others `active`).
        fn new(name: &str, inactive_units: &[&str]) -> Fake {
            let dir =
                std::env::temp_dir().join(format!("aziotctl-system-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let inactive = inactive_units.join(" ");
            let script = format!(
                "#!/bin/sh\nprintf '%s\\n' \"$(basename \"$0\") $*\" >> {log}\n\
                 if [ \"$1\" = is-system-running ]; then echo running; exit 0; fi\n\
                 if [ \"$1\" = is-active ]; then for u in {inactive}; do [ \"$u\" = \"$2\" ] && {{ echo inactive; exit 3; }}; done; echo active; exit 0; fi\n\
                 exit 0\n",
                log = dir.join("argv").display()
            );
            for prog in ["systemctl", "journalctl"] {
                let p = dir.join(prog);
                std::fs::write(&p, &script).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            Fake { dir }
        }

        fn tools(&self) -> Tools {
            Tools {
                systemctl: self.dir.join("systemctl").into(),
                journalctl: self.dir.join("journalctl").into(),
                dropin_base: self.dir.join("etc-systemd-system"),
            }
        }

        fn argv(&self) -> Vec<String> {
            std::fs::read_to_string(self.dir.join("argv"))
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn restart_stops_services_then_starts_sockets_and_identityd() {
        let fake = Fake::new("restart", &[]);
        run_with(SystemCommand::Restart, &fake.tools()).unwrap();
        assert_eq!(
            fake.argv(),
            [
                "systemctl is-system-running",
                "systemctl stop aziot-identityd.service",
                "systemctl stop aziot-keyd.service",
                "systemctl stop aziot-certd.service",
                "systemctl stop aziot-tpmd.service",
                "systemctl start aziot-identityd.socket",
                "systemctl start aziot-keyd.socket",
                "systemctl start aziot-certd.socket",
                "systemctl start aziot-tpmd.socket",
                "systemctl start aziot-identityd.service",
            ]
        );
    }

    #[test]
    fn stop_stops_the_four_services() {
        let fake = Fake::new("stop", &[]);
        run_with(SystemCommand::Stop, &fake.tools()).unwrap();
        assert_eq!(
            fake.argv()[1..],
            [
                "systemctl stop aziot-identityd.service",
                "systemctl stop aziot-keyd.service",
                "systemctl stop aziot-certd.service",
                "systemctl stop aziot-tpmd.service",
            ]
        );
    }

    #[test]
    fn status_asks_every_unit_and_reads_the_journal_of_a_down_socket() {
        let fake = Fake::new("status", &["aziot-tpmd.socket"]);
        let e = run_with(SystemCommand::Status, &fake.tools()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "not every service can run: aziot-tpmd is down"
        );
        let argv = fake.argv();
        for unit in SERVICES.iter().chain(SOCKETS.iter()) {
            assert!(
                argv.contains(&format!("systemctl is-active {unit}")),
                "{argv:?}"
            );
        }
        assert!(
            argv.contains(&"journalctl -u aziot-tpmd.socket --no-pager -e -n 10".to_owned()),
            "{argv:?}"
        );
        assert!(
            !argv.iter().any(|a| a.contains("journalctl -u aziot-keyd")),
            "{argv:?}"
        );
    }

    #[test]
    fn logs_default_and_extra_arguments() {
        let fake = Fake::new("logs", &[]);
        run_with(SystemCommand::Logs { args: vec![] }, &fake.tools()).unwrap();
        run_with(
            SystemCommand::Logs {
                args: vec!["-f".into(), "--since".into(), "1 hour ago".into()],
            },
            &fake.tools(),
        )
        .unwrap();
        let units = "-u aziot-identityd.service -u aziot-keyd.service -u aziot-certd.service -u aziot-tpmd.service";
        let argv = fake.argv();
        assert_eq!(argv[1], format!("journalctl {units} -e --no-pager"));
        assert_eq!(argv[3], format!("journalctl {units} -f --since 1 hour ago"));
    }

    #[test]
    fn set_log_level_writes_dropins_and_reloads() {
        let fake = Fake::new("loglevel", &[]);
        let tools = fake.tools();
        run_with(
            SystemCommand::SetLogLevel {
                level: LogLevel::Debug,
            },
            &tools,
        )
        .unwrap();
        for service in SERVICES {
            let path = tools
                .dropin_base
                .join(format!("{service}.d/log-level.conf"));
            assert_eq!(
                std::fs::read_to_string(&path).unwrap(),
                "[Service]\nEnvironment=AZIOT_LOG=DEBUG\n"
            );
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o644
            );
        }
        assert_eq!(
            fake.argv(),
            ["systemctl is-system-running", "systemctl daemon-reload"]
        );
    }

    #[test]
    fn without_systemd_nothing_else_runs() {
        let fake = Fake::new("offline", &[]);
        std::fs::write(
            fake.dir.join("systemctl"),
            format!(
                "#!/bin/sh\nprintf '%s\\n' \"systemctl $*\" >> {}\necho offline\nexit 1\n",
                fake.dir.join("argv").display()
            ),
        )
        .unwrap();
        let e = run_with(SystemCommand::Restart, &fake.tools()).unwrap_err();
        assert!(
            matches!(e, SystemError::NoSystemd(ref s) if s == "offline"),
            "{e}"
        );
        assert_eq!(fake.argv(), ["systemctl is-system-running"]);
    }
}
