package journal

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"
)

// walFault injects errors through pebble's errorfs into operations on
// Pebble's WAL files (*.log), the journal's tail log and its recovery
// probe file: a
// disk that fails new writes, as far as the commit path can see. Faults
// stay off the MANIFEST and sstables: a failed MANIFEST write makes Pebble
// call Fatalf on a background goroutine, which ends the process by design
// (see doc.go, "Failures").
type walFault struct {
	on       atomic.Bool
	oneShot  atomic.Bool // turn off after the first injected error
	kinds    map[errorfs.OpKind]bool
	err      error
	injected atomic.Int64
	// pebbleOnly spares the tail log: Pebble's own WAL writes fail while
	// the journal's frames still reach the disk.
	pebbleOnly bool
}

func (f *walFault) MaybeError(op errorfs.Op) error {
	if !f.on.Load() || !f.kinds[op.Kind] ||
		!strings.HasSuffix(op.Path, ".log") && !strings.HasSuffix(op.Path, probeName) &&
			(f.pebbleOnly || !strings.HasSuffix(op.Path, tailName)) {
		return nil
	}
	if f.oneShot.Load() {
		f.on.Store(false)
	}
	f.injected.Add(1)
	return f.err
}

func (f *walFault) String() string { return "walFault" }

// Creating a new WAL fails too while the fault is on, as it would on a
// full disk, so reopening Pebble fails until the fault clears.
var walCreate = []errorfs.OpKind{errorfs.OpCreate, errorfs.OpReuseForWrite}

func newWALFault(err error, kinds ...errorfs.OpKind) *walFault {
	f := &walFault{kinds: map[errorfs.OpKind]bool{}, err: err}
	for _, k := range kinds {
		f.kinds[k] = true
	}
	return f
}

// appendEventually retries Append until it succeeds, as the agent's
// next signing requests would after a fault clears.
func appendEventually(t *testing.T, j *Journal, r *Record) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		rc := *r
		err := j.Append(context.Background(), &rc)
		if err == nil {
			*r = rc
			return
		}
		if !errors.Is(err, ErrUnavailable) || time.Now().After(deadline) {
			t.Fatalf("Append after the fault cleared: %v", err)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// What Pebble does (v2.1.7), as these cases show: a failed WAL write or
// sync reaches the committer as Logger.Fatalf("pebble: fatal commit
// error"); that DB never accepts another write (its log writer keeps the
// error), and its memtable holds the failed batch. The journal recovers
// the Fatalf panic, closes that DB (Close returns the same error but does
// not hang) and opens a fresh one, which replays whatever reached the WAL
// file.
func TestWriteFaults(t *testing.T) {
	cases := []struct {
		name  string
		mode  Durability
		fault *walFault
		// failedAppendPersists: the failed commit's bytes reached the file
		// (write succeeded, fsync failed), so after recovery the record is
		// there, followed by a journal.recovered note.
		failedAppendPersists bool
		// transient: one injected error, then the disk is fine again.
		transient bool
		// noEffect: the fault hits an operation the mode never performs.
		noEffect bool
	}{
		{name: "wal/write ENOSPC", mode: WAL,
			fault: newWALFault(syscall.ENOSPC, append(walCreate, errorfs.OpFileWrite)...)},
		{name: "fsync/write ENOSPC", mode: Fsync,
			fault: newWALFault(syscall.ENOSPC, append(walCreate, errorfs.OpFileWrite)...)},
		{name: "fsync/sync EIO", mode: Fsync, failedAppendPersists: true,
			fault: newWALFault(syscall.EIO, append(walCreate, errorfs.OpFileSync, errorfs.OpFileSyncData)...)},
		{name: "wal/one failed write", mode: WAL, transient: true,
			fault: newWALFault(syscall.EIO, errorfs.OpFileWrite)},
		{name: "wal/sync EIO never hit", mode: WAL, noEffect: true,
			fault: newWALFault(syscall.EIO, errorfs.OpFileSync, errorfs.OpFileSyncData)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			fs := errorfs.Wrap(vfs.Default, tc.fault)
			j := openTest(t, t.TempDir(), tc.mode, func(o *Options) {
				o.FS = fs
				o.RecoveryInterval = time.Millisecond
			})
			appendN(t, j, "before", 5)
			_, headBefore := j.Head()

			tc.fault.oneShot.Store(tc.transient)
			tc.fault.on.Store(true)
			err := j.Append(ctx, signRecord("during", 0))
			if tc.noEffect {
				if err != nil {
					t.Fatalf("Append: %v", err)
				}
				tc.fault.on.Store(false)
				mustVerify(t, j, 6)
				return
			}
			if !errors.Is(err, ErrUnavailable) {
				t.Fatalf("Append during the fault: %v, want ErrUnavailable", err)
			}
			if seq, h := j.Head(); seq != 5 || h != headBefore {
				t.Fatalf("head moved to %d on a failed commit", seq)
			}
			if !tc.transient {
				// Still failing: fast refusals, and nothing readable that
				// could be half-written.
				for i := 0; i < 3; i++ {
					if err := j.Append(ctx, signRecord("during", i)); !errors.Is(err, ErrUnavailable) {
						t.Fatalf("Append %d while the fault is on: %v", i, err)
					}
					time.Sleep(2 * time.Millisecond) // let a reopen be tried and fail
				}
				if _, err := j.Verify(ctx); err != nil && !errors.Is(err, ErrUnavailable) {
					t.Fatalf("Verify while unavailable: %v", err)
				}
				tc.fault.on.Store(false)
			}

			after := signRecord("after", 0)
			appendEventually(t, j, after)
			wantAfter := uint64(6)
			if tc.failedAppendPersists {
				wantAfter = 8 // 6: the unconfirmed record, 7: the note
			}
			if after.Seq != wantAfter {
				t.Fatalf("first record after recovery has seq %d, want %d", after.Seq, wantAfter)
			}
			rep := mustVerify(t, j, wantAfter)
			var tenants []string
			if err := j.Scan(ctx, Filter{FromSeq: 6}, func(r *Record) error {
				tenants = append(tenants, r.Tenant+"/"+r.Op)
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			want := "[after/sign]"
			if tc.failedAppendPersists {
				want = "[during/sign /journal.recovered after/sign]"
			}
			if fmt.Sprint(tenants) != want {
				t.Fatalf("records from seq 6: %v, want %v", tenants, want)
			}
			st := j.Stats()
			if st.Failures != 1 || st.Recoveries < 1 {
				t.Fatalf("stats %+v: want one failure and a recovery", st)
			}
			t.Logf("head %d, stats %+v, injected %d", rep.LastSeq, st, tc.fault.injected.Load())
		})
	}
}

// Appenders keep going while faults come and go. Every Append that
// returned nil has its record, byte for byte, in a chain that verifies.
// The volume stays under Pebble's first memtable (256 KiB) so that no WAL
// rotation meets a fault: that case ends the process and has its own test
// (TestFaultDuringWALRotationAbortsProcess).
func TestWriteFaultsUnderLoad(t *testing.T) {
	const goroutines, perGoroutine = 3, 120
	for _, mode := range []Durability{WAL, Fsync} {
		t.Run(mode.String(), func(t *testing.T) {
			fault := newWALFault(syscall.ENOSPC, append(walCreate, errorfs.OpFileWrite, errorfs.OpFileSync, errorfs.OpFileSyncData)...)
			j := openTest(t, t.TempDir(), mode, func(o *Options) {
				o.FS = errorfs.Wrap(vfs.Default, fault)
				o.RecoveryInterval = time.Millisecond
			})
			var (
				mu        sync.Mutex
				confirmed = map[uint64][32]byte{}
				refused   atomic.Int64
				wg        sync.WaitGroup
			)
			for g := 0; g < goroutines; g++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; i < perGoroutine; i++ {
						r := signRecord(fmt.Sprintf("t%d", g), i)
						err := j.Append(context.Background(), r)
						switch {
						case err == nil:
							mu.Lock()
							confirmed[r.Seq] = r.Hash
							mu.Unlock()
						case errors.Is(err, ErrUnavailable):
							refused.Add(1)
						default:
							t.Errorf("Append: %v", err)
							return
						}
						time.Sleep(time.Millisecond)
					}
				}()
			}
			done := make(chan struct{})
			go func() { wg.Wait(); close(done) }()
		cycles:
			for {
				select {
				case <-done:
					break cycles
				case <-time.After(15 * time.Millisecond):
				}
				// Fault only a journal that is committing, never one in the
				// middle of reopening Pebble: that race is the probe's
				// residual window (doc.go) and would end the test process.
				for !j.available() {
					select {
					case <-done:
						break cycles
					case <-time.After(time.Millisecond):
					}
				}
				fault.on.Store(true)
				time.Sleep(10 * time.Millisecond)
				fault.on.Store(false)
			}

			appendEventually(t, j, signRecord("final", 0))
			head, _ := j.Head()
			mustVerify(t, j, head)
			found := 0
			if err := j.Scan(context.Background(), Filter{}, func(r *Record) error {
				if h, ok := confirmed[r.Seq]; ok {
					if h != r.Hash {
						return fmt.Errorf("seq %d: stored hash differs from the one Append returned", r.Seq)
					}
					found++
				}
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			if found != len(confirmed) {
				t.Fatalf("%d of %d confirmed records found", found, len(confirmed))
			}
			if refused.Load() == 0 || j.Stats().Failures == 0 {
				t.Fatalf("no append was refused (%d) or no commit failed: the fault never hit", refused.Load())
			}
			t.Logf("confirmed %d, refused %d, head %d, stats %+v", len(confirmed), refused.Load(), head, j.Stats())
		})
	}
}

// spaceFS reports a settable amount of free space.
type spaceFS struct {
	vfs.FS
	avail  atomic.Uint64
	checks atomic.Int64 // GetDiskUsage calls
}

func (fs *spaceFS) GetDiskUsage(string) (vfs.DiskUsage, error) {
	fs.checks.Add(1)
	a := fs.avail.Load()
	return vfs.DiskUsage{AvailBytes: a, TotalBytes: 100 << 30, UsedBytes: 100<<30 - a}, nil
}

// Below the free-space reserve the journal refuses appends itself, so
// Pebble never meets ENOSPC; with room again the next append goes through.
func TestJournalFullRefusesBeforePebbleFails(t *testing.T) {
	fs := &spaceFS{FS: vfs.Default}
	fs.avail.Store(10 << 30)
	j := openTest(t, t.TempDir(), Fsync, func(o *Options) { o.FS = fs })
	ctx := context.Background()
	steps := []struct {
		free uint64
		ok   bool
	}{
		{10 << 30, true},
		{63 << 20, false}, // under the 64 MiB default reserve
		{1 << 20, false},
		{65 << 20, true},
		{10 << 30, true},
	}
	want := uint64(0)
	for i, s := range steps {
		fs.avail.Store(s.free)
		if i == 1 {
			// Outside the full state the check runs every 100ms.
			time.Sleep(spaceCheckInterval + 10*time.Millisecond)
		}
		err := j.Append(ctx, signRecord("acme", i))
		if s.ok != (err == nil) {
			t.Fatalf("step %d (%d bytes free): Append = %v", i, s.free, err)
		}
		if err != nil && (!errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "journal full")) {
			t.Fatalf("step %d: %v, want a journal-full ErrUnavailable", i, err)
		}
		if herr := j.Healthy(ctx); (herr == nil) != s.ok || (herr != nil && !strings.Contains(herr.Error(), "journal full")) {
			t.Fatalf("step %d: Healthy = %v after Append = %v", i, herr, err)
		}
		if s.ok {
			want++
		}
		if seq, _ := j.Head(); seq != want {
			t.Fatalf("step %d: head %d, want %d", i, seq, want)
		}
	}
	mustVerify(t, j, want)
	if st := j.Stats(); st.Failures != 0 || st.Full != 2 {
		t.Fatalf("stats %+v: want no Pebble failure and two refusals", st)
	}
}

// Healthy notices freed space by itself: while the journal is full it
// probes with an empty commit, whose free-space check is the only thing
// that clears "journal full", and a not-ready agent gets no appends to
// commit. The probe runs at most once per RecoveryInterval.
func TestHealthyNoticesFreedSpace(t *testing.T) {
	for _, mode := range []Durability{WAL, Fsync} {
		t.Run(mode.String(), func(t *testing.T) {
			ctx := context.Background()
			fs := &spaceFS{FS: vfs.Default}
			fs.avail.Store(10 << 30)
			const interval = 200 * time.Millisecond
			j := openTest(t, t.TempDir(), mode, func(o *Options) {
				o.FS = fs
				o.RecoveryInterval = interval
			})
			appendN(t, j, "before", 2)
			fs.avail.Store(1 << 20)
			time.Sleep(spaceCheckInterval + 10*time.Millisecond) // outside the full state the check runs every 100ms
			if err := j.Append(ctx, signRecord("full", 0)); err == nil {
				t.Fatal("Append on a full disk succeeded")
			}
			// Still full: readiness checks in a burst probe at most once.
			checks := fs.checks.Load()
			start := time.Now()
			for i := 0; i < 20; i++ {
				if err := j.Healthy(ctx); !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "journal full") {
					t.Fatalf("Healthy on a full disk: %v", err)
				}
			}
			if probes := fs.checks.Load() - checks; probes > 1 && time.Since(start) < interval {
				t.Fatalf("%d free-space probes within one RecoveryInterval", probes)
			}
			if st := j.Stats(); st.Full != 1 {
				t.Fatalf("stats %+v: want one refused append; probes are not refusals", st)
			}

			fs.avail.Store(10 << 30) // an operator freed space; no append comes
			deadline := time.Now().Add(5 * time.Second)
			for j.Healthy(ctx) != nil {
				if time.Now().After(deadline) {
					t.Fatal("Healthy still reports the journal full after space was freed")
				}
				time.Sleep(5 * time.Millisecond)
			}
			appendN(t, j, "after", 1)
			mustVerify(t, j, 3)
		})
	}
}

// A clock stepped back while the journal is full does not stop Healthy's
// probe: it used to stamp the next probe on the wall clock, so a probe
// made with the clock an hour ahead held the next one off for an hour,
// and an agent whose disk an operator freed stayed not ready, getting no
// appends to notice it by, for as long as the step. The wall clock cannot
// be stepped in a test, and the old code read it, not Options.Clock, so
// this test passes on it too: it pins that the probe stays off the
// journal's clock (the wall time records are stamped with), which the
// journal's other timings follow.
func TestHealthyProbesAfterAClockStepBack(t *testing.T) {
	ctx := context.Background()
	fs := &spaceFS{FS: vfs.Default}
	fs.avail.Store(10 << 30)
	var ahead atomic.Int64 // how far the journal's clock is ahead, ns
	j := openTest(t, t.TempDir(), WAL, func(o *Options) {
		o.FS = fs
		o.RecoveryInterval = 50 * time.Millisecond
		o.Clock = func() time.Time { return time.Now().Add(time.Duration(ahead.Load())).Round(0) }
	})
	appendN(t, j, "before", 1)
	fs.avail.Store(1 << 20)
	time.Sleep(spaceCheckInterval + 10*time.Millisecond)
	if err := j.Append(ctx, signRecord("full", 0)); err == nil {
		t.Fatal("Append on a full disk succeeded")
	}
	ahead.Store(int64(time.Hour))
	if err := j.Healthy(ctx); err == nil { // probes, with the clock an hour ahead
		t.Fatal("Healthy on a full disk")
	}
	ahead.Store(0) // stepped back
	fs.avail.Store(10 << 30)
	deadline := time.Now().Add(5 * time.Second)
	for j.Healthy(ctx) != nil {
		if time.Now().After(deadline) {
			t.Fatal("Healthy still reports the journal full after space was freed and the clock stepped back")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Healthy follows a write fault: unavailable while the disk fails, and it
// reopens Pebble by itself once the fault clears, with no append to push it
// (a not-ready agent gets none).
func TestHealthyFollowsWriteFaults(t *testing.T) {
	ctx := context.Background()
	fault := newWALFault(syscall.EIO, append(walCreate, errorfs.OpFileWrite)...)
	j := openTest(t, t.TempDir(), WAL, func(o *Options) {
		o.FS = errorfs.Wrap(vfs.Default, fault)
		o.RecoveryInterval = time.Millisecond
	})
	appendN(t, j, "before", 3)
	if err := j.Healthy(ctx); err != nil {
		t.Fatalf("Healthy before the fault: %v", err)
	}
	fault.on.Store(true)
	if err := j.Append(ctx, signRecord("during", 0)); err == nil {
		t.Fatal("Append with the disk failing: want an error")
	}
	for i := 0; i < 3; i++ {
		time.Sleep(2 * time.Millisecond)
		if err := j.Healthy(ctx); !errors.Is(err, ErrUnavailable) {
			t.Fatalf("Healthy with the disk failing: %v, want ErrUnavailable", err)
		}
	}
	fault.on.Store(false)
	deadline := time.Now().Add(5 * time.Second)
	for j.Healthy(ctx) != nil {
		if time.Now().After(deadline) {
			t.Fatal("Healthy did not recover after the fault cleared")
		}
		time.Sleep(2 * time.Millisecond)
	}
	if !j.available() {
		t.Fatal("Healthy is nil but Pebble is not open")
	}
	appendN(t, j, "after", 2)
	mustVerify(t, j, 5)
}

// openPebbleWALFault opens a `wal` journal whose Pebble WAL writes fail
// (EIO) while the fault is on; the tail log's writes go through.
func openPebbleWALFault(t *testing.T, opts ...func(*Options)) (*Journal, *walFault) {
	t.Helper()
	fault := newWALFault(syscall.EIO, errorfs.OpFileWrite)
	fault.pebbleOnly = true
	j := openTest(t, t.TempDir(), WAL, append([]func(*Options){func(o *Options) {
		o.FS = errorfs.Wrap(vfs.Default, fault)
		o.RecoveryInterval = time.Millisecond
	}}, opts...)...)
	return j, fault
}

// In `wal` mode an Append returns once its tail log frame is written, so a
// failure of Pebble's own WAL write, which happens later on Pebble's
// goroutine, loses nothing. Pebble reports it to the next commit that waits
// for the WAL (a state write here), or, once its 32 KiB WAL block has
// filled, to the next commit of any kind; the journal reopens Pebble, and
// the tail puts back what Pebble's WAL lacked.
func TestPebbleWALFailureAfterTheTailWasWritten(t *testing.T) {
	for _, waited := range []bool{true, false} {
		name := map[bool]string{true: "reported to a waited commit", false: "reported when a block fills"}[waited]
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			j, fault := openPebbleWALFault(t)
			appendN(t, j, "before", 3)
			fault.on.Store(true)
			confirmed := map[uint64][32]byte{}
			for i := 0; i < 2000; i++ {
				if waited && i == 5 {
					if err := j.Put(ctx, "k", []byte("v")); !errors.Is(err, ErrUnavailable) {
						t.Fatalf("Put while Pebble's WAL fails: %v, want ErrUnavailable", err)
					}
					break
				}
				if i == 512 && !waited {
					// Pebble's WAL writer flushes on a goroutine of its
					// own, and on a busy machine it may not have run yet.
					// Let it meet the fault before more records go to the
					// memtable: a memtable rotation onto a WAL whose
					// pending writes then fail aborts the process (doc.go,
					// "Failures"), which a loop this fast reached about
					// once in thirty runs. 512 records stay well below the
					// first memtable's 256 KiB.
					waitFor(t, func() bool { return fault.injected.Load() > 0 })
				}
				r := signRecord("during", i)
				err := j.Append(ctx, r)
				if errors.Is(err, ErrUnavailable) && !waited {
					break
				}
				if err != nil {
					t.Fatalf("Append %d while only Pebble's WAL fails: %v", i, err)
				}
				confirmed[r.Seq] = r.Hash
			}
			if fault.injected.Load() == 0 || j.Stats().Failures != 1 {
				t.Fatalf("the fault never hit or was not reported (stats %+v)", j.Stats())
			}
			fault.on.Store(false)
			after := signRecord("after", 0)
			appendEventually(t, j, after)
			mustVerify(t, j, after.Seq)
			if err := j.Scan(ctx, Filter{FromSeq: 4}, func(r *Record) error {
				if _, ok := confirmed[r.Seq]; !ok {
					return nil
				}
				if confirmed[r.Seq] != r.Hash {
					return fmt.Errorf("seq %d (%s) is not the record confirmed during the fault", r.Seq, r.Tenant)
				}
				delete(confirmed, r.Seq)
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			if len(confirmed) != 0 {
				t.Fatalf("%d records confirmed during the fault are missing", len(confirmed))
			}
			t.Logf("head %d, stats %+v", after.Seq, j.Stats())
		})
	}
}

// waitFor polls cond until it holds, failing the test after 10 s.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 10s")
		}
		time.Sleep(time.Millisecond)
	}
}

// After Pebble's own WAL writer has failed in the background (an idle agent:
// no commit has met the error yet), Healthy does not report ready: it
// recovers Pebble, once the disk is fine again, and the next append goes
// through. It used to report ready and leave the next signer refused.
func TestHealthyNoticesAFailedPebbleWAL(t *testing.T) {
	ctx := context.Background()
	j, fault := openPebbleWALFault(t)
	j.nextCheckpoint = time.Now().Add(time.Hour)
	appendN(t, j, "acme", 3)
	fault.on.Store(true)
	for i := range 150 { // past 32 KiB: Pebble's writer writes a block, and fails
		_ = j.Append(ctx, signRecord("acme", i)) // a late one may meet the failure: refused, as it must be
	}
	if _, err := j.Last(context.Background(), 1, ""); err != nil { // apply what is staged
		t.Logf("Last: %v", err)
	}
	for deadline := time.Now().Add(5 * time.Second); !j.fs.walFailed.Load(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("Pebble's WAL write never failed")
		}
	}
	fault.on.Store(false)
	time.Sleep(5 * time.Millisecond)
	if err := j.Healthy(ctx); err != nil {
		t.Logf("Healthy while recovering: %v", err) // a first probe may still report the fault
	}
	for deadline := time.Now().Add(5 * time.Second); j.Healthy(ctx) != nil; time.Sleep(2 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("Healthy did not recover after the fault cleared")
		}
	}
	if err := j.Append(ctx, signRecord("acme", 999)); err != nil {
		t.Fatalf("Healthy reported ready, then Append: %v", err)
	}
	verifyOK(t, j)
}

// While Pebble reports a write stall (its flushes failing, say), appends
// wait out their deadlines: Healthy does not report ready meanwhile.
func TestHealthyDuringAWriteStall(t *testing.T) {
	ctx := context.Background()
	j := openTest(t, t.TempDir(), WAL)
	appendN(t, j, "acme", 2)
	j.stalled.Store(true) // as Pebble's WriteStallBegin event sets it
	if err := j.Healthy(ctx); !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "stall") {
		t.Fatalf("Healthy during a write stall: %v, want ErrUnavailable", err)
	}
	j.stalled.Store(false) // WriteStallEnd
	if err := j.Healthy(ctx); err != nil {
		t.Fatalf("Healthy after the stall: %v", err)
	}
}
