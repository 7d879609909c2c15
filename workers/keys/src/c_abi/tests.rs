//! Unit tests of the exported C ABI that need no configured store (argument validation,
//! function lists, the buffer protocol, panic containment). End-to-end use from C is in
//! `tests/c_abi.rs`.

use std::ptr;

use super::*;
use crate::{RC_ERR_EXTERNAL, RC_ERR_INVALID_PARAMETER};

fn list_2_1() -> &'static FunctionList2_1_0_0 {
    let mut list: *const FunctionListBase = ptr::null();
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { aziot_keys_get_function_list(AZIOT_KEYS_VERSION_2_1_0_0, &mut list) }, RC_OK);
    // SAFETY: version 2.1 was returned, so the static has the 2.1 layout.
    unsafe { &*list.cast::<FunctionList2_1_0_0>() }
}

#[test]
fn function_lists() {
    let mut list: *const FunctionListBase = ptr::null();
    // SAFETY: every call in this block gets a valid out-pointer or NULL.
    unsafe {
        assert_eq!(aziot_keys_get_function_list(AZIOT_KEYS_VERSION_2_0_0_0, &mut list), RC_OK);
        assert_eq!((*list).version, AZIOT_KEYS_VERSION_2_0_0_0);
        assert_eq!(aziot_keys_get_function_list(AZIOT_KEYS_VERSION_2_1_0_0, &mut list), RC_OK);
        assert_eq!((*list).version, AZIOT_KEYS_VERSION_2_1_0_0);
        let before = list;
        assert_eq!(aziot_keys_get_function_list(0x0202_0000, &mut list), RC_ERR_INVALID_PARAMETER);
        assert_eq!(list, before, "untouched on failure");
        assert_eq!(aziot_keys_get_function_list(0, &mut list), RC_ERR_INVALID_PARAMETER);
        assert_eq!(aziot_keys_get_function_list(AZIOT_KEYS_VERSION_2_1_0_0, ptr::null_mut()), RC_ERR_INVALID_PARAMETER);
    }
    // Layout: base + 12 / 15 pointers.
    let p = std::mem::size_of::<usize>();
    assert_eq!(std::mem::size_of::<FunctionList2_0_0_0>(), p + 12 * p);
    assert_eq!(std::mem::size_of::<FunctionList2_1_0_0>(), p + 15 * p);
    assert_eq!(std::mem::size_of::<Option<SignFn>>(), p);
}

#[test]
fn null_and_non_utf8_arguments_are_invalid() {
    let l = list_2_1();
    let id = c"id".as_ptr();
    let bad_utf8 = c"\xff\xfe".as_ptr();
    let mut len = 0usize;
    let mut ok: c_int = 0;
    // SAFETY: in every call of this block, every pointer is NULL or valid; functions come from our own list.
    unsafe {
        assert_eq!(l.set_parameter.unwrap()(ptr::null(), c"x".as_ptr()), RC_ERR_INVALID_PARAMETER);
        assert_eq!(l.set_parameter.unwrap()(c"homedir_path".as_ptr(), ptr::null()), RC_ERR_INVALID_PARAMETER);
        assert_eq!(l.set_parameter.unwrap()(bad_utf8, c"x".as_ptr()), RC_ERR_INVALID_PARAMETER);
        assert_eq!(l.set_parameter.unwrap()(c"no_such_parameter".as_ptr(), c"x".as_ptr()), RC_ERR_INVALID_PARAMETER);
        assert_eq!(l.load_key.unwrap()(ptr::null()), RC_ERR_INVALID_PARAMETER);
        assert_eq!(l.load_key_pair.unwrap()(bad_utf8), RC_ERR_INVALID_PARAMETER);
        assert_eq!(l.create_key_pair_if_not_exists.unwrap()(ptr::null(), ptr::null()), RC_ERR_INVALID_PARAMETER);
        assert_eq!(l.move_key_pair.unwrap()(id, ptr::null()), RC_ERR_INVALID_PARAMETER);
        assert_eq!(l.delete_key.unwrap()(ptr::null()), RC_ERR_INVALID_PARAMETER);
        assert_eq!(l.delete_key_pair.unwrap()(ptr::null()), RC_ERR_INVALID_PARAMETER);
        assert_eq!(l.create_key_if_not_exists.unwrap()(ptr::null(), 1), RC_ERR_INVALID_PARAMETER);
        assert_eq!(l.import_key.unwrap()(id, ptr::null(), 4, 1), RC_ERR_INVALID_PARAMETER);
        assert_eq!(
            l.get_key_pair_parameter.unwrap()(id, 1, ptr::null_mut(), ptr::null_mut()),
            RC_ERR_INVALID_PARAMETER
        );
        assert_eq!(l.get_key_pair_parameter.unwrap()(id, 99, ptr::null_mut(), &mut len), RC_ERR_INVALID_PARAMETER);
        assert_eq!(l.derive_key.unwrap()(id, ptr::null(), 0, ptr::null_mut(), &mut len), RC_ERR_INVALID_PARAMETER);
        assert_eq!(
            l.derive_key.unwrap()(id, b"d".as_ptr(), 1, ptr::null_mut(), ptr::null_mut()),
            RC_ERR_INVALID_PARAMETER
        );
        let sign = l.sign.unwrap();
        assert_eq!(sign(id, 2, ptr::null(), ptr::null(), 0, ptr::null_mut(), &mut len), RC_ERR_INVALID_PARAMETER);
        assert_eq!(
            sign(id, 2, ptr::null(), b"m".as_ptr(), 1, ptr::null_mut(), ptr::null_mut()),
            RC_ERR_INVALID_PARAMETER
        );
        assert_eq!(sign(id, 99, ptr::null(), b"m".as_ptr(), 1, ptr::null_mut(), &mut len), RC_ERR_INVALID_PARAMETER);
        // DERIVED with NULL parameters, and with a nested mechanism other than HMAC-SHA256.
        assert_eq!(sign(id, 3, ptr::null(), b"m".as_ptr(), 1, ptr::null_mut(), &mut len), RC_ERR_INVALID_PARAMETER);
        let nested_ecdsa = SignDerivedParameters {
            derivation_data: b"d".as_ptr(),
            derivation_data_len: 1,
            mechanism: AZIOT_KEYS_SIGN_MECHANISM_ECDSA,
            parameters: ptr::null(),
        };
        let p = ptr::from_ref(&nested_ecdsa).cast::<c_void>();
        assert_eq!(sign(id, 3, p, b"m".as_ptr(), 1, ptr::null_mut(), &mut len), RC_ERR_INVALID_PARAMETER);
        let verify = l.verify.unwrap();
        assert_eq!(verify(id, 2, ptr::null(), b"m".as_ptr(), 1, ptr::null(), 0, &mut ok), RC_ERR_INVALID_PARAMETER);
        assert_eq!(
            verify(id, 2, ptr::null(), b"m".as_ptr(), 1, b"s".as_ptr(), 1, ptr::null_mut()),
            RC_ERR_INVALID_PARAMETER
        );
        let encrypt = l.encrypt.unwrap();
        assert_eq!(encrypt(id, 1, ptr::null(), b"p".as_ptr(), 1, ptr::null_mut(), &mut len), RC_ERR_INVALID_PARAMETER);
        let aead = EncryptAeadParameters { iv: ptr::null(), iv_len: 12, aad: ptr::null(), aad_len: 0 };
        let p = ptr::from_ref(&aead).cast::<c_void>();
        assert_eq!(encrypt(id, 1, p, b"p".as_ptr(), 1, ptr::null_mut(), &mut len), RC_ERR_INVALID_PARAMETER);
        let nested_rsa = EncryptDerivedParameters {
            derivation_data: b"d".as_ptr(),
            derivation_data_len: 1,
            mechanism: AZIOT_KEYS_ENCRYPT_MECHANISM_RSA_PKCS1,
            parameters: ptr::null(),
        };
        let p = ptr::from_ref(&nested_rsa).cast::<c_void>();
        assert_eq!(encrypt(id, 4, p, b"p".as_ptr(), 1, ptr::null_mut(), &mut len), RC_ERR_INVALID_PARAMETER);
        assert_eq!(encrypt(id, 42, ptr::null(), b"p".as_ptr(), 1, ptr::null_mut(), &mut len), RC_ERR_INVALID_PARAMETER);
        let decrypt = l.decrypt.unwrap();
        assert_eq!(decrypt(id, 1, ptr::null(), b"c".as_ptr(), 1, ptr::null_mut(), &mut len), RC_ERR_INVALID_PARAMETER);
        assert_eq!(decrypt(id, 2, ptr::null(), ptr::null(), 0, ptr::null_mut(), &mut len), RC_ERR_INVALID_PARAMETER);
    }
}

#[test]
fn two_call_protocol() {
    let mut buf = [0u8; 8];
    let mut len = 0usize;
    // SAFETY: in every call of this block, `buf` is valid for `len` bytes whenever passed; `len` is valid.
    unsafe {
        // Size query.
        assert!(
            write_output(ptr::null_mut(), &mut len, || Ok(5), || -> Result<Vec<u8>> { panic!("not computed") }).is_ok()
        );
        assert_eq!(len, 5);
        // Too small: required size written back, INVALID.
        len = 2;
        let r = write_output(buf.as_mut_ptr(), &mut len, || Ok(5), || Ok(vec![1u8, 2, 3, 4, 5]));
        assert!(matches!(r, Err(Error::InvalidParameter(_))));
        assert_eq!(len, 5);
        assert_eq!(buf, [0; 8]);
        // Large enough: copied, length set to the bytes written.
        len = 8;
        write_output(buf.as_mut_ptr(), &mut len, || Ok(8), || Ok(vec![1u8, 2, 3])).unwrap();
        assert_eq!(len, 3);
        assert_eq!(&buf[..4], &[1, 2, 3, 0]);
        // NULL length pointer.
        let r = write_output(buf.as_mut_ptr(), ptr::null_mut(), || Ok(1), || Ok(vec![1u8]));
        assert!(matches!(r, Err(Error::InvalidParameter(_))));
    }
}

#[test]
fn panics_become_external() {
    assert_eq!(guard(|| panic!("boom")), RC_ERR_EXTERNAL);
    assert_eq!(guard(|| Err(Error::invalid("x"))), RC_ERR_INVALID_PARAMETER);
    assert_eq!(guard(|| Err(Error::external_msg("x"))), RC_ERR_EXTERNAL);
    assert_eq!(guard(|| Ok(())), RC_OK);
}
