/*
 * failsockopt: an LD_PRELOAD shim whose setsockopt(2) fails (ENOBUFS) for
 * the socket option named in SIGIL_TEST_FAIL_SOCKOPT (SO_RCVTIMEO or
 * SO_SNDTIMEO) and passes every other call through: the module must not
 * use a socket it could not give its timeouts.
 */
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
{
	static int (*real)(int, int, int, const void *, socklen_t);
	if (!real)
		real = (int (*)(int, int, int, const void *, socklen_t))dlsym(RTLD_NEXT, "setsockopt");
	const char *fail = getenv("SIGIL_TEST_FAIL_SOCKOPT");
	if (fail && level == SOL_SOCKET &&
	    ((name == SO_RCVTIMEO && strcmp(fail, "SO_RCVTIMEO") == 0) ||
	     (name == SO_SNDTIMEO && strcmp(fail, "SO_SNDTIMEO") == 0))) {
		errno = ENOBUFS;
		return -1;
	}
	return real(fd, level, name, val, len);
}
