package rotation

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
)

// WireCode is the agent's one error-to-code mapping: wrapped sentinels keep
// their codes, a rotation already running is UNAVAILABLE (retry later), and
// what is not recognised is INTERNAL.
func TestWireCode(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want proto.Code
	}{
		{nil, proto.OK},
		{&proto.Error{Code: proto.Paused, Msg: "x"}, proto.Paused},
		{fmt.Errorf("step: %w", &proto.Error{Code: proto.QuotaExceeded}), proto.QuotaExceeded},
		{fmt.Errorf("v1: %w", ErrKeyRetired), proto.KeyRetired},
		{ErrNotFound, proto.NotFound},
		{fmt.Errorf("sign: %w", providers.ErrNotFound), proto.NotFound},
		{providers.ErrUnsupportedAlgorithm, proto.UnsupportedAlgorithm},
		{providers.ErrBadRequest, proto.BadRequest},
		{fmt.Errorf("destroy: %w", ErrKeyInUse), proto.PermissionDenied},
		{fmt.Errorf("awskms destroy: alias names it: %w", providers.ErrInUse), proto.PermissionDenied},
		{providers.ErrPINIncorrect, proto.PINIncorrect},
		{providers.ErrTokenLocked, proto.TokenLocked},
		{fmt.Errorf("kms: %w", providers.ErrRateLimited), proto.RateLimited},
		{providers.ErrUnavailable, proto.Unavailable},
		{fmt.Errorf("rotate: %w", ErrBusy), proto.Unavailable},
		{context.Canceled, proto.Unavailable},
		{fmt.Errorf("append: %w", journal.ErrUnavailable), proto.JournalUnavailable},
		{context.DeadlineExceeded, proto.DeadlineExceeded},
		{&StepError{Slot: "t/s", Step: StepKeygen, Err: providers.ErrUnavailable}, proto.Unavailable},
		{fmt.Errorf("rotate: %w", ErrBadRequest), proto.BadRequest},
		{errors.New("something else"), proto.Internal},
	} {
		if got := WireCode(tc.err); got != tc.want {
			t.Errorf("WireCode(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}
