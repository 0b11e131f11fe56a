/*
 * forkfinalize: fork() while another thread is in C_Finalize. fork is not a
 * Cryptoki call, so an application may fork while one of its threads
 * finalizes the module; the child must then find the module in a
 * consistent state, initialize it (PKCS#11 v2.40 section 6.7.7) and
 * finalize it. Each round opens many sessions, so that C_Finalize takes a
 * while, and forks a varying time into it. Usage: forkfinalize MODULE.
 * Prints "ok: N forks", or how many children failed or crashed.
 */
#include <p11-kit/pkcs11.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "loadmodule.h"

static CK_FUNCTION_LIST *f;
static volatile int go;

static void *finalizer(void *arg)
{
	(void)arg;
	while (!go)
		;
	f->C_Finalize(NULL);
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: forkfinalize MODULE\n");
		return 2;
	}
	f = load_module(argv[1]);
	const int rounds = 40;
	int crashed = 0, failed = 0;
	for (int r = 0; r < rounds; r++) {
		CK_RV rv = f->C_Initialize(NULL);
		if (rv) {
			fprintf(stderr, "round %d: C_Initialize: rv 0x%lx\n", r, (unsigned long)rv);
			return 1;
		}
		CK_SLOT_ID slot;
		CK_ULONG n = 1;
		if ((rv = f->C_GetSlotList(CK_FALSE, &slot, &n)) || n != 1) {
			fprintf(stderr, "round %d: C_GetSlotList: rv 0x%lx\n", r, (unsigned long)rv);
			return 1;
		}
		for (int i = 0; i < 2000; i++) {
			CK_SESSION_HANDLE s;
			f->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s);
		}
		go = 0;
		pthread_t t;
		pthread_create(&t, NULL, finalizer, NULL);
		go = 1;
		usleep(r % 7 * 100);
		pid_t pid = fork();
		if (pid < 0) {
			perror("fork");
			return 1;
		}
		if (pid == 0) {
			rv = f->C_Initialize(NULL);
			if (rv == CKR_OK)
				rv = f->C_Finalize(NULL);
			_exit(rv ? 3 : 0);
		}
		pthread_join(t, NULL);
		int st;
		waitpid(pid, &st, 0);
		if (WIFSIGNALED(st)) {
			crashed++;
			fprintf(stderr, "round %d: the child died of signal %d\n", r, WTERMSIG(st));
		} else if (WEXITSTATUS(st) != 0) {
			failed++;
			fprintf(stderr, "round %d: the child could not initialize and finalize the module\n", r);
		}
	}
	if (crashed || failed) {
		printf("%d of %d children crashed, %d failed\n", crashed, rounds, failed);
		return 1;
	}
	printf("ok: %d forks\n", rounds);
	return 0;
}
