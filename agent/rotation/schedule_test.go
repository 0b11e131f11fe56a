package rotation

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
)

func newScheduler(t *testing.T, e *env, cals map[string]Calendar) *Scheduler {
	t.Helper()
	s, err := NewScheduler(e.rot, SchedulerOptions{Calendars: cals, Options: func(string) (RotateOptions, error) {
		o := e.opts()
		o.Reason = ""
		return o, nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestCalendarConfig(t *testing.T) {
	d1, d2 := "2026-03-01T09:00:00Z", "2026-09-01T11:00:00+02:00"
	for _, tc := range []struct {
		in      CalendarConfig
		period  time.Duration
		dates   int
		wantErr bool
	}{
		{in: CalendarConfig{Period: "720h"}, period: 720 * time.Hour},
		{in: CalendarConfig{Period: "30d"}, period: 720 * time.Hour},
		{in: CalendarConfig{Dates: []string{d2, d1, d1}}, dates: 2},
		{in: CalendarConfig{Period: "90d", Dates: []string{d1}}, period: 90 * 24 * time.Hour, dates: 1},
		{in: CalendarConfig{}, wantErr: true},
		{in: CalendarConfig{Period: "10m"}, wantErr: true},
		{in: CalendarConfig{Period: "-720h"}, wantErr: true},
		{in: CalendarConfig{Period: "monthly"}, wantErr: true},
		{in: CalendarConfig{Period: "0d"}, wantErr: true},
		{in: CalendarConfig{Dates: []string{"2026-03-01"}}, wantErr: true},
	} {
		cal, err := tc.in.Parse()
		if (err != nil) != tc.wantErr {
			t.Errorf("%+v: error %v, want error %v", tc.in, err, tc.wantErr)
			continue
		}
		if err == nil && (cal.Period != tc.period || len(cal.Dates) != tc.dates || !slices.IsSortedFunc(cal.Dates, time.Time.Compare)) {
			t.Errorf("%+v: %+v", tc.in, cal)
		}
	}
}

// tick advances the clock to at and runs one scheduler round.
func tick(t *testing.T, e *env, s *Scheduler, at time.Time) TickReport {
	t.Helper()
	e.clock.Set(at)
	rep, err := s.Tick(context.Background())
	if err != nil {
		t.Fatalf("Tick at %v: %v", at, err)
	}
	return rep
}

func TestSchedulerPeriod(t *testing.T) {
	e := newEnv(t, providers.KeyEd25519)
	s := newScheduler(t, e, map[string]Calendar{testSlot: {Period: 720 * time.Hour}})
	if due, ok := s.NextDue(testSlot); !ok || !due.Equal(t0.Add(720*time.Hour)) {
		t.Fatalf("NextDue %v", due)
	}
	if rep := tick(t, e, s, t0.Add(720*time.Hour-time.Second)); len(rep.Rotated) != 0 {
		t.Fatal("rotated before due")
	}
	due1 := t0.Add(720 * time.Hour)
	rep := tick(t, e, s, due1)
	if len(rep.Rotated) != 1 || e.active().Number != 2 {
		t.Fatalf("not rotated when due: %+v", rep)
	}
	if !slices.Contains(ops(e.records()), "rotate.rep") {
		t.Fatal("scheduled rotation wrote no REP")
	}
	if due, _ := s.NextDue(testSlot); !due.Equal(due1.Add(720 * time.Hour)) {
		t.Fatalf("next due %v", due)
	}
	if next := s.Next(); !next.Equal(due1.Add(DefaultOverlap)) {
		t.Fatalf("Next %v, want v1's T1", next)
	}

	// RetireDue on time: v1's T1 is due1 + 24h.
	if rep := tick(t, e, s, due1.Add(DefaultOverlap-time.Second)); len(rep.Retired) != 0 || len(rep.Rotated) != 0 {
		t.Fatalf("early round did something: %+v", rep)
	}
	rep = tick(t, e, s, due1.Add(DefaultOverlap))
	if len(rep.Retired) != 1 || rep.Retired[0].Version != 1 {
		t.Fatalf("v1 not retired at its T1: %+v", rep)
	}
	sl, _ := e.store.Get(testSlot)
	if v, _ := sl.Version(1); v.State != StateRetired || !v.Retired.Equal(due1.Add(DefaultOverlap)) {
		t.Fatalf("v1 after RetireDue: %s %v", v.State, v.Retired)
	}
	if last := e.records()[len(e.records())-1]; last.Op != "retire" || last.Version != 1 {
		t.Fatalf("retirement not journaled: %s v%d", last.Op, last.Version)
	}
	if rep := tick(t, e, s, due1.Add(2*DefaultOverlap)); len(rep.Retired)+len(rep.Rotated) != 0 {
		t.Fatalf("idle round did something: %+v", rep)
	}
	if rep := tick(t, e, s, due1.Add(720*time.Hour)); len(rep.Rotated) != 1 || e.active().Number != 3 {
		t.Fatal("second period did not rotate")
	}
}

func TestSchedulerDates(t *testing.T) {
	e := newEnv(t, providers.KeyEd25519)
	d1, d2 := t0.Add(10*24*time.Hour), t0.Add(20*24*time.Hour)
	s := newScheduler(t, e, map[string]Calendar{testSlot: {Dates: []time.Time{d1, d2}}})
	for _, step := range []struct {
		at      time.Time
		rotated int
		active  int
	}{
		{t0, 0, 1},
		{d1.Add(-time.Minute), 0, 1},
		{d1, 1, 2},
		{d1.Add(time.Minute), 0, 2},
		{d2.Add(-time.Minute), 0, 2},
		{d2.Add(time.Hour), 1, 3}, // late (the agent was down): rotates at once
		{d2.Add(1000 * time.Hour), 0, 3},
	} {
		rep := tick(t, e, s, step.at)
		if len(rep.Rotated) != step.rotated || e.active().Number != step.active {
			t.Fatalf("at %v: rotated %d, active v%d; want %d, v%d", step.at, len(rep.Rotated), e.active().Number, step.rotated, step.active)
		}
	}
	if _, ok := s.NextDue(testSlot); ok {
		t.Fatal("due again after the last date")
	}
}

// failingScheduler is a scheduler of testSlot every 720h whose rotations
// fail (no key can be made) while *fail is true.
func failingScheduler(t *testing.T, e *env, retryAfter time.Duration) (*Scheduler, *bool) {
	t.Helper()
	fail := true
	s, err := NewScheduler(e.rot, SchedulerOptions{
		Calendars:  map[string]Calendar{testSlot: {Period: 720 * time.Hour}},
		RetryAfter: retryAfter,
		Options: func(string) (RotateOptions, error) {
			o := e.opts()
			if fail {
				o.Maker = failingMaker{providers.ErrUnavailable}
			}
			return o, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	return s, &fail
}

func TestSchedulerRetriesAfterFailure(t *testing.T) {
	e := newEnv(t, providers.KeyEd25519)
	s, fail := failingScheduler(t, e, time.Hour)
	due := t0.Add(720 * time.Hour)
	e.clock.Set(due)
	rep, err := s.Tick(context.Background())
	if err == nil || rep.Failed[testSlot] == nil {
		t.Fatalf("failing rotation: %+v %v", rep, err)
	}
	starts := func() int {
		n := 0
		for _, op := range ops(e.records()) {
			if op == "rotate.start" {
				n++
			}
		}
		return n
	}
	if next := s.Next(); !next.Equal(due.Add(time.Hour)) {
		t.Fatalf("Next after a failure %v", next)
	}
	*fail = false
	tick(t, e, s, due.Add(59*time.Minute))
	if starts() != 1 || e.active().Number != 1 {
		t.Fatal("retried before RetryAfter")
	}
	tick(t, e, s, due.Add(time.Hour))
	if starts() != 2 || e.active().Number != 2 {
		t.Fatal("not retried after RetryAfter")
	}
}

// The back-off after a failed scheduled rotation gives way to what the
// operator does meanwhile: a one-off rotation at a time they pick runs then,
// and a rotation by hand that succeeds ends the back-off. The one-off used
// to wait out the back-off.
func TestSchedulerBackOffGivesWayToTheOperator(t *testing.T) {
	for _, tc := range []struct {
		name    string
		operate func(e *env, s *Scheduler, due time.Time) time.Time // returns when to tick
	}{
		{"a one-off at a time within the back-off", func(e *env, s *Scheduler, due time.Time) time.Time {
			at := due.Add(15 * time.Minute)
			if err := s.RotateAt(context.Background(), testSlot, at, "admin"); err != nil {
				t.Fatal(err)
			}
			return at
		}},
		{"a rotation by hand, then the calendar's next due", func(e *env, s *Scheduler, due time.Time) time.Time {
			e.rotate() // v2, at due+5m
			return due.Add(5*time.Minute + 720*time.Hour)
		}},
	} {
		for _, restart := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s, restart %v", tc.name, restart), func(t *testing.T) {
				e := newEnv(t, providers.KeyEd25519)
				s, fail := failingScheduler(t, e, 10000*time.Hour)
				due := t0.Add(720 * time.Hour)
				e.clock.Set(due)
				if _, err := s.Tick(context.Background()); err == nil {
					t.Fatal("the failing rotation succeeded")
				}
				*fail = false
				e.clock.Set(due.Add(5 * time.Minute))
				at := tc.operate(e, s, due)
				if restart {
					e.reopen()
					s, fail = failingScheduler(t, e, 10000*time.Hour)
					*fail = false
				}
				before := e.active().Number
				if rep := tick(t, e, s, at); len(rep.Rotated) != 1 || e.active().Number != before+1 {
					t.Fatalf("at %v: rotated %d, active v%d (was v%d); Next %v", at, len(rep.Rotated), e.active().Number, before, s.Next())
				}
			})
		}
	}
}

// The wait after a failed scheduled rotation, counted from an attempt
// stamped by a clock that was ahead (since stepped back), ends no later
// than retry_after after the restart: waiting for the stamp would stop
// the slot's rotations for as long as the step.
func TestSchedulerBackOffAfterAClockStepBack(t *testing.T) {
	e := newEnv(t, providers.KeyEd25519)
	s, fail := failingScheduler(t, e, time.Hour)
	due := t0.Add(720 * time.Hour)
	ahead := due.Add(1000 * time.Hour) // the clock was 1000h ahead
	e.clock.Set(ahead)
	if _, err := s.Tick(context.Background()); err == nil {
		t.Fatal("the failing rotation succeeded")
	}
	e.clock.Set(due.Add(time.Hour)) // stepped back, then restarted
	e.reopen()
	s, fail = failingScheduler(t, e, time.Hour)
	*fail = false
	if next := s.Next(); !next.Equal(due.Add(2 * time.Hour)) {
		t.Fatalf("Next after the restart %v, want retry_after from the restart, %v", next, due.Add(2*time.Hour))
	}
	if rep := tick(t, e, s, due.Add(2*time.Hour-time.Second)); len(rep.Rotated)+len(rep.Failed) != 0 {
		t.Fatalf("retried before retry_after: %+v", rep)
	}
	if rep := tick(t, e, s, due.Add(2*time.Hour)); len(rep.Rotated) != 1 || e.active().Number != 2 {
		t.Fatalf("not retried retry_after after the restart: %+v", rep)
	}
}

// The same without a restart: a running scheduler that sees the clock
// stepped back waits at most retry_after from the round that sees it. It
// used to wait for the stamp of the clock that was ahead, 1000h here, and
// the slot made no scheduled rotation for as long as the step.
func TestSchedulerBackOffAfterAClockStepBackWhileRunning(t *testing.T) {
	e := newEnv(t, providers.KeyEd25519)
	s, fail := failingScheduler(t, e, time.Hour)
	due := t0.Add(720 * time.Hour)
	e.clock.Set(due.Add(1000 * time.Hour)) // the clock was 1000h ahead
	if _, err := s.Tick(context.Background()); err == nil {
		t.Fatal("the failing rotation succeeded")
	}
	*fail = false
	if rep := tick(t, e, s, due.Add(time.Hour)); len(rep.Rotated)+len(rep.Failed) != 0 { // stepped back
		t.Fatalf("retried at once after the step: %+v", rep)
	}
	if next := s.Next(); !next.Equal(due.Add(2 * time.Hour)) {
		t.Fatalf("Next after the step %v, want retry_after from the round that saw it, %v", next, due.Add(2*time.Hour))
	}
	if rep := tick(t, e, s, due.Add(2*time.Hour-time.Second)); len(rep.Rotated)+len(rep.Failed) != 0 {
		t.Fatalf("retried before retry_after: %+v", rep)
	}
	if rep := tick(t, e, s, due.Add(2*time.Hour)); len(rep.Rotated) != 1 || e.active().Number != 2 {
		t.Fatalf("not retried retry_after after the step: %+v", rep)
	}
}

func TestSchedulerRotateAt(t *testing.T) {
	e := newEnv(t, providers.KeyEd25519)
	s := newScheduler(t, e, nil)
	ctx := context.Background()
	at := t0.Add(3 * time.Hour)
	for _, past := range []time.Time{t0.Add(-time.Hour), t0} {
		if err := s.RotateAt(ctx, testSlot, past, "admin"); WireCode(err) != proto.BadRequest || !strings.Contains(err.Error(), "not in the future") {
			t.Fatalf("RotateAt %v, now %v: %v (%v), want it refused, BAD_REQUEST", past, t0, err, WireCode(err))
		}
	}
	if err := s.RotateAt(ctx, testSlot, at, "admin"); err != nil {
		t.Fatal(err)
	}
	e.reopen() // the one-off time is persisted
	s = newScheduler(t, e, nil)
	if due, ok := s.NextDue(testSlot); !ok || !due.Equal(at) {
		t.Fatalf("NextDue after restart %v %v", due, ok)
	}
	if rep := tick(t, e, s, at.Add(-time.Second)); len(rep.Rotated) != 0 {
		t.Fatal("rotated early")
	}
	if rep := tick(t, e, s, at); len(rep.Rotated) != 1 {
		t.Fatal("not rotated at the scheduled time")
	}
	if sl, _ := e.store.Get(testSlot); len(sl.Scheduled) != 0 {
		t.Fatalf("served one-off time kept: %v", sl.Scheduled)
	}
	if _, ok := s.NextDue(testSlot); ok {
		t.Fatal("still due")
	}
}

// A one-off rotation that fails is retried after RetryAfter, like any
// scheduled one, whichever step failed: a failure after the cut-over
// reverts it, and puts back the one-off time it had served.
func TestSchedulerRetriesFailedRotateAt(t *testing.T) {
	for _, tc := range []struct {
		name   string
		modify func(e *env, o *RotateOptions)
	}{
		{"keygen", func(e *env, o *RotateOptions) { o.Maker = failingMaker{providers.ErrUnavailable} }},
		{"canary", func(e *env, o *RotateOptions) { o.Signer = &corruptingSigner{inner: e.soft, clean: 1} }},
		{"evidence", func(e *env, o *RotateOptions) {
			e.rot.hook = func(step string) error {
				if step == StepEvidence {
					return errInjected
				}
				return nil
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, providers.KeyEd25519)
			fail := true
			s, err := NewScheduler(e.rot, SchedulerOptions{
				RetryAfter: time.Hour,
				Options: func(string) (RotateOptions, error) {
					o := e.opts()
					e.rot.hook = nil
					if fail {
						tc.modify(e, &o)
					}
					return o, nil
				},
			})
			if err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			at := t0.Add(3 * time.Hour)
			if err := s.RotateAt(ctx, testSlot, at, "admin"); err != nil {
				t.Fatal(err)
			}
			e.clock.Set(at)
			if rep, err := s.Tick(ctx); err == nil || rep.Failed[testSlot] == nil {
				t.Fatalf("failing rotation: %+v %v", rep, err)
			}
			if due, ok := s.NextDue(testSlot); !ok || !due.Equal(at) {
				t.Fatalf("NextDue after the failure: %v %v, want %v", due, ok, at)
			}
			if next := s.Next(); !next.Equal(at.Add(time.Hour)) {
				t.Fatalf("Next after the failure %v, want the retry at %v", next, at.Add(time.Hour))
			}
			fail = false
			if rep := tick(t, e, s, at.Add(time.Hour)); len(rep.Rotated) != 1 || e.active().Number == 1 {
				t.Fatalf("not retried after RetryAfter: %+v", rep)
			}
			if sl, _ := e.store.Get(testSlot); len(sl.Scheduled) != 0 {
				t.Fatalf("served one-off time kept: %v", sl.Scheduled)
			}
		})
	}
}

// Run ticks at once when something is due and stops with its context.
func TestSchedulerRun(t *testing.T) {
	e := newEnv(t, providers.KeyEd25519)
	e.clock.Set(t0.Add(721 * time.Hour))
	s := newScheduler(t, e, map[string]Calendar{testSlot: {Period: 720 * time.Hour}})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- s.Run(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for e.active().Number != 2 {
		if time.Now().After(deadline) {
			t.Fatal("Run did not rotate the due slot")
		}
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Run returned %v", err)
	}
}

// The scheduler decides from a snapshot of every slot, then rotates them
// one after another. A manual rotation of a later slot meanwhile makes it
// no longer due: the scheduler must not rotate it a second time at once.
func TestSchedulerSkipsASlotRotatedMeanwhile(t *testing.T) {
	e := newEnv(t, providers.KeyECDSAP256)
	const other = "payments/aaa" // sorts before testSlot: rotated first
	v1, err := e.soft.GenerateKey(context.Background(), other+"/v1", providers.KeyECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.Enroll(context.Background(), other, v1, "test"); err != nil {
		t.Fatal(err)
	}
	cal := Calendar{Period: 720 * time.Hour}
	s := newScheduler(t, e, map[string]Calendar{other: cal, testSlot: cal})
	manual := false
	e.rot.hook = func(step string) error {
		if step == StepCSR && !manual {
			manual = true // during the scheduler's rotation of other
			if _, err := e.rot.Rotate(context.Background(), testSlot, e.opts()); err != nil {
				t.Errorf("manual rotation: %v", err)
			}
		}
		return nil
	}
	t0 := e.clock.Now()
	rep := tick(t, e, s, t0.Add(721*time.Hour))
	if got := e.active().Number; got != 2 {
		t.Fatalf("%s is at v%d after a manual rotation during the scheduler's round, want v2 (rotated %d)", testSlot, got, len(rep.Rotated))
	}
}

// After a rotation at 10:00 and the clock stepped back to 09:00, a one-off
// time of 09:30 is in the future but before the last activation, which
// NextDue never counts: accepted, it would never run. It is refused.
func TestRotateAtBeforeTheLastActivationIsRefused(t *testing.T) {
	e := newEnv(t, providers.KeyEd25519)
	s := newScheduler(t, e, nil)
	ctx := context.Background()
	at := t0.Add(10 * time.Hour)
	if err := s.RotateAt(ctx, testSlot, at, "admin"); err != nil {
		t.Fatal(err)
	}
	if rep := tick(t, e, s, at); len(rep.Rotated) != 1 {
		t.Fatal("not rotated at the scheduled time")
	}
	e.clock.Set(at.Add(-time.Hour)) // stepped back
	// A caller's error, BAD_REQUEST with the reason, not INTERNAL (a bug).
	if err := s.RotateAt(ctx, testSlot, at.Add(-30*time.Minute), "admin"); WireCode(err) != proto.BadRequest || !strings.Contains(err.Error(), "never run") {
		t.Fatalf("RotateAt before the last activation: %v (%v), want it refused, BAD_REQUEST", err, WireCode(err))
	}
}

// The scheduler takes a wall clock that ran ahead of the monotonic one
// between two rounds for a step, past a minute (NTP slews far less).
func TestSchedulerSeesAWallClockStep(t *testing.T) {
	for _, tc := range []struct {
		wall, monotonic time.Duration
		step            bool
	}{
		{time.Minute, time.Minute, false},
		{time.Minute + 50*time.Millisecond, time.Minute, false},
		{time.Minute, 2 * time.Minute, false}, // stepped back: the rounds act on the earlier time
		{365 * 24 * time.Hour, time.Minute, true},
		{2*time.Minute + time.Second, time.Minute, true},
	} {
		if got := stepAhead(tc.wall, tc.monotonic) > 0; got != tc.step {
			t.Errorf("wall %v, monotonic %v: step %v, want %v", tc.wall, tc.monotonic, got, tc.step)
		}
	}
	now := time.Now()
	if d := wallJump(now, now.Add(time.Minute)); d != 0 {
		t.Errorf("a minute of both clocks: %v", d)
	}
}

// After a forward step no round acts for the hold, a kick's included; then
// rounds act again.
func TestStepGuardHoldsRoundsBack(t *testing.T) {
	var jumped bool
	g := stepGuard{jump: func(prev, now time.Time) time.Duration {
		if jumped {
			jumped = false
			return time.Hour
		}
		return 0
	}}
	start := time.Now()
	if _, act := g.round(start, time.Minute); !act {
		t.Fatal("the first round did not act")
	}
	jumped = true
	if ahead, act := g.round(start.Add(time.Second), time.Minute); ahead != time.Hour || act {
		t.Fatalf("the round that saw the step: ahead %v, act %v", ahead, act)
	}
	if _, act := g.round(start.Add(2*time.Second), time.Minute); act {
		t.Fatal("a round (a kick) a second after the step acted")
	}
	if _, act := g.round(start.Add(time.Second+time.Minute), time.Minute); !act {
		t.Fatal("a round after the hold did not act")
	}
}

// A rotation whose options cannot be made (the agent's: a next_key or an
// active key not served, a provider that cannot generate keys) fails at
// its start step, journaled ("rotate.failed", with the code and the
// options' peer and policy hash) like any failed step, whether the
// scheduler or an operator asked. It used to leave no record at all,
// though a failure is documented as journaled every time.
func TestOptionsFailuresAreJournaled(t *testing.T) {
	cause := fmt.Errorf("next_key %q is not served: %w", "nosuchkey", providers.ErrUnavailable)
	hash := [32]byte{1, 2, 3}
	for _, tc := range []struct {
		name   string
		rotate func(e *env) error
		peer   string
	}{
		{"the scheduler", func(e *env) error {
			s, err := NewScheduler(e.rot, SchedulerOptions{
				Calendars: map[string]Calendar{testSlot: {Period: 720 * time.Hour}},
				Options: func(string) (RotateOptions, error) {
					return RotateOptions{PolicyHash: hash}, cause
				},
			})
			if err != nil {
				t.Fatal(err)
			}
			e.clock.Set(t0.Add(720 * time.Hour))
			rep, err := s.Tick(context.Background())
			if rep.Failed[testSlot] == nil {
				t.Fatalf("the rotation did not fail: %+v", rep)
			}
			return err
		}, "scheduler"},
		{"an operator", func(e *env) error {
			return e.rot.FailStart(context.Background(), testSlot, RotateOptions{Peer: "admin", PolicyHash: hash}, cause)
		}, "admin"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, providers.KeyEd25519)
			err := tc.rotate(e)
			var se *StepError
			if !errors.As(err, &se) || se.Step != StepStart || !errors.Is(err, providers.ErrUnavailable) {
				t.Fatalf("%v, want a failed start step carrying the cause", err)
			}
			recs := e.records()
			last := recs[len(recs)-1]
			switch {
			case last.Op != "rotate.failed":
				t.Fatalf("records %v: the failure is not journaled", ops(recs))
			case !strings.Contains(last.Detail, "step start failed") || !strings.Contains(last.Detail, "nosuchkey"):
				t.Fatalf("failure record's detail %q, want the step and the cause", last.Detail)
			case last.CodeName != proto.Unavailable.String() || last.Peer != tc.peer || last.PolicyHash != hash:
				t.Fatalf("failure record: code %s, peer %q, policy hash %x; want UNAVAILABLE, %q, %x", last.CodeName, last.Peer, last.PolicyHash, tc.peer, hash)
			case last.Version != 1:
				t.Fatalf("failure record names v%d, want the active v1", last.Version)
			}
			if v := e.active(); v.Number != 1 {
				t.Fatalf("v%d active after a failed start", v.Number)
			}
		})
	}
}

// blockingMaker generates no key until ctx ends or release is closed: a
// provider hung in key generation that still honours its context.
type blockingMaker struct{ release chan struct{} }

func (m blockingMaker) GenerateKey(ctx context.Context, _ string, _ providers.KeyType) (providers.KeyInfo, error) {
	select {
	case <-ctx.Done():
		return providers.KeyInfo{}, ctx.Err()
	case <-m.release:
		return providers.KeyInfo{}, errInjected
	}
}

// blockingSigner signs through inner for its first `clean` calls (the CSR
// is the first), then blocks like blockingMaker: a provider hung in a
// canary signature.
type blockingSigner struct {
	inner   Signer
	clean   int64
	calls   atomic.Int64
	release chan struct{}
}

func (s *blockingSigner) Sign(ctx context.Context, key string, alg providers.Algorithm, digest []byte) ([]byte, error) {
	if s.calls.Add(1) <= s.clean {
		return s.inner.Sign(ctx, key, alg, digest)
	}
	select {
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-s.release:
		return nil, errInjected
	}
}

// A scheduled rotation has a deadline of its own (Timeout): one whose
// provider hangs, in key generation or in a canary signature, fails when
// it runs out, like any failed rotation: journaled, retried after
// RetryAfter, and the slot left signing on its active version and free for
// the next rotation. It used to run under the scheduler's context alone,
// which has no deadline: the round, the slot and any operator's rotation of
// it waited as long as the provider hung.
func TestScheduledRotationTimesOut(t *testing.T) {
	for _, tc := range []struct {
		name     string
		modify   func(e *env, o *RotateOptions, release chan struct{})
		step     string
		reverted bool
	}{
		{"keygen", func(e *env, o *RotateOptions, release chan struct{}) {
			o.Maker = blockingMaker{release: release}
		}, StepKeygen, false},
		{"canary", func(e *env, o *RotateOptions, release chan struct{}) {
			o.Signer = &blockingSigner{inner: e.soft, clean: 1, release: release}
		}, StepCanary, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, providers.KeyEd25519)
			release := make(chan struct{})
			hang := true
			const timeout = 3 * time.Second // the canary case must reach its canaries first, on a busy machine
			s, err := NewScheduler(e.rot, SchedulerOptions{
				Calendars:  map[string]Calendar{testSlot: {Period: 720 * time.Hour}},
				RetryAfter: time.Hour,
				Timeout:    timeout,
				Options: func(string) (RotateOptions, error) {
					o := e.opts()
					if hang {
						tc.modify(e, &o, release)
					}
					return o, nil
				},
			})
			if err != nil {
				t.Fatal(err)
			}
			due := t0.Add(720 * time.Hour)
			e.clock.Set(due)
			type tickResult struct {
				rep TickReport
				err error
			}
			done := make(chan tickResult, 1)
			start := time.Now()
			go func() {
				rep, err := s.Tick(context.Background())
				done <- tickResult{rep, err}
			}()
			var res tickResult
			select {
			case res = <-done:
			case <-time.After(30 * time.Second):
				close(release) // let the round end before the test's cleanup closes the journal
				<-done
				t.Fatalf("the round still waited on the hung provider after %v (Timeout %v)", time.Since(start), timeout)
			}
			if res.err == nil || !errors.Is(res.rep.Failed[testSlot], context.DeadlineExceeded) {
				t.Fatalf("round: %+v %v, want the rotation failed with DEADLINE_EXCEEDED", res.rep, res.err)
			}
			var se *StepError
			if !errors.As(res.rep.Failed[testSlot], &se) || se.Step != tc.step || se.Reverted != tc.reverted {
				t.Fatalf("failure %v, want step %s, reverted %v", res.rep.Failed[testSlot], tc.step, tc.reverted)
			}
			recs := e.records()
			last := recs[len(recs)-1]
			if last.Op != "rotate.failed" || last.CodeName != proto.DeadlineExceeded.String() || !strings.Contains(last.Detail, "step "+tc.step) {
				t.Fatalf("last record %s %s %q, want rotate.failed DEADLINE_EXCEEDED at step %s", last.Op, last.CodeName, last.Detail, tc.step)
			}

			// The slot signs on v1, and is free: nothing holds it.
			v1 := e.active()
			if v1.Number != 1 {
				t.Fatalf("active v%d after the failed rotation, want v1", v1.Number)
			}
			alg, in, sig := signWith(t, e.soft, v1, []byte("after the timeout"))
			if err := providers.Verify(v1.Public, alg, in, sig); err != nil {
				t.Fatalf("v1's signature does not verify: %v", err)
			}
			if next := s.Next(); !next.Equal(due.Add(time.Hour)) {
				t.Fatalf("Next after the timeout %v, want the retry at %v", next, due.Add(time.Hour))
			}
			if rep := tick(t, e, s, due.Add(59*time.Minute)); len(rep.Rotated)+len(rep.Failed) != 0 {
				t.Fatalf("retried before RetryAfter: %+v", rep)
			}
			hang = false
			if rep := tick(t, e, s, due.Add(time.Hour)); len(rep.Rotated) != 1 || e.active().Number == 1 {
				t.Fatalf("not retried after RetryAfter: %+v, active v%d", rep, e.active().Number)
			}
		})
	}
}

// makeThenFailMaker makes the key through inner, counting it, and then
// reports err: an HSM or key service that made the key and failed after
// (a timeout on the reply), so every attempt leaves a key behind.
type makeThenFailMaker struct {
	inner KeyMaker
	made  *atomic.Int32
	err   error
}

func (m makeThenFailMaker) GenerateKey(ctx context.Context, name string, kt providers.KeyType) (providers.KeyInfo, error) {
	info, err := m.inner.GenerateKey(ctx, name, kt)
	if err != nil {
		return info, err
	}
	m.made.Add(1)
	return info, m.err
}

// The wait after a failed scheduled rotation holds across a restart,
// whichever way the attempt failed, including an agent that died in the
// middle of it. The wait used to be kept in memory only: a restarted agent
// tried the slot again at once, so an agent in a crash loop (systemd
// restarting it every few seconds) made a key in the HSM or cloud KMS, and
// wrote a rotation's records, at every start.
func TestSchedulerBackOffSurvivesARestart(t *testing.T) {
	const retryAfter = time.Hour
	due := t0.Add(720 * time.Hour)
	for _, tc := range []struct {
		name string
		// fail makes the rotation the scheduler starts fail; made counts
		// the keys made.
		fail func(e *env, o *RotateOptions, made *atomic.Int32) error
	}{
		{"the key is made, then the maker fails", func(e *env, o *RotateOptions, made *atomic.Int32) error {
			o.Maker = makeThenFailMaker{inner: e.soft, made: made, err: providers.ErrUnavailable}
			return nil
		}},
		{"the rotation's options cannot be made", func(e *env, o *RotateOptions, made *atomic.Int32) error {
			return fmt.Errorf("provider cannot generate keys: %w", providers.ErrUnavailable)
		}},
		{"the canaries fail after the cut-over", func(e *env, o *RotateOptions, made *atomic.Int32) error {
			o.Maker = makeThenFailMaker{inner: e.soft, made: made}
			o.Signer = &corruptingSigner{inner: e.soft, clean: 1}
			return nil
		}},
		{"the agent dies after making the key", func(e *env, o *RotateOptions, made *atomic.Int32) error {
			o.Maker = makeThenFailMaker{inner: e.soft, made: made}
			e.rot.hook = func(step string) error {
				if step == StepKeygen {
					if made.Load() == 1 {
						_ = e.j.Close() // the process dies here; a later attempt only fails
					}
					return errInjected
				}
				return nil
			}
			return nil
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, providers.KeyEd25519)
			var made atomic.Int32
			failing := true
			start := func() *Scheduler {
				t.Helper()
				s, err := NewScheduler(e.rot, SchedulerOptions{
					Calendars:  map[string]Calendar{testSlot: {Period: 720 * time.Hour}},
					RetryAfter: retryAfter,
					Options: func(string) (RotateOptions, error) {
						o := e.opts()
						e.rot.hook = nil
						if failing {
							return o, tc.fail(e, &o, &made)
						}
						return o, nil
					},
				})
				if err != nil {
					t.Fatal(err)
				}
				return s
			}
			s := start()
			e.clock.Set(due)
			if rep, err := s.Tick(context.Background()); err == nil || rep.Failed[testSlot] == nil {
				t.Fatalf("failing rotation: %+v %v", rep, err)
			}
			e.reopen()
			recs, keys := len(e.records()), made.Load()

			// Restarts within the wait, as systemd would make them.
			for i, at := range []time.Time{due.Add(5 * time.Second), due.Add(time.Minute), due.Add(retryAfter - time.Second)} {
				if i > 0 {
					e.reopen()
				}
				s = start()
				if next := s.Next(); !next.Equal(due.Add(retryAfter)) {
					t.Errorf("restart at %v: Next %v, want the retry at %v", at, next, due.Add(retryAfter))
				}
				e.clock.Set(at)
				rep, err := s.Tick(context.Background())
				if got := len(e.records()); err != nil || got != recs || made.Load() != keys || len(rep.Failed)+len(rep.Rotated) != 0 {
					t.Fatalf("restart at %v, within retry_after of the failure at %v: tried again (%d records, was %d; %d keys made, was %d): %v",
						at, due, got, recs, made.Load(), keys, err)
				}
			}
			failing = false
			if rep := tick(t, e, s, due.Add(retryAfter)); len(rep.Rotated) != 1 {
				t.Fatalf("not retried after retry_after: %+v", rep)
			}
			v := e.active()
			if v.Number == 1 {
				t.Fatal("v1 still active after the retry")
			}
			alg, in, sig := signWith(t, e.soft, v, []byte("after the retry"))
			if err := providers.Verify(v.Public, alg, in, sig); err != nil {
				t.Fatalf("the new version's signature does not verify: %v", err)
			}
		})
	}
}
