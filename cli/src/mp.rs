//! `aziotctl config mp` (spec aziotctl.md §3): write a super-config for manual provisioning with
//! a connection string.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;
use zeroize::Zeroizing;

use crate::fsops::atomic::{self, NewFile, WriteError};
use crate::super_config::values::{ConnectionString, ConnectionStringError};
use crate::warnings::Warnings;

#[derive(Debug, clap::Args)]
pub struct Options {
    /// The IoT Hub device connection string
    #[arg(
        short = 'c',
        long = "connection-string",
        value_name = "CONNECTION_STRING"
    )]
    connection_string: String,

    /// Where to write the super-config
    #[arg(
        short = 'o',
        long = "out-config-file",
        value_name = "FILE",
        default_value = "/etc/aziot/config.toml"
    )]
    out_config_file: PathBuf,

    /// Overwrite the file if it exists
    #[arg(short = 'f', long)]
    force: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MpError {
    #[error(
        "File {} already exists. Azure IoT Identity Service has already been configured.\n\n\
         To have the configuration take effect, run:\n\n    sudo aziotctl config apply\n\n\
         To reconfigure IoT Identity Service, run:\n\n    sudo aziotctl config mp --force",
        .0.display()
    )]
    Exists(PathBuf),
    #[error("invalid connection string: {0}")]
    InvalidConnectionString(ConnectionStringError),
    #[error("could not serialize the config")]
    Serialize(#[source] toml::ser::Error),
    #[error(transparent)]
    Write(#[from] WriteError),
}

type EmptyTable = BTreeMap<String, String>;

/// The super-config `config mp` writes: the connection string, every other field at its default.
#[derive(Serialize)]
struct MpConfig<'a> {
    prefer_module_identity_cache: bool,
    provisioning: MpProvisioning<'a>,
    aziot_keys: EmptyTable,
    preloaded_keys: EmptyTable,
    cert_issuance: EmptyTable,
    preloaded_certs: EmptyTable,
    tpm: EmptyTable,
}

#[derive(Serialize)]
struct MpProvisioning<'a> {
    source: &'static str,
    connection_string: &'a str,
}

pub fn run(options: Options) -> Result<(), MpError> {
    let path = options.out_config_file;
    if !options.force && std::fs::symlink_metadata(&path).is_ok() {
        return Err(MpError::Exists(path));
    }
    let connection_string = Zeroizing::new(options.connection_string);
    ConnectionString::parse(&connection_string).map_err(MpError::InvalidConnectionString)?;

    let config = MpConfig {
        prefer_module_identity_cache: false,
        provisioning: MpProvisioning {
            source: "manual",
            connection_string: &connection_string,
        },
        aziot_keys: EmptyTable::new(),
        preloaded_keys: EmptyTable::new(),
        cert_issuance: EmptyTable::new(),
        preloaded_certs: EmptyTable::new(),
        tpm: EmptyTable::new(),
    };
    let text = Zeroizing::new(toml::to_string(&config).map_err(MpError::Serialize)?);

    // The invoking user and its primary group.
    let uid = nix::unistd::geteuid();
    let gid = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map_or_else(nix::unistd::getegid, |u| u.gid);
    let file = NewFile {
        path: path.clone(),
        contents: Zeroizing::new(text.as_bytes().to_vec()),
        uid: uid.as_raw(),
        gid: gid.as_raw(),
        mode: 0o600,
    };
    let mut w = Warnings::new();
    let written = atomic::replace_all(std::slice::from_ref(&file), &[], &mut w);
    w.flush_to_stderr();
    written?;

    println!("Azure IoT Identity Service has been configured successfully!");
    println!("The configuration has been written to {}", path.display());
    println!("To apply the new configuration to services, run:");
    println!();
    println!("    sudo aziotctl config apply -c '{}'", path.display());
    Ok(())
}
