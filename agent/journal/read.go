package journal

import (
	"bufio"
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// Filter selects audit records for Scan, Last and WriteJSONL. Zero fields
// select everything.
type Filter struct {
	FromSeq uint64    // first seq to consider
	Since   time.Time // records at or after this time
	Tenant  string    // only this tenant's records
}

func (f *Filter) matches(v []byte) bool {
	if f.Tenant != "" {
		t, ok := peekTenant(v)
		if !ok || string(t) != f.Tenant {
			return false
		}
	}
	if !f.Since.IsZero() {
		ns, ok := peekTime(v)
		if !ok || ns < f.Since.UnixNano() {
			return false
		}
	}
	return true
}

// auditIterOptions bounds an iterator to the audit keys from seq from on.
// A run stored under an earlier seq may hold from: seekRun finds it.
func auditIterOptions(from uint64) *pebble.IterOptions {
	return &pebble.IterOptions{LowerBound: auditKeyFor(from), UpperBound: prefixEnd([]byte(auditPrefix))}
}

// seekRun positions it at the stored run that holds seq: the last one
// stored under a seq not above it (which may end before seq), or the
// first one when there is none.
func seekRun(it *pebble.Iterator, seq uint64) bool {
	if seq < math.MaxUint64 && it.SeekLT(auditKeyFor(seq+1)) {
		return true
	}
	return it.First()
}

// errStopWalk ends a walkRun early without an error.
var errStopWalk = errors.New("journal: stop walking the run")

// storedRecord returns a copy of record seq's encoding.
func storedRecord(r pebble.Reader, seq uint64) ([]byte, error) {
	it, err := r.NewIter(auditIterOptions(0))
	if err != nil {
		return nil, err
	}
	defer it.Close()
	var found []byte
	if seekRun(it, seq) {
		keySeq, _ := seqFromKey(it.Key())
		err := walkRun(it.Value(), keySeq, func(s uint64, rec []byte) error {
			if s == seq {
				found = append([]byte(nil), rec...)
				return errStopWalk // what follows it does not matter, damaged or not
			}
			return nil
		})
		if err != nil && err != errStopWalk {
			return nil, err
		}
	}
	if err := it.Error(); err != nil {
		return nil, err
	}
	if found == nil {
		return nil, fmt.Errorf("journal: record %d: %w", seq, pebble.ErrNotFound)
	}
	return found, nil
}

// Scan calls fn for each record the filter selects, in seq order. Records
// are filtered by time as stored, so a clock step backwards does not hide
// later records. The *Record is reused between calls: copy it to keep it.
// An error from fn stops the scan and is returned; a record that cannot be
// decoded stops it with an error (Verify says where and why).
func (j *Journal) Scan(ctx context.Context, f Filter, fn func(*Record) error) error {
	db, err := j.readAuditDB()
	if err != nil {
		return err
	}
	defer j.dbMu.RUnlock()
	it, err := db.NewIter(auditIterOptions(0))
	if err != nil {
		return fmt.Errorf("journal: scan: %w", err)
	}
	defer it.Close()
	var r Record
	for ok := seekRun(it, f.FromSeq); ok; ok = it.Next() {
		if err := ctx.Err(); err != nil {
			return err
		}
		keySeq, _ := seqFromKey(it.Key())
		err := walkRun(it.Value(), keySeq, func(seq uint64, v []byte) error {
			if seq < f.FromSeq || !f.matches(v) {
				return nil
			}
			if err := decodeRecord(v, &r); err != nil {
				return fmt.Errorf("journal: record %d: %w", seq, err)
			}
			return fn(&r)
		})
		if err != nil {
			return err
		}
	}
	return it.Error()
}

// FirstSeqAt returns the seq of the first record stamped at or after t
// (the head's seq + 1 when there is none), by binary search: records are
// stamped in seq order, so a clock stepped back can make it land a few
// records off. It reads a handful of records, not the journal.
func (j *Journal) FirstSeqAt(t time.Time) (uint64, error) {
	// The head first: readAuditDB then applies every group confirmed up to
	// it, so the snapshot holds each record the search may ask for. A head
	// read after the snapshot may name records confirmed meanwhile and
	// still staged, which the snapshot lacks.
	head, _ := j.Head()
	db, err := j.readAuditDB()
	if err != nil {
		return 0, err
	}
	defer j.dbMu.RUnlock()
	snap, release := consistentView(db)
	defer release()
	anchor, _, _, err := readMeta(snap, anchorKey)
	if err != nil {
		return 0, err
	}
	want := t.UnixNano()
	lo, hi := anchor+1, head+1 // the answer is in [lo, hi]
	for lo < hi {
		mid := lo + (hi-lo)/2
		// The first stored record at or after mid: seqs a journal.lost
		// record names are not stored, and a probe may land among them.
		seq, v, found, err := storedRecordFrom(snap, mid)
		if err != nil {
			return 0, fmt.Errorf("journal: read record %d: %w", mid, err)
		}
		if !found {
			hi = mid
			continue
		}
		ns, ok := peekTime(v)
		if !ok {
			return 0, fmt.Errorf("journal: record %d is not a record", seq)
		}
		if ns >= want {
			hi = mid
		} else {
			lo = seq + 1
		}
	}
	return lo, nil
}

// storedRecordFrom returns the first stored record at or after seq: its
// seq and a copy of its encoding; found is false when there is none.
func storedRecordFrom(r pebble.Reader, seq uint64) (uint64, []byte, bool, error) {
	it, err := r.NewIter(auditIterOptions(0))
	if err != nil {
		return 0, nil, false, err
	}
	defer it.Close()
	var gotSeq uint64
	var found []byte
	for ok := seekRun(it, seq); ok && found == nil; ok = it.Next() {
		keySeq, okKey := seqFromKey(it.Key())
		if !okKey {
			continue
		}
		err := walkRun(it.Value(), keySeq, func(s uint64, rec []byte) error {
			if s >= seq {
				gotSeq, found = s, append([]byte(nil), rec...)
				return errStopWalk
			}
			return nil
		})
		if err != nil && err != errStopWalk {
			return 0, nil, false, err
		}
	}
	if err := it.Error(); err != nil {
		return 0, nil, false, err
	}
	return gotSeq, found, found != nil, nil
}

// Last returns up to n of the most recent records (of tenant, if not
// empty), oldest first: what `sigil audit tail` prints before following.
// A tenant with few or no records means walking back through the whole
// journal; ctx bounds that walk (an admin request's deadline).
func (j *Journal) Last(ctx context.Context, n int, tenant string) ([]Record, error) {
	if n <= 0 {
		return nil, nil
	}
	db, err := j.readAuditDB()
	if err != nil {
		return nil, err
	}
	defer j.dbMu.RUnlock()
	it, err := db.NewIter(auditIterOptions(0))
	if err != nil {
		return nil, fmt.Errorf("journal: last: %w", err)
	}
	defer it.Close()
	f := Filter{Tenant: tenant}
	out := make([]Record, 0, min(n, 1024))
	var recs [][]byte // the current run's records
	for ok := it.Last(); ok && len(out) < n; ok = it.Prev() {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("journal: last: %w", err)
		}
		keySeq, _ := seqFromKey(it.Key())
		recs = recs[:0]
		err := walkRun(it.Value(), keySeq, func(_ uint64, v []byte) error {
			recs = append(recs, v)
			return nil
		})
		if err != nil {
			return nil, err
		}
		for i := len(recs) - 1; i >= 0 && len(out) < n; i-- {
			if !f.matches(recs[i]) {
				continue
			}
			var r Record
			if err := decodeRecord(recs[i], &r); err != nil {
				return nil, fmt.Errorf("journal: record %d: %w", keySeq+uint64(i), err)
			}
			out = append(out, r)
		}
	}
	if err := it.Error(); err != nil {
		return nil, err
	}
	for i, k := 0, len(out)-1; i < k; i, k = i+1, k-1 {
		out[i], out[k] = out[k], out[i]
	}
	return out, nil
}

// WriteJSONL writes the records the filter selects to w, one JSON object
// per line (Record.MarshalJSON), for the fleet's log pipeline.
func (j *Journal) WriteJSONL(ctx context.Context, w io.Writer, f Filter) error {
	bw := bufio.NewWriterSize(w, 64<<10)
	err := j.Scan(ctx, f, func(r *Record) error {
		b, err := r.MarshalJSON()
		if err != nil {
			return err
		}
		b = append(b, '\n')
		_, err = bw.Write(b)
		return err
	})
	if err != nil {
		return err
	}
	return bw.Flush()
}

// BreakReason says why Verify stopped trusting the chain.
type BreakReason int

const (
	// BreakHashMismatch: the record's bytes do not hash to its stored
	// Hash (the record was edited).
	BreakHashMismatch BreakReason = iota + 1
	// BreakPrevMismatch: the record's PrevHash is not the previous
	// record's Hash (a record was replaced or reordered).
	BreakPrevMismatch
	// BreakGap: a seq is missing (a record was deleted), or the first
	// record is not seq 1 (or, after a prune, the anchor's seq + 1).
	BreakGap
	// BreakUndecodable: the stored bytes are not a record encoding, or a
	// record's seq disagrees with its place (its key, or its position in
	// a run).
	BreakUndecodable
	// BreakHeadMismatch: the chain disagrees with the chain-head
	// checkpoint: records deleted from the end, or history rewritten up
	// to the checkpoint.
	BreakHeadMismatch
	// BreakAnchor: the chain's start after a prune (the anchor) is not
	// the one the newest prune record names: records were deleted, or
	// the anchor moved, outside Prune.
	BreakAnchor
	// BreakTailLog: the tail log (a killed agent's records Pebble lacked)
	// cannot be taken as it is: a frame missing or damaged between
	// others, or records the store holds differently. Only a read-only
	// journal reports this; Open refuses such a tail for writing.
	BreakTailLog
)

func (r BreakReason) String() string {
	switch r {
	case BreakHashMismatch:
		return "hash mismatch"
	case BreakPrevMismatch:
		return "prev-hash mismatch"
	case BreakGap:
		return "gap in seq"
	case BreakUndecodable:
		return "undecodable record"
	case BreakHeadMismatch:
		return "head mismatch"
	case BreakAnchor:
		return "anchor mismatch"
	case BreakTailLog:
		return "tail log"
	default:
		return fmt.Sprintf("BreakReason(%d)", int(r))
	}
}

// ChainBreak is the first place where Verify found the chain broken.
type ChainBreak struct {
	Seq    uint64 // the first seq that cannot be trusted
	Reason BreakReason
	Detail string
}

func (b *ChainBreak) Error() string {
	return fmt.Sprintf("audit chain broken at seq %d: %s: %s", b.Seq, b.Reason, b.Detail)
}

// VerifyReport is the result of Verify.
type VerifyReport struct {
	Records  uint64   // records read
	FirstSeq uint64   // seq of the first record (0 when empty)
	LastSeq  uint64   // seq of the last record
	HeadHash [32]byte // the last record's stored hash: what new records chain to
	// CheckpointSeq is the seq of the chain-head checkpoint (0 if none).
	CheckpointSeq uint64
	// AnchorSeq is the last seq deleted by Prune (0 if none): the chain
	// starts after it.
	AnchorSeq uint64
	// Break is the first break, nil if the chain is intact from seq 1 (or
	// the anchor) to the last record and agrees with the checkpoint.
	Break *ChainBreak
}

// Summary describes an intact chain in one line: records, seq range (and
// what retention deleted) and head hash.
func Summary(r *VerifyReport) string {
	pruned := ""
	if r.AnchorSeq > 0 {
		pruned = fmt.Sprintf(" (seq 1..%d pruned)", r.AnchorSeq)
	}
	return fmt.Sprintf("%d records, seq %d..%d%s, head %s", r.Records, r.FirstSeq, r.LastSeq, pruned, hex.EncodeToString(r.HeadHash[:]))
}

// OK reports an intact chain.
func (r *VerifyReport) OK() bool { return r.Break == nil }

// Verify walks every record, recomputing each hash and checking each link,
// and reports the first break. The walk reads a snapshot: appends may go
// on meanwhile. The error is for failures to read, not for breaks.
//
// What it can prove: every record from seq 1 (after a prune: from the
// anchor, which the newest prune record must name) to the last is
// present, unedited and in order, and the chain reaches the last
// checkpoint. What it cannot: that no records were cut from the end after
// the last checkpoint (at most 100 ms of records, or none after a clean
// Close), or that someone who can write the store did not rewrite the
// whole chain; quoting Head in Rotation Evidence Packs and exporting the
// records off the host is what anchors the chain against that.
func (j *Journal) Verify(ctx context.Context) (VerifyReport, error) {
	var rep VerifyReport
	db, err := j.readAuditDB()
	if err != nil {
		return rep, err
	}
	defer j.dbMu.RUnlock()
	snap, release := consistentView(db)
	defer release()

	breakAt := func(seq uint64, reason BreakReason, format string, args ...any) {
		if rep.Break == nil {
			rep.Break = &ChainBreak{Seq: seq, Reason: reason, Detail: fmt.Sprintf(format, args...)}
		}
	}
	if d := j.tailDoubt; d != nil {
		breakAt(d.Seq, d.Reason, "%s", d.Detail)
	}
	cpSeq, cpHash, cpFound, cpErr := readCheckpoint(snap)
	if cpErr != nil {
		breakAt(0, BreakHeadMismatch, "%v", cpErr)
	}
	rep.CheckpointSeq = cpSeq
	// The head file, a copy of the checkpoint outside Pebble's WAL, as
	// Open read it (journal.go, headFileName): it shows the records a
	// damaged WAL dropped with m/head.
	fileCp := j.headCopy
	if j.headCopyErr != nil {
		breakAt(0, BreakHeadMismatch, "%v", j.headCopyErr)
	}
	// After a prune the chain starts after the anchor (prune.go).
	anchorSeq, anchorHash, anchorFound, err := readMeta(snap, anchorKey)
	if err != nil {
		breakAt(0, BreakAnchor, "%v", err)
	}
	rep.AnchorSeq = anchorSeq

	// The chain starts after the anchor, and a prune leaves the records
	// after it in a run of their own: the first run starts at anchor+1.
	it, err := snap.NewIter(auditIterOptions(anchorSeq + 1))
	if err != nil {
		return rep, fmt.Errorf("journal: verify: %w", oneLine(err))
	}
	defer it.Close()
	var (
		r          Record
		prevHash   = anchorHash
		expected   = anchorSeq + 1
		resync     bool     // a run's end was unreadable: take the next run's seq as given
		pruneSeq   uint64   // the newest prune record
		pruneNamed [32]byte // the anchor hash it names
	)
	for ok := it.First(); ok; ok = it.Next() {
		keySeq, okKey := seqFromKey(it.Key())
		if !okKey {
			rep.Records++
			breakAt(expected, BreakUndecodable, "malformed key %x", it.Key())
			continue
		}
		if keySeq != expected && !resync {
			breakAt(expected, BreakGap, "expected seq %d, found %d", expected, keySeq)
		}
		resync = false
		seq, run := keySeq, it.Value()
		for first := true; first || len(run) > 0; first = false {
			if rep.Records%4096 == 0 {
				if err := ctx.Err(); err != nil {
					return rep, err
				}
			}
			rep.Records++
			if rep.Records == 1 {
				rep.FirstSeq = seq
			}
			rep.LastSeq = seq
			val, rest, err := nextInRun(run)
			if err != nil {
				// The rest of the run cannot be split into records. Chain
				// on from the hash it ends with, if it has one, so the
				// break is reported once.
				breakAt(seq, BreakUndecodable, "%v", err)
				if len(run) >= 32 {
					copy(prevHash[:], run[len(run)-32:])
				}
				resync = true
				break
			}
			run = rest
			brk, decoded := checkRecord(val, seq, prevHash, &r)
			if brk != nil {
				breakAt(brk.Seq, brk.Reason, "%s", brk.Detail)
			}
			if !decoded {
				// Chain on from the stored hash, so a single bad record is
				// reported once.
				copy(prevHash[:], val[len(val)-32:])
				seq++
				continue
			}
			if r.Op == PruneOp {
				pruneSeq, pruneNamed = seq, r.DigestHash
			}
			if cpFound && seq == cpSeq && r.Hash != cpHash {
				breakAt(seq, BreakHeadMismatch, "record hash %x, checkpoint says %x", r.Hash[:8], cpHash[:8])
			}
			if fileCp.found && seq == fileCp.seq && r.Hash != fileCp.hash {
				breakAt(seq, BreakHeadMismatch, "record hash %x, the head file %s says %x", r.Hash[:8], headFileName, fileCp.hash[:8])
			}
			prevHash = r.Hash
			seq++
		}
		expected = seq
	}
	if err := it.Error(); err != nil {
		return rep, fmt.Errorf("journal: verify: %w", oneLine(err))
	}
	rep.HeadHash = prevHash
	switch {
	case anchorFound && pruneSeq == 0:
		breakAt(anchorSeq+1, BreakAnchor, "the chain starts after seq %d, and no %s record attests that", anchorSeq, PruneOp)
	case anchorFound && pruneNamed != anchorHash:
		breakAt(pruneSeq, BreakAnchor, "the newest %s record names anchor hash %x, the store's anchor is seq %d hash %x",
			PruneOp, pruneNamed[:8], anchorSeq, anchorHash[:8])
	}
	if cpFound && cpSeq > rep.LastSeq {
		breakAt(rep.LastSeq+1, BreakHeadMismatch,
			"checkpoint at seq %d, last record is seq %d: records were removed from the end", cpSeq, rep.LastSeq)
	}
	if fileCp.found && fileCp.seq > rep.LastSeq {
		breakAt(rep.LastSeq+1, BreakHeadMismatch,
			"the head file %s names seq %d, last record is seq %d: records were removed from the end, or lost with a damaged pebble WAL", headFileName, fileCp.seq, rep.LastSeq)
	}
	return rep, nil
}

// checkRecord decodes a stored record, at seq's place in the chain, into r
// and checks it: its seq, its hash over its bytes, and its link to prev,
// the previous record's hash. It returns the first thing wrong (nil if
// nothing is), and decoded false when the bytes are not a record at all.
// Verify reports what it returns; Prune refuses on it.
func checkRecord(val []byte, seq uint64, prev [32]byte, r *Record) (brk *ChainBreak, decoded bool) {
	if err := decodeRecord(val, r); err != nil {
		return &ChainBreak{Seq: seq, Reason: BreakUndecodable, Detail: err.Error()}, false
	}
	switch {
	case r.Seq != seq:
		return &ChainBreak{Seq: seq, Reason: BreakUndecodable, Detail: fmt.Sprintf("record says seq %d, stored where seq %d belongs", r.Seq, seq)}, true
	case computedHash(val) != r.Hash:
		return &ChainBreak{Seq: seq, Reason: BreakHashMismatch, Detail: fmt.Sprintf("stored hash %x, bytes hash to %x", r.Hash[:8], hashPrefix(val))}, true
	case r.PrevHash != prev:
		return &ChainBreak{Seq: seq, Reason: BreakPrevMismatch, Detail: fmt.Sprintf("prev hash %x, previous record's hash %x", r.PrevHash[:8], prev[:8])}, true
	}
	return nil, true
}

func hashPrefix(val []byte) []byte {
	h := computedHash(val)
	return h[:8]
}
