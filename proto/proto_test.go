package proto

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math"
	"reflect"
	"strings"
	"testing"

	"github.com/vmihailenco/msgpack/v5"
)

func TestRequestRoundTrip(t *testing.T) {
	cases := []struct {
		name string
		req  Request
	}{
		{"hello", Request{ID: 1, Op: OpHello, Version: Version, Features: FeaturePipelining}},
		{"ping", Request{ID: 2, Op: OpPing}},
		{"audit tail", Request{ID: 9, Op: OpAuditTail, Key: "payments", FromSeq: 1 << 40, Limit: 500}},
		{"rotate at", Request{ID: 10, Op: OpRotate, Key: "payments/release", At: 1_800_000_000}},
		{"sign by name", Request{ID: 1 << 40, Op: OpSign, Key: "payments/release", Scheme: SchemeECDSA, Hash: HashSHA256, Digest: bytes.Repeat([]byte{0xab}, 32), TimeoutMillis: 1500}},
		{"sign by kid", Request{ID: 3, Op: OpSign, KID: "00112233445566778899aabbccddeeff", Scheme: SchemeEd25519, Digest: []byte("message")}},
		{"verify", Request{ID: 4, Op: OpVerify, Key: "k", Scheme: SchemePSS, Hash: HashSHA384, Digest: make([]byte, 48), Sig: make([]byte, 256)}},
	}
	c := NewCodec()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			frame, err := c.AppendRequestFrame(nil, &tc.req)
			if err != nil {
				t.Fatal(err)
			}
			payload, err := ReadFrame(bufio.NewReader(bytes.NewReader(frame)), nil, DefaultMaxFrame)
			if err != nil {
				t.Fatal(err)
			}
			var got Request
			if err := c.DecodeRequest(payload, &got); err != nil {
				t.Fatal(err)
			}
			normalize(&got.Digest, &got.Sig)
			want := tc.req
			normalize(&want.Digest, &want.Sig)
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("round trip:\n got %+v\nwant %+v", got, want)
			}
		})
	}
}

func normalize(bs ...*[]byte) {
	for _, b := range bs {
		if len(*b) == 0 {
			*b = nil
		}
	}
}

func TestResponseRoundTrip(t *testing.T) {
	cases := []Response{
		{ID: 1, Code: OK, Version: Version, Features: FeaturePipelining},
		{ID: 2, Code: NotFound, Msg: "no such key"},
		{ID: 3, Code: OK, Key: "k", KID: "abc", Sig: []byte{1, 2, 3}, PolicyHash: make([]byte, 32)},
		{ID: 4, Code: OK, Key: "k", KID: "abc", KeyType: "ed25519", Pub: []byte{4, 5}},
		{ID: 5, Code: OK, Valid: true},
		{ID: 6, Code: OK, Keys: []KeyEntry{{Name: "a", KID: "1", Provider: "soft", KeyType: "rsa-2048", Pub: []byte{9}}, {Name: "b", KID: "2", Provider: "hsm", KeyType: "ed25519", Pub: []byte{8}, Cert: []byte{0x30, 1, 2}, Chain: [][]byte{{0x30, 3}, {0x30, 4}}}}},
		{ID: 7, Code: OK, Keys: []KeyEntry{}},
		{ID: 8, Code: OK, Records: [][]byte{[]byte(`{"seq":1}`), []byte(`{"seq":2}`)}},
	}
	c := NewCodec()
	for _, want := range cases {
		frame, err := c.AppendResponseFrame(nil, &want)
		if err != nil {
			t.Fatal(err)
		}
		var got Response
		if err := c.DecodeResponse(frame[FrameHeaderLen:], &got); err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("round trip:\n got %+v\nwant %+v", got, want)
		}
	}
}

// A newer peer may send fields this version does not know: they are skipped.
func TestDecodeSkipsUnknownFields(t *testing.T) {
	raw, err := msgpack.Marshal(map[string]any{
		"id": 9, "op": int(OpSign), "key": "k", "future": map[string]any{"x": []int{1, 2}},
		"a-very-long-unknown-key-name-from-the-future": "v", "dig": []byte{1, 2, 3},
	})
	if err != nil {
		t.Fatal(err)
	}
	var r Request
	if err := NewCodec().DecodeRequest(raw, &r); err != nil {
		t.Fatal(err)
	}
	if r.ID != 9 || r.Op != OpSign || r.Key != "k" || !bytes.Equal(r.Digest, []byte{1, 2, 3}) {
		t.Fatalf("decoded %+v", r)
	}
}

func TestDecodeRejects(t *testing.T) {
	good, _ := NewCodec().AppendRequestFrame(nil, &Request{ID: 1, Op: OpSign, Digest: make([]byte, 32)})
	good = good[FrameHeaderLen:]
	mk := func(v any) []byte { b, _ := msgpack.Marshal(v); return b }
	cases := []struct {
		name    string
		payload []byte
	}{
		{"not a map", mk([]int{1, 2})},
		{"nil", mk(nil)},
		{"truncated", good[:len(good)-5]},
		{"trailing bytes", append(append([]byte{}, good...), 0xc0)},
		{"id wrong type", mk(map[string]any{"id": "one"})},
		{"digest length beyond frame", []byte{0x81, 0xa3, 'd', 'i', 'g', 0xc6, 0x7f, 0xff, 0xff, 0xff}},
		{"key not a string", mk(map[int]int{1: 2})},
	}
	c := NewCodec()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var r Request
			if err := c.DecodeRequest(tc.payload, &r); err == nil {
				t.Fatalf("decoded %x without error: %+v", tc.payload, r)
			}
		})
	}
}

// op and ver are uints on the wire, wider than Op and Version. A number
// past them is read as OpOutOfRange or VersionOutOfRange, which no
// operation or version will ever have, so the agent answers it as any
// op or version it does not know; it must not fail the decode (the agent
// would close the connection) nor wrap around onto a real op or version.
func TestOpAndVersionPastTheirFields(t *testing.T) {
	for _, tc := range []struct {
		wire   int64 // msgpack encodes it in the smallest int family that fits
		op     Op
		unwire uint64 // the same for ver, as uint64
		ver    uint16
	}{
		{wire: 99, op: 99, unwire: 2, ver: 2},
		{wire: 254, op: 254, unwire: 65534, ver: 65534},
		{wire: 255, op: OpOutOfRange, unwire: 65535, ver: VersionOutOfRange},
		{wire: 256, op: OpOutOfRange, unwire: 65536, ver: VersionOutOfRange},
		{wire: 256 + int64(OpSign), op: OpOutOfRange, unwire: 65536 + uint64(Version), ver: VersionOutOfRange},
		{wire: 1 << 32, op: OpOutOfRange, unwire: 1 << 32, ver: VersionOutOfRange},
		{wire: math.MaxInt64, op: OpOutOfRange, unwire: math.MaxUint64, ver: VersionOutOfRange},
		// A negative op is malformed: TestNegativeNumbersInUintFields.
	} {
		raw, err := msgpack.Marshal(map[string]any{"id": 1, "op": tc.wire, "ver": tc.unwire})
		if err != nil {
			t.Fatal(err)
		}
		c := NewCodec()
		var r Request
		if err := c.DecodeRequest(raw, &r); err != nil {
			t.Fatalf("op %d, ver %d: %v", tc.wire, tc.unwire, err)
		}
		if r.Op != tc.op || r.Version != tc.ver {
			t.Fatalf("op %d, ver %d decoded as op %d, ver %d; want %d, %d", tc.wire, tc.unwire, r.Op, r.Version, tc.op, tc.ver)
		}
		frame, err := c.AppendRequestFrame(nil, &r)
		if err != nil {
			t.Fatal(err)
		}
		var again Request
		if err := c.DecodeRequest(frame[FrameHeaderLen:], &again); err != nil || again.Op != r.Op || again.Version != r.Version {
			t.Fatalf("re-encoded: %v, op %d ver %d", err, again.Op, again.Version)
		}
		var resp Response
		raw, _ = msgpack.Marshal(map[string]any{"id": 1, "code": 2, "ver": tc.unwire})
		if err := c.DecodeResponse(raw, &resp); err != nil || resp.Version != tc.ver {
			t.Fatalf("response ver %d: %v, decoded as %d, want %d", tc.unwire, err, resp.Version, tc.ver)
		}
	}
}

// sch, hash, tmo and n are uints on the wire, wider than their fields. A
// number past a field saturates to the field's reserved top value
// (SchemeOutOfRange, HashOutOfRange, TimeoutOutOfRange, LimitOutOfRange),
// which the agent answers as docs/protocol.md says (UNSUPPORTED_ALGORITHM,
// its own limit, at most 100 records, no such pack): it must not fail the
// decode (the agent would close the connection) nor wrap around onto a
// smaller number (sch 257 is not ECDSA, tmo 2^32+1 is not 1 ms).
func TestUintFieldsPastTheirWidths(t *testing.T) {
	for _, tc := range []struct {
		wire      uint64
		sch, hash uint8
		tmo, n    uint32
	}{
		{wire: 4, sch: 4, hash: 4, tmo: 4, n: 4},
		{wire: 254, sch: 254, hash: 254, tmo: 254, n: 254},
		{wire: 255, sch: SchemeOutOfRange, hash: HashOutOfRange, tmo: 255, n: 255},
		{wire: 256 + uint64(SchemeECDSA), sch: SchemeOutOfRange, hash: HashOutOfRange, tmo: 257, n: 257},
		{wire: math.MaxUint32 - 1, sch: SchemeOutOfRange, hash: HashOutOfRange, tmo: math.MaxUint32 - 1, n: math.MaxUint32 - 1},
		{wire: math.MaxUint32, sch: SchemeOutOfRange, hash: HashOutOfRange, tmo: TimeoutOutOfRange, n: LimitOutOfRange},
		{wire: 1<<32 + 1, sch: SchemeOutOfRange, hash: HashOutOfRange, tmo: TimeoutOutOfRange, n: LimitOutOfRange},
		{wire: math.MaxUint64, sch: SchemeOutOfRange, hash: HashOutOfRange, tmo: TimeoutOutOfRange, n: LimitOutOfRange},
	} {
		raw, err := msgpack.Marshal(map[string]any{"id": 1, "op": OpSign, "sch": tc.wire, "hash": tc.wire, "tmo": tc.wire, "n": tc.wire})
		if err != nil {
			t.Fatal(err)
		}
		c := NewCodec()
		var r Request
		if err := c.DecodeRequest(raw, &r); err != nil {
			t.Fatalf("%d: %v", tc.wire, err)
		}
		if r.Scheme != tc.sch || r.Hash != tc.hash || r.TimeoutMillis != tc.tmo || r.Limit != tc.n {
			t.Fatalf("%d decoded as sch %d, hash %d, tmo %d, n %d; want %d, %d, %d, %d",
				tc.wire, r.Scheme, r.Hash, r.TimeoutMillis, r.Limit, tc.sch, tc.hash, tc.tmo, tc.n)
		}
		frame, err := c.AppendRequestFrame(nil, &r)
		if err != nil {
			t.Fatal(err)
		}
		var again Request
		if err := c.DecodeRequest(frame[FrameHeaderLen:], &again); err != nil || again.Scheme != r.Scheme ||
			again.Hash != r.Hash || again.TimeoutMillis != r.TimeoutMillis || again.Limit != r.Limit {
			t.Fatalf("re-encoded: %v, %+v want %+v", err, again, r)
		}
	}
}

// at is an int on the wire, and a client may write it in msgpack's uint
// family, up to 2^64-1. A number from 2^63-1 up reads as AtOutOfRange,
// which the agent refuses as out of range; it must not wrap onto a
// negative number (a time before 1970, refused for the wrong reason), nor
// fail the decode. A negative int is a time before 1970 and stays one.
func TestAtPastItsField(t *testing.T) {
	for _, tc := range []struct {
		name   string
		encode func(*msgpack.Encoder) error
		at     int64
	}{
		{"uint", func(e *msgpack.Encoder) error { return e.EncodeUint(1_800_000_000) }, 1_800_000_000},
		{"uint64 small", func(e *msgpack.Encoder) error { return e.EncodeUint64(1_800_000_000) }, 1_800_000_000},
		{"int", func(e *msgpack.Encoder) error { return e.EncodeInt(1_800_000_000) }, 1_800_000_000},
		{"negative int", func(e *msgpack.Encoder) error { return e.EncodeInt(-5) }, -5},
		{"min int64", func(e *msgpack.Encoder) error { return e.EncodeInt64(math.MinInt64) }, math.MinInt64},
		{"max int64 as int", func(e *msgpack.Encoder) error { return e.EncodeInt64(math.MaxInt64) }, AtOutOfRange},
		{"max int64 as uint", func(e *msgpack.Encoder) error { return e.EncodeUint64(math.MaxInt64) }, AtOutOfRange},
		{"2^63", func(e *msgpack.Encoder) error { return e.EncodeUint64(1 << 63) }, AtOutOfRange},
		{"2^63 + a time", func(e *msgpack.Encoder) error { return e.EncodeUint64(1<<63 + 1_800_000_000) }, AtOutOfRange},
		{"2^64-1", func(e *msgpack.Encoder) error { return e.EncodeUint64(math.MaxUint64) }, AtOutOfRange},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			e := msgpack.NewEncoder(&buf)
			for _, err := range []error{e.EncodeMapLen(3), e.EncodeString("id"), e.EncodeUint(1),
				e.EncodeString("op"), e.EncodeUint(uint64(OpRotate)), e.EncodeString("at"), tc.encode(e)} {
				if err != nil {
					t.Fatal(err)
				}
			}
			c := NewCodec()
			var r Request
			if err := c.DecodeRequest(buf.Bytes(), &r); err != nil {
				t.Fatalf("decode: %v", err)
			}
			if r.At != tc.at {
				t.Fatalf("at decoded as %d, want %d", r.At, tc.at)
			}
			frame, err := c.AppendRequestFrame(nil, &r)
			if err != nil {
				t.Fatal(err)
			}
			var again Request
			if err := c.DecodeRequest(frame[FrameHeaderLen:], &again); err != nil || again.At != r.At {
				t.Fatalf("re-encoded: %v, at %d, want %d", err, again.At, r.At)
			}
		})
	}
}

// code is a uint on the wire, wider than Code. A code past it (a newer
// agent's, however large) reads as CodeOutOfRange: an error like any code
// this version does not know, never a wrap onto OK (65536) or a known
// code (65546 is not PAUSED), nor a decode failure, which would close the
// client's connection.
func TestCodePastItsField(t *testing.T) {
	for _, tc := range []struct {
		wire uint64
		code Code
		name string
	}{
		{18, 18, "CODE_18"},
		{0xfffe, 0xfffe, "CODE_65534"},
		{0xffff, CodeOutOfRange, "CODE_65535+"},
		{0x10000, CodeOutOfRange, "CODE_65535+"},
		{0x10000 + uint64(Paused), CodeOutOfRange, "CODE_65535+"},
		{math.MaxUint64, CodeOutOfRange, "CODE_65535+"},
	} {
		raw, err := msgpack.Marshal(map[string]any{"id": 1, "code": tc.wire, "msg": "m"})
		if err != nil {
			t.Fatal(err)
		}
		var r Response
		if err := NewCodec().DecodeResponse(raw, &r); err != nil || r.Code != tc.code {
			t.Fatalf("code %d: %v, decoded as %d, want %d", tc.wire, err, r.Code, tc.code)
		}
		if err := r.Err(); err == nil || err.Error() != tc.name+": m" {
			t.Fatalf("code %d: Err() %v, want %q", tc.wire, err, tc.name+": m")
		}
	}
}

// A uint field holds no negative number. msgpack's own DecodeUint64 reads
// an int as its two's complement (id -1 became 2^64-1, sch -1 the
// saturated 255), so a negative number is refused as malformed, in every
// uint field of either direction; a number of the int family that is not
// negative is still read, as some encoders write small numbers so.
func TestNegativeNumbersInUintFields(t *testing.T) {
	fix := func(k string) []byte { return append([]byte{0xa0 | byte(len(k))}, k...) }
	negative := map[string][]byte{
		"fixint -1":   {0xff},
		"fixint -32":  {0xe0},
		"int8 -1":     {0xd0, 0xff},
		"int16 -1":    {0xd1, 0xff, 0xff},
		"int32 -2^31": {0xd2, 0x80, 0, 0, 0},
		"int64 -1":    {0xd3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff},
		"int64 -2^63": {0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0},
	}
	positive := map[string][]byte{ // all 5
		"int8":  {0xd0, 5},
		"int16": {0xd1, 0, 5},
		"int32": {0xd2, 0, 0, 0, 5},
		"int64": {0xd3, 0, 0, 0, 0, 0, 0, 0, 5},
	}
	c := NewCodec()
	for _, key := range requestKeys {
		var r Request
		field := map[string]func() uint64{
			kID: func() uint64 { return r.ID }, kOp: func() uint64 { return uint64(r.Op) },
			kVersion: func() uint64 { return uint64(r.Version) }, kFeatures: func() uint64 { return r.Features },
			kScheme: func() uint64 { return uint64(r.Scheme) }, kHash: func() uint64 { return uint64(r.Hash) },
			kTimeout: func() uint64 { return uint64(r.TimeoutMillis) }, kFromSeq: func() uint64 { return r.FromSeq },
			kLimit: func() uint64 { return uint64(r.Limit) },
		}[key]
		if field == nil {
			continue // not a uint
		}
		for name, v := range negative {
			r = Request{}
			if err := c.DecodeRequest(payload([]byte{0x81}, fix(key), v), &r); err == nil || !strings.Contains(err.Error(), key) {
				t.Errorf("request %s %s: %v, %+v; want an error naming the field", key, name, err, r)
			}
		}
		for name, v := range positive {
			r = Request{}
			if err := c.DecodeRequest(payload([]byte{0x81}, fix(key), v), &r); err != nil || field() != 5 {
				t.Errorf("request %s %s 5: %v, read %d", key, name, err, field())
			}
		}
	}
	for _, key := range responseKeys {
		var r Response
		field := map[string]func() uint64{
			kID: func() uint64 { return r.ID }, kCode: func() uint64 { return uint64(r.Code) },
			kVersion: func() uint64 { return uint64(r.Version) }, kFeatures: func() uint64 { return r.Features },
		}[key]
		if field == nil {
			continue
		}
		for name, v := range negative {
			r = Response{}
			if err := c.DecodeResponse(payload([]byte{0x81}, fix(key), v), &r); err == nil || !strings.Contains(err.Error(), key) {
				t.Errorf("response %s %s: %v, %+v; want an error naming the field", key, name, err, r)
			}
		}
		for name, v := range positive {
			r = Response{}
			if err := c.DecodeResponse(payload([]byte{0x81}, fix(key), v), &r); err != nil || field() != 5 {
				t.Errorf("response %s %s 5: %v, read %d", key, name, err, field())
			}
		}
	}
}

func TestReadFrame(t *testing.T) {
	frame := func(n uint32, body []byte) []byte {
		return append(binary.BigEndian.AppendUint32(nil, n), body...)
	}
	cases := []struct {
		name    string
		in      []byte
		max     int
		want    []byte
		wantErr error
	}{
		{"ok", frame(3, []byte("abc")), 16, []byte("abc"), nil},
		{"at limit", frame(4, []byte("abcd")), 4, []byte("abcd"), nil},
		{"over limit", frame(5, []byte("abcde")), 4, nil, ErrFrameTooLarge},
		{"huge announced length", frame(0xffffffff, nil), DefaultMaxFrame, nil, ErrFrameTooLarge},
		{"empty", frame(0, nil), 16, nil, ErrEmptyFrame},
		{"short body", frame(5, []byte("ab")), 16, nil, io.ErrUnexpectedEOF},
		{"short header", []byte{0, 0}, 16, nil, io.ErrUnexpectedEOF},
		{"eof", nil, 16, nil, io.EOF},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ReadFrame(bufio.NewReader(bytes.NewReader(tc.in)), nil, tc.max)
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if !bytes.Equal(got, tc.want) {
				t.Fatalf("payload %q, want %q", got, tc.want)
			}
		})
	}
}

func TestCodes(t *testing.T) {
	seen := map[string]bool{}
	for _, c := range Codes() {
		name := c.String()
		if seen[name] {
			t.Fatalf("duplicate name %s", name)
		}
		seen[name] = true
		back, ok := ParseCode(name)
		if !ok || back != c {
			t.Fatalf("ParseCode(%s) = %d, %v", name, back, ok)
		}
	}
	if len(seen) != 18 {
		t.Fatalf("%d codes, DESIGN.md names 18", len(seen))
	}
	if got := Code(999).String(); got != "CODE_999" {
		t.Fatalf("unknown code prints %q", got)
	}
	err := error(&Error{Code: Paused, Msg: "slot paused"})
	if !errors.Is(err, &Error{Code: Paused}) || errors.Is(err, &Error{Code: OK}) {
		t.Fatal("errors.Is on code")
	}
}

func BenchmarkRequestRoundTrip(b *testing.B) {
	c := NewCodec()
	req := Request{ID: 42, Op: OpSign, Key: "payments/release", Scheme: SchemeECDSA, Hash: HashSHA256, Digest: make([]byte, 32), TimeoutMillis: 5000}
	var buf []byte
	var got Request
	b.ReportAllocs()
	for b.Loop() {
		buf, _ = c.AppendRequestFrame(buf[:0], &req)
		got.Reset()
		if err := c.DecodeRequest(buf[FrameHeaderLen:], &got); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkResponseRoundTrip(b *testing.B) {
	c := NewCodec()
	resp := Response{ID: 42, Code: OK, Key: "payments/release", KID: "00112233445566778899aabbccddeeff", Sig: make([]byte, 72)}
	var buf []byte
	var got Response
	b.ReportAllocs()
	for b.Loop() {
		buf, _ = c.AppendResponseFrame(buf[:0], &resp)
		if err := c.DecodeResponse(buf[FrameHeaderLen:], &got); err != nil {
			b.Fatal(err)
		}
	}
}

// Values a well-behaved encoder never writes, each read as
// docs/protocol.md says: a non-negative number of the int family is the
// uint; a float is no uint; nil is an absent value; a key that is not
// UTF-8 is an unknown key, skipped with its value, whatever msgpack type
// (ext included) that value has; an ext is no string.
func TestDecodeEdgeCases(t *testing.T) {
	id := []byte{0xa2, 'i', 'd'}
	for _, tc := range []struct {
		name    string
		payload []byte
		wantErr bool
		check   func(r *Request) bool
	}{
		{"id as an int8", payload([]byte{0x81}, id, []byte{0xd0, 0x05}), false, func(r *Request) bool { return r.ID == 5 }},
		{"id as an int64", payload([]byte{0x81}, id, []byte{0xd3, 0, 0, 0, 0, 0, 0, 0, 0x05}), false, func(r *Request) bool { return r.ID == 5 }},
		{"id as a float64", payload([]byte{0x81}, id, []byte{0xcb, 0x40, 0x14, 0, 0, 0, 0, 0, 0}), true, nil},
		{"id as a float32", payload([]byte{0x81}, id, []byte{0xca, 0x40, 0xa0, 0, 0}), true, nil},
		{"at as a float64", payload([]byte{0x82}, id, []byte{0x05, 0xa2, 'a', 't', 0xcb, 0x40, 0x14, 0, 0, 0, 0, 0, 0}), true, nil},
		{"key nil", payload([]byte{0x82}, id, []byte{0x05, 0xa3, 'k', 'e', 'y', 0xc0}), false, func(r *Request) bool { return r.ID == 5 && r.Key == "" }},
		{"key as an ext", payload([]byte{0x82}, id, []byte{0x05, 0xa3, 'k', 'e', 'y', 0xd4, 0x01, 'k'}), true, nil},
		{"key that is not UTF-8, skipped", payload([]byte{0x82}, id, []byte{0x05, 0xa3, 0xff, 0xfe, 0xfd, 0xa1, 'v'}), false, func(r *Request) bool { return r.ID == 5 }},
		{"key that is not UTF-8 beside a known one", payload([]byte{0x82}, id, []byte{0x05, 0xa3, 'k', 0xff, 'y', 0xa1, 'v'}), false, func(r *Request) bool { return r.Key == "" }},
		{"unknown field, fixext1", payload([]byte{0x82}, id, []byte{0x05, 0xa2, 'z', 'z', 0xd4, 0x01, 0x00}), false, func(r *Request) bool { return r.ID == 5 }},
		{"unknown field, timestamp ext", payload([]byte{0x82}, id, []byte{0x05, 0xa2, 'z', 'z', 0xd6, 0xff, 0, 0, 0, 1}), false, func(r *Request) bool { return r.ID == 5 }},
		{"unknown field, ext8 of 3", payload([]byte{0x82}, id, []byte{0x05, 0xa2, 'z', 'z', 0xc7, 0x03, 0x02, 'a', 'b', 'c'}), false, func(r *Request) bool { return r.ID == 5 }},
		{"unknown field, a float", payload([]byte{0x82}, id, []byte{0x05, 0xa2, 'z', 'z', 0xca, 0, 0, 0, 0}), false, func(r *Request) bool { return r.ID == 5 }},
		{"an int key", payload([]byte{0x82}, id, []byte{0x05, 0x01, 0x02}), true, nil},
		{"a nil key", payload([]byte{0x82}, id, []byte{0x05, 0xc0, 0x02}), true, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var r Request
			err := NewCodec().DecodeRequest(tc.payload, &r)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("decoded: %+v", r)
				}
				return
			}
			if err != nil || !tc.check(&r) {
				t.Fatalf("decoded %+v, %v", r, err)
			}
		})
	}
}

// A known field given twice is refused, whichever it is: the request the
// agent acts on must not depend on which of the two a reader keeps. The
// error names the field and nothing of its values.
func TestRequestFieldGivenTwiceIsRefused(t *testing.T) {
	valueOf := func(e *msgpack.Encoder, key string, n int) error {
		switch key {
		case kKey, kKID:
			return e.EncodeString(strings.Repeat("k", n))
		case kDigest, kSig:
			return e.EncodeBytes(bytes.Repeat([]byte{0xd1}, n))
		case kAt:
			return e.EncodeInt(int64(n))
		}
		return e.EncodeUint(uint64(n))
	}
	for _, key := range requestKeys {
		t.Run(key, func(t *testing.T) {
			var b bytes.Buffer
			e := msgpack.NewEncoder(&b)
			e.EncodeMapLen(3)
			e.EncodeString(kID)
			e.EncodeUint(7)
			if key == kID {
				e.EncodeString("zz") // an unknown field in place of the id
				e.EncodeUint(0)
			}
			for n := 1; n <= 2 && b.Len() > 0; n++ {
				e.EncodeString(key)
				if err := valueOf(e, key, n); err != nil {
					t.Fatal(err)
				}
			}
			if key == kID {
				// id, zz, id, id: four entries
				raw := b.Bytes()
				raw[0] = 0x84
			}
			var r Request
			err := NewCodec().DecodeRequest(b.Bytes(), &r)
			if err == nil || !strings.Contains(err.Error(), `field "`+key+`": given twice`) {
				t.Fatalf("request with %q twice: %v; want it refused as given twice", key, err)
			}
		})
	}
	// Unknown fields stay free to repeat: they are skipped, not acted on.
	var b bytes.Buffer
	e := msgpack.NewEncoder(&b)
	e.EncodeMapLen(3)
	e.EncodeString(kID)
	e.EncodeUint(7)
	for range 2 {
		e.EncodeString("zz")
		e.EncodeUint(1)
	}
	var r Request
	if err := NewCodec().DecodeRequest(b.Bytes(), &r); err != nil || r.ID != 7 {
		t.Fatalf("an unknown field twice: id %d, %v; want it skipped", r.ID, err)
	}
}
