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
    let infos = services.clone();
    let mut notes = Vec::new();
    for svc in services {
        let policy_d = svc.policy_dir();
        let (grants, note) = config_grants(svc);
        notes.push(note);
        policies.push(aziot_policy::effective(svc.short, &grants, Some(&policy_d))?);
    }
    if json {
        let mut out = Vec::with_capacity(policies.len());
        for ((p, svc), note) in policies.iter().zip(&infos).zip(&notes) {
            let mut v = serde_json::to_value(p)?;
            if let Some(o) = v.as_object_mut() {
                o.insert("worker_env".into(), serde_json::json!(svc.worker_env));
                o.insert("config_grants".into(), serde_json::json!(note));
            }
            out.push(v);
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for ((p, svc), note) in policies.iter().zip(&infos).zip(&notes) {
            println!("{}", aziot_policy::render_human(p));
            println!("{}", worker_env_text(svc));
            if let Some(note) = note {
                println!("{note}\n");
            }
        }
    }
    Ok(())
}

/// The grants certd's and identityd's config imply, derived as their brokers derive them (the
/// EST, DPS and hub ports, the sockets they reach; the proxy is this process's `HTTPS_PROXY`),
/// when the service has a config; else none (the built-in policy alone). The note says which,
/// and why there are none when the config could not be read (e.g. not run as root).
fn config_grants(svc: &ServiceInfo) -> (aziot_policy::Grants, Option<String>) {
    use aziot_ipc::service::ServiceImpl as _;
    let paths = aziot_ipc::service::config_paths(svc);
    if !matches!(svc.short, "certd" | "identityd") {
        return (aziot_policy::Grants::default(), None);
    }
    let has_dropins = std::fs::read_dir(&paths.dir).is_ok_and(|entries| {
        entries.flatten().any(|e| e.path().extension().is_some_and(|x| x == "toml"))
    });
    if !paths.main.exists() && !has_dropins {
        let note = format!(
            "config-derived grants: none shown (no config at {} or in {})",
            paths.main.display(),
            paths.dir.display()
        );
        return (aziot_policy::Grants::default(), Some(note));
    }
    let setup = match svc.short {
        "certd" => aziot_certd::service::Certd.setup(&paths),
        _ => aziot_identityd::service::Identityd.setup(&paths),
    };
    match setup {
        Ok(setup) => (
            setup.grants,
            Some(format!(
                "config-derived grants (marked \"config <key>\" above): from {} and {}",
                paths.main.display(),
                paths.dir.display()
            )),
        ),
        Err(e) => (
            aziot_policy::Grants::default(),
            Some(
                crate::check::with_causes("config-derived grants: NOT shown, the config could not be read", &e)
                    .join(": "),
            ),
        ),
    }
}

/// The worker's environment, as the broker builds it (broker/src/sanitize.rs `worker_env`).
fn worker_env_text(svc: &ServiceInfo) -> String {
    if svc.worker_env.is_empty() {
        "worker environment: empty (nothing of the broker's is passed on)\n".to_owned()
    } else {
        format!(
            "worker environment: only {} (each when the broker has it); nothing else\n",
            svc.worker_env.join(", ")
        )
    }
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
