//! How a seccomp violation is reported without the kernel log.
//!
//! In kill mode the allowlist's default action is `SECCOMP_RET_TRAP`: the kernel answers a
//! forbidden syscall with a SIGSYS on the thread that made it, carrying the syscall number and
//! audit architecture in its `siginfo_t`. The worker installs [`on_sigsys`] for it before the
//! filter goes in. The handler, async-signal-safe and allocation-free:
//!
//! 1. formats one small JSON record, `{"seccomp_violation":{"syscall":N,"arch":M}}`, on its
//!    stack and sends it as one SEQPACKET message on the hand-off socket
//!    ([`report_seccomp_violations_to`]), non-blocking and without SIGPIPE;
//! 2. re-issues `rt_sigaction(SIGSYS, NULL, NULL)`, which every allowlist traps (its
//!    `rt_sigaction` rule holds only for `signum != SIGSYS`). SIGSYS is blocked inside its own
//!    handler (no `SA_NODEFER`), so the kernel resets the action to the default and unblocks
//!    it: the process dies *by SIGSYS*, exactly as with `SECCOMP_RET_KILL_PROCESS`
//!    (`force_sig_info_to_task`; checked by `a_violation_is_reported_and_kills_by_sigsys`);
//! 3. should that call ever return, `exit_group(128 + SIGSYS)`.
//!
//! The same allowlist rule keeps a compromised worker from replacing the handler: installing
//! any SIGSYS action is itself a trapped syscall. The broker reads the record after the
//! worker's death and treats it as untrusted data ([`parse_violation`]: strict, integers only).

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use serde::Deserialize;

/// The descriptor the handler reports on (-1: none, the handler only dies).
static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

/// Upper bound of a record's length (the longest is about 60 bytes).
pub const RECORD_MAX: usize = 96;

/// The `AUDIT_ARCH_*` value of the native syscall ABI (what `si_arch` says for this build's
/// own calls): `AUDIT_ARCH_X86_64` / `AUDIT_ARCH_AARCH64` of `<linux/audit.h>`.
#[cfg(target_arch = "x86_64")]
pub const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
pub const AUDIT_ARCH: u32 = 0xc000_00b7;

/// `si_code` of a SIGSYS raised by a seccomp filter (`SYS_SECCOMP` in `<asm-generic/siginfo.h>`).
const SYS_SECCOMP: libc::c_int = 1;

/// Where the SIGSYS handler sends its record: the worker's hand-off socket to the broker. The
/// descriptor must stay open for the life of the process (the worker keeps the hand-off socket
/// until it exits). Call it before [`crate::apply_seccomp`].
pub fn report_seccomp_violations_to(fd: RawFd) {
    REPORT_FD.store(fd, Ordering::SeqCst);
}

/// Installs [`on_sigsys`] for SIGSYS (`SA_SIGINFO`; SIGSYS stays blocked while it runs).
pub(crate) fn install_handler() -> std::io::Result<()> {
    // SAFETY: `action` is a zeroed sigaction filled in before use; sigemptyset initialises
    // its mask; `on_sigsys` has the SA_SIGINFO handler signature and is async-signal-safe.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The SIGSYS handler: report, then die by SIGSYS (module doc). Never returns.
extern "C" fn on_sigsys(_signo: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    let fd = REPORT_FD.load(Ordering::Relaxed);
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; si_syscall and
    // si_arch read the `_sigsys` member of its union, which the kernel fills for SYS_SECCOMP
    // (checked first: a SIGSYS from elsewhere carries no syscall and is not reported).
    let record = unsafe {
        match info.as_ref() {
            Some(si) if si.si_code == SYS_SECCOMP => Some((si.si_syscall(), si.si_arch())),
            _ => None,
        }
    };
    if let (Some((nr, arch)), true) = (record, fd >= 0) {
        let mut buf = [0u8; RECORD_MAX];
        let len = format_record(&mut buf, nr, arch);
        let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: len };
        // SAFETY: a zeroed msghdr pointing at one iovec over `buf`, both alive for the call;
        // sendmsg is async-signal-safe. MSG_DONTWAIT: never block in a dying process;
        // MSG_NOSIGNAL: a closed peer must not turn this into a death by SIGPIPE.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL);
        }
    }
    // SAFETY: raw syscalls with no memory arguments (NULL act/oldact): rt_sigaction(SIGSYS)
    // is trapped by the filter while SIGSYS is blocked here, so the kernel kills the process
    // with SIGSYS; exit_group is the fallback should it return.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigaction,
            libc::SIGSYS,
            std::ptr::null::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
            std::mem::size_of::<libc::c_ulong>(),
        );
        libc::syscall(libc::SYS_exit_group, 128 + libc::SIGSYS);
    }
}

/// Writes `{"seccomp_violation":{"syscall":<nr>,"arch":<arch>}}` into `buf`; its length.
/// No allocation, no panic (the buffer is large enough for any i32 and u32).
fn format_record(buf: &mut [u8; RECORD_MAX], nr: i32, arch: u32) -> usize {
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        for &b in bytes {
            if len < RECORD_MAX {
                buf[len] = b;
                len += 1;
            }
        }
    };
    put(b"{\"seccomp_violation\":{\"syscall\":");
    if nr < 0 {
        put(b"-");
    }
    let mut digits = [0u8; 20];
    put(decimal(&mut digits, u64::from(nr.unsigned_abs())));
    put(b",\"arch\":");
    put(decimal(&mut digits, u64::from(arch)));
    put(b"}}");
    len
}

/// `v` in decimal, in the tail of `digits`.
fn decimal(digits: &mut [u8; 20], mut v: u64) -> &[u8] {
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &digits[i..]
}

/// What a worker's SIGSYS handler reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeccompViolation {
    /// The syscall number (of the worker's architecture).
    pub syscall: i32,
    /// The `AUDIT_ARCH_*` value of the call.
    pub arch: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    seccomp_violation: SeccompViolation,
}

/// Parses one message from a worker as a violation record: untrusted input, so strictly — at
/// most [`RECORD_MAX`] bytes, exactly the record's shape, integers in range; anything else is
/// `None` (a sandbox report or garbage).
pub fn parse_violation(bytes: &[u8]) -> Option<SeccompViolation> {
    if bytes.len() > RECORD_MAX {
        return None;
    }
    serde_json::from_slice::<Record>(bytes).ok().map(|r| r.seccomp_violation)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(nr: i32, arch: u32) -> Vec<u8> {
        let mut buf = [0u8; RECORD_MAX];
        let n = format_record(&mut buf, nr, arch);
        buf[..n].to_vec()
    }

    #[test]
    fn records_round_trip() {
        for (nr, arch) in [(0, 0), (41, 0xc000_003e), (i32::MAX, u32::MAX), (-1, 183), (i32::MIN, 1)] {
            let bytes = record(nr, arch);
            assert!(bytes.len() < RECORD_MAX, "{}", String::from_utf8_lossy(&bytes));
            assert_eq!(
                parse_violation(&bytes),
                Some(SeccompViolation { syscall: nr, arch }),
                "{}",
                String::from_utf8_lossy(&bytes)
            );
        }
        assert_eq!(record(41, 3_221_225_534), br#"{"seccomp_violation":{"syscall":41,"arch":3221225534}}"#);
    }

    #[test]
    fn parsing_is_strict() {
        for bad in [
            &br#"{"ok":true,"error":null}"#[..],
            br#"{"seccomp_violation":{"syscall":41}}"#,
            br#"{"seccomp_violation":{"syscall":41,"arch":1,"path":"/etc/shadow"}}"#,
            br#"{"seccomp_violation":{"syscall":"41","arch":1}}"#,
            br#"{"seccomp_violation":{"syscall":41.5,"arch":1}}"#,
            br#"{"seccomp_violation":{"syscall":4294967296,"arch":1}}"#,
            br#"{"seccomp_violation":{"syscall":41,"arch":-1}}"#,
            br#"{"seccomp_violation":{"syscall":41,"arch":1},"x":1}"#,
            b"",
            b"\xff\xfe",
        ] {
            assert_eq!(parse_violation(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        let mut long = br#"{"seccomp_violation":{"syscall":41,"arch":1}}"#.to_vec();
        long.splice(1..1, std::iter::repeat(b' ').take(RECORD_MAX));
        assert_eq!(parse_violation(&long), None, "longer than a record");
    }

    /// The whole path in a forked child under keyd's real kill-mode program: handler installed,
    /// filter in, a forbidden syscall (socket) → one record on the socket and death by SIGSYS;
    /// then the same for an attempt to replace the SIGSYS handler (rt_sigaction(SIGSYS)).
    #[test]
    fn a_violation_is_reported_and_kills_by_sigsys() {
        for (what, nr) in [("socket", libc::SYS_socket), ("replace the SIGSYS handler", libc::SYS_rt_sigaction)] {
            let (nr_seen, signal) = run_child_violation(nr);
            assert_eq!(signal, Some(libc::SIGSYS), "{what}: the child must die by SIGSYS");
            let v = nr_seen.unwrap_or_else(|| panic!("{what}: no violation record on the socket"));
            assert_eq!(i64::from(v.syscall), nr, "{what}");
            assert_eq!(v.arch, AUDIT_ARCH, "{what}");
        }
    }

    /// Forks a child that installs the handler and keyd's kill-mode programs, then makes
    /// syscall `nr` (socket(AF_INET, SOCK_STREAM) or rt_sigaction(SIGSYS, <handler>)); the
    /// record the parent received and the child's terminating signal.
    fn run_child_violation(nr: i64) -> (Option<SeccompViolation>, Option<i32>) {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        use std::os::fd::AsRawFd;
        let (parent, child) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).expect("socketpair");
        // Everything the child needs is prepared before fork (the child only makes syscalls).
        let programs: Vec<Vec<libc::sock_filter>> =
            crate::seccomp::programs_for_test("keyd").iter().map(|p| crate::seccomp::to_sock_filter(p)).collect();
        let child_fd = child.as_raw_fd();
        // SAFETY: fork in a test; the child only makes async-signal-safe calls (sigaction,
        // prctl, seccomp, the forbidden syscall, _exit) on memory prepared before the fork.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: see above; every pointer is to memory owned by this (child) process.
            unsafe {
                report_seccomp_violations_to(child_fd);
                if install_handler().is_err() || libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    libc::_exit(90);
                }
                for p in &programs {
                    let prog = libc::sock_fprog { len: p.len() as u16, filter: p.as_ptr() as *mut libc::sock_filter };
                    if libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &prog) != 0 {
                        libc::_exit(91);
                    }
                }
                if nr == libc::SYS_socket {
                    libc::syscall(nr, libc::AF_INET, libc::SOCK_STREAM, 0);
                } else {
                    let mut action: libc::sigaction = std::mem::zeroed();
                    action.sa_sigaction = libc::SIG_IGN;
                    libc::syscall(nr, libc::SIGSYS, &action, std::ptr::null_mut::<libc::c_void>(), 8usize);
                }
                libc::_exit(92);
            }
        }
        drop(child);
        let mut status = 0;
        // SAFETY: waiting for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        let signal = libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status));
        assert!(
            signal.is_some() || libc::WEXITSTATUS(status) == 92,
            "child setup failed: exit {}",
            libc::WEXITSTATUS(status)
        );
        let mut buf = [0u8; 512];
        // SAFETY: recv into a local buffer of the given size; non-blocking.
        let n = unsafe { libc::recv(parent.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        let record = (n > 0).then(|| parse_violation(&buf[..n as usize])).flatten();
        (record, signal)
    }
}
