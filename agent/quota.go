package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/policy"
	"github.com/sigil-agent/sigil/proto"
)

// Daily quotas outlive the process. The policy engine counts a slot's
// signatures in memory; a restart (a deploy, a crash) would hand the day's
// quota out again. So the agent stores the day's counts in the journal's
// state every quotaSnapshotInterval and at shutdown, together with the
// journal head they cover, and a starting agent takes the stored counts and
// adds the requests the policy counted that were journaled after them
// (after a crash, up to quotaSnapshotInterval of them). Without a stored count for today it counts
// the day's records from the first one stamped today (journal.FirstSeqAt).
//
// What is restored is what the policy counted: every request it allowed,
// released or not (countsAgainstQuota). Rate-limit buckets are not stored:
// a restart refills them, which the burst bounds.

// quotaStateKey is the state entry of the stored counts.
const quotaStateKey = "quota/counts"

// quotaSnapshotInterval bounds how many records a restart after a crash
// reads back.
const quotaSnapshotInterval = 10 * time.Second

// quotaSnapshot is what quotaStateKey holds.
type quotaSnapshot struct {
	Day    uint64            `json:"day"`    // policy.Day of the counts
	Seq    uint64            `json:"seq"`    // journal head when taken; later records are not in Counts
	Counts map[string]uint64 `json:"counts"` // "tenant/slot" → signatures counted that day
	// Ahead are the signatures counted against Day+1: after the clock was
	// stepped back across midnight the engine counts a slot that signed
	// on the newer day against that day (policy.Engine.Check), and Counts
	// lacks it. Nil in counts stored before it was kept; then counts of
	// the day before today say nothing of today's.
	Ahead map[string]uint64 `json:"ahead"`
}

// dayCount is a slot's count and the day it is counted against.
type dayCount struct{ day, n uint64 }

// count is takeQuota's rule: one more signature counted at a check on
// day, against the newer of day and the day counted, unless that is more
// than a day ahead (a clock stepped far ahead and back).
func (c dayCount) count(day uint64) dayCount {
	if c.day < day || c.day > day+1 {
		c = dayCount{day: day}
	}
	c.n++
	return c
}

// OfflinePruneCutoff is the cut-off a prune without the agent may use in
// place of cut. The agent stores the day's quota counts before it prunes;
// an offline prune cannot (it has no policy engine), and a restart would
// then count the day's quotas from records it deleted, handing them out a
// second time. So where quotas may be counted (the journal holds stored
// counts, or a record of today names a policy tenant) it keeps the records
// of the current UTC day: the returned time is the day's start, and kept
// is true, when cut is later.
func OfflinePruneCutoff(ctx context.Context, j *journal.Journal, cut, now time.Time) (before time.Time, kept bool, err error) {
	dayStart := now.UTC().Truncate(24 * time.Hour)
	if !cut.After(dayStart) {
		return cut, false, nil
	}
	counted := true
	if _, err := j.Get(quotaStateKey); errors.Is(err, journal.ErrNotFound) {
		counted = false
	} else if err != nil {
		return cut, false, err
	}
	if !counted {
		from, err := j.FirstSeqAt(dayStart)
		if err != nil {
			return cut, false, err
		}
		err = j.Scan(ctx, journal.Filter{FromSeq: from}, func(r *journal.Record) error {
			if r.Tenant != "" {
				counted = true
				return errStopScan
			}
			return nil
		})
		if err != nil && !errors.Is(err, errStopScan) {
			return cut, false, err
		}
	}
	if counted {
		return dayStart, true, nil
	}
	return cut, false, nil
}

// hasDailyQuota reports whether any slot of the policy in force has one.
func (a *Agent) hasDailyQuota() bool {
	for _, sl := range a.policy.Set().AllSlots() {
		if sl.Policy.DailyQuota > 0 {
			return true
		}
	}
	return false
}

// restoreQuotas puts the day's counts back into the policy engine. An
// error stops the agent from starting: without the counts it cannot tell
// how much of a quota is left (fail closed).
func (a *Agent) restoreQuotas(ctx context.Context) error {
	if a.policy == nil || a.journal == nil {
		return nil
	}
	day := a.policy.Today()
	dayStart := time.Unix(int64(day)*86400, 0)
	counts := map[string]dayCount{}
	snap, found, err := a.readQuotaSnapshot()
	if err != nil {
		return err
	}
	var from uint64
	// Stored counts hold today's when stored today, or the day before
	// with the counts ahead of it (stored while the clock was stepped
	// back across midnight: taken for the day the clock read, they
	// handed the newer day's quota out again at the clock's midnight).
	// Counts stored on the day after the clock's (before it was stepped
	// back) lack the slots still counted against the clock's day, whose
	// records precede them: today's records are read instead, and count
	// says which day each slot's signatures count against.
	stored := found && (snap.Day == day || snap.Day+1 == day && snap.Ahead != nil)
	if !stored && !a.hasDailyQuota() {
		// No slot in force has a quota and none was stored today: nothing
		// to restore, and the day's records need not be read. Stored
		// counts are restored even so: they may hold a slot a reload
		// dropped, which a later reload brings back the same day.
		return nil
	}
	if stored {
		for slot, n := range snap.Counts {
			counts[slot] = dayCount{snap.Day, n}
		}
		for slot, n := range snap.Ahead {
			counts[slot] = dayCount{snap.Day + 1, n} // the engine keeps the newer day's
		}
		from = snap.Seq + 1
	} else if from, err = a.journal.FirstSeqAt(dayStart); err != nil {
		return fmt.Errorf("find today's first audit record: %w", err)
	}
	read := 0
	refusals := policyRefusalCodes()
	// From the day before's start: a record stamped then after today's
	// first ones (a clock stepped back across midnight) was counted
	// against today, as count says.
	err = a.journal.Scan(ctx, journal.Filter{FromSeq: from, Since: dayStart.Add(-24 * time.Hour)}, func(r *journal.Record) error {
		read++
		if r.Op == "sign" && r.Tenant != "" && countsAgainstQuota(r, refusals) {
			counts[r.Slot] = counts[r.Slot].count(policy.Day(r.Time))
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("count today's signatures: %w", err)
	}
	for slot, c := range counts {
		if c.day < day || c.day > day+1 {
			continue // a day over, or one the engine drops
		}
		tenant, name, _ := strings.Cut(slot, "/")
		a.policy.RestoreDailyCount(tenant, name, c.day, c.n)
	}
	a.log.Info("daily quota counts restored", zap.Int("slots", len(counts)),
		zap.Bool("stored_counts", stored), zap.Int("records_read", read))
	return nil
}

// countsAgainstQuota reports whether the policy counted r's request
// against the slot's daily quota. The policy counts every request it allows,
// whether or not the provider then signs (policy.Engine.Check), so a record
// counts if it was released (OK), or if the policy allowed it and it failed
// after (its detail says so, allowedThenFailed, whatever its code: a key
// service's RATE_LIMITED is a policy refusal's code too). Records of agents
// before that detail count when the policy decided on them (the tenant's
// policy hash is set) with a code no policy refusal has: a provider
// failure, a deadline. A PAUSED record is not counted: the policy gives back
// what it took from a request a Pause refuses as it lands. BAD_REQUEST and
// UNSUPPORTED_ALGORITHM of the key's own request checks are not either:
// those run before the policy counts (agents before them ran after it, and
// their records are read the same way).
func countsAgainstQuota(r *journal.Record, refusals map[proto.Code]bool) bool {
	if r.Code == uint16(proto.OK) {
		return true
	}
	if r.PolicyHash == ([32]byte{}) {
		return false
	}
	return r.Detail == allowedThenFailed || !refusals[proto.Code(r.Code)]
}

// policyRefusalCodes are the wire codes of the policy's refusals, built
// once per restore rather than per record: a day's journal can hold
// millions.
func policyRefusalCodes() map[proto.Code]bool {
	codes := map[proto.Code]bool{}
	for reason := policy.NotFound; reason <= policy.Paused; reason++ {
		codes[reasonCode(reason)] = true
	}
	return codes
}

func (a *Agent) readQuotaSnapshot() (quotaSnapshot, bool, error) {
	var snap quotaSnapshot
	v, err := a.journal.Get(quotaStateKey)
	if errors.Is(err, journal.ErrNotFound) {
		return snap, false, nil
	}
	if err != nil {
		return snap, false, fmt.Errorf("read the stored quota counts: %w", err)
	}
	if err := json.Unmarshal(v, &snap); err != nil {
		// Counted again from the day's records instead.
		a.log.Warn("stored quota counts unreadable; counting today's records", zap.Error(err))
		return snap, false, nil
	}
	return snap, true, nil
}

// storeQuotas writes the day's counts with the journal head they cover.
// The head is read first: a signature journaled at or before it took its
// count before, so the counts include it; one counted but journaled later
// is counted twice on restore, which errs on the side of refusing.
func (a *Agent) storeQuotas(ctx context.Context, last *quotaSnapshot) error {
	snap, change, err := a.quotaChange()
	if err != nil {
		return err
	}
	if last != nil && last.Day == snap.Day && maps.Equal(last.Counts, snap.Counts) && maps.Equal(last.Ahead, snap.Ahead) {
		return nil
	}
	if err := a.journal.Put(ctx, quotaStateKey, change.Value); err != nil {
		return fmt.Errorf("store quota counts: %w", err)
	}
	if last != nil {
		*last = snap
	}
	return nil
}

// quotaChange is the day's counts with the journal head they cover (see
// storeQuotas), as the state change that stores them.
func (a *Agent) quotaChange() (quotaSnapshot, journal.StateChange, error) {
	seq, _ := a.journal.Head()
	day := a.policy.Today()
	snap := quotaSnapshot{Day: day, Seq: seq, Counts: a.policy.DailyCounts(day), Ahead: a.policy.DailyCounts(day + 1)}
	v, err := json.Marshal(snap)
	if err != nil {
		return snap, journal.StateChange{}, err
	}
	return snap, journal.StateChange{Key: quotaStateKey, Value: v}, nil
}

// startQuotaSnapshots stores the counts every quotaSnapshotInterval until
// Shutdown, which stores them once more (storeFinalQuotas).
func (a *Agent) startQuotaSnapshots() {
	if a.policy == nil || a.journal == nil {
		return
	}
	var last quotaSnapshot
	a.every(quotaSnapshotInterval, false, func(ctx context.Context) {
		if err := a.storeQuotas(ctx, &last); err != nil && ctx.Err() == nil {
			a.log.Warn("daily quota counts not stored; a restart will read more records", zap.Error(err))
		}
	})
}

// storeFinalQuotas stores the counts at Shutdown, after the signers and
// the snapshot loop have stopped.
func (a *Agent) storeFinalQuotas() {
	if a.policy == nil || a.journal == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), journalAppendTimeout)
	defer cancel()
	if err := a.storeQuotas(ctx, nil); err != nil {
		a.log.Warn("daily quota counts not stored at shutdown; the next start reads today's records", zap.Error(err))
	}
}
