//! Step 1 of the broker: start from a known state — no stray descriptors, a minimal environment.

use std::os::fd::RawFd;

/// Environment variables the broker keeps; everything else is removed.
const KEEP_ENV: &[&str] = &[
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "JOURNAL_STREAM",
    "INVOCATION_ID",
    "AZIOT_LOG",
    // SoftHSM2's config file location; passed on to the keyd worker (see worker_env).
    "SOFTHSM2_CONF",
    // The HTTPS proxy (cloud-protocols.md §1.4). certd's EST (spec certd.md §6.5): the broker
    // grants its port, the worker reads it from its environment (worker_env). identityd: the broker validates it,
    // grants its port and passes it in the worker's config text (workers/identityd/src/lib.rs
    // BROKER_TABLE); identityd's worker ignores its environment's copy.
    "HTTPS_PROXY",
    "https_proxy",
    // OpenSSL's trust store location (cloud-protocols.md §1.1: honoured for tests); identityd's
    // worker loads it before it locks in.
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// Variables the worker of `service` (a short name) receives when the broker has them (its
/// environment is otherwise empty): its [`ServiceInfo::worker_env`] in the one service table,
/// none for an unknown name. Each is one the broker keeps ([`KEEP_ENV`]).
///
/// [`ServiceInfo::worker_env`]: aziot_policy::services::ServiceInfo::worker_env
pub fn worker_env(service: &str) -> &'static [&'static str] {
    aziot_policy::services::by_short(service).map_or(&[], |info| info.worker_env)
}

/// The systemd-activated descriptors (3 .. 3+LISTEN_FDS) when they are meant for this process.
pub fn activated_range() -> std::ops::Range<RawFd> {
    let ours = std::env::var("LISTEN_PID").ok().and_then(|p| p.trim().parse::<u32>().ok()) == Some(std::process::id());
    let n = if ours {
        std::env::var("LISTEN_FDS").ok().and_then(|n| n.trim().parse::<RawFd>().ok()).unwrap_or(0)
    } else {
        0
    };
    3..3 + n.clamp(0, 1024)
}

/// Closes every descriptor above stderr except `keep`.
pub fn close_stray_fds(keep: &std::ops::Range<RawFd>) -> std::io::Result<()> {
    let mut stray = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let name = entry?.file_name();
        if let Some(fd) = name.to_str().and_then(|n| n.parse::<RawFd>().ok()) {
            if fd > 2 && !keep.contains(&fd) {
                stray.push(fd);
            }
        }
    }
    for fd in stray {
        // The read_dir handle itself is already closed here; a stale number just fails EBADF.
        let _ = nix::unistd::close(fd);
    }
    Ok(())
}

/// Removes every variable but `AZIOT_*` and the allowlist.
pub fn clear_env() {
    let remove: Vec<_> = std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| {
            let k = k.to_string_lossy();
            !(k.starts_with("AZIOT_") || KEEP_ENV.contains(&k.as_ref()))
        })
        .collect();
    for k in remove {
        std::env::remove_var(k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A variable the broker clears at step 1 could never reach a worker: every service's list is
    /// part of what the broker keeps.
    #[test]
    fn every_worker_variable_is_kept_by_the_broker() {
        for info in aziot_policy::services::SERVICES {
            for var in worker_env(info.short) {
                assert!(KEEP_ENV.contains(var), "{}: {var} is not in KEEP_ENV", info.short);
            }
        }
        assert!(worker_env("no-such-service").is_empty());
    }
}
