//! The worker's private mount namespace, broker side (policy `[mount_namespace]`; the mechanism
//! is `aziot_policy::mountns`, shared with the test harnesses that start workers as the broker
//! does). Per spawn: prepared before fork (every socket cloned afresh: a detached mount can be
//! attached once), entered in the child before the privilege drop, recorded in the status file.
//!
//! Fail closed: when the namespace cannot be made on this system (no CAP_SYS_ADMIN in the
//! broker, a kernel without open_tree/move_mount) the worker is not started, unless the service
//! config says `[sandbox] allow_degraded = true` — then it starts without the namespace, with a
//! `DEGRADED:` warning in the log and the status file, which the audit reports as a deviation.
//! A granted socket that is a link, not a socket, or missing is never accepted.

use aziot_policy::mountns::{MountNsError, MountNsRecord, Prepared};

/// What one spawn does about the mount namespace.
pub struct ForSpawn {
    /// Entered in the child (`aziot_policy::mountns::enter_in_child`); `None`: no namespace.
    pub prepared: Option<Prepared>,
    /// For the status file; `None` when the policy asks for no namespace.
    pub record: Option<MountNsRecord>,
}

/// Prepares the namespace the policy asks for (before fork).
pub fn prepare(
    policy: &aziot_policy::Policy,
    allow_degraded: bool,
) -> Result<ForSpawn, MountNsError> {
    let Some(plan) = policy.mount_plan() else {
        return Ok(ForSpawn {
            prepared: None,
            record: None,
        });
    };
    match aziot_policy::mountns::prepare(&plan) {
        Ok(prepared) => {
            let record = prepared.record().clone();
            Ok(ForSpawn {
                prepared: Some(prepared),
                record: Some(record),
            })
        }
        Err(e) if e.is_unsupported() && allow_degraded => {
            let record = MountNsRecord {
                in_force: false,
                masks: plan.masks,
                binds: plan.binds,
                unmasked: plan.unmasked,
                absent_masks: Vec::new(),
                not_in_force: e.to_string(),
            };
            Ok(ForSpawn {
                prepared: None,
                record: Some(record),
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
        let in_thread = policy.clone();
        std::thread::spawn(move || {
            let policy = in_thread;
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
            let e = prepare(&policy, false)
                .err()
                .expect("refused without CAP_SYS_ADMIN");
            assert!(matches!(e, MountNsError::NoCapability), "{e}");
            assert!(
                e.to_string().contains("needs CAP_SYS_ADMIN in the broker"),
                "{e}"
            );
            let degraded = prepare(&policy, true).unwrap();
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
        let ok = prepare(&policy, false).unwrap();
        assert!(ok.prepared.is_some() && ok.record.unwrap().in_force);
        assert!(prepare(&aziot_policy::builtin("keyd").unwrap(), false)
            .unwrap()
            .record
            .is_none());
    }
}
