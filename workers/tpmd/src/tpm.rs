//! The TPM core (spec tpmd.md §5–§8): startup (EK/SRK reuse or creation),
//! `get_tpm_keys`, `import_auth_key`, `sign_with_auth_key`, over [`crate::esys`].
//!
//! swtpm and `/dev/tpm0` have no resource manager and hold only ~3 transient objects and a
//! few sessions, so every transient object and session created here is flushed on every path,
//! success or error ([`Transient`] guards).

use std::os::fd::OwnedFd;

use crate::blob::AuthKeyBlob;
use crate::esys::{Esys, EsysError, OpenError, Tr, TR_ENDORSEMENT, TR_OWNER};

/// Persistent handle of the EK (TCG EK Credential Profile).
pub const EK_HANDLE: u32 = 0x8101_0001;
/// Persistent handle of the SRK (TCG Provisioning Guidance).
pub const SRK_HANDLE: u32 = 0x8100_0001;
/// Base of the persistent owner range; the auth key lives at `BASE + auth_key_index`.
pub const PERSISTENT_BASE: u32 = 0x8100_0000;
/// `TPM2_MAX_DIGEST_BUFFER`: the largest single `TPM2_HMAC` input.
pub const MAX_HMAC_BUFFER: usize = crate::esys::MAX_BUFFER;

/// Marshaled `TPMT_PUBLIC` of the EK template L-1 without the 256 zero bytes of `unique`
/// (spec §5.1).
const EK_TEMPLATE_PREFIX: &str = "0001000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa00060080004300100800000000000100";
/// Marshaled `TPMT_PUBLIC` of the SRK template without the 256 zero bytes (spec §5.2).
const SRK_TEMPLATE_PREFIX: &str = "0001000b00030472000000060080004300100800000000000100";

#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    #[error("could not open the TCTI {tcti:?}")]
    Tcti { tcti: String, #[source] source: OpenError },
    #[error("could not open the TPM descriptor")]
    Fd(#[source] OpenError),
    #[error("invalid hierarchy authorization value for {0}")]
    HierarchyAuth(&'static str, #[source] EsysError),
    #[error("could not create the {which} primary key")]
    CreatePrimary { which: &'static str, #[source] source: EsysError },
    #[error("could not persist the {which} at 0x{handle:08x}")]
    Persist { which: &'static str, handle: u32, #[source] source: EsysError },
    #[error("could not read the public area of 0x{handle:08x}")]
    ReadPublic { handle: u32, #[source] source: EsysError },
    #[error("the auth key blob is invalid: {0}")]
    InvalidBlob(String),
    #[error("the TPM rejected the auth key blob")]
    RejectedBlob(#[source] EsysError),
    #[error("TPM command failed")]
    Command(#[source] EsysError),
    #[error("no auth key has been imported yet")]
    NoAuthKey,
}

impl TpmError {
    /// Whether the error is the caller's fault (answered 400) rather than the TPM's (500).
    /// A rejected blob counts as bad input when the TPM objected to a parameter or handle
    /// (format-one codes such as `TPM_RC_INTEGRITY`, `TPM_RC_ATTRIBUTES`), or answered
    /// `TPM_RC_FAILURE` (what swtpm/libtpms answers for a seed that does not decrypt); resource
    /// shortages and TSS-layer errors stay internal errors.
    pub fn is_bad_input(&self) -> bool {
        match self {
            TpmError::InvalidBlob(_) => true,
            TpmError::RejectedBlob(e) => e.rc >> 16 == 0 && (e.rc & 0x080 != 0 || e.rc == 0x101),
            _ => false,
        }
    }
}

/// Settings the TPM core needs from the config.
#[derive(Clone, Debug, Default)]
pub struct TpmSettings {
    /// Offset of the auth key's persistent handle from `0x81000000`.
    pub auth_key_index: u32,
    pub endorsement_auth: String,
    pub owner_auth: String,
}

/// The initialized TPM: the ESYS context, the persistent EK/SRK, and the current auth key.
pub struct Tpm {
    esys: Esys,
    ek: Tr,
    srk: Tr,
    auth_key: Option<Tr>,
    auth_key_handle: u32,
}

impl std::fmt::Debug for Tpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tpm")
            .field("auth_key_handle", &format_args!("0x{:08x}", self.auth_key_handle))
            .field("auth_key_present", &self.auth_key.is_some())
            .finish()
    }
}

/// Opens a TCTI by its loader string (`device`, `device:/dev/tpmrm0`, `swtpm:port=2321`,
/// `mssim:host=...,port=...`, `tabrmd`; empty = the loader's default list).
pub fn open_tcti(tcti: &str) -> Result<Esys, TpmError> {
    Esys::open_loader(tcti).map_err(|source| TpmError::Tcti { tcti: tcti.to_owned(), source })
}

/// Uses an already-open descriptor speaking the raw TPM stream ([`crate::fd_tcti`]).
pub fn open_fd(fd: OwnedFd) -> Result<Esys, TpmError> {
    Esys::open_fd(fd).map_err(TpmError::Fd)
}

/// A transient object or session, flushed when dropped.
struct Transient<'a> {
    esys: &'a mut Esys,
    handle: Tr,
}

impl Drop for Transient<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.esys.flush(self.handle) {
            tracing::warn!("could not flush transient handle: {e}");
        }
    }
}

/// Lowercase hex of a constant (ASCII, even length).
fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("valid hex constant")).collect()
}

fn template(prefix: &str) -> Vec<u8> {
    let mut bytes = hex(prefix);
    bytes.extend_from_slice(&[0u8; 256]);
    bytes
}

/// The marshaled `TPMT_PUBLIC` of the EK template L-1 (spec §5.1, 314 bytes).
pub fn ek_template() -> Vec<u8> {
    template(EK_TEMPLATE_PREFIX)
}

/// The marshaled `TPMT_PUBLIC` of the SRK template (spec §5.2).
pub fn srk_template() -> Vec<u8> {
    template(SRK_TEMPLATE_PREFIX)
}

impl Tpm {
    /// Startup (spec §5) on an open ESYS context: hierarchy auth (without upstream's trailing
    /// NUL), EK and SRK (reused when persisted, else created with the exact templates and
    /// persisted), and the auth key if one is persisted. Call before the sandbox locks.
    pub fn initialize(mut esys: Esys, settings: &TpmSettings) -> Result<Tpm, TpmError> {
        esys.set_auth(TR_ENDORSEMENT, settings.endorsement_auth.as_bytes())
            .map_err(|e| TpmError::HierarchyAuth("endorsement", e))?;
        esys.set_auth(TR_OWNER, settings.owner_auth.as_bytes()).map_err(|e| TpmError::HierarchyAuth("owner", e))?;

        flush_stale_handles(&mut esys);
        let ek = ensure_primary(&mut esys, "endorsement key", EK_HANDLE, TR_ENDORSEMENT, &ek_template())?;
        let srk = ensure_primary(&mut esys, "storage root key", SRK_HANDLE, TR_OWNER, &srk_template())?;

        let auth_key_handle = PERSISTENT_BASE + settings.auth_key_index;
        let auth_key = match lookup_persistent(&mut esys, auth_key_handle) {
            Ok(handle) => {
                tracing::info!("Using the auth key persisted at 0x{auth_key_handle:08x}");
                Some(handle)
            }
            Err(_) => {
                tracing::info!("No auth key at 0x{auth_key_handle:08x} yet");
                None
            }
        };
        Ok(Tpm { esys, ek, srk, auth_key, auth_key_handle })
    }

    /// The persistent handle the auth key is stored at.
    pub fn auth_key_handle(&self) -> u32 {
        self.auth_key_handle
    }

    /// Whether an auth key is present.
    pub fn has_auth_key(&self) -> bool {
        self.auth_key.is_some()
    }

    /// `TPM2B_PUBLIC` (TPM wire format, with the 2-byte size) of the EK and the SRK (spec §6).
    pub fn get_tpm_keys(&mut self) -> Result<(Vec<u8>, Vec<u8>), TpmError> {
        let ek = self.esys.read_public(self.ek).map_err(|source| TpmError::ReadPublic { handle: EK_HANDLE, source })?;
        let srk = self.esys.read_public(self.srk).map_err(|source| TpmError::ReadPublic { handle: SRK_HANDLE, source })?;
        Ok((ek, srk))
    }

    /// Imports the DPS authenticationKey blob (spec §7 with its Recommendation): the blob is
    /// parsed, activated, imported and loaded into a transient first; only then is the old
    /// persisted key evicted and the new one persisted. A bad blob leaves the old key in place.
    pub fn import_auth_key(&mut self, blob: &[u8]) -> Result<(), TpmError> {
        let blob = AuthKeyBlob::parse(blob).map_err(|e| TpmError::InvalidBlob(e.to_string()))?;
        let parts = blob.to_sys(self.esys.tss()).map_err(|e| TpmError::InvalidBlob(e.to_string()))?;
        let (ek, srk) = (self.ek, self.srk);

        let session = self.esys.endorsement_policy_session().map_err(TpmError::Command)?;
        let guard = Transient { esys: &mut self.esys, handle: session };
        let inner_key = guard
            .esys
            .activate_credential(srk, ek, session, &parts.credential_blob, &parts.secret)
            .map_err(TpmError::RejectedBlob)?;
        drop(guard);

        let private = self
            .esys
            .import(srk, &inner_key, &parts.object_public, &parts.duplicate, &parts.in_sym_seed)
            .map_err(TpmError::RejectedBlob)?;
        let loaded = self.esys.load(srk, &private, &parts.object_public).map_err(TpmError::RejectedBlob)?;
        let guard = Transient { esys: &mut self.esys, handle: loaded };

        // The new key is valid: replace the old one.
        let handle = self.auth_key_handle;
        let old = self.auth_key.take().or_else(|| lookup_persistent(guard.esys, handle).ok());
        let mut still_persisted = None;
        if let Some(old) = old {
            if let Err(e) = guard.esys.evict_control(old, handle) {
                tracing::warn!("could not evict previous auth key: {e}");
                still_persisted = Some(old);
            }
        }
        let persisted = match guard.esys.evict_control(loaded, handle) {
            Ok(p) => p,
            Err(source) => {
                // The old key keeps signing if it could not be evicted.
                self.auth_key = still_persisted;
                return Err(TpmError::Persist { which: "auth key", handle, source });
            }
        };
        drop(guard);
        self.auth_key = Some(persisted);
        Ok(())
    }

    /// HMAC-SHA256 with the persisted auth key (spec §8), with a sequence above 1024 bytes.
    pub fn sign_with_auth_key(&mut self, data: &[u8]) -> Result<Vec<u8>, TpmError> {
        let key = self.auth_key.ok_or(TpmError::NoAuthKey)?;
        self.esys.hmac_sha256(key, data).map_err(TpmError::Command)
    }
}

/// The ESYS handle of the object persisted at `handle`. Asks the TPM's handle list first so
/// that the normal "not there yet" case does not make tpm2-tss log an ERROR on stderr.
fn lookup_persistent(esys: &mut Esys, handle: u32) -> Result<Tr, EsysError> {
    if let Ok(persisted) = esys.handles(PERSISTENT_BASE) {
        if !persisted.contains(&handle) {
            return Err(EsysError { step: "TPM2_GetCapability(handles-persistent)", rc: TPM_RC_HANDLE });
        }
    }
    esys.from_persistent(handle)
}

/// `TPM_RC_HANDLE` (format-one code 0x0B): reported when the handle is not persisted.
const TPM_RC_HANDLE: u32 = 0x08B;

/// Flushes transient objects and sessions left loaded by a crashed process (spec §10.6). Only
/// our own connection's handles are visible through a resource manager, and a TPM without one
/// (`/dev/tpm0`, swtpm) serves one connection at a time, so whatever is loaded now is stale.
fn flush_stale_handles(esys: &mut Esys) {
    for (first, what) in [(0x8000_0000u32, "transient object"), (0x0200_0000, "loaded session")] {
        match esys.handles(first) {
            Ok(handles) => {
                for handle in handles {
                    match esys.flush_tpm_handle(handle) {
                        Ok(()) => tracing::info!("Flushed stale {what} 0x{handle:08x}"),
                        Err(e) => tracing::warn!("could not flush stale {what} 0x{handle:08x}: {e}"),
                    }
                }
            }
            Err(e) => tracing::warn!("could not list {what}s: {e}"),
        }
    }
}

/// Reuses the key persisted at `handle`, or creates it from `template` and persists it.
fn ensure_primary(esys: &mut Esys, which: &'static str, handle: u32, hierarchy: Tr, template: &[u8]) -> Result<Tr, TpmError> {
    match lookup_persistent(esys, handle) {
        Ok(h) => return Ok(h),
        Err(e) => tracing::info!("could not read {which} from 0x{handle:08x} ({e}); creating it"),
    }
    let transient = esys.create_primary(hierarchy, template).map_err(|source| TpmError::CreatePrimary { which, source })?;
    let guard = Transient { esys, handle: transient };
    let persisted = guard.esys.evict_control(transient, handle).map_err(|source| TpmError::Persist { which, handle, source })?;
    drop(guard);
    tracing::info!("Created the {which} and persisted it at 0x{handle:08x}");
    Ok(persisted)
}
