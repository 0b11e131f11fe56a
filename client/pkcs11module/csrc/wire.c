/*
 * wire.c: msgpack for exactly the frames this module sends and reads.
 *
 * Why not libmsgpack-c: the module is loaded into arbitrary host processes
 * (ssh-agent's helper, OpenSSL, browsers), so every extra shared library is
 * one more thing to be installed and to clash with the host's copy; and the
 * shapes we need are one flat request map and one reply map with one array
 * of flat maps. This is about 250 lines, every read bounds-checked, and
 * fuzzed against the Go encoder in package proto (wire_test.go).
 */
#include "wire.h"

#include <string.h>

/* ---- writing ---- */

typedef struct {
	uint8_t *p;
	size_t n, cap;
	int err;
} wr;

static void put(wr *w, const void *b, size_t n)
{
	if (w->err || n > w->cap - w->n) {
		w->err = 1;
		return;
	}
	memcpy(w->p + w->n, b, n);
	w->n += n;
}

static void put_byte(wr *w, uint8_t b) { put(w, &b, 1); }

static void put_be(wr *w, uint64_t v, int bytes)
{
	uint8_t b[8];
	for (int i = 0; i < bytes; i++)
		b[i] = (uint8_t)(v >> (8 * (bytes - 1 - i)));
	put(w, b, (size_t)bytes);
}

static void put_uint(wr *w, uint64_t v)
{
	if (v < 0x80) {
		put_byte(w, (uint8_t)v);
	} else if (v <= 0xff) {
		put_byte(w, 0xcc);
		put_be(w, v, 1);
	} else if (v <= 0xffff) {
		put_byte(w, 0xcd);
		put_be(w, v, 2);
	} else if (v <= 0xffffffffu) {
		put_byte(w, 0xce);
		put_be(w, v, 4);
	} else {
		put_byte(w, 0xcf);
		put_be(w, v, 8);
	}
}

static void put_str(wr *w, const void *s, size_t n)
{
	if (n < 32) {
		put_byte(w, (uint8_t)(0xa0 | n));
	} else if (n <= 0xff) {
		put_byte(w, 0xd9);
		put_be(w, n, 1);
	} else if (n <= 0xffff) {
		put_byte(w, 0xda);
		put_be(w, n, 2);
	} else {
		put_byte(w, 0xdb);
		put_be(w, n, 4);
	}
	put(w, s, n);
}

static void put_bin(wr *w, const void *b, size_t n)
{
	if (n <= 0xff) {
		put_byte(w, 0xc4);
		put_be(w, n, 1);
	} else if (n <= 0xffff) {
		put_byte(w, 0xc5);
		put_be(w, n, 2);
	} else {
		put_byte(w, 0xc6);
		put_be(w, n, 4);
	}
	put(w, b, n);
}

static void put_key(wr *w, const char *k) { put_str(w, k, strlen(k)); }

size_t sg_encode_request(const sg_request *req, uint8_t *buf, size_t cap)
{
	if (cap < SG_FRAME_HEADER)
		return 0;
	wr w = {buf, SG_FRAME_HEADER, cap, 0};
	int n = 2 + (req->ver != 0) + (req->feat != 0) + (req->key.n != 0) + (req->kid.n != 0) +
		(req->sch != 0) + (req->hash != 0) + (req->dig.n != 0) + (req->tmo != 0);
	put_byte(&w, (uint8_t)(0x80 | n)); /* at most 10 entries: a fixmap */
	put_key(&w, "id");
	put_uint(&w, req->id);
	put_key(&w, "op");
	put_uint(&w, req->op);
	if (req->ver) {
		put_key(&w, "ver");
		put_uint(&w, req->ver);
	}
	if (req->feat) {
		put_key(&w, "feat");
		put_uint(&w, req->feat);
	}
	if (req->key.n) {
		put_key(&w, "key");
		put_str(&w, req->key.p, req->key.n);
	}
	if (req->kid.n) {
		put_key(&w, "kid");
		put_str(&w, req->kid.p, req->kid.n);
	}
	if (req->sch) {
		put_key(&w, "sch");
		put_uint(&w, req->sch);
	}
	if (req->hash) {
		put_key(&w, "hash");
		put_uint(&w, req->hash);
	}
	if (req->dig.n) {
		put_key(&w, "dig");
		put_bin(&w, req->dig.p, req->dig.n);
	}
	if (req->tmo) {
		put_key(&w, "tmo");
		put_uint(&w, req->tmo);
	}
	size_t payload = w.n - SG_FRAME_HEADER;
	if (w.err || payload > SG_MAX_FRAME)
		return 0;
	buf[0] = (uint8_t)(payload >> 24);
	buf[1] = (uint8_t)(payload >> 16);
	buf[2] = (uint8_t)(payload >> 8);
	buf[3] = (uint8_t)payload;
	return w.n;
}

/* ---- reading ---- */

typedef struct {
	const uint8_t *p, *end;
} rd;

static int take(rd *r, size_t n, const uint8_t **out)
{
	if ((size_t)(r->end - r->p) < n)
		return -1;
	*out = r->p;
	r->p += n;
	return 0;
}

static int get_be(rd *r, int bytes, uint64_t *v)
{
	const uint8_t *b;
	if (take(r, (size_t)bytes, &b))
		return -1;
	*v = 0;
	for (int i = 0; i < bytes; i++)
		*v = (*v << 8) | b[i];
	return 0;
}

static int get_tag(rd *r, uint8_t *t)
{
	const uint8_t *b;
	if (take(r, 1, &b))
		return -1;
	*t = *b;
	return 0;
}

/* An unsigned integer; the int family is accepted when not negative, as
 * the Go decoder does. */
static int get_uint(rd *r, uint64_t *v)
{
	uint8_t t;
	if (get_tag(r, &t))
		return -1;
	if (t < 0x80) {
		*v = t;
		return 0;
	}
	switch (t) {
	case 0xcc: return get_be(r, 1, v);
	case 0xcd: return get_be(r, 2, v);
	case 0xce: return get_be(r, 4, v);
	case 0xcf: return get_be(r, 8, v);
	case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
		int bytes = 1 << (t - 0xd0);
		if (get_be(r, bytes, v))
			return -1;
		if (*v >> (8 * bytes - 1) & 1) /* negative */
			return -1;
		return 0;
	}
	}
	return -1;
}

/* A str or bin value (nil reads as empty). */
static int get_bytes(rd *r, sg_bytes *out)
{
	uint8_t t;
	uint64_t n;
	if (get_tag(r, &t))
		return -1;
	if (t >= 0xa0 && t <= 0xbf) {
		n = t & 0x1f;
	} else {
		switch (t) {
		case 0xc0: out->p = r->p; out->n = 0; return 0;
		case 0xd9: case 0xc4: if (get_be(r, 1, &n)) return -1; break;
		case 0xda: case 0xc5: if (get_be(r, 2, &n)) return -1; break;
		case 0xdb: case 0xc6: if (get_be(r, 4, &n)) return -1; break;
		default: return -1;
		}
	}
	if (take(r, (size_t)n, &out->p))
		return -1;
	out->n = (size_t)n;
	return 0;
}

static int get_bool(rd *r, int *v)
{
	uint8_t t;
	if (get_tag(r, &t))
		return -1;
	if (t == 0xc2 || t == 0xc3) {
		*v = t == 0xc3;
		return 0;
	}
	return -1;
}

/* A map (map = 1) or array header; nil is an empty one. */
static int get_len(rd *r, int map, uint64_t *n)
{
	uint8_t t;
	if (get_tag(r, &t))
		return -1;
	if (t == 0xc0) {
		*n = 0;
		return 0;
	}
	if (map) {
		if (t >= 0x80 && t <= 0x8f) { *n = t & 0x0f; return 0; }
		if (t == 0xde) return get_be(r, 2, n);
		if (t == 0xdf) return get_be(r, 4, n);
	} else {
		if (t >= 0x90 && t <= 0x9f) { *n = t & 0x0f; return 0; }
		if (t == 0xdc) return get_be(r, 2, n);
		if (t == 0xdd) return get_be(r, 4, n);
	}
	return -1;
}

#define MAX_DEPTH 32

static int skip(rd *r, int depth)
{
	uint8_t t;
	uint64_t n;
	const uint8_t *b;
	if (depth > MAX_DEPTH || get_tag(r, &t))
		return -1;
	if (t < 0x80 || t >= 0xe0 || t == 0xc0 || t == 0xc2 || t == 0xc3)
		return 0; /* fixint, negative fixint, nil, bool */
	if (t >= 0xa0 && t <= 0xbf)
		return take(r, t & 0x1f, &b);
	if ((t >= 0x80 && t <= 0x8f) || (t >= 0x90 && t <= 0x9f)) {
		n = t & 0x0f;
		if (t <= 0x8f)
			n *= 2;
		goto items;
	}
	switch (t) {
	case 0xcc: case 0xd0: return take(r, 1, &b);
	case 0xcd: case 0xd1: return take(r, 2, &b);
	case 0xce: case 0xd2: case 0xca: return take(r, 4, &b);
	case 0xcf: case 0xd3: case 0xcb: return take(r, 8, &b);
	case 0xd4: return take(r, 2, &b); /* fixext: type byte + data */
	case 0xd5: return take(r, 3, &b);
	case 0xd6: return take(r, 5, &b);
	case 0xd7: return take(r, 9, &b);
	case 0xd8: return take(r, 17, &b);
	case 0xc4: case 0xd9: if (get_be(r, 1, &n)) return -1; return take(r, (size_t)n, &b);
	case 0xc5: case 0xda: if (get_be(r, 2, &n)) return -1; return take(r, (size_t)n, &b);
	case 0xc6: case 0xdb: if (get_be(r, 4, &n)) return -1; return take(r, (size_t)n, &b);
	case 0xc7: if (get_be(r, 1, &n)) return -1; return take(r, (size_t)n + 1, &b);
	case 0xc8: if (get_be(r, 2, &n)) return -1; return take(r, (size_t)n + 1, &b);
	case 0xc9: if (get_be(r, 4, &n)) return -1; return take(r, (size_t)n + 1, &b);
	case 0xdc: if (get_be(r, 2, &n)) return -1; goto items;
	case 0xdd: if (get_be(r, 4, &n)) return -1; goto items;
	case 0xde: if (get_be(r, 2, &n)) return -1; n *= 2; goto items;
	case 0xdf: if (get_be(r, 4, &n)) return -1; n *= 2; goto items;
	}
	return -1; /* 0xc1: never used */
items:
	/* Each item is at least one byte, so a hostile count ends at the
	 * payload's end rather than looping long. */
	for (uint64_t i = 0; i < n; i++)
		if (skip(r, depth + 1))
			return -1;
	return 0;
}

static int key_is(sg_bytes k, const char *s)
{
	size_t n = strlen(s);
	return k.n == n && memcmp(k.p, s, n) == 0;
}

/* read_chain reads the intermediates (an array of DER certificates),
 * keeping the first SG_MAX_CHAIN. A second "chain" replaces the first
 * whole, as package proto reads it. */
static int read_chain(rd *r, sg_key_entry *e)
{
	uint64_t n;
	e->nchain = 0;
	memset(e->chain, 0, sizeof e->chain);
	if (get_len(r, 0, &n))
		return -1;
	for (uint64_t i = 0; i < n; i++) {
		if (i < SG_MAX_CHAIN) {
			if (get_bytes(r, &e->chain[i]))
				return -1;
			e->nchain = (uint32_t)i + 1;
		} else if (skip(r, 2)) {
			return -1;
		}
	}
	return 0;
}

static int read_key_entry(rd *r, sg_key_entry *e)
{
	uint64_t n;
	memset(e, 0, sizeof *e);
	if (get_len(r, 1, &n))
		return -1;
	for (uint64_t i = 0; i < n; i++) {
		sg_bytes k;
		int rc;
		if (get_bytes(r, &k))
			return -1;
		if (key_is(k, "name")) rc = get_bytes(r, &e->name);
		else if (key_is(k, "kid")) rc = get_bytes(r, &e->kid);
		else if (key_is(k, "prov")) rc = get_bytes(r, &e->prov);
		else if (key_is(k, "kty")) rc = get_bytes(r, &e->kty);
		else if (key_is(k, "pub")) rc = get_bytes(r, &e->pub);
		else if (key_is(k, "cert")) rc = get_bytes(r, &e->cert);
		else if (key_is(k, "chain")) rc = read_chain(r, e);
		else rc = skip(r, 2);
		if (rc)
			return -1;
	}
	return 0;
}

int sg_decode_response(const uint8_t *p, size_t n, sg_response *resp)
{
	rd r = {p, p + n};
	uint64_t entries, v;
	memset(resp, 0, sizeof *resp);
	if (get_len(&r, 1, &entries))
		return -1;
	for (uint64_t i = 0; i < entries; i++) {
		sg_bytes k;
		int rc = 0, b;
		if (get_bytes(&r, &k))
			return -1;
		if (key_is(k, "id")) {
			rc = get_uint(&r, &resp->id);
		} else if (key_is(k, "code")) {
			/* Past 16 bits: one no agent uses (as the Go client reads it),
			 * never one that wraps onto a real code such as OK. */
			rc = get_uint(&r, &v);
			resp->code = v > 0xffff ? 0xffff : (uint32_t)v;
		} else if (key_is(k, "ver")) {
			rc = get_uint(&r, &v);
			resp->ver = v > 0xffff ? 0xffff : (uint16_t)v;
		} else if (key_is(k, "msg")) {
			rc = get_bytes(&r, &resp->msg);
		} else if (key_is(k, "key")) {
			rc = get_bytes(&r, &resp->key);
		} else if (key_is(k, "kid")) {
			rc = get_bytes(&r, &resp->kid);
		} else if (key_is(k, "kty")) {
			rc = get_bytes(&r, &resp->kty);
		} else if (key_is(k, "pub")) {
			rc = get_bytes(&r, &resp->pub);
		} else if (key_is(k, "sig")) {
			rc = get_bytes(&r, &resp->sig);
		} else if (key_is(k, "ok")) {
			rc = get_bool(&r, &b);
		} else if (key_is(k, "keys")) {
			uint64_t cnt;
			sg_key_entry e;
			if (get_len(&r, 0, &cnt))
				return -1;
			resp->keys.p = r.p;
			for (uint64_t j = 0; j < cnt; j++)
				if (read_key_entry(&r, &e))
					return -1;
			resp->keys.n = (size_t)(r.p - resp->keys.p);
			resp->nkeys = (uint32_t)cnt;
			resp->has_keys = 1;
		} else {
			rc = skip(&r, 1);
		}
		if (rc)
			return -1;
	}
	return r.p == r.end ? 0 : -1;
}

int sg_keys_next(sg_bytes *it, sg_key_entry *out)
{
	if (it->n == 0)
		return 0;
	rd r = {it->p, it->p + it->n};
	if (read_key_entry(&r, out))
		return -1;
	it->n -= (size_t)(r.p - it->p);
	it->p = r.p;
	return 1;
}
