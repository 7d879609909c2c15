//! Polls a service's config files (main file and drop-in directory) for changes. Polling the
//! paths, rather than watching inodes, also catches editors that replace a file by rename and
//! a drop-in directory created after start (upstream misses both, spec common-http §3.3).

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use aziot_ipc::config::ConfigPaths;

/// Settle time: a change is reported once the files stayed the same for this many polls.
const SETTLE_POLLS: u32 = 1;

pub struct ConfigWatcher {
    paths: ConfigPaths,
    last: Vec<Stamp>,
    pending: Option<(Vec<Stamp>, u32)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Stamp {
    path: PathBuf,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

impl ConfigWatcher {
    pub fn new(paths: &ConfigPaths) -> Self {
        let paths = paths.clone();
        let last = snapshot(&paths);
        ConfigWatcher { paths, last, pending: None }
    }

    /// True once after the files changed and then stayed unchanged for a poll.
    pub fn changed(&mut self) -> bool {
        let now = snapshot(&self.paths);
        if now == self.last {
            self.pending = None;
            return false;
        }
        match &mut self.pending {
            Some((seen, polls)) if *seen == now => {
                *polls += 1;
                if *polls >= SETTLE_POLLS {
                    self.last = now;
                    self.pending = None;
                    return true;
                }
                false
            }
            _ => {
                self.pending = Some((now, 0));
                false
            }
        }
    }
}

fn snapshot(paths: &ConfigPaths) -> Vec<Stamp> {
    let mut stamps = Vec::new();
    let stamp = |path: PathBuf| {
        std::fs::metadata(&path).ok().map(|m| Stamp {
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            path,
        })
    };
    stamps.extend(stamp(paths.main.clone()));
    if let Ok(entries) = std::fs::read_dir(&paths.dir) {
        let mut names: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        names.sort();
        stamps.extend(names.into_iter().filter_map(stamp));
    }
    stamps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_a_new_dropin_after_it_settles() {
        let dir = std::env::temp_dir().join(format!("aziot-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.toml"), "a = 1\n").unwrap();
        let paths = ConfigPaths { main: dir.join("config.toml"), dir: dir.join("config.d") };
        let mut w = ConfigWatcher::new(&paths);
        assert!(!w.changed());
        std::fs::create_dir_all(dir.join("config.d")).unwrap();
        std::fs::write(dir.join("config.d/50.toml"), "b = 2\n").unwrap();
        assert!(!w.changed(), "first sight of a change waits one poll");
        assert!(w.changed());
        assert!(!w.changed(), "reported once");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
