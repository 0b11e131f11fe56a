package rotation

import (
	"context"
	"errors"
	"fmt"

	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
)

var (
	// ErrKeyRetired: the version is retired, or accepted and past its T1.
	// The agent maps it to KEY_RETIRED.
	ErrKeyRetired = errors.New("key version retired")
	// ErrNotFound: no such slot, version or kid in the slot. It wraps
	// providers.ErrNotFound, so the agent's code mapping gives NOT_FOUND.
	ErrNotFound error = &wrappedSentinel{msg: "rotation: no such key slot or version", is: providers.ErrNotFound}
	// ErrBadRequest: the request is refused for what it asks, not for a
	// fault: a slot name that is not tenant/slot, a one-off rotation time
	// that is not in the future or not after the slot's last activation.
	// The error's text is the reason, for the caller. It wraps
	// providers.ErrBadRequest, so WireCode gives BAD_REQUEST.
	ErrBadRequest error = &wrappedSentinel{msg: "rotation: bad request", is: providers.ErrBadRequest}
	// ErrBusy: another rotation, rollback or drill is running on the slot.
	ErrBusy = errors.New("rotation: another rotation of this slot is in progress")
	// ErrSlotExists: Enroll found the slot already enrolled with another key.
	ErrSlotExists = errors.New("rotation: slot already enrolled")
	// ErrStateUnknown: the journal did not confirm a commit of the slot's
	// state, and the slot could not be read back to see whether it landed.
	// The slot does not sign until it is. It wraps journal.ErrUnavailable
	// (JOURNAL_UNAVAILABLE).
	ErrStateUnknown = fmt.Errorf("%w: rotation state unknown (a commit not confirmed, and not read back)", journal.ErrUnavailable)
	// ErrNotReverted: a rotation failed after its cut-over and the journal
	// has not confirmed the revert yet, so the new version, whose canaries
	// or evidence failed, may be active in it. The slot does not sign until
	// the revert is in. It wraps journal.ErrUnavailable.
	ErrNotReverted = fmt.Errorf("%w: the revert of a failed rotation is not in the journal yet", journal.ErrUnavailable)
)

type wrappedSentinel struct {
	msg string
	is  error
}

func (e *wrappedSentinel) Error() string { return e.msg }
func (e *wrappedSentinel) Unwrap() error { return e.is }

// requestError is a request refused for what it asks: its text is the
// reason alone, and errors.Is finds both its cause and ErrBadRequest.
type requestError struct{ err error }

func (e *requestError) Error() string   { return e.err.Error() }
func (e *requestError) Unwrap() []error { return []error{e.err, ErrBadRequest} }

// refuse is a requestError with the reason format gives.
func refuse(format string, args ...any) error {
	return &requestError{err: fmt.Errorf(format, args...)}
}

// Steps of a rotation, as StepError.Step and journal details name them.
const (
	StepStart    = "start"    // journal the start, reserve the key name
	StepKeygen   = "keygen"   // generate (or look up) the new key
	StepCSR      = "csr"      // CSR signed by the new key
	StepCutover  = "cutover"  // new version active, old accepted
	StepCanary   = "canary"   // canary set signed by the active key and verified
	StepRetire   = "retire"   // emergency rotations: old version retired
	StepEvidence = "evidence" // Rotation Evidence Pack signed, written, stored
)

// StepError is a failed rotation: which step failed and why. When it is
// returned the slot's old version is active (Reverted says whether a
// cutover had to be undone), unless RevertErr is set: then the journal did
// not confirm the revert, or could not say whether the cut-over landed,
// and the new version may be active in it. The slot then does not sign
// (Resolve: ErrNotReverted or ErrStateUnknown) until the store has read it
// back and committed the revert, which the scheduler's rounds and the
// slot's next mutation retry. An agent restarted meanwhile takes the
// journal's state, as after a crash (package documentation, "Crash
// consistency").
type StepError struct {
	Slot      string
	Step      string
	Err       error
	Reverted  bool
	RevertErr error
}

func (e *StepError) Error() string {
	msg := fmt.Sprintf("rotate %s: step %s failed: %v", e.Slot, e.Step, e.Err)
	if e.RevertErr != nil {
		msg += fmt.Sprintf("; revert not confirmed, the slot does not sign until it is: %v", e.RevertErr)
	} else if e.Reverted {
		msg += "; reverted, the old version is active"
	}
	return msg
}

func (e *StepError) Unwrap() error { return e.Err }

// WireCode maps an error from a provider, the journal or this package to
// its wire code: the one mapping, which the agent's replies use too (this is
// the lowest package that knows all those errors). A *proto.Error keeps its
// code; what is not recognised is INTERNAL.
func WireCode(err error) proto.Code {
	var pe *proto.Error
	switch {
	case err == nil:
		return proto.OK
	case errors.As(err, &pe):
		return pe.Code
	case errors.Is(err, ErrKeyRetired):
		return proto.KeyRetired
	case errors.Is(err, providers.ErrNotFound):
		return proto.NotFound
	case errors.Is(err, providers.ErrUnsupportedAlgorithm):
		return proto.UnsupportedAlgorithm
	case errors.Is(err, providers.ErrBadRequest):
		return proto.BadRequest
	case errors.Is(err, providers.ErrInUse):
		// A rotation's unused key kept because something uses it: the
		// agent may not destroy it.
		return proto.PermissionDenied
	case errors.Is(err, providers.ErrPINIncorrect):
		return proto.PINIncorrect
	case errors.Is(err, providers.ErrTokenLocked):
		return proto.TokenLocked
	case errors.Is(err, providers.ErrRateLimited):
		return proto.RateLimited
	case errors.Is(err, providers.ErrUnavailable), errors.Is(err, ErrBusy), errors.Is(err, context.Canceled):
		return proto.Unavailable
	case errors.Is(err, journal.ErrUnavailable):
		return proto.JournalUnavailable
	case errors.Is(err, context.DeadlineExceeded):
		return proto.DeadlineExceeded
	}
	return proto.Internal
}
