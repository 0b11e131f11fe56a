package journal

import (
	"encoding/hex"
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
