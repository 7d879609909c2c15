/*
 * A PKCS#11 module for tests/pkcs11/fallback.rs: SoftHSM2 (path in SOFTHSM_PATH, set at compile
 * time) minus secret keys of the HMAC kind, so that the symmetric-key creation fallback of
 * spec/keyd.md §7.6 can be exercised:
 *   C_GenerateKey with CKM_GENERIC_SECRET_KEY_GEN  -> CKR_MECHANISM_INVALID
 *   C_CreateObject with CKA_CLASS = CKO_SECRET_KEY -> CKR_TEMPLATE_INCONSISTENT
 * Everything else (key pairs, AES generation, AES-GCM, HMAC with existing keys) is SoftHSM2's.
 *
 * Self-contained (no pkcs11.h needed): only the few types and constants used below, with the
 * layouts of PKCS#11 v2.40 on LP64. CK_FUNCTION_LIST is a CK_VERSION followed by 68 function
 * pointers; C_CreateObject is the 21st and C_GenerateKey the 59th (index 20 and 58).
 */

#include <dlfcn.h>
#include <stddef.h>
#include <string.h>

typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_RV;
typedef CK_ULONG CK_SESSION_HANDLE;
typedef CK_ULONG CK_OBJECT_HANDLE;

typedef struct {
    CK_ULONG type;
    void *pValue;
    CK_ULONG ulValueLen;
} CK_ATTRIBUTE;

typedef struct {
    CK_ULONG mechanism;
    void *pParameter;
    CK_ULONG ulParameterLen;
} CK_MECHANISM;

#define FUNCTIONS 68
#define IDX_CREATE_OBJECT 20
#define IDX_GENERATE_KEY 58

typedef struct {
    unsigned char version[2];
    void (*fn[FUNCTIONS])(void);
} CK_FUNCTION_LIST;

#define CKR_OK 0x0UL
#define CKR_GENERAL_ERROR 0x5UL
#define CKR_ARGUMENTS_BAD 0x7UL
#define CKR_MECHANISM_INVALID 0x70UL
#define CKR_TEMPLATE_INCONSISTENT 0xD1UL
#define CKA_CLASS 0x0UL
#define CKO_SECRET_KEY 0x4UL
#define CKM_GENERIC_SECRET_KEY_GEN 0x350UL

typedef CK_RV (*get_function_list_fn)(CK_FUNCTION_LIST **);
typedef CK_RV (*create_object_fn)(CK_SESSION_HANDLE, CK_ATTRIBUTE *, CK_ULONG, CK_OBJECT_HANDLE *);
typedef CK_RV (*generate_key_fn)(CK_SESSION_HANDLE, CK_MECHANISM *, CK_ATTRIBUTE *, CK_ULONG,
                                 CK_OBJECT_HANDLE *);

static CK_FUNCTION_LIST *inner;
static CK_FUNCTION_LIST shim;

static CK_RV shim_create_object(CK_SESSION_HANDLE session, CK_ATTRIBUTE *template, CK_ULONG count,
                                CK_OBJECT_HANDLE *object) {
    for (CK_ULONG i = 0; template != NULL && i < count; i++) {
        CK_ULONG class_;
        if (template[i].type == CKA_CLASS && template[i].pValue != NULL &&
            template[i].ulValueLen == sizeof class_) {
            memcpy(&class_, template[i].pValue, sizeof class_);
            if (class_ == CKO_SECRET_KEY) return CKR_TEMPLATE_INCONSISTENT;
        }
    }
    return ((create_object_fn)inner->fn[IDX_CREATE_OBJECT])(session, template, count, object);
}

static CK_RV shim_generate_key(CK_SESSION_HANDLE session, CK_MECHANISM *mechanism, CK_ATTRIBUTE *template,
                               CK_ULONG count, CK_OBJECT_HANDLE *key) {
    if (mechanism != NULL && mechanism->mechanism == CKM_GENERIC_SECRET_KEY_GEN) return CKR_MECHANISM_INVALID;
    return ((generate_key_fn)inner->fn[IDX_GENERATE_KEY])(session, mechanism, template, count, key);
}

CK_RV C_GetFunctionList(CK_FUNCTION_LIST **list) {
    if (list == NULL) return CKR_ARGUMENTS_BAD;
    if (inner == NULL) {
        void *lib = dlopen(SOFTHSM_PATH, RTLD_NOW | RTLD_LOCAL);
        if (lib == NULL) return CKR_GENERAL_ERROR;
        get_function_list_fn get = (get_function_list_fn)dlsym(lib, "C_GetFunctionList");
        if (get == NULL || get(&inner) != CKR_OK || inner == NULL) return CKR_GENERAL_ERROR;
        shim = *inner;
        shim.fn[IDX_CREATE_OBJECT] = (void (*)(void))shim_create_object;
        shim.fn[IDX_GENERATE_KEY] = (void (*)(void))shim_generate_key;
        /* C_GetFunctionList of the list itself (index 3) must hand out the shim again. */
        shim.fn[3] = (void (*)(void))C_GetFunctionList;
    }
    *list = &shim;
    return CKR_OK;
}
