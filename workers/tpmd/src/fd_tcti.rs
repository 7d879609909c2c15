//! An in-process TCTI over an already-open descriptor (DESIGN §3 option (a)).
//!
//! Decision: a Rust TCTI inside the process rather than a loadable
//! `libtss2-tcti-aziotfd.so`: nothing is loaded or opened by path, the descriptor comes from
//! the broker (`/dev/tpmrm0` opened by the broker, or a connected socket), and no `.so` has to
//! be installed where tpm2-tss's loader looks. The context is a `TSS2_TCTI_CONTEXT_COMMON_V2`
//! laid out first in a `#[repr(C)]` struct, so `Esys_Initialize(&esys, tcti, NULL)` accepts it
//! like any loader-made TCTI.
//!
//! The stream is the raw TPM command/response stream: a command is written whole; a response
//! is read as the 10-byte header (tag, `UINT32 responseSize`, rc), then the rest. This is what
//! `/dev/tpm0`/`/dev/tpmrm0` speak, and what swtpm's command port speaks too (the `swtpm:`
//! TCTI sends raw commands there; swtpm recognises the MS-simulator framing only when a
//! stream starts with `TPM_SEND_COMMAND`), so the tests drive this exact code through a TCP
//! socket connected to swtpm.
//!
//! Used by [`crate::init_tpm_fd`] through [`crate::esys::Esys::open_fd`]; tested in
//! tests/fd_tcti.rs (raw ESYS calls, and the whole tpmd core) against swtpm.

use std::os::fd::{AsRawFd, OwnedFd};

use tss_esapi::tss2_esys::{
    TPM2_HANDLE, TSS2_RC, TSS2_TCTI_CONTEXT, TSS2_TCTI_CONTEXT_COMMON_V1, TSS2_TCTI_CONTEXT_COMMON_V2,
    TSS2_TCTI_POLL_HANDLE,
};

/// `size_t` as the bindings spell it.
type SizeT = tss_esapi::tss2_esys::size_t;

const TCTI_RC_LAYER: TSS2_RC = 10 << 16;
const RC_SUCCESS: TSS2_RC = 0;
const RC_NOT_IMPLEMENTED: TSS2_RC = TCTI_RC_LAYER | 2;
const RC_BAD_CONTEXT: TSS2_RC = TCTI_RC_LAYER | 3;
const RC_BAD_REFERENCE: TSS2_RC = TCTI_RC_LAYER | 5;
const RC_INSUFFICIENT_BUFFER: TSS2_RC = TCTI_RC_LAYER | 6;
const RC_BAD_SEQUENCE: TSS2_RC = TCTI_RC_LAYER | 7;
const RC_TRY_AGAIN: TSS2_RC = TCTI_RC_LAYER | 9;
const RC_IO_ERROR: TSS2_RC = TCTI_RC_LAYER | 10;
const RC_MALFORMED_RESPONSE: TSS2_RC = TCTI_RC_LAYER | 17;

/// Private magic identifying our contexts ("aziotfd\0").
const MAGIC: u64 = 0x617a_696f_7466_6400;
/// `TPM2_MAX_COMMAND_SIZE` of tpm2-tss: what `receive` reports when asked for a size only.
const MAX_RESPONSE: usize = 4096;
const HEADER: usize = 10;

#[repr(C)]
struct Inner {
    /// Must be first: ESYS sees a pointer to this.
    common: TSS2_TCTI_CONTEXT_COMMON_V2,
    fd: i32,
    /// A command was sent and its response is not fully received yet.
    awaiting: bool,
    /// Bytes of the current response received so far (kept across `TRY_AGAIN`).
    partial: Vec<u8>,
}

/// A TCTI context reading and writing the TPM stream on `fd`. Keep it alive (and at the same
/// address: it is boxed) as long as the ESYS context using it.
pub struct FdTcti {
    inner: Box<Inner>,
    _fd: OwnedFd,
}

impl std::fmt::Debug for FdTcti {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdTcti").field("fd", &self.inner.fd).finish()
    }
}

impl FdTcti {
    /// Takes ownership of a descriptor speaking the raw TPM command/response stream (a TPM
    /// character device, or a stream socket to a TPM that speaks it).
    pub fn new(fd: OwnedFd) -> FdTcti {
        let common = TSS2_TCTI_CONTEXT_COMMON_V2 {
            v1: TSS2_TCTI_CONTEXT_COMMON_V1 {
                magic: MAGIC,
                version: 2,
                transmit: Some(transmit),
                receive: Some(receive),
                finalize: Some(finalize),
                cancel: Some(cancel),
                getPollHandles: Some(get_poll_handles),
                setLocality: Some(set_locality),
            },
            makeSticky: Some(make_sticky),
        };
        let inner = Box::new(Inner { common, fd: fd.as_raw_fd(), awaiting: false, partial: Vec::new() });
        FdTcti { inner, _fd: fd }
    }

    /// The pointer to pass to `Esys_Initialize`/`Tss2_Sys_Initialize`.
    pub fn as_tcti_ptr(&mut self) -> *mut TSS2_TCTI_CONTEXT {
        (&mut *self.inner as *mut Inner).cast()
    }
}

/// Recovers our context from the pointer ESYS passes back.
///
/// # Safety
/// `ctx` must be null or point to a TCTI context (at least its common header); when it is
/// ours (magic), the `FdTcti` must be alive and not otherwise borrowed during the call.
unsafe fn context<'a>(ctx: *mut TSS2_TCTI_CONTEXT) -> Option<&'a mut Inner> {
    let inner = ctx.cast::<Inner>();
    if inner.is_null() {
        return None;
    }
    // SAFETY: every TCTI context starts with the common header, so reading the magic through
    // the raw pointer (no reference to a possibly foreign `Inner`) is valid.
    let magic = unsafe { std::ptr::addr_of!((*inner).common.v1.magic).read() };
    if magic != MAGIC {
        return None;
    }
    // SAFETY: the magic says this is our context, live per this function's contract.
    unsafe { inner.as_mut() }
}

fn write_all(fd: i32, mut data: &[u8]) -> Result<(), TSS2_RC> {
    while !data.is_empty() {
        // SAFETY: `data` is a valid readable slice for its length; `fd` is our open descriptor.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(RC_IO_ERROR);
        }
        data = &data[n as usize..];
    }
    Ok(())
}

/// Waits until `fd` is readable: `timeout` in ms, -1 = forever. `Ok(false)` on timeout.
fn wait_readable(fd: i32, timeout: i32) -> Result<bool, TSS2_RC> {
    loop {
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: `pfd` is a valid pollfd array of length 1.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(RC_IO_ERROR);
        }
        return Ok(n > 0);
    }
}

/// Reads into `partial` until it holds `want` bytes; `TRY_AGAIN` if the timeout expires first.
fn read_to(inner: &mut Inner, want: usize, timeout: i32) -> Result<(), TSS2_RC> {
    let mut buf = [0u8; 4096];
    while inner.partial.len() < want {
        if !wait_readable(inner.fd, timeout)? {
            return Err(RC_TRY_AGAIN);
        }
        let room = (want - inner.partial.len()).min(buf.len());
        // SAFETY: `buf` is writable for `room` <= its length bytes.
        let n = unsafe { libc::read(inner.fd, buf.as_mut_ptr().cast(), room) };
        if n < 0 {
            let e = std::io::Error::last_os_error().kind();
            if e == std::io::ErrorKind::Interrupted || e == std::io::ErrorKind::WouldBlock {
                continue;
            }
            return Err(RC_IO_ERROR);
        }
        if n == 0 {
            return Err(RC_IO_ERROR); // the other end closed the stream
        }
        inner.partial.extend_from_slice(&buf[..n as usize]);
    }
    Ok(())
}

unsafe extern "C" fn transmit(ctx: *mut TSS2_TCTI_CONTEXT, size: SizeT, command: *const u8) -> TSS2_RC {
    // SAFETY: ESYS passes back the pointer we gave it.
    let Some(inner) = (unsafe { context(ctx) }) else { return RC_BAD_CONTEXT };
    if command.is_null() {
        return RC_BAD_REFERENCE;
    }
    if inner.awaiting {
        return RC_BAD_SEQUENCE;
    }
    // SAFETY: the caller guarantees `command` points to `size` readable bytes.
    let command = unsafe { std::slice::from_raw_parts(command, size as usize) };
    match write_all(inner.fd, command) {
        Ok(()) => {
            inner.awaiting = true;
            inner.partial.clear();
            RC_SUCCESS
        }
        Err(rc) => rc,
    }
}

unsafe extern "C" fn receive(ctx: *mut TSS2_TCTI_CONTEXT, size: *mut SizeT, response: *mut u8, timeout: i32) -> TSS2_RC {
    // SAFETY: ESYS passes back the pointer we gave it.
    let Some(inner) = (unsafe { context(ctx) }) else { return RC_BAD_CONTEXT };
    if size.is_null() {
        return RC_BAD_REFERENCE;
    }
    if !inner.awaiting {
        return RC_BAD_SEQUENCE;
    }
    if response.is_null() {
        // Size query: the response length is not known before reading it.
        // SAFETY: `size` is non-null and points to a writable size_t per the TCTI contract.
        unsafe { *size = MAX_RESPONSE as SizeT };
        return RC_SUCCESS;
    }
    if let Err(rc) = read_to(inner, HEADER, timeout) {
        return rc;
    }
    let total = u32::from_be_bytes([inner.partial[2], inner.partial[3], inner.partial[4], inner.partial[5]]) as usize;
    if total < HEADER || total > MAX_RESPONSE.max(64 * 1024) {
        inner.awaiting = false;
        return RC_MALFORMED_RESPONSE;
    }
    // SAFETY: `size` is non-null and points to the caller's buffer size.
    let capacity = unsafe { *size } as usize;
    if capacity < total {
        // SAFETY: as above.
        unsafe { *size = total as SizeT };
        return RC_INSUFFICIENT_BUFFER;
    }
    if let Err(rc) = read_to(inner, total, timeout) {
        return rc;
    }
    // SAFETY: `response` has room for `capacity` >= `total` bytes; the regions do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(inner.partial.as_ptr(), response, total);
        *size = total as SizeT;
    }
    inner.partial.clear();
    inner.awaiting = false;
    RC_SUCCESS
}

unsafe extern "C" fn finalize(ctx: *mut TSS2_TCTI_CONTEXT) {
    // The descriptor belongs to `FdTcti` and is closed when it drops.
    // SAFETY: ESYS passes back the pointer we gave it.
    if let Some(inner) = unsafe { context(ctx) } {
        inner.awaiting = false;
        inner.partial.clear();
    }
}

unsafe extern "C" fn cancel(_ctx: *mut TSS2_TCTI_CONTEXT) -> TSS2_RC {
    RC_NOT_IMPLEMENTED
}

unsafe extern "C" fn get_poll_handles(
    ctx: *mut TSS2_TCTI_CONTEXT,
    handles: *mut TSS2_TCTI_POLL_HANDLE,
    num_handles: *mut SizeT,
) -> TSS2_RC {
    // SAFETY: ESYS passes back the pointer we gave it.
    let Some(inner) = (unsafe { context(ctx) }) else { return RC_BAD_CONTEXT };
    if num_handles.is_null() {
        return RC_BAD_REFERENCE;
    }
    // SAFETY: `num_handles` is non-null; `handles`, when non-null, has `*num_handles` slots.
    unsafe {
        if !handles.is_null() {
            if *num_handles < 1 {
                *num_handles = 1;
                return RC_INSUFFICIENT_BUFFER;
            }
            (*handles).fd = inner.fd;
            (*handles).events = libc::POLLIN;
            (*handles).revents = 0;
        }
        *num_handles = 1;
    }
    RC_SUCCESS
}

unsafe extern "C" fn set_locality(_ctx: *mut TSS2_TCTI_CONTEXT, _locality: u8) -> TSS2_RC {
    RC_NOT_IMPLEMENTED
}

unsafe extern "C" fn make_sticky(_ctx: *mut TSS2_TCTI_CONTEXT, _handle: *mut TPM2_HANDLE, _sticky: u8) -> TSS2_RC {
    RC_NOT_IMPLEMENTED
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn tcti() -> (FdTcti, UnixStream) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        (FdTcti::new(OwnedFd::from(ours)), theirs)
    }

    fn send(t: &mut FdTcti, cmd: &[u8]) -> TSS2_RC {
        let ptr = t.as_tcti_ptr();
        // SAFETY: `ptr` is our live context; `cmd` is readable for its length.
        unsafe { transmit(ptr, cmd.len() as SizeT, cmd.as_ptr()) }
    }

    fn recv(t: &mut FdTcti, buf: &mut [u8], timeout: i32) -> (TSS2_RC, usize) {
        let ptr = t.as_tcti_ptr();
        let mut size = buf.len() as SizeT;
        // SAFETY: `ptr` is our live context; `buf` is writable for `size` bytes.
        let rc = unsafe { receive(ptr, &mut size, buf.as_mut_ptr(), timeout) };
        (rc, size as usize)
    }

    fn response(rc: u32, body: &[u8]) -> Vec<u8> {
        let mut r = vec![0x80, 0x01];
        r.extend_from_slice(&((10 + body.len()) as u32).to_be_bytes());
        r.extend_from_slice(&rc.to_be_bytes());
        r.extend_from_slice(body);
        r
    }

    #[test]
    fn round_trip_in_pieces_with_try_again() {
        let (mut t, mut tpm) = tcti();
        let cmd = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 8];
        assert_eq!(send(&mut t, &cmd), RC_SUCCESS);
        let mut got = [0u8; 12];
        tpm.read_exact(&mut got).unwrap();
        assert_eq!(got, cmd);
        // A second transmit before the response is a sequence error.
        assert_eq!(send(&mut t, &cmd), RC_BAD_SEQUENCE);
        let resp = response(0, &[1, 2, 3, 4]);
        let mut buf = [0u8; 64];
        assert_eq!(recv(&mut t, &mut buf, 10).0, RC_TRY_AGAIN);
        tpm.write_all(&resp[..7]).unwrap();
        assert_eq!(recv(&mut t, &mut buf, 10).0, RC_TRY_AGAIN);
        tpm.write_all(&resp[7..]).unwrap();
        let (rc, n) = recv(&mut t, &mut buf, -1);
        assert_eq!((rc, &buf[..n]), (RC_SUCCESS, &resp[..]));
        // No response pending any more.
        assert_eq!(recv(&mut t, &mut buf, 10).0, RC_BAD_SEQUENCE);
    }

    #[test]
    fn small_buffer_malformed_and_closed_streams() {
        let (mut t, mut tpm) = tcti();
        assert_eq!(send(&mut t, &[0u8; 10]), RC_SUCCESS);
        let resp = response(0, &[9; 20]);
        tpm.write_all(&resp).unwrap();
        let mut small = [0u8; 16];
        assert_eq!(recv(&mut t, &mut small, -1), (RC_INSUFFICIENT_BUFFER, 30));
        let mut buf = [0u8; 64];
        let (rc, n) = recv(&mut t, &mut buf, -1);
        assert_eq!((rc, &buf[..n]), (RC_SUCCESS, &resp[..]));

        assert_eq!(send(&mut t, &[0u8; 10]), RC_SUCCESS);
        tpm.write_all(&[0x80, 0x01, 0, 0, 0, 3, 0, 0, 0, 0]).unwrap(); // size < header
        assert_eq!(recv(&mut t, &mut buf, -1).0, RC_MALFORMED_RESPONSE);

        assert_eq!(send(&mut t, &[0u8; 10]), RC_SUCCESS);
        drop(tpm);
        assert_eq!(recv(&mut t, &mut buf, -1).0, RC_IO_ERROR);
    }

    #[test]
    fn rejects_foreign_contexts_and_null_pointers() {
        let (mut t, _tpm) = tcti();
        let mut other = [0u64; 16];
        let foreign = other.as_mut_ptr().cast::<TSS2_TCTI_CONTEXT>();
        // SAFETY: `foreign` points to 128 readable zero bytes (wrong magic).
        assert_eq!(unsafe { transmit(foreign, 0, [0u8].as_ptr()) }, RC_BAD_CONTEXT);
        let ptr = t.as_tcti_ptr();
        // SAFETY: our live context; null pointers are what is tested.
        assert_eq!(unsafe { transmit(ptr, 1, std::ptr::null()) }, RC_BAD_REFERENCE);
        let mut n: SizeT = 0;
        // SAFETY: as above; `n` is a valid out-pointer.
        assert_eq!(unsafe { get_poll_handles(ptr, std::ptr::null_mut(), &mut n) }, RC_SUCCESS);
        assert_eq!(n, 1);
    }
}
