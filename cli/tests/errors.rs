//! Every validation error of spec aziotctl.md §2.5 (and the conversion errors of §2.2), through
//! the real binary: exit status 1, the message on stderr, and nothing written.

mod common;

use common::{assert_fails, Root, SERVICES};

const DPS: &str = r#"
[provisioning]
source = "dps"
global_endpoint = "https://global.azure-devices-provisioning.net/"
id_scope = "0ab1234C5D6"
"#;

const MANUAL_X509: &str = r#"
[provisioning]
source = "manual"
iothub_hostname = "example.azure-devices.net"
device_id = "my-device"

[provisioning.authentication]
method = "x509"
"#;

const NONE: &str = "[provisioning]\nsource = \"none\"\n";

fn issued(options: &str) -> String {
    format!("{MANUAL_X509}\n[provisioning.authentication.identity_cert]\n{options}\n")
}

fn dps_renew(renew: &str) -> String {
    format!(
        "{DPS}\n[provisioning.attestation]\nmethod = \"x509\"\n\
         identity_cert = {{ method = \"self_signed\", auto_renew = {{ {renew} }} }}\n"
    )
}

fn cs(connection_string: &str) -> String {
    format!("[provisioning]\nsource = \"manual\"\nconnection_string = \"{connection_string}\"\n")
}

fn preloaded_key(location: &str) -> String {
    format!("{NONE}\n[preloaded_keys]\nk = \"{location}\"\n")
}

/// Applies `config`, expects failure, and checks that stderr holds `context` and `message` and
/// that no service config or key was written.
#[track_caller]
fn expect_error(config: &str, context: &str, message: &str) {
    let root = Root::new();
    root.config(config);
    let err = assert_fails(&root.apply(&[]));
    assert!(
        err.contains(context) && err.contains(message),
        "expected {context:?} / {message:?} in stderr:\n{err}\nconfig:\n{config}"
    );
    for (svc, _) in SERVICES {
        assert!(!root.service_path(svc).exists(), "{svc} was written");
    }
    assert!(!root.key_path().exists());
}

const PARSE: &str = "could not parse config file";

#[test]
fn top_level_errors() {
    expect_error("hostname = \"x\"\n", PARSE, "missing field `provisioning`");
    expect_error(
        &format!("local_gateway_hostname = \"a\"\nparent_hostname = \"b\"\n{NONE}"),
        PARSE,
        "duplicate field `parent_hostname`",
    );
    expect_error(
        &format!("cloud_timeout_sec = 69\n{NONE}"),
        PARSE,
        "cloud_timeout_sec must be at least 70 seconds",
    );
    expect_error(
        &format!("cloud_retries = \"3\"\n{NONE}"),
        PARSE,
        "cloud_retries: invalid type: string \"3\", expected u32",
    );
    expect_error(
        &format!("cloud_retries = -1\n{NONE}"),
        PARSE,
        "cloud_retries: invalid value: integer `-1`, expected u32",
    );
    expect_error(
        &format!("{NONE}\n[localid]\n"),
        PARSE,
        "localid: missing field `domain`",
    );
    expect_error(
        &format!("{NONE}\n[aziot_max_requests]\nkeyd = -5\n"),
        PARSE,
        "aziot_max_requests.keyd: invalid value: integer `-5`, expected usize",
    );
    expect_error(
        &format!("{NONE}\n[aziot_keys]\npkcs11_base_slot = 5\n"),
        PARSE,
        "aziot_keys.pkcs11_base_slot: invalid type: integer, expected a string",
    );
    expect_error(
        &format!("{NONE}\n[preloaded_certs]\nc = 5\n"),
        PARSE,
        "preloaded_certs.c: invalid type: integer `5`, expected a URL string or an array of cert IDs",
    );
    expect_error("[provisioning\n", PARSE, "TOML error at line 1");
}

#[test]
fn provisioning_errors() {
    expect_error(
        "[provisioning]\nsource = \"cloud\"\n",
        PARSE,
        "provisioning.source: unknown variant `cloud`, expected one of `manual`, `dps`, `none`",
    );
    expect_error(
        "[provisioning]\n",
        PARSE,
        "provisioning: missing field `source`",
    );
    expect_error(
        "[provisioning]\nsource = \"manual\"\n",
        PARSE,
        "source = \"manual\" needs either `connection_string`, or `iothub_hostname`",
    );
    expect_error(
        "[provisioning]\nsource = \"manual\"\niothub_hostname = \"h\"\n",
        PARSE,
        "provisioning: missing field `device_id`",
    );
    expect_error(
        &format!("{MANUAL_X509}identity_cert = \"file:///c.pem\"\n"),
        PARSE,
        "provisioning.authentication: missing field `identity_pk`",
    );
    expect_error(
        &MANUAL_X509.replace("\"x509\"", "\"x9\""),
        PARSE,
        "unknown variant `x9`, expected `sas` or `x509`",
    );
    expect_error(
        &format!("{DPS}\n[provisioning.attestation]\nmethod = \"psk\"\n"),
        PARSE,
        "unknown variant `psk`, expected one of `symmetric_key`, `x509`, `tpm`",
    );
    expect_error(
        &format!("{DPS}\n[provisioning.attestation]\nmethod = \"tpm\"\n"),
        PARSE,
        "provisioning.attestation: missing field `registration_id`",
    );
    expect_error(
        &DPS.replace(
            "https://global.azure-devices-provisioning.net/",
            "not a url",
        ),
        PARSE,
        "provisioning.global_endpoint: invalid URL: relative URL without a base",
    );
    expect_error(
        &format!(
            "{DPS}\n[provisioning.attestation]\nmethod = \"symmetric_key\"\n\
             registration_id = \"r\"\nsymmetric_key = {{ }}\n"
        ),
        PARSE,
        "symmetric_key: expected a table with either `value` (an inline base64 key) or `uri`",
    );
    expect_error(
        &format!(
            "{DPS}\n[provisioning.attestation]\nmethod = \"symmetric_key\"\n\
             registration_id = \"r\"\nsymmetric_key = {{ value = \"not*base64\" }}\n"
        ),
        PARSE,
        "symmetric_key.value: could not decode the symmetric key from base64",
    );
    // Nested mode (a conversion error, after parsing).
    expect_error(
        &format!(
            "local_gateway_hostname = \"gw\"\n{DPS}\n[provisioning.attestation]\n\
             method = \"tpm\"\nregistration_id = \"r\"\n"
        ),
        "",
        "DPS provisioning is not supported in nested mode",
    );
}

#[test]
fn connection_string_errors() {
    let key = "SharedAccessKey=YXppb3Q=";
    expect_error(
        &cs(&format!("DeviceId=d;{key}")),
        PARSE,
        "provisioning.connection_string: required parameter \"HostName\" is missing",
    );
    expect_error(
        &cs(&format!("HostName=h;{key}")),
        PARSE,
        "required parameter \"DeviceId\" is missing",
    );
    expect_error(
        &cs("HostName=h;DeviceId=d"),
        PARSE,
        "required parameter \"SharedAccessKey\" is missing",
    );
    expect_error(
        &cs("HostName=h;DeviceId=d;SharedAccessKey=s3cr*t"),
        PARSE,
        "connection string's \"SharedAccessKey\" parameter could not be decoded from base64: ",
    );
}

#[test]
fn cert_issuance_errors() {
    expect_error(
        &issued("method = \"est\"\nexpiry_days = 0"),
        PARSE,
        "identity_cert.expiry_days: expiry_days must be greater than 0",
    );
    expect_error(
        &issued("method = \"acme\""),
        PARSE,
        "unknown variant `acme`, expected one of `est`, `local_ca`, `self_signed`",
    );
    expect_error(
        &issued("common_name = \"x\""),
        PARSE,
        "missing field `method`",
    );
    expect_error(
        &format!("{NONE}\n[cert_issuance.local_ca]\ncert = \"file:///ca.pem\"\n"),
        PARSE,
        "cert_issuance.local_ca: missing field `pk`",
    );
    expect_error(
        &format!("{NONE}\n[cert_issuance.est]\ntrusted_certs = [\"ca.pem\"]\n"),
        PARSE,
        "cert_issuance.est.trusted_certs[0]: invalid URL",
    );
}

#[test]
fn renewal_policy_errors() {
    let cases = [
        ("threshold = \"\", retry = \"4%\"", "policy not specified"),
        ("threshold = \"80\", retry = \"4%\"", "bad units for policy"),
        (
            "threshold = \"x%\", retry = \"4%\"",
            "policy could not be parsed as number",
        ),
        (
            "threshold = \"0min\", retry = \"4%\"",
            "renewal policy values must be positive",
        ),
        (
            "threshold = \"80%\", retry = \"-1day\"",
            "renewal policy values must be positive",
        ),
        (
            "threshold = \"100%\", retry = \"4%\"",
            "lifetime percentage must be less than 100",
        ),
        ("retry = \"4%\"", "auto_renew: missing field `threshold`"),
        ("threshold = \"80%\"", "auto_renew: missing field `retry`"),
        (
            "rotate_key = 1, threshold = \"80%\", retry = \"4%\"",
            "expected a boolean",
        ),
    ];
    for (renew, message) in cases {
        expect_error(&dps_renew(renew), PARSE, message);
    }
    expect_error(
        &format!(
            "{NONE}\n[cert_issuance.est.identity_auto_renew]\nthreshold = \"5h\"\nretry = \"4%\"\n"
        ),
        PARSE,
        "cert_issuance.est.identity_auto_renew.threshold: bad units for policy",
    );
}

#[test]
fn key_location_errors() {
    let cases = [
        ("/var/secrets/key.pem", "preloaded_keys.k: missing scheme"),
        ("tpm:key", "preloaded_keys.k: unrecognized scheme"),
        ("file://host/key.pem", "cannot convert to file path"),
        (
            "pkcs11:object=k",
            "URI has neither [slot-id] nor [token] components",
        ),
        (
            "pkcs11:slot-id=zero",
            "pin-value path component has malformed value [zero]",
        ),
        (
            "pkcs11:token=%C3%28",
            "URI component with key [token] is not valid UTF-8",
        ),
    ];
    for (location, message) in cases {
        expect_error(&preloaded_key(location), PARSE, message);
    }
}

#[test]
fn tpm_errors() {
    expect_error(
        &format!("{NONE}\n[tpm]\nauth_key_index = 0x80_00_00\n"),
        PARSE,
        "invalid value: integer `8388608`, expected integer in range 0x00_00_00..=0x7F_FF_FF",
    );
    expect_error(
        &format!("{NONE}\n[tpm]\nauth_key_index = \"one\"\n"),
        PARSE,
        "tpm.auth_key_index: invalid type: string \"one\", expected u32",
    );
    expect_error(
        &format!("{NONE}\n[tpm]\ntcti = \"device\\u0000\"\n"),
        PARSE,
        "tpm.tcti: must not contain NUL characters",
    );
    expect_error(
        &format!("{NONE}\n[tpm.hierarchy_authorization]\nowner = \"a\\u0000b\"\n"),
        PARSE,
        "tpm.hierarchy_authorization.owner: must not contain NUL characters",
    );
}

#[test]
fn secrets_are_not_echoed_in_errors() {
    let cases = [
        (
            issued("method = \"est\"\nusername = \"u\"\npassword = 918273"),
            "password: invalid type: integer, expected a string",
            "918273",
        ),
        (
            cs("HostName=h;DeviceId=d;SharedAccessKey=Zm9vYmFy;Oops")
                .replace("connection_string = \"", "connection_string = \"HostName"),
            "provisioning.connection_string: required parameter \"HostName\" is missing",
            "Zm9vYmFy",
        ),
        (
            format!("{NONE}\n[tpm.hierarchy_authorization]\nendorsement = 4711\n"),
            "endorsement: invalid type: integer, expected a string",
            "4711",
        ),
        (
            "[provisioning]\nsource = \"manual\"\nconnection_string = \"SharedAccessKey=c2VjcmV0\n"
                .to_owned(),
            "TOML error at line 3",
            "c2VjcmV0",
        ),
    ];
    for (config, message, secret) in cases {
        let root = Root::new();
        root.config(&config);
        let out = root.apply(&[]);
        let err = assert_fails(&out);
        assert!(err.contains(message), "{message:?} not in:\n{err}");
        assert!(!err.contains(secret), "the secret was printed:\n{err}");
        assert!(!common::stdout(&out).contains(secret));
    }
}

#[test]
fn environment_errors() {
    // No config file.
    let root = Root::new();
    let err = assert_fails(&root.apply(&[]));
    assert!(err.contains("could not read config file"), "{err}");

    // Not UTF-8.
    let root = Root::new();
    root.write("etc/aziot/config.toml", b"hostname = \"\xff\"\n");
    let err = assert_fails(&root.apply(&[]));
    assert!(err.contains("invalid character in config"), "{err}");

    // A missing service user.
    let root = Root::new();
    root.config(NONE);
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let passwd: String = passwd
        .lines()
        .filter(|l| !l.starts_with("aziottpm:"))
        .map(|l| format!("{l}\n"))
        .collect();
    root.write("etc/passwd", passwd);
    let err = assert_fails(&root.apply(&[]));
    assert!(
        err.contains("could not query aziottpm user information"),
        "{err}"
    );

    // No hostname anywhere.
    let root = Root::new();
    root.config(NONE);
    std::fs::remove_file(root.join("etc/hostname")).unwrap();
    let err = assert_fails(&root.apply(&[]));
    assert!(err.contains("could not get machine hostname"), "{err}");
    // ... which does not matter when the config names one.
    root.config(&format!("hostname = \"h\"\n{NONE}"));
    common::assert_ok(&root.apply(&[]));

    // A --root that is not a directory.
    let out = std::process::Command::new(common::BIN)
        .args(["config", "apply", "--root", "/nonexistent/aziotctl-root"])
        .output()
        .unwrap();
    let err = assert_fails(&out);
    assert!(
        err.contains("--root /nonexistent/aziotctl-root: not a usable directory"),
        "{err}"
    );
}

/// Values the super-config's schema accepts but the service would refuse at its next start are
/// refused by `config apply` itself, through the service's own validation, before anything is
/// written (found by the `super_config` fuzz target: an `id_scope` with a space was written).
#[test]
fn values_the_service_would_refuse_are_refused_before_writing() {
    let dps = |endpoint: &str, scope: &str| {
        format!(
            "[provisioning]\nsource = \"dps\"\nglobal_endpoint = \"{endpoint}\"\nid_scope = \"{scope}\"\n\
             [provisioning.attestation]\nmethod = \"tpm\"\nregistration_id = \"r\"\n"
        )
    };
    let refused = "the identityd configuration this file maps to would be refused by aziot-identityd";
    for scope in ["0ab 123", "0ab/123", "0ab?1", "0ab#1"] {
        expect_error(&dps("https://global.azure-devices-provisioning.net/", scope), refused, "invalid scope_id");
    }
    expect_error(&dps("http://global.azure-devices-provisioning.net/", "0ab123"), refused, "must be an https:// URL");
    // the same settings with valid values are written
    let root = Root::new();
    root.config(&dps("https://global.azure-devices-provisioning.net/", "0ab123"));
    common::assert_ok(&root.apply(&[]));
}
