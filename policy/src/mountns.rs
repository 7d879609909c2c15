//! The worker's private mount namespace (`[mount_namespace]` of a service's policy): only the
//! pathname unix sockets the worker needs exist beneath the masked directories (`/run`, `/tmp`,
//! `/var/tmp`, `/dev/shm`), so it cannot connect to the D-Bus system bus, a container runtime's
//! socket or anything planted in /tmp — what Landlock ABI 9's `resolve-unix` does, on kernels
//! without it (docs/security.md, "Pathname unix sockets").
//!
//! Two halves, because the broker is single-threaded and the child between fork and exec may
//! only make raw syscalls:
//! - [`prepare`], in the broker before fork (root, CAP_SYS_ADMIN): every path becomes a
//!   `CString`; each granted socket is opened without following links (walked from `/` one
//!   component at a time, the socket itself `O_PATH|O_NOFOLLOW`), checked to be a socket, and
//!   cloned into a detached mount with `open_tree(OPEN_TREE_CLONE)` — in the broker's namespace,
//!   before anything is masked. A missing capability or a kernel without `open_tree` is a
//!   [`MountNsError`] here, before fork, with a clear message (the broker then refuses to start
//!   the worker unless `allow_degraded`).
//! - [`enter_in_child`], in the child before the privilege drop: `unshare(CLONE_NEWNS)`, every
//!   mount private (`MS_REC|MS_PRIVATE` on `/`, nothing propagates back), a fresh tmpfs
//!   (nosuid, nodev, noexec, mode 0755, 64 KiB) over each mask, the sockets' parent directories
//!   recreated inside, each detached socket mount moved (`move_mount`) onto an empty file at the
//!   same path, the tmpfs made read-only, `chdir("/")` (a working directory inside a masked
//!   directory would still reach what the mask hides).
//!
//! The detached clones belong to one spawn: [`Prepared`] is made afresh for every worker.
//!
//! Under systemd the namespace is made for the whole unit instead (`TemporaryFileSystem=`,
//! `PrivateTmp=`, `BindPaths=`), and [`verify_view`] is the broker's check that the namespace it
//! runs in hides what the policy does not grant — and the audit's, through /proc/<pid>/root.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::MountPlan;
use crate::trusted::TrustError;

/// `open_tree(2)` flags (linux/mount.h; not in every libc version).
const OPEN_TREE_CLONE: libc::c_uint = 1;
const OPEN_TREE_CLOEXEC: libc::c_uint = libc::O_CLOEXEC as libc::c_uint;
/// `move_mount(2)`: the source is the descriptor itself.
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x0000_0004;
/// The tmpfs over each masked directory: root's, 0755, tiny (it holds directories and empty
/// mount-point files only), read-only once filled.
const TMPFS_OPTIONS: &str = "mode=0755,size=64k,nr_inodes=1024";
const CAP_SYS_ADMIN: u32 = 21;

#[derive(Debug, thiserror::Error)]
pub enum MountNsError {
    #[error(
        "the worker's private mount namespace needs CAP_SYS_ADMIN in the broker, which it has not got \
         (CapabilityBoundingSet= of the unit, or a test run without it)"
    )]
    NoCapability,
    #[error(
        "this kernel has no open_tree/move_mount (Linux 5.2 or later): the worker's private mount \
         namespace cannot keep {} reachable",
        path.display()
    )]
    NoOpenTree { path: PathBuf },
    #[error("granted socket {}", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: TrustError,
    },
    #[error("granted socket {} is a {found}, not a socket", path.display())]
    NotASocket { path: PathBuf, found: &'static str },
    #[error("masked directory {}", path.display())]
    Mask {
        path: PathBuf,
        #[source]
        source: TrustError,
    },
    #[error("could not clone the mount of granted socket {}", path.display())]
    OpenTree {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} contains a NUL byte", path.display())]
    Nul { path: PathBuf },
    /// The broker cannot make the namespace and the one it runs in (e.g. made by systemd for the
    /// unit) does not hide what it must.
    #[error(
        "{build}; and the mount namespace the broker runs in is not one that hides every socket \
         the policy does not grant: {}",
        problems.join("; ")
    )]
    NotInForce {
        build: Box<MountNsError>,
        problems: Vec<String>,
    },
}

impl MountNsError {
    /// The namespace cannot be made on this system at all (capability, kernel): what
    /// `allow_degraded` may accept. A bad socket or mask is a configuration error, never accepted.
    pub fn is_unsupported(&self) -> bool {
        match self {
            MountNsError::NoCapability | MountNsError::NoOpenTree { .. } => true,
            MountNsError::NotInForce { build, .. } => build.is_unsupported(),
            _ => false,
        }
    }
}

/// Who made the worker's private mount namespace.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MadeBy {
    /// The broker, in the worker's child before the privilege drop ([`enter_in_child`]): the
    /// worker's namespace is its own.
    #[default]
    Broker,
    /// systemd, for the whole unit (`TemporaryFileSystem=`, `PrivateTmp=`, `BindPaths=`), before
    /// the broker started; the broker verified it ([`verify_view`]) and the worker shares it.
    Unit,
}

impl std::fmt::Display for MadeBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MadeBy::Broker => "broker",
            MadeBy::Unit => "unit",
        })
    }
}

/// What the status file records about the worker's mount namespace (written by the broker,
/// checked by `aziotctl policy audit` against /proc/<pid>/ns/mnt and /proc/<pid>/mountinfo).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountNsRecord {
    /// The worker runs in its own mount namespace.
    pub in_force: bool,
    /// The directories covered by a tmpfs.
    pub masks: Vec<PathBuf>,
    /// The sockets bound back into them (the only mounts on top of the masks).
    pub binds: Vec<PathBuf>,
    /// Granted sockets outside every mask (reachable as they are).
    #[serde(default)]
    pub unmasked: Vec<PathBuf>,
    /// Masks that do not exist on this system (nothing to hide there).
    #[serde(default)]
    pub absent_masks: Vec<PathBuf>,
    /// Why the namespace is not in force (degraded mode), empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub not_in_force: String,
    /// Who made it (`broker`: its own namespace; `unit`: systemd's, verified by the broker).
    #[serde(default)]
    pub made_by: MadeBy,
    /// Made by the unit: sockets beneath the masks the worker's user may connect to besides the
    /// granted ones (the service's own listener, `$NOTIFY_SOCKET`, siblings in a granted
    /// socket's root-owned directory), each verified and listed here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub also_reachable: Vec<PathBuf>,
}

/// Everything [`enter_in_child`] needs, made before fork: no allocation happens in the child.
#[derive(Debug)]
pub struct Prepared {
    masks: Vec<CString>,
    dirs: Vec<CString>,
    /// (mount point, detached clone of the socket's mount).
    binds: Vec<(CString, OwnedFd)>,
    root: CString,
    empty: CString,
    tmpfs: CString,
    tmpfs_options: CString,
    record: MountNsRecord,
}

impl Prepared {
    /// What the status file says (in force).
    pub fn record(&self) -> &MountNsRecord {
        &self.record
    }
}

fn cstring(path: &Path) -> Result<CString, MountNsError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| MountNsError::Nul {
        path: path.to_owned(),
    })
}

/// Whether the calling process has CAP_SYS_ADMIN in its effective set.
fn has_sys_admin() -> bool {
    let mut header = crate::apply::CapHeader {
        version: 0x2008_0522,
        pid: 0,
    };
    let mut data = [crate::apply::CapData::default(); 2];
    // SAFETY: capget(version 3) writes two cap_user_data structs into `data`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut crate::apply::CapHeader,
            data.as_mut_ptr(),
        )
    };
    rc == 0 && data[0].effective & (1 << CAP_SYS_ADMIN) != 0
}

/// Opens the socket at `path` without following a link at any component and clones its mount
/// (detached, close-on-exec).
fn clone_socket(path: &Path) -> Result<OwnedFd, MountNsError> {
    use nix::fcntl::OFlag;
    let trust = |source| MountNsError::Socket {
        path: path.to_owned(),
        source,
    };
    let (parent, name) = crate::trusted::open_parent_nofollow(path).map_err(trust)?;
    let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let raw = nix::fcntl::openat(
        Some(parent.as_raw_fd()),
        name.as_os_str(),
        flags,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| {
        trust(TrustError::Open {
            path: path.to_owned(),
            source: e.into(),
        })
    })?;
    // SAFETY: a descriptor openat just returned to us.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| {
        trust(TrustError::Open {
            path: path.to_owned(),
            source: e.into(),
        })
    })?;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFSOCK => {}
        libc::S_IFLNK => {
            return Err(trust(TrustError::Symlink {
                path: path.to_owned(),
                noun: "socket",
            }));
        }
        _ => {
            return Err(MountNsError::NotASocket {
                path: path.to_owned(),
                found: crate::trusted::type_name(&st),
            })
        }
    }
    let empty = CString::default();
    // SAFETY: open_tree(2) on our O_PATH descriptor with an empty path (AT_EMPTY_PATH); it
    // returns a new descriptor (a detached copy of the mount, rooted at the socket) or -1.
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            fd.as_raw_fd(),
            empty.as_ptr(),
            OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | libc::AT_EMPTY_PATH as libc::c_uint,
        )
    };
    if tree < 0 {
        let e = io::Error::last_os_error();
        return Err(match e.raw_os_error() {
            Some(libc::ENOSYS) => MountNsError::NoOpenTree {
                path: path.to_owned(),
            },
            Some(libc::EPERM) => MountNsError::NoCapability,
            _ => MountNsError::OpenTree {
                path: path.to_owned(),
                source: e,
            },
        });
    }
    // SAFETY: a new descriptor open_tree just returned to us.
    Ok(unsafe { OwnedFd::from_raw_fd(tree as i32) })
}

/// In the broker, before fork: checks the capability, opens and clones every granted socket
/// beneath a mask (refusing links and non-sockets), and turns every path into a `CString`.
/// Masks that do not exist are skipped (recorded); a mask that is a link is refused.
pub fn prepare(plan: &MountPlan) -> Result<Prepared, MountNsError> {
    if !has_sys_admin() {
        return Err(MountNsError::NoCapability);
    }
    let mut record = MountNsRecord {
        in_force: true,
        unmasked: plan.unmasked.clone(),
        ..MountNsRecord::default()
    };
    let mut masks = Vec::new();
    for mask in &plan.masks {
        match crate::trusted::open_dir_nofollow(mask, None) {
            Ok(_) => {
                masks.push(cstring(mask)?);
                record.masks.push(mask.clone());
            }
            Err(e) if e.is_not_found() => record.absent_masks.push(mask.clone()),
            Err(source) => {
                return Err(MountNsError::Mask {
                    path: mask.clone(),
                    source,
                })
            }
        }
    }
    let masked = |p: &Path| record.masks.iter().any(|m| p.starts_with(m));
    let dirs = plan
        .dirs
        .iter()
        .filter(|d| masked(d))
        .map(|d| cstring(d))
        .collect::<Result<Vec<_>, _>>()?;
    let mut binds = Vec::new();
    for path in &plan.binds {
        if !masked(path) {
            // Its mask does not exist here: the socket is where it is (or nowhere).
            record.unmasked.push(path.clone());
            continue;
        }
        binds.push((cstring(path)?, clone_socket(path)?));
        record.binds.push(path.clone());
    }
    Ok(Prepared {
        masks,
        dirs,
        binds,
        root: CString::new("/").expect("no NUL"),
        empty: CString::default(),
        tmpfs: CString::new("tmpfs").expect("no NUL"),
        tmpfs_options: CString::new(TMPFS_OPTIONS).expect("no NUL"),
        record,
    })
}

fn check(rc: libc::c_long) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// In the broker's child, between fork and exec, BEFORE the privilege drop: enters a private
/// mount namespace laid out as `p` says (module documentation). Only raw syscalls on what
/// [`prepare`] made: no allocation, no lock.
///
/// # Safety
/// Call only in a single-threaded child after fork (e.g. from `pre_exec`), as root with
/// CAP_SYS_ADMIN: it changes the mount namespace of the calling process.
pub unsafe fn enter_in_child(p: &Prepared) -> io::Result<()> {
    // Every call below is a raw syscall taking integers or pointers to the NUL-terminated
    // strings of `p`, which outlive the calls.
    // SAFETY: an integer argument.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) }.into())?;
    // SAFETY: valid strings (source/type ignored for a propagation change), no data.
    check(
        unsafe {
            libc::mount(
                std::ptr::null(),
                p.root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        }
        .into(),
    )?;
    let hardened = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for mask in &p.masks {
        // SAFETY: valid strings; the data is tmpfs's NUL-terminated option string.
        check(
            unsafe {
                libc::mount(
                    p.tmpfs.as_ptr(),
                    mask.as_ptr(),
                    p.tmpfs.as_ptr(),
                    hardened,
                    p.tmpfs_options.as_ptr().cast(),
                )
            }
            .into(),
        )?;
    }
    for dir in &p.dirs {
        // SAFETY: a valid path; then the mode without the broker's umask (0077 under systemd).
        if unsafe { libc::mkdir(dir.as_ptr(), 0o755) } != 0
            && io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
        {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a valid path.
        check(unsafe { libc::chmod(dir.as_ptr(), 0o755) }.into())?;
    }
    for (target, tree) in &p.binds {
        // The mount point: an empty file at the socket's path.
        // SAFETY: a valid path; the descriptor is closed right away.
        let fd = unsafe {
            libc::open(
                target.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o644,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: our own new descriptor.
        unsafe { libc::close(fd) };
        // SAFETY: move_mount(2) of the detached clone (our descriptor, empty path) onto the file.
        check(unsafe {
            libc::syscall(
                libc::SYS_move_mount,
                tree.as_fd().as_raw_fd(),
                p.empty.as_ptr(),
                libc::AT_FDCWD,
                target.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            )
        })?;
    }
    for mask in &p.masks {
        // SAFETY: valid path; remounts the tmpfs read-only, keeping nosuid/nodev/noexec.
        check(
            unsafe {
                libc::mount(
                    std::ptr::null(),
                    mask.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT | libc::MS_RDONLY | hardened,
                    std::ptr::null(),
                )
            }
            .into(),
        )?;
    }
    // SAFETY: a valid path.
    check(unsafe { libc::chdir(p.root.as_ptr()) }.into())
}

/// The credentials whose reach [`verify_view`] checks: the worker's user and all its groups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reach {
    pub uid: u32,
    /// Primary and supplementary groups.
    pub groups: Vec<u32>,
}

impl Reach {
    /// Whether DAC lets these credentials connect to a socket with this owner and mode (connect
    /// needs write permission on the socket; POSIX ACLs are not consulted: none is set beneath
    /// the masks by the product or by systemd).
    pub fn may_connect(&self, st_uid: u32, st_gid: u32, mode: u32) -> bool {
        if st_uid == self.uid {
            mode & 0o200 != 0
        } else if self.groups.contains(&st_gid) {
            mode & 0o020 != 0
        } else {
            mode & 0o002 != 0
        }
    }

    /// The credentials of a live process, from /proc/<pid>/status (`Uid:` real, `Groups:`,
    /// `Gid:` real): for the audit.
    pub fn of_process(pid: i32) -> io::Result<Reach> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| -> Vec<u32> {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| {
                    v.split_whitespace()
                        .filter_map(|x| x.parse().ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        let uid = *field("Uid:")
            .first()
            .ok_or_else(|| io::Error::other("no Uid: line"))?;
        let mut groups = field("Gid:").into_iter().take(1).collect::<Vec<_>>();
        groups.extend(field("Groups:"));
        Ok(Reach { uid, groups })
    }
}

/// What [`verify_view`] found: the view hides everything the policy does not grant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    /// Masks present (each a separate mount).
    pub masks: Vec<PathBuf>,
    /// Masks that do not exist in the view.
    pub absent_masks: Vec<PathBuf>,
    /// Granted sockets present beneath the masks.
    pub binds: Vec<PathBuf>,
    /// Other sockets the credentials may connect to, each an allowed extra or a sibling of a
    /// granted socket in a root-owned, non-writable directory.
    pub also_reachable: Vec<PathBuf>,
}

/// At most this many entries are examined beneath the masks: a verified view holds a handful;
/// a view this full is not the one the policy describes.
const VIEW_MAX_ENTRIES: usize = 4096;

/// Whether the mount namespace seen through `root` (`/` for the calling process, or
/// `/proc/<pid>/root`; `mountinfo`: that process's /proc/…/mountinfo) already hides, beneath
/// `masks`, every pathname socket `who` may connect to except `granted` ones, `extras` (the
/// broker's own needs: its listener, `$NOTIFY_SOCKET`) and siblings of a granted socket in a
/// root-owned directory nobody else may write (the unit binds `/run/aziot` whole). Used by the
/// broker, which then skips making the namespace itself (systemd made it for the unit), and by
/// the audit. Nothing is taken on trust: per present mask,
/// - it is a mount point of its own in `mountinfo` (not a directory of the filesystem above it:
///   a host's /tmp, /var/tmp, /run on a system that does not mount them);
/// - if a non-root user may write to it, the mount is a subdirectory of its filesystem (a
///   private instance such as `PrivateTmp=`'s, whose parent is root's 0700), never a whole
///   shared filesystem (a host's /dev/shm);
/// - beneath it (links not followed, mounts on it included), no directory is owned by or
///   writable by a non-root user (nobody else may plant a socket later), and every socket `who`
///   may connect to is allowed as above.
///
/// Errors: every problem found (empty masks list = nothing to verify = accepted).
pub fn verify_view(
    root: &Path,
    mountinfo: &str,
    masks: &[PathBuf],
    granted: &[PathBuf],
    extras: &[PathBuf],
    who: &Reach,
) -> Result<View, Vec<String>> {
    use std::os::unix::fs::MetadataExt;
    let mounts = parse_mountinfo(mountinfo);
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let mut view = View::default();
    let mut problems = Vec::new();
    let others_write = |m: &std::fs::Metadata| m.uid() != 0 || m.mode() & 0o022 != 0;
    for mask in masks {
        let meta = match std::fs::symlink_metadata(inside(mask)) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                view.absent_masks.push(mask.clone());
                continue;
            }
            Err(e) => {
                problems.push(format!("{}: {e}", mask.display()));
                continue;
            }
        };
        if !meta.is_dir() {
            problems.push(format!("{}: not a directory", mask.display()));
            continue;
        }
        // The top mount at the mask (none stacked on it at the same point).
        let at: Vec<&MountInfo> = mounts.iter().filter(|m| &m.mount_point == mask).collect();
        let Some(top) = at.iter().find(|m| !at.iter().any(|o| o.parent == m.id)) else {
            problems.push(format!(
                "{}: not a mount point (the filesystem above it, shared with other services)",
                mask.display()
            ));
            continue;
        };
        if others_write(&meta) && top.root == Path::new("/") {
            problems.push(format!(
                "{}: writable by other users ({:o}, owner {}) and a whole {} filesystem, not a private instance",
                mask.display(),
                meta.mode() & 0o7777,
                meta.uid(),
                top.fs_type
            ));
            continue;
        }
        view.masks.push(mask.clone());
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    // The directories that hold a granted socket.
    let granted_dirs: Vec<&Path> = granted.iter().filter_map(|g| g.parent()).collect();
    let mut seen = 0usize;
    let mut stack: Vec<PathBuf> = view.masks.clone();
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(inside(&dir)) {
            Ok(e) => e,
            Err(e) => {
                problems.push(format!("{}: cannot list: {e}", dir.display()));
                continue;
            }
        };
        let dir_meta = std::fs::symlink_metadata(inside(&dir));
        let dir_is_roots = matches!(&dir_meta, Ok(m) if !others_write(m));
        for entry in entries {
            seen += 1;
            if seen > VIEW_MAX_ENTRIES {
                problems.push(format!(
                    "more than {VIEW_MAX_ENTRIES} entries beneath the masks"
                ));
                return Err(problems);
            }
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    problems.push(format!("{}: cannot list: {e}", dir.display()));
                    continue;
                }
            };
            let path = dir.join(entry.file_name());
            let meta = match std::fs::symlink_metadata(entry.path()) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // gone meanwhile
                Err(e) => {
                    problems.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            let ft = meta.file_type();
            use std::os::unix::fs::FileTypeExt;
            if ft.is_dir() {
                if others_write(&meta) && !view.masks.contains(&path) {
                    problems.push(format!(
                        "{}: a directory other users may write to ({:o}, owner {}): anyone could plant a socket there",
                        path.display(),
                        meta.mode() & 0o7777,
                        meta.uid()
                    ));
                    continue;
                }
                stack.push(path);
            } else if ft.is_socket() {
                if !who.may_connect(meta.uid(), meta.gid(), meta.mode()) {
                    continue; // DAC refuses it to the worker.
                }
                if granted.contains(&path) {
                    view.binds.push(path);
                } else if extras.contains(&path)
                    || (dir_is_roots && granted_dirs.contains(&dir.as_path()))
                {
                    view.also_reachable.push(path);
                } else {
                    problems.push(format!(
                        "{}: a socket the worker may connect to ({:o}, {}:{}) that the policy does not grant",
                        path.display(),
                        meta.mode() & 0o7777,
                        meta.uid(),
                        meta.gid()
                    ));
                }
            }
            // Links resolve inside this same view; regular files and others are no connect target.
        }
    }
    if problems.is_empty() {
        view.binds.sort();
        view.also_reachable.sort();
        Ok(view)
    } else {
        Err(problems)
    }
}

/// One line of /proc/<pid>/mountinfo: what the audit compares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    pub id: u64,
    pub parent: u64,
    /// The directory of its filesystem the mount shows (`/`: the whole filesystem; a
    /// subdirectory for a bind mount such as `PrivateTmp=`'s).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`ro,nosuid,nodev,noexec,relatime`).
    pub options: Vec<String>,
    pub fs_type: String,
}

/// Parses /proc/<pid>/mountinfo (proc(5)); octal escapes (`\040`) in mount points are decoded.
pub fn parse_mountinfo(text: &str) -> Vec<MountInfo> {
    let unescape = |s: &str| {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'\\'
                && i + 3 < b.len()
                && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
            {
                out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
                i += 4;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        PathBuf::from(std::ffi::OsStr::from_bytes(&out))
    };
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            if f.len() < 6 {
                return None;
            }
            Some(MountInfo {
                id: f[0].parse().ok()?,
                parent: f[1].parse().ok()?,
                root: unescape(f[3]),
                mount_point: unescape(f[4]),
                options: f[5].split(',').map(str::to_owned).collect(),
                fs_type: right.split(' ').next()?.to_owned(),
            })
        })
        .collect()
}

/// What a worker's mountinfo shows beneath its masks: for each mask the top mount (must be a
/// hardened tmpfs) and the mounts stacked on it (must be exactly the recorded binds). Problems
/// as text (empty: as recorded).
pub fn check_mounts(record: &MountNsRecord, mounts: &[MountInfo]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen_binds = Vec::new();
    for mask in &record.masks {
        // The top mount at the mask: one that no other mount at the same point sits on.
        let at: Vec<&MountInfo> = mounts.iter().filter(|m| &m.mount_point == mask).collect();
        let Some(top) = at.iter().find(|m| !at.iter().any(|o| o.parent == m.id)) else {
            problems.push(format!("{}: no mount (expected a tmpfs)", mask.display()));
            continue;
        };
        let has = |o: &str| top.options.iter().any(|x| x == o);
        if top.fs_type != "tmpfs" || !["ro", "nosuid", "nodev", "noexec"].iter().all(|o| has(o)) {
            problems.push(format!(
                "{}: {} ({}), expected a tmpfs ro,nosuid,nodev,noexec",
                mask.display(),
                top.fs_type,
                top.options.join(",")
            ));
        }
        // Everything mounted on the tmpfs, and on those, recursively.
        let mut ids = vec![top.id];
        let mut i = 0;
        while i < ids.len() {
            let parent = ids[i];
            for m in mounts
                .iter()
                .filter(|m| m.parent == parent && m.id != parent)
            {
                ids.push(m.id);
                if record.binds.contains(&m.mount_point) && m.mount_point.starts_with(mask) {
                    seen_binds.push(m.mount_point.clone());
                } else {
                    problems.push(format!(
                        "{}: unexpected mount {} ({})",
                        mask.display(),
                        m.mount_point.display(),
                        m.fs_type
                    ));
                }
            }
            i += 1;
        }
    }
    for b in &record.binds {
        match seen_binds.iter().filter(|s| *s == b).count() {
            1 => {}
            0 => problems.push(format!("granted socket {} is not bound", b.display())),
            n => problems.push(format!("granted socket {} is bound {n} times", b.display())),
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:25 / /run rw,nosuid,nodev shared:5 - tmpfs tmpfs rw,mode=755
31 30 0:26 / /run/lock rw,nosuid,nodev,noexec shared:6 - tmpfs tmpfs rw
40 30 0:40 / /run ro,nosuid,nodev,noexec,relatime - tmpfs tmpfs ro,size=64k,mode=755
41 40 0:25 /aziot/keyd.sock /run/aziot/keyd.sock rw,nosuid,nodev - tmpfs tmpfs rw,mode=755
50 22 0:41 / /tmp ro,nosuid,nodev,noexec,relatime - tmpfs tmpfs ro,size=64k,mode=755
51 50 0:41 / /tmp/with\\040space rw - tmpfs tmpfs rw
";

    fn record(binds: &[&str]) -> MountNsRecord {
        MountNsRecord {
            in_force: true,
            masks: vec!["/run".into(), "/tmp".into()],
            binds: binds.iter().map(PathBuf::from).collect(),
            ..MountNsRecord::default()
        }
    }

    #[test]
    fn mountinfo_is_parsed_and_compared_with_the_record() {
        let mounts = parse_mountinfo(SAMPLE);
        assert_eq!(mounts.len(), 7);
        assert_eq!(mounts[6].mount_point, PathBuf::from("/tmp/with space"));
        assert_eq!(mounts[3].fs_type, "tmpfs");
        // /run/lock sits on the host's /run (covered), not on the mask: not a problem. The mount
        // on /tmp is not a granted socket: a deviation.
        let problems = check_mounts(&record(&["/run/aziot/keyd.sock"]), &mounts);
        assert_eq!(
            problems,
            vec!["/tmp: unexpected mount /tmp/with space (tmpfs)".to_owned()]
        );
        let without_tmp: Vec<MountInfo> = mounts.iter().filter(|m| m.id != 51).cloned().collect();
        assert!(check_mounts(&record(&["/run/aziot/keyd.sock"]), &without_tmp).is_empty());
        // A recorded socket that is not bound; a bind that is not recorded.
        let problems = check_mounts(
            &record(&["/run/aziot/keyd.sock", "/run/aziot/certd.sock"]),
            &without_tmp,
        );
        assert_eq!(
            problems,
            vec!["granted socket /run/aziot/certd.sock is not bound".to_owned()]
        );
        let problems = check_mounts(&record(&[]), &without_tmp);
        assert_eq!(
            problems,
            vec!["/run: unexpected mount /run/aziot/keyd.sock (tmpfs)".to_owned()]
        );
        // The host's own /run (writable, no mask): a deviation.
        let host: Vec<MountInfo> = mounts.iter().filter(|m| m.id < 40).cloned().collect();
        let problems = check_mounts(&record(&[]), &host);
        assert!(
            problems[0].starts_with(
                "/run: tmpfs (rw,nosuid,nodev), expected a tmpfs ro,nosuid,nodev,noexec"
            ),
            "{problems:?}"
        );
        assert!(
            problems[1].starts_with("/run: unexpected mount /run/lock"),
            "{problems:?}"
        );
        assert_eq!(problems[2], "/tmp: no mount (expected a tmpfs)");
    }

    /// The broker's check that the namespace it runs in already hides the sockets
    /// (`verify_view`, what systemd makes for the unit): the host's namespace (this test's) is
    /// refused; a namespace made here — in a thread of its own: unshare(CLONE_NEWNS), a tmpfs
    /// over each mask, a root-owned socket directory bound in, as `TemporaryFileSystem=` and
    /// `BindPaths=` do — is accepted, listing the granted socket, the reachable sibling and the
    /// extra, ignoring the socket DAC refuses; then each thing that must be refused is planted
    /// in turn: a reachable socket the policy does not grant, a directory others may write, a
    /// world-writable whole tmpfs (a host's /dev/shm), a mask that is no mount point.
    #[test]
    fn a_namespace_made_for_the_worker_is_verified_and_the_hosts_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() || !has_sys_admin() {
            assert!(
                std::env::var("AZIOT_ALLOW_SKIP").as_deref() == Ok("1"),
                "needs root with CAP_SYS_ADMIN (or AZIOT_ALLOW_SKIP=1)"
            );
            return;
        }
        let masks: Vec<PathBuf> = ["/run", "/tmp", "/var/tmp", "/dev/shm"]
            .iter()
            .map(PathBuf::from)
            .collect();
        let who = Reach {
            uid: 4242,
            groups: vec![4242, 4243],
        };
        // The host's namespace.
        let host = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let problems = verify_view(Path::new("/"), &host, &masks, &[], &[], &who).unwrap_err();
        assert!(!problems.is_empty());

        // The product's socket directory, on the host: root's 0755, outside the masks (the test
        // binds it to /run/aziot-verify inside its namespace, as BindPaths= does).
        let host_dir = PathBuf::from(format!("/var/lib/aziot-verify-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&host_dir);
        std::fs::create_dir(&host_dir).unwrap();
        std::fs::set_permissions(&host_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let listen = |path: &Path, gid: u32, mode: u32| {
            let l = std::os::unix::net::UnixListener::bind(path).unwrap();
            std::os::unix::fs::chown(path, Some(0), Some(gid)).unwrap();
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
            l
        };
        let _granted = listen(&host_dir.join("keyd.sock"), 4242, 0o660);
        let _sibling = listen(&host_dir.join("tpmd.sock"), 4243, 0o660);
        let _refused_by_dac = listen(&host_dir.join("other.sock"), 0, 0o660);
        let dir = PathBuf::from("/run/aziot-verify");
        let granted = vec![dir.join("keyd.sock")];
        let host_dir_t = host_dir.clone();
        let (masks_t, who_t, granted_t) = (masks.clone(), who.clone(), granted.clone());
        let result = std::thread::spawn(move || -> Result<(), String> {
            let (masks, who, granted) = (masks_t, who_t, granted_t);
            let c = |p: &str| CString::new(p).unwrap();
            let tmpfs = c("tmpfs");
            // SAFETY: unshare/mount on valid NUL-terminated strings; this thread only (its own
            // fs_struct after CLONE_NEWNS), other test threads keep the host's namespace.
            let sys = |rc: libc::c_int, what: &str| {
                if rc != 0 {
                    panic!("{what}: {}", io::Error::last_os_error());
                }
            };
            sys(unsafe { libc::unshare(libc::CLONE_NEWNS) }, "unshare");
            // SAFETY: as above.
            sys(
                unsafe {
                    libc::mount(
                        std::ptr::null(),
                        c("/").as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    )
                },
                "make / private",
            );
            let mount_tmpfs = |mask: &Path, mode: &str| {
                let opts = c(&format!("mode={mode},size=64k"));
                let target = c(mask.to_str().unwrap());
                // SAFETY: as above.
                sys(
                    unsafe {
                        libc::mount(
                            tmpfs.as_ptr(),
                            target.as_ptr(),
                            tmpfs.as_ptr(),
                            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                            opts.as_ptr().cast(),
                        )
                    },
                    "tmpfs",
                );
            };
            for mask in &masks {
                mount_tmpfs(mask, "0755");
            }
            std::fs::create_dir(&dir).unwrap();
            // /var/lib is not masked: the host's directory is still there.
            let source = c(host_dir_t.to_str().unwrap());
            let target = c(dir.to_str().unwrap());
            // SAFETY: as above; a bind mount of the host's directory.
            sys(
                unsafe {
                    libc::mount(
                        source.as_ptr(),
                        target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    )
                },
                "bind",
            );
            let mine = || std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
            let extra = PathBuf::from("/run/systemd/notify");
            std::fs::create_dir(extra.parent().unwrap()).unwrap();
            let _notify = std::os::unix::net::UnixDatagram::bind(&extra).unwrap();
            std::fs::set_permissions(&extra, std::fs::Permissions::from_mode(0o777)).unwrap();
            let verify = || {
                verify_view(
                    Path::new("/"),
                    &mine(),
                    &masks,
                    &granted,
                    &[extra.clone()],
                    &who,
                )
            };
            let view = verify().map_err(|p| format!("made here, refused: {p:?}"))?;
            assert_eq!(view.masks, masks);
            assert_eq!(view.binds, granted);
            assert_eq!(
                view.also_reachable,
                vec![dir.join("tpmd.sock"), extra.clone()]
            );
            // The same view through /proc/<tid>/root and that task's mountinfo (the audit's way).
            // SAFETY: no arguments.
            let tid = unsafe { libc::gettid() };
            let via_proc = verify_view(
                Path::new(&format!("/proc/{tid}/root")),
                &std::fs::read_to_string(format!("/proc/{tid}/mountinfo")).unwrap(),
                &masks,
                &granted,
                &[extra.clone()],
                &who,
            )
            .map_err(|p| format!("through /proc: {p:?}"))?;
            assert_eq!(via_proc, view);
            let refused = |what: &str, needle: &str| -> Result<(), String> {
                match verify() {
                    Ok(v) => Err(format!("{what}: accepted {v:?}")),
                    Err(p) if p.iter().any(|x| x.contains(needle)) => Ok(()),
                    Err(p) => Err(format!("{what}: {p:?} does not name {needle}")),
                }
            };
            // A reachable socket the policy does not grant (planted in /tmp).
            let planted = Path::new("/tmp/planted.sock");
            let l = std::os::unix::net::UnixListener::bind(planted).unwrap();
            std::fs::set_permissions(planted, std::fs::Permissions::from_mode(0o777)).unwrap();
            refused(
                "planted socket",
                "/tmp/planted.sock: a socket the worker may connect to",
            )?;
            drop(l);
            std::fs::remove_file(planted).unwrap();
            verify().map_err(|p| format!("after removal: {p:?}"))?;
            // Without the extra, the notify socket is one the policy does not grant.
            verify_view(Path::new("/"), &mine(), &masks, &granted, &[], &who)
                .err()
                .filter(|p| p.iter().any(|x| x.contains("/run/systemd/notify")))
                .ok_or("the notify socket without the extra")?;
            // A directory others may write to.
            std::fs::create_dir("/run/open").unwrap();
            std::fs::set_permissions("/run/open", std::fs::Permissions::from_mode(0o1777)).unwrap();
            refused(
                "world-writable directory",
                "/run/open: a directory other users may write to",
            )?;
            std::fs::remove_dir("/run/open").unwrap();
            // A world-writable whole tmpfs (a host's /dev/shm).
            mount_tmpfs(Path::new("/dev/shm"), "1777");
            refused("world-writable tmpfs", "/dev/shm: writable by other users")?;
            // SAFETY: a valid path; undoes the mount just made.
            sys(
                unsafe { libc::umount2(c("/dev/shm").as_ptr(), 0) },
                "umount",
            );
            verify().map_err(|p| format!("after umount: {p:?}"))?;
            // A mask that is no mount point.
            // SAFETY: as above.
            sys(
                unsafe { libc::umount2(c("/var/tmp").as_ptr(), 0) },
                "umount",
            );
            refused("no mount point", "/var/tmp: not a mount point")?;
            Ok(())
        })
        .join();
        let _ = std::fs::remove_dir_all(&host_dir);
        result.unwrap().unwrap();
    }

    /// Root opens a granted socket without following links: a link at the socket's path or at
    /// one of its directories, and a regular file, are refused before anything is cloned.
    #[test]
    fn a_granted_socket_that_is_a_link_or_not_a_socket_is_refused() {
        if !nix::unistd::geteuid().is_root() || !has_sys_admin() {
            assert!(
                std::env::var("AZIOT_ALLOW_SKIP").as_deref() == Ok("1"),
                "needs root with CAP_SYS_ADMIN (or AZIOT_ALLOW_SKIP=1)"
            );
            return;
        }
        let dir = std::env::temp_dir().join(format!("aziot-mountns-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("real")).unwrap();
        let sock = dir.join("real/keyd.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        std::os::unix::fs::symlink(&sock, dir.join("link.sock")).unwrap();
        std::os::unix::fs::symlink(dir.join("real"), dir.join("linkdir")).unwrap();
        std::fs::write(dir.join("file.sock"), b"").unwrap();
        let plan = |bind: PathBuf| MountPlan {
            masks: vec!["/tmp".into()],
            dirs: vec![],
            binds: vec![bind],
            unmasked: vec![],
        };
        // The socket itself: cloned (the control).
        let ok = prepare(&plan(sock.clone())).unwrap();
        assert_eq!(ok.record().binds, vec![sock.clone()]);
        for link in [dir.join("link.sock"), dir.join("linkdir/keyd.sock")] {
            let e = prepare(&plan(link.clone())).unwrap_err();
            let text = format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            );
            assert!(
                matches!(
                    &e,
                    MountNsError::Socket {
                        source: TrustError::Symlink { .. },
                        ..
                    }
                ) && text.contains("is a symbolic link"),
                "{}: {text}",
                link.display()
            );
        }
        let e = prepare(&plan(dir.join("file.sock"))).unwrap_err();
        assert!(
            e.to_string().ends_with("is a regular file, not a socket"),
            "{e}"
        );
        assert!(!e.is_unsupported());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
