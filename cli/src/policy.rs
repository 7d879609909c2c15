//! `aziotctl policy show [SERVICE]` and `aziotctl policy audit`: the sandbox of every service,
//! as declared (built in + config grants + admin drop-ins) and as running.

use std::path::{Path, PathBuf};

use aziot_policy::services::{ServiceInfo, SERVICES};

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Print the effective sandbox policy of a service (or all), with where each rule came from
    Show {
        /// keyd, certd, identityd or tpmd (default: all)
        service: Option<String>,
        /// Machine-readable output
        #[arg(long)]
        json: bool,
    },
    /// Compare every running service's broker and worker with its policy; exit 1 on any deviation
    Audit {
        /// Machine-readable output
        #[arg(long)]
        json: bool,
        /// Directory of the services' status files (default /run/aziot)
        #[arg(long, default_value = "/run/aziot")]
        run_dir: PathBuf,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyCliError {
    #[error("unknown service {0:?} (expected one of {known})", known = aziot_policy::SERVICES.join(", "))]
    UnknownService(String),
    #[error(transparent)]
    Policy(#[from] aziot_policy::PolicyError),
    #[error("could not render JSON")]
    Json(#[from] serde_json::Error),
    #[error("no aziot service is running (no status file in {0})")]
    NothingRunning(PathBuf),
    #[error("the audit found deviations")]
    Deviations,
}

pub fn run(command: PolicyCommand) -> Result<(), PolicyCliError> {
    match command {
        PolicyCommand::Show { service, json } => show(service.as_deref(), json),
        PolicyCommand::Audit { json, run_dir } => audit(json, &run_dir),
    }
}

fn show(service: Option<&str>, json: bool) -> Result<(), PolicyCliError> {
    let services: Vec<&ServiceInfo> = match service {
        Some(s) => vec![aziot_policy::services::by_any_name(s).ok_or_else(|| PolicyCliError::UnknownService(s.to_owned()))?],
        None => SERVICES.iter().collect(),
    };
    let mut policies = Vec::new();
    for svc in services {
        let policy_d = svc.policy_dir();
        policies.push(aziot_policy::effective(svc.short, &aziot_policy::Grants::default(), Some(&policy_d))?);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&policies)?);
    } else {
        for p in &policies {
            println!("{}", aziot_policy::render_human(p));
        }
    }
    Ok(())
}

fn audit(json: bool, run_dir: &Path) -> Result<(), PolicyCliError> {
    let mut reports = Vec::new();
    for svc in SERVICES {
        let status = run_dir.join(svc.status_file());
        if status.exists() {
            reports.push(aziot_policy::audit_service(svc.short, &status));
        }
    }
    if reports.is_empty() {
        return Err(PolicyCliError::NothingRunning(run_dir.to_owned()));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for r in &reports {
            println!("{}", r.render_human());
        }
    }
    if reports.iter().all(|r| r.ok()) {
        Ok(())
    } else {
        Err(PolicyCliError::Deviations)
    }
}
