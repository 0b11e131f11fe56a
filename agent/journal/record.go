package journal

import (
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/zeebo/blake3"
)

// Record is one audit event: a signing decision (allowed or denied) or an
// administrative step such as a rotation. It never carries a digest, a PIN
// or key material: DigestHash is the BLAKE3 hash of the digest (see
// HashDigest).
type Record struct {
	// Seq is assigned by Append: 1 for the first record, then +1 each.
	Seq uint64
	// Time is when the decision was made; Append fills it from
	// Options.Clock when zero. Stored with nanosecond precision in UTC.
	Time          time.Time
	Tenant        string
	Slot          string
	Version       uint32 // key slot version (v1..vN)
	KID           string
	Op            string // "sign", "verify", "rotate", "pause", ...
	Algorithm     string
	DigestHash    [32]byte // BLAKE3 of the digest; never the digest itself
	PolicyHash    [32]byte
	Code          uint16 // result code, numeric (the wire code)
	CodeName      string // result code, name ("OK", "PAUSED", ...)
	LatencyMicros uint32
	Peer          string // who asked: uid/gid or certificate identity
	Detail        string // short free text for non-sign events; never secrets

	// PrevHash is the Hash of record Seq-1 (zero for Seq 1) and Hash is
	// BLAKE3 of the record's canonical encoding (every field above and
	// PrevHash). Both are set by Append.
	PrevHash [32]byte
	Hash     [32]byte
}

// HashDigest returns the value to store in Record.DigestHash for a digest.
// The journal keeps this hash so that a holder of the digest can prove a
// record is about it, while the journal itself reveals nothing about it.
func HashDigest(digest []byte) [32]byte { return blake3.Sum256(digest) }

// Record encoding, format version 1. All integers are big-endian; every
// string is a 2-byte length followed by its bytes. The layout is fixed so
// the encoding is canonical (one record, one byte string) and can be
// recomputed by an independent verifier from this description alone:
//
//	off  size  field
//	0    1     format version (1)
//	1    8     Seq
//	9    8     Time, Unix nanoseconds (signed)
//	17   4     Version
//	21   2     Code
//	23   4     LatencyMicros
//	27   32    DigestHash
//	59   32    PolicyHash
//	91   32    PrevHash
//	123  ...   Tenant, Slot, KID, Op, Algorithm, CodeName, Peer, Detail
//	end-32 32  Hash = BLAKE3-256(bytes[0 : end-32])
const (
	recordFormatV1   = 1
	recordFixedLen   = 123
	recordStringN    = 8
	maxStringLen     = 1<<16 - 1
	offSeq           = 1
	offTime          = 9
	offVersion       = 17
	offCode          = 21
	offLatency       = 23
	offDigestHash    = 27
	offPolicyHash    = 59
	offPrevHash      = 91
	minRecordEncoded = recordFixedLen + 2*recordStringN + 32
)

// errUndecodable marks a stored value that is not a valid record encoding.
var errUndecodable = errors.New("undecodable record")

// toValidUTF8 replaces each run of bytes that are not UTF-8 in the
// record's strings with U+FFFD, in place, before the record is hashed. The
// JSON export (encoding/json) writes such bytes as U+FFFD, so a record
// hashed over the raw bytes would export as text that no longer hashes to
// its Hash; the fields may be a client's text (a refused request's key
// name) or a provider's error. Valid strings are left as they are, with
// no allocation.
func (r *Record) toValidUTF8() {
	for _, s := range [...]*string{&r.Tenant, &r.Slot, &r.KID, &r.Op, &r.Algorithm, &r.CodeName, &r.Peer, &r.Detail} {
		if !utf8.ValidString(*s) {
			*s = strings.ToValidUTF8(*s, "\uFFFD")
		}
	}
}

// validate reports a record that cannot be encoded. It runs in Append, on
// the caller's goroutine, so a bad record never reaches a commit group.
func (r *Record) validate() error {
	for _, f := range [...]struct {
		name string
		s    string
	}{
		{"tenant", r.Tenant}, {"slot", r.Slot}, {"kid", r.KID}, {"op", r.Op},
		{"algorithm", r.Algorithm}, {"code name", r.CodeName}, {"peer", r.Peer},
		{"detail", r.Detail},
	} {
		if len(f.s) > maxStringLen {
			return fmt.Errorf("journal: record %s is %d bytes, the limit is %d", f.name, len(f.s), maxStringLen)
		}
	}
	if !r.Time.IsZero() && (r.Time.Before(minRecordTime) || r.Time.After(maxRecordTime)) {
		return fmt.Errorf("journal: record time %v cannot be stored as Unix nanoseconds", r.Time)
	}
	return nil
}

// The range of int64 Unix nanoseconds, which is how a record stores time.
var (
	minRecordTime = time.Unix(0, math.MinInt64)
	maxRecordTime = time.Unix(0, math.MaxInt64)
)

// encodedLen is the length of the record's encoding, Hash included.
func (r *Record) encodedLen() int {
	return recordFixedLen + 2*recordStringN + 32 +
		len(r.Tenant) + len(r.Slot) + len(r.KID) + len(r.Op) +
		len(r.Algorithm) + len(r.CodeName) + len(r.Peer) + len(r.Detail)
}

// encodeInto writes the record into buf, which must be exactly
// r.encodedLen() bytes, computes the chain hash over it, and stores that
// hash both in buf's tail and in r.Hash. It does not allocate.
func (r *Record) encodeInto(buf []byte) {
	buf[0] = recordFormatV1
	binary.BigEndian.PutUint64(buf[offSeq:], r.Seq)
	binary.BigEndian.PutUint64(buf[offTime:], uint64(r.Time.UnixNano()))
	binary.BigEndian.PutUint32(buf[offVersion:], r.Version)
	binary.BigEndian.PutUint16(buf[offCode:], r.Code)
	binary.BigEndian.PutUint32(buf[offLatency:], r.LatencyMicros)
	copy(buf[offDigestHash:], r.DigestHash[:])
	copy(buf[offPolicyHash:], r.PolicyHash[:])
	copy(buf[offPrevHash:], r.PrevHash[:])
	p := recordFixedLen
	for _, s := range [recordStringN]string{r.Tenant, r.Slot, r.KID, r.Op, r.Algorithm, r.CodeName, r.Peer, r.Detail} {
		binary.BigEndian.PutUint16(buf[p:], uint16(len(s)))
		p += 2
		p += copy(buf[p:], s)
	}
	r.Hash = blake3.Sum256(buf[:p])
	copy(buf[p:], r.Hash[:])
}

// encode returns the record's encoding with a freshly computed Hash.
func (r *Record) encode() []byte {
	buf := make([]byte, r.encodedLen())
	r.encodeInto(buf)
	return buf
}

// decodeRecord parses a stored record into r, strictly: an unknown format
// version, a length that runs past the end, or trailing bytes are errors.
// It does not check the hash (computedHash does).
func decodeRecord(buf []byte, r *Record) error {
	if len(buf) < minRecordEncoded {
		return fmt.Errorf("%w: %d bytes, shorter than the minimum %d", errUndecodable, len(buf), minRecordEncoded)
	}
	if buf[0] != recordFormatV1 {
		return fmt.Errorf("%w: unknown format version %d", errUndecodable, buf[0])
	}
	n, err := recordLen(buf)
	if err != nil {
		return err
	}
	if n != len(buf) {
		return fmt.Errorf("%w: %d trailing bytes", errUndecodable, len(buf)-n)
	}
	r.Seq = binary.BigEndian.Uint64(buf[offSeq:])
	r.Time = time.Unix(0, int64(binary.BigEndian.Uint64(buf[offTime:]))).UTC()
	r.Version = binary.BigEndian.Uint32(buf[offVersion:])
	r.Code = binary.BigEndian.Uint16(buf[offCode:])
	r.LatencyMicros = binary.BigEndian.Uint32(buf[offLatency:])
	copy(r.DigestHash[:], buf[offDigestHash:])
	copy(r.PolicyHash[:], buf[offPolicyHash:])
	copy(r.PrevHash[:], buf[offPrevHash:])
	// recordLen checked every string length against the end.
	p := recordFixedLen
	var strs [recordStringN]string
	for i := range strs {
		n := int(binary.BigEndian.Uint16(buf[p:]))
		strs[i] = string(buf[p+2 : p+2+n])
		p += 2 + n
	}
	r.Tenant, r.Slot, r.KID, r.Op, r.Algorithm, r.CodeName, r.Peer, r.Detail =
		strs[0], strs[1], strs[2], strs[3], strs[4], strs[5], strs[6], strs[7]
	copy(r.Hash[:], buf[len(buf)-32:])
	return nil
}

// recordLen returns the length of the record encoding at the start of
// buf, found by walking its string lengths; it checks nothing else. It is
// the one walk of a record's layout that decodeRecord and the readers of
// runs share.
func recordLen(buf []byte) (int, error) {
	if len(buf) < minRecordEncoded {
		return 0, fmt.Errorf("%w: %d bytes, shorter than the minimum %d", errUndecodable, len(buf), minRecordEncoded)
	}
	end := len(buf) - 32 // the strings end before a hash, at the latest here
	p := recordFixedLen
	for i := range recordStringN {
		if p+2 > end {
			return 0, fmt.Errorf("%w: string %d length runs past the end", errUndecodable, i)
		}
		p += 2 + int(binary.BigEndian.Uint16(buf[p:]))
		if p > end {
			return 0, fmt.Errorf("%w: string %d runs past the end", errUndecodable, i)
		}
	}
	return p + 32, nil
}

// A stored audit value is a run: one record, or several consecutive
// records concatenated, stored under the seq of its first (see doc.go,
// "Key layout"). A record's encoding says where it ends, so a run needs
// no framing of its own, and a value of one record is a run of one.

// nextInRun splits the first record off a run. A record whose string
// lengths run past the end makes the rest of the run unreadable.
func nextInRun(run []byte) (rec, rest []byte, err error) {
	n, err := recordLen(run)
	if err != nil {
		return nil, nil, err
	}
	return run[:n], run[n:], nil
}

// walkRun calls fn with each record of the run stored under first and
// its seq, in order, and stops at fn's first error. A record whose end
// cannot be found stops it with an error naming that record's seq.
func walkRun(run []byte, first uint64, fn func(seq uint64, rec []byte) error) error {
	for seq := first; len(run) > 0; seq++ {
		rec, rest, err := nextInRun(run)
		if err != nil {
			return fmt.Errorf("journal: record %d: %w", seq, err)
		}
		if err := fn(seq, rec); err != nil {
			return err
		}
		run = rest
	}
	return nil
}

// runLen counts the records of a run; on an error, those before it.
func runLen(run []byte) (n uint64, err error) {
	err = walkRun(run, 0, func(uint64, []byte) error { n++; return nil })
	return n, err
}

// computedHash is the hash a stored record should carry: BLAKE3 of its
// bytes without the trailing stored hash.
func computedHash(buf []byte) [32]byte { return blake3.Sum256(buf[:len(buf)-32]) }

// peekTenant returns the tenant bytes of an encoded record without
// decoding the rest, so filtered scans skip other tenants cheaply.
func peekTenant(buf []byte) ([]byte, bool) {
	if len(buf) < minRecordEncoded {
		return nil, false
	}
	n := int(binary.BigEndian.Uint16(buf[recordFixedLen:]))
	if recordFixedLen+2+n > len(buf)-32 {
		return nil, false
	}
	return buf[recordFixedLen+2 : recordFixedLen+2+n], true
}

// peekTime returns the time of an encoded record without decoding it.
func peekTime(buf []byte) (int64, bool) {
	if len(buf) < minRecordEncoded {
		return 0, false
	}
	return int64(binary.BigEndian.Uint64(buf[offTime:])), true
}

// jsonRecord is the export shape of a Record: the fleet's log pipeline
// reads these names. Hashes are lower-case hex.
type jsonRecord struct {
	Seq           uint64 `json:"seq"`
	Time          string `json:"time"`
	Tenant        string `json:"tenant"`
	Slot          string `json:"slot"`
	Version       uint32 `json:"version"`
	KID           string `json:"kid"`
	Op            string `json:"op"`
	Algorithm     string `json:"alg"`
	DigestHash    string `json:"digest_hash"`
	PolicyHash    string `json:"policy_hash"`
	Code          uint16 `json:"code"`
	CodeName      string `json:"code_name"`
	LatencyMicros uint32 `json:"latency_us"`
	Peer          string `json:"peer"`
	Detail        string `json:"detail,omitempty"`
	PrevHash      string `json:"prev_hash"`
	Hash          string `json:"hash"`
}

// MarshalJSON encodes the record in the export shape used by WriteJSONL:
// snake_case names, RFC 3339 UTC time with nanoseconds, hashes in hex.
func (r *Record) MarshalJSON() ([]byte, error) {
	return json.Marshal(jsonRecord{
		Seq:           r.Seq,
		Time:          r.Time.UTC().Format(time.RFC3339Nano),
		Tenant:        r.Tenant,
		Slot:          r.Slot,
		Version:       r.Version,
		KID:           r.KID,
		Op:            r.Op,
		Algorithm:     r.Algorithm,
		DigestHash:    hex.EncodeToString(r.DigestHash[:]),
		PolicyHash:    hex.EncodeToString(r.PolicyHash[:]),
		Code:          r.Code,
		CodeName:      r.CodeName,
		LatencyMicros: r.LatencyMicros,
		Peer:          r.Peer,
		Detail:        r.Detail,
		PrevHash:      hex.EncodeToString(r.PrevHash[:]),
		Hash:          hex.EncodeToString(r.Hash[:]),
	})
}
