//! PEM/CSR input to certd: the `csr` of `POST /certificates` as certd's create reads it
//! (PEM CSR, its public key, its self-signature), then the issuance of certd's local issuers
//! (`aziot_certd::issue::build`: the subject, the CSR's extensions filtered — the CSR's AKID
//! dropped, duplicates dropped, an SKID added when missing, the issuer's AKID added), once
//! self-signed and once under a CA; also the PEM bundle parser certd uses for stored and
//! imported certificates (`X509::stack_from_pem`).
//!
//! Input: a PEM CSR (or anything). Checks: no panic; what is issued parses, verifies with the
//! signing key, has an SKID, and under a CA names its issuer and is followed by it.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use openssl::ec::{EcGroup, EcKey};
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::{X509Req, X509};

struct Fixed {
    key: PKey<Private>,
    ca: X509,
}

fn fixed() -> &'static Fixed {
    static FIXED: OnceLock<Fixed> = OnceLock::new();
    FIXED.get_or_init(|| {
        let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("P-256");
        let key = PKey::from_ec_key(EcKey::generate(&group).expect("a key")).expect("a key");
        let mut req = openssl::x509::X509ReqBuilder::new().expect("a CSR builder");
        let mut name = openssl::x509::X509NameBuilder::new().expect("a name");
        name.append_entry_by_text("CN", "fuzz CA").expect("a CN");
        req.set_subject_name(&name.build()).expect("a subject");
        req.set_pubkey(&key).expect("a key");
        req.sign(&key, openssl::hash::MessageDigest::sha256()).expect("a signature");
        let req = req.build();
        let pem = aziot_certd::issue::build(&req, &[], &key, None).expect("the CA issues itself");
        let ca = X509::from_pem(&pem).expect("the CA parses");
        Fixed { key, ca }
    })
}

fn check_issued(pem: &[u8], key: &PKey<Private>, ca: Option<&X509>) {
    let chain = X509::stack_from_pem(pem).expect("what certd issues parses");
    let cert = &chain[0];
    assert!(cert.verify(key).expect("verify runs"), "the issued certificate does not verify with the signing key");
    let der = cert.to_der().expect("encodes");
    let parsed = X509::from_der(&der).expect("its DER parses");
    assert!(parsed.subject_key_id().is_some(), "no SKID");
    if let Some(ca) = ca {
        assert_eq!(
            parsed.issuer_name().to_der().expect("a name"),
            ca.subject_name().to_der().expect("a name"),
            "the issuer is not the CA"
        );
        assert_eq!(chain.len(), 2, "the CA follows the certificate");
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = X509::stack_from_pem(data);
    let Ok(req) = X509Req::from_pem(data) else { return };
    let Ok(public) = req.public_key() else { return };
    if !matches!(req.verify(&public), Ok(true)) {
        return;
    }
    let _ = openssl::error::ErrorStack::get();
    let f = fixed();
    if let Ok(pem) = aziot_certd::issue::build(&req, &[], &f.key, None) {
        check_issued(&pem, &f.key, None);
    }
    if let Ok(pem) = aziot_certd::issue::build(&req, std::slice::from_ref(&f.ca), &f.key, None) {
        check_issued(&pem, &f.key, Some(&f.ca));
    }
});
