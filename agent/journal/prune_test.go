package journal

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// pruneFixture is a journal of n records stamped 1ms apart from t0 (the
// clock steps 1ms per call, one call per record).
func pruneFixture(t *testing.T, n int) (*Journal, string, time.Time) {
	t.Helper()
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	dir := t.TempDir()
	j := openTest(t, dir, WAL, func(o *Options) { o.Clock = fixedClock(t0) })
	appendN(t, j, "acme", n)
	return j, dir, t0
}

// recordAt is the time of record seq in a pruneFixture.
func recordAt(t0 time.Time, seq uint64) time.Time {
	return t0.Add(time.Duration(seq) * time.Millisecond)
}

func mustPrune(t *testing.T, j *Journal, before time.Time) PruneResult {
	t.Helper()
	res, err := j.Prune(context.Background(), before, "test")
	if err != nil {
		t.Fatalf("Prune: %v", err)
	}
	return res
}

func TestPruneKeepsAVerifiableChain(t *testing.T) {
	j, dir, t0 := pruneFixture(t, 100)

	res := mustPrune(t, j, recordAt(t0, 41)) // records 1..40 are older
	if res.Deleted != 40 || res.FromSeq != 1 || res.ToSeq != 40 || res.RecordSeq != 101 {
		t.Fatalf("first prune: %+v", res)
	}
	rep := verifyOK(t, j)
	if rep.AnchorSeq != 40 || rep.FirstSeq != 41 || rep.LastSeq != 101 || rep.Records != 61 {
		t.Fatalf("after the first prune: %+v", rep)
	}
	var prune Record
	if err := decodeRecord(rawGet(t, j, auditKey(101)), &prune); err != nil {
		t.Fatal(err)
	}
	if prune.Op != PruneOp || prune.DigestHash != res.AnchorHash || prune.Hash != rep.HeadHash {
		t.Fatalf("prune record %+v does not attest anchor %x", prune, res.AnchorHash[:8])
	}

	// Nothing older is left: the same cut-off deletes nothing and appends
	// nothing.
	if again := mustPrune(t, j, recordAt(t0, 41)); again.Deleted != 0 {
		t.Fatalf("second prune with the same cut-off: %+v", again)
	}
	if seq, _ := j.Head(); seq != 101 {
		t.Fatalf("head %d after an empty prune, want 101", seq)
	}

	// A later cut-off takes the rest, the first prune's record included
	// (the test clock stamps it 101ms).
	res = mustPrune(t, j, recordAt(t0, 1000))
	if res.FromSeq != 41 || res.ToSeq != 101 || res.RecordSeq != 102 {
		t.Fatalf("second prune: %+v", res)
	}
	rep = verifyOK(t, j)
	if rep.AnchorSeq != 101 || rep.FirstSeq != 102 || rep.Records != 1 {
		t.Fatalf("after the second prune: %+v", rep)
	}

	// New records chain on, and all of it survives a restart.
	appendN(t, j, "acme", 5)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	j = openTest(t, dir, WAL)
	rep = verifyOK(t, j)
	if rep.FirstSeq != 102 || rep.LastSeq != 107 {
		t.Fatalf("after restart: %+v", rep)
	}
	var seqs []uint64
	if err := j.Scan(context.Background(), Filter{}, func(r *Record) error {
		seqs = append(seqs, r.Seq)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if len(seqs) != 6 || seqs[0] != 102 {
		t.Fatalf("Scan after prune: %v", seqs)
	}
}

// Every record can go: the chain then starts with the prune record.
func TestPruneEverything(t *testing.T) {
	j, _, t0 := pruneFixture(t, 10)
	res := mustPrune(t, j, recordAt(t0, 1000))
	if res.Deleted != 10 || res.RecordSeq != 11 {
		t.Fatalf("prune: %+v", res)
	}
	if rep := verifyOK(t, j); rep.Records != 1 || rep.FirstSeq != 11 {
		t.Fatalf("verify: %+v", rep)
	}
}

// Prune appends while signers append: no record is lost or misplaced.
func TestPruneWhileAppending(t *testing.T) {
	j, _, t0 := pruneFixture(t, 200)
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			appendN(t, j, "acme", 100)
		}()
	}
	mustPrune(t, j, recordAt(t0, 150))
	wg.Wait()
	rep := verifyOK(t, j)
	if rep.AnchorSeq != 149 || rep.LastSeq != 601 || rep.Records != 601-149 {
		t.Fatalf("verify: %+v", rep)
	}
}

func TestPruneRefusesABrokenChain(t *testing.T) {
	j, _, t0 := pruneFixture(t, 30)
	v := rawGet(t, j, auditKey(12))
	v[recordFixedLen+2] ^= 0x01
	rawSet(t, j, auditKey(12), v)
	_, err := j.Prune(context.Background(), recordAt(t0, 20), "test")
	if !errors.Is(err, ErrPruneRefused) {
		t.Fatalf("Prune over an edited record: %v, want ErrPruneRefused", err)
	}
	// The evidence is still there.
	rep, err := j.Verify(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK() || rep.Break.Seq != 12 || rep.AnchorSeq != 0 {
		t.Fatalf("verify after a refused prune: %+v", rep)
	}
}

// Deleting records or moving the anchor behind the journal's back is
// caught even when the first kept record is intact.
func TestVerifyFindsPruneTampering(t *testing.T) {
	cases := []struct {
		name   string
		tamper func(t *testing.T, j *Journal)
		seq    uint64
		reason BreakReason
	}{
		{
			name:   "more records deleted and the anchor moved",
			tamper: func(t *testing.T, j *Journal) { cutByHand(t, j, 21, 25) },
			seq:    41, reason: BreakAnchor,
		},
		{
			name:   "anchor deleted",
			tamper: func(t *testing.T, j *Journal) { rawDelete(t, j, []byte(anchorKey)) },
			seq:    1, reason: BreakGap,
		},
		{
			name:   "first kept record deleted",
			tamper: func(t *testing.T, j *Journal) { rawDelete(t, j, auditKey(21)) },
			seq:    21, reason: BreakGap,
		},
		{
			name:   "anchor garbage",
			tamper: func(t *testing.T, j *Journal) { rawSet(t, j, []byte(anchorKey), []byte("x")) },
			seq:    0, reason: BreakAnchor,
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			j, _, t0 := pruneFixture(t, 40)
			mustPrune(t, j, recordAt(t0, 21))
			verifyOK(t, j)
			tc.tamper(t, j)
			expectBreak(t, j, tc.seq, tc.reason)
		})
	}
}

// An anchor with no prune record naming it (records cut and an anchor
// written by hand) is a break.
func TestVerifyAnchorWithoutPruneRecord(t *testing.T) {
	j, _, _ := pruneFixture(t, 20)
	cutByHand(t, j, 1, 10)
	expectBreak(t, j, 11, BreakAnchor)
}

// cutByHand does what a prune does to the store, outside Prune: deletes
// records from..to and moves the anchor to record to, with no prune record
// attesting it.
func cutByHand(t *testing.T, j *Journal, from, to uint64) {
	t.Helper()
	var r Record
	if err := decodeRecord(rawGet(t, j, auditKey(to)), &r); err != nil {
		t.Fatal(err)
	}
	for seq := from; seq <= to; seq++ {
		rawDelete(t, j, auditKey(seq))
	}
	v := make([]byte, headLen)
	encodeHead(v, to, r.Hash)
	rawSet(t, j, []byte(anchorKey), v)
}

func TestFirstSeqAt(t *testing.T) {
	j, _, t0 := pruneFixture(t, 50)
	for _, tc := range []struct {
		at   time.Time
		want uint64
	}{
		{t0, 1}, {recordAt(t0, 1), 1}, {recordAt(t0, 1).Add(time.Nanosecond), 2},
		{recordAt(t0, 37), 37}, {recordAt(t0, 50), 50}, {recordAt(t0, 51), 51},
	} {
		if got, err := j.FirstSeqAt(tc.at); err != nil || got != tc.want {
			t.Errorf("FirstSeqAt(t0+%v) = %d, %v; want %d", tc.at.Sub(t0), got, err, tc.want)
		}
	}
	// After a prune the search starts past the anchor.
	mustPrune(t, j, recordAt(t0, 20))
	if got, err := j.FirstSeqAt(t0); err != nil || got != 20 {
		t.Errorf("FirstSeqAt after a prune = %d, %v; want 20", got, err)
	}
}

// FirstSeqAt while appends go on, their groups staged for a long while:
// the search must not ask for a record confirmed after its snapshot.
func TestFirstSeqAtDuringAppends(t *testing.T) {
	j := openTest(t, t.TempDir(), WAL, func(o *Options) { o.ApplyDelay = time.Hour })
	appendN(t, j, "acme", 10)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if err := j.Append(context.Background(), signRecord("acme", i)); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	deadline := time.Now().Add(2 * time.Second)
	for i := 0; i < 3000 && time.Now().Before(deadline); i++ {
		if _, err := j.FirstSeqAt(time.Now().Add(time.Hour)); err != nil {
			close(stop)
			wg.Wait()
			t.Fatalf("FirstSeqAt during appends, call %d: %v", i, err)
		}
	}
	close(stop)
	wg.Wait()
}

// A full journal refuses appends, and a prune is what gets its space back
// (audit.md, "Retention"): the prune's own commit goes through below the
// reserve, down to pruneFloorBytes, and the pruned range is compacted at
// once. Below the floor a prune is refused too.
func TestPruneOnAFullJournal(t *testing.T) {
	fs := &spaceFS{FS: vfs.Default}
	fs.avail.Store(10 << 30)
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	j := openTest(t, t.TempDir(), WAL, func(o *Options) { o.FS = fs; o.Clock = fixedClock(t0) })
	ctx := context.Background()
	appendN(t, j, "acme", 50)
	fs.avail.Store(pruneFloorBytes * 2) // under the 64 MiB reserve
	time.Sleep(spaceCheckInterval + 10*time.Millisecond)
	if err := j.Append(ctx, signRecord("acme", 51)); err == nil || !strings.Contains(err.Error(), "journal full") {
		t.Fatalf("append on a full journal: %v, want journal full", err)
	}
	// The state a prune carries (the agent's quota counts) passes with it.
	res, err := j.Prune(ctx, recordAt(t0, 41), "operator", StateChange{Key: "counts", Value: []byte("41")})
	if err != nil || res.Deleted == 0 {
		t.Fatalf("prune on a full journal: %+v, %v", res, err)
	}
	if v, err := j.Get("counts"); err != nil || string(v) != "41" {
		t.Fatalf("state committed with the prune: %q, %v", v, err)
	}
	verifyOK(t, j)
	fs.avail.Store(pruneFloorBytes / 2)
	if _, err := j.Prune(ctx, recordAt(t0, 45), "operator"); err == nil || !strings.Contains(err.Error(), "journal full") {
		t.Fatalf("prune below the floor: %v, want journal full", err)
	}
	fs.avail.Store(10 << 30)
	if err := j.Append(ctx, signRecord("acme", 52)); err != nil {
		t.Fatalf("append with room again: %v", err)
	}
}

// A prune that ends inside a run stores the run's rest under the next seq,
// as read when the prune began. If Pebble was reopened before the prune
// commits (an append met a failed Pebble WAL), the reopen replays the tail
// one record per key, and the rest as read then would overlap those keys:
// the chain broke for good. The rest is now read again at the commit.
func TestPruneAcrossAReopenKeepsTheChain(t *testing.T) {
	ctx := context.Background()
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	j, fault := openPebbleWALFault(t, func(o *Options) {
		o.ApplyDelay = time.Hour
		o.Clock = fixedClock(t0)
	})
	j.nextCheckpoint = time.Now().Add(time.Hour)
	appendN(t, j, "acme", 200) // staged and in the tail; past a 32 KiB WAL block

	// Prune's first step applies the staged records as runs and reads the
	// range 1..29, with records 30..64 of the first run to keep; Pebble's
	// WAL writer fails under it.
	fault.on.Store(true)
	pr, err := j.pruneRange(ctx, recordAt(t0, 30))
	if err != nil || pr.to != 29 || pr.keep == nil {
		t.Fatalf("pruneRange: %+v %v", pr, err)
	}
	for deadline := time.Now().Add(5 * time.Second); !j.fs.walFailed.Load(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("Pebble's WAL write never failed")
		}
	}
	fault.on.Store(false)
	// A signer's append meets the failed WAL: Pebble is reopened, and the
	// tail replayed into it one record per key.
	appendEventually(t, j, signRecord("acme", 1000))

	// Prune's second step, as Prune does it.
	r := Record{Op: PruneOp, CodeName: "OK", Peer: "test", DigestHash: pr.hash,
		Detail: fmt.Sprintf("deleted records %d-%d", pr.from, pr.to)}
	if err := j.submitRecord(ctx, &r, nil, &pr); err != nil {
		t.Fatalf("the prune's commit: %v", err)
	}
	rep, err := j.Verify(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !rep.OK() {
		t.Fatalf("the chain after a prune that raced a reopen: %v", rep.Break)
	}
	if _, err := j.Prune(ctx, recordAt(t0, 40), "test"); err != nil {
		t.Fatalf("the next prune: %v", err)
	}
}
