package proto

import (
	"bytes"
	"fmt"
	"slices"

	"github.com/vmihailenco/msgpack/v5"
	"github.com/vmihailenco/msgpack/v5/msgpcode"
)

// Request is every client-to-agent message; the fields an operation does not
// use stay empty and are not sent.
type Request struct {
	ID       uint64 // echoed in the reply; a connection may have many in flight
	Op       Op
	Version  uint16 // Hello: the client's protocol version
	Features uint64 // Hello: the client's feature bits
	Key      string // key (slot) name; or
	KID      string // kid; Key wins when both are set
	Scheme   uint8  // Sign, Verify: Scheme* (0: the key's default)
	Hash     uint8  // Sign, Verify: Hash*
	Digest   []byte // Sign, Verify: the digest (pure Ed25519: the message)
	Sig      []byte // Verify: the signature to check
	// TimeoutMillis is the client's remaining deadline; the agent never works
	// on a request longer than this (nor longer than its own limit).
	// TimeoutOutOfRange: 2^32-1 ms or more, which leaves the agent's limit.
	TimeoutMillis uint32
	// AuditTail: records from this seq on (0: the last Limit records), at
	// most Limit of them (the agent caps it). LimitOutOfRange: 2^32-1 or
	// more.
	FromSeq uint64
	Limit   uint32
	// Rotate: Unix seconds of a one-off rotation to schedule (0: now).
	// AuditPrune: the cut-off. ExportREP uses Limit as the pack's number
	// (0: the newest). AtOutOfRange: 2^63-1 or more.
	At int64
}

// Response is every agent-to-client message.
type Response struct {
	ID       uint64
	Code     Code
	Msg      string // human-readable detail for a non-OK code; never secrets
	Version  uint16 // Hello: the agent's protocol version
	Features uint64 // Hello: the agent's feature bits
	Key      string // Sign, PublicKey: the key name that served the request
	KID      string // Sign, PublicKey: the kid that signed / was read
	KeyType  string // PublicKey
	Pub      []byte // PublicKey: DER SubjectPublicKeyInfo
	Sig      []byte // Sign
	Valid    bool   // Verify
	Keys     []KeyEntry
	// PolicyHash is the BLAKE3 hash of the caller's tenant policy that
	// allowed a Sign (empty when the agent runs without a policy).
	PolicyHash []byte
	// AuditTail: audit records, each one JSON object.
	Records [][]byte
}

// KeyEntry is one key in a ListKeys reply.
type KeyEntry struct {
	Name     string
	KID      string
	Provider string
	KeyType  string
	Pub      []byte // DER SubjectPublicKeyInfo
	// Cert is the key's X.509 certificate (DER), when the agent's config
	// names one (`certificates:`); nil otherwise. Chain holds the
	// certificates that followed it in the file (intermediates, DER).
	Cert  []byte
	Chain [][]byte
}

// Err returns nil for OK, else the reply as an *Error.
func (r *Response) Err() error {
	if r.Code == OK {
		return nil
	}
	return &Error{Code: r.Code, Msg: r.Msg}
}

// Reset clears r for reuse, keeping the capacity of its byte slices.
func (r *Request) Reset() {
	*r = Request{Digest: r.Digest[:0], Sig: r.Sig[:0]}
}

// Wire keys. Short, stable, never reused for another meaning.
const (
	kID       = "id"
	kOp       = "op"
	kVersion  = "ver"
	kFeatures = "feat"
	kKey      = "key"
	kKID      = "kid"
	kScheme   = "sch"
	kHash     = "hash"
	kDigest   = "dig"
	kSig      = "sig"
	kTimeout  = "tmo"
	kCode     = "code"
	kMsg      = "msg"
	kKeyType  = "kty"
	kPub      = "pub"
	kCert     = "cert"
	kChain    = "chain"
	kValid    = "ok"
	kKeys     = "keys"
	kName     = "name"
	kProvider = "prov"
	kPolicy   = "ph"
	kFromSeq  = "from"
	kLimit    = "n"
	kRecords  = "recs"
	kAt       = "at"
)

// EncodeMsgpack writes r as a msgpack map of its non-empty fields
// (msgpack.CustomEncoder).
func (r *Request) EncodeMsgpack(e *msgpack.Encoder) error {
	n := 2
	n += count(r.Version != 0) + count(r.Features != 0) + count(r.Key != "") + count(r.KID != "") +
		count(r.Scheme != 0) + count(r.Hash != 0) + count(len(r.Digest) != 0) + count(len(r.Sig) != 0) +
		count(r.TimeoutMillis != 0) + count(r.FromSeq != 0) + count(r.Limit != 0) + count(r.At != 0)
	w := fieldWriter{e: e}
	w.mapLen(n)
	w.uint(kID, r.ID)
	w.uint(kOp, uint64(r.Op))
	if r.Version != 0 {
		w.uint(kVersion, uint64(r.Version))
	}
	if r.Features != 0 {
		w.uint(kFeatures, r.Features)
	}
	if r.Key != "" {
		w.str(kKey, r.Key)
	}
	if r.KID != "" {
		w.str(kKID, r.KID)
	}
	if r.Scheme != 0 {
		w.uint(kScheme, uint64(r.Scheme))
	}
	if r.Hash != 0 {
		w.uint(kHash, uint64(r.Hash))
	}
	if len(r.Digest) != 0 {
		w.bytes(kDigest, r.Digest)
	}
	if len(r.Sig) != 0 {
		w.bytes(kSig, r.Sig)
	}
	if r.TimeoutMillis != 0 {
		w.uint(kTimeout, uint64(r.TimeoutMillis))
	}
	if r.FromSeq != 0 {
		w.uint(kFromSeq, r.FromSeq)
	}
	if r.Limit != 0 {
		w.uint(kLimit, uint64(r.Limit))
	}
	if r.At != 0 {
		w.key(kAt)
		w.setErr(e.EncodeInt(r.At))
	}
	return w.err
}

// decode reads a map written by EncodeMsgpack, skipping unknown keys. Byte
// fields reuse r's existing capacity.
func (r *Request) decode(c *Codec) error {
	d := c.dec
	n, err := c.mapLen()
	if err != nil {
		return fmt.Errorf("request: %w", c.safeErr(err))
	}
	if n < 0 {
		return fmt.Errorf("request: nil map")
	}
	key := c.key[:0]
	// A known field given twice is refused: what the agent acts on would
	// depend on which of the two a reader keeps (the last, here), and
	// another reader of the same bytes (a log, a proxy) may keep the first.
	var seen uint32
	for i := 0; i < n; i++ {
		if key, err = c.decodeKey(key[:0]); err != nil {
			return fmt.Errorf("request key: %w", c.safeErr(err))
		}
		var v uint64
		var field uint32
		switch string(key) {
		case kID:
			field = 1 << 0
			r.ID, err = decodeUint(d)
		case kOp:
			field = 1 << 1
			v, err = decodeUintSaturated(d, uint64(OpOutOfRange))
			r.Op = Op(v)
		case kVersion:
			field = 1 << 2
			v, err = decodeUintSaturated(d, uint64(VersionOutOfRange))
			r.Version = uint16(v)
		case kFeatures:
			field = 1 << 3
			r.Features, err = decodeUint(d)
		case kKey:
			field = 1 << 4
			r.Key, err = c.decodeString()
		case kKID:
			field = 1 << 5
			r.KID, err = c.decodeString()
		case kScheme:
			field = 1 << 6
			v, err = decodeUintSaturated(d, uint64(SchemeOutOfRange))
			r.Scheme = uint8(v)
		case kHash:
			field = 1 << 7
			v, err = decodeUintSaturated(d, uint64(HashOutOfRange))
			r.Hash = uint8(v)
		case kDigest:
			field = 1 << 8
			r.Digest, err = c.decodeBytesInto(r.Digest[:0])
		case kSig:
			field = 1 << 9
			r.Sig, err = c.decodeBytesInto(r.Sig[:0])
		case kTimeout:
			field = 1 << 10
			v, err = decodeUintSaturated(d, uint64(TimeoutOutOfRange))
			r.TimeoutMillis = uint32(v)
		case kFromSeq:
			field = 1 << 11
			r.FromSeq, err = decodeUint(d)
		case kLimit:
			field = 1 << 12
			v, err = decodeUintSaturated(d, uint64(LimitOutOfRange))
			r.Limit = uint32(v)
		case kAt:
			field = 1 << 13
			r.At, err = decodeIntSaturated(d, AtOutOfRange)
		default:
			err = c.skip(0)
		}
		if err != nil {
			return c.fieldErr("request", key, requestKeys, err)
		}
		if seen&field != 0 {
			return c.fieldErr("request", key, requestKeys, errDuplicate)
		}
		seen |= field
	}
	return nil
}

// EncodeMsgpack writes r as a msgpack map of its non-empty fields.
func (r *Response) EncodeMsgpack(e *msgpack.Encoder) error {
	n := 2
	n += count(r.Msg != "") + count(r.Version != 0) + count(r.Features != 0) + count(r.Key != "") +
		count(r.KID != "") + count(r.KeyType != "") + count(len(r.Pub) != 0) + count(len(r.Sig) != 0) +
		count(r.Valid) + count(r.Keys != nil) + count(len(r.PolicyHash) != 0) + count(r.Records != nil)
	w := fieldWriter{e: e}
	w.mapLen(n)
	w.uint(kID, r.ID)
	w.uint(kCode, uint64(r.Code))
	if r.Msg != "" {
		w.str(kMsg, r.Msg)
	}
	if r.Version != 0 {
		w.uint(kVersion, uint64(r.Version))
	}
	if r.Features != 0 {
		w.uint(kFeatures, r.Features)
	}
	if r.Key != "" {
		w.str(kKey, r.Key)
	}
	if r.KID != "" {
		w.str(kKID, r.KID)
	}
	if r.KeyType != "" {
		w.str(kKeyType, r.KeyType)
	}
	if len(r.Pub) != 0 {
		w.bytes(kPub, r.Pub)
	}
	if len(r.Sig) != 0 {
		w.bytes(kSig, r.Sig)
	}
	if len(r.PolicyHash) != 0 {
		w.bytes(kPolicy, r.PolicyHash)
	}
	if r.Records != nil {
		w.byteList(kRecords, r.Records)
	}
	if r.Valid {
		w.key(kValid)
		w.setErr(e.EncodeBool(true))
	}
	if r.Keys != nil {
		w.key(kKeys)
		w.setErr(e.EncodeArrayLen(len(r.Keys)))
		for i := range r.Keys {
			k := &r.Keys[i]
			w.mapLen(5 + count(k.Cert != nil) + count(k.Chain != nil))
			w.str(kName, k.Name)
			w.str(kKID, k.KID)
			w.str(kProvider, k.Provider)
			w.str(kKeyType, k.KeyType)
			w.bytes(kPub, k.Pub)
			if k.Cert != nil {
				w.bytes(kCert, k.Cert)
			}
			if k.Chain != nil {
				w.byteList(kChain, k.Chain)
			}
		}
	}
	return w.err
}

// decode reads a map written by EncodeMsgpack, skipping unknown keys.
func (r *Response) decode(c *Codec) error {
	d := c.dec
	n, err := c.mapLen()
	if err != nil {
		return fmt.Errorf("response: %w", c.safeErr(err))
	}
	if n < 0 {
		return fmt.Errorf("response: nil map")
	}
	key := c.key[:0] // nothing below it decodes a key with c.key (decodeKeyEntries has its own)
	for i := 0; i < n; i++ {
		if key, err = c.decodeKey(key[:0]); err != nil {
			return fmt.Errorf("response key: %w", c.safeErr(err))
		}
		var v uint64
		switch string(key) {
		case kID:
			r.ID, err = decodeUint(d)
		case kCode:
			v, err = decodeUintSaturated(d, uint64(CodeOutOfRange))
			r.Code = Code(v)
		case kMsg:
			r.Msg, err = c.decodeString()
		case kVersion:
			v, err = decodeUintSaturated(d, uint64(VersionOutOfRange))
			r.Version = uint16(v)
		case kFeatures:
			r.Features, err = decodeUint(d)
		case kKey:
			r.Key, err = c.decodeString()
		case kKID:
			r.KID, err = c.decodeString()
		case kKeyType:
			r.KeyType, err = c.decodeString()
		case kPub:
			r.Pub, err = c.decodeBytesInto(nil)
		case kSig:
			r.Sig, err = c.decodeBytesInto(r.Sig[:0])
		case kValid:
			r.Valid, err = d.DecodeBool()
		case kPolicy:
			r.PolicyHash, err = c.decodeBytesInto(nil)
		case kRecords:
			r.Records, err = c.decodeByteList()
		case kKeys:
			r.Keys, err = c.decodeKeyEntries()
		default:
			err = c.skip(0)
		}
		if err != nil {
			return c.fieldErr("response", key, responseKeys, err)
		}
	}
	return nil
}

func (c *Codec) decodeByteList() ([][]byte, error) {
	n, err := c.decodeArrayLen()
	if err != nil || n < 0 {
		return nil, err
	}
	out := make([][]byte, 0, min(n, 1024))
	for i := 0; i < n; i++ {
		b, err := c.decodeBytesInto(nil)
		if err != nil {
			return nil, err
		}
		out = append(out, b)
	}
	return out, nil
}

// minKeyEntryLen is the size of the smallest key entry: a map of one
// field, a pub of one byte ({"pub": bin8 of 1}).
const minKeyEntryLen = 1 + 1 + len(kPub) + 2 + 1

func (c *Codec) decodeKeyEntries() ([]KeyEntry, error) {
	n, err := c.decodeArrayLen()
	if err != nil || n < 0 {
		return nil, err
	}
	// An entry of one byte (an empty map, a nil) would become a 136-byte
	// KeyEntry, and a frame of them tens of megabytes of the client's
	// memory (growth included). An entry must carry its key's pub, so it
	// takes minKeyEntryLen bytes at least: memory stays within a small
	// multiple of the frame, and the count can be allocated at once.
	if n > c.rd.Len()/minKeyEntryLen {
		return nil, errPastEnd
	}
	out := make([]KeyEntry, 0, n)
	var key []byte
	for i := 0; i < n; i++ {
		m, err := c.mapLen()
		if err != nil {
			return nil, fmt.Errorf("key entry: %w", c.safeErr(err))
		}
		var k KeyEntry
		for j := 0; j < m; j++ {
			if key, err = c.decodeKey(key[:0]); err != nil {
				return nil, fmt.Errorf("key entry key: %w", c.safeErr(err))
			}
			switch string(key) {
			case kName:
				k.Name, err = c.decodeString()
			case kKID:
				k.KID, err = c.decodeString()
			case kProvider:
				k.Provider, err = c.decodeString()
			case kKeyType:
				k.KeyType, err = c.decodeString()
			case kPub:
				k.Pub, err = c.decodeBytesInto(nil)
			case kCert:
				k.Cert, err = c.decodeBytesInto(nil)
			case kChain:
				k.Chain, err = c.decodeByteList()
			default:
				err = c.skip(0)
			}
			if err != nil {
				return nil, c.fieldErr("key entry", key, keyEntryKeys, err)
			}
		}
		if len(k.Pub) == 0 {
			return nil, errNoPub
		}
		out = append(out, k)
	}
	return out, nil
}

// fieldWriter keeps the first encoding error so the encoders read straight.
type fieldWriter struct {
	e   *msgpack.Encoder
	err error
}

func (w *fieldWriter) setErr(err error) {
	if w.err == nil {
		w.err = err
	}
}
func (w *fieldWriter) mapLen(n int) { w.setErr(w.e.EncodeMapLen(n)) }
func (w *fieldWriter) key(k string) { w.setErr(w.e.EncodeString(k)) }
func (w *fieldWriter) uint(k string, v uint64) {
	w.key(k)
	w.setErr(w.e.EncodeUint(v))
}
func (w *fieldWriter) str(k, v string) {
	w.key(k)
	w.setErr(w.e.EncodeString(v))
}
func (w *fieldWriter) bytes(k string, v []byte) {
	w.key(k)
	w.setErr(w.e.EncodeBytes(v))
}

// byteList writes an array of byte strings (what decodeByteList reads).
func (w *fieldWriter) byteList(k string, v [][]byte) {
	w.key(k)
	w.setErr(w.e.EncodeArrayLen(len(v)))
	for _, b := range v {
		w.setErr(w.e.EncodeBytes(b))
	}
}

func count(b bool) int {
	if b {
		return 1
	}
	return 0
}

// maxKeyLen bounds a map key; ours are at most a few bytes, and a long one is
// skipped as unknown without being stored.
const maxKeyLen = 32

func (c *Codec) decodeKey(buf []byte) ([]byte, error) {
	d := c.dec
	n, err := c.bytesLen() // accepts str and bin families
	if err != nil {
		return nil, err
	}
	if n < 0 {
		return nil, errNilKey
	}
	if n > maxKeyLen {
		// Still consume it so the decoder stays in step; the key matches nothing.
		if err := discard(d, n); err != nil {
			return nil, err
		}
		return append(buf, '?'), nil
	}
	buf = append(buf, make([]byte, n)...)
	if err := d.ReadFull(buf); err != nil {
		return nil, err
	}
	return buf, nil
}

func discard(d *msgpack.Decoder, n int) error {
	var scratch [64]byte
	for n > 0 {
		k := min(n, len(scratch))
		if err := d.ReadFull(scratch[:k]); err != nil {
			return err
		}
		n -= k
	}
	return nil
}

// decodeUintSaturated reads a uint into a field narrower than the wire's
// uint64, whose values from max up all mean the same: an op, version,
// scheme, hash or result code that nobody speaks (OpOutOfRange,
// VersionOutOfRange, SchemeOutOfRange, HashOutOfRange, CodeOutOfRange), a deadline too far off to matter
// (TimeoutOutOfRange), a count past every cap (LimitOutOfRange). Such a
// number is answered as docs/protocol.md says rather than refused as
// malformed, and saturating, not truncating, keeps it from wrapping onto
// a smaller, meaningful one. A negative number is malformed (decodeUint).
func decodeUintSaturated(d *msgpack.Decoder, max uint64) (uint64, error) {
	v, err := decodeUint(d)
	return min(v, max), err
}

// decodeIntSaturated reads an int: msgpack's int family as it is, negative
// numbers included, and its uint family with the numbers from max up
// saturated to max. msgpack's DecodeInt64 reads a uint64 past 2^63-1 as
// the negative number of its bits, a meaning nobody sent (at 2^64-1 is
// not a second before 1970).
func decodeIntSaturated(d *msgpack.Decoder, max int64) (int64, error) {
	code, err := d.PeekCode()
	if err != nil {
		return 0, err
	}
	if code == msgpcode.Uint64 {
		v, err := d.DecodeUint64()
		return int64(min(v, uint64(max))), err
	}
	n, err := d.DecodeInt64()
	return min(n, max), err
}

// decodeUint reads a uint: msgpack's uint family, or its int family when
// the number is not negative (an encoder may write a small number so). A
// negative number is malformed: msgpack's DecodeUint64 would take -1 for
// 2^64-1, an id no client chose or a number saturated into a meaning
// (an unknown op, no deadline). The peek reads the byte in place.
func decodeUint(d *msgpack.Decoder) (uint64, error) {
	code, err := d.PeekCode()
	if err != nil {
		return 0, err
	}
	if code >= msgpcode.NegFixedNumLow || (code >= msgpcode.Int8 && code <= msgpcode.Int64) {
		n, err := d.DecodeInt64()
		if err == nil && n < 0 {
			return 0, errNegative
		}
		return uint64(n), err
	}
	return d.DecodeUint64()
}

// decodeBytesInto reads a bin or str value into buf's capacity. A length
// beyond what is left of the payload is refused before allocating, so a
// hostile header cannot make the agent allocate gigabytes.
func (c *Codec) decodeBytesInto(buf []byte) ([]byte, error) {
	d := c.dec
	n, err := c.bytesLen()
	if err != nil {
		return nil, err
	}
	if n <= 0 {
		return buf[:0], nil
	}
	if n > c.rd.Len() {
		return nil, errPastEnd
	}
	if cap(buf) < n {
		buf = make([]byte, n)
	} else {
		buf = buf[:n]
	}
	if err := d.ReadFull(buf); err != nil {
		return nil, err
	}
	return buf, nil
}

// decodeString reads a str (or bin) value. Like decodeBytesInto it refuses a
// length beyond what is left of the payload before reading: msgpack's own
// DecodeString allocates up to 1 MiB for a 5-byte header and keeps the grown
// buffer in the decoder, so a reused Codec grew by a MiB per hostile frame.
func (c *Codec) decodeString() (string, error) {
	n, err := c.bytesLen()
	if err != nil {
		return "", err
	}
	if n <= 0 {
		return "", nil
	}
	if n > c.rd.Len() {
		return "", errPastEnd
	}
	c.str = slices.Grow(c.str[:0], n)[:n]
	if err := c.dec.ReadFull(c.str); err != nil {
		return "", err
	}
	return string(c.str), nil
}

// decodeArrayLen reads an array header whose count fits in what is left of
// the payload (every element takes at least one byte).
func (c *Codec) decodeArrayLen() (int, error) {
	n, err := c.arrayLen()
	if err == nil && n > c.rd.Len() {
		err = errPastEnd
	}
	return n, err
}

// bytesLen, arrayLen and mapLen read a str or bin length, an array count
// or a map count, -1 for nil. A 32-bit length is a uint32 on the wire, and
// on a 32-bit platform msgpack returns one from 2^31 up as a negative int:
// 0xffffffff as -1, nil's own number. Taken for nil, or for nothing to
// skip, the header would be followed by the value's own bytes read as the
// fields after it, a field no other decoder sees. Only a nil takes one
// byte, so a negative length from a longer header is refused (lenFits).
func (c *Codec) bytesLen() (int, error) {
	before := c.rd.Len()
	n, err := c.dec.DecodeBytesLen()
	return c.lenFits(n, before, err)
}

func (c *Codec) arrayLen() (int, error) {
	before := c.rd.Len()
	n, err := c.dec.DecodeArrayLen()
	return c.lenFits(n, before, err)
}

func (c *Codec) mapLen() (int, error) {
	before := c.rd.Len()
	n, err := c.dec.DecodeMapLen()
	return c.lenFits(n, before, err)
}

func (c *Codec) lenFits(n, before int, err error) (int, error) {
	if err == nil && n < 0 && before-c.rd.Len() != 1 {
		return 0, errPastEnd
	}
	return n, err
}

// maxSkipDepth bounds the nesting of an unknown field's value; our own
// messages nest two deep.
const maxSkipDepth = 16

// skip consumes one value of an unknown field. It replaces msgpack's Skip,
// which allocates for a str, bin or ext length before reading it (see
// decodeString) and recurses as deep as the payload nests: here every
// length and count is checked against the rest of the payload first, and
// nesting is bounded.
func (c *Codec) skip(depth int) error {
	d := c.dec
	code, err := d.PeekCode()
	if err != nil {
		return err
	}
	var values int
	switch {
	case msgpcode.IsString(code) || msgpcode.IsBin(code):
		n, err := c.bytesLen()
		if err != nil {
			return err
		}
		if n > c.rd.Len() {
			return errPastEnd
		}
		return discard(d, n)
	case msgpcode.IsExt(code):
		_, n, err := d.DecodeExtHeader()
		if err != nil {
			return err
		}
		if n < 0 { // an ext is never nil: a length from 2^31 up (lenFits)
			return errPastEnd
		}
		if n > c.rd.Len() {
			return errPastEnd
		}
		return discard(d, n)
	case msgpcode.IsFixedArray(code) || code == msgpcode.Array16 || code == msgpcode.Array32:
		n, err := c.arrayLen()
		if err != nil {
			return err
		}
		values = n
	case msgpcode.IsFixedMap(code) || code == msgpcode.Map16 || code == msgpcode.Map32:
		n, err := c.mapLen()
		if err != nil {
			return err
		}
		values = 2 * n
	default:
		return d.Skip() // a scalar: at most 9 bytes, read into a fixed buffer
	}
	if values > c.rd.Len() {
		return errPastEnd
	}
	if values > 0 && depth >= maxSkipDepth {
		return errTooDeep
	}
	for range values {
		if err := c.skip(depth + 1); err != nil {
			return err
		}
	}
	return nil
}

// Codec encodes and decodes messages, reusing its buffers. A Codec is not safe
// for concurrent use; keep one per goroutine (or take them from a sync.Pool).
type Codec struct {
	key [maxKeyLen]byte // scratch for map keys, so decoding them allocates nothing
	str []byte          // scratch for strings, at most a payload long
	rd  bytes.Reader
	dec *msgpack.Decoder
	wr  bytes.Buffer
	enc *msgpack.Encoder
}

// NewCodec returns a ready Codec.
func NewCodec() *Codec {
	c := &Codec{}
	c.dec = msgpack.NewDecoder(&c.rd)
	c.enc = msgpack.NewEncoder(&c.wr)
	return c
}

// DecodeRequest decodes one payload (the bytes of a frame, without the length
// prefix) into r. Trailing bytes after the map are an error.
func (c *Codec) DecodeRequest(payload []byte, r *Request) error {
	c.rd.Reset(payload)
	c.dec.Reset(&c.rd)
	if err := r.decode(c); err != nil {
		return err
	}
	if c.rd.Len() != 0 {
		return fmt.Errorf("request: %d trailing bytes", c.rd.Len())
	}
	return nil
}

// DecodeResponse decodes one payload into r.
func (c *Codec) DecodeResponse(payload []byte, r *Response) error {
	c.rd.Reset(payload)
	c.dec.Reset(&c.rd)
	if err := r.decode(c); err != nil {
		return err
	}
	if c.rd.Len() != 0 {
		return fmt.Errorf("response: %d trailing bytes", c.rd.Len())
	}
	return nil
}

// AppendRequestFrame appends r as a complete frame (length prefix included) to dst.
func (c *Codec) AppendRequestFrame(dst []byte, r *Request) ([]byte, error) {
	c.wr.Reset()
	if err := r.EncodeMsgpack(c.enc); err != nil {
		return dst, fmt.Errorf("encode request: %w", err)
	}
	return appendFrame(dst, c.wr.Bytes()), nil
}

// AppendResponseFrame appends r as a complete frame to dst.
func (c *Codec) AppendResponseFrame(dst []byte, r *Response) ([]byte, error) {
	c.wr.Reset()
	if err := r.EncodeMsgpack(c.enc); err != nil {
		return dst, fmt.Errorf("encode response: %w", err)
	}
	return appendFrame(dst, c.wr.Bytes()), nil
}
