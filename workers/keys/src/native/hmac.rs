//! HMAC-SHA256 (RFC 2104) on OpenSSL's SHA-256 primitive, with the padded-key states computed
//! once per key and copied per call. OpenSSL 3's EVP_PKEY HMAC path fetches the algorithm and
//! takes provider locks on every call; with it keyd's HMAC sign ran at a third of the hyper
//! floor at 8 clients, with this at well over half. Checked against RFC 4231 and OpenSSL's own
//! HMAC in the tests below.

use openssl::sha::Sha256;
use zeroize::Zeroizing;

const BLOCK: usize = 64;

/// A key ready for HMAC-SHA256: SHA-256 states that have absorbed `key ^ ipad` / `key ^ opad`.
pub(crate) struct HmacSha256Key {
    inner: Sha256,
    outer: Sha256,
}

impl HmacSha256Key {
    pub(crate) fn new(key: &[u8]) -> Self {
        let mut k = Zeroizing::new([0u8; BLOCK]);
        if key.len() > BLOCK {
            k[..32].copy_from_slice(&openssl::sha::sha256(key));
        } else {
            k[..key.len()].copy_from_slice(key);
        }
        let mut pad = Zeroizing::new([0u8; BLOCK]);
        let mut inner = Sha256::new();
        for (p, b) in pad.iter_mut().zip(k.iter()) {
            *p = b ^ 0x36;
        }
        inner.update(&pad[..]);
        let mut outer = Sha256::new();
        for (p, b) in pad.iter_mut().zip(k.iter()) {
            *p = b ^ 0x5c;
        }
        outer.update(&pad[..]);
        HmacSha256Key { inner, outer }
    }

    pub(crate) fn mac(&self, data: &[u8]) -> [u8; 32] {
        let mut inner = self.inner.clone();
        inner.update(data);
        let inner_hash = inner.finish();
        let mut outer = self.outer.clone();
        outer.update(&inner_hash);
        outer.finish()
    }
}

impl Drop for HmacSha256Key {
    fn drop(&mut self) {
        // The states are derived from the key: overwrite them with key-independent ones.
        // SAFETY: both pointers are valid, aligned, exclusively borrowed fields of `self`;
        // the old values are plain data (no destructor) and are overwritten, not dropped.
        unsafe {
            std::ptr::write_volatile(&mut self.inner, Sha256::new());
            std::ptr::write_volatile(&mut self.outer, Sha256::new());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn openssl_hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
        let pkey = openssl::pkey::PKey::hmac(key).unwrap();
        let mut s = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), &pkey).unwrap();
        s.update(data).unwrap();
        s.sign_to_vec().unwrap()
    }

    #[test]
    fn rfc4231_vectors() {
        // Test case 1.
        assert_eq!(
            hex(&HmacSha256Key::new(&[0x0b; 20]).mac(b"Hi There")),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        // Test case 2.
        assert_eq!(
            hex(&HmacSha256Key::new(b"Jefe").mac(b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block.
        assert_eq!(
            hex(&HmacSha256Key::new(&[0xaa; 131]).mac(b"Test Using Larger Than Block-Size Key - Hash Key First")),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn matches_openssl_for_many_lengths() {
        // OpenSSL refuses an empty HMAC key; RFC 2104 allows it (known value below).
        assert_eq!(
            hex(&HmacSha256Key::new(b"").mac(b"")),
            "b613679a0814d9ec772f95d778c35fc5ff1697c493715653c6c712144292c5ad"
        );
        for key_len in [1usize, 31, 32, 63, 64, 65, 200] {
            let key: Vec<u8> = (0..key_len).map(|i| i as u8).collect();
            let k = HmacSha256Key::new(&key);
            for data_len in [0usize, 1, 55, 56, 64, 1000] {
                let data: Vec<u8> = (0..data_len).map(|i| (i * 7) as u8).collect();
                assert_eq!(k.mac(&data).to_vec(), openssl_hmac(&key, &data), "key {key_len} data {data_len}");
            }
        }
    }
}
