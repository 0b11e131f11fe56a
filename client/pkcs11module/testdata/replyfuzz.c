/*
 * replyfuzz: the module's reading of agent replies, run over hostile
 * input under AddressSanitizer and UndefinedBehaviorSanitizer
 * (replyfuzz_test.go builds and drives it).
 *
 * It includes the module's own sources, so the code under test is the
 * module's: read_frame (agent.c) over a socket pair, sg_decode_response and
 * sg_keys_next (wire.c), the "keys =" filter refresh_keys applies
 * (module.c), sg_key_build, sg_key_same and every attribute (keys.c), and
 * the signature conversions agent_sign makes (crypto.c).
 *
 * Input on stdin: records, each a 4-byte big-endian length and that many
 * bytes of what the agent would write to the socket (a frame header and a
 * payload, either possibly lying). After each record it writes one '.'
 * to stdout, so the driver knows which record a crash belongs to. A
 * sanitizer report, or a broken invariant (among them: the thread's
 * OpenSSL error queue left as the host had it), ends the process non-zero.
 */
#include "../csrc/agent.c"
#include "../csrc/crypto.c"
#include "../csrc/keys.c"
#include "../csrc/module.c"
#include "../csrc/stubs.c"
#include "../csrc/wire.c"

#include <openssl/err.h>

static void fail(const char *what)
{
	fprintf(stderr, "replyfuzz: %s\n", what);
	abort();
}

static int read_full(int fd, uint8_t *p, size_t n)
{
	while (n > 0) {
		ssize_t k = read(fd, p, n);
		if (k < 0 && errno == EINTR)
			continue;
		if (k <= 0)
			return -1;
		p += k;
		n -= (size_t)k;
	}
	return 0;
}

/* inside: b lies within the payload [p, p+n) (or is empty). */
static void inside(sg_bytes b, const uint8_t *p, size_t n, const char *what)
{
	if (b.n == 0)
		return;
	if (b.p < p || b.n > n || b.p > p + n - b.n)
		fail(what);
}

/* touch reads every byte of every attribute, so that a value pointing at
 * freed or foreign memory is reported here rather than in a host. */
static unsigned touch(const sg_attrs *a)
{
	unsigned sum = 0;
	for (size_t i = 0; i < a->n; i++) {
		if (a->v[i].len && !a->v[i].val)
			fail("attribute with a length and no value");
		for (CK_ULONG j = 0; j < a->v[i].len; j++)
			sum += a->v[i].val[j];
	}
	return sum;
}

static volatile unsigned sink;

/* The host's OpenSSL error queue, as the module must leave it: records
 * alternate between an empty queue and one holding a marker of the host's
 * own, and after each call the queue must be exactly that again. */
static int marked;

static void host_queue(void)
{
	ERR_clear_error();
	if (marked)
		ERR_raise(ERR_LIB_USER, 42);
}

static void host_queue_unchanged(const char *what)
{
	unsigned long e = ERR_get_error();
	if (marked ? ERR_GET_LIB(e) != ERR_LIB_USER || ERR_GET_REASON(e) != 42 || ERR_get_error() != 0 : e != 0)
		fail(what);
}

static void build_key(const sg_key_entry *e)
{
	sg_key *k = calloc(1, sizeof *k);
	if (!k)
		fail("calloc");
	host_queue();
	int built = sg_key_build(k, e) == 0;
	host_queue_unchanged("sg_key_build left the OpenSSL error queue changed");
	if (built) {
		if (!sg_key_same(k, e))
			fail("a key built from an entry is not the same as it");
		if (k->sig_len == 0 || k->sig_len > 1024 || (k->family == SG_FAM_EC && 2 * k->field_len != k->sig_len))
			fail("signature length out of range");
		if (k->nchain < 0 || k->nchain > SG_MAX_CHAIN || k->nchain_der > SG_MAX_CHAIN)
			fail("chain count out of range");
		unsigned sum = touch(&k->priv) + touch(&k->pub) + touch(&k->cert);
		for (int i = 0; i < k->nchain; i++)
			sum += touch(&k->chain[i]);
		const sg_attr *label = sg_attrs_find(&k->priv, CKA_LABEL);
		if (!label || label->len != k->name_len)
			fail("private key label differs from the name");
		sink += sum;
	}
	sg_key_free(k);
}

/* sign_reply does with a reply's sig what agent_sign does for each key
 * family (module.c): the output buffers are sized as the module's
 * callers size them, sig_len bytes. */
static void sign_reply(sg_bytes sig)
{
	static const size_t fields[] = {32, 48};
	for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
		uint8_t *out = malloc(2 * fields[i]);
		if (!out)
			fail("malloc");
		host_queue();
		sg_ecdsa_der_to_raw(sig.p, sig.n, fields[i], out);
		host_queue_unchanged("sg_ecdsa_der_to_raw left the OpenSSL error queue changed");
		free(out);
	}
}

static void decode(const uint8_t *body, size_t n)
{
	/* An exact-size copy: a read one byte past the payload is reported. */
	uint8_t *p = malloc(n ? n : 1);
	if (!p)
		fail("malloc");
	memcpy(p, body, n);
	sg_response r;
	if (sg_decode_response(p, n, &r) == 0) {
		inside(r.msg, p, n, "msg outside the payload");
		inside(r.key, p, n, "key outside the payload");
		inside(r.kid, p, n, "kid outside the payload");
		inside(r.kty, p, n, "kty outside the payload");
		inside(r.pub, p, n, "pub outside the payload");
		inside(r.sig, p, n, "sig outside the payload");
		inside(r.keys, p, n, "keys outside the payload");
		sign_reply(r.sig);
		sg_bytes it = r.keys;
		sg_key_entry e;
		uint32_t count = 0;
		int more;
		while ((more = sg_keys_next(&it, &e)) == 1) {
			count++;
			inside(e.name, p, n, "entry name outside the payload");
			inside(e.kid, p, n, "entry kid outside the payload");
			inside(e.pub, p, n, "entry pub outside the payload");
			inside(e.cert, p, n, "entry cert outside the payload");
			if (e.nchain > SG_MAX_CHAIN)
				fail("entry chain count past SG_MAX_CHAIN");
			for (uint32_t i = 0; i < e.nchain; i++)
				inside(e.chain[i], p, n, "intermediate outside the payload");
			/* refresh_keys' filter, with a "keys =" line in the config. */
			static char only[] = ",k,p256,rsa,";
			g.only_keys = only;
			sink += (unsigned)shown(e.name);
			g.only_keys = NULL;
			build_key(&e);
		}
		if (more < 0 || count != r.nkeys)
			fail("keys the decoder validated did not iterate");
	}
	free(p);
}

/* frame runs read_frame on what the agent wrote, as roundtrip does, and
 * decodes the payload it accepted; 1 when it accepted one. */
static int frame(const uint8_t *stream, size_t n)
{
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv))
		fail("socketpair");
	int big = 1 << 20;
	setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
	/* A record too large for the socket is cut short; the reader sees the
	 * stream end early, as from an agent that died mid-frame. */
	size_t off = 0;
	while (off < n) {
		ssize_t k = send(sv[0], stream + off, n - off, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (k <= 0)
			break;
		off += (size_t)k;
	}
	shutdown(sv[0], SHUT_WR);
	/* One buffer for every record, as a connection has: filling a fresh
	 * 64 KiB for each was most of the run under ASan. */
	static uint8_t *buf;
	if (!buf && !(buf = malloc(SG_FRAME_HEADER + SG_MAX_FRAME)))
		fail("malloc");
	uint8_t *body = NULL;
	uint32_t len = 0;
	int rc = read_frame(sv[1], 1000, buf, SG_FRAME_HEADER + SG_MAX_FRAME, &body, &len);
	int decoded = rc == 0 || rc == 2;
	if (decoded) {
		if (body != buf + SG_FRAME_HEADER || len == 0 || len > SG_MAX_FRAME)
			fail("read_frame accepted a frame out of range");
		decode(body, len);
	}
	close(sv[0]);
	close(sv[1]);
	return decoded;
}

int main(void)
{
	uint8_t hdr[4];
	while (read_full(0, hdr, 4) == 0) {
		size_t n = (size_t)hdr[0] << 24 | (size_t)hdr[1] << 16 | (size_t)hdr[2] << 8 | hdr[3];
		uint8_t *rec = malloc(n ? n : 1);
		if (!rec || read_full(0, rec, n))
			fail("short record on stdin");
		/* The payload alone when read_frame refused it, so that a lying
		 * header does not keep the decoder from seeing it. */
		if (!frame(rec, n) && n > SG_FRAME_HEADER && n - SG_FRAME_HEADER <= SG_MAX_FRAME)
			decode(rec + SG_FRAME_HEADER, n - SG_FRAME_HEADER);
		free(rec);
		marked = !marked;
		if (write(1, ".", 1) != 1)
			return 1;
	}
	return 0;
}
