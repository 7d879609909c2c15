//! `aziotctl config mp` (spec aziotctl.md §3), through the real binary.

mod common;

use std::fs;
use std::process::{Command, Output};

use common::{assert_fails, assert_ok, owner_mode, stdout, Root};

const CS: &str = "HostName=example.azure-devices.net;DeviceId=my-device;SharedAccessKey=YXppb3QtaWRlbnRpdHktc2VydmljZXxhemlvdC1pZGU=";

fn mp(args: &[&str]) -> Output {
    Command::new(common::BIN)
        .args(["config", "mp"])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn writes_the_super_config() {
    let root = Root::new();
    let path = root.join("etc/aziot/config.toml");
    let p = path.to_str().unwrap();
    let out = mp(&["-c", CS, "-o", p]);
    let (stdout, stderr) = assert_ok(&out);
    assert!(stderr.is_empty(), "{stderr}");
    assert_eq!(
        stdout,
        format!(
            "Azure IoT Identity Service has been configured successfully!\n\
             The configuration has been written to {p}\n\
             To apply the new configuration to services, run:\n\n    \
             sudo aziotctl config apply -c '{p}'\n"
        )
    );
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        format!(
            "prefer_module_identity_cache = false\n\n[provisioning]\nsource = \"manual\"\n\
             connection_string = \"{CS}\"\n\n[aziot_keys]\n\n[preloaded_keys]\n\n\
             [cert_issuance]\n\n[preloaded_certs]\n\n[tpm]\n"
        )
    );
    // Owned by the invoking user (root here) and its primary group, mode 0600.
    assert_eq!(owner_mode(&path), (0, 0, 0o600));
    let leftovers: Vec<_> = fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // The result applies cleanly, without a single warning.
    let (_, stderr) = assert_ok(&root.apply(&[]));
    assert!(stderr.is_empty(), "{stderr}");
    let identityd = root.service("identityd").unwrap();
    assert_eq!(
        identityd["provisioning"]["device_id"].as_str(),
        Some("my-device")
    );
    assert_eq!(
        fs::read(root.key_path()).unwrap(),
        b"aziot-identity-service|aziot-ide"
    );
}

#[test]
fn refuses_to_overwrite_without_force() {
    let root = Root::new();
    let path = root.join("etc/aziot/config.toml");
    let p = path.to_str().unwrap();
    root.config("# mine\n");
    let err = assert_fails(&mp(&["-c", CS, "-o", p]));
    assert_eq!(
        err,
        format!(
            "File {p} already exists. Azure IoT Identity Service has already been configured.\n\n\
             To have the configuration take effect, run:\n\n    sudo aziotctl config apply\n\n\
             To reconfigure IoT Identity Service, run:\n\n    sudo aziotctl config mp --force\n"
        )
    );
    assert_eq!(fs::read_to_string(&path).unwrap(), "# mine\n");

    assert_ok(&mp(&[
        "--connection-string",
        CS,
        "--out-config-file",
        p,
        "--force",
    ]));
    assert!(fs::read_to_string(&path).unwrap().contains(CS));
    assert_eq!(owner_mode(&path), (0, 0, 0o600));
}

#[test]
fn rejects_a_bad_connection_string() {
    let root = Root::new();
    let path = root.join("etc/aziot/config.toml");
    let out = mp(&[
        "-c",
        "HostName=h;SharedAccessKey=c2VjcmV0",
        "-o",
        path.to_str().unwrap(),
    ]);
    let err = assert_fails(&out);
    assert_eq!(
        err,
        "invalid connection string: required parameter \"DeviceId\" is missing\n"
    );
    assert!(!path.exists());

    let out = mp(&[
        "-c",
        "HostName=h;DeviceId=d;SharedAccessKey=not*b64",
        "-o",
        path.to_str().unwrap(),
    ]);
    let err = assert_fails(&out);
    assert!(err.starts_with("invalid connection string: connection string's \"SharedAccessKey\" parameter could not be decoded from base64: "), "{err}");
    assert!(!err.contains("not*b64") && !stdout(&out).contains("not*b64"));
    assert!(!path.exists());
}

#[test]
fn does_not_create_the_directory() {
    let root = Root::new();
    let path = root.join("missing/config.toml");
    let err = assert_fails(&mp(&["-c", CS, "-o", path.to_str().unwrap()]));
    assert!(
        err.starts_with(&format!("could not create {}", path.display())),
        "{err}"
    );
    assert!(!root.join("missing").exists());
}
