/*
 * finalizesign: C_Finalize while other threads are inside the module.
 * PKCS#11 v2.40 section 5.4 makes that the application's fault, but the
 * module lives in host processes (Java, NSS, OpenSSL engines) where a
 * crash is worse than an error: calls in flight must finish on state that
 * is still there, and calls that start after C_Finalize must answer
 * CKR_CRYPTOKI_NOT_INITIALIZED. Each round initializes the module, starts
 * three threads that sign in a loop (with a search and an attribute read
 * now and then: the connection pool, the session table and the key cache
 * all in use), waits until each has signed, then finalizes a varying time
 * later. A thread may see CKR_OK until the finalize and
 * CKR_CRYPTOKI_NOT_INITIALIZED after it; anything else, or a crash (run
 * under AddressSanitizer: a use after free), fails.
 * Usage: finalizesign MODULE KEY-LABEL. Prints "ok: N rounds ...".
 */
#include <p11-kit/pkcs11.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loadmodule.h"

#define THREADS 3
#define ROUNDS 30

static CK_FUNCTION_LIST *f;
static const char *label;
static int started; /* atomic: threads that have signed once this round */
static long signatures, refused;

static void fail(const char *what, CK_RV rv)
{
	fprintf(stderr, "finalizesign: %s: rv 0x%lx\n", what, (unsigned long)rv);
	exit(1);
}

/* gone: the module was finalized under the thread; any other error fails. */
static int gone(const char *what, CK_RV rv)
{
	if (rv == CKR_OK)
		return 0;
	if (rv == CKR_CRYPTOKI_NOT_INITIALIZED) {
		__atomic_add_fetch(&refused, 1, __ATOMIC_RELAXED);
		return 1;
	}
	fail(what, rv);
	return 1;
}

static int find_key(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE *key)
{
	CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
	CK_ATTRIBUTE tmpl[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_LABEL, (void *)label, strlen(label)}};
	CK_ULONG n = 0;
	if (gone("C_FindObjectsInit", f->C_FindObjectsInit(s, tmpl, 2)))
		return -1;
	if (gone("C_FindObjects", f->C_FindObjects(s, key, 1, &n)))
		return -1;
	if (n != 1)
		fail("C_FindObjects: no key", 0);
	return gone("C_FindObjectsFinal", f->C_FindObjectsFinal(s)) ? -1 : 0;
}

static void *signer(void *arg)
{
	(void)arg;
	CK_SESSION_HANDLE s;
	CK_OBJECT_HANDLE key;
	/* The module was initialized before this thread started, and is
	 * finalized only once every thread has signed. */
	if (f->C_OpenSession(1, CKF_SERIAL_SESSION, NULL, NULL, &s) != CKR_OK || find_key(s, &key))
		fail("thread setup", 0);
	for (int i = 0;; i++) {
		CK_MECHANISM m = {CKM_ECDSA, NULL, 0};
		unsigned char dig[32] = {1, 2, 3}, sig[64], name[64];
		CK_ULONG n = sizeof sig;
		if (gone("C_SignInit", f->C_SignInit(s, &m, key)) || gone("C_Sign", f->C_Sign(s, dig, sizeof dig, sig, &n)))
			break;
		if (n != 64)
			fail("C_Sign: signature length", n);
		__atomic_add_fetch(&signatures, 1, __ATOMIC_RELAXED);
		if (i == 0)
			__atomic_add_fetch(&started, 1, __ATOMIC_RELEASE);
		if (i % 8 == 7) {
			CK_ATTRIBUTE a = {CKA_LABEL, name, sizeof name};
			if (find_key(s, &key) || gone("C_GetAttributeValue", f->C_GetAttributeValue(s, key, &a, 1)))
				break;
		}
	}
	/* Once refused, always refused: nothing of the old state comes back. */
	CK_SESSION_INFO info;
	CK_RV rv = f->C_GetSessionInfo(s, &info);
	if (rv != CKR_CRYPTOKI_NOT_INITIALIZED)
		fail("C_GetSessionInfo after C_Finalize", rv);
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: finalizesign MODULE KEY-LABEL\n");
		return 2;
	}
	label = argv[2];
	f = load_module(argv[1]);
	CK_C_INITIALIZE_ARGS args = {.flags = CKF_OS_LOCKING_OK};
	for (int r = 0; r < ROUNDS; r++) {
		CK_RV rv;
		if ((rv = f->C_Initialize(&args)) != CKR_OK)
			fail("C_Initialize", rv);
		__atomic_store_n(&started, 0, __ATOMIC_RELAXED);
		pthread_t th[THREADS];
		for (int i = 0; i < THREADS; i++)
			pthread_create(&th[i], NULL, signer, NULL);
		while (__atomic_load_n(&started, __ATOMIC_ACQUIRE) < THREADS)
			usleep(100);
		usleep((useconds_t)(r % 6) * 150);
		if ((rv = f->C_Finalize(NULL)) != CKR_OK)
			fail("C_Finalize", rv);
		for (int i = 0; i < THREADS; i++)
			pthread_join(th[i], NULL);
	}
	printf("ok: %d rounds, %ld signatures, %ld calls refused after C_Finalize\n", ROUNDS, signatures, refused);
	return 0;
}
