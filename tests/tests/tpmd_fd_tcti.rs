//! The fd TCTI against swtpm: a TCP socket connected to swtpm's command port carries the raw
//! TPM command/response stream, exactly like a TPM device fd.

use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::ptr::null_mut;

use aziot_tpmd::fd_tcti::FdTcti;
use aziot_tests::Dep;
use aziot_tests::tpmd::{config, Swtpm};
use tss_esapi::tss2_esys as sys;

fn check(rc: u32, what: &str) {
    assert_eq!(rc, 0, "{what} failed: 0x{rc:x}");
}

/// Reads the EK's TPM2B_PUBLIC and 16 random bytes through ESYS on the fd TCTI.
fn read_ek_over_fd(port: u16) -> Vec<u8> {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut tcti = FdTcti::new(OwnedFd::from(stream));
    let mut esys: *mut sys::ESYS_CONTEXT = null_mut();
    // SAFETY: raw ESYS calls with valid out-pointers; `tcti` outlives `esys` (finalized below);
    // every returned buffer is freed with Esys_Free.
    unsafe {
        check(sys::Esys_Initialize(&mut esys, tcti.as_tcti_ptr(), null_mut()), "Esys_Initialize");
        let mut random: *mut sys::TPM2B_DIGEST = null_mut();
        check(
            sys::Esys_GetRandom(esys, sys::ESYS_TR_NONE, sys::ESYS_TR_NONE, sys::ESYS_TR_NONE, 16, &mut random),
            "Esys_GetRandom",
        );
        assert_eq!((*random).size, 16);
        sys::Esys_Free(random.cast());

        let mut ek: sys::ESYS_TR = sys::ESYS_TR_NONE;
        check(
            sys::Esys_TR_FromTPMPublic(esys, 0x8101_0001, sys::ESYS_TR_NONE, sys::ESYS_TR_NONE, sys::ESYS_TR_NONE, &mut ek),
            "Esys_TR_FromTPMPublic",
        );
        let (mut public, mut name, mut qname) = (null_mut(), null_mut(), null_mut());
        check(
            sys::Esys_ReadPublic(esys, ek, sys::ESYS_TR_NONE, sys::ESYS_TR_NONE, sys::ESYS_TR_NONE, &mut public, &mut name, &mut qname),
            "Esys_ReadPublic",
        );
        let mut buf = vec![0u8; 1024];
        let mut offset: sys::size_t = 0;
        check(sys::Tss2_MU_TPM2B_PUBLIC_Marshal(public, buf.as_mut_ptr(), buf.len() as sys::size_t, &mut offset), "marshal");
        buf.truncate(offset as usize);
        sys::Esys_Free(public.cast());
        sys::Esys_Free(name.cast());
        sys::Esys_Free(qname.cast());
        sys::Esys_Finalize(&mut esys);
        buf
    }
}

#[test]
fn esys_over_the_fd_tcti_reads_what_tpmd_created() {
    aziot_tests::require!(Dep::Swtpm, Dep::Tpm2Tools);
    let swtpm = Swtpm::start_temp();
    let mut tpm = aziot_tpmd::init_tpm(&config(&swtpm, "")).unwrap();
    let (ek, _) = tpm.get_tpm_keys().unwrap();
    drop(tpm); // swtpm serves one connection at a time
    assert_eq!(read_ek_over_fd(swtpm.port), ek);
    // A second context on a new fd works too (nothing left half-read).
    assert_eq!(read_ek_over_fd(swtpm.port), ek);
}

/// The whole service core on the fd TCTI: startup creates EK/SRK, import, HMAC (incl. a
/// sequence), all through a descriptor the process did not open by path.
#[test]
fn tpmd_core_runs_on_a_descriptor() {
    aziot_tests::require!(Dep::Swtpm, Dep::Tpm2Tools);
    let swtpm = Swtpm::start_temp();
    let cfg = config(&swtpm, "");
    // What the broker does: open the descriptor from the config's `tcti`.
    let fd = aziot_tpmd::tcti::open_descriptor(&cfg.tcti).unwrap().expect("swtpm gets a descriptor");
    let mut tpm = aziot_tpmd::init_tpm_fd(&cfg, fd).unwrap();
    let (ek, srk) = tpm.get_tpm_keys().unwrap();
    let key = aziot_tests::crypto::random(32);
    tpm.import_auth_key(&aziot_tpmd::dps_blob::build(&ek, &srk, &key).unwrap()).unwrap();
    for len in [10, 3000] {
        let data = aziot_tests::crypto::random(len);
        assert_eq!(tpm.sign_with_auth_key(&data).unwrap(), aziot_tests::crypto::hmac_sha256(&key, &data));
    }
    drop(tpm);
    // The loader path sees the same keys.
    let mut tpm = aziot_tpmd::init_tpm(&cfg).unwrap();
    assert_eq!(tpm.get_tpm_keys().unwrap(), (ek, srk));
    assert!(tpm.has_auth_key());
}

/// Sessions and transient objects left loaded by a crashed client (no resource manager) are
/// flushed at startup, so they cannot exhaust swtpm's few slots.
#[test]
fn stale_handles_are_flushed_at_startup() {
    aziot_tests::require!(Dep::Swtpm, Dep::Tpm2Tools);
    let swtpm = Swtpm::start_temp();
    drop(aziot_tpmd::init_tpm(&config(&swtpm, "")).unwrap());
    {
        // A "crashed" client: three policy sessions, never flushed.
        let fd = OwnedFd::from(TcpStream::connect(("127.0.0.1", swtpm.port)).unwrap());
        let mut esys = aziot_tpmd::esys::Esys::open_fd(fd).unwrap();
        for _ in 0..3 {
            esys.endorsement_policy_session().unwrap();
        }
        assert_eq!(esys.handles(0x0200_0000).unwrap().len(), 3);
    }
    let sessions = String::from_utf8(swtpm.tool(&["tpm2_getcap", "handles-loaded-session"])).unwrap();
    assert_eq!(sessions.lines().count(), 3, "{sessions}");
    let mut tpm = aziot_tpmd::init_tpm(&config(&swtpm, "")).unwrap();
    let (ek, srk) = tpm.get_tpm_keys().unwrap();
    let key = aziot_tests::crypto::random(32);
    tpm.import_auth_key(&aziot_tpmd::dps_blob::build(&ek, &srk, &key).unwrap()).unwrap();
    drop(tpm);
    let sessions = String::from_utf8(swtpm.tool(&["tpm2_getcap", "handles-loaded-session"])).unwrap();
    assert!(sessions.trim().is_empty(), "{sessions}");
}
