//! The super-config (/etc/aziot/config.toml) → `aziotctl config apply` mapping: cli's own
//! parser (`super_config::parse`: schema, key locations, PKCS#11 URIs, URLs, warnings) and
//! renderer (`render::render`: the four service configs), compiled here from cli/src by
//! `#[path]` (aziotctl has no library target); then what apply would write, each service's
//! `config.d/00-super.toml`, merged over the packaged config.toml (packaging/deb/etc) exactly as
//! the service's broker reads it, through the service's own parse and validation.
//!
//! Checks: no panic; every rendered config serializes, and so does the `--dry-run` preview
//! (redacted); every service reads what apply writes into its own config type, without an
//! unknown key. The services' checks of the values themselves run too but may refuse them.

#![no_main]
#![allow(dead_code, unused_imports)]

#[path = "../../cli/src/render/mod.rs"]
mod render;
#[path = "../../cli/src/super_config/mod.rs"]
mod super_config;
#[path = "../../cli/src/warnings.rs"]
mod warnings;

use std::path::{Path, PathBuf};

use aziot_ipc::config::{merge_tables, Merged};
use libfuzzer_sys::fuzz_target;
use render::output::ServiceConfig;

/// What the service's broker reads: the packaged config.toml, then apply's drop-in.
fn merged(packaged: &str, dropin: &str) -> Merged {
    let mut files = vec![(PathBuf::from("config.toml"), packaged.parse::<toml::Table>().expect("the packaged config parses"))];
    let written = dropin.parse::<toml::Table>().unwrap_or_else(|e| panic!("apply wrote TOML that does not parse: {e}\n{dropin}"));
    files.push((PathBuf::from("config.d/00-super.toml"), written));
    let mut value = toml::Table::new();
    for (_, t) in &files {
        merge_tables(&mut value, t.clone());
    }
    Merged { value, files }
}

fn no_unknown(file: &Path, key: &str) {
    panic!("config apply wrote a key its service does not know: {key:?} in {file:?}");
}

fn written<T: ServiceConfig>(name: &str, config: &mut T) -> String {
    let text = toml::to_string(config).unwrap_or_else(|e| panic!("the {name} config does not serialize: {e}"));
    config.redact();
    toml::to_string(config).unwrap_or_else(|e| panic!("the redacted {name} config does not serialize: {e}"));
    text
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut w = warnings::Warnings::new();
    let Ok(config) = super_config::parse(text, &mut w) else { return };
    let hostname = config.hostname.clone().unwrap_or_else(|| "fuzz-host".to_owned());
    let uids = render::PrincipalUids { aziotcs: 1001, aziotid: 1002 };
    let Ok(mut rendered) = render::render(&config, hostname, &uids, &mut w) else { return };

    let keyd = written("keyd", &mut rendered.keyd);
    let certd = written("certd", &mut rendered.certd);
    let identityd = written("identityd", &mut rendered.identityd);
    let tpmd = written("tpmd", &mut rendered.tpmd);

    // Structure: each service deserializes what apply wrote into its own config type, with
    // no unknown key. Values the user typed (URLs, scope IDs, TCTI strings) are then checked by
    // the service's own validation, which may refuse them (as `aziotctl check` reports, and
    // the service at start): that is run here for crashes, not asserted.
    let m = merged(include_str!("../../packaging/deb/etc/keyd.toml"), &keyd);
    let k: aziot_keyd::config::Config =
        aziot_ipc::config::deserialize(&m, no_unknown).unwrap_or_else(|e| panic!("keyd cannot read what apply wrote: {e}\n{keyd}"));
    let _ = aziot_keyd::endpoint(&k);

    let m = merged(include_str!("../../packaging/deb/etc/certd.toml"), &certd);
    let _: aziot_certd::config::RawConfig =
        aziot_ipc::config::deserialize(&m, no_unknown).unwrap_or_else(|e| panic!("certd cannot read what apply wrote: {e}\n{certd}"));
    let _ = aziot_certd::parse_config(&m, &mut no_unknown);

    let m = merged(include_str!("../../packaging/deb/etc/identityd.toml"), &identityd);
    let _: aziot_identityd::config::Config = aziot_ipc::config::deserialize(&m, no_unknown)
        .unwrap_or_else(|e| panic!("identityd cannot read what apply wrote: {e}\n{identityd}"));
    let _ = aziot_identityd::parse_config(&m, &mut no_unknown);

    let m = merged(include_str!("../../packaging/deb/etc/tpmd.toml"), &tpmd);
    let t: aziot_tpmd::config::Config =
        aziot_ipc::config::deserialize(&m, no_unknown).unwrap_or_else(|e| panic!("tpmd cannot read what apply wrote: {e}\n{tpmd}"));
    let _ = aziot_tpmd::config::validate(&t);
});
