//! The TPM core against swtpm, cross-checked with tpm2-tools and a software HMAC.

use aziot_tpmd::{dps_blob, init_tpm, TpmdError};
use aziot_tests::crypto::{hmac_sha256 as hmac, random};
use aziot_tests::Dep;
use aziot_tests::tpmd::{config, Swtpm};

/// Marshaled template prefixes (spec tpmd.md §5.1/§5.2) up to `unique`.
const EK_PREFIX: &str = "0001000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa00060080004300100800000000000100";
const SRK_PREFIX: &str = "0001000b00030472000000060080004300100800000000000100";

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn read_public(swtpm: &Swtpm, handle: &str) -> Vec<u8> {
    let out = swtpm.dir().join(format!("{handle}.pub"));
    swtpm.tool(&["tpm2_readpublic", "-c", handle, "-o", out.to_str().unwrap()]);
    std::fs::read(out).unwrap()
}

#[test]
fn ek_and_srk_are_created_match_tpm2_tools_and_survive_restarts() {
    aziot_tests::require!(Dep::Swtpm, Dep::Tpm2Tools);
    let mut swtpm = Swtpm::start_temp();
    let cfg = config(&swtpm, "");
    let mut tpm = init_tpm(&cfg).expect("init on a fresh swtpm");
    let (ek, srk) = tpm.get_tpm_keys().unwrap();
    assert_eq!(ek.len(), 316);
    assert_eq!(srk.len(), 284);
    assert_eq!(u16::from_be_bytes([ek[0], ek[1]]) as usize, ek.len() - 2);
    assert!(hex(&ek[2..]).starts_with(EK_PREFIX), "EK template: {}", hex(&ek[2..60]));
    assert!(hex(&srk[2..]).starts_with(SRK_PREFIX), "SRK template: {}", hex(&srk[2..40]));
    assert!(ek[ek.len() - 256..].iter().any(|&b| b != 0), "unique holds the real modulus");
    assert!(!tpm.has_auth_key());
    drop(tpm); // swtpm serves one connection at a time

    assert_eq!(read_public(&swtpm, "0x81010001"), ek);
    assert_eq!(read_public(&swtpm, "0x81000001"), srk);

    // A new process on the same TPM reuses them.
    let mut tpm = init_tpm(&cfg).unwrap();
    assert_eq!(tpm.get_tpm_keys().unwrap(), (ek.clone(), srk.clone()));
    drop(tpm);

    // A new swtpm process on the same state, too.
    swtpm.restart();
    let mut tpm = init_tpm(&config(&swtpm, "")).unwrap();
    assert_eq!(tpm.get_tpm_keys().unwrap(), (ek, srk));
}

#[test]
fn import_persists_and_hmac_matches_tpm2_hmac_and_software() {
    aziot_tests::require!(Dep::Swtpm, Dep::Tpm2Tools);
    let swtpm = Swtpm::start_temp();
    let cfg = config(&swtpm, "auth_key_index = 0x00_02_00");
    let mut tpm = init_tpm(&cfg).unwrap();
    assert_eq!(tpm.auth_key_handle(), 0x8100_0200);
    assert!(matches!(tpm.sign_with_auth_key(b"x"), Err(aziot_tpmd::TpmError::NoAuthKey)));
    let (ek, srk) = tpm.get_tpm_keys().unwrap();
    let k1 = random(32);
    let blob = dps_blob::build(&ek, &srk, &k1).unwrap();
    assert_eq!(blob.len(), 764);
    tpm.import_auth_key(&blob).expect("import");
    let data = b"myhub.azure-devices.net%2Fdevices%2Fdev1\n1700000000";
    assert_eq!(tpm.sign_with_auth_key(data).unwrap(), hmac(&k1, data));
    let max = random(1024);
    assert_eq!(tpm.sign_with_auth_key(&max).unwrap(), hmac(&k1, &max));
    assert_eq!(tpm.sign_with_auth_key(b"").unwrap(), hmac(&k1, b""));
    // Above TPM2_MAX_DIGEST_BUFFER: HMAC sequences (exact multiple and not).
    for len in [1025, 2048, 4097] {
        let long = random(len);
        assert_eq!(tpm.sign_with_auth_key(&long).unwrap(), hmac(&k1, &long), "{len} bytes");
    }
    drop(tpm);

    let handles = String::from_utf8(swtpm.tool(&["tpm2_getcap", "handles-persistent"])).unwrap();
    assert!(handles.contains("0x81000200"), "{handles}");
    assert!(handles.contains("0x81010001") && handles.contains("0x81000001"), "{handles}");
    let input = swtpm.dir().join("data");
    std::fs::write(&input, data).unwrap();
    let out = swtpm.dir().join("hmac");
    swtpm.tool(&["tpm2_hmac", "-c", "0x81000200", "-g", "sha256", "-o", out.to_str().unwrap(), input.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), hmac(&k1, data));
    let long = random(3000);
    std::fs::write(&input, &long).unwrap();
    swtpm.tool(&["tpm2_hmac", "-c", "0x81000200", "-g", "sha256", "-o", out.to_str().unwrap(), input.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), hmac(&k1, &long));

    // The key survives a restart; a second import replaces it at the same handle.
    let mut tpm = init_tpm(&cfg).unwrap();
    assert!(tpm.has_auth_key());
    assert_eq!(tpm.sign_with_auth_key(data).unwrap(), hmac(&k1, data));
    let k2 = random(32);
    tpm.import_auth_key(&dps_blob::build(&ek, &srk, &k2).unwrap()).unwrap();
    assert_eq!(tpm.sign_with_auth_key(data).unwrap(), hmac(&k2, data));
    drop(tpm);
    let handles = String::from_utf8(swtpm.tool(&["tpm2_getcap", "handles-persistent"])).unwrap();
    assert_eq!(handles.matches("0x81000200").count(), 1, "{handles}");
    // No transient object or session left behind.
    let transient = String::from_utf8(swtpm.tool(&["tpm2_getcap", "handles-transient"])).unwrap();
    assert!(transient.trim().is_empty(), "{transient}");
    let sessions = String::from_utf8(swtpm.tool(&["tpm2_getcap", "handles-loaded-session"])).unwrap();
    assert!(sessions.trim().is_empty(), "{sessions}");
}

#[test]
fn bad_blobs_fail_without_touching_the_current_key_or_leaking_handles() {
    aziot_tests::require!(Dep::Swtpm, Dep::Tpm2Tools);
    let swtpm = Swtpm::start_temp();
    let mut tpm = init_tpm(&config(&swtpm, "")).unwrap();
    let (ek, srk) = tpm.get_tpm_keys().unwrap();
    let k1 = random(32);
    let good = dps_blob::build(&ek, &srk, &k1).unwrap();
    tpm.import_auth_key(&good).unwrap();

    let mut bad: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("truncated", good[..good.len() - 10].to_vec()),
        ("header only", good[..1].to_vec()),
    ];
    for at in [10usize, 300, 400, 600] {
        let mut b = good.clone();
        b[at] ^= 0x55;
        bad.push(("corrupted", b));
    }
    // fixedTPM|fixedParent set: TPM2_Import refuses (TPM_RC_ATTRIBUTES).
    bad.push(("fixed attributes", dps_blob::build_with_attributes(&ek, &srk, &random(32), 0x0004_0052).unwrap()));
    // Twice the swtpm's transient/session slots: a leak would make later commands fail.
    for (what, blob) in bad.iter().chain(bad.iter()) {
        let e = tpm.import_auth_key(blob).expect_err(what);
        assert!(e.is_bad_input(), "{what}: {e:?} should be bad input");
        assert_eq!(tpm.sign_with_auth_key(b"still").unwrap(), hmac(&k1, b"still"), "{what}");
    }
    let k2 = random(32);
    tpm.import_auth_key(&dps_blob::build(&ek, &srk, &k2).unwrap()).unwrap();
    assert_eq!(tpm.sign_with_auth_key(b"new").unwrap(), hmac(&k2, b"new"));
}

#[test]
fn auth_key_index_colliding_with_ek_or_srk_is_refused() {
    aziot_tests::require!(Dep::Swtpm, Dep::Tpm2Tools);
    let swtpm = Swtpm::start_temp();
    for index in ["1", "0x010001", "0x01ABCD"] {
        let e = init_tpm(&config(&swtpm, &format!("auth_key_index = {index}"))).unwrap_err();
        assert!(matches!(e, TpmdError::Invalid(_)), "{e:?}");
    }
}

#[test]
fn hierarchy_passwords_are_used() {
    aziot_tests::require!(Dep::Swtpm, Dep::Tpm2Tools);
    let swtpm = Swtpm::start_temp();
    swtpm.tool(&["tpm2_changeauth", "-c", "owner", "world"]);
    swtpm.tool(&["tpm2_changeauth", "-c", "endorsement", "hello"]);
    let e = init_tpm(&config(&swtpm, "")).unwrap_err();
    assert!(matches!(e, TpmdError::Tpm(_)), "{e:?}");
    let cfg = config(&swtpm, "[hierarchy_authorization]\nendorsement = \"hello\"\nowner = \"world\"\n");
    let mut tpm = init_tpm(&cfg).unwrap();
    let (ek, srk) = tpm.get_tpm_keys().unwrap();
    let k = random(32);
    tpm.import_auth_key(&dps_blob::build(&ek, &srk, &k).unwrap()).unwrap();
    assert_eq!(tpm.sign_with_auth_key(b"pw").unwrap(), hmac(&k, b"pw"));
}
