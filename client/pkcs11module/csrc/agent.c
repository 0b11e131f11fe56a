/*
 * agent.c: the Unix-socket transport to the agent (docs/protocol.md).
 *
 * Host-process hygiene: sockets are close-on-exec, writes use MSG_NOSIGNAL
 * (no SIGPIPE in a host that has not ignored it), and deadlines are socket
 * timeouts rather than signals or threads.
 */
#include "agent.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

/* Idle connections kept beyond this are closed: a burst of threads should
 * not leave dozens of agent connections open for the process's lifetime. */
#define MAX_IDLE 32

void sg_agent_init(sg_agent *a, const char *path, unsigned timeout_ms)
{
	memset(a, 0, sizeof *a);
	strncpy(a->path, path, sizeof a->path - 1);
	a->timeout_ms = timeout_ms;
	pthread_mutex_init(&a->mu, NULL);
}

/* conn_open makes c's socket and puts c on a->all in one step under the
 * pool's lock, which fork's prepare handler takes: a child never gets a
 * socket that is on no list (and so never closed). Neither call blocks. */
static int conn_open(sg_agent *a, sg_conn *c)
{
	pthread_mutex_lock(&a->mu);
	c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	c->all_prev = NULL;
	c->all_next = a->all;
	if (a->all)
		a->all->all_prev = c;
	a->all = c;
	pthread_mutex_unlock(&a->mu);
	return c->fd;
}

/* conn_free takes c off a->all and closes it, under the pool's lock for
 * the same reason. */
static void conn_free(sg_agent *a, sg_conn *c)
{
	pthread_mutex_lock(&a->mu);
	if (c->all_prev)
		c->all_prev->all_next = c->all_next;
	else
		a->all = c->all_next;
	if (c->all_next)
		c->all_next->all_prev = c->all_prev;
	if (c->fd >= 0)
		close(c->fd);
	pthread_mutex_unlock(&a->mu);
	free(c);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* A host's signal handler installed without SA_RESTART (a SIGALRM or
 * SIGCHLD handler) makes every blocking call here fail with EINTR, and a
 * call restarted with its full timeout each time never times out under a
 * steady stream of signals: an agent that stopped answering then hung the
 * host's call for good (TestUnansweredAgentTimesOutUnderSignalStorm). So
 * each wait has one deadline, taken once, and an interrupted call goes
 * again only while it lies ahead. */
static int passed(uint64_t deadline_ns)
{
	return now_ns() >= deadline_ns;
}

/* write_all sends n bytes by deadline_ns (each send(2) is also bounded
 * by the socket's SO_SNDTIMEO, so a send that only took part of the bytes
 * checks the deadline before the next). */
static int write_all(int fd, const uint8_t *p, size_t n, uint64_t deadline_ns)
{
	while (n > 0) {
		ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
		if (k < 0) {
			if (errno == EINTR && !passed(deadline_ns))
				continue;
			return -1;
		}
		p += k;
		n -= (size_t)k;
		if (n > 0 && passed(deadline_ns))
			return -1;
	}
	return 0;
}

/* wait_readable waits until deadline_ns for fd to have bytes (or end of
 * stream). Returns 0 ready, -1 error or timeout.
 *
 * Why not sleep in recv(2) itself: when the agent reads our request, the
 * kernel tells our socket it has write space again, and that wake-up goes
 * to every sleeper on the socket, a recv(2) sleeper included. The thread
 * woke, found nothing, slept again, and on a busy core it preempted the
 * agent in the middle of the signature it was waiting for. poll(2) sleeps
 * for POLLIN only, so that wake-up passes it by: the p50 at 1 thread fell
 * from 131-141 to 107-113 us (docs/pkcs11-module.md). */
static int wait_readable(int fd, uint64_t deadline_ns)
{
	struct pollfd pfd = {.fd = fd, .events = POLLIN};
	for (;;) {
		uint64_t now = now_ns();
		/* Past the deadline, one look without waiting: a reply already
		 * in the socket (the host was stopped or descheduled past it)
		 * is the agent's answer, signed and journaled, not a timeout.
		 * Rounded up otherwise: a wait cut to 0 ms would spin until the
		 * deadline. */
		int late = now >= deadline_ns;
		int rc = poll(&pfd, 1, late ? 0 : (int)((deadline_ns - now + 999999) / 1000000));
		if (rc > 0)
			return 0;
		if (late || (rc < 0 && errno != EINTR))
			return -1;
	}
}

/* read_frame reads one reply frame into buf (cap bytes) and sets *body
 * and *n to its payload, all of it by deadline_ns. It asks for
 * as much as fits, so a reply the agent wrote with one write(2) usually
 * takes one recv(2), not a header read and a payload read. Returns 0 done,
 * -1 error or timeout, 1 end of stream before any byte, 2 more bytes than
 * the frame (no reply of ours does that: the connection is not to be
 * reused), 3 a length out of range. */
static int read_frame(int fd, uint64_t deadline_ns, uint8_t *buf, size_t cap, uint8_t **body, uint32_t *n)
{
	size_t got = 0, want = SG_FRAME_HEADER;
	while (got < want) {
		if (wait_readable(fd, deadline_ns))
			return -1;
		ssize_t k = recv(fd, buf + got, cap - got, 0);
		if (k < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		if (k == 0)
			return got == 0 ? 1 : -1;
		got += (size_t)k;
		if (want == SG_FRAME_HEADER && got >= SG_FRAME_HEADER) {
			uint32_t len = (uint32_t)buf[0] << 24 | (uint32_t)buf[1] << 16 | (uint32_t)buf[2] << 8 | buf[3];
			if (len == 0 || len > SG_MAX_FRAME)
				return 3;
			*n = len;
			want = SG_FRAME_HEADER + (size_t)len;
		}
	}
	*body = buf + SG_FRAME_HEADER;
	return got > want ? 2 : 0;
}

/* roundtrip writes the frame already in c->buf (len bytes) and reads the
 * reply, the two by deadline_ns. wrote is set once the request has fully
 * left. */
static int roundtrip(sg_conn *c, size_t len, uint64_t id, sg_response *resp, int *wrote, uint64_t deadline_ns)
{
	*wrote = 0;
	if (write_all(c->fd, c->buf, len, deadline_ns))
		return SG_IO_LOST;
	*wrote = 1;
	uint8_t *body;
	uint32_t n = 0;
	switch (read_frame(c->fd, deadline_ns, c->buf, sizeof c->buf, &body, &n)) {
	case 0:
		break;
	case 2:
		c->dead = 1;
		break;
	case 3:
		return SG_IO_PROTOCOL;
	default:
		return SG_IO_LOST;
	}
	if (sg_decode_response(body, n, resp))
		return SG_IO_PROTOCOL;
	/* id 0 is the agent's last word before it closes the connection
	 * (e.g. UNAUTHENTICATED); its code still answers this request. One
	 * that says OK is malformed (docs/protocol.md): taken as the answer,
	 * whatever it carried would pass for this request's signature. */
	if (resp->id != id && resp->id != 0)
		return SG_IO_PROTOCOL;
	if (resp->id == 0 && resp->code == SG_OK)
		return SG_IO_PROTOCOL;
	return SG_IO_OK;
}

/* dir_trusted reports whether the directory holding path may be trusted
 * to hold this user's agent: a directory, not a link, owned by this user
 * or root, writable by nobody else. Under /tmp another local user could
 * otherwise create sigil-$UID first and run an agent there, to be handed
 * this process's digests and to hand back its own keys. An absent
 * directory is no agent, which connect reports. */
static int dir_trusted(const char *path)
{
	char dir[sizeof(((struct sockaddr_un *)0)->sun_path)];
	strncpy(dir, path, sizeof dir - 1);
	dir[sizeof dir - 1] = 0;
	char *slash = strrchr(dir, '/');
	if (!slash)
		return 1;
	slash[slash == dir] = 0;
	struct stat st;
	if (lstat(dir, &st) != 0)
		return errno == ENOENT;
	uid_t me = getuid();
	if (S_ISDIR(st.st_mode) && (st.st_uid == me || st.st_uid == 0) && !(st.st_mode & 022))
		return 1;
	fprintf(stderr,
		"libsigil-pkcs11: socket dir %s is not this user's own (a %s owned by uid %u, mode %03o): "
		"refusing to trust an agent there; set SIGIL_SOCK or XDG_RUNTIME_DIR\n",
		dir, S_ISDIR(st.st_mode) ? "directory" : "non-directory", (unsigned)st.st_uid, (unsigned)(st.st_mode & 0777));
	return 0;
}

/* peer_trusted reports whether the process listening on fd's other end
 * runs as this user or root (SO_PEERCRED): it closes the window between
 * dir_trusted's check and the connect, in which another user could have
 * made the default directory and a socket in it. */
static int peer_trusted(int fd)
{
	struct ucred cr;
	socklen_t n = sizeof cr;
	if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &n) != 0)
		return 0;
	if (cr.uid == getuid() || cr.uid == 0)
		return 1;
	fprintf(stderr, "libsigil-pkcs11: the agent at the default socket runs as uid %u, not this user: refusing to trust it; set SIGIL_SOCK or XDG_RUNTIME_DIR\n",
		(unsigned)cr.uid);
	return 0;
}

/* dial connects and says Hello, the two by deadline_ns: the caller's
 * deadline for the whole call, which the request's own round trip then
 * shares. */
static sg_conn *dial(sg_agent *a, uint64_t deadline_ns, sg_response *resp, int *io)
{
	if (a->check_dir && !dir_trusted(a->path)) {
		*io = SG_IO_UNREACHABLE;
		return NULL;
	}
	sg_conn *c = malloc(sizeof *c);
	if (!c) {
		*io = SG_IO_UNREACHABLE;
		return NULL;
	}
	c->next = NULL;
	c->dead = 0;
	c->next_id = 1;
	if (conn_open(a, c) < 0)
		goto fail;
	/* The socket timeouts bound each blocking call (connect(2) while the
	 * agent's backlog is full, a send(2)), here and on every later use of
	 * the connection, to what is left of this call's wait. Without them
	 * such a call blocks for good, so a socket that cannot have them is
	 * not used. A zero timeval would mean no timeout: the time left is
	 * rounded up to whole milliseconds. */
	uint64_t now = now_ns();
	if (now >= deadline_ns)
		goto fail;
	uint64_t ms = (deadline_ns - now + 999999) / 1000000;
	struct timeval tv = {.tv_sec = (time_t)(ms / 1000), .tv_usec = (suseconds_t)(ms % 1000) * 1000};
	if (setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) != 0 ||
	    setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) != 0)
		goto fail;
	struct sockaddr_un sa = {.sun_family = AF_UNIX};
	memcpy(sa.sun_path, a->path, sizeof sa.sun_path);
	/* Retried after EINTR only until the deadline. */
	int rc;
	do {
		rc = connect(c->fd, (struct sockaddr *)&sa, sizeof sa);
	} while (rc < 0 && errno == EINTR && !passed(deadline_ns));
	if (rc < 0)
		goto fail;
	if (a->check_dir && !peer_trusted(c->fd))
		goto fail;
	sg_request hello = {.id = c->next_id++, .op = SG_OP_HELLO, .ver = SG_PROTOCOL_VERSION};
	size_t len = sg_encode_request(&hello, c->buf, sizeof c->buf);
	int wrote;
	*io = roundtrip(c, len, hello.id, resp, &wrote, deadline_ns);
	if (*io != SG_IO_OK) {
		conn_free(a, c);
		return NULL;
	}
	/* A refused Hello (e.g. UNAUTHENTICATED: this peer maps to no tenant)
	 * still returns the connection, marked dead, so the reply stays
	 * readable for the caller. */
	if (resp->code != SG_OK || resp->id == 0)
		c->dead = 1;
	return c;
fail:
	conn_free(a, c);
	*io = SG_IO_UNREACHABLE;
	return NULL;
}

/* A connection pooled less than this long ago is reused without the
 * stale check: the agent closes connections for being idle, for a
 * restart or a shutdown, none of which a connection that was answering
 * a moment ago has met, and a send to a Unix socket the agent did close
 * fails with EPIPE before the request leaves, which is retried on a fresh
 * connection anyway. The check is a poll(2) per signature otherwise. */
#define FRESH_NS 1000000u

/* stale: an idle connection with something to read, or hung up, is one
 * the agent has closed (restart, idle timeout, shutdown): never reuse it. */
static int stale(sg_conn *c)
{
	if (now_ns() - c->idle_since_ns < FRESH_NS)
		return 0;
	struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
	int rc;
	do {
		rc = poll(&pfd, 1, 0);
	} while (rc < 0 && errno == EINTR);
	return rc != 0;
}

static sg_conn *borrow(sg_agent *a)
{
	for (;;) {
		pthread_mutex_lock(&a->mu);
		sg_conn *c = a->idle;
		if (c) {
			a->idle = c->next;
			a->nidle--;
		}
		pthread_mutex_unlock(&a->mu);
		if (!c || !stale(c))
			return c;
		conn_free(a, c);
	}
}

int sg_agent_call(sg_agent *a, sg_request *req, sg_response *resp, sg_conn **connp)
{
	*connp = NULL;
	/* The agent answers within tmo or says DEADLINE_EXCEEDED; 2 s more is
	 * the backstop for an agent that stopped answering altogether. One
	 * deadline for the call: a fresh connection's connect and Hello count
	 * against it too, so no call waits longer than that in all. */
	uint64_t tmo_ns = now_ns() + (uint64_t)a->timeout_ms * 1000000u;
	uint64_t deadline_ns = tmo_ns + 2000u * 1000000u;
	for (int attempt = 0; attempt < 2; attempt++) {
		int io = SG_IO_OK;
		sg_conn *c = borrow(a);
		int pooled = c != NULL;
		if (!c) {
			c = dial(a, deadline_ns, resp, &io);
			if (!c)
				return io;
			if (c->dead) {
				*connp = c; /* the agent refused the Hello: resp has its code */
				return SG_IO_OK;
			}
		}
		/* tmo is what is left of timeout_ms (docs/protocol.md: the
		 * client's remaining deadline), the dial's share taken: sent whole
		 * after a slow dial, it let the agent go on signing, and
		 * journaling, past the module's give-up. With nothing left the
		 * request is not sent, as the Go client does. */
		if (a->timeout_ms) {
			uint64_t now = now_ns();
			if (now >= tmo_ns) {
				sg_agent_release(a, c);
				return SG_IO_LOST;
			}
			req->tmo = (uint32_t)((tmo_ns - now + 999999) / 1000000);
		}
		req->id = c->next_id++;
		size_t len = sg_encode_request(req, c->buf, sizeof c->buf);
		if (len == 0) {
			sg_agent_release(a, c);
			return SG_IO_TOOBIG;
		}
		int wrote;
		io = roundtrip(c, len, req->id, resp, &wrote, deadline_ns);
		if (io == SG_IO_OK) {
			if (resp->id == 0)
				c->dead = 1; /* the agent closes it after this reply */
			*connp = c;
			return SG_IO_OK;
		}
		conn_free(a, c);
		/* A pooled connection that failed before the request left was
		 * closed under us: the agent never saw the request, so one retry on
		 * a fresh connection is safe. A request that left is not repeated
		 * (it may have been signed and journaled). */
		if (!(pooled && !wrote))
			return io;
	}
	return SG_IO_LOST;
}

void sg_agent_release(sg_agent *a, sg_conn *c)
{
	if (!c)
		return;
	c->idle_since_ns = now_ns();
	pthread_mutex_lock(&a->mu);
	if (!c->dead && a->nidle < MAX_IDLE) {
		c->next = a->idle;
		a->idle = c;
		a->nidle++;
		c = NULL;
	}
	pthread_mutex_unlock(&a->mu);
	if (c)
		conn_free(a, c);
}

void sg_agent_close(sg_agent *a)
{
	pthread_mutex_lock(&a->mu);
	sg_conn *c = a->idle;
	a->idle = NULL;
	a->nidle = 0;
	pthread_mutex_unlock(&a->mu);
	while (c) {
		sg_conn *next = c->next;
		conn_free(a, c);
		c = next;
	}
}

void sg_agent_close_copies(sg_agent *a)
{
	for (sg_conn *c = a->all; c; c = c->all_next) {
		if (c->fd >= 0)
			close(c->fd);
		c->fd = -1; /* the number may be reused by the child's own files */
	}
}

void sg_agent_forget(sg_agent *a)
{
	/* The mutex may have been held by a parent thread at fork time: do not
	 * lock it, re-create it. close() on the child's copy of an fd leaves the
	 * parent's connection as it was. */
	sg_conn *c = a->all;
	while (c) {
		sg_conn *next = c->all_next;
		if (c->fd >= 0)
			close(c->fd);
		free(c);
		c = next;
	}
	a->all = NULL;
	a->idle = NULL;
	a->nidle = 0;
	pthread_mutex_init(&a->mu, NULL);
}
