/*
 * forkdial: fork() while another thread dials the agent. One thread opens
 * the module, finds a key and finalizes, over and over, so that each round
 * dials afresh; the main thread forks 40 times. Each child initializes and
 * finalizes the module and must then hold no socket: a connection the
 * parent was making at the fork is the child's to close too, or the child
 * keeps a copy of the parent's live connection to the agent for its life.
 * Run under slowsocket.so, so that forks land while a socket is being
 * made. Usage: forkdial MODULE KEY-LABEL. Prints "ok: N forks".
 */
#include <dirent.h>
#include <p11-kit/pkcs11.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "loadmodule.h"
#include "opensockets.h"

static CK_FUNCTION_LIST *f;
static const char *label;
static volatile int stop;

static void *dialer(void *arg)
{
	(void)arg;
	CK_C_INITIALIZE_ARGS args = {.flags = CKF_OS_LOCKING_OK};
	while (!stop) {
		if (f->C_Initialize(&args) != CKR_OK)
			continue;
		CK_SLOT_ID slot;
		CK_ULONG n = 1;
		CK_SESSION_HANDLE s;
		if (f->C_GetSlotList(CK_TRUE, &slot, &n) == CKR_OK && n == 1 &&
		    f->C_OpenSession(slot, CKF_SERIAL_SESSION, NULL, NULL, &s) == CKR_OK) {
			CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY;
			CK_ATTRIBUTE tmpl[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_LABEL, (void *)label, strlen(label)}};
			CK_OBJECT_HANDLE key;
			if (f->C_FindObjectsInit(s, tmpl, 2) == CKR_OK) {
				f->C_FindObjects(s, &key, 1, &n);
				f->C_FindObjectsFinal(s);
			}
		}
		f->C_Finalize(NULL);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: forkdial MODULE KEY-LABEL\n");
		return 2;
	}
	label = argv[2];
	f = load_module(argv[1]);
	pthread_t th;
	pthread_create(&th, NULL, dialer, NULL);
	usleep(50000);
	int forks = 40, kept = 0;
	CK_C_INITIALIZE_ARGS args = {.flags = CKF_OS_LOCKING_OK};
	for (int i = 0; i < forks; i++) {
		pid_t pid = fork();
		if (pid < 0) {
			perror("fork");
			return 1;
		}
		if (pid == 0) {
			CK_RV rv = f->C_Initialize(&args);
			if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED)
				_exit(2);
			f->C_Finalize(NULL);
			_exit(open_sockets() ? 1 : 0);
		}
		int status;
		if (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) == 2) {
			fprintf(stderr, "forkdial: child %d failed (status 0x%x)\n", (int)pid, status);
			return 1;
		}
		kept += WEXITSTATUS(status) == 1;
		usleep(7000);
	}
	stop = 1;
	pthread_join(th, NULL);
	if (kept) {
		printf("%d of %d children kept a socket after C_Finalize\n", kept, forks);
		return 1;
	}
	printf("ok: %d forks\n", forks);
	return 0;
}
