package agent

import (
	"context"
	"errors"
	"math"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/proto"
)

type ctxKey struct{}

func newReq(parent context.Context, deadline time.Time) (context.Context, func()) {
	rc := newRequestContext(parent, deadline)
	return rc, rc.release
}

// A request's context ends as one from context.WithDeadline would, whether
// or not anything armed its timer by waiting on Done.
func TestRequestContext(t *testing.T) {
	// closed reports whether done closes within the given time. Tests of a
	// waiter take Done before the event, so the timer is armed first.
	// A done that closed while a stalled machine let the timer fire too
	// counts as closed: select would pick either at random.
	closed := func(done <-chan struct{}, within time.Duration) bool {
		select {
		case <-done:
			return true
		case <-time.After(within):
			select {
			case <-done:
				return true
			default:
				return false
			}
		}
	}
	cases := []struct {
		name string
		run  func(t *testing.T, parent context.Context, cancelParent context.CancelFunc)
	}{
		{"deadline passes with nobody waiting", func(t *testing.T, parent context.Context, _ context.CancelFunc) {
			deadline := time.Now().Add(200 * time.Millisecond)
			ctx, release := newReq(parent, deadline)
			defer release()
			if err := ctx.Err(); err != nil && time.Now().Before(deadline) {
				t.Fatalf("before the deadline: %v", err)
			}
			time.Sleep(250 * time.Millisecond)
			if err := ctx.Err(); !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("after the deadline: %v, want DeadlineExceeded", err)
			}
			// Not closed would mean never closed, with no timer armed: 1s
			// tells that apart from a stalled machine.
			if !closed(ctx.Done(), time.Second) {
				t.Fatal("Done not closed after the deadline")
			}
		}},
		{"a waiter is woken at the deadline", func(t *testing.T, parent context.Context, _ context.CancelFunc) {
			deadline := time.Now().Add(200 * time.Millisecond)
			ctx, release := newReq(parent, deadline)
			defer release()
			// Closed after the deadline is right, however stalled the
			// machine was before the check.
			if closed(ctx.Done(), 5*time.Millisecond) && time.Now().Before(deadline) {
				t.Fatal("Done closed before the deadline")
			}
			if !closed(ctx.Done(), 5*time.Second) {
				t.Fatal("Done not closed at the deadline")
			}
			if err := ctx.Err(); !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("Err %v, want DeadlineExceeded", err)
			}
		}},
		{"the connection ends before anyone waits", func(t *testing.T, parent context.Context, cancelParent context.CancelFunc) {
			ctx, release := newReq(parent, time.Now().Add(time.Hour))
			defer release()
			cancelParent()
			if err := ctx.Err(); !errors.Is(err, context.Canceled) {
				t.Fatalf("Err %v, want Canceled", err)
			}
			if !closed(ctx.Done(), 5*time.Second) {
				t.Fatal("Done not closed after the parent ended")
			}
		}},
		{"the connection ends while a waiter waits", func(t *testing.T, parent context.Context, cancelParent context.CancelFunc) {
			ctx, release := newReq(parent, time.Now().Add(time.Hour))
			defer release()
			done := ctx.Done()
			cancelParent()
			if !closed(done, 5*time.Second) {
				t.Fatal("waiter not woken when the parent ended")
			}
			if err := ctx.Err(); !errors.Is(err, context.Canceled) {
				t.Fatalf("Err %v, want Canceled", err)
			}
		}},
		{"released without waiting", func(t *testing.T, parent context.Context, _ context.CancelFunc) {
			ctx, release := newReq(parent, time.Now().Add(time.Hour))
			release()
			if err := ctx.Err(); !errors.Is(err, context.Canceled) {
				t.Fatalf("Err %v, want Canceled", err)
			}
			if !closed(ctx.Done(), 5*time.Second) {
				t.Fatal("Done of a released context not closed")
			}
		}},
		{"released after a wait began", func(t *testing.T, parent context.Context, _ context.CancelFunc) {
			ctx, release := newReq(parent, time.Now().Add(time.Hour))
			done := ctx.Done()
			release()
			if !closed(done, 5*time.Second) {
				t.Fatal("waiter not woken by release")
			}
		}},
		{"deadline and values", func(t *testing.T, parent context.Context, _ context.CancelFunc) {
			want := time.Now().Add(time.Hour)
			ctx, release := newReq(context.WithValue(parent, ctxKey{}, "v"), want)
			defer release()
			if d, ok := ctx.Deadline(); !ok || !d.Equal(want) {
				t.Fatalf("Deadline %v %v, want %v", d, ok, want)
			}
			if v := ctx.Value(ctxKey{}); v != "v" {
				t.Fatalf("Value %v", v)
			}
		}},
		{"a parent that ends first keeps its deadline", func(t *testing.T, parent context.Context, _ context.CancelFunc) {
			early, cancel := context.WithTimeout(parent, time.Minute)
			defer cancel()
			want, _ := early.Deadline()
			ctx, release := newReq(early, time.Now().Add(time.Hour))
			defer release()
			if d, ok := ctx.Deadline(); !ok || !d.Equal(want) {
				t.Fatalf("Deadline %v %v, want the parent's %v", d, ok, want)
			}
		}},
		{"a derived context ends with it", func(t *testing.T, parent context.Context, _ context.CancelFunc) {
			ctx, release := newReq(parent, time.Now().Add(time.Hour))
			child, cancel := context.WithTimeout(ctx, time.Hour)
			defer cancel()
			release()
			if !closed(child.Done(), 5*time.Second) {
				t.Fatal("derived context not ended by release")
			}
			if err := child.Err(); !errors.Is(err, context.Canceled) {
				t.Fatalf("derived Err %v, want Canceled", err)
			}
		}},
		{"checking Err arms no timer", func(t *testing.T, parent context.Context, _ context.CancelFunc) {
			ctx, release := newReq(parent, time.Now().Add(time.Hour))
			defer release()
			_ = ctx.Err()
			if ctx.(*requestContext).armed.Load() != nil {
				t.Fatal("Err armed the timer")
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			parent, cancel := context.WithCancel(context.Background())
			defer cancel()
			tc.run(t, parent, cancel)
		})
	}
}

// A request's deadline is the tighter of the client's tmo and the agent's
// limits.request_timeout. tmo is a uint on the wire: from 2^32-1 ms up it
// reads as proto.TimeoutOutOfRange, a deadline too far off to tighten the
// agent's own limit, whatever that limit is; it must not wrap onto a short
// one either (2^32+1 ms is not 1 ms).
func TestRequestTimeout(t *testing.T) {
	const longLimit = 100 * 24 * time.Hour // past 2^32-1 ms, about 49.7 days
	for _, tc := range []struct {
		limit time.Duration
		tmo   uint32
		want  time.Duration
	}{
		{5 * time.Second, 0, 5 * time.Second},
		{5 * time.Second, 1, time.Millisecond},
		{5 * time.Second, 4999, 4999 * time.Millisecond},
		{5 * time.Second, 6000, 5 * time.Second},
		{5 * time.Second, proto.TimeoutOutOfRange, 5 * time.Second},
		{longLimit, 0, longLimit},
		{longLimit, math.MaxUint32 - 1, (math.MaxUint32 - 1) * time.Millisecond},
		{longLimit, proto.TimeoutOutOfRange, longLimit},
	} {
		c := &conn{a: &Agent{cfg: Config{Limits: Limits{RequestTimeout: tc.limit}}}}
		if got := c.requestTimeout(&proto.Request{TimeoutMillis: tc.tmo}); got != tc.want {
			t.Errorf("limit %s, tmo %d ms: %s, want %s", tc.limit, tc.tmo, got, tc.want)
		}
	}
}
