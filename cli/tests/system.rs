//! `aziotctl system ...`: argument handling and the command lines it runs, recorded by a fake
//! `systemctl`/`journalctl` put first on PATH for the run (only in this test's directory), and
//! its refusal on a machine whose init system is not systemd.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Fake {
    dir: PathBuf,
}

impl Fake {
    /// `fail`: `systemctl <verb> <unit>` lines for which the fake exits 1.
    fn new(name: &str, fail: &[&str]) -> Fake {
        let dir =
            std::env::temp_dir().join(format!("aziotctl-system-it-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut script = format!(
            "#!/bin/sh\nprintf '%s\\n' \"$(basename \"$0\") $*\" >> '{}'\n\
             [ \"$1\" = is-system-running ] && {{ echo running; exit 0; }}\n",
            dir.join("argv").display()
        );
        for f in fail {
            script.push_str(&format!(
                "[ \"$(basename \"$0\") $*\" = '{f}' ] && {{ echo 'Job failed.' >&2; exit 1; }}\n"
            ));
        }
        script.push_str("exit 0\n");
        for prog in ["systemctl", "journalctl"] {
            let p = dir.join(prog);
            std::fs::write(&p, &script).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Fake { dir }
    }

    fn run(&self, args: &[&str]) -> Output {
        let path = format!(
            "{}:{}",
            self.dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Command::new(env!("CARGO_BIN_EXE_aziotctl"))
            .args(args)
            .env("PATH", path)
            .output()
            .unwrap()
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

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn restart_runs_the_specs_command_lines() {
    let fake = Fake::new("restart", &[]);
    let out = fake.run(&["system", "restart"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
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
    assert_eq!(
        text(&out.stdout),
        "Stopping aziot-identityd.service...Stopped!\nStopping aziot-keyd.service...Stopped!\n\
         Stopping aziot-certd.service...Stopped!\nStopping aziot-tpmd.service...Stopped!\n\
         Starting aziot-identityd.socket...Started!\nStarting aziot-keyd.socket...Started!\n\
         Starting aziot-certd.socket...Started!\nStarting aziot-tpmd.socket...Started!\n\
         Starting aziot-identityd.service...Started!\n"
    );
}

#[test]
fn a_failed_unit_operation_fails_the_command() {
    let fake = Fake::new("fail", &["systemctl start aziot-tpmd.socket"]);
    let out = fake.run(&["system", "restart"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains("systemctl exited with non-zero status code."),
        "{err}"
    );
    assert!(
        err.contains("Job failed."),
        "the child's stderr goes to stderr: {err}"
    );
    assert!(
        err.contains("systemctl failed for start aziot-tpmd.socket"),
        "{err}"
    );
    // every step was still attempted
    assert_eq!(
        fake.argv().last().unwrap(),
        "systemctl start aziot-identityd.service"
    );
}

#[test]
fn logs_arguments_only_after_double_dash() {
    let fake = Fake::new("logs", &[]);
    let out = fake.run(&["system", "logs", "-f"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(fake.argv().is_empty(), "nothing ran: {:?}", fake.argv());

    let out = fake.run(&["system", "logs", "--", "-f", "-n", "5"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        fake.argv()[1],
        "journalctl -u aziot-identityd.service -u aziot-keyd.service -u aziot-certd.service -u aziot-tpmd.service -f -n 5"
    );
}

#[test]
fn set_log_level_takes_only_the_five_levels() {
    let fake = Fake::new("level", &[]);
    for bad in ["verbose", "INFO", ""] {
        let out = fake.run(&["system", "set-log-level", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", text(&out.stderr));
    }
    assert!(fake.argv().is_empty());
}

#[test]
fn without_systemd_as_init_the_commands_refuse() {
    let pid1 = std::fs::read_to_string("/proc/1/comm").unwrap_or_default();
    let systemctl_exists = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .any(|d| Path::new(&d).join("systemctl").is_file());
    assert!(
        systemctl_exists,
        "systemctl is not installed (apt-get install systemd)"
    );
    let on_systemd = pid1.trim() == "systemd";
    // On a systemd machine only `status` runs (never stop real services from a test).
    let commands: &[[&str; 2]] = if on_systemd {
        &[["system", "status"]]
    } else {
        &[["system", "status"], ["system", "stop"]]
    };
    for args in commands {
        let out = Command::new(env!("CARGO_BIN_EXE_aziotctl"))
            .args(args)
            .output()
            .unwrap();
        if on_systemd {
            assert!(
                text(&out.stdout).starts_with("System services:\n"),
                "{}",
                text(&out.stdout)
            );
        } else {
            assert_eq!(out.status.code(), Some(1), "{args:?}");
            let err = text(&out.stderr);
            assert!(
                err.starts_with(
                    "systemd is not running as the init system (PID 1) of this machine"
                ),
                "{args:?}: {err}"
            );
            assert!(
                out.stdout.is_empty(),
                "nothing pretended: {}",
                text(&out.stdout)
            );
        }
    }
}
