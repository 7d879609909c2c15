//! `aziotd`: one binary for every service, chosen by the file name of argv[0]
//! (`aziot-keyd`, `aziot-certd`, `aziot-identityd`, `aziot-tpmd`), or `aziotd <name>`.

use std::process::ExitCode;

fn main() -> ExitCode {
    aziot_ipc::logging::init();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let name = match service_name(&args) {
        Ok(n) => n,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(1);
        }
    };
    let result = match name.as_str() {
        "aziot-keyd" => aziot_keyd::run().map_err(anyhow::Error::from),
        other => Err(anyhow::anyhow!("{other} is not part of this build yet")),
    };
    match result {
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

const SERVICES: &[&str] = &["aziot-keyd", "aziot-certd", "aziot-identityd", "aziot-tpmd"];

/// The service named by argv[0]'s file name, or by argv[1] when argv[0] is `aziotd`.
fn service_name(args: &[std::ffi::OsString]) -> anyhow::Result<String> {
    let file_name = |s: &std::ffi::OsString| {
        std::path::Path::new(s).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
    };
    let argv0 = args.first().map(file_name).unwrap_or_default();
    let name = if argv0 == "aziotd" {
        args.get(1)
            .map(|a| a.to_string_lossy().into_owned())
            .ok_or_else(|| anyhow::anyhow!("usage: aziotd <{}>", SERVICES.join("|")))?
    } else {
        argv0
    };
    if SERVICES.contains(&name.as_str()) {
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
