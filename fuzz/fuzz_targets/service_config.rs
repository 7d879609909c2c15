//! Every service's config TOML through the service's own parse and validation, as its broker
//! runs them on config.toml + config.d: the merge of a main file and a drop-in
//! (`aziot_ipc::config::merge_tables`), the typed deserialization with the unknown-key report
//! naming the file (`aziot_ipc::config::deserialize`), then keyd (endpoint, preloaded files),
//! certd (`parse_config`: `[cert_issuance]` and its nested unknown keys, endpoint, keyd socket,
//! EST ports), identityd (`parse_config`: §6.6 checks, DPS settings, endpoint, sockets) and
//! tpmd (`validate`, allowed uids, endpoint).
//!
//! Input: byte 0 picks the service; the rest is UTF-8 text, split at the first NUL into the
//! main file and a drop-in.
//! Checks: no panic; every unknown key reported names one of the two files or the merge.

#![no_main]

use std::path::{Path, PathBuf};

use aziot_ipc::config::{merge_tables, Merged};
use libfuzzer_sys::fuzz_target;

fn check_unknown(file: &Path, key: &str) {
    assert!(
        file == Path::new("config.toml") || file == Path::new("config.d/00.toml") || file == Path::new("<merged config>"),
        "unknown key {key:?} reported in {file:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let [pick, rest @ ..] = data else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let (main, dropin) = text.split_once('\0').unwrap_or((text, ""));
    let mut files: Vec<(PathBuf, toml::Table)> = Vec::new();
    for (name, part) in [("config.toml", main), ("config.d/00.toml", dropin)] {
        match part.parse::<toml::Table>() {
            Ok(t) => files.push((PathBuf::from(name), t)),
            Err(_) => return,
        }
    }
    let mut value = toml::Table::new();
    for (_, t) in &files {
        merge_tables(&mut value, t.clone());
    }
    let merged = Merged { value, files };
    match pick % 4 {
        0 => {
            let Ok(config) = aziot_ipc::config::deserialize::<aziot_keyd::config::Config>(&merged, check_unknown) else {
                return;
            };
            let _ = aziot_keyd::endpoint(&config);
            let _ = aziot_keyd::preloaded_files(&config);
        }
        1 => {
            let Ok(config) = aziot_certd::parse_config(&merged, &mut check_unknown) else { return };
            let _ = aziot_certd::endpoint(&config);
            let _ = aziot_certd::keyd_socket(&config);
            let _ = aziot_certd::est::tcp_ports(&config, None);
            let _ = config.preloaded_files();
        }
        2 => {
            let Ok(config) = aziot_identityd::parse_config(&merged, &mut check_unknown) else { return };
            let _ = aziot_identityd::endpoint(&config);
            let _ = aziot_identityd::keyd_socket(&config);
            let _ = aziot_identityd::certd_socket(&config);
            let _ = aziot_identityd::tpmd_socket(&config);
            let _ = aziot_identityd::cloud_ports(&config, None);
            // What the broker hands the worker parses again to the same config.
            let text = toml::to_string(&merged.value).expect("a parsed table serializes");
            let again = aziot_identityd::config_from_text(&text).expect("the worker parses what the broker accepted");
            assert_eq!(again, config, "the worker's config differs from the broker's");
        }
        _ => {
            let Ok(config) = aziot_ipc::config::deserialize::<aziot_tpmd::config::Config>(&merged, check_unknown) else {
                return;
            };
            if aziot_tpmd::config::validate(&config).is_ok() {
                let _ = aziot_tpmd::config::allowed_uids(&config);
                let _ = aziot_tpmd::endpoint(&config);
            }
        }
    }
});
