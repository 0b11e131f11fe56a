package agent_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/software"
)

func TestSignThroughAgentVerifiesWithGoCrypto(t *testing.T) {
	r := startAgent(t, softwareConfig(t))
	c := r.dial(t)
	ctx := context.Background()
	d256 := sha256.Sum256([]byte("payload"))
	d384 := sha512.Sum384([]byte("payload"))
	cases := []struct {
		key    string
		alg    client.Algorithm
		digest []byte
	}{
		{"default", client.Algorithm{}, d256[:]},
		{"default", client.Algorithm{Scheme: client.SchemeECDSA, Hash: crypto.SHA256}, d256[:]},
		{"p384", client.Algorithm{}, d384[:]},
		{"rsa", client.Algorithm{}, d256[:]},
		{"rsa", client.Algorithm{Scheme: client.SchemePSS, Hash: crypto.SHA384}, d384[:]},
		{"ed", client.Algorithm{}, []byte("a message, signed as itself")},
		{"", client.Algorithm{}, d256[:]}, // the default key
	}
	keys, err := c.ListKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]client.Key{}
	for _, k := range keys {
		byName[k.Name] = k
	}
	for _, tc := range cases {
		t.Run(tc.key, func(t *testing.T) {
			sig, err := c.Sign(ctx, client.ByName(tc.key), tc.alg, tc.digest)
			if err != nil {
				t.Fatal(err)
			}
			k := byName[sig.Key]
			if sig.KID != k.KID {
				t.Fatalf("reply kid %s, key %s has %s", sig.KID, sig.Key, k.KID)
			}
			alg := effective(tc.alg, k.Type)
			if err := providers.Verify(k.Public, alg, tc.digest, sig.Sig); err != nil {
				t.Fatalf("Go crypto rejects the agent's signature: %v", err)
			}
			bad := bytes.Clone(tc.digest)
			bad[len(bad)-1] ^= 0x01
			if err := providers.Verify(k.Public, alg, bad, sig.Sig); !errors.Is(err, providers.ErrInvalidSignature) {
				t.Fatalf("signature verified over a flipped digest: %v", err)
			}
			ok, err := c.Verify(ctx, client.ByKID(sig.KID), tc.alg, tc.digest, sig.Sig)
			if err != nil || !ok {
				t.Fatalf("agent Verify = %v, %v", ok, err)
			}
			ok, err = c.Verify(ctx, client.ByKID(sig.KID), tc.alg, bad, sig.Sig)
			if err != nil || ok {
				t.Fatalf("agent Verify over a flipped digest = %v, %v", ok, err)
			}
		})
	}
}

// effective is the algorithm the agent applies for a client Algorithm.
func effective(a client.Algorithm, keyType string) providers.Algorithm {
	if a.Scheme == client.SchemeDefault {
		a = client.DefaultAlgorithm(keyType)
	}
	return providers.Algorithm{Scheme: providers.Scheme(a.Scheme), Hash: a.Hash}
}

func TestRequestErrors(t *testing.T) {
	r := startAgent(t, softwareConfig(t))
	c := r.dial(t)
	d := sha256.Sum256([]byte("x"))
	cases := []struct {
		name   string
		ref    client.KeyRef
		alg    client.Algorithm
		digest []byte
		want   proto.Code
	}{
		{"unknown key", client.ByName("nope"), client.Algorithm{}, d[:], proto.NotFound},
		{"unknown kid", client.ByKID("00000000000000000000000000000000"), client.Algorithm{}, d[:], proto.NotFound},
		{"short digest", client.ByName("default"), client.Algorithm{}, d[:31], proto.BadRequest},
		{"long digest", client.ByName("default"), client.Algorithm{}, append(d[:], 0), proto.BadRequest},
		{"digest for another hash", client.ByName("default"), client.Algorithm{Scheme: client.SchemeECDSA, Hash: crypto.SHA384}, d[:], proto.BadRequest},
		{"pss on ecdsa key", client.ByName("default"), client.Algorithm{Scheme: client.SchemePSS, Hash: crypto.SHA256}, d[:], proto.UnsupportedAlgorithm},
		{"ed25519ph", client.ByName("ed"), client.Algorithm{Scheme: client.SchemeEd25519, Hash: crypto.SHA512}, make([]byte, 64), proto.UnsupportedAlgorithm},
		{"ecdsa on ed25519 key", client.ByName("ed"), client.Algorithm{Scheme: client.SchemeECDSA, Hash: crypto.SHA256}, d[:], proto.UnsupportedAlgorithm},
		{"unknown scheme", client.ByName("default"), client.Algorithm{Scheme: 9, Hash: crypto.SHA256}, d[:], proto.UnsupportedAlgorithm},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := c.Sign(context.Background(), tc.ref, tc.alg, tc.digest)
			if got := client.Code(err); got != tc.want {
				t.Fatalf("code %s (%v), want %s", got, err, tc.want)
			}
			if bytes.Contains([]byte(err.Error()), []byte(string(d[:4]))) {
				t.Fatal("error message echoes the digest")
			}
		})
	}
	// The connection survives refused requests.
	if err := c.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestAdminOperationsRefused(t *testing.T) {
	r := startAgent(t, softwareConfig(t))
	rc := r.raw(t)
	rc.hello()
	for i, op := range []proto.Op{proto.OpRotate, proto.OpPause, proto.OpReloadPolicy} {
		rc.send(&proto.Request{ID: uint64(10 + i), Op: op, Key: "default"})
		resp, err := rc.recv()
		if err != nil || resp.Code != proto.PermissionDenied || resp.ID != uint64(10+i) {
			t.Fatalf("%s: %v %+v", op, err, resp)
		}
	}
	rc.send(&proto.Request{ID: 20, Op: proto.Op(99)})
	if resp, err := rc.recv(); err != nil || resp.Code != proto.BadRequest {
		t.Fatalf("unknown op: %v %+v", err, resp)
	}
}

func TestHandshake(t *testing.T) {
	r := startAgent(t, softwareConfig(t))
	t.Run("request before hello closes", func(t *testing.T) {
		rc := r.raw(t)
		rc.send(&proto.Request{ID: 5, Op: proto.OpPing})
		resp, err := rc.recv()
		if err != nil || resp.Code != proto.BadRequest || resp.ID != 0 {
			t.Fatalf("%v %+v", err, resp)
		}
		if _, err := rc.recv(); !errors.Is(err, io.EOF) {
			t.Fatalf("connection not closed: %v", err)
		}
	})
	t.Run("newer client gets UNSUPPORTED_VERSION and may retry", func(t *testing.T) {
		rc := r.raw(t)
		rc.send(&proto.Request{ID: 1, Op: proto.OpHello, Version: proto.Version + 1})
		resp, err := rc.recv()
		if err != nil || resp.Code != proto.UnsupportedVersion || resp.Version != proto.Version {
			t.Fatalf("%v %+v", err, resp)
		}
		rc.hello()
		rc.send(&proto.Request{ID: 2, Op: proto.OpPing})
		if resp, err := rc.recv(); err != nil || resp.Code != proto.OK || resp.ID != 2 {
			t.Fatalf("ping after re-hello: %v %+v", err, resp)
		}
	})
}

// docs/protocol.md: a client announcing any version but 1 gets
// UNSUPPORTED_VERSION, the agent's version in ver, and may say Hello again
// on the same connection. Version 0, written or left out, is such a
// version: it used to be answered BAD_REQUEST, which tells a client of
// another implementation nothing about the version to use.
func TestHelloVersionNegotiation(t *testing.T) {
	r := startAgent(t, softwareConfig(t))
	const id = 10
	hello := uintField("op", uint64(proto.OpHello))
	for _, tc := range []struct {
		name    string
		request []byte
		want    proto.Code
	}{
		{"ver 1", rawFrame(uintField("id", id), hello, uintField("ver", 1)), proto.OK},
		{"ver 1 as a fixint", rawFrame(uintField("id", id), hello, []byte{0xa3, 'v', 'e', 'r', 0x01}), proto.OK},
		{"ver 1 as an int8", rawFrame(uintField("id", id), hello, []byte{0xa3, 'v', 'e', 'r', 0xd0, 0x01}), proto.OK},
		{"ver 0", rawFrame(uintField("id", id), hello, uintField("ver", 0)), proto.UnsupportedVersion},
		{"ver nil", rawFrame(uintField("id", id), hello, []byte{0xa3, 'v', 'e', 'r', 0xc0}), proto.UnsupportedVersion},
		{"no ver", rawFrame(uintField("id", id), hello), proto.UnsupportedVersion},
		{"ver 2", rawFrame(uintField("id", id), hello, uintField("ver", 2)), proto.UnsupportedVersion},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rc := r.raw(t)
			if _, err := rc.nc.Write(tc.request); err != nil {
				t.Fatal(err)
			}
			resp, err := rc.recv()
			if err != nil || resp.ID != id || resp.Code != tc.want || resp.Version != proto.Version {
				t.Fatalf("reply %v %+v, want id %d, %s and ver %d", err, resp, id, tc.want, proto.Version)
			}
			if tc.want != proto.OK {
				rc.send(&proto.Request{ID: id + 1, Op: proto.OpPing})
				if resp, err := rc.recv(); err != nil || resp.ID != 0 || resp.Code != proto.BadRequest {
					t.Fatalf("ping before a Hello was taken: %v %+v, want the final BAD_REQUEST", err, resp)
				}
				return
			}
			rc.send(&proto.Request{ID: id + 1, Op: proto.OpPing})
			if resp, err := rc.recv(); err != nil || resp.ID != id+1 || resp.Code != proto.OK {
				t.Fatalf("ping afterwards: %v %+v", err, resp)
			}
		})
	}
}

// op and ver are uints on the wire, wider than proto's Op and Version: a
// number past them is an op or a version the agent does not know, like any
// other. It is answered with the request's id (BAD_REQUEST for an op,
// UNSUPPORTED_VERSION for a Hello) and the connection stays open; it used
// to fail decoding, and the agent sent the final id-0 BAD_REQUEST and closed.
func TestOutOfRangeOpAndVersionKeepTheConnection(t *testing.T) {
	r := startAgent(t, softwareConfig(t))
	field := func(k string, v uint64) []byte { // "k": v as a uint64
		return binary.BigEndian.AppendUint64(append(append([]byte{0xa0 | byte(len(k))}, k...), 0xcf), v)
	}
	frame := func(fields ...[]byte) []byte {
		payload := bytes.Join(append([][]byte{{0x80 | byte(len(fields))}}, fields...), nil)
		return append(binary.BigEndian.AppendUint32(nil, uint32(len(payload))), payload...)
	}
	const id = 10
	for _, tc := range []struct {
		name    string
		request []byte
		hello   bool // the request is a Hello (else one comes first)
		want    proto.Code
	}{
		{"op 99", frame(field("id", id), field("op", 99)), false, proto.BadRequest},
		{"op 255", frame(field("id", id), field("op", 255)), false, proto.BadRequest},
		{"op 256", frame(field("id", id), field("op", 256)), false, proto.BadRequest},
		{"op 261 (Sign + 256)", frame(field("id", id), field("op", 256+uint64(proto.OpSign))), false, proto.BadRequest},
		{"op 2^32", frame(field("id", id), field("op", 1<<32)), false, proto.BadRequest},
		{"op 2^64-1", frame(field("id", id), field("op", math.MaxUint64)), false, proto.BadRequest},
		{"ver 2", frame(field("id", id), field("op", uint64(proto.OpHello)), field("ver", 2)), true, proto.UnsupportedVersion},
		{"ver 65535", frame(field("id", id), field("op", uint64(proto.OpHello)), field("ver", 65535)), true, proto.UnsupportedVersion},
		{"ver 65536", frame(field("id", id), field("op", uint64(proto.OpHello)), field("ver", 65536)), true, proto.UnsupportedVersion},
		{"ver 65537 (1 + 65536)", frame(field("id", id), field("op", uint64(proto.OpHello)), field("ver", 65537)), true, proto.UnsupportedVersion},
		{"ver 2^64-1", frame(field("id", id), field("op", uint64(proto.OpHello)), field("ver", math.MaxUint64)), true, proto.UnsupportedVersion},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rc := r.raw(t)
			if !tc.hello {
				rc.hello()
			}
			if _, err := rc.nc.Write(tc.request); err != nil {
				t.Fatal(err)
			}
			resp, err := rc.recv()
			if err != nil || resp.ID != id || resp.Code != tc.want {
				t.Fatalf("reply %v %+v, want id %d and %s", err, resp, id, tc.want)
			}
			if tc.hello {
				if resp.Version != proto.Version {
					t.Fatalf("UNSUPPORTED_VERSION names version %d, want %d", resp.Version, proto.Version)
				}
				rc.hello() // the client may say Hello again with the agent's version
			}
			rc.send(&proto.Request{ID: id + 1, Op: proto.OpPing})
			if resp, err := rc.recv(); err != nil || resp.ID != id+1 || resp.Code != proto.OK {
				t.Fatalf("ping afterwards: %v %+v", err, resp)
			}
		})
	}
}

// Hand-built msgpack for requests a well-behaved client never writes: each
// uint as a uint64 whatever its value, so any number reaches the decoder.
func uintField(k string, v uint64) []byte {
	return binary.BigEndian.AppendUint64(append(append([]byte{0xa0 | byte(len(k))}, k...), 0xcf), v)
}

// intField writes v as an int64, whatever its value.
func intField(k string, v int64) []byte {
	return binary.BigEndian.AppendUint64(append(append([]byte{0xa0 | byte(len(k))}, k...), 0xd3), uint64(v))
}

func strField(k, v string) []byte {
	return append(append(append([]byte{0xa0 | byte(len(k))}, k...), 0xa0|byte(len(v))), v...)
}

func binField(k string, v []byte) []byte {
	return append(append(append([]byte{0xa0 | byte(len(k))}, k...), 0xc4, byte(len(v))), v...)
}

// rawFrame frames a map of the given fields (at most 15).
func rawFrame(fields ...[]byte) []byte {
	payload := bytes.Join(append([][]byte{{0x80 | byte(len(fields))}}, fields...), nil)
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(payload))), payload...)
}

// exchange writes one hand-built request frame on rc and checks its reply
// (code and id), then that the connection still answers a Ping.
func (rc *rawConn) exchange(frame []byte, id uint64, want proto.Code) *proto.Response {
	rc.t.Helper()
	if _, err := rc.nc.Write(frame); err != nil {
		rc.t.Fatal(err)
	}
	resp, err := rc.recv()
	if err != nil || resp.ID != id || resp.Code != want {
		rc.t.Fatalf("reply %v %+v, want id %d and %s", err, resp, id, want)
	}
	rc.send(&proto.Request{ID: id + 1, Op: proto.OpPing})
	if ping, err := rc.recv(); err != nil || ping.ID != id+1 || ping.Code != proto.OK {
		rc.t.Fatalf("ping afterwards: %v %+v", err, ping)
	}
	return resp
}

// sch, hash, tmo and n are uints on the wire, wider than the fields they
// fill. A number past a field is answered as docs/protocol.md says, with
// the request's id and the connection left open: a scheme or hash nobody
// speaks is UNSUPPORTED_ALGORITHM, a client deadline of 2^32-1 ms or more
// leaves the agent's own limit, an AuditTail n is capped at 100 like any
// n over it, and an ExportREP pack number that large names no pack
// (NOT_FOUND). Such numbers used to fail decoding: the agent sent the
// final id-0 BAD_REQUEST and closed. None may wrap onto a smaller number:
// sch 257 is not ECDSA, tmo 2^32+1 is not 1 ms, n 2^32+2 is not pack 2.
func TestOutOfRangeNumbersKeepTheConnection(t *testing.T) {
	const id = 10
	d := sha256.Sum256([]byte("out of range"))
	sign := func(fields ...[]byte) []byte {
		return rawFrame(append([][]byte{uintField("id", id), uintField("op", uint64(proto.OpSign)),
			strField("key", "default"), binField("dig", d[:])}, fields...)...)
	}
	t.Run("key operations", func(t *testing.T) {
		r := startAgent(t, softwareConfig(t))
		c := r.dial(t)
		good, err := c.Sign(context.Background(), client.ByName("default"), client.Algorithm{}, d[:])
		if err != nil {
			t.Fatal(err)
		}
		verify := func(fields ...[]byte) []byte {
			return rawFrame(append([][]byte{uintField("id", id), uintField("op", uint64(proto.OpVerify)),
				strField("key", "default"), binField("dig", d[:]), binField("sig", good.Sig)}, fields...)...)
		}
		for _, tc := range []struct {
			name    string
			request []byte
			want    proto.Code
		}{
			{"sign: sch 255", sign(uintField("sch", 255)), proto.UnsupportedAlgorithm},
			{"sign: sch 257 (ECDSA + 256)", sign(uintField("sch", 256+uint64(proto.SchemeECDSA))), proto.UnsupportedAlgorithm},
			{"sign: sch 2^64-1", sign(uintField("sch", math.MaxUint64)), proto.UnsupportedAlgorithm},
			{"sign: hash 255", sign(uintField("hash", 255)), proto.UnsupportedAlgorithm},
			{"sign: hash 257 (SHA-256 + 256)", sign(uintField("hash", 256+uint64(proto.HashSHA256))), proto.UnsupportedAlgorithm},
			{"sign: hash 2^32", sign(uintField("hash", 1<<32)), proto.UnsupportedAlgorithm},
			{"verify: sch 260 (Ed25519 + 256)", verify(uintField("sch", 256+uint64(proto.SchemeEd25519))), proto.UnsupportedAlgorithm},
			{"verify: hash 2^64-1", verify(uintField("hash", math.MaxUint64)), proto.UnsupportedAlgorithm},
			{"sign: tmo 2^32-1", sign(uintField("tmo", math.MaxUint32)), proto.OK},
			{"sign: tmo 2^32+1", sign(uintField("tmo", 1<<32+1)), proto.OK},
			{"sign: tmo 2^64-1", sign(uintField("tmo", math.MaxUint64)), proto.OK},
		} {
			t.Run(tc.name, func(t *testing.T) {
				rc := r.raw(t)
				rc.hello()
				resp := rc.exchange(tc.request, id, tc.want)
				if tc.want == proto.OK && len(resp.Sig) == 0 {
					t.Fatalf("OK without a signature: %+v", resp)
				}
				if tc.want != proto.OK && !strings.Contains(resp.Msg, "255 or more") && !strings.Contains(resp.Msg, "policy") {
					t.Fatalf("the refusal does not say the number was 255 or more: %q", resp.Msg)
				}
			})
		}
	})

	t.Run("admin operations", func(t *testing.T) {
		cfg := smallRotationConfig(t)
		r := startAgent(t, cfg)
		ln, err := agent.ListenUnix(cfg.AdminSocket)
		if err != nil {
			t.Fatal(err)
		}
		go r.agent.ServeAdmin(ln)
		ctx := context.Background()
		admin, err := client.Dial(ctx, cfg.AdminSocket)
		if err != nil {
			t.Fatal(err)
		}
		defer admin.Close()
		if err := admin.Rotate(ctx, "payments/release"); err != nil { // evidence pack 2, v2's
			t.Fatal(err)
		}
		rc := rawAt(t, cfg.AdminSocket)
		rc.hello()
		tail := func(n uint64) []byte {
			return rawFrame(uintField("id", id), uintField("op", uint64(proto.OpAuditTail)), uintField("n", n))
		}
		export := func(n uint64) []byte {
			return rawFrame(uintField("id", id), uintField("op", uint64(proto.OpExportREP)),
				strField("key", "payments/release"), uintField("n", n))
		}
		if resp := rc.exchange(tail(1), id, proto.OK); len(resp.Records) != 1 {
			t.Fatalf("AuditTail n 1: %d records", len(resp.Records))
		}
		all := len(rc.exchange(tail(100), id, proto.OK).Records)
		if all < 2 {
			t.Fatalf("AuditTail n 100: %d records, want a few", all)
		}
		for _, n := range []uint64{math.MaxUint32, 1<<32 + 1, math.MaxUint64} {
			if resp := rc.exchange(tail(n), id, proto.OK); len(resp.Records) != all {
				t.Fatalf("AuditTail n %d: %d records, want %d (n capped at 100)", n, len(resp.Records), all)
			}
		}
		rc.exchange(export(2), id, proto.OK)
		for _, n := range []uint64{math.MaxUint32, 1<<32 + 2, math.MaxUint64} {
			rc.exchange(export(n), id, proto.NotFound)
		}

		// at is an int, which a client may write as a uint up to 2^64-1:
		// one past the year 9999 is refused as out of range. A uint from
		// 2^63 up used to be read as a negative number, and an int near
		// 2^63-1 wrapped around in time.Unix, so the refusal spoke of a
		// time not in the future, or a prune without a cut-off time. A
		// negative int is a time before 1970, and its refusal says so.
		rotateAt := func(at []byte) []byte {
			return rawFrame(uintField("id", id), uintField("op", uint64(proto.OpRotate)),
				strField("key", "payments/release"), at)
		}
		pruneAt := func(at []byte) []byte {
			return rawFrame(uintField("id", id), uintField("op", uint64(proto.OpAuditPrune)), at)
		}
		const outOfRange, early = "at is out of range", "at is before 1970"
		for _, tc := range []struct {
			name    string
			request []byte
			reason  string
		}{
			{"rotate: at 2^63 (uint)", rotateAt(uintField("at", 1<<63)), outOfRange},
			{"rotate: at 2^63 + a time (uint)", rotateAt(uintField("at", 1<<63+1_800_000_000)), outOfRange},
			{"rotate: at 2^64-1 (uint)", rotateAt(uintField("at", math.MaxUint64)), outOfRange},
			{"rotate: at 2^63-1 (uint)", rotateAt(uintField("at", math.MaxInt64)), outOfRange},
			{"rotate: at 2^63-1 (int)", rotateAt(intField("at", math.MaxInt64)), outOfRange},
			{"rotate: at the year 10000", rotateAt(intField("at", 253402300800)), outOfRange},
			{"rotate: at -5", rotateAt(intField("at", -5)), early},
			{"rotate: at -2^63", rotateAt(intField("at", math.MinInt64)), early},
			{"prune: at 2^63 (uint)", pruneAt(uintField("at", 1<<63)), outOfRange},
			{"prune: at 2^64-1 (uint)", pruneAt(uintField("at", math.MaxUint64)), outOfRange},
			{"prune: at 2^63-1 (int)", pruneAt(intField("at", math.MaxInt64)), outOfRange},
			{"prune: at -5", pruneAt(intField("at", -5)), early},
			{"prune: at -2^63", pruneAt(intField("at", math.MinInt64)), early},
		} {
			resp := rc.exchange(tc.request, id, proto.BadRequest)
			if !strings.Contains(resp.Msg, tc.reason) {
				t.Errorf("%s: refused with %q, want it to say %q", tc.name, resp.Msg, tc.reason)
			}
			if tc.reason == outOfRange && (strings.Contains(resp.Msg, "future") || strings.Contains(resp.Msg, "1970") ||
				strings.Contains(resp.Msg, "cut-off")) {
				t.Errorf("%s: refused with %q, which names another reason than the range", tc.name, resp.Msg)
			}
		}
		recs := rc.exchange(tail(100), id, proto.OK).Records
		if len(recs) < all {
			t.Fatalf("%d records after the refused prunes, want at least %d: one pruned", len(recs), all)
		}
		for _, rec := range recs {
			if bytes.Contains(rec, []byte("rotate.scheduled")) {
				t.Fatalf("a refused time was scheduled: %s", rec)
			}
		}
	})
}

// A uint holds no negative number: one in any uint field of a request is
// a malformed message, answered by the final id-0 BAD_REQUEST and a close
// like any other. The decoder used to read it as its two's complement:
// id -1 was answered as id 2^64-1, op -1 and ver -1 as numbers nobody
// speaks, sch -1 as UNSUPPORTED_ALGORITHM, tmo -1 as no deadline at all.
func TestNegativeNumbersAreMalformed(t *testing.T) {
	r := startAgent(t, softwareConfig(t))
	d := sha256.Sum256([]byte("negative"))
	for _, neg := range []struct {
		name string
		v    []byte
	}{
		{"-1 as a fixint", []byte{0xff}},
		{"-1 as an int64", []byte{0xd3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}},
		{"-2^31 as an int32", []byte{0xd2, 0x80, 0, 0, 0}},
	} {
		field := func(k string) []byte { return append(append([]byte{0xa0 | byte(len(k))}, k...), neg.v...) }
		for _, tc := range []struct {
			key   string
			hello bool // say Hello first (else the request is one)
			frame []byte
		}{
			{"id", true, rawFrame(field("id"), uintField("op", uint64(proto.OpPing)))},
			{"op", true, rawFrame(uintField("id", 10), field("op"))},
			{"ver", false, rawFrame(uintField("id", 10), uintField("op", uint64(proto.OpHello)), field("ver"))},
			{"feat", false, rawFrame(uintField("id", 10), uintField("op", uint64(proto.OpHello)), uintField("ver", uint64(proto.Version)), field("feat"))},
			{"sch", true, rawFrame(uintField("id", 10), uintField("op", uint64(proto.OpSign)), binField("dig", d[:]), field("sch"))},
			{"hash", true, rawFrame(uintField("id", 10), uintField("op", uint64(proto.OpSign)), binField("dig", d[:]), field("hash"))},
			{"tmo", true, rawFrame(uintField("id", 10), uintField("op", uint64(proto.OpSign)), binField("dig", d[:]), field("tmo"))},
			{"from", true, rawFrame(uintField("id", 10), uintField("op", uint64(proto.OpAuditTail)), field("from"))},
			{"n", true, rawFrame(uintField("id", 10), uintField("op", uint64(proto.OpAuditTail)), field("n"))},
		} {
			t.Run(tc.key+" "+neg.name, func(t *testing.T) {
				rc := r.raw(t)
				if tc.hello {
					rc.hello()
				}
				if _, err := rc.nc.Write(tc.frame); err != nil {
					t.Fatal(err)
				}
				rc.finalBadRequest()
			})
		}
	}
}

// Request ids are non-zero: id 0 marks the agent's final reply before it
// closes, so a reply to a request of id 0 could not be told from that one
// (an OK with id 0 is a protocol error to the client). Such a request is
// malformed: the final id-0 BAD_REQUEST, then the close. It used to be
// answered, OK included, with id 0.
func TestRequestIDZeroIsMalformed(t *testing.T) {
	r := startAgent(t, softwareConfig(t))
	d := sha256.Sum256([]byte("id zero"))
	frame := func(payload ...byte) []byte {
		return append(binary.BigEndian.AppendUint32(nil, uint32(len(payload))), payload...)
	}
	for _, tc := range []struct {
		name  string
		hello bool // say Hello (with id 1) first
		req   *proto.Request
		raw   []byte // sent instead of req
	}{
		{name: "Ping", hello: true, req: &proto.Request{ID: 0, Op: proto.OpPing}},
		{name: "Sign", hello: true, req: &proto.Request{ID: 0, Op: proto.OpSign, Key: "default", Digest: d[:]}},
		{name: "no id at all", hello: true, raw: frame(0x81, 0xa2, 'o', 'p', byte(proto.OpPing))},
		{name: "Hello", req: &proto.Request{ID: 0, Op: proto.OpHello, Version: proto.Version}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rc := r.raw(t)
			if tc.hello {
				rc.hello()
			}
			if tc.req != nil {
				rc.send(tc.req)
			} else if _, err := rc.nc.Write(tc.raw); err != nil {
				t.Fatal(err)
			}
			rc.finalBadRequest()
		})
	}
}

// A connection whose peer the agent cannot identify (plain TCP handed to
// Serve) is closed before anything is read: it must not be taken for the
// single tenant of an agent without a policy file.
func TestUnidentifiableConnectionIsClosed(t *testing.T) {
	cfg := softwareConfig(t)
	a, err := agent.New(context.Background(), cfg, zaptest.NewLogger(t, zaptest.Level(zap.ErrorLevel)))
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- a.Serve(ln) }()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		a.Shutdown(ctx)
		<-done
	}()
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	nc.SetDeadline(time.Now().Add(5 * time.Second))
	codec := proto.NewCodec()
	d := sha256.Sum256([]byte("no identity"))
	frames, err := codec.AppendRequestFrame(nil, &proto.Request{ID: 1, Op: proto.OpHello, Version: proto.Version})
	if err == nil {
		frames, err = codec.AppendRequestFrame(frames, &proto.Request{ID: 2, Op: proto.OpSign, Key: "default", Digest: d[:]})
	}
	if err != nil {
		t.Fatal(err)
	}
	nc.Write(frames) // may fail already: the agent closes at once
	if payload, err := proto.ReadFrame(bufio.NewReader(nc), nil, 1<<20); err == nil {
		t.Fatalf("an unidentified TCP peer got an answer (%d bytes)", len(payload))
	}
}

func TestBadFramesCloseOnlyThatConnection(t *testing.T) {
	r := startAgent(t, softwareConfig(t))
	good := r.dial(t)
	cases := []struct {
		name  string
		bytes []byte
		reply bool // a final BAD_REQUEST reply is expected before the close
	}{
		{"oversized frame", binary.BigEndian.AppendUint32(nil, proto.DefaultMaxFrame+1), true},
		{"4 GiB frame", []byte{0xff, 0xff, 0xff, 0xff}, true},
		{"empty frame", []byte{0, 0, 0, 0}, true},
		{"not msgpack", append(binary.BigEndian.AppendUint32(nil, 5), 0xc1, 0xc1, 0xc1, 0xc1, 0xc1), true},
		{"truncated then hang up", []byte{0, 0, 1, 0, 0x85}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rc := r.raw(t)
			rc.hello()
			rc.nc.Write(tc.bytes)
			if !tc.reply {
				rc.nc.Close()
				return
			}
			resp, err := rc.recv()
			if err != nil || resp.Code != proto.BadRequest || resp.ID != 0 {
				t.Fatalf("final reply: %v %+v", err, resp)
			}
			if _, err := rc.recv(); !errors.Is(err, io.EOF) {
				t.Fatalf("connection left open: %v", err)
			}
		})
	}
	// The other client never noticed.
	d := sha256.Sum256([]byte("still here"))
	if _, err := good.Sign(context.Background(), client.KeyRef{}, client.Algorithm{}, d[:]); err != nil {
		t.Fatalf("other client after bad frames: %v", err)
	}
}

// Id 0 marks the agent's last reply on a connection (docs/protocol.md),
// so a request already taken when a bad frame arrives is answered before
// it, never after. The final reply used to go out at once, and the reply to
// a Sign still at its provider followed it: a client that stops at id 0,
// as the Go client does, lost a signature that was made and journaled.
func TestFinalReplyIsTheLast(t *testing.T) {
	d := sha256.Sum256([]byte("in flight at the bad frame"))
	for _, tc := range []struct {
		name string
		bad  []byte
	}{
		{"empty frame", []byte{0, 0, 0, 0}},
		{"frame over the limit", []byte{0xff, 0xff, 0xff, 0xff}},
		{"payload that does not decode", []byte{0, 0, 0, 1, 0xc1}},
		{"request id 0", rawFrame(uintField("id", 0), uintField("op", uint64(proto.OpPing)))},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHeldProvider(t)
			r, logs := startAgentObserved(t, softwareConfig(t), agent.WithProviders(h))
			rc := r.raw(t)
			rc.hello()
			h.hold.Store(true)
			sign, err := rc.codec.AppendRequestFrame(nil, &proto.Request{ID: 2, Op: proto.OpSign, Key: "hkey", Digest: d[:]})
			if err != nil {
				t.Fatal(err)
			}
			// One write: the bad frame is buffered behind the Sign, which
			// therefore goes to a worker rather than holding up the reader.
			if _, err := rc.nc.Write(append(sign, tc.bad...)); err != nil {
				t.Fatal(err)
			}
			<-h.entered
			for end := time.Now().Add(5 * time.Second); logs.FilterMessageSnippet("closing connection").Len() == 0; {
				if time.Now().After(end) {
					t.Fatal("the agent did not read the bad frame")
				}
				time.Sleep(time.Millisecond)
			}
			h.release()
			var got []*proto.Response
			for {
				resp, err := rc.recv()
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
				got = append(got, resp)
			}
			if len(got) != 2 || got[0].ID != 2 || got[1].ID != 0 || got[1].Code != proto.BadRequest {
				for _, resp := range got {
					t.Logf("reply id %d: %s %q", resp.ID, resp.Code, resp.Msg)
				}
				t.Fatalf("%d replies, want the Sign's (id 2) and then the final BAD_REQUEST (id 0)", len(got))
			}
			if got[0].Code != proto.OK {
				t.Fatalf("Sign: %s %q", got[0].Code, got[0].Msg)
			}
			keys, err := h.Keys(context.Background())
			if err != nil || len(keys) != 1 {
				t.Fatalf("keys %v %v", keys, err)
			}
			pub, err := x509.ParsePKIXPublicKey(keys[0].SPKI)
			if err != nil {
				t.Fatal(err)
			}
			if !ecdsa.VerifyASN1(pub.(*ecdsa.PublicKey), d[:], got[0].Sig) {
				t.Fatal("the Sign's signature does not verify")
			}
		})
	}
}

// The log never holds the contents of a malformed frame (docs/security.md):
// the reviewer's frame, a Sign whose unknown 32-byte key (a digest's size)
// is followed by a str32 header claiming 4 GB, was logged with the key in
// the decode error; and a digest's first bytes read as a frame's length
// were logged as that length.
func TestMalformedFrameNeverReachesTheLog(t *testing.T) {
	digest := []byte{0xc0, 0xff, 0xee}
	for b := byte(0xa1); b <= 0xbc; b++ {
		digest = append(digest, b)
	}
	digest = append(digest, 0x42)
	frame := func(payload []byte) []byte {
		return append(binary.BigEndian.AppendUint32(nil, uint32(len(payload))), payload...)
	}
	sign := frame(bytes.Join([][]byte{
		{0x83, 0xa2, 'i', 'd', 0x0a, 0xa2, 'o', 'p', byte(proto.OpSign)},
		{0xd9, 32}, digest, {0xdb, 0xff, 0xff, 0xff, 0xff},
	}, nil))
	r, logs := startAgentObserved(t, softwareConfig(t))
	for _, tc := range []struct {
		name  string
		bytes []byte
	}{
		{"unknown digest-sized key, str32 of 4 GB", sign},
		{"a digest where a frame's length belongs", digest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rc := r.raw(t)
			rc.hello()
			rc.nc.Write(tc.bytes)
			resp, err := rc.recv()
			if err != nil || resp.Code != proto.BadRequest || resp.ID != 0 {
				t.Fatalf("final reply: %v %+v", err, resp)
			}
			if _, err := rc.recv(); !errors.Is(err, io.EOF) {
				t.Fatalf("connection left open: %v", err)
			}
		})
	}
	var logged strings.Builder
	for _, e := range logs.All() {
		fmt.Fprintln(&logged, e.Message, e.ContextMap())
	}
	text := logged.String()
	if !strings.Contains(text, "malformed message") || !strings.Contains(text, "bad frame") {
		t.Fatalf("the refusals were not logged:\n%s", text)
	}
	for i := 0; i+2 <= len(digest); i++ {
		w := digest[i : i+2]
		if q := strconv.Quote(string(w)); strings.Contains(strings.ToLower(text), hex.EncodeToString(w)) ||
			strings.Contains(text, q[1:len(q)-1]) {
			t.Fatalf("the log shows the digest's bytes %x:\n%s", w, text)
		}
	}
	if n := strconv.FormatUint(uint64(binary.BigEndian.Uint32(digest)), 10); strings.Contains(text, n) {
		t.Fatalf("the log shows the digest's first bytes as the number %s:\n%s", n, text)
	}
}

func TestGarbageDoesNotCrashTheAgent(t *testing.T) {
	r := startAgent(t, softwareConfig(t))
	var wg sync.WaitGroup
	for i := 0; i < 20; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			rc := r.raw(t)
			if i%2 == 0 {
				rc.hello()
			}
			junk := make([]byte, 1+i*97)
			rand.Read(junk)
			rc.nc.Write(junk)
			rc.nc.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
			io.Copy(io.Discard, rc.nc)
			rc.nc.Close()
		}(i)
	}
	wg.Wait()
	c := r.dial(t)
	if err := c.Ping(context.Background()); err != nil {
		t.Fatalf("agent stopped answering after garbage: %v", err)
	}
}

// Pipelined requests on one connection all get their own reply.
func TestPipelining(t *testing.T) {
	r := startAgent(t, softwareConfig(t))
	rc := r.raw(t)
	rc.hello()
	const n = 200
	var frames []byte
	d := sha256.Sum256([]byte("pipelined"))
	for i := 0; i < n; i++ {
		req := proto.Request{ID: uint64(100 + i), Op: proto.OpSign, Key: "default", Digest: d[:]}
		if i%10 == 0 {
			req = proto.Request{ID: uint64(100 + i), Op: proto.OpPing}
		}
		frames, _ = rc.codec.AppendRequestFrame(frames, &req)
	}
	if _, err := rc.nc.Write(frames); err != nil { // all at once, before reading anything
		t.Fatal(err)
	}
	seen := map[uint64]bool{}
	for len(seen) < n {
		resp, err := rc.recv()
		if err != nil {
			t.Fatalf("after %d replies: %v", len(seen), err)
		}
		if resp.Code != proto.OK || seen[resp.ID] || resp.ID < 100 || resp.ID >= 100+n {
			t.Fatalf("reply %+v", resp)
		}
		seen[resp.ID] = true
	}
}

func TestConcurrentClientsShareOneConnection(t *testing.T) {
	r := startAgent(t, softwareConfig(t))
	c := r.dial(t)
	keys, _ := c.ListKeys(context.Background())
	var pub crypto.PublicKey
	for _, k := range keys {
		if k.Name == "ed" {
			pub = k.Public
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				msg := []byte{byte(g), byte(i)}
				sig, err := c.Sign(context.Background(), client.ByName("ed"), client.Algorithm{}, msg)
				if err == nil {
					err = providers.Verify(pub, providers.Algorithm{Scheme: providers.SchemeEd25519}, msg, sig.Sig)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

func TestDeadlines(t *testing.T) {
	cfg := softwareConfig(t)
	soft, err := software.Open(software.Config{ID: "slow", DataDir: t.TempDir(), Keys: []software.KeyConfig{{Name: "slow", Type: providers.KeyECDSAP256}}})
	if err != nil {
		t.Fatal(err)
	}
	cfg.Limits.RequestTimeout = 300 * time.Millisecond
	r := startAgent(t, cfg, agent.WithProviders(&slowProvider{Provider: soft, delay: 2 * time.Second}))
	c := r.dial(t)
	d := sha256.Sum256(nil)
	for _, tc := range []struct {
		name   string
		client time.Duration
		max    time.Duration
	}{
		{"client deadline shorter than the agent's", 100 * time.Millisecond, time.Second},
		{"agent's limit shorter than the client's", 5 * time.Second, 2 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), tc.client)
			defer cancel()
			start := time.Now()
			_, err := c.Sign(ctx, client.ByName("slow"), client.Algorithm{}, d[:])
			if client.Code(err) != proto.DeadlineExceeded {
				t.Fatalf("code %s (%v)", client.Code(err), err)
			}
			if el := time.Since(start); el > tc.max {
				t.Fatalf("took %v", el)
			}
		})
	}
	// The connection is still usable after a caller gave up.
	if _, err := c.Sign(context.Background(), client.ByName("default"), client.Algorithm{}, d[:]); err != nil {
		t.Fatal(err)
	}
}

func TestShutdownFinishesInFlight(t *testing.T) {
	cfg := softwareConfig(t)
	soft, err := software.Open(software.Config{ID: "slow", DataDir: t.TempDir(), Keys: []software.KeyConfig{{Name: "slow", Type: providers.KeyEd25519}}})
	if err != nil {
		t.Fatal(err)
	}
	a, c := serveForShutdown(t, cfg, nil, agent.WithProviders(&slowProvider{Provider: soft, delay: 300 * time.Millisecond}))
	results := make(chan error, 4)
	for i := 0; i < 4; i++ {
		go func() {
			_, err := c.Sign(context.Background(), client.ByName("slow"), client.Algorithm{}, []byte("m"))
			results <- err
		}()
	}
	time.Sleep(100 * time.Millisecond) // the requests are in flight
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := a.Shutdown(ctx); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	for i := 0; i < 4; i++ {
		if err := <-results; err != nil {
			t.Fatalf("in-flight request lost in shutdown: %v", err)
		}
	}
	if _, err := client.Dial(context.Background(), cfg.Socket); err == nil {
		t.Fatal("agent still accepting after shutdown")
	}
}

// An admin operation still running when the shutdown grace period ends (a
// rotation signing its canaries on a slow key) is cancelled with its
// connection: Shutdown returns soon after the grace period, not when the
// operation's own two-minute bound ends.
func TestShutdownCancelsAdminOperationsAfterGrace(t *testing.T) {
	cfg := pauseConfig(t)
	cfg.Rotation.Canaries = 20
	cfg.Rotation.Slots = map[string]agent.SlotRotation{"payments/release": {NextKey: "slow-next"}}
	os.WriteFile(cfg.Policy, []byte(releasePolicy("slow-cur", "")), 0o600)
	soft, err := software.Open(software.Config{ID: "slow", DataDir: t.TempDir(), Keys: []software.KeyConfig{
		{Name: "slow-cur", Type: providers.KeyEd25519}, {Name: "slow-next", Type: providers.KeyEd25519}}})
	if err != nil {
		t.Fatal(err)
	}
	a, err := agent.New(context.Background(), cfg, zaptest.NewLogger(t, zaptest.Level(zap.DPanicLevel)), agent.WithProviders(&slowProvider{Provider: soft, delay: time.Second}))
	if err != nil {
		t.Fatal(err)
	}
	aln, err := agent.ListenUnix(cfg.AdminSocket)
	if err != nil {
		t.Fatal(err)
	}
	go a.ServeAdmin(aln)
	admin, err := client.Dial(context.Background(), cfg.AdminSocket)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	rotated := make(chan error, 1)
	go func() { rotated <- admin.Rotate(context.Background(), "payments/release") }()
	time.Sleep(200 * time.Millisecond) // the rotation is signing canaries

	const grace = 300 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	start := time.Now()
	if err := a.Shutdown(ctx); err == nil {
		select {
		case rerr := <-rotated:
			t.Errorf("Shutdown cut a connection but reported no error (took %v; rotation: %v)", time.Since(start), rerr)
		default:
			t.Errorf("Shutdown returned no error after %v while the rotation still ran", time.Since(start))
		}
	}
	// 20 canaries of 1 s each would take 20 s; the one being signed when
	// the grace period ends takes at most 1 s more.
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("Shutdown took %v with a %v grace period", took, grace)
	}
	if err := <-rotated; err == nil {
		t.Error("the rotation cut by the shutdown reported success")
	}
}

// stuckProvider holds each Sign until release is closed, whatever its
// context says: a C_Sign on a wedged network HSM, which no cancellation
// reaches.
type stuckProvider struct {
	providers.Provider
	entered chan struct{}
	release chan struct{}
}

func (s *stuckProvider) Sign(_ context.Context, key string, alg providers.Algorithm, digest []byte) ([]byte, error) {
	select {
	case s.entered <- struct{}{}:
	default:
	}
	<-s.release
	return s.Provider.Sign(context.Background(), key, alg, digest)
}

// A provider call that never returns does not hold Shutdown for good: past
// the grace period it cuts the connections, gives the handlers a moment,
// and closes the providers and the journal under what is left (a
// signature that comes back after that finds the journal closed and is
// withheld). It used to wait for the handler without a bound, so the
// process lived until SIGKILL with its journal open.
func TestShutdownAbandonsAProviderCallThatNeverReturns(t *testing.T) {
	cfg := softwareConfig(t)
	soft, err := software.Open(software.Config{ID: "stuck", DataDir: t.TempDir(), Keys: []software.KeyConfig{{Name: "stuck", Type: providers.KeyECDSAP256}}})
	if err != nil {
		t.Fatal(err)
	}
	sp := &stuckProvider{Provider: soft, entered: make(chan struct{}, 1), release: make(chan struct{})}
	a, c := serveForShutdown(t, cfg, zaptest.NewLogger(t, zaptest.Level(zap.DPanicLevel)), agent.WithProviders(sp))
	signed := make(chan error, 1)
	d := sha256.Sum256([]byte("stuck"))
	go func() {
		_, err := c.Sign(context.Background(), client.ByName("stuck"), client.Algorithm{}, d[:])
		signed <- err
	}()
	<-sp.entered
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- a.Shutdown(ctx) }()
	select {
	case err := <-done:
		if err == nil {
			t.Error("Shutdown that abandoned a request reported no error")
		}
	case <-time.After(5 * time.Second):
		close(sp.release)
		<-done
		t.Fatal("Shutdown with a 300 ms grace period still waited after 5 s for a provider call that never returns")
	}
	if err := <-signed; err == nil {
		t.Error("the abandoned request got a signature")
	}
	close(sp.release) // the call returns at last: nothing is released, nothing panics
	time.Sleep(50 * time.Millisecond)
}

// During shutdown a connection's reader serves what its client had already
// sent, then stops: a client that keeps sending does not hold the drain
// open. The drain's quiet period used to be re-armed per request, so a
// busy signer was served until the grace period ran out and was then cut
// in the middle of a request.
func TestShutdownDoesNotServeABusyClientUntilTheGraceEnds(t *testing.T) {
	r := startAgent(t, softwareConfig(t))
	c := r.dial(t)
	d := sha256.Sum256([]byte("busy"))
	stopped := make(chan error, 1)
	go func() {
		for {
			if _, err := c.Sign(context.Background(), client.ByName("default"), client.Algorithm{}, d[:]); err != nil {
				stopped <- err
				return
			}
		}
	}()
	time.Sleep(100 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	if err := r.agent.Shutdown(ctx); err != nil {
		t.Errorf("Shutdown cut connections: %v", err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("Shutdown took %v with a busy client: it served new requests until the grace period ran out", took)
	}
	if err := <-stopped; client.Code(err) != proto.Unavailable {
		t.Errorf("the busy client's first refused request: %v, want UNAVAILABLE (the agent went away)", err)
	}
}

// No worker goroutine outlives Shutdown by its idle timeout.
func TestShutdownEndsTheWorkers(t *testing.T) {
	r := startAgent(t, softwareConfig(t))
	c := r.dial(t)
	d := sha256.Sum256([]byte("w"))
	var wg sync.WaitGroup
	for range 16 { // concurrent requests on one connection run on workers
		wg.Go(func() { c.Sign(context.Background(), client.ByName("default"), client.Algorithm{}, d[:]) })
	}
	wg.Wait()
	c.Close()
	if err := r.agent.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	var n int
	for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		buf := make([]byte, 1<<20)
		if n = strings.Count(string(buf[:runtime.Stack(buf, true)]), "agent.(*workerPool).worker"); n == 0 {
			return
		}
	}
	t.Fatalf("%d worker goroutines still running 2 s after Shutdown", n)
}

func TestSocketPermissions(t *testing.T) {
	cfg := softwareConfig(t)
	r := startAgent(t, cfg)
	st, err := os.Stat(r.socket)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v", st.Mode().Perm())
	}
	dst, _ := os.Stat(filepath.Dir(r.socket))
	if dst.Mode().Perm() != 0o700 {
		t.Fatalf("socket dir mode %v", dst.Mode().Perm())
	}
	if _, err := agent.ListenUnix(r.socket); err == nil {
		t.Fatal("second agent took over a live socket")
	}
}

// The socket's directory must be writable by nobody else, and its mode is
// never changed: for root it could be /tmp or /run.
func TestSocketDirectoryModes(t *testing.T) {
	cases := []struct {
		mode    os.FileMode
		refused bool
	}{
		{0o700, false},
		{0o750, false}, // systemd's RuntimeDirectoryMode for a group of clients
		{0o755, false},
		{0o770, true},
		{0o777, true},
		{0o777 | os.ModeSticky, true}, // like /tmp
	}
	for _, tc := range cases {
		t.Run(tc.mode.String(), func(t *testing.T) {
			dir := filepath.Dir(shortSocketPath(t))
			if err := os.MkdirAll(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(dir, tc.mode); err != nil {
				t.Fatal(err)
			}
			ln, err := agent.ListenUnix(filepath.Join(dir, "agent.sock"))
			if tc.refused != (err != nil) {
				t.Fatalf("ListenUnix in a %v directory: %v", tc.mode, err)
			}
			if ln != nil {
				ln.Close()
			}
			st, _ := os.Stat(dir)
			if st.Mode()&(os.ModePerm|os.ModeSticky) != tc.mode {
				t.Fatalf("directory mode changed from %v to %v", tc.mode, st.Mode())
			}
		})
	}
}

func TestStaleSocketIsReplaced(t *testing.T) {
	cfg := softwareConfig(t)
	os.MkdirAll(filepath.Dir(cfg.Socket), 0o700)
	ln, err := agent.ListenUnix(cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	// Simulate a killed agent: the socket file stays, nobody listens.
	ln.(interface{ SetUnlinkOnClose(bool) }).SetUnlinkOnClose(false)
	ln.Close()
	if _, err := os.Stat(cfg.Socket); err != nil {
		t.Fatalf("stale socket not left behind: %v", err)
	}
	// Checked before the agent opens anything: a stale socket is no reason
	// to refuse, and the check leaves it for ListenUnix.
	if err := agent.CheckUnixSocket(cfg.Socket); err != nil {
		t.Fatalf("CheckUnixSocket(a stale socket) = %v", err)
	}
	if _, err := os.Stat(cfg.Socket); err != nil {
		t.Fatalf("CheckUnixSocket removed the stale socket: %v", err)
	}
	r := startAgent(t, cfg)
	if err := r.dial(t).Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// ListenUnix replaces only a socket that refuses connections. Anything else
// at the path stays: a file the path names by mistake, and a live agent
// that does not accept right now (its accept queue full, as when it is out
// of file descriptors), which answers EAGAIN rather than ECONNREFUSED.
func TestListenUnixReplacesOnlyAStaleSocket(t *testing.T) {
	for _, tc := range []struct {
		name string
		make func(t *testing.T, path string)
	}{
		{"a regular file", func(t *testing.T, path string) {
			if err := os.WriteFile(path, []byte("precious"), 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{"a directory", func(t *testing.T, path string) {
			if err := os.Mkdir(path, 0o700); err != nil {
				t.Fatal(err)
			}
		}},
		{"a live agent with a full accept queue", func(t *testing.T, path string) {
			fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { syscall.Close(fd) })
			if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: path}); err != nil {
				t.Fatal(err)
			}
			if err := syscall.Listen(fd, 0); err != nil {
				t.Fatal(err)
			}
			for i := 0; ; i++ {
				c, err := net.DialTimeout("unix", path, time.Second)
				if err != nil {
					break // the queue is full
				}
				t.Cleanup(func() { c.Close() })
				if i == 16 {
					t.Fatal("the accept queue never filled")
				}
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "agent.sock")
			tc.make(t, path)
			var before syscall.Stat_t
			if err := syscall.Lstat(path, &before); err != nil {
				t.Fatal(err)
			}
			if err := agent.CheckUnixSocket(path); err == nil {
				t.Fatal("CheckUnixSocket found the path free")
			}
			if ln, err := agent.ListenUnix(path); err == nil {
				ln.Close()
				t.Fatal("ListenUnix took the path")
			}
			var after syscall.Stat_t
			if err := syscall.Lstat(path, &after); err != nil || after.Ino != before.Ino {
				t.Fatalf("the path's file was replaced or removed: %v", err)
			}
		})
	}
}

func TestConfigValidation(t *testing.T) {
	cases := []struct {
		name string
		yaml string
		want string
	}{
		{"unknown field names the line", "providers:\n  - id: a\n    type: software\n    colour: blue\n", "line 4"},
		{"unknown provider type", "providers:\n  - {id: a, type: tpm}\n", "type \"tpm\""},
		{"pkcs11 without pin source", "providers:\n  - {id: h, type: pkcs11, module: /x.so, keys: [{name: k, uri: 'pkcs11:object=k'}]}\n", "pin_env or pin_file"},
		{"bad key type", "providers:\n  - {id: a, type: software, keys: [{name: k, type: dsa}]}\n", "type \"dsa\""},
		// The default key dir is DATA_DIR/keys/<id>: "../journal" would put keys in the journal's directory.
		{"software id that leaves the keys dir", "providers:\n  - {id: ../journal, type: software, keys: [{name: k, type: ed25519}]}\n", "providers[0]: id \"../journal\""},
		{"software id that is the keys dir", "providers:\n  - {id: ., type: software, keys: [{name: k, type: ed25519}]}\n", "providers[0]: id \".\""},
		{"duplicate key name", "providers:\n  - {id: a, type: software, keys: [{name: k, type: ed25519}]}\n  - {id: b, type: software, keys: [{name: k, type: ed25519}]}\n", "also used"},
		{"default key missing", "default_key: x\nproviders:\n  - {id: a, type: software, keys: [{name: k, type: ed25519}]}\n", "default_key"},
		{"rotation calendar too short", "rotation: {calendars: {payments/release: {period: 5m}}}\n", "rotation.calendars[payments/release]"},
		{"rotation calendar bad date", "rotation: {calendars: {payments/release: {dates: [tomorrow]}}}\n", "rotation.calendars[payments/release]"},
		// Refused by --check and a reload, not first by the agent's start.
		{"rotation calendar of no tenant/slot", "rotation: {calendars: {payments-release: {period: 720h}}}\n", "rotation.calendars[payments-release]"},
		{"rotation retry_after too short", "rotation: {retry_after: 1s}\n", "rotation.retry_after 1s"},
		{"rotation retry_after negative", "rotation: {retry_after: -1h}\n", "rotation.retry_after -1h"},
		{"negative limit", "limits: {max_conns: -1}\n", "max_conns"},
		{"negative request timeout", "limits: {request_timeout: -1s}\n", "limits.request_timeout -1s"},
		{"negative write timeout", "limits: {write_timeout: -1s}\n", "limits.write_timeout -1s"},
		{"negative shutdown grace", "limits: {shutdown_grace: -5s}\n", "limits.shutdown_grace -5s"},
		{"negative handshake timeout", "tcp: {handshake_timeout: -1s}\n", "tcp.handshake_timeout -1s"},
		{"negative overlap", "rotation: {overlap: -1h}\n", "rotation.overlap -1h0m0s"},
		{"too many canaries", "rotation: {canaries: 20000}\n", "rotation.canaries 20000"},
		{"negative canaries", "rotation: {canaries: -1}\n", "rotation.canaries -1"},
		{"insecure endpoint off loopback", "providers:\n  - {id: g, type: gcpkms, project: p, location: l, key_ring: r, endpoint: 'kms.example.com:443', insecure_endpoint: true}\n", "on loopback"},
		{"insecure endpoint without a port", "providers:\n  - {id: g, type: gcpkms, project: p, location: l, key_ring: r, endpoint: '127.0.0.1', insecure_endpoint: true}\n", "on loopback"},
		{"negative gc percent", "runtime: {gc_percent: -1}\n", "runtime.gc_percent -1"},
		{"gc percent too high", "runtime: {gc_percent: 20000}\n", "runtime.gc_percent 20000"},
		{"journal retention too short", "journal: {retention: 30s}\n", "journal.retention 30s"},
		{"too many module instances", "providers:\n  - {id: h, type: pkcs11, module: /x.so, pin_env: P, module_instances: 17, keys: [{name: k, uri: 'pkcs11:object=k'}]}\n", "module_instances 17"},
		// Two files concatenated: the second, policy: and all, went unread.
		{"a second YAML document", "---\nlog: {level: info}\n---\npolicy: /etc/sigil/policy.yaml\n", "more than one YAML document"},
		{"awskms over http off loopback", "providers:\n  - {id: a, type: awskms, region: eu-west-1, endpoint: 'http://kms.example.com', keys: [{name: k, key_id: alias/k}]}\n", "on loopback"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := agent.ParseConfig([]byte(tc.yaml))
			if err == nil || !bytes.Contains([]byte(err.Error()), []byte(tc.want)) {
				t.Fatalf("err = %v, want it to mention %q", err, tc.want)
			}
		})
	}
	if cfg := agent.DefaultConfig(); cfg.DefaultKey != "default" || len(cfg.Providers) != 1 {
		t.Fatalf("embedded default %+v", cfg)
	}
}

// One connection, callers with different deadlines: the caller reading the
// socket for the others may give up (its deadline) or be cancelled, and the
// others still get their replies.
func TestClientReaderHandOff(t *testing.T) {
	cfg := softwareConfig(t)
	soft, err := software.Open(software.Config{ID: "slow", DataDir: t.TempDir(), Keys: []software.KeyConfig{{Name: "slow", Type: providers.KeyEd25519}}})
	if err != nil {
		t.Fatal(err)
	}
	r := startAgent(t, cfg, agent.WithProviders(&slowProvider{Provider: soft, delay: 300 * time.Millisecond}))
	c := r.dial(t)
	type result struct {
		name string
		err  error
		took time.Duration
	}
	results := make(chan result, 3)
	run := func(name string, ctx context.Context) {
		start := time.Now()
		_, err := c.Sign(ctx, client.ByName("slow"), client.Algorithm{}, []byte(name))
		results <- result{name, err, time.Since(start)}
	}
	short, cancelShort := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancelShort()
	cancellable, cancel := context.WithCancel(context.Background())
	go run("short", short)
	time.Sleep(5 * time.Millisecond) // "short" most likely holds the reader role
	go run("cancelled", cancellable)
	go run("patient", context.Background())
	time.Sleep(100 * time.Millisecond)
	cancel()
	for i := 0; i < 3; i++ {
		res := <-results
		switch res.name {
		case "short":
			if client.Code(res.err) != proto.DeadlineExceeded || res.took > 250*time.Millisecond {
				t.Errorf("short: %v after %v", res.err, res.took)
			}
		case "cancelled":
			if !errors.Is(res.err, context.Canceled) || res.took > 250*time.Millisecond {
				t.Errorf("cancelled: %v after %v", res.err, res.took)
			}
		case "patient":
			if res.err != nil {
				t.Errorf("patient caller lost its reply: %v", res.err)
			}
		}
	}
	// The connection is in step afterwards.
	if _, err := c.Sign(context.Background(), client.ByName("ed"), client.Algorithm{}, []byte("after")); err != nil {
		t.Fatal(err)
	}
}

// flakyListener fails its first accepts with errno, as accept(2) does when
// the process or the system runs out of a resource, then accepts for real.
type flakyListener struct {
	net.Listener
	errno    syscall.Errno
	failures atomic.Int32
}

func (l *flakyListener) Accept() (net.Conn, error) {
	if l.failures.Add(-1) >= 0 {
		return nil, &net.OpError{Op: "accept", Net: "unix", Err: os.NewSyscallError("accept4", l.errno)}
	}
	return l.Listener.Accept()
}

// A resource shortage at accept (descriptors, the system's file table,
// socket buffers, memory) makes the listener back off, not end Serve and
// with it the agent: once the shortage passes, clients are served.
func TestAcceptShortagesDoNotStopServing(t *testing.T) {
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM} {
		t.Run(errno.Error(), func(t *testing.T) {
			cfg := softwareConfig(t)
			a, err := agent.New(context.Background(), cfg, zaptest.NewLogger(t, zaptest.Level(zap.ErrorLevel)))
			if err != nil {
				t.Fatal(err)
			}
			ln, err := agent.ListenUnix(cfg.Socket)
			if err != nil {
				t.Fatal(err)
			}
			fl := &flakyListener{Listener: ln, errno: errno}
			fl.failures.Store(3)
			done := make(chan error, 1)
			go func() { done <- a.Serve(fl) }()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c, err := client.Dial(ctx, cfg.Socket)
			if err != nil {
				t.Fatalf("dial after %s at accept: %v", errno, err)
			}
			if err := c.Ping(ctx); err != nil {
				t.Fatalf("ping after %s at accept: %v", errno, err)
			}
			c.Close()
			if err := a.Shutdown(ctx); err != nil {
				t.Fatal(err)
			}
			if err := <-done; !errors.Is(err, agent.ErrClosed) {
				t.Fatalf("Serve returned %v, want ErrClosed", err)
			}
		})
	}
}

// The AWS KMS endpoints a config may name: https anywhere, plain http only
// to an emulator on this machine.
func TestAWSKMSEndpoints(t *testing.T) {
	for endpoint, ok := range map[string]bool{
		"https://kms.eu-west-1.amazonaws.com":      true,
		"http://127.0.0.1:4566":                    true,
		"http://localhost:4566/":                   true,
		"http://[::1]:4566":                        true,
		"http://kms.example.com":                   false,
		"http://10.0.0.5:4566":                     false,
		"HTTP://kms.example.com:80":                false, // the SDK lowercases the scheme
		"http://127.0.0.1:1@kms.example.com":       false, // the host is after the userinfo
		"http://127.0.0.1:4566@kms.example.com:80": false,
		"kms.example.com":                          false,
	} {
		_, err := agent.ParseConfig([]byte("providers:\n  - {id: a, type: awskms, region: eu-west-1, endpoint: '" + endpoint + "', keys: [{name: k, key_id: alias/k}]}\n"))
		if (err == nil) != ok {
			t.Errorf("endpoint %s: %v, want accepted %v", endpoint, err, ok)
		}
	}
}

// A scheduled rotation stuck in a provider call that ignores its context
// does not hold Shutdown for good, as a stuck request does not: Shutdown
// gives it a moment, then closes the providers and the journal under it.
func TestShutdownAbandonsAStuckScheduledRotation(t *testing.T) {
	h, _, r, admin := heldAgent(t)
	h.deaf.Store(true)
	h.hold.Store(true)
	if _, err := admin.ScheduleRotation(context.Background(), "payments/release", time.Now().Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-h.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the scheduled rotation did not reach the provider")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- r.agent.Shutdown(ctx) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		h.release()
		<-done
		t.Fatal("Shutdown still waited after 5 s for a scheduled rotation stuck in its provider")
	}
}

// An endpoint refused for its user information is not quoted: that part of
// a URL may be a credential.
func TestRefusedEndpointIsNotQuoted(t *testing.T) {
	for _, endpoint := range []string{"http://key:s3cret@kms.example.com", "ftp://key:s3cret@kms.example.com"} {
		_, err := agent.ParseConfig([]byte("providers:\n  - {id: a, type: awskms, region: eu-west-1, endpoint: '" + endpoint + "', keys: [{name: k, key_id: alias/k}]}\n"))
		if err == nil || strings.Contains(err.Error(), "s3cret") {
			t.Errorf("endpoint with user information: %v", err)
		}
	}
}

// The agent keeps its keys and its journal in directories of its own user:
// one another user made is refused, one left open to others is closed.
func TestDataDirsArePrivate(t *testing.T) {
	giveAway := func(t *testing.T, dir string) {
		t.Helper()
		if os.Getuid() != 0 {
			t.Skip("giving a directory to another uid needs root")
		}
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(dir, 4242, 4242); err != nil {
			t.Fatal(err)
		}
	}
	t.Run("journal dir made 0755 beforehand", func(t *testing.T) {
		cfg := softwareConfig(t)
		cfg.Journal.Dir = filepath.Join(t.TempDir(), "journal")
		if err := os.Mkdir(cfg.Journal.Dir, 0o755); err != nil {
			t.Fatal(err)
		}
		a, err := agent.New(context.Background(), cfg, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer a.Shutdown(context.Background())
		for _, dir := range []string{cfg.DataDir, cfg.Journal.Dir} {
			if st, err := os.Stat(dir); err != nil || st.Mode().Perm() != 0o700 {
				t.Errorf("%s: mode %v (%v), want 0700", dir, st.Mode().Perm(), err)
			}
		}
	})
	for _, which := range []string{"data", "journal"} {
		t.Run(which+" dir of another user", func(t *testing.T) {
			cfg := softwareConfig(t)
			dir := cfg.DataDir
			if which == "journal" {
				cfg.Journal.Dir = filepath.Join(t.TempDir(), "journal")
				dir = cfg.Journal.Dir
			}
			giveAway(t, dir)
			a, err := agent.New(context.Background(), cfg, nil)
			if err == nil {
				a.Shutdown(context.Background())
				t.Fatalf("the agent took %s, another user's directory", dir)
			}
			if !strings.Contains(err.Error(), "belongs to uid 4242") {
				t.Fatalf("New: %v", err)
			}
		})
	}
}

// A crash inside software.WriteKeyFile leaves a temp copy of a private key
// beside the key files, or beside evidence.key in the data dir. The agent
// removes old ones when it starts, and starts as before.
func TestAgentRemovesStaleKeyTemps(t *testing.T) {
	cfg := softwareConfig(t)
	a, err := agent.New(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	a.Shutdown(context.Background())
	old := time.Now().Add(-time.Hour)
	var temps []string
	for _, dir := range []string{cfg.DataDir, filepath.Join(cfg.DataDir, "keys", "soft")} {
		tmp := filepath.Join(dir, ".tmp-key-left")
		if err := os.WriteFile(tmp, []byte("-----BEGIN PRIVATE KEY-----\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(tmp, old, old); err != nil {
			t.Fatal(err)
		}
		temps = append(temps, tmp)
	}
	a, err = agent.New(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Shutdown(context.Background())
	for _, tmp := range temps {
		if _, err := os.Lstat(tmp); !os.IsNotExist(err) {
			t.Errorf("%s kept (%v)", tmp, err)
		}
	}
}

// On the wire a rotation's time 0 means "now": a rotation scheduled for the
// Unix epoch (a zero-ish time from a bug or a typo) must be refused, not
// run at once.
func TestRotationScheduledForTheEpochIsRefused(t *testing.T) {
	_, _, r, admin := heldAgent(t)
	before, err := r.dial(t).PublicKey(context.Background(), client.ByName("release"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = admin.ScheduleRotation(context.Background(), "payments/release", time.Unix(0, 0))
	if client.Code(err) != proto.BadRequest {
		t.Fatalf("ScheduleRotation at the epoch: %v, want BAD_REQUEST", err)
	}
	after, err := r.dial(t).PublicKey(context.Background(), client.ByName("release"))
	if err != nil {
		t.Fatal(err)
	}
	if after.KID != before.KID {
		t.Fatalf("the slot rotated: kid %s, then %s", before.KID, after.KID)
	}
}
