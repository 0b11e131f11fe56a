/*
 * load_module: the PKCS#11 module at path, loaded with dlopen, and its
 * function list, for the standalone test programs; the program exits with
 * status 1 saying why when it cannot be had.
 */
#ifndef SIGIL_TEST_LOADMODULE_H
#define SIGIL_TEST_LOADMODULE_H

#include <dlfcn.h>
#include <p11-kit/pkcs11.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static CK_FUNCTION_LIST_PTR load_module(const char *path)
{
	void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
	if (!h) {
		fprintf(stderr, "dlopen: %s\n", dlerror());
		exit(1);
	}
	CK_C_GetFunctionList get = (CK_C_GetFunctionList)dlsym(h, "C_GetFunctionList");
	CK_FUNCTION_LIST_PTR list = NULL;
	CK_RV rv = get ? get(&list) : CKR_FUNCTION_NOT_SUPPORTED;
	if (rv != CKR_OK || !list) {
		fprintf(stderr, "C_GetFunctionList: %#lx\n", (unsigned long)rv);
		exit(1);
	}
	return list;
}

/* find_private_key finds the one private key labelled label on session s
 * into *key: CKR_OK, the module's error, or CKR_KEY_HANDLE_INVALID when
 * not exactly one key has that label. The search is finalized in any case. */
static CK_RV find_private_key(CK_FUNCTION_LIST_PTR f, CK_SESSION_HANDLE s, const char *label, CK_OBJECT_HANDLE *key)
{
	CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
	CK_ATTRIBUTE tmpl[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_LABEL, (void *)label, strlen(label)}};
	CK_OBJECT_HANDLE found[2];
	CK_ULONG n = 0;
	CK_RV rv = f->C_FindObjectsInit(s, tmpl, 2);
	if (rv != CKR_OK)
		return rv;
	rv = f->C_FindObjects(s, found, 2, &n);
	CK_RV frv = f->C_FindObjectsFinal(s);
	if (rv == CKR_OK)
		rv = frv;
	if (rv == CKR_OK && n != 1)
		rv = CKR_KEY_HANDLE_INVALID;
	if (rv == CKR_OK)
		*key = found[0];
	return rv;
}

#endif
