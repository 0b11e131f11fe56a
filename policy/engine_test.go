package policy

import (
	"crypto"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

	"github.com/sigil-agent/sigil/providers"
)

// fakeClock is an injected clock safe for concurrent use.
type fakeClock struct{ ns atomic.Int64 }

func newFakeClock(t time.Time) *fakeClock {
	c := &fakeClock{}
	c.set(t)
	return c
}

func (c *fakeClock) now() time.Time          { return time.Unix(0, c.ns.Load()).UTC() }
func (c *fakeClock) set(t time.Time)         { c.ns.Store(t.UnixNano()) }
func (c *fakeClock) advance(d time.Duration) { c.ns.Add(int64(d)) }
func utc(y int, m time.Month, d, h, mi, s int) time.Time {
	return time.Date(y, m, d, h, mi, s, 0, time.UTC)
}

// 2024-06-03 is a Monday.
var monday = utc(2024, 6, 3, 0, 0, 0)

const enginePolicy = `
tenants:
  - name: a
    identities:
      unix_uids: [1001, 1003]
      mtls: ["spiffe://x/a/*"]
    slots:
      - {name: open, key: ka}
      - name: algs
        key: ka
        policy: {algorithms: [ecdsa-sha256, ed25519]}
      - name: rated
        key: ka
        policy: {rate: {per_second: 2, burst: 3}}
      - name: quota
        key: ka
        policy: {daily_quota: 2}
      - name: both
        key: ka
        policy: {rate: {per_second: 1, burst: 1}, daily_quota: 5}
      - name: office
        key: ka
        policy: {windows: ["Mon-Fri 08:00-18:00"]}
      - name: night
        key: ka
        policy: {windows: ["Sun 22:00-02:00"]}
      - name: ci
        key: ka
        policy: {clients: ["uid:1001", "spiffe://x/a/ci"], paused: true}
      - name: frozen
        key: ka
        policy: {paused: true}
  - name: b
    identities: {unix_uids: [2001]}
    slots:
      - {name: secret, key: kb}
`

var (
	es256   = providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	es384   = providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA384}
	ps512   = providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA512}
	ed      = providers.Algorithm{Scheme: providers.SchemeEd25519}
	alice   = UnixIdentity(1001, 100)
	alice3  = UnixIdentity(1003, 100)
	bob     = UnixIdentity(2001, 100)
	aliceCI = MTLSIdentity("spiffe://x/a/ci")
)

func TestCheckRules(t *testing.T) {
	set := mustParse(t, enginePolicy)
	hashA, _ := set.TenantHash("a")
	hashB, _ := set.TenantHash("b")
	for _, tc := range []struct {
		name         string
		at           time.Time
		tenant, slot string
		id           Identity
		alg          providers.Algorithm
		n            int
		want         Reason
	}{
		{"open allows", monday, "a", "open", alice, es256, 32, OK},
		{"open allows another algorithm", monday, "a", "open", alice, ps512, 64, OK},
		{"mtls identity of the tenant", monday, "a", "open", aliceCI, es256, 32, OK},
		{"ed25519 takes a message of any length", monday, "a", "open", alice, ed, 1000, OK},
		{"digest too short", monday, "a", "open", alice, es384, 32, BadRequest},
		{"digest too long", monday, "a", "open", alice, es256, 33, BadRequest},
		{"ed25519 with a hash", monday, "a", "open", alice, providers.Algorithm{Scheme: providers.SchemeEd25519, Hash: crypto.SHA512}, 64, UnsupportedAlgorithm},
		{"unknown scheme", monday, "a", "open", alice, providers.Algorithm{Scheme: 99, Hash: crypto.SHA256}, 32, UnsupportedAlgorithm},
		{"sha-1", monday, "a", "open", alice, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA1}, 20, UnsupportedAlgorithm},
		{"algorithm allowed", monday, "a", "algs", alice, es256, 32, OK},
		{"algorithm not allowed", monday, "a", "algs", alice, es384, 48, UnsupportedAlgorithm},
		{"algorithm checked before length", monday, "a", "algs", alice, es384, 1, UnsupportedAlgorithm},
		{"allowed algorithm, wrong length", monday, "a", "algs", alice, es256, 48, BadRequest},
		{"window opens Mon 08:00", utc(2024, 6, 3, 8, 0, 0), "a", "office", alice, es256, 32, OK},
		{"before the window", utc(2024, 6, 3, 7, 59, 59), "a", "office", alice, es256, 32, OutsideWindow},
		{"last minute of the window", utc(2024, 6, 7, 17, 59, 59), "a", "office", alice, es256, 32, OK},
		{"window end is exclusive", utc(2024, 6, 7, 18, 0, 0), "a", "office", alice, es256, 32, OutsideWindow},
		{"Wednesday noon", utc(2024, 6, 5, 12, 0, 0), "a", "office", alice, es256, 32, OK},
		{"Saturday", utc(2024, 6, 8, 12, 0, 0), "a", "office", alice, es256, 32, OutsideWindow},
		{"Sunday", utc(2024, 6, 9, 12, 0, 0), "a", "office", alice, es256, 32, OutsideWindow},
		{"overnight window, Sunday side", utc(2024, 6, 9, 23, 30, 0), "a", "night", alice, es256, 32, OK},
		{"overnight window, Monday side", utc(2024, 6, 10, 1, 59, 0), "a", "night", alice, es256, 32, OK},
		{"overnight window ends Mon 02:00", utc(2024, 6, 10, 2, 0, 0), "a", "night", alice, es256, 32, OutsideWindow},
		{"overnight window starts Sun 22:00", utc(2024, 6, 9, 21, 59, 0), "a", "night", alice, es256, 32, OutsideWindow},
		{"overnight window not on Saturday night", utc(2024, 6, 8, 23, 0, 0), "a", "night", alice, es256, 32, OutsideWindow},
		{"client not allowed (before paused)", monday, "a", "ci", alice3, es256, 32, PermissionDenied},
		{"mtls client not allowed", monday, "a", "ci", MTLSIdentity("spiffe://x/a/other"), es256, 32, PermissionDenied},
		{"allowed client reaches paused", monday, "a", "ci", alice, es256, 32, Paused},
		{"allowed mtls client reaches paused", monday, "a", "ci", aliceCI, es256, 32, Paused},
		{"paused in file", monday, "a", "frozen", alice, es256, 32, Paused},
		{"paused before algorithm", monday, "a", "frozen", alice, es384, 1, Paused},
		{"no such slot", monday, "a", "nope", alice, es256, 32, NotFound},
		{"other tenant's slot by name", monday, "a", "secret", alice, es256, 32, NotFound},
		{"other tenant named", monday, "b", "secret", alice, es256, 32, NotFound},
		{"peer not of the named tenant", monday, "a", "open", bob, es256, 32, NotFound},
		{"b uses its own slot", monday, "b", "secret", bob, es256, 32, OK},
		{"unknown peer", monday, "a", "open", UnixIdentity(4242, 4242), es256, 32, NotFound},
		{"unauthenticated", monday, "a", "open", Identity{}, es256, 32, NotFound},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := newFakeClock(tc.at)
			e := NewEngine(set, clock.now)
			d := e.Check(tc.tenant, tc.slot, tc.id, tc.alg, tc.n)
			if d.Reason != tc.want {
				t.Fatalf("Check = %v (%q), want %v", d.Reason, d.Message(), tc.want)
			}
			if d.Allowed() != (tc.want == OK) || (d.Message() == "") != (tc.want == OK) {
				t.Errorf("Allowed %v, Message %q", d.Allowed(), d.Message())
			}
			switch {
			case d.Reason == NotFound && d.Slot != nil:
				t.Error("NotFound carries a slot")
			case d.Reason != NotFound && (d.Slot == nil || d.Slot.FullName() != tc.tenant+"/"+tc.slot):
				t.Errorf("Slot = %v", d.Slot)
			}
			if tenant, ok := set.TenantOf(tc.id); ok {
				want := hashA
				if tenant == "b" {
					want = hashB
				}
				if d.PolicyHash != want {
					t.Error("PolicyHash is not the peer's tenant hash")
				}
			} else if d.PolicyHash != ([32]byte{}) {
				t.Error("unknown peer got a policy hash")
			}
		})
	}
}

// A tenant learns nothing about another tenant's slots: the denial for an
// existing slot of B is identical to the one for a slot nobody has.
func TestCheckIsolation(t *testing.T) {
	set := mustParse(t, enginePolicy)
	e := NewEngine(set, newFakeClock(monday).now)
	exists := e.Check("a", "secret", alice, es256, 32)
	missing := e.Check("a", "no-such-slot", alice, es256, 32)
	crossed := e.Check("b", "secret", alice, es256, 32)
	for _, d := range []Decision{exists, crossed} {
		if d != missing {
			t.Errorf("decision %+v differs from a missing slot's %+v", d, missing)
		}
	}
	if _, ok := set.Slot("a", "secret"); ok {
		t.Error("Set.Slot finds b's slot for a")
	}
	if err := e.Pause("a", "secret"); !errors.Is(err, ErrSlotNotFound) {
		t.Errorf("Pause(a, secret) = %v", err)
	}
}

func TestCheckRetryAfterWindow(t *testing.T) {
	set := mustParse(t, enginePolicy)
	clock := newFakeClock(utc(2024, 6, 3, 7, 59, 30).Add(250 * time.Millisecond))
	e := NewEngine(set, clock.now)
	d := e.Check("a", "office", alice, es256, 32)
	if d.Reason != OutsideWindow || d.RetryAfter != 29750*time.Millisecond {
		t.Errorf("Check = %v, RetryAfter %v", d.Reason, d.RetryAfter)
	}
	clock.set(utc(2024, 6, 7, 18, 0, 0)) // Friday evening: next Monday 08:00
	if d := e.Check("a", "office", alice, es256, 32); d.RetryAfter != 62*time.Hour {
		t.Errorf("RetryAfter = %v, want 62h", d.RetryAfter)
	}
}

func TestCheckRateLimit(t *testing.T) {
	set := mustParse(t, enginePolicy)
	clock := newFakeClock(monday.Add(10 * time.Hour))
	e := NewEngine(set, clock.now)
	check := func() Decision { return e.Check("a", "rated", alice, es256, 32) }
	expect := func(step string, want Reason) Decision {
		t.Helper()
		d := check()
		if d.Reason != want {
			t.Fatalf("%s: %v, want %v", step, d.Reason, want)
		}
		return d
	}
	for i := range 3 {
		expect("burst "+string(rune('1'+i)), OK)
	}
	if d := expect("after the burst", RateLimited); d.RetryAfter != 500*time.Millisecond {
		t.Errorf("RetryAfter = %v, want 500ms", d.RetryAfter)
	}
	clock.advance(499 * time.Millisecond)
	expect("just before a token refills", RateLimited)
	clock.advance(time.Millisecond)
	expect("one token refilled", OK)
	expect("and used", RateLimited)
	clock.advance(time.Hour)
	for range 3 {
		expect("a full bucket holds burst tokens", OK)
	}
	expect("never more than burst", RateLimited)
	// Other slots are not affected.
	if d := e.Check("a", "open", alice, es256, 32); d.Reason != OK {
		t.Errorf("open slot: %v", d.Reason)
	}
}

func TestCheckDailyQuota(t *testing.T) {
	set := mustParse(t, enginePolicy)
	clock := newFakeClock(utc(2024, 6, 3, 23, 59, 0))
	e := NewEngine(set, clock.now)
	expect := func(step string, want Reason) Decision {
		t.Helper()
		d := e.Check("a", "quota", alice, es256, 32)
		if d.Reason != want {
			t.Fatalf("%s: %v, want %v", step, d.Reason, want)
		}
		return d
	}
	expect("1st", OK)
	expect("2nd", OK)
	if d := expect("3rd", QuotaExceeded); d.RetryAfter != time.Minute {
		t.Errorf("RetryAfter = %v, want 1m", d.RetryAfter)
	}
	clock.advance(59*time.Second + 999*time.Millisecond)
	expect("23:59:59.999", QuotaExceeded)
	clock.advance(time.Millisecond)
	expect("UTC midnight resets", OK)
	expect("2nd of the new day", OK)
	expect("3rd of the new day", QuotaExceeded)
	// A denied request does not count: the next day still allows two.
	clock.advance(24 * time.Hour)
	expect("next day 1st", OK)
	expect("next day 2nd", OK)
	expect("next day 3rd", QuotaExceeded)
}

func TestCheckRateAndQuota(t *testing.T) {
	set := mustParse(t, enginePolicy)
	clock := newFakeClock(monday.Add(12 * time.Hour))
	e := NewEngine(set, clock.now)
	check := func() Reason { return e.Check("a", "both", alice, es256, 32).Reason }
	if r := check(); r != OK {
		t.Fatalf("first: %v", r)
	}
	for range 10 {
		if r := check(); r != RateLimited {
			t.Fatalf("within the second: %v", r)
		}
	}
	// The rate-limited requests did not eat the quota of 5.
	for i := range 4 {
		clock.advance(time.Second)
		if r := check(); r != OK {
			t.Fatalf("allowed #%d: %v", i+2, r)
		}
	}
	clock.advance(time.Second)
	if r := check(); r != QuotaExceeded {
		t.Fatalf("6th: %v, want QuotaExceeded", r)
	}
}

func TestPauseResume(t *testing.T) {
	set := mustParse(t, enginePolicy)
	e := NewEngine(set, newFakeClock(monday).now)
	if err := e.Pause("a", "open"); err != nil {
		t.Fatal(err)
	}
	if p, ok := e.Paused("a", "open"); !p || !ok {
		t.Errorf("Paused = %v, %v", p, ok)
	}
	if r := e.Check("a", "open", alice, es256, 32).Reason; r != Paused {
		t.Errorf("paused at run time: %v", r)
	}
	if r := e.Check("a", "algs", alice, es256, 32).Reason; r != OK {
		t.Errorf("another slot: %v", r)
	}
	if err := e.Resume("a", "open"); err != nil {
		t.Fatal(err)
	}
	if r := e.Check("a", "open", alice, es256, 32).Reason; r != OK {
		t.Errorf("resumed: %v", r)
	}
	if p, ok := e.Paused("a", "frozen"); !p || !ok {
		t.Errorf("file pause: Paused = %v, %v", p, ok)
	}
	if err := e.Resume("a", "frozen"); !errors.Is(err, ErrPausedInFile) {
		t.Errorf("Resume of a file-paused slot = %v", err)
	}
	if r := e.Check("a", "frozen", alice, es256, 32).Reason; r != Paused {
		t.Errorf("file-paused after Resume: %v", r)
	}
	for _, err := range []error{e.Pause("a", "nope"), e.Resume("b", "open")} {
		if !errors.Is(err, ErrSlotNotFound) {
			t.Errorf("unknown slot: %v", err)
		}
	}
	if _, ok := e.Paused("a", "nope"); ok {
		t.Error("Paused found an unknown slot")
	}
}

func TestSwapKeepsState(t *testing.T) {
	set := mustParse(t, enginePolicy)
	clock := newFakeClock(monday.Add(12 * time.Hour))
	e := NewEngine(set, clock.now)
	for range 3 {
		e.Check("a", "rated", alice, es256, 32)
	}
	e.Check("a", "quota", alice, es256, 32)
	e.Check("a", "quota", alice, es256, 32)
	if err := e.Pause("a", "open"); err != nil {
		t.Fatal(err)
	}

	// The new set drops "quota", changes "rated"'s burst, adds "fresh".
	next := mustParse(t, `
tenants:
  - name: a
    identities: {unix_uids: [1001]}
    slots:
      - {name: open, key: ka}
      - {name: rated, key: ka2, policy: {rate: {per_second: 2, burst: 4}}}
      - {name: fresh, key: ka, policy: {daily_quota: 1}}
`)
	e.Swap(next)
	if e.Set() != next {
		t.Fatal("Set is not the swapped set")
	}
	if d := e.Check("a", "rated", alice, es256, 32); d.Reason != OK || d.Slot.Key != "ka2" {
		t.Errorf("rated after swap: %v key %v (the 4th token of the new burst)", d.Reason, d.Slot.Key)
	}
	if r := e.Check("a", "rated", alice, es256, 32).Reason; r != RateLimited {
		t.Errorf("rated after swap: %v, want the bucket kept", r)
	}
	if r := e.Check("a", "open", alice, es256, 32).Reason; r != Paused {
		t.Errorf("run-time pause lost on swap: %v", r)
	}
	if r := e.Check("a", "quota", alice, es256, 32).Reason; r != NotFound {
		t.Errorf("removed slot: %v", r)
	}
	if r := e.Check("a", "fresh", alice, es256, 32).Reason; r != OK {
		t.Errorf("new slot: %v", r)
	}

	// Back to the first set the same day: "quota" returns with the day's
	// count (a drop and a return must not give the quota back), and it
	// is in the counts the agent stores meanwhile; "rated" still shares
	// its bucket.
	if got := e.DailyCounts(e.Today())["a/quota"]; got != 2 {
		t.Errorf("the dropped slot's stored count: %d, want 2", got)
	}
	e.Swap(set)
	if r := e.Check("a", "quota", alice, es256, 32).Reason; r != QuotaExceeded {
		t.Errorf("re-added slot the same day: %v, want its quota still used up", r)
	}
	if r := e.Check("a", "rated", alice, es256, 32).Reason; r != RateLimited {
		t.Errorf("rated: %v", r)
	}

	// Dropped again, and back the next day: it starts afresh.
	e.Swap(next)
	clock.advance(24 * time.Hour)
	e.Swap(set)
	if r := e.Check("a", "quota", alice, es256, 32).Reason; r != OK {
		t.Errorf("re-added slot the next day: %v, want a fresh count", r)
	}
}

// A restart reads back the day's counts of every slot in the journal; one
// the policy lacks at that point keeps its count for a reload that brings
// it back the same day.
func TestRestoredCountOfADroppedSlot(t *testing.T) {
	set := mustParse(t, enginePolicy)
	clock := newFakeClock(monday.Add(12 * time.Hour))
	e := NewEngine(mustParse(t, `
tenants:
  - name: a
    identities: {unix_uids: [1001]}
    slots:
      - {name: open, key: ka}
`), clock.now)
	if e.RestoreDailyCount("a", "quota", e.Today(), 2) {
		t.Error("RestoreDailyCount reported a slot the set lacks as existing")
	}
	e.Swap(set)
	if r := e.Check("a", "quota", alice, es256, 32).Reason; r != QuotaExceeded {
		t.Errorf("slot back after a restart that restored its count: %v, want QuotaExceeded", r)
	}
}

// The daily count never goes back a day: a check that read the clock just
// before midnight and counts after the new day's first signatures, or a
// clock stepped back across midnight, must not start the old day afresh and
// so hand the new day's quota out again.
func TestQuotaNeverGoesBackADay(t *testing.T) {
	set := mustParse(t, enginePolicy) // "quota": daily_quota 2
	clock := newFakeClock(monday.Add(24*time.Hour + time.Second))
	e := NewEngine(set, clock.now)
	for i, want := range []Reason{OK, OK, QuotaExceeded} {
		if r := e.Check("a", "quota", alice, es256, 32).Reason; r != want {
			t.Fatalf("check %d of the new day: %v, want %v", i+1, r, want)
		}
	}
	clock.set(monday.Add(24*time.Hour - time.Second)) // stepped back across midnight
	if r := e.Check("a", "quota", alice, es256, 32).Reason; r != QuotaExceeded {
		t.Errorf("check with the clock back on the old day: %v, want it counted against the newer day", r)
	}
	clock.set(monday.Add(24*time.Hour + 2*time.Second))
	if r := e.Check("a", "quota", alice, es256, 32).Reason; r != QuotaExceeded {
		t.Errorf("the new day after a straggler from the old one: %v, want its quota still used up", r)
	}
}

// A clock stepped back across midnight: the refusal's RetryAfter points at
// the end of the day the count is on (the newer one), when a retry passes.
// And a clock stepped far ahead and back (a VM resumed with a bad clock,
// then NTP): the day of the signatures made meanwhile is not kept, or the
// slot's quota would have to last until that day.
func TestQuotaDayAfterClockSteps(t *testing.T) {
	set := mustParse(t, enginePolicy) // "quota": daily_quota 2
	clock := newFakeClock(monday.Add(24*time.Hour + time.Second))
	e := NewEngine(set, clock.now)
	e.Check("a", "quota", alice, es256, 32)
	e.Check("a", "quota", alice, es256, 32)
	clock.set(monday.Add(24*time.Hour - 2*time.Second)) // back across midnight
	d := e.Check("a", "quota", alice, es256, 32)
	if d.Reason != QuotaExceeded || d.RetryAfter < 24*time.Hour {
		t.Fatalf("stepped back: %v, retry after %v; want QuotaExceeded until the newer day ends", d.Reason, d.RetryAfter)
	}

	e = NewEngine(set, clock.now)
	clock.set(monday.Add(365 * 24 * time.Hour)) // a year ahead, for two signatures
	e.Check("a", "quota", alice, es256, 32)
	e.Check("a", "quota", alice, es256, 32)
	clock.set(monday.Add(12 * time.Hour)) // corrected
	if r := e.Check("a", "quota", alice, es256, 32).Reason; r != OK {
		t.Fatalf("after the clock came back from a year ahead: %v, want today's quota fresh", r)
	}
}

// A rate-limit refusal gives its quota unit back to the day it was taken
// from, which after a step back across midnight is the newer day, not the
// clock's: refunded to the clock's day, every such refusal kept its unit.
func TestRateRefusalRefundsTheDayCounted(t *testing.T) {
	set := mustParse(t, enginePolicy) // "both": 1/s, burst 1, daily_quota 5
	clock := newFakeClock(monday.Add(24*time.Hour + time.Second))
	e := NewEngine(set, clock.now)
	if r := e.Check("a", "both", alice, es256, 32).Reason; r != OK {
		t.Fatalf("first: %v", r)
	}
	clock.set(monday.Add(24*time.Hour - time.Second)) // back across midnight
	for i := range 4 {
		if r := e.Check("a", "both", alice, es256, 32).Reason; r != RateLimited {
			t.Fatalf("check %d: %v, want RateLimited", i, r)
		}
	}
	allowed := 0
	for i := range 10 {
		clock.set(monday.Add(24*time.Hour + time.Duration(10+i)*time.Second)) // a token each second
		if e.Check("a", "both", alice, es256, 32).Reason == OK {
			allowed++
		}
	}
	if allowed != 4 {
		t.Fatalf("%d of the day's 4 remaining signatures allowed after 4 rate-limit refusals, want 4", allowed)
	}
}

// A Pause that lands after a Check passed the pause rule and before it
// counted the request in flight refuses the request (the fence: the Pause
// may have found the slot idle already), and the refusal takes nothing:
// the quota unit and the rate token go back, so the slot still has its
// whole quota and burst after the Resume. Before, the refused request kept
// both, and an agent restarted that day counted the PAUSED record as
// nothing, so memory and journal disagreed.
func TestPauseLandingDuringACheckTakesNothing(t *testing.T) {
	for _, tc := range []struct {
		slot    string
		allowed int    // Checks that pass after the Resume
		then    Reason // the next one
		count   uint64 // the day's count after them
	}{
		{"quota", 2, QuotaExceeded, 2}, // daily_quota 2
		{"rated", 3, RateLimited, 0},   // burst 3
		{"both", 1, RateLimited, 1},    // burst 1, daily_quota 5
	} {
		t.Run(tc.slot, func(t *testing.T) {
			clock := newFakeClock(monday.Add(12 * time.Hour))
			var e *Engine
			var pauseAtRead atomic.Bool
			// The engine reads its clock after the pause rule, for the
			// windows, quota and rate: a Pause there lands mid-check.
			e = NewEngine(mustParse(t, enginePolicy), func() time.Time {
				if pauseAtRead.CompareAndSwap(true, false) {
					if err := e.Pause("a", tc.slot); err != nil {
						t.Error(err)
					}
				}
				return clock.now()
			})
			pauseAtRead.Store(true)
			d := e.Check("a", tc.slot, alice, es256, 32)
			if d.Reason != Paused || d.Holds() {
				t.Fatalf("Check with a Pause landing during it: %v (holds %v), want Paused", d.Reason, d.Holds())
			}
			if pauseAtRead.Load() {
				t.Fatal("the clock was not read during the Check: the Pause did not land")
			}
			if err := e.Resume("a", tc.slot); err != nil {
				t.Fatal(err)
			}
			for i := range tc.allowed {
				d := e.Check("a", tc.slot, alice, es256, 32)
				if d.Reason != OK {
					t.Fatalf("Check %d after the Resume: %v, want OK (the refused one took a unit)", i+1, d.Reason)
				}
				d.Done()
			}
			if r := e.Check("a", tc.slot, alice, es256, 32).Reason; r != tc.then {
				t.Fatalf("Check %d after the Resume: %v, want %v", tc.allowed+1, r, tc.then)
			}
			if got := e.DailyCounts(e.Today())["a/"+tc.slot]; got != tc.count {
				t.Fatalf("the day's count: %d, want %d (the signatures allowed)", got, tc.count)
			}
		})
	}
}

// A reload that brings slots back pauses those its caller names in the same
// step that puts the set in force; slots that stayed keep their own state.
func TestSwapPausedPausesReturningSlots(t *testing.T) {
	set := mustParse(t, enginePolicy)
	e := NewEngine(mustParse(t, `
tenants:
  - name: a
    identities: {unix_uids: [1001]}
    slots:
      - {name: open, key: ka}
`), newFakeClock(monday).now)
	pausedNames := map[string]bool{"a/rated": true, "a/open": true}
	e.SwapPaused(set, func(tenant, slot string) bool { return pausedNames[tenant+"/"+slot] })
	cases := []struct {
		slot string
		want Reason
	}{
		{"rated", Paused}, // new to the engine, named: paused from the first Check
		{"open", OK},      // stayed: its run-time state (not paused) is kept
		{"quota", OK},     // new, not named
	}
	for _, tc := range cases {
		if r := e.Check("a", tc.slot, alice, es256, 32).Reason; r != tc.want {
			t.Errorf("%s: %v, want %v", tc.slot, r, tc.want)
		}
	}
}

// Checks run while sets are swapped; the rate bucket is shared across swaps,
// so exactly burst requests pass however the swaps interleave.
func TestSwapConcurrent(t *testing.T) {
	const burst = 500
	src := func(key string) string {
		return `
tenants:
  - name: a
    identities: {unix_uids: [1001]}
    slots:
      - {name: rated, key: ` + key + `, policy: {rate: {per_second: 0.001, burst: 500}}}
      - {name: open, key: ` + key + `}
`
	}
	sets := []*Set{mustParse(t, src("k1")), mustParse(t, src("k2"))}
	clock := newFakeClock(monday)
	e := NewEngine(sets[0], clock.now)

	var allowed, checks atomic.Int64
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 4 {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				if e.Check("a", "rated", alice, es256, 32).Allowed() {
					allowed.Add(1)
				}
				checks.Add(1)
				if d := e.Check("a", "open", alice, es256, 32); (d.Reason != OK && d.Reason != Paused) || (d.Slot.Key != "k1" && d.Slot.Key != "k2") {
					t.Errorf("open: %v", d.Reason)
				}
			}
		})
	}
	// Swap until the checkers have done plenty of work, so that the two
	// overlap whatever the scheduler does.
	for i := 0; i < 200 || checks.Load() < 20000; i++ {
		e.Swap(sets[i%2])
		if i%50 == 0 {
			_ = e.Pause("a", "open")
			_ = e.Resume("a", "open")
		}
	}
	close(stop)
	wg.Wait()
	// Drain whatever the goroutines left.
	for e.Check("a", "rated", alice, es256, 32).Allowed() {
		allowed.Add(1)
	}
	if got := allowed.Load(); got != burst {
		t.Errorf("allowed %d requests across swaps, want exactly the burst %d", got, burst)
	}
}

func TestSlotStateIsOneCacheLine(t *testing.T) {
	if n := unsafe.Sizeof(slotState{}); n != 64 {
		t.Errorf("slotState is %d bytes", n)
	}
}

func TestReasonNames(t *testing.T) {
	want := []string{"OK", "NOT_FOUND", "PERMISSION_DENIED", "UNSUPPORTED_ALGORITHM", "BAD_REQUEST",
		"RATE_LIMITED", "QUOTA_EXCEEDED", "OUTSIDE_WINDOW", "PAUSED"}
	for i, w := range want {
		if got := Reason(i).String(); got != w {
			t.Errorf("Reason(%d) = %s, want %s", i, got, w)
		}
	}
	if Reason(200).String() != "REASON_200" {
		t.Error(Reason(200).String())
	}
}

// A restarted agent reads its daily counts back: the engine refuses what
// the day's quota no longer allows, keeps a higher count it already has,
// and ignores a count of a day that is over.
func TestRestoreDailyCount(t *testing.T) {
	set := mustParse(t, enginePolicy)
	clock := newFakeClock(utc(2024, 6, 3, 12, 0, 0))
	e := NewEngine(set, clock.now)
	today := e.Today()
	if today != Day(utc(2024, 6, 3, 0, 0, 0)) || today != Day(utc(2024, 6, 3, 23, 59, 59)) {
		t.Fatalf("Today = %d", today)
	}
	if e.RestoreDailyCount("a", "nope", today, 1) {
		t.Error("restored a count for a slot that does not exist")
	}
	e.RestoreDailyCount("a", "quota", today-1, 2) // yesterday's: no effect today
	if d := e.Check("a", "quota", alice, es256, 32); d.Reason != OK {
		t.Fatalf("after yesterday's count: %v", d.Reason)
	}
	e.RestoreDailyCount("a", "quota", today, 0) // lower than what it has: kept
	// a/nope, which the set lacks, keeps its count for a reload that
	// brings it back (TestRestoredCountOfADroppedSlot).
	if got := e.DailyCounts(today); got["a/quota"] != 1 || got["a/nope"] != 1 || len(got) != 2 {
		t.Fatalf("DailyCounts = %v, want a/quota: 1, a/nope: 1", got)
	}
	e.RestoreDailyCount("a", "quota", today, 2)
	if d := e.Check("a", "quota", alice, es256, 32); d.Reason != QuotaExceeded {
		t.Fatalf("after restoring the day's 2: %v, want QuotaExceeded", d.Reason)
	}
	clock.advance(12 * time.Hour)
	if d := e.Check("a", "quota", alice, es256, 32); d.Reason != OK {
		t.Fatalf("the next day: %v", d.Reason)
	}
	e.RestoreDailyCount("a", "quota", today, 2) // the day is over: no effect
	if got := e.DailyCounts(today + 1); got["a/quota"] != 1 {
		t.Fatalf("DailyCounts of the new day = %v", got)
	}
}

// A reload that changes a slot's rate keeps the bucket's level in tokens:
// what was spent and not yet refilled stays spent, at most the new burst,
// and refills at the new rate. Before, the bucket was kept in the old
// rate's units: raising 1/s (burst 3600, used up) to 100/s refused the
// slot for an hour.
func TestSwapRebasesTheBucket(t *testing.T) {
	slot := func(rate string) string {
		s := "tenants:\n  - name: a\n    identities: {unix_uids: [1001]}\n    slots:\n      - {name: other, key: k}\n"
		if rate == "dropped" {
			return s
		}
		return s + "      - {name: s, key: k, policy: {" + rate + "}}\n"
	}
	for _, tc := range []struct {
		name string
		// spend is used up under the first policy, then the reloads
		// follow at once, one second apart.
		first   string
		spend   int
		reloads []string
		wait    time.Duration // after the last reload
		allowed int           // then allowed in a row
	}{
		{"rate raised", "rate: {per_second: 1, burst: 3600}", 3600, []string{"rate: {per_second: 100, burst: 1000}"}, 10 * time.Millisecond, 1},
		{"rate raised, a second of refill", "rate: {per_second: 1, burst: 3600}", 3600, []string{"rate: {per_second: 100, burst: 1000}"}, time.Second, 100},
		{"burst lowered", "rate: {per_second: 1, burst: 3600}", 100, []string{"rate: {per_second: 1, burst: 10}"}, 0, 0},
		{"burst raised", "rate: {per_second: 1, burst: 10}", 10, []string{"rate: {per_second: 1, burst: 100}"}, 0, 90},
		{"rate lowered", "rate: {per_second: 100, burst: 100}", 100, []string{"rate: {per_second: 1, burst: 100}"}, 0, 0},
		{"unchanged", "rate: {per_second: 1, burst: 10}", 10, []string{"rate: {per_second: 1, burst: 10}"}, 0, 0},
		// The spent tokens times the new interval pass int64 (1000 ×
		// 2.5e16 ns): the bucket stays empty, not full.
		{"rate lowered past int64 in ns", "rate: {per_second: 1000, burst: 1000}", 1000, []string{"rate: {per_second: 0.00000004, burst: 1}"}, 0, 0},
		{"rate removed and restored", "rate: {per_second: 0.001, burst: 5}", 5, []string{"daily_quota: 100", "rate: {per_second: 0.001, burst: 5}"}, 0, 0},
		{"dropped and back", "rate: {per_second: 0.001, burst: 5}", 5, []string{"dropped", "rate: {per_second: 0.001, burst: 5}"}, 0, 0},
		{"dropped and back at a higher rate", "rate: {per_second: 0.001, burst: 5}", 5, []string{"dropped", "rate: {per_second: 1000, burst: 5}"}, 5 * time.Millisecond, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := newFakeClock(monday.Add(12 * time.Hour))
			e := NewEngine(mustParse(t, slot(tc.first)), clock.now)
			for i := range tc.spend {
				if d := e.Check("a", "s", alice, es256, 32); !d.Allowed() {
					t.Fatalf("request %d under the first policy: %v", i, d.Reason)
				}
			}
			for i, r := range tc.reloads {
				if i > 0 {
					clock.advance(time.Second)
				}
				e.Swap(mustParse(t, slot(r)))
			}
			clock.advance(tc.wait)
			for i := range tc.allowed {
				if d := e.Check("a", "s", alice, es256, 32); !d.Allowed() {
					t.Fatalf("request %d after the reload: %v, retry after %v", i, d.Reason, d.RetryAfter)
				}
			}
			if d := e.Check("a", "s", alice, es256, 32); d.Reason != RateLimited {
				t.Fatalf("request %d after the reload: %v, want RATE_LIMITED", tc.allowed, d.Reason)
			}
		})
	}
}

// A refusal that time lifts says when, rounded up so that a retry then
// passes; the others keep their fixed text.
func TestDenialMessageSaysWhenToRetry(t *testing.T) {
	cases := []struct {
		d    Decision
		want string
	}{
		{Decision{Reason: RateLimited, RetryAfter: 500 * time.Millisecond}, "the key slot's rate limit is exceeded; retry in 500ms"},
		{Decision{Reason: RateLimited, RetryAfter: 1}, "the key slot's rate limit is exceeded; retry in 1ms"},
		{Decision{Reason: OutsideWindow, RetryAfter: 29750 * time.Millisecond}, "signing with this key slot is not allowed at this time (UTC windows); retry in 30s"},
		{Decision{Reason: QuotaExceeded, RetryAfter: time.Minute}, "the key slot's daily quota is used up; it resets at 00:00 UTC; retry in 1m0s"},
		{Decision{Reason: Paused}, "the key slot is paused"},
		{Decision{Reason: PermissionDenied}, "this client identity may not use the key slot"},
		{Decision{Reason: Reason(200)}, "denied by policy"},
	}
	for _, tc := range cases {
		if got := tc.d.Message(); got != tc.want {
			t.Errorf("%v after %v: %q, want %q", tc.d.Reason, tc.d.RetryAfter, got, tc.want)
		}
	}
}

// An algorithm refusal names the algorithm asked for and the ones the slot
// allows: "does not allow this algorithm" left a TLS handshake refused
// under an algorithm policy to guesswork.
func TestAlgorithmRefusalNamesTheAlgorithms(t *testing.T) {
	e := NewEngine(mustParse(t, enginePolicy), newFakeClock(monday).now)
	for _, tc := range []struct {
		name, slot string
		alg        providers.Algorithm
		n          int
		want       string
	}{
		{"not in the slot's list", "algs", es384, 48,
			"the key slot's policy does not allow ecdsa-sha384; it allows ecdsa-sha256, ed25519"},
		{"none a policy can name", "open", providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA1}, 20,
			"the key slot's policy does not allow ecdsa-SHA-1; it allows ecdsa-sha256, ecdsa-sha384, ecdsa-sha512, rsa-pkcs1v15-sha256, rsa-pkcs1v15-sha384, rsa-pkcs1v15-sha512, rsa-pss-sha256, rsa-pss-sha384, rsa-pss-sha512, ed25519"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := e.Check("a", tc.slot, alice, tc.alg, tc.n)
			if d.Reason != UnsupportedAlgorithm {
				t.Fatalf("Check = %v, want UNSUPPORTED_ALGORITHM", d.Reason)
			}
			if got := d.Message(); got != tc.want {
				t.Errorf("Message = %q, want %q", got, tc.want)
			}
		})
	}
}
