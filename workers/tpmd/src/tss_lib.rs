//! tpm2-tss, loaded at run time (`dlopen`) rather than linked.
//!
//! Why: `aziotd` is one binary for every service, and only the tpmd worker talks to a TPM.
//! Linked, `libtss2-esys`/`-mu`/`-tctildr` (and `-sys` under them) would be `DT_NEEDED` by
//! every exec of `aziotd` (broker and worker of every service), each paying to load and
//! relocate them. Here they are opened once, by the first [`tss`] call, in the process that
//! uses them.
//!
//! When: the tpmd worker's first ESYS call is `Esys_Initialize`, in
//! [`crate::init_tpm_fd`]/[`crate::init_tpm`], which the broker's worker runs before it locks
//! itself in (seccomp forbids mapping code afterwards, Landlock reading `/usr/lib`). All
//! libraries are opened with `RTLD_NOW` and every symbol is resolved in that one call, so
//! nothing is loaded or bound lazily later.
//!
//! Only the function *types* come from tss-esapi's bindings (`tss2_esys`); no code of ours
//! in `aziotd` references its `extern` declarations, so the linker (`--as-needed`) drops the
//! libraries its build script names.

use std::ffi::{c_void, CStr, CString};
use std::os::raw::c_char;
use std::sync::OnceLock;

use tss_esapi::tss2_esys as sys;

/// The sonames opened (the runtime packages' names, e.g. Debian's `libtss2-esys-3.0.2-0`).
pub const ESYS_SONAME: &str = "libtss2-esys.so.0";
pub const MU_SONAME: &str = "libtss2-mu.so.0";
pub const TCTILDR_SONAME: &str = "libtss2-tctildr.so.0";

/// tpm2-tss could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TssError {
    #[error("could not load {library} (tpm2-tss is needed for the TPM; is it installed?): {reason}")]
    Open { library: &'static str, reason: String },
    #[error("{library} has no function {symbol} (tpm2-tss too old?): {reason}")]
    Symbol { library: &'static str, symbol: &'static str, reason: String },
}

/// The last `dlerror()` text of this thread (glibc keeps it per thread).
fn dlerror_text() -> String {
    // SAFETY: dlerror takes no arguments; it returns NULL or a NUL-terminated string valid
    // until the next dl* call on this thread, copied out at once.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        "unknown error".to_owned()
    } else {
        // SAFETY: non-null, NUL-terminated (see above).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// A library opened for good: never closed (the function pointers taken from it live in a
/// `static`).
struct Library {
    name: &'static str,
    handle: *mut c_void,
}

impl Library {
    fn open(name: &'static str) -> Result<Library, TssError> {
        let c = CString::new(name).map_err(|_| TssError::Open { library: name, reason: "NUL in the name".to_owned() })?;
        // SAFETY: `c` is a valid C string. Loading runs the library's constructors (tpm2-tss
        // has none that matter here); RTLD_NOW binds every symbol now, RTLD_LOCAL keeps them
        // out of the global namespace.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(TssError::Open { library: name, reason: dlerror_text() });
        }
        Ok(Library { name, handle })
    }

    /// The address of `symbol` (a NUL-terminated name).
    fn symbol(&self, symbol: &'static str, c_name: &'static [u8]) -> Result<*mut c_void, TssError> {
        // SAFETY: `handle` came from dlopen and is never closed; `c_name` is NUL-terminated
        // (built by `concat!(.., "\0")` in `tss_functions!`).
        let p = unsafe { libc::dlsym(self.handle, c_name.as_ptr().cast::<c_char>()) };
        if p.is_null() {
            return Err(TssError::Symbol { library: self.name, symbol, reason: dlerror_text() });
        }
        Ok(p)
    }
}

/// The sonames to open; a parameter so that tests can name a missing library.
#[derive(Clone, Copy)]
struct Sonames {
    esys: &'static str,
    mu: &'static str,
    tctildr: &'static str,
}

const SONAMES: Sonames = Sonames { esys: ESYS_SONAME, mu: MU_SONAME, tctildr: TCTILDR_SONAME };

/// Declares [`Tss`] (one typed pointer per function, the C signature from tss2_esys.h,
/// tss2_mu.h, tss2_tctildr.h as bindgen spells it) and the loader filling it.
macro_rules! tss_functions {
    ($( $lib:ident { $( fn $name:ident ( $($arg:ty),* $(,)? ) $(-> $ret:ty)?; )* } )*) => {
        /// The tpm2-tss functions tpmd calls, resolved from the loaded libraries.
        #[allow(non_snake_case)]
        pub struct Tss {
            $($( pub $name: unsafe extern "C" fn($($arg),*) $(-> $ret)?, )*)*
        }

        fn load(names: Sonames) -> Result<Tss, TssError> {
            $( let $lib = Library::open(names.$lib)?; )*
            Ok(Tss {
                $($( $name: {
                    let p = $lib.symbol(stringify!($name), concat!(stringify!($name), "\0").as_bytes())?;
                    // SAFETY: `p` is the address of the C function `$name` of tpm2-tss, whose
                    // prototype is exactly this type (bindgen's declaration of it); a data
                    // pointer and a function pointer have the same size and representation.
                    unsafe { std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) $(-> $ret)?>(p) }
                }, )*)*
            })
        }
    };
}

tss_functions! {
    esys {
        fn Esys_Initialize(*mut *mut sys::ESYS_CONTEXT, *mut sys::TSS2_TCTI_CONTEXT, *mut sys::TSS2_ABI_VERSION) -> sys::TSS2_RC;
        fn Esys_Finalize(*mut *mut sys::ESYS_CONTEXT);
        fn Esys_Free(*mut c_void);
        fn Esys_TR_SetAuth(*mut sys::ESYS_CONTEXT, sys::ESYS_TR, *const sys::TPM2B_AUTH) -> sys::TSS2_RC;
        fn Esys_TR_FromTPMPublic(
            *mut sys::ESYS_CONTEXT, sys::TPM2_HANDLE, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR, *mut sys::ESYS_TR,
        ) -> sys::TSS2_RC;
        fn Esys_GetCapability(
            *mut sys::ESYS_CONTEXT, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR, sys::TPM2_CAP, sys::UINT32, sys::UINT32,
            *mut sys::TPMI_YES_NO, *mut *mut sys::TPMS_CAPABILITY_DATA,
        ) -> sys::TSS2_RC;
        fn Esys_CreatePrimary(
            *mut sys::ESYS_CONTEXT, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR,
            *const sys::TPM2B_SENSITIVE_CREATE, *const sys::TPM2B_PUBLIC, *const sys::TPM2B_DATA,
            *const sys::TPML_PCR_SELECTION, *mut sys::ESYS_TR, *mut *mut sys::TPM2B_PUBLIC,
            *mut *mut sys::TPM2B_CREATION_DATA, *mut *mut sys::TPM2B_DIGEST, *mut *mut sys::TPMT_TK_CREATION,
        ) -> sys::TSS2_RC;
        fn Esys_EvictControl(
            *mut sys::ESYS_CONTEXT, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR,
            sys::TPMI_DH_PERSISTENT, *mut sys::ESYS_TR,
        ) -> sys::TSS2_RC;
        fn Esys_FlushContext(*mut sys::ESYS_CONTEXT, sys::ESYS_TR) -> sys::TSS2_RC;
        fn Esys_ReadPublic(
            *mut sys::ESYS_CONTEXT, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR,
            *mut *mut sys::TPM2B_PUBLIC, *mut *mut sys::TPM2B_NAME, *mut *mut sys::TPM2B_NAME,
        ) -> sys::TSS2_RC;
        fn Esys_StartAuthSession(
            *mut sys::ESYS_CONTEXT, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR,
            *const sys::TPM2B_NONCE, sys::TPM2_SE, *const sys::TPMT_SYM_DEF, sys::TPMI_ALG_HASH, *mut sys::ESYS_TR,
        ) -> sys::TSS2_RC;
        fn Esys_TRSess_SetAttributes(*mut sys::ESYS_CONTEXT, sys::ESYS_TR, sys::TPMA_SESSION, sys::TPMA_SESSION) -> sys::TSS2_RC;
        fn Esys_PolicySecret(
            *mut sys::ESYS_CONTEXT, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR,
            *const sys::TPM2B_NONCE, *const sys::TPM2B_DIGEST, *const sys::TPM2B_NONCE, sys::INT32,
            *mut *mut sys::TPM2B_TIMEOUT, *mut *mut sys::TPMT_TK_AUTH,
        ) -> sys::TSS2_RC;
        fn Esys_ActivateCredential(
            *mut sys::ESYS_CONTEXT, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR,
            *const sys::TPM2B_ID_OBJECT, *const sys::TPM2B_ENCRYPTED_SECRET, *mut *mut sys::TPM2B_DIGEST,
        ) -> sys::TSS2_RC;
        fn Esys_Import(
            *mut sys::ESYS_CONTEXT, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR, *const sys::TPM2B_DATA,
            *const sys::TPM2B_PUBLIC, *const sys::TPM2B_PRIVATE, *const sys::TPM2B_ENCRYPTED_SECRET,
            *const sys::TPMT_SYM_DEF_OBJECT, *mut *mut sys::TPM2B_PRIVATE,
        ) -> sys::TSS2_RC;
        fn Esys_Load(
            *mut sys::ESYS_CONTEXT, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR,
            *const sys::TPM2B_PRIVATE, *const sys::TPM2B_PUBLIC, *mut sys::ESYS_TR,
        ) -> sys::TSS2_RC;
        fn Esys_HMAC(
            *mut sys::ESYS_CONTEXT, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR,
            *const sys::TPM2B_MAX_BUFFER, sys::TPMI_ALG_HASH, *mut *mut sys::TPM2B_DIGEST,
        ) -> sys::TSS2_RC;
        fn Esys_HMAC_Start(
            *mut sys::ESYS_CONTEXT, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR,
            *const sys::TPM2B_AUTH, sys::TPMI_ALG_HASH, *mut sys::ESYS_TR,
        ) -> sys::TSS2_RC;
        fn Esys_SequenceUpdate(
            *mut sys::ESYS_CONTEXT, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR, *const sys::TPM2B_MAX_BUFFER,
        ) -> sys::TSS2_RC;
        fn Esys_SequenceComplete(
            *mut sys::ESYS_CONTEXT, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR, sys::ESYS_TR,
            *const sys::TPM2B_MAX_BUFFER, sys::TPMI_RH_HIERARCHY, *mut *mut sys::TPM2B_DIGEST,
            *mut *mut sys::TPMT_TK_HASHCHECK,
        ) -> sys::TSS2_RC;
    }
    mu {
        fn Tss2_MU_TPMT_PUBLIC_Unmarshal(*const u8, sys::size_t, *mut sys::size_t, *mut sys::TPMT_PUBLIC) -> sys::TSS2_RC;
        fn Tss2_MU_TPM2B_PUBLIC_Marshal(*const sys::TPM2B_PUBLIC, *mut u8, sys::size_t, *mut sys::size_t) -> sys::TSS2_RC;
        fn Tss2_MU_TPM2B_PUBLIC_Unmarshal(*const u8, sys::size_t, *mut sys::size_t, *mut sys::TPM2B_PUBLIC) -> sys::TSS2_RC;
        fn Tss2_MU_TPM2B_ID_OBJECT_Unmarshal(*const u8, sys::size_t, *mut sys::size_t, *mut sys::TPM2B_ID_OBJECT) -> sys::TSS2_RC;
        fn Tss2_MU_TPM2B_ENCRYPTED_SECRET_Unmarshal(
            *const u8, sys::size_t, *mut sys::size_t, *mut sys::TPM2B_ENCRYPTED_SECRET,
        ) -> sys::TSS2_RC;
        fn Tss2_MU_TPM2B_PRIVATE_Unmarshal(*const u8, sys::size_t, *mut sys::size_t, *mut sys::TPM2B_PRIVATE) -> sys::TSS2_RC;
        fn Tss2_MU_TPM2B_DIGEST_Unmarshal(*const u8, sys::size_t, *mut sys::size_t, *mut sys::TPM2B_DIGEST) -> sys::TSS2_RC;
    }
    tctildr {
        fn Tss2_TctiLdr_Initialize(*const c_char, *mut *mut sys::TSS2_TCTI_CONTEXT) -> sys::TSS2_RC;
        fn Tss2_TctiLdr_Finalize(*mut *mut sys::TSS2_TCTI_CONTEXT);
    }
}

impl std::fmt::Debug for Tss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tss").finish_non_exhaustive()
    }
}

static TSS: OnceLock<Result<Tss, TssError>> = OnceLock::new();

/// tpm2-tss, loaded by the first call (every library opened, every function resolved);
/// later calls return the same functions, or the same error.
pub fn tss() -> Result<&'static Tss, TssError> {
    TSS.get_or_init(|| load(SONAMES)).as_ref().map_err(Clone::clone)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_every_function() {
        let tss = tss().unwrap();
        // A real call through a resolved pointer: an empty TPM2B_DIGEST.
        let mut out = zeroed_digest();
        let mut offset: sys::size_t = 0;
        // SAFETY: the input is readable for its length; `offset` and `out` are valid.
        let rc = unsafe { (tss.Tss2_MU_TPM2B_DIGEST_Unmarshal)([0u8, 0].as_ptr(), 2, &mut offset, &mut out) };
        assert_eq!((rc, offset, out.size), (0, 2, 0));
    }

    fn zeroed_digest() -> sys::TPM2B_DIGEST {
        sys::TPM2B_DIGEST { size: 7, buffer: [0; 64] }
    }

    #[test]
    fn a_missing_library_is_named_with_the_loader_reason() {
        let names = Sonames { esys: "libtss2-esys-missing.so.0", ..SONAMES };
        let e = load(names).unwrap_err();
        assert_eq!(
            e.to_string(),
            "could not load libtss2-esys-missing.so.0 (tpm2-tss is needed for the TPM; is it installed?): \
             libtss2-esys-missing.so.0: cannot open shared object file: No such file or directory"
        );
    }

    #[test]
    fn a_missing_function_is_named() {
        // libc loads but has no ESYS functions.
        let names = Sonames { esys: "libc.so.6", ..SONAMES };
        match load(names).unwrap_err() {
            TssError::Symbol { library, symbol, reason } => {
                assert_eq!((library, symbol), ("libc.so.6", "Esys_Initialize"));
                assert!(reason.contains("Esys_Initialize"), "{reason}");
            }
            e => panic!("{e}"),
        }
    }
}
