/*
 * agent.h: connections to the Sigil agent. A small pool of Unix-socket
 * connections, each with one request in flight at a time: concurrent
 * signers each borrow one, so threads never wait on each other's round
 * trips and no reader thread is needed (the module starts no threads).
 */
#ifndef SIGIL_AGENT_H
#define SIGIL_AGENT_H

#include <pthread.h>
#include <stdint.h>
#include <sys/un.h>

#include "wire.h"

typedef struct sg_conn {
	int fd;
	int dead; /* not to be pooled: the agent closes it after this reply */
	uint64_t idle_since_ns; /* CLOCK_MONOTONIC when it was last pooled */
	uint64_t next_id;
	struct sg_conn *next; /* in the idle pool */
	struct sg_conn *all_prev, *all_next; /* in sg_agent.all */
	uint8_t buf[SG_FRAME_HEADER + SG_MAX_FRAME]; /* request out, then reply in */
} sg_conn;

typedef struct {
	char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
	unsigned timeout_ms;
	/* path lies in the default socket directory: dial only while that
	 * directory is this user's (or root's) and writable by nobody else,
	 * as the Go client does (proto.CheckDefaultSocketDir). */
	int check_dir;
	pthread_mutex_t mu; /* guards idle, nidle and all; never held across I/O */
	sg_conn *idle;
	unsigned nidle;
	/* Every open connection, pooled or borrowed: a fork child closes its
	 * copies of them all, including those a parent thread had borrowed for
	 * a round trip when the process forked. */
	sg_conn *all;
} sg_agent;

/* Transport results: the reply's code is in sg_response.code when SG_IO_OK. */
enum { SG_IO_OK = 0, SG_IO_UNREACHABLE = 1, SG_IO_LOST = 2, SG_IO_PROTOCOL = 3, SG_IO_TOOBIG = 4 };

void sg_agent_init(sg_agent *a, const char *path, unsigned timeout_ms);

/*
 * sg_agent_call sends req (its id and tmo are set here) and reads the reply into
 * *resp, whose byte fields point into the connection returned in *connp.
 * The caller copies what it needs and then calls sg_agent_release. On a
 * transport error *connp is NULL and nothing needs releasing.
 */
int sg_agent_call(sg_agent *a, sg_request *req, sg_response *resp, sg_conn **connp);

/* sg_agent_release returns c to the pool. */
void sg_agent_release(sg_agent *a, sg_conn *c);

/* sg_agent_close closes every pooled connection (C_Finalize). */
void sg_agent_close(sg_agent *a);

/*
 * sg_agent_close_copies closes this process's copy of every connection's
 * socket, pooled or borrowed, and marks each closed (fd -1), touching
 * nothing else: a fork child's atfork handler calls it, while the forking
 * thread holds the pool's lock (so the list is whole), and the parent's
 * sockets stay as they were. Only close(2), which is async-signal-safe.
 */
void sg_agent_close_copies(sg_agent *a);

/*
 * sg_agent_forget drops every connection, pooled or borrowed, without
 * touching the sockets' state in the parent: after fork the child closes
 * only its copies of the fds (those sg_agent_close_copies left).
 */
void sg_agent_forget(sg_agent *a);

#endif
