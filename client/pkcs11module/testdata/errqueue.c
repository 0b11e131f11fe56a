/*
 * errqueue: the module leaves the host's OpenSSL error queue as it found
 * it. The module runs on the host's threads and shares its libcrypto, so
 * an error it leaves behind is one a host using OpenSSL itself (the pkcs11
 * engine, a program reading ERR_get_error after its own call) takes for
 * its own. Before each call the host holds an error of its own, a mark and
 * a second error after the mark; after it, popping to the mark must remove
 * exactly the second and leave exactly the first.
 *
 * The calls: a C_Initialize that fails because the host's default
 * properties ask for a provider it does not have (EVP_MD_fetch fails), a
 * C_Initialize that succeeds, and hashed-mechanism signatures, single- and
 * multi-part, over MESSAGE. Each signature is printed as "LABEL HEX" for
 * the driver (errqueue_test.go) to verify.
 * Usage: errqueue MODULE MESSAGE. Prints "ok" last.
 */
#include <openssl/err.h>
#include <openssl/evp.h>
#include <p11-kit/pkcs11.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loadmodule.h"

static CK_FUNCTION_LIST *f;

static void fail(const char *what, CK_RV rv)
{
	fprintf(stderr, "errqueue: %s: rv 0x%lx\n", what, (unsigned long)rv);
	ERR_print_errors_fp(stderr);
	exit(1);
}

static void host_queue(void)
{
	ERR_clear_error();
	ERR_raise(ERR_LIB_USER, 42);
	ERR_set_mark();
	ERR_raise(ERR_LIB_USER, 43);
}

static void host_queue_unchanged(const char *what)
{
	/* The newest entry first: popping to the mark would also remove
	 * whatever the module added after the host's second error. */
	unsigned long last = ERR_peek_last_error();
	int popped = ERR_GET_LIB(last) == ERR_LIB_USER && ERR_GET_REASON(last) == 43 && ERR_pop_to_mark();
	unsigned long e = popped ? ERR_get_error() : 0;
	if (ERR_GET_LIB(e) != ERR_LIB_USER || ERR_GET_REASON(e) != 42 || ERR_peek_error() != 0) {
		fprintf(stderr, "errqueue: %s: the host's queue after the call:\n", what);
		ERR_print_errors_fp(stderr);
		exit(1);
	}
}

static CK_OBJECT_HANDLE find_key(CK_SESSION_HANDLE s, const char *label)
{
	CK_OBJECT_HANDLE key;
	CK_RV rv;
	if ((rv = find_private_key(f, s, label, &key)) != CKR_OK)
		fail("find key", rv);
	return key;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: errqueue MODULE MESSAGE\n");
		return 2;
	}
	const char *msg = argv[2];
	CK_ULONG msg_len = strlen(msg);
	f = load_module(argv[1]);
	CK_C_INITIALIZE_ARGS args = {.flags = CKF_OS_LOCKING_OK};
	CK_RV rv;

	if (!EVP_set_default_properties(NULL, "fips=yes"))
		fail("EVP_set_default_properties", 0);
	host_queue();
	if ((rv = f->C_Initialize(&args)) != CKR_GENERAL_ERROR)
		fail("C_Initialize without the digests: want CKR_GENERAL_ERROR", rv);
	host_queue_unchanged("C_Initialize that failed");
	if (!EVP_set_default_properties(NULL, ""))
		fail("EVP_set_default_properties", 0);

	host_queue();
	if ((rv = f->C_Initialize(&args)) != CKR_OK)
		fail("C_Initialize", rv);
	host_queue_unchanged("C_Initialize");

	CK_SESSION_HANDLE s;
	if ((rv = f->C_OpenSession(1, CKF_SERIAL_SESSION, NULL, NULL, &s)) != CKR_OK)
		fail("C_OpenSession", rv);
	static const struct {
		const char *label, *key;
		CK_MECHANISM_TYPE mech;
		int parts;
	} cases[] = {
		{"ecdsa-sha256", "p256", CKM_ECDSA_SHA256, 1},
		{"ecdsa-sha384-parts", "p384", CKM_ECDSA_SHA384, 2},
		{"rsa-sha256", "rsa", CKM_SHA256_RSA_PKCS, 1},
		{"rsa-sha512-parts", "rsa", CKM_SHA512_RSA_PKCS, 2},
	};
	for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
		CK_OBJECT_HANDLE key = find_key(s, cases[i].key);
		CK_MECHANISM m = {cases[i].mech, NULL, 0};
		unsigned char sig[512];
		CK_ULONG n = sizeof sig;
		host_queue();
		if ((rv = f->C_SignInit(s, &m, key)) != CKR_OK)
			fail(cases[i].label, rv);
		if (cases[i].parts == 1) {
			rv = f->C_Sign(s, (CK_BYTE_PTR)msg, msg_len, sig, &n);
		} else if ((rv = f->C_SignUpdate(s, (CK_BYTE_PTR)msg, msg_len / 2)) == CKR_OK &&
			   (rv = f->C_SignUpdate(s, (CK_BYTE_PTR)msg + msg_len / 2, msg_len - msg_len / 2)) == CKR_OK) {
			rv = f->C_SignFinal(s, sig, &n);
		}
		if (rv != CKR_OK)
			fail(cases[i].label, rv);
		host_queue_unchanged(cases[i].label);
		printf("%s ", cases[i].label);
		for (CK_ULONG j = 0; j < n; j++)
			printf("%02x", sig[j]);
		printf("\n");
	}
	f->C_CloseSession(s);
	if ((rv = f->C_Finalize(NULL)) != CKR_OK)
		fail("C_Finalize", rv);
	printf("ok\n");
	return 0;
}
