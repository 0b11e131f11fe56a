package policy

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sigil-agent/sigil/providers"
)

// Reason is why a request was denied, or OK. Each maps to the wire code of
// the same name (String); the numbers are this package's, not the wire's.
type Reason uint8

const (
	OK                   Reason = iota // allowed
	NotFound                           // no such slot for this tenant (another tenant's slot included)
	PermissionDenied                   // the client identity is not in the slot's clients
	UnsupportedAlgorithm               // the algorithm is not allowed by the slot's policy
	BadRequest                         // the digest length does not match the algorithm's hash
	RateLimited                        // the slot's token bucket is empty
	QuotaExceeded                      // the slot's daily quota is used up
	OutsideWindow                      // now is outside the slot's UTC windows
	Paused                             // the slot is paused (by the file or at run time)
)

var reasonNames = [...]string{
	OK:                   "OK",
	NotFound:             "NOT_FOUND",
	PermissionDenied:     "PERMISSION_DENIED",
	UnsupportedAlgorithm: "UNSUPPORTED_ALGORITHM",
	BadRequest:           "BAD_REQUEST",
	RateLimited:          "RATE_LIMITED",
	QuotaExceeded:        "QUOTA_EXCEEDED",
	OutsideWindow:        "OUTSIDE_WINDOW",
	Paused:               "PAUSED",
}

// String is the wire code name the reason maps to (proto.ParseCode accepts it).
func (r Reason) String() string {
	if int(r) < len(reasonNames) {
		return reasonNames[r]
	}
	return "REASON_" + strconv.Itoa(int(r))
}

// Messages safe to show the client: fixed texts, free of secrets, digests and
// of anything about other tenants.
var reasonMessages = [...]string{
	OK:                   "",
	NotFound:             "key slot not found",
	PermissionDenied:     "this client identity may not use the key slot",
	UnsupportedAlgorithm: "the key slot's policy does not allow this algorithm",
	BadRequest:           "digest length does not match the algorithm's hash",
	RateLimited:          "the key slot's rate limit is exceeded",
	QuotaExceeded:        "the key slot's daily quota is used up; it resets at 00:00 UTC",
	OutsideWindow:        "signing with this key slot is not allowed at this time (UTC windows)",
	Paused:               "the key slot is paused",
}

// Decision is the outcome of a policy check.
type Decision struct {
	Reason Reason // OK: allowed
	// PolicyHash is the hash of the requesting tenant's policy (Tenant.Hash),
	// for the reply and the audit record; zero when the peer maps to no
	// tenant. It is the tenant's hash, not the whole set's, so that one
	// tenant's replies do not reveal when another tenant's policy changes.
	PolicyHash [32]byte
	// Slot is the slot that was checked (its Key is the agent key to sign
	// with); nil when the slot was not found.
	Slot *Slot
	// RetryAfter is, for RateLimited, QuotaExceeded and OutsideWindow, the
	// earliest moment a retry can pass that rule; 0 otherwise.
	RetryAfter time.Duration

	// alg is, for UnsupportedAlgorithm, the algorithm asked for: Message
	// names it and the slot's allowed ones.
	alg providers.Algorithm

	// rs counts an allowed request among its slot's signatures in flight
	// until Done: what a Pause waits out (WaitIdle).
	rs *slotState
}

// Done ends an allowed request's time in flight, once its signature is
// released or withheld. Further calls do nothing.
func (d *Decision) Done() {
	if d.rs != nil {
		d.rs.inFlight.Add(-1)
		d.rs = nil
	}
}

// Holds reports whether Done has something to end: the request was
// allowed and its time in flight is still counted.
func (d *Decision) Holds() bool { return d.rs != nil }

// Allowed reports whether the request may be signed.
func (d Decision) Allowed() bool { return d.Reason == OK }

// Message is a fixed text for the client explaining a denial ("" for OK).
func (d Decision) Message() string {
	if int(d.Reason) >= len(reasonMessages) {
		return "denied by policy"
	}
	if d.Reason == UnsupportedAlgorithm && d.Slot != nil {
		// The slot's own policy, told to a caller its clients admit: a
		// TLS handshake refused under it is otherwise guesswork. Built
		// only for a refusal, so Check stays free of allocations.
		return "the key slot's policy does not allow " + d.alg.String() + "; it allows " + strings.Join(d.Slot.Policy.algs.names(), ", ")
	}
	if d.RetryAfter <= 0 {
		return reasonMessages[d.Reason]
	}
	// The wire has no field for it, and a client that is refused for a
	// rule that time lifts needs to know when; rounded up, so that a retry
	// at that time passes the rule.
	return reasonMessages[d.Reason] + "; retry in " + roundUp(d.RetryAfter).String()
}

// roundUp rounds a retry time up to the millisecond, or to the second from
// one second on, so that it reads as "500ms" or "16m40s".
func roundUp(d time.Duration) time.Duration {
	unit := time.Millisecond
	if d >= time.Second {
		unit = time.Second
	}
	return (d + unit - 1) / unit * unit
}

// Errors of the admin operations.
var (
	ErrSlotNotFound = errors.New("policy: key slot not found")
	// ErrPausedInFile is returned by Resume when the policy file itself
	// pauses the slot: the run-time pause is lifted, the slot stays paused
	// until the file says paused: false and is reloaded.
	ErrPausedInFile = errors.New("policy: key slot is paused by the policy file")
)

// Engine enforces a Set at run time. It holds each slot's token bucket, daily
// counter and run-time paused flag, in memory only: a restart starts every
// bucket full and every daily count at zero, and forgets run-time pauses
// (the agent stores pauses and counts in its journal and puts them back).
//
// Check is lock-free: the set and the per-slot state are read through one
// atomic pointer, and the per-slot counters are atomics. Swap replaces the set
// without stopping Check.
type Engine struct {
	clock func() time.Time
	epoch time.Time // token buckets count from here, on the monotonic clock when clock is time.Now
	state atomic.Pointer[engineState]
	swap  sync.Mutex // serializes Swap; never taken by Check
	// dropped holds the state of slots a Swap removed, by full name, until
	// their quota day is over: a slot that one reload drops and the next
	// brings back the same day must not get its daily quota back. Guarded
	// by swap.
	dropped map[string]*slotState
}

type engineState struct {
	set   *Set
	slots []*slotState // by Slot.index
}

const (
	quotaCountBits = 40
	quotaCountMask = 1<<quotaCountBits - 1
)

// slotState is one slot's run-time state, shared by the engine states of
// successive Swaps while the slot exists.
type slotState struct {
	// tat is the GCRA "theoretical arrival time" in ns since Engine.epoch: a
	// token bucket in one word. The bucket is full when tat <= now.
	tat atomic.Int64
	// quota is day<<quotaCountBits | count, day = UTC days since 1970.
	quota atomic.Uint64
	// interval and tolerance are the rate tat is counted in (0: it never
	// had one). Set by newState, under Engine.swap; Check never reads them.
	interval, tolerance int64
	paused              atomic.Bool
	// inFlight counts the allowed requests whose signatures are not yet
	// released or withheld (Decision.Done).
	inFlight atomic.Int32
	_        [64 - 40]byte // one cache line per slot: busy slots do not share lines
}

// NewEngine starts enforcing set, which must not be nil. clock is the time
// source (nil: time.Now); tests inject a fake.
func NewEngine(set *Set, clock func() time.Time) *Engine {
	if clock == nil {
		clock = time.Now
	}
	e := &Engine{clock: clock, epoch: clock(), dropped: map[string]*slotState{}}
	e.state.Store(newState(set, nil, nil, nil, 0))
	return e
}

// newState builds the state for set: a slot in old keeps its state, a slot
// in dropped (removed by an earlier Swap) gets its state back, and any other
// starts afresh. paused, if not nil, says which returning or new slots start
// paused. Slots of old that set lacks move to dropped. now is the engine's
// time (ns since its epoch), for re-expressing a kept bucket in a new rate.
func newState(set *Set, old *engineState, paused func(tenant, slot string) bool, dropped map[string]*slotState, now int64) *engineState {
	st := &engineState{set: set, slots: make([]*slotState, set.slotCount)}
	for _, t := range set.tenants {
		for _, sl := range t.Slots {
			if old != nil {
				if prev, ok := old.set.Slot(t.Name, sl.Name); ok {
					rs := old.slots[prev.index]
					rs.rebase(&sl.Policy, now)
					st.slots[sl.index] = rs
					continue
				}
			}
			rs, back := dropped[sl.FullName()]
			if back {
				delete(dropped, sl.FullName())
			} else {
				rs = new(slotState)
			}
			rs.rebase(&sl.Policy, now)
			if paused != nil {
				rs.paused.Store(paused(t.Name, sl.Name))
			}
			st.slots[sl.index] = rs
		}
	}
	if old != nil && dropped != nil {
		for _, sl := range old.set.AllSlots() {
			if _, kept := set.Slot(sl.Tenant, sl.Name); !kept {
				dropped[sl.FullName()] = old.slots[sl.index]
			}
		}
	}
	return st
}

// Set is the set in force.
func (e *Engine) Set() *Set { return e.state.Load().set }

// Swap puts set (not nil) in force: a reload. A slot that exists in both sets, by
// full name, keeps its bucket, daily count and run-time pause, even if its
// policy changed. A removed slot's state is kept until its quota day ends: a
// slot added again under the same name that day carries on with it (its
// count, so a drop and a return do not give the day's quota back); after
// that it starts afresh. Checks running during Swap see either the old or
// the new set, never a mix.
func (e *Engine) Swap(set *Set) { e.SwapPaused(set, nil) }

// SwapPaused is Swap for a reload that may bring slots back: a slot new to
// the engine starts paused when paused says so (the agent's stored run-time
// pauses). It is paused in the same step that puts set in force, so no Check
// sees it unpaused. Slots that stay keep their own run-time state.
func (e *Engine) SwapPaused(set *Set, paused func(tenant, slot string) bool) {
	e.swap.Lock()
	defer e.swap.Unlock()
	clock := e.clock()
	today, now := Day(clock), int64(clock.Sub(e.epoch))
	for name, rs := range e.dropped {
		if rs.quota.Load()>>quotaCountBits < today && rs.tat.Load() <= now {
			// Its day is over and its bucket full again: a return would
			// start afresh anyway.
			delete(e.dropped, name)
		}
	}
	e.state.Store(newState(set, e.state.Load(), paused, e.dropped, now))
}

// rebase re-expresses the slot's bucket in the rate pol sets, when that
// differs from the rate its tat is counted in: the tokens spent and not
// yet refilled stay spent, at most the new burst. Kept as it was, a tat
// counted in slow refills would hold a raised rate back for as long as the
// old rate needed to refill (an hour, for 1/s with a burst of 3600). A
// policy without a rate leaves the bucket as it is, for the rate's return.
func (s *slotState) rebase(pol *Policy, now int64) {
	if pol.Rate == nil || (s.interval == pol.interval && s.tolerance == pol.tolerance) {
		return
	}
	for {
		tat := s.tat.Load()
		next := tat
		if tat > now && s.interval > 0 {
			spent := float64(tat-now) / float64(s.interval)
			// Capped as a float: tokens spent at a fast rate times a
			// slow rate's interval can pass int64, which converts to
			// its minimum and would leave the bucket full.
			next = now + pol.tolerance
			if f := spent * float64(pol.interval); f < float64(pol.tolerance) {
				next = now + int64(f)
			}
		}
		if s.tat.CompareAndSwap(tat, next) {
			break
		}
	}
	s.interval, s.tolerance = pol.interval, pol.tolerance
}

// Check decides whether the peer id, a member of tenant, may sign with
// tenant's slot using alg over a digest of digestLen bytes (for pure Ed25519
// the message length, not checked here). The rules apply in this order, the
// first failing one deciding: tenant and slot (NotFound), clients
// (PermissionDenied), paused (Paused), algorithm (UnsupportedAlgorithm),
// digest length (BadRequest), windows (OutsideWindow), daily quota
// (QuotaExceeded), rate (RateLimited). Only an allowed request consumes
// quota and a rate token, whether or not the signature then succeeds.
//
// The peer must map to tenant (Set.TenantOf); otherwise the slot is not
// found. Check does not allocate and takes no lock.
//
// An allowed Decision counts in its slot's signatures in flight until its
// Done, which the caller must call once the signature is out or withheld.
func (e *Engine) Check(tenant, slot string, id Identity, alg providers.Algorithm, digestLen int) Decision {
	d, rs, counted := e.check(tenant, slot, id, alg, digestLen)
	if d.Reason == OK && rs != nil {
		rs.inFlight.Add(1)
		if rs.paused.Load() {
			// A Pause landed between the check and the count: it may
			// have found the slot idle already, so this one is refused,
			// and a refusal takes neither a quota unit nor a token.
			rs.inFlight.Add(-1)
			rs.giveBack(&d.Slot.Policy, counted)
			d.Reason = Paused
			return d
		}
		d.rs = rs
	}
	return d
}

// check applies the rules; an allowed request's slot state is returned
// with the quota day its unit was taken from.
func (e *Engine) check(tenant, slot string, id Identity, alg providers.Algorithm, digestLen int) (Decision, *slotState, uint64) {
	st := e.state.Load()
	t := st.set.tenantOf(id)
	if t == nil {
		return Decision{Reason: NotFound}, nil, 0
	}
	if t.Name != tenant {
		return Decision{Reason: NotFound, PolicyHash: t.hash}, nil, 0
	}
	sl, ok := t.slots[slot]
	if !ok {
		return Decision{Reason: NotFound, PolicyHash: t.hash}, nil, 0
	}
	d := Decision{PolicyHash: t.hash, Slot: sl}
	pol := &sl.Policy
	if !sl.Admits(id) {
		d.Reason = PermissionDenied
		return d, nil, 0
	}
	rs := st.slots[sl.index]
	if pol.Paused || rs.paused.Load() {
		d.Reason = Paused
		return d, nil, 0
	}
	if algorithmBit(alg)&pol.algs == 0 {
		d.Reason = UnsupportedAlgorithm
		d.alg = alg
		return d, nil, 0
	}
	if n := digestSize(alg); n >= 0 && digestLen != n {
		d.Reason = BadRequest
		return d, nil, 0
	}
	if pol.window == nil && pol.DailyQuota == 0 && pol.Rate == nil {
		return d, rs, 0
	}
	now := e.clock()
	if pol.window != nil {
		if m := minuteOfWeek(now); !pol.window.has(m) {
			d.Reason = OutsideWindow
			if n := pol.window.untilNext(m); n > 0 {
				d.RetryAfter = time.Duration(n)*time.Minute - sinceMinute(now)
			}
			return d, nil, 0
		}
	}
	var counted uint64 // the day the quota unit was taken from
	if pol.DailyQuota > 0 {
		var ok bool
		if counted, ok = rs.takeQuota(Day(now), uint64(pol.DailyQuota)); !ok {
			d.Reason = QuotaExceeded
			// The day counted against, which a clock stepped back across
			// midnight leaves a day ahead of today's.
			d.RetryAfter = time.Unix(int64(counted+1)*86400, 0).Sub(now)
			return d, nil, 0
		}
	}
	if pol.Rate != nil {
		if wait, ok := rs.takeToken(int64(now.Sub(e.epoch)), pol.interval, pol.tolerance); !ok {
			if pol.DailyQuota > 0 {
				rs.refundQuota(counted)
			}
			d.Reason = RateLimited
			d.RetryAfter = time.Duration(wait)
			return d, nil, 0
		}
	}
	return d, rs, counted
}

func sinceMinute(t time.Time) time.Duration {
	s := t.Unix() % 60
	if s < 0 {
		s += 60
	}
	return time.Duration(s)*time.Second + time.Duration(t.Nanosecond())
}

// takeToken is GCRA, equivalent to a token bucket of tolerance/interval
// tokens refilling one per interval: a request moves tat interval ns into
// the future and is refused if tat would then lie more than tolerance ahead
// of now. It returns how long until a request would pass when refused.
func (s *slotState) takeToken(now, interval, tolerance int64) (wait int64, ok bool) {
	for {
		tat := s.tat.Load()
		next := max(tat, now) + interval
		if ahead := next - now; ahead > tolerance {
			return ahead - tolerance, false
		}
		if s.tat.CompareAndSwap(tat, next) {
			return 0, true
		}
	}
}

// Day is the quota day of t: UTC days since 1970. A slot's daily count
// starts afresh when the day changes.
func Day(t time.Time) uint64 { return uint64(floorDiv(t.Unix(), 86400)) }

// Today is the quota day by the engine's clock.
func (e *Engine) Today() uint64 { return Day(e.clock()) }

// DailyCounts returns the day's count of every slot that has one ("tenant/
// slot" → signatures counted that day), for the agent to store.
func (e *Engine) DailyCounts(day uint64) map[string]uint64 {
	e.swap.Lock()
	defer e.swap.Unlock()
	st := e.state.Load()
	out := map[string]uint64{}
	add := func(name string, rs *slotState) {
		if q := rs.quota.Load(); q>>quotaCountBits == day && q&quotaCountMask > 0 {
			out[name] = q & quotaCountMask
		}
	}
	for _, sl := range st.set.AllSlots() {
		add(sl.FullName(), st.slots[sl.index])
	}
	// A slot dropped today keeps its count through a restart too, should
	// it come back.
	for name, rs := range e.dropped {
		add(name, rs)
	}
	return out
}

// RestoreDailyCount raises the slot's count for day to at least count
// (what a restarted agent read back from its journal): a restart must not
// hand out a quota again. It reports whether the slot exists.
func (e *Engine) RestoreDailyCount(tenant, slot string, day, count uint64) bool {
	_, rs, ok := e.lookup(tenant, slot)
	if !ok {
		// A slot the set lacks now (dropped before the restart) keeps its
		// count for the day, should a reload bring it back.
		e.swap.Lock()
		defer e.swap.Unlock()
		name := tenant + "/" + slot
		if rs = e.dropped[name]; rs == nil {
			rs = new(slotState)
			e.dropped[name] = rs
		}
	}
	count = min(count, quotaCountMask)
	for {
		old := rs.quota.Load()
		if old>>quotaCountBits == day && old&quotaCountMask >= count {
			return ok
		}
		if old>>quotaCountBits > day {
			return ok // a later day has begun
		}
		if rs.quota.CompareAndSwap(old, day<<quotaCountBits|count) {
			return ok
		}
	}
}

// takeQuota counts one signature against today's quota; a new day starts at
// zero. It returns the day counted against. The count never goes back a
// day: a check that read the clock before midnight and counts after the new
// day's first signatures (or a clock stepped back across midnight) counts
// against the newer day, rather than starting the old one afresh and so
// the new one again after it. A stored day more than one ahead is a clock
// that was stepped far ahead and back (a VM resumed with a bad clock):
// kept, one signature then would freeze the slot's quota until that day.
func (s *slotState) takeQuota(day, limit uint64) (uint64, bool) {
	for {
		old := s.quota.Load()
		stored, count := old>>quotaCountBits, old&quotaCountMask
		if stored < day || stored > day+1 {
			stored, count = day, 0
		}
		if count >= limit {
			return stored, false
		}
		if s.quota.CompareAndSwap(old, stored<<quotaCountBits|(count+1)) {
			return stored, true
		}
	}
}

// refundQuota gives back a signature counted by takeQuota on the same day
// (the rate limit then refused the request).
func (s *slotState) refundQuota(day uint64) {
	for {
		old := s.quota.Load()
		if old>>quotaCountBits != day || old&quotaCountMask == 0 {
			return
		}
		if s.quota.CompareAndSwap(old, old-1) {
			return
		}
	}
}

// giveBack returns what an allowed check under pol took, the quota unit
// counted against day and the rate token, when the request is refused
// after all.
func (s *slotState) giveBack(pol *Policy, day uint64) {
	if pol.DailyQuota > 0 {
		s.refundQuota(day)
	}
	if pol.Rate != nil {
		// The token's interval back off tat: exact whatever was taken
		// since, and a bucket full meanwhile stays full (tat <= now).
		s.tat.Add(-pol.interval)
	}
}

func (e *Engine) lookup(tenant, slot string) (*Slot, *slotState, bool) {
	st := e.state.Load()
	sl, ok := st.set.Slot(tenant, slot)
	if !ok {
		return nil, nil, false
	}
	return sl, st.slots[sl.index], true
}

// WaitIdle waits until no allowed request of the slot is in flight (every
// Decision Done), or ctx ends. After Pause, it is the fence past which no
// signature of the slot is released: the requests allowed before the pause
// finish first.
func (e *Engine) WaitIdle(ctx context.Context, tenant, slot string) error {
	_, rs, ok := e.lookup(tenant, slot)
	if !ok {
		return ErrSlotNotFound
	}
	for rs.inFlight.Load() > 0 {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Millisecond):
		}
	}
	return nil
}

// Pause pauses the slot at run time: Check answers Paused until Resume. The
// pause survives Swap while the slot exists, not a restart (the agent
// stores pauses and calls Pause again at start). A slot is paused when its file says paused: true or it is
// paused at run time; either suffices.
func (e *Engine) Pause(tenant, slot string) error {
	_, rs, ok := e.lookup(tenant, slot)
	if !ok {
		return ErrSlotNotFound
	}
	rs.paused.Store(true)
	return nil
}

// Resume lifts a run-time pause. If the policy file also pauses the slot,
// the slot stays paused and Resume returns ErrPausedInFile.
func (e *Engine) Resume(tenant, slot string) error {
	sl, rs, ok := e.lookup(tenant, slot)
	if !ok {
		return ErrSlotNotFound
	}
	rs.paused.Store(false)
	if sl.Policy.Paused {
		return ErrPausedInFile
	}
	return nil
}

// PausedInFile reports whether the policy file itself pauses the slot.
func (e *Engine) PausedInFile(tenant, slot string) bool {
	sl, _, ok := e.lookup(tenant, slot)
	return ok && sl.Policy.Paused
}

// Paused reports whether the slot is paused, by its file or at run time;
// found is false for an unknown slot.
func (e *Engine) Paused(tenant, slot string) (paused, found bool) {
	sl, rs, ok := e.lookup(tenant, slot)
	if !ok {
		return false, false
	}
	return sl.Policy.Paused || rs.paused.Load(), true
}
