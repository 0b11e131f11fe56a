/*
 * stubs.c: the PKCS#11 v2.40 functions this front does not offer, and the
 * function list. Generated once from p11-kit's pkcs11.h prototypes (so the
 * compiler checks every signature against the header).
 */
#include "sigil.h"

#define EXPORT __attribute__((visibility("default")))

EXPORT CK_RV C_InitToken(CK_SLOT_ID slot_id, unsigned char *pin, unsigned long pin_len, unsigned char *label)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_InitPIN(CK_SESSION_HANDLE session, unsigned char *pin, unsigned long pin_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_SetPIN(CK_SESSION_HANDLE session, unsigned char *old_pin, unsigned long old_len, unsigned char *new_pin, unsigned long new_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_GetOperationState(CK_SESSION_HANDLE session, unsigned char *operation_state, unsigned long *operation_state_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_SetOperationState(CK_SESSION_HANDLE session, unsigned char *operation_state, unsigned long operation_state_len, CK_OBJECT_HANDLE encryption_key, CK_OBJECT_HANDLE authentiation_key)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_CreateObject(CK_SESSION_HANDLE session, CK_ATTRIBUTE_PTR templ, unsigned long count, CK_OBJECT_HANDLE *object)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_CopyObject(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object, CK_ATTRIBUTE_PTR templ, unsigned long count, CK_OBJECT_HANDLE *new_object)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_DestroyObject(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_GetObjectSize(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object, unsigned long *size)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_SetAttributeValue(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object, CK_ATTRIBUTE_PTR templ, unsigned long count)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_EncryptInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_Encrypt(CK_SESSION_HANDLE session, unsigned char *data, unsigned long data_len, unsigned char *encrypted_data, unsigned long *encrypted_data_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_EncryptUpdate(CK_SESSION_HANDLE session, unsigned char *part, unsigned long part_len, unsigned char *encrypted_part, unsigned long *encrypted_part_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_EncryptFinal(CK_SESSION_HANDLE session, unsigned char *last_encrypted_part, unsigned long *last_encrypted_part_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_DecryptInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_Decrypt(CK_SESSION_HANDLE session, unsigned char *encrypted_data, unsigned long encrypted_data_len, unsigned char *data, unsigned long *data_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_DecryptUpdate(CK_SESSION_HANDLE session, unsigned char *encrypted_part, unsigned long encrypted_part_len, unsigned char *part, unsigned long *part_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_DecryptFinal(CK_SESSION_HANDLE session, unsigned char *last_part, unsigned long *last_part_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_DigestInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_Digest(CK_SESSION_HANDLE session, unsigned char *data, unsigned long data_len, unsigned char *digest, unsigned long *digest_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_DigestUpdate(CK_SESSION_HANDLE session, unsigned char *part, unsigned long part_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_DigestKey(CK_SESSION_HANDLE session, CK_OBJECT_HANDLE key)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_DigestFinal(CK_SESSION_HANDLE session, unsigned char *digest, unsigned long *digest_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_SignRecoverInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_SignRecover(CK_SESSION_HANDLE session, unsigned char *data, unsigned long data_len, unsigned char *signature, unsigned long *signature_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_VerifyInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_Verify(CK_SESSION_HANDLE session, unsigned char *data, unsigned long data_len, unsigned char *signature, unsigned long signature_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_VerifyUpdate(CK_SESSION_HANDLE session, unsigned char *part, unsigned long part_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_VerifyFinal(CK_SESSION_HANDLE session, unsigned char *signature, unsigned long signature_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_VerifyRecoverInit(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE key)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_VerifyRecover(CK_SESSION_HANDLE session, unsigned char *signature, unsigned long signature_len, unsigned char *data, unsigned long *data_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_DigestEncryptUpdate(CK_SESSION_HANDLE session, unsigned char *part, unsigned long part_len, unsigned char *encrypted_part, unsigned long *encrypted_part_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_DecryptDigestUpdate(CK_SESSION_HANDLE session, unsigned char *encrypted_part, unsigned long encrypted_part_len, unsigned char *part, unsigned long *part_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_SignEncryptUpdate(CK_SESSION_HANDLE session, unsigned char *part, unsigned long part_len, unsigned char *encrypted_part, unsigned long *encrypted_part_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_DecryptVerifyUpdate(CK_SESSION_HANDLE session, unsigned char *encrypted_part, unsigned long encrypted_part_len, unsigned char *part, unsigned long *part_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_GenerateKey(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_ATTRIBUTE_PTR templ, unsigned long count, CK_OBJECT_HANDLE *key)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_GenerateKeyPair(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_ATTRIBUTE_PTR public_key_template, unsigned long public_key_attribute_count, CK_ATTRIBUTE_PTR private_key_template, unsigned long private_key_attribute_count, CK_OBJECT_HANDLE *public_key, CK_OBJECT_HANDLE *private_key)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_WrapKey(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE wrapping_key, CK_OBJECT_HANDLE key, unsigned char *wrapped_key, unsigned long *wrapped_key_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_UnwrapKey(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE unwrapping_key, unsigned char *wrapped_key, unsigned long wrapped_key_len, CK_ATTRIBUTE_PTR templ, unsigned long attribute_count, CK_OBJECT_HANDLE *key)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_DeriveKey(CK_SESSION_HANDLE session, CK_MECHANISM_PTR mechanism, CK_OBJECT_HANDLE base_key, CK_ATTRIBUTE_PTR templ, unsigned long attribute_count, CK_OBJECT_HANDLE *key)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_SeedRandom(CK_SESSION_HANDLE session, unsigned char *seed, unsigned long seed_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_GenerateRandom(CK_SESSION_HANDLE session, unsigned char *random_data, unsigned long random_len)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

EXPORT CK_RV C_GetFunctionStatus(CK_SESSION_HANDLE session)
{
	return CKR_FUNCTION_NOT_PARALLEL;
}

EXPORT CK_RV C_CancelFunction(CK_SESSION_HANDLE session)
{
	return CKR_FUNCTION_NOT_PARALLEL;
}

EXPORT CK_RV C_WaitForSlotEvent(CK_FLAGS flags, CK_SLOT_ID *slot, void *reserved)
{
	return CKR_FUNCTION_NOT_SUPPORTED;
}

static CK_FUNCTION_LIST function_list = {
	{CRYPTOKI_VERSION_MAJOR, CRYPTOKI_VERSION_MINOR},
	C_Initialize,
	C_Finalize,
	C_GetInfo,
	C_GetFunctionList,
	C_GetSlotList,
	C_GetSlotInfo,
	C_GetTokenInfo,
	C_GetMechanismList,
	C_GetMechanismInfo,
	C_InitToken,
	C_InitPIN,
	C_SetPIN,
	C_OpenSession,
	C_CloseSession,
	C_CloseAllSessions,
	C_GetSessionInfo,
	C_GetOperationState,
	C_SetOperationState,
	C_Login,
	C_Logout,
	C_CreateObject,
	C_CopyObject,
	C_DestroyObject,
	C_GetObjectSize,
	C_GetAttributeValue,
	C_SetAttributeValue,
	C_FindObjectsInit,
	C_FindObjects,
	C_FindObjectsFinal,
	C_EncryptInit,
	C_Encrypt,
	C_EncryptUpdate,
	C_EncryptFinal,
	C_DecryptInit,
	C_Decrypt,
	C_DecryptUpdate,
	C_DecryptFinal,
	C_DigestInit,
	C_Digest,
	C_DigestUpdate,
	C_DigestKey,
	C_DigestFinal,
	C_SignInit,
	C_Sign,
	C_SignUpdate,
	C_SignFinal,
	C_SignRecoverInit,
	C_SignRecover,
	C_VerifyInit,
	C_Verify,
	C_VerifyUpdate,
	C_VerifyFinal,
	C_VerifyRecoverInit,
	C_VerifyRecover,
	C_DigestEncryptUpdate,
	C_DecryptDigestUpdate,
	C_SignEncryptUpdate,
	C_DecryptVerifyUpdate,
	C_GenerateKey,
	C_GenerateKeyPair,
	C_WrapKey,
	C_UnwrapKey,
	C_DeriveKey,
	C_SeedRandom,
	C_GenerateRandom,
	C_GetFunctionStatus,
	C_CancelFunction,
	C_WaitForSlotEvent,
};


EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ppFunctionList)
{
	if (!ppFunctionList)
		return CKR_ARGUMENTS_BAD;
	*ppFunctionList = &function_list;
	return CKR_OK;
}
