package agent

import (
	"context"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/policy"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
)

// stepClock is a wall clock a test sets.
type stepClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *stepClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *stepClock) Set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

// A day's quota is not handed out again by a restart after the clock was
// stepped back across midnight. The engine counts such a step's signatures
// against the newer day (docs/policy.md), and so must what a restart puts
// back: the counts stored and the records journaled. The counts stored
// while the clock read the day before left out every slot counting
// against the newer day, and a restart counted the newer day's records
// against the day before: either way the newer day's quota was handed out
// again at the clock's midnight.
func TestDailyQuotaSurvivesARestartAfterAStepBackAcrossMidnight(t *testing.T) {
	const quota = 3
	set, err := policy.Parse("policy.yaml", []byte(`
tenants:
  - name: payments
    identities: {unix_uids: [1000]}
    slots:
      - {name: release, key: default, policy: {daily_quota: 3}}
`))
	if err != nil {
		t.Fatal(err)
	}
	midnight := time.Date(2026, 12, 8, 0, 0, 0, 0, time.UTC)

	for _, tc := range []struct {
		name string
		// storeInTheStep: the counts were stored again while the clock
		// read the day before.
		storeInTheStep bool
		// restartAt is the clock at the restart.
		restartAt time.Time
	}{
		{"counts stored before the step, restart in it", false, midnight.Add(-90 * time.Second)},
		{"counts stored in the step, restart in it", true, midnight.Add(-90 * time.Second)},
		{"counts stored before the step, restart after the clock's midnight", false, midnight.Add(time.Second)},
		{"counts stored in the step, restart after the clock's midnight", true, midnight.Add(time.Second)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			clock := &stepClock{t: midnight.Add(10 * time.Second)}
			a, j := quotaTestAgent(t, set, clock)
			signed := 0
			sign := func() proto.Code {
				t.Helper()
				return signReleaseAndRecord(t, a, j, &signed)
			}
			// Two signatures of the new day, stored; then the clock is
			// stepped back two minutes, and one more is signed, which
			// the engine counts against the new day.
			for i := 0; i < 2; i++ {
				if code := sign(); code != proto.OK {
					t.Fatalf("signature %d: %v", i+1, code)
				}
			}
			if err := a.storeQuotas(ctx, nil); err != nil {
				t.Fatal(err)
			}
			clock.Set(midnight.Add(-110 * time.Second))
			if code := sign(); code != proto.OK {
				t.Fatalf("signature 3: %v", code)
			}
			if code := sign(); code != proto.QuotaExceeded {
				t.Fatalf("signature 4, before the restart: %v, want QUOTA_EXCEEDED", code)
			}
			if tc.storeInTheStep {
				if err := a.storeQuotas(ctx, nil); err != nil {
					t.Fatal(err)
				}
			}

			clock.Set(tc.restartAt) // restarted
			a = &Agent{log: a.log, journal: j, policy: policy.NewEngine(set, clock.Now)}
			if err := a.restoreQuotas(ctx); err != nil {
				t.Fatal(err)
			}
			for _, at := range []time.Time{tc.restartAt, midnight.Add(time.Minute), midnight.Add(23 * time.Hour)} {
				if at.Before(tc.restartAt) {
					continue
				}
				clock.Set(at)
				if code := sign(); code != proto.QuotaExceeded {
					t.Fatalf("at %v after the restart: %v; %d signatures of a quota of %d on %s", at.Format(time.TimeOnly), code, signed, quota, midnight.Format(time.DateOnly))
				}
			}
		})
	}
}

// A slot that used its quota on day D-1 before midnight and did not sign
// on D; counts stored at D 00:00:10; the clock stepped back 2 min; a
// restart. The running engine refuses (the slot's count is D-1's). The
// restart took the counts stored on D, which lack the slot, and read only
// the records after them: D-1's quota was handed out again.
func TestDailyQuotaOfTheClockDaySurvivesARestartOnTheDayBefore(t *testing.T) {
	set, err := policy.Parse("policy.yaml", []byte(`
tenants:
  - name: payments
    identities: {unix_uids: [1000]}
    slots:
      - {name: release, key: default, policy: {daily_quota: 3}}
`))
	if err != nil {
		t.Fatal(err)
	}
	midnight := time.Date(2026, 12, 8, 0, 0, 0, 0, time.UTC)
	ctx := context.Background()
	clock := &stepClock{t: midnight.Add(-60 * time.Second)}
	a, j := quotaTestAgent(t, set, clock)
	signed := 0
	sign := func() proto.Code {
		t.Helper()
		return signReleaseAndRecord(t, a, j, &signed)
	}
	for i := 0; i < 3; i++ {
		if code := sign(); code != proto.OK {
			t.Fatalf("signature %d: %v", i+1, code)
		}
	}
	clock.Set(midnight.Add(10 * time.Second))
	if err := a.storeQuotas(ctx, nil); err != nil { // the 10 s snapshot after midnight
		t.Fatal(err)
	}
	clock.Set(midnight.Add(-110 * time.Second)) // stepped back
	if code := sign(); code != proto.QuotaExceeded {
		t.Fatalf("before the restart: %v, want QUOTA_EXCEEDED", code)
	}
	a = &Agent{log: a.log, journal: j, policy: policy.NewEngine(set, clock.Now)} // restarted
	if err := a.restoreQuotas(ctx); err != nil {
		t.Fatal(err)
	}
	if code := sign(); code != proto.QuotaExceeded {
		t.Fatalf("after the restart: %v; %d signatures of a quota of 3 on %s", code, signed, midnight.Add(-time.Hour).Format(time.DateOnly))
	}
}

// signReleaseAndRecord is an Ed25519 signature by uid 1000 with
// payments/release as the agent makes it, the provider left out: the
// policy's check and, when it allows, the journal's record (counted in
// *signed). It returns the check's code.
func signReleaseAndRecord(t *testing.T, a *Agent, j *journal.Journal, signed *int) proto.Code {
	t.Helper()
	d := a.policy.Check("payments", "release", policy.UnixIdentity(1000, 1000), providers.Algorithm{Scheme: providers.SchemeEd25519}, 32)
	code := reasonCode(d.Reason)
	if d.Allowed() {
		d.Done()
		*signed++
		r := journal.Record{Op: "sign", Tenant: "payments", Slot: "payments/release", Code: uint16(code),
			CodeName: code.String(), PolicyHash: d.PolicyHash}
		if err := j.Append(context.Background(), &r); err != nil {
			t.Fatal(err)
		}
	}
	return code
}

// quotaTestAgent is as much of an agent as the quota tests need: a journal
// and a policy engine on set, both on clock. The journal is closed at the
// test's end.
func quotaTestAgent(t *testing.T, set *policy.Set, clock *stepClock) (*Agent, *journal.Journal) {
	t.Helper()
	log := zaptest.NewLogger(t)
	j, err := journal.Open(journal.Options{Dir: filepath.Join(t.TempDir(), "journal"), Logger: log, Clock: clock.Now, MinFreeBytes: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { j.Close() })
	return &Agent{log: log, journal: j, policy: policy.NewEngine(set, clock.Now)}, j
}
