/*
 * wire.h: the Sigil wire protocol (docs/protocol.md) as far as this module
 * speaks it: it encodes Hello, ListKeys and Sign requests and decodes
 * replies. Pure functions over caller-owned buffers, no I/O, no allocation,
 * so the decoder can be fuzzed on its own (client/pkcs11module/wire_test.go).
 */
#ifndef SIGIL_WIRE_H
#define SIGIL_WIRE_H

#include <stddef.h>
#include <stdint.h>

enum {
	SG_OP_HELLO = 1,
	SG_OP_PING = 2,
	SG_OP_LISTKEYS = 3,
	SG_OP_SIGN = 5,
};

enum { SG_SCHEME_ECDSA = 1, SG_SCHEME_PKCS1V15 = 2, SG_SCHEME_PSS = 3, SG_SCHEME_ED25519 = 4 };
enum { SG_HASH_NONE = 0, SG_HASH_SHA256 = 1, SG_HASH_SHA384 = 2, SG_HASH_SHA512 = 3 };

/* Result codes, docs/protocol.md "Result codes". */
enum {
	SG_OK = 0, SG_BAD_REQUEST = 1, SG_UNSUPPORTED_VERSION = 2, SG_UNAUTHENTICATED = 3,
	SG_PERMISSION_DENIED = 4, SG_NOT_FOUND = 5, SG_UNSUPPORTED_ALGORITHM = 6,
	SG_RATE_LIMITED = 7, SG_QUOTA_EXCEEDED = 8, SG_OUTSIDE_WINDOW = 9, SG_PAUSED = 10,
	SG_KEY_RETIRED = 11, SG_PIN_INCORRECT = 12, SG_TOKEN_LOCKED = 13, SG_UNAVAILABLE = 14,
	SG_DEADLINE_EXCEEDED = 15, SG_JOURNAL_UNAVAILABLE = 16, SG_INTERNAL = 17,
};

#define SG_PROTOCOL_VERSION 1
#define SG_FRAME_HEADER 4
/* The agent's default limits.max_frame; a frame announcing more is refused. */
#define SG_MAX_FRAME 65536

/* A byte string inside a decoded frame (not NUL-terminated). */
typedef struct {
	const uint8_t *p;
	size_t n;
} sg_bytes;

typedef struct {
	uint64_t id;
	uint8_t op;
	uint16_t ver;         /* Hello */
	uint64_t feat;        /* Hello */
	sg_bytes key, kid;    /* Sign: key name and kid (empty: not sent) */
	uint8_t sch, hash;    /* Sign */
	sg_bytes dig;         /* Sign: digest, or the message for Ed25519 */
	uint32_t tmo;         /* milliseconds; 0: not sent */
} sg_request;

/* Intermediates of a key's certificate the module shows; more are left out. */
#define SG_MAX_CHAIN 4

typedef struct {
	sg_bytes name, kid, prov, kty, pub;
	sg_bytes cert; /* DER X.509 certificate; empty when the key has none */
	sg_bytes chain[SG_MAX_CHAIN]; /* its intermediates, DER, as the config file gave them */
	uint32_t nchain;
} sg_key_entry;

typedef struct {
	uint64_t id;
	uint32_t code;
	uint16_t ver;
	sg_bytes msg, key, kid, kty, pub, sig;
	int has_keys;
	uint32_t nkeys;
	sg_bytes keys; /* the ListKeys entries (validated), for sg_keys_next */
} sg_response;

/*
 * sg_encode_request writes req as a complete frame (4-byte big-endian length
 * and one msgpack map) into buf. It returns the frame's length, or 0 when it
 * does not fit in cap or the payload would exceed SG_MAX_FRAME.
 */
size_t sg_encode_request(const sg_request *req, uint8_t *buf, size_t cap);

/*
 * sg_decode_response decodes one payload (without the length prefix). Byte
 * fields point into p. Unknown keys are skipped; trailing bytes, truncation,
 * a wrong type for a known key or nesting deeper than 32 are errors (-1).
 */
int sg_decode_response(const uint8_t *p, size_t n, sg_response *r);

/*
 * sg_keys_next reads the next ListKeys entry from *it (initialise it with
 * r->keys) into out: 1 for an entry, 0 at the end, -1 on malformed input.
 */
int sg_keys_next(sg_bytes *it, sg_key_entry *out);

#endif
