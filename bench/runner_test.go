package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// countingScenario wraps a per-worker op factory and counts opens and closes,
// so a test can see that every worker opened was closed.
type countingScenario struct {
	opens, closes atomic.Int64
	failAt        int64 // NewWorker fails for the failAt-th worker of a measurement (1-based); 0 never
}

func (c *countingScenario) scenario(name string, newOp func() func(context.Context) error) Scenario {
	return Scenario{
		Name: name,
		Key:  "k",
		NewWorker: func(ctx context.Context) (func(context.Context) error, func() error, error) {
			// Run opens a measurement's workers one after another, and closes
			// them all before the next: open-closed is the index of this one.
			if c.failAt > 0 && c.opens.Load()-c.closes.Load() == c.failAt-1 {
				return nil, nil, errors.New("connection refused")
			}
			c.opens.Add(1)
			return newOp(), func() error { c.closes.Add(1); return nil }, nil
		},
	}
}

func TestRun(t *testing.T) {
	var sleepy, flaky, broken, dead countingScenario
	broken.failAt = 3 // runs at 1 connection, cannot open 4

	var cpuCalls atomic.Int64
	sleepSc := sleepy.scenario("sleep", func() func(context.Context) error {
		return func(context.Context) error { time.Sleep(100 * time.Microsecond); return nil }
	})
	sleepSc.CPU = func() time.Duration { return time.Duration(cpuCalls.Add(1)) * time.Millisecond }
	scenarios := []Scenario{
		sleepSc,
		flaky.scenario("flaky", func() func(context.Context) error {
			n := 0 // per worker: ops of one worker never run concurrently
			return func(context.Context) error {
				time.Sleep(20 * time.Microsecond)
				if n++; n%3 == 0 {
					return errors.New("flaky failure")
				}
				return nil
			}
		}),
		broken.scenario("broken", func() func(context.Context) error {
			return func(context.Context) error { time.Sleep(50 * time.Microsecond); return nil }
		}),
		dead.scenario("dead", func() func(context.Context) error {
			return func(context.Context) error { time.Sleep(50 * time.Microsecond); return errors.New("token removed") }
		}),
	}

	var mu sync.Mutex
	var progress []string
	opts := Options{
		Conns:    []int{1, 4},
		Duration: 50 * time.Millisecond,
		Warmup:   10 * time.Millisecond,
		Reps:     2,
		Progress: func(s string) { mu.Lock(); progress = append(progress, s); mu.Unlock() },
	}
	report, err := Run(context.Background(), scenarios, opts)
	if err != nil {
		t.Fatal(err)
	}

	var order []string
	for _, r := range report.Results {
		order = append(order, r.label())
	}
	wantOrder := []string{"sleep/k@1", "sleep/k@4", "flaky/k@1", "flaky/k@4", "broken/k@1", "broken/k@4", "dead/k@1", "dead/k@4"}
	if !slices.Equal(order, wantOrder) {
		t.Fatalf("results in order %v, want %v", order, wantOrder)
	}

	for _, conns := range []int{1, 4} {
		r, _ := report.Find("sleep", "k", conns)
		if r.Err != "" || r.Errors != 0 || r.Reps != 2 || r.AllFailed {
			t.Errorf("sleep@%d: %+v", conns, r)
		}
		if r.P50us < 100 || r.P95us < r.P50us || r.P99us < r.P95us || r.P999us < r.P99us {
			t.Errorf("sleep@%d: percentiles %v %v %v %v, want ≥ 100 µs and ordered", conns, r.P50us, r.P95us, r.P99us, r.P999us)
		}
		// Each worker does at most one op per 100 µs.
		if r.OpsPerS <= 0 || r.OpsPerS > float64(conns)*10_000 {
			t.Errorf("sleep@%d: %v ops/s", conns, r.OpsPerS)
		}
		if len(r.CDF) == 0 || len(r.CDF) > MaxCDFPoints || !slices.IsSorted(r.CDF) {
			t.Errorf("sleep@%d: CDF of %d points, sorted %v", conns, len(r.CDF), slices.IsSorted(r.CDF))
		}
		if r.CPUPerOpUs <= 0 {
			t.Errorf("sleep@%d: CPU %v µs/op", conns, r.CPUPerOpUs)
		}
	}
	s1, _ := report.Find("sleep", "k", 1)
	s4, _ := report.Find("sleep", "k", 4)
	if s4.OpsPerS < 2*s1.OpsPerS {
		t.Errorf("sleep: %v ops/s at 4 conns vs %v at 1: workers did not run concurrently", s4.OpsPerS, s1.OpsPerS)
	}
	if got, want := cpuCalls.Load(), int64(2*2*2); got != want {
		t.Errorf("CPU hook called %d times, want %d (before and after each rep)", got, want)
	}

	for _, conns := range []int{1, 4} {
		r, _ := report.Find("flaky", "k", conns)
		attempts := r.Ops + int64(r.Errors)
		// One op in three fails, give or take one per worker and rep: the
		// count carries on from the warm-up.
		if slack := int64(3 * conns * 2); abs(3*int64(r.Errors)-attempts) > slack || r.Errors == 0 {
			t.Errorf("flaky@%d: %d errors of %d attempts, want a third", conns, r.Errors, attempts)
		}
		if r.AllFailed || !strings.Contains(r.OpErr, "flaky failure") {
			t.Errorf("flaky@%d: allFailed %v, op error %q", conns, r.AllFailed, r.OpErr)
		}
	}

	if r, _ := report.Find("broken", "k", 1); r.Err != "" || r.Reps != 2 {
		t.Errorf("broken@1 should run: %+v", r)
	}
	if r, _ := report.Find("broken", "k", 4); !strings.Contains(r.Err, "open worker 3 of 4") ||
		!strings.Contains(r.Err, "connection refused") || r.Reps != 0 || r.Ops != 0 {
		t.Errorf("broken@4: err %q reps %d ops %d", r.Err, r.Reps, r.Ops)
	}
	if skipped := report.Skipped(); len(skipped) != 1 || skipped[0].label() != "broken/k@4" {
		t.Errorf("Skipped() = %v", skipped)
	}

	for _, conns := range []int{1, 4} {
		r, _ := report.Find("dead", "k", conns)
		if !r.AllFailed || r.Errors == 0 || r.Ops != 0 || r.P50us != 0 || r.OpsPerS != 0 || r.Reps != 2 {
			t.Errorf("dead@%d: %+v", conns, r)
		}
	}

	for name, c := range map[string]*countingScenario{"sleep": &sleepy, "flaky": &flaky, "broken": &broken, "dead": &dead} {
		if c.opens.Load() != c.closes.Load() || c.opens.Load() == 0 {
			t.Errorf("%s: %d workers opened, %d closed", name, c.opens.Load(), c.closes.Load())
		}
	}

	// 2 reps × 8 measurements, less broken@4's second rep, which is not retried.
	if len(progress) != 15 {
		t.Errorf("%d progress lines, want 15:\n%s", len(progress), strings.Join(progress, "\n"))
	}
	if !slices.ContainsFunc(progress, func(s string) bool { return strings.Contains(s, "broken/k@4: not run") }) {
		t.Errorf("no progress line says broken@4 was not run:\n%s", strings.Join(progress, "\n"))
	}
	// Rep 2 runs the scenarios in reverse order: no scenario of a ratio
	// always runs right after the same other one.
	var runOrder []string
	for _, line := range progress {
		if rest, ok := strings.CutPrefix(line, "rep 2/2 "); ok && strings.Contains(rest, "@1:") {
			runOrder = append(runOrder, rest[:strings.Index(rest, "/")])
		}
	}
	if want := []string{"dead", "broken", "flaky", "sleep"}; !slices.Equal(runOrder, want) {
		t.Errorf("rep 2 at 1 connection ran %v, want %v", runOrder, want)
	}
	if len(report.Ratios) != 0 {
		t.Errorf("ratios %v from scenarios that enter none", report.Ratios)
	}
	if report.Machine.Cores < 1 || report.Machine.GoVersion == "" || report.Reps != 2 {
		t.Errorf("report header: %+v %+v", report.Machine, report.Options)
	}
}

func abs(x int64) int64 {
	if x < 0 {
		return -x
	}
	return x
}

func TestRunCancel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	sc := Scenario{Name: "slow", Key: "k", NewWorker: func(context.Context) (func(context.Context) error, func() error, error) {
		return func(ctx context.Context) error {
			select {
			case <-time.After(time.Millisecond):
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		}, nil, nil
	}}
	time.AfterFunc(100*time.Millisecond, cancel)
	start := time.Now()
	report, err := Run(ctx, []Scenario{sc}, Options{Conns: []int{2}, Duration: time.Minute, Warmup: -1, Reps: 3})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if elapsed := time.Since(start); elapsed > 5*time.Second {
		t.Errorf("Run took %v to notice the cancellation", elapsed)
	}
	if report == nil {
		t.Fatal("no partial report")
	}
}

func TestRunRejectsBadInput(t *testing.T) {
	ok := Scenario{Name: "a", Key: "k", NewWorker: func(context.Context) (func(context.Context) error, func() error, error) {
		return func(context.Context) error { return nil }, nil, nil
	}}
	tests := []struct {
		name      string
		scenarios []Scenario
		opts      Options
	}{
		{"no scenarios", nil, Options{}},
		{"duplicate", []Scenario{ok, ok}, Options{}},
		{"no key", []Scenario{{Name: "a", NewWorker: ok.NewWorker}}, Options{}},
		{"no NewWorker", []Scenario{{Name: "a", Key: "k"}}, Options{}},
		{"zero conns", []Scenario{ok}, Options{Conns: []int{1, 0}}},
		{"negative reps", []Scenario{ok}, Options{Reps: -1}},
	}
	for _, tt := range tests {
		if _, err := Run(context.Background(), tt.scenarios, tt.opts); err == nil {
			t.Errorf("%s: no error", tt.name)
		}
	}
}

func TestOptionsDefaults(t *testing.T) {
	var o Options
	o.EnsureDefaults()
	if !slices.Equal(o.Conns, []int{1, 8, 64}) || o.Duration != 2*time.Second || o.Warmup != 300*time.Millisecond || o.Reps != 3 {
		t.Errorf("defaults: %+v", o)
	}
}

func TestParseProcStatCPU(t *testing.T) {
	// Fields 14 and 15 (utime, stime) are 250 and 50 ticks: 3 s at 100 Hz.
	const rest = " S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0 100 2000 30"
	tests := []struct {
		name    string
		stat    string
		want    time.Duration
		wantErr bool
	}{
		{"plain", "1234 (sigil)" + rest, 3 * time.Second, false},
		{"name with spaces and parens", "1234 (p11 (kit) server)" + rest, 3 * time.Second, false},
		{"no name", "1234 sigil" + rest, 0, true},
		{"truncated", "1234 (sigil) S 1 2 3", 0, true},
		{"not a number", "1234 (sigil) S 1 2 3 4 5 6 7 8 9 10 x 50 0", 0, true},
	}
	for _, tt := range tests {
		got, err := parseProcStatCPU(tt.stat)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("%s: = %v, %v; want %v, error %v", tt.name, got, err, tt.want, tt.wantErr)
		}
	}
}

func TestProcessCPU(t *testing.T) {
	if _, err := os.Stat("/proc/self/stat"); err != nil {
		t.Skip("no /proc")
	}
	// Burn some CPU so that at least a tick is on the clock.
	deadline := time.Now().Add(50 * time.Millisecond)
	for x := 0; time.Now().Before(deadline); x++ {
		_ = x * x
	}
	d, err := ProcessCPU(os.Getpid())
	if err != nil || d <= 0 {
		t.Errorf("ProcessCPU(self) = %v, %v", d, err)
	}
	if _, err := ProcessCPU(-1); err == nil {
		t.Error("ProcessCPU(-1): no error")
	}
}

// A scenario's CPU counts its server's whole process tree: p11-kit server
// signs in a child per client connection, and the p11kit row's CPU per op
// used to leave all of that out.
func TestProcessesCPUCountsChildren(t *testing.T) {
	if _, err := os.Stat("/proc/self/stat"); err != nil {
		t.Skip("no /proc")
	}
	// A parent that does nothing but wait for a child that burns CPU.
	cmd := exec.Command("sh", "-c", `sh -c 'end=$(($(date +%s)+3)); while [ $(date +%s) -lt $end ]; do :; done' & wait`)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	time.Sleep(time.Second)
	own, _ := ProcessCPU(cmd.Process.Pid)
	tree := processesCPU(cmd.Process.Pid)()
	if tree < 200*time.Millisecond || tree < 4*own {
		t.Fatalf("the tree's CPU %v (the parent's own %v): the busy child is not counted", tree, own)
	}
}

func TestCPUModel(t *testing.T) {
	const cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t: fpu\n"
	if got := cpuModel(cpuinfo); got != "AMD EPYC 7B13" {
		t.Errorf("cpuModel = %q", got)
	}
}

// BenchmarkWorkerLoop is the harness' own cost per op (two clock reads, an
// atomic load and an append), which every measured latency includes.
func BenchmarkWorkerLoop(b *testing.B) {
	var stop atomic.Bool
	n := 0
	op := func(context.Context) error {
		if n++; n >= b.N {
			stop.Store(true)
		}
		return nil
	}
	w := &worker{op: op, samples: make([]time.Duration, 0, b.N)}
	end := time.Now().Add(time.Hour)
	b.ResetTimer()
	w.loop(context.Background(), end, &stop, true)
}

// A scenario whose ops stop being answered (a wedged agent behind a
// socket that said Hello) fails once, Options.Drain after its phase, and
// is not measured again: every phase used to wait the drain out, rep
// after rep, and a quick run took minutes.
func TestRunFailsAScenarioThatStopsAnswering(t *testing.T) {
	wedged := Scenario{Name: "wedged", Key: "k", NewWorker: func(context.Context) (func(context.Context) error, func() error, error) {
		return func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() }, nil, nil
	}}
	start := time.Now()
	report, err := Run(context.Background(), []Scenario{wedged}, Options{Conns: []int{1, 2}, Duration: 50 * time.Millisecond, Warmup: -1, Reps: 3, Drain: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if elapsed := time.Since(start); elapsed > 3*time.Second {
		t.Errorf("Run took %v: the wedged cells were waited for rep after rep", elapsed)
	}
	if len(report.Results) != 2 {
		t.Fatalf("%d results, want one per connection count", len(report.Results))
	}
	for _, r := range report.Results {
		if !strings.Contains(r.Err, "unanswered") {
			t.Errorf("%s@%d: error %q, want the ops unanswered", r.Scenario, r.Conns, r.Err)
		}
	}
}

// TestRunInterruptedReport stops a run in its last rep, as Ctrl-C does: the
// report keeps what was measured, says where it stopped and which results
// are short of reps, and judges no goal on a short result.
func TestRunInterruptedReport(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	opens := map[string]int{}
	var mu sync.Mutex
	scenario := func(name string) Scenario {
		return Scenario{Name: name, Key: KeyECDSAP256, NewWorker: func(context.Context) (func(context.Context) error, func() error, error) {
			mu.Lock()
			opens[name]++
			// Rep 2 runs in reverse order: software, agent-unix, then
			// direct, which the operator interrupts.
			if name == ScenarioDirect && opens[name] == 2 {
				cancel()
			}
			mu.Unlock()
			return func(context.Context) error { time.Sleep(50 * time.Microsecond); return nil }, nil, nil
		}}
	}
	scenarios := []Scenario{scenario(ScenarioDirect), scenario(ScenarioAgentUnix), scenario(ScenarioSoftware)}
	report, err := Run(ctx, scenarios, Options{Conns: []int{1}, Duration: 20 * time.Millisecond, Warmup: -1, Reps: 2})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if report == nil {
		t.Fatal("no report of what was measured")
	}
	for _, tc := range []struct {
		scenario string
		reps     int
	}{{ScenarioDirect, 1}, {ScenarioAgentUnix, 2}, {ScenarioSoftware, 2}} {
		res, ok := report.Find(tc.scenario, KeyECDSAP256, 1)
		if !ok || res.Reps != tc.reps || res.Ops == 0 {
			t.Errorf("%s: found %v, %d reps, %d ops; want %d reps with ops", tc.scenario, ok, res.Reps, res.Ops, tc.reps)
		}
	}
	if _, ok := report.Ratios[RatioAgentVsDirectP50]; ok {
		t.Errorf("ratio %s computed on direct's 1 rep of 2", RatioAgentVsDirectP50)
	}

	var md bytes.Buffer
	if err := report.Markdown(&md); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"Interrupted after rep 1 of 2",
		"incomplete: direct/ecdsa-p256@1",
		RatioAgentVsDirectP50 + " (agent-unix p50 ÷ direct p50, 1 conn): goal ≤ 1.3: not judged: interrupted",
	} {
		if !strings.Contains(md.String(), want) {
			t.Errorf("Markdown lacks %q:\n%s", want, md.String())
		}
	}
	if strings.Contains(md.String(), "agent-unix/ecdsa-p256@1,") || strings.Contains(md.String(), "incomplete: direct/ecdsa-p256@1, ") {
		t.Errorf("Markdown names a complete result incomplete:\n%s", md.String())
	}

	var js bytes.Buffer
	if err := report.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	var out struct {
		Interrupted *struct {
			AfterRep   int      `json:"after_rep"`
			Incomplete []string `json:"incomplete"`
		} `json:"interrupted"`
		Goals []struct {
			Name        string `json:"name"`
			Met         bool   `json:"met"`
			Interrupted bool   `json:"interrupted"`
		} `json:"goals"`
	}
	if err := json.Unmarshal(js.Bytes(), &out); err != nil {
		t.Fatal(err)
	}
	if out.Interrupted == nil || out.Interrupted.AfterRep != 1 || !slices.Equal(out.Interrupted.Incomplete, []string{"direct/ecdsa-p256@1"}) {
		t.Errorf("JSON interrupted = %+v, want after rep 1, incomplete [direct/ecdsa-p256@1]", out.Interrupted)
	}
	for _, g := range out.Goals {
		if g.Name == RatioAgentVsDirectP50 && (g.Met || !g.Interrupted) {
			t.Errorf("JSON goal %+v: want not met, interrupted", g)
		}
	}
}
