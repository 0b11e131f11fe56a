/* A PKCS#11 module that shows the loader ran its code: its constructor,
 * which dlopen runs before the agent calls anything, creates the file
 * $SIGIL_TEST_MODULE_RAN. Then it is initfails.c: C_Initialize says the
 * device failed, so a module the agent loads is not ErrModuleLoad. Built
 * by the tests (cc -shared -fPIC). */

#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

typedef unsigned long ck_rv;

#define CKR_DEVICE_ERROR 0x30UL

__attribute__((constructor)) static void ran(void) {
	const char *mark = getenv("SIGIL_TEST_MODULE_RAN");
	if (mark != NULL) {
		int fd = open(mark, O_WRONLY | O_CREAT, 0600);
		if (fd >= 0)
			close(fd);
	}
}

static ck_rv initialize(void *args) {
	(void)args;
	return CKR_DEVICE_ERROR;
}

static ck_rv finalize(void *reserved) {
	(void)reserved;
	return 0;
}

static struct {
	unsigned char major, minor;
	ck_rv (*fn[68])(void *);
} list = {2, 40, {initialize, finalize}};

ck_rv C_GetFunctionList(void **out) {
	*out = &list;
	return 0;
}
