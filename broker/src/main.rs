//! `aziotd`: one binary for every service, chosen by the file name of argv[0]
//! (`aziot-keyd`, `aziot-certd`, `aziot-identityd`, `aziot-tpmd`), or `aziotd <name>`.
//!
//! Run as a service, it is the service's **broker** (root, synchronous): sanitize, read the
//! config, open the resources, spawn the confined worker, supervise ([`supervise`]).
//! `aziotd --worker` is the **worker** ([`worker`]), exec'ed by the broker only.

mod mountns;
mod notify;
mod sanitize;
mod services;
mod statedir;
mod supervise;
mod watch;
mod worker;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "--worker") {
        // Logging starts once the manifest (with the broker's filter) is read.
        return match worker::main() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                aziot_ipc::logging::init();
                supervise::log_chain(&e);
                ExitCode::from(1)
            }
        };
    }
    if args.get(1).is_some_and(|a| a == "--unconfined") {
        return unconfined(&args);
    }
    // Step 1 of the broker, before anything else opens a descriptor.
    let keep = sanitize::activated_range();
    let sanitized = sanitize::close_stray_fds(&keep);
    sanitize::clear_env();
    aziot_ipc::logging::init();
    if let Err(e) = sanitized {
        tracing::error!("could not close inherited descriptors: {e}");
        return ExitCode::from(1);
    }
    let name = match service_name(&args) {
        Ok(n) => n,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(1);
        }
    };
    match broker(&name) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            for (i, cause) in e.chain().enumerate() {
                if i == 0 {
                    tracing::error!("{cause}");
                } else {
                    tracing::error!("caused by: {cause}");
                }
            }
            ExitCode::from(1)
        }
    }
}

fn broker(name: &str) -> anyhow::Result<()> {
    tracing::info!("Starting service...");
    tracing::info!("Version - {}", env!("CARGO_PKG_VERSION"));
    let setup = services::setup(name)?;
    let broker = supervise::Broker::prepare(setup)?;
    broker.run()?;
    Ok(())
}

/// `aziotd --unconfined aziot-keyd`: the service in one process, without broker or sandbox,
/// as the user that starts it (never root). For comparisons (the benchmark's baseline) and
/// debugging; it grants nothing the caller does not already have.
fn unconfined(args: &[std::ffi::OsString]) -> ExitCode {
    aziot_ipc::logging::init();
    if nix::unistd::geteuid().is_root() {
        tracing::error!("--unconfined refuses to run as root: run it as the service user, or run the service normally");
        return ExitCode::from(1);
    }
    let program = args.get(2).and_then(|a| a.to_str());
    let service = program
        .and_then(aziot_policy::services::by_program)
        .and_then(|info| services::implementation(info.short));
    let result = match service {
        Some(service) => service.run_unconfined().map_err(|e| match e {
            aziot_ipc::service::ServiceError::NotBuilt(_) => {
                anyhow::anyhow!("--unconfined: unknown or unbuilt service {program:?}")
            }
            e => anyhow::Error::from(e),
        }),
        None => Err(anyhow::anyhow!("--unconfined: unknown or unbuilt service {program:?}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            supervise::log_chain(e.as_ref());
            ExitCode::from(1)
        }
    }
}

/// Called by the syslog shim (src/syslog_shim.c) for every syslog(3) message of a module
/// loaded into this process.
///
/// # Safety
/// `message` is NULL or a NUL-terminated string valid for the duration of the call.
#[no_mangle]
pub unsafe extern "C" fn aziot_syslog_message(priority: std::os::raw::c_int, message: *const std::os::raw::c_char) {
    if message.is_null() {
        return;
    }
    // SAFETY: the shim passes a NUL-terminated buffer it owns for the duration of the call.
    let text = unsafe { std::ffi::CStr::from_ptr(message) }.to_string_lossy();
    match priority & 0x7 {
        0..=3 => tracing::error!(target: "module", "{text}"),
        4 => tracing::warn!(target: "module", "{text}"),
        5 | 6 => tracing::info!(target: "module", "{text}"),
        _ => tracing::debug!(target: "module", "{text}"),
    }
}

/// The service named by argv[0]'s file name, or by argv[1] when argv[0] is `aziotd`.
fn service_name(args: &[std::ffi::OsString]) -> anyhow::Result<String> {
    let file_name = |s: &std::ffi::OsString| {
        std::path::Path::new(s).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
    };
    let argv0 = args.first().map(file_name).unwrap_or_default();
    let name = if argv0 == "aziotd" {
        args.get(1)
            .map(|a| a.to_string_lossy().into_owned())
            .ok_or_else(|| {
                let programs: Vec<&str> = aziot_policy::services::SERVICES.iter().map(|s| s.program).collect();
                anyhow::anyhow!("usage: aziotd <{}>", programs.join("|"))
            })?
    } else {
        argv0
    };
    if aziot_policy::services::by_program(&name).is_some() {
        Ok(name)
    } else {
        Err(anyhow::anyhow!("could not read argv[0]: unrecognized process name {name:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<std::ffi::OsString> {
        a.iter().map(Into::into).collect()
    }

    #[test]
    fn dispatch() {
        assert_eq!(service_name(&args(&["/usr/libexec/aziot/aziot-keyd"])).unwrap(), "aziot-keyd");
        assert_eq!(service_name(&args(&["aziot-tpmd"])).unwrap(), "aziot-tpmd");
        assert_eq!(service_name(&args(&["/x/aziotd", "aziot-certd"])).unwrap(), "aziot-certd");
        assert!(service_name(&args(&["/x/aziotd"])).is_err());
        assert!(service_name(&args(&["/x/aziotd", "bogus"])).is_err());
        assert!(service_name(&args(&["/x/other"])).unwrap_err().to_string().contains("unrecognized process name"));
    }
}
