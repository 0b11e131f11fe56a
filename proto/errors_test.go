package proto

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"strconv"
	"strings"
	"testing"
)

// secret stands for a digest a client put in a frame: 32 bytes, as long as
// the longest map key the decoder reads whole. Its hex has letters in every
// pair of bytes, so no window of it reads as one of the decoder's counts.
var secret = func() []byte {
	s := []byte{0xc0, 0xff, 0xee}
	for b := byte(0xa1); b <= 0xbc; b++ {
		s = append(s, b)
	}
	return append(s, 0x42)
}()

// leak says how msg shows bytes of secret, or "" when it shows none: raw or
// Go-quoted, in hex, or read as a big-endian number (a length or a value the
// payload declared).
func leak(msg string, secret []byte) string {
	if strings.Contains(msg, "msgpack:") || strings.Contains(msg, "code=") {
		return "msgpack's own message, which quotes the byte it failed on"
	}
	lower := strings.ToLower(msg)
	for i := range secret {
		if w := secret[i:min(i+2, len(secret))]; len(w) == 2 {
			if strings.Contains(lower, hex.EncodeToString(w)) {
				return "hex " + hex.EncodeToString(w)
			}
			if q := strconv.Quote(string(w)); strings.Contains(msg, q[1:len(q)-1]) {
				return "quoted " + q
			}
		}
		if w := secret[i:min(i+3, len(secret))]; len(w) == 3 && strings.Contains(msg, string(w)) {
			return "raw bytes"
		}
		for _, n := range []int{2, 4, 8} {
			if i+n > len(secret) {
				continue
			}
			var u uint64
			for _, b := range secret[i : i+n] {
				u = u<<8 | uint64(b)
			}
			signed := int64(u<<(64-8*n)) >> (64 - 8*n)
			for _, d := range []string{strconv.FormatUint(u, 10), strconv.FormatInt(signed, 10)} {
				if len(strings.TrimPrefix(d, "-")) >= 5 && strings.Contains(msg, d) {
					return "the number " + d
				}
			}
		}
	}
	return ""
}

// payload concatenates msgpack pieces written by hand.
func payload(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// Decode errors reach the agent's log, which never holds the contents of a
// malformed frame (docs/security.md): they name a known field, a msgpack
// type, a limit or a count of the payload's own bytes, never an unknown
// key, a value or a declared length, all of which may be a digest's bytes.
func TestDecodeErrorsHoldNoPayloadBytes(t *testing.T) {
	var (
		s       = secret
		s4      = secret[:4]
		s8      = secret[:8]                   // negative as an int64: 0xc0 leads
		keyS    = payload([]byte{0xd9, 32}, s) // the secret as a map key (str8)
		binKeyS = payload([]byte{0xc4, 32}, s) // the same as bin
		longKey = payload([]byte{0xd9, 64}, s, s)
		fix     = func(k string) []byte { return append([]byte{0xa0 | byte(len(k))}, k...) }
		deep    = bytes.Repeat([]byte{0x91}, maxSkipDepth+1)
	)
	for _, tc := range []struct {
		name     string
		payload  []byte
		response bool
	}{
		// The reviewer's reproduction: an unknown 32-byte key, then a str32
		// header claiming 4 GB.
		{"unknown digest-sized key, str32 of 4 GB", payload([]byte{0x81}, keyS, []byte{0xdb, 0xff, 0xff, 0xff, 0xff}), false},
		{"unknown bin key, str32 of 4 GB", payload([]byte{0x81}, binKeyS, []byte{0xdb, 0xff, 0xff, 0xff, 0xff}), false},
		{"unknown 64-byte key, value truncated", payload([]byte{0x81}, longKey, []byte{0xd9, 0x10, 'x'}), false},
		{"unknown key, bin32 length from the secret", payload([]byte{0x81}, keyS, []byte{0xc6}, s4), false},
		{"unknown key, ext32 length from the secret", payload([]byte{0x81}, keyS, []byte{0xc9}, s4, []byte{1}), false},
		{"unknown key, array32 count from the secret", payload([]byte{0x81}, keyS, []byte{0xdd}, s4), false},
		{"unknown key, map32 count from the secret", payload([]byte{0x81}, keyS, []byte{0xdf}, s4), false},
		{"unknown key, value nested too deep", payload([]byte{0x81}, keyS, deep, []byte{0xc0}), false},
		{"unknown key, never-used code", payload([]byte{0x81}, keyS, []byte{0xc1}), false},
		{"unknown key, truncated value", payload([]byte{0x81}, keyS, []byte{0xd9, 0x10, 'x'}), false},
		{"unknown key, then the map ends early", payload([]byte{0x82}, keyS, []byte{0xc0}), false},
		{"the secret where a key should be", payload([]byte{0x82}, fix("id"), []byte{0x01}, s[1:]), false},
		{"the secret as the whole payload", s[1:], false},
		{"the secret after the map", payload([]byte{0x80}, s), false},
		{"id as the secret's str", payload([]byte{0x81}, fix("id"), keyS), false},
		{"id as raw secret bytes", payload([]byte{0x82}, fix("id"), s), false},
		{"at as the secret's bin", payload([]byte{0x81}, fix("at"), binKeyS), false},
		{"id as 8 bytes of the secret, a negative int64", payload([]byte{0x81}, fix("id"), []byte{0xd3}, s8), false},
		{"sch as 8 bytes of the secret, a negative int64", payload([]byte{0x81}, fix("sch"), []byte{0xd3}, s8), false},
		{"tmo as 4 bytes of the secret, a negative int32", payload([]byte{0x81}, fix("tmo"), []byte{0xd2}, s4), false},
		{"n as 8 bytes of the secret, a negative int64", payload([]byte{0x81}, fix("n"), []byte{0xd3}, s8), false},
		{"dig with a bin32 length from the secret", payload([]byte{0x81}, fix("dig"), []byte{0xc6}, s4), false},
		{"key with a str32 length from the secret", payload([]byte{0x81}, fix("key"), []byte{0xdb}, s4), false},
		{"key as a map", payload([]byte{0x81}, fix("key"), []byte{0x81}, keyS, []byte{0xc0}), false},

		{"response: unknown key, str32 of 4 GB", payload([]byte{0x81}, keyS, []byte{0xdb, 0xff, 0xff, 0xff, 0xff}), true},
		{"response: code as 8 bytes of the secret, a negative int64", payload([]byte{0x81}, fix("code"), []byte{0xd3}, s8), true},
		{"response: id as 4 bytes of the secret, a negative int32", payload([]byte{0x81}, fix("id"), []byte{0xd2}, s4), true},
		{"response: msg with a str32 length from the secret", payload([]byte{0x81}, fix("msg"), []byte{0xdb}, s4), true},
		{"response: ok as the secret", payload([]byte{0x81}, fix("ok"), keyS), true},
		{"response: keys with a count from the secret", payload([]byte{0x81}, fix("keys"), []byte{0xdd}, s4), true},
		{"response: a key entry that is the secret", payload([]byte{0x81}, fix("keys"), []byte{0x91}, s[1:]), true},
		{"response: a key entry's unknown key", payload([]byte{0x81}, fix("keys"), []byte{0x91, 0x81}, keyS, []byte{0xc1}), true},
		{"response: a key entry's pub length from the secret", payload([]byte{0x81}, fix("keys"), []byte{0x91, 0x81}, fix("pub"), []byte{0xc6}, s4), true},
		{"response: recs with a bin32 length from the secret", payload([]byte{0x81}, fix("recs"), []byte{0x91, 0xc6}, s4), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := NewCodec()
			var err error
			if tc.response {
				var r Response
				err = c.DecodeResponse(tc.payload, &r)
			} else {
				var r Request
				err = c.DecodeRequest(tc.payload, &r)
			}
			if err == nil {
				t.Fatal("decoded")
			}
			if how := leak(err.Error(), secret); how != "" {
				t.Errorf("error %q shows the payload's bytes (%s)", err, how)
			}
		})
	}
	// A frame's length prefix may be bytes of a digest too, when a sender
	// lost its place in the stream.
	t.Run("frame length from the secret", func(t *testing.T) {
		_, err := ReadFrame(bufio.NewReader(bytes.NewReader(s4)), nil, DefaultMaxFrame)
		if err == nil {
			t.Fatal("read")
		}
		if how := leak(err.Error(), secret); how != "" {
			t.Errorf("error %q shows the stream's bytes (%s)", err, how)
		}
	})
}
