package proto

import (
	"runtime"
	"testing"
)

// Hostile lengths in a tiny payload must be refused against the payload's
// size before anything is allocated for them. msgpack's own DecodeString and
// Skip allocate up to 1 MiB for a 5-byte header and keep the grown buffer in
// the decoder, so a reused Codec grew by about 1 MiB per such payload (and
// copied all of it each time): the fuzz workers of FuzzDecodeRequest reached
// 7 GiB in 30 s and were reported as hung. The inputs those runs saved are
// kept in testdata/fuzz (hung-*).
func TestHostileLengthsAllocateNothing(t *testing.T) {
	for _, tc := range []struct {
		name     string
		payload  []byte
		response bool
	}{
		// {"zz": ext32 of 0x51de3030 bytes}: the shape of FuzzDecodeRequest/cd462daa9dbcfa82.
		{"unknown field, ext32 of 1.3 GB", []byte{0x81, 0xa2, 'z', 'z', 0xc9, 0x51, 0xde, 0x30, 0x30, 0x01}, false},
		{"unknown field, str32 of 4 GB", []byte{0x81, 0xa2, 'z', 'z', 0xdb, 0xff, 0xff, 0xff, 0xff, 'x'}, false},
		{"unknown field, bin32 of 2 GB", []byte{0x81, 0xa2, 'z', 'z', 0xc6, 0x7f, 0xff, 0xff, 0xff, 'x'}, false},
		{"unknown field, array32 of 4G nils", []byte{0x81, 0xa2, 'z', 'z', 0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0}, false},
		{"unknown field, map32 of 4G entries", []byte{0x81, 0xa2, 'z', 'z', 0xdf, 0xff, 0xff, 0xff, 0xff, 0xc0}, false},
		{"key, str32 of 4 GB", []byte{0x81, 0xa3, 'k', 'e', 'y', 0xdb, 0xff, 0xff, 0xff, 0xff, 'x'}, false},
		{"kid, str16 past the end", []byte{0x81, 0xa3, 'k', 'i', 'd', 0xda, 0xff, 0xff, 'x'}, false},
		{"msg, str32 of 4 GB", []byte{0x81, 0xa3, 'm', 's', 'g', 0xdb, 0xff, 0xff, 0xff, 0xff, 'x'}, true},
		{"keys, array32 of 4G entries", []byte{0x81, 0xa4, 'k', 'e', 'y', 's', 0xdd, 0xff, 0xff, 0xff, 0xff, 0x80}, true},
		{"recs, array32 of 4G records", []byte{0x81, 0xa4, 'r', 'e', 'c', 's', 0xdd, 0xff, 0xff, 0xff, 0xff, 0xc4, 0x00}, true},
		{"key entry name, str32 of 4 GB", []byte{0x81, 0xa4, 'k', 'e', 'y', 's', 0x91, 0x81, 0xa4, 'n', 'a', 'm', 'e', 0xdb, 0xff, 0xff, 0xff, 0xff}, true},
		{"unknown field in a key entry, ext32", []byte{0x81, 0xa4, 'k', 'e', 'y', 's', 0x91, 0x81, 0xa2, 'z', 'z', 0xc9, 0x7f, 0xff, 0xff, 0xff, 0x01}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := NewCodec()
			decode := func() error {
				if tc.response {
					var r Response
					return c.DecodeResponse(tc.payload, &r)
				}
				var r Request
				return c.DecodeRequest(tc.payload, &r)
			}
			if err := decode(); err == nil {
				t.Fatal("decoded")
			}
			const rounds = 200
			var before, after runtime.MemStats
			runtime.GC()
			runtime.ReadMemStats(&before)
			for range rounds {
				decode()
			}
			runtime.ReadMemStats(&after)
			if per := (after.TotalAlloc - before.TotalAlloc) / rounds; per > 4<<10 {
				t.Errorf("%d bytes allocated per decode of a %d-byte payload", per, len(tc.payload))
			}
		})
	}
}

// Nesting in an unknown field's value is bounded: the payload is refused,
// not walked 64 Ki levels deep.
func TestSkipDepthIsBounded(t *testing.T) {
	payload := []byte{0x81, 0xa2, 'z', 'z'}
	for range 1 << 16 {
		payload = append(payload, 0x91) // fixarray of one
	}
	payload = append(payload, 0xc0)
	var r Request
	if err := NewCodec().DecodeRequest(payload, &r); err == nil {
		t.Fatal("decoded")
	}
	// Shallow nesting is fine.
	ok := []byte{0x82, 0xa2, 'i', 'd', 0x07, 0xa2, 'z', 'z', 0x91, 0x91, 0x81, 0xa1, 'a', 0xc4, 0x01, 'x'}
	if err := NewCodec().DecodeRequest(ok, &r); err != nil || r.ID != 7 {
		t.Fatalf("id %d, err %v", r.ID, err)
	}
}

// A 32-bit length or count is a uint32 on the wire; on a 32-bit platform
// msgpack returns one from 2^31 up as a negative int, and -1 is also what
// it returns for nil. Read as nil (or as nothing to skip), such a header
// was followed by the value's own bytes read as the next fields: a string
// could carry a field past every other decoder's reading of it. Each
// payload here hides "id": 7 inside a value declared 2 GiB or more long,
// and must be refused on every platform (GOARCH=386 shows the difference).
func TestLengthsFrom2GiBAreNeverNil(t *testing.T) {
	hidden := []byte{0xa2, 'i', 'd', 0x07}
	for _, tc := range []struct {
		name     string
		payload  []byte
		response bool
	}{
		{"unknown field, str32 of 2 GiB", payload([]byte{0x82, 0xa2, 'z', 'z', 0xdb, 0x80, 0, 0, 0}, hidden), false},
		{"unknown field, str32 of 4 GiB - 1 (-1 as an int32)", payload([]byte{0x82, 0xa2, 'z', 'z', 0xdb, 0xff, 0xff, 0xff, 0xff}, hidden), false},
		{"unknown field, bin32 of 4 GiB - 1", payload([]byte{0x82, 0xa2, 'z', 'z', 0xc6, 0xff, 0xff, 0xff, 0xff}, hidden), false},
		{"unknown field, ext32 of 4 GiB - 1", payload([]byte{0x82, 0xa2, 'z', 'z', 0xc9, 0xff, 0xff, 0xff, 0xff, 0x01}, hidden), false},
		{"unknown field, array32 of 4G - 1", payload([]byte{0x82, 0xa2, 'z', 'z', 0xdd, 0xff, 0xff, 0xff, 0xff}, hidden), false},
		{"unknown field, map32 of 4G - 1", payload([]byte{0x82, 0xa2, 'z', 'z', 0xdf, 0xff, 0xff, 0xff, 0xff}, hidden), false},
		{"key, str32 of 4 GiB - 1", payload([]byte{0x82, 0xa3, 'k', 'e', 'y', 0xdb, 0xff, 0xff, 0xff, 0xff}, hidden), false},
		{"dig, bin32 of 4 GiB - 1", payload([]byte{0x82, 0xa3, 'd', 'i', 'g', 0xc6, 0xff, 0xff, 0xff, 0xff}, hidden), false},
		{"a map key, str32 of 4 GiB - 1", payload([]byte{0x82, 0xdb, 0xff, 0xff, 0xff, 0xff}, hidden), false},
		{"the request, map32 of 4G - 1", payload([]byte{0xdf, 0xff, 0xff, 0xff, 0xff}, hidden), false},
		{"response: msg, str32 of 4 GiB - 1", payload([]byte{0x82, 0xa3, 'm', 's', 'g', 0xdb, 0xff, 0xff, 0xff, 0xff}, hidden), true},
		{"response: recs, array32 of 4G - 1", payload([]byte{0x82, 0xa4, 'r', 'e', 'c', 's', 0xdd, 0xff, 0xff, 0xff, 0xff}, hidden), true},
		{"response: keys, array32 of 4G - 1", payload([]byte{0x82, 0xa4, 'k', 'e', 'y', 's', 0xdd, 0xff, 0xff, 0xff, 0xff}, hidden), true},
		{"response: a key entry, map32 of 4G - 1", payload([]byte{0x82, 0xa4, 'k', 'e', 'y', 's', 0x91, 0xdf, 0xff, 0xff, 0xff, 0xff}, hidden), true},
		{"response: the reply, map32 of 4G - 1", payload([]byte{0xdf, 0xff, 0xff, 0xff, 0xff}, hidden), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := NewCodec()
			if tc.response {
				var r Response
				if err := c.DecodeResponse(tc.payload, &r); err == nil {
					t.Fatalf("decoded, id %d", r.ID)
				}
				return
			}
			var r Request
			if err := c.DecodeRequest(tc.payload, &r); err == nil {
				t.Fatalf("decoded, id %d", r.ID)
			}
		})
	}
	// nil is still nil: an absent value, not a malformed one.
	var r Request
	if err := NewCodec().DecodeRequest([]byte{0x83, 0xa2, 'i', 'd', 0x07, 0xa3, 'k', 'e', 'y', 0xc0, 0xa2, 'z', 'z', 0xc0}, &r); err != nil || r.ID != 7 || r.Key != "" {
		t.Fatalf("nil values: id %d, key %q, err %v", r.ID, r.Key, err)
	}
}
