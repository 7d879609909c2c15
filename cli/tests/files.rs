//! What `config apply` does to the file system: owners and modes, the key directory, atomicity
//! when a write fails midway, the stale key, `--dry-run`, and the root check.

mod common;

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt as _};
use std::os::unix::process::CommandExt as _;
use std::process::Command;

use common::{
    assert_fails, assert_file_modes, assert_ok, owner_mode, stdout, Root, HEADER, KS, SERVICES,
};

const INLINE_KEY: &str = r#"
[provisioning]
source = "manual"
iothub_hostname = "example.azure-devices.net"
device_id = "my-device"

[provisioning.authentication]
method = "sas"
device_id_pk = { value = "YXppb3QtaWRlbnRpdHktc2VydmljZXxhemlvdC1pZGU=" }
"#;

const X509: &str = r#"
[provisioning]
source = "manual"
iothub_hostname = "example.azure-devices.net"
device_id = "my-device"

[provisioning.authentication]
method = "x509"
identity_cert = "file:///var/secrets/device-id.pem"
identity_pk = "file:///var/secrets/device-id.key.pem"

[aziot_max_requests]
keyd = 1
certd = 2
identityd = 3
tpmd = 4
"#;

/// The names in a directory, sorted.
fn names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn owners_and_modes_of_every_written_file() {
    let root = Root::new();
    root.config(INLINE_KEY);
    let (out, err) = assert_ok(&root.apply(&[]));
    assert!(err.is_empty(), "{err}");
    assert!(out.contains(&format!(
        "Note: Symmetric key will be written to {}\n",
        root.key_path().display()
    )));
    assert!(out.contains("Azure IoT Identity Service has been configured successfully!\n"));
    assert!(out.contains("no service was restarted (--root)"));
    assert!(out.ends_with("Done.\n"));

    assert_file_modes(&root);
    assert_eq!(owner_mode(&root.key_path()), (KS.0, KS.1, 0o600));
    assert_eq!(
        owner_mode(&root.join("var/secrets/aziot/keyd")),
        (KS.0, KS.1, 0o700)
    );
    for parent in ["var", "var/secrets", "var/secrets/aziot"] {
        assert_eq!(owner_mode(&root.join(parent)), (0, 0, 0o755), "{parent}");
    }
    for (svc, _) in SERVICES {
        // what the service's root broker accepts to read (root's, not group/other-writable)
        if let Err(e) = aziot_policy::trusted::open_root_owned(&root.service_path(svc)) {
            panic!("{svc}: the broker would refuse the written config: {e}");
        }
        let text = fs::read_to_string(root.service_path(svc)).unwrap();
        assert!(text.starts_with(HEADER), "{svc}");
        // Nothing but the generated file: no temporary or backup left behind.
        let dir = root.service_path(svc).parent().unwrap().to_owned();
        assert_eq!(names(&dir), ["00-super.toml"], "{svc}");
    }
    assert_eq!(
        fs::read_to_string(root.service_path("tpmd")).unwrap(),
        HEADER,
        "tpmd has nothing to say"
    );
    assert_eq!(names(&root.join("var/secrets/aziot/keyd")), ["device-id"]);

    // A second run replaces everything the same way.
    let before = root.snapshot();
    assert_ok(&root.apply(&[]));
    assert_eq!(root.snapshot(), before);
    assert_file_modes(&root);
}

#[test]
fn key_directory_is_secured_and_ancestors_get_only_o_x() {
    let root = Root::new();
    root.config(INLINE_KEY);
    // An administrator's locked-down /var/secrets, an /var/secrets/aziot in a group aziotks is
    // not in, and a key directory with the wrong owner and mode.
    for (dir, mode) in [
        ("var", 0o750),
        ("var/secrets", 0o700),
        ("var/secrets/aziot", 0o750),
    ] {
        fs::create_dir_all(root.join(dir)).unwrap();
        fs::set_permissions(root.join(dir), fs::Permissions::from_mode(mode)).unwrap();
    }
    std::os::unix::fs::chown(root.join("var/secrets/aziot"), Some(0), Some(5557)).unwrap();
    fs::create_dir(root.join("var/secrets/aziot/keyd")).unwrap();
    fs::set_permissions(
        root.join("var/secrets/aziot/keyd"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();

    let (_, err) = assert_ok(&root.apply(&[]));
    assert_eq!(owner_mode(&root.join("var")), (0, 0, 0o751));
    assert_eq!(owner_mode(&root.join("var/secrets")), (0, 0, 0o701));
    assert_eq!(
        owner_mode(&root.join("var/secrets/aziot")),
        (0, 5557, 0o751)
    );
    assert_eq!(
        owner_mode(&root.join("var/secrets/aziot/keyd")),
        (KS.0, KS.1, 0o700)
    );
    assert_eq!(err.matches("added o+x").count(), 3, "{err}");
    assert!(
        err.contains("var/secrets: added o+x (mode 0700 -> 0701)"),
        "{err}"
    );

    // A directory aziotks can traverse through its groups (here aziotks's own group, as owner
    // root) is left alone.
    let root = Root::new();
    root.config(INLINE_KEY);
    root.mkdirs("var/secrets");
    fs::set_permissions(root.join("var/secrets"), fs::Permissions::from_mode(0o710)).unwrap();
    std::os::unix::fs::chown(root.join("var/secrets"), Some(0), Some(KS.1)).unwrap();
    let (_, err) = assert_ok(&root.apply(&[]));
    assert_eq!(owner_mode(&root.join("var/secrets")), (0, KS.1, 0o710));
    assert!(err.is_empty(), "{err}");
}

#[test]
fn a_failed_rename_midway_leaves_every_previous_file_byte_identical() {
    let root = Root::new();
    root.config(INLINE_KEY);
    assert_ok(&root.apply(&[]));
    // The last target cannot be replaced: it is now a directory. The key file, keyd, certd and
    // identityd are renamed into place before tpmd fails, so this exercises the rollback.
    fs::remove_file(root.service_path("tpmd")).unwrap();
    fs::create_dir(root.service_path("tpmd")).unwrap();
    root.write("etc/aziot/tpmd/config.d/00-super.toml/keep", "x");
    let before = root.snapshot();
    assert!(before.len() >= 6);

    // The new config would change every file and delete the key.
    root.config(X509);
    let err = assert_fails(&root.apply(&[]));
    assert!(
        err.contains(&format!(
            "could not create {}",
            root.service_path("tpmd").display()
        )),
        "{err}"
    );
    assert_eq!(
        root.snapshot(),
        before
            .iter()
            .map(|f| {
                // The super-config itself did change, by the test.
                if f.0.ends_with("etc/aziot/config.toml") {
                    (f.0.clone(), X509.as_bytes().to_vec(), f.2, f.3, f.4)
                } else {
                    f.clone()
                }
            })
            .collect::<Vec<_>>()
    );
    assert_file_modes_except_tpmd(&root);
}

fn assert_file_modes_except_tpmd(root: &Root) {
    for (svc, _) in &SERVICES[..3] {
        assert_eq!(owner_mode(&root.service_path(svc)), (0, 0, 0o600), "{svc}");
    }
    assert_eq!(owner_mode(&root.key_path()), (KS.0, KS.1, 0o600));
}

#[test]
fn an_unwritable_directory_changes_nothing() {
    let root = Root::new();
    root.config(INLINE_KEY);
    assert_ok(&root.apply(&[]));
    // tpmd's config.d is replaced by a file: its temporary file cannot be created.
    fs::remove_dir_all(root.join("etc/aziot/tpmd/config.d")).unwrap();
    root.write("etc/aziot/tpmd/config.d", "not a directory");
    root.config(X509);
    let before = root.snapshot();
    let err = assert_fails(&root.apply(&[]));
    assert!(err.contains("could not create"), "{err}");
    assert_eq!(root.snapshot(), before);

    // On a first run, a missing config.d (the package ships them) fails before any file exists.
    let root = Root::new();
    root.config(INLINE_KEY);
    fs::remove_dir(root.join("etc/aziot/identityd/config.d")).unwrap();
    let err = assert_fails(&root.apply(&[]));
    assert!(
        err.contains(&format!(
            "could not create {}",
            root.service_path("identityd").display()
        )),
        "{err}"
    );
    for (svc, _) in SERVICES {
        assert!(!root.service_path(svc).exists(), "{svc}");
    }
    assert!(!root.key_path().exists());
}

#[test]
fn a_symlinked_target_is_replaced_not_followed() {
    let root = Root::new();
    root.config(X509);
    root.write("victim", "precious");
    symlink(root.join("victim"), root.service_path("keyd")).unwrap();
    assert_ok(&root.apply(&[]));
    assert_eq!(fs::read_to_string(root.join("victim")).unwrap(), "precious");
    assert!(fs::symlink_metadata(root.service_path("keyd"))
        .unwrap()
        .is_file());
    assert_file_modes(&root);
}

#[test]
fn a_stale_key_is_removed_with_a_notice() {
    let root = Root::new();
    root.config(INLINE_KEY);
    assert_ok(&root.apply(&[]));
    assert!(root.key_path().exists());
    root.config(X509);
    let (out, _) = assert_ok(&root.apply(&["--dry-run"]));
    assert!(
        out.contains(&format!("Would remove {}", root.key_path().display())),
        "{out}"
    );
    assert!(root.key_path().exists());
    let (out, _) = assert_ok(&root.apply(&[]));
    assert!(!root.key_path().exists());
    assert!(
        out.contains(&format!(
            "Note: removed {}: the new configuration does not use an inline symmetric key",
            root.key_path().display()
        )),
        "{out}"
    );
}

#[test]
fn a_key_still_in_use_is_kept() {
    // Referenced by another keyd config file: kept, with a warning naming that file.
    let root = Root::new();
    root.config(INLINE_KEY);
    assert_ok(&root.apply(&[]));
    let key = fs::read(root.key_path()).unwrap();
    root.write(
        "etc/aziot/keyd/config.d/50-extra.toml",
        "[preloaded_keys]\nold = \"file:///var/secrets/aziot/keyd/device-id\"\n",
    );
    root.config(X509);
    let (out, err) = assert_ok(&root.apply(&[]));
    assert_eq!(fs::read(root.key_path()).unwrap(), key);
    assert!(!out.contains("Note: removed"), "{out}");
    assert!(
        err.contains("is kept: ") && err.contains("50-extra.toml refers to it"),
        "{err}"
    );

    // Referenced by the new configuration itself: kept silently.
    let root = Root::new();
    root.config(INLINE_KEY);
    assert_ok(&root.apply(&[]));
    root.config(&INLINE_KEY.replace(
        "{ value = \"YXppb3QtaWRlbnRpdHktc2VydmljZXxhemlvdC1pZGU=\" }",
        "{ uri = \"file:///var/secrets/aziot/keyd/device-id\" }",
    ));
    let (out, err) = assert_ok(&root.apply(&[]));
    assert!(root.key_path().exists());
    assert!(
        !out.contains("Note: removed") && err.is_empty(),
        "{out}{err}"
    );
}

#[test]
fn dry_run_changes_nothing_and_redacts_secrets() {
    let root = Root::new();
    root.config(
        r#"
[provisioning]
source = "dps"
global_endpoint = "https://global.azure-devices-provisioning.net/"
id_scope = "0ab1234C5D6"

[provisioning.attestation]
method = "symmetric_key"
registration_id = "my-device"
symmetric_key = { value = "U2VjcmV0S2V5Qnl0ZXM=" }

[aziot_keys]
pkcs11_lib_path = "/usr/lib/libmypkcs11.so"
pkcs11_base_slot = "pkcs11:slot-id=0?pin-value=BaseSlotPIN"

[cert_issuance.est.auth]
username = "estuser"
password = "EstPassw0rd"
identity_cert = "file:///var/secrets/est-id.pem"
identity_pk = "pkcs11:slot-id=0;object=est-id?pin-value=IdentityPIN"

[cert_issuance.est.urls]
default = "https://example.org/.well-known/est"

[tpm.hierarchy_authorization]
endorsement = "EndorsementAuth"
owner = "OwnerAuth"
"#,
    );
    let before = root.snapshot();
    let (out, _) = assert_ok(&root.apply(&["--dry-run"]));
    assert_eq!(root.snapshot(), before, "--dry-run wrote something");
    assert!(!root.join("var").exists(), "--dry-run created a directory");

    for secret in [
        "U2VjcmV0S2V5Qnl0ZXM",
        "SecretKeyBytes",
        "BaseSlotPIN",
        "EstPassw0rd",
        "IdentityPIN",
        "EndorsementAuth",
        "OwnerAuth",
    ] {
        assert!(!out.contains(secret), "{secret} was printed:\n{out}");
    }
    for expected in [
        "Dry run: nothing is changed.".to_owned(),
        format!("Would create directory {}", root.join("var").display()),
        format!(
            "Would write {} (owner aziotks, uid 5554, gid 5554, mode 0600):\n<14 bytes of \
             symmetric key, redacted>",
            root.key_path().display()
        ),
        format!(
            "Would write {} (owner root, uid 0, gid 0, mode 0600):\n{HEADER}",
            root.service_path("certd").display()
        ),
        "pkcs11_base_slot = \"pkcs11:slot-id=0?pin-value=<redacted>\"".to_owned(),
        "est-id = \"pkcs11:slot-id=0;object=est%2Did?pin-value=<redacted>\"".to_owned(),
        "password = \"<redacted>\"".to_owned(),
        "username = \"estuser\"".to_owned(),
        "endorsement = \"<redacted>\"".to_owned(),
        "owner = \"<redacted>\"".to_owned(),
        "Would restart no service (--root).".to_owned(),
    ] {
        assert!(out.contains(&expected), "{expected:?} missing from:\n{out}");
    }
    for (svc, _) in SERVICES {
        assert!(out.contains(&format!("Would write {}", root.service_path(svc).display())));
    }
}

#[test]
fn explicit_config_path_with_root() {
    let root = Root::new();
    root.write("elsewhere/super.toml", X509);
    let path = root.join("elsewhere/super.toml");
    assert_ok(&root.apply(&["-c", path.to_str().unwrap()]));
    let keyd = root.service("keyd").unwrap();
    assert_eq!(keyd["max_requests"].as_integer(), Some(1));
}

#[test]
fn only_root_may_write_but_anyone_may_dry_run() {
    let root = Root::new();
    root.config(X509);
    // A copy of the binary that the unprivileged user can surely execute.
    let bin = root.join("aziotctl");
    fs::copy(common::BIN, &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let run = |extra: &[&str]| {
        Command::new(&bin)
            .args(["config", "apply", "--root"])
            .arg(&root.path)
            .args(extra)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap()
    };
    let err = assert_fails(&run(&[]));
    assert!(err.contains("this command must be run as root"), "{err}");
    assert!(!root.service_path("keyd").exists());

    let out = run(&["--dry-run"]);
    assert_ok(&out);
    assert!(stdout(&out).contains("Would write"));
}
