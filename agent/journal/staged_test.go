package journal

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
)

// openStaged opens a `wal` journal whose applier never fires on its own
// and that writes no checkpoint (a waited commit, which would apply the
// staged groups) for an hour: what the journal holds only in the tail log
// stays there until the test makes something apply it.
func openStaged(t *testing.T, dir string) *Journal {
	t.Helper()
	j := openTest(t, dir, WAL, func(o *Options) { o.ApplyDelay = time.Hour })
	j.nextCheckpoint = time.Now().Add(time.Hour) // before any commit: no race
	return j
}

// inPebble reports whether Pebble holds record seq, without applying the
// staged groups first as every reader does.
func inPebble(t *testing.T, j *Journal, seq uint64) bool {
	t.Helper()
	db, err := j.writableDB()
	if err != nil {
		t.Fatal(err)
	}
	defer j.dbMu.RUnlock()
	_, err = storedRecord(db, seq)
	if errors.Is(err, pebble.ErrNotFound) {
		return false
	}
	if err != nil {
		t.Fatal(err)
	}
	return true
}

func TestReadersSeeStagedRecords(t *testing.T) {
	ctx := context.Background()
	j := openStaged(t, t.TempDir())
	appendN(t, j, "acme", 5)
	if inPebble(t, j, 5) {
		t.Fatal("record 5 is in Pebble before anything applied it: the test shows nothing")
	}
	last, err := j.Last(context.Background(), 5, "")
	if err != nil || len(last) != 5 || last[4].Seq != 5 {
		t.Fatalf("Last(5) = %d records, %v; want seqs 1-5", len(last), err)
	}
	if !inPebble(t, j, 5) {
		t.Fatal("a reader did not apply the staged records")
	}
	appendN(t, j, "acme", 3)
	mustVerify(t, j, 8)
	appendN(t, j, "globex", 2)
	var seqs []uint64
	if err := j.Scan(ctx, Filter{FromSeq: 9}, func(r *Record) error {
		seqs = append(seqs, r.Seq)
		return nil
	}); err != nil || len(seqs) != 2 || seqs[1] != 10 {
		t.Fatalf("Scan from 9: %v, %v; want [9 10]", seqs, err)
	}
	first, err := j.FirstSeqAt(time.Time{})
	if err != nil || first != 1 {
		t.Fatalf("FirstSeqAt(zero) = %d, %v; want 1", first, err)
	}
}

// The staged batch is bounded: the group that fills it applies it.
func TestStagedBatchIsBounded(t *testing.T) {
	j := openStaged(t, t.TempDir())
	appendN(t, j, "acme", maxStaged+1)
	if !inPebble(t, j, maxStaged) {
		t.Fatalf("record %d, the one that filled the staged batch, is not in Pebble", maxStaged)
	}
	if inPebble(t, j, maxStaged+1) {
		t.Fatalf("record %d is in Pebble: the batch was applied before it was full", maxStaged+1)
	}
	mustVerify(t, j, maxStaged+1)
	// Staged as runs of maxRun records, and the last record, which
	// mustVerify applied, as a run of one.
	if n, want := runCount(t, j), maxStaged/maxRun+1; n != want {
		t.Fatalf("%d stored runs, want %d", n, want)
	}
}

func TestCloseAppliesStagedRecords(t *testing.T) {
	dir := t.TempDir()
	j := openStaged(t, dir)
	appendN(t, j, "acme", 5)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, tailName)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("tail log after Close: %v, want it removed", err)
	}
	j2 := openTest(t, dir, WAL)
	if n := j2.Stats().Replayed; n != 0 {
		t.Fatalf("Open replayed %d records from the tail; Close should have applied them", n)
	}
	mustVerify(t, j2, 5)
}

// When applying staged records fails, they are still confirmed: the tail
// log has them. Readers are refused until Pebble is reopened, and the
// reopen (here asked for by Healthy, as the agent's readiness check does;
// an Append would do it too) or the next Open replays them.
func TestFailedApplyKeepsStagedRecords(t *testing.T) {
	for _, reopen := range []string{"healthy", "close and open"} {
		t.Run(reopen, func(t *testing.T) {
			ctx := context.Background()
			dir := t.TempDir()
			j := openStaged(t, dir)
			appendN(t, j, "acme", 3)
			// As walFS notes a failed write of Pebble's WAL writer: Pebble
			// would panic on the next commit, so the apply must not try.
			j.fs.walFailed.Store(true)

			switch reopen {
			case "healthy":
				if _, err := j.Last(context.Background(), 3, ""); !errors.Is(err, ErrUnavailable) {
					t.Fatalf("Last with the apply failing: %v, want ErrUnavailable", err)
				}
				if err := j.Healthy(ctx); err != nil {
					t.Fatalf("Healthy once the fault is gone: %v", err)
				}
				if s := j.Stats(); s.Failures != 1 || s.Recoveries != 1 || s.Replayed != 3 {
					t.Fatalf("stats %+v, want one failure, one recovery, 3 records replayed", s)
				}
			case "close and open":
				if err := j.Close(); !errors.Is(err, errApplyFailed) {
					t.Fatalf("Close with the apply failing: %v, want errApplyFailed", err)
				}
				if _, err := os.Stat(filepath.Join(dir, tailName)); err != nil {
					t.Fatalf("tail log after a Close that could not apply it: %v", err)
				}
				j = openTest(t, dir, WAL)
				if n := j.Stats().Replayed; n != 3 {
					t.Fatalf("Open replayed %d records, want 3", n)
				}
			}
			mustVerify(t, j, 3)
			r := signRecord("acme", 4)
			if err := j.Append(ctx, r); err != nil || r.Seq != 4 {
				t.Fatalf("Append after the reopen: seq %d, %v", r.Seq, err)
			}
			mustVerify(t, j, 4)
		})
	}
}

// A staged group that holds anything but audit records (commitGroup makes
// none) is refused like a failed apply: none of it reaches Pebble on its
// own, the next commit reopens Pebble, and the reopen replays the records
// staged before it from the tail log.
func TestStagingAnythingButRecordsForcesAReopen(t *testing.T) {
	j := openStaged(t, t.TempDir())
	appendN(t, j, "acme", 3)
	b := j.db.NewBatch()
	_ = b.Delete(stateKey("k"), nil)
	if err := j.stage(b); err == nil {
		t.Fatal("a group with a deletion was staged")
	}
	if !j.applyFailed.Load() {
		t.Fatal("the refused group did not take Pebble out of service")
	}
	appendN(t, j, "acme", 1)
	if n := j.Stats().Failures; n != 1 {
		t.Fatalf("Stats().Failures = %d, want 1", n)
	}
	mustVerify(t, j, 4)
}

// Two faults at once: the applier cannot give Pebble three confirmed
// records, and the tail log that holds them is damaged, so the reopen
// finds a store without them. The chain must not reuse their seqs (a new
// record standing in for a lost one would verify): it carries on after the
// confirmed head, Verify reports the gap, and a journal.lost record says
// which records were lost.
func TestReopenBehindTheConfirmedHeadSkipsTheLostSeqs(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	j := openStaged(t, dir)
	appendN(t, j, "acme", 3)
	if err := os.Truncate(filepath.Join(dir, tailName), 0); err != nil {
		t.Fatal(err)
	}
	j.fs.walFailed.Store(true)
	_ = j.Append(ctx, signRecord("acme", 4)) // fails, and the journal reopens
	var r *Record
	for deadline := time.Now().Add(5 * time.Second); ; {
		r = signRecord("acme", 5)
		err := j.Append(ctx, r)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the journal did not recover: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if r.Seq <= 3 {
		t.Fatalf("the record after the reopen took seq %d: a lost record's seq reused", r.Seq)
	}
	rep, err := j.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK() {
		t.Fatalf("Verify passed over the lost records: %+v", rep)
	}
	var lost []string
	if err := j.Scan(ctx, Filter{}, func(rec *Record) error {
		if rec.Op == "journal.lost" {
			lost = append(lost, rec.Detail)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(lost) != 1 || !strings.Contains(lost[0], "records 1-3") {
		t.Fatalf("journal.lost records: %q, want one naming records 1-3", lost)
	}
	// Retention can still delete across the attested gap, after which the
	// chain verifies again.
	if _, err := j.Prune(ctx, time.Now().Add(time.Hour), "test"); err != nil {
		t.Fatalf("prune across the attested gap: %v", err)
	}
	verifyOK(t, j)
}
