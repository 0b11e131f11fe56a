package bench

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"time"
)

// ErrNoSamples is returned when a statistic is asked of an empty sample set:
// a rep in which no op succeeded has no latency, and a zero would read as an
// impossibly fast signer.
var ErrNoSamples = errors.New("bench: no samples")

// MaxCDFPoints bounds the points kept per curve for the CDF plot: at 2000 a
// point is 0.05% of the distribution, finer than a pixel on any sane plot, and
// 45 curves stay well under a megabyte of SVG.
const MaxCDFPoints = 2000

// Percentile returns the p-th percentile (0 ≤ p ≤ 100) of sorted samples by
// the nearest-rank method: sorted[⌈p/100·n⌉-1], the smallest sample with at
// least p% of samples at or below it. Nearest rank never interpolates, so each
// figure is a latency some op actually had, and p99.9 of fewer than 1000
// samples is honestly the maximum.
func Percentile(sorted []time.Duration, p float64) (time.Duration, error) {
	if len(sorted) == 0 {
		return 0, ErrNoSamples
	}
	if math.IsNaN(p) || p < 0 || p > 100 {
		return 0, fmt.Errorf("bench: percentile %v outside [0, 100]", p)
	}
	n := len(sorted)
	// The epsilon absorbs binary rounding: 99.9/100*1000 is 999.0000000000001
	// in float64, and must rank 999, not 1000.
	rank := int(math.Ceil(p/100*float64(n) - 1e-9))
	rank = min(max(rank, 1), n)
	return sorted[rank-1], nil
}

// Summary holds the percentiles of one sample set.
type Summary struct {
	N                   int
	P50, P95, P99, P999 time.Duration
}

// Summarize sorts samples in place and returns their nearest-rank
// percentiles, or ErrNoSamples when there are none.
func Summarize(samples []time.Duration) (Summary, error) {
	if len(samples) == 0 {
		return Summary{}, ErrNoSamples
	}
	slices.Sort(samples)
	// Percentile cannot fail past the emptiness check with these constants.
	p50, _ := Percentile(samples, 50)
	p95, _ := Percentile(samples, 95)
	p99, _ := Percentile(samples, 99)
	p999, _ := Percentile(samples, 99.9)
	return Summary{N: len(samples), P50: p50, P95: p95, P99: p99, P999: p999}, nil
}

// Median returns the median of xs (the mean of the middle two when len(xs) is
// even), or 0 when xs is empty. xs is not modified. The median over reps,
// rather than the mean, is what keeps one rep disturbed by a noisy neighbour
// from moving the reported figure.
func Median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	m := len(s) / 2
	if len(s)%2 == 1 {
		return s[m]
	}
	return (s[m-1] + s[m]) / 2
}

// OpsPerSecond is successful ops over the wall time of the rep, 0 when the
// wall time is not positive.
func OpsPerSecond(ops int64, wall time.Duration) float64 {
	if wall <= 0 {
		return 0
	}
	return float64(ops) / wall.Seconds()
}

// cdfPoints returns at most limit latencies from sorted, point j being the
// latency at quantile j/(len-1), so the first is the minimum and the last the
// maximum: the tail's end always reaches the plot.
func cdfPoints(sorted []time.Duration, limit int) []time.Duration {
	n := len(sorted)
	if n <= limit {
		return slices.Clone(sorted)
	}
	out := make([]time.Duration, limit)
	for j := range out {
		idx := int(math.Round(float64(j) * float64(n-1) / float64(limit-1)))
		out[j] = sorted[idx]
	}
	return out
}

func durationUs(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// usDuration rounds: float µs times 1000 can fall just short of the whole
// nanoseconds it came from (256.001 µs gives 256000.99999999997), and
// truncated, a figure 1 ns over an SLO limit read as on it.
func usDuration(us float64) time.Duration {
	return time.Duration(math.Round(us * float64(time.Microsecond)))
}

// formatDuration keeps three significant digits: "212ms", "1.23ms", "95.2µs".
// time.Duration.String would print every nanosecond.
func formatDuration(d time.Duration) string {
	var unit time.Duration
	switch a := d.Abs(); {
	case a >= 100*time.Second:
		unit = time.Second
	case a >= 10*time.Second:
		unit = 100 * time.Millisecond
	case a >= time.Second:
		unit = 10 * time.Millisecond
	case a >= 100*time.Millisecond:
		unit = time.Millisecond
	case a >= 10*time.Millisecond:
		unit = 100 * time.Microsecond
	case a >= time.Millisecond:
		unit = 10 * time.Microsecond
	case a >= 100*time.Microsecond:
		unit = time.Microsecond
	case a >= 10*time.Microsecond:
		unit = 100 * time.Nanosecond
	case a >= time.Microsecond:
		unit = 10 * time.Nanosecond
	default:
		unit = time.Nanosecond
	}
	return d.Round(unit).String()
}
