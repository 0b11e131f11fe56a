package agent

import (
	"errors"

	"github.com/sigil-agent/sigil/agent/rotation"
	"github.com/sigil-agent/sigil/proto"
)

// Code is the stable code of an error from the agent: of a request's failure,
// and of a failed start (a wrong PIN is PIN_INCORRECT), for the log line an
// operator reads.
func Code(err error) proto.Code { return codeOf(err) }

// codeOf maps an error from the request path to its wire code
// (rotation.WireCode, the one mapping).
func codeOf(err error) proto.Code {
	if err == nil {
		return proto.OK // the hot path: no call, nothing escapes
	}
	return rotation.WireCode(err)
}

// clientMessage is what a caller is told. A *proto.Error is written for the
// caller, whatever its code (an INTERNAL one too: a prune refused over a
// broken chain names the break), and provider and agent errors are built
// without secrets; an unclassified error that maps to INTERNAL may carry
// internals (paths, library text), so the caller gets a fixed text and the
// log gets the detail.
func clientMessage(code proto.Code, err error) string {
	var pe *proto.Error
	if errors.As(err, &pe) {
		return pe.Msg
	}
	var pf *providerFailure
	if code == proto.Internal || errors.As(err, &pf) {
		return fixedMessage(code)
	}
	return err.Error()
}

// providerFailure is a provider's signing error on its way to a client. A
// provider's text names the agent's own things: its key names, a key's
// ARN (and with it the cloud account), a vault's URL, a token's label.
// A tenant is told the code and a fixed text; the log has the detail.
type providerFailure struct{ err error }

func (e *providerFailure) Error() string { return e.err.Error() }
func (e *providerFailure) Unwrap() error { return e.err }

// fixedMessage is what a client is told of a failure whose own text is
// not for it.
func fixedMessage(code proto.Code) string {
	switch code {
	case proto.Internal:
		return "internal error; see the agent's log"
	case proto.Unavailable:
		return "the key's provider could not sign now; see the agent's log"
	case proto.DeadlineExceeded:
		return "the key's provider did not sign within the deadline"
	}
	return "the key's provider refused (" + code.String() + "); see the agent's log"
}
