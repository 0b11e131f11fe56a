package bench

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func TestParseSLO(t *testing.T) {
	ms := time.Millisecond
	tests := []struct {
		spec    string
		want    []Limit
		wantErr string // a fragment of the message
	}{
		{spec: "p95=50ms,p99=200ms", want: []Limit{{"p95", 50 * ms}, {"p99", 200 * ms}}},
		{spec: " p50 = 1ms , p99.9=1s ", want: []Limit{{"p50", ms}, {"p99.9", time.Second}}},
		{spec: "P999=1.5s", want: []Limit{{"p99.9", 1500 * ms}}},
		{spec: "p99=150ms", want: []Limit{{"p99", 150 * ms}}},
		{spec: "", wantErr: "empty"},
		{spec: "  ", wantErr: "empty"},
		{spec: "p95", wantErr: "want percentile=duration"},
		{spec: "p95=50ms,,p99=1s", wantErr: "want percentile=duration"},
		{spec: "p90=10ms", wantErr: "unknown percentile"},
		{spec: "95=10ms", wantErr: "unknown percentile"},
		{spec: "p95=fast", wantErr: `invalid duration "fast"`},
		{spec: "p95=50", wantErr: "missing unit"},
		{spec: "p95=0s", wantErr: "must be positive"},
		{spec: "p95=-1ms", wantErr: "must be positive"},
		{spec: "p95=1ms,p95=2ms", wantErr: "p95 given twice"},
		{spec: "p99.9=1s,p999=2s", wantErr: "p99.9 given twice"},
	}
	for _, tt := range tests {
		got, err := ParseSLO(tt.spec)
		if tt.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("ParseSLO(%q) err = %v, want one mentioning %q", tt.spec, err, tt.wantErr)
			}
			continue
		}
		if err != nil || !slices.Equal(got.Limits, tt.want) {
			t.Errorf("ParseSLO(%q) = %v, %v; want %v", tt.spec, got.Limits, err, tt.want)
		}
	}
	if s, _ := ParseSLO("p95=50ms,p99=200ms"); s.String() != "p95=50ms,p99=200ms" {
		t.Errorf("String() = %q", s.String())
	}
}

func TestSLOCheck(t *testing.T) {
	report := func(rs ...Result) *Report { return &Report{Results: rs} }
	res := func(sc string, conns int, p95, p99 float64) Result {
		return Result{Scenario: sc, Key: "ecdsa-p256", Conns: conns, Reps: 3, P50us: p95 / 2, P95us: p95, P99us: p99, P999us: p99 * 2, OpsPerS: 1000}
	}
	seeds, err := ParseSLO("p95=50ms,p99=200ms")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		slo     SLO
		report  *Report
		want    []string // Violation.String() of each
		skipped int
	}{
		{
			name:   "all within",
			slo:    seeds,
			report: report(res("agent-unix", 1, 120, 300), res("agent-unix", 8, 49_999, 200_000)),
		},
		{
			name:   "p99 over at 8",
			slo:    seeds,
			report: report(res("agent-unix", 1, 120, 300), res("agent-unix", 8, 30_000, 212_345)),
			want:   []string{"agent-unix/ecdsa-p256@8: p99 212ms > 200ms"},
		},
		{
			name:   "both over",
			slo:    seeds,
			report: report(res("kms", 64, 51_200, 1_234_567)),
			want:   []string{"kms/ecdsa-p256@64: p95 51.2ms > 50ms", "kms/ecdsa-p256@64: p99 1.23s > 200ms"},
		},
		{
			name: "every op failed is a violation, not running is not",
			slo:  seeds,
			report: report(
				Result{Scenario: "agent-unix", Key: "ed25519", Conns: 8, Reps: 3, Errors: 4242, AllFailed: true},
				Result{Scenario: "p11kit", Key: "ecdsa-p256", Conns: 8, Err: "p11-kit not installed"},
			),
			want:    []string{"agent-unix/ed25519@8: every op failed (4242 errors)"},
			skipped: 1,
		},
		{
			name: "cloud rows are judged by the cloud SLO, the rest by the run's",
			slo:  seeds,
			report: report(
				res(ScenarioAWSKMS, 8, 120_000, 180_000),  // over 50 ms, within 150 ms
				res("agent-unix", 8, 120_000, 180_000),    // the same figures miss the local SLO
				res(ScenarioGCPKMS, 1, 151_000, 160_000),  // over the cloud p95
				res(ScenarioAzureKV, 64, 10_000, 250_000), // over the cloud p99
			),
			want: []string{
				"agent-unix/ecdsa-p256@8: p95 120ms > 50ms",
				"gcpkms/ecdsa-p256@1: p95 151ms > 150ms",
				"azurekv/ecdsa-p256@64: p99 250ms > 200ms",
			},
		},
		{
			name:   "a stricter run SLO does not tighten the cloud one",
			slo:    SLO{Limits: []Limit{{"p99", time.Millisecond}}},
			report: report(res(ScenarioAzureKV, 1, 2000, 5000), res("software", 1, 2000, 5000)),
			want:   []string{"software/ecdsa-p256@1: p99 5ms > 1ms"},
		},
		{
			// A result whose later reps could not run is judged on the
			// reps that did; before, any result with an error was let go.
			name:    "a partly run result is judged",
			slo:     seeds,
			report:  report(Result{Scenario: "agent-unix", Key: "ecdsa-p256", Conns: 1, Reps: 1, P95us: 21_900, P99us: 250_000, Err: "rep 2: connection refused"}),
			want:    []string{"agent-unix/ecdsa-p256@1: p99 250ms > 200ms"},
			skipped: 1,
		},
		{
			// Only successes have latencies: failures that return at once
			// would leave the figures of a signer that mostly fails.
			name:   "failed ops are a violation",
			slo:    seeds,
			report: report(Result{Scenario: "agent-unix", Key: "ecdsa-p256", Conns: 8, Reps: 3, Ops: 173, Errors: 3287, P95us: 1000, P99us: 1000}),
			want:   []string{"agent-unix/ecdsa-p256@8: 3287 of 3460 ops failed"},
		},
		{
			// "met by every scenario" with none measured was a pass.
			name:    "nothing measured is a violation",
			slo:     seeds,
			report:  report(Result{Scenario: "agent-unix", Key: "ecdsa-p256", Conns: 1, Err: "connection refused"}),
			want:    []string{"no scenario was measured"},
			skipped: 1,
		},
		{
			// Rounded alike, a miss would read as within its limit.
			name:   "a miss within the rounding",
			slo:    seeds,
			report: report(res("agent-unix", 1, 120, 200_004)),
			want:   []string{"agent-unix/ecdsa-p256@1: p99 200.004ms > 200ms"},
		},
		{
			// 256.001 µs in float µs times 1000 is 256000.99999999997 ns:
			// truncated to a Duration it sat on the limit.
			name:   "a miss of one nanosecond",
			slo:    SLO{Limits: []Limit{{"p99", 256 * time.Microsecond}}},
			report: report(res("direct", 1, 100, durationUs(256*time.Microsecond+1))),
			want:   []string{"direct/ecdsa-p256@1: p99 256.001µs > 256µs"},
		},
		{
			name:   "p99.9 limit",
			slo:    SLO{Limits: []Limit{{"p99.9", 500 * time.Microsecond}}},
			report: report(res("direct", 1, 100, 300)),
			want:   []string{"direct/ecdsa-p256@1: p99.9 600µs > 500µs"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			vs := tt.slo.Check(tt.report)
			var got []string
			for _, v := range vs {
				got = append(got, v.String())
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("violations %q, want %q", got, tt.want)
			}
			if n := len(tt.report.Skipped()); n != tt.skipped {
				t.Errorf("%d skipped, want %d", n, tt.skipped)
			}
			// The command exits non-zero exactly when Err is not nil.
			err := vs.Err()
			if (err != nil) != (len(tt.want) > 0) {
				t.Fatalf("Err() = %v with %d violations", err, len(tt.want))
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Err() = %q, does not name %q", err, w)
				}
			}
		})
	}
	if err := Violations(nil).Err(); err != nil {
		t.Errorf("no violations: Err() = %v", err)
	}
}

// Every run judges its cloud rows against CloudSLO, --slo or not, and says
// so in the report; rows that did not run are not judged.
func TestCheckCloud(t *testing.T) {
	ok := Result{Scenario: ScenarioGCPKMS, Key: KeyECDSAP256, Conns: 1, Reps: 2, P50us: 150, P95us: 280, P99us: 1100, OpsPerS: 5600}
	slow := Result{Scenario: ScenarioAWSKMS, Key: KeyECDSAP256, Conns: 8, Reps: 2, P50us: 90_000, P95us: 140_000, P99us: 201_000, OpsPerS: 80}
	failed := Result{Scenario: ScenarioAzureKV, Key: KeyECDSAP256, Conns: 8, Reps: 2, Errors: 12, AllFailed: true}
	notRun := Result{Scenario: ScenarioAzureKV, Key: KeyECDSAP256, Conns: 1, Err: "open worker 1 of 1: refused"}
	local := Result{Scenario: ScenarioSoftware, Key: KeyECDSAP256, Conns: 1, Reps: 2, P95us: 900_000, P99us: 900_000, OpsPerS: 1}
	tests := []struct {
		name     string
		results  []Result
		judged   int
		want     []string
		markdown string // "" means no cloud SLO line
	}{
		{name: "no cloud rows", results: []Result{local}},
		{name: "met", results: []Result{local, ok, notRun}, judged: 1, markdown: "Cloud SLO p95=150ms,p99=200ms (the seeds'; judges awskms, gcpkms, azurekv whatever --slo says): met by every cloud result (1 judged)"},
		{
			name: "missed", results: []Result{ok, slow, failed}, judged: 3,
			want:     []string{"awskms/ecdsa-p256@8: p99 201ms > 200ms", "azurekv/ecdsa-p256@8: every op failed (12 errors)"},
			markdown: "NOT met (2):\n\n- awskms/ecdsa-p256@8: p99 201ms > 200ms\n- azurekv/ecdsa-p256@8: every op failed (12 errors)\n",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := &Report{Results: tt.results, Options: Options{Reps: 2}}
			judged, vs := CheckCloud(r)
			var got []string
			for _, v := range vs {
				got = append(got, v.String())
			}
			if judged != tt.judged || !slices.Equal(got, tt.want) {
				t.Errorf("CheckCloud = %d, %q; want %d, %q", judged, got, tt.judged, tt.want)
			}
			var b strings.Builder
			if err := r.Markdown(&b); err != nil {
				t.Fatal(err)
			}
			has := strings.Contains(b.String(), "Cloud SLO")
			if tt.markdown == "" && has {
				t.Errorf("markdown has a cloud SLO line without cloud rows:\n%s", b.String())
			}
			if tt.markdown != "" && !strings.Contains(b.String(), tt.markdown) {
				t.Errorf("markdown lacks %q:\n%s", tt.markdown, b.String())
			}
		})
	}
}

// A signer that stops answering is the worst latency there is, not a
// scenario the harness failed to set up: it misses the SLO, whether it
// hung in the first rep or a later one.
func TestSLOCheckJudgesAScenarioThatStopsAnswering(t *testing.T) {
	var n atomic.Int64
	// hangAt(k): the workers of the first k measurements answer, later
	// ones never do.
	hangAt := func(k int64) Scenario {
		return Scenario{Name: fmt.Sprintf("hangs-after-%d", k), Key: "k", NewWorker: func(context.Context) (func(context.Context) error, func() error, error) {
			hang := n.Add(1) > k
			return func(ctx context.Context) error {
				if hang {
					<-ctx.Done()
					return ctx.Err()
				}
				return nil
			}, nil, nil
		}}
	}
	fine := Scenario{Name: "fine", Key: "k", NewWorker: func(context.Context) (func(context.Context) error, func() error, error) {
		return func(context.Context) error { time.Sleep(10 * time.Microsecond); return nil }, nil, nil
	}}
	seeds, err := ParseSLO("p95=50ms,p99=200ms")
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name string
		sc   Scenario
		reps int // of the hanging scenario that ran
	}{
		{"hangs in the first rep", hangAt(0), 0},
		{"hangs in the second rep", hangAt(1), 1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			n.Store(0)
			opts := Options{Conns: []int{1}, Duration: 20 * time.Millisecond, Warmup: -1, Reps: 2, Drain: 100 * time.Millisecond}
			report, err := Run(context.Background(), []Scenario{fine, tt.sc}, opts)
			if err != nil {
				t.Fatal(err)
			}
			r, ok := report.Find(tt.sc.Name, "k", 1)
			if !ok || !strings.Contains(r.Err, "unanswered") || r.Reps != tt.reps {
				t.Fatalf("%s: err %q, %d reps; want unanswered after %d", tt.sc.Name, r.Err, r.Reps, tt.reps)
			}
			vs := seeds.Check(report)
			if len(vs) != 1 || vs[0].Scenario != tt.sc.Name || !strings.Contains(vs[0].String(), "unanswered") {
				t.Fatalf("violations %v, want %s's unanswered ops", vs, tt.sc.Name)
			}
			if vs.Err() == nil {
				t.Fatal("the command would exit 0")
			}
			if sk := report.Skipped(); len(sk) != 0 {
				t.Errorf("Skipped() = %v: a hung signer is not the harness's failure", sk)
			}
		})
	}
}
