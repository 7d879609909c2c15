//! Dumps the seccomp programs of a live thread: PTRACE_SEIZE, PTRACE_INTERRUPT, wait for the
//! stop, PTRACE_SECCOMP_GET_FILTER for index 0.. until ENOENT, PTRACE_DETACH. Needs root
//! (CAP_SYS_ADMIN) and a kernel with CONFIG_CHECKPOINT_RESTORE.

use std::io;

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

const PTRACE_SECCOMP_GET_FILTER: libc::c_uint = 0x420c;

/// The programs of thread `tid`, index 0 (the first installed) first, each as
/// little-endian `struct sock_filter` bytes (the layout `seccomp.rs` hashes).
pub(crate) fn dump(tid: i32) -> io::Result<Vec<Vec<u8>>> {
    let pid = Pid::from_raw(tid);
    ptrace::seize(pid, ptrace::Options::empty()).map_err(io::Error::from)?;
    let mut pending: Option<Signal> = None;
    let result = stop_and_dump(pid, &mut pending);
    // Detach in every case; a signal that arrived while stopped is handed back.
    let detached = ptrace::detach(pid, pending);
    let programs = result?;
    detached.map_err(io::Error::from)?;
    Ok(programs)
}

fn stop_and_dump(pid: Pid, pending: &mut Option<Signal>) -> io::Result<Vec<Vec<u8>>> {
    ptrace::interrupt(pid).map_err(io::Error::from)?;
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::PtraceEvent(..)) => break,
            Ok(WaitStatus::Stopped(_, sig)) => {
                // A signal-delivery stop came first: remember the signal, and stop for real.
                *pending = Some(sig);
                break;
            }
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(_) => continue,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let mut programs = Vec::new();
    for index in 0..64usize {
        // SAFETY: with a NULL buffer PTRACE_SECCOMP_GET_FILTER only returns the program's length.
        let len = unsafe {
            libc::ptrace(PTRACE_SECCOMP_GET_FILTER, pid.as_raw(), index as *mut libc::c_void, std::ptr::null_mut::<libc::c_void>())
        };
        if len < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOENT) {
                break;
            }
            return Err(e);
        }
        let mut buf = vec![libc::sock_filter { code: 0, jt: 0, jf: 0, k: 0 }; len as usize];
        // SAFETY: `buf` has room for `len` instructions, the length the kernel just reported
        // for this filter (filters are immutable once installed).
        let got = unsafe {
            libc::ptrace(PTRACE_SECCOMP_GET_FILTER, pid.as_raw(), index as *mut libc::c_void, buf.as_mut_ptr() as *mut libc::c_void)
        };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut bytes = Vec::with_capacity(buf.len() * 8);
        for insn in &buf[..(got as usize).min(buf.len())] {
            bytes.extend_from_slice(&insn.code.to_le_bytes());
            bytes.push(insn.jt);
            bytes.push(insn.jf);
            bytes.extend_from_slice(&insn.k.to_le_bytes());
        }
        programs.push(bytes);
    }
    Ok(programs)
}
