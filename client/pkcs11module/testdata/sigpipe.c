/*
 * sigpipe: the module in a host that leaves SIGPIPE at its default action
 * (death), as most C programs do, while its agent goes away and comes
 * back. A send(2) on a connection the agent has closed must fail with
 * EPIPE, not kill the host. Driven by the test on stdin, a command a line:
 *   sign      one CKM_ECDSA_SHA256 signature: "ok MESSAGE HEX-SIGNATURE"
 *             or "rv 0x..."
 *   burst N   N of those, 300 us apart: each next request goes out on a
 *             connection the agent closed a moment before (the module
 *             skips its stale check then, and its send meets the close)
 * Usage: sigpipe MODULE KEY-LABEL. Prints "bye" at the end of its input.
 */
#include <p11-kit/pkcs11.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "loadmodule.h"

static CK_FUNCTION_LIST *f;
static CK_SESSION_HANDLE s;
static CK_OBJECT_HANDLE key;
static int seq;

static void fail(const char *what, CK_RV rv)
{
	fprintf(stderr, "sigpipe: %s: rv 0x%lx\n", what, (unsigned long)rv);
	exit(1);
}

static void sign(void)
{
	char msg[32];
	int len = snprintf(msg, sizeof msg, "pipe-%d", seq++);
	CK_MECHANISM m = {CKM_ECDSA_SHA256, NULL, 0};
	unsigned char sig[128];
	CK_ULONG n = sizeof sig;
	CK_RV rv = f->C_SignInit(s, &m, key);
	if (rv != CKR_OK)
		fail("C_SignInit", rv);
	if ((rv = f->C_Sign(s, (CK_BYTE_PTR)msg, (CK_ULONG)len, sig, &n)) != CKR_OK) {
		printf("rv 0x%lx\n", (unsigned long)rv);
	} else {
		printf("ok %s ", msg);
		for (CK_ULONG i = 0; i < n; i++)
			printf("%02x", sig[i]);
		printf("\n");
	}
	fflush(stdout);
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: sigpipe MODULE KEY-LABEL\n");
		return 2;
	}
	signal(SIGPIPE, SIG_DFL);
	f = load_module(argv[1]);
	CK_RV rv;
	if ((rv = f->C_Initialize(NULL)) != CKR_OK)
		fail("C_Initialize", rv);
	if ((rv = f->C_OpenSession(1, CKF_SERIAL_SESSION, NULL, NULL, &s)) != CKR_OK)
		fail("C_OpenSession", rv);
	if ((rv = find_private_key(f, s, argv[2], &key)) != CKR_OK)
		fail("find key", rv);
	char line[64];
	while (fgets(line, sizeof line, stdin)) {
		if (strncmp(line, "sign", 4) == 0) {
			sign();
		} else if (strncmp(line, "burst ", 6) == 0) {
			for (int i = atoi(line + 6); i > 0; i--) {
				sign();
				usleep(300);
			}
		}
	}
	f->C_Finalize(NULL);
	printf("bye\n");
	return 0;
}
