//! The cryptographic primitives of the file backend (spec/keyd.md §7.3–§7.5), on OpenSSL.
//!
//! Nothing here touches the filesystem; [`super::KeyStore`] hands parsed keys in. No function
//! logs or puts key material into an error.

use super::hmac::HmacSha256Key;
use openssl::bn::BigNumContext;
use openssl::ec::{EcGroup, EcKey, PointConversionForm};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use openssl::pkey::{Id, PKey, Private};
use openssl::rsa::{Padding, Rsa};
use openssl::symm::Cipher;
use zeroize::Zeroizing;

use crate::{Error, KeyPairParameter, Result, ALGORITHM_EC, ALGORITHM_RSA};

/// DER encoding (tag, length, value) of the OID of NIST P-256 (`prime256v1`).
pub(crate) const P256_OID_DER: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Length of generated symmetric keys and of derived keys.
pub(crate) const SYMMETRIC_KEY_LEN: usize = 32;
/// HMAC-SHA256 output length.
pub(crate) const HMAC_SHA256_LEN: usize = 32;
/// AES-GCM tag length used by every AEAD ciphertext.
pub(crate) const AEAD_TAG_LEN: usize = 16;
/// AEAD ciphertext format version written by every encrypt: `0x02 ‖ ct ‖ tag`.
pub(crate) const AEAD_VERSION_CT_TAG: u8 = 0x02;
/// Legacy (IoT Edge 1.1) format accepted by decrypt only: `0x01 ‖ tag ‖ ct`.
pub(crate) const AEAD_VERSION_TAG_CT: u8 = 0x01;

/// A key-pair algorithm from `preferred_algorithms` (spec §7.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Algorithm {
    EcP256,
    Rsa2048,
    Rsa4096,
}

/// Parses a colon-separated `preferred_algorithms` string. `None` means `*`. Unknown components
/// are ignored, duplicates keep their first position; an empty result is an invalid parameter.
pub(crate) fn parse_preferred_algorithms(value: Option<&str>) -> Result<Vec<Algorithm>> {
    let mut out: Vec<Algorithm> = Vec::new();
    let mut push = |alg: Algorithm| {
        if !out.contains(&alg) {
            out.push(alg);
        }
    };
    for component in value.unwrap_or("*").split(':') {
        match component {
            "ec-p256" => push(Algorithm::EcP256),
            "rsa-2048" => push(Algorithm::Rsa2048),
            "rsa-4096" => push(Algorithm::Rsa4096),
            "*" => {
                push(Algorithm::EcP256);
                push(Algorithm::Rsa2048);
            }
            _ => {}
        }
    }
    if out.is_empty() {
        return Err(Error::invalid("preferred_algorithms names no supported algorithm"));
    }
    Ok(out)
}

fn ssl_err(context: &'static str) -> impl FnOnce(openssl::error::ErrorStack) -> Error {
    move |e| Error::external(context, e)
}

/// Generates a new key pair of the given algorithm.
pub(crate) fn generate_key_pair(alg: Algorithm) -> Result<PKey<Private>> {
    match alg {
        Algorithm::EcP256 => {
            let group =
                EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).map_err(ssl_err("could not create P-256 group"))?;
            let ec = EcKey::generate(&group).map_err(ssl_err("could not generate EC key"))?;
            PKey::from_ec_key(ec).map_err(ssl_err("could not wrap EC key"))
        }
        Algorithm::Rsa2048 | Algorithm::Rsa4096 => {
            let bits = if alg == Algorithm::Rsa2048 { 2048 } else { 4096 };
            let rsa = Rsa::generate(bits).map_err(ssl_err("could not generate RSA key"))?;
            PKey::from_rsa(rsa).map_err(ssl_err("could not wrap RSA key"))
        }
    }
}

/// Serializes a private key as unencrypted PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
pub(crate) fn key_pair_to_pem(pkey: &PKey<Private>) -> Result<Zeroizing<Vec<u8>>> {
    pkey.private_key_to_pem_pkcs8().map(Zeroizing::new).map_err(ssl_err("could not serialize key pair"))
}

/// Parses an unencrypted PEM private key of any type OpenSSL understands (PKCS#8,
/// `BEGIN RSA PRIVATE KEY`, `BEGIN EC PRIVATE KEY`). `None` if the bytes are not one.
///
/// A password callback that supplies no password is installed so that an encrypted PEM file
/// simply fails to parse instead of OpenSSL's default callback prompting on a terminal.
pub(crate) fn parse_private_key_pem(bytes: &[u8]) -> Option<PKey<Private>> {
    PKey::private_key_from_pem_callback(bytes, |_password| Ok(0)).ok()
}

/// 32 random bytes from OpenSSL's CSPRNG.
pub(crate) fn random_symmetric_key() -> Result<Zeroizing<Vec<u8>>> {
    let mut key = Zeroizing::new(vec![0u8; SYMMETRIC_KEY_LEN]);
    openssl::rand::rand_bytes(&mut key).map_err(ssl_err("could not generate random key"))?;
    Ok(key)
}

/// Which RSA private-key operation `encrypt` performs.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RsaMode {
    Pkcs1,
    NoPadding,
}

enum PairKind {
    Ec(EcKey<Private>),
    Rsa(Rsa<Private>),
    /// A PEM private key of another type (e.g. Ed25519): loadable, but no operation applies.
    Other,
}

/// A parsed key pair, with the type-specific handle extracted once so that signing does not
/// have to convert on every call.
pub(crate) struct KeyPair {
    pkey: PKey<Private>,
    kind: PairKind,
}

impl KeyPair {
    pub(crate) fn new(pkey: PKey<Private>) -> Result<Self> {
        let kind = match pkey.id() {
            Id::EC => PairKind::Ec(pkey.ec_key().map_err(ssl_err("could not extract EC key"))?),
            Id::RSA => PairKind::Rsa(pkey.rsa().map_err(ssl_err("could not extract RSA key"))?),
            _ => PairKind::Other,
        };
        Ok(KeyPair { pkey, kind })
    }

    fn ec(&self) -> Result<&EcKey<Private>> {
        match &self.kind {
            PairKind::Ec(ec) => Ok(ec),
            _ => Err(Error::invalid("key pair is not an EC key")),
        }
    }

    fn rsa(&self) -> Result<&Rsa<Private>> {
        match &self.kind {
            PairKind::Rsa(rsa) => Ok(rsa),
            _ => Err(Error::invalid("key pair is not an RSA key")),
        }
    }

    /// A public parameter of the pair (spec §5.8 / §8.2).
    pub(crate) fn parameter(&self, parameter: KeyPairParameter) -> Result<Vec<u8>> {
        match parameter {
            KeyPairParameter::Algorithm => match self.kind {
                PairKind::Ec(_) => Ok(ALGORITHM_EC.to_ne_bytes().to_vec()),
                PairKind::Rsa(_) => Ok(ALGORITHM_RSA.to_ne_bytes().to_vec()),
                PairKind::Other => Err(Error::external_msg("key pair has an unsupported algorithm")),
            },
            KeyPairParameter::EcCurveOid => {
                let ec = self.ec()?;
                if ec.group().curve_name() == Some(Nid::X9_62_PRIME256V1) {
                    Ok(P256_OID_DER.to_vec())
                } else {
                    Err(Error::invalid("EC curve of the key pair is not P-256"))
                }
            }
            KeyPairParameter::EcPoint => {
                let ec = self.ec()?;
                let mut ctx = BigNumContext::new().map_err(ssl_err("could not allocate BN context"))?;
                ec.public_key()
                    .to_bytes(ec.group(), PointConversionForm::COMPRESSED, &mut ctx)
                    .map_err(ssl_err("could not encode EC point"))
            }
            KeyPairParameter::RsaModulus => Ok(self.rsa()?.n().to_vec()),
            KeyPairParameter::RsaExponent => Ok(self.rsa()?.e().to_vec()),
        }
    }

    /// An EC P-256 pair: its private-key operations take tens of microseconds (RSA ones take
    /// milliseconds, other curves hundreds of microseconds).
    pub(crate) fn is_p256(&self) -> bool {
        matches!(&self.kind, PairKind::Ec(ec) if ec.group().curve_name() == Some(Nid::X9_62_PRIME256V1))
    }

    /// Upper bound of an ECDSA signature (DER) by this pair (`ECDSA_size`).
    pub(crate) fn ecdsa_signature_len_bound(&self) -> Result<usize> {
        self.ec()?;
        Ok(self.pkey.size())
    }

    /// ECDSA over `digest` as given (no hashing; OpenSSL truncates an over-long digest to the
    /// order size). DER `ECDSA-Sig-Value` out.
    pub(crate) fn ecdsa_sign(&self, digest: &[u8]) -> Result<Vec<u8>> {
        let ec = self.ec()?;
        if digest.is_empty() {
            return Err(Error::invalid("digest is empty"));
        }
        let sig = EcdsaSig::sign(digest, ec).map_err(ssl_err("ECDSA signing failed"))?;
        sig.to_der().map_err(ssl_err("could not encode ECDSA signature"))
    }

    /// RSA modulus length in bytes: the output length of the RSA private-key operation.
    pub(crate) fn rsa_len(&self) -> Result<usize> {
        Ok(self.rsa()?.size() as usize)
    }

    /// The RSA private-key operation (`RSA_private_encrypt`). PKCS#1 input must be at most
    /// `k - 11` bytes; raw input must be exactly `k` bytes and numerically below the modulus.
    pub(crate) fn rsa_private_encrypt(&self, mode: RsaMode, input: &[u8]) -> Result<Vec<u8>> {
        let rsa = self.rsa()?;
        let k = rsa.size() as usize;
        let padding = match mode {
            RsaMode::Pkcs1 => {
                if input.len() + 11 > k {
                    return Err(Error::invalid("input too long for RSA-PKCS1 with this key"));
                }
                Padding::PKCS1
            }
            RsaMode::NoPadding => {
                if input.len() != k {
                    return Err(Error::invalid("RSA-NO-PADDING input must be exactly the modulus length"));
                }
                // Both are k-byte big-endian numbers, so byte order equals numeric order.
                if input >= rsa.n().to_vec_padded(k as i32).map_err(ssl_err("could not encode modulus"))?.as_slice() {
                    return Err(Error::invalid("RSA-NO-PADDING input is not below the modulus"));
                }
                Padding::NONE
            }
        };
        let mut out = vec![0u8; k];
        let len = rsa.private_encrypt(input, &mut out, padding).map_err(ssl_err("RSA private-key operation failed"))?;
        out.truncate(len);
        Ok(out)
    }
}

/// A symmetric key: its raw bytes plus the HMAC states made once from them.
pub(crate) struct SymmetricKey {
    bytes: Zeroizing<Vec<u8>>,
    hmac: HmacSha256Key,
}

impl SymmetricKey {
    pub(crate) fn new(bytes: Zeroizing<Vec<u8>>) -> Result<Self> {
        let hmac = HmacSha256Key::new(&bytes);
        Ok(SymmetricKey { bytes, hmac })
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub(crate) fn hmac_sha256(&self, data: &[u8]) -> Result<Vec<u8>> {
        Ok(self.hmac.mac(data).to_vec())
    }

    /// `HMAC-SHA256(self, derivation_data)`: the derived key of spec §7.5.
    pub(crate) fn derive(&self, derivation_data: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        self.hmac_sha256(derivation_data).map(Zeroizing::new)
    }
}

/// HMAC-SHA256 with raw key bytes (used for derived keys, which are never cached).
pub(crate) fn hmac_sha256(key: &[u8], data: &[u8]) -> Result<Vec<u8>> {
    Ok(HmacSha256Key::new(key).mac(data).to_vec())
}

/// Constant-time comparison of an expected MAC with a caller-supplied one.
pub(crate) fn mac_matches(expected: &[u8], given: &[u8]) -> bool {
    // `memcmp::eq` requires equal lengths; the length of a MAC is public.
    expected.len() == given.len() && openssl::memcmp::eq(expected, given)
}

fn check_aead_args(key: &[u8], iv: &[u8]) -> Result<()> {
    if iv.is_empty() {
        // Upstream answers EXTERNAL (500); spec §5.12 recommends 400.
        return Err(Error::invalid("AEAD IV is empty"));
    }
    if key.len() != Cipher::aes_256_gcm().key_len() {
        return Err(Error::external_msg("AEAD requires a 32-byte key"));
    }
    Ok(())
}

/// Length of the AEAD ciphertext for a plaintext of `plaintext_len` bytes.
pub(crate) fn aead_ciphertext_len(plaintext_len: usize) -> Result<usize> {
    plaintext_len.checked_add(1 + AEAD_TAG_LEN).ok_or_else(|| Error::invalid("plaintext too long"))
}

/// AES-256-GCM; output `0x02 ‖ ciphertext ‖ tag(16)`.
pub(crate) fn aead_encrypt(key: &[u8], iv: &[u8], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
    check_aead_args(key, iv)?;
    let total = aead_ciphertext_len(plaintext.len())?;
    let mut tag = [0u8; AEAD_TAG_LEN];
    let ct = openssl::symm::encrypt_aead(Cipher::aes_256_gcm(), key, Some(iv), aad, plaintext, &mut tag)
        .map_err(ssl_err("AEAD encryption failed"))?;
    let mut out = Vec::with_capacity(total);
    out.push(AEAD_VERSION_CT_TAG);
    out.extend_from_slice(&ct);
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Splits an AEAD ciphertext into (ciphertext, tag) after checking version and length.
fn split_aead(input: &[u8]) -> Result<(&[u8], &[u8])> {
    let Some((&version, rest)) = input.split_first() else {
        return Err(Error::invalid("AEAD ciphertext is malformed"));
    };
    if rest.len() < AEAD_TAG_LEN {
        return Err(Error::invalid("AEAD ciphertext is malformed"));
    }
    match version {
        AEAD_VERSION_CT_TAG => {
            let (ct, tag) = rest.split_at(rest.len() - AEAD_TAG_LEN);
            Ok((ct, tag))
        }
        AEAD_VERSION_TAG_CT => {
            let (tag, ct) = rest.split_at(AEAD_TAG_LEN);
            Ok((ct, tag))
        }
        _ => Err(Error::invalid("AEAD ciphertext has an unknown format version")),
    }
}

/// The plaintext length of a well-formed AEAD ciphertext.
pub(crate) fn aead_plaintext_len(input: &[u8]) -> Result<usize> {
    split_aead(input).map(|(ct, _)| ct.len())
}

/// Decrypts format 0x02 or 0x01. Any authentication failure is one generic invalid-parameter
/// error (no detail that could serve as an oracle).
pub(crate) fn aead_decrypt(key: &[u8], iv: &[u8], aad: &[u8], input: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
    check_aead_args(key, iv)?;
    let (ct, tag) = split_aead(input)?;
    openssl::symm::decrypt_aead(Cipher::aes_256_gcm(), key, Some(iv), aad, ct, tag)
        .map(Zeroizing::new)
        .map_err(|_| Error::invalid("decryption failed"))
}
