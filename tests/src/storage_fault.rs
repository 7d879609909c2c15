//! Storage faults for the fault suite (tests/tests/fault_storage.rs): a small tmpfs as a
//! service's state directory (a disk that fills up), a filler that takes every free byte of it,
//! and snapshots of a state tree (to show that nothing was lost or changed).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs of a fixed size mounted over a service's state directory, holding what the directory
/// held (owner, mode and contents carried over with `cp -a`). Dropped: lazily unmounted
/// (`MNT_DETACH`: a worker may still hold a descriptor in it), leaving the original, now empty,
/// directory for the harness to remove.
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` bytes at `dir` (created 0700 when missing), carrying over its
    /// contents. The service using `dir` must be stopped: it would keep the old directory open.
    pub fn over(dir: &Path, size: u64) -> Tmpfs {
        let aside = dir.with_extension("before-tmpfs");
        let existed = dir.exists();
        if existed {
            fs::rename(dir, &aside).unwrap_or_else(|e| panic!("move {} aside: {e}", dir.display()));
        }
        fs::create_dir(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let options = format!("size={size},mode=0700");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &options, "aziot-fault-tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount -t tmpfs -o {options} {}: {status}", dir.display());
        let mount = Tmpfs { path: dir.to_owned() };
        if existed {
            let meta = fs::metadata(&aside).expect("stat the state dir");
            let mut src = aside.clone().into_os_string();
            src.push("/.");
            let out = Command::new("cp").arg("-a").arg(&src).arg(dir).output().expect("run cp -a");
            assert!(out.status.success(), "cp -a into the tmpfs: {}", String::from_utf8_lossy(&out.stderr));
            std::os::unix::fs::chown(dir, Some(meta.uid()), Some(meta.gid())).expect("chown the tmpfs root");
            fs::set_permissions(dir, fs::Permissions::from_mode(meta.mode() & 0o7777)).expect("chmod the tmpfs root");
            fs::remove_dir_all(&aside).expect("remove the old state dir");
        }
        mount
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Takes every free byte of the tmpfs with a root-owned file (`.filler` at its root): the
    /// next write of any size fails with ENOSPC. Dropped: the file is removed (space returns).
    pub fn fill(&self) -> Filler {
        let path = self.path.join(".filler");
        let mut file = fs::OpenOptions::new().create_new(true).write(true).open(&path).expect("create the filler");
        let chunk = vec![0xa5u8; 64 * 1024];
        // Big chunks first, then single bytes: the last partial page is taken too.
        for size in [chunk.len(), 4096, 1] {
            loop {
                match file.write(&chunk[..size]) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::StorageFull => break,
                    Err(e) => panic!("fill {}: {e}", path.display()),
                }
            }
        }
        drop(file);
        let probe = self.path.join(".filler-probe");
        let full = fs::write(&probe, b"x").is_err_and(|e| e.kind() == ErrorKind::StorageFull);
        let _ = fs::remove_file(&probe);
        assert!(full, "{} still takes a byte after filling it", self.path.display());
        Filler { path }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let Ok(path) = CString::new(self.path.as_os_str().as_bytes()) else { return };
        // SAFETY: plain syscall with a NUL-terminated path that lives across the call.
        let rc = unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        if rc != 0 {
            eprintln!("umount {}: {}", self.path.display(), std::io::Error::last_os_error());
        }
    }
}

/// The file that fills a [`Tmpfs`]; removing it (drop, or [`Filler::free`]) gives the space back.
pub struct Filler {
    path: PathBuf,
}

impl Filler {
    /// Deletes the filler: space returns.
    pub fn free(self) {}
}

impl Drop for Filler {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Every regular file under `root` (relative path → contents), directories walked, `.filler`
/// left out.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        let Ok(entries) = fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(meta) = fs::symlink_metadata(&path) else { continue };
            if meta.is_dir() {
                walk(root, &path, out);
            } else if e.file_name() != ".filler" {
                let bytes = fs::read(&path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
                out.insert(path.strip_prefix(root).expect("under root").to_owned(), bytes);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// The names of temporary files (`.tmp-*`, the prefix of every worker's atomic writes) under
/// `root`.
pub fn temporaries(root: &Path) -> Vec<PathBuf> {
    snapshot(root)
        .into_keys()
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".tmp-")))
        .collect()
}
