/*
 * A minimal fake libaziot_keys used to test loading and calling third-party libraries
 * (tests/foreign.rs). Its behaviour is chosen at compile time:
 *   FAKE_V20         only offers a 2.0.0.0 list (rejects a 2.1.0.0 request)
 *   FAKE_NULL_SIGN   2.1.0.0 list whose sign pointer is NULL
 *   FAKE_BAD_VERSION returns a list whose version field is 0x03000000
 *   FAKE_FAIL        get_function_list always fails with AZIOT_KEYS_RC_ERR_EXTERNAL
 *   FAKE_NO_ENTRY    does not export aziot_keys_get_function_list at all
 *   FAKE_LIAR        sign claims to have written more than the buffer holds
 * Outputs are fixed byte strings so that the caller's handling can be checked exactly.
 */

#include <string.h>

#include "aziot-keys.h"

static AZIOT_KEYS_RC fake_set_parameter(const char *name, const char *value) {
    (void)value;
    if (name == NULL) return AZIOT_KEYS_RC_ERR_INVALID_PARAMETER;
    if (strcmp(name, "bad") == 0) return AZIOT_KEYS_RC_ERR_INVALID_PARAMETER;
    if (strcmp(name, "weird") == 0) return 7;
    if (strcmp(name, "external") == 0) return AZIOT_KEYS_RC_ERR_EXTERNAL;
    return AZIOT_KEYS_RC_OK;
}

static AZIOT_KEYS_RC fake_id(const char *id) {
    if (id == NULL) return AZIOT_KEYS_RC_ERR_INVALID_PARAMETER;
    return strcmp(id, "missing") == 0 ? AZIOT_KEYS_RC_ERR_INVALID_PARAMETER : AZIOT_KEYS_RC_OK;
}

static AZIOT_KEYS_RC fake_create_key_pair_if_not_exists(const char *id, const char *preferred_algorithms) {
    (void)preferred_algorithms;
    return fake_id(id);
}

static AZIOT_KEYS_RC fake_move_key_pair(const char *from, const char *to) {
    return (fake_id(from) == AZIOT_KEYS_RC_OK && fake_id(to) == AZIOT_KEYS_RC_OK) ? AZIOT_KEYS_RC_OK
                                                                                 : AZIOT_KEYS_RC_ERR_EXTERNAL;
}

/* Two-call protocol over a fixed output. */
static AZIOT_KEYS_RC fake_output(const unsigned char *data, uintptr_t len, unsigned char *out, uintptr_t *out_len) {
    if (out_len == NULL) return AZIOT_KEYS_RC_ERR_INVALID_PARAMETER;
    if (out == NULL) {
        *out_len = len;
        return AZIOT_KEYS_RC_OK;
    }
    if (*out_len < len) {
        *out_len = len;
        return AZIOT_KEYS_RC_ERR_INVALID_PARAMETER;
    }
    memcpy(out, data, len);
    *out_len = len;
    return AZIOT_KEYS_RC_OK;
}

static AZIOT_KEYS_RC fake_get_key_pair_parameter(const char *id, AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE type_,
                                                 unsigned char *value, uintptr_t *value_len) {
    unsigned char v[1];
    if (fake_id(id) != AZIOT_KEYS_RC_OK) return AZIOT_KEYS_RC_ERR_INVALID_PARAMETER;
    v[0] = (unsigned char)type_;
    return fake_output(v, 1, value, value_len);
}

static AZIOT_KEYS_RC fake_create_key_if_not_exists(const char *id, AZIOT_KEYS_KEY_USAGE usage) {
    (void)usage;
    return fake_id(id);
}

static AZIOT_KEYS_RC fake_import_key(const char *id, const uint8_t *bytes, uintptr_t bytes_len, AZIOT_KEYS_KEY_USAGE usage) {
    (void)bytes_len;
    (void)usage;
    return bytes == NULL ? AZIOT_KEYS_RC_ERR_INVALID_PARAMETER : fake_id(id);
}

static AZIOT_KEYS_RC fake_derive_key(const char *base_id, const uint8_t *derivation_data, uintptr_t derivation_data_len,
                                     unsigned char *derived_key, uintptr_t *derived_key_len) {
    if (fake_id(base_id) != AZIOT_KEYS_RC_OK || derivation_data == NULL) return AZIOT_KEYS_RC_ERR_INVALID_PARAMETER;
    /* Echo the derivation data. */
    return fake_output(derivation_data, derivation_data_len, derived_key, derived_key_len);
}

static AZIOT_KEYS_RC fake_sign(const char *id, AZIOT_KEYS_SIGN_MECHANISM mechanism, const void *parameters,
                               const unsigned char *digest, uintptr_t digest_len,
                               unsigned char *signature, uintptr_t *signature_len) {
    (void)digest_len;
    if (fake_id(id) != AZIOT_KEYS_RC_OK || digest == NULL || signature_len == NULL) return AZIOT_KEYS_RC_ERR_INVALID_PARAMETER;
    if (mechanism == AZIOT_KEYS_SIGN_MECHANISM_DERIVED) {
        const AZIOT_KEYS_SIGN_DERIVED_PARAMETERS *p = (const AZIOT_KEYS_SIGN_DERIVED_PARAMETERS *)parameters;
        if (p == NULL || p->mechanism != AZIOT_KEYS_SIGN_MECHANISM_HMAC_SHA256) return AZIOT_KEYS_RC_ERR_INVALID_PARAMETER;
        /* Echo the derivation data. */
        return fake_output(p->derivation_data, p->derivation_data_len, signature, signature_len);
    }
    if (signature == NULL) {
        *signature_len = 16; /* upper bound; the real output is shorter */
        return AZIOT_KEYS_RC_OK;
    }
#ifdef FAKE_LIAR
    *signature_len = *signature_len + 100;
    return AZIOT_KEYS_RC_OK;
#else
    return fake_output((const unsigned char *)"fake-sig", 8, signature, signature_len);
#endif
}

static AZIOT_KEYS_RC fake_verify(const char *id, AZIOT_KEYS_SIGN_MECHANISM mechanism, const void *parameters,
                                 const unsigned char *digest, uintptr_t digest_len,
                                 const unsigned char *signature, uintptr_t signature_len, int *ok) {
    (void)mechanism;
    (void)parameters;
    (void)digest_len;
    if (fake_id(id) != AZIOT_KEYS_RC_OK || digest == NULL || signature == NULL || ok == NULL)
        return AZIOT_KEYS_RC_ERR_INVALID_PARAMETER;
    *ok = signature_len == 8 && memcmp(signature, "fake-sig", 8) == 0;
    return AZIOT_KEYS_RC_OK;
}

/* encrypt/decrypt output: mechanism byte, then for AEAD/DERIVED the iv, aad (and derivation
 * data) lengths as single bytes, then the input. */
static AZIOT_KEYS_RC fake_crypt(const char *id, AZIOT_KEYS_ENCRYPT_MECHANISM mechanism, const void *parameters,
                                const unsigned char *in, uintptr_t in_len, unsigned char *out, uintptr_t *out_len) {
    unsigned char buf[256];
    uintptr_t n = 0;
    const AZIOT_KEYS_ENCRYPT_AEAD_PARAMETERS *aead = NULL;
    if (fake_id(id) != AZIOT_KEYS_RC_OK || in == NULL || in_len > 200) return AZIOT_KEYS_RC_ERR_INVALID_PARAMETER;
    buf[n++] = (unsigned char)mechanism;
    if (mechanism == AZIOT_KEYS_ENCRYPT_MECHANISM_DERIVED) {
        const AZIOT_KEYS_ENCRYPT_DERIVED_PARAMETERS *d = (const AZIOT_KEYS_ENCRYPT_DERIVED_PARAMETERS *)parameters;
        if (d == NULL || d->mechanism != AZIOT_KEYS_ENCRYPT_MECHANISM_AEAD) return AZIOT_KEYS_RC_ERR_INVALID_PARAMETER;
        buf[n++] = (unsigned char)d->derivation_data_len;
        aead = (const AZIOT_KEYS_ENCRYPT_AEAD_PARAMETERS *)d->parameters;
    } else if (mechanism == AZIOT_KEYS_ENCRYPT_MECHANISM_AEAD) {
        aead = (const AZIOT_KEYS_ENCRYPT_AEAD_PARAMETERS *)parameters;
    }
    if (mechanism == AZIOT_KEYS_ENCRYPT_MECHANISM_AEAD || mechanism == AZIOT_KEYS_ENCRYPT_MECHANISM_DERIVED) {
        if (aead == NULL || aead->iv == NULL) return AZIOT_KEYS_RC_ERR_INVALID_PARAMETER;
        buf[n++] = (unsigned char)aead->iv_len;
        buf[n++] = (unsigned char)aead->aad_len;
    }
    memcpy(buf + n, in, in_len);
    n += in_len;
    return fake_output(buf, n, out, out_len);
}

static AZIOT_KEYS_RC fake_encrypt(const char *id, AZIOT_KEYS_ENCRYPT_MECHANISM mechanism, const void *parameters,
                                  const unsigned char *plaintext, uintptr_t plaintext_len,
                                  unsigned char *ciphertext, uintptr_t *ciphertext_len) {
    return fake_crypt(id, mechanism, parameters, plaintext, plaintext_len, ciphertext, ciphertext_len);
}

static AZIOT_KEYS_RC fake_decrypt(const char *id, AZIOT_KEYS_ENCRYPT_MECHANISM mechanism, const void *parameters,
                                  const unsigned char *ciphertext, uintptr_t ciphertext_len,
                                  unsigned char *plaintext, uintptr_t *plaintext_len) {
    return fake_crypt(id, mechanism, parameters, ciphertext, ciphertext_len, plaintext, plaintext_len);
}

static const AZIOT_KEYS_FUNCTION_LIST_2_0_0_0 LIST_2_0 = {
    { AZIOT_KEYS_VERSION_2_0_0_0 },
    fake_set_parameter,
    fake_create_key_pair_if_not_exists,
    fake_id,
    fake_get_key_pair_parameter,
    fake_create_key_if_not_exists,
    fake_id,
    fake_import_key,
    fake_derive_key,
    fake_sign,
    fake_verify,
    fake_encrypt,
    fake_decrypt,
};

static const AZIOT_KEYS_FUNCTION_LIST_2_1_0_0 LIST_2_1 = {
#ifdef FAKE_BAD_VERSION
    { 0x03000000 },
#else
    { AZIOT_KEYS_VERSION_2_1_0_0 },
#endif
    fake_set_parameter,
    fake_create_key_pair_if_not_exists,
    fake_move_key_pair,
    fake_id,
    fake_get_key_pair_parameter,
    fake_id,
    fake_create_key_if_not_exists,
    fake_id,
    fake_import_key,
    fake_id,
    fake_derive_key,
#ifdef FAKE_NULL_SIGN
    NULL,
#else
    fake_sign,
#endif
    fake_verify,
    fake_encrypt,
    fake_decrypt,
};

#ifdef FAKE_NO_ENTRY
AZIOT_KEYS_RC some_other_symbol(AZIOT_KEYS_VERSION version, const AZIOT_KEYS_FUNCTION_LIST **pfunction_list);
AZIOT_KEYS_RC some_other_symbol(AZIOT_KEYS_VERSION version, const AZIOT_KEYS_FUNCTION_LIST **pfunction_list)
#else
AZIOT_KEYS_RC aziot_keys_get_function_list(AZIOT_KEYS_VERSION version, const AZIOT_KEYS_FUNCTION_LIST **pfunction_list)
#endif
{
    if (pfunction_list == NULL) return AZIOT_KEYS_RC_ERR_INVALID_PARAMETER;
#ifdef FAKE_FAIL
    (void)version;
    (void)LIST_2_0;
    (void)LIST_2_1;
    return AZIOT_KEYS_RC_ERR_EXTERNAL;
#else
    if (version == AZIOT_KEYS_VERSION_2_0_0_0) {
        *pfunction_list = &LIST_2_0.base;
        return AZIOT_KEYS_RC_OK;
    }
#ifndef FAKE_V20
    if (version == AZIOT_KEYS_VERSION_2_1_0_0) {
        *pfunction_list = &LIST_2_1.base;
        return AZIOT_KEYS_RC_OK;
    }
#else
    (void)LIST_2_1;
#endif
    return AZIOT_KEYS_RC_ERR_INVALID_PARAMETER;
#endif
}
