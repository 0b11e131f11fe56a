package journal

import (
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"context"
	"encoding/binary"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"
)

// snapshotDir copies dir as a SIGKILL would leave it: every file as the
// kernel holds it, without the writes still buffered in the process.
//
// Pebble's background work (a compaction, a new MANIFEST) may add files
// while the copy runs, and a copy whose MANIFEST names a file listed too
// late is no state a kill could leave. So the copy is taken again until
// the directory's file names are the same before and after it.
func snapshotDir(t *testing.T, dir string, skip ...string) string {
	t.Helper()
	names := func() []string {
		entries, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
	next:
		for _, e := range entries {
			for _, s := range skip {
				if e.Name() == s {
					continue next
				}
			}
			out = append(out, e.Name())
		}
		return out
	}
	for attempt := 0; ; attempt++ {
		out := t.TempDir()
		before := names()
		copied := true
		for _, name := range before {
			data, err := os.ReadFile(filepath.Join(dir, name))
			if errors.Is(err, fs.ErrNotExist) {
				copied = false // deleted meanwhile: take the copy again
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(out, name), data, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		if copied && slices.Equal(before, names()) {
			return out
		}
		if attempt == 50 {
			t.Fatalf("the files of %s kept changing while they were copied", dir)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// openHeadOf opens a copy of dir (so dir stays as it is), returns its head
// and closes it.
func openHeadOf(t *testing.T, dir string) uint64 {
	t.Helper()
	j := openTest(t, snapshotDir(t, dir), WAL)
	head, _ := j.Head()
	verifyOK(t, j)
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	return head
}

// The tail log is what keeps a killed agent's records: Pebble's WAL lacks
// the ones still in its buffer, and Open puts them back from the tail.
func TestTailLogKeepsWhatPebbleBuffered(t *testing.T) {
	dir := t.TempDir()
	j := openTest(t, dir, WAL)
	appendN(t, j, "acme", 1) // the first commit checkpoints, so it waits for Pebble's WAL
	walSizes := logFileSizes(t, dir)
	appendN(t, j, "acme", 39) // these go through the tail
	if j.tail.size == 0 {
		t.Fatal("no record went through the tail log")
	}

	// Both copies are cut back to the WAL the first commit left, as a kill
	// before Pebble's WAL writer caught up would leave them.
	withTail := cutLogFiles(t, snapshotDir(t, dir), walSizes)
	pebbleOnly := cutLogFiles(t, snapshotDir(t, dir, tailName), walSizes)
	if head := openHeadOf(t, pebbleOnly); head >= 40 {
		t.Fatalf("Pebble's WAL alone has all %d records: the test shows nothing about the tail", head)
	}
	j2 := openTest(t, withTail, WAL)
	mustVerify(t, j2, 40)
	if got, lacked := j2.Stats().Replayed, 40-openHeadOf(t, pebbleOnly); got != lacked {
		t.Fatalf("Stats().Replayed = %d, want the %d records Pebble lacked", got, lacked)
	}
	if _, err := os.Stat(filepath.Join(withTail, tailName)); err != nil {
		t.Fatalf("tail log after Open: %v", err)
	}
	if j2.tail.size != 0 {
		t.Fatalf("tail log holds %d bytes after the replay, want 0", j2.tail.size)
	}
	// The chain goes on from the replayed head.
	r := signRecord("acme", 41)
	if err := j2.Append(context.Background(), r); err != nil || r.Seq != 41 {
		t.Fatalf("Append after replay: seq %d, %v", r.Seq, err)
	}
	mustVerify(t, j2, 41)

	// A clean Close leaves nothing to replay.
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, tailName)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("tail log after Close: %v, want it removed", err)
	}
	if head := openHeadOf(t, dir); head != 40 {
		t.Fatalf("head after Close and Open: %d, want 40", head)
	}
}

// A commit that waits for Pebble's WAL (a state change here) empties the
// tail: what it held is in Pebble's WAL by then.
func TestTailLogStartsOverAfterAWaitedCommit(t *testing.T) {
	j := openTest(t, t.TempDir(), WAL)
	appendN(t, j, "acme", 5)
	if j.tail.size == 0 {
		t.Fatal("no record went through the tail log")
	}
	if err := j.Put(context.Background(), "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	if j.tail.size != 0 {
		t.Fatalf("tail log holds %d bytes after a waited commit", j.tail.size)
	}
	if fsync := openTest(t, t.TempDir(), Fsync); fsync.tail != nil {
		t.Fatal("fsync mode has a tail log")
	}
}

// killedWithTail leaves a journal directory as a SIGKILL would, with 30
// records of which Pebble's WAL has only the first, and returns it.
func killedWithTail(t *testing.T) string {
	t.Helper()
	return killedWithTailOf(t, "acme")
}

// killedWithTailOf is killedWithTail with tenant's records.
func killedWithTailOf(t *testing.T, tenant string) string {
	t.Helper()
	dir := t.TempDir()
	j := openTest(t, dir, WAL)
	walSizes := map[string]int64{}
	for i := 0; i < 30; i++ {
		// One record per frame, so frames can be cut one by one.
		if err := j.Append(context.Background(), signRecord(tenant, i)); err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			walSizes = logFileSizes(t, dir)
		}
	}
	// Pebble's WAL writer may have caught up with some of the other 29 by
	// now; cut its files back to where the first commit's wait left them,
	// as a kill a moment earlier would have.
	return cutLogFiles(t, snapshotDir(t, dir), walSizes)
}

// cutLogFiles truncates each of Pebble's WAL files in dir to its size in
// sizes (a file not in sizes to nothing) and returns dir. Pebble's WAL
// writer writes whatever is pending whenever it runs, so a snapshot taken
// a moment after a NoSync commit may or may not hold it; tests that need
// records Pebble lacks cut it back to a known point.
func cutLogFiles(t *testing.T, dir string, sizes map[string]int64) string {
	t.Helper()
	for name, size := range logFileSizes(t, dir) {
		if err := os.Truncate(filepath.Join(dir, name), min(size, sizes[name])); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// logFileSizes returns the size of each of Pebble's WAL files in dir.
func logFileSizes(t *testing.T, dir string) map[string]int64 {
	t.Helper()
	names, err := filepath.Glob(filepath.Join(dir, "*.log"))
	if err != nil {
		t.Fatal(err)
	}
	sizes := map[string]int64{}
	for _, n := range names {
		fi, err := os.Stat(n)
		if err != nil {
			t.Fatal(err)
		}
		sizes[filepath.Base(n)] = fi.Size()
	}
	return sizes
}

// frameOffsets returns where each frame of a tail log starts and where
// the last one ends (a mapped tail's file goes on with zeros).
func frameOffsets(t *testing.T, data []byte) (offs []int, end int) {
	t.Helper()
	for end < len(data) && string(data[end:end+4]) == tailMagic {
		offs = append(offs, end)
		end += tailHeaderLen + int(binary.BigEndian.Uint32(data[end+4:])) + tailCRCLen
	}
	return offs, end
}

func TestTailLogDamage(t *testing.T) {
	cases := []struct {
		name string
		// damage edits the tail log's bytes given its frames' offsets.
		damage   func(data []byte, offs []int) []byte
		wantHead uint64 // 0: Open must refuse
	}{
		{"intact", func(d []byte, _ []int) []byte { return d }, 30},
		{"last frame cut short", func(d []byte, _ []int) []byte { return d[:len(d)-7] }, 29},
		{"last frame's header cut short", func(d []byte, offs []int) []byte { return d[:offs[len(offs)-1]+10] }, 29},
		{"last frame's checksum wrong", func(d []byte, _ []int) []byte { d[len(d)-1] ^= 1; return d }, 29},
		{"empty", func([]byte, []int) []byte { return nil }, 1},
		{"middle frame's checksum wrong", func(d []byte, offs []int) []byte { d[offs[5]+tailHeaderLen] ^= 1; return d }, 0},
		{"middle frame missing", func(d []byte, offs []int) []byte { return append(d[:offs[5]:offs[5]], d[offs[6]:]...) }, 0},
		// Every frame is still there and the chain links through them:
		// nothing is lost, whatever lies between.
		{"garbage between frames", func(d []byte, offs []int) []byte {
			return append(append(d[:offs[5]:offs[5]], "junk"...), d[offs[5]:]...)
		}, 30},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := killedWithTail(t)
			path := filepath.Join(dir, tailName)
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			offs, end := frameOffsets(t, data)
			if len(offs) != 29 {
				t.Fatalf("the tail log holds %d frames, want 29", len(offs))
			}
			// The cases edit a tail as written, ending at its last frame.
			if err := os.WriteFile(path, tc.damage(data[:end], offs), 0o600); err != nil {
				t.Fatal(err)
			}
			j, err := Open(Options{Dir: dir, Durability: WAL, Logger: testLogger(t)})
			if tc.wantHead == 0 {
				if err == nil {
					_ = j.Close()
					t.Fatal("Open accepted a tail log with a gap in the records it holds")
				}
				if !errors.Is(err, errTailCorrupt) {
					t.Fatalf("Open: %v, want errTailCorrupt", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
			t.Cleanup(func() { _ = j.Close() })
			mustVerify(t, j, tc.wantHead)
		})
	}
}

// A tail log whose records the store already holds, but holds differently,
// means the store changed under the journal (or the tail is another
// journal's): Open refuses, as it does for a tail with a gap, rather than
// sign on with a chain in doubt.
func TestTailLogThatDisagreesWithTheStore(t *testing.T) {
	dir := killedWithTailOf(t, "acme")
	j := openTest(t, dir, WAL) // replays records 2-30 into Pebble
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	other, err := os.ReadFile(filepath.Join(killedWithTailOf(t, "other"), tailName))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, tailName), other, 0o600); err != nil {
		t.Fatal(err)
	}
	j, err = Open(Options{Dir: dir, Durability: WAL, Logger: testLogger(t)})
	if err == nil {
		_ = j.Close()
		t.Fatal("Open accepted a tail log whose records the store holds differently")
	}
	if !errors.Is(err, errTailCorrupt) {
		t.Fatalf("Open: %v, want errTailCorrupt", err)
	}
	if !strings.Contains(err.Error(), "audit verify") {
		t.Errorf("Open: %v; want it to say what to run", err)
	}
}

// A tail log deleted or moved behind the journal's back would take the
// records confirmed after it into a file that no restart finds. At its
// next start over the journal creates a new one at its path instead of
// going back to the start of the old one, so a kill after that loses
// nothing.
func TestTailMovedAwayIsRecreated(t *testing.T) {
	for _, move := range []struct {
		name string
		do   func(path string) error
	}{
		{"deleted", os.Remove},
		{"renamed", func(path string) error { return os.Rename(path, path+".old") }},
	} {
		t.Run(move.name, func(t *testing.T) {
			dir := t.TempDir()
			j := openTest(t, dir, WAL)
			appendN(t, j, "acme", 5)
			if err := move.do(filepath.Join(dir, tailName)); err != nil {
				t.Fatal(err)
			}
			if err := j.Put(context.Background(), "k", []byte("v")); err != nil { // a commit that starts the tail over
				t.Fatal(err)
			}
			if _, err := os.Stat(filepath.Join(dir, tailName)); err != nil {
				t.Fatalf("after the tail started over: %v", err)
			}
			walSizes := logFileSizes(t, dir)
			for i := 0; i < 3; i++ {
				if err := j.Append(context.Background(), signRecord("acme", 100+i)); err != nil {
					t.Fatal(err)
				}
			}
			// Killed with records 6-8 in the tail alone.
			killed := cutLogFiles(t, snapshotDir(t, dir, tailName+".old"), walSizes)
			if head := openHeadOf(t, killed); head != 8 {
				t.Fatalf("after a kill the head is %d, want 8", head)
			}
		})
	}
}

// tailMoves are the ways an operator or a clean-up job can take the tail
// log away from under a running journal.
var tailMoves = []struct {
	name string
	do   func(path string) error
}{
	{"deleted", os.Remove},
	{"renamed", func(path string) error { return os.Rename(path, path+".old") }},
	{"replaced", func(path string) error {
		if err := os.WriteFile(path+".new", nil, 0o600); err != nil {
			return err
		}
		return os.Rename(path+".new", path)
	}},
}

// The start over that finds the tail moved away comes after a waited
// commit (the checkpoint, every 100 ms under load; when idle, not before
// the next append); until then each group went to a file no restart
// finds, and a kill lost those still in Pebble's WAL writer's buffer,
// which it writes out only when full (32 KiB) or a commit waits. The
// applier, which runs 2 ms after a group is staged, looks at the path
// too: once it has seen the file gone, it hands Pebble the staged groups
// waiting for its WAL, and the next commit waits for it too and creates
// a new tail, so a kill after that loses nothing. No checkpoint falls due
// here: the applier must notice by itself.
func TestTailMovedAwayIsNoticedBeforeTheCheckpoint(t *testing.T) {
	for _, move := range tailMoves {
		t.Run(move.name, func(t *testing.T) {
			dir := t.TempDir()
			core, logs := observer.New(zap.WarnLevel)
			j := openTest(t, dir, WAL, func(o *Options) { o.Logger = zap.New(core) })
			appendN(t, j, "acme", 1) // the first commit checkpoints
			j.nextCheckpoint = time.Now().Add(time.Hour)
			if err := move.do(filepath.Join(dir, tailName)); err != nil {
				t.Fatal(err)
			}
			appendN(t, j, "acme", 1) // record 2, into the file moved away, staged
			for deadline := time.Now().Add(2 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
				if logs.FilterMessageSnippet("moved away").Len() > 0 {
					break
				}
			}
			// Killed now: record 2 is in Pebble's WAL file, not only in
			// its writer's buffer.
			if head := openHeadOf(t, snapshotDir(t, dir, tailName+".old")); head != 2 {
				t.Fatalf("killed once the applier had run, the head is %d, want 2", head)
			}
			appendN(t, j, "acme", 1) // record 3: waits for Pebble's WAL, and a new tail follows
			walSizes := logFileSizes(t, dir)
			appendN(t, j, "acme", 3) // records 4-6
			// Killed with Pebble's WAL as it was after record 3.
			killed := cutLogFiles(t, snapshotDir(t, dir, tailName+".old"), walSizes)
			if head := openHeadOf(t, killed); head != 6 {
				t.Fatalf("after a kill the head is %d, want 6", head)
			}
		})
	}
}

// An idle agent's records that the applier gave Pebble (NoSync) before the
// tail log was deleted: their one copy a kill leaves was the tail, since
// Pebble's WAL writer keeps them in its buffer until it fills or a commit
// waits, and an idle agent's applier would not look again before its next
// append (reported: head 1 of 2 after a kill, Verify clean, no journal.lost
// record, no warning). Once nothing more is staged, the applier has
// Pebble's WAL written shortly after its last apply, so the tail is never
// the only copy for long.
func TestIdleTailMovedAwayLosesNothing(t *testing.T) {
	for _, move := range tailMoves {
		t.Run(move.name, func(t *testing.T) {
			dir := t.TempDir()
			j := openTest(t, dir, WAL)
			appendN(t, j, "acme", 1) // the first commit checkpoints
			j.nextCheckpoint = time.Now().Add(time.Hour)
			written := j.fs.walSkipped.Load()
			appendN(t, j, "acme", 1) // record 2: in the tail, applied 2 ms later
			// Idle: no commit waits for Pebble's WAL. Give the applier
			// time to write it (2 s, as a reviewer waited, when it never
			// does).
			time.Sleep(50 * time.Millisecond)
			for deadline := time.Now().Add(2 * time.Second); j.fs.walSkipped.Load() == written && time.Now().Before(deadline); {
				time.Sleep(time.Millisecond)
			}
			if err := move.do(filepath.Join(dir, tailName)); err != nil {
				t.Fatal(err)
			}
			time.Sleep(50 * time.Millisecond)
			// Killed now, still idle.
			if head := openHeadOf(t, snapshotDir(t, dir, tailName+".old")); head != 2 {
				t.Fatalf("killed while idle after the tail log was %s, the head is %d, want 2", move.name, head)
			}
			// Once written, the WAL is left alone: an idle agent's
			// applier does not wake to write it again.
			if n := j.fs.walSkipped.Load() - written; n != 1 {
				t.Errorf("Pebble's WAL was written %d times while idle, want once", n)
			}
		})
	}
}

// When the committer finds the tail log gone, it creates a new one at the
// path, and the applier, looking meanwhile, must not take that file for
// another put there (reported: a "moved away" warning for a move that was
// none, and a waited commit for the new tail). Appends keep the applier
// looking while the tail is deleted, again and again, and a commit that
// waits for Pebble's WAL recreates it each time. The applier may find a
// deletion first (nothing at the path), never another file: no one else
// puts one there.
func TestApplierTakesNoNewTailForAMove(t *testing.T) {
	dir := t.TempDir()
	core, logs := observer.New(zap.WarnLevel)
	j := openTest(t, dir, WAL, func(o *Options) { o.Logger = zap.New(core) })
	appendN(t, j, "acme", 1)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ctx.Err() == nil; i++ {
			_ = j.Append(ctx, signRecord("acme", i))
		}
	}()
	const rounds = 100
	for i := 0; i < rounds; i++ {
		if err := os.Remove(filepath.Join(dir, tailName)); err != nil {
			t.Fatal(err)
		}
		if err := j.Put(context.Background(), "k", []byte{byte(i)}); err != nil { // waits, and recreates the tail
			t.Fatal(err)
		}
	}
	cancel()
	<-done
	if n := logs.FilterMessageSnippet("recreating it").Len(); n != rounds {
		t.Errorf("the committer recreated the tail %d times, want %d", n, rounds)
	}
	if n := logs.FilterMessageSnippet("moved away").FilterField(zap.String("at_its_path", "another file")).Len(); n > 0 {
		t.Errorf("the applier took the committer's new tail log for another file %d times in %d rounds", n, rounds)
	}
	verifyOK(t, j)
}

// A mapped tail starts over in place: the frames written since lie before
// older ones, which Pebble's WAL already has. Open takes the new run and
// stops where it ends.
func TestMappedTailStartsOverInPlace(t *testing.T) {
	dir := t.TempDir()
	j := openTest(t, dir, WAL)
	if j.tail.mapped == nil {
		t.Fatal("the tail log on the OS filesystem is not mapped")
	}
	appendN(t, j, "acme", 30)
	if err := j.Put(context.Background(), "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 3; i++ {
		if err := j.Append(context.Background(), signRecord("acme", 100+i)); err != nil {
			t.Fatal(err)
		}
	}
	killed := snapshotDir(t, dir)
	data, err := os.ReadFile(filepath.Join(killed, tailName))
	if err != nil {
		t.Fatal(err)
	}
	frames, complete := scanFrames(data)
	ok := complete && len(frames) > 3
	for i := 0; ok && i < 3; i++ { // the three new frames first, chained from 31
		ok = frames[i].firstSeq == uint64(31+i) && (i == 0 || frames[i].prev == frames[i-1].last)
	}
	if !ok || frames[3].lastSeq > 30 {
		t.Fatalf("after starting over: frames %v; want 3 new frames (31-33) before older ones", frameSeqs(frames))
	}
	j2 := openTest(t, killed, WAL)
	mustVerify(t, j2, 33)
	if v, err := j2.Get("k"); err != nil || string(v) != "v" {
		t.Fatalf("state after Open: %q, %v", v, err)
	}
}

// frameSeqs lists frames' seq ranges, for failure messages.
func frameSeqs(frames []tailFrame) [][2]uint64 {
	out := make([][2]uint64, len(frames))
	for i, fr := range frames {
		out[i] = [2]uint64{fr.firstSeq, fr.lastSeq}
	}
	return out
}

// A group that does not fit in the mapped tail waits for Pebble's WAL
// instead, and the tail starts over after it.
func TestMappedTailFull(t *testing.T) {
	dir := t.TempDir()
	j := openTest(t, dir, WAL)
	appendN(t, j, "acme", 3)
	j.tail.size = int64(len(j.tail.mapped)) - 50 // as if it had filled up
	if err := j.Append(context.Background(), signRecord("acme", 4)); err != nil {
		t.Fatal(err)
	}
	if j.tail.size != 0 {
		t.Fatalf("tail log holds %d bytes after a full tail's commit, want 0", j.tail.size)
	}
	appendN(t, j, "acme", 2)
	if head := openHeadOf(t, dir); head != 6 {
		t.Fatalf("head after a kill: %d, want 6", head)
	}
}

// The mapped tail truncated behind the journal's back: the append faults
// (SIGBUS). The agent must not die of it; the commit fails, the journal
// reopens, and the next append goes through. The records confirmed before
// survive, whether Pebble already had them or they were still staged (the
// truncated tail then no longer has them, and Pebble gets them before the
// reopen).
func TestMappedTailTruncated(t *testing.T) {
	for _, staged := range []bool{false, true} {
		t.Run(map[bool]string{false: "applied", true: "staged"}[staged], func(t *testing.T) {
			dir := t.TempDir()
			var j *Journal
			if staged {
				j = openStaged(t, dir)
			} else {
				j = openTest(t, dir, WAL)
			}
			appendN(t, j, "acme", 3)
			if !staged {
				if _, err := j.Last(context.Background(), 1, ""); err != nil { // applies them
					t.Fatal(err)
				}
			} else if inPebble(t, j, 3) {
				t.Fatal("record 3 is in Pebble: the case shows nothing")
			}
			if err := os.Truncate(filepath.Join(dir, tailName), 0); err != nil {
				t.Fatal(err)
			}
			err := j.Append(context.Background(), signRecord("acme", 4))
			if !errors.Is(err, ErrUnavailable) {
				t.Fatalf("Append over a truncated tail: %v, want ErrUnavailable", err)
			}
			if err := j.Append(context.Background(), signRecord("acme", 5)); err != nil {
				t.Fatalf("Append after the journal reopened: %v", err)
			}
			mustVerify(t, j, 4)
		})
	}
}

// tailCreateFault fails creating the tail log while on: a disk that takes
// writes to open files but no new file.
type tailCreateFault struct{ on atomic.Bool }

func (f *tailCreateFault) MaybeError(op errorfs.Op) error {
	if f.on.Load() && op.Kind == errorfs.OpCreate && strings.HasSuffix(op.Path, tailName) {
		return syscall.EIO
	}
	return nil
}

func (f *tailCreateFault) String() string { return "tailCreateFault" }

// A written tail that cannot start over after a commit that waited for
// Pebble's WAL (here a record with a state change) takes no more frames:
// one appended after the gap that commit left would not continue the
// frames' chain, and Open would refuse the directory a kill left. Commits
// wait for Pebble's WAL until the tail starts over, and then use it again.
func TestTailLogThatCannotStartOver(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	fault := &tailCreateFault{}
	j := openTest(t, dir, WAL, func(o *Options) { o.FS = errorfs.Wrap(vfs.Default, fault) })
	j.nextCheckpoint = time.Now().Add(time.Hour) // no checkpoint empties the tail by itself
	appendN(t, j, "acme", 5)
	if j.tail.mapped != nil || j.tail.size == 0 {
		t.Fatal("the records did not go through a written tail log")
	}
	fault.on.Store(true)
	if err := j.AppendWithState(ctx, signRecord("acme", 5), StateChange{Key: "k", Value: []byte("v")}); err != nil {
		t.Fatal(err)
	}
	if !j.tail.stale {
		t.Fatal("the tail log could not start over, yet it is not marked stale")
	}
	size := j.tail.size
	appendN(t, j, "acme", 4) // seqs 7-10, past the gap record 6 left in the tail
	if j.tail.size != size {
		t.Fatalf("a stale tail log took frames: %d bytes, was %d", j.tail.size, size)
	}
	// As a kill leaves the directory now: Open replays nothing new and
	// finds all ten records.
	killed := openTest(t, snapshotDir(t, dir), WAL)
	mustVerify(t, killed, 10)

	fault.on.Store(false)
	appendN(t, j, "acme", 2) // the first waits and starts the tail over; the second goes through it
	if j.tail.stale || j.tail.size == 0 {
		t.Fatalf("tail log stale %v, %d bytes: not back in use", j.tail.stale, j.tail.size)
	}
	mustVerify(t, j, 12)
}

// A kill right after a prune: the tail log may still hold frames of
// records the prune deleted. They are gone on purpose, and reopening must
// not report them as records the store lacks.
func TestReopenAfterPruneIsQuiet(t *testing.T) {
	j, dir, t0 := pruneFixture(t, 30)
	mustPrune(t, j, recordAt(t0, 21)) // records 1..20
	core, logs := observer.New(zap.WarnLevel)
	killed := snapshotDir(t, dir)
	j2 := openTest(t, killed, WAL, func(o *Options) { o.Logger = zap.New(core) })
	verifyOK(t, j2)
	for _, e := range logs.All() {
		t.Errorf("reopening after a prune logged %s %q %v", e.Level, e.Message, e.ContextMap())
	}
}
