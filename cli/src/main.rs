//! `aziotctl`: the command-line tool of the Azure IoT Identity Service.
//!
//! Implemented: `config apply` and `config mp` (spec aziotctl.md §1-3). Run-time errors print
//! the error and its causes to stderr and exit 1; usage errors exit 2 (clap).

mod apply;
mod fsops;
mod hostname;
mod mp;
mod policy;
mod render;
mod services;
mod super_config;
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

/// Top-level subcommands. `check`, `check-list`, `system` and `policy` join this list as
/// further variants, each dispatched in `main`.
#[derive(Debug, Subcommand)]
enum Command {
    /// Configure the Azure IoT Identity Service
    #[command(subcommand)]
    Config(ConfigCommand),
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
