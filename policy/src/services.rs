// The one declaration of every aziot service: the *data* the broker, the worker entry, the
// policy (this crate and its build script) and aziotctl share. What a service *does* (read its
// config as root, pre-load, serve) is `aziot_ipc::service::ServiceImpl`, implemented in the
// service's own crate.
//
// This file is also `include!`d by build.rs (to compile one seccomp program per entry), so it
// must stand alone: no `crate::` paths, no inner attributes, std only.
//
// Adding a service: docs/adding-a-service.md.

/// Everything aziot knows about one service that is a fact, not behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Short name: `keyd`. Names the policy, the status file (`<short>.status`), the manifest's
    /// `service`, `/etc/aziot/<short>/`.
    pub short: &'static str,
    /// Program name (argv[0] of `aziotd`, systemd unit stem): `aziot-keyd`.
    pub program: &'static str,
    /// The service unit: `aziot-keyd.service`.
    pub service_unit: &'static str,
    /// The socket unit: `aziot-keyd.socket`.
    pub socket_unit: &'static str,
    /// `FileDescriptorName=` of the socket unit (the name in `LISTEN_FDNAMES`).
    pub socket_fd_name: &'static str,
    /// The worker's user (and primary group), created by packaging/sysusers.d/aziot.conf.
    pub user: &'static str,
    /// The listener when `[endpoints]` names none.
    pub default_socket: &'static str,
    /// The environment variable naming the main config file.
    pub config_env: &'static str,
    /// The environment variable naming the config drop-in directory.
    pub config_dir_env: &'static str,
    pub default_config: &'static str,
    pub default_config_dir: &'static str,
    /// The state directory when the config names none (the audit's default).
    pub default_state_dir: &'static str,
    /// The admin's policy drop-ins, and the environment variable that overrides them.
    pub policy_d: &'static str,
    pub policy_d_env: &'static str,
    /// The built-in policy, relative to policy/: `services/keyd.toml`, and its text.
    pub policy_file: &'static str,
    pub policy_toml: &'static str,
    /// The seccomp allowlist, relative to policy/: `seccomp/keyd.json`, and its text.
    pub seccomp_file: &'static str,
    pub seccomp_json: &'static str,
    /// `aziotctl config apply` starts this service's unit explicitly after the sockets (the
    /// others are socket-activated).
    pub started_by_aziotctl: bool,
    /// The environment variables the worker receives from its broker's (filtered) environment
    /// when set there; the worker's environment is otherwise empty. Only what the worker's own
    /// code or a library it pre-loads reads.
    pub worker_env: &'static [&'static str],
}

/// Every service, in the order `aziotctl policy` lists them.
pub const SERVICES: &[ServiceInfo] = &[
    ServiceInfo {
        short: "keyd",
        program: "aziot-keyd",
        service_unit: "aziot-keyd.service",
        socket_unit: "aziot-keyd.socket",
        socket_fd_name: "aziot-keyd.socket",
        user: "aziotks",
        default_socket: "/run/aziot/keyd.sock",
        config_env: "AZIOT_KEYD_CONFIG",
        config_dir_env: "AZIOT_KEYD_CONFIG_DIR",
        default_config: "/etc/aziot/keyd/config.toml",
        default_config_dir: "/etc/aziot/keyd/config.d",
        default_state_dir: "/var/lib/aziot/keyd",
        policy_d: "/etc/aziot/keyd/policy.d",
        policy_d_env: "AZIOT_KEYD_POLICY_DIR",
        policy_file: "services/keyd.toml",
        policy_toml: include_str!("../services/keyd.toml"),
        seccomp_file: "seccomp/keyd.json",
        seccomp_json: include_str!("../seccomp/keyd.json"),
        started_by_aziotctl: false,
        // the PKCS#11 library's own config file (SoftHSM2), read when keyd loads it
        worker_env: &["SOFTHSM2_CONF"],
    },
    ServiceInfo {
        short: "certd",
        program: "aziot-certd",
        service_unit: "aziot-certd.service",
        socket_unit: "aziot-certd.socket",
        socket_fd_name: "aziot-certd.socket",
        user: "aziotcs",
        default_socket: "/run/aziot/certd.sock",
        config_env: "AZIOT_CERTD_CONFIG",
        config_dir_env: "AZIOT_CERTD_CONFIG_DIR",
        default_config: "/etc/aziot/certd/config.toml",
        default_config_dir: "/etc/aziot/certd/config.d",
        default_state_dir: "/var/lib/aziot/certd",
        policy_d: "/etc/aziot/certd/policy.d",
        policy_d_env: "AZIOT_CERTD_POLICY_DIR",
        policy_file: "services/certd.toml",
        policy_toml: include_str!("../services/certd.toml"),
        seccomp_file: "seccomp/certd.json",
        seccomp_json: include_str!("../seccomp/certd.json"),
        started_by_aziotctl: false,
        // EST (certd.md §6.5): the proxy, read by workers/certd/src/est/mod.rs; the trust store
        // of OpenSSL's default verify paths
        worker_env: &["HTTPS_PROXY", "https_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR"],
    },
    ServiceInfo {
        short: "identityd",
        program: "aziot-identityd",
        service_unit: "aziot-identityd.service",
        socket_unit: "aziot-identityd.socket",
        socket_fd_name: "aziot-identityd.socket",
        user: "aziotid",
        default_socket: "/run/aziot/identityd.sock",
        config_env: "AZIOT_IDENTITYD_CONFIG",
        config_dir_env: "AZIOT_IDENTITYD_CONFIG_DIR",
        default_config: "/etc/aziot/identityd/config.toml",
        default_config_dir: "/etc/aziot/identityd/config.d",
        default_state_dir: "/var/lib/aziot/identityd",
        policy_d: "/etc/aziot/identityd/policy.d",
        policy_d_env: "AZIOT_IDENTITYD_POLICY_DIR",
        policy_file: "services/identityd.toml",
        policy_toml: include_str!("../services/identityd.toml"),
        seccomp_file: "seccomp/identityd.json",
        seccomp_json: include_str!("../seccomp/identityd.json"),
        started_by_aziotctl: true,
        // the trust store of DPS/Hub TLS (cloud-protocols.md §1.1); the proxy is not here: the
        // broker validates it and passes it in the worker's config text
        worker_env: &["SSL_CERT_FILE", "SSL_CERT_DIR"],
    },
    ServiceInfo {
        short: "tpmd",
        program: "aziot-tpmd",
        service_unit: "aziot-tpmd.service",
        socket_unit: "aziot-tpmd.socket",
        socket_fd_name: "aziot-tpmd.socket",
        user: "aziottpm",
        default_socket: "/run/aziot/tpmd.sock",
        config_env: "AZIOT_TPMD_CONFIG",
        config_dir_env: "AZIOT_TPMD_CONFIG_DIR",
        default_config: "/etc/aziot/tpmd/config.toml",
        default_config_dir: "/etc/aziot/tpmd/config.d",
        default_state_dir: "/var/lib/aziot/tpmd",
        policy_d: "/etc/aziot/tpmd/policy.d",
        policy_d_env: "AZIOT_TPMD_POLICY_DIR",
        policy_file: "services/tpmd.toml",
        policy_toml: include_str!("../services/tpmd.toml"),
        seccomp_file: "seccomp/tpmd.json",
        seccomp_json: include_str!("../seccomp/tpmd.json"),
        started_by_aziotctl: false,
        worker_env: &[],
    },
];

/// The short names of [`SERVICES`], in table order.
pub const SHORT_NAMES: [&str; SERVICES.len()] = {
    let mut names = [""; SERVICES.len()];
    let mut i = 0;
    while i < SERVICES.len() {
        names[i] = SERVICES[i].short;
        i += 1;
    }
    names
};

/// The service of short name `short` (`keyd`).
pub fn by_short(short: &str) -> Option<&'static ServiceInfo> {
    SERVICES.iter().find(|s| s.short == short)
}

/// The service of program name `program` (`aziot-keyd`).
pub fn by_program(program: &str) -> Option<&'static ServiceInfo> {
    SERVICES.iter().find(|s| s.program == program)
}

/// A short name, or a program name (`aziot-keyd`), or a unit name (`aziot-keyd.service`).
pub fn by_any_name(name: &str) -> Option<&'static ServiceInfo> {
    SERVICES.iter().find(|s| s.short == name || s.program == name || s.service_unit == name || s.socket_unit == name)
}

impl ServiceInfo {
    /// The main config file: `$<config_env>`, else [`ServiceInfo::default_config`].
    pub fn config_path(&self) -> std::path::PathBuf {
        std::env::var_os(self.config_env)
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(self.default_config))
    }

    /// The config drop-in directory: `$<config_dir_env>`, else [`ServiceInfo::default_config_dir`].
    pub fn config_dir(&self) -> std::path::PathBuf {
        std::env::var_os(self.config_dir_env)
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(self.default_config_dir))
    }

    /// The policy drop-in directory: `$<policy_d_env>`, else [`ServiceInfo::policy_d`].
    pub fn policy_dir(&self) -> std::path::PathBuf {
        std::env::var_os(self.policy_d_env)
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::path::PathBuf::from(self.policy_d))
    }

    /// The status file's name in the run directory: `<short>.status`.
    pub fn status_file(&self) -> String {
        format!("{}.status", self.short)
    }
}

/// [`by_short`] at compile time: `const INFO: &ServiceInfo = services::get("keyd");` fails to
/// build when the table has no such service.
pub const fn get(short: &str) -> &'static ServiceInfo {
    let mut i = 0;
    while i < SERVICES.len() {
        if const_str_eq(SERVICES[i].short, short) {
            return &SERVICES[i];
        }
        i += 1;
    }
    panic!("no such service in aziot_policy::services::SERVICES")
}

const fn const_str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}
