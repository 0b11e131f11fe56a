package client

import (
	"context"
	"errors"
	"strings"

	"github.com/sigil-agent/sigil/proto"
)

// ErrClosed is returned for calls on a closed client, and for calls
// waiting for their replies when it was closed. Code gives BAD_REQUEST:
// Close is final, so the call fails the same way every time, and it is
// not the UNAVAILABLE of an agent that cannot be reached, which a caller
// retries.
var ErrClosed = errors.New("sigil: client closed")

// ErrRefusedByClient is in the chain of a request the client refused
// itself, before any of it was sent: an argument the protocol cannot
// carry or the agent would refuse for what it is (a request larger than
// one frame, a hash or signer option the protocol has no number for, a
// rotation scheduled for the Unix epoch or before, a DialTLS without a
// tls.Config). Code gives BAD_REQUEST, or
// UNSUPPORTED_ALGORITHM for an algorithm. The agent never saw it and
// journaled nothing, and the same request fails the same way again: it is
// not to be retried, and it is not the agent's refusal (no *proto.Error).
var ErrRefusedByClient = errors.New("sigil: refused by the client, not sent")

// ErrMalformedReply is in the chain of a reply the client cannot take: a
// frame that is empty or over the limit, a message that does not decode, a
// final reply with code OK, a Hello answered OK for another protocol
// version, a Sign answered without a signature or by another kid than asked,
// a public key that does not parse, an evidence pack's parts that do not
// add up. Code gives INTERNAL, as the agent does
// for its own bugs: whatever answers at the address broke the protocol,
// and retrying will not mend it. A frame that does not decode ends the
// connection; a later call dials a new one.
var ErrMalformedReply = errors.New("sigil: malformed reply")

// ErrNoCertificate is in the chain of TLSCertificate's NOT_FOUND when the
// client finds no certificate under the name in the key list the agent
// sent: no key of that name, or one without a certificate. Code gives
// NOT_FOUND. It is not a *proto.Error: the agent answered the list, and
// it is the client that found nothing in it. (A qualified name the agent
// itself answers NOT_FOUND for is the agent's *proto.Error.)
var ErrNoCertificate = errors.New("sigil: no certificate under that name")

// failure is an error of a call that the agent did not answer with a code
// of its own: a dial, a lost connection, a deadline. Its text says what
// happened once: the name of the code Code gives it first, or "sigil: "
// when the protocol has no code for it (uncoded), then what, then the
// cause in its own words, without the code or the "sigil: " a cause of
// this package or of package proto starts with, so that a failure wrapping
// another does not repeat them. The cause stays in the chain for errors.Is
// and errors.As (a context error, a *net.OpError, an agent's *proto.Error).
type failure struct {
	what  string // what happened, in this package's words
	cause error  // nil when what says it all
	// code is the client's own finding (refused, malformedReply,
	// noCertificate), which Code gives; 0 leaves the code to the cause,
	// else UNAVAILABLE.
	code proto.Code
	kind error // ErrRefusedByClient, ErrMalformedReply or ErrNoCertificate with code, for errors.Is
}

func (f *failure) Error() string {
	lead := "sigil"
	if !uncoded(f.cause) {
		lead = Code(f).String()
	}
	return lead + ": " + f.body()
}

// uncoded reports whether err is the caller's or the client's own doing,
// which the protocol has no code that names: a cancellation, a closed
// client, a default socket directory the client will not trust. Their
// texts lead with "sigil: ", not with the nearest code Code gives them
// (DEADLINE_EXCEEDED, BAD_REQUEST, UNAUTHENTICATED), which would misname
// them.
func uncoded(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, ErrClosed) || errors.Is(err, proto.ErrUntrustedSocketDir)
}

func (f *failure) Unwrap() error { return f.cause }

// Is makes errors.Is(err, ErrRefusedByClient), (err, ErrMalformedReply)
// and (err, ErrNoCertificate) match the failures that are such.
func (f *failure) Is(target error) bool { return f.kind != nil && target == f.kind }

// body is the text after the lead.
func (f *failure) body() string {
	if c := causeText(f.cause); c != "" {
		return f.what + ": " + c
	}
	return f.what
}

// causeText is err's text as the cause of a failure, whose lead already
// names its code or says "sigil".
func causeText(err error) string {
	switch e := err.(type) {
	case nil:
		return ""
	case *failure:
		return e.body()
	case *proto.Error:
		return e.Msg // the lead is its code
	}
	return strings.TrimPrefix(err.Error(), "sigil: ")
}

// failed returns a failure: what happened, and why (cause, may be nil).
func failed(what string, cause error) error { return &failure{what: what, cause: cause} }

// refused is a request the client refuses to send, with the code the agent
// would have answered it with (ErrRefusedByClient).
func refused(code proto.Code, what string) error {
	return &failure{what: what, code: code, kind: ErrRefusedByClient}
}

// malformedReply is a reply the client cannot take (ErrMalformedReply):
// what says which, cause (may be nil) why.
func malformedReply(what string, cause error) error {
	return &failure{what: what, cause: cause, code: proto.Internal, kind: ErrMalformedReply}
}

// noCertificate is TLSCertificate's NOT_FOUND (ErrNoCertificate): what
// says which name and why.
func noCertificate(what string) error {
	return &failure{what: what, code: proto.NotFound, kind: ErrNoCertificate}
}
