/*
 * open_sockets: how many sockets this process holds, by /proc/self/fd, for
 * the fork test programs (a child must hold none of its parent's
 * connections to the agent). -1 when /proc/self/fd cannot be read.
 */
#ifndef SIGIL_TEST_OPENSOCKETS_H
#define SIGIL_TEST_OPENSOCKETS_H

#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int open_sockets(void)
{
	DIR *d = opendir("/proc/self/fd");
	if (!d)
		return -1;
	int n = 0;
	struct dirent *e;
	while ((e = readdir(d))) {
		char path[300], target[64];
		snprintf(path, sizeof path, "/proc/self/fd/%s", e->d_name);
		ssize_t k = readlink(path, target, sizeof target - 1);
		if (k > 0) {
			target[k] = 0;
			n += strncmp(target, "socket:", 7) == 0;
		}
	}
	closedir(d);
	return n;
}

#endif
