//! Local issuance (spec certd.md §5): a certificate from a verified CSR, signed by a key held
//! in keyd (through the engine's in-process twin), and the seam where EST issuance plugs in.
//!
//! Differences from upstream, by recommendation (docs/compatibility.md): a random positive
//! 128-bit serial instead of 0; the CSR's extensions are copied except an
//! AuthorityKeyIdentifier (certd writes the one of the real issuer, or none) and repeats of an
//! extension already copied (RFC 5280 §4.2: at most one instance of an extension).

use std::future::Future;
use std::pin::Pin;

use foreign_types::ForeignTypeRef;
use openssl::asn1::{Asn1Object, Asn1OctetString, Asn1Time};
use openssl::bn::{BigNum, MsbOption};
use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKeyRef, Private};
use openssl::x509::extension::SubjectKeyIdentifier;
use openssl::x509::{X509Builder, X509Name, X509NameBuilder, X509Ref, X509ReqRef, X509};

use crate::config::{CertOptions, Subject};

/// Validity when `expiry_days` is not configured.
pub const DEFAULT_EXPIRY_DAYS: u64 = 30;
/// Longest CN value (characters); longer ones are truncated (spec §5.4).
pub const CN_MAX_CHARS: usize = 64;

/// Who issues a certificate for `POST /certificates`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Issuer {
    /// The request's `issuer`: a cert ID in the store and a keyd key-pair handle (takes
    /// precedence over `[cert_issuance]`).
    Explicit { cert_id: String, key_handle: String },
    /// `method = "self_signed"`: the keyd key pair whose ID is the cert ID.
    SelfSigned,
    /// `method = "local_ca"`: `[cert_issuance.local_ca]`.
    LocalCa,
    /// `method = "est"`: the [`EstIssuer`], when this build has one.
    Est,
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("could not build the certificate")]
    OpenSsl(#[from] ErrorStack),
    #[error("unknown subject attribute {0:?}")]
    SubjectAttribute(String, #[source] ErrorStack),
    #[error("expiry_days {0} is out of range")]
    Expiry(u64),
    #[error("could not load the signing key from keyd")]
    Key(#[source] aziot_key_openssl_engine::Error),
    /// The seam for EST: until the EST client lands, `method = "est"` fails with this.
    #[error("EST issuance is not available")]
    EstUnavailable,
    /// An EST failure (the EST client's own error, boxed).
    #[error("EST issuance failed")]
    Est(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// What the EST client is given for one `POST /certificates` with `method = "est"`.
#[derive(Clone, Debug)]
pub struct EstRequest {
    pub cert_id: String,
    /// The caller's CSR, DER, sent unchanged (spec §6.2).
    pub csr_der: Vec<u8>,
    pub options: CertOptions,
}

/// EST issuance, plugged in by the EST client (workers/certd/src/est/, a later change). Returns
/// the PEM to store and return: the issued certificate(s) then the CA certificates.
pub trait EstIssuer: Send + Sync + 'static {
    fn issue<'a>(
        &'a self,
        request: EstRequest,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, IssueError>> + Send + 'a>>;
}

/// The NID of one X.509 extension (`NID_undef` for an OID OpenSSL does not know).
fn extension_nid(ext: &openssl::x509::X509ExtensionRef) -> Nid {
    // SAFETY: `ext` is a valid X509_EXTENSION for the duration of the borrow; the object it
    // returns is owned by the extension, only read here, and not kept.
    let raw = unsafe { openssl_sys::OBJ_obj2nid(openssl_sys::X509_EXTENSION_get_object(ext.as_ptr())) };
    Nid::from_raw(raw)
}

/// The subject of `opts` (spec §5.4): one CN, or one RDN per `subject` entry in key order;
/// CN values truncated to 64 characters.
pub fn subject_name(subject: &Subject) -> Result<X509Name, IssueError> {
    let truncate = |v: &str| -> String { v.chars().take(CN_MAX_CHARS).collect() };
    let mut b = X509NameBuilder::new()?;
    match subject {
        Subject::CommonName(cn) => b.append_entry_by_nid(Nid::COMMONNAME, &truncate(cn))?,
        Subject::Dn(entries) => {
            for (k, v) in entries {
                let v = if k.eq_ignore_ascii_case("cn") { truncate(v) } else { v.clone() };
                b.append_entry_by_text(k, &v).map_err(|e| IssueError::SubjectAttribute(k.clone(), e))?;
            }
        }
    }
    Ok(b.build())
}

/// DER of an AuthorityKeyIdentifier with only `keyIdentifier` (`[0] IMPLICIT OCTET STRING`).
fn akid_der(key_id: &[u8]) -> Vec<u8> {
    fn len(n: usize) -> Vec<u8> {
        if n < 0x80 {
            vec![n as u8]
        } else if n < 0x100 {
            vec![0x81, n as u8]
        } else {
            vec![0x82, (n >> 8) as u8, n as u8]
        }
    }
    let mut inner = vec![0x80];
    inner.extend(len(key_id.len()));
    inner.extend_from_slice(key_id);
    let mut out = vec![0x30];
    out.extend(len(inner.len()));
    out.extend(inner);
    out
}

/// Builds and signs the certificate for `req` (already verified) with `key`, issued by the
/// first certificate of `stack` (or self-issued when `stack` is empty). Returns the new
/// certificate's PEM followed by the PEM of every certificate of `stack`.
pub fn build(
    req: &X509ReqRef,
    stack: &[X509],
    key: &PKeyRef<Private>,
    opts: Option<&CertOptions>,
) -> Result<Vec<u8>, IssueError> {
    let mut b = X509Builder::new()?;
    b.set_version(2)?;
    // A random positive 128-bit serial (top bit set: always 16 octets of magnitude).
    let mut serial = BigNum::new()?;
    serial.rand(128, MsbOption::ONE, false)?;
    let serial = serial.to_asn1_integer()?;
    b.set_serial_number(&serial)?;
    let subject = match opts.and_then(|o| o.subject.as_ref()) {
        Some(s) => subject_name(s)?,
        None => req.subject_name().to_owned()?,
    };
    b.set_subject_name(&subject)?;
    let public = req.public_key()?;
    b.set_pubkey(&public)?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let days = opts.and_then(|o| o.expiry_days).unwrap_or(DEFAULT_EXPIRY_DAYS);
    let end = days
        .checked_mul(86_400)
        .and_then(|s| s.checked_add(now))
        .and_then(|s| i64::try_from(s).ok())
        .ok_or(IssueError::Expiry(days))?;
    let not_before = Asn1Time::from_unix(now as i64)?;
    b.set_not_before(&not_before)?;
    let not_after = Asn1Time::from_unix(end).map_err(|_| IssueError::Expiry(days))?;
    let issuer: Option<&X509Ref> = stack.first().map(|c| &**c);
    if let Some(ca) = issuer {
        // clamped to the issuer's notAfter
        if ca.not_after().compare(&not_after)? == std::cmp::Ordering::Less {
            b.set_not_after(ca.not_after())?;
        } else {
            b.set_not_after(&not_after)?;
        }
        b.set_issuer_name(ca.subject_name())?;
    } else {
        b.set_not_after(&not_after)?;
        b.set_issuer_name(&subject)?;
    }

    // The CSR's extensions (none: X509_REQ_get_extensions answers NULL, an "error").
    let requested = req.extensions().unwrap_or_else(|_| {
        let _ = ErrorStack::get();
        openssl::stack::Stack::new().expect("an empty stack")
    });
    let mut seen = Vec::new();
    for ext in &requested {
        let nid = extension_nid(ext);
        if nid == Nid::AUTHORITY_KEY_IDENTIFIER {
            continue;
        }
        if nid != Nid::UNDEF && seen.contains(&nid) {
            continue;
        }
        seen.push(nid);
        b.append_extension2(ext)?;
    }
    if !seen.contains(&Nid::SUBJECT_KEY_IDENTIFIER) {
        let skid = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None))?;
        b.append_extension(skid)?;
    }
    if let Some(key_id) = issuer.and_then(|ca| ca.subject_key_id()) {
        let der = Asn1OctetString::new_from_bytes(&akid_der(key_id.as_slice()))?;
        let oid = Asn1Object::from_str("2.5.29.35")?;
        b.append_extension(openssl::x509::X509Extension::new_from_der(&oid, false, &der)?)?;
    }
    b.sign(key, MessageDigest::sha256())?;
    let cert = b.build();
    let mut pem = cert.to_pem()?;
    for c in stack {
        pem.extend(c.to_pem()?);
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::ec::{EcGroup, EcKey};
    use openssl::pkey::PKey;
    use openssl::x509::extension::{BasicConstraints, ExtendedKeyUsage};
    use openssl::x509::X509ReqBuilder;

    fn key() -> openssl::pkey::PKey<Private> {
        PKey::from_ec_key(EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap()).unwrap()
    }

    fn csr(key: &PKeyRef<Private>, cn: &str, ca: bool) -> openssl::x509::X509Req {
        let mut b = X509ReqBuilder::new().unwrap();
        let mut n = X509NameBuilder::new().unwrap();
        n.append_entry_by_text("CN", cn).unwrap();
        b.set_subject_name(&n.build()).unwrap();
        b.set_pubkey(key).unwrap();
        let mut exts = openssl::stack::Stack::new().unwrap();
        if ca {
            exts.push(BasicConstraints::new().critical().ca().build().unwrap()).unwrap();
        }
        exts.push(ExtendedKeyUsage::new().client_auth().build().unwrap()).unwrap();
        exts.push(ExtendedKeyUsage::new().server_auth().build().unwrap()).unwrap();
        b.add_extensions(&exts).unwrap();
        b.sign(key, MessageDigest::sha256()).unwrap();
        b.build()
    }

    #[test]
    fn self_signed_then_issued_by_it() {
        let ca_key = key();
        let ca_pem = build(&csr(&ca_key, "ca", true), &[], &ca_key, None).unwrap();
        let ca = X509::from_pem(&ca_pem).unwrap();
        assert!(ca.verify(&ca_key).unwrap());
        assert_eq!(ca.issuer_name().to_der().unwrap(), ca.subject_name().to_der().unwrap());
        assert!(ca.subject_key_id().is_some());
        assert!(ca.authority_key_id().is_none());
        assert!(ca.serial_number().to_bn().unwrap().num_bits() == 128);

        let leaf_key = key();
        let opts = CertOptions {
            method: crate::config::Method::LocalCa,
            url: None,
            auth: Default::default(),
            expiry_days: Some(100_000),
            subject: Some(Subject::Dn(
                [
                    ("L".to_owned(), "AQ".to_owned()),
                    ("CN".to_owned(), "x".repeat(80)),
                    ("ST".to_owned(), "Antarctica".to_owned()),
                ]
                .into_iter()
                .collect(),
            )),
        };
        let pem = build(&csr(&leaf_key, "leaf", false), std::slice::from_ref(&ca), &ca_key, Some(&opts)).unwrap();
        let chain = X509::stack_from_pem(&pem).unwrap();
        assert_eq!(chain.len(), 2);
        let leaf = &chain[0];
        assert!(leaf.verify(&ca_key).unwrap());
        assert_eq!(leaf.authority_key_id().unwrap().as_slice(), ca.subject_key_id().unwrap().as_slice());
        // clamped to the CA's notAfter
        assert_eq!(leaf.not_after().compare(ca.not_after()).unwrap(), std::cmp::Ordering::Equal);
        // RDNs in key order, CN truncated to 64
        let names: Vec<String> = leaf
            .subject_name()
            .entries()
            .map(|e| format!("{}={}", e.object().nid().short_name().unwrap(), e.data().to_string().unwrap()))
            .collect();
        assert_eq!(names, [format!("CN={}", "x".repeat(64)), "L=AQ".into(), "ST=Antarctica".into()]);
        // EKU requested twice: copied once
        let text = String::from_utf8(leaf.to_text().unwrap()).unwrap();
        assert_eq!(text.matches("X509v3 Extended Key Usage").count(), 1, "{text}");
        assert_ne!(leaf.serial_number().to_bn().unwrap(), ca.serial_number().to_bn().unwrap());
    }

    #[test]
    fn unknown_subject_attribute() {
        let k = key();
        let opts = CertOptions {
            method: crate::config::Method::SelfSigned,
            url: None,
            auth: Default::default(),
            expiry_days: None,
            subject: Some(Subject::Dn([("Bogus".to_owned(), "x".to_owned())].into_iter().collect())),
        };
        assert!(matches!(build(&csr(&k, "a", false), &[], &k, Some(&opts)), Err(IssueError::SubjectAttribute(..))));
    }

    #[test]
    fn akid_encoding() {
        assert_eq!(akid_der(&[1, 2, 3]), vec![0x30, 5, 0x80, 3, 1, 2, 3]);
    }
}
