/*
 * sigstorm: the module in a host with a signal handler installed without
 * SA_RESTART (as hosts with a SIGALRM or SIGCHLD handler have), fired by
 * an interval timer every 50 us from before C_Initialize on, so that the
 * module's poll(2), recv(2), send(2) and connect(2) keep failing with
 * EINTR.
 *
 *   sigstorm MODULE KEY-LABEL sign N
 *     two threads, each on its own session, sign N messages each with
 *     CKM_ECDSA_SHA256 and print "MESSAGE HEX-SIGNATURE" per signature
 *     (the test verifies every one), then "ok: SIGNALS signals".
 *   sigstorm MODULE KEY-LABEL search
 *     one C_FindObjectsInit (a ListKeys round trip on a fresh
 *     connection) against an agent that never answers: prints "rv 0x..",
 *     which must come back within the module's timeout, not never.
 */
#include <p11-kit/pkcs11.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

#include "loadmodule.h"

#define THREADS 2

static CK_FUNCTION_LIST *f;
static const char *label;
static int per_thread;
static long signals; /* atomic */
static pthread_mutex_t out_mu = PTHREAD_MUTEX_INITIALIZER;

static void on_alarm(int sig)
{
	(void)sig;
	__atomic_add_fetch(&signals, 1, __ATOMIC_RELAXED);
}

static void fail(const char *what, CK_RV rv)
{
	fprintf(stderr, "sigstorm: %s: rv 0x%lx\n", what, (unsigned long)rv);
	exit(1);
}

static CK_RV find_key(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE *key)
{
	CK_RV rv = find_private_key(f, s, label, key);
	if (rv == CKR_KEY_HANDLE_INVALID)
		fail("C_FindObjects: not one key", 0);
	return rv;
}

static void *signer(void *arg)
{
	int id = (int)(long)arg;
	CK_SESSION_HANDLE s;
	CK_OBJECT_HANDLE key;
	CK_RV rv;
	if ((rv = f->C_OpenSession(1, CKF_SERIAL_SESSION, NULL, NULL, &s)) != CKR_OK)
		fail("C_OpenSession", rv);
	if ((rv = find_key(s, &key)) != CKR_OK)
		fail("find key", rv);
	for (int i = 0; i < per_thread; i++) {
		char msg[64];
		int len = snprintf(msg, sizeof msg, "storm-%d-%d", id, i);
		CK_MECHANISM m = {CKM_ECDSA_SHA256, NULL, 0};
		unsigned char sig[512];
		CK_ULONG n = sizeof sig;
		if ((rv = f->C_SignInit(s, &m, key)) != CKR_OK)
			fail("C_SignInit", rv);
		if ((rv = f->C_Sign(s, (CK_BYTE_PTR)msg, (CK_ULONG)len, sig, &n)) != CKR_OK)
			fail("C_Sign", rv);
		pthread_mutex_lock(&out_mu);
		printf("%s ", msg);
		for (CK_ULONG j = 0; j < n; j++)
			printf("%02x", sig[j]);
		printf("\n");
		pthread_mutex_unlock(&out_mu);
	}
	f->C_CloseSession(s);
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: sigstorm MODULE KEY-LABEL sign N | search\n");
		return 2;
	}
	label = argv[2];
	f = load_module(argv[1]);

	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_alarm;
	sa.sa_flags = 0; /* no SA_RESTART: blocking calls fail with EINTR */
	sigemptyset(&sa.sa_mask);
	sigaction(SIGALRM, &sa, NULL);
	struct itimerval it = {.it_interval = {0, 50}, .it_value = {0, 50}};
	setitimer(ITIMER_REAL, &it, NULL);

	CK_RV rv;
	CK_C_INITIALIZE_ARGS args = {.flags = CKF_OS_LOCKING_OK};
	if ((rv = f->C_Initialize(&args)) != CKR_OK)
		fail("C_Initialize", rv);
	if (strcmp(argv[3], "search") == 0) {
		CK_SESSION_HANDLE s;
		CK_OBJECT_HANDLE key;
		if ((rv = f->C_OpenSession(1, CKF_SERIAL_SESSION, NULL, NULL, &s)) != CKR_OK)
			fail("C_OpenSession", rv);
		printf("rv 0x%lx\n", (unsigned long)find_key(s, &key));
	} else {
		per_thread = argc > 4 ? atoi(argv[4]) : 50;
		pthread_t th[THREADS];
		for (long i = 0; i < THREADS; i++)
			pthread_create(&th[i], NULL, signer, (void *)i);
		/* The kernel hands a process's signal to its main thread first:
		 * blocked here, the signals land on the signers instead. */
		sigset_t alrm;
		sigemptyset(&alrm);
		sigaddset(&alrm, SIGALRM);
		pthread_sigmask(SIG_BLOCK, &alrm, NULL);
		for (int i = 0; i < THREADS; i++)
			pthread_join(th[i], NULL);
		printf("ok: %ld signals\n", __atomic_load_n(&signals, __ATOMIC_RELAXED));
	}
	struct itimerval off = {0};
	setitimer(ITIMER_REAL, &off, NULL);
	f->C_Finalize(NULL);
	return 0;
}
