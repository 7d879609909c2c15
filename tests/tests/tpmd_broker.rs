//! tpmd through the real topology: the root broker opens the TPM (here a connection to a
//! fresh swtpm) and hands the descriptor to the worker, which runs as aziottpm, confined,
//! and never opens a path or a socket itself.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aziot_tests::crypto::{b64, hmac_sha256, random, unb64};
use aziot_tests::http::{build_request, Conn, Response};
use aziot_tests::keyd::{aziotctl_bin, aziotd_bin, exchange_as, TempDir};
use aziot_tests::Dep;
use aziot_tests::tpmd::{Kill, Swtpm, Tpmd};
use serde_json::json;

#[test]
fn tpmd_serves_from_a_confined_worker_on_a_handed_over_tpm() {
    aziot_tests::require!(Dep::Root, Dep::ServiceUser("aziottpm"), Dep::Swtpm, Dep::Tpm2Tools);
    let dir = TempDir::new("tpmd-broker");
    let root = dir.path();
    let swtpm = Swtpm::start(root);
    let port = swtpm.port;
    let sock = root.join("tpmd.sock");
    std::fs::write(
        root.join("config.toml"),
        format!("tcti = \"swtpm:host=127.0.0.1,port={port}\"\n[endpoints]\naziot_tpmd = \"unix://{}\"\n", sock.display()),
    )
    .unwrap();
    let log = std::fs::File::create(root.join("tpmd.log")).unwrap();
    let broker = Kill(
        Command::new(aziotd_bin())
            .arg("aziot-tpmd")
            .env_clear()
            .env("AZIOT_TPMD_CONFIG", root.join("config.toml"))
            .env("AZIOT_TPMD_CONFIG_DIR", root.join("config.d"))
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let log_text = || std::fs::read_to_string(root.join("tpmd.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !root.join("tpmd.status").exists() {
        assert!(Instant::now() < deadline, "tpmd did not start:\n{}", log_text());
        std::thread::sleep(Duration::from_millis(20));
    }

    // The API answers as the spec says, from the worker.
    let mut conn = Conn::connect(&sock).unwrap();
    let r = conn.request("GET", "/get_tpm_keys?api-version=2020-09-01", None).unwrap();
    assert_eq!(r.status, 200, "{r}\n{}", log_text());
    let keys = r.json();
    for field in ["endorsement_key", "storage_root_key"] {
        let v = keys[field].as_str().unwrap_or_else(|| panic!("{field} in {keys}"));
        assert!(v.len() > 100, "{field}: {v}");
    }
    // Only root and aziotid may call tpmd (a difference from the original, which lets anyone
    // who reaches the socket in): uid 4242 is refused.
    nix::unistd::chown(&sock, None, Some(nix::unistd::Gid::from_raw(aziot_tests::keyd::TEST_GID))).unwrap();
    let refused = exchange_as(4242, &sock, &build_request("GET", "/get_tpm_keys?api-version=2020-09-01", None)).unwrap();
    assert_eq!(refused.status, 401, "{refused}");

    // The worker is aziottpm, without capabilities, under seccomp; the audit agrees.
    let status: serde_json::Value = serde_json::from_slice(&std::fs::read(root.join("tpmd.status")).unwrap()).unwrap();
    let worker = status["worker_pid"].as_i64().unwrap();
    let proc_status = std::fs::read_to_string(format!("/proc/{worker}/status")).unwrap();
    let user = nix::unistd::User::from_name("aziottpm").unwrap().expect("user aziottpm");
    assert!(proc_status.contains(&format!("Uid:\t{0}\t{0}\t{0}\t{0}", user.uid)), "{proc_status}");
    assert!(proc_status.contains("CapEff:\t0000000000000000"), "{proc_status}");
    assert!(proc_status.contains("Seccomp:\t2"), "{proc_status}");
    let audit = Command::new(aziotctl_bin()).args(["policy", "audit", "--run-dir"]).arg(root).output().unwrap();
    assert!(
        audit.status.success(),
        "audit:\n{}{}",
        String::from_utf8_lossy(&audit.stdout),
        String::from_utf8_lossy(&audit.stderr)
    );
    drop(broker);
    drop(swtpm);
}

/// A request to tpmd's socket (api-version appended); a JSON body when `body` is not null.
fn call(tpmd: &Tpmd, method: &str, path: &str, body: &serde_json::Value) -> Response {
    let mut conn = Conn::connect(&tpmd.socket()).unwrap_or_else(|e| panic!("connect: {e}\n{}", tpmd.log()));
    let body = (!body.is_null()).then(|| body.to_string().into_bytes());
    conn.request(method, &format!("{path}?api-version=2020-09-01"), body.as_deref())
        .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", tpmd.log()))
}

/// `get_tpm_keys`: (EK, SRK) as TPM2B_PUBLIC bytes.
fn tpm_keys(tpmd: &Tpmd) -> (Vec<u8>, Vec<u8>) {
    let r = call(tpmd, "GET", "/get_tpm_keys", &serde_json::Value::Null);
    assert_eq!(r.status, 200, "{r}\n{}", tpmd.log());
    let keys = r.json();
    (unb64(keys["endorsement_key"].as_str().unwrap()), unb64(keys["storage_root_key"].as_str().unwrap()))
}

fn import(tpmd: &Tpmd, blob: &[u8]) -> Response {
    call(tpmd, "POST", "/import_auth_key", &json!({"key": b64(blob)}))
}

/// `sign_with_auth_key` over `data`: the digest (asserting 200).
fn sign(tpmd: &Tpmd, data: &[u8]) -> Vec<u8> {
    let r = call(tpmd, "POST", "/sign_with_auth_key", &json!({"data": b64(data)}));
    assert_eq!(r.status, 200, "{r}\n{}", tpmd.log());
    unb64(r.json()["digest"].as_str().expect("digest"))
}

/// `tpm2_hmac -c <handle> -g sha256` over `data` (tpmd must be stopped: one swtpm client).
fn tpm2_hmac(swtpm: &Swtpm, root: &Path, handle: &str, data: &[u8]) -> Vec<u8> {
    let (input, output) = (root.join("hmac.in"), root.join("hmac.out"));
    std::fs::write(&input, data).unwrap();
    let _ = std::fs::remove_file(&output);
    swtpm.tool(&["tpm2_hmac", "-c", handle, "-g", "sha256", "-o", output.to_str().unwrap(), input.to_str().unwrap()]);
    std::fs::read(&output).unwrap()
}

fn persistent_handles(swtpm: &Swtpm) -> String {
    String::from_utf8_lossy(&swtpm.tool(&["tpm2_getcap", "handles-persistent"])).into_owned()
}

/// The offsets of the five TPM2B size prefixes of a DPS blob (spec tpmd.md §7 step 2).
fn item_offsets(blob: &[u8]) -> [usize; 5] {
    let mut offsets = [0; 5];
    let mut at = 0;
    for offset in &mut offsets {
        *offset = at;
        at += 2 + usize::from(u16::from_be_bytes([blob[at], blob[at + 1]]));
    }
    assert_eq!(at, blob.len(), "a built blob has no trailing bytes");
    offsets
}

#[test]
fn auth_key_imported_through_the_broker_signs_and_persists_in_the_tpm() {
    aziot_tests::require!(Dep::Root, Dep::ServiceUser("aziottpm"), Dep::Swtpm, Dep::Tpm2Tools);
    let dir = TempDir::new("tpmd-auth-key");
    let root = dir.path();
    let swtpm = Swtpm::start(root);
    let mut tpmd = Tpmd::start(root, &swtpm.tcti(), "info");
    let (ek, srk) = tpm_keys(&tpmd);

    // the blob a DPS would send for this TPM, carrying k1
    let k1 = random(32);
    let blob = aziot_tpmd::dps_blob::build(&ek, &srk, &k1).unwrap();
    let r = import(&tpmd, &blob);
    assert_eq!(r.status, 200, "{r}\n{}", tpmd.log());
    assert_eq!(r.json(), json!({}));

    let data = b"sr\n1700000000";
    let digest = sign(&tpmd, data);
    assert_eq!(digest, hmac_sha256(&k1, data), "TPM HMAC = software HMAC");
    assert_ne!(sign(&tpmd, b"other"), digest);
    // more than TPM2_MAX_DIGEST_BUFFER (an HMAC sequence), and nothing at all
    let long = random(3000);
    let long_digest = sign(&tpmd, &long);
    assert_eq!(long_digest, hmac_sha256(&k1, &long));
    assert_eq!(sign(&tpmd, b""), hmac_sha256(&k1, b""), "empty data is MACed, not refused");

    // a corrupted blob is refused with 400 and the imported key still signs
    let mut corrupted = blob.clone();
    corrupted[50] ^= 1;
    let r = import(&tpmd, &corrupted);
    assert_eq!(r.status, 400, "{r}");
    let message = r.json()["message"].as_str().unwrap_or_default().to_owned();
    assert!(message.starts_with("could not import auth key\ncaused by: "), "{message}");
    assert!(message.contains("rejected the auth key blob"), "{message}");
    assert_eq!(sign(&tpmd, b"still k1"), hmac_sha256(&k1, b"still k1"));

    // stop tpmd (broker and worker), so that swtpm (one client at a time) serves tpm2-tools
    tpmd.stop();

    // the auth key persists at 0x81000100 (0x81000000 + default auth_key_index 0x100), with
    // the SRK (0x81000001) and the EK (0x81010001)
    let handles = persistent_handles(&swtpm);
    for h in ["0x81000100", "0x81000001", "0x81010001"] {
        assert!(handles.contains(h), "{h} not in tpm2_getcap handles-persistent:\n{handles}");
    }
    // the EK and SRK tpmd returned are the TPM's persistent ones, byte for byte: both are
    // TPM2B_PUBLIC (tpm2_readpublic -f tss writes TPM2B_PUBLIC)
    for (handle, want, what) in [("0x81010001", &ek, "EK"), ("0x81000001", &srk, "SRK")] {
        let file = root.join(format!("{what}.pub"));
        swtpm.tool(&["tpm2_readpublic", "-c", handle, "-f", "tss", "-o", file.to_str().unwrap()]);
        assert_eq!(&std::fs::read(&file).unwrap(), want, "tpm2_readpublic -f tss -c {handle} = tpmd's {what}");
    }
    // the key at that handle MACs as tpmd did: tpm2_hmac = tpmd's digest (= software HMAC)
    assert_eq!(tpm2_hmac(&swtpm, root, "0x81000100", data), digest, "tpm2_hmac over the same data");
    assert_eq!(tpm2_hmac(&swtpm, root, "0x81000100", &long), long_digest, "tpm2_hmac over 3000 bytes");
}

#[test]
fn a_restarted_tpmd_reuses_the_persisted_ek_srk_and_auth_key() {
    aziot_tests::require!(Dep::Root, Dep::ServiceUser("aziottpm"), Dep::Swtpm, Dep::Tpm2Tools);
    let dir = TempDir::new("tpmd-restart");
    let root = dir.path();
    let swtpm = Swtpm::start(root);
    let mut tpmd = Tpmd::start(root, &swtpm.tcti(), "info");
    let first_worker = tpmd.worker_pid();
    let (ek, srk) = tpm_keys(&tpmd);
    assert_eq!(tpm_keys(&tpmd), (ek.clone(), srk.clone()), "stable within one run");
    let k1 = random(32);
    let r = import(&tpmd, &aziot_tpmd::dps_blob::build(&ek, &srk, &k1).unwrap());
    assert_eq!(r.status, 200, "{r}\n{}", tpmd.log());
    tpmd.stop();

    // a new broker and worker on the same TPM state: the same EK and SRK bytes (reused, not
    // recreated), and the imported key still signs
    for round in 0..2 {
        let mut again = Tpmd::start(root, &swtpm.tcti(), "info");
        assert_ne!(again.worker_pid(), first_worker, "a new worker");
        assert_eq!(tpm_keys(&again), (ek.clone(), srk.clone()), "round {round}: EK and SRK after a restart");
        let data = format!("after restart {round}");
        assert_eq!(sign(&again, data.as_bytes()), hmac_sha256(&k1, data.as_bytes()), "round {round}\n{}", again.log());
        again.stop();
    }
    // still exactly one EK, one SRK and one auth key
    let handles = persistent_handles(&swtpm);
    for h in ["0x81000100", "0x81000001", "0x81010001"] {
        assert_eq!(handles.matches(h).count(), 1, "{h}:\n{handles}");
    }
}

#[test]
fn a_non_default_auth_key_index_is_where_the_key_persists() {
    aziot_tests::require!(Dep::Root, Dep::ServiceUser("aziottpm"), Dep::Swtpm, Dep::Tpm2Tools);
    let dir = TempDir::new("tpmd-index");
    let root = dir.path();
    let swtpm = Swtpm::start(root);
    // the spec's example index (handle 0x81101010), as a TOML integer with underscores
    let mut tpmd = Tpmd::start_with(root, &swtpm.tcti(), "info", "auth_key_index = 0x10_10_10");
    let (ek, srk) = tpm_keys(&tpmd);
    let k = random(32);
    let r = import(&tpmd, &aziot_tpmd::dps_blob::build(&ek, &srk, &k).unwrap());
    assert_eq!(r.status, 200, "{r}\n{}", tpmd.log());
    let data = b"myhub.azure-devices.net%2Fdevices%2Fdev1\n1700000000";
    let digest = sign(&tpmd, data);
    assert_eq!(digest, hmac_sha256(&k, data));
    tpmd.stop();

    let handles = persistent_handles(&swtpm);
    assert!(handles.contains("0x81101010"), "the configured handle:\n{handles}");
    assert!(!handles.contains("0x81000100"), "not the default handle:\n{handles}");
    assert_eq!(tpm2_hmac(&swtpm, root, "0x81101010", data), digest);

    // the same index with a hex string (the form the super-config template shows) finds it
    let mut tpmd = Tpmd::start_with(root, &swtpm.tcti(), "info", "auth_key_index = \"0x10_10_10\"");
    assert_eq!(sign(&tpmd, data), digest, "{}", tpmd.log());
    tpmd.stop();
}

#[test]
fn bad_input_through_the_broker_is_refused_and_the_imported_key_still_signs() {
    aziot_tests::require!(Dep::Root, Dep::ServiceUser("aziottpm"), Dep::Swtpm, Dep::Tpm2Tools);
    let dir = TempDir::new("tpmd-bad-input");
    let root = dir.path();
    let swtpm = Swtpm::start(root);
    let tpmd = Tpmd::start(root, &swtpm.tcti(), "info");
    let (ek, srk) = tpm_keys(&tpmd);
    let k1 = random(32);
    let blob = aziot_tpmd::dps_blob::build(&ek, &srk, &k1).unwrap();
    assert_eq!(import(&tpmd, &blob).status, 200, "{}", tpmd.log());
    let still_signs = |what: &str| {
        let data = random(40);
        assert_eq!(sign(&tpmd, &data), hmac_sha256(&k1, &data), "after {what}: the imported key signs\n{}", tpmd.log());
    };

    // Blobs that decode but are not a DPS blob: 400 with the cause (spec: upstream answers
    // 500 `internal error`; the difference is recorded in docs/compatibility.md).
    let offsets = item_offsets(&blob);
    let with_prefix = |item: usize, len: u16| {
        let mut b = blob.clone();
        b[offsets[item]..offsets[item] + 2].copy_from_slice(&len.to_be_bytes());
        b
    };
    let rest_after_public = blob.len() - offsets[4] - 2;
    let mut short_public = blob[..blob.len() - 1].to_vec();
    let at = offsets[4];
    short_public[at..at + 2].copy_from_slice(&u16::try_from(rest_after_public - 1).unwrap().to_be_bytes());
    let mut flipped = blob.clone();
    flipped[offsets[2] + 20] ^= 0x55;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("an empty key", vec![], "the blob ends inside credentialBlob"),
        ("one byte", blob[..1].to_vec(), "the blob ends inside credentialBlob"),
        ("a truncated blob", blob[..blob.len() - 10].to_vec(), "the blob ends inside objectPublic"),
        ("the first 100 bytes", blob[..100].to_vec(), "the blob ends inside"),
        ("an empty first item", vec![0, 0], "credentialBlob is empty"),
        ("an empty secret", with_prefix(1, 0), "secret is empty"),
        ("a size prefix beyond the end", with_prefix(4, u16::try_from(rest_after_public + 1).unwrap()), "the blob ends inside objectPublic"),
        ("a size prefix above the TPM maximum", with_prefix(0, 0xFFFF), "credentialBlob is 65535 bytes, more than the TPM's maximum"),
        ("an objectPublic one byte short inside", short_public, "objectPublic failed with TSS2_RC 0xfffffffe (the structure does not fill its size field)"),
        ("a corrupted duplicate", flipped, "rejected the auth key blob"),
    ];
    for (what, bad, needle) in &cases {
        let r = import(&tpmd, bad);
        assert_eq!(r.status, 400, "{what}: {r}\n{}", tpmd.log());
        let message = r.json()["message"].as_str().unwrap_or_default().to_owned();
        assert!(message.starts_with("could not import auth key\ncaused by: "), "{what}: {message}");
        assert!(message.contains(needle), "{what}: {message:?} should mention {needle:?}");
        still_signs(what);
    }

    // Bodies that do not decode: invalid base64, a missing or mistyped field, bad JSON: 422
    // with serde's message (framework, common-http.md §5); no body: 400.
    let undecodable = [
        ("/import_auth_key", r#"{"key":"a"}"#, "invalid base64 (length)"),
        ("/import_auth_key", r#"{"key":"YQ"}"#, "unpadded base64"),
        ("/import_auth_key", r#"{"key":"@@@@"}"#, "invalid base64 (alphabet)"),
        ("/import_auth_key", r#"{"blob":"YQ=="}"#, "missing key"),
        ("/import_auth_key", r#"{"key":42}"#, "key not a string"),
        ("/import_auth_key", r#"{"key":"YQ=="#, "truncated JSON"),
        ("/sign_with_auth_key", r#"{"data":"a"}"#, "invalid base64 data"),
        ("/sign_with_auth_key", r#"{"dat":"YQ=="}"#, "missing data"),
    ];
    for (path, body, what) in undecodable {
        let mut conn = Conn::connect(&tpmd.socket()).unwrap();
        let r = conn
            .request("POST", &format!("{path}?api-version=2020-09-01"), Some(body.as_bytes()))
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(r.status, 422, "{what}: {r}");
        assert!(!r.message().is_empty(), "{what}: a message: {r}");
        still_signs(what);
    }
    let r = call(&tpmd, "POST", "/import_auth_key", &serde_json::Value::Null);
    assert_eq!((r.status, r.json()), (400, json!({"message": "missing request body"})));
    let r = call(&tpmd, "POST", "/sign_with_auth_key", &serde_json::Value::Null);
    assert_eq!((r.status, r.json()), (400, json!({"message": "missing request body"})));
    still_signs("no body");

    // the worker survived all of it, and nothing left a transient object or session behind
    // that would exhaust swtpm's slots: a new key still imports
    let k2 = random(32);
    assert_eq!(import(&tpmd, &aziot_tpmd::dps_blob::build(&ek, &srk, &k2).unwrap()).status, 200);
    assert_eq!(sign(&tpmd, b"k2"), hmac_sha256(&k2, b"k2"));
}

/// Starts `aziotd aziot-tpmd` with `tcti` under `root`, expects it to exit 1 on its own (within
/// 20 s); its log.
fn refused_at_start(root: &Path, tcti: &str) -> String {
    let mut broker = Tpmd::spawn(root, tcti, "info", "");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = broker.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "{tcti}: the broker kept running");
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = std::fs::read_to_string(root.join("tpmd.log")).unwrap();
    assert_eq!(status.code(), Some(1), "{tcti}: {status}\n{log}");
    log
}

#[test]
fn a_missing_tpm_device_stops_the_broker_with_the_path_in_the_message() {
    aziot_tests::require!(Dep::Root, Dep::ServiceUser("aziottpm"), Dep::Swtpm, Dep::Tpm2Tools);
    let mut cases = vec![("device:/nonexistent/tpmrm0", vec!["could not open the TPM /nonexistent/tpmrm0"])];
    // the default device TCTI tries /dev/tpmrm0, then /dev/tpm0 (this machine has neither)
    if !Path::new("/dev/tpmrm0").exists() && !Path::new("/dev/tpm0").exists() {
        cases.push(("device", vec!["could not open the TPM /dev/tpm0 (after /dev/tpmrm0: No such file or directory"]));
    }
    for (tcti, needles) in cases {
        let dir = TempDir::new("tpmd-no-device");
        let root = dir.path();
        let log = refused_at_start(root, tcti);
        for needle in needles {
            assert!(log.contains(needle), "{tcti}: the message names the device ({needle:?}):\n{log}");
        }
        assert!(log.contains("No such file or directory"), "{tcti}: and the cause:\n{log}");
        assert!(!root.join("tpmd.status").exists(), "{tcti}: no worker was started");
        assert!(!root.join("tpmd.sock").exists(), "{tcti}: no socket was bound");
    }
}

#[test]
fn a_simulator_off_this_machine_is_refused() {
    aziot_tests::require!(Dep::Root, Dep::ServiceUser("aziottpm"), Dep::Swtpm, Dep::Tpm2Tools);
    // 192.0.2.1 is TEST-NET-1: never this machine; the broker refuses before connecting
    let dir = TempDir::new("tpmd-remote-sim");
    let root = dir.path();
    let log = refused_at_start(root, "swtpm:host=192.0.2.1,port=2321");
    assert!(log.contains("a TPM simulator must listen on a loopback address"), "{log}");
    assert!(!root.join("tpmd.status").exists() && !root.join("tpmd.sock").exists(), "{log}");
}

/// A character device that speaks the raw TPM stream, as `/dev/tpmrm0` does, for a machine
/// without a TPM: the slave side of a pseudo-terminal in raw mode, whose master side a thread
/// relays command by command to swtpm's command port. The broker opens the slave's path
/// (`/dev/pts/N`) as it would open a TPM device and hands the descriptor over.
struct PtyTpm {
    path: std::path::PathBuf,
    relayed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl PtyTpm {
    fn start(swtpm_port: u16) -> PtyTpm {
        use std::io::{Read, Write};
        use std::os::fd::FromRawFd;

        // SAFETY: FFI calls with valid arguments; the master fd is checked and then owned by
        // a File; `name` is a buffer of the given length that ptsname_r NUL-terminates.
        let (master, path) = unsafe {
            let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            assert!(fd >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
            let master = std::fs::File::from_raw_fd(fd);
            assert_eq!(libc::grantpt(fd), 0, "grantpt: {}", std::io::Error::last_os_error());
            assert_eq!(libc::unlockpt(fd), 0, "unlockpt: {}", std::io::Error::last_os_error());
            let mut name = [0 as libc::c_char; 128];
            assert_eq!(libc::ptsname_r(fd, name.as_mut_ptr(), name.len()), 0, "ptsname_r");
            let path = std::ffi::CStr::from_ptr(name.as_ptr()).to_str().expect("utf-8 pts name").to_owned();
            // raw mode (no echo, no line editing, no CR/LF translation): the termios of a pty
            // pair set through the master applies to the slave
            let mut termios: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(fd, &mut termios), 0, "tcgetattr");
            libc::cfmakeraw(&mut termios);
            assert_eq!(libc::tcsetattr(fd, libc::TCSANOW, &termios), 0, "tcsetattr");
            (master, path)
        };
        let relayed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = std::sync::Arc::clone(&relayed);
        std::thread::spawn(move || {
            let mut master = master;
            let mut tpm = std::net::TcpStream::connect(("127.0.0.1", swtpm_port)).expect("connect swtpm");
            // one command (10-byte header with its total size, then the rest), then its
            // response the same way; ends when the device's last user closes it (EIO)
            let read_message = |from: &mut dyn Read| -> Option<Vec<u8>> {
                let mut message = vec![0u8; 10];
                from.read_exact(&mut message).ok()?;
                let size = u32::from_be_bytes(message[2..6].try_into().unwrap()) as usize;
                assert!((10..=4096).contains(&size), "TPM message size {size}");
                message.resize(size, 0);
                from.read_exact(&mut message[10..]).ok()?;
                Some(message)
            };
            while let Some(command) = read_message(&mut master) {
                tpm.write_all(&command).expect("to swtpm");
                let response = read_message(&mut tpm).expect("swtpm's response");
                master.write_all(&response).expect("to the device's user");
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        PtyTpm { path: path.into(), relayed }
    }
}

#[test]
fn a_device_tcti_is_opened_by_the_broker_and_driven_by_the_worker() {
    aziot_tests::require!(Dep::Root, Dep::ServiceUser("aziottpm"), Dep::Swtpm, Dep::Tpm2Tools);
    use std::os::unix::fs::FileTypeExt as _;

    let dir = TempDir::new("tpmd-device");
    let root = dir.path();
    let swtpm = Swtpm::start(root);
    let device = PtyTpm::start(swtpm.port);
    assert!(std::fs::metadata(&device.path).unwrap().file_type().is_char_device());
    let tcti = format!("device:{}", device.path.display());
    let mut tpmd = Tpmd::start(root, &tcti, "info");

    // the worker, confined, drives the TPM through the descriptor the broker opened
    let worker = tpmd.worker_pid();
    let proc_status = std::fs::read_to_string(format!("/proc/{worker}/status")).unwrap();
    assert!(proc_status.contains("Seccomp:\t2"), "{proc_status}");
    let (ek, srk) = tpm_keys(&tpmd);
    assert_eq!(ek.len(), 316, "an RSA-2048 EK as TPM2B_PUBLIC");
    assert_eq!(srk.len(), 284, "an RSA-2048 SRK as TPM2B_PUBLIC");
    let k = random(32);
    assert_eq!(import(&tpmd, &aziot_tpmd::dps_blob::build(&ek, &srk, &k).unwrap()).status, 200, "{}", tpmd.log());
    let data = random(2000);
    let digest = sign(&tpmd, &data);
    assert_eq!(digest, hmac_sha256(&k, &data));
    // every command went through the device (startup, EK/SRK creation, import, HMAC sequence)
    assert!(device.relayed.load(std::sync::atomic::Ordering::SeqCst) > 10);
    // the worker holds the device, not a socket: /proc/<worker>/fd links to the pts path
    let links: Vec<String> = std::fs::read_dir(format!("/proc/{worker}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert!(links.contains(&device.path.display().to_string()), "{links:?}");
    tpmd.stop();

    // what the device reached is the swtpm: tpm2-tools see the same EK and key
    let file = root.join("ek.pub");
    swtpm.tool(&["tpm2_readpublic", "-c", "0x81010001", "-f", "tss", "-o", file.to_str().unwrap()]);
    assert_eq!(std::fs::read(&file).unwrap(), ek);
    assert_eq!(tpm2_hmac(&swtpm, root, "0x81000100", &data), digest);
}
