package rotation

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
)

// State keys in the journal's state namespace (journal doc.go, "Key layout").
const (
	slotKeyPrefix     = "rot/"      // rot/<tenant>/<slot>: Slot as JSON
	repKeyPrefix      = "rotrep/"   // rotrep/<tenant>/<slot>/<n, 8 digits>.json|.sig
	incidentKeyPrefix = "rotdrill/" // rotdrill/<tenant>/<slot>/<first seq, 16 digits>.md
)

func slotKey(tenant, name string) string { return slotKeyPrefix + tenant + "/" + name }

func repKey(tenant, name string, n int, ext string) string {
	return fmt.Sprintf("%s%s/%s/%08d.%s", repKeyPrefix, tenant, name, n, ext)
}

// commitTimeout bounds one state commit, and the wait for the journal to
// resolve one it did not confirm (readBackLocked). State commits run
// detached from the caller's context: a revert after a cancelled rotation
// must still be written, and a commit abandoned half-way would leave the
// outcome unknown. A variable so that tests can shorten it.
var commitTimeout = 10 * time.Second

// StoreOptions configure a Store.
type StoreOptions struct {
	// Clock is the time source for every rotation decision (version times,
	// T1, record times). Default time.Now. Tests inject a fake clock.
	Clock func() time.Time
	// Logger. Default: no logging.
	Logger *zap.Logger
}

// EnsureDefaults fills in the zero-valued fields.
func (o *StoreOptions) EnsureDefaults() {
	if o.Clock == nil {
		o.Clock = time.Now
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
}

// Store holds every slot's versions, persisted in the journal's state
// namespace. Reads (Resolve, VersionForVerify) use an immutable snapshot
// behind an atomic pointer: no lock, no allocation. Mutations are
// serialized, each one a journal record and the slot's new state in one
// atomic commit (journal.AppendWithState), and the snapshot is replaced
// only after the commit is confirmed.
//
// A commit the journal does not confirm may still land (journal doc.go,
// "Failures"), so the store then reads the slot back (readBackLocked). A
// slot it cannot read back is unsettled, and a slot with a revert the
// journal did not confirm has it pending: either way the slot does not
// sign (Resolve fails) until settleLocked has read it back and committed
// the revert, which the slot's next mutation and every scheduler round
// (settleAll) try.
type Store struct {
	j     *journal.Journal
	clock func() time.Time
	log   *zap.Logger

	mu        sync.Mutex                // serializes mutations; guards busy, unsettled and pending
	busy      map[string]bool           // slots with a rotation, rollback or drill running
	unsettled map[string]bool           // slots whose state in memory may not be the journal's
	pending   map[string]*pendingRevert // reverts to commit before the slot signs again
	snap      atomic.Pointer[snapshot]
}

// pendingRevert is the undoing of a rotation's cut-over that the journal
// did not confirm. fn changes the slot as mutate's fn does, and returns
// errNoRevert when the slot has nothing to undo (the cut-over is not in
// the journal, or the revert already is).
type pendingRevert struct {
	rec journal.Record
	fn  func(sl *Slot, rec *journal.Record) error
}

// errNoRevert: a revert found nothing to undo.
var errNoRevert = errors.New("nothing to revert")

type snapshot struct {
	slots map[string]*slotView // by "tenant/slot"
}

// slotView is one slot's immutable state with its lookups precomputed.
type slotView struct {
	slot   Slot
	active *Version
	byKID  map[string]*Version
	hold   error // non-nil: the slot does not sign (Resolve returns it)
}

func newView(sl Slot) (*slotView, error) {
	if err := sl.check(); err != nil {
		return nil, err
	}
	v := &slotView{slot: sl, byKID: make(map[string]*Version, len(sl.Versions))}
	for i := range v.slot.Versions {
		ver := &v.slot.Versions[i]
		v.byKID[ver.KID] = ver
		if ver.State == StateActive {
			v.active = ver
		}
	}
	return v, nil
}

// OpenStore loads every slot's state from j, so an agent restarts into the
// state it left. A slot whose stored state fails validation is an error:
// the agent must not guess which version signs.
func OpenStore(ctx context.Context, j *journal.Journal, opts StoreOptions) (*Store, error) {
	if j == nil {
		return nil, errors.New("rotation: a journal is required")
	}
	opts.EnsureDefaults()
	s := &Store{j: j, clock: opts.Clock, log: opts.Logger.Named("rotation"), busy: map[string]bool{},
		unsettled: map[string]bool{}, pending: map[string]*pendingRevert{}}
	snap := &snapshot{slots: map[string]*slotView{}}
	err := j.ScanState(ctx, slotKeyPrefix, func(key string, value []byte) error {
		var sl Slot
		if err := json.Unmarshal(value, &sl); err != nil {
			return fmt.Errorf("rotation state %s: %w", key, err)
		}
		v, err := newView(sl)
		if err != nil {
			return fmt.Errorf("rotation state %s: %w", key, err)
		}
		if key != slotKey(sl.Tenant, sl.Name) {
			return fmt.Errorf("rotation state %s names slot %s", key, sl.FullName())
		}
		snap.slots[sl.FullName()] = v
		return nil
	})
	if err != nil {
		return nil, err
	}
	s.snap.Store(snap)
	s.log.Info("rotation state loaded", zap.Int("slots", len(snap.slots)))
	return s, nil
}

// Now is the store's clock.
func (s *Store) Now() time.Time { return s.clock() }

// Resolve returns the slot's active version: the key a signature for the
// slot is made with. It fails with ErrStateUnknown or ErrNotReverted while
// the journal has not confirmed where the slot stands (see Store). It
// takes no lock and does not allocate.
func (s *Store) Resolve(slot string) (Version, error) {
	v := s.snap.Load().slots[slot]
	if v == nil {
		return Version{}, ErrNotFound
	}
	if v.hold != nil {
		return Version{}, v.hold
	}
	return *v.active, nil
}

// VersionForVerify returns the slot's version with the kid if its
// signatures verify at now: the active one, or an accepted one before its
// T1. A retired version, or an accepted one at or past its T1, gives
// ErrKeyRetired; an unknown slot or kid ErrNotFound. No lock, no
// allocation.
func (s *Store) VersionForVerify(slot, kid string, now time.Time) (Version, error) {
	v := s.snap.Load().slots[slot]
	if v == nil {
		return Version{}, ErrNotFound
	}
	ver := v.byKID[kid]
	if ver == nil {
		return Version{}, ErrNotFound
	}
	if ver.StateAt(now) == StateRetired {
		return Version{}, ErrKeyRetired
	}
	return *ver, nil
}

// Get returns a copy of the slot's state.
func (s *Store) Get(slot string) (Slot, bool) {
	v := s.snap.Load().slots[slot]
	if v == nil {
		return Slot{}, false
	}
	return v.slot.clone(), true
}

// Slots returns a copy of every slot's state, sorted by full name.
func (s *Store) Slots() []Slot {
	snap := s.snap.Load()
	out := make([]Slot, 0, len(snap.slots))
	for _, v := range snap.slots {
		out = append(out, v.slot.clone())
	}
	sort.Slice(out, func(i, k int) bool { return out[i].FullName() < out[k].FullName() })
	return out
}

// Enroll makes key version 1 (active) of a slot not yet in the store, and
// journals it (op "enroll"). For a slot already enrolled it changes
// nothing: it returns the active version, and ErrSlotExists if no version
// of the slot has key's kid (the stored state, not the configuration,
// decides which key signs once a slot has rotated).
func (s *Store) Enroll(ctx context.Context, slot string, key providers.KeyInfo, peer string) (Version, error) {
	tenant, name, err := SplitSlot(slot)
	if err != nil {
		return Version{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	snap := s.snap.Load()
	if cur := snap.slots[slot]; cur != nil {
		if cur.byKID[key.KID] == nil {
			return *cur.active, fmt.Errorf("enroll %s with key %s (kid %s): %w", slot, key.Name, key.KID, ErrSlotExists)
		}
		return *cur.active, nil
	}
	now := s.clock()
	v := versionFromKey(1, key, now)
	v.State, v.Activated = StateActive, now
	sl := Slot{Format: slotFormat, Tenant: tenant, Name: name, Active: 1, Versions: []Version{v}}
	rec := &journal.Record{
		Time: now, Tenant: tenant, Slot: slot, Version: 1, KID: key.KID, Op: "enroll",
		CodeName: proto.OK.String(), Peer: peer,
		Detail: fmt.Sprintf("v1 = key %s (%s) on %s", key.Name, key.Type, key.Provider),
	}
	out, err := s.commitLocked(ctx, sl, rec)
	if err != nil {
		return Version{}, err
	}
	return out.ActiveVersion(), nil
}

func versionFromKey(n int, key providers.KeyInfo, now time.Time) Version {
	return Version{
		Number: n, Provider: key.Provider, Key: key.Name, KID: key.KID, KeyType: key.Type,
		SPKI: key.SPKI, Public: key.Public, Created: now,
	}
}

// acquire marks the slot busy for one rotation, rollback or drill, which
// then starts from the journal's state of the slot.
func (s *Store) acquire(ctx context.Context, slot string) (release func(), err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.snap.Load().slots[slot] == nil {
		return nil, fmt.Errorf("%s: %w", slot, ErrNotFound)
	}
	if s.busy[slot] {
		return nil, fmt.Errorf("%s: %w", slot, ErrBusy)
	}
	if err := s.settleLocked(ctx, slot); err != nil {
		return nil, err
	}
	s.busy[slot] = true
	return func() {
		s.mu.Lock()
		delete(s.busy, slot)
		s.mu.Unlock()
	}, nil
}

// mutate applies fn to a copy of the slot's current state and commits the
// result with rec in one journal commit. fn may fill in rec (version, kid,
// detail). When fn returns an error nothing is written.
func (s *Store) mutate(ctx context.Context, slot string, rec *journal.Record, fn func(sl *Slot, rec *journal.Record) error, extra ...journal.StateChange) (Slot, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.snap.Load().slots[slot] == nil {
		return Slot{}, fmt.Errorf("%s: %w", slot, ErrNotFound)
	}
	// fn must change the journal's state, not a stale copy of it.
	if err := s.settleLocked(ctx, slot); err != nil {
		return Slot{}, err
	}
	next := s.snap.Load().slots[slot].slot.clone()
	if err := fn(&next, rec); err != nil {
		return Slot{}, err
	}
	return s.commitLocked(ctx, next, rec, extra...)
}

// revert commits the undoing of a cut-over, like mutate, and does not let
// it go: if the journal does not confirm it, the store keeps it pending,
// the slot does not sign, and settleLocked commits it later. fn returns
// errNoRevert when there is nothing to undo; revert then writes nothing and
// returns nil, as it does once the revert is in the journal.
func (s *Store) revert(ctx context.Context, slot string, rec *journal.Record, fn func(sl *Slot, rec *journal.Record) error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pending[slot] = &pendingRevert{rec: *rec, fn: fn}
	s.republishLocked(slot) // the new version stops signing now
	err := s.settleLocked(ctx, slot)
	if err != nil && !s.unsettled[slot] {
		// The slot was read back after the failed commit: the revert may
		// be there after all (fn now finds nothing to undo), or the
		// journal has already recovered.
		err = s.settleLocked(ctx, slot)
	}
	return err
}

// settleLocked brings a slot the journal did not confirm back in line: it
// reads an unsettled slot back, then commits a pending revert. It is a
// no-op for a settled slot. While it fails the slot does not sign.
func (s *Store) settleLocked(ctx context.Context, slot string) error {
	if s.unsettled[slot] {
		tenant, name, _ := SplitSlot(slot)
		if err := s.readBackLocked(ctx, tenant, name); err != nil {
			return err
		}
	}
	p := s.pending[slot]
	cur := s.snap.Load().slots[slot]
	if p == nil || cur == nil {
		return nil
	}
	next, rec := cur.slot.clone(), p.rec
	rec.Time = s.clock()
	err := p.fn(&next, &rec)
	if err == nil {
		_, err = s.commitLocked(ctx, next, &rec)
	}
	if err != nil && !errors.Is(err, errNoRevert) {
		return fmt.Errorf("revert %s: %w: %w", slot, ErrNotReverted, err)
	}
	delete(s.pending, slot)
	s.republishLocked(slot)
	return nil
}

// settleAll settles every slot no rotation holds: a slot that does not
// sign may see no mutation for a long time, so the scheduler calls this
// every round.
func (s *Store) settleAll(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	slots := make(map[string]bool, len(s.unsettled)+len(s.pending))
	for slot := range s.unsettled {
		slots[slot] = true
	}
	for slot := range s.pending {
		slots[slot] = true
	}
	var errs []error
	for slot := range slots {
		if !s.busy[slot] {
			errs = append(errs, s.settleLocked(ctx, slot))
		}
	}
	return errors.Join(errs...)
}

// commitLocked validates sl, commits it with rec and publishes it.
func (s *Store) commitLocked(ctx context.Context, sl Slot, rec *journal.Record, extra ...journal.StateChange) (Slot, error) {
	view, err := newView(sl)
	if err != nil {
		return Slot{}, fmt.Errorf("rotation %s: refusing to store an invalid state: %w", sl.FullName(), err)
	}
	value, err := json.Marshal(&view.slot)
	if err != nil {
		return Slot{}, err
	}
	changes := append([]journal.StateChange{{Key: slotKey(sl.Tenant, sl.Name), Value: value}}, extra...)
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), commitTimeout)
	defer cancel()
	if err := s.j.AppendWithState(cctx, rec, changes...); err != nil {
		err = fmt.Errorf("journal %s: %w", rec.Op, err)
		// An unconfirmed commit may still land (journal doc.go, "Failures"):
		// take what the journal holds once it has landed or never will.
		if rerr := s.readBackLocked(ctx, sl.Tenant, sl.Name); rerr != nil {
			err = fmt.Errorf("%w; %w", err, rerr)
		}
		return Slot{}, err
	}
	s.publishLocked(view)
	return view.slot.clone(), nil
}

// publishLocked publishes view, which is not published yet, holding the
// slot from signing while it is unsettled or has a revert pending.
func (s *Store) publishLocked(view *slotView) {
	slot := view.slot.FullName()
	switch {
	case s.unsettled[slot]:
		view.hold = ErrStateUnknown
	case s.pending[slot] != nil:
		view.hold = ErrNotReverted
	default:
		view.hold = nil
	}
	old := s.snap.Load()
	next := &snapshot{slots: make(map[string]*slotView, len(old.slots)+1)}
	for k, v := range old.slots {
		next.slots[k] = v
	}
	next.slots[slot] = view
	s.snap.Store(next)
}

// republishLocked publishes the slot's current state again, after its
// hold changed.
func (s *Store) republishLocked(slot string) {
	if cur := s.snap.Load().slots[slot]; cur != nil {
		v := *cur
		s.publishLocked(&v)
	}
}

// readBackLocked reads the slot from the journal after a commit the
// journal did not confirm, and publishes it. It first waits for the
// journal to resolve every commit before (journal.Barrier): a commit that
// timed out in the queue may land after its caller gave up. When it cannot
// tell, the slot is unsettled and does not sign.
func (s *Store) readBackLocked(ctx context.Context, tenant, name string) error {
	slot := tenant + "/" + name
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), commitTimeout)
	defer cancel()
	err := s.j.Barrier(cctx)
	var b []byte
	if err == nil {
		b, err = s.j.Get(slotKey(tenant, name))
	}
	var view *slotView
	if err == nil {
		var sl Slot
		if err = json.Unmarshal(b, &sl); err == nil {
			view, err = newView(sl)
		}
	}
	switch {
	case errors.Is(err, journal.ErrNotFound) && s.snap.Load().slots[slot] == nil:
		// An enrolment that did not land: the slot is still not there.
		delete(s.unsettled, slot)
		return nil
	case err != nil:
		s.unsettled[slot] = true
		s.republishLocked(slot)
		s.log.Error("rotation state not confirmed and not read back: the slot does not sign until it is",
			zap.String("slot", slot), zap.Error(err))
		return fmt.Errorf("%s: %w: %w", slot, ErrStateUnknown, err)
	}
	delete(s.unsettled, slot)
	s.publishLocked(view)
	return nil
}

// isBusy reports whether a rotation holds the slot.
func (s *Store) isBusy(slot string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.busy[slot]
}

// REP returns the stored Rotation Evidence Pack number n of the slot: the
// canonical manifest and its detached signature.
func (s *Store) REP(slot string, n int) (manifest, sig []byte, err error) {
	tenant, name, err := SplitSlot(slot)
	if err != nil {
		return nil, nil, err
	}
	manifest, err = s.j.Get(repKey(tenant, name, n, "json"))
	if errors.Is(err, journal.ErrNotFound) {
		return nil, nil, fmt.Errorf("rep %d of %s: %w", n, slot, ErrNotFound)
	}
	if err != nil {
		return nil, nil, err
	}
	if sig, err = s.j.Get(repKey(tenant, name, n, "sig")); err != nil {
		return nil, nil, fmt.Errorf("rep %d of %s: signature: %w", n, slot, err)
	}
	return manifest, sig, nil
}

// REPNumbers lists the numbers of the slot's stored evidence packs, in order.
func (s *Store) REPNumbers(ctx context.Context, slot string) ([]int, error) {
	tenant, name, err := SplitSlot(slot)
	if err != nil {
		return nil, err
	}
	prefix := repKeyPrefix + tenant + "/" + name + "/"
	var out []int
	err = s.j.ScanState(ctx, prefix, func(key string, _ []byte) error {
		var n int
		if _, err := fmt.Sscanf(key[len(prefix):], "%08d.json", &n); err == nil {
			out = append(out, n)
		}
		return nil
	})
	slices.Sort(out)
	return slices.Compact(out), err
}
