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
//!   `X509Req` signing, with no ENGINE at all: the key is an `EC_KEY`/`RSA` with this crate's
//!   method, which OpenSSL 3 treats as a foreign legacy key.
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
pub use key::preload;

/// The twin: a private key whose private operations are done by keyd, from a key-pair handle
/// (`POST /keypair` or `GET /keypair/{id}`). The public parts are fetched now (three or four
/// `/parameters` calls); each signature later is one request on `client`'s kept connection.
/// Failures are returned (and, during a handshake, also left on OpenSSL's error queue).
pub fn load_private_key(client: &Arc<KeydClient>, handle: &str) -> Result<PKey<Private>, Error> {
    key::load_private(client, handle)
}

/// The public key of a key-pair handle, as keyd describes it.
pub fn load_public_key(client: &KeydClient, handle: &str) -> Result<PKey<Public>, Error> {
    key::load_public(client, handle)
}
