package client

import (
	"context"
	"errors"
	"strings"

	"github.com/sigil-agent/sigil/proto"
)

// ErrClosed is returned for calls on a closed client.
var ErrClosed = errors.New("sigil: client closed")

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
}

func (f *failure) Error() string {
	lead := "sigil"
	if !uncoded(f.cause) {
		lead = Code(f).String()
	}
	return lead + ": " + f.body()
}

// uncoded reports whether err is the caller's or the client's own doing,
// which the protocol has no code for (Code says UNAVAILABLE of it all the
// same): a cancellation, a closed client, a default socket directory the
// client will not trust. Their texts lead with "sigil: ".
func uncoded(err error) bool {
	return errors.Is(err, context.Canceled) || errors.Is(err, ErrClosed) || errors.Is(err, proto.ErrUntrustedSocketDir)
}

func (f *failure) Unwrap() error { return f.cause }

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
