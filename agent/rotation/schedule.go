package rotation

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/proto"
)

// Calendar is a slot's rotation calendar: a period, explicit dates, or
// both (whichever comes first). One-off times set with RotateAt are kept
// in the slot's state and count as well.
type Calendar struct {
	// Period: rotate this long after the active version became active.
	// Zero: no periodic rotation.
	Period time.Duration
	// Dates: rotate at each of these times, sorted. A date counts as done
	// once a version has been activated at or after it.
	Dates []time.Time
}

// CalendarConfig is a calendar as the configuration file writes it:
//
//	rotation:
//	  calendars:
//	    payments/release: {period: 720h}
//	    payments/firmware: {dates: ["2026-03-01T09:00:00Z", "2026-09-01T09:00:00Z"]}
//
// Period is a Go duration ("720h", "90m") or whole days ("30d"); dates
// are RFC 3339.
type CalendarConfig struct {
	Period string   `yaml:"period,omitempty" json:"period,omitempty"`
	Dates  []string `yaml:"dates,omitempty" json:"dates,omitempty"`
}

// MinPeriod is the shortest period a calendar accepts: every rotation
// makes a key, a CSR and an evidence pack.
const MinPeriod = time.Hour

// Parse validates the configuration and returns the calendar.
func (c CalendarConfig) Parse() (Calendar, error) {
	var cal Calendar
	if c.Period != "" {
		p, err := parsePeriod(c.Period)
		if err != nil {
			return Calendar{}, err
		}
		cal.Period = p
	}
	for _, d := range c.Dates {
		t, err := time.Parse(time.RFC3339, d)
		if err != nil {
			return Calendar{}, fmt.Errorf("date %q: want RFC 3339, like 2026-03-01T09:00:00Z", d)
		}
		cal.Dates = append(cal.Dates, t.UTC())
	}
	slices.SortFunc(cal.Dates, time.Time.Compare)
	cal.Dates = slices.CompactFunc(cal.Dates, time.Time.Equal)
	if cal.Period == 0 && len(cal.Dates) == 0 {
		return Calendar{}, errors.New("calendar: set a period or dates")
	}
	return cal, nil
}

func parsePeriod(s string) (time.Duration, error) {
	var p time.Duration
	if n, ok := strings.CutSuffix(s, "d"); ok {
		days, err := strconv.Atoi(n)
		if err != nil || days <= 0 || days > 100*366 {
			return 0, fmt.Errorf("period %q: want whole days like 30d, or a duration like 720h", s)
		}
		p = time.Duration(days) * 24 * time.Hour
	} else {
		var err error
		if p, err = time.ParseDuration(s); err != nil {
			return 0, fmt.Errorf("period %q: want a duration like 720h, or whole days like 30d", s)
		}
	}
	if p < MinPeriod {
		return 0, fmt.Errorf("period %q is shorter than %v", s, MinPeriod)
	}
	return p, nil
}

// NextDue is when the slot is next due for rotation under cal and its
// one-off times (Slot.Scheduled); zero if never. A slot not yet rotated
// counts from its enrolment.
func NextDue(cal Calendar, sl *Slot) time.Time {
	last := sl.LastActivation()
	var due time.Time
	earliest := func(t time.Time) {
		if due.IsZero() || t.Before(due) {
			due = t
		}
	}
	if cal.Period > 0 {
		earliest(last.Add(cal.Period))
	}
	for _, list := range [][]time.Time{cal.Dates, sl.Scheduled} {
		for _, d := range list {
			if d.After(last) {
				earliest(d)
				break
			}
		}
	}
	return due
}

// SchedulerOptions configure a Scheduler.
type SchedulerOptions struct {
	// Calendars by slot ("tenant/slot"). Slots without one rotate only on
	// request (and at their RotateAt times).
	Calendars map[string]Calendar
	// Options returns the options of a scheduled rotation of slot: maker,
	// signer, key type, subject, overlap, policy hash. Required. When it
	// fails, the rotation fails at its start step, journaled like any
	// failed step (Rotator.FailStart), and is retried after RetryAfter;
	// the options it returns with the error give the record's peer and
	// policy hash.
	Options func(slot string) (RotateOptions, error)
	// RetryAfter is the wait after a failed scheduled rotation before the
	// next attempt, counted from the attempt's start. The start is stored
	// in the slot (Slot.ScheduledAttempt), so a new Scheduler (a restart)
	// waits too, at most RetryAfter from its own start. Default 1h.
	RetryAfter time.Duration
	// MaxSleep bounds Run's sleep, so that a wall-clock step or a new
	// calendar is noticed. Default 1 minute.
	MaxSleep time.Duration
	// Timeout bounds each scheduled rotation, from holding the slot to its
	// evidence pack. One that runs out of time fails at the step it was
	// in, like any failed rotation. Default DefaultTimeout.
	Timeout time.Duration
}

// DefaultTimeout is how long a rotation may take: key generation on an
// HSM, a CSR and the canary set. The agent gives an operator's rotation as
// long. Without a bound of its own, a scheduled rotation whose provider
// hangs would hold the slot, and every later round, for as long as the
// agent runs.
const DefaultTimeout = 2 * time.Minute

// EnsureDefaults fills in the zero-valued fields that have defaults.
func (o *SchedulerOptions) EnsureDefaults() {
	if o.RetryAfter <= 0 {
		o.RetryAfter = time.Hour
	}
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	if o.MaxSleep <= 0 {
		o.MaxSleep = time.Minute
	}
}

// Scheduler rotates slots on their calendars and retires versions whose T1
// has come. Tick does one round at the rotator's clock (tests call it with
// a fake clock); Run calls Tick on a timer until its context ends.
type Scheduler struct {
	r    *Rotator
	opts SchedulerOptions
	log  *zap.Logger
	kick chan struct{}

	mu    sync.Mutex
	cals  map[string]Calendar
	retry map[string]time.Time // slot → no scheduled attempt before
}

// NewScheduler returns a scheduler for r's slots.
func NewScheduler(r *Rotator, opts SchedulerOptions) (*Scheduler, error) {
	if r == nil || opts.Options == nil {
		return nil, errors.New("scheduler: a rotator and an Options function are required")
	}
	opts.EnsureDefaults()
	s := &Scheduler{r: r, opts: opts, log: r.log, kick: make(chan struct{}, 1), retry: map[string]time.Time{}}
	now := r.now()
	for _, sl := range r.store.Slots() {
		if !sl.ScheduledAttempt.IsZero() {
			s.retry[sl.FullName()] = retryAt(sl.ScheduledAttempt, now, opts.RetryAfter)
		}
	}
	if err := s.SetCalendars(opts.Calendars); err != nil {
		return nil, err
	}
	return s, nil
}

// retryAt is when a scheduled rotation first tried at attempt may be tried
// again, for a scheduler starting at now: retryAfter after the attempt,
// and no later than retryAfter from now. An attempt stamped after now was
// made before the clock was stepped back; waiting for its stamp would
// stop the slot's rotations for as long as the step.
func retryAt(attempt, now time.Time, retryAfter time.Duration) time.Time {
	if attempt.After(now) {
		attempt = now
	}
	return attempt.Add(retryAfter)
}

// SetCalendars replaces the calendars (on a configuration reload).
func (s *Scheduler) SetCalendars(cals map[string]Calendar) error {
	c := make(map[string]Calendar, len(cals))
	for slot, cal := range cals {
		if _, _, err := SplitSlot(slot); err != nil {
			return fmt.Errorf("calendar: %w", err)
		}
		if cal.Period < 0 {
			return fmt.Errorf("calendar %s: negative period", slot)
		}
		cal.Dates = slices.Clone(cal.Dates)
		slices.SortFunc(cal.Dates, time.Time.Compare)
		c[slot] = cal
	}
	s.mu.Lock()
	s.cals = c
	s.mu.Unlock()
	s.Kick()
	return nil
}

// Kick makes Run re-plan at once.
func (s *Scheduler) Kick() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// NextDue is when the slot is next due (zero and false if never or unknown).
func (s *Scheduler) NextDue(slot string) (time.Time, bool) {
	sl, ok := s.r.store.Get(slot)
	if !ok {
		return time.Time{}, false
	}
	s.mu.Lock()
	cal := s.cals[slot]
	s.mu.Unlock()
	due := NextDue(cal, &sl)
	return due, !due.IsZero()
}

// RotateAt schedules a one-off rotation of the slot at `at` (`sigil rotate
// SLOT --at TIME`). It is kept in the slot's state, so it survives a
// restart, and journaled ("rotate.scheduled").
func (s *Scheduler) RotateAt(ctx context.Context, slot string, at time.Time, peer string) error {
	tenant, _, err := SplitSlot(slot)
	if err != nil {
		return err
	}
	at = at.UTC()
	now := s.r.now()
	switch {
	case !at.After(now):
		return refuse("rotate %s at %s: that is not in the future", slot, at.Format(time.RFC3339))
	case at.Year() > 9999:
		// The slot's state is JSON, whose times (RFC 3339) end there.
		return refuse("rotate %s at %s: that is after the year 9999", slot, at.Format(time.RFC3339))
	}
	rec := &journal.Record{Time: now, Tenant: tenant, Slot: slot, Op: "rotate.scheduled", CodeName: proto.OK.String(),
		Peer: peer, Detail: "rotation scheduled for " + at.Format(time.RFC3339)}
	_, err = s.r.store.mutate(ctx, slot, rec, func(sl *Slot, rec *journal.Record) error {
		if last := sl.LastActivation(); !at.After(last) {
			// NextDue counts one-off times after the last activation only:
			// after a clock stepped back, this one would never run.
			return refuse("rotate %s at %s: that is not after the slot's last activation (%s), so it would never run",
				slot, at.Format(time.RFC3339), last.Format(time.RFC3339))
		}
		v := sl.ActiveVersion()
		rec.Version, rec.KID = uint32(v.Number), v.KID
		// The operator's time ends the wait after a failed attempt, after
		// a restart too.
		sl.ScheduledAttempt = time.Time{}
		if !slices.ContainsFunc(sl.Scheduled, at.Equal) {
			sl.Scheduled = append(sl.Scheduled, at)
			slices.SortFunc(sl.Scheduled, time.Time.Compare)
		}
		return nil
	})
	if err != nil {
		return err
	}
	// The operator's time stands, not the back-off of an earlier failed
	// attempt (a fault they may have just fixed).
	s.mu.Lock()
	delete(s.retry, slot)
	s.mu.Unlock()
	s.Kick()
	return nil
}

// clockStepTolerance is how far the wall clock may run ahead of the
// monotonic clock between two rounds before the scheduler takes it for a
// step: NTP slews far less than this.
const clockStepTolerance = time.Minute

// wallJump returns how far the wall clock moved ahead of the monotonic
// clock from prev to now (both from time.Now), when that is more than
// clockStepTolerance; else 0.
func wallJump(prev, now time.Time) time.Duration {
	if prev.IsZero() {
		return 0
	}
	return stepAhead(now.Round(0).Sub(prev.Round(0)), now.Sub(prev))
}

// stepGuard holds the scheduler's rounds back after a forward step of the
// wall clock. A round acting on a clock stepped ahead (a VM resumed with a
// bad clock, before NTP) would rotate early, stamp T1 and the calendar from
// the wrong time, and retire accepted versions for good; so after a step
// no round acts for a while (a kick included), by the monotonic clock: a
// correction comes back meanwhile, a true time stands after.
type stepGuard struct {
	jump      func(prev, now time.Time) time.Duration // wallJump; tests swap it
	prev      time.Time
	holdUntil time.Time // no round acts before this (monotonic)
}

// round reports, for a round at now, how far the clock jumped ahead since
// the last (0 if not) and whether the round may act; after a jump none may
// for hold.
func (g *stepGuard) round(now time.Time, hold time.Duration) (ahead time.Duration, act bool) {
	ahead = g.jump(g.prev, now)
	g.prev = now
	if ahead > 0 {
		g.holdUntil = now.Add(hold)
		return ahead, false
	}
	return 0, !now.Before(g.holdUntil)
}

// stepAhead is wallJump's measure: wall minus monotonic elapsed time, when
// past the tolerance.
func stepAhead(wall, monotonic time.Duration) time.Duration {
	if d := wall - monotonic; d > clockStepTolerance {
		return d
	}
	return 0
}

// TickReport is what one Tick did.
type TickReport struct {
	Retired []Retirement
	Rotated []*Result
	Failed  map[string]error // slot → the failed scheduled rotation's error
}

// Tick settles the slots whose state the journal has not confirmed (see
// Store), retires versions whose T1 has come, then rotates every slot that
// is due (not before its due time, and not within RetryAfter of a failed
// scheduled attempt). Slots rotate one after another.
func (s *Scheduler) Tick(ctx context.Context) (TickReport, error) {
	var rep TickReport
	settleErr := s.r.store.settleAll(ctx)
	now := s.r.now()
	retired, retireErr := s.r.RetireDue(ctx, now)
	rep.Retired = retired
	s.mu.Lock()
	cals := s.cals
	s.mu.Unlock()
	for _, sl := range s.r.store.Slots() {
		if ctx.Err() != nil {
			break
		}
		slot := sl.FullName()
		dueAt := func(sl *Slot) (time.Time, bool) {
			d := NextDue(cals[slot], sl)
			return d, !d.IsZero() && !now.Before(d)
		}
		due, isDue := dueAt(&sl)
		if !isDue {
			continue
		}
		s.mu.Lock()
		notBefore := s.retry[slot]
		if !notBefore.IsZero() && sl.ActiveVersion().Activated.After(notBefore.Add(-s.opts.RetryAfter)) {
			// A rotation (by hand) succeeded since the failure: the
			// fault is gone, and so is the back-off.
			delete(s.retry, slot)
			notBefore = time.Time{}
		}
		if !notBefore.IsZero() && notBefore.After(now.Add(s.opts.RetryAfter)) {
			// Set by a round whose clock was ahead, since stepped
			// back: as at a restart (retryAt), the wait ends no later
			// than RetryAfter from now, not when the clock reaches the
			// stamp, which would stop the slot's rotations for as
			// long as the step.
			notBefore = retryAt(notBefore.Add(-s.opts.RetryAfter), now, s.opts.RetryAfter)
			s.retry[slot] = notBefore
		}
		s.mu.Unlock()
		if now.Before(notBefore) {
			continue
		}
		res, err := s.rotate(ctx, slot, due, func(cur Slot) bool {
			_, still := dueAt(&cur)
			return still
		})
		switch {
		case errors.Is(err, ErrBusy):
			// A manual rotation or drill holds the slot; look again next tick.
		case errors.Is(err, errNotDue):
			// Rotated meanwhile by someone else: nothing to do.
		case err != nil:
			s.mu.Lock()
			s.retry[slot] = now.Add(s.opts.RetryAfter)
			s.mu.Unlock()
			if rep.Failed == nil {
				rep.Failed = map[string]error{}
			}
			rep.Failed[slot] = err
			s.log.Error("scheduled rotation failed", zap.String("slot", slot), zap.Time("due", due),
				zap.Bool("timed_out", errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil),
				zap.Duration("timeout", s.opts.Timeout), zap.Duration("retry_after", s.opts.RetryAfter), zap.Error(err))
		default:
			s.mu.Lock()
			delete(s.retry, slot)
			s.mu.Unlock()
			rep.Rotated = append(rep.Rotated, res)
		}
	}
	errs := []error{settleErr, retireErr}
	for slot, err := range rep.Failed {
		errs = append(errs, fmt.Errorf("scheduled rotation of %s: %w", slot, err))
	}
	return rep, errors.Join(errs...)
}

func (s *Scheduler) rotate(ctx context.Context, slot string, due time.Time, stillDue func(Slot) bool) (*Result, error) {
	// The failure is still journaled once the deadline has passed: the
	// rotation's commits run detached from ctx (commitTimeout).
	ctx, cancel := context.WithTimeout(ctx, s.opts.Timeout)
	defer cancel()
	opts, err := s.opts.Options(slot)
	if opts.Reason == "" {
		opts.Reason = "scheduled, due " + due.UTC().Format(time.RFC3339)
	}
	if opts.Peer == "" {
		opts.Peer = "scheduler"
	}
	if err != nil {
		return nil, s.r.failStartIfDue(ctx, slot, opts, err, stillDue)
	}
	return s.r.rotateIfDue(ctx, slot, opts, stillDue)
}

// Next is the earliest time anything is due: a rotation (or its retry
// after a failure) or an accepted version's T1. Zero if nothing is.
func (s *Scheduler) Next() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	var next time.Time
	earliest := func(t time.Time) {
		if !t.IsZero() && (next.IsZero() || t.Before(next)) {
			next = t
		}
	}
	for _, sl := range s.r.store.Slots() {
		slot := sl.FullName()
		if due := NextDue(s.cals[slot], &sl); !due.IsZero() {
			if r := s.retry[slot]; r.After(due) {
				due = r
			}
			earliest(due)
		}
		for _, v := range sl.Versions {
			if v.State == StateAccepted {
				earliest(v.T1)
			}
		}
	}
	return next
}

// minSleep keeps Run from spinning when something due keeps failing
// without a retry delay (the journal refusing RetireDue's records).
const minSleep = time.Second

// Run calls Tick whenever something is due, until ctx ends. Errors are
// logged (and journaled by the rotations themselves); Run returns
// ctx.Err().
func (s *Scheduler) Run(ctx context.Context) error {
	timer := time.NewTimer(0)
	defer timer.Stop()
	guard := stepGuard{jump: wallJump}
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-timer.C:
		case <-s.kick:
		}
		ahead, act := guard.round(time.Now(), s.opts.MaxSleep)
		switch {
		case ahead > 0:
			s.log.Warn("the wall clock jumped ahead of the time measured since the last round; no rotation or retirement for a while",
				zap.Duration("ahead", ahead), zap.Duration("for", s.opts.MaxSleep))
		case act:
			if _, err := s.Tick(ctx); err != nil && ctx.Err() == nil {
				s.log.Warn("rotation scheduler round had errors", zap.Error(err))
			}
		}
		d := s.opts.MaxSleep
		if next := s.Next(); !next.IsZero() && act {
			d = min(max(next.Sub(s.r.now()), minSleep), s.opts.MaxSleep)
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		timer.Reset(d)
	}
}
