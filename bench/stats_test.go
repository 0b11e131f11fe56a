package bench

import (
	"errors"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// seq returns lo..hi microseconds.
func seq(lo, hi int) []time.Duration {
	var out []time.Duration
	for i := lo; i <= hi; i++ {
		out = append(out, time.Duration(i)*time.Microsecond)
	}
	return out
}

func TestPercentile(t *testing.T) {
	us := time.Microsecond
	tests := []struct {
		name    string
		samples []time.Duration
		p       float64
		want    time.Duration
		wantErr bool
	}{
		{"1..100 p50", seq(1, 100), 50, 50 * us, false},
		{"1..100 p95", seq(1, 100), 95, 95 * us, false},
		{"1..100 p99", seq(1, 100), 99, 99 * us, false},
		{"1..100 p99.9 is the max", seq(1, 100), 99.9, 100 * us, false},
		{"1..100 p0 is the min", seq(1, 100), 0, 1 * us, false},
		{"1..100 p100", seq(1, 100), 100, 100 * us, false},
		{"1..1000 p99.9 despite float rounding", seq(1, 1000), 99.9, 999 * us, false},
		{"1..10 p50", seq(1, 10), 50, 5 * us, false},
		{"1..10 p95 rounds up", seq(1, 10), 95, 10 * us, false},
		{"1..3 p50 rounds up", seq(1, 3), 50, 2 * us, false},
		{"single sample p50", seq(7, 7), 50, 7 * us, false},
		{"single sample p99.9", seq(7, 7), 99.9, 7 * us, false},
		{"empty", nil, 50, 0, true},
		{"p over 100", seq(1, 10), 100.1, 0, true},
		{"negative p", seq(1, 10), -1, 0, true},
		{"NaN p", seq(1, 10), math.NaN(), 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Percentile(tt.samples, tt.p)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %v", err, tt.wantErr)
			}
			if got != tt.want {
				t.Errorf("Percentile(p%v) = %v, want %v", tt.p, got, tt.want)
			}
		})
	}
	if _, err := Percentile(nil, 50); !errors.Is(err, ErrNoSamples) {
		t.Errorf("empty: err = %v, want ErrNoSamples", err)
	}
}

func TestSummarizeSortsInPlace(t *testing.T) {
	s := seq(1, 100)
	rand.Shuffle(len(s), func(i, j int) { s[i], s[j] = s[j], s[i] })
	got, err := Summarize(s)
	if err != nil {
		t.Fatal(err)
	}
	us := time.Microsecond
	want := Summary{N: 100, P50: 50 * us, P95: 95 * us, P99: 99 * us, P999: 100 * us}
	if got != want {
		t.Errorf("Summarize = %+v, want %+v", got, want)
	}
	if !slices.IsSorted(s) {
		t.Error("samples not sorted in place")
	}
	if _, err := Summarize(nil); !errors.Is(err, ErrNoSamples) {
		t.Errorf("Summarize(nil) err = %v, want ErrNoSamples", err)
	}
}

func TestMedian(t *testing.T) {
	tests := []struct {
		xs   []float64
		want float64
	}{
		{nil, 0},
		{[]float64{3}, 3},
		{[]float64{1, 3}, 2},
		{[]float64{5, 1, 3}, 3},
		{[]float64{9, 1, 100, 2}, 5.5},
		{[]float64{10, 10, 1000}, 10}, // one disturbed rep does not move it
	}
	for _, tt := range tests {
		in := slices.Clone(tt.xs)
		if got := Median(in); got != tt.want {
			t.Errorf("Median(%v) = %v, want %v", tt.xs, got, tt.want)
		}
		if !slices.Equal(in, tt.xs) {
			t.Errorf("Median modified its input: %v", in)
		}
	}
}

func TestOpsPerSecond(t *testing.T) {
	tests := []struct {
		ops  int64
		wall time.Duration
		want float64
	}{
		{1000, 2 * time.Second, 500},
		{3, 1500 * time.Millisecond, 2},
		{0, time.Second, 0},
		{10, 0, 0},
		{10, -time.Second, 0},
	}
	for _, tt := range tests {
		if got := OpsPerSecond(tt.ops, tt.wall); got != tt.want {
			t.Errorf("OpsPerSecond(%d, %v) = %v, want %v", tt.ops, tt.wall, got, tt.want)
		}
	}
}

func TestCDFPoints(t *testing.T) {
	small := seq(1, 10)
	if got := cdfPoints(small, MaxCDFPoints); !slices.Equal(got, small) {
		t.Errorf("small set changed: %v", got)
	}
	big := seq(1, 100_000)
	got := cdfPoints(big, MaxCDFPoints)
	if len(got) != MaxCDFPoints {
		t.Fatalf("len = %d, want %d", len(got), MaxCDFPoints)
	}
	if got[0] != big[0] || got[len(got)-1] != big[len(big)-1] {
		t.Errorf("ends = %v, %v; want min %v and max %v", got[0], got[len(got)-1], big[0], big[len(big)-1])
	}
	if !slices.IsSorted(got) {
		t.Error("not sorted")
	}
	// Point j is the latency at quantile j/(len-1).
	if mid := got[(len(got)-1)/2]; mid < 49_900*time.Microsecond || mid > 50_100*time.Microsecond {
		t.Errorf("middle point %v, want ~50ms", mid)
	}
}

// TestCellResult checks the per-scenario figures: medians over reps of each
// statistic, totals of errors and ops, and that a rep without a success
// counts in ops/s but not in latency.
func TestCellResult(t *testing.T) {
	us := time.Microsecond
	rep := func(ok, errs int64, p50 time.Duration, cpu time.Duration) repMeasurement {
		m := repMeasurement{ok: ok, errs: errs, wall: time.Second, cpu: cpu}
		if ok > 0 {
			m.summary = Summary{N: int(ok), P50: p50, P95: 2 * p50, P99: 3 * p50, P999: 4 * p50}
			m.samples = []time.Duration{p50}
		}
		return m
	}
	tests := []struct {
		name                   string
		reps                   []repMeasurement
		p50, p999, ops, cpuPer float64
		errors                 int
		allFailed              bool
		repP50, repOps         []float64 // each rep's, in order
	}{
		{
			name: "three reps",
			reps: []repMeasurement{
				rep(100, 1, 10*us, 10*time.Millisecond), // 100 µs/op
				rep(300, 0, 30*us, 9*time.Millisecond),  // 30 µs/op
				rep(200, 2, 20*us, 10*time.Millisecond), // 50 µs/op
			},
			p50: 20, p999: 80, ops: 200, cpuPer: 50, errors: 3,
			repP50: []float64{10, 30, 20}, repOps: []float64{100, 300, 200},
		},
		{
			name: "a rep with no success",
			reps: []repMeasurement{
				rep(100, 0, 10*us, 0),
				rep(0, 50, 0, 0),
				rep(300, 0, 30*us, 0),
			},
			p50: 20, p999: 80, ops: 100, errors: 50,
			repP50: []float64{10, 0, 30}, repOps: []float64{100, 0, 300},
		},
		{
			name:   "every op failed",
			reps:   []repMeasurement{rep(0, 5, 0, 0), rep(0, 7, 0, 0)},
			errors: 12, allFailed: true,
			repP50: []float64{0, 0}, repOps: []float64{0, 0},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var c cell
			for _, m := range tt.reps {
				c.add(m)
			}
			r := c.result(Scenario{Name: "s", Key: "k"}, 8)
			if r.P50us != tt.p50 || r.P999us != tt.p999 || r.OpsPerS != tt.ops || r.CPUPerOpUs != tt.cpuPer ||
				r.Errors != tt.errors || r.AllFailed != tt.allFailed || r.Reps != len(tt.reps) {
				t.Errorf("got p50 %v p99.9 %v ops/s %v cpu/op %v errors %d allFailed %v reps %d\n"+
					"want p50 %v p99.9 %v ops/s %v cpu/op %v errors %d allFailed %v reps %d",
					r.P50us, r.P999us, r.OpsPerS, r.CPUPerOpUs, r.Errors, r.AllFailed, r.Reps,
					tt.p50, tt.p999, tt.ops, tt.cpuPer, tt.errors, tt.allFailed, len(tt.reps))
			}
			if !slices.Equal(r.RepP50us, tt.repP50) || !slices.Equal(r.RepOpsPerS, tt.repOps) {
				t.Errorf("per rep: p50 %v ops/s %v, want %v and %v", r.RepP50us, r.RepOpsPerS, tt.repP50, tt.repOps)
			}
		})
	}
}

func TestFormatDuration(t *testing.T) {
	tests := []struct {
		d    time.Duration
		want string
	}{
		{212345678, "212ms"},
		{200 * time.Millisecond, "200ms"},
		{1234567, "1.23ms"},
		{95234, "95.2µs"},
		{1234, "1.23µs"},
		{512, "512ns"},
		{3_456_789_012, "3.46s"},
	}
	for _, tt := range tests {
		if got := formatDuration(tt.d); got != tt.want {
			t.Errorf("formatDuration(%d) = %q, want %q", int64(tt.d), got, tt.want)
		}
	}
}
