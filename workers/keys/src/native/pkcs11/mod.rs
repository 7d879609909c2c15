//! The PKCS#11 backend of the native store (spec/keyd.md §7.1, §7.7), on the `cryptoki` crate.
//!
//! Modules: each module path is loaded and `C_Initialize`d once per process (with
//! `CKF_OS_LOCKING_OK`, so the module does its own locking with OS primitives) and cached; a
//! second store using the same path shares it. `CKR_CRYPTOKI_ALREADY_INITIALIZED` is tolerated.
//!
//! Sessions: PKCS#11 allows many sessions per application and slot, and a module initialized
//! with `CKF_OS_LOCKING_OK` must accept calls from several threads at once; what the application
//! must not do is use one *session* from two threads at the same time (a session's operation
//! state, e.g. a pending `C_FindObjects` or `C_SignInit`, belongs to one caller). SoftHSM2 needs
//! exactly this: OS locking at `C_Initialize` (it does its own internal locking) and one session
//! per concurrent operation; `tests/pkcs11` signs from 8 threads against one token. So instead
//! of one global lock around all token work, each [`Token`] keeps a small
//! pool of idle read/write sessions; a request takes one out (or opens a new one), uses it alone,
//! and puts it back (at most [`MAX_IDLE_SESSIONS`] stay open). Login state is per application and
//! token, shared by all its sessions, so one `C_Login` serves the pool (see `Token::ensure_login`).
//!
//! Token loss: when a call fails with a code that means the session or token is gone
//! (`CKR_SESSION_HANDLE_INVALID`, `CKR_SESSION_CLOSED`, `CKR_DEVICE_REMOVED`,
//! `CKR_TOKEN_NOT_PRESENT`, `CKR_TOKEN_NOT_RECOGNIZED`, `CKR_DEVICE_ERROR`, `CKR_SLOT_ID_INVALID`),
//! the pool is dropped, the slot is looked up again (a token selected by label may come back in
//! another slot) and the operation is retried once on a fresh session. A session found in a
//! public state is logged in before use, and `CKR_USER_NOT_LOGGED_IN` triggers one more retry.
//!
//! Secrets: PINs are held in `Zeroizing` buffers and handed to the module as `AuthPin` (a
//! `secrecy` string that zeroizes itself); no error, `Debug` or log text contains a PIN.

mod ops;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use zeroize::Zeroizing;

use super::lock;
use crate::pkcs11_uri::Pkcs11Uri;
use crate::{Error, Result};

/// Idle sessions kept open per token.
pub(crate) const MAX_IDLE_SESSIONS: usize = 4;

/// A loaded and initialized module.
pub(crate) struct Module {
    ctx: Pkcs11,
    /// Tokens by slot selector (URI `token`/`serial`/`slot-id`).
    tokens: Mutex<HashMap<SlotSelector, Arc<Token>>>,
}

fn modules() -> &'static Mutex<HashMap<PathBuf, Arc<Module>>> {
    static MODULES: OnceLock<Mutex<HashMap<PathBuf, Arc<Module>>>> = OnceLock::new();
    MODULES.get_or_init(Default::default)
}

/// Classifies a `cryptoki` error into the crate's error, with `what` as the context. `cryptoki`
/// errors carry return codes and function names only, never attribute values or PINs.
pub(crate) fn ck_err(what: &'static str, e: CkError) -> Error {
    Error::external(what, e)
}

pub(crate) fn rv(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// The session or the token went away: reopen and retry once.
fn is_session_lost(e: &CkError) -> bool {
    matches!(
        rv(e),
        Some(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::DeviceError
                | RvError::SlotIdInvalid
        )
    )
}

impl Module {
    /// Loads and initializes `path` once per process.
    pub(crate) fn load(path: &Path) -> Result<Arc<Module>> {
        let mut modules = lock(modules());
        if let Some(m) = modules.get(path) {
            return Ok(Arc::clone(m));
        }
        let ctx = Pkcs11::new(path).map_err(|e| ck_err("loading the PKCS#11 module failed", e))?;
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) => {}
            Err(e) if rv(&e) == Some(RvError::CryptokiAlreadyInitialized) => {}
            Err(e) => return Err(ck_err("C_Initialize of the PKCS#11 module failed", e)),
        }
        let module = Arc::new(Module { ctx, tokens: Mutex::default() });
        modules.insert(path.to_owned(), Arc::clone(&module));
        Ok(module)
    }

    /// The token the URI selects, with a session opened (eagerly, spec §7.1).
    pub(crate) fn token(self: &Arc<Self>, uri: &Pkcs11Uri) -> Result<Arc<Token>> {
        let selector = SlotSelector::of(uri);
        let mut tokens = lock(&self.tokens);
        if let Some(t) = tokens.get(&selector) {
            return Ok(Arc::clone(t));
        }
        let token = Arc::new(Token {
            module: Arc::clone(self),
            slot: Mutex::new(None),
            selector: selector.clone(),
            idle: Mutex::new(Vec::new()),
        });
        let session = token.open_session()?;
        token.put_back(session);
        tokens.insert(selector, Arc::clone(&token));
        Ok(token)
    }

    /// Finds the slot of `selector`: `slot-id` wins (spec §7.7); otherwise the initialized token
    /// whose label (trailing blanks trimmed) and/or serial match exactly.
    fn find_slot(&self, selector: &SlotSelector) -> Result<Slot> {
        let slots = self.ctx.get_slots_with_token().map_err(|e| ck_err("listing the PKCS#11 slots failed", e))?;
        if let Some(id) = selector.slot_id {
            return slots
                .into_iter()
                .find(|s| s.id() == id)
                .ok_or_else(|| Error::external_msg("the PKCS#11 slot-id names no slot with a token"));
        }
        for slot in slots {
            let Ok(info) = self.ctx.get_token_info(slot) else {
                continue;
            };
            if !info.token_initialized() {
                continue;
            }
            let label_ok = selector.token.as_deref().is_none_or(|l| info.label().trim_end() == l);
            let serial_ok = selector.serial.as_deref().is_none_or(|s| info.serial_number().trim_end() == s);
            if label_ok && serial_ok {
                return Ok(slot);
            }
        }
        Err(Error::external_msg("no initialized PKCS#11 token matches the URI's token/serial"))
    }
}

/// What selects a slot.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct SlotSelector {
    slot_id: Option<u64>,
    token: Option<String>,
    serial: Option<String>,
}

impl SlotSelector {
    fn of(uri: &Pkcs11Uri) -> Self {
        if uri.slot_id.is_some() {
            return SlotSelector { slot_id: uri.slot_id, token: None, serial: None };
        }
        SlotSelector { slot_id: None, token: uri.token.clone(), serial: uri.serial.clone() }
    }
}

/// One token (slot) of a module, with its pool of idle sessions.
pub(crate) struct Token {
    module: Arc<Module>,
    selector: SlotSelector,
    /// The slot found last; looked up again after the token was lost.
    slot: Mutex<Option<Slot>>,
    idle: Mutex<Vec<Session>>,
}

impl Token {
    fn open_session(&self) -> Result<Session> {
        let cached = *lock(&self.slot);
        let slot = match cached {
            Some(slot) => slot,
            None => {
                let slot = self.module.find_slot(&self.selector)?;
                *lock(&self.slot) = Some(slot);
                slot
            }
        };
        self.module.ctx.open_rw_session(slot).map_err(|e| {
            *lock(&self.slot) = None;
            ck_err("opening a PKCS#11 session failed", e)
        })
    }

    fn take(&self) -> Result<Session> {
        if let Some(s) = lock(&self.idle).pop() {
            return Ok(s);
        }
        self.open_session()
    }

    fn put_back(&self, session: Session) {
        let mut idle = lock(&self.idle);
        if idle.len() < MAX_IDLE_SESSIONS {
            idle.push(session);
        }
    }

    /// Forgets every session and the slot (the token went away).
    fn reset(&self) {
        lock(&self.idle).clear();
        *lock(&self.slot) = None;
    }

    /// Logs in if `pin` is given and the session is not in a user state. Login state is per
    /// application and token, and can be lost behind our back (all sessions closed, token
    /// re-inserted, another thread of the application logging out); a token hides private
    /// objects from a public session instead of failing, so the state is checked before every
    /// operation (`C_GetSessionInfo`, which also reveals a dead session).
    fn ensure_login(&self, session: &Session, pin: Option<&Zeroizing<String>>) -> Result<(), OpError> {
        if pin.is_none() {
            return Ok(());
        }
        let info = session.get_session_info().map_err(ck("C_GetSessionInfo failed"))?;
        if matches!(info.session_state(), SessionState::RwUser | SessionState::RoUser) {
            return Ok(());
        }
        Self::login(session, pin)
    }

    fn login(session: &Session, pin: Option<&Zeroizing<String>>) -> Result<(), OpError> {
        let Some(pin) = pin else { return Ok(()) };
        let auth = AuthPin::from(pin.as_str());
        match session.login(UserType::User, Some(&auth)) {
            Ok(()) => Ok(()),
            Err(e) if rv(&e) == Some(RvError::UserAlreadyLoggedIn) => Ok(()),
            Err(e) if rv(&e) == Some(RvError::PinIncorrect) => {
                Err(OpError::Other(Error::external_msg("PKCS#11 login failed: the PIN is incorrect")))
            }
            Err(e) => Err(OpError::Ck("PKCS#11 login failed", e)),
        }
    }

    /// Runs `f` on a session of this token, logged in with `uri`'s PIN if it has one. Retries once
    /// on a fresh session if the token went away, and once after logging in again if the token
    /// says the user is not logged in.
    pub(crate) fn with_session<T>(
        &self,
        uri: &Pkcs11Uri,
        f: impl Fn(&Session) -> std::result::Result<T, OpError>,
    ) -> Result<T> {
        let pin = uri.pin().map_err(|e| Error::invalid(e.to_string()))?;
        let mut retried_lost = false;
        let mut retried_login = false;
        loop {
            let session = self.take()?;
            let result = self.ensure_login(&session, pin.as_ref()).and_then(|()| f(&session));
            match result {
                Ok(v) => {
                    self.put_back(session);
                    return Ok(v);
                }
                Err(OpError::Ck(_, e)) if is_session_lost(&e) && !retried_lost => {
                    drop(session);
                    self.reset();
                    retried_lost = true;
                }
                Err(OpError::Ck(_, e))
                    if rv(&e) == Some(RvError::UserNotLoggedIn) && pin.is_some() && !retried_login =>
                {
                    self.put_back(session);
                    retried_login = true;
                }
                Err(OpError::Ck(what, e)) => {
                    if !is_session_lost(&e) {
                        self.put_back(session);
                    }
                    return Err(ck_err(what, e));
                }
                Err(OpError::Other(e)) => {
                    self.put_back(session);
                    return Err(e);
                }
            }
        }
    }
}

/// The error of one attempt inside [`Token::with_session`]: a token error (which may trigger a
/// retry) or a final one.
#[derive(Debug)]
pub(crate) enum OpError {
    Ck(&'static str, CkError),
    Other(Error),
}

impl From<Error> for OpError {
    fn from(e: Error) -> Self {
        OpError::Other(e)
    }
}

/// `map_err` helper: `session.sign(..).map_err(ck("C_Sign failed"))?`.
pub(crate) fn ck(what: &'static str) -> impl FnOnce(CkError) -> OpError {
    move |e| OpError::Ck(what, e)
}

/// The files a module needs after `C_Initialize` (for the sandbox; see docs/pkcs11.md), as
/// `(path, writable)`. Known modules: SoftHSM2 (its configuration file, read-only, and its
/// `directories.tokendir`, read-write). For other modules the list is empty and the
/// administrator grants paths with a policy drop-in.
pub fn sandbox_paths(lib_path: &Path) -> Vec<(PathBuf, bool)> {
    let name = lib_path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if !name.contains("softhsm") {
        return Vec::new();
    }
    let conf = std::env::var_os("SOFTHSM2_CONF")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/softhsm/softhsm2.conf"));
    let mut out = vec![(conf.clone(), false)];
    if let Some(dir) = std::fs::read_to_string(&conf).ok().and_then(|text| softhsm_token_dir(&text)) {
        out.push((dir, true));
    }
    out
}

/// `directories.tokendir = <path>` of a SoftHSM2 configuration (`#` starts a comment).
pub(crate) fn softhsm_token_dir(conf: &str) -> Option<PathBuf> {
    conf.lines().find_map(|line| {
        let line = line.split('#').next()?.trim();
        let (key, value) = line.split_once('=')?;
        (key.trim() == "directories.tokendir" && !value.trim().is_empty()).then(|| PathBuf::from(value.trim()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softhsm_token_dir_parsing() {
        let conf = "# comment\nlog.level = INFO\n directories.tokendir = /var/lib/softhsm/tokens/ # trailing\n";
        assert_eq!(softhsm_token_dir(conf), Some(PathBuf::from("/var/lib/softhsm/tokens/")));
        assert_eq!(softhsm_token_dir("#directories.tokendir = /x\n"), None);
        assert_eq!(softhsm_token_dir("directories.tokendir =\n"), None);
    }

    #[test]
    fn lost_session_codes() {
        for code in [RvError::SessionHandleInvalid, RvError::DeviceRemoved, RvError::TokenNotPresent] {
            assert!(is_session_lost(&CkError::Pkcs11(code, cryptoki::context::Function::Sign)));
        }
        for code in [RvError::PinIncorrect, RvError::MechanismInvalid, RvError::UserNotLoggedIn] {
            assert!(!is_session_lost(&CkError::Pkcs11(code, cryptoki::context::Function::Sign)));
        }
    }
}
