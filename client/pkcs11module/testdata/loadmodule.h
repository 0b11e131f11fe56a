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

#endif
