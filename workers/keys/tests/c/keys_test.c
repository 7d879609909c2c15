/*
 * Drives libaziot_keys through its C ABI only (aziot-keys.h), as keyd or a third-party caller
 * would. Usage: keys_test <homedir>. Exits non-zero on the first mismatch. Prints
 * "NAME <hex>" lines for the Rust side (tests/c_abi.rs) to check with OpenSSL independently.
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "aziot-keys.h"

static int failures = 0;

#define CHECK(cond) do { \
    if (!(cond)) { \
        fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
        failures++; \
        exit(1); \
    } \
} while (0)

#define CHECK_RC(expr, expected) do { \
    AZIOT_KEYS_RC rc_ = (expr); \
    if (rc_ != (expected)) { \
        fprintf(stderr, "%s:%d: %s returned %u, expected %u\n", __FILE__, __LINE__, #expr, rc_, (unsigned)(expected)); \
        exit(1); \
    } \
} while (0)

static void print_hex(const char *name, const unsigned char *buf, uintptr_t len) {
    uintptr_t i;
    printf("%s ", name);
    for (i = 0; i < len; i++) {
        printf("%02x", buf[i]);
    }
    printf("\n");
}

int main(int argc, char **argv) {
    const AZIOT_KEYS_FUNCTION_LIST *base = NULL;
    const AZIOT_KEYS_FUNCTION_LIST_2_1_0_0 *fl;
    const AZIOT_KEYS_FUNCTION_LIST_2_0_0_0 *fl20;
    unsigned char buf[1024];
    unsigned char buf2[1024];
    uintptr_t len, len2;
    int ok;

    if (argc != 2) {
        fprintf(stderr, "usage: %s <homedir>\n", argv[0]);
        return 2;
    }

    /* Entry point errors. */
    CHECK_RC(aziot_keys_get_function_list(AZIOT_KEYS_VERSION_2_1_0_0, NULL), AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
    CHECK_RC(aziot_keys_get_function_list(0x03000000, &base), AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
    CHECK(base == NULL);

    /* 2.0.0.0 list. */
    CHECK_RC(aziot_keys_get_function_list(AZIOT_KEYS_VERSION_2_0_0_0, &base), AZIOT_KEYS_RC_OK);
    CHECK(base != NULL && base->version == AZIOT_KEYS_VERSION_2_0_0_0);
    fl20 = (const AZIOT_KEYS_FUNCTION_LIST_2_0_0_0 *)base;
    CHECK(fl20->set_parameter && fl20->create_key_pair_if_not_exists && fl20->load_key_pair &&
          fl20->get_key_pair_parameter && fl20->create_key_if_not_exists && fl20->load_key &&
          fl20->import_key && fl20->derive_key && fl20->sign && fl20->verify && fl20->encrypt &&
          fl20->decrypt);

    /* 2.1.0.0 list. */
    CHECK_RC(aziot_keys_get_function_list(AZIOT_KEYS_VERSION_2_1_0_0, &base), AZIOT_KEYS_RC_OK);
    CHECK(base != NULL && base->version == AZIOT_KEYS_VERSION_2_1_0_0);
    fl = (const AZIOT_KEYS_FUNCTION_LIST_2_1_0_0 *)base;
    CHECK(fl->move_key_pair && fl->delete_key_pair && fl->delete_key);

    /* Parameters. */
    CHECK_RC(fl->set_parameter(NULL, "x"), AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
    CHECK_RC(fl->set_parameter("no_such_parameter", "x"), AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
    CHECK_RC(fl->load_key("kp"), AZIOT_KEYS_RC_ERR_INVALID_PARAMETER); /* no way to create keys */
    CHECK_RC(fl->set_parameter("homedir_path", argv[1]), AZIOT_KEYS_RC_OK);

    /* EC key pair. */
    CHECK_RC(fl->load_key_pair("kp"), AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
    CHECK_RC(fl->create_key_pair_if_not_exists("kp", "ed25519"), AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
    CHECK_RC(fl->create_key_pair_if_not_exists("kp", "ec-p256"), AZIOT_KEYS_RC_OK);
    CHECK_RC(fl->load_key_pair("kp"), AZIOT_KEYS_RC_OK);
    CHECK_RC(fl20->load_key_pair("kp"), AZIOT_KEYS_RC_OK); /* same store through the 2.0 list */

    len = 0;
    CHECK_RC(fl->get_key_pair_parameter("kp", AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_ALGORITHM, NULL, &len), AZIOT_KEYS_RC_OK);
    CHECK(len == sizeof(unsigned int));
    {
        unsigned int algorithm = 0;
        CHECK_RC(fl->get_key_pair_parameter("kp", AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_ALGORITHM,
                                            (unsigned char *)&algorithm, &len), AZIOT_KEYS_RC_OK);
        CHECK(len == sizeof(unsigned int) && algorithm == AZIOT_KEYS_KEY_PAIR_PARAMETER_ALGORITHM_EC);
    }
    len = 0;
    CHECK_RC(fl->get_key_pair_parameter("kp", AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_EC_POINT, NULL, &len), AZIOT_KEYS_RC_OK);
    CHECK(len == 33);
    len2 = 10; /* too small: required size comes back */
    CHECK_RC(fl->get_key_pair_parameter("kp", AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_EC_POINT, buf, &len2),
             AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
    CHECK(len2 == 33);
    CHECK_RC(fl->get_key_pair_parameter("kp", AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_EC_POINT, buf, &len), AZIOT_KEYS_RC_OK);
    CHECK(len == 33 && (buf[0] == 2 || buf[0] == 3));
    print_hex("POINT", buf, len);
    len = sizeof(buf);
    CHECK_RC(fl->get_key_pair_parameter("kp", AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_EC_CURVE_OID, buf, &len), AZIOT_KEYS_RC_OK);
    CHECK(len == 10 && memcmp(buf, "\x06\x08\x2a\x86\x48\xce\x3d\x03\x01\x07", 10) == 0);
    len = sizeof(buf);
    CHECK_RC(fl->get_key_pair_parameter("kp", AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_RSA_MODULUS, buf, &len),
             AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
    CHECK_RC(fl->get_key_pair_parameter("kp", AZIOT_KEYS_KEY_PAIR_PARAMETER_TYPE_EC_POINT, buf, NULL),
             AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);

    /* ECDSA over a 32-byte digest. */
    {
        unsigned char digest[32];
        int i;
        for (i = 0; i < 32; i++) digest[i] = (unsigned char)(i * 7 + 1);
        print_hex("DIGEST", digest, sizeof(digest));
        len = 0;
        CHECK_RC(fl->sign("kp", AZIOT_KEYS_SIGN_MECHANISM_ECDSA, NULL, digest, sizeof(digest), NULL, &len), AZIOT_KEYS_RC_OK);
        CHECK(len >= 70 && len <= 72);
        len2 = 8;
        CHECK_RC(fl->sign("kp", AZIOT_KEYS_SIGN_MECHANISM_ECDSA, NULL, digest, sizeof(digest), buf, &len2),
                 AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
        CHECK(len2 >= 8 && len2 <= 72);
        CHECK_RC(fl->sign("kp", AZIOT_KEYS_SIGN_MECHANISM_ECDSA, NULL, digest, sizeof(digest), buf, &len), AZIOT_KEYS_RC_OK);
        CHECK(len >= 8 && len <= 72 && buf[0] == 0x30);
        print_hex("SIGNATURE", buf, len);
        CHECK_RC(fl->sign("kp", AZIOT_KEYS_SIGN_MECHANISM_ECDSA, NULL, NULL, 32, buf, &len), AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
        CHECK_RC(fl->sign("kp", AZIOT_KEYS_SIGN_MECHANISM_HMAC_SHA256, NULL, digest, 32, NULL, &len),
                 AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
        CHECK_RC(fl->sign("kp", 77, NULL, digest, 32, NULL, &len), AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
    }

    /* Generated symmetric key: HMAC sign + verify. */
    CHECK_RC(fl->load_key("sym"), AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
    CHECK_RC(fl->create_key_if_not_exists("sym", AZIOT_KEYS_KEY_USAGE_SIGN), AZIOT_KEYS_RC_OK);
    CHECK_RC(fl->load_key("sym"), AZIOT_KEYS_RC_OK);
    len = 0;
    CHECK_RC(fl->sign("sym", AZIOT_KEYS_SIGN_MECHANISM_HMAC_SHA256, NULL, (const unsigned char *)"msg", 3, NULL, &len),
             AZIOT_KEYS_RC_OK);
    CHECK(len == 32);
    CHECK_RC(fl->sign("sym", AZIOT_KEYS_SIGN_MECHANISM_HMAC_SHA256, NULL, (const unsigned char *)"msg", 3, buf, &len),
             AZIOT_KEYS_RC_OK);
    CHECK(len == 32);
    ok = -1;
    CHECK_RC(fl->verify("sym", AZIOT_KEYS_SIGN_MECHANISM_HMAC_SHA256, NULL, (const unsigned char *)"msg", 3, buf, len, &ok),
             AZIOT_KEYS_RC_OK);
    CHECK(ok != 0);
    buf[0] ^= 1;
    CHECK_RC(fl->verify("sym", AZIOT_KEYS_SIGN_MECHANISM_HMAC_SHA256, NULL, (const unsigned char *)"msg", 3, buf, len, &ok),
             AZIOT_KEYS_RC_OK);
    CHECK(ok == 0);
    CHECK_RC(fl->verify("sym", AZIOT_KEYS_SIGN_MECHANISM_HMAC_SHA256, NULL, (const unsigned char *)"msg", 3, buf, len, NULL),
             AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);

    /* Imported key: RFC 4231 test case 2. */
    CHECK_RC(fl->import_key("jefe", (const uint8_t *)"Jefe", 4, AZIOT_KEYS_KEY_USAGE_SIGN), AZIOT_KEYS_RC_OK);
    CHECK_RC(fl->import_key("jefe", NULL, 4, AZIOT_KEYS_KEY_USAGE_SIGN), AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
    len = sizeof(buf);
    CHECK_RC(fl->sign("jefe", AZIOT_KEYS_SIGN_MECHANISM_HMAC_SHA256, NULL,
                      (const unsigned char *)"what do ya want for nothing?", 28, buf, &len), AZIOT_KEYS_RC_OK);
    CHECK(len == 32 && memcmp(buf, "\x5b\xdc\xc1\x46\xbf\x60\x75\x4e\x6a\x04\x24\x26\x08\x95\x75\xc7"
                                   "\x5a\x00\x3f\x08\x9d\x27\x39\x83\x9d\xec\x58\xb9\x64\xec\x38\x43", 32) == 0);

    /* derive_key, and the DERIVED sign mechanism agrees with it. */
    len = 0;
    CHECK_RC(fl->derive_key("jefe", (const uint8_t *)"ctx", 3, NULL, &len), AZIOT_KEYS_RC_OK);
    CHECK(len == 32);
    len2 = 31;
    CHECK_RC(fl->derive_key("jefe", (const uint8_t *)"ctx", 3, buf, &len2), AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
    CHECK(len2 == 32);
    CHECK_RC(fl->derive_key("jefe", (const uint8_t *)"ctx", 3, buf, &len), AZIOT_KEYS_RC_OK);
    CHECK(len == 32);
    print_hex("DERIVED", buf, len);
    CHECK_RC(fl->derive_key("missing", (const uint8_t *)"ctx", 3, buf, &len), AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
    CHECK_RC(fl->import_key("derived", buf, 32, AZIOT_KEYS_KEY_USAGE_SIGN), AZIOT_KEYS_RC_OK);
    len = sizeof(buf);
    CHECK_RC(fl->sign("derived", AZIOT_KEYS_SIGN_MECHANISM_HMAC_SHA256, NULL, (const unsigned char *)"m", 1, buf, &len),
             AZIOT_KEYS_RC_OK);
    {
        AZIOT_KEYS_SIGN_DERIVED_PARAMETERS params;
        params.derivation_data = (const unsigned char *)"ctx";
        params.derivation_data_len = 3;
        params.mechanism = AZIOT_KEYS_SIGN_MECHANISM_HMAC_SHA256;
        params.parameters = NULL;
        len2 = sizeof(buf2);
        CHECK_RC(fl->sign("jefe", AZIOT_KEYS_SIGN_MECHANISM_DERIVED, &params, (const unsigned char *)"m", 1, buf2, &len2),
                 AZIOT_KEYS_RC_OK);
        CHECK(len2 == 32 && memcmp(buf, buf2, 32) == 0);
        params.mechanism = AZIOT_KEYS_SIGN_MECHANISM_ECDSA;
        CHECK_RC(fl->sign("jefe", AZIOT_KEYS_SIGN_MECHANISM_DERIVED, &params, (const unsigned char *)"m", 1, buf2, &len2),
                 AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
    }

    /* AEAD round trip (plain and derived). */
    CHECK_RC(fl->create_key_if_not_exists("aes", AZIOT_KEYS_KEY_USAGE_ENCRYPT), AZIOT_KEYS_RC_OK);
    {
        AZIOT_KEYS_ENCRYPT_AEAD_PARAMETERS aead;
        AZIOT_KEYS_ENCRYPT_DERIVED_PARAMETERS derived;
        const char *pt = "attack at dawn";
        aead.iv = (const unsigned char *)"123456789012";
        aead.iv_len = 12;
        aead.aad = (const unsigned char *)"aad";
        aead.aad_len = 3;
        len = 0;
        CHECK_RC(fl->encrypt("aes", AZIOT_KEYS_ENCRYPT_MECHANISM_AEAD, &aead, (const unsigned char *)pt, 14, NULL, &len),
                 AZIOT_KEYS_RC_OK);
        CHECK(len == 1 + 14 + 16);
        CHECK_RC(fl->encrypt("aes", AZIOT_KEYS_ENCRYPT_MECHANISM_AEAD, &aead, (const unsigned char *)pt, 14, buf, &len),
                 AZIOT_KEYS_RC_OK);
        CHECK(len == 31 && buf[0] == 0x02);
        len2 = 0;
        CHECK_RC(fl->decrypt("aes", AZIOT_KEYS_ENCRYPT_MECHANISM_AEAD, &aead, buf, len, NULL, &len2), AZIOT_KEYS_RC_OK);
        CHECK(len2 >= 14);
        len2 = sizeof(buf2);
        CHECK_RC(fl->decrypt("aes", AZIOT_KEYS_ENCRYPT_MECHANISM_AEAD, &aead, buf, len, buf2, &len2), AZIOT_KEYS_RC_OK);
        CHECK(len2 == 14 && memcmp(buf2, pt, 14) == 0);
        buf[5] ^= 0x80;
        len2 = sizeof(buf2);
        CHECK_RC(fl->decrypt("aes", AZIOT_KEYS_ENCRYPT_MECHANISM_AEAD, &aead, buf, len, buf2, &len2),
                 AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
        CHECK_RC(fl->decrypt("aes", AZIOT_KEYS_ENCRYPT_MECHANISM_AEAD, &aead, buf, 10, buf2, &len2),
                 AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
        CHECK_RC(fl->encrypt("aes", AZIOT_KEYS_ENCRYPT_MECHANISM_AEAD, NULL, (const unsigned char *)pt, 14, buf, &len),
                 AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
        CHECK_RC(fl->decrypt("aes", AZIOT_KEYS_ENCRYPT_MECHANISM_RSA_PKCS1, NULL, buf, 31, buf2, &len2),
                 AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);

        derived.derivation_data = (const unsigned char *)"ctx";
        derived.derivation_data_len = 3;
        derived.mechanism = AZIOT_KEYS_ENCRYPT_MECHANISM_AEAD;
        derived.parameters = &aead;
        len = sizeof(buf);
        CHECK_RC(fl->encrypt("aes", AZIOT_KEYS_ENCRYPT_MECHANISM_DERIVED, &derived, (const unsigned char *)pt, 14, buf, &len),
                 AZIOT_KEYS_RC_OK);
        CHECK(len == 31 && buf[0] == 0x02);
        len2 = sizeof(buf2);
        CHECK_RC(fl->decrypt("aes", AZIOT_KEYS_ENCRYPT_MECHANISM_DERIVED, &derived, buf, len, buf2, &len2), AZIOT_KEYS_RC_OK);
        CHECK(len2 == 14 && memcmp(buf2, pt, 14) == 0);
        len2 = sizeof(buf2);
        CHECK_RC(fl->decrypt("aes", AZIOT_KEYS_ENCRYPT_MECHANISM_AEAD, &aead, buf, len, buf2, &len2),
                 AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
        derived.mechanism = AZIOT_KEYS_ENCRYPT_MECHANISM_RSA_PKCS1;
        CHECK_RC(fl->encrypt("aes", AZIOT_KEYS_ENCRYPT_MECHANISM_DERIVED, &derived, (const unsigned char *)pt, 14, buf, &len),
                 AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
    }

    /* Key pair / symmetric key separation (spec quirk 3 recommendation). */
    CHECK_RC(fl->load_key("kp"), AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
    CHECK_RC(fl->create_key_pair_if_not_exists("sym", NULL), AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
    CHECK_RC(fl->load_key_pair("sym"), AZIOT_KEYS_RC_ERR_EXTERNAL);

    /* Move and delete (2.1 only). */
    CHECK_RC(fl->move_key_pair("kp", "kp2"), AZIOT_KEYS_RC_OK);
    CHECK_RC(fl->load_key_pair("kp"), AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
    CHECK_RC(fl->load_key_pair("kp2"), AZIOT_KEYS_RC_OK);
    CHECK_RC(fl->move_key_pair("kp", "kp3"), AZIOT_KEYS_RC_ERR_EXTERNAL);
    CHECK_RC(fl->delete_key_pair("kp2"), AZIOT_KEYS_RC_OK);
    CHECK_RC(fl->delete_key_pair("kp2"), AZIOT_KEYS_RC_OK);
    CHECK_RC(fl->load_key_pair("kp2"), AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);
    CHECK_RC(fl->delete_key("sym"), AZIOT_KEYS_RC_OK);
    CHECK_RC(fl->load_key("sym"), AZIOT_KEYS_RC_ERR_INVALID_PARAMETER);

    printf("OK %d\n", failures);
    return 0;
}
