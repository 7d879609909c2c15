/*
 * aziot-keys.h: the libaziot_keys C API, versions 2.0.0.0 and 2.1.0.0.
 *
 * A key library exports exactly one symbol, aziot_keys_get_function_list. Calls into the
 * library are serialized by the caller (never concurrent) but may come from different threads.
 * All strings are NUL-terminated UTF-8. Every function returns an AZIOT_KEYS_RC.
 *
 * Variable-size outputs use a two-call protocol: with a NULL output buffer, the function stores
 * an upper bound of the output length in *len and returns AZIOT_KEYS_RC_OK; otherwise, if *len
 * is too small, it stores the required length in *len and returns
 * AZIOT_KEYS_RC_ERR_INVALID_PARAMETER; on success *len is the number of bytes written.
 */

#ifndef AZIOT_KEYS_H
#define AZIOT_KEYS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef unsigned int AZIOT_KEYS_RC;
typedef unsigned int AZIOT_KEYS_VERSION;
typedef unsigned int AZIOT_KEYS_SIGN_MECHANISM;
typedef unsigned int AZIOT_KEYS_ENCRYPT_MECHANISM;
typedef unsigned int AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE;
typedef unsigned int AZIOT_KEYS_KEY_PAIR_PARAMETER_ALGORITHM;
typedef unsigned int AZIOT_KEYS_KEY_USAGE;

#define AZIOT_KEYS_RC_OK                      0
#define AZIOT_KEYS_RC_ERR_INVALID_PARAMETER   1
#define AZIOT_KEYS_RC_ERR_EXTERNAL            2

#define AZIOT_KEYS_VERSION_2_0_0_0  33554432   /* 0x02000000 */
#define AZIOT_KEYS_VERSION_2_1_0_0  33619968   /* 0x02010000 */

#define AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_ALGORITHM     1  /* value: native-endian unsigned int */
#define AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_EC_CURVE_OID  2  /* DER OID incl. tag+len */
#define AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_EC_POINT      3  /* X9.62 point octets (compressed form, not DER-wrapped) */
#define AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_RSA_MODULUS   4  /* big-endian */
#define AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_RSA_EXPONENT  5  /* big-endian */

#define AZIOT_KEYS_KEY_PAIR_PARAMETER_ALGORITHM_EC   1
#define AZIOT_KEYS_KEY_PAIR_PARAMETER_ALGORITHM_RSA  2

#define AZIOT_KEYS_KEY_USAGE_DERIVE   1
#define AZIOT_KEYS_KEY_USAGE_ENCRYPT  16
#define AZIOT_KEYS_KEY_USAGE_SIGN     AZIOT_KEYS_KEY_USAGE_DERIVE   /* == 1 (same bit!) */

#define AZIOT_KEYS_SIGN_MECHANISM_ECDSA        1  /* parameters unused */
#define AZIOT_KEYS_SIGN_MECHANISM_HMAC_SHA256  2  /* parameters unused */
#define AZIOT_KEYS_SIGN_MECHANISM_DERIVED      3  /* parameters: const AZIOT_KEYS_SIGN_DERIVED_PARAMETERS* ; id = base key */

#define AZIOT_KEYS_ENCRYPT_MECHANISM_AEAD            1  /* parameters: const AZIOT_KEYS_ENCRYPT_AEAD_PARAMETERS* */
#define AZIOT_KEYS_ENCRYPT_MECHANISM_RSA_PKCS1       2  /* parameters unused */
#define AZIOT_KEYS_ENCRYPT_MECHANISM_RSA_NO_PADDING  3  /* parameters unused */
#define AZIOT_KEYS_ENCRYPT_MECHANISM_DERIVED         4  /* parameters: const AZIOT_KEYS_ENCRYPT_DERIVED_PARAMETERS* ; id = base key */

typedef struct AZIOT_KEYS_FUNCTION_LIST { AZIOT_KEYS_VERSION version; } AZIOT_KEYS_FUNCTION_LIST;

typedef struct AZIOT_KEYS_SIGN_DERIVED_PARAMETERS {
    const unsigned char *derivation_data;
    uintptr_t derivation_data_len;
    AZIOT_KEYS_SIGN_MECHANISM mechanism;   /* mechanism to use with the derived key */
    const void *parameters;                /* that mechanism's parameters */
} AZIOT_KEYS_SIGN_DERIVED_PARAMETERS;

typedef struct AZIOT_KEYS_ENCRYPT_AEAD_PARAMETERS {
    const unsigned char *iv;  uintptr_t iv_len;
    const unsigned char *aad; uintptr_t aad_len;
} AZIOT_KEYS_ENCRYPT_AEAD_PARAMETERS;

typedef struct AZIOT_KEYS_ENCRYPT_DERIVED_PARAMETERS {
    const unsigned char *derivation_data;
    uintptr_t derivation_data_len;
    AZIOT_KEYS_ENCRYPT_MECHANISM mechanism;   /* mechanism to use with the derived key */
    const void *parameters;                   /* that mechanism's parameters */
} AZIOT_KEYS_ENCRYPT_DERIVED_PARAMETERS;

/* Function list of API version 2.0.0.0. Field order is ABI. */
typedef struct AZIOT_KEYS_FUNCTION_LIST_2_0_0_0 {
    AZIOT_KEYS_FUNCTION_LIST base;   /* base.version == AZIOT_KEYS_VERSION_2_0_0_0 */
    AZIOT_KEYS_RC (*set_parameter)(const char *name, const char *value);
    AZIOT_KEYS_RC (*create_key_pair_if_not_exists)(const char *id, const char *preferred_algorithms);
    AZIOT_KEYS_RC (*load_key_pair)(const char *id);
    AZIOT_KEYS_RC (*get_key_pair_parameter)(const char *id, AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE type_,
                                            unsigned char *value, uintptr_t *value_len);
    AZIOT_KEYS_RC (*create_key_if_not_exists)(const char *id, AZIOT_KEYS_KEY_USAGE usage);
    AZIOT_KEYS_RC (*load_key)(const char *id);
    AZIOT_KEYS_RC (*import_key)(const char *id, const uint8_t *bytes, uintptr_t bytes_len,
                                AZIOT_KEYS_KEY_USAGE usage);
    AZIOT_KEYS_RC (*derive_key)(const char *base_id, const uint8_t *derivation_data,
                                uintptr_t derivation_data_len, unsigned char *derived_key,
                                uintptr_t *derived_key_len);
    AZIOT_KEYS_RC (*sign)(const char *id, AZIOT_KEYS_SIGN_MECHANISM mechanism, const void *parameters,
                          const unsigned char *digest, uintptr_t digest_len,
                          unsigned char *signature, uintptr_t *signature_len);
    AZIOT_KEYS_RC (*verify)(const char *id, AZIOT_KEYS_SIGN_MECHANISM mechanism, const void *parameters,
                            const unsigned char *digest, uintptr_t digest_len,
                            const unsigned char *signature, uintptr_t signature_len, int *ok);
    AZIOT_KEYS_RC (*encrypt)(const char *id, AZIOT_KEYS_ENCRYPT_MECHANISM mechanism, const void *parameters,
                             const unsigned char *plaintext, uintptr_t plaintext_len,
                             unsigned char *ciphertext, uintptr_t *ciphertext_len);
    AZIOT_KEYS_RC (*decrypt)(const char *id, AZIOT_KEYS_ENCRYPT_MECHANISM mechanism, const void *parameters,
                             const unsigned char *ciphertext, uintptr_t ciphertext_len,
                             unsigned char *plaintext, uintptr_t *plaintext_len);
} AZIOT_KEYS_FUNCTION_LIST_2_0_0_0;

/* Function list of API version 2.1.0.0: adds move_key_pair, delete_key_pair and delete_key.
 * Field order is ABI. */
typedef struct AZIOT_KEYS_FUNCTION_LIST_2_1_0_0 {
    AZIOT_KEYS_FUNCTION_LIST base;   /* base.version == AZIOT_KEYS_VERSION_2_1_0_0 */
    AZIOT_KEYS_RC (*set_parameter)(const char *name, const char *value);
    AZIOT_KEYS_RC (*create_key_pair_if_not_exists)(const char *id, const char *preferred_algorithms);
    AZIOT_KEYS_RC (*move_key_pair)(const char *from, const char *to);
    AZIOT_KEYS_RC (*load_key_pair)(const char *id);
    AZIOT_KEYS_RC (*get_key_pair_parameter)(const char *id, AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE type_,
                                            unsigned char *value, uintptr_t *value_len);
    AZIOT_KEYS_RC (*delete_key_pair)(const char *id);
    AZIOT_KEYS_RC (*create_key_if_not_exists)(const char *id, AZIOT_KEYS_KEY_USAGE usage);
    AZIOT_KEYS_RC (*load_key)(const char *id);
    AZIOT_KEYS_RC (*import_key)(const char *id, const uint8_t *bytes, uintptr_t bytes_len,
                                AZIOT_KEYS_KEY_USAGE usage);
    AZIOT_KEYS_RC (*delete_key)(const char *id);
    AZIOT_KEYS_RC (*derive_key)(const char *base_id, const uint8_t *derivation_data,
                                uintptr_t derivation_data_len, unsigned char *derived_key,
                                uintptr_t *derived_key_len);
    AZIOT_KEYS_RC (*sign)(const char *id, AZIOT_KEYS_SIGN_MECHANISM mechanism, const void *parameters,
                          const unsigned char *digest, uintptr_t digest_len,
                          unsigned char *signature, uintptr_t *signature_len);
    AZIOT_KEYS_RC (*verify)(const char *id, AZIOT_KEYS_SIGN_MECHANISM mechanism, const void *parameters,
                            const unsigned char *digest, uintptr_t digest_len,
                            const unsigned char *signature, uintptr_t signature_len, int *ok);
    AZIOT_KEYS_RC (*encrypt)(const char *id, AZIOT_KEYS_ENCRYPT_MECHANISM mechanism, const void *parameters,
                             const unsigned char *plaintext, uintptr_t plaintext_len,
                             unsigned char *ciphertext, uintptr_t *ciphertext_len);
    AZIOT_KEYS_RC (*decrypt)(const char *id, AZIOT_KEYS_ENCRYPT_MECHANISM mechanism, const void *parameters,
                             const unsigned char *ciphertext, uintptr_t ciphertext_len,
                             unsigned char *plaintext, uintptr_t *plaintext_len);
} AZIOT_KEYS_FUNCTION_LIST_2_1_0_0;

/*
 * The library's entry point. Unknown version or NULL pfunction_list ->
 * AZIOT_KEYS_RC_ERR_INVALID_PARAMETER. On success *pfunction_list points to a static
 * AZIOT_KEYS_FUNCTION_LIST_2_0_0_0 or _2_1_0_0 (cast to its base) whose base.version equals
 * the requested version. It must not be freed or modified. May be called repeatedly.
 */
AZIOT_KEYS_RC aziot_keys_get_function_list(AZIOT_KEYS_VERSION version,
                                           const AZIOT_KEYS_FUNCTION_LIST **pfunction_list);

#ifdef __cplusplus
}
#endif

#endif /* AZIOT_KEYS_H */
