package journal

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/batchrepr"
	"github.com/cockroachdb/pebble/v2/vfs"
	"go.uber.org/zap"
)

// Who commits. Exactly one goroutine at a time holds the right to commit
// (Journal.busy), for three reasons:
//   - The chain head advances only when a commit succeeds, and records get
//     their Seq and PrevHash in the order they are committed.
//   - Every append that arrives while a commit is in flight joins the next
//     one: one tail log frame in `wal` mode; one Pebble batch, one WAL
//     write and one fsync in `fsync` mode. This is the group commit.
//   - Pebble is written by one goroutine at a time (the holder of busy, or
//     the applier, each under applyMu), so after a WAL failure no other
//     commit can be stuck in Pebble's pipeline when the journal closes and
//     reopens it.
//
// An Append that finds nobody committing commits its own record on its own
// goroutine, like a mutex would; an Append that finds a commit in flight
// queues and waits. The goroutine that was committing inline hands what
// queued meanwhile to the committer goroutine, which drains the queue in
// groups for as long as appends keep arriving, then lets the next Append
// go inline again. The inline path saves the two goroutine handoffs that
// a committer-only design pays per record: in `wal` mode, CPU per record
// 3.8 → 3.3 µs at g=1 and 3.5 → 3.25 µs at g=8 (bench_test.go, measured
// with the inline path switched off and on). The price: an inline
// Append cannot give up when its context ends, since it is the one inside
// Pebble; queued Appends can. During a Pebble write stall (memtables or L0
// full), appends take the queued path.

// checkpointInterval is how often a commit also writes the chain head to
// the "m/head" checkpoint entry (and Close always does). The checkpoint
// lets Verify and Open notice records deleted from the end of the chain,
// up to the last checkpoint. Writing it with every commit would cost about
// 0.9 µs of CPU per record (measured: a second memtable entry and WAL
// bytes per commit, plus the flush and compaction of its versions).
//
// In `wal` mode the checkpoint's commit waits for Pebble's WAL, after
// which the tail log starts over (tail.go), so the interval also sets how
// much of the tail's mapping appends cycle through: at 20k records/s,
// about 0.8 MiB at 100 ms, which stays in the CPU's caches, against 8 MiB
// at one second, which did not. Measured with agents side by side at 8
// connections (software ECDSA P-256, 20 rounds): ops/s 1.2% higher at
// 100 ms than at one second (median of the paired rounds; 14 of 20 in its
// favour), and copying a frame into the tail took about half the CPU in
// the agent's profile. Ten waited commits a second cost nothing measurable.
const checkpointInterval = 100 * time.Millisecond

// maxGroup bounds one commit group, keeping batches far below Pebble's
// large-batch threshold (MemTableSize/2).
const maxGroup = 4096

type requestKind uint8

const (
	kindRecord requestKind = iota
	kindState
)

// request is one Append or state write waiting for the committer. It is
// pooled: the caller returns it after reading the result. A caller that
// gives up (its context ended) leaves it to the garbage collector, since
// the committer may still be writing to it.
type request struct {
	kind    requestKind
	rec     Record
	changes []StateChange
	prune   *pruneRange // a prune's deletion, committed with rec
	err     error
	done    chan struct{} // buffered 1; the committer sends once
}

var requestPool = sync.Pool{New: func() any { return &request{done: make(chan struct{}, 1)} }}

// StateChange is one write to the state namespace: Value under Key, or a
// deletion of Key when Delete is set.
type StateChange struct {
	Key    string
	Value  []byte
	Delete bool
}

// Append journals r and returns once it is durable per Options.Durability.
// It fills r.Seq, r.PrevHash and r.Hash (and r.Time when zero). A non-nil
// error means the record was not confirmed and the caller must not act on
// the decision (release no signature): every such error wraps
// ErrUnavailable except a record that cannot be encoded (a string field
// longer than 65535 bytes, a time outside the years 1678-2261). Bytes of
// r's strings that are not UTF-8 are replaced with U+FFFD first, in r, as
// the JSON export would show them (Record.toValidUTF8). If ctx ends while
// the commit is pending Append returns an error wrapping both
// ErrUnavailable and ctx.Err(); the record
// may still be committed later, as may the records of a commit that failed
// after Pebble wrote them (see doc.go, "Failures").
func (j *Journal) Append(ctx context.Context, r *Record) error {
	return j.AppendWithState(ctx, r)
}

// AppendWithState journals r and applies the state changes in the same
// atomic commit, so a rotation step and its audit record are both there
// after a crash or neither is. Durability and errors are as for Append.
func (j *Journal) AppendWithState(ctx context.Context, r *Record, changes ...StateChange) error {
	r.toValidUTF8()
	if err := r.validate(); err != nil {
		return err
	}
	for _, c := range changes {
		if c.Key == "" {
			return errEmptyKey
		}
	}
	return j.submitRecord(ctx, r, changes, nil)
}

// submitRecord commits r with the state changes and, for a prune, its
// deletion.
func (j *Journal) submitRecord(ctx context.Context, r *Record, changes []StateChange, prune *pruneRange) error {
	if r.Time.IsZero() {
		r.Time = j.opts.Clock()
	}
	// The record stores Unix nanoseconds; hand back what Scan will return.
	r.Time = r.Time.Round(0).UTC()
	req := requestPool.Get().(*request)
	req.kind = kindRecord
	req.rec = *r
	req.changes = copyChanges(changes)
	req.prune = prune
	if err := j.submit(ctx, req); err != nil {
		return err
	}
	r.Seq, r.PrevHash, r.Hash = req.rec.Seq, req.rec.PrevHash, req.rec.Hash
	req.rec = Record{}
	req.changes = nil
	req.prune = nil
	requestPool.Put(req)
	return nil
}

// commitState commits state changes with no audit record.
func (j *Journal) commitState(ctx context.Context, changes []StateChange) error {
	req := requestPool.Get().(*request)
	req.kind = kindState
	req.changes = copyChanges(changes)
	if err := j.submit(ctx, req); err != nil {
		return err
	}
	req.changes = nil
	requestPool.Put(req)
	return nil
}

// Barrier returns once every commit submitted before it has been
// resolved: confirmed, or failed for good. An Append whose context ended
// while its commit was queued has returned an error, but the commit may
// still land (see Append); commits are taken in the order they were
// submitted, so once Barrier returns nil such a commit has landed or never
// will, and state read after it (Get) tells which. Barrier writes nothing
// itself (an empty group: like Healthy's probe, it reopens Pebble after a
// failure if the fault has cleared). An error means it could not wait that
// long: ctx ended first, or the journal is closed.
func (j *Journal) Barrier(ctx context.Context) error {
	err := j.commitState(ctx, nil)
	if err == nil || errors.Is(err, ErrClosed) ||
		errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	// The group the barrier went in failed (a full disk, a reopen not yet
	// due): it was still taken in its turn, after everything before it.
	return nil
}

// copyChanges copies the caller's slices so that a caller who gives up on
// a pending commit may reuse them.
func copyChanges(changes []StateChange) []StateChange {
	if len(changes) == 0 {
		return nil
	}
	out := make([]StateChange, len(changes))
	for i, c := range changes {
		out[i] = StateChange{Key: c.Key, Delete: c.Delete, Value: append([]byte(nil), c.Value...)}
	}
	return out
}

// submit commits req, inline or through the committer goroutine (see
// "Who commits" above). On success req is the caller's to recycle.
func (j *Journal) submit(ctx context.Context, req *request) error {
	if j.opts.ReadOnly {
		return ErrReadOnly
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	j.mu.Lock()
	if j.closing {
		j.mu.Unlock()
		return ErrClosed
	}
	if !j.busy && !j.stalled.Load() {
		// Nobody is committing (so nothing is queued: whoever holds busy
		// drains the queue before releasing it). Commit inline.
		j.busy = true
		j.mu.Unlock()
		group := [1]*request{req}
		err := j.commitGroup(group[:])
		j.releaseCommit()
		return err
	}
	j.pending = append(j.pending, req)
	if !j.busy {
		// Stalled and idle: the committer goroutine takes it.
		j.busy, j.handoff = true, true
		j.wake.Signal()
	}
	j.mu.Unlock()

	select {
	case <-req.done:
		return req.err
	case <-ctx.Done():
		return fmt.Errorf("%w: commit not confirmed: %w", ErrUnavailable, ctx.Err())
	}
}

// releaseCommit ends an inline commit: what queued meanwhile goes to the
// committer goroutine.
func (j *Journal) releaseCommit() {
	j.mu.Lock()
	if len(j.pending) > 0 {
		j.handoff = true
	} else {
		j.busy = false
	}
	// Wake the committer only for work: a needless wake-up costs a thread
	// wake per record on these VMs.
	if j.handoff || j.closing {
		j.wake.Signal()
	}
	j.mu.Unlock()
}

// commitLoop is the committer goroutine. It sleeps until an inline
// committer hands it the queue, drains it, and exits once Close has been
// called and nobody is committing.
func (j *Journal) commitLoop() {
	defer close(j.done)
	for {
		j.mu.Lock()
		for !j.handoff && !(j.closing && !j.busy) {
			j.wake.Wait()
		}
		if !j.handoff {
			j.mu.Unlock()
			return
		}
		j.handoff = false
		for len(j.pending) > 0 {
			group := j.pending
			if len(group) > maxGroup {
				j.pending = append(j.spare[:0], group[maxGroup:]...)
				group = group[:maxGroup]
			} else {
				j.pending = j.spare[:0]
			}
			j.mu.Unlock()

			// A prune commits in a group of its own: on a full journal
			// it goes through where records do not (onlyPrunes).
			rest := group
			if j.full {
				rest = j.commitPrunesApart(group)
			}
			if len(rest) > 0 {
				err := j.commitGroup(rest)
				for _, req := range rest {
					req.err = err
					req.done <- struct{}{}
				}
			}
			clear(group)
			j.mu.Lock()
			j.spare = group[:0]
		}
		j.busy = false
		j.mu.Unlock()
	}
}

// commitPrunesApart commits each prune of group in a group of its own,
// answers it, and returns the rest of group (the slice reused in place).
func (j *Journal) commitPrunesApart(group []*request) []*request {
	rest := group[:0]
	for _, req := range group {
		if req.prune == nil {
			rest = append(rest, req)
			continue
		}
		req.err = j.commitGroup([]*request{req})
		req.done <- struct{}{}
	}
	return rest
}

// commitGroup chains, encodes and commits one group. The head moves only
// if Pebble confirms the commit.
func (j *Journal) commitGroup(group []*request) error {
	if err := j.corruptErr(); err != nil && holdsWork(group) {
		return err
	}
	now := time.Now()
	if err := j.checkSpace(now); err != nil && !(onlyPrunes(group) && j.availBytes >= pruneFloorBytes) {
		if holdsWork(group) {
			j.stats.full.Add(1)
		}
		return err
	}
	if (j.applyFailed.Load() || j.fs.walFailed.Load()) && j.db != nil {
		// The applier could not give Pebble staged groups that callers
		// were told are in, or Pebble's own WAL writer failed meanwhile
		// (it refuses every later write): what callers were told is in
		// is in the tail log, which the reopen replays. Nothing more goes
		// to this DB.
		j.stats.failures.Add(1)
		j.log.Error("journal: reopening pebble after a failed write to it")
		j.closeFailedDB()
	}
	if j.db == nil {
		if err := j.recover(); err != nil {
			return err
		}
	}
	b := j.batch
	seq, prev := j.headSeq, j.headHash // only the holder of busy writes them
	var key [auditKeyLen]byte
	copy(key[:], auditPrefix)
	records := uint64(0)
	// waits: this commit waits for Pebble's WAL (see tail.go) rather than
	// going through the tail log, which it then starts over: also when the
	// applier found the tail's file moved away.
	moved := j.tailMoved.Load()
	waits := j.tail == nil || moved != nil && moved == j.tail.id
	if j.lost[1] != 0 {
		seq++
		note := Record{
			Seq: seq, Time: j.opts.Clock(), Op: LostOp, PrevHash: prev,
			Detail: fmt.Sprintf(lostRange+" were confirmed but are not in the store: the tail log and pebble's WAL both failed them; their signatures may have been released",
				j.lost[0], j.lost[1]),
		}
		putRecord(b, &key, &note)
		prev = note.Hash
		waits = true
	}
	if j.unconfirmed[1] != 0 {
		// The last failed commit reached the disk after all: say so in
		// the chain, next to the records whose callers were told no.
		seq++
		note := Record{
			Seq: seq, Time: j.opts.Clock(), Op: "journal.recovered", PrevHash: prev,
			Detail: fmt.Sprintf("records %d-%d were written by a commit that reported failure; their callers were refused and released nothing",
				j.unconfirmed[0], j.unconfirmed[1]),
		}
		putRecord(b, &key, &note)
		prev = note.Hash
	}
	for _, req := range group {
		if req.kind == kindRecord {
			seq++
			req.rec.Seq, req.rec.PrevHash = seq, prev
			putRecord(b, &key, &req.rec)
			prev = req.rec.Hash
			records++
			if req.prune != nil {
				j.refreshKeep(req.prune)
				putPrune(b, req.prune)
				waits = true
			}
		}
		if len(req.changes) > 0 {
			waits = true
		}
		for _, c := range req.changes {
			k := stateKey(c.Key)
			if c.Delete {
				_ = b.Delete(k, nil)
			} else {
				_ = b.Set(k, c.Value, nil)
			}
		}
	}
	if seq != j.headSeq && !now.Before(j.nextCheckpoint) {
		j.nextCheckpoint = now.Add(checkpointInterval)
		op := b.SetDeferred(len(headKey), headLen)
		copy(op.Key, headKey)
		encodeHead(op.Value, seq, prev)
		_ = op.Finish()
		waits = true
	}
	if b.Empty() {
		return nil // a state write with no changes: Healthy's recovery probe
	}
	if !waits && !j.tail.fits(len(b.Repr())) {
		// The mapped tail is full, or a written one could not start over:
		// it starts over after this commit.
		waits = true
	}

	if err := j.commitBatch(b, waits, seq, prev); err != nil {
		firstSeq := j.headSeq + 1
		j.stats.failures.Add(1)
		j.log.Error("journal commit failed; reopening pebble",
			zap.Uint64("first_seq", firstSeq), zap.Uint64("last_seq", seq), zap.Error(err))
		j.closeFailedDB()
		// Try once at once: a transient fault (one bad write) costs only
		// this group. If the fault persists, later groups retry at
		// RecoveryInterval.
		if rerr := j.recover(); rerr != nil {
			j.log.Warn("journal still unavailable", zap.Error(rerr))
		}
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	b.Reset()
	if waits && j.tail != nil {
		// Until the new tail is published, the applier's looks say
		// nothing (tailMovedAway): startOver may create a new file at
		// the path, which is no move, and Pebble's WAL has just been
		// written with every record applied; nothing is staged meanwhile,
		// since only the holder of busy stages.
		j.tailID.Store(nil)
		j.tail.startOver(j.log)
		j.publishTail()
	}
	j.headMu.Lock()
	j.headSeq, j.headHash = seq, prev
	j.headMu.Unlock()
	j.unconfirmed, j.lost = [2]uint64{}, [2]uint64{}
	j.stats.commits.Add(1)
	j.stats.records.Add(records)
	return nil
}

// errWALWriteFailed refuses a commit after Pebble's WAL writer failed.
var errWALWriteFailed = errors.New("a write to pebble's WAL failed")

// commitBatch commits b, whose records end at lastSeq with lastHash:
// waiting for Pebble's WAL, after the staged groups before it; or into
// the tail log, staged for the applier (see "Deferred apply").
func (j *Journal) commitBatch(b *pebble.Batch, waits bool, lastSeq uint64, lastHash [32]byte) error {
	if j.fs.walFailed.Load() {
		return errWALWriteFailed
	}
	if waits {
		j.applyMu.Lock()
		defer j.applyMu.Unlock()
		if err := j.applyStagedLocked(pebble.NoSync); err != nil {
			return err
		}
		if err := apply(j.db, b, pebble.Sync); err != nil {
			return err
		}
		j.walBuffered = false
		return nil
	}
	if err := j.tail.append(b.Repr(), j.headSeq+1, lastSeq, j.headHash, lastHash); err != nil {
		return err
	}
	return j.stage(b)
}

// Deferred apply. In `wal` mode a group is confirmed once its frame is in
// the tail log; Pebble gets it later. The committer appends the group's
// batch to a staged batch, and the applier goroutine commits the staged
// batch to Pebble (pebble.NoSync) Options.ApplyDelay (2 ms) after the
// first group joins it, so Pebble takes one commit per 2 ms of records
// instead of one per group.
//
// Why: the Pebble commit was most of an append's CPU (its commit pipeline,
// the memtable insert, and one WAL write(2) per group by Pebble's writer
// goroutine), and it sat inside the one-at-a-time section every append
// goes through. On 2 vCPUs shared with the clients that section's holder is
// often descheduled, and every append queued behind it waits too.
// Measured with agents side by side at 8 connections, software ECDSA
// P-256, ops/s ÷ the journal-off agent's, 8 rounds: this 0.86-0.94
// (median 0.90), a Pebble commit per group 0.82-0.89 (median 0.87). The
// record chained and hashed but stored nowhere measured 0.95-1.06 (median
// 0.97, 6 rounds). BenchmarkAppend/wal: 2.0 µs of CPU per record against
// 3.6 µs.
//
// What keeps it correct:
//   - Order. Staged batches reach Pebble in seq order: applyMu serializes
//     the applier with every other Pebble write, and a commit that waits
//     for Pebble's WAL (state changes, prunes, the checkpoint, a full tail)
//     applies the staged groups first under it. So Pebble always holds a
//     prefix of the chain, and a waited commit still means that every
//     earlier record is in Pebble's WAL file, which is when the tail may
//     start over.
//   - Readers. Every reader of audit records applies the staged groups
//     before it reads (readAuditDB), so it sees each record confirmed
//     before it started. State keys are only written by waited commits.
//   - Kills. The staged records are in the tail log, which Open replays.
//   - Failures. If applying fails, the staged groups stay in the tail;
//     the next commit (or Healthy) takes Pebble out of service and the
//     reopen replays the tail, as after any WAL failure. Close keeps the
//     tail instead of removing it. If the tail log fails instead, Pebble
//     gets the staged groups before it is closed for the reopen
//     (closeFailedDB), since the tail may no longer hold them.
//   - Bounds. Past maxStaged records the committer applies the staged
//     groups itself, so a starved applier slows appends instead of growing
//     memory; the tail's size bounds them too.

// maxStaged bounds the staged records (about 1 MiB at 420 bytes per
// record), far below Pebble's large-batch threshold (MemTableSize/2).
const maxStaged = 2048

// maxRun bounds the records one staged run holds. The applier stores the
// records staged between two applies (about 40 at 20k records/s) as runs
// of consecutive records, one Pebble value each, instead of one value per
// record: Pebble's cost goes with its keys (memtable inserts, and the
// per-key work of every flush and compaction), and records are small.
// BenchmarkAppend/wal: 1.5-1.7 µs of CPU per record against 2.1-2.2 µs
// with a value per record. Agents side by side at 8 connections, software
// ECDSA P-256, ops/s ÷ the journal-off agent's: 0.904 against 0.891
// (medians of 10 and 8 rounds; within this machine's noise). A bound keeps
// a reader that wants one record from decoding many.
const maxRun = 64

var errApplyFailed = errors.New("applying staged records to pebble failed")

// stagedRun is the run of records being staged: consecutive records the
// next apply stores as one value under the first one's seq.
type stagedRun struct {
	first uint64 // seq of its first record; meaningful when n > 0
	n     int
	buf   []byte // the records' encodings, concatenated
}

// reset empties the run, keeping its buffer for the next one.
func (r *stagedRun) reset() { r.n, r.buf = 0, r.buf[:0] }

// stage adds a group already in the tail log to the staged records and
// wakes the applier if there were none.
func (j *Journal) stage(b *pebble.Batch) error {
	j.stageMu.Lock()
	wasEmpty := j.stagedRecords == 0
	err := j.stageLocked(b)
	full := j.stagedRecords >= maxStaged
	j.stageMu.Unlock()
	if err != nil {
		return fmt.Errorf("journal: stage commit group: %w", err)
	}
	if wasEmpty {
		select {
		case j.applyKick <- struct{}{}:
		default:
		}
	}
	if full {
		// The group is confirmed (it is in the tail) whatever this
		// returns; a failure here is the next commit's to handle.
		_ = j.applyStaged()
	}
	return nil
}

// stageLocked adds the group's records to the open run, which is closed
// into the staged batch when the next record does not follow it or it is
// full. commitGroup stages only audit records: state changes, prunes and
// checkpoints wait for Pebble's WAL instead. Should a group hold anything
// else, what is staged of it must not reach Pebble without the rest, so
// it fails the way an apply does: the next commit reopens Pebble and the
// reopen replays the tail log, where the whole group is.
func (j *Journal) stageLocked(b *pebble.Batch) error {
	for r := batchrepr.Read(b.Repr()); ; {
		kind, key, value, ok, err := r.Next()
		if !ok && err == nil {
			return nil
		}
		seq, isRecord := seqFromKey(key)
		if err == nil && (kind != pebble.InternalKeyKindSet || !isRecord) {
			err = fmt.Errorf("a staged group holds a write of kind %v that is not an audit record", kind)
		}
		if err != nil {
			j.applyFailed.Store(true)
			return err
		}
		run := &j.openRun
		if run.n > 0 && (seq != run.first+uint64(run.n) || run.n == maxRun) {
			j.closeRun()
		}
		if run.n == 0 {
			run.first = seq
		}
		run.buf = append(run.buf, value...)
		run.n++
		j.stagedRecords++
	}
}

// closeRun moves the open run into the staged batch as one value.
func (j *Journal) closeRun() {
	run := &j.openRun
	if run.n == 0 {
		return
	}
	op := j.staged.SetDeferred(auditKeyLen, len(run.buf))
	putAuditKey(op.Key, run.first)
	copy(op.Value, run.buf)
	_ = op.Finish() // only fails for indexed batches
	run.reset()
}

// applyLoop is the applier goroutine: woken when a group is staged into
// an empty batch, it waits Options.ApplyDelay and applies what has
// gathered. It exits after a last apply once Close has stopped the
// committer.
//
// Before each apply it looks whether the tail log is still at its path
// (tailMovedAway). And once no group has come for ApplyDelay after an
// apply that left records in Pebble's WAL writer's buffer, it has that
// WAL written (writeBufferedWAL): on an idle agent nothing else would
// before its next append, and the tail log would stay those records' one
// copy a kill leaves, unwatched, however long that took (a deletion then
// lost them to a kill, unnoticed). Under load the next group comes first,
// and the look before its apply stands in for the write. The applier
// wakes only while records are staged or buffered: after the write, an
// idle agent's applier sleeps until the next append.
func (j *Journal) applyLoop() {
	defer close(j.applyDone)
	t := time.NewTimer(j.opts.ApplyDelay)
	t.Stop()
	idle := time.NewTimer(j.opts.ApplyDelay)
	idle.Stop()
	var idleC <-chan time.Time // armed while walBuffered may be set
	for {
		select {
		case <-j.applyKick:
		case <-idleC:
			idleC = nil
			_, found := j.tailMovedAway()
			err := j.writeBufferedWAL()
			if found != "" {
				j.warnTailMoved(found, err)
			}
			continue
		case <-j.applyStop:
			_ = j.applyStaged()
			return
		}
		if idleC != nil {
			idle.Stop()
			idleC = nil
		}
		t.Reset(j.opts.ApplyDelay)
		select {
		case <-t.C:
		case <-j.applyStop:
			t.Stop()
			_ = j.applyStaged()
			return
		}
		moved, found := j.tailMovedAway()
		if !moved {
			if j.applyStaged() == nil && j.isWALBuffered() {
				idle.Reset(j.opts.ApplyDelay)
				idleC = idle.C
			}
			continue
		}
		// The staged groups' frames went to a file no restart finds: into
		// Pebble's WAL file with them now, rather than whenever its
		// writer's buffer fills or a waited commit comes; and so do the
		// records applied before, should a reader have applied the
		// staged ones already.
		err := j.applyStagedWith(pebble.Sync)
		if err == nil {
			err = j.writeBufferedWAL()
		}
		if found != "" {
			j.warnTailMoved(found, err)
		}
	}
}

// isWALBuffered reports walBuffered.
func (j *Journal) isWALBuffered() bool {
	j.applyMu.Lock()
	defer j.applyMu.Unlock()
	return j.walBuffered
}

// warnTailMoved says that the applier found the tail log moved away, and
// what it found at its path instead (tailMovedAway).
func (j *Journal) warnTailMoved(found string, err error) {
	j.log.Warn("journal tail log was deleted or moved away; pebble's WAL was written with the records applied, and the next commit waits for it and creates a new tail log",
		zap.String("at_its_path", found), zap.NamedError("apply_error", err))
}

// writeBufferedWAL has Pebble's WAL writer write what it buffers (one
// pebble.Sync commit of no records), if records were applied without
// waiting for it since it was last written.
func (j *Journal) writeBufferedWAL() error {
	j.applyMu.Lock()
	defer j.applyMu.Unlock()
	if !j.walBuffered || j.db == nil || j.applyFailed.Load() {
		return nil // nothing buffered, or a reopen replays the tail log
	}
	if j.fs.walFailed.Load() {
		// Pebble would panic holding its commit lock (see doc.go); the
		// next commit reopens it, and the reopen replays the tail log.
		return errWALWriteFailed
	}
	if err := syncWAL(j.db, "sigil: applied records written"); err != nil {
		j.applyFailed.Store(true)
		j.log.Error("journal: writing pebble's WAL failed; the records are in the tail log, and pebble is reopened at the next commit",
			zap.Error(err))
		return fmt.Errorf("%w: %w", errApplyFailed, err)
	}
	j.walBuffered = false
	return nil
}

// applyStaged commits the staged groups to Pebble.
func (j *Journal) applyStaged() error { return j.applyStagedWith(pebble.NoSync) }

// applyStagedWith is applyStaged with Pebble's write options: pebble.Sync
// returns once Pebble's WAL has the groups.
func (j *Journal) applyStagedWith(opts *pebble.WriteOptions) error {
	j.applyMu.Lock()
	defer j.applyMu.Unlock()
	return j.applyStagedLocked(opts)
}

// applyStagedLocked is applyStagedWith with applyMu held. After a failure
// it applies nothing more until the DB is reopened.
func (j *Journal) applyStagedLocked(opts *pebble.WriteOptions) error {
	if j.applyFailed.Load() {
		return errApplyFailed
	}
	if j.db == nil {
		return nil // closed, or reopening: the staged groups went with it
	}
	j.stageMu.Lock()
	b := j.staged
	if b == nil {
		j.stageMu.Unlock()
		return nil
	}
	j.closeRun()
	if b.Empty() {
		j.stageMu.Unlock()
		return nil
	}
	records := j.stagedRecords
	j.staged, j.stagedRecords = j.spareStaged, 0
	j.stageMu.Unlock()
	var err error
	if j.fs.walFailed.Load() {
		// Pebble would panic holding its commit lock (see doc.go).
		err = errWALWriteFailed
	} else {
		err = apply(j.db, b, opts)
	}
	if err != nil {
		j.spareStaged = nil // never reused: the reopen makes new ones
		j.applyFailed.Store(true)
		j.log.Error("journal: applying staged records to pebble failed; they are in the tail log, and pebble is reopened at the next commit",
			zap.Int("records", records), zap.Error(err))
		return fmt.Errorf("%w: %w", errApplyFailed, err)
	}
	j.walBuffered = !opts.Sync
	b.Reset()
	j.spareStaged = b
	return nil
}

// putRecord encodes r, which must already carry its Seq and PrevHash,
// straight into the batch under its audit key, and sets r.Hash.
func putRecord(b *pebble.Batch, key *[auditKeyLen]byte, r *Record) {
	binary.BigEndian.PutUint64(key[len(auditPrefix):], r.Seq)
	op := b.SetDeferred(auditKeyLen, r.encodedLen())
	copy(op.Key, key[:])
	r.encodeInto(op.Value)
	_ = op.Finish() // only fails for indexed batches
}

// apply commits b and turns Pebble's Fatalf panic on a commit error into
// an error. With pebble.Sync it returns once the WAL was written, and
// synced in `fsync` mode (walFS); with pebble.NoSync once the batch is in
// the memtable, which only a tail log frame written first makes
// kill-safe.
func apply(db *pebble.DB, b *pebble.Batch, opts *pebble.WriteOptions) (err error) {
	defer func() {
		if p := recover(); p != nil {
			f, ok := p.(pebbleFatal)
			if !ok {
				panic(p)
			}
			err = f
		}
	}()
	return db.Apply(b, opts)
}

// closeFailedDB takes the failed Pebble out of service. After a failed WAL
// write Pebble refuses every later write (the log writer keeps its error)
// and its memtable may hold the unconfirmed batch, so it is closed, not
// reused.
func (j *Journal) closeFailedDB() {
	if j.db != nil && !j.applyFailed.Load() && !j.fs.walFailed.Load() {
		// When the tail log is what failed, Pebble is sound, and the
		// staged groups are in memory and in a tail that may now be
		// damaged: give them to Pebble, whose Close writes its WAL, before
		// it goes. When Pebble failed (already reported), the tail has
		// them. Only the holder of busy stages, so nothing joins them
		// before takeDB.
		if err := j.applyStaged(); err != nil {
			j.log.Warn("journal: staged records not applied before reopening pebble; the tail log has them", zap.Error(err))
		}
	}
	db := j.takeDB()
	j.batch = nil
	if err := j.tail.close(); err != nil {
		j.log.Warn("closing the tail log", zap.Error(err))
	}
	j.tail = nil
	j.publishTail()
	if db == nil {
		return
	}
	if err := closeDB(db); err != nil {
		j.log.Warn("closing failed pebble", zap.Error(err))
	}
	j.nextReopen = time.Time{}
}

// takeDB takes Pebble out of service and returns it for closing: readers
// and the applier no longer see it, and what is still staged is dropped
// (the tail log has it, and the next Open or reopen replays it).
func (j *Journal) takeDB() *pebble.DB {
	j.applyMu.Lock()
	defer j.applyMu.Unlock()
	j.dbMu.Lock()
	db := j.db
	j.db = nil
	j.dbMu.Unlock()
	j.stageMu.Lock()
	j.staged, j.stagedRecords = nil, 0
	j.openRun.reset()
	j.stageMu.Unlock()
	j.spareStaged = nil
	return db
}

// recover reopens Pebble after a failure, at most once per
// RecoveryInterval; in between it fails at once.
func (j *Journal) recover() error {
	now := time.Now()
	if now.Before(j.nextReopen) {
		return fmt.Errorf("%w: recovering from a write failure", ErrUnavailable)
	}
	j.nextReopen = now.Add(j.opts.RecoveryInterval)
	if err := j.probeDir(); err != nil {
		return fmt.Errorf("%w: %w", ErrUnavailable, err)
	}
	confirmed, confirmedHash := j.headSeq, j.headHash
	if err := j.openDB(); err != nil {
		return fmt.Errorf("%w: reopen: %w", ErrUnavailable, err)
	}
	j.stats.recoveries.Add(1)
	if j.headSeq < confirmed {
		// Records whose callers were told they are in are not: the tail
		// log and Pebble's own WAL both failed them. The chain must not
		// reuse their seqs (a later record would stand in for a lost one
		// and Verify would pass), so it carries on from the confirmed
		// head, which Verify reports as a gap, and the next commit says
		// what was lost.
		j.log.Error("journal reopened behind its confirmed head: confirmed records were lost; the chain continues after them",
			zap.Uint64("confirmed_seq", confirmed), zap.Uint64("store_head_seq", j.headSeq))
		j.lost = [2]uint64{j.headSeq + 1, confirmed}
		j.headMu.Lock()
		j.headSeq, j.headHash = confirmed, confirmedHash
		j.headMu.Unlock()
	}
	if j.headSeq > confirmed {
		// A commit that reported failure had reached the disk; the next
		// commit notes it in the chain.
		j.unconfirmed = [2]uint64{confirmed + 1, j.headSeq}
	}
	j.log.Info("journal recovered", zap.Uint64("head_seq", j.headSeq))
	return nil
}

// probeName is a scratch file in the Pebble directory; Pebble ignores
// files whose names it does not know.
const probeName = "journal-probe.tmp"

var probeData [4096]byte

// probeDir checks that the directory takes a new file, a write and a sync
// before recovery calls pebble.Open. Pebble's Open flushes the replayed
// WAL first and creates the new WAL last; if that last step fails, Open
// returns an error while a compaction the flush started is still running,
// and that compaction then panics on a background goroutine (v2.1.7,
// fileCacheKey.Shard: integer divide by zero), ending the process. So a
// recovery does not call Open into a disk that is still failing.
func (j *Journal) probeDir() error {
	name := j.fs.PathJoin(j.opts.Dir, probeName)
	f, err := j.fs.Create(name, vfs.WriteCategoryUnspecified)
	if err != nil {
		return fmt.Errorf("probe %s: %w", name, err)
	}
	_, err = f.Write(probeData[:])
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if rerr := j.fs.Remove(name); err == nil {
		err = rerr
	}
	if err != nil {
		return fmt.Errorf("probe %s: %w", name, err)
	}
	return nil
}

// spaceCheckInterval is how often the committer looks at free space while
// there is enough: a statfs costs about a microsecond, and at 100ms the
// journal's own writes (a few MB/s at most) cannot eat a 64 MiB reserve
// between two checks.
const spaceCheckInterval = 100 * time.Millisecond

// checkSpace refuses the commit group when the filesystem has less free
// space than Options.MinFreeBytes.
func (j *Journal) checkSpace(now time.Time) error {
	if j.opts.MinFreeBytes < 0 {
		return nil
	}
	if !j.full && now.Before(j.nextSpace) {
		return nil
	}
	j.nextSpace = now.Add(spaceCheckInterval)
	usage, err := j.fs.GetDiskUsage(j.opts.Dir)
	if err != nil {
		// Not knowing is not a reason to refuse: Pebble's own errors
		// still stop a failing write.
		if !errors.Is(err, vfs.ErrUnsupported) {
			j.log.Warn("journal free-space check failed", zap.Error(err))
		}
		j.full = false
		j.fullNow.Store(false)
		return nil
	}
	wasFull := j.full
	j.availBytes = usage.AvailBytes
	j.full = usage.AvailBytes < uint64(j.opts.MinFreeBytes)
	j.fullNow.Store(j.full)
	switch {
	case j.full:
		if !wasFull {
			j.log.Error("journal full: refusing appends",
				zap.Uint64("free_bytes", usage.AvailBytes), zap.Int64("reserve_bytes", j.opts.MinFreeBytes))
		}
		return fmt.Errorf("%w: journal full: %d bytes free, reserve is %d", ErrUnavailable, usage.AvailBytes, j.opts.MinFreeBytes)
	case wasFull:
		j.log.Info("journal has room again", zap.Uint64("free_bytes", usage.AvailBytes))
	}
	return nil
}

// pruneFloorBytes is the free space a prune needs when the journal is
// full. A prune is how a full journal gets its space back (audit.md,
// "Retention"): its commit, one record and a range deletion, is let
// through below MinFreeBytes, down to this, which leaves room for the
// memtable flush the compaction of the pruned range starts (Prune).
const pruneFloorBytes = 16 << 20

// onlyPrunes reports whether every request of group is a prune's.
func onlyPrunes(group []*request) bool {
	for _, req := range group {
		if req.prune == nil {
			return false
		}
	}
	return len(group) > 0
}

// holdsWork reports whether a group holds a record or a state change:
// Stats.Full counts refused work, not Healthy's empty probes.
func holdsWork(group []*request) bool {
	for _, req := range group {
		if req.kind == kindRecord || len(req.changes) > 0 {
			return true
		}
	}
	return false
}

func stateKey(key string) []byte {
	k := make([]byte, len(statePrefix)+len(key))
	copy(k, statePrefix)
	copy(k[len(statePrefix):], key)
	return k
}

func seqFromKey(k []byte) (uint64, bool) {
	if len(k) != auditKeyLen || string(k[:len(auditPrefix)]) != auditPrefix {
		return 0, false
	}
	return binary.BigEndian.Uint64(k[len(auditPrefix):]), true
}

func putUint64(b []byte, v uint64) { binary.BigEndian.PutUint64(b, v) }
func getUint64(b []byte) uint64    { return binary.BigEndian.Uint64(b) }

var errEmptyKey = errors.New("journal: empty state key")
