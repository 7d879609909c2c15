//! keyd's configuration (spec keyd.md §2).

use std::collections::BTreeMap;
use std::path::PathBuf;

use aziot_ipc::principal::Principal;
use serde::Deserialize;

#[derive(Clone, Debug, Default, Deserialize)]
pub struct Config {
    /// Per-uid simultaneous connection limit.
    #[serde(default = "default_max_requests")]
    pub max_requests: usize,
    /// Passed verbatim to the key library's `set_parameter`, in ascending key order.
    #[serde(default)]
    pub aziot_keys: BTreeMap<String, String>,
    /// Key ID -> location URI, passed as `preloaded_key:<id>`, in ascending ID order.
    #[serde(default)]
    pub preloaded_keys: BTreeMap<String, String>,
    #[serde(default)]
    pub principal: Vec<Principal>,
    #[serde(default)]
    pub endpoints: Endpoints,
    /// New (not upstream): a replacement `libaziot_keys.so` to load instead of the built-in
    /// key library. Absent: the built-in library is used, linked statically.
    #[serde(default)]
    pub aziot_keys_library: Option<PathBuf>,
    /// New: the broker's sandbox settings.
    #[serde(default)]
    pub sandbox: aziot_ipc::config::SandboxConfig,
}

fn default_max_requests() -> usize {
    10
}

/// `[endpoints]`: honoured in every build (upstream: debug builds only).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Endpoints {
    pub aziot_keyd: Option<String>,
}
