//! Finds the syscall that got a worker killed, from the kernel's seccomp audit record
//! (`type=1326 ... pid=<pid> ... syscall=<nr>`) in /dev/kmsg. Best effort: the record may be
//! rate-limited or the log unreadable.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;

pub fn seccomp_syscall(pid: i32) -> Option<i64> {
    // The record can arrive a moment after the exit status.
    for _ in 0..10 {
        if let Some(nr) = scan(pid) {
            return Some(nr);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    None
}

fn scan(pid: i32) -> Option<i64> {
    let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open("/dev/kmsg").ok()?;
    let needle = format!(" pid={pid} ");
    let mut found = None;
    let mut buf = vec![0u8; 8192];
    loop {
        // One record per read; EAGAIN at the end, EPIPE when a record was overwritten.
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let rec = String::from_utf8_lossy(&buf[..n]);
                if rec.contains("type=1326") && rec.contains(&needle) {
                    found = rec
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("syscall="))
                        .and_then(|s| s.parse().ok());
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    found
}
