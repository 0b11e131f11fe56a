package journal

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
)

// openTest opens a journal in dir, closing it when the test ends unless
// the test closed it first.
func openTest(t testing.TB, dir string, mode Durability, modify ...func(*Options)) *Journal {
	t.Helper()
	opts := Options{Dir: dir, Durability: mode, Logger: testLogger(t)}
	for _, m := range modify {
		m(&opts)
	}
	j, err := Open(opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { _ = j.Close() })
	return j
}

// testLogger logs warnings and errors through the test; Pebble's info
// lines (WAL replay and so on) would drown the output.
func testLogger(t testing.TB) *zap.Logger {
	if _, ok := t.(*testing.B); ok {
		return zap.NewNop()
	}
	return zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
}

// signRecord is a typical signing decision.
func signRecord(tenant string, i int) *Record {
	return &Record{
		Tenant:        tenant,
		Slot:          tenant + "/release",
		Version:       uint32(i%3 + 1),
		KID:           "3f7a9c0d5e2b4a6f8c1d0e9b7a5c3e1f",
		Op:            "sign",
		Algorithm:     "ECDSA_P256_SHA256",
		DigestHash:    HashDigest([]byte(fmt.Sprintf("digest %s %d", tenant, i))),
		PolicyHash:    HashDigest([]byte("policy v1")),
		Code:          0,
		CodeName:      "OK",
		LatencyMicros: uint32(80 + i%50),
		Peer:          "uid:1000",
	}
}

// rawSet writes a key straight into Pebble, bypassing the journal: the
// tamper tests' way of editing the store behind the journal's back. Like
// rawDelete and rawGet it applies the staged records first, so that the
// applier cannot later write a record over the edit, and then stores
// every record under its own key (splitRuns), so that a test can name one
// record by its key.
func rawSet(t *testing.T, j *Journal, key, value []byte) {
	t.Helper()
	db := rawDB(t, j)
	defer j.dbMu.RUnlock()
	if err := db.Set(key, value, pebble.Sync); err != nil {
		t.Fatal(err)
	}
}

func rawDelete(t *testing.T, j *Journal, key []byte) {
	t.Helper()
	db := rawDB(t, j)
	defer j.dbMu.RUnlock()
	if err := db.Delete(key, pebble.Sync); err != nil {
		t.Fatal(err)
	}
}

func rawGet(t *testing.T, j *Journal, key []byte) []byte {
	t.Helper()
	db := rawDB(t, j)
	defer j.dbMu.RUnlock()
	v, closer, err := db.Get(key)
	if err != nil {
		t.Fatal(err)
	}
	defer closer.Close()
	return append([]byte(nil), v...)
}

// rawDB applies the staged records, splits the stored runs and returns
// the DB with j.dbMu read-held.
func rawDB(t *testing.T, j *Journal) *pebble.DB {
	t.Helper()
	r, err := j.readAuditDB()
	if err != nil {
		t.Fatal(err)
	}
	db, ok := r.(*pebble.DB)
	if !ok {
		t.Fatalf("rawDB of a read-only journal")
	}
	splitRuns(t, db)
	return db
}

// splitRuns stores every record of a run of several under its own key,
// which is how a journal stores records applied one per commit (and how
// it stored every record before runs).
func splitRuns(t *testing.T, db *pebble.DB) {
	t.Helper()
	it, err := db.NewIter(auditIterOptions(0))
	if err != nil {
		t.Fatal(err)
	}
	b := db.NewBatch()
	for ok := it.First(); ok; ok = it.Next() {
		seq, _ := seqFromKey(it.Key())
		// A tampered value that cannot be split stays as it is past the
		// records before the damage.
		_ = walkRun(it.Value(), seq, func(seq uint64, rec []byte) error {
			if err := b.Set(auditKeyFor(seq), rec, nil); err != nil {
				t.Fatal(err)
			}
			return nil
		})
	}
	if err := it.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.Commit(pebble.Sync); err != nil {
		t.Fatal(err)
	}
}

// runCount counts the stored audit values (runs, or records stored one per
// key).
func runCount(t *testing.T, j *Journal) int {
	t.Helper()
	db, err := j.writableAuditDB()
	if err != nil {
		t.Fatal(err)
	}
	defer j.dbMu.RUnlock()
	it, err := db.NewIter(auditIterOptions(0))
	if err != nil {
		t.Fatal(err)
	}
	defer it.Close()
	n := 0
	for ok := it.First(); ok; ok = it.Next() {
		n++
	}
	return n
}

func auditKey(seq uint64) []byte { return auditKeyFor(seq) }

// appendN appends n records from one goroutine.
func appendN(t testing.TB, j *Journal, tenant string, n int) {
	t.Helper()
	for i := 0; i < n; i++ {
		if err := j.Append(context.Background(), signRecord(tenant, i)); err != nil {
			t.Fatalf("Append %d: %v", i, err)
		}
	}
}

// verifyOK fails the test unless the chain is intact.
func verifyOK(t *testing.T, j *Journal) VerifyReport {
	t.Helper()
	rep, err := j.Verify(context.Background())
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if !rep.OK() {
		t.Fatalf("Verify: %v", rep.Break)
	}
	return rep
}

// expectBreak fails the test unless Verify reports its first break at seq
// for reason.
func expectBreak(t *testing.T, j *Journal, seq uint64, reason BreakReason) VerifyReport {
	t.Helper()
	rep, err := j.Verify(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if rep.OK() {
		t.Fatal("Verify passed a tampered journal")
	}
	if rep.Break.Seq != seq || rep.Break.Reason != reason {
		t.Fatalf("break at %d (%s), want %d (%s); %v", rep.Break.Seq, rep.Break.Reason, seq, reason, rep.Break)
	}
	return rep
}

// mustVerify fails the test unless the chain is intact and ends at seq.
func mustVerify(t *testing.T, j *Journal, seq uint64) VerifyReport {
	t.Helper()
	rep := verifyOK(t, j)
	if rep.LastSeq != seq || rep.Records != seq {
		t.Fatalf("Verify: last %d records %d, want %d", rep.LastSeq, rep.Records, seq)
	}
	return rep
}

// fixedClock returns a clock that starts at t0 and steps 1ms per call.
func fixedClock(t0 time.Time) func() time.Time {
	var n atomic.Int64
	return func() time.Time {
		return t0.Add(time.Duration(n.Add(1)) * time.Millisecond)
	}
}

// available reports whether Pebble is open (not mid-recovery).
func (j *Journal) available() bool {
	j.dbMu.RLock()
	defer j.dbMu.RUnlock()
	return j.db != nil
}

// writableAuditDB is readAuditDB for tests that write to Pebble behind the
// journal's back: the DB itself, with j.dbMu read-held.
func (j *Journal) writableAuditDB() (*pebble.DB, error) {
	r, err := j.readAuditDB()
	if err != nil {
		return nil, err
	}
	return asDB(j, r)
}

// writableDB is readDB's writableAuditDB.
func (j *Journal) writableDB() (*pebble.DB, error) {
	r, err := j.readDB()
	if err != nil {
		return nil, err
	}
	return asDB(j, r)
}

func asDB(j *Journal, r pebble.Reader) (*pebble.DB, error) {
	db, ok := r.(*pebble.DB)
	if !ok {
		j.dbMu.RUnlock()
		return nil, errors.New("a read-only journal's reader is not its DB")
	}
	return db, nil
}

// rewriteHistoryFrom3 edits record 3 of j's n records and recomputes every
// link after it, as someone who can write the store would: only the head
// checkpoint then disagrees.
func rewriteHistoryFrom3(t *testing.T, j *Journal, n uint64) {
	t.Helper()
	var prev [32]byte
	for seq := uint64(1); seq <= n; seq++ {
		var r Record
		if err := decodeRecord(rawGet(t, j, auditKey(seq)), &r); err != nil {
			t.Fatal(err)
		}
		if seq >= 3 {
			r.PrevHash = prev
			if seq == 3 {
				r.CodeName = "FORGED"
			}
			rawSet(t, j, auditKey(seq), r.encode())
		}
		prev = r.Hash
	}
}

// damageTailFrame flips a byte of the i-th frame's payload (0-based) in
// the tail log of the journal in dir.
func damageTailFrame(t *testing.T, dir string, i int) {
	t.Helper()
	path := filepath.Join(dir, tailName)
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	offs, _ := frameOffsets(t, data)
	data[offs[i]+tailHeaderLen] ^= 1
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}
