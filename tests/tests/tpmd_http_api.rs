//! tpmd's HTTP API (spec tpmd.md §4) served on a Unix socket, TPM = swtpm.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use aziot_ipc::client::BlockingClient;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use aziot_tests::crypto::{hmac_sha256 as hmac, random};
use aziot_tests::Dep;
use aziot_tests::tpmd::{config, Swtpm};
use serde_json::{json, Value};

struct Server {
    socket: PathBuf,
    _dir: aziot_tests::keyd::TempDir,
}

fn serve(swtpm: &Swtpm, extra: &str) -> Server {
    let cfg = config(swtpm, extra);
    let tpm = aziot_tpmd::init_tpm(&cfg).unwrap();
    let dir = aziot_tests::keyd::TempDir::new("tpmd-http");
    let socket = dir.path().join("tpmd.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        let e = aziot_tpmd::serve(listener, &cfg, tpm, None);
        panic!("server stopped: {e}");
    });
    Server { socket, _dir: dir }
}

fn call(client: &BlockingClient, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let (status, bytes) = client.raw(method, path, body.map(str::as_bytes)).unwrap();
    let value = if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap() };
    (status, value)
}

fn b64(v: &Value) -> Vec<u8> {
    STANDARD.decode(v.as_str().unwrap()).unwrap()
}

#[test]
fn keys_import_sign_and_errors() {
    aziot_tests::require!(Dep::Swtpm);
    let swtpm = Swtpm::start_temp();
    let server = serve(&swtpm, "");
    let client = BlockingClient::new(&server.socket, "2020-09-01");

    let (status, keys) = call(&client, "GET", "/get_tpm_keys", None);
    assert_eq!(status, 200, "{keys}");
    let (ek, srk) = (b64(&keys["endorsement_key"]), b64(&keys["storage_root_key"]));
    assert_eq!((ek.len(), srk.len()), (316, 284));

    // Signing before any import: 500.
    let (status, body) = call(&client, "POST", "/sign_with_auth_key", Some(r#"{"data":"aGk="}"#));
    assert_eq!((status, body), (500, json!({"message": "internal error"})));

    let k1 = random(32);
    let blob = aziot_tpmd::dps_blob::build(&ek, &srk, &k1).unwrap();
    let body = json!({"key": STANDARD.encode(&blob)}).to_string();
    let (status, resp) = call(&client, "POST", "/import_auth_key", Some(&body));
    assert_eq!((status, resp), (200, json!({})));

    let sign = |data: &[u8]| {
        let body = json!({"data": STANDARD.encode(data)}).to_string();
        let (status, resp) = call(&client, "POST", "/sign_with_auth_key", Some(&body));
        assert_eq!(status, 200, "{resp}");
        b64(&resp["digest"])
    };
    assert_eq!(sign(b"sr\n123"), hmac(&k1, b"sr\n123"));

    // Bad input: 400 with a message, and the old key still signs.
    let mut corrupted = blob.clone();
    corrupted[50] ^= 1;
    let cases = [
        (STANDARD.encode(&blob[..100]), "ends inside"),
        (STANDARD.encode(&corrupted), "rejected the auth key blob"),
        (String::new(), "ends inside credentialBlob"),
        (STANDARD.encode([0u8, 0]), "credentialBlob is empty"),
    ];
    for (key, needle) in cases {
        let body = json!({"key": key}).to_string();
        let (status, resp) = call(&client, "POST", "/import_auth_key", Some(&body));
        assert_eq!(status, 400, "{resp}");
        let message = resp["message"].as_str().unwrap();
        assert!(message.starts_with("could not import auth key\ncaused by: "), "{message}");
        assert!(message.contains(needle), "{message}");
        assert_eq!(sign(b"again"), hmac(&k1, b"again"));
    }
    // Invalid base64 and bad JSON: 422 (framework); no body: 400.
    let (status, _) = call(&client, "POST", "/import_auth_key", Some(r#"{"key":"a"}"#));
    assert_eq!(status, 422);
    let (status, _) = call(&client, "POST", "/import_auth_key", Some(r#"{"key":"YQ"}"#));
    assert_eq!(status, 422);
    let (status, _) = call(&client, "POST", "/sign_with_auth_key", Some(r#"{"dat":"YQ=="}"#));
    assert_eq!(status, 422);
    let (status, resp) = call(&client, "POST", "/import_auth_key", None);
    assert_eq!((status, resp), (400, json!({"message": "missing request body"})));
    // More than TPM2_MAX_DIGEST_BUFFER: an HMAC sequence.
    let long = random(5000);
    assert_eq!(sign(&long), hmac(&k1, &long));

    // Framework errors.
    assert_eq!(call(&client, "GET", "/nope", None).0, 404);
    assert_eq!(call(&client, "POST", "/get_tpm_keys", Some("{}")).1, json!({"message": "method not allowed"}));
    assert_eq!(call(&client, "GET", "/import_auth_key", None).0, 400);
    let other = BlockingClient::new(&server.socket, "2021-05-01");
    let (status, resp) = call(&other, "GET", "/get_tpm_keys", None);
    assert_eq!((status, resp), (400, json!({"message": "invalid api-version \"2021-05-01\""})));

    // A replacement key is used from then on.
    let k2 = random(32);
    let body = json!({"key": STANDARD.encode(aziot_tpmd::dps_blob::build(&ek, &srk, &k2).unwrap())}).to_string();
    assert_eq!(call(&client, "POST", "/import_auth_key", Some(&body)).0, 200);
    assert_eq!(sign(b"hub"), hmac(&k2, b"hub"));
}

/// Callers other than root and the `[[principal]]` uids get 401 (new; upstream has no check).
#[test]
fn only_principals_may_call() {
    aziot_tests::require!(Dep::Root, Dep::Swtpm, Dep::Python3);
    use std::os::unix::fs::PermissionsExt as _;
    use std::os::unix::process::CommandExt as _;
    let swtpm = Swtpm::start_temp();
    let server = serve(&swtpm, "[[principal]]\nuid = 65533\n");
    std::fs::set_permissions(server.socket.parent().unwrap(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&server.socket, std::fs::Permissions::from_mode(0o777)).unwrap();
    let script = format!(
        "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})\n\
         s.sendall(b'GET /get_tpm_keys?api-version=2020-09-01 HTTP/1.1\\r\\nhost: x\\r\\nconnection: close\\r\\n\\r\\n')\n\
         d=b''\nwhile True:\n  c=s.recv(65536)\n  if not c: break\n  d+=c\nsys.stdout.write(d.decode())\n",
        server.socket.to_str().unwrap()
    );
    let run_as = |uid: u32| {
        let out = std::process::Command::new("python3").arg("-c").arg(&script).uid(uid).gid(65534).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let denied = run_as(65534);
    assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
    assert!(denied.contains(r#"{"message":"user 65534 is not authorized to use the TPM service"}"#), "{denied}");
    let allowed = run_as(65533);
    assert!(allowed.starts_with("HTTP/1.1 200"), "{allowed}");
}
