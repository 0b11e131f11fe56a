package pkcs11module

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/sigil-agent/sigil/proto"
)

// goResponse encodes r with package proto and returns the payload.
func goResponse(t testing.TB, r *proto.Response) []byte {
	t.Helper()
	frame, err := proto.NewCodec().AppendResponseFrame(nil, r)
	if err != nil {
		t.Fatal(err)
	}
	return frame[proto.FrameHeaderLen:]
}

func sameResponse(t testing.TB, want *proto.Response, got *wireResponse) {
	t.Helper()
	if got.ID != want.ID || got.Code != uint32(want.Code) || got.Version != want.Version ||
		got.Msg != want.Msg || got.Key != want.Key || got.KID != want.KID || got.KeyType != want.KeyType ||
		!bytes.Equal(got.Pub, want.Pub) || !bytes.Equal(got.Sig, want.Sig) || got.HasKeys != (want.Keys != nil) {
		t.Fatalf("C decoder read %+v, Go wrote %+v", got, want)
	}
	if len(got.Keys) != len(want.Keys) {
		t.Fatalf("C decoder read %d keys, Go wrote %d", len(got.Keys), len(want.Keys))
	}
	for i, k := range want.Keys {
		g := got.Keys[i]
		if g.Name != k.Name || g.KID != k.KID || g.Provider != k.Provider || g.KeyType != k.KeyType || !bytes.Equal(g.Pub, k.Pub) || !bytes.Equal(g.Cert, k.Cert) {
			t.Fatalf("key %d: C read %+v, Go wrote %+v", i, g, k)
		}
	}
}

// Every reply shape the agent sends, written by package proto, reads back
// the same through the C decoder.
func TestWireDecodesAgentReplies(t *testing.T) {
	long := bytes.Repeat([]byte{0xab}, 70000) // bin32 inside the map
	cases := []proto.Response{
		{ID: 1, Code: proto.OK, Version: 1, Features: 1},
		{ID: 1<<64 - 1, Code: proto.Paused, Msg: "the key slot is paused"},
		{ID: 300, Code: proto.OK, Key: "release", KID: "00112233445566778899aabbccddeeff", Sig: []byte{0x30, 0x44, 1, 2}, PolicyHash: make([]byte, 32)},
		{ID: 70000, Code: proto.OK, KeyType: "ed25519", Pub: long[:300], Valid: true},
		{ID: 5, Code: proto.OK, Keys: []proto.KeyEntry{}},
		{ID: 6, Code: proto.OK, Keys: []proto.KeyEntry{
			{Name: "p256", KID: "a", Provider: "soft", KeyType: "ecdsa-p256", Pub: []byte{1, 2, 3}},
			{Name: "rsa", KID: "b", Provider: "hsm", KeyType: "rsa-4096", Pub: long[:600], Cert: long[:900], Chain: [][]byte{long[:50], {}}},
		}},
		{ID: 7, Code: proto.OK, Records: [][]byte{[]byte(`{"seq":1}`), long[:5]}},
		{ID: 8, Code: proto.OK, Sig: long},
	}
	for i := range cases {
		got, err := decodeResponse(goResponse(t, &cases[i]))
		if err != nil {
			t.Fatalf("case %d: %v", i, err)
		}
		sameResponse(t, &cases[i], got)
	}
}

func TestWireRejectsMalformed(t *testing.T) {
	good := goResponse(t, &proto.Response{ID: 9, Code: proto.OK, Sig: []byte{1, 2, 3}})
	cases := map[string][]byte{
		"empty":          {},
		"truncated":      good[:len(good)-1],
		"trailing":       append(append([]byte{}, good...), 0xc0),
		"not a map":      {0x91, 0x01},
		"negative id":    {0x81, 0xa2, 'i', 'd', 0xff},
		"sig wrong type": {0x81, 0xa3, 's', 'i', 'g', 0x01},
		"bin past end":   {0x81, 0xa3, 's', 'i', 'g', 0xc6, 0xff, 0xff, 0xff, 0xff, 0x00},
		"map count lies": {0xdf, 0xff, 0xff, 0xff, 0xff, 0xa2, 'i', 'd', 0x01},
		"reserved c1":    {0x81, 0xa1, 'x', 0xc1},
		"deep nesting":   append(append([]byte{0x81, 0xa1, 'x'}, bytes.Repeat([]byte{0x91}, 100)...), 0x01),
	}
	for name, b := range cases {
		if _, err := decodeResponse(b); err == nil {
			t.Errorf("%s: accepted % x", name, b)
		}
	}
}

// A reply code or version past 16 bits reads as 0xffff, one no agent
// uses, as the Go client reads it: never wrapped onto a real one (65536
// would be OK), and not a malformed reply that costs the connection.
func TestWireSaturatesCodeAndVersion(t *testing.T) {
	for name, b := range map[string][]byte{
		"code 65536": {0x81, 0xa4, 'c', 'o', 'd', 'e', 0xce, 0, 1, 0, 0},
		"code 2^32":  {0x81, 0xa4, 'c', 'o', 'd', 'e', 0xcf, 0, 0, 0, 1, 0, 0, 0, 0},
		"ver 65536":  {0x81, 0xa3, 'v', 'e', 'r', 0xce, 0, 1, 0, 0},
	} {
		r, err := decodeResponse(b)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if r.Code != 0 && r.Code != 0xffff || r.Version != 0 && r.Version != 0xffff || r.Code == 0 && r.Version == 0 {
			t.Fatalf("%s: code %d, version %d; want 0xffff", name, r.Code, r.Version)
		}
	}
}

// Requests the C encoder writes decode in package proto to what was asked.
func TestWireEncodesRequests(t *testing.T) {
	cases := []wireRequest{
		{ID: 1, Op: uint8(proto.OpHello), Version: 1},
		{ID: 2, Op: uint8(proto.OpListKeys), TimeoutMs: 10000},
		{ID: 1 << 40, Op: uint8(proto.OpSign), Key: "p256", KID: "00112233445566778899aabbccddeeff", Scheme: 1, Hash: 1, Digest: bytes.Repeat([]byte{7}, 32), TimeoutMs: 1},
		{ID: 3, Op: uint8(proto.OpSign), Key: string(bytes.Repeat([]byte{'k'}, 300)), Scheme: 4, Digest: bytes.Repeat([]byte{1}, 60000)},
	}
	for _, q := range cases {
		checkRequest(t, q)
	}
	if encodeRequest(wireRequest{ID: 1, Op: 5, Digest: make([]byte, proto.DefaultMaxFrame)}) != nil {
		t.Fatal("encoded a request over the frame limit")
	}
}

func checkRequest(t testing.TB, q wireRequest) {
	t.Helper()
	frame := encodeRequest(q)
	if frame == nil {
		return // over the frame limit: refused, as it must be
	}
	if n := binary.BigEndian.Uint32(frame); int(n) != len(frame)-4 || n > proto.DefaultMaxFrame {
		t.Fatalf("length prefix %d for a %d-byte payload", n, len(frame)-4)
	}
	var r proto.Request
	if err := proto.NewCodec().DecodeRequest(frame[4:], &r); err != nil {
		t.Fatalf("proto cannot decode the C request %+v: %v", q, err)
	}
	if r.ID != q.ID || uint8(r.Op) != q.Op || r.Version != q.Version || r.Features != q.Features || r.Key != q.Key ||
		r.KID != q.KID || r.Scheme != q.Scheme || r.Hash != q.Hash || !bytes.Equal(r.Digest, q.Digest) || r.TimeoutMillis != q.TimeoutMs {
		t.Fatalf("C wrote %+v, proto read %+v", q, r)
	}
}

// Random bytes: the C decoder never reads past its input (the guard page
// turns that into a crash) and, where package proto also accepts the
// payload, both read the same fields.
func FuzzWireDecodeResponse(f *testing.F) {
	f.Add(goResponse(f, &proto.Response{ID: 1, Code: proto.OK, Version: 1}))
	f.Add(goResponse(f, &proto.Response{ID: 2, Code: proto.OK, Sig: []byte{0x30, 1, 2}, KID: "k"}))
	f.Add(goResponse(f, &proto.Response{ID: 3, Code: proto.OK, Keys: []proto.KeyEntry{{Name: "a", KID: "b", Provider: "c", KeyType: "ed25519", Pub: []byte{1}}}}))
	f.Add(goResponse(f, &proto.Response{ID: 5, Code: proto.OK, Keys: []proto.KeyEntry{{Name: "a", KID: "b", Provider: "c", KeyType: "ecdsa-p256", Pub: []byte{1}, Cert: []byte{0x30, 0}}}}))
	f.Add(goResponse(f, &proto.Response{ID: 4, Code: proto.RateLimited, Msg: "later", Records: [][]byte{{1}}}))
	f.Add([]byte{0x82, 0xa1, 'x', 0xd8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xa2, 'i', 'd', 1})
	f.Fuzz(func(t *testing.T, payload []byte) {
		got, err := decodeResponse(payload)
		if err != nil {
			return
		}
		var want proto.Response
		if proto.NewCodec().DecodeResponse(payload, &want) != nil {
			return
		}
		if got.ID != want.ID || got.Code != uint32(want.Code) || !bytes.Equal(got.Sig, want.Sig) ||
			got.KID != want.KID || got.Msg != want.Msg || len(got.Keys) != len(want.Keys) {
			t.Fatalf("C read %+v, proto read %+v", got, want)
		}
	})
}

// Replies written by package proto from arbitrary fields always decode in C
// to the same fields.
func FuzzWireResponseRoundTrip(f *testing.F) {
	f.Add(uint64(1), uint16(0), "", []byte{}, "", "", []byte{}, 0)
	f.Add(uint64(1<<63), uint16(17), "msg", []byte{1, 2}, "name", "kid", []byte{3}, 3)
	f.Fuzz(func(t *testing.T, id uint64, code uint16, msg string, sig []byte, name, kid string, pub []byte, nkeys int) {
		r := proto.Response{ID: id, Code: proto.Code(code), Msg: msg, Sig: sig, KID: kid}
		if nkeys = nkeys % 8; nkeys > 0 {
			for i := 0; i < nkeys; i++ {
				k := proto.KeyEntry{Name: name, KID: kid, Provider: msg, KeyType: "x", Pub: pub}
				if i%2 == 1 {
					k.Cert = sig // some keys with a certificate, some without
					k.Chain = [][]byte{pub, sig}
				}
				if i == 3 {
					k.Chain = [][]byte{pub, sig, pub, sig, pub, sig} // more than the module keeps
				}
				r.Keys = append(r.Keys, k)
			}
		}
		frame, err := proto.NewCodec().AppendResponseFrame(nil, &r)
		if err != nil || len(frame)-proto.FrameHeaderLen > proto.DefaultMaxFrame {
			return
		}
		got, err := decodeResponse(frame[proto.FrameHeaderLen:])
		if err != nil {
			t.Fatalf("C refused a reply proto wrote: %v", err)
		}
		// proto omits empty fields, so compare what was sent.
		want := r
		if len(want.Sig) == 0 {
			want.Sig = nil
		}
		if !bytes.Equal(got.Sig, want.Sig) && !(len(got.Sig) == 0 && len(want.Sig) == 0) {
			t.Fatalf("sig: C %x, Go %x", got.Sig, want.Sig)
		}
		if got.ID != r.ID || got.Code != uint32(r.Code) || got.Msg != r.Msg || got.KID != r.KID || len(got.Keys) != len(r.Keys) {
			t.Fatalf("C read %+v, Go wrote %+v", got, r)
		}
		for i := range r.Keys {
			if got.Keys[i].Name != name || got.Keys[i].KID != kid || !bytes.Equal(got.Keys[i].Pub, pub) && len(pub) > 0 ||
				!bytes.Equal(got.Keys[i].Cert, r.Keys[i].Cert) {
				t.Fatalf("key %d: C read %+v", i, got.Keys[i])
			}
			want := r.Keys[i].Chain
			if len(want) > maxChain {
				want = want[:maxChain]
			}
			if len(got.Keys[i].Chain) != len(want) {
				t.Fatalf("key %d: C read %d intermediates, want %d", i, len(got.Keys[i].Chain), len(want))
			}
			for j := range want {
				if !bytes.Equal(got.Keys[i].Chain[j], want[j]) && len(want[j]) > 0 {
					t.Fatalf("key %d: intermediate %d differs", i, j)
				}
			}
		}
	})
}

// Requests the C encoder writes from arbitrary fields decode in proto.
func FuzzWireEncodeRequest(f *testing.F) {
	f.Add(uint64(1), uint8(5), "p256", "kid", uint8(1), uint8(1), []byte{1, 2, 3}, uint32(5000))
	f.Add(uint64(0), uint8(0), "", "", uint8(0), uint8(0), []byte{}, uint32(0))
	f.Fuzz(func(t *testing.T, id uint64, op uint8, key, kid string, sch, hash uint8, dig []byte, tmo uint32) {
		checkRequest(t, wireRequest{ID: id, Op: op, Key: key, KID: kid, Scheme: sch, Hash: hash, Digest: dig, TimeoutMs: tmo})
	})
}

// A field a key entry carries twice is read as package proto reads it: the
// last occurrence, whole. The module keeps intermediates by position, so a
// shorter second chain must not keep the first's tail.
func TestWireDuplicateKeyEntryFieldsAsProtoReadsThem(t *testing.T) {
	a, b, c := []byte{0x30, 1}, []byte{0x30, 2}, []byte{0x30, 3}
	entry := func(fields func(mp) mp, n uint32) []byte {
		// Every entry carries its pub: proto refuses one without.
		m := mp{}.mapN(1).str("keys").arr(1).mapN(n + 3).str("name").str("k").str("kid").str("00").str("pub").bin([]byte{0x30, 9})
		return fields(m)
	}
	chain := func(m mp, certs ...[]byte) mp {
		m = m.str("chain").arr(uint32(len(certs)))
		for _, x := range certs {
			m = m.bin(x)
		}
		return m
	}
	cases := map[string][]byte{
		"long chain then short": entry(func(m mp) mp { return chain(chain(m, a, b, c), b) }, 2),
		"chain then empty":      entry(func(m mp) mp { return chain(chain(m, a, b)) }, 2),
		"chain then nil":        entry(func(m mp) mp { return chain(m, a, b).str("chain").raw(0xc0) }, 2),
		"short chain then long": entry(func(m mp) mp { return chain(chain(m, c), a, b) }, 2),
		"cert twice":            entry(func(m mp) mp { return m.str("cert").bin(a).str("cert").bin(b) }, 2),
	}
	for name, payload := range cases {
		var want proto.Response
		if err := proto.NewCodec().DecodeResponse(payload, &want); err != nil {
			t.Fatalf("%s: proto refused it: %v", name, err)
		}
		got, err := decodeResponse(payload)
		if err != nil {
			t.Fatalf("%s: C refused what proto read: %v", name, err)
		}
		sameResponse(t, &want, got)
		wc, gc := want.Keys[0].Chain, got.Keys[0].Chain
		if len(gc) != len(wc) {
			t.Errorf("%s: C read %d intermediates, proto %d", name, len(gc), len(wc))
			continue
		}
		for i := range wc {
			if !bytes.Equal(gc[i], wc[i]) {
				t.Errorf("%s: intermediate %d: C % x, proto % x", name, i, gc[i], wc[i])
			}
		}
	}
}
