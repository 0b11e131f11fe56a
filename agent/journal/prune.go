package journal

import (
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"go.uber.org/zap"
)

// Retention. A journal that only grows ends full, and a full journal
// refuses every signature; so old records can be deleted, from the start
// of the chain only, without losing the chain's proof:
//
//   - The anchor ("m/anchor") is the seq and hash of the last deleted
//     record. Verify starts there: the first kept record must chain to the
//     anchor's hash, exactly as it chained to the deleted record.
//   - Every prune appends a PruneOp record to the chain, in the same atomic
//     commit as the deletion and the anchor, whose DigestHash is the new
//     anchor's hash. Verify requires the newest such record to name the
//     stored anchor, so moving the anchor forward to hide more records
//     breaks the chain after it, like any other edit.
//   - Prune checks the links of every record it is about to delete and
//     refuses on a break: deleting a tampered range would erase the
//     evidence.
//
// Space comes back as Pebble compacts the range deletion away (its
// delete-only compactions drop sstables the deletion covers whole).

// anchorKey holds the chain's anchor after a prune.
const anchorKey = "m/anchor"

// PruneOp is the Op of the record a prune appends.
const PruneOp = "journal.pruned"

// LostOp is the op of the record that says confirmed records were lost
// (the tail log and Pebble's WAL both failed them) and the chain goes on
// after them: Verify reports the gap, Prune may delete across it.
const LostOp = "journal.lost"

// lostRange starts a LostOp record's detail: the seqs lost, which Prune
// reads back (attestedGap).
const lostRange = "records %d-%d"

// ErrPruneRefused wraps the reason a prune deleted nothing.
var ErrPruneRefused = errors.New("journal: prune refused")

// PruneResult says what one Prune deleted. All zero when nothing was old
// enough.
type PruneResult struct {
	Deleted    uint64   // records deleted
	FromSeq    uint64   // first deleted seq
	ToSeq      uint64   // last deleted seq: the new anchor
	AnchorHash [32]byte // hash of record ToSeq, which the first kept record chains to
	RecordSeq  uint64   // the PruneOp record that attests the anchor
}

func (p PruneResult) String() string {
	if p.Deleted == 0 {
		return "no records old enough to delete"
	}
	return fmt.Sprintf("deleted %d records (seq %d..%d); the chain now starts after seq %d (hash %s), attested by record %d",
		p.Deleted, p.FromSeq, p.ToSeq, p.ToSeq, hex.EncodeToString(p.AnchorHash[:8]), p.RecordSeq)
}

// pruneRange is the deletion a prune record's commit carries.
type pruneRange struct {
	from, to uint64
	hash     [32]byte // record to's hash
	// keep is the part of the run holding record to that follows it,
	// stored again under seq to+1 (nil when record to ends its run).
	keep []byte
}

// Prune deletes the records at the start of the chain whose Time is
// before the given time, up to the first record that is not, after
// checking their links. It never deletes the record it appends, so the
// chain is never empty after a prune. Concurrent Prunes run one at a
// time; appends go on meanwhile. by says who asked, for the record's Peer.
//
// The state changes are committed with the deletion, atomically, and like
// it below the free-space reserve: what must be stored before records go
// (the agent's daily quota counts) cannot then be refused on the full
// journal that a prune is there to empty.
func (j *Journal) Prune(ctx context.Context, before time.Time, by string, changes ...StateChange) (PruneResult, error) {
	if j.opts.ReadOnly {
		return PruneResult{}, ErrReadOnly
	}
	for _, c := range changes {
		if c.Key == "" {
			return PruneResult{}, errEmptyKey
		}
	}
	j.pruneMu.Lock()
	defer j.pruneMu.Unlock()
	pr, err := j.pruneRange(ctx, before)
	if err != nil || pr.to == 0 {
		return PruneResult{}, err
	}
	r := Record{
		Op:       PruneOp,
		CodeName: "OK",
		Peer:     by,
		// The anchor's hash in a hashed field, so Verify can compare it
		// with the stored anchor without parsing the detail.
		DigestHash: pr.hash,
		Detail: fmt.Sprintf("deleted records %d-%d, each older than %s; the chain now starts after seq %d",
			pr.from, pr.to, before.UTC().Format(time.RFC3339), pr.to),
	}
	r.toValidUTF8()
	if err := j.submitRecord(ctx, &r, changes, &pr); err != nil {
		return PruneResult{}, err
	}
	j.reclaim(ctx, pr.from, pr.to)
	return PruneResult{Deleted: pr.to - pr.from + 1, FromSeq: pr.from, ToSeq: pr.to, AnchorHash: pr.hash, RecordSeq: r.Seq}, nil
}

// reclaim compacts the pruned records' range, so that their space comes
// back now: a full journal is waiting for it, and Pebble's own compactions
// reach a range deletion only as the data above it grows. Best effort: the
// prune stands either way.
func (j *Journal) reclaim(ctx context.Context, from, to uint64) {
	j.dbMu.RLock()
	db := j.db
	if db == nil {
		j.dbMu.RUnlock()
		return
	}
	err := db.Compact(ctx, auditKeyFor(from), auditKeyFor(to+1), false)
	j.dbMu.RUnlock()
	if err != nil {
		j.log.Warn("journal: compacting the pruned records failed; their space comes back as Pebble compacts",
			zap.Uint64("from_seq", from), zap.Uint64("to_seq", to), zap.Error(err))
	}
}

// pruneRange finds the records to delete, checking each link on the way.
func (j *Journal) pruneRange(ctx context.Context, before time.Time) (pruneRange, error) {
	db, err := j.readAuditDB()
	if err != nil {
		return pruneRange{}, err
	}
	defer j.dbMu.RUnlock()
	snap, release := consistentView(db)
	defer release()
	anchorSeq, anchorHash, _, err := readMeta(snap, anchorKey)
	if err != nil {
		return pruneRange{}, fmt.Errorf("%w: %w", ErrPruneRefused, err)
	}
	it, err := snap.NewIter(auditIterOptions(anchorSeq + 1))
	if err != nil {
		return pruneRange{}, fmt.Errorf("journal: prune: %w", err)
	}
	defer it.Close()
	var (
		r    Record
		pr   = pruneRange{from: anchorSeq + 1}
		prev = anchorHash
		want = anchorSeq + 1
	)
	refuse := func(seq uint64, format string, args ...any) (pruneRange, error) {
		return pruneRange{}, fmt.Errorf("%w: the chain is broken at seq %d (%s); nothing was deleted, run audit verify",
			ErrPruneRefused, seq, fmt.Sprintf(format, args...))
	}
	beforeNS := before.UnixNano()
runs:
	for ok := it.First(); ok; ok = it.Next() {
		keySeq, okKey := seqFromKey(it.Key())
		if okKey && keySeq > want {
			// Records lost to a double fault leave a gap that a
			// journal.lost record attests (commit.go, recover): the
			// chain goes on from its link, and the gap can be pruned
			// like the records around it.
			if link, ok := attestedGap(it.Value(), want, keySeq); ok {
				want, prev = keySeq, link
			}
		}
		if !okKey || keySeq != want {
			return refuse(want, "expected seq %d, found key %x", want, it.Key())
		}
		run := it.Value()
		for off := 0; off < len(run); {
			if (want-pr.from)%4096 == 0 {
				if err := ctx.Err(); err != nil {
					return pruneRange{}, err
				}
			}
			val, _, err := nextInRun(run[off:])
			if err != nil {
				return refuse(want, "%v", err)
			}
			if ns, ok := peekTime(val); ok && ns >= beforeNS {
				if off > 0 {
					pr.keep = append([]byte(nil), run[off:]...)
				}
				break runs
			}
			if brk, _ := checkRecord(val, want, prev, &r); brk != nil {
				return refuse(want, "%s: %s", brk.Reason, brk.Detail)
			}
			pr.to, pr.hash, prev = want, r.Hash, r.Hash
			want++
			off += len(val)
		}
	}
	if err := it.Error(); err != nil {
		return pruneRange{}, fmt.Errorf("journal: prune: %w", err)
	}
	return pr, nil
}

// attestedGap reports whether run, stored under seq keySeq where seq want
// was expected, starts with the journal.lost record that names exactly the
// records want..keySeq-1, and returns its link (PrevHash).
func attestedGap(run []byte, want, keySeq uint64) ([32]byte, bool) {
	val, _, err := nextInRun(run)
	if err != nil {
		return [32]byte{}, false
	}
	var r Record
	if err := decodeRecord(val, &r); err != nil || r.Op != LostOp || r.Seq != keySeq {
		return [32]byte{}, false
	}
	var from, to uint64
	if _, err := fmt.Sscanf(r.Detail, lostRange, &from, &to); err != nil || from != want || to != keySeq-1 {
		return [32]byte{}, false
	}
	return r.PrevHash, true
}

// refreshKeep reads again, from the Pebble open now, what of the run holding
// record pr.to follows it: pruneRange read the layout of the DB open then,
// and a reopen in between (after a failed write) replays the tail log one
// record per key, so the run it saw may now be single records. Written
// back under pr.to+1, the old run would overlap those keys and break the
// chain. The committer calls it, holding busy, on the DB it commits to.
func (j *Journal) refreshKeep(pr *pruneRange) {
	if j.db == nil {
		return
	}
	it, err := j.db.NewIter(auditIterOptions(pr.from))
	if err != nil {
		return // the commit fails on the same DB, or pr.keep stands
	}
	defer it.Close()
	if !it.SeekLT(auditKeyFor(pr.to + 1)) {
		return
	}
	first, ok := seqFromKey(it.Key())
	if !ok {
		return
	}
	var keep []byte
	found := false
	_ = walkRun(it.Value(), first, func(seq uint64, rec []byte) error {
		switch {
		case seq == pr.to:
			found = true
		case seq > pr.to:
			keep = append(keep, rec...)
		}
		return nil
	})
	if found {
		pr.keep = keep
	}
}

// putPrune adds a prune's deletion and new anchor to the batch.
func putPrune(b *pebble.Batch, pr *pruneRange) {
	_ = b.DeleteRange(auditKeyFor(pr.from), auditKeyFor(pr.to+1), nil)
	if pr.keep != nil {
		// The records after the anchor in its run start a run of their own.
		_ = b.Set(auditKeyFor(pr.to+1), pr.keep, nil)
	}
	op := b.SetDeferred(len(anchorKey), headLen)
	copy(op.Key, anchorKey)
	encodeHead(op.Value, pr.to, pr.hash)
	_ = op.Finish()
}

func auditKeyFor(seq uint64) []byte {
	k := make([]byte, auditKeyLen)
	putAuditKey(k, seq)
	return k
}

// putAuditKey writes seq's audit key into k, which is auditKeyLen bytes.
func putAuditKey(k []byte, seq uint64) {
	copy(k, auditPrefix)
	binary.BigEndian.PutUint64(k[len(auditPrefix):], seq)
}
