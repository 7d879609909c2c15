//! The DPS `authenticationKey` blob (spec tpmd.md §7 step 2, cloud-protocols.md §5.1):
//! five TPM2B items, read sequentially; trailing bytes are ignored.

use tss_esapi::tss2_esys as sys;

use crate::esys::{unmarshal, EsysError};
use crate::tss_lib::Tss;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlobError {
    #[error("the blob ends inside {0}")]
    Truncated(&'static str),
    #[error("{0} is empty")]
    Empty(&'static str),
    #[error("{what} is {len} bytes, more than the TPM's maximum of {max}")]
    TooLarge { what: &'static str, len: usize, max: usize },
}

/// The five elements of the blob, as raw TPM2B contents (without the size prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthKeyBlob {
    pub credential_blob: Vec<u8>,
    pub secret: Vec<u8>,
    pub duplicate: Vec<u8>,
    pub in_sym_seed: Vec<u8>,
    /// `TPMT_PUBLIC` of the HMAC key.
    pub object_public: Vec<u8>,
}

// Maximum sizes of the TPM2B buffers (TPM 2.0 Part 2, as in tpm2-tss).
const MAX_ID_OBJECT: usize = 32 + 2 + 64 + 2; // sizeof(TPMS_ID_OBJECT) with SHA-512 digests
const MAX_ENCRYPTED_SECRET: usize = 512; // sizeof(TPMU_ENCRYPTED_SECRET), RSA-4096
const MAX_PRIVATE: usize = 1550; // tpm2-tss sizeof(_PRIVATE)
const MAX_PUBLIC: usize = 612; // sizeof(TPMT_PUBLIC) in tpm2-tss 3.x

fn take<'a>(rest: &mut &'a [u8], what: &'static str, max: usize) -> Result<&'a [u8], BlobError> {
    if rest.len() < 2 {
        return Err(BlobError::Truncated(what));
    }
    let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
    if len == 0 {
        return Err(BlobError::Empty(what));
    }
    if len > max {
        return Err(BlobError::TooLarge { what, len, max });
    }
    if rest.len() < 2 + len {
        return Err(BlobError::Truncated(what));
    }
    let item = &rest[2..2 + len];
    *rest = &rest[2 + len..];
    Ok(item)
}

impl AuthKeyBlob {
    pub fn parse(blob: &[u8]) -> Result<Self, BlobError> {
        let mut rest = blob;
        let credential_blob = take(&mut rest, "credentialBlob", MAX_ID_OBJECT)?.to_vec();
        let secret = take(&mut rest, "secret", MAX_ENCRYPTED_SECRET)?.to_vec();
        let duplicate = take(&mut rest, "duplicate", MAX_PRIVATE)?.to_vec();
        let in_sym_seed = take(&mut rest, "inSymSeed", MAX_ENCRYPTED_SECRET)?.to_vec();
        let object_public = take(&mut rest, "objectPublic", MAX_PUBLIC)?.to_vec();
        Ok(AuthKeyBlob { credential_blob, secret, duplicate, in_sym_seed, object_public })
    }

    /// The elements as the TPM structures (unmarshaled by tpm2-tss's MU functions, which
    /// check each structure's inner sizes).
    pub(crate) fn to_sys(&self, tss: &Tss) -> Result<SysBlob, EsysError> {
        Ok(SysBlob {
            credential_blob: unmarshal(&tpm2b(&self.credential_blob), "credentialBlob", tss.Tss2_MU_TPM2B_ID_OBJECT_Unmarshal)?,
            secret: unmarshal(&tpm2b(&self.secret), "secret", tss.Tss2_MU_TPM2B_ENCRYPTED_SECRET_Unmarshal)?,
            duplicate: unmarshal(&tpm2b(&self.duplicate), "duplicate", tss.Tss2_MU_TPM2B_PRIVATE_Unmarshal)?,
            in_sym_seed: unmarshal(&tpm2b(&self.in_sym_seed), "inSymSeed", tss.Tss2_MU_TPM2B_ENCRYPTED_SECRET_Unmarshal)?,
            object_public: unmarshal(&tpm2b(&self.object_public), "objectPublic", tss.Tss2_MU_TPM2B_PUBLIC_Unmarshal)?,
        })
    }
}

/// Fuzzing entry (fuzz/fuzz_targets/tpm_blob.rs): each element through tpm2-tss's
/// unmarshalers, as [`crate::tpm::Tpm::import_auth_key`] does before it reaches the TPM.
#[doc(hidden)]
pub fn unmarshal_for_fuzzing(blob: &AuthKeyBlob) -> Result<(), String> {
    let tss = crate::tss_lib::tss().map_err(|e| e.to_string())?;
    blob.to_sys(tss).map(|_| ()).map_err(|e| e.to_string())
}

/// The blob as TPM structures.
pub(crate) struct SysBlob {
    pub credential_blob: sys::TPM2B_ID_OBJECT,
    pub secret: sys::TPM2B_ENCRYPTED_SECRET,
    pub duplicate: sys::TPM2B_PRIVATE,
    pub in_sym_seed: sys::TPM2B_ENCRYPTED_SECRET,
    pub object_public: sys::TPM2B_PUBLIC,
}

fn tpm2b(bytes: &[u8]) -> Vec<u8> {
    let mut v = (bytes.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(bytes);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_five_items_and_ignores_trailing_bytes() {
        let mut blob = Vec::new();
        for (i, n) in [10usize, 20, 30, 40, 50].iter().enumerate() {
            blob.extend(tpm2b(&vec![i as u8; *n]));
        }
        blob.extend_from_slice(b"trailing");
        let b = AuthKeyBlob::parse(&blob).unwrap();
        assert_eq!(b.credential_blob, vec![0; 10]);
        assert_eq!(b.object_public, vec![4; 50]);
    }

    #[test]
    fn rejects_truncation_empty_and_oversize() {
        assert_eq!(AuthKeyBlob::parse(&[]), Err(BlobError::Truncated("credentialBlob")));
        assert_eq!(AuthKeyBlob::parse(&[0, 5, 1]), Err(BlobError::Truncated("credentialBlob")));
        assert_eq!(AuthKeyBlob::parse(&[0, 0]), Err(BlobError::Empty("credentialBlob")));
        let mut blob = tpm2b(&[1; 4]);
        blob.extend_from_slice(&[0xff, 0xff]);
        assert!(matches!(AuthKeyBlob::parse(&blob), Err(BlobError::TooLarge { what: "secret", .. })));
    }
}
