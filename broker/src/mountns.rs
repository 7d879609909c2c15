//! The worker's private mount namespace, broker side (policy `[mount_namespace]`; the mechanism
//! is `aziot_policy::mountns`, shared with the test harnesses that start workers as the broker
//! does; docs/security.md "Pathname unix sockets").
//!
//! Per spawn, first: is the namespace the broker runs in already one that hides every socket
//! the policy does not grant (systemd made it for the unit: `TemporaryFileSystem=/run`,
//! `PrivateTmp=`, `BindPaths=/run/aziot`)? Verified from /proc/self/mountinfo and a listing
//! (`aziot_policy::mountns::verify_view`), never taken from an environment variable. Then the
//! worker shares it and the status file says `made_by: unit`. Otherwise (tests, scripts/demo)
//! the broker makes it: prepared before fork (every socket cloned afresh: a detached mount can be
//! attached once), entered in the child before the privilege drop, `made_by: broker`.
//!
//! Fail closed: when the namespace is neither in force nor can be made on this system (no
//! CAP_SYS_ADMIN in the broker, a kernel without open_tree/move_mount) the worker is not started,
//! unless the service config says `[sandbox] allow_degraded = true` — then it starts without the
//! namespace, with a `DEGRADED:` warning in the log and the status file, which the audit reports
//! as a deviation. A granted socket that is a link, not a socket, or missing is never accepted
//! by the broker-made namespace.

use std::path::{Path, PathBuf};

use aziot_policy::mountns::{MadeBy, MountNsError, MountNsRecord, Prepared, Reach};

/// What one spawn does about the mount namespace.
pub struct ForSpawn {
    /// Entered in the child (`aziot_policy::mountns::enter_in_child`); `None`: no namespace
    /// to make (none asked for, already in force, or degraded).
    pub prepared: Option<Prepared>,
    /// For the status file; `None` when the policy asks for no namespace.
    pub record: Option<MountNsRecord>,
}

/// The sockets the broker itself needs beneath the masks, which the worker then sees too: its
/// own listener (`endpoint`, when a pathname) and `$NOTIFY_SOCKET` (sd_notify; a datagram socket,
/// which the workers' seccomp filters cannot even create a socket for: they allow SOCK_STREAM).
pub fn broker_sockets(endpoint: Option<&Path>) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = endpoint.map(Path::to_owned).into_iter().collect();
    if let Some(n) = std::env::var_os("NOTIFY_SOCKET") {
        let n = PathBuf::from(n);
        if n.is_absolute() {
            v.push(n);
        }
    }
    v
}

/// Prepares the namespace the policy asks for (before fork). First: is the namespace the broker
/// runs in already one that hides everything the policy does not grant from `worker` (systemd
/// made it for the unit: `TemporaryFileSystem=`, `PrivateTmp=`, `BindPaths=`; verified from
/// /proc/self/mountinfo and a listing, never from an environment variable)? Then the worker
/// runs in it and nothing is made (`made_by: unit`). Otherwise the broker makes it (needs
/// CAP_SYS_ADMIN). Neither: refused, unless `allow_degraded`.
pub fn prepare(
    policy: &aziot_policy::Policy,
    worker: &Reach,
    broker_sockets: &[PathBuf],
    allow_degraded: bool,
) -> Result<ForSpawn, MountNsError> {
    let Some(plan) = policy.mount_plan() else {
        return Ok(ForSpawn {
            prepared: None,
            record: None,
        });
    };
    let verified = std::fs::read_to_string("/proc/thread-self/mountinfo")
        .map_err(|e| vec![format!("/proc/thread-self/mountinfo: {e}")])
        .and_then(|mountinfo| {
            aziot_policy::mountns::verify_view(
                Path::new("/"),
                &mountinfo,
                &plan.masks,
                &plan.binds,
                broker_sockets,
                worker,
            )
        });
    let problems = match verified {
        Ok(view) => {
            tracing::info!(
                "the worker's private mount namespace is already in force (made for the unit; verified: {} masked, sockets reachable: {:?} granted, {:?} the broker's or siblings)",
                view.masks.iter().map(|m| m.display().to_string()).collect::<Vec<_>>().join(", "),
                view.binds,
                view.also_reachable
            );
            let mut unmasked = plan.unmasked.clone();
            unmasked.extend(
                plan.binds
                    .iter()
                    .filter(|b| !view.masks.iter().any(|m| b.starts_with(m)))
                    .cloned(),
            );
            return Ok(ForSpawn {
                prepared: None,
                record: Some(MountNsRecord {
                    in_force: true,
                    masks: view.masks,
                    binds: view.binds,
                    unmasked,
                    absent_masks: view.absent_masks,
                    not_in_force: String::new(),
                    made_by: MadeBy::Unit,
                    also_reachable: view.also_reachable,
                }),
            });
        }
        Err(problems) => problems,
    };
    match aziot_policy::mountns::prepare(&plan) {
        Ok(prepared) => {
            let record = prepared.record().clone();
            Ok(ForSpawn {
                prepared: Some(prepared),
                record: Some(record),
            })
        }
        Err(e) if e.is_unsupported() => {
            let e = MountNsError::NotInForce {
                build: Box::new(e),
                problems,
            };
            if !allow_degraded {
                return Err(e);
            }
            Ok(ForSpawn {
                prepared: None,
                record: Some(MountNsRecord {
                    in_force: false,
                    masks: plan.masks,
                    binds: plan.binds,
                    unmasked: plan.unmasked,
                    absent_masks: Vec::new(),
                    not_in_force: e.to_string(),
                    made_by: MadeBy::Broker,
                    also_reachable: Vec::new(),
                }),
            })
        }
        Err(e) => Err(e),
    }
}

/// The status file's warning for a namespace the policy asks for and the worker runs without.
pub fn degraded_warning(record: &MountNsRecord) -> Option<String> {
    (!record.in_force).then(|| {
        format!(
            "{}the worker's private mount namespace is not in force ({}): it can connect to any pathname unix socket its user may",
            aziot_policy::DEGRADED_PREFIX,
            record.not_in_force
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A namespace already in force (made here as systemd makes it for the unit: a tmpfs over
    /// each mask, in a thread's own mount namespace) is used, not rebuilt: no `Prepared`, the
    /// record says `made_by: unit`. A socket the policy does not grant planted in it: the check
    /// fails and the broker (root, CAP_SYS_ADMIN here) makes its own namespace instead.
    #[test]
    fn a_namespace_in_force_is_used_and_a_failing_one_rebuilt() {
        assert!(
            nix::unistd::geteuid().is_root()
                || std::env::var("AZIOT_ALLOW_SKIP").as_deref() == Ok("1"),
            "needs root (or AZIOT_ALLOW_SKIP=1)"
        );
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let policy = aziot_policy::builtin("certd").unwrap();
        let worker = Reach {
            uid: 65534,
            groups: vec![65534],
        };
        std::thread::spawn(move || {
            let c = |p: &str| std::ffi::CString::new(p).unwrap();
            // SAFETY: unshare with an integer argument: this thread's own mount namespace (and
            // fs_struct); the other test threads keep the host's.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNS) }, 0);
            // SAFETY: mount(2) with valid NUL-terminated strings or null pointers.
            assert_eq!(
                unsafe {
                    libc::mount(
                        std::ptr::null(),
                        c("/").as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    )
                },
                0
            );
            for mask in ["/run", "/tmp", "/var/tmp", "/dev/shm"] {
                // SAFETY: as above.
                let rc = unsafe {
                    libc::mount(
                        c("tmpfs").as_ptr(),
                        c(mask).as_ptr(),
                        c("tmpfs").as_ptr(),
                        libc::MS_NOSUID | libc::MS_NODEV,
                        c("mode=0755,size=64k").as_ptr().cast(),
                    )
                };
                assert_eq!(rc, 0, "{mask}: {}", std::io::Error::last_os_error());
            }
            let used = prepare(&policy, &worker, &[], false).unwrap();
            let record = used.record.unwrap();
            assert!(used.prepared.is_none(), "rebuilt although in force");
            assert!(
                record.in_force && record.made_by == MadeBy::Unit,
                "{record:?}"
            );
            assert_eq!(record.masks.len(), 4, "{record:?}");
            let status = serde_json::to_value(&record).unwrap();
            assert_eq!(status["made_by"], "unit");
            // A world-connectable socket the policy does not grant.
            let planted = std::os::unix::net::UnixListener::bind("/run/planted.sock").unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions("/run/planted.sock", std::fs::Permissions::from_mode(0o777))
                .unwrap();
            let rebuilt = prepare(&policy, &worker, &[], false).unwrap();
            let record = rebuilt.record.unwrap();
            assert!(rebuilt.prepared.is_some(), "the broker makes its own");
            assert!(
                record.in_force && record.made_by == MadeBy::Broker,
                "{record:?}"
            );
            drop(planted);
        })
        .join()
        .unwrap();
    }

    /// Fail closed: without CAP_SYS_ADMIN (here: dropped from this test thread's effective set;
    /// capabilities are per thread) the namespace cannot be made and the worker is not started,
    /// unless allow_degraded — then it is recorded as not in force, with a DEGRADED warning.
    #[test]
    fn without_cap_sys_admin_it_fails_closed_unless_degraded() {
        assert!(
            nix::unistd::geteuid().is_root()
                || std::env::var("AZIOT_ALLOW_SKIP").as_deref() == Ok("1"),
            "needs root (or AZIOT_ALLOW_SKIP=1)"
        );
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let policy = aziot_policy::builtin("certd").unwrap();
        let worker = Reach {
            uid: 65534,
            groups: vec![65534],
        };
        let in_thread = policy.clone();
        let w = worker.clone();
        std::thread::spawn(move || {
            let policy = in_thread;
            let worker = w;
            #[repr(C)]
            struct Header(u32, i32);
            let mut header = Header(0x2008_0522, 0);
            let mut data = [0u32; 6];
            // SAFETY: capget/capset(version 3) of this thread: a header and two 3-u32 structs.
            unsafe {
                libc::syscall(
                    libc::SYS_capget,
                    &mut header as *mut Header,
                    data.as_mut_ptr(),
                )
            };
            data[0] &= !(1 << 21); // effective CAP_SYS_ADMIN
                                   // SAFETY: as above.
            assert_eq!(
                unsafe {
                    libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr())
                },
                0
            );
            // This test's own namespace (the host's) is not one that hides the sockets either.
            let e = prepare(&policy, &worker, &[], false)
                .err()
                .expect("refused without CAP_SYS_ADMIN");
            assert!(
                matches!(&e, MountNsError::NotInForce { build, .. } if matches!(**build, MountNsError::NoCapability)),
                "{e}"
            );
            assert!(e.is_unsupported());
            assert!(
                e.to_string().contains("needs CAP_SYS_ADMIN in the broker")
                    && e.to_string().contains("not one that hides every socket"),
                "{e}"
            );
            let degraded = prepare(&policy, &worker, &[], true).unwrap();
            assert!(degraded.prepared.is_none());
            let record = degraded.record.unwrap();
            assert!(
                !record.in_force && record.not_in_force.contains("CAP_SYS_ADMIN"),
                "{record:?}"
            );
            let warning = degraded_warning(&record).unwrap();
            assert!(
                aziot_policy::is_degraded(std::slice::from_ref(&warning)),
                "{warning}"
            );
        })
        .join()
        .unwrap();
        // With the capability (the control): prepared, in force.
        let ok = prepare(&policy, &worker, &[], false).unwrap();
        let record = ok.record.unwrap();
        assert!(ok.prepared.is_some() && record.in_force && record.made_by == MadeBy::Broker);
        assert!(
            prepare(&aziot_policy::builtin("keyd").unwrap(), &worker, &[], false)
                .unwrap()
                .record
                .is_none()
        );
    }
}
