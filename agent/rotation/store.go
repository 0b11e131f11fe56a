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

// commitTimeout bounds one state commit. State commits run detached from
// the caller's context: a revert after a cancelled rotation must still be
// written, and a commit abandoned half-way would leave the outcome unknown.
const commitTimeout = 10 * time.Second

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
type Store struct {
	j     *journal.Journal
	clock func() time.Time
	log   *zap.Logger

	mu   sync.Mutex      // serializes mutations; guards busy
	busy map[string]bool // slots with a rotation, rollback or drill running
	snap atomic.Pointer[snapshot]
}

type snapshot struct {
	slots map[string]*slotView // by "tenant/slot"
}

// slotView is one slot's immutable state with its lookups precomputed.
type slotView struct {
	slot   Slot
	active *Version
	byKID  map[string]*Version
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
	s := &Store{j: j, clock: opts.Clock, log: opts.Logger.Named("rotation"), busy: map[string]bool{}}
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
// slot is made with. It takes no lock and does not allocate.
func (s *Store) Resolve(slot string) (Version, error) {
	v := s.snap.Load().slots[slot]
	if v == nil {
		return Version{}, ErrNotFound
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

// acquire marks the slot busy for one rotation, rollback or drill.
func (s *Store) acquire(slot string) (release func(), err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.snap.Load().slots[slot] == nil {
		return nil, fmt.Errorf("%s: %w", slot, ErrNotFound)
	}
	if s.busy[slot] {
		return nil, fmt.Errorf("%s: %w", slot, ErrBusy)
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
	cur := s.snap.Load().slots[slot]
	if cur == nil {
		return Slot{}, fmt.Errorf("%s: %w", slot, ErrNotFound)
	}
	next := cur.slot.clone()
	if err := fn(&next, rec); err != nil {
		return Slot{}, err
	}
	return s.commitLocked(ctx, next, rec, extra...)
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
		// An unconfirmed commit may still land (journal doc.go, "Failures"):
		// take whatever the journal now holds as the truth.
		s.resyncLocked(sl.Tenant, sl.Name)
		return Slot{}, fmt.Errorf("journal %s: %w", rec.Op, err)
	}
	s.publishLocked(view)
	return view.slot.clone(), nil
}

func (s *Store) publishLocked(view *slotView) {
	old := s.snap.Load()
	next := &snapshot{slots: make(map[string]*slotView, len(old.slots)+1)}
	for k, v := range old.slots {
		next.slots[k] = v
	}
	next.slots[view.slot.FullName()] = view
	s.snap.Store(next)
}

func (s *Store) resyncLocked(tenant, name string) {
	b, err := s.j.Get(slotKey(tenant, name))
	if err != nil {
		s.log.Warn("rotation state not re-read after a failed commit; keeping the last confirmed state",
			zap.String("slot", tenant+"/"+name), zap.Error(err))
		return
	}
	var sl Slot
	if err := json.Unmarshal(b, &sl); err != nil {
		s.log.Error("rotation state unreadable", zap.String("slot", tenant+"/"+name), zap.Error(err))
		return
	}
	view, err := newView(sl)
	if err != nil {
		s.log.Error("rotation state invalid", zap.String("slot", tenant+"/"+name), zap.Error(err))
		return
	}
	s.publishLocked(view)
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
