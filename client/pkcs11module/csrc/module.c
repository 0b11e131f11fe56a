/*
 * module.c: libsigil-pkcs11.so, a PKCS#11 v2.40 front for the Sigil agent.
 * One slot with one token: the keys the calling process may use, as the
 * agent sees it (its tenant, by SO_PEERCRED). Signing is one agent round
 * trip; everything else is answered from what the last ListKeys said.
 * docs/pkcs11-module.md is the user's reference.
 *
 * Locks: g.mu guards the key and session tables and the login flag and is
 * never held across agent I/O. Each session has its own mutex, held for a
 * whole call on that session (including the agent round trip of C_Sign),
 * so one session's calls are serialised and other sessions run in
 * parallel. Order: a session's mutex, then g.mu; never the other way.
 *
 * Lifetime: every call that uses g holds the call gate (g_gate) from entry
 * to return, and C_Finalize closes the gate and waits for the calls inside
 * to leave before it frees anything.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "agent.h"
#include "sigil.h"

#define EXPORT __attribute__((visibility("default")))

#define SLOT_ID 1
#define MAX_SESSIONS (1u << 20)
#define DEFAULT_TIMEOUT_MS 10000
#define LIBRARY_VERSION_MAJOR 1
#define LIBRARY_VERSION_MINOR 0

enum input_kind {
	IN_HASH,       /* the mechanism includes the hash: hash the data here */
	IN_DIGEST,     /* the data is a digest */
	IN_DIGESTINFO, /* CKM_RSA_PKCS: a DER DigestInfo */
	IN_MESSAGE,    /* CKM_EDDSA: the message itself */
};

/* sign_key is what a signing operation needs of its key, the session's
 * own copy: refresh_keys may free the table's key (no longer listed) while
 * the operation is active or its round trip under way. */
typedef struct {
	char *name; /* the name's bytes, then the kid's */
	size_t name_len, kid_len;
	int family;
	size_t sig_len, field_len;
} sign_key;

typedef struct {
	CK_SESSION_HANDLE h;
	CK_FLAGS flags;
	int refs;   /* under g.mu: the table's reference and each caller's */
	int closed; /* atomic: C_CloseSession ran */
	pthread_mutex_t mu;

	int find_active;
	CK_OBJECT_HANDLE *found;
	size_t nfound, pos;

	int sign_active, sign_multi;
	sign_key key;
	int sch, hash, input;
	void *mdctx;
	uint8_t *buf;
	size_t blen, bcap;
} sg_session;

static struct {
	int init;
	pthread_mutex_t mu;
	sg_agent agent;
	char token_label[33];
	char serial[17];
	char *only_keys; /* "keys =" in the config: ",name,name," or NULL for all */
	sg_key **keys; /* in order of slot */
	size_t nkeys, capkeys;
	uint32_t nslots; /* slots given out since C_Initialize: see object_handle */
	uint64_t searches; /* key lists merged since C_Initialize: see forget_absent */
	int keys_loaded;
	uint32_t obj_base; /* g_object_next at C_Initialize: see object_handle */
	sg_session **sess;
	size_t nsess, opensess, rwsess;
	int logged_in;
} g;

/* The high bits of session handles, bumped at every open under g.mu. It
 * lives outside g, which C_Initialize and C_Finalize clear, so that a
 * handle kept from before C_Finalize (or from the parent, in a fork child)
 * does not name a session opened after the next C_Initialize. */
static uint64_t g_session_gen;

/* The first object handle the next key added to the table takes, less
 * one. Like g_session_gen it outlives g, and C_Initialize starts the new
 * table's numbering here, past every handle given out before in this
 * process (and in the parent, for a fork child): a handle kept from before
 * C_Finalize names no object after it, however the agent's list has
 * changed, rather than whichever key took its place in the table. Written
 * under g.mu (and in C_Initialize under g_init_mu, with no call inside). */
static uint32_t g_object_next;

/* Set in a fork child: every call answers CKR_CRYPTOKI_NOT_INITIALIZED
 * until the child calls C_Initialize, which drops the parent's state.
 * Read and written under g_init_mu (or in the child's atfork handler, the
 * child's only thread). */
static int g_forked;
static pthread_mutex_t g_init_mu = PTHREAD_MUTEX_INITIALIZER;

/*
 * The call gate. PKCS#11 v2.40 section 5.4 makes C_Finalize while another
 * thread is inside the module the application's fault, but the module is
 * loaded into hosts (Java, NSS, OpenSSL engines) where a crash is worse
 * than an error: a C_Sign in flight used the key, the session and the
 * connection pool that C_Finalize freed under it
 * (testdata/finalizesign.c).
 *
 * One word: GATE_CLOSED while the module is not initialized (or is being
 * finalized, or this is a fork child that has not initialized again), and
 * below it the number of calls inside. A call enters with one atomic add,
 * which both counts it and reads the flag, so no call can slip past a
 * closing C_Finalize unseen; it leaves with one atomic subtract (ENTER_CALL,
 * through a cleanup handler, so no return path forgets it). C_Finalize sets
 * the flag, waits for the count to reach zero and only then frees: a call
 * in flight finishes normally, each of its waits on the agent bounded by
 * the module's own I/O timeouts, and one that starts after the flag answers
 * CKR_CRYPTOKI_NOT_INITIALIZED. No lock is held across a round trip, so
 * threads signing on separate connections never wait on each other here:
 * a call costs two atomic operations on one shared word (at worst the
 * cache line moving between cores, well under a microsecond) against a
 * round trip of tens of microseconds. A failed entry undoes its add; it
 * looks at the flag first, so threads that keep calling a finalized module
 * do not keep a closing C_Finalize waiting on their transient counts.
 */
#define GATE_CLOSED 0x80000000u
static uint32_t g_gate = GATE_CLOSED;

static int call_enter(void)
{
	if (__atomic_load_n(&g_gate, __ATOMIC_RELAXED) & GATE_CLOSED)
		return 0;
	/* Acquire: pairs with C_Initialize's release opening the gate, so
	 * the call sees the state it set up. */
	if (!(__atomic_fetch_add(&g_gate, 1, __ATOMIC_ACQUIRE) & GATE_CLOSED))
		return 1;
	__atomic_fetch_sub(&g_gate, 1, __ATOMIC_RELEASE);
	return 0;
}

static void call_leave(int *entered)
{
	/* Release: C_Finalize's acquire load of a zero count then sees every
	 * access this call made before it frees the state. */
	if (*entered)
		__atomic_fetch_sub(&g_gate, 1, __ATOMIC_RELEASE);
}

/* gate_close closes the gate and waits for the calls inside to leave.
 * Under g_init_mu. */
static void gate_close(void)
{
	__atomic_fetch_or(&g_gate, GATE_CLOSED, __ATOMIC_ACQ_REL);
	while (__atomic_load_n(&g_gate, __ATOMIC_ACQUIRE) != GATE_CLOSED) {
		struct timespec ts = {.tv_sec = 0, .tv_nsec = 100000};
		nanosleep(&ts, NULL);
	}
}

/* fork() is not a Cryptoki call: an application may fork while another of
 * its threads is in C_Initialize, C_Finalize or C_OpenSession. The child
 * gets a copy of the state as it was at the fork, and its C_Initialize
 * frees that copy; a copy taken halfway through C_Finalize (sessions freed,
 * g.init still set) would be freed twice. So the fork waits for the
 * module's state to be consistent: the prepare handler takes g_init_mu,
 * g.mu and the connection pool's lock (in the order the module takes
 * them), and both parent and child release them. None is held across a
 * round trip to the agent. */
static int g_fork_holds_mu; /* the prepare handler took g.mu */

static void on_fork_prepare(void)
{
	pthread_mutex_lock(&g_init_mu);
	g_fork_holds_mu = g.init && !g_forked;
	if (g_fork_holds_mu) {
		pthread_mutex_lock(&g.mu);
		pthread_mutex_lock(&g.agent.mu);
	}
}

static void on_fork_parent(void)
{
	if (g_fork_holds_mu) {
		pthread_mutex_unlock(&g.agent.mu);
		pthread_mutex_unlock(&g.mu);
	}
	pthread_mutex_unlock(&g_init_mu);
}

static void on_fork_child(void)
{
	/* The forking thread, the child's only one, holds them all. */
	if (g_fork_holds_mu) {
		/* Nothing in the child may use the parent's connections (every
		 * call answers CKR_CRYPTOKI_NOT_INITIALIZED until C_Initialize,
		 * which drops them): close the child's copies now, those a
		 * parent thread had borrowed for a round trip included, rather
		 * than leave them open for the life of a child that never
		 * initializes the module. The parent's sockets are untouched. */
		sg_agent_close_copies(&g.agent);
		pthread_mutex_unlock(&g.agent.mu);
		pthread_mutex_unlock(&g.mu);
	}
	pthread_mutex_unlock(&g_init_mu);
	if (g.init)
		g_forked = 1;
	/* The count is of parent threads, none of which is here: closed and
	 * empty, so the child's own C_Initialize and C_Finalize start clean. */
	__atomic_store_n(&g_gate, GATE_CLOSED, __ATOMIC_RELAXED);
}

/* glibc unregisters these handlers when the module is dlclose'd. */
__attribute__((constructor)) static void on_load(void)
{
	pthread_atfork(on_fork_prepare, on_fork_parent, on_fork_child);
}

/* A host may cancel a thread (pthread_cancel, deferred) that is inside
 * the module, and poll(2), connect(2), fopen(3) and nanosleep(2) are
 * cancellation points. A thread taken out there never ran the rest of the
 * call: it kept its session's lock and its place in the call gate, so the
 * next call on the session and C_Finalize waited forever
 * (testdata/cancel.c). So no call is a cancellation point: each runs to
 * its end, every wait in it bounded by the module's timeouts, and the
 * thread is cancelled at the host's next cancellation point after. */
static int cancel_off(void)
{
	int old;
	pthread_setcancelstate(PTHREAD_CANCEL_DISABLE, &old);
	return old;
}

static void cancel_restore(int *old)
{
	int ignored;
	pthread_setcancelstate(*old, &ignored);
}

#define NO_CANCEL() int sg_cancel_ __attribute__((cleanup(cancel_restore))) = cancel_off()

/* ENTER_CALL opens a call that uses the module's state: it holds the call
 * gate until the function returns (a cleanup handler leaves it), with
 * cancellation off (NO_CANCEL; restored after the gate is left). First in
 * the function body, before anything of g is read. */
#define ENTER_CALL()                                                              \
	NO_CANCEL();                                                              \
	int sg_entered_ __attribute__((cleanup(call_leave))) = call_enter();     \
	if (!sg_entered_)                                                         \
		return CKR_CRYPTOKI_NOT_INITIALIZED

/* ---- result codes ---- */

/* code_rv maps an agent result code to the nearest CKR (the table in
 * docs/pkcs11-module.md). */
static CK_RV code_rv(uint32_t code)
{
	switch (code) {
	case SG_OK: return CKR_OK;
	case SG_BAD_REQUEST: return CKR_DATA_INVALID;
	case SG_NOT_FOUND: return CKR_KEY_HANDLE_INVALID;
	case SG_UNSUPPORTED_ALGORITHM: return CKR_MECHANISM_INVALID;
	case SG_UNAUTHENTICATED:
	case SG_PERMISSION_DENIED:
	case SG_RATE_LIMITED:
	case SG_QUOTA_EXCEEDED:
	case SG_OUTSIDE_WINDOW:
	case SG_PAUSED:
	case SG_KEY_RETIRED:
		return CKR_FUNCTION_REJECTED;
	case SG_UNSUPPORTED_VERSION:
	case SG_PIN_INCORRECT:
	case SG_TOKEN_LOCKED:
	case SG_UNAVAILABLE:
	case SG_DEADLINE_EXCEEDED:
	case SG_JOURNAL_UNAVAILABLE:
		return CKR_DEVICE_ERROR;
	}
	return CKR_GENERAL_ERROR; /* INTERNAL, or a code newer than this module */
}

static CK_RV io_rv(int io)
{
	return io == SG_IO_TOOBIG ? CKR_DATA_LEN_RANGE : CKR_DEVICE_ERROR;
}

/* ---- configuration ---- */

static void pad(unsigned char *dst, size_t n, const char *src)
{
	size_t k = strlen(src);
	if (k > n)
		k = n;
	memset(dst, ' ', n);
	memcpy(dst, src, k);
}

static char *trim(char *s)
{
	while (*s == ' ' || *s == '\t')
		s++;
	size_t n = strlen(s);
	while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\n' || s[n - 1] == '\r'))
		s[--n] = 0;
	return s;
}

static int set_socket(char *dst, size_t cap, const char *v)
{
	if (strncmp(v, "unix:", 5) == 0)
		v += 5;
	if (!*v || strlen(v) >= cap)
		return -1;
	strcpy(dst, v);
	return 0;
}

/* tls_address reports whether v is a tls://host:port agent address: the
 * sigil CLI takes one (in SIGIL_SOCK too), the module does not speak TLS.
 * Taken as a path it showed a slot named after it and then failed every
 * call with CKR_DEVICE_ERROR and no word why. */
static int tls_address(const char *v)
{
	return strncmp(v, "tls://", 6) == 0;
}

/* same_dir reports whether paths a and b name files in one directory. */
static int same_dir(const char *a, const char *b)
{
	const char *sa = strrchr(a, '/'), *sb = strrchr(b, '/');
	if (!sa || !sb)
		return !sa && !sb;
	return sa - a == sb - b && memcmp(a, b, (size_t)(sa - a)) == 0;
}

/* A config line longer than this is refused as such: a `keys =` list of a
 * few thousand slot names fits. */
#define MAX_CONFIG_LINE 65536

/* read_line reads one line of f (its newline dropped) into *buf, grown as
 * needed but never past MAX_CONFIG_LINE bytes, so a huge file costs no more
 * memory than that. Returns the line's length, or -1 at the end of the
 * file, -2 for a line too long, -3 for a read error or no memory: a file
 * not read to its end is never taken for a shorter one. */
static long read_line(FILE *f, char **buf, size_t *cap)
{
	size_t n = 0;
	int ch;
	while ((ch = getc(f)) != EOF && ch != '\n') {
		if (n >= MAX_CONFIG_LINE)
			return -2;
		if (n + 2 > *cap) {
			size_t want = *cap ? *cap * 2 : 256;
			if (want > MAX_CONFIG_LINE + 1)
				want = MAX_CONFIG_LINE + 1;
			char *p = realloc(*buf, want);
			if (!p)
				return -3;
			*buf = p;
			*cap = want;
		}
		(*buf)[n++] = (char)ch;
	}
	if (ferror(f))
		return -3;
	if (ch == EOF && n == 0)
		return -1;
	if (!*buf && !(*buf = malloc(*cap = 1)))
		return -3;
	(*buf)[n] = 0;
	return (long)n;
}

/* load_config: SIGIL_PKCS11_CONF's settings, else SIGIL_SOCK, else the
 * agent's default socket path (proto.DefaultSocketPath). secure_getenv:
 * a setuid host does not take its socket from the caller's environment. */
static CK_RV load_config(char *sock, size_t cap, unsigned *timeout_ms, char *label, char **only_keys, int *check_dir)
{
	const char *v;
	*only_keys = NULL;
	sock[0] = 0;
	*timeout_ms = DEFAULT_TIMEOUT_MS;
	strcpy(label, "sigil");
	if ((v = secure_getenv("SIGIL_PKCS11_CONF")) && *v) {
		FILE *f = fopen(v, "re");
		char *line = NULL;
		size_t line_cap = 0;
		long line_len;
		int lineno = 0;
		if (!f) {
			fprintf(stderr, "libsigil-pkcs11: SIGIL_PKCS11_CONF %s: %s\n", v, strerror(errno));
			return CKR_GENERAL_ERROR;
		}
		while ((line_len = read_line(f, &line, &line_cap)) != -1) {
			lineno++;
			/* A NUL would end the line early for every string function
			 * below, dropping the rest of a setting without a word. */
			if (line_len < 0 || memchr(line, 0, (size_t)line_len)) {
				if (line_len == -2)
					fprintf(stderr, "libsigil-pkcs11: %s:%d: line longer than %d bytes\n", v, lineno, MAX_CONFIG_LINE);
				else if (line_len >= 0)
					fprintf(stderr, "libsigil-pkcs11: %s:%d: holds a NUL byte\n", v, lineno);
				else
					fprintf(stderr, "libsigil-pkcs11: %s:%d: could not be read\n", v, lineno);
				free(line);
				fclose(f);
				free(*only_keys);
				*only_keys = NULL;
				return CKR_GENERAL_ERROR;
			}
			char *l = trim(line), *eq;
			if (!*l || *l == '#')
				continue;
			if (!(eq = strchr(l, '='))) {
				fprintf(stderr, "libsigil-pkcs11: %s:%d: want key = value\n", v, lineno);
				free(line);
				fclose(f);
				free(*only_keys);
				*only_keys = NULL;
				return CKR_GENERAL_ERROR;
			}
			*eq = 0;
			char *key = trim(l), *val = trim(eq + 1);
			int bad = 0, unknown = 0;
			if (strcmp(key, "socket") == 0 && tls_address(val)) {
				fprintf(stderr, "libsigil-pkcs11: %s:%d: socket %s is an mTLS address; the module speaks Unix sockets only: name the agent's Unix socket\n", v, lineno, val);
				unknown = 1; /* said why */
			} else if (strcmp(key, "socket") == 0) {
				bad = set_socket(sock, cap, val);
			} else if (strcmp(key, "token_label") == 0) {
				bad = !*val || strlen(val) > 32;
				if (!bad)
					strcpy(label, val);
			} else if (strcmp(key, "keys") == 0) {
				/* Stored as ",a,b," so a lookup is one strstr of ",name,". */
				free(*only_keys);
				size_t n = strlen(val);
				if ((*only_keys = malloc(n + 3))) {
					char *d = *only_keys;
					*d++ = ',';
					for (const char *c = val; *c; c++)
						if (*c != ' ' && *c != '\t')
							*d++ = *c;
					*d++ = ',';
					*d = 0;
				}
				bad = !*only_keys;
			} else if (strcmp(key, "timeout_ms") == 0) {
				char *end;
				unsigned long ms = strtoul(val, &end, 10);
				bad = *end || ms == 0 || ms > 600000;
				*timeout_ms = (unsigned)ms;
			} else {
				fprintf(stderr, "libsigil-pkcs11: %s:%d: unknown setting %s\n", v, lineno, key);
				unknown = 1;
			}
			if (bad || unknown) {
				if (bad)
					fprintf(stderr, "libsigil-pkcs11: %s:%d: bad value for %s\n", v, lineno, key);
				free(line);
				fclose(f);
				free(*only_keys);
				*only_keys = NULL;
				return CKR_GENERAL_ERROR;
			}
		}
		free(line);
		fclose(f);
	}
	/* The file's socket comes first: a SIGIL_SOCK it overrides is not read. */
	if (!sock[0] && (v = secure_getenv("SIGIL_SOCK")) && *v) {
		if (tls_address(v)) {
			fprintf(stderr, "libsigil-pkcs11: SIGIL_SOCK=%s is an mTLS address; the module speaks Unix sockets only: set SIGIL_SOCK, or socket = in $SIGIL_PKCS11_CONF, to the agent's Unix socket\n", v);
			free(*only_keys);
			*only_keys = NULL;
			return CKR_GENERAL_ERROR;
		}
		if (set_socket(sock, cap, v))
			goto toolong;
	}
	char def[512];
	if ((v = secure_getenv("XDG_RUNTIME_DIR")) && *v) {
		snprintf(def, sizeof def, "%s/sigil/agent.sock", v);
	} else {
		const char *tmp = secure_getenv("TMPDIR");
		snprintf(def, sizeof def, "%s/sigil-%u/agent.sock", tmp && *tmp ? tmp : "/tmp", (unsigned)getuid());
	}
	if (!sock[0] && set_socket(sock, cap, def))
		goto toolong;
	*check_dir = same_dir(sock, def);
	return CKR_OK;
toolong:
	free(*only_keys);
	*only_keys = NULL;
	fprintf(stderr, "libsigil-pkcs11: agent socket path empty or longer than %zu bytes\n", cap - 1);
	return CKR_GENERAL_ERROR;
}

/* ---- keys ---- */

/* refresh_keys asks the agent for the caller's keys (one round trip) and
 * merges them into the key table: a known (name, kid, certificate) keeps
 * its object handles, a new one gets new handles, one no longer listed
 * disappears (forget_absent). */
static int shown(sg_bytes name)
{
	if (!g.only_keys)
		return 1;
	char want[260];
	/* An absent name is a NULL pointer, which memchr must not see; no
	 * "keys =" entry names an empty key anyway. */
	if (name.n == 0 || name.n > sizeof want - 3 || memchr(name.p, ',', name.n))
		return 0;
	want[0] = ',';
	memcpy(want + 1, name.p, name.n);
	want[name.n + 1] = ',';
	want[name.n + 2] = 0;
	return strstr(g.only_keys, want) != NULL;
}

/* Keys no longer listed that the table keeps, so that one listed again
 * (a provider back after an outage) has its handles back. Past these the
 * oldest are freed: the table is then at most one key list (a frame's
 * worth of keys) and these. It kept every key ever listed until
 * C_Finalize, so an agent listing new keys at each search grew the host
 * by about 1.7 MB a search (TestKeyListsDoNotAccumulate). */
#define MAX_ABSENT_KEYS 64

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return (x > y) - (x < y);
}

/* forget_absent frees, under g.mu, the unlisted keys past MAX_ABSENT_KEYS
 * that have gone unlisted longest (by the last search that listed them;
 * among keys last listed together, the latest added first), so that a
 * long-lived key missing from one list, while its provider was out, keeps
 * its handles, and those rotated away for good go first. A key is only read under g.mu (a signing session has its own
 * sign_key), so none is in use. */
static void forget_absent(void)
{
	size_t absent = 0, kept = 0, below = 0;
	for (size_t i = 0; i < g.nkeys; i++)
		absent += !g.keys[i]->present;
	if (absent <= MAX_ABSENT_KEYS)
		return;
	uint64_t *when = malloc(absent * sizeof *when);
	if (!when)
		return; /* kept until a later search has the memory */
	size_t n = 0;
	for (size_t i = 0; i < g.nkeys; i++)
		if (!g.keys[i]->present)
			when[n++] = g.keys[i]->listed;
	qsort(when, n, sizeof *when, cmp_u64);
	size_t drop = absent - MAX_ABSENT_KEYS, tied = 0;
	uint64_t cut = when[drop - 1]; /* the newest "last listed" that goes */
	for (size_t i = 0; i < n; i++) {
		below += when[i] < cut;
		tied += when[i] == cut;
	}
	free(when);
	/* Of the keys last listed at cut, drop - below go: the latest added
	 * (the table is in order of slot), so the first tied - that stay. */
	size_t stay = tied - (drop - below);
	for (size_t i = 0; i < g.nkeys; i++) {
		sg_key *k = g.keys[i];
		int gone = 0;
		if (!k->present && k->listed < cut)
			gone = 1;
		else if (!k->present && k->listed == cut) {
			if (stay > 0)
				stay--;
			else
				gone = 1;
		}
		if (gone) {
			sg_key_free(k);
			continue;
		}
		g.keys[kept++] = k;
	}
	g.nkeys = kept;
}

static CK_RV refresh_keys(void)
{
	sg_request req = {.op = SG_OP_LISTKEYS};
	sg_response resp;
	sg_conn *c;
	int io = sg_agent_call(&g.agent, &req, &resp, &c);
	if (io)
		return io_rv(io);
	CK_RV rv = code_rv(resp.code);
	if (rv != CKR_OK) {
		sg_agent_release(&g.agent, c);
		return rv;
	}
	pthread_mutex_lock(&g.mu);
	g.searches++;
	for (size_t i = 0; i < g.nkeys; i++)
		g.keys[i]->present = 0;
	sg_bytes it = resp.keys;
	sg_key_entry e;
	int more;
	while ((more = sg_keys_next(&it, &e)) == 1) {
		size_t i;
		if (!shown(e.name))
			continue;
		for (i = 0; i < g.nkeys; i++)
			if (sg_key_same(g.keys[i], &e))
				break;
		if (i < g.nkeys) {
			g.keys[i]->present = 1;
			g.keys[i]->listed = g.searches;
			continue;
		}
		sg_key *k = calloc(1, sizeof *k);
		if (!k) {
			rv = CKR_HOST_MEMORY;
			break;
		}
		if (sg_key_build(k, &e)) {
			sg_key_free(k); /* a key type PKCS#11 clients here cannot use */
			continue;
		}
		/* Object handles stay within 32 bits, though CK_ULONG has 64
		 * here: a host or language binding that keeps a handle in a
		 * 32-bit integer would otherwise pass back another number. Past
		 * that (613 million keys in a process's life) no handle is
		 * reused: the search fails (CKR_GENERAL_ERROR) and the keys
		 * after this one stay hidden. */
		if ((uint64_t)g.obj_base + SG_OBJS_PER_KEY * ((uint64_t)g.nslots + 1) > UINT32_MAX) {
			sg_key_free(k);
			rv = CKR_GENERAL_ERROR;
			break;
		}
		if (g.nkeys == g.capkeys) {
			size_t cap = g.capkeys ? 2 * g.capkeys : 16;
			sg_key **nk = realloc(g.keys, cap * sizeof *nk);
			if (!nk) {
				sg_key_free(k);
				rv = CKR_HOST_MEMORY;
				break;
			}
			g.keys = nk;
			g.capkeys = cap;
		}
		k->slot = g.nslots++;
		k->listed = g.searches;
		g.keys[g.nkeys++] = k;
		g_object_next = g.obj_base + (uint32_t)(SG_OBJS_PER_KEY * g.nslots);
	}
	if (more < 0)
		rv = CKR_DEVICE_ERROR;
	if (rv == CKR_OK) {
		/* Only after a whole list: one cut short leaves keys it did not
		 * reach unmarked, though the agent still lists them. */
		forget_absent();
		g.keys_loaded = 1;
	}
	pthread_mutex_unlock(&g.mu);
	sg_agent_release(&g.agent, c);
	return rv;
}

static CK_RV ensure_keys(void)
{
	pthread_mutex_lock(&g.mu);
	int loaded = g.keys_loaded;
	pthread_mutex_unlock(&g.mu);
	return loaded ? CKR_OK : refresh_keys();
}

/* object_exists: a key always has its private and public key objects; the
 * certificate objects only when the agent listed them. */
static int object_exists(const sg_key *k, int kind)
{
	if (kind == SG_OBJ_CERT)
		return k->has_cert;
	if (kind >= SG_OBJ_CHAIN)
		return kind - SG_OBJ_CHAIN < k->nchain;
	return 1;
}

/* object_handle numbers the objects of the key in slot (sigil.h:
 * SG_OBJS_PER_KEY per key; a slot is never given out twice) from this
 * initialization's base, so a key keeps its handles for as long as it
 * stays in the table, and no handle is one an earlier initialization gave
 * out (g_object_next). */
static CK_OBJECT_HANDLE object_handle(uint32_t slot, int kind) { return (CK_OBJECT_HANDLE)g.obj_base + (CK_OBJECT_HANDLE)slot * SG_OBJS_PER_KEY + (CK_OBJECT_HANDLE)kind + 1; }

/* find_object resolves a handle to its key and which of the key's objects
 * it is (SG_OBJ_*); NULL for one below this initialization's base or of a
 * key not listed. Under g.mu, which the caller holds while it reads the
 * key: a later search may free it. */
static sg_key *find_object(CK_OBJECT_HANDLE h, int *kind)
{
	if (h <= g.obj_base)
		return NULL;
	CK_OBJECT_HANDLE off = h - g.obj_base - 1;
	*kind = (int)(off % SG_OBJS_PER_KEY);
	CK_OBJECT_HANDLE slot = off / SG_OBJS_PER_KEY;
	/* The table is in order of slot: a binary search. */
	size_t lo = 0, hi = g.nkeys;
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;
		if (g.keys[mid]->slot < slot)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo < g.nkeys && g.keys[lo]->slot == slot && g.keys[lo]->present && object_exists(g.keys[lo], *kind))
		return g.keys[lo];
	return NULL;
}

static const sg_attrs *object_attrs(const sg_key *k, int kind)
{
	switch (kind) {
	case SG_OBJ_PRIVATE:
		return &k->priv;
	case SG_OBJ_PUBLIC:
		return &k->pub;
	case SG_OBJ_CERT:
		return &k->cert;
	default:
		return &k->chain[kind - SG_OBJ_CHAIN];
	}
}

/* ---- sessions ---- */

static void session_end_find(sg_session *s)
{
	free(s->found);
	s->found = NULL;
	s->nfound = s->pos = 0;
	s->find_active = 0;
}

static void session_end_sign(sg_session *s)
{
	if (s->mdctx)
		sg_md_ctx_free(s->mdctx);
	s->mdctx = NULL;
	s->blen = 0;
	s->sign_active = s->sign_multi = 0;
	free(s->key.name);
	memset(&s->key, 0, sizeof s->key);
}

static void session_free(sg_session *s)
{
	session_end_find(s);
	session_end_sign(s);
	free(s->buf);
	pthread_mutex_destroy(&s->mu);
	free(s);
}

/* get_session returns the session locked, with a reference, or NULL. */
static sg_session *get_session(CK_SESSION_HANDLE h)
{
	sg_session *s = NULL;
	size_t i = (size_t)(h & (MAX_SESSIONS - 1));
	pthread_mutex_lock(&g.mu);
	if (i >= 1 && i <= g.nsess && g.sess[i - 1] && g.sess[i - 1]->h == h) {
		s = g.sess[i - 1];
		s->refs++;
	}
	pthread_mutex_unlock(&g.mu);
	if (!s)
		return NULL;
	pthread_mutex_lock(&s->mu);
	return s;
}

static void put_session(sg_session *s)
{
	pthread_mutex_unlock(&s->mu);
	pthread_mutex_lock(&g.mu);
	int last = --s->refs == 0;
	pthread_mutex_unlock(&g.mu);
	if (last)
		session_free(s);
}

#define SESSION(h, s)                                              \
	ENTER_CALL();                                              \
	sg_session *s = get_session(h);                            \
	if (!s)                                                    \
		return CKR_SESSION_HANDLE_INVALID;                 \
	if (__atomic_load_n(&s->closed, __ATOMIC_ACQUIRE)) {       \
		put_session(s);                                    \
		return CKR_SESSION_CLOSED;                         \
	}

/* unlink_session removes table slot i (under g.mu) and returns whether the
 * caller must free the session (no call is using it). */
static int unlink_session(size_t i)
{
	sg_session *s = g.sess[i];
	g.sess[i] = NULL;
	g.opensess--;
	if (s->flags & CKF_RW_SESSION)
		g.rwsess--;
	if (g.opensess == 0)
		g.logged_in = 0; /* PKCS#11: the login ends with the last session */
	__atomic_store_n(&s->closed, 1, __ATOMIC_RELEASE);
	return --s->refs == 0;
}

/* ---- general ---- */

static void drop_state(int after_fork)
{
	for (size_t i = 0; i < g.nsess; i++) {
		sg_session *s = g.sess[i];
		if (!s)
			continue;
		if (after_fork) {
			/* Its mutex may be held by a thread that does not exist here. */
			session_end_find(s);
			if (s->mdctx)
				sg_md_ctx_free(s->mdctx);
			free(s->key.name);
			free(s->buf);
			free(s);
		} else {
			session_free(s);
		}
	}
	free(g.sess);
	for (size_t i = 0; i < g.nkeys; i++)
		sg_key_free(g.keys[i]);
	free(g.keys);
	free(g.only_keys);
	if (after_fork)
		sg_agent_forget(&g.agent);
	else
		sg_agent_close(&g.agent);
	memset(&g, 0, sizeof g);
}

EXPORT CK_RV C_Initialize(CK_VOID_PTR pInitArgs)
{
	NO_CANCEL(); /* reads the config file under g_init_mu */
	CK_RV rv = CKR_OK;
	if (pInitArgs) {
		CK_C_INITIALIZE_ARGS *a = pInitArgs;
		int fns = (a->CreateMutex != NULL) + (a->DestroyMutex != NULL) + (a->LockMutex != NULL) + (a->UnlockMutex != NULL);
		if (a->pReserved || (fns != 0 && fns != 4))
			return CKR_ARGUMENTS_BAD;
		/* We lock with pthreads; an application that can only offer its
		 * own mutex functions is told we cannot use them. */
		if (fns == 4 && !(a->flags & CKF_OS_LOCKING_OK))
			return CKR_CANT_LOCK;
	}
	pthread_mutex_lock(&g_init_mu);
	if (g_forked) {
		drop_state(1);
		g_forked = 0;
	}
	if (g.init) {
		rv = CKR_CRYPTOKI_ALREADY_INITIALIZED;
		goto out;
	}
	char sock[sizeof g.agent.path];
	unsigned timeout_ms;
	char label[33];
	char *only_keys;
	int check_dir;
	if ((rv = load_config(sock, sizeof sock, &timeout_ms, label, &only_keys, &check_dir)) != CKR_OK)
		goto out;
	if (sg_crypto_init()) {
		free(only_keys);
		rv = CKR_GENERAL_ERROR;
		goto out;
	}
	memset(&g, 0, sizeof g);
	g.obj_base = g_object_next;
	g.only_keys = only_keys;
	pthread_mutex_init(&g.mu, NULL);
	sg_agent_init(&g.agent, sock, timeout_ms);
	g.agent.check_dir = check_dir;
	strcpy(g.token_label, label);
	/* The serial names the agent (its socket), so two configurations in
	 * one process show two distinguishable tokens. FNV-1a, 64 bits. */
	uint64_t hsh = 1469598103934665603ull;
	for (const char *p = sock; *p; p++)
		hsh = (hsh ^ (uint8_t)*p) * 1099511628211ull;
	snprintf(g.serial, sizeof g.serial, "%016llx", (unsigned long long)hsh);
	g.init = 1;
	__atomic_fetch_and(&g_gate, ~GATE_CLOSED, __ATOMIC_RELEASE);
out:
	pthread_mutex_unlock(&g_init_mu);
	return rv;
}

EXPORT CK_RV C_Finalize(CK_VOID_PTR pReserved)
{
	NO_CANCEL(); /* waits for the calls inside with g_init_mu held */
	if (pReserved)
		return CKR_ARGUMENTS_BAD;
	pthread_mutex_lock(&g_init_mu);
	if (!g.init || g_forked) {
		pthread_mutex_unlock(&g_init_mu);
		return CKR_CRYPTOKI_NOT_INITIALIZED;
	}
	gate_close();
	drop_state(0);
	pthread_mutex_unlock(&g_init_mu);
	return CKR_OK;
}

EXPORT CK_RV C_GetInfo(CK_INFO_PTR pInfo)
{
	ENTER_CALL();
	if (!pInfo)
		return CKR_ARGUMENTS_BAD;
	memset(pInfo, 0, sizeof *pInfo);
	pInfo->cryptokiVersion.major = 2;
	pInfo->cryptokiVersion.minor = 40;
	pad(pInfo->manufacturerID, sizeof pInfo->manufacturerID, "Sigil");
	pad(pInfo->libraryDescription, sizeof pInfo->libraryDescription, "Sigil signing agent front");
	pInfo->libraryVersion.major = LIBRARY_VERSION_MAJOR;
	pInfo->libraryVersion.minor = LIBRARY_VERSION_MINOR;
	return CKR_OK;
}

EXPORT CK_RV C_GetSlotList(CK_BBOOL tokenPresent, CK_SLOT_ID_PTR pSlotList, CK_ULONG_PTR pulCount)
{
	(void)tokenPresent;
	ENTER_CALL();
	if (!pulCount)
		return CKR_ARGUMENTS_BAD;
	if (!pSlotList) {
		*pulCount = 1;
		return CKR_OK;
	}
	if (*pulCount < 1) {
		*pulCount = 1;
		return CKR_BUFFER_TOO_SMALL;
	}
	pSlotList[0] = SLOT_ID;
	*pulCount = 1;
	return CKR_OK;
}

EXPORT CK_RV C_GetSlotInfo(CK_SLOT_ID slotID, CK_SLOT_INFO_PTR pInfo)
{
	ENTER_CALL();
	if (slotID != SLOT_ID)
		return CKR_SLOT_ID_INVALID;
	if (!pInfo)
		return CKR_ARGUMENTS_BAD;
	memset(pInfo, 0, sizeof *pInfo);
	char desc[64 + sizeof g.agent.path];
	snprintf(desc, sizeof desc, "Sigil agent %s", g.agent.path);
	pad(pInfo->slotDescription, sizeof pInfo->slotDescription, desc);
	pad(pInfo->manufacturerID, sizeof pInfo->manufacturerID, "Sigil");
	pInfo->flags = CKF_TOKEN_PRESENT;
	pInfo->hardwareVersion.major = LIBRARY_VERSION_MAJOR;
	pInfo->firmwareVersion.major = LIBRARY_VERSION_MAJOR;
	return CKR_OK;
}

EXPORT CK_RV C_GetTokenInfo(CK_SLOT_ID slotID, CK_TOKEN_INFO_PTR pInfo)
{
	ENTER_CALL();
	if (slotID != SLOT_ID)
		return CKR_SLOT_ID_INVALID;
	if (!pInfo)
		return CKR_ARGUMENTS_BAD;
	memset(pInfo, 0, sizeof *pInfo);
	pad(pInfo->label, sizeof pInfo->label, g.token_label);
	pad(pInfo->manufacturerID, sizeof pInfo->manufacturerID, "Sigil");
	pad(pInfo->model, sizeof pInfo->model, "signing agent");
	pad(pInfo->serialNumber, sizeof pInfo->serialNumber, g.serial);
	/* No CKF_LOGIN_REQUIRED: the agent identifies the caller by its socket
	 * peer credentials, so there is no PIN to ask for. */
	pInfo->flags = CKF_TOKEN_INITIALIZED | CKF_USER_PIN_INITIALIZED;
	pthread_mutex_lock(&g.mu);
	pInfo->ulSessionCount = g.opensess;
	pInfo->ulRwSessionCount = g.rwsess;
	pthread_mutex_unlock(&g.mu);
	pInfo->ulMaxSessionCount = CK_EFFECTIVELY_INFINITE;
	pInfo->ulMaxRwSessionCount = CK_EFFECTIVELY_INFINITE;
	pInfo->ulMaxPinLen = 255;
	pInfo->ulMinPinLen = 0;
	pInfo->ulTotalPublicMemory = CK_UNAVAILABLE_INFORMATION;
	pInfo->ulFreePublicMemory = CK_UNAVAILABLE_INFORMATION;
	pInfo->ulTotalPrivateMemory = CK_UNAVAILABLE_INFORMATION;
	pInfo->ulFreePrivateMemory = CK_UNAVAILABLE_INFORMATION;
	pInfo->hardwareVersion.major = LIBRARY_VERSION_MAJOR;
	pInfo->firmwareVersion.major = LIBRARY_VERSION_MAJOR;
	return CKR_OK;
}

/* ---- mechanisms ---- */

typedef struct {
	CK_MECHANISM_TYPE m;
	int family, sch, hash, input;
} mech_spec;

static const mech_spec mechs[] = {
	{CKM_ECDSA, SG_FAM_EC, SG_SCHEME_ECDSA, 0, IN_DIGEST},
	{CKM_ECDSA_SHA256, SG_FAM_EC, SG_SCHEME_ECDSA, SG_HASH_SHA256, IN_HASH},
	{CKM_ECDSA_SHA384, SG_FAM_EC, SG_SCHEME_ECDSA, SG_HASH_SHA384, IN_HASH},
	{CKM_ECDSA_SHA512, SG_FAM_EC, SG_SCHEME_ECDSA, SG_HASH_SHA512, IN_HASH},
	{CKM_RSA_PKCS, SG_FAM_RSA, SG_SCHEME_PKCS1V15, 0, IN_DIGESTINFO},
	{CKM_SHA256_RSA_PKCS, SG_FAM_RSA, SG_SCHEME_PKCS1V15, SG_HASH_SHA256, IN_HASH},
	{CKM_SHA384_RSA_PKCS, SG_FAM_RSA, SG_SCHEME_PKCS1V15, SG_HASH_SHA384, IN_HASH},
	{CKM_SHA512_RSA_PKCS, SG_FAM_RSA, SG_SCHEME_PKCS1V15, SG_HASH_SHA512, IN_HASH},
	{CKM_RSA_PKCS_PSS, SG_FAM_RSA, SG_SCHEME_PSS, 0, IN_DIGEST},
	{CKM_SHA256_RSA_PKCS_PSS, SG_FAM_RSA, SG_SCHEME_PSS, SG_HASH_SHA256, IN_HASH},
	{CKM_SHA384_RSA_PKCS_PSS, SG_FAM_RSA, SG_SCHEME_PSS, SG_HASH_SHA384, IN_HASH},
	{CKM_SHA512_RSA_PKCS_PSS, SG_FAM_RSA, SG_SCHEME_PSS, SG_HASH_SHA512, IN_HASH},
	{CKM_EDDSA, SG_FAM_ED, SG_SCHEME_ED25519, SG_HASH_NONE, IN_MESSAGE},
};
#define NMECHS (sizeof mechs / sizeof mechs[0])

static const mech_spec *find_mech(CK_MECHANISM_TYPE m)
{
	for (size_t i = 0; i < NMECHS; i++)
		if (mechs[i].m == m)
			return &mechs[i];
	return NULL;
}

/* family_bits reports the smallest and largest key of a family the caller
 * has; 0 when it has none. */
static int family_bits(int family, unsigned *min, unsigned *max)
{
	int any = 0;
	*min = *max = 0;
	pthread_mutex_lock(&g.mu);
	for (size_t i = 0; i < g.nkeys; i++) {
		sg_key *k = g.keys[i];
		if (!k->present || k->family != family)
			continue;
		if (!any || k->bits < *min)
			*min = k->bits;
		if (!any || k->bits > *max)
			*max = k->bits;
		any = 1;
	}
	pthread_mutex_unlock(&g.mu);
	return any;
}

EXPORT CK_RV C_GetMechanismList(CK_SLOT_ID slotID, CK_MECHANISM_TYPE_PTR pMechanismList, CK_ULONG_PTR pulCount)
{
	ENTER_CALL();
	if (slotID != SLOT_ID)
		return CKR_SLOT_ID_INVALID;
	if (!pulCount)
		return CKR_ARGUMENTS_BAD;
	CK_RV rv = ensure_keys();
	if (rv != CKR_OK)
		return rv;
	CK_MECHANISM_TYPE list[NMECHS];
	CK_ULONG n = 0;
	unsigned lo, hi;
	int has[4] = {0, family_bits(SG_FAM_EC, &lo, &hi), family_bits(SG_FAM_RSA, &lo, &hi), family_bits(SG_FAM_ED, &lo, &hi)};
	for (size_t i = 0; i < NMECHS; i++)
		if (has[mechs[i].family])
			list[n++] = mechs[i].m;
	if (!pMechanismList) {
		*pulCount = n;
		return CKR_OK;
	}
	if (*pulCount < n) {
		*pulCount = n;
		return CKR_BUFFER_TOO_SMALL;
	}
	memcpy(pMechanismList, list, n * sizeof list[0]);
	*pulCount = n;
	return CKR_OK;
}

EXPORT CK_RV C_GetMechanismInfo(CK_SLOT_ID slotID, CK_MECHANISM_TYPE type, CK_MECHANISM_INFO_PTR pInfo)
{
	ENTER_CALL();
	if (slotID != SLOT_ID)
		return CKR_SLOT_ID_INVALID;
	if (!pInfo)
		return CKR_ARGUMENTS_BAD;
	const mech_spec *m = find_mech(type);
	if (!m)
		return CKR_MECHANISM_INVALID;
	CK_RV rv = ensure_keys();
	if (rv != CKR_OK)
		return rv;
	unsigned lo, hi;
	if (!family_bits(m->family, &lo, &hi))
		return CKR_MECHANISM_INVALID;
	pInfo->ulMinKeySize = lo;
	pInfo->ulMaxKeySize = hi;
	pInfo->flags = CKF_SIGN;
	if (m->family == SG_FAM_EC)
		pInfo->flags |= CKF_EC_F_P | CKF_EC_NAMEDCURVE | CKF_EC_UNCOMPRESS;
	return CKR_OK;
}

/* ---- sessions ---- */

EXPORT CK_RV C_OpenSession(CK_SLOT_ID slotID, CK_FLAGS flags, CK_VOID_PTR pApplication, CK_NOTIFY Notify, CK_SESSION_HANDLE_PTR phSession)
{
	(void)pApplication;
	(void)Notify; /* no callbacks: this token never surrenders */
	ENTER_CALL();
	if (slotID != SLOT_ID)
		return CKR_SLOT_ID_INVALID;
	if (!(flags & CKF_SERIAL_SESSION))
		return CKR_SESSION_PARALLEL_NOT_SUPPORTED;
	if (!phSession)
		return CKR_ARGUMENTS_BAD;
	sg_session *s = calloc(1, sizeof *s);
	if (!s)
		return CKR_HOST_MEMORY;
	pthread_mutex_init(&s->mu, NULL);
	s->flags = flags & (CKF_SERIAL_SESSION | CKF_RW_SESSION);
	s->refs = 1;
	CK_RV rv = CKR_OK;
	pthread_mutex_lock(&g.mu);
	size_t i;
	for (i = 0; i < g.nsess && g.sess[i]; i++)
		;
	if (i == g.nsess) {
		if (g.nsess + 1 >= MAX_SESSIONS) {
			rv = CKR_SESSION_COUNT;
			goto out;
		}
		sg_session **ns = realloc(g.sess, (g.nsess + 1) * sizeof *ns);
		if (!ns) {
			rv = CKR_HOST_MEMORY;
			goto out;
		}
		g.sess = ns;
		g.nsess++;
	}
	/* The low bits index the table; the high bits change with every open,
	 * so a stale handle to a reused slot is refused. */
	g_session_gen++;
	s->h = (CK_SESSION_HANDLE)(i + 1) | (CK_SESSION_HANDLE)(g_session_gen << 20);
	g.sess[i] = s;
	g.opensess++;
	if (s->flags & CKF_RW_SESSION)
		g.rwsess++;
	*phSession = s->h;
out:
	pthread_mutex_unlock(&g.mu);
	if (rv != CKR_OK)
		session_free(s);
	return rv;
}

EXPORT CK_RV C_CloseSession(CK_SESSION_HANDLE hSession)
{
	ENTER_CALL();
	sg_session *s = NULL;
	size_t i = (size_t)(hSession & (MAX_SESSIONS - 1));
	int free_it = 0;
	pthread_mutex_lock(&g.mu);
	if (i >= 1 && i <= g.nsess && g.sess[i - 1] && g.sess[i - 1]->h == hSession) {
		s = g.sess[i - 1];
		free_it = unlink_session(i - 1);
	}
	pthread_mutex_unlock(&g.mu);
	if (!s)
		return CKR_SESSION_HANDLE_INVALID;
	if (free_it)
		session_free(s);
	return CKR_OK;
}

EXPORT CK_RV C_CloseAllSessions(CK_SLOT_ID slotID)
{
	ENTER_CALL();
	if (slotID != SLOT_ID)
		return CKR_SLOT_ID_INVALID;
	pthread_mutex_lock(&g.mu);
	for (size_t i = 0; i < g.nsess; i++) {
		sg_session *s = g.sess[i];
		if (s && unlink_session(i)) {
			/* Nobody holds it: free outside the table lock is not needed,
			 * session_free takes no lock but its own mutex's destroy. */
			session_free(s);
		}
	}
	pthread_mutex_unlock(&g.mu);
	return CKR_OK;
}

EXPORT CK_RV C_GetSessionInfo(CK_SESSION_HANDLE hSession, CK_SESSION_INFO_PTR pInfo)
{
	SESSION(hSession, s);
	if (!pInfo) {
		put_session(s);
		return CKR_ARGUMENTS_BAD;
	}
	int rw = (s->flags & CKF_RW_SESSION) != 0;
	pthread_mutex_lock(&g.mu);
	int user = g.logged_in;
	pthread_mutex_unlock(&g.mu);
	pInfo->slotID = SLOT_ID;
	pInfo->state = user ? (rw ? CKS_RW_USER_FUNCTIONS : CKS_RO_USER_FUNCTIONS) : (rw ? CKS_RW_PUBLIC_SESSION : CKS_RO_PUBLIC_SESSION);
	pInfo->flags = s->flags;
	pInfo->ulDeviceError = 0;
	put_session(s);
	return CKR_OK;
}

/* C_Login is accepted and the PIN ignored (never kept, never sent): the
 * agent decides who may sign by the socket peer, not by a PIN. */
EXPORT CK_RV C_Login(CK_SESSION_HANDLE hSession, CK_USER_TYPE userType, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen)
{
	(void)pPin;
	(void)ulPinLen;
	SESSION(hSession, s);
	CK_RV rv = CKR_OK;
	if (userType == CKU_CONTEXT_SPECIFIC) {
		/* Only straight after an operation's Init (v2.40 section 5.6,
		 * C_Login), and it logs no one in: the agent authorizes each
		 * signature by the socket's peer, so it is accepted then. */
		rv = s->sign_active ? CKR_OK : CKR_OPERATION_NOT_INITIALIZED;
	} else if (userType == CKU_SO) {
		/* No SO functions here (no token to initialize, no PIN to
		 * set). An SO may not log in while a read-only session exists
		 * (v2.40 section 5.6); otherwise it is the function that is
		 * not supported, not the user type. */
		pthread_mutex_lock(&g.mu);
		rv = g.opensess > g.rwsess ? CKR_SESSION_READ_ONLY_EXISTS : CKR_FUNCTION_NOT_SUPPORTED;
		pthread_mutex_unlock(&g.mu);
	} else if (userType != CKU_USER) {
		rv = CKR_USER_TYPE_INVALID;
	} else {
		pthread_mutex_lock(&g.mu);
		if (g.logged_in)
			rv = CKR_USER_ALREADY_LOGGED_IN;
		g.logged_in = 1;
		pthread_mutex_unlock(&g.mu);
	}
	put_session(s);
	return rv;
}

EXPORT CK_RV C_Logout(CK_SESSION_HANDLE hSession)
{
	SESSION(hSession, s);
	CK_RV rv = CKR_OK;
	pthread_mutex_lock(&g.mu);
	if (!g.logged_in)
		rv = CKR_USER_NOT_LOGGED_IN;
	g.logged_in = 0;
	pthread_mutex_unlock(&g.mu);
	put_session(s);
	return rv;
}

/* ---- objects ---- */

/* matches: whether the object with attributes a matches template t; for a
 * private key, family is its key's (a sensitive attribute matches nothing),
 * else 0. */
static int matches(const sg_attrs *a, CK_ATTRIBUTE_PTR t, CK_ULONG n, int family)
{
	for (CK_ULONG i = 0; i < n; i++) {
		if (family && sg_attr_sensitive(family, t[i].type))
			return 0;
		const sg_attr *x = sg_attrs_find(a, t[i].type);
		if (!x || x->len != t[i].ulValueLen)
			return 0;
		if (x->len && (!t[i].pValue || memcmp(x->val, t[i].pValue, x->len) != 0))
			return 0;
	}
	return 1;
}

EXPORT CK_RV C_FindObjectsInit(CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount)
{
	SESSION(hSession, s);
	CK_RV rv = CKR_OK;
	if (s->find_active) {
		rv = CKR_OPERATION_ACTIVE;
		goto out;
	}
	if (!pTemplate && ulCount) {
		rv = CKR_ARGUMENTS_BAD;
		goto out;
	}
	/* Every search asks the agent (one round trip), so a key added,
	 * rotated or removed behind the agent shows at the next search. */
	if ((rv = refresh_keys()) != CKR_OK)
		goto out;
	pthread_mutex_lock(&g.mu);
	s->found = calloc(SG_OBJS_PER_KEY * g.nkeys + 1, sizeof *s->found);
	if (!s->found) {
		pthread_mutex_unlock(&g.mu);
		rv = CKR_HOST_MEMORY;
		goto out;
	}
	for (size_t i = 0; i < g.nkeys; i++) {
		sg_key *k = g.keys[i];
		if (!k->present)
			continue;
		for (int kind = 0; kind < SG_OBJS_PER_KEY; kind++)
			if (object_exists(k, kind) && matches(object_attrs(k, kind), pTemplate, ulCount, kind == SG_OBJ_PRIVATE ? k->family : 0))
				s->found[s->nfound++] = object_handle(k->slot, kind);
	}
	pthread_mutex_unlock(&g.mu);
	s->pos = 0;
	s->find_active = 1;
out:
	put_session(s);
	return rv;
}

EXPORT CK_RV C_FindObjects(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE_PTR phObject, CK_ULONG ulMaxObjectCount, CK_ULONG_PTR pulObjectCount)
{
	SESSION(hSession, s);
	CK_RV rv = CKR_OK;
	if (!s->find_active)
		rv = CKR_OPERATION_NOT_INITIALIZED;
	else if (!phObject || !pulObjectCount)
		rv = CKR_ARGUMENTS_BAD;
	else {
		CK_ULONG n = 0;
		while (n < ulMaxObjectCount && s->pos < s->nfound)
			phObject[n++] = s->found[s->pos++];
		*pulObjectCount = n;
	}
	put_session(s);
	return rv;
}

EXPORT CK_RV C_FindObjectsFinal(CK_SESSION_HANDLE hSession)
{
	SESSION(hSession, s);
	CK_RV rv = s->find_active ? CKR_OK : CKR_OPERATION_NOT_INITIALIZED;
	session_end_find(s);
	put_session(s);
	return rv;
}

EXPORT CK_RV C_GetAttributeValue(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject, CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount)
{
	SESSION(hSession, s);
	CK_RV rv = CKR_OK;
	int kind;
	pthread_mutex_lock(&g.mu);
	sg_key *k = find_object(hObject, &kind);
	if (!k) {
		rv = CKR_OBJECT_HANDLE_INVALID;
		goto out;
	}
	if (!pTemplate && ulCount) {
		rv = CKR_ARGUMENTS_BAD;
		goto out;
	}
	const sg_attrs *attrs = object_attrs(k, kind);
	int is_private = kind == SG_OBJ_PRIVATE;
	for (CK_ULONG i = 0; i < ulCount; i++) {
		CK_ATTRIBUTE_PTR t = &pTemplate[i];
		const sg_attr *a;
		if (is_private && sg_attr_sensitive(k->family, t->type)) {
			t->ulValueLen = CK_UNAVAILABLE_INFORMATION;
			rv = CKR_ATTRIBUTE_SENSITIVE;
		} else if (!(a = sg_attrs_find(attrs, t->type))) {
			t->ulValueLen = CK_UNAVAILABLE_INFORMATION;
			rv = CKR_ATTRIBUTE_TYPE_INVALID;
		} else if (!t->pValue) {
			t->ulValueLen = a->len;
		} else if (t->ulValueLen < a->len) {
			t->ulValueLen = CK_UNAVAILABLE_INFORMATION;
			rv = CKR_BUFFER_TOO_SMALL;
		} else {
			memcpy(t->pValue, a->val, a->len);
			t->ulValueLen = a->len;
		}
	}
out:
	pthread_mutex_unlock(&g.mu);
	put_session(s);
	return rv;
}

/* ---- signing ---- */

static CK_RV pss_hash(CK_MECHANISM_PTR m, int fixed, int *hash)
{
	if (!m->pParameter) {
		if (!fixed)
			return CKR_MECHANISM_PARAM_INVALID; /* CKM_RSA_PKCS_PSS: which hash? */
		*hash = fixed;
		return CKR_OK;
	}
	if (m->ulParameterLen != sizeof(CK_RSA_PKCS_PSS_PARAMS))
		return CKR_MECHANISM_PARAM_INVALID;
	CK_RSA_PKCS_PSS_PARAMS *p = m->pParameter;
	int h;
	CK_RSA_PKCS_MGF_TYPE mgf;
	switch (p->hashAlg) {
	case CKM_SHA256: h = SG_HASH_SHA256; mgf = CKG_MGF1_SHA256; break;
	case CKM_SHA384: h = SG_HASH_SHA384; mgf = CKG_MGF1_SHA384; break;
	case CKM_SHA512: h = SG_HASH_SHA512; mgf = CKG_MGF1_SHA512; break;
	default: return CKR_MECHANISM_PARAM_INVALID;
	}
	/* The agent's PSS: MGF1 with the same hash, salt as long as the hash. */
	if ((fixed && fixed != h) || p->mgf != mgf || p->sLen != sg_hash_len(h))
		return CKR_MECHANISM_PARAM_INVALID;
	*hash = h;
	return CKR_OK;
}

/* copy_sign_key copies what signing needs of the private key hKey. */
static CK_RV copy_sign_key(CK_OBJECT_HANDLE hKey, sign_key *out)
{
	int kind;
	CK_RV rv = CKR_OK;
	pthread_mutex_lock(&g.mu);
	const sg_key *k = find_object(hKey, &kind);
	if (!k) {
		rv = CKR_KEY_HANDLE_INVALID;
	} else if (kind != SG_OBJ_PRIVATE) {
		/* A certificate is no key (v2.40 section 5.1); the public key
		 * is one that may not sign. */
		rv = kind == SG_OBJ_PUBLIC ? CKR_KEY_FUNCTION_NOT_PERMITTED : CKR_KEY_HANDLE_INVALID;
	} else if (!(out->name = malloc(k->name_len + k->kid_len + 1))) {
		rv = CKR_HOST_MEMORY;
	} else {
		memcpy(out->name, k->name, k->name_len);
		memcpy(out->name + k->name_len, k->kid, k->kid_len);
		out->name_len = k->name_len;
		out->kid_len = k->kid_len;
		out->family = k->family;
		out->sig_len = k->sig_len;
		out->field_len = k->field_len;
	}
	pthread_mutex_unlock(&g.mu);
	return rv;
}

EXPORT CK_RV C_SignInit(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism, CK_OBJECT_HANDLE hKey)
{
	SESSION(hSession, s);
	CK_RV rv = CKR_OK;
	sign_key k = {0};
	const mech_spec *m;
	int hash;
	if (s->sign_active) {
		rv = CKR_OPERATION_ACTIVE;
		goto out;
	}
	if (!pMechanism) {
		rv = CKR_ARGUMENTS_BAD;
		goto out;
	}
	if ((rv = copy_sign_key(hKey, &k)) != CKR_OK)
		goto out;
	if (!(m = find_mech(pMechanism->mechanism))) {
		rv = CKR_MECHANISM_INVALID;
		goto out;
	}
	if (m->family != k.family) {
		rv = CKR_KEY_TYPE_INCONSISTENT;
		goto out;
	}
	hash = m->hash;
	if (m->sch == SG_SCHEME_PSS) {
		if ((rv = pss_hash(pMechanism, m->hash, &hash)) != CKR_OK)
			goto out;
	} else if (m->sch == SG_SCHEME_ED25519 && pMechanism->pParameter) {
		/* Pure Ed25519 only: no Ed25519ph, no context (Ed25519ctx). */
		sg_eddsa_params *p = pMechanism->pParameter;
		if (pMechanism->ulParameterLen != sizeof *p || p->phFlag || p->ulContextDataLen) {
			rv = CKR_MECHANISM_PARAM_INVALID;
			goto out;
		}
	}
	s->key = k;
	k.name = NULL;
	s->sch = m->sch;
	s->hash = hash;
	s->input = m->input;
	s->sign_multi = 0;
	s->blen = 0;
	s->sign_active = 1;
out:
	free(k.name);
	put_session(s);
	return rv;
}

/* agent_sign: one round trip; the signature lands in out in PKCS#11's form. */
static CK_RV agent_sign(const sign_key *k, int sch, int hash, const uint8_t *dig, size_t n, uint8_t *out)
{
	sg_request req = {
		.op = SG_OP_SIGN,
		/* Name and kid both: with rotation the agent refuses (KEY_RETIRED)
		 * rather than sign with a version other than this object's key. */
		.key = {(const uint8_t *)k->name, k->name_len},
		.kid = {(const uint8_t *)k->name + k->name_len, k->kid_len},
		.sch = (uint8_t)sch,
		.hash = (uint8_t)hash,
		.dig = {dig, n},
	};
	sg_response resp;
	sg_conn *c;
	int io = sg_agent_call(&g.agent, &req, &resp, &c);
	if (io)
		return io_rv(io);
	CK_RV rv = code_rv(resp.code);
	if (rv == CKR_OK) {
		switch (k->family) {
		case SG_FAM_EC:
			if (sg_ecdsa_der_to_raw(resp.sig.p, resp.sig.n, k->field_len, out))
				rv = CKR_DEVICE_ERROR;
			break;
		case SG_FAM_RSA:
			if (resp.sig.n == 0 || resp.sig.n > k->sig_len) {
				rv = CKR_DEVICE_ERROR;
				break;
			}
			memset(out, 0, k->sig_len - resp.sig.n);
			memcpy(out + k->sig_len - resp.sig.n, resp.sig.p, resp.sig.n);
			break;
		case SG_FAM_ED:
			if (resp.sig.n != 64)
				rv = CKR_DEVICE_ERROR;
			else
				memcpy(out, resp.sig.p, 64);
			break;
		}
	}
	sg_agent_release(&g.agent, c);
	return rv;
}

/* The largest Ed25519 message that fits a request frame with room for the
 * map's other fields and a key name of up to 1 KiB. */
#define MAX_MESSAGE (SG_MAX_FRAME - 1200)

/* finish_sign turns the operation's input (all of it, or for IN_HASH the
 * digest already computed) into a signature. */
static CK_RV finish_sign(sg_session *s, const uint8_t *in, size_t n, int hashed, uint8_t *out)
{
	uint8_t digest[64];
	const uint8_t *dig = in;
	int hash = s->hash;
	switch (s->input) {
	case IN_HASH:
		if (!hashed) {
			if (sg_digest(hash, in, n, digest))
				return CKR_GENERAL_ERROR;
			dig = digest;
			n = sg_hash_len(hash);
		}
		break;
	case IN_DIGEST:
		if (s->sch == SG_SCHEME_ECDSA) {
			/* CKM_ECDSA carries no hash: the digest's length names it. */
			hash = n == 32 ? SG_HASH_SHA256 : n == 48 ? SG_HASH_SHA384 : n == 64 ? SG_HASH_SHA512 : 0;
			if (!hash)
				return CKR_DATA_LEN_RANGE;
		} else if (n != sg_hash_len(hash)) {
			return CKR_DATA_LEN_RANGE;
		}
		break;
	case IN_DIGESTINFO:
		/* CKM_RSA_PKCS takes at most k-11 bytes (v2.40 curr. mechs.
		 * section 2.1.6); past that the length is wrong, whatever the
		 * bytes are. */
		if (n + 11 > s->key.sig_len)
			return CKR_DATA_LEN_RANGE;
		if (sg_digestinfo_split(in, n, &hash, &dig))
			return CKR_DATA_INVALID;
		n = sg_hash_len(hash);
		break;
	case IN_MESSAGE:
		if (n > MAX_MESSAGE)
			return CKR_DATA_LEN_RANGE;
		break;
	}
	return agent_sign(&s->key, s->sch, hash, dig, n, out);
}

/* sig_room answers a length query or a short buffer without the agent:
 * every signature's length is known from the key. 1: answered. */
static int sig_room(sg_session *s, CK_BYTE_PTR sig, CK_ULONG_PTR len, CK_RV *rv)
{
	size_t need = s->key.sig_len;
	if (!sig) {
		*len = need;
		*rv = CKR_OK;
		return 1;
	}
	if (*len < need) {
		*len = need;
		*rv = CKR_BUFFER_TOO_SMALL;
		return 1;
	}
	return 0;
}

EXPORT CK_RV C_Sign(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pData, CK_ULONG ulDataLen, CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen)
{
	SESSION(hSession, s);
	CK_RV rv;
	if (!s->sign_active) {
		rv = CKR_OPERATION_NOT_INITIALIZED;
		goto out;
	}
	if (s->sign_multi) {
		/* C_SignUpdate began a multi-part signature. C_Sign ends the
		 * operation on any error but CKR_BUFFER_TOO_SMALL (v2.40 section
		 * 5.12, C_Sign), this one included: a caller may go straight on to
		 * C_SignInit, which would otherwise refuse with
		 * CKR_OPERATION_ACTIVE. */
		rv = CKR_OPERATION_ACTIVE;
		session_end_sign(s);
		goto out;
	}
	if (!pulSignatureLen || (!pData && ulDataLen)) {
		rv = CKR_ARGUMENTS_BAD;
		session_end_sign(s);
		goto out;
	}
	if (sig_room(s, pSignature, pulSignatureLen, &rv))
		goto out; /* the operation stays active (v2.40 section 5.2) */
	rv = finish_sign(s, pData, ulDataLen, 0, pSignature);
	if (rv == CKR_OK)
		*pulSignatureLen = s->key.sig_len;
	session_end_sign(s);
out:
	put_session(s);
	return rv;
}

EXPORT CK_RV C_SignUpdate(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pPart, CK_ULONG ulPartLen)
{
	SESSION(hSession, s);
	CK_RV rv = CKR_OK;
	if (!s->sign_active) {
		rv = CKR_OPERATION_NOT_INITIALIZED;
		goto out;
	}
	if (!pPart && ulPartLen) {
		rv = CKR_ARGUMENTS_BAD;
		goto fail;
	}
	s->sign_multi = 1;
	if (s->input == IN_HASH) {
		if (!s->mdctx && !(s->mdctx = sg_md_ctx_new(s->hash))) {
			rv = CKR_HOST_MEMORY;
			goto fail;
		}
		if (sg_md_ctx_update(s->mdctx, pPart, ulPartLen)) {
			rv = CKR_GENERAL_ERROR;
			goto fail;
		}
		goto out;
	}
	/* The other mechanisms sign their whole input in one request, which
	 * the frame bounds. */
	if (ulPartLen > MAX_MESSAGE - s->blen) {
		rv = CKR_DATA_LEN_RANGE;
		goto fail;
	}
	if (s->blen + ulPartLen > s->bcap) {
		size_t cap = s->blen + ulPartLen;
		if (cap < 256)
			cap = 256;
		uint8_t *nb = realloc(s->buf, cap);
		if (!nb) {
			rv = CKR_HOST_MEMORY;
			goto fail;
		}
		s->buf = nb;
		s->bcap = cap;
	}
	if (ulPartLen)
		memcpy(s->buf + s->blen, pPart, ulPartLen);
	s->blen += ulPartLen;
	goto out;
fail:
	session_end_sign(s); /* any error but a short buffer ends the operation */
out:
	put_session(s);
	return rv;
}

EXPORT CK_RV C_SignFinal(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSignature, CK_ULONG_PTR pulSignatureLen)
{
	SESSION(hSession, s);
	CK_RV rv;
	if (!s->sign_active) {
		rv = CKR_OPERATION_NOT_INITIALIZED;
		goto out;
	}
	if (!pulSignatureLen) {
		rv = CKR_ARGUMENTS_BAD;
		session_end_sign(s);
		goto out;
	}
	if (sig_room(s, pSignature, pulSignatureLen, &rv))
		goto out;
	if (s->input == IN_HASH) {
		uint8_t digest[64];
		if (!s->mdctx && !(s->mdctx = sg_md_ctx_new(s->hash)))
			rv = CKR_HOST_MEMORY;
		else if (sg_md_ctx_final(s->mdctx, digest))
			rv = CKR_GENERAL_ERROR;
		else
			rv = finish_sign(s, digest, sg_hash_len(s->hash), 1, pSignature);
	} else {
		rv = finish_sign(s, s->buf, s->blen, 0, pSignature);
	}
	if (rv == CKR_OK)
		*pulSignatureLen = s->key.sig_len;
	session_end_sign(s);
out:
	put_session(s);
	return rv;
}
