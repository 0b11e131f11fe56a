/*
 * conformance: the PKCS#11 v2.40 rules a careful host relies on, checked
 * call by call against the base specification's text: C_GetAttributeValue's
 * five cases and their result codes (section 5.7), the variable-length
 * output convention of C_Sign and C_SignFinal (section 5.2: a length query
 * and a short buffer leave the operation active, and a retry signs), which
 * errors end a signing operation (section 5.12), session and login states
 * (sections 5.5, 5.6), search templates (section 5.7) and mechanism info
 * (the mechanisms' sections: key sizes in bits, the EC flags).
 * Usage: conformance MODULE, against an agent serving P-256 "p256", P-384
 * "p384", RSA-2048 "rsa" and Ed25519 "ed". Prints "FAIL: ..." for each rule
 * broken, then "signatures N" (the Sign requests the agent should have
 * seen) and "ok" when none was.
 */
#include <p11-kit/pkcs11.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loadmodule.h"

static CK_FUNCTION_LIST *f;
static int failures;
static int signatures;

#define CHECK(cond, ...)                              \
	do {                                          \
		if (!(cond)) {                        \
			printf("FAIL: " __VA_ARGS__); \
			printf("\n");                 \
			failures++;                   \
		}                                     \
	} while (0)

static CK_SESSION_HANDLE open_session(CK_FLAGS flags)
{
	CK_SESSION_HANDLE s = 0;
	CK_RV rv = f->C_OpenSession(1, flags, NULL, NULL, &s);
	if (rv != CKR_OK) {
		printf("FAIL: C_OpenSession(%#lx): rv %#lx\n", (unsigned long)flags, (unsigned long)rv);
		exit(1);
	}
	return s;
}

/* find returns how many objects tmpl matches (up to 16), the first in *h. */
static CK_RV find(CK_SESSION_HANDLE s, CK_ATTRIBUTE *tmpl, CK_ULONG n, CK_ULONG *count, CK_OBJECT_HANDLE *h)
{
	CK_OBJECT_HANDLE found[16];
	*count = 0;
	CK_RV rv = f->C_FindObjectsInit(s, tmpl, n);
	if (rv != CKR_OK)
		return rv;
	rv = f->C_FindObjects(s, found, 16, count);
	f->C_FindObjectsFinal(s);
	if (rv == CKR_OK && *count && h)
		*h = found[0];
	return rv;
}

static CK_OBJECT_HANDLE key(CK_SESSION_HANDLE s, CK_OBJECT_CLASS cls, const char *label)
{
	CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_LABEL, (void *)label, strlen(label)}};
	CK_ULONG n = 1;
	CK_OBJECT_HANDLE h = 0;
	CK_RV rv = cls == CKO_PRIVATE_KEY ? find_private_key(f, s, label, &h) : find(s, t, 2, &n, &h);
	if (rv != CKR_OK || n != 1) {
		printf("FAIL: finding %s (class %lu): rv %#lx, %lu objects\n", label, (unsigned long)cls, (unsigned long)rv, (unsigned long)n);
		exit(1);
	}
	return h;
}

/* Section 5.7, C_GetAttributeValue: each attribute of the template is
 * answered on its own (sensitive, invalid, a length query, copied, too
 * small), the others filled whatever happens to one, and the call returns
 * one of the codes that applies. */
static void attributes(CK_SESSION_HANDLE s)
{
	CK_OBJECT_HANDLE priv = key(s, CKO_PRIVATE_KEY, "p256");
	unsigned char label[64], id[1], big[256];
	CK_ATTRIBUTE t[] = {
		{CKA_LABEL, label, sizeof label},   /* case 4: copied */
		{CKA_VALUE, big, sizeof big},       /* case 1: sensitive */
		{CKA_CERTIFICATE_TYPE, big, 8},     /* case 2: not a key's */
		{CKA_ID, id, sizeof id},            /* case 5: too small */
		{CKA_EC_PARAMS, NULL, 0},           /* case 3: a length query */
	};
	CK_RV rv = f->C_GetAttributeValue(s, priv, t, 5);
	CHECK(rv == CKR_ATTRIBUTE_SENSITIVE || rv == CKR_ATTRIBUTE_TYPE_INVALID || rv == CKR_BUFFER_TOO_SMALL,
	      "C_GetAttributeValue of mixed cases: rv %#lx", (unsigned long)rv);
	CHECK(t[0].ulValueLen == 4 && memcmp(label, "p256", 4) == 0, "CKA_LABEL beside failing attributes: length %lu", (unsigned long)t[0].ulValueLen);
	CHECK(t[1].ulValueLen == CK_UNAVAILABLE_INFORMATION, "sensitive CKA_VALUE: length %#lx", (unsigned long)t[1].ulValueLen);
	CHECK(t[2].ulValueLen == CK_UNAVAILABLE_INFORMATION, "invalid attribute: length %#lx", (unsigned long)t[2].ulValueLen);
	CHECK(t[3].ulValueLen == CK_UNAVAILABLE_INFORMATION, "CKA_ID into 1 byte: length %#lx", (unsigned long)t[3].ulValueLen);
	CHECK(t[4].ulValueLen == 10, "CKA_EC_PARAMS length query: %lu, want 10", (unsigned long)t[4].ulValueLen);

	/* Each case alone gives its own code. */
	struct {
		CK_ATTRIBUTE a;
		CK_RV want;
		const char *what;
	} one[] = {
		{{CKA_VALUE, NULL, 0}, CKR_ATTRIBUTE_SENSITIVE, "private CKA_VALUE length query"},
		{{CKA_VENDOR_DEFINED | 0x5157, NULL, 0}, CKR_ATTRIBUTE_TYPE_INVALID, "a vendor attribute"},
		{{CKA_ID, id, sizeof id}, CKR_BUFFER_TOO_SMALL, "CKA_ID into 1 byte"},
	};
	for (size_t i = 0; i < sizeof one / sizeof one[0]; i++) {
		CK_ATTRIBUTE a = one[i].a;
		rv = f->C_GetAttributeValue(s, priv, &a, 1);
		CHECK(rv == one[i].want, "%s: rv %#lx, want %#lx", one[i].what, (unsigned long)rv, (unsigned long)one[i].want);
		CHECK(a.ulValueLen == CK_UNAVAILABLE_INFORMATION, "%s: length %#lx", one[i].what, (unsigned long)a.ulValueLen);
	}
	/* Case 1 is for an attribute the key has and will not reveal; one its
	 * type of key does not have at all is case 2, whatever the name. */
	struct {
		const char *key;
		CK_ATTRIBUTE_TYPE type;
		CK_RV want;
	} kinds[] = {
		{"p256", CKA_VALUE, CKR_ATTRIBUTE_SENSITIVE},
		{"p256", CKA_PRIME_1, CKR_ATTRIBUTE_TYPE_INVALID},
		{"p256", CKA_PRIVATE_EXPONENT, CKR_ATTRIBUTE_TYPE_INVALID},
		{"ed", CKA_VALUE, CKR_ATTRIBUTE_SENSITIVE},
		{"ed", CKA_COEFFICIENT, CKR_ATTRIBUTE_TYPE_INVALID},
		{"rsa", CKA_PRIVATE_EXPONENT, CKR_ATTRIBUTE_SENSITIVE},
		{"rsa", CKA_PRIME_2, CKR_ATTRIBUTE_SENSITIVE},
		{"rsa", CKA_COEFFICIENT, CKR_ATTRIBUTE_SENSITIVE},
		{"rsa", CKA_VALUE, CKR_ATTRIBUTE_TYPE_INVALID},
	};
	for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
		CK_ATTRIBUTE a = {kinds[i].type, NULL, 0};
		rv = f->C_GetAttributeValue(s, key(s, CKO_PRIVATE_KEY, kinds[i].key), &a, 1);
		CHECK(rv == kinds[i].want && a.ulValueLen == CK_UNAVAILABLE_INFORMATION, "%s private key, attribute %#lx: rv %#lx length %#lx, want rv %#lx",
		      kinds[i].key, (unsigned long)kinds[i].type, (unsigned long)rv, (unsigned long)a.ulValueLen, (unsigned long)kinds[i].want);
	}
	/* An attribute of length 0 copies nothing and is OK into any buffer. */
	CK_ATTRIBUTE empty = {CKA_START_DATE, NULL, 0};
	rv = f->C_GetAttributeValue(s, priv, &empty, 1);
	CHECK(rv == CKR_OK && empty.ulValueLen == 0, "CKA_START_DATE: rv %#lx length %lu", (unsigned long)rv, (unsigned long)empty.ulValueLen);
	rv = f->C_GetAttributeValue(s, 0, &empty, 1);
	CHECK(rv == CKR_OBJECT_HANDLE_INVALID, "object handle 0: rv %#lx", (unsigned long)rv);
}

/* Section 5.2: a length query (NULL buffer) and a short buffer answer the
 * exact length and leave the operation active; the retry signs. */
static void sign_lengths(CK_SESSION_HANDLE s, const char *label, CK_MECHANISM_TYPE mech, CK_ULONG data_len, CK_ULONG want, int multi)
{
	CK_OBJECT_HANDLE k = key(s, CKO_PRIVATE_KEY, label);
	unsigned char data[64] = {1, 2, 3}, sig[512];
	CK_MECHANISM m = {mech, NULL, 0};
	CK_ULONG n = 0;
	const char *fn = multi ? "C_SignFinal" : "C_Sign";
	CK_RV rv = f->C_SignInit(s, &m, k);
	CHECK(rv == CKR_OK, "%s %#lx: C_SignInit: rv %#lx", label, (unsigned long)mech, (unsigned long)rv);
	if (rv != CKR_OK)
		return;
	if (multi) {
		rv = f->C_SignUpdate(s, data, data_len);
		CHECK(rv == CKR_OK, "%s: C_SignUpdate: rv %#lx", label, (unsigned long)rv);
	}
#define SIGN(buf, len) (multi ? f->C_SignFinal(s, buf, len) : f->C_Sign(s, data, data_len, buf, len))
	rv = SIGN(NULL, &n);
	CHECK(rv == CKR_OK && n == want, "%s %s length query: rv %#lx length %lu, want %lu", label, fn, (unsigned long)rv, (unsigned long)n, (unsigned long)want);
	n = want - 1;
	rv = SIGN(sig, &n);
	CHECK(rv == CKR_BUFFER_TOO_SMALL && n == want, "%s %s into %lu bytes: rv %#lx length %lu", label, fn, (unsigned long)want - 1, (unsigned long)rv, (unsigned long)n);
	rv = f->C_SignInit(s, &m, k);
	CHECK(rv == CKR_OPERATION_ACTIVE, "%s C_SignInit with one active: rv %#lx", label, (unsigned long)rv);
	n = sizeof sig;
	rv = SIGN(sig, &n);
	CHECK(rv == CKR_OK && n == want, "%s %s after a short buffer: rv %#lx length %lu", label, fn, (unsigned long)rv, (unsigned long)n);
	if (rv == CKR_OK)
		signatures++;
	rv = SIGN(sig, &n);
	CHECK(rv == CKR_OPERATION_NOT_INITIALIZED, "%s %s after signing: rv %#lx", label, fn, (unsigned long)rv);
#undef SIGN
}

/* Errors other than CKR_BUFFER_TOO_SMALL end the operation (section 5.12);
 * refused parameters fail C_SignInit and leave no operation behind. */
static void sign_errors(CK_SESSION_HANDLE s)
{
	CK_OBJECT_HANDLE ec = key(s, CKO_PRIVATE_KEY, "p256"), rsa = key(s, CKO_PRIVATE_KEY, "rsa");
	unsigned char data[100] = {0}, sig[512];
	CK_ULONG n = sizeof sig;
	CK_MECHANISM ecdsa = {CKM_ECDSA, NULL, 0};
	CK_RV rv;
	CK_ULONG bad_lens[] = {0, 20, 28, 33, 65};
	for (size_t i = 0; i < sizeof bad_lens / sizeof bad_lens[0]; i++) {
		f->C_SignInit(s, &ecdsa, ec);
		n = sizeof sig;
		rv = f->C_Sign(s, data, bad_lens[i], sig, &n);
		CHECK(rv == CKR_DATA_LEN_RANGE, "CKM_ECDSA over %lu bytes: rv %#lx", (unsigned long)bad_lens[i], (unsigned long)rv);
		rv = f->C_SignInit(s, &ecdsa, ec);
		CHECK(rv == CKR_OK, "C_SignInit after CKM_ECDSA's DATA_LEN_RANGE: rv %#lx (operation left active)", (unsigned long)rv);
		f->C_Sign(s, data, 32, NULL, &n); /* still active after a query */
		n = sizeof sig;
		rv = f->C_Sign(s, data, 32, sig, &n);
		CHECK(rv == CKR_OK && n == 64, "CKM_ECDSA after a refusal: rv %#lx length %lu", (unsigned long)rv, (unsigned long)n);
		if (rv == CKR_OK)
			signatures++;
	}

	/* CKM_RSA_PKCS takes at most k-11 bytes (v2.40 curr. mechs. section
	 * 2.1.6): more is a bad length, whatever the bytes are. */
	CK_MECHANISM pkcs = {CKM_RSA_PKCS, NULL, 0};
	unsigned char long_data[300] = {0x30};
	struct {
		CK_ULONG len;
		CK_RV want;
	} pkcs_in[] = {{51, CKR_DATA_INVALID}, {245, CKR_DATA_INVALID}, {246, CKR_DATA_LEN_RANGE}, {300, CKR_DATA_LEN_RANGE}};
	for (size_t i = 0; i < sizeof pkcs_in / sizeof pkcs_in[0]; i++) {
		f->C_SignInit(s, &pkcs, rsa);
		n = sizeof sig;
		rv = f->C_Sign(s, long_data, pkcs_in[i].len, sig, &n); /* no DigestInfo */
		CHECK(rv == pkcs_in[i].want, "CKM_RSA_PKCS over %lu bytes (no DigestInfo), 2048-bit key: rv %#lx, want %#lx", (unsigned long)pkcs_in[i].len, (unsigned long)rv, (unsigned long)pkcs_in[i].want);
		CHECK(f->C_Sign(s, long_data, 51, sig, &n) == CKR_OPERATION_NOT_INITIALIZED, "CKM_RSA_PKCS refusal left the operation active");
	}

	struct {
		CK_MECHANISM_TYPE mech;
		CK_RSA_PKCS_PSS_PARAMS p;
		CK_ULONG plen;
		const char *what;
	} pss[] = {
		{CKM_RSA_PKCS_PSS, {CKM_SHA256, CKG_MGF1_SHA384, 32}, sizeof(CK_RSA_PKCS_PSS_PARAMS), "MGF1 of another hash"},
		{CKM_RSA_PKCS_PSS, {CKM_SHA256, CKG_MGF1_SHA256, 0}, sizeof(CK_RSA_PKCS_PSS_PARAMS), "salt 0"},
		{CKM_RSA_PKCS_PSS, {CKM_SHA_1, CKG_MGF1_SHA1, 20}, sizeof(CK_RSA_PKCS_PSS_PARAMS), "SHA-1"},
		{CKM_RSA_PKCS_PSS, {CKM_SHA256, CKG_MGF1_SHA256, 32}, sizeof(CK_RSA_PKCS_PSS_PARAMS) - 1, "short parameters"},
		{CKM_SHA384_RSA_PKCS_PSS, {CKM_SHA256, CKG_MGF1_SHA256, 32}, sizeof(CK_RSA_PKCS_PSS_PARAMS), "SHA-256 for SHA384_RSA_PKCS_PSS"},
	};
	for (size_t i = 0; i < sizeof pss / sizeof pss[0]; i++) {
		CK_MECHANISM m = {pss[i].mech, &pss[i].p, pss[i].plen};
		rv = f->C_SignInit(s, &m, rsa);
		CHECK(rv == CKR_MECHANISM_PARAM_INVALID, "PSS %s: rv %#lx", pss[i].what, (unsigned long)rv);
		if (rv == CKR_OK)
			f->C_Sign(s, data, 0, sig, &n);
	}
	CK_RSA_PKCS_PSS_PARAMS good = {CKM_SHA256, CKG_MGF1_SHA256, 32};
	CK_MECHANISM m = {CKM_RSA_PKCS_PSS, &good, sizeof good};
	rv = f->C_SignInit(s, &m, rsa);
	CHECK(rv == CKR_OK, "PSS after refused parameters: rv %#lx", (unsigned long)rv);
	n = sizeof sig;
	rv = f->C_Sign(s, data, 48, sig, &n);
	CHECK(rv == CKR_DATA_LEN_RANGE, "PSS SHA-256 over a 48-byte digest: rv %#lx", (unsigned long)rv);

	/* C_Sign after C_SignUpdate: refused, and the operation ended. */
	f->C_SignInit(s, &ecdsa, ec);
	f->C_SignUpdate(s, data, 16);
	n = sizeof sig;
	rv = f->C_Sign(s, data, 32, sig, &n);
	CHECK(rv == CKR_OPERATION_ACTIVE, "C_Sign after C_SignUpdate: rv %#lx", (unsigned long)rv);
	CHECK(f->C_SignInit(s, &ecdsa, ec) == CKR_OK, "C_SignInit after the refused C_Sign");
	n = sizeof sig;
	CHECK(f->C_Sign(s, data, 0, sig, &n) == CKR_DATA_LEN_RANGE, "empty CKM_ECDSA");
}

/* Sections 5.5 and 5.6. */
static void sessions(void)
{
	CK_SESSION_HANDLE h = 0;
	CK_RV rv = f->C_OpenSession(1, CKF_RW_SESSION, NULL, NULL, &h);
	CHECK(rv == CKR_SESSION_PARALLEL_NOT_SUPPORTED, "C_OpenSession without CKF_SERIAL_SESSION: rv %#lx", (unsigned long)rv);
	rv = f->C_OpenSession(7, CKF_SERIAL_SESSION, NULL, NULL, &h);
	CHECK(rv == CKR_SLOT_ID_INVALID, "C_OpenSession on slot 7: rv %#lx", (unsigned long)rv);

	CK_SLOT_ID slots[2];
	CK_ULONG n = 0;
	rv = f->C_GetSlotList(CK_TRUE, NULL, &n);
	CHECK(rv == CKR_OK && n == 1, "C_GetSlotList length query: rv %#lx count %lu", (unsigned long)rv, (unsigned long)n);
	n = 0;
	rv = f->C_GetSlotList(CK_TRUE, slots, &n);
	CHECK(rv == CKR_BUFFER_TOO_SMALL && n == 1, "C_GetSlotList into 0: rv %#lx count %lu", (unsigned long)rv, (unsigned long)n);
	n = 2;
	rv = f->C_GetSlotList(CK_FALSE, slots, &n);
	CHECK(rv == CKR_OK && n == 1 && slots[0] == 1, "C_GetSlotList: rv %#lx count %lu", (unsigned long)rv, (unsigned long)n);

	CK_SESSION_HANDLE ro = open_session(CKF_SERIAL_SESSION), rw = open_session(CKF_SERIAL_SESSION | CKF_RW_SESSION);
	CK_SESSION_INFO si;
	rv = f->C_Logout(ro);
	CHECK(rv == CKR_USER_NOT_LOGGED_IN, "C_Logout without a login: rv %#lx", (unsigned long)rv);
	rv = f->C_Login(ro, CKU_USER, (CK_UTF8CHAR_PTR) "0000", 4);
	CHECK(rv == CKR_OK, "C_Login: rv %#lx", (unsigned long)rv);
	rv = f->C_Login(rw, CKU_USER, (CK_UTF8CHAR_PTR) "0000", 4);
	CHECK(rv == CKR_USER_ALREADY_LOGGED_IN, "second C_Login on another session: rv %#lx", (unsigned long)rv);
	f->C_GetSessionInfo(ro, &si);
	CHECK(si.state == CKS_RO_USER_FUNCTIONS, "read-only session after login: state %lu", (unsigned long)si.state);
	f->C_GetSessionInfo(rw, &si);
	CHECK(si.state == CKS_RW_USER_FUNCTIONS && (si.flags & (CKF_RW_SESSION | CKF_SERIAL_SESSION)) == (CKF_RW_SESSION | CKF_SERIAL_SESSION),
	      "read-write session after login: state %lu flags %#lx", (unsigned long)si.state, (unsigned long)si.flags);
	CK_SESSION_HANDLE later = open_session(CKF_SERIAL_SESSION);
	f->C_GetSessionInfo(later, &si);
	CHECK(si.state == CKS_RO_USER_FUNCTIONS, "session opened after login: state %lu", (unsigned long)si.state);
	CK_TOKEN_INFO ti;
	f->C_GetTokenInfo(1, &ti);
	CHECK(ti.ulSessionCount == 4 && ti.ulRwSessionCount == 1, "C_GetTokenInfo: %lu sessions, %lu read-write", (unsigned long)ti.ulSessionCount, (unsigned long)ti.ulRwSessionCount);
	rv = f->C_Logout(rw);
	CHECK(rv == CKR_OK, "C_Logout: rv %#lx", (unsigned long)rv);
	f->C_GetSessionInfo(ro, &si);
	CHECK(si.state == CKS_RO_PUBLIC_SESSION, "after C_Logout: state %lu", (unsigned long)si.state);

	rv = f->C_CloseSession(later);
	CHECK(rv == CKR_OK, "C_CloseSession: rv %#lx", (unsigned long)rv);
	rv = f->C_GetSessionInfo(later, &si);
	CHECK(rv == CKR_SESSION_HANDLE_INVALID, "closed session: rv %#lx", (unsigned long)rv);
	rv = f->C_CloseSession(later);
	CHECK(rv == CKR_SESSION_HANDLE_INVALID, "closed twice: rv %#lx", (unsigned long)rv);

	/* C_CloseAllSessions with a search and a signature active. */
	CK_OBJECT_HANDLE k = key(ro, CKO_PRIVATE_KEY, "p256");
	CK_MECHANISM m = {CKM_ECDSA, NULL, 0};
	f->C_SignInit(ro, &m, k);
	f->C_FindObjectsInit(rw, NULL, 0);
	f->C_Login(ro, CKU_USER, NULL, 0);
	rv = f->C_CloseAllSessions(1);
	CHECK(rv == CKR_OK, "C_CloseAllSessions: rv %#lx", (unsigned long)rv);
	unsigned char sig[64], dig[32] = {0};
	n = sizeof sig;
	rv = f->C_Sign(ro, dig, sizeof dig, sig, &n);
	CHECK(rv == CKR_SESSION_HANDLE_INVALID, "C_Sign after C_CloseAllSessions: rv %#lx", (unsigned long)rv);
	CK_SESSION_HANDLE again = open_session(CKF_SERIAL_SESSION);
	f->C_GetSessionInfo(again, &si);
	CHECK(si.state == CKS_RO_PUBLIC_SESSION, "login survived C_CloseAllSessions: state %lu", (unsigned long)si.state);
	f->C_CloseSession(again);
}

/* Section 5.7, C_FindObjectsInit: an exact byte-for-byte match with every
 * attribute of the template. */
static void search(CK_SESSION_HANDLE s)
{
	CK_OBJECT_HANDLE priv = key(s, CKO_PRIVATE_KEY, "p256");
	unsigned char id[64];
	CK_ATTRIBUTE ida = {CKA_ID, id, sizeof id};
	f->C_GetAttributeValue(s, priv, &ida, 1);
	CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY, pub = CKO_PUBLIC_KEY;
	CK_ULONG n;
	CK_OBJECT_HANDLE h = 0;
	CK_ATTRIBUTE byid[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_ID, id, ida.ulValueLen}};
	CK_RV rv = find(s, byid, 2, &n, &h);
	CHECK(rv == CKR_OK && n == 1 && h == priv, "CKA_CLASS + CKA_ID: rv %#lx, %lu objects", (unsigned long)rv, (unsigned long)n);
	CK_ATTRIBUTE byid_only[] = {{CKA_ID, id, ida.ulValueLen}};
	rv = find(s, byid_only, 1, &n, &h);
	CHECK(rv == CKR_OK && n == 2, "CKA_ID alone: rv %#lx, %lu objects, want 2", (unsigned long)rv, (unsigned long)n);
	CK_ATTRIBUTE nul[] = {{CKA_CLASS, &pub, sizeof pub}, {CKA_LABEL, "p256\0", 5}};
	rv = find(s, nul, 2, &n, &h);
	CHECK(rv == CKR_OK && n == 0, "CKA_LABEL with a trailing NUL: rv %#lx, %lu objects, want none (exact match)", (unsigned long)rv, (unsigned long)n);
	CK_ATTRIBUTE unknown[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_VENDOR_DEFINED | 0x5157, "x", 1}};
	rv = find(s, unknown, 2, &n, &h);
	CHECK((rv == CKR_OK && n == 0) || rv == CKR_ATTRIBUTE_TYPE_INVALID, "an attribute no object has: rv %#lx, %lu objects", (unsigned long)rv, (unsigned long)n);
	CK_ATTRIBUTE sensitive[] = {{CKA_VALUE, "x", 1}};
	rv = find(s, sensitive, 1, &n, &h);
	CHECK(rv == CKR_OK && n == 0, "CKA_VALUE template matched %lu objects: rv %#lx", (unsigned long)n, (unsigned long)rv);
	CK_BBOOL yes = CK_TRUE;
	CK_ATTRIBUTE signers[] = {{CKA_SIGN, &yes, sizeof yes}};
	rv = find(s, signers, 1, &n, &h);
	CHECK(rv == CKR_OK && n == 4, "CKA_SIGN true: rv %#lx, %lu objects, want 4", (unsigned long)rv, (unsigned long)n);

	rv = f->C_FindObjectsInit(s, NULL, 0);
	CHECK(rv == CKR_OK, "C_FindObjectsInit of everything: rv %#lx", (unsigned long)rv);
	rv = f->C_FindObjectsInit(s, NULL, 0);
	CHECK(rv == CKR_OPERATION_ACTIVE, "C_FindObjectsInit while one is active: rv %#lx", (unsigned long)rv);
	CK_OBJECT_HANDLE all[16];
	rv = f->C_FindObjects(s, all, 0, &n);
	CHECK(rv == CKR_OK && n == 0, "C_FindObjects of 0: rv %#lx, %lu", (unsigned long)rv, (unsigned long)n);
	CK_ULONG total = 0;
	while ((rv = f->C_FindObjects(s, all, 3, &n)) == CKR_OK && n)
		total += n;
	CHECK(rv == CKR_OK && total == 8, "C_FindObjects three at a time: rv %#lx, %lu objects, want 8", (unsigned long)rv, (unsigned long)total);
	CHECK(f->C_FindObjectsFinal(s) == CKR_OK, "C_FindObjectsFinal");
	rv = f->C_FindObjectsFinal(s);
	CHECK(rv == CKR_OPERATION_NOT_INITIALIZED, "C_FindObjectsFinal twice: rv %#lx", (unsigned long)rv);
	rv = f->C_FindObjects(s, all, 3, &n);
	CHECK(rv == CKR_OPERATION_NOT_INITIALIZED, "C_FindObjects after Final: rv %#lx", (unsigned long)rv);
}

/* Each mechanism's section: RSA and EC key sizes in bits, CKF_SIGN, and
 * for ECDSA the curve flags (CKF_EC_F_P, CKF_EC_NAMEDCURVE,
 * CKF_EC_UNCOMPRESS: v2.40 curr. mechs. section 2.3). */
static void mechanisms(void)
{
	CK_MECHANISM_TYPE list[32];
	CK_ULONG n = 0;
	CK_RV rv = f->C_GetMechanismList(1, NULL, &n);
	CHECK(rv == CKR_OK && n == 13, "C_GetMechanismList length query: rv %#lx count %lu", (unsigned long)rv, (unsigned long)n);
	n = 2;
	rv = f->C_GetMechanismList(1, list, &n);
	CHECK(rv == CKR_BUFFER_TOO_SMALL && n == 13, "C_GetMechanismList into 2: rv %#lx count %lu", (unsigned long)rv, (unsigned long)n);
	n = 32;
	rv = f->C_GetMechanismList(1, list, &n);
	CHECK(rv == CKR_OK && n == 13, "C_GetMechanismList: rv %#lx count %lu", (unsigned long)rv, (unsigned long)n);
	for (CK_ULONG i = 0; i < n && i < 32; i++) {
		CK_MECHANISM_INFO mi;
		rv = f->C_GetMechanismInfo(1, list[i], &mi);
		CHECK(rv == CKR_OK && (mi.flags & CKF_SIGN), "C_GetMechanismInfo %#lx: rv %#lx flags %#lx", (unsigned long)list[i], (unsigned long)rv, (unsigned long)mi.flags);
		CHECK(!(mi.flags & (CKF_VERIFY | CKF_ENCRYPT | CKF_DECRYPT | CKF_DIGEST | CKF_GENERATE_KEY_PAIR)), "mechanism %#lx claims a function the module lacks: flags %#lx", (unsigned long)list[i], (unsigned long)mi.flags);
		switch (list[i]) {
		case CKM_ECDSA: case CKM_ECDSA_SHA256: case CKM_ECDSA_SHA384: case CKM_ECDSA_SHA512:
			CHECK(mi.ulMinKeySize == 256 && mi.ulMaxKeySize == 384, "%#lx key sizes %lu-%lu, want 256-384 bits", (unsigned long)list[i], (unsigned long)mi.ulMinKeySize, (unsigned long)mi.ulMaxKeySize);
			CHECK((mi.flags & (CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS)) == (CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS), "%#lx EC flags %#lx", (unsigned long)list[i], (unsigned long)mi.flags);
			break;
		case CKM_EDDSA:
			break;
		default:
			CHECK(mi.ulMinKeySize == 2048 && mi.ulMaxKeySize == 2048, "%#lx key sizes %lu-%lu, want 2048 bits", (unsigned long)list[i], (unsigned long)mi.ulMinKeySize, (unsigned long)mi.ulMaxKeySize);
		}
	}
	CK_MECHANISM_INFO mi;
	rv = f->C_GetMechanismInfo(1, CKM_SHA1_RSA_PKCS, &mi);
	CHECK(rv == CKR_MECHANISM_INVALID, "C_GetMechanismInfo of an unlisted mechanism: rv %#lx", (unsigned long)rv);
	rv = f->C_GetMechanismInfo(9, CKM_ECDSA, &mi);
	CHECK(rv == CKR_SLOT_ID_INVALID, "C_GetMechanismInfo on slot 9: rv %#lx", (unsigned long)rv);
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: conformance MODULE\n");
		return 2;
	}
	f = load_module(argv[1]);
	CK_RV rv = f->C_Initialize(NULL);
	if (rv != CKR_OK) {
		printf("FAIL: C_Initialize: rv %#lx\n", (unsigned long)rv);
		return 1;
	}
	CK_SESSION_HANDLE s = open_session(CKF_SERIAL_SESSION);
	attributes(s);
	sign_lengths(s, "p256", CKM_ECDSA, 32, 64, 0);
	sign_lengths(s, "p384", CKM_ECDSA_SHA384, 10, 96, 0);
	sign_lengths(s, "p384", CKM_ECDSA_SHA384, 10, 96, 1);
	sign_lengths(s, "rsa", CKM_SHA256_RSA_PKCS, 10, 256, 0);
	sign_lengths(s, "rsa", CKM_SHA512_RSA_PKCS, 10, 256, 1);
	sign_lengths(s, "ed", CKM_EDDSA, 10, 64, 0);
	sign_lengths(s, "ed", CKM_EDDSA, 10, 64, 1);
	sign_errors(s);
	search(s);
	mechanisms();
	sessions();
	rv = f->C_Initialize(NULL);
	CHECK(rv == CKR_CRYPTOKI_ALREADY_INITIALIZED, "second C_Initialize: rv %#lx", (unsigned long)rv);
	rv = f->C_Finalize(&s);
	CHECK(rv == CKR_ARGUMENTS_BAD, "C_Finalize with pReserved: rv %#lx", (unsigned long)rv);
	rv = f->C_Finalize(NULL);
	CHECK(rv == CKR_OK, "C_Finalize: rv %#lx", (unsigned long)rv);
	rv = f->C_Finalize(NULL);
	CHECK(rv == CKR_CRYPTOKI_NOT_INITIALIZED, "C_Finalize twice: rv %#lx", (unsigned long)rv);
	CK_ULONG nslots;
	rv = f->C_GetSlotList(CK_TRUE, NULL, &nslots);
	CHECK(rv == CKR_CRYPTOKI_NOT_INITIALIZED, "C_GetSlotList after C_Finalize: rv %#lx", (unsigned long)rv);
	rv = f->C_GetSessionInfo(s, NULL);
	CHECK(rv == CKR_CRYPTOKI_NOT_INITIALIZED, "C_GetSessionInfo after C_Finalize: rv %#lx", (unsigned long)rv);
	printf("signatures %d\n", signatures);
	if (failures)
		return 1;
	printf("ok\n");
	return 0;
}
