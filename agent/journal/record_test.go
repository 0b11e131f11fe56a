package journal

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"
)

// goldenRecord's encoding and hash are fixed by the format. If this test
// fails, the record format changed: that needs a new format version, not a
// new golden value, or every existing journal stops verifying.
func goldenRecord() Record {
	r := Record{
		Seq:           42,
		Time:          time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC),
		Tenant:        "acme",
		Slot:          "acme/release",
		Version:       2,
		KID:           "0123456789abcdef0123456789abcdef",
		Op:            "sign",
		Algorithm:     "ED25519",
		Code:          11,
		CodeName:      "PAUSED",
		LatencyMicros: 95,
		Peer:          "spiffe://example.org/ci",
		Detail:        "",
	}
	for i := range r.DigestHash {
		r.DigestHash[i] = byte(i)
		r.PolicyHash[i] = byte(0xff - i)
		r.PrevHash[i] = 0xaa
	}
	return r
}

func TestRecordGolden(t *testing.T) {
	r := goldenRecord()
	enc := r.encode()
	// Cross-checked with an independent encoder written from the layout in
	// record.go (Python struct.pack) and the b3sum tool.
	const wantHash = "3c040dde482bed2fbe47ef4efcb9a5f485024f44d70a3dfac34fac84f974b5cc"
	if got := hex.EncodeToString(r.Hash[:]); got != wantHash {
		t.Fatalf("hash of the golden record = %s, want %s\nencoding %x", got, wantHash, enc)
	}
}

func TestRecordRoundTrip(t *testing.T) {
	cases := map[string]func(*Record){
		"golden":       func(*Record) {},
		"empty fields": func(r *Record) { *r = Record{Seq: 1, Time: time.Unix(0, 0)} },
		"long detail":  func(r *Record) { r.Detail = strings.Repeat("x", maxStringLen) },
		"unicode":      func(r *Record) { r.Peer = "CN=Zoë Ünïcode, O=例え" },
		"before 1970":  func(r *Record) { r.Time = time.Date(1960, 5, 1, 0, 0, 0, 0, time.UTC) },
	}
	for name, modify := range cases {
		t.Run(name, func(t *testing.T) {
			r := goldenRecord()
			modify(&r)
			enc := r.encode()
			var got Record
			if err := decodeRecord(enc, &got); err != nil {
				t.Fatal(err)
			}
			if !got.Time.Equal(r.Time) {
				t.Fatalf("time %v, want %v", got.Time, r.Time)
			}
			got.Time = r.Time
			if got != r {
				t.Fatalf("round trip:\n got %+v\nwant %+v", got, r)
			}
			if computedHash(enc) != r.Hash {
				t.Fatal("stored hash is not the hash of the bytes")
			}
		})
	}
}

// Every field is covered by the hash: changing any one changes it.
func TestHashCoversEveryField(t *testing.T) {
	base := goldenRecord()
	base.encode()
	mods := map[string]func(*Record){
		"Seq":           func(r *Record) { r.Seq++ },
		"Time":          func(r *Record) { r.Time = r.Time.Add(time.Nanosecond) },
		"Tenant":        func(r *Record) { r.Tenant += "x" },
		"Slot":          func(r *Record) { r.Slot += "x" },
		"Version":       func(r *Record) { r.Version++ },
		"KID":           func(r *Record) { r.KID += "x" },
		"Op":            func(r *Record) { r.Op += "x" },
		"Algorithm":     func(r *Record) { r.Algorithm += "x" },
		"DigestHash":    func(r *Record) { r.DigestHash[31] ^= 1 },
		"PolicyHash":    func(r *Record) { r.PolicyHash[0] ^= 1 },
		"Code":          func(r *Record) { r.Code++ },
		"CodeName":      func(r *Record) { r.CodeName += "x" },
		"LatencyMicros": func(r *Record) { r.LatencyMicros++ },
		"Peer":          func(r *Record) { r.Peer += "x" },
		"Detail":        func(r *Record) { r.Detail += "x" },
		"PrevHash":      func(r *Record) { r.PrevHash[5] ^= 1 },
		// Moving bytes between adjacent strings must change the hash too:
		// the length prefixes make the encoding unambiguous.
		"Tenant/Slot boundary": func(r *Record) { r.Tenant, r.Slot = r.Tenant+"a", r.Slot[1:] },
	}
	for name, modify := range mods {
		r := goldenRecord()
		modify(&r)
		r.encode()
		if r.Hash == base.Hash {
			t.Errorf("changing %s does not change the hash", name)
		}
	}
}

func TestDecodeRejectsMalformed(t *testing.T) {
	r := goldenRecord()
	good := r.encode()
	cases := map[string][]byte{
		"empty":          nil,
		"short":          good[:minRecordEncoded-1],
		"bad version":    append([]byte{2}, good[1:]...),
		"trailing bytes": append(append(append([]byte(nil), good[:len(good)-32]...), 0), good[len(good)-32:]...),
		"truncated":      append(append([]byte(nil), good[:len(good)-40]...), good[len(good)-32:]...),
	}
	for name, b := range cases {
		var got Record
		if err := decodeRecord(b, &got); err == nil {
			t.Errorf("%s: decoded without error", name)
		}
	}
}

func TestValidateRejectsUnencodable(t *testing.T) {
	cases := map[string]func(*Record){
		"64 KiB detail": func(r *Record) { r.Detail = strings.Repeat("x", maxStringLen+1) },
		"64 KiB peer":   func(r *Record) { r.Peer = strings.Repeat("x", maxStringLen+1) },
		"year 1600":     func(r *Record) { r.Time = time.Date(1600, 1, 1, 0, 0, 0, 0, time.UTC) },
		"year 2300":     func(r *Record) { r.Time = time.Date(2300, 1, 1, 0, 0, 0, 0, time.UTC) },
	}
	for name, modify := range cases {
		r := goldenRecord()
		modify(&r)
		if err := r.validate(); err == nil {
			t.Errorf("validate accepted a record with a %s", name)
		}
	}
}

// fromExport rebuilds a record from its JSON export line, as a verifier
// off the host would: the fields' text, the hashes from hex.
func fromExport(t *testing.T, line []byte) Record {
	t.Helper()
	var jr jsonRecord
	if err := json.Unmarshal(line, &jr); err != nil {
		t.Fatalf("export line %q: %v", line, err)
	}
	ts, err := time.Parse(time.RFC3339Nano, jr.Time)
	if err != nil {
		t.Fatal(err)
	}
	r := Record{Seq: jr.Seq, Time: ts, Tenant: jr.Tenant, Slot: jr.Slot, Version: jr.Version, KID: jr.KID,
		Op: jr.Op, Algorithm: jr.Algorithm, Code: jr.Code, CodeName: jr.CodeName,
		LatencyMicros: jr.LatencyMicros, Peer: jr.Peer, Detail: jr.Detail}
	for _, h := range []struct {
		dst *[32]byte
		hex string
	}{{&r.DigestHash, jr.DigestHash}, {&r.PolicyHash, jr.PolicyHash}, {&r.PrevHash, jr.PrevHash}, {&r.Hash, jr.Hash}} {
		b, err := hex.DecodeString(h.hex)
		if err != nil || len(b) != 32 {
			t.Fatalf("hash %q in the export", h.hex)
		}
		copy(h.dst[:], b)
	}
	return r
}

// Records with unusual but encodable fields read back as Append returned
// them, and their JSON export carries exactly what the hash covers: a
// verifier off the host recomputes each hash from the export alone. A
// string that is not UTF-8 used to be hashed as its bytes while the export
// (encoding/json) carried U+FFFD in their place, so such a record's export
// no longer matched its hash; the journal now stores it as the export
// shows it, as the agent does with a client's key name.
func TestUnusualFieldsRoundTripAndExportAsHashed(t *testing.T) {
	long := strings.Repeat("x", maxStringLen)
	cases := []struct {
		name string
		rec  Record
	}{
		{"empty fields", Record{}},
		{"every string at its limit", Record{Tenant: long, Slot: long, KID: long, Op: long, Algorithm: long, CodeName: long, Peer: long, Detail: long}},
		{"not UTF-8", Record{Op: "sign", Slot: "key\xff\xfe", Peer: "cn=caf\xe9", Detail: "\xc3"}},
		{"not UTF-8 at the length limit", Record{Op: "sign", Detail: strings.Repeat("\xff", maxStringLen)}},
		{"controls, NUL, escapes", Record{Op: "sign", Slot: "a\tb\nc\x00d\x1b[2J", Detail: "<script>\"'\\u2028\u2028"}},
		{"extremes", Record{Op: "sign", Version: math.MaxUint32, Code: math.MaxUint16, LatencyMicros: math.MaxUint32,
			Time: time.Unix(0, math.MinInt64), DigestHash: [32]byte{0xff}, PolicyHash: [32]byte{1}}},
	}
	j := openTest(t, t.TempDir(), WAL)
	ctx := context.Background()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := tc.rec
			if err := j.Append(ctx, &r); err != nil {
				t.Fatal(err)
			}
			var stored Record
			if err := j.Scan(ctx, Filter{FromSeq: r.Seq}, func(s *Record) error {
				if s.Seq == r.Seq {
					stored = *s
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(stored, r) {
				t.Fatalf("read back:\n%+v\nAppend returned:\n%+v", stored, r)
			}
			var buf bytes.Buffer
			if err := j.WriteJSONL(ctx, &buf, Filter{FromSeq: r.Seq}); err != nil {
				t.Fatal(err)
			}
			line, _, _ := bytes.Cut(buf.Bytes(), []byte("\n"))
			exported := fromExport(t, line)
			stored.Time = stored.Time.UTC()
			if !reflect.DeepEqual(exported, stored) {
				t.Fatalf("export carries another record than the store:\n%+v\n%+v", exported, stored)
			}
			if exported.encode(); exported.Hash != r.Hash {
				t.Fatalf("the export's fields hash to %x, the record's hash is %x", exported.Hash[:8], r.Hash[:8])
			}
		})
	}
	verifyOK(t, j)
	// ... and the export verifies on its own: the strict reading of its
	// lines (VerifyExport) takes every escape encoding/json writes.
	var buf bytes.Buffer
	if err := j.WriteJSONL(ctx, &buf, Filter{}); err != nil {
		t.Fatal(err)
	}
	if rep, err := VerifyExport(ctx, &buf); err != nil || !rep.OK() || rep.Records != uint64(len(cases)) {
		t.Fatalf("VerifyExport: %+v %v", rep.Break, err)
	}
}
