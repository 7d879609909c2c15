//! Builds the DPS `authenticationKey` blob for an EK and SRK, exactly as a (mock) DPS does
//! (spec cloud-protocols.md §5.3). Test support: the mock DPS and tpmd's tests use it.

use openssl::bn::BigNum;
use openssl::hash::{hash, MessageDigest};
use openssl::pkey::{PKey, Public};
use openssl::rsa::{Padding, Rsa};
use openssl::sign::Signer;
use openssl::symm::{encrypt, Cipher};

#[derive(Debug, thiserror::Error)]
pub enum DpsBlobError {
    #[error("the {0} public area is truncated or malformed")]
    Malformed(&'static str),
    #[error("the {0} is not an RSA key with nameAlg SHA-256 (only those are supported)")]
    Unsupported(&'static str),
    #[error("the {0} symmetric algorithm is not AES-128-CFB")]
    Symmetric(&'static str),
    #[error(transparent)]
    OpenSsl(#[from] openssl::error::ErrorStack),
}

/// The parts of an RSA storage key's public area the construction needs.
struct RsaStorageKey {
    name: Vec<u8>,
    public: PKey<Public>,
}

fn u16_at(b: &[u8], at: usize, what: &'static str) -> Result<u16, DpsBlobError> {
    b.get(at..at + 2).map(|s| u16::from_be_bytes([s[0], s[1]])).ok_or(DpsBlobError::Malformed(what))
}

/// `UINT16(0x000B) ‖ SHA256(TPMT_PUBLIC)`.
pub fn name_of(tpmt_public: &[u8]) -> Result<Vec<u8>, DpsBlobError> {
    let mut name = vec![0x00, 0x0b];
    name.extend_from_slice(&hash(MessageDigest::sha256(), tpmt_public)?);
    Ok(name)
}

/// Parses a `TPM2B_PUBLIC` of an RSA key with nameAlg SHA-256 and AES-128-CFB symmetric.
fn parse_rsa(tpm2b: &[u8], what: &'static str) -> Result<RsaStorageKey, DpsBlobError> {
    let size = usize::from(u16_at(tpm2b, 0, what)?);
    let t = tpm2b.get(2..2 + size).ok_or(DpsBlobError::Malformed(what))?;
    if u16_at(t, 0, what)? != 0x0001 || u16_at(t, 2, what)? != 0x000b {
        return Err(DpsBlobError::Unsupported(what));
    }
    let policy_len = usize::from(u16_at(t, 8, what)?);
    let mut at = 10 + policy_len;
    let sym = u16_at(t, at, what)?;
    if sym != 0x0006 || u16_at(t, at + 2, what)? != 128 || u16_at(t, at + 4, what)? != 0x0043 {
        return Err(DpsBlobError::Symmetric(what));
    }
    at += 6;
    let scheme = u16_at(t, at, what)?;
    at += if scheme == 0x0010 { 2 } else { 4 };
    at += 2; // keyBits
    let exponent = t.get(at..at + 4).ok_or(DpsBlobError::Malformed(what))?;
    let exponent = u32::from_be_bytes([exponent[0], exponent[1], exponent[2], exponent[3]]);
    at += 4;
    let modulus_len = usize::from(u16_at(t, at, what)?);
    let modulus = t.get(at + 2..at + 2 + modulus_len).ok_or(DpsBlobError::Malformed(what))?;
    let e = if exponent == 0 { 65537 } else { exponent };
    let rsa = Rsa::from_public_components(BigNum::from_slice(modulus)?, BigNum::from_u32(e)?)?;
    Ok(RsaStorageKey { name: name_of(t)?, public: PKey::from_rsa(rsa)? })
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Result<Vec<u8>, DpsBlobError> {
    let key = PKey::hmac(key)?;
    let mut signer = Signer::new(MessageDigest::sha256(), &key)?;
    for p in parts {
        signer.update(p)?;
    }
    Ok(signer.sign_to_vec()?)
}

/// KDFa with HMAC-SHA256 (TPM 2.0 Part 1 §11.4.10.2).
pub fn kdfa(key: &[u8], label: &str, context_u: &[u8], context_v: &[u8], bits: u32) -> Result<Vec<u8>, DpsBlobError> {
    let bytes = (bits / 8) as usize;
    let mut out = Vec::with_capacity(bytes + 32);
    let mut counter = 1u32;
    while out.len() < bytes {
        out.extend(hmac_sha256(
            key,
            &[&counter.to_be_bytes(), label.as_bytes(), &[0], context_u, context_v, &bits.to_be_bytes()],
        )?);
        counter += 1;
    }
    out.truncate(bytes);
    Ok(out)
}

fn cfb(key: &[u8], data: &[u8]) -> Result<Vec<u8>, DpsBlobError> {
    Ok(encrypt(Cipher::aes_128_cfb128(), key, Some(&[0u8; 16]), data)?)
}

fn oaep(key: &PKey<Public>, seed: &[u8], label: &str) -> Result<Vec<u8>, DpsBlobError> {
    let mut ctx = openssl::pkey_ctx::PkeyCtx::new(key)?;
    ctx.encrypt_init()?;
    ctx.set_rsa_padding(Padding::PKCS1_OAEP)?;
    ctx.set_rsa_oaep_md(openssl::md::Md::sha256())?;
    ctx.set_rsa_mgf1_md(openssl::md::Md::sha256())?;
    let mut l = label.as_bytes().to_vec();
    l.push(0);
    ctx.set_rsa_oaep_label(&l)?;
    let mut out = Vec::new();
    ctx.encrypt_to_vec(seed, &mut out)?;
    Ok(out)
}

/// `UINT16 size ‖ bytes`.
pub fn tpm2b(bytes: &[u8]) -> Vec<u8> {
    let mut v = (bytes.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(bytes);
    v
}

fn random(n: usize) -> Result<Vec<u8>, DpsBlobError> {
    let mut v = vec![0; n];
    openssl::rand::rand_bytes(&mut v)?;
    Ok(v)
}

/// The `TPMT_PUBLIC` of the HMAC key object for `seed_value ‖ key` (§5.3 B.2), attributes
/// `userWithAuth|sign` unless given.
pub fn hmac_key_public(seed_value: &[u8], key: &[u8], attributes: u32) -> Result<Vec<u8>, DpsBlobError> {
    let mut unique_input = seed_value.to_vec();
    unique_input.extend_from_slice(key);
    let mut p = Vec::new();
    p.extend_from_slice(&0x0008u16.to_be_bytes());
    p.extend_from_slice(&0x000bu16.to_be_bytes());
    p.extend_from_slice(&attributes.to_be_bytes());
    p.extend_from_slice(&0u16.to_be_bytes());
    p.extend_from_slice(&0x0005u16.to_be_bytes());
    p.extend_from_slice(&0x000bu16.to_be_bytes());
    p.extend(tpm2b(&hash(MessageDigest::sha256(), &unique_input)?));
    Ok(p)
}

/// Attributes of the HMAC key: `userWithAuth | sign`.
pub const HMAC_KEY_ATTRIBUTES: u32 = 0x0004_0040;

/// Builds the blob (§5.3 A–D) that imports HMAC key `key` into the TPM with these EK and SRK
/// (`TPM2B_PUBLIC`, as `get_tpm_keys` returns them).
pub fn build(ek: &[u8], srk: &[u8], key: &[u8]) -> Result<Vec<u8>, DpsBlobError> {
    build_with_attributes(ek, srk, key, HMAC_KEY_ATTRIBUTES)
}

/// [`build`] with chosen object attributes (to exercise the TPM's checks).
pub fn build_with_attributes(ek: &[u8], srk: &[u8], key: &[u8], attributes: u32) -> Result<Vec<u8>, DpsBlobError> {
    let ek = parse_rsa(ek, "endorsement key")?;
    let srk = parse_rsa(srk, "storage root key")?;

    // A. Credential for the EK, bound to the SRK's name, carrying the inner wrapping key C.
    let c = random(16)?;
    let seed_e = random(32)?;
    let enc_seed_e = oaep(&ek.public, &seed_e, "IDENTITY")?;
    let sym_e = kdfa(&seed_e, "STORAGE", &srk.name, &[], 128)?;
    let enc_identity = cfb(&sym_e, &tpm2b(&c))?;
    let hmac_key_e = kdfa(&seed_e, "INTEGRITY", &[], &[], 256)?;
    let outer_hmac_e = hmac_sha256(&hmac_key_e, &[&enc_identity, &srk.name])?;
    let mut e1 = tpm2b(&outer_hmac_e);
    e1.extend_from_slice(&enc_identity);

    // B. The HMAC key object.
    let seed_value = random(32)?;
    let public = hmac_key_public(&seed_value, key, attributes)?;
    let mut sens = Vec::new();
    sens.extend_from_slice(&0x0008u16.to_be_bytes());
    sens.extend_from_slice(&0u16.to_be_bytes());
    sens.extend(tpm2b(&seed_value));
    sens.extend(tpm2b(key));
    let name_k = name_of(&public)?;

    // C. Inner wrapper with C, outer wrapper with a seed for the SRK.
    let s2b = tpm2b(&sens);
    let mut integrity_input = s2b.clone();
    integrity_input.extend_from_slice(&name_k);
    let inner_integrity = hash(MessageDigest::sha256(), &integrity_input)?;
    let mut inner_plain = tpm2b(&inner_integrity);
    inner_plain.extend_from_slice(&s2b);
    let inner = cfb(&c, &inner_plain)?;
    let seed_s = random(32)?;
    let enc_seed_s = oaep(&srk.public, &seed_s, "DUPLICATE")?;
    let sym_s = kdfa(&seed_s, "STORAGE", &name_k, &[], 128)?;
    let dup_sensitive = cfb(&sym_s, &inner)?;
    let hmac_key_s = kdfa(&seed_s, "INTEGRITY", &[], &[], 256)?;
    let outer_hmac_s = hmac_sha256(&hmac_key_s, &[&dup_sensitive, &name_k])?;
    let mut e3 = tpm2b(&outer_hmac_s);
    e3.extend_from_slice(&dup_sensitive);

    // D. Assemble.
    let mut blob = tpm2b(&e1);
    blob.extend(tpm2b(&enc_seed_e));
    blob.extend(tpm2b(&e3));
    blob.extend(tpm2b(&enc_seed_s));
    blob.extend(tpm2b(&public));
    Ok(blob)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdfa_is_deterministic_and_sized() {
        let a = kdfa(b"key", "STORAGE", b"u", b"", 128).unwrap();
        assert_eq!(a.len(), 16);
        assert_eq!(a, kdfa(b"key", "STORAGE", b"u", b"", 128).unwrap());
        let b = kdfa(b"key", "INTEGRITY", b"", b"", 256).unwrap();
        assert_eq!(b.len(), 32);
        // K(1) with bits=256 is the HMAC itself.
        let mut m = 1u32.to_be_bytes().to_vec();
        m.extend_from_slice(b"INTEGRITY\0");
        m.extend_from_slice(&256u32.to_be_bytes());
        assert_eq!(b, hmac_sha256(b"key", &[&m]).unwrap());
    }
}
