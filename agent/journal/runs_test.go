package journal

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// openRuns opens a journal whose applier only runs when the test calls
// applyStaged, appends n records of two tenants in turn, stamped t0+1ms,
// t0+2ms, ..., and applies them: runs of maxRun records and one shorter
// run at the end, exactly.
func openRuns(t *testing.T, dir string, n int) (*Journal, time.Time) {
	t.Helper()
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	j := openTest(t, dir, WAL, func(o *Options) {
		o.ApplyDelay = time.Hour
		o.Clock = fixedClock(t0)
	})
	j.nextCheckpoint = time.Now().Add(time.Hour) // no waited commit applies early
	for i := range n {
		if err := j.Append(context.Background(), signRecord([]string{"acme", "globex"}[i%2], i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := j.applyStaged(); err != nil {
		t.Fatal(err)
	}
	if got, want := runCount(t, j), (n+maxRun-1)/maxRun; got != want {
		t.Fatalf("%d stored runs, want %d", got, want)
	}
	return j, t0
}

// Every reader sees records stored in runs as it sees records stored one
// per key: from the middle of a run, backwards across runs, by tenant, by
// time, and after a restart.
func TestRunsReadLikeRecords(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	const n = 2*maxRun + 22
	j, t0 := openRuns(t, dir, n)
	mustVerify(t, j, n)

	scan := func(f Filter) []uint64 {
		t.Helper()
		var seqs []uint64
		if err := j.Scan(ctx, f, func(r *Record) error {
			seqs = append(seqs, r.Seq)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		return seqs
	}
	if seqs := scan(Filter{}); len(seqs) != n || seqs[0] != 1 || seqs[n-1] != n {
		t.Fatalf("Scan: %d records, want %d", len(seqs), n)
	}
	if seqs := scan(Filter{FromSeq: maxRun - 2}); len(seqs) != n-maxRun+3 || seqs[0] != maxRun-2 {
		t.Fatalf("Scan from the middle of a run: first %v of %d records", seqs[:1], len(seqs))
	}
	// Records with an even seq are globex's (appended second in each pair).
	globex := scan(Filter{Tenant: "globex", FromSeq: 100})
	if len(globex) != (n-100)/2+1 || globex[0] != 100 {
		t.Fatalf("Scan globex from 100: %v", globex)
	}
	if seqs := scan(Filter{Since: t0.Add(maxRun * time.Millisecond)}); len(seqs) != n-maxRun+1 || seqs[0] != maxRun {
		t.Fatalf("Scan since record %d's time: first %v of %d records", maxRun, seqs[:1], len(seqs))
	}

	last, err := j.Last(context.Background(), 5, "acme")
	if err != nil || len(last) != 5 || last[0].Seq != n-9 || last[4].Seq != n-1 {
		t.Fatalf("Last(5, acme) = %d records, %v; want seqs %d..%d", len(last), err, n-9, n-1)
	}
	last, err = j.Last(context.Background(), maxRun+30, "")
	if err != nil || len(last) != maxRun+30 || last[0].Seq != n-maxRun-29 || last[maxRun+29].Seq != n {
		t.Fatalf("Last across runs = %d records, %v", len(last), err)
	}

	for _, seq := range []uint64{1, 2, maxRun - 1, maxRun, maxRun + 1, n} {
		got, err := j.FirstSeqAt(t0.Add(time.Duration(seq) * time.Millisecond))
		if err != nil || got != seq {
			t.Fatalf("FirstSeqAt(record %d's time) = %d, %v", seq, got, err)
		}
	}

	// A restart finds the head inside the last run and chains on from it.
	head, hash := j.Head()
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	j = openTest(t, dir, WAL)
	if s, h := j.Head(); s != head || h != hash {
		t.Fatalf("head after restart %d %x, want %d %x", s, h[:4], head, hash[:4])
	}
	appendN(t, j, "acme", 1)
	mustVerify(t, j, n+1)
}

// storeRun replaces the stored run under key with value, behind the
// journal's back.
func storeRun(t *testing.T, j *Journal, key uint64, value []byte) {
	t.Helper()
	db, err := j.writableAuditDB()
	if err != nil {
		t.Fatal(err)
	}
	defer j.dbMu.RUnlock()
	b := db.NewBatch()
	_ = b.Delete(auditKeyFor(1), nil)
	_ = b.Set(auditKeyFor(key), value, nil)
	if err := b.Commit(pebble.Sync); err != nil {
		t.Fatal(err)
	}
}

// runRecords returns the records of the run stored under seq 1.
func runRecords(t *testing.T, j *Journal) [][]byte {
	t.Helper()
	db, err := j.writableAuditDB()
	if err != nil {
		t.Fatal(err)
	}
	defer j.dbMu.RUnlock()
	v, closer, err := db.Get(auditKeyFor(1))
	if err != nil {
		t.Fatal(err)
	}
	defer closer.Close()
	var recs [][]byte
	if err := walkRun(v, 1, func(_ uint64, rec []byte) error {
		recs = append(recs, bytes.Clone(rec))
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return recs
}

func concat(recs ...[]byte) []byte {
	var out []byte
	for _, r := range recs {
		out = append(out, r...)
	}
	return out
}

// Verify finds an edit inside a run as it finds one in a record stored
// alone: the tamper table of TestVerifyFindsTampering, on a run's bytes.
func TestVerifyFindsTamperingInRuns(t *testing.T) {
	const n = 20 // one run
	cases := []struct {
		name    string
		tamper  func(recs [][]byte) (key uint64, run []byte)
		seq     uint64
		reason  BreakReason
		records uint64
	}{
		{
			name: "edited byte in a middle record",
			tamper: func(recs [][]byte) (uint64, []byte) {
				recs[6][offLatency] ^= 1
				return 1, concat(recs...)
			},
			seq: 7, reason: BreakHashMismatch, records: n,
		},
		{
			name: "middle record cut out",
			tamper: func(recs [][]byte) (uint64, []byte) {
				return 1, concat(append(recs[:10:10], recs[11:]...)...)
			},
			seq: 11, reason: BreakUndecodable, records: n - 1,
		},
		{
			name:   "last record cut off",
			tamper: func(recs [][]byte) (uint64, []byte) { return 1, concat(recs[:n-1]...) },
			seq:    n, reason: BreakHeadMismatch, records: n - 1,
		},
		{
			name: "run cut short inside its last record",
			tamper: func(recs [][]byte) (uint64, []byte) {
				run := concat(recs...)
				return 1, run[:len(run)-40]
			},
			seq: n, reason: BreakUndecodable, records: n,
		},
		{
			name: "bytes appended to the run",
			tamper: func(recs [][]byte) (uint64, []byte) {
				return 1, append(concat(recs...), "not a record"...)
			},
			seq: n + 1, reason: BreakUndecodable, records: n + 1,
		},
		{
			name: "records swapped",
			tamper: func(recs [][]byte) (uint64, []byte) {
				recs[3], recs[4] = recs[4], recs[3]
				return 1, concat(recs...)
			},
			seq: 4, reason: BreakUndecodable, records: n,
		},
		{
			name:   "run stored under another seq",
			tamper: func(recs [][]byte) (uint64, []byte) { return 2, concat(recs...) },
			seq:    1, reason: BreakGap, records: n,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			j, _ := openRuns(t, dir, n)
			if err := j.Close(); err != nil { // leaves a checkpoint at n
				t.Fatal(err)
			}
			j = openTest(t, dir, WAL)
			key, run := tc.tamper(runRecords(t, j))
			storeRun(t, j, key, run)
			rep := expectBreak(t, j, tc.seq, tc.reason)
			if rep.Records != tc.records {
				t.Fatalf("records %d, want %d", rep.Records, tc.records)
			}
		})
	}
}

// A prune that ends inside a run deletes the run's older records and
// stores the rest under the first kept seq: the chain verifies from the
// anchor, and a restart and later prunes go on from there.
func TestPruneInsideARun(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	const n = maxRun + 36 // runs 1..64 and 65..100
	j, t0 := openRuns(t, dir, n)

	res := mustPrune(t, j, t0.Add(41*time.Millisecond)) // records 1..40 are older
	if res.Deleted != 40 || res.ToSeq != 40 || res.RecordSeq != n+1 {
		t.Fatalf("prune: %+v", res)
	}
	rep := verifyOK(t, j)
	if rep.FirstSeq != 41 || rep.LastSeq != n+1 || rep.Records != n+1-40 || rep.AnchorSeq != 40 {
		t.Fatalf("after prune: %+v", rep)
	}
	// Runs 41..64 (the rest of the first), 65..100, and the prune record.
	if got := runCount(t, j); got != 3 {
		t.Fatalf("%d stored runs after the prune, want 3", got)
	}
	var first uint64
	if err := j.Scan(ctx, Filter{}, func(r *Record) error {
		if first == 0 {
			first = r.Seq
		}
		return nil
	}); err != nil || first != 41 {
		t.Fatalf("Scan starts at %d, %v; want 41", first, err)
	}

	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	j = openTest(t, dir, WAL)
	res = mustPrune(t, j, t0.Add(70*time.Millisecond)) // 41..69, into the second run
	if res.Deleted != 29 || res.FromSeq != 41 || res.ToSeq != 69 {
		t.Fatalf("second prune: %+v", res)
	}
	appendN(t, j, "acme", 1)
	rep = verifyOK(t, j)
	if rep.FirstSeq != 70 || rep.LastSeq != n+3 || rep.AnchorSeq != 69 {
		t.Fatalf("after the second prune: %+v", rep)
	}
}
