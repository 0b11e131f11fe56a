package journal

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// dirState is every file of dir with a hash of its contents, for telling
// whether anything in it was written.
func dirState(t *testing.T, dir string) map[string][32]byte {
	t.Helper()
	out := map[string][32]byte{}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		data, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = sha256.Sum256(data)
	}
	return out
}

func openReadOnly(t *testing.T, dir string) *Journal {
	t.Helper()
	j, err := Open(Options{Dir: dir, ReadOnly: true, Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("Open read-only: %v", err)
	}
	t.Cleanup(func() { _ = j.Close() })
	return j
}

// A read-only journal reads a killed agent's journal whole (the tail log's
// records included) and leaves every file of it as it was: an offline
// `sigil audit verify` run as root must not leave files the agent cannot
// open, nor replay or remove the tail.
func TestReadOnlyOpenWritesNothing(t *testing.T) {
	dir := killedWithTail(t)
	before := dirState(t, dir)
	j := openReadOnly(t, dir)
	mustVerify(t, j, 30)
	if last, err := j.Last(context.Background(), 1, ""); err != nil || len(last) != 1 || last[0].Seq != 30 {
		t.Fatalf("Last: %v %v, want record 30 (from the tail log)", last, err)
	}
	if err := j.Append(context.Background(), signRecord("acme", 99)); !errors.Is(err, ErrReadOnly) {
		t.Errorf("Append: %v, want ErrReadOnly", err)
	}
	if _, err := j.Prune(context.Background(), time.Now(), "test"); !errors.Is(err, ErrReadOnly) {
		t.Errorf("Prune: %v, want ErrReadOnly", err)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	after := dirState(t, dir)
	for name, h := range before {
		if after[name] != h {
			t.Errorf("%s changed", name)
		}
	}
	for name := range after {
		if _, ok := before[name]; !ok {
			t.Errorf("%s was created", name)
		}
	}
	// And the agent still finds the tail to replay.
	mustVerify(t, openTest(t, dir, WAL), 30)
}

// History rewritten while the journal was closed, every link recomputed:
// only the chain-head checkpoint shows it. Verifying must not erase that
// (a writable Close rewrote the checkpoint with the forged head, and the
// next verify passed), and a writer must not start on it.
func TestRewrittenHistoryKeepsItsEvidence(t *testing.T) {
	const n = 20
	dir := t.TempDir()
	j := openTest(t, dir, WAL)
	appendN(t, j, "acme", n)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	j = openTest(t, dir, WAL)
	rewriteHistoryFrom3(t, j, n)
	if err := j.Close(); err != nil { // writes the head it holds: the true one
		t.Fatal(err)
	}
	for i := range 2 {
		ro := openReadOnly(t, dir)
		rep, err := ro.Verify(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if rep.OK() || rep.Break.Reason != BreakHeadMismatch {
			t.Fatalf("read-only verify %d: %+v, want a head mismatch", i+1, rep.Break)
		}
		if err := ro.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if w, err := Open(Options{Dir: dir, Logger: testLogger(t)}); !errors.Is(err, errHeadDoubt) {
		if err == nil {
			w.Close()
		}
		t.Fatalf("writable Open: %v, want errHeadDoubt", err)
	}
}

// What a writable Open refuses in a tail log (a damaged frame between
// others), a read-only one reads up to, and Verify names: the remedy the
// refusal prints, `sigil audit verify`, is this.
func TestReadOnlyReportsATailLogOpenRefuses(t *testing.T) {
	dir := killedWithTail(t)
	damageTailFrame(t, dir, 5) // the frame of record 7
	if w, err := Open(Options{Dir: dir, Logger: testLogger(t)}); !errors.Is(err, errTailCorrupt) {
		if err == nil {
			w.Close()
		}
		t.Fatalf("writable Open: %v, want errTailCorrupt", err)
	}
	rep := expectBreak(t, openReadOnly(t, dir), 7, BreakTailLog)
	if rep.LastSeq != 6 {
		t.Fatalf("read up to seq %d, want 6 (the frames before the damaged one)", rep.LastSeq)
	}
}

// A damaged tail log's loss is recorded, not papered over: recovering
// replays what it can, keeps the tail beside the journal, and goes on after
// the highest seq the tail shows with a journal.lost record, so that no seq
// of a released signature is used again (moving the tail aside, as the
// refusal used to advise, made the agent sign on as seq 7).
func TestAcceptTailLossRecordsTheLoss(t *testing.T) {
	dir := killedWithTail(t)
	damageTailFrame(t, dir, 5) // the frame of record 7; 8-30 follow it
	j, err := Open(Options{Dir: dir, AcceptTailLoss: true, Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("Open accepting the loss: %v", err)
	}
	if err := j.Barrier(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := j.Append(context.Background(), signRecord("acme", 100)); err != nil {
		t.Fatal(err)
	}
	if head, _ := j.Head(); head != 32 {
		t.Fatalf("head %d, want 32: 1-6 kept, 7-30 lost, 31 the journal.lost record, 32 the new one", head)
	}
	var lost *Record
	j.Scan(context.Background(), Filter{}, func(r *Record) error {
		if r.Op == LostOp {
			cp := *r
			lost = &cp
		}
		return nil
	})
	if lost == nil || lost.Seq != 31 || !strings.Contains(lost.Detail, "7-30") {
		t.Fatalf("journal.lost record %+v, want seq 31 naming 7-30", lost)
	}
	expectBreak(t, j, 7, BreakGap)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	kept, _ := filepath.Glob(filepath.Join(dir, tailName+".lost-*"))
	if len(kept) != 1 {
		t.Fatalf("the damaged tail log was not kept beside the journal: %v", kept)
	}
	// The agent opens it as it is now, and goes on after seq 32.
	j = openTest(t, dir, WAL)
	if head, _ := j.Head(); head != 32 {
		t.Fatalf("reopened at head %d, want 32", head)
	}
}

// tailOf returns dir's tail log bytes and its frames' offsets.
func tailOf(t *testing.T, dir string) ([]byte, []int) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(dir, tailName))
	if err != nil {
		t.Fatal(err)
	}
	offs, end := frameOffsets(t, data)
	return data[:end], offs
}

// A damaged frame hides only its own records: when the store already has
// them (Pebble's WAL usually runs ahead of the tail's first frames at a
// kill), nothing is lost, and Open neither refuses nor, recovering,
// writes intact records off.
func TestDamagedFrameTheStoreHolds(t *testing.T) {
	dir := killedWithTail(t) // the store holds record 1, the tail 2-30
	data, offs := tailOf(t, dir)
	data = append([]byte(nil), data...)
	// The store gets 2-20 (a tail of those alone, replayed and emptied).
	if err := os.WriteFile(filepath.Join(dir, tailName), data[:offs[19]], 0o600); err != nil {
		t.Fatal(err)
	}
	w := openTest(t, dir, WAL)
	mustVerify(t, w, 20)
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	// Killed again with the whole tail, record 7's frame damaged: the
	// store has 7, and 21-30 continue its chain.
	data[offs[5]+tailHeaderLen] ^= 1
	if err := os.WriteFile(filepath.Join(dir, tailName), data, 0o600); err != nil {
		t.Fatal(err)
	}
	j, err := Open(Options{Dir: dir, Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	defer j.Close()
	mustVerify(t, j, 30)
}

// recover records the loss before it empties the tail: a kill in between
// leaves the journal.lost record at the head, and the old tail's frames in
// its range are taken as accounted, not as records to chain again.
func TestRecoverKilledBeforeTheTailIsEmptied(t *testing.T) {
	dir := killedWithTail(t)
	data, offs := tailOf(t, dir)
	data[offs[5]+tailHeaderLen] ^= 1 // record 7's frame; 8-30 follow it
	damaged := append([]byte(nil), data...)
	if err := os.WriteFile(filepath.Join(dir, tailName), damaged, 0o600); err != nil {
		t.Fatal(err)
	}
	j, err := Open(Options{Dir: dir, AcceptTailLoss: true, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	// As if killed after the journal.lost record's commit, before the tail
	// was emptied.
	if err := os.WriteFile(filepath.Join(dir, tailName), damaged, 0o600); err != nil {
		t.Fatal(err)
	}
	j = openTest(t, dir, WAL)
	if err := j.Append(context.Background(), signRecord("acme", 100)); err != nil {
		t.Fatal(err)
	}
	if head, _ := j.Head(); head != 32 {
		t.Fatalf("head %d after the new record, want 32: no seq of 7-30 used again", head)
	}
}

// A tail whose next frame does not link to the store's record (the store
// changed under the journal) is a disagreement, not a loss: recover does
// not take it.
func TestRecoverRefusesATailThatDisagrees(t *testing.T) {
	dir := killedWithTail(t) // the store holds record 1; the tail 2-30
	// Another journal's records 2-30 in its place: its record 2 does not
	// link to this store's record 1.
	other, err := os.ReadFile(filepath.Join(killedWithTailOf(t, "other"), tailName))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, tailName), other, 0o600); err != nil {
		t.Fatal(err)
	}
	if r, err := Open(Options{Dir: dir, AcceptTailLoss: true, Logger: testLogger(t)}); err == nil {
		r.Close()
		t.Fatal("AcceptTailLoss took another journal's tail")
	} else if errors.Is(err, errTailGap) || !errors.Is(err, errTailCorrupt) {
		t.Fatalf("Open: %v, want a disagreement (errTailCorrupt without errTailGap)", err)
	}
}

// A frame whose checksum holds but whose batch does not decode is not a
// panic in Pebble's decoder: its records count as lost.
func TestFrameThatDoesNotDecode(t *testing.T) {
	dir := killedWithTail(t)
	data, offs := tailOf(t, dir)
	frame := data[offs[0]:offs[1]] // records 2: the chain's next frame
	payload := frame[tailHeaderLen : len(frame)-tailCRCLen]
	payload[0], payload[12] = 0xff, 0x01 // a batch header claiming one entry, and junk
	for i := 13; i < len(payload); i++ {
		payload[i] = 0xff
	}
	binary.BigEndian.PutUint32(frame[len(frame)-tailCRCLen:], crc32.Checksum(frame[:len(frame)-tailCRCLen], crc32c))
	if err := os.WriteFile(filepath.Join(dir, tailName), data, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, readOnly := range []bool{true, false} {
		func() {
			defer func() {
				if p := recover(); p != nil {
					t.Fatalf("read-only %v: Open panicked: %v", readOnly, p)
				}
			}()
			j, err := Open(Options{Dir: dir, ReadOnly: readOnly, Logger: testLogger(t)})
			if readOnly {
				if err != nil {
					t.Fatalf("read-only Open: %v", err)
				}
				expectBreak(t, j, 2, BreakTailLog)
				j.Close()
			} else if !errors.Is(err, errTailGap) {
				if err == nil {
					j.Close()
				}
				t.Fatalf("Open: %v, want records lost", err)
			}
		}()
	}
}

// FirstSeqAt (which restores the day's quota counts at start) finds its way
// across the seqs a journal.lost record names, which are not stored.
func TestFirstSeqAtAcrossALostRange(t *testing.T) {
	dir := killedWithTail(t)
	data, offs := tailOf(t, dir)
	data[offs[5]+tailHeaderLen] ^= 1 // 7-30 lost
	if err := os.WriteFile(filepath.Join(dir, tailName), data, 0o600); err != nil {
		t.Fatal(err)
	}
	j, err := Open(Options{Dir: dir, AcceptTailLoss: true, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	after := time.Now()
	time.Sleep(2 * time.Millisecond)
	for range 3 {
		if err := j.Append(context.Background(), signRecord("acme", 200)); err != nil {
			t.Fatal(err)
		}
	}
	seq, err := j.FirstSeqAt(after)
	if err != nil {
		t.Fatalf("FirstSeqAt across the lost range: %v", err)
	}
	if seq != 32 {
		t.Fatalf("FirstSeqAt = %d, want 32 (the first record after the recovery)", seq)
	}
}

// readOnlyFS refuses every write as a read-only mount does (EROFS), the
// LOCK file's open for writing included.
type readOnlyFS struct{ vfs.FS }

func erofs(op, name string) error { return &os.PathError{Op: op, Path: name, Err: syscall.EROFS} }

func (readOnlyFS) Create(name string, _ vfs.DiskWriteCategory) (vfs.File, error) {
	return nil, erofs("open", name)
}
func (readOnlyFS) OpenReadWrite(name string, _ vfs.DiskWriteCategory, _ ...vfs.OpenOption) (vfs.File, error) {
	return nil, erofs("open", name)
}
func (readOnlyFS) ReuseForWrite(_, name string, _ vfs.DiskWriteCategory) (vfs.File, error) {
	return nil, erofs("rename", name)
}
func (readOnlyFS) Link(_, name string) error                 { return erofs("link", name) }
func (readOnlyFS) Remove(name string) error                  { return erofs("remove", name) }
func (readOnlyFS) RemoveAll(name string) error               { return erofs("remove", name) }
func (readOnlyFS) Rename(_, name string) error               { return erofs("rename", name) }
func (readOnlyFS) MkdirAll(name string, _ os.FileMode) error { return erofs("mkdir", name) }
func (readOnlyFS) Lock(name string) (io.Closer, error)       { return nil, erofs("open", name) }

// A journal on a read-only mount (an evidence copy, a snapshot) is read
// under a shared lock of its LOCK file: the exclusive lock a writer takes
// needs the file open for writing, and every offline read failed there.
// A writer in another process still keeps it out.
func TestReadOnlyOpenOnAReadOnlyMount(t *testing.T) {
	dir := killedWithTail(t)
	j, err := Open(Options{Dir: dir, ReadOnly: true, FS: readOnlyFS{vfs.Default}, Logger: testLogger(t)})
	if err != nil {
		t.Fatalf("Open read-only on a read-only mount: %v", err)
	}
	mustVerify(t, j, 30)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}

	// A writer in another process: the shared lock is refused.
	busy := t.TempDir()
	_, out, _ := startChild(t, "wal "+busy)
	if _, err := bufio.NewReader(out).ReadString('\n'); err != nil {
		t.Fatalf("the writer child confirmed nothing: %v", err)
	}
	if r, err := Open(Options{Dir: busy, ReadOnly: true, FS: readOnlyFS{vfs.Default}, Logger: testLogger(t)}); !errors.Is(err, ErrInUse) {
		if err == nil {
			r.Close()
		}
		t.Fatalf("read-only Open beside a writer: %v, want ErrInUse", err)
	}
}
