//! Local reference computations (openssl crate) used to check keyd's results, and helpers to
//! take key handles apart (keyd.md §4).

use base64::Engine as _;
use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcKey, EcPoint};
use openssl::ecdsa::EcdsaSig;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private, Public};
use openssl::rsa::{Padding, Rsa};
use openssl::sign::Signer;
use openssl::symm::Cipher;

pub fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

pub fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_else(|e| panic!("not canonical base64 ({e}): {s:?}"))
}

pub fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn random(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    openssl::rand::rand_bytes(&mut v).expect("rand");
    v
}

pub fn random_u64() -> u64 {
    u64::from_le_bytes(random(8).try_into().expect("8 bytes"))
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    openssl::sha::sha256(data)
}

pub fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let pkey = PKey::hmac(key).expect("hmac key");
    let mut s = Signer::new(MessageDigest::sha256(), &pkey).expect("signer");
    s.update(data).expect("update");
    s.sign_to_vec().expect("sign")
}

/// keyd.md §7.2: `<S>-<H>.key`, S = the ASCII alphanumerics of the id, H = hex SHA-256.
pub fn key_file_name(id: &str) -> String {
    let s: String = id.chars().filter(char::is_ascii_alphanumeric).collect();
    format!("{s}-{}.key", hex(&sha256(id.as_bytes())))
}

/// AES-256-GCM, 16-byte tag. Returns (ciphertext, tag).
pub fn aes_gcm_encrypt(key: &[u8], iv: &[u8], aad: &[u8], pt: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut tag = vec![0u8; 16];
    let ct = openssl::symm::encrypt_aead(Cipher::aes_256_gcm(), key, Some(iv), aad, pt, &mut tag)
        .expect("aes-gcm encrypt");
    (ct, tag)
}

pub fn aes_gcm_decrypt(
    key: &[u8],
    iv: &[u8],
    aad: &[u8],
    ct: &[u8],
    tag: &[u8],
) -> Option<Vec<u8>> {
    openssl::symm::decrypt_aead(Cipher::aes_256_gcm(), key, Some(iv), aad, ct, tag).ok()
}

pub fn p256() -> EcGroup {
    EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("P-256")
}

/// Public EC key from an X9.62 (compressed or not) P-256 point.
pub fn ec_public_from_point(point: &[u8]) -> EcKey<Public> {
    let group = p256();
    let mut ctx = BigNumContext::new().expect("bn ctx");
    let pt = EcPoint::from_bytes(&group, point, &mut ctx).expect("point on P-256");
    EcKey::from_public_key(&group, &pt).expect("ec public key")
}

/// Verify a DER ECDSA signature over a pre-computed digest.
pub fn ecdsa_verify(point: &[u8], digest: &[u8], der_sig: &[u8]) -> bool {
    let key = ec_public_from_point(point);
    let sig = EcdsaSig::from_der(der_sig).expect("DER ECDSA-Sig-Value");
    sig.verify(digest, &key).expect("verify")
}

/// Compressed point of a local EC key.
pub fn ec_compressed_point(key: &EcKey<Private>) -> Vec<u8> {
    let mut ctx = BigNumContext::new().expect("bn ctx");
    key.public_key()
        .to_bytes(
            key.group(),
            openssl::ec::PointConversionForm::COMPRESSED,
            &mut ctx,
        )
        .expect("point bytes")
}

pub fn rsa_public(modulus: &[u8], exponent: &[u8]) -> Rsa<Public> {
    Rsa::from_public_components(
        BigNum::from_slice(modulus).expect("n"),
        BigNum::from_slice(exponent).expect("e"),
    )
    .expect("rsa public key")
}

/// RSA public operation (what a verifier does with a signature made by the private key).
pub fn rsa_public_decrypt(key: &Rsa<Public>, data: &[u8], padding: Padding) -> Option<Vec<u8>> {
    let mut out = vec![0u8; key.size() as usize];
    let n = key.public_decrypt(data, &mut out, padding).ok()?;
    out.truncate(n);
    Some(out)
}

/// A key handle taken apart (keyd.md §4.1).
#[derive(Debug, Clone)]
pub struct Handle {
    /// The exact bytes that were MACed.
    pub sr_raw: Vec<u8>,
    pub sr: serde_json::Value,
    pub sig: Vec<u8>,
}

impl Handle {
    /// Strict parse: exactly `sr=<b64>&sig=<b64>`.
    pub fn parse(h: &str) -> Handle {
        let rest = h
            .strip_prefix("sr=")
            .unwrap_or_else(|| panic!("handle does not start with sr=: {h:?}"));
        let (sr_b64, sig_b64) = rest
            .split_once("&sig=")
            .unwrap_or_else(|| panic!("handle lacks &sig=: {h:?}"));
        let sr_raw = unb64(sr_b64);
        let sr = serde_json::from_slice(&sr_raw).unwrap_or_else(|e| {
            panic!(
                "sr is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&sr_raw)
            )
        });
        Handle {
            sr_raw,
            sr,
            sig: unb64(sig_b64),
        }
    }

    /// `"Key"`, `"KeyPair"` or `"Derived"`.
    pub fn kind(&self) -> String {
        let obj = self.sr["key_id"].as_object().expect("key_id object");
        assert_eq!(
            obj.len(),
            1,
            "key_id must be an externally tagged enum: {}",
            self.sr
        );
        obj.keys().next().expect("one key").clone()
    }

    /// For Key / KeyPair: the id.
    pub fn id(&self) -> String {
        let kind = self.kind();
        self.sr["key_id"][&kind]
            .as_str()
            .unwrap_or_else(|| panic!("{kind} id is not a string: {}", self.sr))
            .to_owned()
    }

    pub fn sr_text(&self) -> String {
        String::from_utf8_lossy(&self.sr_raw).into_owned()
    }
}

/// Build a handle string from raw sr bytes and a sig.
pub fn make_handle(sr: &[u8], sig: &[u8]) -> String {
    format!("sr={}&sig={}", b64(sr), b64(sig))
}

/// Mint a handle the way upstream does with a known handle-validation key
/// (used to prove compatibility with upstream-issued handles).
pub fn mint_handle(hvk: &[u8], key_id_json: &str) -> String {
    let sr = format!(
        r#"{{"key_id":{key_id_json},"nonce":"{}"}}"#,
        b64(&random(64))
    );
    let sig = hmac_sha256(hvk, sr.as_bytes());
    make_handle(sr.as_bytes(), &sig)
}

/// Flip one base64 character of the given part ("sr" or "sig") of a handle, keeping it valid
/// base64 (changes the decoded bytes).
pub fn tamper(handle: &str, part: &str) -> String {
    let marker = format!("{part}=");
    let start = handle.find(&marker).expect("part present") + marker.len();
    let end = handle[start..]
        .find('&')
        .map_or(handle.len(), |e| start + e);
    let mut bytes = handle.as_bytes().to_vec();
    // pick a character in the middle of the part (never padding)
    let pos = start + (end - start) / 3;
    bytes[pos] = if bytes[pos] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).expect("ascii")
}
