/*
 * slowsocket: an LD_PRELOAD shim whose socket(2) sleeps 20 ms after making
 * a Unix socket, standing in for a thread preempted there on a busy host:
 * forkdial's forks then land in that moment.
 */
#include <dlfcn.h>
#include <sys/socket.h>
#include <unistd.h>

int socket(int domain, int type, int protocol)
{
	static int (*real)(int, int, int);
	if (!real)
		real = (int (*)(int, int, int))dlsym(RTLD_NEXT, "socket");
	int fd = real(domain, type, protocol);
	if (domain == AF_UNIX)
		usleep(20000);
	return fd;
}
