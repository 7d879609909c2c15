//! The actions an escape attempt can try once the worker is locked in: forbidden ones (each
//! must fail with an errno or kill the worker with SIGSYS) and allowed ones (each must succeed:
//! the sandbox is not just killing everything). Arguments (paths, ports, pids) come from the
//! attempt's `arg`. The same functions run unsandboxed, as the service user, for the escape
//! suite's control runs (`aziot-escape-control` in aziot-tests).

use std::ffi::CString;
use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;

use super::EscapeAttempt;

/// What an attempt may use: the state directory, a listener, its argument.
#[derive(Debug)]
pub struct Ctx {
    /// The state directory (the one handed over), when the service has one.
    pub state: Option<OwnedFd>,
    pub listener: Option<OwnedFd>,
    pub arg: Option<String>,
}

impl Ctx {
    /// Opens `dir` (O_DIRECTORY, by path): the control runs' state directory.
    pub fn open_dir(dir: &Path) -> Result<OwnedFd, String> {
        use std::os::fd::FromRawFd;
        let fd = nix::fcntl::open(
            dir,
            nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| format!("open the state dir {}: {e}", dir.display()))?;
        // SAFETY: a descriptor open() just returned to us.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn state(&self) -> Result<BorrowedFd<'_>, String> {
        self.state.as_ref().map(|s| s.as_fd()).ok_or_else(|| "this attempt needs the state directory".to_owned())
    }

    fn arg(&self) -> Result<&str, String> {
        self.arg.as_deref().ok_or_else(|| "this attempt needs an argument".to_owned())
    }

    fn arg_c(&self) -> Result<CString, String> {
        CString::new(self.arg()?).map_err(|e| e.to_string())
    }

    fn arg_num<T: std::str::FromStr>(&self) -> Result<T, String> {
        self.arg()?.parse().map_err(|_| format!("argument {:?} is not a number", self.arg))
    }
}

/// Runs `attempt` in the locked-in worker; `handed` are descriptors it still holds, by name
/// (`state`: the handed-over state directory, `listener`).
pub(super) fn run_in_worker(attempt: &EscapeAttempt, handed: &[(&str, BorrowedFd<'_>)]) -> Result<Outcome, String> {
    let dup = |name: &str| -> Result<Option<OwnedFd>, String> {
        match handed.iter().find(|(n, _)| *n == name) {
            Some((_, fd)) => fd.try_clone_to_owned().map(Some).map_err(|e| format!("dup {name}: {e}")),
            None => Ok(None),
        }
    };
    let ctx = Ctx { state: dup("state")?, listener: dup("listener")?, arg: attempt.arg.clone() };
    run(&attempt.name, &ctx)
}

#[derive(Debug)]
pub enum Outcome {
    Ok,
    Errno(i32),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok => f.write_str("ok"),
            Outcome::Errno(n) => write!(f, "errno={n} ({})", nix::errno::Errno::from_raw(*n).desc()),
        }
    }
}

fn last_errno() -> Outcome {
    Outcome::Errno(io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

/// A raw syscall's return value as an outcome.
fn rc<T: Into<i64>>(r: T) -> Outcome {
    if r.into() < 0 {
        last_errno()
    } else {
        Outcome::Ok
    }
}

fn io_outcome<T>(r: io::Result<T>) -> Outcome {
    match r {
        Ok(_) => Outcome::Ok,
        Err(e) => Outcome::Errno(e.raw_os_error().unwrap_or(0)),
    }
}

type Attempt = fn(&Ctx) -> Result<Outcome, String>;

const ATTEMPTS: &[(&str, Attempt)] = &[
    // ---- files (Landlock) ----
    ("read-path", |c| Ok(io_outcome(std::fs::read(c.arg()?)))),
    ("write-path", |c| Ok(io_outcome(std::fs::write(c.arg()?, b"escaped")))),
    ("open-path", |c| Ok(io_outcome(std::fs::File::open(c.arg()?)))),
    ("mkdir-path", |c| {
        let p = c.arg_c()?;
        // mkdirat (in the allowlist, as keyd uses it) so that Landlock is what decides.
        // SAFETY: a valid NUL-terminated path.
        Ok(rc(unsafe { libc::mkdirat(libc::AT_FDCWD, p.as_ptr(), 0o700) }))
    }),
    ("list-dir", |c| Ok(io_outcome(std::fs::read_dir(c.arg()?)))),
    ("write-proc-self-mem", |_| Ok(io_outcome(std::fs::OpenOptions::new().read(true).write(true).open("/proc/self/mem")))),
    ("move-state-file-out", move_out),
    // ---- files (seccomp: syscalls the allowlist lacks) ----
    ("symlink", |c| {
        let target = CString::new("/etc/passwd").expect("no NUL");
        let link = c.arg_c()?;
        // SAFETY: two valid NUL-terminated strings.
        Ok(rc(unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) }))
    }),
    ("chmod-path", |c| {
        let p = c.arg_c()?;
        // SAFETY: a valid NUL-terminated path.
        Ok(rc(unsafe { libc::chmod(p.as_ptr(), 0o777) }))
    }),
    ("truncate-path", |c| {
        let p = c.arg_c()?;
        // SAFETY: a valid NUL-terminated path.
        Ok(rc(unsafe { libc::truncate(p.as_ptr(), 0) }))
    }),
    ("hardlink-into-state", |c| {
        let p = c.arg_c()?;
        let name = CString::new("stolen").expect("no NUL");
        // SAFETY: valid paths and descriptors.
        Ok(rc(unsafe { libc::linkat(libc::AT_FDCWD, p.as_ptr(), c.state()?.as_raw_fd(), name.as_ptr(), 0) }))
    }),
    // ---- processes ----
    ("exec-setuid", |c| {
        // A set-user-ID-root program (the suite plants a copy of id(1)): `<arg> -u` prints the
        // effective uid it got.
        let (prog, dash_u) = (c.arg_c()?, CString::new("-u").expect("x"));
        let argv = [prog.as_ptr(), dash_u.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // SAFETY: NULL-terminated argv/envp of valid strings; returns only on failure.
        unsafe { libc::execve(prog.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        Ok(last_errno())
    }),
    ("exec-sh", |_| {
        let (sh, dash_c, cmd) = (CString::new("/bin/sh").expect("x"), CString::new("-c").expect("x"), CString::new("echo 'outcome: ok'").expect("x"));
        let argv = [sh.as_ptr(), dash_c.as_ptr(), cmd.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // SAFETY: NULL-terminated argv/envp of valid strings; returns only on failure.
        unsafe { libc::execve(sh.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        Ok(last_errno())
    }),
    ("fork", |_| {
        // SAFETY: the child only calls _exit.
        match unsafe { libc::fork() } {
            -1 => Ok(last_errno()),
            0 => {
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(0) }
            }
            pid => {
                let mut status = 0;
                // SAFETY: waits for our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                Ok(Outcome::Ok)
            }
        }
    }),
    ("clone3-process", |_| {
        #[repr(C)]
        #[derive(Default)]
        struct CloneArgs {
            flags: u64,
            pidfd: u64,
            child_tid: u64,
            parent_tid: u64,
            exit_signal: u64,
            stack: u64,
            stack_size: u64,
            tls: u64,
        }
        let args = CloneArgs { exit_signal: libc::SIGCHLD as u64, ..CloneArgs::default() };
        // SAFETY: a fork-like clone3 (no CLONE_VM); the child only calls _exit.
        let pid = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) };
        match pid {
            -1 => Ok(last_errno()),
            0 => {
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(0) }
            }
            pid => {
                let mut status = 0;
                // SAFETY: waits for our own child.
                unsafe { libc::waitpid(pid as i32, &mut status, 0) };
                Ok(Outcome::Ok)
            }
        }
    }),
    ("ptrace-traceme", |_| {
        // SAFETY: PTRACE_TRACEME takes no pointers.
        Ok(rc(unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) }))
    }),
    ("ptrace-attach", |c| {
        let pid: i32 = c.arg_num()?;
        // SAFETY: PTRACE_ATTACH takes a pid, no pointers.
        let r = unsafe { libc::ptrace(libc::PTRACE_ATTACH, pid, 0, 0) };
        if r == 0 {
            let mut status = 0;
            // SAFETY: wait for the attach stop of our tracee, then detach it (it runs on).
            unsafe {
                libc::waitpid(pid, &mut status, libc::__WALL);
                libc::ptrace(libc::PTRACE_DETACH, pid, 0, 0);
            }
        }
        Ok(rc(r))
    }),
    ("process-vm-readv", |c| {
        let pid: i32 = c.arg_num()?;
        let mut buf = [0u8; 8];
        let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        // Any address: the attempt is denied before the kernel looks at it (or fails EFAULT).
        let remote = libc::iovec { iov_base: 0x1000 as *mut libc::c_void, iov_len: 8 };
        // SAFETY: `local` points at our buffer; `remote` is only read by the kernel.
        Ok(rc(unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) } as i64))
    }),
    ("kill-parent", |_| {
        // SAFETY: kill takes integers.
        Ok(rc(unsafe { libc::kill(libc::getppid(), libc::SIGTERM) }))
    }),
    ("kill-pid", |c| {
        let pid: i32 = c.arg_num()?;
        // SAFETY: signal 0 only checks permission.
        Ok(rc(unsafe { libc::kill(pid, 0) }))
    }),
    ("tgkill-pid", |c| {
        let pid: i32 = c.arg_num()?;
        // SAFETY: signal 0 only checks permission.
        Ok(rc(unsafe { libc::syscall(libc::SYS_tgkill, pid, pid, 0) }))
    }),
    // ---- credentials and capabilities ----
    ("setuid-0", |_| {
        // SAFETY: a raw syscall with an integer argument.
        Ok(rc(unsafe { libc::syscall(libc::SYS_setuid, 0) }))
    }),
    ("setgid-0", |_| {
        // SAFETY: a raw syscall with an integer argument.
        Ok(rc(unsafe { libc::syscall(libc::SYS_setgid, 0) }))
    }),
    ("setgroups-0", |_| {
        let groups = [0u32];
        // SAFETY: one gid in a live array.
        Ok(rc(unsafe { libc::syscall(libc::SYS_setgroups, 1, groups.as_ptr()) }))
    }),
    ("capset-sys-admin", |_| {
        let header = [0x2008_0522u32, 0];
        let bit = 1u32 << 21 /* CAP_SYS_ADMIN */;
        let data = [bit, bit, 0, 0, 0, 0];
        // SAFETY: capset(version 3) reads a header and two cap_user_data (3 u32 each).
        Ok(rc(unsafe { libc::syscall(libc::SYS_capset, header.as_ptr(), data.as_ptr()) }))
    }),
    ("ambient-raise", |_| {
        // SAFETY: integer arguments only.
        Ok(rc(unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, 12 /* CAP_NET_ADMIN */, 0, 0) }))
    }),
    ("clear-pdeathsig", |_| {
        // SAFETY: integer arguments only.
        Ok(rc(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0, 0, 0, 0) }))
    }),
    ("raise-rlimit-core", |_| {
        let lim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
        // SAFETY: reads one rlimit.
        Ok(rc(unsafe { libc::setrlimit(libc::RLIMIT_CORE, &lim) }))
    }),
    // ---- network ----
    ("socket-tcp", |_| Ok(raw_socket(libc::AF_INET, libc::SOCK_STREAM, 0))),
    ("socket-udp", |_| Ok(raw_socket(libc::AF_INET, libc::SOCK_DGRAM, 0))),
    ("socket-netlink", |_| Ok(raw_socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE))),
    ("socket-packet", |_| Ok(raw_socket(libc::AF_PACKET, libc::SOCK_RAW, 0))),
    ("getaddrinfo-several", |c| getaddrinfo_several(c.arg()?)),
    ("connect-tcp", |c| Ok(io_outcome(std::net::TcpStream::connect(("127.0.0.1", c.arg_num::<u16>()?))))),
    ("connect-unix", |c| Ok(io_outcome(std::os::unix::net::UnixStream::connect(c.arg()?)))),
    ("connect-abstract", |c| {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(c.arg()?.as_bytes()).map_err(|e| e.to_string())?;
        Ok(io_outcome(std::os::unix::net::UnixStream::connect_addr(&addr)))
    }),
    // ---- the kernel ----
    ("mount-tmpfs", |_| {
        let (src, dst, fs) = (CString::new("none").expect("x"), CString::new("/tmp").expect("x"), CString::new("tmpfs").expect("x"));
        // SAFETY: valid strings, no data.
        Ok(rc(unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) }))
    }),
    ("unshare-user", |_| {
        // SAFETY: integer arguments only.
        Ok(rc(unsafe { libc::unshare(libc::CLONE_NEWUSER) }))
    }),
    ("setns-net", |_| {
        // SAFETY: integer arguments only.
        Ok(rc(unsafe { libc::setns(0, libc::CLONE_NEWNET) }))
    }),
    ("chroot", |_| {
        let p = CString::new("/tmp").expect("x");
        // SAFETY: a valid path.
        Ok(rc(unsafe { libc::chroot(p.as_ptr()) }))
    }),
    ("personality-exec", |_| {
        // SAFETY: an integer argument (READ_IMPLIES_EXEC).
        Ok(rc(unsafe { libc::personality(0x0040_0000) }))
    }),
    ("bpf-map-create", |_| {
        let attr = [0u8; 128];
        // SAFETY: a zeroed attr buffer of the size given.
        Ok(rc(unsafe { libc::syscall(libc::SYS_bpf, 0 /* BPF_MAP_CREATE */, attr.as_ptr(), attr.len()) }))
    }),
    ("keyctl-add-key", |_| {
        let (t, d) = (CString::new("user").expect("x"), CString::new("aziot-escape").expect("x"));
        // SAFETY: valid strings and a 7-byte payload.
        Ok(rc(unsafe { libc::syscall(libc::SYS_add_key, t.as_ptr(), d.as_ptr(), b"payload".as_ptr(), 7, -2 /* process keyring */) }))
    }),
    ("init-module", |_| {
        let params = CString::new("").expect("x");
        // SAFETY: an empty module image and valid params.
        Ok(rc(unsafe { libc::syscall(libc::SYS_init_module, std::ptr::null::<u8>(), 0, params.as_ptr()) }))
    }),
    ("reboot-cad-off", |_| {
        // LINUX_REBOOT_CMD_CAD_OFF: harmless even if it were allowed.
        // SAFETY: integer arguments only.
        Ok(rc(unsafe { libc::syscall(libc::SYS_reboot, 0xfee1_deadu32, 672_274_793, 0, 0) }))
    }),
    ("io-uring-setup", |_| {
        let params = [0u8; 120];
        // SAFETY: a zeroed io_uring_params of the kernel's size.
        Ok(rc(unsafe { libc::syscall(libc::SYS_io_uring_setup, 1, params.as_ptr()) }))
    }),
    ("memfd-create", |_| {
        let name = CString::new("x").expect("x");
        // SAFETY: a valid name.
        Ok(rc(unsafe { libc::memfd_create(name.as_ptr(), 0) }))
    }),
    ("ioctl-tiocsti", |_| {
        let ch = b'x';
        // SAFETY: TIOCSTI reads one byte.
        Ok(rc(unsafe { libc::ioctl(0, libc::TIOCSTI, &ch) }))
    }),
    // ---- memory ----
    ("mmap-exec", |_| {
        // SAFETY: an anonymous mapping; unmapped if it succeeds.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ | libc::PROT_EXEC, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        if p == libc::MAP_FAILED {
            return Ok(last_errno());
        }
        // SAFETY: the mapping we just made.
        unsafe { libc::munmap(p, 4096) };
        Ok(Outcome::Ok)
    }),
    ("mprotect-exec", |_| {
        // SAFETY: an anonymous read-write mapping (allowed), then an attempt to make it executable.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        if p == libc::MAP_FAILED {
            return Err(format!("mmap read-write failed: {}", io::Error::last_os_error()));
        }
        // SAFETY: our own mapping.
        Ok(rc(unsafe { libc::mprotect(p, 4096, libc::PROT_READ | libc::PROT_EXEC) }))
    }),
    // ---- allowed: must succeed ----
    ("state-write-read", state_write_read),
    ("state-mkdir-list", state_mkdir_list),
    ("thread", |_| Ok(io_outcome(std::thread::spawn(|| 42).join().map_err(|_| io::Error::other("panicked"))))),
    ("openssl-keygen", openssl_keygen),
    ("tokio-echo", tokio_echo),
    ("tls-client", tls_client),
    // Stays alive, locked in, for `arg` milliseconds (epoll_wait on an empty set, what a runtime
    // does): the mount namespace suite inspects the live worker from outside meanwhile.
    ("linger", |c| {
        let ms: i32 = c.arg_num()?;
        // SAFETY: an integer argument; the descriptor is closed below.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Ok(last_errno());
        }
        let mut ev = [libc::epoll_event { events: 0, u64: 0 }];
        // A ptrace stop (the audit reading the filters) interrupts the wait: wait out the rest.
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(ms.max(0) as u64);
        let mut r = 0;
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()).filter(|l| !l.is_zero()) {
            // SAFETY: one live epoll_event to fill; an empty set, so it returns after the timeout.
            r = unsafe { libc::epoll_wait(ep, ev.as_mut_ptr(), 1, left.as_millis().max(1) as i32) };
            if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
        // SAFETY: our own descriptor.
        unsafe { libc::close(ep) };
        Ok(rc(r.max(0)))
    }),
];

pub fn names() -> impl Iterator<Item = &'static str> {
    ATTEMPTS.iter().map(|(n, _)| *n)
}

pub fn run(name: &str, ctx: &Ctx) -> Result<Outcome, String> {
    let (_, f) = ATTEMPTS.iter().find(|(n, _)| *n == name).ok_or_else(|| format!("unknown attempt {name:?}"))?;
    f(ctx)
}

/// getaddrinfo with no socket type: one result per type (stream, datagram, raw), so glibc sorts
/// them and asks the kernel for the host's addresses over netlink first (`__check_pf`).
fn getaddrinfo_several(host: &str) -> Result<Outcome, String> {
    let name = std::ffi::CString::new(host).map_err(|e| e.to_string())?;
    // SAFETY: a zeroed addrinfo is a valid "no hints" value.
    let mut hints: libc::addrinfo = unsafe { std::mem::zeroed() };
    hints.ai_family = libc::AF_UNSPEC;
    let mut res: *mut libc::addrinfo = std::ptr::null_mut();
    // SAFETY: valid C string, hints and out pointer; the list is freed below.
    let rc = unsafe { libc::getaddrinfo(name.as_ptr(), std::ptr::null(), &hints, &mut res) };
    if rc != 0 {
        return Err(format!("getaddrinfo({host}) failed: {rc}"));
    }
    let mut n = 0;
    let mut p = res;
    while !p.is_null() {
        n += 1;
        // SAFETY: p is a node of the list getaddrinfo returned.
        p = unsafe { (*p).ai_next };
    }
    // SAFETY: the list getaddrinfo returned, freed once.
    unsafe { libc::freeaddrinfo(res) };
    if n < 2 {
        return Err(format!("getaddrinfo({host}) gave {n} result(s); the attempt needs several"));
    }
    Ok(Outcome::Ok)
}

fn raw_socket(domain: i32, ty: i32, proto: i32) -> Outcome {
    // SAFETY: socket takes integers; the descriptor is closed right away.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return last_errno();
    }
    // SAFETY: our own new descriptor.
    unsafe { libc::close(fd) };
    Outcome::Ok
}

/// Create a file in the state dir (allowed), then rename it to the argument's path outside (denied).
fn move_out(c: &Ctx) -> Result<Outcome, String> {
    let name = CString::new("move-me").expect("x");
    let dest = c.arg_c()?;
    // SAFETY: openat beneath the state fd with a valid name.
    let fd = unsafe { libc::openat(c.state()?.as_raw_fd(), name.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o600) };
    if fd < 0 {
        return Err(format!("creating the file in the state dir failed: {}", io::Error::last_os_error()));
    }
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    // SAFETY: valid descriptors and paths.
    Ok(rc(unsafe { libc::renameat(c.state()?.as_raw_fd(), name.as_ptr(), libc::AT_FDCWD, dest.as_ptr()) }))
}

fn state_file(c: &Ctx, name: &str, flags: i32) -> io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    let name = CString::new(name).map_err(io::Error::other)?;
    let dir = c.state().map_err(io::Error::other)?.as_raw_fd();
    // SAFETY: openat beneath the state fd with a valid name.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, 0o600) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor we own.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

/// The keyd write path: temp file, write, fsync, rename over, read back, delete.
fn state_write_read(c: &Ctx) -> Result<Outcome, String> {
    let step = |what: &str, e: io::Error| format!("{what}: {e}");
    let mut f = state_file(c, "probe.tmp", libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC).map_err(|e| step("create", e))?;
    f.write_all(b"key material").map_err(|e| step("write", e))?;
    f.sync_all().map_err(|e| step("fsync", e))?;
    drop(f);
    let (from, to) = (CString::new("probe.tmp").expect("x"), CString::new("probe.key").expect("x"));
    let fd = c.state()?.as_raw_fd();
    // SAFETY: valid descriptors and names.
    if unsafe { libc::renameat(fd, from.as_ptr(), fd, to.as_ptr()) } != 0 {
        return Err(step("rename", io::Error::last_os_error()));
    }
    let mut back = String::new();
    // Plain read(2)s: read_to_string would size its buffer with statx, which a worker's store
    // code need not use.
    state_file(c, "probe.key", libc::O_RDONLY)
        .and_then(|mut f| {
            let mut buf = [0u8; 64];
            loop {
                match f.read(&mut buf)? {
                    0 => return Ok(()),
                    n => back.push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
        })
        .map_err(|e| step("read back", e))?;
    if back != "key material" {
        return Err(format!("read back {back:?}"));
    }
    // SAFETY: valid descriptor and name.
    if unsafe { libc::unlinkat(fd, to.as_ptr(), 0) } != 0 {
        return Err(step("unlink", io::Error::last_os_error()));
    }
    Ok(Outcome::Ok)
}

/// mkdirat + listing the state dir through a descriptor (nix::dir, as aziot_keys does). The
/// directory stays: keyd's policy has no remove-dir right.
fn state_mkdir_list(c: &Ctx) -> Result<Outcome, String> {
    let name = format!("probe-dir-{}", std::process::id());
    let sub = CString::new(name.as_str()).expect("x");
    let fd = c.state()?.as_raw_fd();
    // SAFETY: valid descriptor and name.
    if unsafe { libc::mkdirat(fd, sub.as_ptr(), 0o700) } != 0 {
        return Err(format!("mkdirat: {}", io::Error::last_os_error()));
    }
    let mut dir = nix::dir::Dir::openat(Some(fd), ".", nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY, nix::sys::stat::Mode::empty())
        .map_err(|e| format!("open the state dir: {e}"))?;
    let names: Vec<String> =
        dir.iter().filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    if !names.contains(&name) {
        return Err(format!("{name} not listed: {names:?}"));
    }
    Ok(Outcome::Ok)
}

/// EC P-256 and RSA-2048 key generation and signatures, as keyd does (OpenSSL's DRBG, getpid).
fn openssl_keygen(_: &Ctx) -> Result<Outcome, String> {
    use openssl::{ec, hash::MessageDigest, nid::Nid, pkey::PKey, rsa::Rsa, sign::Signer};
    let e = |e: openssl::error::ErrorStack| e.to_string();
    let group = ec::EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).map_err(e)?;
    let keys = [
        PKey::from_ec_key(ec::EcKey::generate(&group).map_err(e)?).map_err(e)?,
        PKey::from_rsa(Rsa::generate(2048).map_err(e)?).map_err(e)?,
    ];
    for key in &keys {
        let mut signer = Signer::new(MessageDigest::sha256(), key).map_err(e)?;
        signer.update(b"hello").map_err(e)?;
        if signer.sign_to_vec().map_err(e)?.is_empty() {
            return Err("empty signature".into());
        }
    }
    Ok(Outcome::Ok)
}

/// A multi-threaded tokio runtime serving one echo on the handed-over listener: the
/// runtime's own syscalls (threads, epoll, eventfd, accept4, SO_PEERCRED, timers, blocking pool)
/// under the worker's real filter.
fn tokio_echo(c: &Ctx) -> Result<Outcome, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fd = c.listener.as_ref().ok_or("tokio-echo needs the listener")?.try_clone().map_err(|e| e.to_string())?;
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async move {
        let listener = tokio::net::UnixListener::from_std(listener).map_err(|e| e.to_string())?;
        let accept = tokio::time::timeout(std::time::Duration::from_secs(20), listener.accept());
        let (mut stream, _) = accept.await.map_err(|_| "no client within 20 s".to_owned())?.map_err(|e| e.to_string())?;
        let uid = stream.peer_cred().map_err(|e| e.to_string())?.uid();
        let mut buf = vec![0u8; 64];
        let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
        let blocking = tokio::task::spawn_blocking(move || n).await.map_err(|e| e.to_string())?;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        stream.write_all(&buf[..blocking]).await.map_err(|e| e.to_string())?;
        stream.write_all(format!(" uid={uid}\n").as_bytes()).await.map_err(|e| e.to_string())?;
        stream.shutdown().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    })?;
    Ok(Outcome::Ok)
}

/// The OpenSSL engine's in-process twin as a worker uses it (issue 11): a key pair held by keyd
/// as the client key of a mutual-TLS handshake. `arg` = `<keyd socket>|<TCP port on 127.0.0.1>`;
/// the key handle, the CA and the client certificate are read from the state directory
/// (`tls-client.handle`, `tls-client.ca.pem`, `tls-client.cert.pem`). Sends one line and closes.
/// `preload` runs here, after lock-in: what it creates needs no more than the locked-in worker has.
fn tls_client(c: &Ctx) -> Result<Outcome, String> {
    use openssl::ssl::{Ssl, SslContext, SslMethod, SslVerifyMode};
    use openssl::x509::X509;
    let (socket, port) = c.arg()?.split_once('|').ok_or("tls-client needs <keyd socket>|<port>")?;
    let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    // plain read(2) loop: File::read_to_end would statx for a size hint (not in certd's filter)
    let read = |name: &str| -> Result<Vec<u8>, String> {
        let mut f = state_file(c, name, libc::O_RDONLY).map_err(|e| format!("open {name}: {e}"))?;
        let (mut v, mut buf) = (Vec::new(), [0u8; 4096]);
        loop {
            match f.read(&mut buf).map_err(|e| format!("read {name}: {e}"))? {
                0 => return Ok(v),
                n => v.extend_from_slice(&buf[..n]),
            }
        }
    };
    let handle = String::from_utf8(read("tls-client.handle")?).map_err(|e| e.to_string())?;
    let e = |e: openssl::error::ErrorStack| e.to_string();
    aziot_key_openssl_engine::preload().map_err(|e| format!("preload: {e}"))?;
    let keyd = std::sync::Arc::new(aziot_key_openssl_engine::KeydClient::new(socket));
    let key = aziot_key_openssl_engine::load_private_key(&keyd, handle.trim()).map_err(|e| format!("load the keyd key: {e}"))?;
    // A context with only the test CA: SslConnector::builder would also add OpenSSL's default
    // verify paths, whose directory store lists /etc/ssl/certs (getdents64, not in certd's filter).
    let mut b = SslContext::builder(SslMethod::tls_client()).map_err(e)?;
    b.cert_store_mut().add_cert(X509::from_pem(&read("tls-client.ca.pem")?).map_err(e)?).map_err(e)?;
    let cert = X509::from_pem(&read("tls-client.cert.pem")?).map_err(e)?;
    b.set_certificate(&cert).map_err(e)?;
    b.set_private_key(&key).map_err(e)?;
    b.set_verify(SslVerifyMode::PEER);
    b.verify_param_mut().set_ip(std::net::IpAddr::from([127, 0, 0, 1])).map_err(e)?;
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    let mut tls = Ssl::new(&b.build()).map_err(e)?.connect(tcp).map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(b"hello from the confined worker\n").map_err(|e| format!("write: {e}"))?;
    // close_notify, then read to the server's: closing with its session tickets unread would
    // reset the connection and could discard the line before the server reads it.
    let _ = tls.shutdown();
    tls.get_ref().set_read_timeout(Some(std::time::Duration::from_secs(10))).map_err(|e| format!("timeout: {e}"))?;
    let _ = tls.read_to_end(&mut Vec::new());
    Ok(Outcome::Ok)
}
