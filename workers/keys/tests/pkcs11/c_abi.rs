//! The exported C ABI (`libaziot_keys.so`) serves token keys too, including the size queries of
//! the two-call buffer protocol.

use std::ffi::CString;
use std::ptr;

use aziot_keys::c_abi::*;
use openssl::ecdsa::EcdsaSig;
use openssl::pkey::PKey;

use crate::{fresh_token, pkcs11_tool, softhsm, MODULE, PIN};

#[test]
fn c_abi_signs_with_a_token_key() {
    if softhsm().is_none() {
        return;
    }
    let (token, _) = fresh_token();
    let mut list: *const FunctionListBase = ptr::null();
    // SAFETY: valid out-pointer.
    assert_eq!(unsafe { aziot_keys_get_function_list(AZIOT_KEYS_VERSION_2_1_0_0, &mut list) }, 0);
    // SAFETY: version 2.1 was returned, so the static has the 2.1 layout.
    let l = unsafe { &*list.cast::<FunctionList2_1_0_0>() };
    let lib = CString::new(MODULE).unwrap();
    let base = CString::new(format!("pkcs11:token={token}?pin-value={PIN}")).unwrap();
    let id = c"c-abi-key";
    let digest = openssl::sha::sha256(b"through the C ABI");
    let mut len = 0usize;
    // SAFETY: in this block every pointer is valid for the stated length or NULL where the API
    // allows it (size query); the functions come from our own list.
    let signature = unsafe {
        assert_eq!(l.set_parameter.unwrap()(c"pkcs11_base_slot".as_ptr(), base.as_ptr()), 0);
        assert_eq!(l.set_parameter.unwrap()(c"pkcs11_lib_path".as_ptr(), lib.as_ptr()), 0);
        assert_eq!(l.create_key_pair_if_not_exists.unwrap()(id.as_ptr(), c"ec-p256".as_ptr()), 0);
        let sign = l.sign.unwrap();
        let mech = AZIOT_KEYS_SIGN_MECHANISM_ECDSA;
        assert_eq!(sign(id.as_ptr(), mech, ptr::null(), digest.as_ptr(), 32, ptr::null_mut(), &mut len), 0);
        assert_eq!(len, 72);
        let mut buf = vec![0u8; len];
        assert_eq!(sign(id.as_ptr(), mech, ptr::null(), digest.as_ptr(), 32, buf.as_mut_ptr(), &mut len), 0);
        buf.truncate(len);
        // A key that is not on the token: INVALID_PARAMETER (no home directory to fall back to).
        let mut n = 0usize;
        let rc = sign(c"absent".as_ptr(), mech, ptr::null(), digest.as_ptr(), 32, ptr::null_mut(), &mut n);
        assert_eq!(rc, 1);
        buf
    };
    let spki = pkcs11_tool(&["--token-label", &token, "--read-object", "--type", "pubkey", "--label", "c-abi-key"]);
    let public = PKey::public_key_from_der(&spki).unwrap().ec_key().unwrap();
    assert!(EcdsaSig::from_der(&signature).unwrap().verify(&digest, &public).unwrap());
}
