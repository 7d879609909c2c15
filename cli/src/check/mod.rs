//! `aziotctl check` and `aziotctl check-list` (spec aziotctl.md §4).
//!
//! Every check of §4.4 runs in its order, in two sections, followed here by one check of our
//! own: `sandbox-kernel` (the kernel's Landlock ABI against what the policies require) and
//! `sandbox-audit` (the audit of `aziotctl policy audit` for every running service). The
//! three output formats are §4.3's. Unlike upstream, the exit status is honest: 1 when a check
//! ended in `error`/`fatal` (or `warning` under `--warnings-as-errors`), else 0
//! (docs/compatibility.md).
//!
//! Network: the checks contact only what the configs or the command line name — the IoT Hub
//! and DPS endpoints of identityd's config (or `--iothub-hostname`), `--proxy-uri`, and
//! `--ntp-server`. Upstream's defaults that name third parties (`pool.ntp.org`, the version
//! list at aka.ms) are not contacted: those checks are `ignored` unless the option is given.

mod certs;
mod config;
mod daemons;
mod info;
mod landlock;
mod net;
mod output;

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

pub use config::program_name;
pub use output::OutputFormat;

pub const CONFIGURATION: &str = "Configuration checks";
pub const CONNECTIVITY: &str = "Connectivity checks";

#[derive(Debug, clap::Args)]
pub struct Options {
    /// Space-separated list of check IDs to skip (repeatable)
    #[arg(long, value_name = "DONT_RUN")]
    pub dont_run: Vec<String>,
    /// Output format
    #[arg(short, long, value_enum, default_value = "text")]
    pub output: OutputFormat,
    /// Treat warnings as errors (reported and counted as errors; exit status 1)
    #[arg(long)]
    pub warnings_as_errors: bool,
    /// NTP server (`host:port`) for host-local-time; without it the check is ignored
    #[arg(long, value_name = "NTP_SERVER")]
    pub ntp_server: Option<String>,
    /// Print the causes of every warning and error, and the skipped checks
    #[arg(short, long)]
    pub verbose: bool,
    /// The IoT Hub to test in the connectivity checks
    #[arg(long, value_name = "IOTHUB_HOSTNAME")]
    pub iothub_hostname: Option<String>,
    /// HTTP proxy for the HTTPS connectivity checks (port 443 and DPS)
    #[arg(long, value_name = "PROXY_URI")]
    pub proxy_uri: Option<String>,
    /// Compare the installed version with this one; without it aziot-version is ignored
    #[arg(long, value_name = "VERSION")]
    pub expected_aziot_version: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct ListOptions {
    /// Output format
    #[arg(short, long, value_enum, default_value = "text")]
    pub output: output::ListFormat,
}

/// How a check ended. The vectors are the message lines: the outer message first, then its
/// causes (spec §4.3 `details`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Warning(Vec<String>),
    Ignored,
    Skipped,
    Error(Vec<String>),
    Fatal(Vec<String>),
}

impl Outcome {
    /// An error with `message` and the cause chain of `cause`.
    pub fn error_from(
        message: impl Into<String>,
        cause: &(dyn std::error::Error + 'static),
    ) -> Outcome {
        Outcome::Error(with_causes(message, cause))
    }

    pub fn error(message: impl Into<String>) -> Outcome {
        Outcome::Error(vec![message.into()])
    }

    pub fn warning(message: impl Into<String>) -> Outcome {
        Outcome::Warning(vec![message.into()])
    }
}

/// `message`, then every error of `cause`'s chain.
pub fn with_causes(
    message: impl Into<String>,
    cause: &(dyn std::error::Error + 'static),
) -> Vec<String> {
    let mut lines = vec![message.into()];
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(cause);
    while let Some(e) = next {
        lines.push(e.to_string());
        next = e.source();
    }
    lines
}

/// One check: its ID, its description (§4.4, exact), its section and its code.
pub struct Check {
    pub id: &'static str,
    pub description: &'static str,
    pub section: &'static str,
    run: fn(&mut Ctx) -> Outcome,
}

/// Every check, in execution order (§4.4), then `sandbox-kernel` and `sandbox-audit`.
pub static CHECKS: &[Check] = &[
    Check {
        id: "keyd-config-well-formed",
        description: "keyd configuration is well-formed",
        section: CONFIGURATION,
        run: config::keyd_well_formed,
    },
    Check {
        id: "certd-config-well-formed",
        description: "certd configuration is well-formed",
        section: CONFIGURATION,
        run: config::certd_well_formed,
    },
    Check {
        id: "tpmd-config-well-formed",
        description: "tpmd configuration is well-formed",
        section: CONFIGURATION,
        run: config::tpmd_well_formed,
    },
    Check {
        id: "identityd-config-well-formed",
        description: "identityd configuration is well-formed",
        section: CONFIGURATION,
        run: config::identityd_well_formed,
    },
    Check {
        id: "configs-up-to-date",
        description: "daemon configurations up-to-date with config.toml",
        section: CONFIGURATION,
        run: config::up_to_date,
    },
    Check {
        id: "hostname",
        description: "identityd config toml file specifies a valid hostname",
        section: CONFIGURATION,
        run: config::hostname,
    },
    Check {
        id: "aziot-version",
        description: "aziot-identity-service package is up-to-date",
        section: CONFIGURATION,
        run: net::aziot_version,
    },
    Check {
        id: "host-local-time",
        description: "host time is close to reference time",
        section: CONFIGURATION,
        run: net::local_time,
    },
    Check {
        id: "identity-certificate-expiry",
        description: "production readiness: identity certificates expiry",
        section: CONFIGURATION,
        run: certs::identity_expiry,
    },
    Check {
        id: "est-identity-and-bootstrap-certificate-expiry",
        description: "production readiness: EST identity and bootstrap certificates expiry",
        section: CONFIGURATION,
        run: certs::est_expiry,
    },
    Check {
        id: "local-ca-certificate-expiry",
        description: "production readiness: Local CA certificates expiry",
        section: CONFIGURATION,
        run: certs::local_ca_expiry,
    },
    Check {
        id: "certs-preloaded",
        description: "preloaded certificates are valid",
        section: CONFIGURATION,
        run: certs::preloaded,
    },
    Check {
        id: "keyd-running",
        description: "keyd is running",
        section: CONFIGURATION,
        run: daemons::keyd_running,
    },
    Check {
        id: "certd-running",
        description: "certd is running",
        section: CONFIGURATION,
        run: daemons::certd_running,
    },
    Check {
        id: "tpmd-running",
        description: "tpmd is running",
        section: CONFIGURATION,
        run: daemons::tpmd_running,
    },
    Check {
        id: "identityd-running",
        description: "identityd is running",
        section: CONFIGURATION,
        run: daemons::identityd_running,
    },
    Check {
        id: "certs-read",
        description: "read all preloaded certificates from the Certificates Service",
        section: CONFIGURATION,
        run: certs::certs_read,
    },
    Check {
        id: "key-pairs-read",
        description: "read all preloaded key pairs from the Keys Service",
        section: CONFIGURATION,
        run: certs::key_pairs_read,
    },
    Check {
        id: "est-server-https",
        description: "check all EST server URLs utilize HTTPS",
        section: CONFIGURATION,
        run: certs::est_https,
    },
    Check {
        id: "certs-match-private-keys",
        description:
            "ensure all preloaded certificates match preloaded private keys with the same ID",
        section: CONFIGURATION,
        run: certs::certs_match_keys,
    },
    Check {
        id: "sandbox-kernel",
        description: "the kernel's Landlock can enforce every service's sandbox policy",
        section: CONFIGURATION,
        run: landlock::sandbox_kernel,
    },
    Check {
        id: "sandbox-audit",
        description: "every running service is confined as its sandbox policy says",
        section: CONFIGURATION,
        run: daemons::sandbox_audit,
    },
    Check {
        id: "host-connect-iothub-amqp",
        description: "host can connect to and perform TLS handshake with iothub AMQP port",
        section: CONNECTIVITY,
        run: net::iothub_amqp,
    },
    Check {
        id: "host-connect-iothub-https",
        description:
            "host can connect to and perform TLS handshake with iothub HTTPS / WebSockets port",
        section: CONNECTIVITY,
        run: net::iothub_https,
    },
    Check {
        id: "host-connect-iothub-mqtt",
        description: "host can connect to and perform TLS handshake with iothub MQTT port",
        section: CONNECTIVITY,
        run: net::iothub_mqtt,
    },
    Check {
        id: "host-connect-dps-endpoint",
        description: "host can connect to and perform TLS handshake with DPS endpoint",
        section: CONNECTIVITY,
        run: net::dps_endpoint,
    },
];

/// What earlier checks found, for the later ones (§4.2).
pub struct Ctx<'a> {
    pub opts: &'a Options,
    pub keyd: Option<aziot_keyd::config::Config>,
    pub certd: Option<aziot_certd::config::Config>,
    pub tpmd: Option<aziot_tpmd::config::Config>,
    pub identityd: Option<aziot_identityd::config::Config>,
    /// identityd's previous config (`<homedir>/prev_state`), loaded quietly.
    pub prev_identityd: Option<aziot_identityd::config::Config>,
    /// Short names of the services whose socket accepted a connection.
    pub running: BTreeSet<&'static str>,
    /// Certificates read from certd (check 17), by ID.
    pub certs: BTreeMap<String, Vec<openssl::x509::X509>>,
    /// Private keys loaded (check 18), by ID.
    pub keys: BTreeMap<String, openssl::pkey::PKey<openssl::pkey::Private>>,
    /// The `additional_info` of the check running now.
    pub additional: serde_json::Map<String, Value>,
    users: Option<Result<std::rc::Rc<crate::users::ServiceUsers>, String>>,
}

impl Ctx<'_> {
    /// The four service users (§1.4): an error when not root or a user is missing.
    pub fn users(&mut self) -> Result<std::rc::Rc<crate::users::ServiceUsers>, Vec<String>> {
        let users = self.users.get_or_insert_with(|| {
            if !nix::unistd::geteuid().is_root() {
                return Err("this command must be run as root".to_owned());
            }
            crate::users::resolve(None)
                .map(std::rc::Rc::new)
                .map_err(|e| {
                    let mut s = e.to_string();
                    if let Some(c) = std::error::Error::source(&e) {
                        s.push_str(&format!(": {c}"));
                    }
                    s
                })
        });
        users.clone().map_err(|e| vec![e])
    }

    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.additional.insert(key.to_owned(), value.into());
    }
}

/// One finished check, as the outputs print it.
pub struct Done {
    pub check: &'static Check,
    pub outcome: Outcome,
    pub additional: serde_json::Map<String, Value>,
}

/// Runs the checks; `Ok(true)` when none failed (the exit status, §1.3 Recommendation).
pub fn run(opts: Options) -> std::io::Result<bool> {
    let dont_run: BTreeSet<String> = opts
        .dont_run
        .iter()
        .flat_map(|v| v.split(' '))
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    let mut ctx = Ctx {
        opts: &opts,
        keyd: None,
        certd: None,
        tpmd: None,
        identityd: None,
        prev_identityd: None,
        running: BTreeSet::new(),
        certs: BTreeMap::new(),
        keys: BTreeMap::new(),
        additional: serde_json::Map::new(),
        users: None,
    };
    let mut out = output::Printer::new(opts.output, opts.verbose);
    let mut failed = false;
    let mut section = "";
    for check in CHECKS {
        if check.section != section {
            out.section(section, check.section)?;
            section = check.section;
        }
        ctx.additional = serde_json::Map::new();
        let mut outcome = if dont_run.contains(check.id) {
            Outcome::Ignored
        } else {
            (check.run)(&mut ctx)
        };
        if opts.warnings_as_errors {
            if let Outcome::Warning(lines) = outcome {
                outcome = Outcome::Error(lines);
            }
        }
        let fatal = matches!(outcome, Outcome::Fatal(_));
        failed |= matches!(outcome, Outcome::Error(_) | Outcome::Fatal(_));
        out.check(Done {
            check,
            outcome,
            additional: std::mem::take(&mut ctx.additional),
        })?;
        if fatal {
            out.stopped();
            break;
        }
    }
    out.finish(info::top_level(&ctx))?;
    Ok(!failed)
}

/// `aziotctl check-list` (§4.6): no privileges, no I/O but stdout.
pub fn list(opts: ListOptions) -> std::io::Result<()> {
    output::list(opts.output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_sections_contiguous() {
        let ids: BTreeSet<_> = CHECKS.iter().map(|c| c.id).collect();
        assert_eq!(ids.len(), CHECKS.len());
        let first_connectivity = CHECKS
            .iter()
            .position(|c| c.section == CONNECTIVITY)
            .unwrap();
        assert!(CHECKS[..first_connectivity]
            .iter()
            .all(|c| c.section == CONFIGURATION));
        assert!(CHECKS[first_connectivity..]
            .iter()
            .all(|c| c.section == CONNECTIVITY));
        assert_eq!(CHECKS.len(), 26);
    }

    #[test]
    fn causes_follow_the_message() {
        let e = std::io::Error::new(std::io::ErrorKind::Other, "inner");
        assert_eq!(with_causes("outer", &e), ["outer", "inner"]);
    }
}
