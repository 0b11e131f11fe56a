package providers

import (
	"encoding/binary"
	"encoding/hex"

	"github.com/zeebo/blake3"
)

// kidHexLen is the kid's length in hex digits: 128 bits of BLAKE3 output, enough
// to make an accidental collision among a fleet's keys negligible.
const kidHexLen = 32

// ComputeKID derives a key's stable identifier (DESIGN.md section 1):
//
//	kid = hex(BLAKE3(len16(spki) ‖ spki ‖ len16(provider) ‖ provider ‖ len16(name) ‖ name))[:32]
//
// The length prefixes keep ("ab","c") and ("a","bc") apart. The same key
// material, provider ID and name give the same kid on every machine.
func ComputeKID(spki []byte, provider, name string) string {
	h := blake3.New()
	var n [2]byte
	writeField := func(b []byte) {
		binary.BigEndian.PutUint16(n[:], uint16(len(b)))
		h.Write(n[:])
		h.Write(b)
	}
	writeField(spki)
	writeField([]byte(provider))
	writeField([]byte(name))
	sum := h.Sum(nil)
	return hex.EncodeToString(sum)[:kidHexLen]
}
