//! The root broker takes decisions only from root-owned inputs (issue 10 §1, docs/security.md
//! "Root's inputs are root's"): each input made hostile — a config file of the service user, a
//! world-writable one, a policy drop-in of the service user, a state directory reached through a
//! symbolic link, a `device:` TCTI naming a regular file or a link to /etc/shadow, a link planted
//! at the status file — is refused with an error naming it (or, for the status file, not
//! followed), and nothing outside the intended paths changes owner or mode.
//!
//! Each test starts the real `aziotd` as root in a private prefix (config paths through
//! `AZIOT_<SVC>_CONFIG`, `AZIOT_<SVC>_CONFIG_DIR`, `AZIOT_<SVC>_POLICY_DIR`).

use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use aziot_tests::keyd::{aziotd_bin, service_user, toml_str, TempDir};

const TIMEOUT: Duration = Duration::from_secs(20);

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the broker suites start aziotd as root (it refuses to run otherwise): run them as root"
    );
}

/// (uid, gid, mode, size, mtime, inode) of `path`, not following a final link.
fn stat(path: &Path) -> (u32, u32, u32, u64, i64, u64) {
    let m = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.uid(), m.gid(), m.mode(), m.size(), m.mtime(), m.ino())
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

fn write(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    chmod(path, mode);
}

/// A private prefix for one service: `config.toml`, `config.d/`, `policy.d/`, the socket and
/// status file, and the broker's log.
struct Prefix {
    dir: TempDir,
    short: &'static str,
}

impl Prefix {
    fn new(short: &'static str, tag: &str) -> Prefix {
        let dir = TempDir::new(tag);
        for d in ["config.d", "policy.d"] {
            std::fs::create_dir(dir.path().join(d)).expect("mkdir");
            chmod(&dir.path().join(d), 0o755);
        }
        Prefix { dir, short }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root().join(p)
    }

    fn socket(&self) -> PathBuf {
        self.path(&format!("{}.sock", self.short))
    }

    fn status(&self) -> PathBuf {
        self.path(&format!("{}.status", self.short))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("broker.log")).unwrap_or_default()
    }

    /// keyd's config.toml (root 0644): the state directory `homedir` and `extra` TOML first.
    fn keyd_config(&self, homedir: &Path, extra: &str) {
        write(
            &self.path("config.toml"),
            &format!(
                "{extra}\n[aziot_keys]\nhomedir_path = {}\n\n[endpoints]\naziot_keyd = {}\n",
                toml_str(homedir.to_str().expect("utf-8")),
                toml_str(&format!("unix://{}", self.socket().display())),
            ),
            0o644,
        );
    }

    fn tpmd_config(&self, tcti: &str) {
        write(
            &self.path("config.toml"),
            &format!(
                "tcti = {}\n\n[endpoints]\naziot_tpmd = {}\n",
                toml_str(tcti),
                toml_str(&format!("unix://{}", self.socket().display()))
            ),
            0o644,
        );
    }

    fn spawn(&self) -> Child {
        let upper = self.short.to_ascii_uppercase();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("broker.log"))
            .expect("open the log");
        let vars: [(String, OsString); 4] = [
            (format!("AZIOT_{upper}_CONFIG"), self.path("config.toml").into()),
            (format!("AZIOT_{upper}_CONFIG_DIR"), self.path("config.d").into()),
            (format!("AZIOT_{upper}_POLICY_DIR"), self.path("policy.d").into()),
            ("AZIOT_LOG".to_owned(), "info".into()),
        ];
        Command::new(aziotd_bin())
            .arg(format!("aziot-{}", self.short))
            .env_clear()
            .envs(vars)
            .current_dir(self.root())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn aziotd")
    }

    /// Starts the broker and expects it to exit on its own: its status and log.
    fn refused(&self) -> (ExitStatus, String) {
        let mut child = self.spawn();
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the broker was expected to refuse to start but kept running:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let log = self.log();
        assert_eq!(status.code(), Some(1), "{status}\n{log}");
        assert!(!self.socket().exists(), "no socket is bound when the broker refuses:\n{log}");
        assert!(!self.status().exists(), "no worker ran:\n{log}");
        (status, log)
    }
}

/// A root-owned directory outside the prefix with a root-owned 0644 file in it, standing for
/// any directory root must not be tricked into re-owning.
struct Victim {
    _dir: TempDir,
    home: PathBuf,
    file: PathBuf,
}

impl Victim {
    fn new() -> Victim {
        let dir = TempDir::new("victim");
        let home = dir.path().join("home");
        std::fs::create_dir(&home).expect("mkdir");
        chmod(&home, 0o755);
        let file = home.join("precious");
        write(&file, "root's", 0o644);
        Victim { _dir: dir, home, file }
    }

    fn snapshot(&self) -> Vec<(u32, u32, u32, u64, i64, u64)> {
        vec![stat(&self.home), stat(&self.file)]
    }
}

#[test]
fn a_drop_in_owned_by_the_service_user_is_refused_naming_file_owner_mode_and_fix() {
    require_root();
    let p = Prefix::new("keyd", "trust-dropin-owner");
    let home = p.path("home");
    p.keyd_config(&home, "");
    std::fs::create_dir(&home).unwrap();
    chmod(&home, 0o700);
    // what the original's `config apply` writes: the service user's, 0600 — and what a
    // compromised worker's user would write to switch its own sandbox off
    let dropin = p.path("config.d/00-super.toml");
    write(&dropin, "[sandbox]\nseccomp = \"off\"\nallow_degraded = true\n", 0o600);
    let (uid, gid) = service_user();
    chown(&dropin, uid, gid);
    let before = stat(&home);

    let (_, log) = p.refused();
    let f = dropin.display();
    for needle in [
        format!("{f} is owned by uid {uid} (aziotks) with mode 0600"),
        "the broker acts only on files owned by root and not writable by group or others".to_owned(),
        format!("`chown root:root {f}`"),
        format!("`chmod 0600 {f}`"),
    ] {
        assert!(log.contains(&needle), "{needle:?} missing from:\n{log}");
    }
    // refused before acting: the state directory was not given away
    assert_eq!(stat(&home), before, "{log}");
    assert_eq!(stat(&dropin).0, uid, "the broker changes nothing of the refused file");
}

#[test]
fn a_world_writable_config_file_is_refused() {
    require_root();
    let p = Prefix::new("keyd", "trust-config-0666");
    p.keyd_config(&p.path("home"), "");
    chmod(&p.path("config.toml"), 0o666);
    let (_, log) = p.refused();
    let f = p.path("config.toml");
    assert!(log.contains(&format!("{} is owned by uid 0 (root) with mode 0666", f.display())), "{log}");
    assert!(log.contains(&format!("`chmod 0600 {}`", f.display())), "{log}");
    assert!(!p.path("home").exists(), "the state directory was not created:\n{log}");

    // a root-owned drop-in writable by its group is refused the same way
    let p = Prefix::new("keyd", "trust-dropin-0620");
    p.keyd_config(&p.path("home"), "");
    let dropin = p.path("config.d/50-x.toml");
    write(&dropin, "max_requests = 5\n", 0o620);
    let (_, log) = p.refused();
    assert!(log.contains(&format!("{} is owned by uid 0 (root) with mode 0620", dropin.display())), "{log}");
}

#[test]
fn a_config_directory_writable_by_the_service_user_is_refused() {
    require_root();
    let p = Prefix::new("keyd", "trust-configd-owner");
    p.keyd_config(&p.path("home"), "");
    let (uid, gid) = service_user();
    chown(&p.path("config.d"), uid, gid);
    let (_, log) = p.refused();
    let d = p.path("config.d");
    assert!(log.contains(&format!("{} is owned by uid {uid} (aziotks) with mode 0755", d.display())), "{log}");
    assert!(log.contains(&format!("`chmod go-w {}`", d.display())), "{log}");
}

#[test]
fn a_policy_drop_in_owned_by_the_service_user_is_refused() {
    require_root();
    let p = Prefix::new("keyd", "trust-policy-owner");
    p.keyd_config(&p.path("home"), "");
    let dropin = p.path("policy.d/50-wide.toml");
    write(&dropin, "[[path]]\npath = \"/etc\"\naccess = \"ro\"\n", 0o644);
    let (uid, gid) = service_user();
    chown(&dropin, uid, gid);
    let (_, log) = p.refused();
    let f = dropin.display();
    assert!(log.contains(&format!("policy drop-in {f}")), "{log}");
    assert!(log.contains(&format!("{f} is owned by uid {uid} (aziotks) with mode 0644")), "{log}");
    assert!(log.contains(&format!("`chown root:root {f}`")), "{log}");
    assert!(!p.path("home").exists(), "{log}");
}

#[test]
fn a_state_directory_through_a_symlinked_component_is_refused_and_its_target_unchanged() {
    require_root();
    let victim = Victim::new();
    let before = victim.snapshot();
    let p = Prefix::new("keyd", "trust-home-intermediate");
    // `<prefix>/var` is a link to the victim's parent: `<prefix>/var/home` is the victim
    let link = p.path("var");
    std::os::unix::fs::symlink(victim.home.parent().unwrap(), &link).unwrap();
    p.keyd_config(&link.join("home"), "");
    let (_, log) = p.refused();
    assert!(log.contains(&format!("could not open the state directory {}", link.join("home").display())), "{log}");
    assert!(log.contains(&format!("{} is a symbolic link", link.display())), "{log}");
    assert_eq!(victim.snapshot(), before, "the directory behind the link changed owner or mode:\n{log}");

    // a missing state directory beneath the link: nothing is created behind it either
    let p = Prefix::new("keyd", "trust-home-intermediate-new");
    let link = p.path("var");
    std::os::unix::fs::symlink(&victim.home, &link).unwrap();
    p.keyd_config(&link.join("new/home"), "");
    let (_, log) = p.refused();
    assert!(log.contains(&format!("{} is a symbolic link", link.display())), "{log}");
    assert!(!victim.home.join("new").exists(), "a directory was created behind the link:\n{log}");
    assert_eq!(victim.snapshot(), before);
}

#[test]
fn a_state_directory_that_is_a_symlink_is_refused_and_its_target_unchanged() {
    require_root();
    let victim = Victim::new();
    let before = victim.snapshot();
    let p = Prefix::new("keyd", "trust-home-final");
    let link = p.path("home");
    std::os::unix::fs::symlink(&victim.home, &link).unwrap();
    p.keyd_config(&link, "");
    let (_, log) = p.refused();
    assert!(log.contains(&format!("{} is a symbolic link", link.display())), "{log}");
    assert_eq!(victim.snapshot(), before, "the link's target changed owner or mode:\n{log}");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
}

#[test]
fn a_preloaded_key_directory_through_a_symlink_is_refused() {
    require_root();
    let victim = Victim::new();
    let before = victim.snapshot();
    let p = Prefix::new("keyd", "trust-preloaded");
    let link = p.path("keys");
    std::os::unix::fs::symlink(&victim.home, &link).unwrap();
    let uri = format!("file://{}", link.join("precious").display());
    p.keyd_config(&p.path("home"), &format!("[preloaded_keys]\nk = {}\n", toml_str(&uri)));
    let (_, log) = p.refused();
    assert!(log.contains(&format!("{} is a symbolic link", link.display())), "{log}");
    assert_eq!(victim.snapshot(), before);
}

#[test]
fn a_tpm_device_that_is_a_regular_file_or_a_link_to_etc_shadow_is_refused() {
    require_root();
    // a regular file
    let p = Prefix::new("tpmd", "trust-tcti-file");
    let file = p.path("not-a-tpm");
    write(&file, "", 0o600);
    p.tpmd_config(&format!("device:{}", file.display()));
    let before = stat(&file);
    let (_, log) = p.refused();
    assert!(
        log.contains(&format!("refusing the TPM device {}: it is a regular file, not a character device", file.display())),
        "{log}"
    );
    assert_eq!(stat(&file), before);

    // a link to /etc/shadow: refused before any open for writing; /etc/shadow is only stat'ed
    let shadow = Path::new("/etc/shadow");
    let shadow_before = stat(shadow);
    let p = Prefix::new("tpmd", "trust-tcti-shadow");
    let link = p.path("tpm0");
    std::os::unix::fs::symlink(shadow, &link).unwrap();
    p.tpmd_config(&format!("device:{}", link.display()));
    let (_, log) = p.refused();
    assert!(
        log.contains(&format!("refusing the TPM device {}: it is a symbolic link, not a character device", link.display())),
        "{log}"
    );
    assert_eq!(stat(shadow), shadow_before, "/etc/shadow changed");

    // a character device node outside /dev (made here: /dev/null's numbers)
    let p = Prefix::new("tpmd", "trust-tcti-outside-dev");
    let node = p.path("null");
    nix::sys::stat::mknod(&node, nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::from_bits_truncate(0o600), nix::sys::stat::makedev(1, 3))
        .expect("mknod");
    p.tpmd_config(&format!("device:{}", node.display()));
    let (_, log) = p.refused();
    assert!(log.contains(&format!("refusing the TPM device {}: a TPM device must be beneath /dev", node.display())), "{log}");

    // /dev reached through a link
    let p = Prefix::new("tpmd", "trust-tcti-devlink");
    let devlink = p.path("dev");
    std::os::unix::fs::symlink("/dev", &devlink).unwrap();
    p.tpmd_config(&format!("device:{}", devlink.join("null").display()));
    let (_, log) = p.refused();
    assert!(log.contains(&format!("{} is a symbolic link", devlink.display())), "{log}");
}

#[test]
fn a_root_owned_config_starts_and_a_link_at_the_status_file_is_replaced_not_followed() {
    require_root();
    let victim = Victim::new();
    let before = victim.snapshot();
    let p = Prefix::new("keyd", "trust-positive");
    let home = p.path("home");
    p.keyd_config(&home, "");
    // a root-owned 0600 drop-in, as `aziotctl config apply` now writes it
    write(&p.path("config.d/00-super.toml"), "max_requests = 7\n", 0o600);
    // a root-owned policy drop-in
    write(&p.path("policy.d/10-ok.toml"), "[[path]]\npath = \"/usr/share/zoneinfo\"\naccess = \"ro\"\n", 0o644);
    // planted at the status file's path: a link to the victim's file
    std::os::unix::fs::symlink(&victim.file, p.status()).unwrap();

    let mut child = p.spawn();
    let deadline = Instant::now() + TIMEOUT;
    while !std::fs::symlink_metadata(p.status()).is_ok_and(|m| m.file_type().is_file()) {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the broker exited ({status}) with a root-owned config:\n{}", p.log());
        }
        assert!(Instant::now() < deadline, "no status file within {TIMEOUT:?}:\n{}", p.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let status: serde_json::Value = serde_json::from_slice(&std::fs::read(p.status()).unwrap()).unwrap();
    assert!(status["worker_pid"].as_i64().is_some_and(|pid| pid > 0), "{status}");
    assert_eq!(std::fs::read_to_string(&victim.file).unwrap(), "root's");
    assert_eq!(victim.snapshot(), before, "the link's target changed");
    // the state directory is the service user's, 0700
    let (uid, gid) = service_user();
    let h = stat(&home);
    assert_eq!((h.0, h.1, h.2 & 0o7777), (uid, gid, 0o700));
    // no temporary file left beside the status
    let leftovers: Vec<_> = std::fs::read_dir(p.root())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // SAFETY: plain syscall on our own child, not yet reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + TIMEOUT;
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the broker did not stop on SIGTERM:\n{}", p.log());
        std::thread::sleep(Duration::from_millis(10));
    }
}
