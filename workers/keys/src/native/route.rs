//! Routing of key IDs to a PKCS#11 token (spec/keyd.md §7.2): a preloaded `pkcs11:` key, or a
//! dynamic key whose first candidate is the base slot (with the home directory as the second
//! candidate, the "file fallback"). Each `p11_*` method answers `Ok(None)` when the operation is
//! the file backend's to do.

use std::path::Path;
use std::sync::Arc;

use zeroize::Zeroizing;

use super::params::PreloadedLocation;
use super::pkcs11::{Module, Token};
use super::{crypto, lock, read, write, KeyStore, Pkcs11State};
use crate::pkcs11_uri::Pkcs11Uri;
use crate::{EncryptMechanism, Error, KeyPairParameter, KeyUsage, Result, SignMechanism};

/// Where a key ID lives on a token.
pub(super) struct P11Key {
    pub(super) token: Arc<Token>,
    pub(super) uri: Pkcs11Uri,
    /// The home directory is the next candidate.
    pub(super) file_fallback: bool,
}

impl KeyStore {
    /// Loads the configured module (if any) and `C_Initialize`s it, and opens the base slot's
    /// session if one is configured. A sandboxed worker calls this before Landlock/seccomp so
    /// that the `dlopen` (which maps code) and the module's start-up file accesses happen first.
    pub fn pkcs11_preload(&self) -> Result<()> {
        let (lib, base) = {
            let config = read(&self.config);
            (config.pkcs11_lib_path.clone(), config.pkcs11_base_slot.clone())
        };
        let Some(lib) = lib else { return Ok(()) };
        let module = Module::load(Path::new(lib.as_str()))?;
        if let Some(base) = base {
            let uri = Pkcs11Uri::parse(&base).map_err(|e| Error::invalid(e.to_string()))?;
            let token = module.token(&uri)?;
            write(&self.config).pkcs11 = Some(Pkcs11State { module, base: Some((uri, token)) });
        } else {
            write(&self.config).pkcs11 = Some(Pkcs11State { module, base: None });
        }
        Ok(())
    }

    fn module(&self) -> Result<Option<Arc<Module>>> {
        let config = read(&self.config);
        if let Some(state) = &config.pkcs11 {
            return Ok(Some(Arc::clone(&state.module)));
        }
        let Some(lib) = config.pkcs11_lib_path.clone() else {
            return Ok(None);
        };
        drop(config);
        Module::load(Path::new(lib.as_str())).map(Some)
    }

    /// The token location of `id`, if its first candidate is on a token.
    pub(super) fn p11_key(&self, id: &str) -> Result<Option<P11Key>> {
        let config = read(&self.config);
        if let Some(location) = config.preloaded.get(id) {
            let PreloadedLocation::Pkcs11(text) = location else {
                return Ok(None);
            };
            if config.pkcs11_lib_path.is_none() {
                return Err(Error::invalid("pre-loaded key requires PKCS#11 lib path to be configured"));
            }
            let uri = Pkcs11Uri::parse(text).map_err(|e| Error::invalid(e.to_string()))?;
            drop(config);
            let module = self.module()?.ok_or_else(|| Error::external_msg("PKCS#11 module not loaded"))?;
            let token = module.token(&uri)?;
            return Ok(Some(P11Key { token, uri, file_fallback: false }));
        }
        if config.pkcs11_lib_path.is_none() {
            return Ok(None);
        }
        let Some(base_text) = config.pkcs11_base_slot.clone() else {
            return Ok(None);
        };
        let file_fallback = config.homedir.is_some();
        if let Some(Pkcs11State { base: Some((uri, token)), .. }) = &config.pkcs11 {
            return Ok(Some(P11Key { token: Arc::clone(token), uri: uri.with_object(id), file_fallback }));
        }
        drop(config);
        let base = Pkcs11Uri::parse(&base_text).map_err(|e| Error::invalid(e.to_string()))?;
        let module = self.module()?.ok_or_else(|| Error::external_msg("PKCS#11 module not loaded"))?;
        let token = module.token(&base)?;
        Ok(Some(P11Key { token, uri: base.with_object(id), file_fallback }))
    }

    /// The token location of key pair `id` if it exists there. `Ok(None)`: use the file backend.
    pub(super) fn p11_pair(&self, id: &str) -> Result<Option<P11Key>> {
        let Some(key) = self.p11_key(id)? else {
            return Ok(None);
        };
        if key.token.find_pair(&key.uri)?.is_some() {
            return Ok(Some(key));
        }
        if key.file_fallback {
            return Ok(None);
        }
        Err(Error::invalid("key pair not found"))
    }

    /// As [`KeyStore::p11_pair`], for symmetric keys.
    pub(super) fn p11_secret(&self, id: &str) -> Result<Option<P11Key>> {
        let Some(key) = self.p11_key(id)? else {
            return Ok(None);
        };
        if key.token.find_secret(&key.uri)?.is_some() {
            return Ok(Some(key));
        }
        if key.file_fallback {
            return Ok(None);
        }
        Err(Error::invalid("key not found"))
    }

    /// `HMAC-SHA256(base, derivation_data)` computed by the token.
    fn p11_derive(key: &P11Key, derivation_data: &[u8]) -> Result<Zeroizing<Vec<u8>>> {
        Ok(Zeroizing::new(key.token.hmac_sha256(&key.uri, derivation_data)?))
    }

    pub(super) fn p11_create_key_pair(&self, id: &str, algorithms: &[crypto::Algorithm]) -> Result<bool> {
        // Pairs are created in the first candidate only (spec §7.2, §7.4).
        let Some(key) = self.p11_key(id)? else {
            return Ok(false);
        };
        // Token mutations are serialized like file ones: two creates of one ID must not each
        // destroy the other's fresh objects.
        let _w = lock(&self.write_lock);
        if key.token.find_pair(&key.uri)?.is_some() {
            return Ok(true);
        }
        // Keys and pairs share one namespace (spec §7.2). The token would keep a secret key of
        // the same label next to a new pair, but the ID would then name both; refused like the
        // file backend refuses to overwrite one (spec §10 quirk 3, docs/compatibility.md).
        if key.token.find_secret(&key.uri)?.is_some() || (key.file_fallback && self.file_has_symmetric(id)?) {
            return Err(Error::invalid("id holds a symmetric key; refusing to create a key pair over it"));
        }
        key.token.generate_pair(&key.uri, algorithms)?;
        Ok(true)
    }

    pub(super) fn p11_move_key_pair(&self, from: &str, to: &str) -> Result<bool> {
        let _w = lock(&self.write_lock);
        match (self.p11_key(from)?, self.p11_key(to)?) {
            (None, None) => Ok(false),
            (Some(a), Some(b)) if Arc::ptr_eq(&a.token, &b.token) => {
                // As the file backend: never replace a symmetric key of the destination ID.
                if b.file_fallback && self.file_has_symmetric(to)? {
                    return Err(Error::invalid("destination id holds a symmetric key; refusing to overwrite it"));
                }
                a.token.move_pair(&a.uri, &b.uri)?;
                Ok(true)
            }
            (Some(_), Some(_)) => Err(Error::invalid("cannot move a key pair between PKCS#11 tokens")),
            _ => Err(Error::invalid("cannot move a key pair between the filesystem and PKCS#11")),
        }
    }

    /// Deletes the token objects of `id`. `Ok(true)`: done, the file backend has nothing to do.
    pub(super) fn p11_delete(&self, id: &str, pair: bool) -> Result<bool> {
        let Some(key) = self.p11_key(id)? else {
            return Ok(false);
        };
        let _w = lock(&self.write_lock);
        if pair {
            key.token.delete_pair(&key.uri)?;
        } else {
            key.token.delete_secret(&key.uri)?;
        }
        Ok(!key.file_fallback)
    }

    /// Creates (or imports, with `bytes`) symmetric key `id` on the token, with the fallback of
    /// spec §7.6. `Ok(true)`: done; `Ok(false)`: the file backend must do it.
    pub(super) fn p11_create_key(&self, id: &str, usage: KeyUsage, bytes: Option<&[u8]>) -> Result<bool> {
        let Some(key) = self.p11_key(id)? else {
            return Ok(false);
        };
        let _w = lock(&self.write_lock);
        if bytes.is_none() && key.token.find_secret(&key.uri)?.is_some() {
            return Ok(true);
        }
        // As the file backend: a key pair of the same ID is neither taken for the symmetric key
        // nor replaced by it (spec §10 quirk 3, docs/compatibility.md).
        if key.token.find_pair(&key.uri)?.is_some() || (key.file_fallback && self.file_has_pair(id)?) {
            return Err(Error::invalid("id holds a key pair, not a symmetric key"));
        }
        let created = match bytes {
            Some(bytes) => key.token.import_secret(&key.uri, bytes, usage)?,
            None => {
                if key.file_fallback && self.file_has_symmetric(id)? {
                    return Ok(true);
                }
                key.token.generate_secret(&key.uri, usage)?
            }
        };
        if created {
            if key.token.find_secret(&key.uri)?.is_none() {
                return Err(Error::external_msg("the created key was not found on the token"));
            }
            return Ok(true);
        }
        if key.file_fallback {
            return Ok(false);
        }
        Err(Error::external_msg("no valid location for symmetric key"))
    }

    pub(super) fn p11_pair_parameter(&self, id: &str, p: KeyPairParameter) -> Result<Option<Vec<u8>>> {
        let Some(key) = self.p11_pair(id)? else {
            return Ok(None);
        };
        key.token.pair_parameter(&key.uri, p).map(Some)
    }

    pub(super) fn p11_derive_key(&self, id: &str, data: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>> {
        let Some(key) = self.p11_secret(id)? else {
            return Ok(None);
        };
        Self::p11_derive(&key, data).map(Some)
    }

    pub(super) fn p11_sign(&self, id: &str, mechanism: SignMechanism<'_>, data: &[u8]) -> Result<Option<Vec<u8>>> {
        let out = match mechanism {
            SignMechanism::Ecdsa => {
                let Some(key) = self.p11_pair(id)? else {
                    return Ok(None);
                };
                key.token.ecdsa_sign(&key.uri, data)?
            }
            SignMechanism::HmacSha256 => {
                let Some(key) = self.p11_secret(id)? else {
                    return Ok(None);
                };
                key.token.hmac_sha256(&key.uri, data)?
            }
            SignMechanism::DerivedHmacSha256 { derivation_data } => {
                let Some(key) = self.p11_secret(id)? else {
                    return Ok(None);
                };
                crypto::hmac_sha256(&Self::p11_derive(&key, derivation_data)?, data)?
            }
        };
        Ok(Some(out))
    }

    pub(super) fn p11_verify(
        &self,
        id: &str,
        mechanism: SignMechanism<'_>,
        data: &[u8],
        sig: &[u8],
    ) -> Result<Option<bool>> {
        let SignMechanism::HmacSha256 = mechanism else {
            return Ok(None);
        };
        let Some(key) = self.p11_secret(id)? else {
            return Ok(None);
        };
        Ok(Some(crypto::mac_matches(&key.token.hmac_sha256(&key.uri, data)?, sig)))
    }

    pub(super) fn p11_encrypt(&self, id: &str, mechanism: EncryptMechanism<'_>, pt: &[u8]) -> Result<Option<Vec<u8>>> {
        let out = match mechanism {
            EncryptMechanism::Aead { iv, aad } => {
                let Some(key) = self.p11_secret(id)? else {
                    return Ok(None);
                };
                key.token.aead_encrypt(&key.uri, iv, aad, pt)?
            }
            EncryptMechanism::DerivedAead { derivation_data, iv, aad } => {
                let Some(key) = self.p11_secret(id)? else {
                    return Ok(None);
                };
                crypto::aead_encrypt(&Self::p11_derive(&key, derivation_data)?, iv, aad, pt)?
            }
            EncryptMechanism::RsaPkcs1 | EncryptMechanism::RsaNoPadding => {
                let Some(key) = self.p11_pair(id)? else {
                    return Ok(None);
                };
                let mode = match mechanism {
                    EncryptMechanism::RsaPkcs1 => crypto::RsaMode::Pkcs1,
                    _ => crypto::RsaMode::NoPadding,
                };
                key.token.rsa_private_encrypt(&key.uri, mode, pt)?
            }
        };
        Ok(Some(out))
    }

    pub(super) fn p11_decrypt(
        &self,
        id: &str,
        mechanism: EncryptMechanism<'_>,
        ct: &[u8],
    ) -> Result<Option<Zeroizing<Vec<u8>>>> {
        let out = match mechanism {
            EncryptMechanism::Aead { iv, aad } => {
                let Some(key) = self.p11_secret(id)? else {
                    return Ok(None);
                };
                key.token.aead_decrypt(&key.uri, iv, aad, ct)?
            }
            EncryptMechanism::DerivedAead { derivation_data, iv, aad } => {
                let Some(key) = self.p11_secret(id)? else {
                    return Ok(None);
                };
                crypto::aead_decrypt(&Self::p11_derive(&key, derivation_data)?, iv, aad, ct)?
            }
            EncryptMechanism::RsaPkcs1 | EncryptMechanism::RsaNoPadding => return Ok(None),
        };
        Ok(Some(out))
    }

    /// Size queries of the C ABI for token keys (`Ok(None)`: the file backend's key).
    pub(super) fn p11_sign_len_bound(&self, id: &str, mechanism: SignMechanism<'_>) -> Result<Option<usize>> {
        match mechanism {
            SignMechanism::Ecdsa => {
                let Some(key) = self.p11_pair(id)? else {
                    return Ok(None);
                };
                key.token.ecdsa_len_bound(&key.uri).map(Some)
            }
            SignMechanism::HmacSha256 | SignMechanism::DerivedHmacSha256 { .. } => {
                Ok(self.p11_secret(id)?.map(|_| crypto::HMAC_SHA256_LEN))
            }
        }
    }

    pub(super) fn p11_encrypt_len_bound(
        &self,
        id: &str,
        mechanism: EncryptMechanism<'_>,
        len: usize,
    ) -> Result<Option<usize>> {
        match mechanism {
            EncryptMechanism::Aead { iv, .. } | EncryptMechanism::DerivedAead { iv, .. } => {
                if iv.is_empty() {
                    return Err(Error::invalid("AEAD IV is empty"));
                }
                match self.p11_secret(id)? {
                    Some(_) => crypto::aead_ciphertext_len(len).map(Some),
                    None => Ok(None),
                }
            }
            EncryptMechanism::RsaPkcs1 | EncryptMechanism::RsaNoPadding => {
                let Some(key) = self.p11_pair(id)? else {
                    return Ok(None);
                };
                key.token.rsa_len(&key.uri).map(Some)
            }
        }
    }

    pub(super) fn p11_decrypt_len_bound(
        &self,
        id: &str,
        mechanism: EncryptMechanism<'_>,
        ct: &[u8],
    ) -> Result<Option<usize>> {
        match mechanism {
            EncryptMechanism::Aead { .. } | EncryptMechanism::DerivedAead { .. } => match self.p11_secret(id)? {
                Some(_) => crypto::aead_plaintext_len(ct).map(Some),
                None => Ok(None),
            },
            EncryptMechanism::RsaPkcs1 | EncryptMechanism::RsaNoPadding => Ok(None),
        }
    }
}
