/*
 * forkcheck: the module across fork(). Two threads sign in a loop while the
 * main thread forks 20 times, so some forks happen with the module's locks
 * held and a request in flight. Each child must find the module
 * uninitialized (PKCS#11 v2.40 section 6.7.7), initialize it again, find
 * the parent's key handle refused, sign on its own connection and
 * finalize, leaving no connection open; the parent's threads must keep
 * signing throughout on theirs. Before it calls
 * the module at all, each child must hold no socket: its copies of the
 * parent's connections, pooled or borrowed by a signing thread at the
 * fork, are the child's to close at once, or a child that never uses the
 * module keeps them until it execs or exits. Most forks land while a
 * thread is in a round trip (the parent's signers never pause); the run
 * fails if none did.
 * Usage: forkcheck MODULE KEY-LABEL. Prints "ok ...".
 */
#include <dirent.h>
#include <p11-kit/pkcs11.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "loadmodule.h"
#include "opensockets.h"

static CK_FUNCTION_LIST *f;
static const char *label;
static volatile int stop;
static long signatures[2];
static int signing[2]; /* atomic: thread i is inside sign_once */
/* In a shared page: children that found a parent thread signing at the fork. */
static int *forks_mid_call;

static void die(const char *what, CK_RV rv)
{
	fprintf(stderr, "forkcheck [%d]: %s: rv 0x%lx\n", (int)getpid(), what, (unsigned long)rv);
	_exit(1);
}

static CK_SESSION_HANDLE open_and_find(CK_OBJECT_HANDLE *key)
{
	CK_SLOT_ID slot;
	CK_ULONG n = 1;
	CK_SESSION_HANDLE s;
	CK_RV rv;
	if ((rv = f->C_GetSlotList(CK_TRUE, &slot, &n)) || n != 1)
		die("C_GetSlotList", rv);
	if ((rv = f->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s)))
		die("C_OpenSession", rv);
	CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
	CK_ATTRIBUTE tmpl[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_LABEL, (void *)label, strlen(label)}};
	if ((rv = f->C_FindObjectsInit(s, tmpl, 2)))
		die("C_FindObjectsInit", rv);
	if ((rv = f->C_FindObjects(s, key, 1, &n)) || n != 1)
		die("C_FindObjects", rv);
	f->C_FindObjectsFinal(s);
	return s;
}

static CK_RV sign_once(CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key)
{
	CK_MECHANISM m = {CKM_ECDSA, NULL, 0};
	unsigned char dig[32] = {1, 2, 3}, sig[64];
	CK_ULONG n = sizeof sig;
	CK_RV rv = f->C_SignInit(s, &m, key);
	if (rv == CKR_OK)
		rv = f->C_Sign(s, dig, sizeof dig, sig, &n);
	if (rv == CKR_OK && n != 64)
		rv = CKR_GENERAL_ERROR;
	return rv;
}

static void *signer(void *arg)
{
	long *count = arg;
	CK_OBJECT_HANDLE key;
	CK_SESSION_HANDLE s = open_and_find(&key);
	int *busy = &signing[count - signatures];
	while (!stop) {
		__atomic_store_n(busy, 1, __ATOMIC_SEQ_CST);
		CK_RV rv = sign_once(s, key);
		__atomic_store_n(busy, 0, __ATOMIC_SEQ_CST);
		if (rv)
			die("parent thread C_Sign", rv);
		(*count)++;
	}
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: forkcheck MODULE KEY-LABEL\n");
		return 2;
	}
	label = argv[2];
	f = load_module(argv[1]);
	CK_RV rv;
	CK_C_INITIALIZE_ARGS args = {.flags = CKF_OS_LOCKING_OK};
	if ((rv = f->C_Initialize(&args)))
		die("C_Initialize", rv);
	forks_mid_call = mmap(NULL, sizeof *forks_mid_call, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (forks_mid_call == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	CK_OBJECT_HANDLE key;
	CK_SESSION_HANDLE s = open_and_find(&key);
	if ((rv = sign_once(s, key)))
		die("C_Sign before fork", rv);

	pthread_t th[2];
	for (int i = 0; i < 2; i++)
		pthread_create(&th[i], NULL, signer, &signatures[i]);
	usleep(50000);
	int forks = 20;
	for (int i = 0; i < forks; i++) {
		pid_t pid = fork();
		if (pid < 0) {
			perror("fork");
			return 1;
		}
		if (pid == 0) {
			/* The module's connections to the agent are the only
			 * sockets forkcheck has. */
			int inherited = open_sockets();
			if (inherited < 0)
				die("opendir /proc/self/fd", 0);
			if (inherited) {
				fprintf(stderr, "forkcheck [%d]: %d of the parent's agent connections open in the child before any call\n", (int)getpid(), inherited);
				_exit(1);
			}
			if (signing[0] || signing[1])
				__atomic_add_fetch(forks_mid_call, 1, __ATOMIC_SEQ_CST);
			CK_SLOT_ID slot;
			CK_ULONG n = 1;
			if ((rv = f->C_GetSlotList(CK_TRUE, &slot, &n)) != CKR_CRYPTOKI_NOT_INITIALIZED)
				die("child C_GetSlotList before C_Initialize", rv);
			if ((rv = sign_once(s, key)) != CKR_CRYPTOKI_NOT_INITIALIZED)
				die("child C_Sign on the parent's session", rv);
			if ((rv = f->C_Initialize(&args)))
				die("child C_Initialize", rv);
			CK_OBJECT_HANDLE k2;
			CK_SESSION_HANDLE s2 = open_and_find(&k2);
			/* The parent's key handle names nothing here, though the
			 * child's table lists the same key. */
			CK_MECHANISM m = {CKM_ECDSA, NULL, 0};
			if ((rv = f->C_SignInit(s2, &m, key)) != CKR_KEY_HANDLE_INVALID)
				die("child C_SignInit with the parent's key handle", rv);
			for (int j = 0; j < 5; j++)
				if ((rv = sign_once(s2, k2)))
					die("child C_Sign", rv);
			if ((rv = f->C_Finalize(NULL)))
				die("child C_Finalize", rv);
			/* Its own connections are closed by C_Finalize. */
			int left = open_sockets();
			if (left < 0)
				die("opendir /proc/self/fd", 0);
			if (left) {
				fprintf(stderr, "forkcheck [%d]: %d agent connections still open after C_Finalize\n", (int)getpid(), left);
				_exit(1);
			}
			_exit(0);
		}
		int status;
		if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
			fprintf(stderr, "forkcheck: child %d failed (status 0x%x)\n", (int)pid, status);
			return 1;
		}
		usleep(5000);
	}
	stop = 1;
	for (int i = 0; i < 2; i++)
		pthread_join(th[i], NULL);
	if ((rv = sign_once(s, key)))
		die("C_Sign after the forks", rv);
	if ((rv = f->C_Finalize(NULL)))
		die("C_Finalize", rv);
	if (*forks_mid_call == 0) {
		fprintf(stderr, "forkcheck: no fork landed while a parent thread was signing\n");
		return 1;
	}
	printf("ok: %d forks (%d with a parent thread signing), %ld parent signatures meanwhile\n", forks, *forks_mid_call,
	       signatures[0] + signatures[1]);
	return 0;
}
