/*
 * replyhost: a host that keeps using the module while the agent's replies
 * are mutated under it (replyhost_test.go serves them). Each round
 * searches the token, reads every object's attributes, and signs once
 * with each private key it found (length query, then the signature).
 *
 * Every call must return: the test bounds the run's time, and
 * AddressSanitizer (when the test built the module and this program with
 * it) reports a bad read or write. Each call's result is printed, one
 * line "CALL RV", and a signature whose length is not the length query's
 * is a failure here.
 *
 * usage: replyhost MODULE ROUNDS
 */
#include <p11-kit/pkcs11.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loadmodule.h"

static CK_FUNCTION_LIST_PTR f;

static CK_RV report(const char *call, CK_RV rv)
{
	printf("%s %#lx\n", call, (unsigned long)rv);
	return rv;
}

static void attributes(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o, CK_KEY_TYPE *kt)
{
	CK_OBJECT_CLASS cls = 0;
	CK_BYTE label[512], id[512], value[8192], subject[4096];
	CK_ATTRIBUTE t[] = {
		{CKA_CLASS, &cls, sizeof cls},
		{CKA_KEY_TYPE, kt, sizeof *kt},
		{CKA_LABEL, label, sizeof label},
		{CKA_ID, id, sizeof id},
		{CKA_VALUE, value, sizeof value},
		{CKA_SUBJECT, subject, sizeof subject},
	};
	/* Each alone: one the object lacks (CKA_KEY_TYPE of a certificate)
	 * makes the whole template's call an error. */
	for (size_t i = 0; i < sizeof t / sizeof t[0]; i++) {
		CK_ULONG cap = t[i].ulValueLen;
		report("C_GetAttributeValue", f->C_GetAttributeValue(s, o, &t[i], 1));
		if (t[i].ulValueLen != CK_UNAVAILABLE_INFORMATION && t[i].ulValueLen > cap) {
			fprintf(stderr, "replyhost: attribute %#lx of %lu bytes in a buffer of %lu\n",
				(unsigned long)t[i].type, (unsigned long)t[i].ulValueLen, (unsigned long)cap);
			exit(1);
		}
	}
}

static void sign(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key, CK_KEY_TYPE kt)
{
	static CK_BYTE digest[32] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
				     17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32};
	CK_MECHANISM m = {kt == CKK_RSA ? CKM_SHA256_RSA_PKCS : kt == CKK_EC_EDWARDS ? CKM_EDDSA : CKM_ECDSA, NULL, 0};
	if (report("C_SignInit", f->C_SignInit(s, &m, key)) != CKR_OK)
		return;
	CK_ULONG want = 0;
	if (report("C_Sign", f->C_Sign(s, digest, sizeof digest, NULL, &want)) != CKR_OK)
		return;
	/* The buffer is exactly what the length query said, with a guard
	 * word after it that must stay as it was. */
	CK_BYTE *sig = malloc(want + 8);
	if (!sig) {
		fprintf(stderr, "replyhost: malloc\n");
		exit(1);
	}
	memset(sig + want, 0xa5, 8);
	CK_ULONG got = want;
	if (report("C_Sign", f->C_Sign(s, digest, sizeof digest, sig, &got)) == CKR_OK && got != want) {
		fprintf(stderr, "replyhost: a signature of %lu bytes after a length query of %lu\n", (unsigned long)got, (unsigned long)want);
		exit(1);
	}
	for (int i = 0; i < 8; i++) {
		if (sig[want + i] != 0xa5) {
			fprintf(stderr, "replyhost: C_Sign wrote past the %lu bytes it asked for\n", (unsigned long)want);
			exit(1);
		}
	}
	free(sig);
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: replyhost MODULE ROUNDS\n");
		return 2;
	}
	f = load_module(argv[1]);
	(void)find_private_key; /* loadmodule.h's: this host signs with every key it finds */
	int rounds = atoi(argv[2]);
	if (report("C_Initialize", f->C_Initialize(NULL)) != CKR_OK)
		return 1;
	CK_SESSION_HANDLE s;
	if (report("C_OpenSession", f->C_OpenSession(1, CKF_SERIAL_SESSION, NULL, NULL, &s)) != CKR_OK)
		return 1;
	for (int r = 0; r < rounds; r++) {
		CK_OBJECT_HANDLE found[64];
		CK_ULONG n = 0;
		if (report("C_FindObjectsInit", f->C_FindObjectsInit(s, NULL, 0)) != CKR_OK)
			continue;
		report("C_FindObjects", f->C_FindObjects(s, found, 64, &n));
		report("C_FindObjectsFinal", f->C_FindObjectsFinal(s));
		for (CK_ULONG i = 0; i < n; i++) {
			CK_KEY_TYPE kt = (CK_KEY_TYPE)-1;
			CK_OBJECT_CLASS cls = 0;
			CK_ATTRIBUTE c = {CKA_CLASS, &cls, sizeof cls};
			attributes(s, found[i], &kt);
			if (f->C_GetAttributeValue(s, found[i], &c, 1) == CKR_OK && cls == CKO_PRIVATE_KEY)
				sign(s, found[i], kt);
		}
	}
	report("C_CloseSession", f->C_CloseSession(s));
	report("C_Finalize", f->C_Finalize(NULL));
	return 0;
}
