package rotation

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"

	"github.com/zeebo/blake3"
	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/proto"
)

// Pauser pauses and resumes a slot's signing for a drill (signers get
// PAUSED meanwhile); the agent's implements it.
//
// Pause pauses only a slot that signs: one paused already, for whatever
// reason (an operator's pause, the policy file), it leaves as it is and
// returns ErrPausedAlready. It looks and pauses in one step: a pause made
// between a separate look and the drill's pause would be taken for the
// drill's own, and lifted by its resume.
//
// Resume lifts only the pause this Pauser made: when someone paused the
// slot again meanwhile (an operator, during the drill), it returns
// ErrPausedMeanwhile and the slot stays paused.
//
// Each commits rec, the change's audit record, in one atomic commit with
// the stored change (journal.AppendWithState), and does not commit it
// when it changes nothing (ErrPausedAlready, ErrPausedMeanwhile): a crash
// between two commits left a pause stored that no record showed, or a
// resume in force that the journal did not know.
type Pauser interface {
	Pause(tenant, slot string, rec *journal.Record) error
	Resume(tenant, slot string, rec *journal.Record) error
}

var (
	// ErrPausedAlready is a Pauser's Pause finding the slot paused by
	// someone else: it stays so, and the drill does not resume it.
	ErrPausedAlready = errors.New("the slot is paused already; it stays paused")
	// ErrPausedMeanwhile is a Pauser's Resume refusing to lift a pause
	// someone else made after its own.
	ErrPausedMeanwhile = errors.New("the slot was paused again meanwhile, by someone else; it stays paused")
)

// DrillReport is the outcome of an incident drill.
type DrillReport struct {
	Slot     string
	FirstSeq uint64 // the drill's first journal record ("drill.start")
	LastSeq  uint64 // its closing record ("drill.done" or "drill.failed")
	// Rotation is the emergency rotation; nil when it failed.
	Rotation *Result
	// Resumed: the slot was resumed. A drill whose rotation failed leaves
	// the slot paused, and so does one on a slot paused before it.
	Resumed bool
	// WasPaused: the slot was paused when the drill came to pause it (an
	// operator's pause, or its policy file), and the drill left it so.
	WasPaused bool
	// PausedMeanwhile: someone paused the slot again during the drill, and
	// the drill left that pause in force instead of resuming.
	PausedMeanwhile bool
	// Statement is the incident statement (Markdown), rendered from the
	// journal records of the drill; StatementFile is where it was written
	// (empty without an EvidenceDir). It is also stored in the journal
	// (Store.IncidentStatement).
	Statement     []byte
	StatementFile string
}

// Drill runs an incident drill on the slot, every step journaled:
//
//  1. drill.start;
//  2. pause the slot through p (signers get PAUSED);
//  3. emergency rotation (opts with Emergency set: overlap 0, the old
//     version stops verifying at the cut-over and is retired once the
//     rotation succeeded), which re-signs and verifies the canary set and
//     writes a REP;
//  4. resume the slot, unless it was paused when the drill came to
//     pause it: an operator who paused a suspect key and then drills it
//     means it to stay paused;
//  5. an incident statement rendered from the journal records of the
//     slot from the drill's first seq on, written next to the REPs and
//     stored; its BLAKE3 is in the closing record "drill.done".
//
// If the pause or the rotation fails, the slot is not resumed: a failed
// emergency rotation leaves the old version active, and in a real
// incident that key must not sign until someone has looked. The statement
// is still written (closing record "drill.failed") and the error returned.
func (r *Rotator) Drill(ctx context.Context, slot string, p Pauser, opts RotateOptions) (*DrillReport, error) {
	tenant, name, err := SplitSlot(slot)
	if err != nil {
		return nil, err
	}
	if p == nil {
		return nil, errors.New("drill: no pauser")
	}
	release, err := r.store.acquire(ctx, slot)
	if err != nil {
		return nil, err
	}
	defer release()

	started := r.now()
	rep := &DrillReport{Slot: slot}
	rec := func(op, detail string) *journal.Record {
		v, _ := r.store.Resolve(slot)
		return &journal.Record{Time: r.now(), Tenant: tenant, Slot: slot, Version: uint32(v.Number), KID: v.KID,
			Op: op, PolicyHash: opts.PolicyHash, CodeName: proto.OK.String(), Peer: opts.Peer, Detail: truncate(detail)}
	}
	appendRec := func(rc *journal.Record, changes ...journal.StateChange) error {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), commitTimeout)
		defer cancel()
		return r.store.j.AppendWithState(cctx, rc, changes...)
	}

	first := rec("drill.start", "incident drill: pause, emergency rotation, canaries, resume")
	if err := appendRec(first); err != nil {
		return nil, fmt.Errorf("drill %s: journal: %w", slot, err)
	}
	rep.FirstSeq = first.Seq

	drillErr := func() error {
		switch err := p.Pause(tenant, name, rec("pause", "incident drill: signing refused with PAUSED")); {
		case errors.Is(err, ErrPausedAlready):
			// The operator's pause, and who made it, stay as they are.
			rep.WasPaused = true
			if err := appendRec(rec("pause", "incident drill: the slot was paused already; it stays paused after the drill")); err != nil {
				return fmt.Errorf("pause: journal: %w", err)
			}
		case err != nil:
			return fmt.Errorf("pause: %w", err)
		}
		opts.Emergency = true
		if opts.Reason == "" {
			opts.Reason = "incident drill"
		}
		res, err := r.rotateLocked(ctx, slot, opts, false)
		if err != nil {
			return err
		}
		rep.Rotation = res
		if rep.WasPaused {
			return nil
		}
		if err := p.Resume(tenant, name, rec("resume", "incident drill: signing resumed")); errors.Is(err, ErrPausedMeanwhile) {
			// An operator paused the slot during the drill: their pause
			// stands, as one made before the drill would.
			rep.PausedMeanwhile = true
			if err := appendRec(rec("pause", "incident drill: the slot was paused again during the drill; it stays paused after the drill")); err != nil {
				return fmt.Errorf("resume: journal: %w", err)
			}
			return nil
		} else if err != nil {
			return fmt.Errorf("resume: %w", err)
		}
		rep.Resumed = true
		return nil
	}()

	// The statement, from the journal.
	in := &incident{slot: slot, started: started, ended: r.now(), firstSeq: rep.FirstSeq, result: rep.Rotation,
		err: drillErr, resumed: rep.Resumed, wasPaused: rep.WasPaused, pausedMeanwhile: rep.PausedMeanwhile, evidenceKeyID: EvidenceKeyID(r.evidencePub)}
	// Detached from ctx, as the drill's records are: the caller's going away
	// must not leave the drill without its closing record. If the read
	// fails all the same, the statement shows the records read so far and
	// the closing record says the drill failed.
	scanCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), commitTimeout)
	err = r.store.j.Scan(scanCtx, journal.Filter{FromSeq: rep.FirstSeq, Tenant: tenant}, func(rc *journal.Record) error {
		if rc.Slot == slot {
			in.records = append(in.records, *rc)
		}
		return nil
	})
	cancel()
	if err != nil {
		drillErr = errors.Join(drillErr, fmt.Errorf("read the journal for the statement: %w", err))
		in.err = drillErr
	}
	rep.Statement = renderIncident(in)
	if r.opts.EvidenceDir != "" {
		dir := filepath.Join(r.opts.EvidenceDir, tenant, name)
		fname := fmt.Sprintf("incident-%d.md", rep.FirstSeq)
		if err := writeFileAtomic(dir, fname, rep.Statement); err != nil {
			drillErr = errors.Join(drillErr, fmt.Errorf("write statement: %w", err))
		} else {
			rep.StatementFile = filepath.Join(dir, fname)
		}
	}
	sum := blake3.Sum256(rep.Statement)
	closing := rec("drill.done", fmt.Sprintf("incident statement blake3 %x", sum))
	if drillErr != nil {
		code := r.opts.Code(drillErr)
		closing.Op, closing.Code, closing.CodeName = "drill.failed", uint16(code), code.String()
		closing.Detail = truncate(fmt.Sprintf("%v; slot paused: %v; incident statement blake3 %x", drillErr, !rep.Resumed, sum))
	}
	key := fmt.Sprintf("%s%s/%s/%016d.md", incidentKeyPrefix, tenant, name, rep.FirstSeq)
	if err := appendRec(closing, journal.StateChange{Key: key, Value: rep.Statement}); err != nil {
		drillErr = errors.Join(drillErr, fmt.Errorf("journal the statement: %w", err))
	} else {
		rep.LastSeq = closing.Seq
	}
	if drillErr != nil {
		r.log.Error("incident drill failed", zap.String("slot", slot), zap.Bool("resumed", rep.Resumed), zap.Error(drillErr))
		return rep, fmt.Errorf("drill %s: %w", slot, drillErr)
	}
	r.log.Info("incident drill done", zap.String("slot", slot), zap.Uint64("first_seq", rep.FirstSeq), zap.Uint64("last_seq", rep.LastSeq))
	return rep, nil
}

// IncidentStatement returns the stored statement of the drill that began
// at journal seq firstSeq.
func (s *Store) IncidentStatement(slot string, firstSeq uint64) ([]byte, error) {
	tenant, name, err := SplitSlot(slot)
	if err != nil {
		return nil, err
	}
	b, err := s.j.Get(fmt.Sprintf("%s%s/%s/%016d.md", incidentKeyPrefix, tenant, name, firstSeq))
	if errors.Is(err, journal.ErrNotFound) {
		return nil, fmt.Errorf("incident statement %s@%d: %w", slot, firstSeq, ErrNotFound)
	}
	return b, err
}
