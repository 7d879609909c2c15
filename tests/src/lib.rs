//! Black-box test harness for the aziot services (keyd and tpmd).
//!
//! * [`keyd`]: starts the real `aziotd aziot-keyd` in a private temporary prefix — binding its
//!   own socket, or socket-activated by `systemd-socket-activate` when
//!   `AZIOT_TEST_ACTIVATION=systemd` — restarts it, kills it, exposes its log and status file;
//! * [`softhsm`]: a private SoftHSM2 token store (`AZIOT_TEST_BACKEND=softhsm`, PKCS#11 tests);
//! * [`tpmd`]: a fresh swtpm, and tpmd through the broker;
//! * [`tempdir`]: private temporary directories;
//! * [`http`]: a raw HTTP/1.1-over-UDS client written from the spec (no product code);
//! * [`api`]: one helper per keyd endpoint plus the response-envelope checks;
//! * [`crypto`]: local reference computations (HMAC, AES-GCM, ECDSA/RSA verification) and
//!   key-handle parsing.
//!
//! Scenarios that must hold for every api-version are written once as `fn name(v: &str)` and
//! instantiated for both versions with [`both_versions!`].

pub mod api;
pub mod crypto;
pub mod http;
pub mod keyd;
pub mod softhsm;
pub mod tempdir;
pub mod tpmd;

pub use api::{Api, V2020, V2021, VERSIONS};
pub use keyd::Keyd;

/// `both_versions!(a, b)` turns each `fn a(v: &'static str)` into two tests,
/// `a::v2020_09_01` and `a::v2021_05_01`.
#[macro_export]
macro_rules! both_versions {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn v2020_09_01() {
                    super::$name($crate::api::V2020)
                }
                #[test]
                fn v2021_05_01() {
                    super::$name($crate::api::V2021)
                }
            }
        )*
    };
}
