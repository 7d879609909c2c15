//! Private keys that stay in keyd, for OpenSSL (spec keyd.md §9; docs/engine.md).
//!
//! Two faces of the same code:
//!
//! * the **dynamic engine** `aziot_keys.so` (this crate's cdylib, installed as
//!   `<openssl version -e>/aziot_keys.so`): `bind_engine`/`v_check`, engine id
//!   `aziot-key-openssl-engine`, key id = the keyd key handle string. Any OpenSSL program loads it
//!   with `-engine aziot_keys -keyform engine -key '<handle>'` or `ENGINE_by_id("aziot_keys")`.
//! * the **in-process twin** (this crate's rlib), for the workers: [`load_private_key`] turns a
//!   key handle into a `PKey<Private>` usable by `SslConnector` (client certificate) and
//!   `X509Req` signing, with no ENGINE at all: the key belongs to the provider below, built
//!   into the process ([`provider::in_process`]: no `dlopen`).
//!
//! Either way a signature is one `POST /sign` (EC, `EC_KEY_METHOD` `sign_sig`) or
//! `POST /encrypt` (RSA, `RSA_METHOD` `priv_enc`, PKCS#1 v1.5 or no padding — PSS is padded by
//! OpenSSL above) on a kept keyd connection; the public parts are read once, when the key is
//! loaded. Errors go on OpenSSL's error queue under `aziot_key_openssl_engine` ([`error`]).
//!
//! * the **provider** `aziot_keys` (the same cdylib, also installed as
//!   `<openssl version -m>/aziot_keys.so`; [`provider`]): `OSSL_provider_init`, a store loader
//!   for `aziot-keys:handle=<handle>` URIs, key management, signatures and RSA decryption.
//!
//! In a confined worker: call [`preload`] (and build the [`KeydClient`]) before locking in;
//! see docs/engine.md "Inside a sandbox".

pub mod client;
pub mod engine;
pub mod error;
mod ffi;
mod ffi_provider;
mod key;
pub mod provider;

use std::sync::Arc;

use openssl::pkey::{PKey, Private, Public};

pub use client::KeydClient;
pub use error::Error;

/// Creates everything process-wide that keys need, before a confined worker locks itself in:
/// OpenSSL's initialisation, the error strings, the engine's key methods and ex-data slots, and
/// the built-in provider `aziot_keys` with `default` in the default library context (default
/// property query `?provider=default`; docs/engine.md "The twin"). Idempotent. Afterwards,
/// loading and using keys only allocates memory and talks to keyd's socket.
pub fn preload() -> Result<(), Error> {
    key::preload()?;
    provider::in_process::load()
}

/// The twin: a private key whose private operations are done by keyd, from a key-pair handle
/// (`POST /keypair` or `GET /keypair/{id}`): a key of the built-in provider `aziot_keys`
/// (loaded here if [`preload`] has not been called), read through `OSSL_STORE` from its
/// `aziot-keys:` URI. The public parts are fetched now (three or four `/parameters` calls); each
/// signature later is one request on `client`'s kept connection. Failures are returned (and,
/// during a handshake, also left on OpenSSL's error queue).
pub fn load_private_key(client: &Arc<KeydClient>, handle: &str) -> Result<PKey<Private>, Error> {
    provider::in_process::load_key(client, handle)
}

/// The same key in the form the dynamic ENGINE returns (`ENGINE_load_private_key`): an
/// `EC_KEY`/`RSA` with the engine's methods, which OpenSSL 3 runs as a foreign legacy key. For
/// comparisons (`engine-bench`); the product uses [`load_private_key`].
pub fn load_engine_key(client: &Arc<KeydClient>, handle: &str) -> Result<PKey<Private>, Error> {
    key::load_private(client, handle)
}

/// The name of the provider that holds `key` (`Some("aziot_keys")` for [`load_private_key`]'s
/// keys; `None` for a legacy key such as [`load_engine_key`]'s).
pub fn provider_of<T>(key: &openssl::pkey::PKeyRef<T>) -> Option<String> {
    use foreign_types::ForeignTypeRef;
    // SAFETY: a valid key; the provider and its name live as long as the provider is loaded
    // (for the life of the process here); the name is copied at once.
    unsafe {
        let prov = ffi_provider::EVP_PKEY_get0_provider(key.as_ptr());
        if prov.is_null() {
            return None;
        }
        let name = ffi_provider::OSSL_PROVIDER_get0_name(prov);
        (!name.is_null()).then(|| {
            std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned()
        })
    }
}

/// The public key of a key-pair handle, as keyd describes it.
pub fn load_public_key(client: &KeydClient, handle: &str) -> Result<PKey<Public>, Error> {
    key::load_public(client, handle)
}
