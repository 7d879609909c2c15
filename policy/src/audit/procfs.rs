//! Reading a live process from /proc: per-thread status fields and classified descriptors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The fields of /proc/<pid>/task/<tid>/status the audit compares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TaskStatus {
    pub tid: i32,
    pub ppid: i32,
    /// real, effective, saved, filesystem.
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub groups: Vec<u32>,
    pub cap_inh: u64,
    pub cap_prm: u64,
    pub cap_eff: u64,
    pub cap_bnd: u64,
    pub cap_amb: u64,
    pub no_new_privs: Option<u32>,
    pub seccomp: Option<u32>,
    pub seccomp_filters: Option<u32>,
}

pub(crate) fn parse_status(tid: i32, text: &str) -> TaskStatus {
    let mut s = TaskStatus { tid, ..TaskStatus::default() };
    let nums = |v: &str| v.split_whitespace().filter_map(|x| x.parse().ok()).collect::<Vec<u32>>();
    let hex = |v: &str| u64::from_str_radix(v.trim(), 16).unwrap_or(u64::MAX);
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        match key {
            "PPid" => s.ppid = value.trim().parse().unwrap_or(-1),
            "Uid" => s.uids = nums(value),
            "Gid" => s.gids = nums(value),
            "Groups" => s.groups = nums(value),
            "CapInh" => s.cap_inh = hex(value),
            "CapPrm" => s.cap_prm = hex(value),
            "CapEff" => s.cap_eff = hex(value),
            "CapBnd" => s.cap_bnd = hex(value),
            "CapAmb" => s.cap_amb = hex(value),
            "NoNewPrivs" => s.no_new_privs = value.trim().parse().ok(),
            "Seccomp" => s.seccomp = value.trim().parse().ok(),
            "Seccomp_filters" => s.seccomp_filters = value.trim().parse().ok(),
            _ => {}
        }
    }
    s
}

/// The status of every thread of `pid` (the main thread first).
pub(crate) fn tasks(pid: i32) -> std::io::Result<Vec<TaskStatus>> {
    let mut tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_unstable_by_key(|t| (*t != pid, *t));
    let mut out = Vec::new();
    for tid in tids {
        // A thread may exit between the listing and the read: skip it.
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) {
            out.push(parse_status(tid, &text));
        }
    }
    if out.is_empty() {
        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok(out)
}

/// What a descriptor of the worker is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum FdClass {
    /// /dev/null, a pipe (stdio, runtime wake-ups).
    Stdio(String),
    /// epoll, eventfd, timerfd: the async runtime.
    Runtime(String),
    /// A unix socket; `listening` from /proc/net/unix's flags.
    Unix { listening: bool },
    Tcp,
    Udp,
    /// Any other socket (netlink, raw, packet, unknown inode).
    OtherSocket(String),
    /// Another anonymous inode (io_uring, bpf, userfaultfd, memfd...).
    OtherAnon(String),
    Path(PathBuf),
}

#[derive(Default)]
pub(crate) struct SocketTables {
    unix: HashMap<u64, bool>,
    tcp: Vec<u64>,
    udp: Vec<u64>,
    other: HashMap<u64, &'static str>,
}

/// The socket inodes in `pid`'s network namespace.
pub(crate) fn socket_tables(pid: i32) -> SocketTables {
    let mut t = SocketTables::default();
    let read = |name: &str| std::fs::read_to_string(format!("/proc/{pid}/net/{name}")).unwrap_or_default();
    // /proc/net/unix: Num RefCount Protocol Flags Type St Inode [Path]; flag 0x10000 = listening.
    // A socket is listed in the namespace it was made in: under `PrivateNetwork=yes` (keyd,
    // tpmd) the listener systemd made (socket activation) is in PID 1's namespace, not the
    // worker's (found by the VM suite, tests/vm/guest.sh).
    let pid1 = std::fs::read_to_string("/proc/1/net/unix").unwrap_or_default();
    for line in read("unix").lines().skip(1).chain(pid1.lines().skip(1)) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if let (Some(flags), Some(inode)) = (f.get(3), f.get(6).and_then(|i| i.parse().ok())) {
            let listening = u32::from_str_radix(flags, 16).map(|x| x & 0x10000 != 0).unwrap_or(false);
            t.unix.entry(inode).or_insert(listening);
        }
    }
    // tcp, udp (v4 and v6): the inode is the 10th column.
    let inodes = |text: String| -> Vec<u64> {
        text.lines().skip(1).filter_map(|l| l.split_whitespace().nth(9)?.parse().ok()).collect()
    };
    t.tcp = inodes(read("tcp"));
    t.tcp.extend(inodes(read("tcp6")));
    t.udp = inodes(read("udp"));
    t.udp.extend(inodes(read("udp6")));
    for (name, label) in [("raw", "raw"), ("raw6", "raw"), ("udplite", "udplite"), ("udplite6", "udplite")] {
        for i in inodes(read(name)) {
            t.other.insert(i, label);
        }
    }
    // netlink: sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
    for line in read("netlink").lines().skip(1) {
        if let Some(i) = line.split_whitespace().nth(9).and_then(|i| i.parse().ok()) {
            t.other.insert(i, "netlink");
        }
    }
    // packet: sk RefCnt Type Proto Iface R Rmem User Inode
    for line in read("packet").lines().skip(1) {
        if let Some(i) = line.split_whitespace().nth(8).and_then(|i| i.parse().ok()) {
            t.other.insert(i, "packet");
        }
    }
    t
}

pub(crate) fn classify(link: &str, tables: &SocketTables) -> FdClass {
    if let Some(inode) = link.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')).and_then(|s| s.parse::<u64>().ok()) {
        if let Some(listening) = tables.unix.get(&inode) {
            return FdClass::Unix { listening: *listening };
        }
        if tables.tcp.contains(&inode) {
            return FdClass::Tcp;
        }
        if tables.udp.contains(&inode) {
            return FdClass::Udp;
        }
        return FdClass::OtherSocket(tables.other.get(&inode).copied().unwrap_or("unknown").to_owned());
    }
    if link == "/dev/null" || link.starts_with("pipe:[") {
        return FdClass::Stdio(link.to_owned());
    }
    if let Some(kind) = link.strip_prefix("anon_inode:") {
        return match kind {
            "[eventpoll]" | "[eventfd]" | "[timerfd]" => FdClass::Runtime(kind.to_owned()),
            other => FdClass::OtherAnon(other.to_owned()),
        };
    }
    if link.starts_with('/') && !link.starts_with("/memfd:") {
        return FdClass::Path(PathBuf::from(link.strip_suffix(" (deleted)").unwrap_or(link)));
    }
    FdClass::OtherAnon(link.to_owned())
}

/// `(fd, readlink)` for every descriptor of `pid`.
pub(crate) fn fds(pid: i32) -> std::io::Result<Vec<(i32, String)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        // A descriptor closed since the listing is simply gone.
        if let Ok(target) = std::fs::read_link(entry.path()) {
            out.push((fd, target.to_string_lossy().into_owned()));
        }
    }
    out.sort();
    Ok(out)
}

/// Whether `fd` of `pid` still points at `link` (transient descriptors vanish during an audit).
pub(crate) fn still_open(pid: i32, fd: i32, link: &str) -> bool {
    std::fs::read_link(Path::new(&format!("/proc/{pid}/fd/{fd}"))).is_ok_and(|t| t.to_string_lossy() == link)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_fields() {
        let text = "Name:\taziotd\nPPid:\t12\nUid:\t997\t997\t997\t997\nGid:\t996\t996\t996\t996\nGroups:\t996 995 \n\
                    CapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\n\
                    CapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\nNoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t2\n";
        let s = parse_status(5, text);
        assert_eq!((s.ppid, s.uids.clone(), s.groups.clone()), (12, vec![997; 4], vec![996, 995]));
        assert_eq!((s.cap_bnd, s.no_new_privs, s.seccomp, s.seccomp_filters), (0, Some(1), Some(2), Some(2)));
        let root = parse_status(1, "CapBnd:\t000001ffffffffff\nSeccomp:\t0\n");
        assert_eq!((root.cap_bnd, root.seccomp, root.no_new_privs), (0x1ff_ffff_ffff, Some(0), None));
    }

    #[test]
    fn classifies_descriptors() {
        let mut t = SocketTables::default();
        t.unix.insert(10, true);
        t.unix.insert(11, false);
        t.tcp.push(12);
        t.other.insert(13, "netlink");
        assert_eq!(classify("socket:[10]", &t), FdClass::Unix { listening: true });
        assert_eq!(classify("socket:[11]", &t), FdClass::Unix { listening: false });
        assert_eq!(classify("socket:[12]", &t), FdClass::Tcp);
        assert_eq!(classify("socket:[13]", &t), FdClass::OtherSocket("netlink".into()));
        assert_eq!(classify("socket:[99]", &t), FdClass::OtherSocket("unknown".into()));
        assert_eq!(classify("anon_inode:[eventpoll]", &t), FdClass::Runtime("[eventpoll]".into()));
        assert_eq!(classify("anon_inode:[io_uring]", &t), FdClass::OtherAnon("[io_uring]".into()));
        assert_eq!(classify("/memfd:x (deleted)", &t), FdClass::OtherAnon("/memfd:x (deleted)".into()));
        assert_eq!(classify("/var/lib/aziot/keyd/k (deleted)", &t), FdClass::Path("/var/lib/aziot/keyd/k".into()));
        assert!(matches!(classify("pipe:[5]", &t), FdClass::Stdio(_)));
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id() as i32;
        let tasks = tasks(me).unwrap();
        assert_eq!(tasks[0].tid, me);
        assert!(!tasks[0].uids.is_empty());
        let fds = fds(me).unwrap();
        assert!(fds.iter().any(|(fd, _)| *fd == 0));
    }
}
