//! The key store on disk (keyd.md §4.2, §7.2, §7.3; DESIGN.md §5): persistence across
//! restarts, exact file names and modes, upstream-compatible handles, preloaded keys,
//! crash safety under kill -9, and hostile key ids.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aziot_tests::api::*;
use aziot_tests::crypto::*;
use aziot_tests::keyd::{file_backend_only, Backend};
use aziot_tests::{both_versions, Keyd};
use openssl::ec::EcKey;
use openssl::pkey::PKey;
use serde_json::json;

both_versions!(state_survives_restart);

const HVK_FILE: &str =
    "handlevalidationkey-40f1ca41fe8b50f53e10f3e3a580dcae24087f37aa498ba9903f2612b03e90ba.key";

fn state_survives_restart(v: &'static str) {
    let mut keyd = Keyd::start("");
    let api = keyd.api(v);
    let sym = random(32);
    let kh = api.import_key("sym", &sym);
    let gen = api.create_key("gen", "sign");
    let ec = api.create_keypair("ec", Some("ec-p256"));
    let rsa = api.create_keypair("rsa", Some("rsa-2048"));
    let derived = api.derive(&kh, b"data");
    let msg = b"same before and after";
    let gen_sig = api.sign_hmac(&gen, msg);
    let point = api.param(&ec, "ec-point");
    let modulus = api.param(&rsa, "rsa-modulus");
    let exported = api.export(&derived);
    let mut files_before: Vec<(String, Vec<u8>)> = list_keys(&keyd.keys_dir())
        .into_iter()
        .map(|n| {
            let c = fs::read(keyd.keys_dir().join(&n)).expect("read");
            (n, c)
        })
        .collect();
    files_before.sort();

    keyd.restart();
    let api = keyd.api(v);
    // handles minted before the restart are still valid
    assert_eq!(api.sign_hmac(&kh, msg), hmac_sha256(&sym, msg));
    assert_eq!(api.sign_hmac(&gen, msg), gen_sig);
    assert_eq!(api.param(&ec, "ec-point"), point);
    assert_eq!(api.param(&rsa, "rsa-modulus"), modulus);
    assert_eq!(api.param(&rsa, "rsa-exponent"), "AQAB");
    assert_eq!(api.export(&derived), exported);
    let digest = sha256(msg);
    assert!(ecdsa_verify(
        &unb64(&point),
        &digest,
        &api.sign_ecdsa(&ec, &digest)
    ));
    // and new handles load the same keys
    assert_eq!(api.sign_hmac(&api.get_key("gen"), msg), gen_sig);
    assert_eq!(api.param(&api.get_keypair("ec"), "ec-point"), point);
    assert_eq!(api.param(&api.get_keypair("rsa"), "rsa-modulus"), modulus);
    // the files were not rewritten by the restart
    let mut files_after: Vec<(String, Vec<u8>)> = list_keys(&keyd.keys_dir())
        .into_iter()
        .map(|n| {
            let c = fs::read(keyd.keys_dir().join(&n)).expect("read");
            (n, c)
        })
        .collect();
    files_after.sort();
    assert_eq!(files_before, files_after);
}

fn list_keys(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn key_files_names_modes_and_contents() {
    aziot_tests::require_keyd!();
    let keyd = Keyd::builder().backend(file_backend_only("key_files_names_modes_and_contents")).start();
    let api = keyd.api(V2021);
    let dev = api.create_keypair("device-id", Some("ec-p256"));
    let bytes = random(40);
    api.import_key("my.key_1", &bytes);
    api.create_key("Gen-2", "encrypt");

    let keys = keyd.keys_dir();
    // the exact example of keyd.md §7.2
    let dev_file =
        keys.join("deviceid-bd732105ef89cf8edd2606a5309c8a26b7b5599a4e124a0fe6199b6b2f60e655.key");
    assert_eq!(
        key_file_name("device-id"),
        dev_file.file_name().expect("name").to_string_lossy()
    );
    let pem = fs::read(&dev_file).expect("device-id key file at the spec'd path");
    let local = PKey::private_key_from_pem(&pem).expect("PEM private key");
    assert_eq!(
        ec_compressed_point(&local.ec_key().expect("EC")),
        unb64(&api.param(&dev, "ec-point"))
    );
    assert_eq!(
        fs::read(keys.join(key_file_name("my.key_1"))).expect("sym"),
        bytes
    );
    assert_eq!(
        fs::read(keys.join(key_file_name("Gen-2")))
            .expect("gen")
            .len(),
        32
    );

    // the handle-validation key: 32 bytes at its upstream path; handles are HMACs with it
    let hvk = fs::read(keys.join(HVK_FILE)).expect("handle-validation key file");
    assert_eq!(hvk.len(), 32);
    let p = Handle::parse(&dev);
    assert_eq!(
        p.sig,
        hmac_sha256(&hvk, &p.sr_raw),
        "sig = HMAC-SHA256(hvk, sr)"
    );

    // exactly these files (no leftovers of atomic writes), all 0600
    let mut expected = vec![
        key_file_name("device-id"),
        key_file_name("my.key_1"),
        key_file_name("Gen-2"),
        HVK_FILE.to_owned(),
    ];
    expected.sort();
    assert_eq!(list_keys(&keys), expected);
    for name in &expected {
        let meta = fs::metadata(keys.join(name)).expect("meta");
        assert_eq!(
            meta.permissions().mode() & 0o777,
            0o600,
            "{name} must be 0600"
        );
        assert!(meta.is_file());
    }
    // delete removes the file, nothing else
    assert_eq!(api.delete_keypair(&dev).status, 204);
    assert!(!dev_file.exists());
    assert_eq!(list_keys(&keys).len(), 3);
}

#[test]
fn upstream_minted_handles_are_accepted() {
    aziot_tests::require_keyd!();
    let b = Keyd::builder().backend(file_backend_only("upstream_minted_handles_are_accepted"));
    let keys = b.dir().join("home/keys");
    fs::create_dir(&keys).expect("mkdir keys");
    fs::set_permissions(&keys, fs::Permissions::from_mode(0o700)).expect("chmod");
    let hvk = random(32);
    fs::write(keys.join(HVK_FILE), &hvk).expect("write hvk");
    fs::set_permissions(keys.join(HVK_FILE), fs::Permissions::from_mode(0o600)).expect("chmod");
    let keyd = b.start();
    let api = keyd.api(V2021);

    let sym = random(32);
    let official = api.import_key("k", &sym);
    assert_eq!(
        Handle::parse(&official).sig,
        hmac_sha256(&hvk, &Handle::parse(&official).sr_raw)
    );
    api.create_keypair("p", Some("ec-p256"));

    // handles minted elsewhere with the same key material verify (keyd.md §4.2)
    let k = mint_handle(&hvk, r#"{"Key":"k"}"#);
    assert_eq!(api.sign_hmac(&k, b"m"), hmac_sha256(&sym, b"m"));
    let p = mint_handle(&hvk, r#"{"KeyPair":"p"}"#);
    assert_eq!(api.param(&p, "algorithm"), "ECDSA");
    let d = mint_handle(&hvk, &format!(r#"{{"Derived":[{},[1,2,3]]}}"#, json!(k)));
    assert_eq!(api.export(&d), hmac_sha256(&sym, &[1, 2, 3]));
    // unknown SR members are ignored
    let sr = format!(
        r#"{{"key_id":{{"Key":"k"}},"nonce":"{}","se":"2099"}}"#,
        b64(&random(64))
    );
    let extra = make_handle(sr.as_bytes(), &hmac_sha256(&hvk, sr.as_bytes()));
    assert_eq!(api.sign_hmac(&extra, b"m"), hmac_sha256(&sym, b"m"));

    // correctly MACed but malformed SRs are still invalid handles
    for sr in [
        r#"{"key_id":{"Key":"k"},"nonce":5}"#.to_owned(),
        r#"{"key_id":{"Key":"k"}}"#.to_owned(),
        r#"{"key_id":{"Other":"k"},"nonce":"AA=="}"#.to_owned(),
        "not json".to_owned(),
    ] {
        let h = make_handle(sr.as_bytes(), &hmac_sha256(&hvk, sr.as_bytes()));
        expect_err(&api.sign_hmac_resp(&h, b"m"), 400, INVALID_HANDLE);
    }
    // a derived handle whose embedded base is forged
    let forged_base = mint_handle(&random(32), r#"{"Key":"k"}"#);
    let d = mint_handle(
        &hvk,
        &format!(r#"{{"Derived":[{},[1]]}}"#, json!(forged_base)),
    );
    expect_err(&api.export_resp(&d), 400, INVALID_HANDLE);
    // nested derived (a Derived whose base is Derived) is refused
    let inner = mint_handle(&hvk, &format!(r#"{{"Derived":[{},[1]]}}"#, json!(k)));
    let nested = mint_handle(&hvk, &format!(r#"{{"Derived":[{},[2]]}}"#, json!(inner)));
    let r = api.export_resp(&nested);
    expect_err_prefix(&r, 400, HANDLE_PREFIX);
    assert!(
        r.message()
            .contains("nested derived keys are not supported"),
        "{r}"
    );
    // an id with NUL
    let nul = mint_handle(&hvk, r#"{"Key":"a\u0000b"}"#);
    expect_err_prefix(&api.sign_hmac_resp(&nul, b"m"), 400, HANDLE_PREFIX);
    // even a validly MACed handle cannot reach the handle-validation key itself
    let hv = mint_handle(&hvk, r#"{"Key":"handle-validation-key"}"#);
    let r = api.sign_hmac_resp(&hv, b"m");
    assert_ne!(
        r.status, 200,
        "the handle-validation key must never be usable\n{r}"
    );
    assert_eq!(
        fs::read(keys.join(HVK_FILE)).expect("hvk"),
        hvk,
        "hvk unchanged"
    );
}

#[test]
fn preloaded_file_keys() {
    aziot_tests::require_keyd!();
    let b = Keyd::builder().backend(file_backend_only("preloaded_file_keys"));
    let pre = b.dir().join("preloaded");
    fs::create_dir(&pre).expect("mkdir");
    let ec = EcKey::generate(&p256()).expect("ec");
    let ec_pkcs8 = PKey::from_ec_key(ec.clone())
        .expect("pkey")
        .private_key_to_pem_pkcs8()
        .expect("pem");
    let ec2 = EcKey::generate(&p256()).expect("ec");
    let ec_sec1 = ec2.private_key_to_pem().expect("sec1 pem");
    let rsa = openssl::rsa::Rsa::generate(2048).expect("rsa");
    let rsa_pkcs1 = rsa.private_key_to_pem().expect("pkcs1 pem");
    let p384 = EcKey::generate(
        &openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::SECP384R1).expect("p384"),
    )
    .expect("ec");
    let sym = random(32);
    let files = [
        ("pre-ec", ec_pkcs8),
        ("pre-ec-sec1", ec_sec1.clone()),
        ("pre-rsa", rsa_pkcs1.clone()),
        ("pre-p384", p384.private_key_to_pem().expect("pem")),
        ("pre-sym", sym.clone()),
    ];
    let mut table = String::from("[preloaded_keys]\n");
    for (id, content) in &files {
        let path = pre.join(id);
        fs::write(&path, content).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        // As `aziotctl config apply` leaves a preloaded key: owned by the keyd user, 0600.
        let user = nix::unistd::User::from_name("aziotks").expect("getpwnam").expect("user aziotks");
        nix::unistd::chown(&path, Some(user.uid), Some(user.gid)).expect("chown");
        table.push_str(&format!(
            "{id} = {}\n",
            aziot_tests::keyd::toml_str(&format!("file://{}", path.display()))
        ));
    }
    let keyd = b.extra(&table).start();
    let api = keyd.api(V2021);

    let h = api.get_keypair("pre-ec");
    let point = unb64(&api.param(&h, "ec-point"));
    assert_eq!(point, ec_compressed_point(&ec));
    let digest = sha256(b"preloaded");
    assert!(ecdsa_verify(&point, &digest, &api.sign_ecdsa(&h, &digest)));
    let h2 = api.get_keypair("pre-ec-sec1");
    assert_eq!(
        unb64(&api.param(&h2, "ec-point")),
        ec_compressed_point(&ec2)
    );
    let hr = api.get_keypair("pre-rsa");
    assert_eq!(unb64(&api.param(&hr, "rsa-modulus")), rsa.n().to_vec());
    let h384 = api.get_keypair("pre-p384");
    assert_eq!(api.param(&h384, "algorithm"), "ECDSA");
    expect_err(&api.param_resp(&h384, "ec-curve-oid"), 400, LIB_INVALID);
    let hs = api.get_key("pre-sym");
    assert_eq!(api.sign_hmac(&hs, b"m"), hmac_sha256(&sym, b"m"));
    let iv = random(12);
    let ct = api.encrypt_aead(&hs, &iv, b"", b"with a preloaded key");
    assert_eq!(
        aes_gcm_decrypt(&sym, &iv, b"", &ct[1..ct.len() - 16], &ct[ct.len() - 16..]),
        Some(b"with a preloaded key".to_vec())
    );
    // create-if-not-exists returns the preloaded pair, and nothing lands in the homedir
    let again = api.create_keypair("pre-ec", Some("rsa-2048"));
    assert_eq!(
        unb64(&api.param(&again, "ec-point")),
        ec_compressed_point(&ec)
    );
    for (id, _) in &files {
        assert!(
            !keyd.keys_dir().join(key_file_name(id)).exists(),
            "{id} copied into the homedir"
        );
    }
    // the preloaded files are untouched
    assert_eq!(fs::read(pre.join("pre-ec-sec1")).expect("read"), ec_sec1);
    assert_eq!(fs::read(pre.join("pre-rsa")).expect("read"), rsa_pkcs1);
}

/// Content that describes itself (so a torn or mixed file is detectable):
/// "AZT1" ‖ n ‖ gen ‖ len ‖ filler(n, gen, len).
fn content(n: u64, gen: u64) -> Vec<u8> {
    let len = 16 + ((n * 37 + gen * 11) % 400) as usize;
    let mut v = b"AZT1".to_vec();
    v.extend(n.to_le_bytes());
    v.extend(gen.to_le_bytes());
    v.extend((len as u32).to_le_bytes());
    v.extend((0..len).map(|i| (n as usize * 31 + gen as usize * 17 + i * 7) as u8));
    v
}

#[derive(Clone, Debug)]
enum Op {
    Sym(u64),
    Over(u64),
    Pair(u64),
}

impl Op {
    fn id(&self) -> String {
        match self {
            Op::Sym(n) => format!("crash-{n}"),
            Op::Over(_) => "crash-over".to_owned(),
            Op::Pair(n) => format!("crashpair-{n}"),
        }
    }
}

#[derive(Default)]
struct Progress {
    acked: Vec<Op>,
    inflight: Option<Op>,
}

#[test]
fn kill9_during_writes_leaves_no_torn_files() {
    aziot_tests::require_keyd!();
    let mut keyd = Keyd::builder().backend(file_backend_only("kill9_during_writes_leaves_no_torn_files")).start();
    let mut next: u64 = 0;
    let mut all_attempted: Vec<Op> = Vec::new();
    for cycle in 0..3 {
        let progress = Arc::new(Mutex::new(Progress::default()));
        let p2 = Arc::clone(&progress);
        let sock = keyd.socket().to_path_buf();
        let start = next;
        let writer = std::thread::spawn(move || {
            let Ok(mut conn) = aziot_tests::http::Conn::connect(&sock) else {
                return;
            };
            let target = |p: &str| format!("{p}?api-version={V2021}");
            for k in start.. {
                let op = if k % 5 == 4 {
                    Op::Pair(k)
                } else if k % 3 == 0 {
                    Op::Over(k)
                } else {
                    Op::Sym(k)
                };
                let (path, body) = match &op {
                    Op::Sym(n) => (
                        "/key",
                        json!({"keyId": op.id(), "usage": "sign", "keyBytes": b64(&content(*n, 0))}),
                    ),
                    Op::Over(g) => (
                        "/key",
                        json!({"keyId": op.id(), "usage": "sign", "keyBytes": b64(&content(9999, *g))}),
                    ),
                    Op::Pair(_) => (
                        "/keypair",
                        json!({"keyId": op.id(), "preferredAlgorithms": "ec-p256"}),
                    ),
                };
                p2.lock().expect("lock").inflight = Some(op.clone());
                let body = serde_json::to_vec(&body).expect("json");
                match conn.request("POST", &target(path), Some(&body)) {
                    Ok(r) if r.status == 200 => {
                        let mut p = p2.lock().expect("lock");
                        p.acked.push(op);
                        p.inflight = None;
                    }
                    Ok(r) => panic!("write {k} failed: {r}"),
                    Err(_) => return, // keyd was killed
                }
            }
        });
        // wait for some progress, then kill at a random moment
        while progress.lock().expect("lock").acked.len() < 5 {
            std::thread::sleep(Duration::from_millis(2));
        }
        // The scenario, not a wait for a state: kill -9 at a random moment mid-writes.
        std::thread::sleep(Duration::from_millis(20 + random_u64() % 400));
        keyd.kill9();
        writer.join().expect("writer thread");
        let p = progress.lock().expect("lock");
        let mut attempted = p.acked.clone();
        attempted.extend(p.inflight.clone());
        next = attempted
            .iter()
            .map(|o| match o {
                Op::Sym(n) | Op::Over(n) | Op::Pair(n) => *n,
            })
            .max()
            .unwrap_or(start)
            + 1;
        all_attempted.extend(attempted);
        eprintln!(
            "cycle {cycle}: {} writes acknowledged before kill -9, in flight: {:?}",
            p.acked.len(),
            p.inflight
        );
        check_store(
            &keyd.keys_dir(),
            &all_attempted,
            &p.acked,
            p.inflight.as_ref(),
            cycle,
        );
        drop(p);

        keyd.start_again();
        let api = keyd.api(V2021);
        let acked = progress.lock().expect("lock").acked.clone();
        for op in acked.iter().rev().take(15) {
            match op {
                Op::Sym(n) => assert_eq!(
                    api.sign_hmac(&api.get_key(&op.id()), b"m"),
                    hmac_sha256(&content(*n, 0), b"m"),
                    "acknowledged key {} after restart",
                    op.id()
                ),
                Op::Pair(_) => {
                    assert_eq!(api.param(&api.get_keypair(&op.id()), "algorithm"), "ECDSA")
                }
                Op::Over(_) => {
                    let on_disk =
                        fs::read(keyd.keys_dir().join(key_file_name("crash-over"))).expect("over");
                    assert_eq!(
                        api.sign_hmac(&api.get_key("crash-over"), b"m"),
                        hmac_sha256(&on_disk, b"m")
                    );
                }
            }
        }
        // temporary files of interrupted writes hold key material: gone once keyd is back
        let leftovers: Vec<String> = list_keys(&keyd.keys_dir())
            .into_iter()
            .filter(|n| !n.ends_with(".key"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "cycle {cycle}: leftovers of interrupted writes after restart: {leftovers:?}"
        );
    }
}

fn check_store(keys: &Path, attempted: &[Op], acked: &[Op], inflight: Option<&Op>, cycle: u32) {
    let mut by_file: BTreeMap<String, Vec<Op>> = BTreeMap::new();
    for op in attempted {
        by_file
            .entry(key_file_name(&op.id()))
            .or_default()
            .push(op.clone());
    }
    let last_acked_over = acked
        .iter()
        .filter_map(|o| if let Op::Over(g) = o { Some(*g) } else { None })
        .max();
    let mut leftovers = Vec::new();
    for name in list_keys(keys) {
        let path = keys.join(&name);
        if !name.ends_with(".key") {
            leftovers.push(name);
            continue;
        }
        let bytes = fs::read(&path).expect("read key file");
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "cycle {cycle}: {name} mode {mode:o}");
        if name == HVK_FILE {
            assert_eq!(bytes.len(), 32, "cycle {cycle}: torn handle-validation key");
            continue;
        }
        let ops = by_file
            .get(&name)
            .unwrap_or_else(|| panic!("cycle {cycle}: unexpected key file {name}"));
        match &ops[0] {
            Op::Sym(n) => assert!(
                bytes == content(*n, 0),
                "cycle {cycle}: torn/partial symmetric key file {name} ({} bytes)",
                bytes.len()
            ),
            Op::Pair(_) => {
                assert!(
                    PKey::private_key_from_pem(&bytes).is_ok(),
                    "cycle {cycle}: torn key pair file {name}: {:?}",
                    String::from_utf8_lossy(&bytes)
                );
            }
            Op::Over(_) => {
                assert!(
                    bytes.len() >= 20,
                    "cycle {cycle}: torn crash-over ({} bytes)",
                    bytes.len()
                );
                let g = u64::from_le_bytes(bytes[12..20].try_into().expect("8"));
                assert!(
                    bytes == content(9999, g),
                    "cycle {cycle}: torn/mixed crash-over file (claims gen {g})"
                );
                if let Some(last) = last_acked_over {
                    let ok = g == last || matches!(inflight, Some(Op::Over(x)) if *x == g);
                    assert!(ok, "cycle {cycle}: crash-over holds gen {g}, last acknowledged {last}: an acknowledged write was lost");
                }
            }
        }
    }
    // every acknowledged write is on disk
    for op in acked {
        assert!(
            keys.join(key_file_name(&op.id())).exists(),
            "cycle {cycle}: acknowledged {} lost",
            op.id()
        );
    }
    if !leftovers.is_empty() {
        eprintln!("note: cycle {cycle}: non-.key leftovers in keys/ after kill -9: {leftovers:?}");
    }
}

/// Recursive snapshot of a tree: path → (kind, len, mode).
fn snapshot(root: &Path, out: &mut BTreeMap<PathBuf, (char, u64, u32)>) {
    for e in fs::read_dir(root).expect("read_dir").flatten() {
        let path = e.path();
        let meta = fs::symlink_metadata(&path).expect("meta");
        let kind = if meta.is_dir() {
            'd'
        } else if meta.file_type().is_symlink() {
            'l'
        } else {
            'f'
        };
        out.insert(
            path.clone(),
            (kind, if kind == 'd' { 0 } else { meta.len() }, meta.mode()),
        );
        if kind == 'd' {
            snapshot(&path, out);
        }
    }
}

#[test]
fn hostile_ids_stay_inside_the_keys_dir() {
    aziot_tests::require_keyd!();
    let keyd = Keyd::builder().backend(file_backend_only("hostile_ids_stay_inside_the_keys_dir")).start();
    let api = keyd.api(V2021);
    let keys = keyd.keys_dir();
    api.create_key("warmup", "sign"); // keys/ and the handle-validation key exist
                                      // a planted symlink where a key file will be written: the write must not follow it
    let outside = keyd.dir().join("outside-target");
    fs::write(&outside, b"do not overwrite").expect("write");
    std::os::unix::fs::symlink(&outside, keys.join(key_file_name("victim"))).expect("symlink");
    let log = keyd.log_path();
    let mut before = BTreeMap::new();
    snapshot(keyd.dir(), &mut before);

    let long = "a".repeat(10 * 1024);
    let sym_ids = [
        "../x",
        "../../escape",
        "a/b",
        "a%2Fb",
        "/etc/aziot-test-passwd",
        ".",
        "..",
        "ключ-🔑",
        long.as_str(),
        "a\\b",
        "",
        " ",
        "x\u{202e}y",
        "nul\u{1}ctl",
        "victim",
    ];
    let pair_ids = [
        "../p",
        "p/q",
        "p%2Fq",
        "...",
        "ключ-🔑-p",
        "/tmp/aziot-evil",
    ];
    let mut created = vec![key_file_name("victim")];
    for id in sym_ids {
        let r = api.post(
            "/key",
            &json!({"keyId": id, "usage": "sign", "keyBytes": b64(b"hostile")}),
        );
        assert!(
            r.status == 200 || (400..500).contains(&r.status),
            "id {id:?}: {r}"
        );
        if r.status == 200 {
            created.push(key_file_name(id));
            let h = handle_of(&r, id);
            assert_eq!(Handle::parse(&h).id(), id);
            assert_eq!(api.sign_hmac(&h, b"m"), hmac_sha256(b"hostile", b"m"));
            if !id.is_empty() {
                // (an empty id cannot be addressed in a path: /key/ is 404)
                assert_eq!(Handle::parse(&api.get_key(id)).id(), id);
            }
        } else {
            assert!(!r.message().is_empty());
        }
    }
    for id in pair_ids {
        let r = api.post(
            "/keypair",
            &json!({"keyId": id, "preferredAlgorithms": "ec-p256"}),
        );
        assert!(
            r.status == 200 || (400..500).contains(&r.status),
            "id {id:?}: {r}"
        );
        if r.status == 200 {
            created.push(key_file_name(id));
            assert_eq!(Handle::parse(&api.get_keypair(id)).id(), id);
        }
    }
    // ids in paths are plain ids too
    for path in [
        "/key/..%2F..%2Fetc%2Fpasswd",
        "/key/%2Fetc%2Fpasswd",
        "/keypair/..%2Fconfig.toml",
        "/key/..%2F..",
    ] {
        expect_err(&api.get(path), 400, LIB_INVALID);
    }
    assert_eq!(
        fs::read(&outside).expect("outside"),
        b"do not overwrite",
        "write followed a symlink"
    );

    let mut after = BTreeMap::new();
    snapshot(keyd.dir(), &mut after);
    for (path, info) in &after {
        if path == &log || before.get(path) == Some(info) {
            continue;
        }
        assert!(
            path.parent() == Some(keys.as_path()),
            "created/changed outside keys/: {}",
            path.display()
        );
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert!(created.contains(&name), "unexpected file in keys/: {name}");
        assert_eq!(info.0, 'f', "{name} should now be a regular file");
    }
    for path in before.keys() {
        assert!(after.contains_key(path), "removed: {}", path.display());
    }
}

/// create-if-not-exists under concurrency: every caller gets the same key (a caller that
/// created a key and used it must never see it replaced by a concurrent create).
#[test]
fn concurrent_creates_agree() {
    aziot_tests::require_keyd!();
    let keyd = Keyd::start("max_requests = 32\n");
    let api = keyd.api(V2021);
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let api = api.clone();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                let k = api.create_key("race-key", "sign");
                let sig = api.sign_hmac(&k, b"m");
                let p = api.create_keypair("race-pair", Some("ec-p256"));
                let point = api.param(&p, "ec-point");
                (sig, point)
            })
        })
        .collect();
    let results: Vec<(Vec<u8>, String)> = threads
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    let final_sig = api.sign_hmac(&api.get_key("race-key"), b"m");
    let final_point = api.param(&api.get_keypair("race-pair"), "ec-point");
    for (sig, point) in &results {
        assert_eq!(
            sig, &final_sig,
            "a concurrent create replaced a key another caller already used"
        );
        assert_eq!(
            point, &final_point,
            "a concurrent create replaced a key pair"
        );
    }
    if keyd.backend() == Backend::File {
        assert_eq!(
            list_keys(&keyd.keys_dir()).len(),
            3,
            "{:?}",
            list_keys(&keyd.keys_dir())
        );
    } else {
        // one secret object and one pair (private + public) on the token, besides the
        // handle-validation key (a dynamic key too: on the token)
        let mut labels = keyd.softhsm().expect("token").labels();
        labels.sort();
        assert_eq!(
            labels,
            ["handle-validation-key", "race-key", "race-pair", "race-pair"],
            "token objects"
        );
    }
}
