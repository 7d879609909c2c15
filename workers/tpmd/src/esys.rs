//! A thin, safe layer over the ESYS C API (tpm2-tss, loaded at run time by
//! [`crate::tss_lib`]; the C types are tss-esapi's `tss2_esys` bindings), with exactly the
//! commands tpmd uses.
//!
//! Why not tss-esapi's `Context`: it can only be created from a TCTI loader name, so it cannot
//! run on [`FdTcti`] (the broker-provided descriptor), and it lacks the HMAC sequence commands
//! (spec §8, data > 1024 bytes). Everything ESYS allocates is released by [`Out`]; every
//! `unsafe` block is an FFI call with its contract stated.

use std::ffi::CString;
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::ptr::null_mut;

use tss_esapi::tss2_esys as sys;

use crate::fd_tcti::FdTcti;
use crate::tss_lib::{tss, Tss, TssError};

/// An ESYS object handle (`ESYS_TR`).
pub type Tr = sys::ESYS_TR;
pub const TR_NONE: Tr = sys::ESYS_TR_NONE;
pub const TR_PASSWORD: Tr = sys::ESYS_TR_PASSWORD;
pub const TR_OWNER: Tr = sys::ESYS_TR_RH_OWNER;
pub const TR_ENDORSEMENT: Tr = sys::ESYS_TR_RH_ENDORSEMENT;

const ALG_AES: u16 = 0x0006;
const ALG_CFB: u16 = 0x0043;
const ALG_SHA256: u16 = 0x000B;
const SE_POLICY: u8 = 0x01;
const TPMA_SESSION_CONTINUESESSION: u8 = 0x01;
const TR_RH_NULL: Tr = sys::ESYS_TR_RH_NULL;
/// `TPM2_MAX_DIGEST_BUFFER`.
pub const MAX_BUFFER: usize = 1024;

/// A failed ESYS call: the command and its `TSS2_RC`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{step} failed with TSS2_RC 0x{rc:08x}{}", describe(*rc))]
pub struct EsysError {
    pub step: &'static str,
    pub rc: u32,
}

/// A short reading of the common TPM format-one response codes (TPM 2.0 Part 2 §6.6), e.g.
/// ` (TPM_RC_INTEGRITY, parameter 1)`; empty for other codes.
fn describe(rc: u32) -> String {
    if rc == RC_SIZE_MISMATCH {
        return " (the structure does not fill its size field)".to_owned();
    }
    if rc >> 16 == MU_RC_LAYER {
        // tpm2-tss's marshaling layer (tss2_mu.h): what an unmarshaled structure got wrong.
        return match rc & 0xffff {
            5 => " (TSS2_MU_RC_BAD_REFERENCE)".to_owned(),
            6 => " (TSS2_MU_RC_INSUFFICIENT_BUFFER: the structure ends early)".to_owned(),
            11 => " (TSS2_MU_RC_BAD_VALUE: a field holds an invalid value)".to_owned(),
            16 => " (TSS2_MU_RC_BAD_SIZE: a size field is out of range)".to_owned(),
            _ => String::new(),
        };
    }
    if rc >> 16 != 0 || rc & 0x080 == 0 {
        return match rc {
            0x101 => " (TPM_RC_FAILURE)".to_owned(),
            0x902 | 0x903 => " (TPM_RC_OBJECT_MEMORY/SESSION_MEMORY)".to_owned(),
            _ => String::new(),
        };
    }
    let name = match rc & 0x3f {
        0x02 => "TPM_RC_ATTRIBUTES",
        0x04 => "TPM_RC_VALUE",
        0x0a => "TPM_RC_TYPE",
        0x0b => "TPM_RC_HANDLE",
        0x0e => "TPM_RC_AUTH_FAIL",
        0x12 => "TPM_RC_SCHEME",
        0x15 => "TPM_RC_SIZE",
        0x1c => "TPM_RC_KEY",
        0x1d => "TPM_RC_POLICY_FAIL",
        0x1f => "TPM_RC_INTEGRITY",
        0x22 => "TPM_RC_BAD_AUTH",
        _ => return String::new(),
    };
    let n = (rc >> 8) & 0xf;
    if rc & 0x040 != 0 {
        format!(" ({name}, parameter {n})")
    } else if n & 0x8 != 0 {
        format!(" ({name}, session {})", n & 0x7)
    } else {
        format!(" ({name}, handle {n})")
    }
}

/// The layer of tpm2-tss's marshaling functions (`TSS2_MU_RC_LAYER` >> 16).
const MU_RC_LAYER: u32 = 9;
/// Not a TSS2 code: an unmarshaled structure consumed fewer bytes than its TPM2B size gave it.
const RC_SIZE_MISMATCH: u32 = u32::MAX - 1;

/// An ESYS context could not be made: tpm2-tss did not load, or the TCTI/ESYS setup failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Load(#[from] TssError),
    #[error(transparent)]
    Esys(#[from] EsysError),
}

fn check(step: &'static str, rc: sys::TSS2_RC) -> Result<(), EsysError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(EsysError { step, rc })
    }
}

/// Memory returned by ESYS, freed with `Esys_Free` (made by [`Esys::out`]).
struct Out<T> {
    ptr: *mut T,
    tss: &'static Tss,
}

impl<T> Out<T> {
    fn get(&self, step: &'static str) -> Result<&T, EsysError> {
        // SAFETY: when non-null, the pointer is a valid T allocated by ESYS and owned by us.
        unsafe { self.ptr.as_ref() }.ok_or(EsysError { step, rc: u32::MAX })
    }
}

impl<T> Drop for Out<T> {
    fn drop(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: the pointer was allocated by ESYS for us and is freed exactly once.
            unsafe { (self.tss.Esys_Free)(self.ptr.cast()) };
        }
    }
}

/// A zero-initialised C struct (all-zero is a valid empty value of every TPM2B/TPMT/TPML).
fn zeroed<T>() -> T {
    // SAFETY: only used for the plain-data C structs of the bindings, for which all-zero bytes
    // are a valid value (empty buffers, zero sizes, TPM_ALG_ERROR/NULL fields).
    unsafe { MaybeUninit::<T>::zeroed().assume_init() }
}

enum TctiOwner {
    Loader(*mut sys::TSS2_TCTI_CONTEXT),
    Fd(FdTcti),
}

/// An ESYS context and the TCTI under it.
pub struct Esys {
    /// tpm2-tss, loaded (see [`crate::tss_lib`]).
    tss: &'static Tss,
    ctx: *mut sys::ESYS_CONTEXT,
    // Dropped after `ctx` is finalized (see Drop).
    tcti: TctiOwner,
}

// SAFETY: the ESYS context and TCTI are used only through `&mut self`, from one thread at a
// time; neither keeps thread-local state.
unsafe impl Send for Esys {}

impl std::fmt::Debug for Esys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Esys").finish_non_exhaustive()
    }
}

impl Drop for Esys {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from Esys_Initialize and is finalized once; the TCTI outlives it.
        unsafe { (self.tss.Esys_Finalize)(&mut self.ctx) };
        if let TctiOwner::Loader(tcti) = &mut self.tcti {
            // SAFETY: `tcti` came from Tss2_TctiLdr_Initialize and nothing uses it any more.
            unsafe { (self.tss.Tss2_TctiLdr_Finalize)(tcti) };
        }
    }
}

/// A `TPM2B_*` from its marshaled bytes (`UINT16 size ‖ bytes`) with the given MU function.
pub(crate) fn unmarshal<T>(
    bytes: &[u8],
    step: &'static str,
    f: unsafe extern "C" fn(*const u8, sys::size_t, *mut sys::size_t, *mut T) -> sys::TSS2_RC,
) -> Result<T, EsysError> {
    let mut out = zeroed::<T>();
    let mut offset: sys::size_t = 0;
    // SAFETY: `bytes` is readable for its length; `out` and `offset` are valid out-pointers.
    check(step, unsafe { f(bytes.as_ptr(), bytes.len() as sys::size_t, &mut offset, &mut out) })?;
    if offset as usize != bytes.len() {
        return Err(EsysError { step, rc: RC_SIZE_MISMATCH });
    }
    Ok(out)
}

impl Esys {
    fn init(tss: &'static Tss, mut tcti: TctiOwner) -> Result<Esys, EsysError> {
        let ptr = match &mut tcti {
            TctiOwner::Loader(p) => *p,
            TctiOwner::Fd(f) => f.as_tcti_ptr(),
        };
        let mut ctx = null_mut();
        // SAFETY: `ptr` is a live TCTI context owned by `tcti`, which the returned Esys keeps.
        let rc = unsafe { (tss.Esys_Initialize)(&mut ctx, ptr, null_mut()) };
        if rc != 0 {
            if let TctiOwner::Loader(mut p) = tcti {
                // SAFETY: the loader TCTI is not used by anything else.
                unsafe { (tss.Tss2_TctiLdr_Finalize)(&mut p) };
            }
            return Err(EsysError { step: "Esys_Initialize", rc });
        }
        Ok(Esys { tss, ctx, tcti })
    }

    /// Opens a TCTI through tpm2-tss's loader (`device:/dev/tpmrm0`, `swtpm:port=...`, ...;
    /// empty = the loader's default list).
    pub fn open_loader(name_conf: &str) -> Result<Esys, OpenError> {
        let tss = tss()?;
        let c = CString::new(name_conf).map_err(|_| EsysError { step: "Tss2_TctiLdr_Initialize", rc: u32::MAX })?;
        let mut tcti = null_mut();
        // SAFETY: `c` is a valid C string; `tcti` a valid out-pointer.
        check("Tss2_TctiLdr_Initialize", unsafe { (tss.Tss2_TctiLdr_Initialize)(c.as_ptr(), &mut tcti) })?;
        Ok(Esys::init(tss, TctiOwner::Loader(tcti))?)
    }

    /// Uses a descriptor speaking the raw TPM stream (see [`FdTcti`]).
    pub fn open_fd(fd: OwnedFd) -> Result<Esys, OpenError> {
        let tss = tss()?;
        Ok(Esys::init(tss, TctiOwner::Fd(FdTcti::new(fd)))?)
    }

    /// The loaded tpm2-tss functions (for the MU functions [`unmarshal`] takes).
    pub(crate) fn tss(&self) -> &'static Tss {
        self.tss
    }

    /// Takes ownership of memory ESYS returned.
    fn out<T>(&self, ptr: *mut T) -> Out<T> {
        Out { ptr, tss: self.tss }
    }

    pub fn set_auth(&mut self, tr: Tr, auth: &[u8]) -> Result<(), EsysError> {
        let mut value = zeroed::<sys::TPM2B_AUTH>();
        if auth.len() > value.buffer.len() {
            return Err(EsysError { step: "Esys_TR_SetAuth", rc: u32::MAX });
        }
        value.size = auth.len() as u16;
        value.buffer[..auth.len()].copy_from_slice(auth);
        // SAFETY: valid context and input pointer.
        let rc = unsafe { (self.tss.Esys_TR_SetAuth)(self.ctx, tr, &value) };
        zeroize::Zeroize::zeroize(&mut value.buffer[..]);
        check("Esys_TR_SetAuth", rc)
    }

    /// The ESYS handle of the object (persistent, transient or session) at TPM `handle`.
    pub fn from_persistent(&mut self, handle: u32) -> Result<Tr, EsysError> {
        let mut tr = TR_NONE;
        // SAFETY: valid context and out-pointer.
        check("Esys_TR_FromTPMPublic", unsafe {
            (self.tss.Esys_TR_FromTPMPublic)(self.ctx, handle, TR_NONE, TR_NONE, TR_NONE, &mut tr)
        })?;
        Ok(tr)
    }

    /// The TPM handles listed by `TPM2_GetCapability(TPM_CAP_HANDLES, first)` (one range).
    pub fn handles(&mut self, first: u32) -> Result<Vec<u32>, EsysError> {
        let mut more: u8 = 0;
        let mut data = null_mut();
        // SAFETY: valid context and out-pointers; output freed by `Out`.
        let rc = unsafe { (self.tss.Esys_GetCapability)(self.ctx, TR_NONE, TR_NONE, TR_NONE, 1, first, 254, &mut more, &mut data) };
        let data: Out<sys::TPMS_CAPABILITY_DATA> = self.out(data);
        check("Esys_GetCapability", rc)?;
        let data = data.get("Esys_GetCapability")?;
        // SAFETY: for TPM_CAP_HANDLES the TPM answers with the `handles` member of the union.
        let list = unsafe { &data.data.handles };
        let count = (list.count as usize).min(list.handle.len());
        // Only handles of the asked type; loaded sessions (0x02) include policy sessions (0x03).
        let same_type = |h: &u32| h >> 24 == first >> 24 || (first >> 24 == 0x02 && h >> 24 == 0x03);
        Ok(list.handle[..count].iter().copied().filter(same_type).collect())
    }

    /// Flushes an object or session this context did not create (left by a crashed process).
    pub fn flush_tpm_handle(&mut self, handle: u32) -> Result<(), EsysError> {
        let tr = self.from_persistent(handle)?;
        self.flush(tr)
    }

    /// `TPM2_CreatePrimary` from a marshaled `TPMT_PUBLIC` template (empty sensitive, no
    /// outsideInfo, no PCRs), password session. Returns the transient handle.
    pub fn create_primary(&mut self, hierarchy: Tr, template: &[u8]) -> Result<Tr, EsysError> {
        let mut public = zeroed::<sys::TPM2B_PUBLIC>();
        let mut offset: sys::size_t = 0;
        // SAFETY: `template` readable for its length; valid out-pointers.
        check("Tss2_MU_TPMT_PUBLIC_Unmarshal", unsafe {
            (self.tss.Tss2_MU_TPMT_PUBLIC_Unmarshal)(template.as_ptr(), template.len() as sys::size_t, &mut offset, &mut public.publicArea)
        })?;
        let (sensitive, outside, pcrs) =
            (zeroed::<sys::TPM2B_SENSITIVE_CREATE>(), zeroed::<sys::TPM2B_DATA>(), zeroed::<sys::TPML_PCR_SELECTION>());
        let mut tr = TR_NONE;
        let (mut a, mut b, mut c, mut d) = (null_mut(), null_mut(), null_mut(), null_mut());
        // SAFETY: valid context, inputs and out-pointers; outputs are freed by `Out`.
        let rc = unsafe {
            (self.tss.Esys_CreatePrimary)(
                self.ctx, hierarchy, TR_PASSWORD, TR_NONE, TR_NONE, &sensitive, &public, &outside, &pcrs, &mut tr,
                &mut a, &mut b, &mut c, &mut d,
            )
        };
        let _owned = (self.out(a), self.out(b), self.out(c), self.out(d));
        check("Esys_CreatePrimary", rc)?;
        Ok(tr)
    }

    /// `TPM2_EvictControl(TPM_RH_OWNER)`: persists a transient at `persistent`, or evicts a
    /// persistent object (then returns `TR_NONE`).
    pub fn evict_control(&mut self, object: Tr, persistent: u32) -> Result<Tr, EsysError> {
        let mut tr = TR_NONE;
        // SAFETY: valid context and out-pointer.
        check("Esys_EvictControl", unsafe {
            (self.tss.Esys_EvictControl)(self.ctx, TR_OWNER, object, TR_PASSWORD, TR_NONE, TR_NONE, persistent, &mut tr)
        })?;
        Ok(tr)
    }

    pub fn flush(&mut self, tr: Tr) -> Result<(), EsysError> {
        // SAFETY: valid context.
        check("Esys_FlushContext", unsafe { (self.tss.Esys_FlushContext)(self.ctx, tr) })
    }

    /// `TPM2_ReadPublic`, marshaled as `TPM2B_PUBLIC`.
    pub fn read_public(&mut self, tr: Tr) -> Result<Vec<u8>, EsysError> {
        let (mut a, mut b, mut c) = (null_mut(), null_mut(), null_mut());
        // SAFETY: valid context and out-pointers; outputs freed by `Out`.
        let rc = unsafe { (self.tss.Esys_ReadPublic)(self.ctx, tr, TR_NONE, TR_NONE, TR_NONE, &mut a, &mut b, &mut c) };
        let (public, _name, _qname): (Out<sys::TPM2B_PUBLIC>, Out<sys::TPM2B_NAME>, Out<sys::TPM2B_NAME>) =
            (self.out(a), self.out(b), self.out(c));
        check("Esys_ReadPublic", rc)?;
        let mut buf = vec![0u8; std::mem::size_of::<sys::TPM2B_PUBLIC>()];
        let mut offset: sys::size_t = 0;
        // SAFETY: `public` is a valid TPM2B_PUBLIC; `buf` writable for its length.
        check("Tss2_MU_TPM2B_PUBLIC_Marshal", unsafe {
            (self.tss.Tss2_MU_TPM2B_PUBLIC_Marshal)(public.get("Esys_ReadPublic")?, buf.as_mut_ptr(), buf.len() as sys::size_t, &mut offset)
        })?;
        buf.truncate(offset as usize);
        Ok(buf)
    }

    /// A policy session (AES-128-CFB, SHA-256) with `continueSession`, after
    /// `TPM2_PolicySecret(TPM_RH_ENDORSEMENT)`. The caller flushes it.
    pub fn endorsement_policy_session(&mut self) -> Result<Tr, EsysError> {
        let mut symmetric = zeroed::<sys::TPMT_SYM_DEF>();
        symmetric.algorithm = ALG_AES;
        symmetric.keyBits.aes = 128;
        symmetric.mode.aes = ALG_CFB;
        let mut session = TR_NONE;
        // SAFETY: valid context, inputs and out-pointer.
        check("Esys_StartAuthSession", unsafe {
            (self.tss.Esys_StartAuthSession)(
                self.ctx, TR_NONE, TR_NONE, TR_NONE, TR_NONE, TR_NONE, std::ptr::null(), SE_POLICY, &symmetric, ALG_SHA256,
                &mut session,
            )
        })?;
        let result = (|| {
            // SAFETY: valid context and session.
            check("Esys_TRSess_SetAttributes", unsafe {
                (self.tss.Esys_TRSess_SetAttributes)(self.ctx, session, TPMA_SESSION_CONTINUESESSION, 0xff)
            })?;
            let (nonce, cp_hash, policy_ref) = (zeroed::<sys::TPM2B_NONCE>(), zeroed::<sys::TPM2B_DIGEST>(), zeroed::<sys::TPM2B_NONCE>());
            let (mut a, mut b) = (null_mut(), null_mut());
            // SAFETY: valid context, inputs and out-pointers; outputs freed by `Out`.
            let rc = unsafe {
                (self.tss.Esys_PolicySecret)(
                    self.ctx, TR_ENDORSEMENT, session, TR_PASSWORD, TR_NONE, TR_NONE, &nonce, &cp_hash, &policy_ref, 0,
                    &mut a, &mut b,
                )
            };
            let _owned: (Out<sys::TPM2B_TIMEOUT>, Out<sys::TPMT_TK_AUTH>) = (self.out(a), self.out(b));
            check("Esys_PolicySecret", rc)
        })();
        if let Err(e) = result {
            let _ = self.flush(session);
            return Err(e);
        }
        Ok(session)
    }

    /// `TPM2_ActivateCredential(activate = SRK (password), key = EK (policy session))`.
    pub fn activate_credential(
        &mut self,
        activate: Tr,
        key: Tr,
        policy: Tr,
        credential: &sys::TPM2B_ID_OBJECT,
        secret: &sys::TPM2B_ENCRYPTED_SECRET,
    ) -> Result<Vec<u8>, EsysError> {
        let mut a = null_mut();
        // SAFETY: valid context, inputs and out-pointer; output freed by `Out`.
        let rc = unsafe {
            (self.tss.Esys_ActivateCredential)(self.ctx, activate, key, TR_PASSWORD, policy, TR_NONE, credential, secret, &mut a)
        };
        let cert: Out<sys::TPM2B_DIGEST> = self.out(a);
        check("Esys_ActivateCredential", rc)?;
        let d = cert.get("Esys_ActivateCredential")?;
        Ok(d.buffer[..usize::from(d.size).min(d.buffer.len())].to_vec())
    }

    /// `TPM2_Import` under `parent` (password) with an inner wrapper key, AES-128-CFB.
    pub fn import(
        &mut self,
        parent: Tr,
        encryption_key: &[u8],
        public: &sys::TPM2B_PUBLIC,
        duplicate: &sys::TPM2B_PRIVATE,
        seed: &sys::TPM2B_ENCRYPTED_SECRET,
    ) -> Result<sys::TPM2B_PRIVATE, EsysError> {
        let mut key = zeroed::<sys::TPM2B_DATA>();
        if encryption_key.len() > key.buffer.len() {
            return Err(EsysError { step: "Esys_Import", rc: u32::MAX });
        }
        key.size = encryption_key.len() as u16;
        key.buffer[..encryption_key.len()].copy_from_slice(encryption_key);
        let mut symmetric = zeroed::<sys::TPMT_SYM_DEF_OBJECT>();
        symmetric.algorithm = ALG_AES;
        symmetric.keyBits.aes = 128;
        symmetric.mode.aes = ALG_CFB;
        let mut a = null_mut();
        // SAFETY: valid context, inputs and out-pointer; output freed by `Out`.
        let rc = unsafe {
            (self.tss.Esys_Import)(self.ctx, parent, TR_PASSWORD, TR_NONE, TR_NONE, &key, public, duplicate, seed, &symmetric, &mut a)
        };
        let private: Out<sys::TPM2B_PRIVATE> = self.out(a);
        zeroize::Zeroize::zeroize(&mut key.buffer[..]);
        check("Esys_Import", rc)?;
        Ok(*private.get("Esys_Import")?)
    }

    /// `TPM2_Load` under `parent` (password). Returns the transient handle.
    pub fn load(&mut self, parent: Tr, private: &sys::TPM2B_PRIVATE, public: &sys::TPM2B_PUBLIC) -> Result<Tr, EsysError> {
        let mut tr = TR_NONE;
        // SAFETY: valid context, inputs and out-pointer.
        check("Esys_Load", unsafe { (self.tss.Esys_Load)(self.ctx, parent, TR_PASSWORD, TR_NONE, TR_NONE, private, public, &mut tr) })?;
        Ok(tr)
    }

    /// HMAC-SHA256 with `key` (password session, empty auth): `TPM2_HMAC` up to 1024 bytes,
    /// else `TPM2_HMAC_Start` + `TPM2_SequenceUpdate` per 1024-byte chunk +
    /// `TPM2_SequenceComplete(last chunk, TPM_RH_NULL)` (spec §8).
    pub fn hmac_sha256(&mut self, key: Tr, data: &[u8]) -> Result<Vec<u8>, EsysError> {
        let buffer = |chunk: &[u8]| {
            let mut b = zeroed::<sys::TPM2B_MAX_BUFFER>();
            b.size = chunk.len() as u16;
            b.buffer[..chunk.len()].copy_from_slice(chunk);
            b
        };
        let digest = |out: &Out<sys::TPM2B_DIGEST>, step| -> Result<Vec<u8>, EsysError> {
            let d = out.get(step)?;
            Ok(d.buffer[..usize::from(d.size).min(d.buffer.len())].to_vec())
        };
        if data.len() <= MAX_BUFFER {
            let input = buffer(data);
            let mut a = null_mut();
            // SAFETY: valid context, input and out-pointer; output freed by `Out`.
            let rc = unsafe { (self.tss.Esys_HMAC)(self.ctx, key, TR_PASSWORD, TR_NONE, TR_NONE, &input, ALG_SHA256, &mut a) };
            let out: Out<sys::TPM2B_DIGEST> = self.out(a);
            check("Esys_HMAC", rc)?;
            return digest(&out, "Esys_HMAC");
        }
        let auth = zeroed::<sys::TPM2B_AUTH>();
        let mut sequence = TR_NONE;
        // SAFETY: valid context, input and out-pointer.
        check("Esys_HMAC_Start", unsafe {
            (self.tss.Esys_HMAC_Start)(self.ctx, key, TR_PASSWORD, TR_NONE, TR_NONE, &auth, ALG_SHA256, &mut sequence)
        })?;
        let result = (|| {
            let mut chunks: Vec<&[u8]> = data.chunks(MAX_BUFFER).collect();
            let last = chunks.pop().unwrap_or_default();
            for chunk in chunks {
                let input = buffer(chunk);
                // SAFETY: valid context, sequence and input.
                check("Esys_SequenceUpdate", unsafe {
                    (self.tss.Esys_SequenceUpdate)(self.ctx, sequence, TR_PASSWORD, TR_NONE, TR_NONE, &input)
                })?;
            }
            let input = buffer(last);
            let (mut a, mut b) = (null_mut(), null_mut());
            // SAFETY: valid context, sequence, input and out-pointers; outputs freed by `Out`.
            let rc = unsafe {
                (self.tss.Esys_SequenceComplete)(self.ctx, sequence, TR_PASSWORD, TR_NONE, TR_NONE, &input, TR_RH_NULL, &mut a, &mut b)
            };
            let (out, _ticket): (Out<sys::TPM2B_DIGEST>, Out<sys::TPMT_TK_HASHCHECK>) = (self.out(a), self.out(b));
            check("Esys_SequenceComplete", rc)?;
            digest(&out, "Esys_SequenceComplete")
        })();
        if result.is_err() {
            // A completed sequence is gone; a failed one must not occupy a slot.
            let _ = self.flush(sequence);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_common_codes() {
        assert_eq!(describe(0x1df), " (TPM_RC_INTEGRITY, parameter 1)");
        assert_eq!(describe(0x2c2), " (TPM_RC_ATTRIBUTES, parameter 2)");
        assert_eq!(describe(0x9a2), " (TPM_RC_BAD_AUTH, session 1)");
        assert_eq!(describe(0x18b), " (TPM_RC_HANDLE, handle 1)");
        assert_eq!(describe(0xa000a), "");
        let e = EsysError { step: "Esys_Import", rc: 0x3df };
        assert_eq!(e.to_string(), "Esys_Import failed with TSS2_RC 0x000003df (TPM_RC_INTEGRITY, parameter 3)");
        assert_eq!(describe(0x0009_0006), " (TSS2_MU_RC_INSUFFICIENT_BUFFER: the structure ends early)");
        assert_eq!(describe(0x0009_0010), " (TSS2_MU_RC_BAD_SIZE: a size field is out of range)");
    }

    #[test]
    fn a_structure_shorter_than_its_size_field_is_named() {
        // TPM2B_DIGEST of 2 bytes, wrapped in a TPM2B claiming 3: 1 byte left over
        let e = unmarshal(&[0, 2, 0xaa, 0xbb, 0xcc], "digest", tss().unwrap().Tss2_MU_TPM2B_DIGEST_Unmarshal).unwrap_err();
        assert_eq!(e.to_string(), "digest failed with TSS2_RC 0xfffffffe (the structure does not fill its size field)");
        let e = unmarshal(&[0, 4, 0xaa], "digest", tss().unwrap().Tss2_MU_TPM2B_DIGEST_Unmarshal).unwrap_err();
        assert!(e.to_string().contains("TSS2_MU_RC_INSUFFICIENT_BUFFER"), "{e}");
    }
}
