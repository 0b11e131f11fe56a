package pkcs11module

// The shim compiles csrc/wire.c into this package (and only wire.c: it has
// no dependencies), so the fuzz tests in wire_test.go run the very decoder
// the module uses.

/*
#cgo CFLAGS: -std=c11 -D_GNU_SOURCE -Wall
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "csrc/wire.c"

// guarded_copy places n bytes at the very end of a mapping whose next page
// is PROT_NONE, so that a decoder reading past the payload faults instead
// of passing unnoticed. *maplen receives what to munmap.
static uint8_t *guarded_copy(const void *p, size_t n, size_t *maplen) {
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	size_t body = (n + page - 1) / page * page;
	if (body == 0)
		body = page;
	uint8_t *base = mmap(NULL, body + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (base == MAP_FAILED)
		return NULL;
	if (mprotect(base + body, page, PROT_NONE)) {
		munmap(base, body + page);
		return NULL;
	}
	*maplen = body + page;
	uint8_t *dst = base + body - n;
	if (n)
		memcpy(dst, p, n);
	return dst;
}

static void guarded_free(uint8_t *dst, size_t n, size_t maplen) {
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	size_t body = maplen - page;
	munmap(dst + n - body, maplen);
}
*/
import "C"

import (
	"embed"
	"errors"
	"unsafe"
)

// The go command's build cache keys this package on its own files, not on
// what the preamble #includes from csrc/: embedding the decoder's sources
// puts them in the key, so a change to them rebuilds the shim rather than
// testing a stale decoder from the cache.
//
//go:embed csrc/wire.c csrc/wire.h
var wireSources embed.FS

// wireResponse is what the C decoder read, copied out of its buffer.
type wireResponse struct {
	ID                     uint64
	Code                   uint32
	Version                uint16
	Msg, Key, KID, KeyType string
	Pub, Sig               []byte
	HasKeys                bool
	Keys                   []wireKey
}

type wireKey struct {
	Name, KID, Provider, KeyType string
	Pub, Cert                    []byte
	Chain                        [][]byte // the first SG_MAX_CHAIN intermediates
}

var errMalformed = errors.New("malformed")

// maxChain is how many intermediates of a key the module keeps.
const maxChain = C.SG_MAX_CHAIN

func goBytes(b C.sg_bytes) []byte {
	if b.n == 0 {
		return []byte{}
	}
	return C.GoBytes(unsafe.Pointer(b.p), C.int(b.n))
}

// decodeResponse runs sg_decode_response (and sg_keys_next over the keys)
// on payload placed against a guard page.
func decodeResponse(payload []byte) (*wireResponse, error) {
	var maplen C.size_t
	var src unsafe.Pointer
	if len(payload) > 0 {
		src = unsafe.Pointer(&payload[0])
	}
	p := C.guarded_copy(src, C.size_t(len(payload)), &maplen)
	if p == nil {
		return nil, errors.New("mmap failed")
	}
	defer C.guarded_free(p, C.size_t(len(payload)), maplen)
	var r C.sg_response
	if C.sg_decode_response(p, C.size_t(len(payload)), &r) != 0 {
		return nil, errMalformed
	}
	out := &wireResponse{
		ID: uint64(r.id), Code: uint32(r.code), Version: uint16(r.ver),
		Msg: string(goBytes(r.msg)), Key: string(goBytes(r.key)), KID: string(goBytes(r.kid)),
		KeyType: string(goBytes(r.kty)), Pub: goBytes(r.pub), Sig: goBytes(r.sig),
		HasKeys: r.has_keys != 0,
	}
	it := r.keys
	for {
		var e C.sg_key_entry
		rc := C.sg_keys_next(&it, &e)
		if rc == 0 {
			break
		}
		if rc < 0 {
			return nil, errors.New("keys validated by the decoder did not iterate")
		}
		k := wireKey{
			Name: string(goBytes(e.name)), KID: string(goBytes(e.kid)), Provider: string(goBytes(e.prov)),
			KeyType: string(goBytes(e.kty)), Pub: goBytes(e.pub), Cert: goBytes(e.cert),
		}
		for i := 0; i < int(e.nchain); i++ {
			k.Chain = append(k.Chain, goBytes(e.chain[i]))
		}
		out.Keys = append(out.Keys, k)
	}
	if uint32(len(out.Keys)) != uint32(r.nkeys) {
		return nil, errors.New("key count differs from the entries iterated")
	}
	return out, nil
}

// wireRequest is what encodeRequest is asked to send.
type wireRequest struct {
	ID        uint64
	Op        uint8
	Version   uint16
	Features  uint64
	Key, KID  string
	Scheme    uint8
	Hash      uint8
	Digest    []byte
	TimeoutMs uint32
}

// encodeRequest runs sg_encode_request; nil when it refuses (too large).
func encodeRequest(q wireRequest) []byte {
	cbytes := func(b []byte) (C.sg_bytes, func()) {
		if len(b) == 0 {
			return C.sg_bytes{}, func() {}
		}
		p := C.CBytes(b)
		return C.sg_bytes{p: (*C.uint8_t)(p), n: C.size_t(len(b))}, func() { C.free(p) }
	}
	key, f1 := cbytes([]byte(q.Key))
	defer f1()
	kid, f2 := cbytes([]byte(q.KID))
	defer f2()
	dig, f3 := cbytes(q.Digest)
	defer f3()
	req := C.sg_request{
		id: C.uint64_t(q.ID), op: C.uint8_t(q.Op), ver: C.uint16_t(q.Version), feat: C.uint64_t(q.Features),
		key: key, kid: kid, sch: C.uint8_t(q.Scheme), hash: C.uint8_t(q.Hash), dig: dig, tmo: C.uint32_t(q.TimeoutMs),
	}
	size := C.size_t(C.SG_FRAME_HEADER + C.SG_MAX_FRAME)
	buf := C.malloc(size)
	defer C.free(buf)
	n := C.sg_encode_request(&req, (*C.uint8_t)(buf), size)
	if n == 0 {
		return nil
	}
	return C.GoBytes(buf, C.int(n))
}
