//! Inputs that upstream drops silently are accepted here too, but each one gets a warning on
//! stderr (spec aziotctl.md §2.5, §2.6, §8). The corpus cases cover unknown keys, `http://` EST
//! URLs, ID collisions, dropped PKCS#11 attributes, `auto_renew` outside DPS and the string
//! `auth_key_index`; this file covers the rest.

mod common;

use common::{assert_ok, Root};

const MANUAL: &str = r#"
[provisioning]
source = "manual"
iothub_hostname = "example.azure-devices.net"
device_id = "my-device"
"#;

const CS: &str = "HostName=example.azure-devices.net;DeviceId=my-device;SharedAccessKey=YXppb3Q=";

fn issued(options: &str) -> String {
    format!(
        "{MANUAL}\n[provisioning.authentication]\nmethod = \"x509\"\n\n\
         [provisioning.authentication.identity_cert]\n{options}\n"
    )
}

/// Applies `config` successfully and returns stderr.
fn warnings_of(config: &str) -> String {
    let root = Root::new();
    root.config(config);
    let (_, err) = assert_ok(&root.apply(&[]));
    err
}

#[track_caller]
fn expect_warning(config: &str, warning: &str) {
    let err = warnings_of(config);
    assert!(
        err.lines()
            .any(|l| l.starts_with("Warning: ") && l.contains(warning)),
        "expected a warning containing {warning:?}, stderr:\n{err}\nconfig:\n{config}"
    );
}

#[test]
fn dropped_authentication_halves() {
    let est = "method = \"est\"\nurl = \"https://est.example/\"\n";
    expect_warning(
        &issued(&format!("{est}username = \"u\"")),
        "`provisioning.authentication.identity_cert.username` is ignored: `password` is missing",
    );
    expect_warning(
        &issued(&format!("{est}password = \"p\"")),
        "`provisioning.authentication.identity_cert.password` is ignored: `username` is missing",
    );
    expect_warning(
        &issued(&format!("{est}identity_cert = \"file:///c.pem\"")),
        "identity_cert.identity_cert` is ignored: `identity_pk` is missing",
    );
    expect_warning(
        &issued(&format!("{est}bootstrap_identity_pk = \"file:///k.pem\"")),
        "identity_cert.bootstrap_identity_pk` is ignored: `bootstrap_identity_cert` is missing",
    );
    expect_warning(
        &issued(&format!(
            "{est}identity_cert = \"file:///c.pem\"\nidentity_pk = \"file:///k.pem\"\n\
             bootstrap_identity_cert = \"file:///b.pem\"\nbootstrap_identity_pk = \"file:///bk.pem\""
        )),
        "are ignored: the bootstrap identity takes precedence",
    );
    expect_warning(
        &format!(
            "{MANUAL}\n[provisioning.authentication]\nmethod = \"x509\"\n\
             identity_cert = {{ method = \"self_signed\" }}\n\n\
             [cert_issuance.est.auth]\nusername = \"u\"\n"
        ),
        "`cert_issuance.est.auth.username` is ignored: `password` is missing",
    );
}

#[test]
fn ignored_alternatives() {
    expect_warning(
        &issued("method = \"self_signed\"\ncommon_name = \"a\"\nsubject = { CN = \"b\" }"),
        "`provisioning.authentication.identity_cert.subject` is ignored: `common_name` is also set",
    );
    expect_warning(
        &issued("method = \"local_ca\"\nurl = \"https://est.example/\"\nusername = \"u\""),
        "`provisioning.authentication.identity_cert.url` is ignored: it is only used with method = \"est\"",
    );
    expect_warning(
        &format!(
            "{MANUAL}\n[provisioning.authentication]\nmethod = \"x509\"\n\
             identity_cert = {{ method = \"self_signed\" }}\nidentity_pk = \"file:///k.pem\"\n"
        ),
        "`provisioning.authentication.identity_pk` is ignored: `identity_cert` is a table",
    );
    expect_warning(
        &format!(
            "{MANUAL}\n[provisioning.authentication]\nmethod = \"sas\"\n\
             device_id_pk = {{ value = \"YXppb3Q=\", uri = \"file:///k\" }}\n"
        ),
        "`provisioning.authentication.device_id_pk.uri` is ignored: `value` is set",
    );
    expect_warning(
        &format!(
            "{MANUAL}connection_string = \"{CS}\"\n\n[provisioning.authentication]\nmethod = \"sas\"\n"
        ),
        "`provisioning.authentication` is ignored: `connection_string` is set and takes precedence",
    );
    expect_warning(
        &format!(
            "[provisioning]\nsource = \"manual\"\nconnection_string = \"{CS};GatewayHostName=gw\"\n"
        ),
        "connection string parameter \"GatewayHostName\" is ignored (set `local_gateway_hostname` instead)",
    );
    expect_warning(
        "[provisioning]\nsource = \"none\"\n\n[cert_issuance.local_ca]\n\
         cert = { method = \"self_signed\" }\npk = \"file:///k.pem\"\n",
        "`cert_issuance.local_ca.pk` is ignored: `cert` is a table",
    );
    expect_warning(
        "[provisioning]\nsource = \"none\"\n\n[cert_issuance.local_ca.cert]\nmethod = \"est\"\n\
         username = \"u\"\npassword = \"p\"\n\n[cert_issuance.est.urls]\n\
         default = \"https://est.example/\"\n",
        "the EST authentication of `cert_issuance.local_ca.cert` is ignored",
    );
}

#[test]
fn overridden_and_unusable_settings() {
    expect_warning(
        "[provisioning]\nsource = \"none\"\n\n[aziot_keys]\nhomedir_path = \"/srv/keys\"\n",
        "`aziot_keys.homedir_path` is replaced by \"/var/lib/aziot/keyd\"",
    );
    expect_warning(
        "[provisioning]\nsource = \"none\"\n\n[aziot_keys]\npkcs11_lib = \"/x.so\"\n",
        "`aziot_keys.pkcs11_lib` is not a parameter that keyd understands",
    );
    expect_warning(
        "[provisioning]\nsource = \"none\"\n\n[endpoints]\naziot_keyd = \"unix:///k.sock\"\n",
        "`endpoints` is ignored",
    );
    expect_warning(
        &issued("method = \"est\""),
        "cert `device-id` is issued with method = \"est\" but no EST URL is configured for it",
    );
    expect_warning(
        &issued("method = \"local_ca\""),
        "cert `device-id` is issued with method = \"local_ca\" but `[cert_issuance.local_ca]` is not configured",
    );
}

#[test]
fn warnings_never_show_secrets() {
    let err = warnings_of(&format!(
        "[provisioning]\nsource = \"manual\"\n\
         connection_string = \"{CS};SharedAccessKeyName=owner;Extra=TopSecretValue\"\n\n\
         [preloaded_keys]\nk = \"pkcs11:token=t;object=o;id=%01?pin-value=PinPinPin&module-name=m\"\n"
    ));
    assert!(err.contains("\"SharedAccessKeyName\" is ignored"), "{err}");
    assert!(err.contains("\"Extra\" is ignored"), "{err}");
    assert!(
        err.contains("were dropped: id, module-name (query attribute)"),
        "{err}"
    );
    for secret in ["TopSecretValue", "PinPinPin", "YXppb3Q"] {
        assert!(!err.contains(secret), "{secret} printed:\n{err}");
    }
}

#[test]
fn a_clean_config_has_no_warnings() {
    let err = warnings_of(&format!(
        "{MANUAL}\n[provisioning.authentication]\nmethod = \"sas\"\n\
         device_id_pk = {{ value = \"YXppb3Q=\" }}\n\n[aziot_max_requests]\nkeyd = 2\n"
    ));
    assert!(err.is_empty(), "{err}");
}
