//! A fresh swtpm per test, on random free loopback ports.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Swtpm {
    child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

fn random_port() -> u16 {
    let mut b = [0u8; 2];
    openssl::rand::rand_bytes(&mut b).expect("random bytes");
    20000 + (u16::from_be_bytes(b) % 40000)
}

fn free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

impl Swtpm {
    /// Starts swtpm on a fresh state directory.
    pub fn start() -> Swtpm {
        let dir = tempfile::tempdir().expect("tempdir");
        let (child, port) = spawn(dir.path());
        Swtpm { child, port, dir }
    }

    /// Stops swtpm and starts a new process on the same state.
    pub fn restart(&mut self) {
        self.stop();
        let (child, port) = spawn(self.dir.path());
        self.child = child;
        self.port = port;
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The TCTI string for tpmd and tpm2-tools.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Runs a tpm2-tools command against this swtpm; panics unless it succeeds.
    pub fn tool(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new(args[0])
            .args(&args[1..])
            .env("TPM2TOOLS_TCTI", self.tcti())
            .output()
            .expect("run tpm2-tools");
        assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn(state: &Path) -> (Child, u16) {
    for _ in 0..50 {
        let port = random_port();
        if !free(port) || !free(port + 1) {
            continue;
        }
        let mut child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", state.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm is installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().expect("wait swtpm") {
                // Lost a race for the port: try another.
                eprintln!("swtpm exited early ({status}); retrying");
                break;
            }
            if TcpStream::connect(("127.0.0.1", port + 1)).is_ok() {
                return (child, port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("could not start swtpm");
}

/// A tpmd config for this swtpm.
pub fn config(swtpm: &Swtpm, extra: &str) -> aziot_tpmd::Config {
    toml::from_str(&format!("tcti = {:?}\n{extra}", swtpm.tcti())).expect("valid config")
}

/// Software HMAC-SHA256.
pub fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let key = openssl::pkey::PKey::hmac(key).unwrap();
    let mut s = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &key).unwrap();
    s.update(data).unwrap();
    s.sign_to_vec().unwrap()
}

pub fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0; n];
    openssl::rand::rand_bytes(&mut v).unwrap();
    v
}
