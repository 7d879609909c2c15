//! Global command-line behaviour (spec aziotctl.md §1.2, §1.3).

mod common;

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(common::BIN).args(args).output().unwrap()
}

#[test]
fn version_only_at_the_top_level() {
    let out = run(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(common::stdout(&out), "aziotctl 1.6.0\n");
    assert_eq!(common::stdout(&run(&["-V"])), "aziotctl 1.6.0\n");
    assert_eq!(
        run(&["config", "apply", "--version"]).status.code(),
        Some(2)
    );
    assert_eq!(run(&["config", "--version"]).status.code(), Some(2));
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["config", "apply", "--bogus"][..],
        &["config", "mp"],
        &["config", "apply", "-c"],
        &["config"],
        &[],
        &["frobnicate"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = common::stderr(&out);
        assert!(
            err.contains("Usage:") || err.contains("try '--help'"),
            "{args:?}: {err}"
        );
        assert!(common::stdout(&out).is_empty(), "{args:?}");
    }
}

#[test]
fn help_exits_0() {
    for args in [
        &["--help"][..],
        &["help"],
        &["help", "config", "apply"],
        &["config", "apply", "-h"],
        &["config", "mp", "--help"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(common::stdout(&out).contains("Usage:"), "{args:?}");
    }
    let help = common::stdout(&run(&["config", "apply", "--help"]));
    for flag in ["--config <CONFIG>", "--root <DIR>", "--dry-run"] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
    let help = common::stdout(&run(&["config", "mp", "--help"]));
    for flag in [
        "--connection-string <CONNECTION_STRING>",
        "--out-config-file <FILE>",
        "--force",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}
