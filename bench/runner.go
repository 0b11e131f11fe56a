package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Scenario names and key labels the goal ratios are computed from
// (Report.ComputeRatios). Scenarios may use other names; they are measured and
// reported, they just enter no ratio.
const (
	ScenarioDirect    = "direct"     // in-process miekg/pkcs11 on SoftHSM2: the floor
	ScenarioAgentUnix = "agent-unix" // the agent over its Unix socket
	ScenarioAgentTCP  = "agent-tcp"  // the agent over (m)TLS or plain loopback TCP
	ScenarioP11Kit    = "p11kit"     // PKCS#11 forwarded by a p11-kit server
	ScenarioSoftware  = "software"   // the agent on software keys

	KeyECDSAP256 = "ecdsa-p256"
	KeyRSA2048   = "rsa-2048"
	KeyEd25519   = "ed25519"
)

// A Scenario is one thing to measure, e.g. "agent-unix / ecdsa-p256".
type Scenario struct {
	Name string // e.g. "direct", "agent-unix", "agent-tcp", "p11kit", "software"
	Key  string // e.g. "ecdsa-p256", "rsa-2048", "ed25519"

	// NewWorker opens one worker: one client connection, or one goroutine's
	// session for in-process scenarios. op performs ONE signature and returns
	// its error; it is only ever called from one goroutine at a time. closeFn
	// may be nil.
	NewWorker func(ctx context.Context) (op func(ctx context.Context) error, closeFn func() error, err error)

	// CPU, if set, reports the CPU time used so far by a process outside this
	// one that serves the scenario (the agent, a p11-kit server), for example
	// via ProcessCPU. Getrusage only counts children once they have been waited
	// for, which a server running across reps never is.
	CPU func() time.Duration
}

func (s Scenario) label() string { return s.Name + "/" + s.Key }

// Options configures Run. Zero fields take the defaults EnsureDefaults
// documents.
type Options struct {
	Conns    []int         `json:"conns"`    // concurrent workers per measurement; default 1, 8, 64
	Duration time.Duration `json:"duration"` // measured time per rep; default 2s
	Warmup   time.Duration `json:"warmup"`   // before each rep of each scenario×conns; default 300ms, negative for none
	Reps     int           `json:"reps"`     // default 3
	// Drain is how long ops still running at the end of a phase are
	// waited for before they are cancelled and the scenario fails
	// (errUnanswered); default 10 s.
	Drain time.Duration `json:"-"`

	// Progress, if set, receives a line per finished rep (for stderr).
	Progress func(string) `json:"-"`
}

// EnsureDefaults fills zero fields with the defaults: 1, 8 and 64 connections,
// 2 s per rep after a 300 ms warm-up, 3 reps. The figures of ANCHORS.md were
// taken with these.
func (o *Options) EnsureDefaults() {
	if len(o.Conns) == 0 {
		o.Conns = []int{1, 8, 64}
	}
	if o.Duration == 0 {
		o.Duration = 2 * time.Second
	}
	if o.Warmup == 0 {
		o.Warmup = 300 * time.Millisecond
	}
	if o.Reps == 0 {
		o.Reps = 3
	}
	if o.Drain == 0 {
		o.Drain = 10 * time.Second
	}
}

func (o *Options) validate() error {
	for _, n := range o.Conns {
		if n < 1 {
			return fmt.Errorf("bench: conns %d: need at least 1", n)
		}
	}
	if o.Duration < 0 {
		return fmt.Errorf("bench: negative duration %v", o.Duration)
	}
	if o.Reps < 1 {
		return fmt.Errorf("bench: reps %d: need at least 1", o.Reps)
	}
	return nil
}

// Run measures every scenario at every connection count, Reps times, and
// returns the report with the ratios computed.
//
// The loops nest rep → conns → scenario, so each rep of a scenario sits next
// to the same rep of every other scenario at the same concurrency: on a noisy
// machine their ratio holds even when absolute figures drift. Each
// measurement opens its workers, warms them up, runs them all concurrently for
// Duration recording every op's latency, and closes them.
//
// A failed op is counted, not fatal. A scenario whose NewWorker fails carries
// the error in its Result and is not tried again at that connection count.
// If ctx is cancelled (Ctrl-C) Run returns what it has measured so far,
// marked Report.Interrupted, and ctx.Err().
func Run(ctx context.Context, scenarios []Scenario, opts Options) (*Report, error) {
	opts.EnsureDefaults()
	opts.Conns = slices.Clone(opts.Conns)
	if err := opts.validate(); err != nil {
		return nil, err
	}
	if len(scenarios) == 0 {
		return nil, errors.New("bench: no scenarios")
	}
	seen := make(map[string]bool, len(scenarios))
	for _, sc := range scenarios {
		if sc.Name == "" || sc.Key == "" {
			return nil, fmt.Errorf("bench: scenario %q needs a name and a key", sc.label())
		}
		if sc.NewWorker == nil {
			return nil, fmt.Errorf("bench: scenario %s has no NewWorker", sc.label())
		}
		if seen[sc.label()] {
			return nil, fmt.Errorf("bench: scenario %s given twice", sc.label())
		}
		seen[sc.label()] = true
	}

	report := &Report{Started: time.Now(), Options: opts, Machine: DescribeMachine()}
	nc := len(opts.Conns)
	cells := make([]cell, len(scenarios)*nc)
	var runErr error
	finished := 0 // reps every scenario has been through
run:
	for rep := 1; rep <= opts.Reps; rep++ {
		finished = rep - 1
		for ci, conns := range opts.Conns {
			for i := range scenarios {
				// Every other rep runs the scenarios in reverse order, so
				// that no scenario of a ratio always runs first, right
				// after what the one before it left behind (a flush, a
				// busy cache, another process's wake-ups).
				si := i
				if rep%2 == 0 {
					si = len(scenarios) - 1 - i
				}
				sc := scenarios[si]
				if runErr = ctx.Err(); runErr != nil {
					break run
				}
				c := &cells[si*nc+ci]
				if c.err != "" {
					continue
				}
				m, err := measure(ctx, sc, conns, opts)
				if err != nil {
					if runErr = ctx.Err(); runErr != nil {
						break run
					}
					c.err = err.Error()
					c.unanswered = errors.Is(err, errUnanswered)
					opts.progress("rep %d/%d %s@%d: not run: %v", rep, opts.Reps, sc.label(), conns, err)
					continue
				}
				c.add(m)
				opts.progress("rep %d/%d %s", rep, opts.Reps, m.describe(sc, conns))
			}
		}
	}
	if runErr != nil {
		report.Interrupted = &Interruption{AfterRep: finished}
	}
	for si, sc := range scenarios {
		for ci, conns := range opts.Conns {
			c := &cells[si*nc+ci]
			if runErr != nil && c.err == "" && len(c.reps) < opts.Reps {
				report.Interrupted.Incomplete = append(report.Interrupted.Incomplete, resultLabel(sc.Name, sc.Key, conns))
			}
			if len(c.reps) == 0 && c.err == "" {
				continue // never reached: the run was cancelled first
			}
			report.Results = append(report.Results, c.result(sc, conns))
		}
	}
	report.ComputeRatios()
	return report, runErr
}

func (o *Options) progress(format string, args ...any) {
	if o.Progress != nil {
		o.Progress(fmt.Sprintf(format, args...))
	}
}

// repMeasurement is one rep of one scenario at one connection count.
type repMeasurement struct {
	ok, errs int64
	wall     time.Duration
	cpu      time.Duration
	samples  []time.Duration // sorted
	summary  Summary         // valid when ok > 0
	firstErr error
}

func (m *repMeasurement) describe(sc Scenario, conns int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s@%d: ", sc.label(), conns)
	if m.ok > 0 {
		fmt.Fprintf(&b, "p50 %s p99 %s, ", formatDuration(m.summary.P50), formatDuration(m.summary.P99))
	}
	fmt.Fprintf(&b, "%.0f ops/s", OpsPerSecond(m.ok, m.wall))
	if m.ok > 0 {
		fmt.Fprintf(&b, ", cpu %s/op", formatDuration(m.cpu/time.Duration(m.ok)))
	}
	fmt.Fprintf(&b, ", errors %d", m.errs)
	if m.firstErr != nil {
		fmt.Fprintf(&b, " (first: %v)", m.firstErr)
	}
	return b.String()
}

// cell accumulates the reps of one scenario at one connection count.
type cell struct {
	reps   []repMeasurement
	merged []time.Duration // every rep's samples, for the CDF
	err    string          // NewWorker failed, or the ops went unanswered
	// unanswered: err is errUnanswered, the signer's failure rather
	// than the harness's.
	unanswered bool
	firstErr   error
}

func (c *cell) add(m repMeasurement) {
	c.merged = append(c.merged, m.samples...)
	if c.firstErr == nil {
		c.firstErr = m.firstErr
	}
	m.samples = nil // merged holds them; do not keep two copies
	c.reps = append(c.reps, m)
}

func (c *cell) result(sc Scenario, conns int) Result {
	r := Result{Scenario: sc.Name, Key: sc.Key, Conns: conns, Reps: len(c.reps), Err: c.err, Unanswered: c.unanswered}
	if c.firstErr != nil {
		r.OpErr = c.firstErr.Error()
	}
	var p50, p95, p99, p999, cpu []float64
	for _, m := range c.reps {
		r.Errors += int(m.errs)
		r.Ops += m.ok
		r.RepOpsPerS = append(r.RepOpsPerS, OpsPerSecond(m.ok, m.wall))
		if m.ok == 0 {
			r.RepP50us = append(r.RepP50us, 0)
			continue // no latency, no CPU per op; its zero ops/s still counts
		}
		r.RepP50us = append(r.RepP50us, durationUs(m.summary.P50))
		p50 = append(p50, durationUs(m.summary.P50))
		p95 = append(p95, durationUs(m.summary.P95))
		p99 = append(p99, durationUs(m.summary.P99))
		p999 = append(p999, durationUs(m.summary.P999))
		cpu = append(cpu, durationUs(m.cpu)/float64(m.ok))
	}
	r.P50us, r.P95us, r.P99us, r.P999us = Median(p50), Median(p95), Median(p99), Median(p999)
	r.OpsPerS = Median(r.RepOpsPerS)
	r.CPUPerOpUs = Median(cpu)
	r.AllFailed = len(c.reps) > 0 && r.Ops == 0
	slices.Sort(c.merged)
	r.CDF = cdfPoints(c.merged, MaxCDFPoints)
	c.merged = nil
	return r
}

// worker is one opened connection or session. The fields written by the loop
// are written once, when it ends, so concurrent workers share no cache line
// while measuring.
type worker struct {
	op       func(context.Context) error
	closeFn  func() error
	samples  []time.Duration
	ok, errs int64
	firstErr error
}

// loop calls op until end or stop. Latencies go to a slice local to this
// goroutine: no lock, channel or shared counter per op.
func (w *worker) loop(ctx context.Context, end time.Time, stop *atomic.Bool, record bool) {
	samples := w.samples[:0]
	var ok, errs int64
	var firstErr error
	for !stop.Load() {
		t0 := time.Now()
		if !t0.Before(end) {
			break
		}
		err := w.op(ctx)
		d := time.Since(t0)
		if err != nil {
			errs++
			if firstErr == nil {
				firstErr = err
			}
			continue
		}
		ok++
		if record {
			samples = append(samples, d)
		}
	}
	w.samples, w.ok, w.errs, w.firstErr = samples, ok, errs, firstErr
}

func measure(ctx context.Context, sc Scenario, conns int, opts Options) (repMeasurement, error) {
	workers, err := openWorkers(ctx, sc, conns)
	if err != nil {
		return repMeasurement{}, err
	}
	defer func() {
		if err := closeWorkers(workers); err != nil {
			opts.progress("%s@%d: close: %v", sc.label(), conns, err)
		}
	}()

	// Garbage from the previous measurement is collected now rather than
	// during this one.
	runtime.GC()
	if opts.Warmup > 0 {
		_, cut := runPhase(ctx, workers, opts.Warmup, opts.Drain, false)
		if err := ctx.Err(); err != nil {
			return repMeasurement{}, err
		}
		if cut {
			return repMeasurement{}, errUnanswered
		}
	}
	for _, w := range workers {
		w.samples = make([]time.Duration, 0, sampleCapacity(w.ok, opts.Warmup, opts.Duration))
	}

	cpu0 := processTreeCPU() + scenarioCPU(sc)
	wall, cut := runPhase(ctx, workers, opts.Duration, opts.Drain, true)
	cpu := processTreeCPU() + scenarioCPU(sc) - cpu0
	if err := ctx.Err(); err != nil {
		return repMeasurement{}, err
	}
	if cut {
		return repMeasurement{}, errUnanswered
	}

	m := repMeasurement{wall: wall, cpu: cpu}
	n := 0
	for _, w := range workers {
		m.ok += w.ok
		m.errs += w.errs
		if m.firstErr == nil {
			m.firstErr = w.firstErr
		}
		n += len(w.samples)
	}
	m.samples = make([]time.Duration, 0, n)
	for _, w := range workers {
		m.samples = append(m.samples, w.samples...)
		w.samples = nil
	}
	if m.ok > 0 {
		m.summary, _ = Summarize(m.samples) // cannot fail: ok > 0 means samples
	}
	return m, nil
}

// sampleCapacity sizes a worker's sample slice from its warm-up rate, with a
// quarter to spare, so that the measured loop rarely has to grow it.
func sampleCapacity(warmOps int64, warmup, d time.Duration) int {
	const floor, ceiling = 1024, 1 << 22
	if warmup <= 0 || warmOps <= 0 {
		return floor
	}
	est := float64(warmOps) * float64(d) / float64(warmup) * 1.25
	return int(min(max(est, floor), ceiling))
}

func openWorkers(ctx context.Context, sc Scenario, n int) ([]*worker, error) {
	workers := make([]*worker, 0, n)
	for i := range n {
		op, closeFn, err := sc.NewWorker(ctx)
		if err == nil && op == nil {
			err = errors.New("NewWorker returned no op")
		}
		if err != nil {
			if closeFn != nil {
				_ = closeFn()
			}
			_ = closeWorkers(workers) // the open error is the one worth reporting
			if errors.As(err, new(errNotSetUp)) {
				return nil, err
			}
			return nil, fmt.Errorf("open worker %d of %d: %w", i+1, n, err)
		}
		workers = append(workers, &worker{op: op, closeFn: closeFn})
	}
	return workers, nil
}

func closeWorkers(workers []*worker) error {
	var errs []error
	for _, w := range workers {
		if w.closeFn != nil {
			if err := w.closeFn(); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// errUnanswered fails a scenario whose ops were still unanswered
// Options.Drain after their phase ended (an agent that stopped answering,
// a hung signer): its figures would measure the cut, and every later phase
// would wait as long again. The wait keeps a hung signer from stalling the
// harness for good.
var errUnanswered = errors.New("ops still unanswered after the phase ended (Options.Drain): the server stopped answering")

// runPhase runs every worker concurrently for d and returns the wall time
// from the common start to the end of the last op, and whether ops still
// running drain after d had to be cancelled (cut). Ops in flight at
// the deadline complete and count, and the wall time includes them, so
// ops/s stays the ratio of what was done to the time it took.
func runPhase(ctx context.Context, workers []*worker, d, drain time.Duration, record bool) (wall time.Duration, cut bool) {
	var stop atomic.Bool
	unhook := context.AfterFunc(ctx, func() { stop.Store(true) })
	defer unhook()
	opCtx, cancel := context.WithCancel(ctx)
	defer cancel()

	start := make(chan struct{})
	var end time.Time
	var wg sync.WaitGroup
	for _, w := range workers {
		wg.Go(func() {
			<-start // the close below publishes end
			w.loop(opCtx, end, &stop, record)
		})
	}
	begin := time.Now()
	end = begin.Add(d)
	var drained atomic.Bool
	cutter := time.AfterFunc(d+drain, func() { drained.Store(true); cancel() })
	defer cutter.Stop()
	close(start)
	wg.Wait()
	return time.Since(begin), drained.Load()
}

// processTreeCPU is the user+system CPU of this process and of its children
// that have been waited for.
func processTreeCPU() time.Duration {
	var total time.Duration
	for _, who := range []int{syscall.RUSAGE_SELF, syscall.RUSAGE_CHILDREN} {
		var ru syscall.Rusage
		if err := syscall.Getrusage(who, &ru); err == nil {
			total += time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
		}
	}
	return total
}

func scenarioCPU(sc Scenario) time.Duration {
	if sc.CPU == nil {
		return 0
	}
	return sc.CPU()
}

// clockTick is USER_HZ, the unit of /proc/PID/stat times. It is 100 on every
// Linux ABI Go supports; reading sysconf(_SC_CLK_TCK) would need cgo.
const clockTick = 100

// processesCPU returns a Scenario.CPU that sums the CPU of each pid's
// process tree (treeCPU): the server side of a scenario may be several
// processes (an agent and an emulator, two agents), and one may fork its
// workers: p11-kit server signs in a child per client connection.
func processesCPU(pids ...int) func() time.Duration {
	return func() time.Duration {
		children := childrenByParent()
		var sum time.Duration
		for _, pid := range pids {
			sum += treeCPU(pid, children)
		}
		return sum
	}
}

// treeCPU is the CPU of pid and of each live descendant, every one with the
// children it has waited for (ProcessCPU).
func treeCPU(pid int, children map[int][]int) time.Duration {
	d, _ := ProcessCPU(pid)
	for _, c := range children[pid] {
		d += treeCPU(c, children)
	}
	return d
}

// childrenByParent maps each process's parent to it, from /proc.
func childrenByParent() map[int][]int {
	out := map[int][]int{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue // gone meanwhile
		}
		if f, err := statFields(string(b)); err == nil && len(f) > 1 {
			if ppid, err := strconv.Atoi(f[1]); err == nil {
				out[ppid] = append(out[ppid], pid)
			}
		}
	}
	return out
}

// ProcessCPU returns the user+system CPU time used so far by process pid and
// the children it has waited for, from /proc/PID/stat (utime+stime+cutime+
// cstime, resolution 10 ms).
func ProcessCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, fmt.Errorf("process cpu: %w", err)
	}
	d, err := parseProcStatCPU(string(b))
	if err != nil {
		return 0, fmt.Errorf("process cpu of pid %d: %w", pid, err)
	}
	return d, nil
}

// statFields splits /proc/PID/stat after the command name: fields[0] is
// field 3 (state), fields[1] the parent's pid. The command name (field 2)
// is in parentheses and may itself hold spaces and parentheses; only the
// last ')' ends it.
func statFields(stat string) ([]string, error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return nil, errors.New("malformed stat: no command name")
	}
	return strings.Fields(stat[i+1:]), nil
}

func parseProcStatCPU(stat string) (time.Duration, error) {
	fields, err := statFields(stat)
	if err != nil {
		return 0, err
	}
	// fields[0] is field 3 (state), so utime (14), stime (15), cutime (16)
	// and cstime (17) are 11 to 14.
	if len(fields) < 15 {
		return 0, fmt.Errorf("malformed stat: %d fields after the command name", len(fields))
	}
	var ticks int64
	for _, f := range fields[11:15] {
		t, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("malformed stat: %w", err)
		}
		ticks += t
	}
	return time.Duration(ticks) * time.Second / clockTick, nil
}

// Machine describes where a report was measured: figures from different
// machines are not comparable, ratios from one run are.
type Machine struct {
	Cores     int    `json:"cores"`
	CPUModel  string `json:"cpu_model"`
	Kernel    string `json:"kernel"`
	GoVersion string `json:"go_version"`
	OS        string `json:"os"`
	Arch      string `json:"arch"`
}

// DescribeMachine reads the machine's description; fields it cannot read are
// left empty.
func DescribeMachine() Machine {
	m := Machine{
		Cores:     runtime.NumCPU(),
		GoVersion: runtime.Version(),
		OS:        runtime.GOOS,
		Arch:      runtime.GOARCH,
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		m.CPUModel = cpuModel(string(b))
	}
	return m
}

func cpuModel(cpuinfo string) string {
	for line := range strings.Lines(cpuinfo) {
		k, v, ok := strings.Cut(line, ":")
		if ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return ""
}
