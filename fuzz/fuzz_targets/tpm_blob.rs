//! TPM activation blobs: DPS's `authenticationKey` as tpmd's import parses it
//! (`AuthKeyBlob::parse`: five TPM2B items with the TPM's size limits; trailing bytes ignored),
//! then each item through tpm2-tss's unmarshalers as `Tpm::import_auth_key` does before it
//! touches the TPM (`blob::unmarshal_for_fuzzing`).
//!
//! Input: the blob. Checks: no panic, no leak; a parsed blob's items are non-empty, and they
//! re-encode to a prefix of the input.

#![no_main]

use aziot_tpmd::blob::AuthKeyBlob;
use libfuzzer_sys::fuzz_target;

fn tpm2b(out: &mut Vec<u8>, item: &[u8]) {
    out.extend_from_slice(&(item.len() as u16).to_be_bytes());
    out.extend_from_slice(item);
}

fuzz_target!(|data: &[u8]| {
    let Ok(blob) = AuthKeyBlob::parse(data) else { return };
    let mut again = Vec::new();
    for item in [&blob.credential_blob, &blob.secret, &blob.duplicate, &blob.in_sym_seed, &blob.object_public] {
        assert!(!item.is_empty());
        tpm2b(&mut again, item);
    }
    assert!(data.starts_with(&again), "the parsed items are not the input's");
    let _ = aziot_tpmd::blob::unmarshal_for_fuzzing(&blob);
});
