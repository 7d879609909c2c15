//! Makes a live worker execute a syscall its seccomp filter forbids, from outside, with ptrace
//! (shared by `broker.rs` and `broker_supervise.rs`). The kernel then applies the worker's real
//! filter exactly as for a call the worker's own code made.

use std::time::{Duration, Instant};

/// x86_64 `socket` — not in keyd's seccomp allowlist (keyd never creates a socket: it is
/// handed its listener), and harmless should it ever be allowed (an AF_INET socket the
/// worker's Landlock rules forbid to use anyway).
#[cfg(target_arch = "x86_64")]
pub const FORBIDDEN: (u64, &str) = (41, "socket");

/// Makes thread `tid` execute `syscall(nr, a0, a1, a2)` with ptrace (x86_64): seize, interrupt,
/// and — if the thread is stopped right after a `syscall` instruction, as an idle server
/// thread is (in epoll_wait/futex) — point it back at that instruction with new registers
/// (orig_rax = -1 disables the kernel's syscall-restart fix-up), then detach. `Ok(false)`: not
/// stopped at a syscall instruction this time (nothing changed; try again).
#[cfg(target_arch = "x86_64")]
fn inject_syscall(tid: i32, nr: u64, args: [u64; 3]) -> Result<bool, String> {
    use std::io::Error;
    let null = std::ptr::null_mut::<libc::c_void>();
    // SAFETY: raw ptrace calls on a thread this test started (through the broker); the
    // register buffer is a properly sized, initialised user_regs_struct.
    unsafe {
        if libc::ptrace(libc::PTRACE_SEIZE, tid, null, null) != 0 {
            return Err(format!("PTRACE_SEIZE {tid}: {}", Error::last_os_error()));
        }
        if libc::ptrace(libc::PTRACE_INTERRUPT, tid, null, null) != 0 {
            let e = Error::last_os_error();
            libc::ptrace(libc::PTRACE_DETACH, tid, null, null);
            return Err(format!("PTRACE_INTERRUPT {tid}: {e}"));
        }
        let mut status = 0;
        loop {
            let r = libc::waitpid(tid, &mut status, libc::__WALL);
            if r == tid {
                break;
            }
            let e = Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(format!("waitpid {tid}: {e}"));
            }
        }
        if !libc::WIFSTOPPED(status) {
            return Err(format!("thread {tid} did not stop (status {status:#x})"));
        }
        // A signal-delivery stop came first: hand the signal back and try again later.
        if status >> 16 != libc::PTRACE_EVENT_STOP {
            libc::ptrace(libc::PTRACE_DETACH, tid, null, libc::WSTOPSIG(status) as usize as *mut libc::c_void);
            return Ok(false);
        }
        let mut regs: libc::user_regs_struct = std::mem::zeroed();
        if libc::ptrace(libc::PTRACE_GETREGS, tid, null, &mut regs as *mut _ as *mut libc::c_void) != 0 {
            let e = Error::last_os_error();
            libc::ptrace(libc::PTRACE_DETACH, tid, null, null);
            return Err(format!("PTRACE_GETREGS: {e}"));
        }
        let at = regs.rip.wrapping_sub(2);
        *libc::__errno_location() = 0;
        let word = libc::ptrace(libc::PTRACE_PEEKTEXT, tid, at as *mut libc::c_void, null);
        if (word == -1 && *libc::__errno_location() != 0) || (word as u64) & 0xffff != 0x050f {
            libc::ptrace(libc::PTRACE_DETACH, tid, null, null);
            return Ok(false);
        }
        regs.rip = at;
        regs.orig_rax = u64::MAX;
        regs.rax = nr;
        (regs.rdi, regs.rsi, regs.rdx) = (args[0], args[1], args[2]);
        if libc::ptrace(libc::PTRACE_SETREGS, tid, null, &mut regs as *mut _ as *mut libc::c_void) != 0 {
            let e = Error::last_os_error();
            libc::ptrace(libc::PTRACE_DETACH, tid, null, null);
            return Err(format!("PTRACE_SETREGS: {e}"));
        }
        if libc::ptrace(libc::PTRACE_DETACH, tid, null, null) != 0 {
            return Err(format!("PTRACE_DETACH: {}", Error::last_os_error()));
        }
    }
    Ok(true)
}

/// Makes the main thread of `worker` run [`FORBIDDEN`] (`socket(AF_INET, SOCK_STREAM, 0)`):
/// retries, within 10 s, until the thread is caught stopped right after a syscall instruction.
#[cfg(target_arch = "x86_64")]
pub fn inject_forbidden_syscall(worker: i32) {
    let (nr, _) = FORBIDDEN;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match inject_syscall(worker, nr, [libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0]) {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => panic!("could not make the worker {worker} run syscall {nr}: {e}"),
        }
        assert!(Instant::now() < deadline, "the worker's main thread never stopped at a syscall");
        // not at a syscall instruction this time: let it run on and catch it again
        std::thread::sleep(Duration::from_millis(20));
    }
}
