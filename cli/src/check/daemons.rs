//! Checks 13–16 (`*-running`) and `sandbox-audit` (ours).
//!
//! The socket of a service is the one its config names (`[endpoints]`, honoured by every build
//! here) or the compiled default `/run/aziot/<svc>.sock`: the same path the service listens on.
//! Upstream always uses the compiled default (docs/compatibility.md).

use std::path::PathBuf;

use aziot_ipc::endpoint::Endpoint;

use super::{Ctx, Outcome};

/// The socket of `short` as its config names it (the default when the config names none or
/// did not load).
pub fn socket(ctx: &Ctx<'_>, short: &str) -> PathBuf {
    let named: Option<String> = match short {
        "keyd" => ctx
            .keyd
            .as_ref()
            .and_then(|c| c.endpoints.aziot_keyd.clone()),
        "certd" => ctx
            .certd
            .as_ref()
            .and_then(|c| c.endpoints.aziot_certd.clone()),
        "tpmd" => ctx
            .tpmd
            .as_ref()
            .and_then(|c| c.endpoints.aziot_tpmd.clone()),
        _ => ctx
            .identityd
            .as_ref()
            .and_then(|c| c.endpoints.as_ref().map(|e| e.aziot_identityd.clone())),
    };
    if let Some(Ok(Endpoint::Unix(path))) = named.as_deref().map(Endpoint::parse) {
        return path;
    }
    let info = aziot_policy::services::by_short(short).expect("a service of the table");
    PathBuf::from(info.default_socket)
}

fn running(ctx: &mut Ctx<'_>, short: &'static str) -> Outcome {
    let path = socket(ctx, short);
    match std::os::unix::net::UnixStream::connect(&path) {
        Ok(_) => {
            ctx.running.insert(short);
            Outcome::Ok
        }
        Err(e) => Outcome::error_from(
            format!("Could not connect to {short} on unix://{}", path.display()),
            &e,
        ),
    }
}

pub fn keyd_running(ctx: &mut Ctx<'_>) -> Outcome {
    running(ctx, "keyd")
}

pub fn certd_running(ctx: &mut Ctx<'_>) -> Outcome {
    running(ctx, "certd")
}

pub fn identityd_running(ctx: &mut Ctx<'_>) -> Outcome {
    running(ctx, "identityd")
}

/// Only when identityd provisions with DPS TPM attestation (from the previous config when
/// the current one did not load; tried anyway when neither is known).
pub fn tpmd_running(ctx: &mut Ctx<'_>) -> Outcome {
    let uses_tpm = |c: &aziot_identityd::config::Config| match &c.provisioning.source {
        aziot_identityd::config::Source::Dps { attestation, .. } => {
            attestation.get("method").and_then(|m| m.as_str()) == Some("tpm")
        }
        _ => false,
    };
    let needed = match (&ctx.identityd, &ctx.prev_identityd) {
        (Some(c), _) => uses_tpm(c),
        (None, Some(p)) => uses_tpm(p),
        (None, None) => true,
    };
    if needed {
        running(ctx, "tpmd")
    } else {
        Outcome::Ignored
    }
}

/// The state directory the config names (the audit accepts open files beneath it).
fn state_dir(ctx: &Ctx<'_>, short: &str) -> Option<PathBuf> {
    match short {
        "keyd" => ctx
            .keyd
            .as_ref()?
            .aziot_keys
            .get("homedir_path")
            .map(PathBuf::from),
        "certd" => Some(ctx.certd.as_ref()?.homedir_path.clone()),
        "identityd" => Some(ctx.identityd.as_ref()?.homedir.clone()),
        _ => None,
    }
}

/// `aziotctl policy audit` for every running service: its status file (beside its socket, as
/// the broker writes it) compared with /proc of the live broker and worker.
pub fn sandbox_audit(ctx: &mut Ctx<'_>) -> Outcome {
    if !nix::unistd::geteuid().is_root() {
        return Outcome::error("this command must be run as root");
    }
    let running: Vec<&'static str> = ctx.running.iter().copied().collect();
    if running.is_empty() {
        return Outcome::Skipped;
    }
    let mut lines = Vec::new();
    let mut audited = Vec::new();
    for short in running {
        let sock = socket(ctx, short);
        let status = sock
            .parent()
            .unwrap_or(std::path::Path::new("/"))
            .join(format!("{short}.status"));
        if !status.exists() {
            lines.push(format!(
                "{short}: its socket accepts connections but its broker wrote no status file {} (is it an aziot broker?)",
                status.display()
            ));
            continue;
        }
        let mut dirs = vec![aziot_policy::default_state_dir(short)];
        dirs.extend(state_dir(ctx, short));
        let report = aziot_policy::audit_service_with(short, &status, &dirs);
        audited.push(short);
        for f in report.deviations() {
            lines.push(format!(
                "{short}: {} {}: expected {}, found {}",
                f.subject, f.check, f.expected, f.actual
            ));
        }
    }
    ctx.set("audited", audited);
    if lines.is_empty() {
        Outcome::Ok
    } else {
        let mut details = vec!["the sandbox of a running service deviates from its policy (see `aziotctl policy audit`)".to_owned()];
        details.extend(lines);
        Outcome::Error(vec![details.join("\n")])
    }
}
