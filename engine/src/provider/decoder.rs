//! Decoders (provider-decoder(7)) for a **key reference file**: what an unmodified program that
//! only reads key *files* (`SSL_CTX_use_PrivateKey_file`, `PEM_read_bio_PrivateKey`, `openssl
//! pkey -in file`; curl's `--key`) is given instead of a private key. The file names a keyd key;
//! it holds no key material:
//!
//! ```text
//! -----BEGIN AZIOT KEY-----
//! <base64 of the DER encoding of an ASN.1 UTF8String holding the aziot-keys: URI>
//! -----END AZIOT KEY-----
//! ```
//!
//! ([`key_file`] writes it; docs/engine.md has an `openssl asn1parse` one-liner.) Two steps, as
//! OpenSSL's own PEM → DER → key chain:
//! * `DER` from `input=pem` ([`pem_dispatch`]): finds the `AZIOT KEY` block (any other input: not
//!   ours, the next decoder is tried), base64-decodes it, checks the URI, loads the key from
//!   keyd and passes the bytes on as DER (the next step reuses the loaded key). Garbage inside
//!   our label, a bad URI, a forged handle, keyd down: an error naming the problem.
//! * `EC` and `RSA` from `input=der` ([`key_dispatch`]): a UTF8String that starts with
//!   `aziot-keys:` (anything else: not ours) is parsed as a key URI ([`super::uri`]), the key
//!   pair is loaded from keyd (the store's path: the engine's client, `$AZIOT_KEYD_ENDPOINT`) and
//!   passed to libcrypto by reference, to this provider's key management. A bad URI, a forged
//!   handle or keyd being down is an error on the queue, never a key.
//!
//! Why a DER string and not the URI as text: OpenSSL's file store reads the decoded PEM body
//! as one DER object (`der2obj`), which would cut a non-DER body short.

use std::ffi::{c_int, c_void};
use std::sync::OnceLock;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;

use super::keymgmt::KeyData;
use super::{end, f, Table};
use crate::error::{Error, Func};
use crate::ffi_provider as ffi;
use crate::key::guarded;

/// The PEM label of a key reference file.
pub const PEM_LABEL: &str = "AZIOT KEY";
/// The largest input read: a key reference file is a few hundred bytes.
const MAX_INPUT: usize = 64 * 1024;

/// The contents of a key reference file for the key pair `handle` (PEM, 64-column base64).
pub fn key_file(handle: &str) -> String {
    let b64 = B64.encode(der_string(&super::uri::to_uri(handle)));
    let mut s = format!("-----BEGIN {PEM_LABEL}-----\n");
    for line in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(line).unwrap_or_default());
        s.push('\n');
    }
    s.push_str(&format!("-----END {PEM_LABEL}-----\n"));
    s
}

/// DER of an ASN.1 UTF8String (tag 12) holding `s`.
pub fn der_string(s: &str) -> Vec<u8> {
    let n = s.len();
    let mut v = vec![0x0c];
    if n < 0x80 {
        v.push(n as u8);
    } else {
        let len = n.to_be_bytes();
        let skip = len.iter().take_while(|b| **b == 0).count();
        v.push(0x80 | (len.len() - skip) as u8);
        v.extend_from_slice(&len[skip..]);
    }
    v.extend_from_slice(s.as_bytes());
    v
}

/// The key URI in a DER UTF8String: `None` when the bytes are not a UTF8String starting with
/// `aziot-keys:` (not ours); an error when they are but are malformed.
pub fn parse_der(b: &[u8]) -> Option<Result<String, Error>> {
    let bad = |m: &str| Some(Err(Error::BadUri(format!("key reference file: {m}"))));
    let (&tag, rest) = b.split_first()?;
    if tag != 0x0c {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, body) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let k = usize::from(first & 0x7f);
        if k == 0 || k > 2 || rest.len() < k {
            // a reference is far shorter than 64 KiB: more length bytes are not ours
            return None;
        }
        let len = rest[..k]
            .iter()
            .fold(0usize, |a, b| (a << 8) | usize::from(*b));
        (len, &rest[k..])
    };
    let prefix = super::uri::SCHEME.len() + 1;
    let head = body.get(..prefix.min(body.len()))?;
    if !head.eq_ignore_ascii_case(format!("{}:", super::uri::SCHEME).as_bytes()) {
        return None;
    }
    if body.len() != len {
        return bad(&format!(
            "the string is {len} bytes long but {} follow",
            body.len()
        ));
    }
    match std::str::from_utf8(body) {
        Ok(s) => Some(Ok(s.to_owned())),
        Err(_) => bad("the URI is not UTF-8"),
    }
}

/// The DER bytes inside the first `AZIOT KEY` PEM block: `None` when there is none (not ours).
pub fn parse_pem(text: &[u8]) -> Option<Result<Vec<u8>, Error>> {
    let begin = format!("-----BEGIN {PEM_LABEL}-----");
    let end = format!("-----END {PEM_LABEL}-----");
    let at = find(text, begin.as_bytes())?;
    let bad = |m: String| Some(Err(Error::BadUri(format!("key reference file: {m}"))));
    let after = &text[at + begin.len()..];
    let Some(stop) = find(after, end.as_bytes()) else {
        return bad(format!("no \"{end}\" line"));
    };
    let body: Vec<u8> = after[..stop]
        .iter()
        .copied()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    if body.is_empty() {
        return bad("the block is empty".to_owned());
    }
    match B64.decode(&body) {
        Ok(der) => Some(Ok(der)),
        Err(e) => bad(format!("the block is not base64: {e}")),
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The core's `BIO_read_ex` (from the `in` table OSSL_provider_init got).
static BIO_READ: OnceLock<usize> = OnceLock::new();

/// Keeps the core's `BIO_read_ex` from the provider's `in` dispatch table.
///
/// # Safety
/// `core_in` null or the core's dispatch table, terminated by a zero id.
pub(crate) unsafe fn take_core_functions(core_in: *const ffi::OSSL_DISPATCH) {
    let mut p = core_in;
    if p.is_null() {
        return;
    }
    // SAFETY: per the contract.
    unsafe {
        while (*p).function_id != 0 {
            if (*p).function_id == ffi::OSSL_FUNC_BIO_READ_EX && !(*p).function.is_null() {
                let _ = BIO_READ.set((*p).function as usize);
            }
            p = p.add(1);
        }
    }
}

/// Everything in `cin`, up to [`MAX_INPUT`] bytes (`None`: longer, not a key reference file).
///
/// # Safety
/// `cin` is the core BIO OpenSSL passed to `decode`.
unsafe fn read_all(cin: *mut ffi::OSSL_CORE_BIO) -> Result<Option<Vec<u8>>, Error> {
    let read = BIO_READ
        .get()
        .ok_or_else(|| Error::Internal("the core gave no BIO_read_ex".to_owned()))?;
    // SAFETY: the address came from the core's dispatch table under OSSL_FUNC_BIO_READ_EX,
    // whose prototype is OSSL_FUNC_BIO_read_ex_fn.
    let read: ffi::OSSL_FUNC_BIO_read_ex_fn = unsafe { std::mem::transmute(*read) };
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let mut n = 0usize;
        // SAFETY: `buf` has `buf.len()` writable bytes; `n` is writable.
        let ok = unsafe { read(cin, buf.as_mut_ptr() as *mut c_void, buf.len(), &mut n) };
        if ok != 1 || n == 0 {
            return Ok(Some(out));
        }
        out.extend_from_slice(&buf[..n]);
        if out.len() > MAX_INPUT {
            return Ok(None);
        }
    }
}

struct DecoderCtx;

unsafe extern "C" fn newctx(_provctx: *mut c_void) -> *mut c_void {
    Box::into_raw(Box::new(DecoderCtx)) as *mut c_void
}

unsafe extern "C" fn freectx(ctx: *mut c_void) {
    if !ctx.is_null() {
        // SAFETY: a DecoderCtx newctx allocated, freed once.
        drop(unsafe { Box::from_raw(ctx as *mut DecoderCtx) });
    }
}

unsafe extern "C" fn does_selection(_provctx: *mut c_void, selection: c_int) -> c_int {
    let keys = ffi::OSSL_KEYMGMT_SELECT_PRIVATE_KEY | ffi::OSSL_KEYMGMT_SELECT_PUBLIC_KEY;
    c_int::from(selection == 0 || selection & keys != 0)
}

/// PEM → DER for `AZIOT KEY` blocks.
unsafe extern "C" fn decode_pem(
    _ctx: *mut c_void,
    cin: *mut ffi::OSSL_CORE_BIO,
    _selection: c_int,
    data_cb: Option<ffi::OSSL_CALLBACK>,
    data_cbarg: *mut c_void,
    _pw_cb: Option<ffi::OSSL_PASSPHRASE_CALLBACK>,
    _pw_cbarg: *mut c_void,
) -> c_int {
    guarded(Func::ProvDecode, 0, || {
        // SAFETY: OpenSSL's input BIO.
        let Some(input) = (unsafe { read_all(cin)? }) else {
            return Ok(1);
        };
        let Some(der) = parse_pem(&input) else {
            return Ok(1);
        };
        let mut der = der?;
        // Ours: the whole reference is checked and the key loaded here, so that a bad file
        // fails in this step, whose errors every caller keeps (OpenSSL's file store drops the
        // errors of the key step it runs next). The key step takes the loaded key from PREPARED.
        let uri = parse_der(&der).unwrap_or_else(|| {
            Err(Error::BadUri(format!(
                "key reference file: the {PEM_LABEL} block does not hold an aziot-keys: URI"
            )))
        })?;
        let key = load(&uri)?;
        let cb = data_cb.ok_or_else(|| Error::Internal("no data callback".to_owned()))?;
        PREPARED.with(|p| *p.borrow_mut() = Some((der.clone(), key)));
        // SAFETY: the parameters point at `der`, alive for the call.
        let ok = unsafe {
            let params = [
                ffi::OSSL_PARAM_construct_octet_string(
                    ffi::OBJECT_DATA.as_ptr(),
                    der.as_mut_ptr() as *mut c_void,
                    der.len(),
                ),
                ffi::OSSL_PARAM_construct_end(),
            ];
            cb(params.as_ptr(), data_cbarg)
        };
        PREPARED.with(|p| p.borrow_mut().take());
        Ok(ok)
    })
}

thread_local! {
    /// The key the PEM step loaded, for the key step it calls (nested, same thread): its DER
    /// bytes and the key.
    static PREPARED: std::cell::RefCell<Option<(Vec<u8>, KeyData)>> =
        const { std::cell::RefCell::new(None) };
}

/// The key pair a key URI names, from keyd (the engine's client).
fn load(uri: &str) -> Result<KeyData, Error> {
    let parsed = super::uri::parse(uri)?;
    let client = crate::engine::client()?;
    KeyData::from_twin(crate::key::load_private(&client, &parsed.handle)?)
}

/// DER (a UTF8String holding an `aziot-keys:` URI) → the keyd key, by reference.
unsafe extern "C" fn decode_key(
    _ctx: *mut c_void,
    cin: *mut ffi::OSSL_CORE_BIO,
    _selection: c_int,
    data_cb: Option<ffi::OSSL_CALLBACK>,
    data_cbarg: *mut c_void,
    _pw_cb: Option<ffi::OSSL_PASSPHRASE_CALLBACK>,
    _pw_cbarg: *mut c_void,
) -> c_int {
    guarded(Func::ProvDecode, 0, || {
        // SAFETY: OpenSSL's input BIO.
        let Some(input) = (unsafe { read_all(cin)? }) else {
            return Ok(1);
        };
        let Some(uri) = parse_der(&input) else {
            return Ok(1);
        };
        let prepared = PREPARED.with(|p| {
            p.borrow()
                .as_ref()
                .filter(|(der, _)| *der == input)
                .map(|(_, key)| key.clone())
        });
        let key = match prepared {
            Some(key) => key,
            None => load(&uri?)?,
        };
        let cb = data_cb.ok_or_else(|| Error::Internal("no data callback".to_owned()))?;
        // SAFETY: OpenSSL's callback and argument; `key` outlives the call.
        Ok(unsafe { super::store::pass_by_reference(&key, cb, data_cbarg) })
    })
}

fn dispatch(decode: *const ()) -> Table<ffi::OSSL_DISPATCH> {
    Table(vec![
        f(ffi::OSSL_FUNC_DECODER_NEWCTX, newctx as *const ()),
        f(ffi::OSSL_FUNC_DECODER_FREECTX, freectx as *const ()),
        f(
            ffi::OSSL_FUNC_DECODER_DOES_SELECTION,
            does_selection as *const (),
        ),
        f(ffi::OSSL_FUNC_DECODER_DECODE, decode),
        end(),
    ])
}

pub(crate) fn pem_dispatch() -> &'static Table<ffi::OSSL_DISPATCH> {
    static T: OnceLock<Table<ffi::OSSL_DISPATCH>> = OnceLock::new();
    T.get_or_init(|| dispatch(decode_pem as *const ()))
}

pub(crate) fn key_dispatch() -> &'static Table<ffi::OSSL_DISPATCH> {
    static T: OnceLock<Table<ffi::OSSL_DISPATCH>> = OnceLock::new();
    T.get_or_init(|| dispatch(decode_key as *const ()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "sr=eyJrZXlfaWQiOnsiS2V5UGFpciI6ImsifSwibm9uY2UiOiIifQ==&sig=a+b/c=";

    #[test]
    fn key_file_round_trips() {
        let pem = key_file(H);
        assert!(pem.starts_with("-----BEGIN AZIOT KEY-----\n"), "{pem}");
        assert!(pem.lines().all(|l| l.len() <= 64), "{pem}");
        let der = parse_pem(pem.as_bytes()).unwrap().unwrap();
        let uri = parse_der(&der).unwrap().unwrap();
        assert_eq!(crate::provider::uri::parse(&uri).unwrap().handle, H);
        // short and long DER lengths
        for n in [1, 127, 128, 255, 256, 5000] {
            let s = format!("aziot-keys:handle={}", "x".repeat(n));
            assert_eq!(parse_der(&der_string(&s)).unwrap().unwrap(), s);
        }
    }

    #[test]
    fn not_ours_and_malformed() {
        // not ours: other PEM, other DER, other strings
        assert!(
            parse_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").is_none()
        );
        assert!(parse_der(&[0x30, 0x03, 0x02, 0x01, 0x00]).is_none());
        assert!(parse_der(&der_string("file:/etc/passwd")).is_none());
        assert!(parse_der(&[]).is_none());
        // ours but broken: a clear error
        for (pem, why) in [
            (
                "-----BEGIN AZIOT KEY-----\n!!!!\n-----END AZIOT KEY-----\n",
                "not base64",
            ),
            (
                "-----BEGIN AZIOT KEY-----\n\n-----END AZIOT KEY-----\n",
                "empty",
            ),
            (
                "-----BEGIN AZIOT KEY-----\nAAAA\n",
                "no \"-----END AZIOT KEY-----\"",
            ),
        ] {
            match parse_pem(pem.as_bytes()) {
                Some(Err(e)) => assert!(e.to_string().contains(why), "{pem}: {e}"),
                other => panic!("{pem}: {other:?}"),
            }
        }
        let mut cut = der_string("aziot-keys:handle=abc");
        cut.truncate(cut.len() - 1);
        assert!(matches!(parse_der(&cut), Some(Err(Error::BadUri(_)))));
    }
}
