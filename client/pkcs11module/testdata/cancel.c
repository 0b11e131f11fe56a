/*
 * cancel: a host that cancels a thread (pthread_cancel, deferred, the
 * default) while it is inside C_Sign, waiting on an agent that does not
 * answer: poll(2) is a cancellation point. The thread must not be taken
 * out in the middle of the call, holding its session's lock and the
 * module's call gate: the session and C_Finalize must still answer.
 * Usage: cancel MODULE KEY-LABEL. Prints "ok" and C_Sign's result.
 */
#include <p11-kit/pkcs11.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loadmodule.h"

static CK_FUNCTION_LIST *f;
static CK_SESSION_HANDLE s;
static CK_OBJECT_HANDLE key;
static CK_RV sign_rv = (CK_RV)-1;
static int in_sign; /* atomic */

static void fail(const char *what, CK_RV rv)
{
	fprintf(stderr, "cancel: %s: rv 0x%lx\n", what, (unsigned long)rv);
	exit(1);
}

static void *signer(void *arg)
{
	(void)arg;
	CK_MECHANISM m = {CKM_ECDSA, NULL, 0};
	unsigned char dig[32] = {9}, sig[64];
	CK_ULONG n = sizeof sig;
	CK_RV rv = f->C_SignInit(s, &m, key);
	if (rv != CKR_OK)
		fail("C_SignInit", rv);
	__atomic_store_n(&in_sign, 1, __ATOMIC_RELEASE);
	sign_rv = f->C_Sign(s, dig, sizeof dig, sig, &n);
	pthread_testcancel();
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: cancel MODULE KEY-LABEL\n");
		return 2;
	}
	f = load_module(argv[1]);
	CK_RV rv;
	CK_C_INITIALIZE_ARGS args = {.flags = CKF_OS_LOCKING_OK};
	if ((rv = f->C_Initialize(&args)) != CKR_OK)
		fail("C_Initialize", rv);
	if ((rv = f->C_OpenSession(1, CKF_SERIAL_SESSION, NULL, NULL, &s)) != CKR_OK)
		fail("C_OpenSession", rv);
	if ((rv = find_private_key(f, s, argv[2], &key)) != CKR_OK)
		fail("find key", rv);
	pthread_t th;
	pthread_create(&th, NULL, signer, NULL);
	while (!__atomic_load_n(&in_sign, __ATOMIC_ACQUIRE))
		usleep(1000);
	usleep(200000); /* well inside the round trip's wait */
	pthread_cancel(th);
	pthread_join(th, NULL);
	CK_SESSION_INFO info;
	if ((rv = f->C_GetSessionInfo(s, &info)) != CKR_OK)
		fail("C_GetSessionInfo after the cancel", rv);
	if ((rv = f->C_Finalize(NULL)) != CKR_OK)
		fail("C_Finalize after the cancel", rv);
	printf("ok: C_Sign rv 0x%lx\n", (unsigned long)sign_rv);
	return 0;
}
