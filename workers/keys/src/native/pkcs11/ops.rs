//! Key operations on a token (spec/keyd.md §7.4–§7.7). Objects are found by class + label (+ id
//! if the URI has one); a key pair is a public and a private object of the same label and type.

use std::ffi::c_ulong;

use cryptoki::error::RvError;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::types::Ulong;
use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcPoint, PointConversionForm};
use openssl::ecdsa::EcdsaSig;
use openssl::nid::Nid;
use zeroize::Zeroizing;

use super::{ck, rv, OpError, Token};
use crate::native::crypto::{self, Algorithm, RsaMode};
use crate::pkcs11_uri::Pkcs11Uri;
use crate::{Error, KeyPairParameter, KeyUsage, Result, ALGORITHM_EC, ALGORITHM_RSA};

/// The type of a key pair on a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PairKind {
    Ec,
    Rsa,
}

/// The type of a secret key on a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SecretKind {
    /// `CKK_GENERIC_SECRET`: HMAC-SHA256, derive.
    Hmac,
    /// `CKK_AES`: AES-GCM.
    Aes,
}

/// The test encryption of a freshly generated AES key (spec §7.6).
const TEST_IV: &[u8] = b"123456789012";
const TEST_AAD: &[u8] = b"someaad";
const TEST_PLAINTEXT: &[u8] = b"someplaintext";

fn ulong(v: c_ulong) -> Ulong {
    Ulong::from(v)
}

fn search_template(uri: &Pkcs11Uri, class: ObjectClass) -> Vec<Attribute> {
    let mut t = vec![Attribute::Class(class)];
    if let Some(label) = &uri.object {
        t.push(Attribute::Label(label.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        t.push(Attribute::Id(id.clone()));
    }
    t
}

fn find(session: &Session, uri: &Pkcs11Uri, class: ObjectClass) -> Result<Option<ObjectHandle>, OpError> {
    let found = session.find_objects(&search_template(uri, class)).map_err(ck("C_FindObjects failed"))?;
    Ok(found.into_iter().next())
}

fn key_type(session: &Session, handle: ObjectHandle) -> Result<Option<KeyType>, OpError> {
    let attrs = session.get_attributes(handle, &[AttributeType::KeyType]).map_err(ck("C_GetAttributeValue failed"))?;
    Ok(attrs.into_iter().find_map(|a| match a {
        Attribute::KeyType(t) => Some(t),
        _ => None,
    }))
}

fn destroy_all(session: &Session, uri: &Pkcs11Uri, class: ObjectClass) -> Result<bool, OpError> {
    let found = session.find_objects(&search_template(uri, class)).map_err(ck("C_FindObjects failed"))?;
    let any = !found.is_empty();
    for handle in found {
        session.destroy_object(handle).map_err(ck("C_DestroyObject failed"))?;
    }
    Ok(any)
}

fn need_label(uri: &Pkcs11Uri) -> Result<&str> {
    uri.object.as_deref().ok_or_else(|| Error::invalid("the pkcs11: URI has no object label"))
}

/// The public and private objects of a pair, with its type.
struct Pair {
    public: ObjectHandle,
    private: ObjectHandle,
    kind: PairKind,
}

fn find_pair(session: &Session, uri: &Pkcs11Uri) -> Result<Option<Pair>, OpError> {
    let (Some(public), Some(private)) =
        (find(session, uri, ObjectClass::PUBLIC_KEY)?, find(session, uri, ObjectClass::PRIVATE_KEY)?)
    else {
        return Ok(None);
    };
    let kind = match (key_type(session, public)?, key_type(session, private)?) {
        (Some(KeyType::EC), Some(KeyType::EC)) => PairKind::Ec,
        (Some(KeyType::RSA), Some(KeyType::RSA)) => PairKind::Rsa,
        _ => return Err(Error::external_msg("the PKCS#11 key pair's objects are not both EC or both RSA").into()),
    };
    Ok(Some(Pair { public, private, kind }))
}

fn require_pair(session: &Session, uri: &Pkcs11Uri) -> Result<Pair, OpError> {
    find_pair(session, uri)?.ok_or_else(|| Error::invalid("key pair not found").into())
}

fn attribute(session: &Session, handle: ObjectHandle, t: AttributeType) -> Result<Vec<u8>, OpError> {
    let attrs = session.get_attributes(handle, &[t]).map_err(ck("C_GetAttributeValue failed"))?;
    attrs
        .into_iter()
        .find_map(|a| match a {
            Attribute::EcParams(v) | Attribute::EcPoint(v) | Attribute::Modulus(v) | Attribute::PublicExponent(v) => {
                Some(v)
            }
            _ => None,
        })
        .ok_or_else(|| Error::external_msg("the PKCS#11 public key lacks an attribute").into())
}

/// `CKA_EC_POINT` is a DER OCTET STRING around the X9.62 point (PKCS#11 v2.40); some modules give
/// the bare point. Returns the compressed P-256 point.
fn compressed_p256_point(raw: &[u8]) -> Result<Vec<u8>> {
    let point = match raw {
        [0x04, len, rest @ ..] if usize::from(*len) == rest.len() && *len < 0x80 => rest,
        [0x04, 0x81, len, rest @ ..] if usize::from(*len) == rest.len() => rest,
        _ => raw,
    };
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).map_err(|e| Error::external("EC group", e))?;
    let mut ctx = BigNumContext::new().map_err(|e| Error::external("BN_CTX_new", e))?;
    let p = EcPoint::from_bytes(&group, point, &mut ctx).map_err(|e| Error::external("bad EC point on token", e))?;
    p.to_bytes(&group, PointConversionForm::COMPRESSED, &mut ctx).map_err(|e| Error::external("EC point", e))
}

fn strip_leading_zeros(v: Vec<u8>) -> Vec<u8> {
    let start = v.iter().position(|&b| b != 0).unwrap_or(v.len().saturating_sub(1));
    v[start..].to_vec()
}

fn ec_params_is_p256(session: &Session, public: ObjectHandle) -> Result<bool, OpError> {
    Ok(attribute(session, public, AttributeType::EcParams)? == crypto::P256_OID_DER)
}

fn gcm_encrypt(session: &Session, key: ObjectHandle, iv: &[u8], aad: &[u8], pt: &[u8]) -> Result<Vec<u8>, OpError> {
    let mut iv = iv.to_vec();
    let params = GcmParams::new(&mut iv, aad, ulong(128)).map_err(ck("CK_GCM_PARAMS"))?;
    session.encrypt(&Mechanism::AesGcm(params), key, pt).map_err(ck("C_Encrypt (AES-GCM) failed"))
}

impl Token {
    /// The type of pair `uri`, or `None` if it has no such pair.
    pub(crate) fn find_pair(&self, uri: &Pkcs11Uri) -> Result<Option<PairKind>> {
        self.with_session(uri, |s| Ok(find_pair(s, uri)?.map(|p| p.kind)))
    }

    /// Generates a pair with the first algorithm the token accepts (spec §7.4); objects with the
    /// label are destroyed first. None accepted → INVALID_PARAMETER.
    pub(crate) fn generate_pair(&self, uri: &Pkcs11Uri, algorithms: &[Algorithm]) -> Result<()> {
        let label = need_label(uri)?.as_bytes().to_vec();
        self.with_session(uri, |s| {
            destroy_all(s, uri, ObjectClass::PUBLIC_KEY)?;
            destroy_all(s, uri, ObjectClass::PRIVATE_KEY)?;
            for &alg in algorithms {
                let (mechanism, extra) = match alg {
                    Algorithm::EcP256 => {
                        (Mechanism::EccKeyPairGen, vec![Attribute::EcParams(crypto::P256_OID_DER.to_vec())])
                    }
                    Algorithm::Rsa2048 | Algorithm::Rsa4096 => (
                        Mechanism::RsaPkcsKeyPairGen,
                        vec![
                            Attribute::ModulusBits(ulong(if alg == Algorithm::Rsa2048 { 2048 } else { 4096 })),
                            Attribute::PublicExponent(vec![0x01, 0x00, 0x01]),
                        ],
                    ),
                };
                let mut public = vec![
                    Attribute::Encrypt(true),
                    Attribute::Verify(true),
                    Attribute::Token(true),
                    Attribute::Private(false),
                    Attribute::Label(label.clone()),
                ];
                public.extend(extra);
                let private = [
                    Attribute::Decrypt(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Sign(true),
                    Attribute::Token(true),
                    Attribute::Label(label.clone()),
                ];
                match s.generate_key_pair(&mechanism, &public, &private) {
                    Ok(_) => return Ok(()),
                    // Session/login failures are not the algorithm's fault: let the caller retry.
                    Err(e) if matches!(rv(&e), Some(RvError::UserNotLoggedIn)) || super::is_session_lost(&e) => {
                        return Err(OpError::Ck("C_GenerateKeyPair failed", e))
                    }
                    Err(_) => continue,
                }
            }
            Err(Error::invalid("no algorithm succeeded").into())
        })
    }

    pub(crate) fn pair_parameter(&self, uri: &Pkcs11Uri, parameter: KeyPairParameter) -> Result<Vec<u8>> {
        self.with_session(uri, |s| {
            let pair = require_pair(s, uri)?;
            Ok(match (parameter, pair.kind) {
                (KeyPairParameter::Algorithm, PairKind::Ec) => ALGORITHM_EC.to_ne_bytes().to_vec(),
                (KeyPairParameter::Algorithm, PairKind::Rsa) => ALGORITHM_RSA.to_ne_bytes().to_vec(),
                (KeyPairParameter::EcCurveOid, PairKind::Ec) => {
                    if !ec_params_is_p256(s, pair.public)? {
                        return Err(Error::invalid("the key pair's curve is not P-256").into());
                    }
                    crypto::P256_OID_DER.to_vec()
                }
                (KeyPairParameter::EcPoint, PairKind::Ec) => {
                    if !ec_params_is_p256(s, pair.public)? {
                        return Err(Error::invalid("the key pair's curve is not P-256").into());
                    }
                    compressed_p256_point(&attribute(s, pair.public, AttributeType::EcPoint)?)?
                }
                (KeyPairParameter::RsaModulus, PairKind::Rsa) => {
                    strip_leading_zeros(attribute(s, pair.public, AttributeType::Modulus)?)
                }
                (KeyPairParameter::RsaExponent, PairKind::Rsa) => {
                    strip_leading_zeros(attribute(s, pair.public, AttributeType::PublicExponent)?)
                }
                _ => return Err(Error::invalid("parameter does not apply to this key pair's algorithm").into()),
            })
        })
    }

    /// Upper bound of an ECDSA signature (DER) of pair `uri`.
    pub(crate) fn ecdsa_len_bound(&self, uri: &Pkcs11Uri) -> Result<usize> {
        self.with_session(uri, |s| {
            let pair = require_pair(s, uri)?;
            if pair.kind != PairKind::Ec {
                return Err(Error::invalid("key pair is not an EC key pair").into());
            }
            if !ec_params_is_p256(s, pair.public)? {
                return Err(Error::invalid("the key pair's curve is not P-256").into());
            }
            // ECDSA_size of P-256: SEQUENCE { INTEGER(≤33), INTEGER(≤33) }.
            Ok(72)
        })
    }

    /// ECDSA over `digest` with `CKM_ECDSA`; the token's raw `r‖s` is re-encoded as DER.
    pub(crate) fn ecdsa_sign(&self, uri: &Pkcs11Uri, digest: &[u8]) -> Result<Vec<u8>> {
        self.with_session(uri, |s| {
            let pair = require_pair(s, uri)?;
            if pair.kind != PairKind::Ec {
                return Err(Error::invalid("key pair is not an EC key pair").into());
            }
            let raw = s.sign(&Mechanism::Ecdsa, pair.private, digest).map_err(ck("C_Sign (ECDSA) failed"))?;
            if raw.is_empty() || raw.len() % 2 != 0 {
                return Err(Error::external_msg("the token returned a malformed ECDSA signature").into());
            }
            let (r, sig_s) = raw.split_at(raw.len() / 2);
            let bn = |b: &[u8]| BigNum::from_slice(b).map_err(|e| Error::external("BN_bin2bn", e));
            let sig = EcdsaSig::from_private_components(bn(r)?, bn(sig_s)?)
                .map_err(|e| Error::external("ECDSA_SIG_set0", e))?;
            Ok(sig.to_der().map_err(|e| Error::external("i2d_ECDSA_SIG", e))?)
        })
    }

    /// Modulus length of RSA pair `uri`.
    pub(crate) fn rsa_len(&self, uri: &Pkcs11Uri) -> Result<usize> {
        self.with_session(uri, |s| {
            let pair = require_pair(s, uri)?;
            if pair.kind != PairKind::Rsa {
                return Err(Error::invalid("key pair is not an RSA key pair").into());
            }
            Ok(strip_leading_zeros(attribute(s, pair.public, AttributeType::Modulus)?).len())
        })
    }

    /// RSA private-key operation: `C_Sign` with `CKM_RSA_PKCS` (type-1 padding) or `CKM_RSA_X509`.
    pub(crate) fn rsa_private_encrypt(&self, uri: &Pkcs11Uri, mode: RsaMode, input: &[u8]) -> Result<Vec<u8>> {
        self.with_session(uri, |s| {
            let pair = require_pair(s, uri)?;
            if pair.kind != PairKind::Rsa {
                return Err(Error::invalid("key pair is not an RSA key pair").into());
            }
            let mechanism = match mode {
                RsaMode::Pkcs1 => Mechanism::RsaPkcs,
                RsaMode::NoPadding => {
                    // As the file backend: raw RSA takes exactly a modulus-length input (tokens
                    // such as SoftHSM would silently left-pad a shorter one).
                    let len = strip_leading_zeros(attribute(s, pair.public, AttributeType::Modulus)?).len();
                    if input.len() != len {
                        return Err(Error::invalid("RSA no-padding input must be modulus-length").into());
                    }
                    Mechanism::RsaX509
                }
            };
            s.sign(&mechanism, pair.private, input).map_err(|e| match rv(&e) {
                Some(RvError::DataLenRange | RvError::DataInvalid) => {
                    OpError::Other(Error::invalid("input length does not fit the RSA key"))
                }
                _ => OpError::Ck("C_Sign (RSA) failed", e),
            })
        })
    }

    /// Destroys the pair's objects; whether any existed.
    pub(crate) fn delete_pair(&self, uri: &Pkcs11Uri) -> Result<bool> {
        need_label(uri)?;
        self.with_session(uri, |s| {
            let a = destroy_all(s, uri, ObjectClass::PUBLIC_KEY)?;
            let b = destroy_all(s, uri, ObjectClass::PRIVATE_KEY)?;
            Ok(a || b)
        })
    }

    /// Destroys `to`'s pair objects and relabels `from`'s (same token, spec §7.7).
    ///
    /// As the file backend: a destination holding a secret key is refused (INVALID_PARAMETER,
    /// spec §10 quirk 3, docs/compatibility.md), and a missing source is EXTERNAL (the file
    /// backend's failed rename; spec §5.7 "source missing → 500").
    pub(crate) fn move_pair(&self, from: &Pkcs11Uri, to: &Pkcs11Uri) -> Result<()> {
        let new_label = need_label(to)?.as_bytes().to_vec();
        need_label(from)?;
        self.with_session(from, |s| {
            if from.object != to.object && find(s, to, ObjectClass::SECRET_KEY)?.is_some() {
                return Err(Error::invalid("destination id holds a symmetric key; refusing to overwrite it").into());
            }
            let pair = find_pair(s, from)?
                .ok_or_else(|| OpError::Other(Error::external_msg("the source key pair does not exist")))?;
            if from.object == to.object {
                return Ok(());
            }
            destroy_all(s, to, ObjectClass::PUBLIC_KEY)?;
            destroy_all(s, to, ObjectClass::PRIVATE_KEY)?;
            for handle in [pair.public, pair.private] {
                s.update_attributes(handle, &[Attribute::Label(new_label.clone())])
                    .map_err(ck("C_SetAttributeValue (relabel) failed"))?;
            }
            Ok(())
        })
    }

    fn require_secret(s: &Session, uri: &Pkcs11Uri) -> Result<(ObjectHandle, SecretKind), OpError> {
        let handle =
            find(s, uri, ObjectClass::SECRET_KEY)?.ok_or_else(|| OpError::Other(Error::invalid("key not found")))?;
        match key_type(s, handle)? {
            Some(KeyType::GENERIC_SECRET) => Ok((handle, SecretKind::Hmac)),
            Some(KeyType::AES) => Ok((handle, SecretKind::Aes)),
            _ => Err(Error::external_msg("the PKCS#11 secret key is neither generic-secret nor AES").into()),
        }
    }

    /// The type of secret key `uri`, or `None` if there is none.
    pub(crate) fn find_secret(&self, uri: &Pkcs11Uri) -> Result<Option<SecretKind>> {
        self.with_session(uri, |s| match Self::require_secret(s, uri) {
            Ok((_, kind)) => Ok(Some(kind)),
            Err(OpError::Other(Error::InvalidParameter(_))) => Ok(None),
            Err(e) => Err(e),
        })
    }

    /// Generates a secret key for `usage` (spec §7.6). `Ok(false)`: the token cannot make such a
    /// key and the caller falls back to the next candidate. Usage other than exactly DERIVE/SIGN
    /// or ENCRYPT → INVALID_PARAMETER.
    pub(crate) fn generate_secret(&self, uri: &Pkcs11Uri, usage: KeyUsage) -> Result<bool> {
        let label = need_label(uri)?.as_bytes().to_vec();
        let kind = secret_kind(usage)?;
        self.with_session(uri, |s| {
            destroy_all(s, uri, ObjectClass::SECRET_KEY)?;
            let common = [
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Token(true),
                Attribute::Label(label.clone()),
            ];
            match kind {
                SecretKind::Hmac => {
                    let mut t = vec![
                        Attribute::KeyType(KeyType::GENERIC_SECRET),
                        Attribute::ValueLen(ulong(32)),
                        Attribute::Sign(true),
                        Attribute::Verify(true),
                    ];
                    t.extend(common.iter().cloned());
                    match s.generate_key(&Mechanism::GenericSecretKeyGen, &t) {
                        Ok(_) => Ok(true),
                        Err(e) if matches!(rv(&e), Some(RvError::FunctionNotSupported | RvError::MechanismInvalid)) => {
                            Ok(false)
                        }
                        Err(e) => Err(OpError::Ck("C_GenerateKey (generic secret) failed", e)),
                    }
                }
                SecretKind::Aes => {
                    for len in [32, 16] {
                        let mut t = vec![
                            Attribute::KeyType(KeyType::AES),
                            Attribute::ValueLen(ulong(len)),
                            Attribute::Encrypt(true),
                            Attribute::Decrypt(true),
                            Attribute::Verify(true),
                        ];
                        t.extend(common.iter().cloned());
                        let handle = match s.generate_key(&Mechanism::AesKeyGen, &t) {
                            Ok(handle) => handle,
                            // A lost session or login is not the token refusing AES: retry.
                            Err(e) if super::is_session_lost(&e) || rv(&e) == Some(RvError::UserNotLoggedIn) => {
                                return Err(OpError::Ck("C_GenerateKey (AES) failed", e))
                            }
                            Err(_) => continue,
                        };
                        if gcm_encrypt(s, handle, TEST_IV, TEST_AAD, TEST_PLAINTEXT).is_ok() {
                            return Ok(true);
                        }
                        s.destroy_object(handle).map_err(ck("C_DestroyObject failed"))?;
                        return Ok(false);
                    }
                    Ok(false)
                }
            }
        })
    }

    /// Imports `bytes` as a secret key for `usage`. `Ok(false)`: `C_CreateObject` refused; the
    /// caller falls back to the next candidate.
    pub(crate) fn import_secret(&self, uri: &Pkcs11Uri, bytes: &[u8], usage: KeyUsage) -> Result<bool> {
        let label = need_label(uri)?.as_bytes().to_vec();
        let kind = secret_kind(usage)?;
        self.with_session(uri, |s| {
            // Destroyed first, also when the key goes to the next candidate: a stale token key
            // would shadow it (lookups try the token first).
            destroy_all(s, uri, ObjectClass::SECRET_KEY)?;
            if kind == SecretKind::Aes && ![16, 24, 32].contains(&bytes.len()) {
                // A conforming token refuses such a `CKA_VALUE` in `C_CreateObject`
                // (`CKR_ATTRIBUTE_VALUE_INVALID`); SoftHSM2 accepts it and fails only at use.
                // Treated as that refusal: next candidate (spec §7.6).
                return Ok(false);
            }
            let mut t = vec![
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Value(bytes.to_vec()),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Token(true),
                Attribute::Label(label.clone()),
            ];
            match kind {
                SecretKind::Aes => {
                    t.extend([Attribute::KeyType(KeyType::AES), Attribute::Encrypt(true), Attribute::Decrypt(true)])
                }
                SecretKind::Hmac => t.extend([
                    Attribute::KeyType(KeyType::GENERIC_SECRET),
                    Attribute::Sign(true),
                    Attribute::Verify(true),
                ]),
            }
            let result = s.create_object(&t);
            // The template holds the key bytes; wipe the copy.
            for attr in &mut t {
                if let Attribute::Value(v) = attr {
                    zeroize::Zeroize::zeroize(v);
                }
            }
            match result {
                Ok(_) => Ok(true),
                Err(e) if super::is_session_lost(&e) || rv(&e) == Some(RvError::UserNotLoggedIn) => {
                    Err(OpError::Ck("C_CreateObject failed", e))
                }
                Err(_) => Ok(false),
            }
        })
    }

    /// HMAC-SHA256 on the token (`CKM_SHA256_HMAC`); also the derivation of spec §7.5.
    pub(crate) fn hmac_sha256(&self, uri: &Pkcs11Uri, data: &[u8]) -> Result<Vec<u8>> {
        self.with_session(uri, |s| {
            let (handle, _) = Self::require_secret(s, uri)?;
            s.sign(&Mechanism::Sha256Hmac, handle, data).map_err(ck("C_Sign (HMAC-SHA256) failed"))
        })
    }

    /// AES-GCM (tag 128 bits) on the token; output `0x02 ‖ ciphertext ‖ tag`.
    pub(crate) fn aead_encrypt(&self, uri: &Pkcs11Uri, iv: &[u8], aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>> {
        if iv.is_empty() {
            return Err(Error::invalid("AEAD IV is empty"));
        }
        self.with_session(uri, |s| {
            let (handle, _) = Self::require_secret(s, uri)?;
            let ct = gcm_encrypt(s, handle, iv, aad, plaintext)?;
            let mut out = Vec::with_capacity(1 + ct.len());
            out.push(crypto::AEAD_VERSION_CT_TAG);
            out.extend_from_slice(&ct);
            Ok(out)
        })
    }

    /// Decrypts `0x02 ‖ ciphertext ‖ tag` (the only format token keys accept, spec §7.5).
    pub(crate) fn aead_decrypt(
        &self,
        uri: &Pkcs11Uri,
        iv: &[u8],
        aad: &[u8],
        input: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>> {
        crypto::aead_plaintext_len(input)?;
        if input[0] != crypto::AEAD_VERSION_CT_TAG {
            return Err(Error::invalid("PKCS#11 keys accept only ciphertext format 0x02"));
        }
        if iv.is_empty() {
            return Err(Error::invalid("AEAD IV is empty"));
        }
        self.with_session(uri, |s| {
            let (handle, _) = Self::require_secret(s, uri)?;
            let mut iv = iv.to_vec();
            let params = GcmParams::new(&mut iv, aad, ulong(128)).map_err(ck("CK_GCM_PARAMS"))?;
            let pt = s.decrypt(&Mechanism::AesGcm(params), handle, &input[1..]).map_err(|e| {
                if is_authentication_failure(&e) {
                    // As the file backend: one generic invalid-parameter error (no oracle detail).
                    OpError::Other(Error::invalid("decryption failed"))
                } else {
                    OpError::Ck("C_Decrypt (AES-GCM) failed", e)
                }
            })?;
            Ok(Zeroizing::new(pt))
        })
    }

    /// Destroys the secret key objects with the label; whether any existed.
    pub(crate) fn delete_secret(&self, uri: &Pkcs11Uri) -> Result<bool> {
        need_label(uri)?;
        self.with_session(uri, |s| destroy_all(s, uri, ObjectClass::SECRET_KEY))
    }
}

/// Whether a failed `C_Decrypt` (AES-GCM) means the input did not authenticate. PKCS#11 v3.0
/// names `CKR_ENCRYPTED_DATA_INVALID` for a tag mismatch; SoftHSM2 answers `CKR_GENERAL_ERROR`
/// (its `decryptFinal` failing), and some modules `CKR_ENCRYPTED_DATA_LEN_RANGE` or
/// `CKR_DATA_INVALID`. A lost session or login is never an authentication failure.
fn is_authentication_failure(e: &cryptoki::error::Error) -> bool {
    matches!(
        rv(e),
        Some(
            RvError::EncryptedDataInvalid
                | RvError::EncryptedDataLenRange
                | RvError::DataInvalid
                | RvError::GeneralError
        )
    )
}

/// Usage → key type: exactly DERIVE/SIGN or exactly ENCRYPT (spec §7.6).
fn secret_kind(usage: KeyUsage) -> Result<SecretKind> {
    match usage {
        KeyUsage::SIGN => Ok(SecretKind::Hmac),
        KeyUsage::ENCRYPT => Ok(SecretKind::Aes),
        _ => Err(Error::invalid("PKCS#11 keys need usage exactly DERIVE/SIGN or exactly ENCRYPT")),
    }
}
