//! The `openssl` CLI plumbing shared by the suites of the OpenSSL engine (tests/tests/engine.rs)
//! and of the OpenSSL 3 provider (tests/tests/provider.rs), both `aziot_keys.so`:
//!
//! * [`Scratch`]: a private directory holding a copy of the built cdylib (under `engines/` or
//!   `modules/`, see [`Plugin`]) and the files of a test, and `openssl` runs in it — as a keyd
//!   principal with the plugin directory and keyd's endpoint in an otherwise empty environment,
//!   or as root without the plugin (the verifier, the CA);
//! * [`public_key`]: a key pair's public key built from keyd's `/parameters` (never by the code
//!   under test), and [`assert_signature_verifies`], [`encrypt_secret`] with it;
//! * [`make_ca`], [`issue`]: a test CA, a server certificate and client certificates;
//! * [`SServer`]: `openssl s_server -Verify 1` on a free loopback port, its output collected.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openssl::pkey::{PKey, Public};

use crate::crypto::{ec_public_from_point, rsa_public, unb64};
use crate::keyd::{profile_dir, Backend, TempDir};
use crate::{Api, Dep, Keyd};

/// `-pkeyopt` options for RSA-OAEP with SHA-256.
pub const OAEP_SHA256: [&str; 4] = [
    "-pkeyopt",
    "rsa_padding_mode:oaep",
    "-pkeyopt",
    "rsa_oaep_md:sha256",
];

/// `-pkeyopt` options for RSA-PSS over SHA-256 with a 32-byte salt.
pub const PSS_SHA256: [&str; 6] = [
    "-pkeyopt",
    "digest:sha256",
    "-pkeyopt",
    "rsa_padding_mode:pss",
    "-pkeyopt",
    "rsa_pss_saltlen:32",
];

/// The dependencies of these suites on `backend` (root, keyd's service user, the openssl CLI,
/// SoftHSM2 for [`Backend::SoftHsm`]), through [`crate::require_deps`].
pub fn deps_for(backend: Backend) -> bool {
    let mut deps = vec![
        Dep::Root,
        Dep::ServiceUser(crate::keyd::SERVICE_USER),
        Dep::OpensslCli,
    ];
    if backend == Backend::SoftHsm {
        deps.push(Dep::SoftHsm);
    }
    crate::require_deps(&deps)
}

/// keyd on `backend` with `uid` a principal for the keys matching `keys` (a glob).
pub fn start_keyd(backend: Backend, uid: u32, keys: &str) -> Keyd {
    Keyd::builder()
        .backend(backend)
        .extra(&format!(
            "[[principal]]\nuid = {uid}\nkeys = [\"{keys}\"]\n"
        ))
        .start()
}

/// The built cdylib (engine and provider in one): `$AZIOT_ENGINE_SO`, else the one cargo built
/// with the test (`target/<profile>/deps/`, then `target/<profile>/`).
pub fn built_cdylib() -> PathBuf {
    if let Some(p) = std::env::var_os("AZIOT_ENGINE_SO") {
        return PathBuf::from(p);
    }
    let name = "libaziot_key_openssl_engine.so";
    let dir = profile_dir();
    [dir.join("deps").join(name), dir.join(name)]
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found under {}: `cargo build -p aziot-key-engine`",
                dir.display()
            )
        })
}

/// How OpenSSL finds the copy of `aziot_keys.so` in a [`Scratch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plugin {
    /// An ENGINE: `engines/aziot_keys.so`, `OPENSSL_ENGINES`.
    Engine,
    /// An OpenSSL 3 provider: `modules/aziot_keys.so`, `OPENSSL_MODULES`.
    Provider,
}

impl Plugin {
    /// The plugin directory's name in the scratch directory.
    pub fn dir_name(self) -> &'static str {
        match self {
            Plugin::Engine => "engines",
            Plugin::Provider => "modules",
        }
    }

    /// The environment variable that points OpenSSL at the plugin directory.
    pub fn env_var(self) -> &'static str {
        match self {
            Plugin::Engine => "OPENSSL_ENGINES",
            Plugin::Provider => "OPENSSL_MODULES",
        }
    }
}

/// A scratch directory with `<engines|modules>/aziot_keys.so`, readable by other uids.
pub struct Scratch {
    dir: TempDir,
    plugin: Plugin,
}

impl Scratch {
    pub fn new(tag: &str, plugin: Plugin) -> Scratch {
        let dir = TempDir::new(tag);
        let plugins = dir.path().join(plugin.dir_name());
        std::fs::create_dir(&plugins).expect("mkdir the plugin directory");
        std::fs::set_permissions(&plugins, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let so = plugins.join("aziot_keys.so");
        std::fs::copy(built_cdylib(), &so).expect("copy the cdylib");
        std::fs::set_permissions(&so, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        Scratch { dir, plugin }
    }

    /// The scratch directory (every `openssl` runs in it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The copy of `aziot_keys.so`.
    pub fn plugin_so(&self) -> PathBuf {
        self.path(self.plugin.dir_name()).join("aziot_keys.so")
    }

    /// Writes a file world-readable (the CLI runs as another uid).
    pub fn write(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, data).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        p
    }

    /// `program <args>` as `uid`/`gid` (no supplementary groups; as is for uid 0) with the plugin
    /// directory and keyd's endpoint in an otherwise empty environment, stdin from /dev/null.
    pub fn cmd_as(&self, program: &str, uid: u32, gid: u32, keyd: &Keyd, args: &[&str]) -> Command {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(self.dir.path())
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into()),
            )
            .env(self.plugin.env_var(), self.path(self.plugin.dir_name()))
            .env(
                "AZIOT_KEYD_ENDPOINT",
                format!("unix://{}", keyd.socket().display()),
            )
            .stdin(Stdio::null());
        if uid != 0 {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// `openssl <args>` as [`Scratch::cmd_as`] runs it; its output, whatever the status.
    pub fn openssl_as(&self, uid: u32, gid: u32, keyd: &Keyd, args: &[&str]) -> Output {
        self.cmd_as("openssl", uid, gid, keyd, args)
            .output()
            .expect("run openssl")
    }

    /// `openssl <args>` as root, without the plugin (the verifier, the CA); its output, whatever
    /// the status.
    pub fn openssl_plain(&self, args: &[&str]) -> Output {
        Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("run openssl")
    }

    /// [`Scratch::openssl_plain`], which must succeed.
    pub fn openssl(&self, args: &[&str]) -> Output {
        let out = self.openssl_plain(args);
        assert!(
            out.status.success(),
            "openssl {args:?} failed:\n{}",
            text(&out)
        );
        out
    }
}

/// A process's status, stdout and stderr, for assertion messages.
pub fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `out`, which must have succeeded (`what` names it in the failure).
pub fn ok(out: Output, what: &str) -> Output {
    assert!(out.status.success(), "{what} failed:\n{}", text(&out));
    out
}

/// The public key of a key pair as keyd's `/parameters` describe it (built here, not by the code
/// under test).
pub fn public_key(api: &Api, handle: &str) -> PKey<Public> {
    match api.param(handle, "algorithm").as_str() {
        "ECDSA" => PKey::from_ec_key(ec_public_from_point(&unb64(&api.param(handle, "ec-point"))))
            .expect("pkey"),
        "RSA" => PKey::from_rsa(rsa_public(
            &unb64(&api.param(handle, "rsa-modulus")),
            &unb64(&api.param(handle, "rsa-exponent")),
        ))
        .expect("pkey"),
        other => panic!("algorithm {other}"),
    }
}

/// Writes `key` as a PEM public key file `name`.
pub fn write_public(s: &Scratch, name: &str, key: &PKey<Public>) -> PathBuf {
    s.write(name, &key.public_key_to_pem().expect("pem"))
}

/// The signature in `sig` over `digest` verifies with `pubkey` (`pkeyutl -verify <opts>` as root,
/// without the plugin), and does not over `digest` with one bit flipped (written to
/// `digest.bad`): the check can fail.
pub fn assert_signature_verifies(s: &Scratch, pubkey: &Path, opts: &[&str]) {
    let mut bad = std::fs::read(s.path("digest")).expect("digest");
    bad[0] ^= 1;
    s.write("digest.bad", &bad);
    let pubkey = pubkey.to_str().expect("utf-8");
    for (digest, good) in [("digest", true), ("digest.bad", false)] {
        let mut verify = vec![
            "pkeyutl", "-verify", "-pubin", "-inkey", pubkey, "-in", digest, "-sigfile", "sig",
        ];
        verify.extend_from_slice(opts);
        let out = s.openssl_plain(&verify);
        let verified = out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains("Signature Verified Successfully");
        assert_eq!(verified, good, "{opts:?} {digest}: {}", text(&out));
        assert_eq!(
            out.status.success(),
            good,
            "{opts:?} {digest}: {}",
            text(&out)
        );
    }
}

/// `s_client` (its output `out`) completed the mTLS handshake, and `s_server` (its output `seen`)
/// saw and verified the client certificate for `CN=<cn>`; `context` prefixes the failure.
pub fn assert_mtls(out: &Output, seen: &str, cn: &str, context: &str) {
    let client = text(out);
    assert!(
        out.status.success() && client.contains("CONNECTION ESTABLISHED"),
        "{context}: s_client failed:\n{client}\n--- s_server ---\n{seen}"
    );
    assert!(
        seen.contains(&format!("CN = {cn}")) && seen.contains("verify return:1"),
        "{context}: s_server did not verify the client certificate:\n{seen}\n--- s_client ---\n{client}"
    );
    assert!(!seen.contains("verify error"), "{context}: {seen}");
}

/// Encrypts the file `secret` to `ct` (world-readable) with `pubkey` (`pkeyutl -encrypt <opts>`
/// as root, without the plugin).
pub fn encrypt_secret(s: &Scratch, pubkey: &Path, opts: &[&str]) {
    let mut enc = vec![
        "pkeyutl",
        "-encrypt",
        "-pubin",
        "-inkey",
        pubkey.to_str().expect("utf-8"),
        "-in",
        "secret",
        "-out",
        "ct",
    ];
    enc.extend_from_slice(opts);
    s.openssl(&enc);
    std::fs::set_permissions(s.path("ct"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
}

/// A test CA (`ca.pem`, `ca.key`, subject `CN=<ca_name>`) and a server certificate for 127.0.0.1
/// (`server.pem`, `server.key`), by the openssl CLI without the plugin.
pub fn make_ca(s: &Scratch, ca_name: &str) {
    s.openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        &format!("/CN={ca_name}"),
        "-days",
        "2",
    ]);
    s.openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
        "-addext",
        "subjectAltName=IP:127.0.0.1",
    ]);
    s.openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-copy_extensions",
        "copyall",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
    ]);
    std::fs::set_permissions(s.path("ca.pem"), std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
}

/// Writes the CSR as `<name>.csr` and issues `<name>.pem` (world-readable) from it with the
/// test CA of [`make_ca`].
pub fn issue(s: &Scratch, name: &str, csr_pem: &[u8]) -> PathBuf {
    let csr = s.write(&format!("{name}.csr"), csr_pem);
    let cert = s.path(&format!("{name}.pem"));
    s.openssl(&[
        "x509",
        "-req",
        "-in",
        csr.to_str().expect("utf-8"),
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        cert.to_str().expect("utf-8"),
        "-days",
        "2",
    ]);
    std::fs::set_permissions(&cert, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    cert
}

/// `openssl s_server -Verify 1` (optionally `-www`) with the certificates of [`make_ca`] on a
/// free loopback port, serving one connection, its output collected.
pub struct SServer {
    child: Child,
    /// s_server quits at EOF on its stdin: kept open while it serves.
    stdin: Option<std::process::ChildStdin>,
    port: u16,
    output: Arc<Mutex<String>>,
}

impl SServer {
    /// Starts it and waits (with a deadline) until it accepts.
    pub fn start(s: &Scratch, www: bool) -> SServer {
        SServer::start_with(s, www, &[])
    }

    /// [`SServer::start`] with more `s_server` options (e.g. `-tls1_2`).
    pub fn start_with(s: &Scratch, www: bool, extra: &[&str]) -> SServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let mut cmd = Command::new("openssl");
        cmd.args([
            "s_server",
            "-accept",
            &format!("127.0.0.1:{port}"),
            "-naccept",
            "1",
            "-Verify",
            "1",
            "-verify_return_error",
            "-CAfile",
            "ca.pem",
            "-cert",
            "server.pem",
            "-key",
            "server.key",
        ]);
        if www {
            cmd.arg("-www");
        }
        cmd.args(extra);
        let mut child = cmd
            .current_dir(s.dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("spawn s_server");
        let output = Arc::new(Mutex::new(String::new()));
        for pipe in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let output = Arc::clone(&output);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut o = output.lock().expect("lock");
                    o.push_str(&line);
                    o.push('\n');
                }
            });
        }
        let stdin = child.stdin.take();
        let server = SServer {
            child,
            stdin,
            port,
            output,
        };
        server.wait_for("ACCEPT", Duration::from_secs(10));
        server
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its output so far.
    pub fn output(&self) -> String {
        self.output.lock().expect("lock").clone()
    }

    /// Polls its output until it contains `needle`; fails after `timeout`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.output().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "s_server did not print {needle:?} within {timeout:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for s_server to end (it serves one connection); its output.
    pub fn finish(mut self) -> String {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().expect("try_wait").is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // the reader threads drain the pipes until EOF
        let deadline = Instant::now() + Duration::from_secs(2);
        while Arc::strong_count(&self.output) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.output()
    }
}

impl Drop for SServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
