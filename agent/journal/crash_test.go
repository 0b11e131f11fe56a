package journal

import (
	"bufio"
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs"
	"github.com/cockroachdb/pebble/v2/vfs/errorfs"
	"go.uber.org/zap"
)

// childEnv makes the test binary act as an appending child process; its
// value is "MODE DIR [rotation-fault]".
const childEnv = "SIGIL_JOURNAL_TEST_CHILD"

// runChild appends from 4 goroutines until killed (or 60s pass), writing
// "seq hash" to stdout after each Append returns. Each line is one
// unbuffered write, so every line the parent reads was written after the
// journal confirmed that record.
func runChild(spec string) {
	f := strings.Fields(spec)
	mode, err := ParseDurability(f[0])
	if err != nil {
		panic(err)
	}
	opts := Options{Dir: f[1], Durability: mode, Logger: zap.NewNop()}
	fault := newWALFault(syscall.EIO, walCreate...)
	if len(f) > 2 && f[2] == "rotation-fault" {
		opts.FS = errorfs.Wrap(vfs.Default, fault)
	}
	j, err := Open(opts)
	if err != nil {
		panic(err)
	}
	// From now on creating a WAL fails: the first WAL rotation (when the
	// first 256 KiB memtable fills) meets the fault.
	fault.on.Store(true)
	var mu sync.Mutex
	deadline := time.Now().Add(60 * time.Second)
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; time.Now().Before(deadline); i++ {
				r := signRecord(fmt.Sprintf("child-%d", g), i)
				if err := j.Append(context.Background(), r); err != nil {
					fmt.Fprintf(os.Stderr, "append: %v\n", err)
					continue
				}
				line := fmt.Sprintf("%d %x\n", r.Seq, r.Hash)
				mu.Lock()
				_, _ = os.Stdout.WriteString(line)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	os.Exit(3) // never reached in the tests: the parent kills it first
}

// startChild re-executes the test binary as an appending child.
func startChild(t *testing.T, spec string) (*exec.Cmd, io.Reader, *strings.Builder) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestChildEntryPoint$", "-test.count=1")
	cmd.Env = append(os.Environ(), childEnv+"="+spec)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr := &strings.Builder{}
	cmd.Stderr = &lockedWriter{w: stderr}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	return cmd, stdout, stderr
}

type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// TestChildEntryPoint is the child's body; run normally it does nothing.
func TestChildEntryPoint(t *testing.T) {
	if spec := os.Getenv(childEnv); spec != "" {
		runChild(spec)
	}
}

// readConfirmed collects the child's "seq hash" lines until EOF, calling
// onLine after each.
func readConfirmed(t *testing.T, r io.Reader, onLine func(n int)) map[uint64][32]byte {
	t.Helper()
	confirmed := map[uint64][32]byte{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 2 {
			continue // the test framework's own output
		}
		seq, err1 := strconv.ParseUint(f[0], 10, 64)
		h, err2 := hex.DecodeString(f[1])
		if err1 != nil || err2 != nil || len(h) != 32 {
			continue
		}
		confirmed[seq] = [32]byte(h)
		onLine(len(confirmed))
	}
	return confirmed
}

// checkSurvivors reopens the journal and requires every confirmed record,
// with the hash the child was given, and an intact chain.
func checkSurvivors(t *testing.T, dir string, confirmed map[uint64][32]byte) {
	t.Helper()
	j := openTest(t, dir, WAL)
	head, _ := j.Head()
	rep := mustVerify(t, j, head)
	found := 0
	if err := j.Scan(context.Background(), Filter{}, func(r *Record) error {
		if h, ok := confirmed[r.Seq]; ok {
			if h != r.Hash {
				return fmt.Errorf("seq %d: hash differs from the one the child was given", r.Seq)
			}
			found++
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if found != len(confirmed) {
		t.Fatalf("%d of %d records confirmed to the killed child are in the journal", found, len(confirmed))
	}
	t.Logf("child confirmed %d records; journal has %d, head %d, chain intact", len(confirmed), rep.Records, head)
}

// A SIGKILLed process loses no record whose Append had returned, in
// either mode, and the chain it leaves verifies. This is the journal half
// of the agent's crash test.
func TestKilledProcessKeepsConfirmedRecords(t *testing.T) {
	cases := []struct {
		mode   Durability
		killAt int // confirmed records seen before the kill
	}{
		{WAL, 3000},
		{Fsync, 300},
	}
	for _, tc := range cases {
		t.Run(tc.mode.String(), func(t *testing.T) {
			dir := t.TempDir()
			cmd, stdout, stderr := startChild(t, tc.mode.String()+" "+dir)
			var killed atomic.Bool
			kill := func() {
				if killed.CompareAndSwap(false, true) {
					_ = cmd.Process.Signal(syscall.SIGKILL)
				}
			}
			timer := time.AfterFunc(60*time.Second, kill)
			defer timer.Stop()
			confirmed := readConfirmed(t, stdout, func(n int) {
				if n >= tc.killAt {
					kill() // mid-stream: the child is appending flat out
				}
			})
			err := cmd.Wait()
			if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
				t.Fatalf("child ended with %v, not by SIGKILL; stderr:\n%s", err, stderr)
			}
			if len(confirmed) < tc.killAt {
				t.Fatalf("child confirmed only %d records; stderr:\n%s", len(confirmed), stderr)
			}
			checkSurvivors(t, dir, confirmed)
		})
	}
}

// What Pebble does when a write fault hits a WAL rotation (the memtable
// filled and Pebble switches to a new WAL file): rotateWAL panics with
// DB.mu released, the deferred unlock then fails, and the Go runtime
// aborts the process ("fatal error: sync: unlock of unlocked mutex"). No
// recover can catch that. This test shows the journal survives it like a
// SIGKILL: every confirmed record is there and the chain verifies.
func TestFaultDuringWALRotationAbortsProcess(t *testing.T) {
	dir := t.TempDir()
	cmd, stdout, stderr := startChild(t, "wal "+dir+" rotation-fault")
	timer := time.AfterFunc(60*time.Second, func() { _ = cmd.Process.Kill() })
	defer timer.Stop()
	confirmed := readConfirmed(t, stdout, func(int) {})
	err := cmd.Wait()
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || ws.Signaled() || ws.ExitStatus() != 2 {
		t.Fatalf("child ended with %v, want the runtime's exit status 2; stderr:\n%s", err, stderr)
	}
	if !strings.Contains(stderr.String(), "fatal error: sync: unlock of unlocked mutex") {
		t.Fatalf("child died differently; stderr:\n%s", stderr)
	}
	if len(confirmed) == 0 {
		t.Fatal("child confirmed no records before the rotation")
	}
	checkSurvivors(t, dir, confirmed)
}
