package proto

import (
	"math"
	"strconv"
)

// Version is the protocol version this package speaks.
const Version uint16 = 1

// VersionOutOfRange is what the decoder reads for a version number too large
// for uint16: 65535 and every number past it (ver is a uint on the wire).
// No version will ever be numbered so, and the agent answers it
// UNSUPPORTED_VERSION like any version it does not speak.
const VersionOutOfRange uint16 = 0xffff

// Feature bits a peer announces in Hello. None are defined yet; unknown bits
// are ignored.
const (
	FeaturePipelining uint64 = 1 << 0 // replies may arrive out of order
)

// DefaultMaxFrame bounds a frame's payload. It is checked before a buffer is
// allocated, so a hostile length costs nothing.
const DefaultMaxFrame = 64 << 10

// Op is an operation number.
type Op uint8

const (
	OpHello     Op = 1
	OpPing      Op = 2
	OpListKeys  Op = 3
	OpPublicKey Op = 4
	OpSign      Op = 5
	OpVerify    Op = 6
	// Admin operations: numbers reserved now so they never move.
	OpRotate       Op = 16
	OpRollback     Op = 17
	OpPause        Op = 18
	OpResume       Op = 19
	OpReloadPolicy Op = 20
	OpAuditTail    Op = 21
	OpExportREP    Op = 22
	// OpIncidentDrill pauses a slot, rotates it in emergency mode, re-signs
	// the canaries, resumes it and writes an incident statement.
	OpIncidentDrill Op = 23
	// OpAuditVerify recomputes the running agent's audit chain.
	OpAuditVerify Op = 24
	// OpAuditPrune deletes the audit records older than Request.At (Unix
	// seconds), keeping the chain verifiable.
	OpAuditPrune Op = 25

	// OpOutOfRange is what the decoder reads for an op number too large for
	// Op: 255 and every number past it (op is a uint on the wire). No
	// operation will ever be numbered so: such a request is an unknown op
	// like any other (BAD_REQUEST, the connection stays open), and Op stays
	// one byte.
	OpOutOfRange Op = 0xff
)

var opNames = map[Op]string{
	OpHello: "Hello", OpPing: "Ping", OpListKeys: "ListKeys", OpPublicKey: "PublicKey",
	OpSign: "Sign", OpVerify: "Verify", OpRotate: "Rotate", OpRollback: "Rollback",
	OpPause: "Pause", OpResume: "Resume", OpReloadPolicy: "ReloadPolicy",
	OpAuditTail: "AuditTail", OpExportREP: "ExportREP", OpIncidentDrill: "IncidentDrill",
	OpAuditVerify: "AuditVerify", OpAuditPrune: "AuditPrune",
}

func (o Op) String() string {
	if n, ok := opNames[o]; ok {
		return n
	}
	if o == OpOutOfRange {
		return "Op255+"
	}
	return "Op" + strconv.Itoa(int(o))
}

// Scheme numbers on the wire (equal to providers.Scheme).
const (
	SchemeECDSA    uint8 = 1
	SchemePKCS1v15 uint8 = 2
	SchemePSS      uint8 = 3
	SchemeEd25519  uint8 = 4
)

// Hash numbers on the wire. HashNone is for pure Ed25519, and in a Sign
// request with SchemeDefault it asks for the key's default algorithm.
const (
	HashNone   uint8 = 0
	HashSHA256 uint8 = 1
	HashSHA384 uint8 = 2
	HashSHA512 uint8 = 3
)

// SchemeDefault (0) in a Sign request asks for the key's default algorithm
// (ECDSA with the curve's hash, RSA PKCS#1 v1.5 SHA-256, pure Ed25519).
const SchemeDefault uint8 = 0

// SchemeOutOfRange and HashOutOfRange are what the decoder reads for a
// scheme or hash number too large for a byte: 255 and every number past it
// (sch and hash are uints on the wire). No scheme or hash will ever be
// numbered so: the agent answers UNSUPPORTED_ALGORITHM, as for any number
// it does not know.
const (
	SchemeOutOfRange uint8 = 0xff
	HashOutOfRange   uint8 = 0xff
)

// TimeoutOutOfRange is what the decoder reads for a tmo of 2^32-1 ms (about
// 49.7 days) or more: a client deadline too far off to tighten the agent's
// own limits.request_timeout, whatever that is.
const TimeoutOutOfRange uint32 = 0xffffffff

// LimitOutOfRange is what the decoder reads for an n of 2^32-1 or more:
// past AuditTail's cap (100 records), and a pack number no evidence pack
// will ever have (ExportREP answers NOT_FOUND).
const LimitOutOfRange uint32 = 0xffffffff

// AtOutOfRange is what the decoder reads for an at of 2^63-1 or more (at
// is an int on the wire, and a client may write a time in the uint
// family, up to 2^64-1): seconds long past the year 9999, where the
// agent's times end. The agent refuses it as out of range (BAD_REQUEST);
// read as an int64 it would wrap onto a negative number, a time before
// 1970, and the refusal would name the wrong reason.
const AtOutOfRange int64 = math.MaxInt64
