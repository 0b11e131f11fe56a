package journal

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/vfs"
	"go.uber.org/zap"
)

// forgeFrame returns a tail frame for the records first..last, chaining
// from prev to lastHash in its header, whose batch is what build puts in
// it: a frame as someone who can write the data dir would write it, with a
// checksum that holds.
func forgeFrame(t *testing.T, first, last uint64, prev, lastHash [32]byte, build func(b *pebble.Batch)) []byte {
	t.Helper()
	db, err := pebble.Open("", &pebble.Options{FS: vfs.NewMem(), Logger: pebbleLogger{z: zap.NewNop().Sugar()}})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	b := db.NewBatch()
	defer b.Close()
	build(b)
	repr := b.Repr()
	frame := make([]byte, tailHeaderLen+len(repr)+tailCRCLen)
	putFrame(frame, repr, first, last, prev, lastHash)
	return frame
}

// A tail log frame is replayed at start into the store, so what a frame
// may hold is what the journal writes there: the records its header names,
// each under its own seq, chaining from the header's prev hash to its last
// one. Its checksum (CRC-32C) is no seal: a frame forged with a checksum
// that holds used to be applied whatever its batch held (a state key, an
// older record overwritten, records deleted, an edited record, a head hash
// its records do not reach), and the agent started and signed on. Open
// must refuse it, and a read-only verify report it, as it does a damaged
// frame.
func TestForgedTailFrameIsRefused(t *testing.T) {
	cases := []struct {
		name string
		// forge returns the frame that replaces the one of record 30, the
		// tail's last, given that record's encoding and record 29's hash.
		forge func(t *testing.T, rec30 []byte, hash29 [32]byte) []byte
	}{
		{"record edited, checksum recomputed", func(t *testing.T, rec30 []byte, hash29 [32]byte) []byte {
			rec := append([]byte(nil), rec30...)
			rec[recordFixedLen+2] ^= 1 // first byte of the tenant
			h, _ := valueHash(rec30)
			return forgeFrame(t, 30, 30, hash29, h, func(b *pebble.Batch) { _ = b.Set(auditKey(30), rec, nil) })
		}},
		{"header's last hash not its record's", func(t *testing.T, rec30 []byte, hash29 [32]byte) []byte {
			return forgeFrame(t, 30, 30, hash29, [32]byte{1}, func(b *pebble.Batch) { _ = b.Set(auditKey(30), rec30, nil) })
		}},
		{"a state key besides the record", func(t *testing.T, rec30 []byte, hash29 [32]byte) []byte {
			h, _ := valueHash(rec30)
			return forgeFrame(t, 30, 30, hash29, h, func(b *pebble.Batch) {
				_ = b.Set(auditKey(30), rec30, nil)
				_ = b.Set(stateKey("forged"), []byte("x"), nil)
			})
		}},
		{"an older record overwritten", func(t *testing.T, rec30 []byte, hash29 [32]byte) []byte {
			h, _ := valueHash(rec30)
			return forgeFrame(t, 30, 30, hash29, h, func(b *pebble.Batch) {
				_ = b.Set(auditKey(30), rec30, nil)
				_ = b.Set(auditKey(1), []byte("not a record"), nil)
			})
		}},
		{"older records deleted", func(t *testing.T, rec30 []byte, hash29 [32]byte) []byte {
			h, _ := valueHash(rec30)
			return forgeFrame(t, 30, 30, hash29, h, func(b *pebble.Batch) {
				_ = b.Set(auditKey(30), rec30, nil)
				_ = b.DeleteRange(auditKey(1), auditKey(10), nil)
			})
		}},
		{"the record under another key", func(t *testing.T, rec30 []byte, hash29 [32]byte) []byte {
			h, _ := valueHash(rec30)
			return forgeFrame(t, 30, 30, hash29, h, func(b *pebble.Batch) { _ = b.Set(auditKey(31), rec30, nil) })
		}},
		{"no record at all", func(t *testing.T, _ []byte, hash29 [32]byte) []byte {
			return forgeFrame(t, 30, 30, hash29, [32]byte{2}, func(b *pebble.Batch) { _ = b.Set(stateKey("forged"), []byte("x"), nil) })
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := killedWithTail(t) // the store holds record 1, the tail 2-30, one a frame
			data, offs := tailOf(t, dir)
			last := data[offs[28]:]
			fr, _, ok := frameAt(last)
			if !ok || fr.firstSeq != 30 || fr.lastSeq != 30 {
				t.Fatalf("the tail's last frame holds %d-%d", fr.firstSeq, fr.lastSeq)
			}
			var b pebble.Batch
			if err := b.SetRepr(append([]byte(nil), fr.payload...)); err != nil {
				t.Fatal(err)
			}
			r := b.Reader()
			_, _, rec30, ok, err := r.Next()
			if !ok || err != nil {
				t.Fatalf("record 30's frame: %v", err)
			}
			forged := append(append([]byte(nil), data[:offs[28]]...), tc.forge(t, rec30, fr.prev)...)
			if err := os.WriteFile(filepath.Join(dir, tailName), forged, 0o600); err != nil {
				t.Fatal(err)
			}

			ro, err := Open(Options{Dir: dir, ReadOnly: true, Logger: testLogger(t)})
			if err != nil {
				t.Fatalf("read-only Open: %v", err)
			}
			expectBreak(t, ro, 30, BreakTailLog)
			if err := ro.Close(); err != nil {
				t.Fatal(err)
			}
			j, err := Open(Options{Dir: dir, Durability: WAL, Logger: testLogger(t)})
			if err == nil {
				_ = j.Close()
				t.Fatal("Open replayed a forged tail log frame")
			}
			if !errors.Is(err, errTailCorrupt) {
				t.Fatalf("Open: %v, want errTailCorrupt", err)
			}
		})
	}
}

// What `audit verify` cannot see, as docs/audit.md says: the chain is
// unkeyed (BLAKE3 with no secret), and the head checkpoint (with its copy
// in the head file) and the prune anchor are stored beside the records,
// no better protected. Whoever can
// write the journal directory while the agent is stopped can therefore
// make a history that verifies: each case here passes Verify, and a
// writable Open takes it. Only a head hash kept off the host (an export, a
// Rotation Evidence Pack) shows these. If one of them starts to fail, the
// journal learned to see it: update the docs.
func TestWhatVerifyCannotSee(t *testing.T) {
	const n = 20
	cases := []struct {
		name    string
		tamper  func(t *testing.T, db *pebble.DB)
		records uint64
	}{
		{"a record forged at the end, chained and hashed", func(t *testing.T, db *pebble.DB) {
			last := dbRecord(t, db, n)
			forged := *signRecord("acme", 99)
			forged.Seq, forged.PrevHash, forged.Time = n+1, last.Hash, last.Time
			dbSet(t, db, auditKey(n+1), forged.encode())
		}, n + 1},
		{"the last records cut and the checkpoint lowered to match", func(t *testing.T, db *pebble.DB) {
			r := dbRecord(t, db, n-5)
			for seq := uint64(n - 4); seq <= n; seq++ {
				dbDelete(t, db, auditKey(seq))
			}
			dbSetMeta(t, db, headKey, n-5, r.Hash)
		}, n - 5},
		{"the last records cut and the checkpoint deleted", func(t *testing.T, db *pebble.DB) {
			for seq := uint64(n - 4); seq <= n; seq++ {
				dbDelete(t, db, auditKey(seq))
			}
			dbDelete(t, db, []byte(headKey))
		}, n - 5},
		{"history rewritten with the checkpoint", func(t *testing.T, db *pebble.DB) {
			var prev [32]byte
			for seq := uint64(1); seq <= n; seq++ {
				r := dbRecord(t, db, seq)
				if seq >= 3 {
					r.PrevHash = prev
					if seq == 3 {
						r.CodeName = "FORGED"
					}
					dbSet(t, db, auditKey(seq), r.encode())
				}
				prev = r.Hash
			}
			dbSetMeta(t, db, headKey, n, prev)
		}, n},
		{"a prune forged: records cut, the anchor moved and a prune record appended", func(t *testing.T, db *pebble.DB) {
			anchor, last := dbRecord(t, db, 10), dbRecord(t, db, n)
			for seq := uint64(1); seq <= 10; seq++ {
				dbDelete(t, db, auditKey(seq))
			}
			dbSetMeta(t, db, anchorKey, 10, anchor.Hash)
			prune := Record{Seq: n + 1, Time: last.Time, Op: PruneOp, PrevHash: last.Hash, DigestHash: anchor.Hash,
				Peer: "agent (journal.retention 2160h0m0s)", Detail: "records 1-10"}
			dbSet(t, db, auditKey(n+1), prune.encode())
			dbSetMeta(t, db, headKey, n+1, prune.Hash)
		}, n + 1 - 10},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir, db := closedJournal(t, n, true)
			tc.tamper(t, db)
			if err := db.Close(); err != nil {
				t.Fatal(err)
			}
			// The head file, the checkpoint's copy beside the store, is
			// as easy to remove as the checkpoint is to lower.
			if err := os.Remove(filepath.Join(dir, headFileName)); err != nil {
				t.Fatal(err)
			}
			ro, err := Open(Options{Dir: dir, ReadOnly: true, Logger: testLogger(t)})
			if err != nil {
				t.Fatal(err)
			}
			if rep := verifyOK(t, ro); rep.Records != tc.records {
				t.Fatalf("records %d, want %d", rep.Records, tc.records)
			}
			if err := ro.Close(); err != nil {
				t.Fatal(err)
			}
			j := openTest(t, dir, WAL) // the agent starts on it
			appendN(t, j, "acme", 1)
			verifyOK(t, j)
		})
	}

	// A rollback: the directory put back as an older copy of itself.
	t.Run("the journal replaced by an older copy", func(t *testing.T) {
		dir := t.TempDir()
		j := openTest(t, dir, WAL)
		appendN(t, j, "acme", n)
		if err := j.Close(); err != nil {
			t.Fatal(err)
		}
		old := snapshotDir(t, dir)
		j = openTest(t, dir, WAL)
		appendN(t, j, "acme", n)
		if err := j.Close(); err != nil {
			t.Fatal(err)
		}
		j = openTest(t, old, WAL)
		mustVerify(t, j, n)
	})
}

// The helpers below edit a closed journal's store with Pebble itself, as
// someone who can write the data dir while the agent is stopped would.

func dbGet(t *testing.T, db *pebble.DB, key []byte) []byte {
	t.Helper()
	v, closer, err := db.Get(key)
	if err != nil {
		t.Fatal(err)
	}
	defer closer.Close()
	return append([]byte(nil), v...)
}

func dbSet(t *testing.T, db *pebble.DB, key, value []byte) {
	t.Helper()
	if err := db.Set(key, value, pebble.Sync); err != nil {
		t.Fatal(err)
	}
}

func dbDelete(t *testing.T, db *pebble.DB, key []byte) {
	t.Helper()
	if err := db.Delete(key, pebble.Sync); err != nil {
		t.Fatal(err)
	}
}

func dbRecord(t *testing.T, db *pebble.DB, seq uint64) Record {
	t.Helper()
	var r Record
	if err := decodeRecord(dbGet(t, db, auditKey(seq)), &r); err != nil {
		t.Fatal(err)
	}
	return r
}

func dbSetMeta(t *testing.T, db *pebble.DB, key string, seq uint64, hash [32]byte) {
	t.Helper()
	v := make([]byte, headLen)
	encodeHead(v, seq, hash)
	dbSet(t, db, []byte(key), v)
}

// closedJournal is a journal of n records, closed cleanly (a checkpoint at
// n), opened with Pebble alone: with split, each record under its own key,
// else in runs.
func closedJournal(t *testing.T, n int, split bool) (string, *pebble.DB) {
	t.Helper()
	dir := t.TempDir()
	var j *Journal
	if split {
		j = openTest(t, dir, WAL)
		appendN(t, j, "acme", n)
	} else {
		j, _ = openRuns(t, dir, n) // one run of n records
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	db, err := pebble.Open(dir, &pebble.Options{Logger: pebbleLogger{z: zap.NewNop().Sugar()}})
	if err != nil {
		t.Fatal(err)
	}
	if split {
		splitRuns(t, db)
	}
	return dir, db
}

// Tampering done while the agent is stopped, with Pebble itself, is found
// by a read-only verify, and the agent either refuses to start or starts
// and keeps the evidence: a record it appends and the checkpoint it then
// writes do not make the chain verify again.
func TestTamperingWhileStoppedKeepsItsEvidence(t *testing.T) {
	const n = 20
	cases := []struct {
		name   string
		split  bool // a record per key; else the runs Close left
		tamper func(t *testing.T, db *pebble.DB)
		seq    uint64
		reason BreakReason
		// refused: Open does not start on it.
		refused bool
		// after: the reason once the agent wrote on (0: reason). Records
		// cut from the end are a head mismatch, then a gap before the
		// records that continue the chain after the checkpoint.
		after BreakReason
	}{
		{"a byte of a record stored alone", true, func(t *testing.T, db *pebble.DB) {
			v := dbGet(t, db, auditKey(7))
			v[offLatency] ^= 1
			dbSet(t, db, auditKey(7), v)
		}, 7, BreakHashMismatch, false, 0},
		{"a byte of the last record, the checkpoint's", true, func(t *testing.T, db *pebble.DB) {
			v := dbGet(t, db, auditKey(n))
			v[offLatency] ^= 1
			dbSet(t, db, auditKey(n), v)
		}, n, BreakHashMismatch, false, 0},
		{"a byte of a record in a run", false, func(t *testing.T, db *pebble.DB) {
			v := dbGet(t, db, auditKey(1)) // records 1-20
			rest := v
			for range 3 {
				var err error
				if _, rest, err = nextInRun(rest); err != nil || len(rest) == 0 {
					t.Fatalf("no run of records 1-20 under key 1 (%v)", err)
				}
			}
			v[len(v)-len(rest)+offLatency] ^= 1 // record 4
			dbSet(t, db, auditKey(1), v)
		}, 4, BreakHashMismatch, false, 0},
		{"a middle record deleted", true, func(t *testing.T, db *pebble.DB) { dbDelete(t, db, auditKey(11)) },
			11, BreakGap, false, 0},
		{"the last 5 records deleted", true, func(t *testing.T, db *pebble.DB) {
			for seq := uint64(n - 4); seq <= n; seq++ {
				dbDelete(t, db, auditKey(seq))
			}
		}, n - 4, BreakHeadMismatch, false, BreakGap},
		{"two records swapped", true, func(t *testing.T, db *pebble.DB) {
			a, b := dbGet(t, db, auditKey(4)), dbGet(t, db, auditKey(5))
			dbSet(t, db, auditKey(4), b)
			dbSet(t, db, auditKey(5), a)
		}, 4, BreakUndecodable, false, 0},
		{"the last record duplicated after it", true, func(t *testing.T, db *pebble.DB) {
			dbSet(t, db, auditKey(n+1), dbGet(t, db, auditKey(n)))
		}, n + 1, BreakUndecodable, false, 0},
		{"a record forged in the middle, re-hashed", true, func(t *testing.T, db *pebble.DB) {
			r := dbRecord(t, db, 9)
			r.CodeName = "PERMISSION_DENIED"
			dbSet(t, db, auditKey(9), r.encode())
		}, 10, BreakPrevMismatch, false, 0},
		{"the history rewritten up to the checkpoint", true, func(t *testing.T, db *pebble.DB) {
			var prev [32]byte
			for seq := uint64(1); seq <= n; seq++ {
				r := dbRecord(t, db, seq)
				if seq >= 3 {
					r.PrevHash = prev
					r.LatencyMicros++
					dbSet(t, db, auditKey(seq), r.encode())
				}
				prev = r.Hash
			}
		}, n, BreakHeadMismatch, true, 0},
		{"records pruned by hand, with no prune record", true, func(t *testing.T, db *pebble.DB) {
			r := dbRecord(t, db, 10)
			for seq := uint64(1); seq <= 10; seq++ {
				dbDelete(t, db, auditKey(seq))
			}
			dbSetMeta(t, db, anchorKey, 10, r.Hash)
		}, 11, BreakAnchor, false, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir, db := closedJournal(t, n, tc.split)
			tc.tamper(t, db)
			if err := db.Close(); err != nil {
				t.Fatal(err)
			}
			ro, err := Open(Options{Dir: dir, ReadOnly: true, Logger: testLogger(t)})
			if err != nil {
				t.Fatal(err)
			}
			expectBreak(t, ro, tc.seq, tc.reason)
			if err := ro.Close(); err != nil {
				t.Fatal(err)
			}
			j, err := Open(Options{Dir: dir, Durability: WAL, Logger: testLogger(t)})
			if tc.refused {
				if err == nil {
					_ = j.Close()
					t.Fatal("the agent started on a journal it should refuse")
				}
				return
			}
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			appendN(t, j, "acme", 3)
			if err := j.Close(); err != nil { // a new checkpoint
				t.Fatal(err)
			}
			ro, err = Open(Options{Dir: dir, ReadOnly: true, Logger: testLogger(t)})
			if err != nil {
				t.Fatal(err)
			}
			defer ro.Close()
			after := tc.reason
			if tc.after != 0 {
				after = tc.after
			}
			expectBreak(t, ro, tc.seq, after)
		})
	}
}

// A recovery sizes the loss from the highest seq a valid frame's header
// names, and a header is anyone's to write (the checksum is no seal): a
// frame naming seq 2^60 made `audit recover` record 31-2^60 as lost and
// jump the chain there. The lost records were all in the tail log (Pebble
// has every record before it last started over), so a loss larger than
// the file could hold (its size over the smallest a record takes in a
// frame) is refused, and nothing is written: the tail stays where it is,
// as evidence. A loss up to that bound is still recorded.
func TestRecoverRefusesALossTheTailCouldNotHold(t *testing.T) {
	dir := killedWithTail(t) // the store holds record 1, the tail 2-30
	path := filepath.Join(dir, tailName)
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	bound := maxTailRecords(len(data))
	cases := []struct {
		name   string
		seq    uint64 // the forged frame's, after the chain's record 30
		refuse bool
	}{
		{"seq 2^60", 1 << 60, true},
		{"one past what the file could hold", 30 + bound + 1, true},
		{"as much as the file could hold", 30 + bound, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := snapshotDir(t, dir)
			path := filepath.Join(dir, tailName)
			_, end := frameOffsets(t, data)
			forged := append([]byte(nil), data...)
			copy(forged[end:], forgeFrame(t, tc.seq, tc.seq, [32]byte{3}, [32]byte{4}, func(*pebble.Batch) {}))
			if err := os.WriteFile(path, forged, 0o600); err != nil {
				t.Fatal(err)
			}
			j, err := Open(Options{Dir: dir, AcceptTailLoss: true, Logger: testLogger(t)})
			if !tc.refuse {
				if err != nil {
					t.Fatalf("Open accepting the loss: %v", err)
				}
				defer j.Close()
				if head, _ := j.Head(); head != tc.seq+1 {
					t.Fatalf("head %d, want %d: the journal.lost record after the forged seq", head, tc.seq+1)
				}
				return
			}
			if err == nil {
				head, _ := j.Head()
				j.Close()
				t.Fatalf("Open accepted a loss of %d records from a %d-byte tail log: head now %d", tc.seq-30, len(data), head)
			}
			if !errors.Is(err, errTailCorrupt) || errors.Is(err, errTailGap) {
				t.Fatalf("Open: %v, want errTailCorrupt, not a loss to record", err)
			}
			if kept, _ := filepath.Glob(path + ".lost-*"); len(kept) != 0 {
				t.Fatalf("a refused recovery wrote %v", kept)
			}
			if now, err := os.ReadFile(path); err != nil || !bytes.Equal(now, forged) {
				t.Fatalf("a refused recovery changed the tail log (%v)", err)
			}
			expectBreak(t, openReadOnly(t, dir), 31, BreakTailLog)
		})
	}
}

// Plain Open's refusal and a read-only Verify's report of a tail log whose
// frame names more lost records than the file could hold say the frame is
// not the journal's, and that recover will not record it: they used to
// say the tail "holds records up to 1152921504606846976" and advise
// `sigil audit recover`, which refuses such a loss. A loss the file could
// hold is still a loss for recover to record.
func TestOpenAndVerifyCallAnImpossibleLossForged(t *testing.T) {
	dir := killedWithTail(t) // the store holds record 1, the tail 2-30
	data, err := os.ReadFile(filepath.Join(dir, tailName))
	if err != nil {
		t.Fatal(err)
	}
	bound := maxTailRecords(len(data))
	const (
		forgedText = "that frame was not written by the journal, and `sigil audit recover` will not record it as a loss"
		lossText   = "then `sigil audit recover` to record their loss"
		evidence   = "keep this directory as evidence"
	)
	cases := []struct {
		name   string
		seq    uint64 // the forged frame's, after the chain's record 30
		forged bool
	}{
		{"seq 2^60", 1 << 60, true},
		{"one past what the file could hold", 30 + bound + 1, true},
		{"as much as the file could hold", 30 + bound, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := snapshotDir(t, dir)
			_, end := frameOffsets(t, data)
			forged := append([]byte(nil), data...)
			copy(forged[end:], forgeFrame(t, tc.seq, tc.seq, [32]byte{3}, [32]byte{4}, func(*pebble.Batch) {}))
			if err := os.WriteFile(filepath.Join(dir, tailName), forged, 0o600); err != nil {
				t.Fatal(err)
			}
			j, err := Open(Options{Dir: dir, Logger: testLogger(t)})
			if err == nil {
				j.Close()
				t.Fatal("Open took a tail log with a frame past the chain")
			}
			rep := expectBreak(t, openReadOnly(t, dir), 31, BreakTailLog)
			for what, msg := range map[string]string{"Open": err.Error(), "Verify": rep.Break.Detail} {
				var ok bool
				if tc.forged {
					ok = strings.Contains(msg, forgedText) && strings.Contains(msg, evidence) &&
						!strings.Contains(msg, lossText) && !strings.Contains(msg, "holds records up to")
				} else {
					ok = strings.Contains(msg, lossText) && strings.Contains(msg, fmt.Sprintf("holds records up to %d", tc.seq))
				}
				if !ok {
					t.Errorf("%s (forged %v): %s", what, tc.forged, msg)
				}
			}
			if !errors.Is(err, errTailCorrupt) || errors.Is(err, errTailGap) == tc.forged {
				t.Errorf("Open: %v; want errTailCorrupt, and errTailGap (a loss to record) %v", err, !tc.forged)
			}
		})
	}
}

// A byte changed in Pebble's write-ahead log, where a stopped agent's
// newest records are (Pebble does not flush its memtable at Close), is not
// a hash mismatch: Pebble takes a damaged record in its newest WAL for a
// write a crash cut short and replays the log up to it, silently, so every
// record after the byte is gone from the store, and the head checkpoint
// written at Close with them. `audit verify` passed the shorter chain, and
// the agent started on it and gave the lost records' seqs to new
// signatures. The head file Close writes beside the store keeps the head:
// verify reports the cut, and the agent goes on after it.
func TestDamagedWALIsNotACleanShorterChain(t *testing.T) {
	const n = 20
	dir := t.TempDir()
	j := openTest(t, dir, WAL)
	appendN(t, j, "acme", n)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	logs, err := filepath.Glob(filepath.Join(dir, "*.log"))
	if err != nil || len(logs) != 1 {
		t.Fatalf("pebble WAL files %v (%v), want one", logs, err)
	}
	data, err := os.ReadFile(logs[0])
	if err != nil {
		t.Fatal(err)
	}
	// The latency of record 11, the 11th "acme/release" slot's record: a
	// byte in its fixed part, as a hex editor changes it.
	at := -1
	for i, off := 0, 0; i < 11; i++ {
		k := bytes.Index(data[off:], []byte("acme/release"))
		if k < 0 {
			t.Fatalf("record %d not in the WAL", i+1)
		}
		at, off = off+k, off+k+1
	}
	data[at-2-len("acme")-2-recordFixedLen+offLatency] ^= 1
	if err := os.WriteFile(logs[0], data, 0o600); err != nil {
		t.Fatal(err)
	}

	ro, err := Open(Options{Dir: dir, ReadOnly: true, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	rep, err := ro.Verify(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK() {
		t.Fatalf("verify passed a journal whose WAL was damaged: %s", Summary(&rep))
	}
	if rep.Break.Reason != BreakHeadMismatch && rep.Break.Reason != BreakHashMismatch {
		t.Fatalf("break %v, want a head or hash mismatch", rep.Break)
	}
	if err := ro.Close(); err != nil {
		t.Fatal(err)
	}

	j = openTest(t, dir, WAL)
	if seq, _ := j.Head(); seq < n {
		t.Fatalf("the agent started at head %d, below the %d records it confirmed: it would reuse their seqs", seq, n)
	}
	appendN(t, j, "acme", 1)
	if seq, _ := j.Head(); seq != n+1 {
		t.Fatalf("head %d after one append, want %d", seq, n+1)
	}
	if rep, err := j.Verify(context.Background()); err != nil || rep.OK() {
		t.Fatalf("verify after the agent wrote on: %v %v", rep.Break, err)
	}
}

// The head file is the journal's to write: one that is not a checkpoint,
// or that names a record the store holds with another hash, is refused by
// the agent and reported by verify, as the m/head entry is. A missing one
// (a journal an older agent closed, or one never closed cleanly) is no
// checkpoint.
func TestHeadFileTampering(t *testing.T) {
	const n = 10
	cases := []struct {
		name    string
		content func(rec5 Record) []byte // the head file's bytes
		seq     uint64
		refused bool
	}{
		{"empty", func(Record) []byte { return nil }, 0, true},
		{"garbage", func(Record) []byte { return []byte("not a checkpoint at all, but long enough") }, 0, true},
		{"another record's hash", func(Record) []byte {
			v := make([]byte, headLen)
			encodeHead(v, 5, [32]byte{1})
			return v
		}, 5, true},
		{"lowered to an earlier record", func(rec5 Record) []byte {
			v := make([]byte, headLen)
			encodeHead(v, 5, rec5.Hash)
			return v
		}, 0, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir, db := closedJournal(t, n, true)
			rec5 := dbRecord(t, db, 5)
			if err := db.Close(); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, headFileName), tc.content(rec5), 0o600); err != nil {
				t.Fatal(err)
			}
			ro, err := Open(Options{Dir: dir, ReadOnly: true, Logger: testLogger(t)})
			if err != nil {
				t.Fatal(err)
			}
			if tc.refused {
				rep := expectBreak(t, ro, tc.seq, BreakHeadMismatch)
				if !strings.Contains(rep.Break.Detail, headFileName) {
					t.Errorf("the break does not name the head file: %v", rep.Break)
				}
			} else {
				mustVerify(t, ro, n)
			}
			if err := ro.Close(); err != nil {
				t.Fatal(err)
			}
			j, err := Open(Options{Dir: dir, Durability: WAL, Logger: testLogger(t)})
			if tc.refused {
				if err == nil {
					_ = j.Close()
					t.Fatal("the agent started on a head file the journal did not write")
				}
				if !strings.Contains(err.Error(), headFileName) {
					t.Errorf("the refusal does not name the head file: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			appendN(t, j, "acme", 1)
			if err := j.Close(); err != nil {
				t.Fatal(err)
			}
			cp, err := readHeadFile(vfs.Default, filepath.Join(dir, headFileName))
			if err != nil || !cp.found || cp.seq != n+1 {
				t.Fatalf("head file after Close: %+v, %v; want seq %d", cp, err, n+1)
			}
		})
	}
}
