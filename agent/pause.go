package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/agent/rotation"
	"github.com/sigil-agent/sigil/policy"
	"github.com/sigil-agent/sigil/proto"
)

// Run-time pauses outlive the process. An operator who pauses a slot
// (`sigil pause`, or an incident drill between its pause and its resume)
// means "this key must not sign until someone says so"; a crash or a deploy
// must not lift that. So a pause is kept in the journal's state namespace
// and put back in force when the agent starts and after every policy
// reload, and the two directions fail differently, both closed:
//   - Pause takes effect in memory first, then is stored. If it cannot be
//     stored the slot is still paused, until a restart, and the caller is
//     told so.
//   - Resume is stored first, then takes effect. If it cannot be stored the
//     slot stays paused.
//
// Each is stored in one commit with its audit record: as two commits, an
// agent killed between them restarted paused with no record of the pause,
// or signing after a resume the journal did not show.

// pauseKeyPrefix is the state namespace of run-time pauses:
// pause/<tenant>/<slot>, whose value says who paused it and when.
const pauseKeyPrefix = "pause/"

// errPauseNotStored says a pause is in force but will not survive a restart.
var errPauseNotStored = errors.New("the pause could not be stored in the journal")

// pauser pauses and resumes slots in the policy engine and the journal.
// An operator's pauser pauses and lifts any pause; a drill's (own set)
// pauses only a slot that signs and lifts only its own pause, as
// rotation.Pauser asks.
type pauser struct {
	a  *Agent
	by string // who asks, stored with the pause
	// own, for a drill, holds the pause it made, to tell it from one an
	// operator made after it.
	own *uint64
}

func (p pauser) Pause(tenant, slot string, rec *journal.Record) error {
	p.a.pauseMu.Lock()
	defer p.a.pauseMu.Unlock()
	if p.own != nil {
		// A drill's look and its pause are one step under pauseMu, which
		// an operator's pause takes too: a pause made between a separate
		// look and this one would be numbered the drill's below, and
		// lifted by its resume.
		if paused, _ := p.a.policy.Paused(tenant, slot); paused {
			// Left as it is, but fenced all the same: a reload that
			// paused the slot in its file did not wait out the
			// signatures its old policy allowed, and the drill's
			// emergency rotation must not retire their key under them.
			p.waitIdle(tenant, slot)
			return rotation.ErrPausedAlready
		}
	}
	if err := p.a.policy.Pause(tenant, slot); err != nil {
		return err
	}
	// The fence: a request the policy allowed before the pause is let
	// finish, and its reply leave, so that once this returns (the
	// operator's ack, a drill's emergency rotation) no signature of the
	// slot is released. A request still running past its own deadline has
	// its signature withheld; a reply not written within
	// limits.write_timeout drops its connection, and the reply with it.
	// A reply queued behind another's write may wait out that write's
	// timeout before its own starts: two write timeouts in all.
	p.waitIdle(tenant, slot)
	p.a.pauseSerial++
	if p.a.pausedBy == nil {
		p.a.pausedBy = map[string]uint64{}
	}
	p.a.pausedBy[tenant+"/"+slot] = p.a.pauseSerial
	if p.own != nil {
		*p.own = p.a.pauseSerial
	}
	if p.a.journal == nil {
		return nil
	}
	value := fmt.Sprintf("paused by %s at %s", p.by, time.Now().UTC().Format(time.RFC3339))
	change := journal.StateChange{Key: pauseKeyPrefix + tenant + "/" + slot, Value: []byte(value)}
	if err := p.a.commitWithRecord(rec, change); err != nil {
		p.a.log.Error("slot paused, but the pause was not stored: it lasts until the agent restarts",
			zap.String("slot", tenant+"/"+slot), zap.Error(err))
		return fmt.Errorf("%w: %w", errPauseNotStored, err)
	}
	return nil
}

// errDrillUnderWay refuses what would let a slot sign during its incident
// drill: signatures allowed then, by the key the drill's emergency
// cut-over retires, were released after the cut-over record.
var errDrillUnderWay = &proto.Error{Code: proto.Unavailable, Msg: "an incident drill of this slot is under way; try again once it ends"}

// drillUnderWay marks slot's drill under way until the returned func is
// called: an operator's resume of the slot is refused meanwhile, and so is
// a policy reload that would lift the slot's pause in its file.
func (a *Agent) drillUnderWay(slot string) (done func()) {
	a.pauseMu.Lock()
	if a.drilling == nil {
		a.drilling = map[string]int{}
	}
	a.drilling[slot]++
	a.pauseMu.Unlock()
	return func() {
		a.pauseMu.Lock()
		if a.drilling[slot]--; a.drilling[slot] <= 0 {
			delete(a.drilling, slot)
		}
		a.pauseMu.Unlock()
	}
}

// swapPolicyLocked puts set in force, with pauseMu held. A slot that comes
// back is paused from its first Check if a stored pause names it, so the
// stored pauses are read first, and the reload refused (fail closed) if
// they cannot be. A slot whose drill is under way and whose pause in its
// file set would lift is refused too: the drill found it paused by the
// file and took no pause of its own.
func (a *Agent) swapPolicyLocked(set *policy.Set) error {
	paused, err := a.storedPauses(context.Background())
	if err != nil {
		return fmt.Errorf("the stored pauses could not be read: %w", err)
	}
	for name := range a.drilling {
		tenant, slot, _ := strings.Cut(name, "/")
		if !a.policy.PausedInFile(tenant, slot) {
			continue
		}
		if s, ok := set.Slot(tenant, slot); !ok || !s.Policy.Paused {
			return fmt.Errorf("slot %s is paused in the policy file and an incident drill of it is under way: reload once the drill ends", name)
		}
	}
	a.policy.SwapPaused(set, func(tenant, slot string) bool {
		_, ok := paused[tenant+"/"+slot]
		return ok
	})
	return nil
}

// waitIdle waits until the slot's signatures in flight are out.
func (p pauser) waitIdle(tenant, slot string) {
	lim := p.a.cfg.Limits
	wctx, cancel := context.WithTimeout(context.Background(), lim.RequestTimeout+2*lim.WriteTimeout+time.Second)
	defer cancel()
	if err := p.a.policy.WaitIdle(wctx, tenant, slot); err != nil {
		p.a.log.Warn("pause: signatures still in flight past the request timeout", zap.String("slot", tenant+"/"+slot), zap.Error(err))
	}
}

func (p pauser) Resume(tenant, slot string, rec *journal.Record) error {
	p.a.pauseMu.Lock()
	defer p.a.pauseMu.Unlock()
	if p.own == nil && p.a.drilling[tenant+"/"+slot] > 0 {
		return errDrillUnderWay
	}
	cur, ours := p.a.pausedBy[tenant+"/"+slot]
	if ours && p.own != nil && cur != *p.own {
		return rotation.ErrPausedMeanwhile
	}
	_, found := p.a.policy.Paused(tenant, slot)
	// A drill whose slot a reload dropped meanwhile lifts its own pause
	// all the same: its rotation is done, and a stored pause left behind
	// would pause the slot, by nobody's choice, when a reload brings it
	// back. An operator's resume of such a slot is refused, and the stored
	// pause kept for its return (docs/policy.md).
	gone := !found && p.own != nil && ours
	if !found && !gone {
		return policy.ErrSlotNotFound
	}
	if p.a.journal != nil {
		change := journal.StateChange{Key: pauseKeyPrefix + tenant + "/" + slot, Delete: true}
		if err := p.a.commitWithRecord(rec, change); err != nil {
			return &proto.Error{Code: proto.JournalUnavailable, Msg: "the slot stays paused: its resume could not be stored in the journal"}
		}
	}
	delete(p.a.pausedBy, tenant+"/"+slot)
	if gone {
		return nil
	}
	err := p.a.policy.Resume(tenant, slot)
	if p.own != nil && errors.Is(err, policy.ErrPausedInFile) {
		// A reload paused the slot in its file during the drill: the
		// drill's own pause is lifted, the file's stands, as any pause
		// made meanwhile would.
		return fmt.Errorf("%w: %w", rotation.ErrPausedMeanwhile, err)
	}
	return err
}

// commitWithRecord commits an operator action's audit record, with the
// state changes it makes (a stored pause) in the same commit, within the
// journal's own bound, and counts the append in the metrics.
func (a *Agent) commitWithRecord(rec *journal.Record, changes ...journal.StateChange) error {
	ctx, cancel := context.WithTimeout(context.Background(), journalAppendTimeout)
	defer cancel()
	t0 := time.Now()
	err := a.journal.AppendWithState(ctx, rec, changes...)
	a.metrics.journalAppended(time.Since(t0), err)
	return err
}

// restorePauses puts the stored pauses back in force. A stored pause of a
// slot the policy no longer has is kept, and applies again if the slot
// comes back.
func (a *Agent) restorePauses(ctx context.Context) error {
	if a.policy == nil {
		return nil
	}
	paused, err := a.storedPauses(ctx)
	if err != nil {
		return err
	}
	for name, detail := range paused {
		tenant, slot, _ := strings.Cut(name, "/")
		if err := a.policy.Pause(tenant, slot); err != nil {
			a.log.Warn("stored pause of a slot the policy does not have; kept for when it returns", zap.String("slot", name))
			continue
		}
		a.log.Info("slot paused (a stored run-time pause)", zap.String("slot", name), zap.String("detail", detail))
	}
	return nil
}

// storedPauses reads the stored run-time pauses: who paused each slot and
// when, by "tenant/slot".
func (a *Agent) storedPauses(ctx context.Context) (map[string]string, error) {
	paused := make(map[string]string)
	if a.journal == nil {
		return paused, nil
	}
	err := a.journal.ScanState(ctx, pauseKeyPrefix, func(key string, value []byte) error {
		paused[strings.TrimPrefix(key, pauseKeyPrefix)] = string(value)
		return nil
	})
	return paused, err
}

var _ rotation.Pauser = pauser{}
