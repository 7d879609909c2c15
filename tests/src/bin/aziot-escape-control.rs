//! aziot-escape-control: the escape suites' control run (tests/tests/escape.rs). Started as a
//! plain service-user process — setgroups/setresgid/setresuid, nothing else: no capability-set
//! changes, no NoNewPrivs, no rlimits, no Landlock, no seccomp — it tries ONE attempt of
//! `aziot_policy::escape::attempts` (the code the worker's attempt mode runs) and prints
//! `outcome: ok` or `outcome: errno=N (...)`. Where the control succeeds and the same attempt in
//! the locked-in worker does not, the sandbox is what stopped it.
//!
//! usage: aziot-escape-control ATTEMPT [--arg VALUE] [--state-dir DIR]

use std::process::ExitCode;

use aziot_policy::escape::attempts::{run, Ctx};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(name) = args.next() else {
        eprintln!("usage: aziot-escape-control ATTEMPT [--arg VALUE] [--state-dir DIR]");
        return ExitCode::from(64);
    };
    let (mut arg, mut state_dir) = (None, None);
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--arg", Some(v)) => arg = Some(v),
            ("--state-dir", Some(v)) => state_dir = Some(std::path::PathBuf::from(v)),
            (other, _) => {
                eprintln!("aziot-escape-control: bad argument {other}");
                return ExitCode::from(64);
            }
        }
    }
    let outcome = state_dir
        .as_deref()
        .map(Ctx::open_dir)
        .transpose()
        .and_then(|state| {
            run(
                &name,
                &Ctx {
                    state,
                    listener: None,
                    arg,
                },
            )
        });
    match outcome {
        Ok(o) => {
            println!("outcome: {o}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("outcome: setup-failed: {e}");
            ExitCode::from(70)
        }
    }
}
