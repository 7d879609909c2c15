//! The fault suite's storage faults (issue 17 §2), for every service that writes state, each
//! through its broker and confined worker:
//!
//! * a full disk — a small tmpfs as the state directory, filled to the last byte: the write
//!   that does not fit answers 500 and the log names the file and the cause; nothing written
//!   before is lost, changed or left half-written; the same request succeeds once space
//!   returns;
//! * unreadable or corrupt state files (truncated / garbage content, mode 000, owned by another
//!   user): a clear error naming the file, everything else still served, the service running;
//! * kill -9 of the worker in the middle of each kind of write: every file is the old or the new
//!   one, never torn (keyd's version is tests/tests/keyd_store.rs
//!   `kill9_during_writes_leaves_no_torn_files`; certd's issuances are tests/tests/certd_issue.rs
//!   `kill_9_of_the_worker_during_issuances_...`).
//!
//! tpmd writes no state (it has no state directory: its keys live in the TPM).

use aziot_tests::wait_for;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use aziot_tests::api::{handle_of, V2021};
use aziot_tests::crypto::{b64, hmac_sha256, key_file_name, random};
use aziot_tests::keyd::file_backend_only;
use aziot_tests::storage_fault::{snapshot, temporaries, Tmpfs};
use aziot_tests::Keyd;
use serde_json::json;

/// Big enough for the state of each scenario, small enough to fill at once.
const TMPFS_SIZE: u64 = 1 << 20;

/// Polls `f` until it is true (max `timeout`).

/// The uid of a user that is neither root nor the worker's (owner of a planted file).
fn other_user() -> nix::unistd::Uid {
    nix::unistd::User::from_name("aziottpm").ok().flatten().expect("user aziottpm").uid
}

// ---------------------------------------------------------------------------------------------
// keyd
// ---------------------------------------------------------------------------------------------

/// keyd on a full disk: creating a key, creating a key pair and replacing a key each answer 500
/// with the file and ENOSPC in the log; the keys created before still sign exactly as before,
/// their files byte-identical, no temporary file left; with the space back the same requests
/// succeed.
#[test]
fn keyd_full_disk_answers_500_loses_nothing_and_recovers() {
    aziot_tests::require_keyd!();
    let b = Keyd::builder().backend(file_backend_only("keyd_full_disk_answers_500_loses_nothing_and_recovers"));
    let disk = Tmpfs::over(&b.dir().join("home"), TMPFS_SIZE);
    let keyd = b.start();
    let api = keyd.api(V2021);
    let old = random(32);
    let old_h = api.import_key("old", &old);
    let pair_h = api.create_keypair("old-pair", Some("ec-p256"));
    let point = api.param(&pair_h, "ec-point");
    let before = snapshot(disk.path());

    let filler = disk.fill();
    let new = random(32);
    let import =
        |id: &str, bytes: &[u8]| api.post("/key", &json!({"keyId": id, "usage": "sign", "keyBytes": b64(bytes)}));
    let r = import("new", &new);
    assert_eq!(r.status, 500, "a new key on a full disk\n{r}");
    assert!(!r.message().is_empty(), "{r}");
    let r = import("old", &random(32));
    assert_eq!(r.status, 500, "replacing a key on a full disk\n{r}");
    let r = api.post("/keypair", &json!({"keyId": "new-pair", "preferredAlgorithms": "ec-p256"}));
    assert_eq!(r.status, 500, "a new key pair on a full disk\n{r}");
    for file in [key_file_name("new"), key_file_name("old")] {
        assert!(
            wait_for(Duration::from_secs(5), || keyd.log().contains(&file)),
            "the log names the key file {file}\n{}",
            keyd.log()
        );
    }
    assert!(keyd.log().contains("No space left on device"), "the log names the cause\n{}", keyd.log());
    // nothing lost or changed; the service still serves the old keys
    assert_eq!(snapshot(disk.path()), before, "state changed by failed writes");
    assert!(temporaries(disk.path()).is_empty(), "{:?}", temporaries(disk.path()));
    assert_eq!(api.sign_hmac(&old_h, b"m"), hmac_sha256(&old, b"m"));
    assert_eq!(api.sign_hmac(&api.get_key("old"), b"m"), hmac_sha256(&old, b"m"));
    assert_eq!(api.param(&api.get_keypair("old-pair"), "ec-point"), point);

    filler.free();
    let h = handle_of(&import("new", &new), "the same import with space back");
    assert_eq!(api.sign_hmac(&h, b"m"), hmac_sha256(&new, b"m"));
    handle_of(
        &api.post("/keypair", &json!({"keyId": "new-pair", "preferredAlgorithms": "ec-p256"})),
        "the same key pair with space back",
    );
    assert_eq!(api.sign_hmac(&old_h, b"m"), hmac_sha256(&old, b"m"));
    drop(keyd);
}

/// keyd's first start on a full disk (no `keys/` content, no handle-validation key yet): the
/// first import answers 500 and the log names its file; once space returns the same request
/// succeeds without a restart, and the handle-validation key is written whole.
#[test]
fn keyd_first_start_on_a_full_disk_names_the_file_and_recovers() {
    aziot_tests::require_keyd!();
    let b = Keyd::builder().backend(file_backend_only("keyd_first_start_on_a_full_disk_names_the_file_and_recovers"));
    let disk = Tmpfs::over(&b.dir().join("home"), TMPFS_SIZE);
    let filler = disk.fill();
    let keyd = b.start();
    let api = keyd.api(V2021);
    let key = random(32);
    let import = || api.post("/key", &json!({"keyId": "first", "usage": "sign", "keyBytes": b64(&key)}));
    let r = import();
    assert_eq!(r.status, 500, "{r}\n{}", keyd.log());
    let file = key_file_name("first");
    assert!(wait_for(Duration::from_secs(5), || keyd.log().contains(&file)), "the log names {file}\n{}", keyd.log());
    assert!(keyd.log().contains("No space left on device"), "{}", keyd.log());
    assert!(temporaries(disk.path()).is_empty(), "{:?}", temporaries(disk.path()));
    filler.free();
    let h = handle_of(&import(), "the same import with space back");
    assert_eq!(api.sign_hmac(&h, b"m"), hmac_sha256(&key, b"m"));
    let hvk =
        snapshot(&keyd.keys_dir()).into_iter().find(|(p, _)| p.to_string_lossy().starts_with("handlevalidationkey-"));
    assert_eq!(hvk.map(|(_, b)| b.len()), Some(32), "the handle-validation key");
}

/// Corrupt and unreadable key files: a truncated key pair, garbage in a key pair's file, a key
/// file of mode 000 and one owned by another user each fail with 500 and a log line naming the
/// file; the other keys still work and the service keeps running.
#[test]
fn keyd_corrupt_or_unreadable_key_files_fail_alone_and_are_named() {
    aziot_tests::require_keyd!();
    let mut keyd = Keyd::builder()
        .backend(file_backend_only("keyd_corrupt_or_unreadable_key_files_fail_alone_and_are_named"))
        .start();
    let api = keyd.api(V2021);
    let good = random(32);
    api.import_key("good", &good);
    api.create_keypair("good-pair", Some("ec-p256"));
    for id in ["truncated", "garbage"] {
        api.create_keypair(id, Some("ec-p256"));
    }
    api.import_key("mode000", &random(32));
    api.import_key("foreign", &random(32));
    keyd.stop();
    let keys = keyd.keys_dir();
    let path = |id: &str| keys.join(key_file_name(id));
    let pem = fs::read(path("truncated")).expect("key pair file");
    fs::write(path("truncated"), &pem[..pem.len() / 2]).expect("truncate");
    fs::write(path("garbage"), b"-----BEGIN PRIVATE KEY-----\n%%% not base64 %%%\n-----END PRIVATE KEY-----\n")
        .expect("garbage");
    fs::set_permissions(path("mode000"), fs::Permissions::from_mode(0o000)).expect("chmod 000");
    std::os::unix::fs::chown(path("foreign"), Some(other_user().as_raw()), None).expect("chown");
    keyd.start_again();
    let api = keyd.api(V2021);

    for id in ["truncated", "garbage"] {
        let r = api.get(&format!("/keypair/{id}"));
        let r = if r.status == 200 { api.param_resp(&handle_of(&r, id), "ec-point") } else { r };
        assert_eq!(r.status, 500, "{id}\n{r}");
    }
    for id in ["mode000", "foreign"] {
        let r = api.get(&format!("/key/{id}"));
        assert_eq!(r.status, 500, "{id}\n{r}");
    }
    for id in ["truncated", "garbage", "mode000", "foreign"] {
        let file = key_file_name(id);
        assert!(
            wait_for(Duration::from_secs(5), || keyd.log().contains(&file)),
            "the log names {file} ({id})\n{}",
            keyd.log()
        );
    }
    assert!(keyd.log().contains("Permission denied"), "{}", keyd.log());
    // the others still served, by the same worker
    assert!(keyd.is_running());
    assert_eq!(api.sign_hmac(&api.get_key("good"), b"m"), hmac_sha256(&good, b"m"));
    assert_eq!(api.param(&api.get_keypair("good-pair"), "algorithm"), "ECDSA");
    // and a new key can still be written beside them
    api.import_key("after", &random(32));
}

// ---------------------------------------------------------------------------------------------
// certd
// ---------------------------------------------------------------------------------------------

mod certd {
    use std::collections::BTreeMap;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use aziot_tests::certd::pki::{csr, ec_key};
    use aziot_tests::certd::Certd;
    use aziot_tests::http::{build_request, raw_once};
    use aziot_tests::require_certd;
    use aziot_tests::storage_fault::{snapshot, temporaries, Tmpfs};
    use openssl::asn1::Asn1Time;
    use openssl::bn::BigNum;
    use openssl::hash::MessageDigest;
    use openssl::x509::{X509NameBuilder, X509};
    use serde_json::json;

    use super::{other_user, TMPFS_SIZE};
    use aziot_tests::wait_for;

    /// Self-signed local CA for issuance (the key in keyd) and one self-signed leaf.
    const CONFIG: &str = "[cert_issuance.device-ca]\nmethod = \"self_signed\"\nexpiry_days = 3650\n\
        [cert_issuance.local_ca]\ncert = \"device-ca\"\npk = \"device-ca\"\n\
        [cert_issuance.leaf]\nmethod = \"local_ca\"\n";

    /// A PEM chain of `n` self-signed certificates with CN `cn` (content to import).
    pub fn pem_chain(cn: &str, n: usize) -> String {
        let key = ec_key();
        let mut out = String::new();
        for i in 0..n {
            let mut name = X509NameBuilder::new().unwrap();
            name.append_entry_by_text("CN", &format!("{cn}-{i}")).unwrap();
            let name = name.build();
            let mut b = X509::builder().unwrap();
            b.set_version(2).unwrap();
            b.set_serial_number(&BigNum::from_u32(i as u32 + 1).unwrap().to_asn1_integer().unwrap()).unwrap();
            b.set_subject_name(&name).unwrap();
            b.set_issuer_name(&name).unwrap();
            b.set_pubkey(&key).unwrap();
            b.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
            b.set_not_after(&Asn1Time::days_from_now(30).unwrap()).unwrap();
            b.sign(&key, MessageDigest::sha256()).unwrap();
            out.push_str(std::str::from_utf8(&b.build().to_pem().unwrap()).unwrap());
        }
        out
    }

    fn put(certd: &Certd, id: &str, pem: &str) -> aziot_tests::http::Response {
        let body = serde_json::to_vec(&json!({ "pem": pem })).unwrap();
        certd.api().call_bytes("PUT", &format!("/certificates/{id}"), Some(&body))
    }

    fn issue(certd: &Certd, id: &str) -> aziot_tests::http::Response {
        certd.api().post("/certificates", &json!({ "certId": id, "csr": csr(&ec_key(), id, false) }))
    }

    /// The local CA: a keyd key pair `device-ca` and its self-signed cert.
    fn device_ca(certd: &Certd) {
        let handle = aziot_tests::api::handle_of(
            &certd.keyd_api().post("/keypair", &json!({ "keyId": "device-ca", "preferredAlgorithms": "ec-p256" })),
            "create the CA key pair",
        );
        let key = aziot_tests::certd::pki::keyd_key(certd.keyd().socket(), &handle);
        let ca_csr =
            String::from_utf8(aziot_tests::certd::pki::csr_with(&key, &key, "CA", true).to_pem().unwrap()).unwrap();
        let r = certd.api().post("/certificates", &json!({ "certId": "device-ca", "csr": ca_csr }));
        assert_eq!(r.status, 201, "{r}");
    }

    fn file_name(certd: &Certd, id: &str) -> String {
        certd.cert_path(id).file_name().unwrap().to_string_lossy().into_owned()
    }

    /// certd on a full disk: an import (new and replacing), a local-CA issuance each answer 500
    /// with the cert's file and ENOSPC in the log; the certs stored before are served unchanged,
    /// their files byte-identical, no temporary file left; with the space back the same requests
    /// succeed.
    #[test]
    fn certd_full_disk_answers_500_loses_nothing_and_recovers() {
        require_certd!();
        let mut certd = Certd::start(CONFIG);
        device_ca(&certd);
        let old = pem_chain("old", 2);
        assert_eq!(put(&certd, "old", &old).status, 201);
        assert_eq!(issue(&certd, "leaf").status, 201);
        certd.stop();
        let disk = Tmpfs::over(&certd.home(), TMPFS_SIZE);
        certd.start_again();
        let before = snapshot(disk.path());
        let served: Vec<String> = ["old", "leaf", "device-ca"]
            .iter()
            .map(|id| certd.api().get(&format!("/certificates/{id}")).json()["pem"].to_string())
            .collect();

        let filler = disk.fill();
        let new = pem_chain("new", 1);
        let r = put(&certd, "new", &new);
        assert_eq!(r.status, 500, "a new cert on a full disk\n{r}");
        let r = put(&certd, "old", &new);
        assert_eq!(r.status, 500, "replacing a cert on a full disk\n{r}");
        let r = issue(&certd, "leaf");
        assert_eq!(r.status, 500, "an issuance on a full disk\n{r}");
        for id in ["new", "old", "leaf"] {
            let file = file_name(&certd, id);
            assert!(
                wait_for(Duration::from_secs(5), || certd.log().contains(&file)),
                "the log names {file}\n{}",
                certd.log()
            );
        }
        assert!(certd.log().contains("No space left on device"), "{}", certd.log());
        assert_eq!(snapshot(disk.path()), before, "state changed by failed writes");
        assert!(temporaries(disk.path()).is_empty(), "{:?}", temporaries(disk.path()));
        for (id, pem) in ["old", "leaf", "device-ca"].iter().zip(&served) {
            let r = certd.api().get(&format!("/certificates/{id}"));
            assert_eq!((r.status, &r.json()["pem"].to_string()), (200, pem), "{id}");
        }

        filler.free();
        assert_eq!(put(&certd, "new", &new).status, 201);
        assert_eq!(certd.api().get("/certificates/new").json()["pem"], new.as_str());
        assert_eq!(put(&certd, "old", &new).status, 201);
        assert_eq!(issue(&certd, "leaf").status, 201);
    }

    /// Unreadable or corrupt cert files: mode 000 and another user's file → 500 naming the file;
    /// a garbage or truncated local CA cert → issuance 500 naming the CA's file (GET serves a
    /// stored text as it is: an import stores any text, spec certd.md §4.2); the other certs are
    /// still served and the worker keeps running.
    #[test]
    fn certd_unreadable_or_corrupt_cert_files_fail_alone_and_are_named() {
        require_certd!();
        let certd = Certd::start(CONFIG);
        device_ca(&certd);
        let good = pem_chain("good", 1);
        for id in ["good", "mode000", "foreign"] {
            assert_eq!(put(&certd, id, &good).status, 201);
        }
        let worker = certd.worker_pid();
        let path = |id: &str| certd.cert_path(id);
        fs::set_permissions(path("mode000"), fs::Permissions::from_mode(0o000)).unwrap();
        std::os::unix::fs::chown(path("foreign"), Some(other_user().as_raw()), None).unwrap();
        fs::set_permissions(path("foreign"), fs::Permissions::from_mode(0o600)).unwrap();
        for id in ["mode000", "foreign"] {
            let r = certd.api().get(&format!("/certificates/{id}"));
            assert_eq!(r.status, 500, "{id}\n{r}");
            let file = file_name(&certd, id);
            assert!(
                wait_for(Duration::from_secs(5), || certd.log().contains(&file)),
                "names {file}\n{}",
                certd.log()
            );
        }
        assert!(certd.log().contains("Permission denied"), "{}", certd.log());

        let ca_pem = fs::read_to_string(path("device-ca")).unwrap();
        let ca_file = file_name(&certd, "device-ca");
        for (what, content) in [
            ("truncated", ca_pem[..ca_pem.len() / 2].to_owned()),
            ("garbage", "-----BEGIN CERTIFICATE-----\n%%% not base64 %%%\n-----END CERTIFICATE-----\n".to_owned()),
        ] {
            fs::write(path("device-ca"), &content).unwrap();
            let marks = certd.log().matches(&ca_file).count();
            let r = issue(&certd, "leaf");
            assert_eq!(r.status, 500, "a {what} local CA cert\n{r}");
            assert!(
                wait_for(Duration::from_secs(5), || certd.log().matches(&ca_file).count() > marks),
                "the log names the {what} CA file {ca_file}\n{}",
                certd.log()
            );
            let r = certd.api().get("/certificates/device-ca");
            assert_eq!((r.status, r.json()["pem"].as_str()), (200, Some(content.as_str())), "served as stored");
        }
        // the rest still served, by the same worker
        assert_eq!(certd.worker_pid(), worker, "the worker restarted\n{}", certd.log());
        let r = certd.api().get("/certificates/good");
        assert_eq!((r.status, r.json()["pem"].as_str()), (200, Some(good.as_str())));
        assert_eq!(put(&certd, "after", &good).status, 201);
    }

    /// What one importing thread knows about its cert: the last acknowledged content and the
    /// attempts after it whose answer was lost to the kill (each may or may not have landed).
    #[derive(Default)]
    struct Imports {
        acked: Option<usize>,
        unknown: Vec<usize>,
    }

    /// kill -9 of the worker three times while 4 threads replace their certs in a loop (PUT,
    /// alternating a 1-cert and a 3-cert chain): every file is always one of the contents
    /// written, never torn or mixed; after a restart each cert is its last acknowledged content
    /// or a later unacknowledged one, and no temporary file is left.
    #[test]
    fn certd_kill9_during_imports_leaves_old_or_new_files() {
        require_certd!();
        let mut certd = Certd::start("");
        let ids: Vec<String> = (0..4).map(|i| format!("imp-{i}")).collect();
        let variants: BTreeMap<String, Vec<String>> = ids
            .iter()
            .map(|id| (id.clone(), (0..4).map(|v| pem_chain(&format!("{id}-{v}"), 1 + 2 * (v % 2))).collect()))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let known: BTreeMap<String, Arc<Mutex<Imports>>> =
            ids.iter().map(|id| (id.clone(), Arc::new(Mutex::new(Imports::default())))).collect();
        let threads: Vec<_> = ids
            .iter()
            .map(|id| {
                let (sock, id, stop, failed) = (certd.socket(), id.clone(), Arc::clone(&stop), Arc::clone(&failed));
                let (mine, state) = (variants[&id].clone(), Arc::clone(&known[&id]));
                std::thread::spawn(move || {
                    let (mut n, mut acked) = (0usize, 0usize);
                    while !stop.load(Ordering::Relaxed) {
                        let v = n % mine.len();
                        n += 1;
                        let body = serde_json::to_vec(&json!({ "pem": mine[v] })).unwrap();
                        let req =
                            build_request("PUT", &format!("/certificates/{id}?api-version=2020-09-01"), Some(&body));
                        match raw_once(&sock, &req) {
                            Ok(r) if r.status == 201 => {
                                let mut s = state.lock().unwrap();
                                s.acked = Some(v);
                                s.unknown.clear();
                                acked += 1;
                            }
                            _ => {
                                state.lock().unwrap().unknown.push(v);
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    acked
                })
            })
            .collect();
        let check = |certd: &Certd, when: &str| {
            for id in &ids {
                if let Ok(text) = fs::read_to_string(certd.cert_path(id)) {
                    assert!(variants[id].contains(&text), "{when}: {id} is torn or mixed:\n{text}");
                }
            }
        };
        for round in 0..3 {
            assert!(
                wait_for(Duration::from_secs(10), || known.values().all(|k| k.lock().unwrap().acked.is_some())),
                "no import acknowledged\n{}",
                certd.log()
            );
            // The scenario, not a wait for a state: kill -9 at a random moment mid-writes.
            std::thread::sleep(Duration::from_millis(30 + aziot_tests::crypto::random_u64() % 150));
            let worker = certd.worker_pid();
            // SAFETY: plain syscall; the worker is a child of our broker.
            assert_eq!(unsafe { libc::kill(worker, libc::SIGKILL) }, 0);
            eprintln!("kill {round}: worker {worker} killed");
            check(&certd, &format!("kill {round}"));
            certd.wait_new_worker(worker, Duration::from_secs(10));
        }
        stop.store(true, Ordering::Relaxed);
        let imports: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        eprintln!(
            "{imports} imports acknowledged, {} cut by the kills or refused meanwhile",
            failed.load(Ordering::Relaxed)
        );
        certd.stop();
        check(&certd, "stopped");
        certd.start_again();
        let left: Vec<String> = certd.stored().into_iter().filter(|n| !n.ends_with(".cer")).collect();
        assert!(left.is_empty(), "temporary files after a restart: {left:?}");
        for id in &ids {
            let k = known[id].lock().unwrap();
            let r = certd.api().get(&format!("/certificates/{id}"));
            assert_eq!(r.status, 200, "{r}");
            let pem = r.json()["pem"].as_str().unwrap().to_owned();
            let allowed: Vec<&String> = k.acked.iter().chain(k.unknown.iter()).map(|v| &variants[id][*v]).collect();
            assert!(allowed.contains(&&pem), "{id}: not the last acknowledged content nor a later attempt");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// identityd (manual SAS provisioning against the mock IoT Hub: reconciliation writes
// `device_info` and `prev_state`, module identities write the module cache)
// ---------------------------------------------------------------------------------------------

mod identityd {
    use std::fs;
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::Duration;

    use aziot_tests::identityd::{Identityd, DEVICE_ID, DEVICE_KEY, HOSTNAME, V2021};
    use aziot_tests::mock_hub::{DeviceCredential, MockHub};
    use aziot_tests::mock_tls::TestCa;
    use aziot_tests::require_identityd;
    use aziot_tests::storage_fault::{snapshot, temporaries, Tmpfs};
    use serde_json::json;

    use super::TMPFS_SIZE;
    use aziot_tests::wait_for;

    const MOD_A: &str = "[[principal]]\nuid = 5101\nname = \"mod-a\"\nidtype = [\"module\"]\n";

    /// One CA for every mock hub of this process, exported as `SSL_CERT_FILE` (passed on to the
    /// worker; identityd trusts the system store only).
    fn shared_ca() -> TestCa {
        static CA: OnceLock<TestCa> = OnceLock::new();
        CA.get_or_init(|| {
            let ca = TestCa::new("aziot fault_storage test CA");
            // Not under /tmp: the worker has its own empty /tmp.
            let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!("aziot-fault-storage-ca-{}.pem", std::process::id()));
            ca.write_cert(&path).expect("write the CA");
            fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod the CA");
            std::env::set_var("SSL_CERT_FILE", &path);
            ca
        })
        .clone()
    }

    /// The mock hub on 127.0.0.1 with the harness's device, and identityd's stack for it, running
    /// and reconciled once (`device_info` written).
    fn stack() -> (MockHub, Identityd) {
        let hub = MockHub::start_with_ca(shared_ca(), 0).expect("start the mock hub");
        let name = format!("127.0.0.1:{}", hub.port());
        hub.set_hub_name(&name);
        hub.add_device(DEVICE_ID, DeviceCredential::Sas(DEVICE_KEY.to_vec()));
        let config = format!(
            "hostname = \"{HOSTNAME}\"\ncloud_retries = 1\n[provisioning]\nsource = \"manual\"\niothub_hostname = \"{name}\"\ndevice_id = \"{DEVICE_ID}\"\n[provisioning.authentication]\nmethod = \"sas\"\ndevice_id_pk = \"device-id\"\n{MOD_A}"
        );
        let mut stack = Identityd::prepare(&config);
        stack.start_identityd().unwrap_or_else(|e| panic!("identityd: {e}"));
        wait_reconciled(&stack, 1);
        (hub, stack)
    }

    /// Waits until the log holds `n` completed reconciliations.
    fn wait_reconciled(stack: &Identityd, n: usize) {
        assert!(
            wait_for(Duration::from_secs(30), || stack.log().matches("Identity reconciliation complete").count()
                >= n),
            "reconciliation {n} did not complete\n{}",
            stack.log()
        );
    }

    fn reprovision(stack: &Identityd) -> aziot_tests::http::Response {
        stack.client(None, V2021).call("POST", "/identities/device/reprovision", Some(b"{}"))
    }

    /// The files whose loss would lose the device: `device_info` and `prev_state`.
    fn backups(home: &Path) -> Vec<(String, Vec<u8>)> {
        ["device_info", "prev_state"]
            .iter()
            .map(|f| (f.to_string(), fs::read(home.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"))))
            .collect()
    }

    /// identityd on a full disk: a reprovisioning (E9), whose state write does not fit, answers
    /// 500 with `device_info` and ENOSPC in the log; `device_info` and `prev_state` are unchanged,
    /// no temporary file is left, the device identity is still served; with the space back the
    /// same request succeeds and writes the backup.
    #[test]
    fn identityd_full_disk_answers_500_keeps_the_backup_and_recovers() {
        require_identityd!();
        let (hub, mut stack) = stack();
        stack.stop_identityd();
        let disk = Tmpfs::over(&stack.home(), TMPFS_SIZE);
        stack.start_identityd().unwrap_or_else(|e| panic!("identityd on the tmpfs: {e}"));
        wait_reconciled(&stack, 2);
        let before = backups(disk.path());
        let identity = stack.client(None, V2021).get("/identities/identity");
        assert_eq!(identity.status, 200, "{identity}");

        let filler = disk.fill();
        let r = reprovision(&stack);
        assert_eq!(r.status, 500, "a reprovisioning whose state does not fit\n{r}\n{}", stack.log());
        assert!(
            wait_for(Duration::from_secs(5), || stack.log().contains("\"device_info\"")),
            "the log names device_info\n{}",
            stack.log()
        );
        assert!(stack.log().contains("No space left on device"), "{}", stack.log());
        assert_eq!(backups(disk.path()), before, "the backup changed");
        assert!(temporaries(disk.path()).is_empty(), "{:?}", temporaries(disk.path()));
        let r = stack.client(None, V2021).get("/identities/identity");
        assert_eq!((r.status, r.json()), (200, identity.json()), "the device identity is still served");

        filler.free();
        let r = reprovision(&stack);
        assert!(r.status == 200 || r.status == 204, "the same reprovisioning with space back\n{r}\n{}", stack.log());
        let gen = hub.module(DEVICE_ID, "mod-a").expect("mod-a in the hub").generation_id;
        let r = stack.client(Some(5101), V2021).get("/identities/identity");
        assert_eq!((r.status, r.json()["spec"]["genId"].as_str()), (200, Some(gen.as_str())), "{r}");
        assert!(snapshot(disk.path()).keys().any(|p| p.starts_with("modules")), "module cache written");
    }

    /// kill -9 of the worker three times while one client reprovisions in a loop (E9: module
    /// cache, `device_info`, `prev_state`) and another creates module identities (module cache):
    /// every state file is whole after each kill (TOML / JSON that parses, the right device); a
    /// restart serves the device and the module from them.
    #[test]
    fn identityd_kill9_during_state_writes_leaves_whole_files() {
        require_identityd!();
        let (_hub, mut stack) = stack();
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(Mutex::new(0u32));
        let sock = stack.socket();
        let loops: Vec<_> = (0..2)
            .map(|which| {
                let (sock, stop, done) = (sock.clone(), Arc::clone(&stop), Arc::clone(&done));
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let (path, body) = if which == 0 {
                            ("/identities/device/reprovision", json!({}))
                        } else {
                            ("/identities/modules", json!({"type": "aziot", "moduleId": format!("m-{}", n % 5)}))
                        };
                        let req = aziot_tests::http::build_request(
                            "POST",
                            &format!("{path}?api-version={V2021}"),
                            Some(&serde_json::to_vec(&body).unwrap()),
                        );
                        if aziot_tests::http::raw_once(&sock, &req).is_ok_and(|r| r.status < 300) {
                            *done.lock().unwrap() += 1;
                        }
                    }
                })
            })
            .collect();
        let check = |home: &Path, when: &str| {
            for (rel, bytes) in snapshot(home) {
                let name = rel.file_name().unwrap().to_string_lossy().into_owned();
                if name.starts_with(".tmp-") {
                    continue;
                }
                let text = String::from_utf8(bytes).unwrap_or_else(|_| panic!("{when}: {} not UTF-8", rel.display()));
                if rel.starts_with("modules") {
                    let v: serde_json::Value = serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("{when}: torn module cache file {} ({e}):\n{text}", rel.display()));
                    assert_eq!(v["deviceId"], DEVICE_ID, "{when}: {}", rel.display());
                } else {
                    let t: toml::Table =
                        text.parse().unwrap_or_else(|e| panic!("{when}: torn {} ({e}):\n{text}", rel.display()));
                    if name == "device_info" {
                        assert_eq!(t["device_id"].as_str(), Some(DEVICE_ID), "{when}: {text}");
                    }
                }
            }
        };
        for round in 0..3 {
            let seen = *done.lock().unwrap();
            assert!(
                wait_for(Duration::from_secs(30), || *done.lock().unwrap() >= seen + 2),
                "round {round}: no progress\n{}",
                stack.log()
            );
            // The scenario, not a wait for a state: kill -9 at a random moment mid-writes.
            std::thread::sleep(Duration::from_millis(20 + aziot_tests::crypto::random_u64() % 200));
            let worker = stack.worker_pid();
            // SAFETY: plain syscall; the worker is a child of our broker.
            assert_eq!(unsafe { libc::kill(worker, libc::SIGKILL) }, 0);
            eprintln!("kill {round}: worker {worker} killed after {} acknowledged writes", *done.lock().unwrap());
            check(&stack.home(), &format!("kill {round}"));
            assert!(
                wait_for(Duration::from_secs(10), || stack.worker_pid() != worker),
                "no new worker\n{}",
                stack.log()
            );
        }
        stop.store(true, Ordering::Relaxed);
        for t in loops {
            t.join().unwrap();
        }
        stack.stop_identityd();
        check(&stack.home(), "stopped");
        stack.start_identityd().unwrap_or_else(|e| panic!("identityd after the kills: {e}"));
        assert!(
            wait_for(Duration::from_secs(30), || stack.client(None, V2021).get("/identities/identity").status == 200),
            "{}",
            stack.log()
        );
        assert!(
            wait_for(Duration::from_secs(30), || stack.client(Some(5101), V2021).get("/identities/identity").status
                == 200),
            "{}",
            stack.log()
        );
        assert!(temporaries(&stack.home()).is_empty(), "{:?}", temporaries(&stack.home()));
    }

    /// Corrupt and unreadable state: garbage in `device_info`, `prev_state` of mode 000, garbage
    /// in the module cache file of `mod-a`: identityd starts and serves the device and the
    /// module, the log names each file it ignored, and reconciliation writes them whole again.
    #[test]
    fn identityd_corrupt_or_unreadable_state_files_are_named_and_replaced() {
        require_identityd!();
        let (hub, mut stack) = stack();
        stack.stop_identityd();
        let home = stack.home();
        let cache_dir = home.join("modules").join(aziot_tests::identityd::device_dir(&hub.hub_name(), DEVICE_ID));
        let cache = cache_dir.join(aziot_tests::identityd::module_file("mod-a"));
        assert!(cache.exists(), "the module cache of mod-a\n{}", stack.log());
        fs::write(home.join("device_info"), b"\x00\xff garbage = = =").unwrap();
        fs::set_permissions(home.join("prev_state"), std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
        fs::write(&cache, b"{\"moduleId\": \"mod-a\", \"devi").unwrap();
        let marks = stack.log().len();
        stack.start_identityd().unwrap_or_else(|e| panic!("identityd with corrupt state: {e}"));
        let r = stack.client(Some(5101), V2021).get("/identities/identity");
        assert_eq!(r.status, 200, "{r}\n{}", stack.log());
        assert_eq!(stack.client(None, V2021).get("/identities/identity").status, 200);
        wait_reconciled(&stack, 2);
        let log = stack.log()[marks..].to_owned();
        for named in ["\"device_info\"", "\"prev_state\"", "Permission denied"] {
            assert!(log.contains(named), "the log names {named}\n{log}");
        }
        // whole again
        let info: toml::Table = fs::read_to_string(home.join("device_info")).unwrap().parse().expect("device_info");
        assert_eq!(info["device_id"].as_str(), Some(DEVICE_ID));
        let _: toml::Table = fs::read_to_string(home.join("prev_state")).unwrap().parse().expect("prev_state");
        let m: serde_json::Value = serde_json::from_slice(&fs::read(&cache).unwrap()).expect("module cache");
        assert_eq!(m["moduleId"], "mod-a");

        // the hub unreachable: a corrupt module cache file is named, not served
        fs::write(&cache, b"not json").unwrap();
        drop(hub);
        let marks = stack.log().len();
        let r = stack.client(Some(5101), V2021).get("/identities/identity");
        assert_ne!(r.status, 200, "a corrupt cache record served\n{r}");
        let file = aziot_tests::identityd::module_file("mod-a");
        assert!(
            wait_for(Duration::from_secs(5), || stack.log()[marks..].contains(&file)),
            "the log names the module cache file {file}\n{}",
            stack.log()
        );
        assert_eq!(stack.client(None, V2021).get("/identities/identity").status, 200, "the device still served");
    }

    /// identityd started on a full disk: the startup reconciliation cannot write its backup; the
    /// log names `device_info` and ENOSPC; once space returns the restarted worker writes it
    /// and serves the device and its module.
    #[test]
    fn identityd_start_on_a_full_disk_names_the_file_and_recovers() {
        require_identityd!();
        let (_hub, mut stack) = stack();
        stack.stop_identityd();
        let disk = Tmpfs::over(&stack.home(), TMPFS_SIZE);
        let before = backups(disk.path());
        let filler = disk.fill();
        let marks = stack.log().len();
        let started = stack.start_identityd();
        assert!(
            wait_for(Duration::from_secs(20), || stack.log()[marks..].contains("No space left on device")),
            "started: {started:?}\n{}",
            stack.log()
        );
        let log = stack.log()[marks..].to_owned();
        assert!(log.contains("\"device_info\""), "the log names device_info\n{log}");
        assert_eq!(backups(disk.path()), before, "the backup changed");
        filler.free();
        if started.is_err() {
            stack.start_identityd().unwrap_or_else(|e| panic!("identityd with space back: {e}"));
        }
        assert!(
            wait_for(Duration::from_secs(30), || stack.client(Some(5101), V2021).get("/identities/identity").status
                == 200),
            "{}",
            stack.log()
        );
        assert!(temporaries(disk.path()).is_empty(), "{:?}", temporaries(disk.path()));
    }
}
