package proto

import (
	"errors"
	"fmt"
	"io"
	"slices"

	"github.com/vmihailenco/msgpack/v5/msgpcode"
)

// A decode error reaches the agent's log, which never holds the contents of
// a malformed frame (docs/security.md), and a frame's bytes may be a
// digest. So it names only what the protocol defines: a known field, a
// msgpack type, a limit, a count of the payload's own bytes. Never an
// unknown key, a value or a length the payload declares (a digest's bytes
// read as a number are still its bytes), nor msgpack's own messages, which
// quote the byte they failed on.
type formatError string

func (e formatError) Error() string { return string(e) }

var (
	errTruncated = formatError("the payload ends inside a value")
	errPastEnd   = formatError("a length or count past the end of the payload")
	errTooDeep   = formatError(fmt.Sprintf("a value nested more than %d deep", maxSkipDepth))
	errNilKey    = formatError("a nil key")
	errNegative  = formatError("a negative number where a uint belongs")
	errDuplicate = formatError("given twice")
	errNoPub     = formatError("a key entry without pub")
)

// The keys each decoder knows, for naming a field in an error: a key not
// among them is caller-supplied bytes and is not repeated.
var (
	requestKeys = []string{kID, kOp, kVersion, kFeatures, kKey, kKID, kScheme, kHash, kDigest, kSig,
		kTimeout, kFromSeq, kLimit, kAt}
	responseKeys = []string{kID, kCode, kMsg, kVersion, kFeatures, kKey, kKID, kKeyType, kPub, kSig,
		kValid, kPolicy, kRecords, kKeys}
	keyEntryKeys = []string{kName, kKID, kProvider, kKeyType, kPub, kCert, kChain}
)

// fieldErr is the error for the value of the field key in a message (what),
// naming the field only when it is one of known.
func (c *Codec) fieldErr(what string, key []byte, known []string, err error) error {
	if i := slices.Index(known, string(key)); i >= 0 {
		return fmt.Errorf("%s field %q: %w", what, known[i], c.safeErr(err))
	}
	return fmt.Errorf("%s: an unknown field: %w", what, c.safeErr(err))
}

// safeErr returns err when the decoder wrote it, and in place of an error
// from msgpack one that says the same without the payload's bytes.
func (c *Codec) safeErr(err error) error {
	var own formatError
	switch {
	case errors.As(err, &own):
		return err
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return errTruncated
	}
	// msgpack's other decoding errors all refuse the type code just read
	// (past a code it knows, the reader returns only EOF), so the last byte
	// consumed is that code.
	return formatError("unexpected type " + typeName(c.lastByte()))
}

func (c *Codec) lastByte() byte {
	var b [1]byte
	if off := c.rd.Size() - int64(c.rd.Len()); off > 0 {
		c.rd.ReadAt(b[:], off-1)
	}
	return b[0]
}

// typeName is the msgpack specification's name for the family of type code
// c: the type, never the value or length a code may also carry.
func typeName(c byte) string {
	switch {
	case c == msgpcode.Nil:
		return "nil"
	case c == msgpcode.False || c == msgpcode.True:
		return "bool"
	case msgpcode.IsFixedNum(c) || (c >= msgpcode.Uint8 && c <= msgpcode.Int64):
		return "int"
	case c == msgpcode.Float || c == msgpcode.Double:
		return "float"
	case msgpcode.IsString(c):
		return "str"
	case msgpcode.IsBin(c):
		return "bin"
	case msgpcode.IsExt(c):
		return "ext"
	case msgpcode.IsFixedArray(c) || c == msgpcode.Array16 || c == msgpcode.Array32:
		return "array"
	case msgpcode.IsFixedMap(c) || c == msgpcode.Map16 || c == msgpcode.Map32:
		return "map"
	}
	return "(never used)"
}
