//! `aziotctl`: the command-line tool of the Azure IoT Identity Service.
//!
//! `config apply`, `config mp`, `check`, `check-list`, `system ...` (spec aziotctl.md §1-5) and
//! `policy`. Run-time errors print the error and its causes to stderr and exit 1; usage errors
//! exit 2 (clap); `check` exits 1 when a check failed.

mod apply;
mod check;
mod fsops;
mod hostname;
mod mp;
mod policy;
mod render;
mod services;
mod super_config;
mod system;
mod users;
mod warnings;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "aziotctl",
    version,
    about = "Azure IoT Identity Service control tool"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Top-level subcommands, each dispatched in `main`.
#[derive(Debug, Subcommand)]
enum Command {
    /// Configure the Azure IoT Identity Service
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Check for common configuration and connectivity issues
    Check(check::Options),
    /// List the checks that `check` runs
    CheckList(check::ListOptions),
    /// Manage the system services
    #[command(subcommand)]
    System(system::SystemCommand),
    /// Show and audit the sandbox of every service
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Apply the super-config to the services and restart them
    Apply(apply::Options),
    /// Write a super-config for manual provisioning with a connection string
    Mp(mp::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {
        Command::Config(ConfigCommand::Apply(options)) => apply::run(options).map_err(Into::into),
        Command::Config(ConfigCommand::Mp(options)) => mp::run(options).map_err(Into::into),
        Command::Policy(command) => policy::run(command).map_err(Into::into),
        Command::System(command) => system::run(command).map_err(Into::into),
        Command::CheckList(options) => check::list(options).map_err(Into::into),
        Command::Check(options) => match check::run(options) {
            Ok(true) => Ok(()),
            // The results say what failed; nothing more to print.
            Ok(false) => return ExitCode::FAILURE,
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprint!("{}", report(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, laid out like anyhow's `{:?}` but never with a backtrace.
fn report(e: &anyhow::Error) -> String {
    let mut out = format!("{e}\n");
    let causes: Vec<String> = e.chain().skip(1).map(ToString::to_string).collect();
    if !causes.is_empty() {
        out.push_str("\nCaused by:\n");
        for (i, cause) in causes.iter().enumerate() {
            let cause = cause.replace('\n', "\n       ");
            if causes.len() == 1 {
                out.push_str(&format!("    {cause}\n"));
            } else {
                out.push_str(&format!("    {i}: {cause}\n"));
            }
        }
    }
    out
}
