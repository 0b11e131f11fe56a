/*
 * sharedsession: threads that share one session. PKCS#11 v2.40 section
 * 6.7.8 leaves that to the application, but a host may do it and must get
 * results, not a crash: four threads call C_SignInit and C_Sign on one
 * session, and a fifth searches on it, all at once. A thread may meet
 * another's operation: CKR_OPERATION_ACTIVE from C_SignInit and
 * CKR_OPERATION_NOT_INITIALIZED from C_Sign are the answers then; every
 * signature it does get is printed ("MESSAGE HEX-SIGNATURE": all threads
 * sign with one key and mechanism, so each verifies) and anything else
 * fails. Run under AddressSanitizer where the toolchain has it.
 * Usage: sharedsession MODULE KEY-LABEL. Prints "ok: N signatures".
 */
#include <p11-kit/pkcs11.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "loadmodule.h"

#define SIGNERS 4
#define ROUNDS 200

static CK_FUNCTION_LIST *f;
static CK_SESSION_HANDLE s;
static CK_OBJECT_HANDLE key;
static const char *label;
static long signatures;
static volatile int stop;
static pthread_mutex_t out_mu = PTHREAD_MUTEX_INITIALIZER;

static void fail(const char *what, CK_RV rv)
{
	fprintf(stderr, "sharedsession: %s: rv 0x%lx\n", what, (unsigned long)rv);
	exit(1);
}

static void *signer(void *arg)
{
	int id = (int)(long)arg;
	for (int i = 0; i < ROUNDS; i++) {
		char msg[32];
		int len = snprintf(msg, sizeof msg, "shared-%d-%d", id, i);
		CK_MECHANISM m = {CKM_ECDSA_SHA256, NULL, 0};
		unsigned char sig[64];
		CK_ULONG n = sizeof sig;
		CK_RV rv = f->C_SignInit(s, &m, key);
		if (rv == CKR_OPERATION_ACTIVE)
			continue;
		if (rv != CKR_OK)
			fail("C_SignInit", rv);
		rv = f->C_Sign(s, (CK_BYTE_PTR)msg, (CK_ULONG)len, sig, &n);
		if (rv == CKR_OPERATION_NOT_INITIALIZED)
			continue;
		if (rv != CKR_OK)
			fail("C_Sign", rv);
		if (n != 64)
			fail("C_Sign: length", n);
		pthread_mutex_lock(&out_mu);
		printf("%s ", msg);
		for (CK_ULONG j = 0; j < n; j++)
			printf("%02x", sig[j]);
		printf("\n");
		signatures++;
		pthread_mutex_unlock(&out_mu);
	}
	return NULL;
}

static void *searcher(void *arg)
{
	(void)arg;
	CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
	CK_ATTRIBUTE tmpl[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_LABEL, (void *)label, strlen(label)}};
	while (!stop) {
		CK_OBJECT_HANDLE h[4];
		CK_ULONG n;
		CK_RV rv = f->C_FindObjectsInit(s, tmpl, 2);
		if (rv == CKR_OPERATION_ACTIVE)
			continue;
		if (rv != CKR_OK)
			fail("C_FindObjectsInit", rv);
		if ((rv = f->C_FindObjects(s, h, 4, &n)) != CKR_OK && rv != CKR_OPERATION_NOT_INITIALIZED)
			fail("C_FindObjects", rv);
		f->C_FindObjectsFinal(s);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: sharedsession MODULE KEY-LABEL\n");
		return 2;
	}
	label = argv[2];
	f = load_module(argv[1]);
	CK_RV rv;
	CK_C_INITIALIZE_ARGS args = {.flags = CKF_OS_LOCKING_OK};
	if ((rv = f->C_Initialize(&args)) != CKR_OK)
		fail("C_Initialize", rv);
	if ((rv = f->C_OpenSession(1, CKF_SERIAL_SESSION, NULL, NULL, &s)) != CKR_OK)
		fail("C_OpenSession", rv);
	if ((rv = find_private_key(f, s, label, &key)) != CKR_OK)
		fail("find key", rv);
	pthread_t th[SIGNERS + 1];
	for (long i = 0; i < SIGNERS; i++)
		pthread_create(&th[i], NULL, signer, (void *)i);
	pthread_create(&th[SIGNERS], NULL, searcher, NULL);
	for (int i = 0; i < SIGNERS; i++)
		pthread_join(th[i], NULL);
	stop = 1;
	pthread_join(th[SIGNERS], NULL);
	if ((rv = f->C_Finalize(NULL)) != CKR_OK)
		fail("C_Finalize", rv);
	printf("ok: %ld signatures\n", signatures);
	return 0;
}
