package agent

import (
	"context"
	"errors"

	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/agent/rotation"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
)

// Code is the stable code of an error from the agent: of a request's failure,
// and of a failed start (a wrong PIN is PIN_INCORRECT), for the log line an
// operator reads.
func Code(err error) proto.Code { return codeOf(err) }

// codeOf maps an error from the request path to its wire code. This is the
// one place where that mapping lives.
func codeOf(err error) proto.Code {
	if err == nil {
		return proto.OK // before pe exists: errors.As makes it escape, and OK is the hot path
	}
	var pe *proto.Error
	switch {
	case errors.As(err, &pe):
		return pe.Code
	case errors.Is(err, providers.ErrNotFound):
		return proto.NotFound
	case errors.Is(err, providers.ErrUnsupportedAlgorithm):
		return proto.UnsupportedAlgorithm
	case errors.Is(err, providers.ErrBadRequest):
		return proto.BadRequest
	case errors.Is(err, providers.ErrPINIncorrect):
		return proto.PINIncorrect
	case errors.Is(err, providers.ErrTokenLocked):
		return proto.TokenLocked
	case errors.Is(err, providers.ErrRateLimited):
		return proto.RateLimited
	case errors.Is(err, providers.ErrUnavailable):
		return proto.Unavailable
	case errors.Is(err, journal.ErrUnavailable):
		return proto.JournalUnavailable
	case errors.Is(err, rotation.ErrKeyRetired):
		return proto.KeyRetired
	case errors.Is(err, context.DeadlineExceeded):
		return proto.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		return proto.Unavailable
	}
	return proto.Internal
}

// clientMessage is what a caller is told. Provider and agent errors are built
// without secrets and are safe to return; an unclassified error may carry
// internals (paths, library text), so the caller gets a fixed text and the
// log gets the detail.
func clientMessage(code proto.Code, err error) string {
	if code == proto.Internal {
		return "internal error; see the agent's log"
	}
	var pe *proto.Error
	if errors.As(err, &pe) {
		return pe.Msg
	}
	return err.Error()
}
