//! SAS tokens exactly as cloud-protocols.md §2.1: lower-cased audience, the §2.1 step-3
//! percent-encoding for `sr`, `sr + "\n" + expiry` signed (HMAC-SHA256) by the device key's
//! signer, form-url-encoded base64 signature.
//!
//! The key never appears here: the MAC comes from a [`SasSigner`] (keyd `POST /sign`). A token
//! is built for each attempt (§2.4 Recommendation), so a retry never presents an expired one.

use base64::Engine as _;

use super::{SasSigner, SignError};

/// Token lifetime: expiry = now + 30 s (§2.1 step 1).
pub const LIFETIME_SECS: u64 = 30;

/// Whether byte `b` is percent-encoded by §2.1 step 3 (also used for device and module IDs in
/// Hub URLs, §4.1): controls, DEL, non-ASCII, and space `"` `<` `>` `` ` `` `#` `?` `{` `}` `=`.
fn path_encodes(b: u8) -> bool {
    b <= 0x1f || b >= 0x7f || matches!(b, b' ' | b'"' | b'<' | b'>' | b'`' | b'#' | b'?' | b'{' | b'}' | b'=')
}

/// §2.1 step 3 (upper-case hex): `/`, `:`, `%`, `&`, `+`, `$` stay literal.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if path_encodes(b) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(b as char);
        }
    }
    out
}

/// `application/x-www-form-urlencoded` (§2.1 step 6): keeps `A–Z a–z 0–9 * - . _`, space → `+`,
/// everything else `%XX` upper-case.
pub fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for &b in s.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => out.push(b as char),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The parts of a token before signing: `sr` and the string to sign.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsigned {
    pub sr: String,
    pub expiry: u64,
}

impl Unsigned {
    /// Steps 2–3 for audience `audience` and absolute expiry `expiry` (Unix seconds).
    pub fn new(audience: &str, expiry: u64) -> Unsigned {
        Unsigned { sr: percent_encode(&audience.to_lowercase()), expiry }
    }

    /// Step 4: `sr + "\n" + expiry`.
    pub fn string_to_sign(&self) -> String {
        format!("{}\n{}", self.sr, self.expiry)
    }

    /// Steps 5–7 from the raw MAC: the whole `Authorization` header value. `skn` is
    /// `Some("registration")` for DPS, `None` for the hub (§2.2).
    pub fn header(&self, mac: &[u8], skn: Option<&str>) -> String {
        let sig = base64::engine::general_purpose::STANDARD.encode(mac);
        let mut token = format!("SharedAccessSignature sr={}&sig={}&se={}", self.sr, form_encode(&sig), self.expiry);
        if let Some(skn) = skn {
            token.push_str("&skn=");
            token.push_str(skn);
        }
        token
    }
}

/// Builds an `Authorization` header value for `audience`, valid until `now + LIFETIME_SECS`,
/// signed by `signer`.
pub async fn header(
    signer: &dyn SasSigner,
    audience: &str,
    now_unix: u64,
    lifetime_secs: u64,
    skn: Option<&str>,
) -> Result<String, SignError> {
    let unsigned = Unsigned::new(audience, now_unix + lifetime_secs);
    let mac = signer.sign(unsigned.string_to_sign().as_bytes()).await?;
    Ok(unsigned.header(&mac, skn))
}

/// The hub audience of a device (§2.2): `{hub_name}/devices/{device_id}` (the *hub* host, with
/// its `:port` if any, even when requests go to a gateway).
pub fn hub_audience(hub_name: &str, device_id: &str) -> String {
    format!("{hub_name}/devices/{device_id}")
}

/// Current Unix time in seconds.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::BoxFuture;

    /// A local HMAC-SHA256 signer (in the product, keyd signs).
    struct LocalKey(Vec<u8>);

    impl SasSigner for LocalKey {
        fn sign<'a>(&'a self, data: &'a [u8]) -> BoxFuture<'a, Result<Vec<u8>, SignError>> {
            Box::pin(async move {
                let key = openssl::pkey::PKey::hmac(&self.0).map_err(|e| SignError(e.to_string()))?;
                let mut s = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &key)
                    .map_err(|e| SignError(e.to_string()))?;
                s.update(data).map_err(|e| SignError(e.to_string()))?;
                s.sign_to_vec().map_err(|e| SignError(e.to_string()))
            })
        }
    }

    fn key() -> LocalKey {
        LocalKey((0u8..32).collect())
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(f)
    }

    /// cloud-protocols.md §2.3, the DPS vector (`skn=registration`), byte for byte.
    #[test]
    fn dps_test_vector() {
        let u = Unsigned::new("0ne00ABCDEF/registrations/My-Device", 1_700_000_030);
        assert_eq!(u.sr, "0ne00abcdef/registrations/my-device");
        let h =
            block_on(header(&key(), "0ne00ABCDEF/registrations/My-Device", 1_700_000_000, 30, Some("registration")))
                .expect("sign");
        assert_eq!(
            h,
            "SharedAccessSignature sr=0ne00abcdef/registrations/my-device&sig=oHIL0gq1UpgR6lTLxhLJFA40z4k6gESjCmttNbW32uk%3D&se=1700000030&skn=registration"
        );
    }

    /// cloud-protocols.md §2.3, the Hub vector (no `skn`), byte for byte.
    #[test]
    fn hub_test_vector() {
        let audience = hub_audience("MyHub.azure-devices.net", "My-Device");
        let u = Unsigned::new(&audience, 1_700_000_030);
        assert_eq!(u.sr, "myhub.azure-devices.net/devices/my-device");
        let mac = block_on(key().sign(u.string_to_sign().as_bytes())).expect("sign");
        assert_eq!(
            base64::engine::general_purpose::STANDARD.encode(&mac),
            "zSedK8vM0F3udrT6DV7p5NNrI53xG41aFz8cRUrI+wk="
        );
        let h = block_on(header(&key(), &audience, 1_700_000_000, LIFETIME_SECS, None)).expect("sign");
        assert_eq!(
            h,
            "SharedAccessSignature sr=myhub.azure-devices.net/devices/my-device&sig=zSedK8vM0F3udrT6DV7p5NNrI53xG41aFz8cRUrI%2Bwk%3D&se=1700000030"
        );
    }

    /// §2.1 step 3's set exactly: `/ : % & + $` literal; space `" < > ` # ? { } =`, controls,
    /// DEL and non-ASCII encoded with upper-case hex.
    #[test]
    fn percent_encoding_set() {
        assert_eq!(percent_encode("a/b:c%d&e+f$g"), "a/b:c%d&e+f$g");
        assert_eq!(percent_encode(" \"<>`#?{}="), "%20%22%3C%3E%60%23%3F%7B%7D%3D");
        assert_eq!(percent_encode("\x00\x1f\x7f"), "%00%1F%7F");
        assert_eq!(percent_encode("é"), "%C3%A9");
        assert_eq!(percent_encode("mod-1_x.y~z!'()*;,@["), "mod-1_x.y~z!'()*;,@[");
    }

    #[test]
    fn form_encoding_set() {
        assert_eq!(form_encode("Az09*-._"), "Az09*-._");
        assert_eq!(form_encode("a b+/=~"), "a+b%2B%2F%3D%7E");
    }

    /// The audience is lower-cased whole, `:port` included.
    #[test]
    fn audience_is_lower_cased_with_port() {
        let u = Unsigned::new(&hub_audience("LocalHost:8443", "Dev 1"), 5);
        assert_eq!(u.sr, "localhost:8443/devices/dev%201");
        assert_eq!(u.string_to_sign(), "localhost:8443/devices/dev%201\n5");
    }
}
