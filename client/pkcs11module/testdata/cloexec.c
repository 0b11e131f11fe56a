/*
 * cloexec: a host that starts other programs while the module holds
 * connections to the agent, one pooled and one in a round trip on another
 * thread. posix_spawn(3) runs no atfork handler, so only close-on-exec
 * keeps the agent's sockets out of the new program (a copy there would
 * keep the connection open, and its writes would interleave with ours);
 * fork(2) then exec is checked too. Each child is this program run as
 * "cloexec child", which exits with the number of sockets it holds.
 * Usage: cloexec MODULE KEY-LABEL. Prints "ok: N children".
 */
#include <p11-kit/pkcs11.h>
#include <pthread.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "loadmodule.h"
#include "opensockets.h"

#define CHILDREN 20

extern char **environ;
static CK_FUNCTION_LIST *f;
static const char *label;
static volatile int stop;

static void fail(const char *what, long v)
{
	fprintf(stderr, "cloexec: %s: 0x%lx\n", what, v);
	exit(1);
}

static CK_SESSION_HANDLE session(CK_OBJECT_HANDLE *key)
{
	CK_SESSION_HANDLE s;
	CK_RV rv;
	if ((rv = f->C_OpenSession(1, CKF_SERIAL_SESSION, NULL, NULL, &s)) != CKR_OK)
		fail("C_OpenSession", (long)rv);
	if ((rv = find_private_key(f, s, label, key)) != CKR_OK)
		fail("find key", (long)rv);
	return s;
}

static void sign(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key)
{
	CK_MECHANISM m = {CKM_ECDSA, NULL, 0};
	unsigned char dig[32] = {7}, sig[64];
	CK_ULONG n = sizeof sig;
	CK_RV rv;
	if ((rv = f->C_SignInit(s, &m, key)) != CKR_OK || (rv = f->C_Sign(s, dig, sizeof dig, sig, &n)) != CKR_OK)
		fail("sign", (long)rv);
}

static void *signer(void *arg)
{
	(void)arg;
	CK_OBJECT_HANDLE key;
	CK_SESSION_HANDLE s = session(&key);
	while (!stop)
		sign(s, key);
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc == 2 && strcmp(argv[1], "child") == 0)
		return open_sockets();
	if (argc != 3) {
		fprintf(stderr, "usage: cloexec MODULE KEY-LABEL\n");
		return 2;
	}
	label = argv[2];
	f = load_module(argv[1]);
	CK_RV rv;
	CK_C_INITIALIZE_ARGS args = {.flags = CKF_OS_LOCKING_OK};
	if ((rv = f->C_Initialize(&args)) != CKR_OK)
		fail("C_Initialize", (long)rv);
	CK_OBJECT_HANDLE key;
	CK_SESSION_HANDLE s = session(&key);
	sign(s, key); /* a connection in the pool */
	pthread_t th;
	pthread_create(&th, NULL, signer, NULL);
	char *child[] = {"/proc/self/exe", "child", NULL};
	for (int i = 0; i < CHILDREN; i++) {
		pid_t pid;
		if (i % 2 == 0) {
			int err = posix_spawn(&pid, "/proc/self/exe", NULL, NULL, child, environ);
			if (err)
				fail("posix_spawn", err);
		} else if ((pid = fork()) == 0) {
			execve("/proc/self/exe", child, environ);
			_exit(127);
		}
		int st;
		if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st))
			fail("child did not exit", st);
		if (WEXITSTATUS(st) != 0) {
			fprintf(stderr, "cloexec: child %d (%s) started with %d of the parent's sockets\n", i,
				i % 2 == 0 ? "posix_spawn" : "fork+exec", WEXITSTATUS(st));
			exit(1);
		}
	}
	stop = 1;
	pthread_join(th, NULL);
	f->C_Finalize(NULL);
	printf("ok: %d children\n", CHILDREN);
	return 0;
}
