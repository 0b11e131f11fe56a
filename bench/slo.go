package bench

import (
	"errors"
	"fmt"
	"strings"
	"time"
)

// An SLO is a set of latency limits every measured result must stay within,
// e.g. the seeds' p95 ≤ 50 ms, p99 ≤ 200 ms.
type SLO struct {
	Limits []Limit // in the order given
}

// CloudSLO is the seeds' SLO for signing with a cloud KMS key: p95 ≤ 150 ms,
// p99 ≤ 200 ms. The cloud scenarios (IsCloudScenario) are judged against it
// whatever SLO a run is given: their latency includes a round trip to the
// KMS, which the local SLO (the seeds' p95 ≤ 50 ms) was not written for.
var CloudSLO = SLO{Limits: []Limit{
	{Percentile: "p95", Max: 150 * time.Millisecond},
	{Percentile: "p99", Max: 200 * time.Millisecond},
}}

// For returns the SLO that judges scenario: CloudSLO for a cloud scenario,
// s for every other.
func (s SLO) For(scenario string) SLO {
	if IsCloudScenario(scenario) {
		return CloudSLO
	}
	return s
}

// A Limit bounds one percentile: "p50", "p95", "p99" or "p99.9".
type Limit struct {
	Percentile string
	Max        time.Duration
}

func (l Limit) String() string { return l.Percentile + "=" + l.Max.String() }

func (s SLO) String() string {
	parts := make([]string, len(s.Limits))
	for i, l := range s.Limits {
		parts[i] = l.String()
	}
	return strings.Join(parts, ",")
}

// percentileOf maps the percentile names an SLO may use to a result's field.
var percentileOf = map[string]func(Result) float64{
	"p50":   func(r Result) float64 { return r.P50us },
	"p95":   func(r Result) float64 { return r.P95us },
	"p99":   func(r Result) float64 { return r.P99us },
	"p99.9": func(r Result) float64 { return r.P999us },
}

// ParseSLO parses comma-separated percentile=duration pairs, durations in Go
// syntax: "p95=50ms,p99=200ms". Percentiles are p50, p95, p99 and p99.9 (p999
// is accepted for p99.9), each at most once.
func ParseSLO(spec string) (SLO, error) {
	var s SLO
	if strings.TrimSpace(spec) == "" {
		return s, errors.New("slo: empty; want e.g. p95=50ms,p99=200ms")
	}
	seen := map[string]bool{}
	for part := range strings.SplitSeq(spec, ",") {
		part = strings.TrimSpace(part)
		name, value, ok := strings.Cut(part, "=")
		if !ok {
			return SLO{}, fmt.Errorf("slo: %q: want percentile=duration, e.g. p99=200ms", part)
		}
		name = strings.ToLower(strings.TrimSpace(name))
		if name == "p999" {
			name = "p99.9"
		}
		if _, known := percentileOf[name]; !known {
			return SLO{}, fmt.Errorf("slo: %q: unknown percentile; use p50, p95, p99 or p99.9", part)
		}
		if seen[name] {
			return SLO{}, fmt.Errorf("slo: %s given twice", name)
		}
		seen[name] = true
		d, err := time.ParseDuration(strings.TrimSpace(value))
		if err != nil {
			return SLO{}, fmt.Errorf("slo: %q: %w", part, err)
		}
		if d <= 0 {
			return SLO{}, fmt.Errorf("slo: %q: the limit must be positive", part)
		}
		s.Limits = append(s.Limits, Limit{Percentile: name, Max: d})
	}
	return s, nil
}

// A Violation is one result that missed the SLO: a percentile over its limit,
// or no successful op at all (an outage is not fast).
type Violation struct {
	Scenario   string
	Key        string
	Conns      int
	Percentile string        // empty when AllFailed
	Measured   time.Duration // the median over reps of that percentile
	Limit      time.Duration
	AllFailed  bool
	// Unanswered: ops were still unanswered Options.Drain after a phase.
	Unanswered bool
	Errors     int
	Ops        int64 // successful ops, beside Errors when some failed
	// NoneMeasured: not one result of the report was measured.
	NoneMeasured bool
}

// String reads like "agent-unix/ecdsa-p256@8: p99 212ms > 200ms".
func (v Violation) String() string {
	if v.NoneMeasured {
		return "no scenario was measured"
	}
	where := fmt.Sprintf("%s/%s@%d", v.Scenario, v.Key, v.Conns)
	switch {
	case v.Unanswered:
		return where + ": ops went unanswered (the signer stopped answering)"
	case v.AllFailed:
		return fmt.Sprintf("%s: every op failed (%d errors)", where, v.Errors)
	case v.Percentile == "":
		return fmt.Sprintf("%s: %d of %d ops failed", where, v.Errors, int64(v.Errors)+v.Ops)
	}
	measured, limit := formatDuration(v.Measured), formatDuration(v.Limit)
	if measured == limit {
		// Rounded to the same text, the figure would read as within it.
		measured, limit = v.Measured.String(), v.Limit.String()
	}
	return fmt.Sprintf("%s: %s %s > %s", where, v.Percentile, measured, limit)
}

// Violations is the outcome of SLO.Check.
type Violations []Violation

// Err is nil when there are no violations, else an error naming each one, for
// the command's exit status.
func (vs Violations) Err() error {
	if len(vs) == 0 {
		return nil
	}
	lines := make([]string, len(vs))
	for i, v := range vs {
		lines[i] = v.String()
	}
	return fmt.Errorf("SLO missed (%d): %s", len(vs), strings.Join(lines, "; "))
}

// Check returns every result of r that misses a limit of the SLO that
// judges it (s.For: CloudSLO for the cloud scenarios, s for the rest), and
// every result in which an op failed. Results that were not run at all
// (Report.Skipped) are not judged; one whose later reps could not run is
// judged on the reps that did. One whose ops went unanswered (Result.
// Unanswered) misses, in whichever rep it hung. A report in which no result was judged is a
// violation too: an SLO is not met by nothing. The figures checked are the
// medians over reps.
func (s SLO) Check(r *Report) Violations {
	var out Violations
	judged := 0
	for _, res := range r.Results {
		if res.Reps == 0 && !res.Unanswered {
			continue
		}
		judged++
		out = append(out, s.For(res.Scenario).check(res)...)
	}
	if judged == 0 {
		out = append(out, Violation{NoneMeasured: true})
	}
	return out
}

// CheckCloud judges the cloud scenarios' results alone against CloudSLO,
// as every run does whether or not it was given an SLO. judged counts the
// results that ran.
func CheckCloud(r *Report) (judged int, vs Violations) {
	for _, res := range r.Results {
		if !IsCloudScenario(res.Scenario) || (res.Reps == 0 && !res.Unanswered) {
			continue
		}
		judged++
		vs = append(vs, CloudSLO.check(res)...)
	}
	return judged, vs
}

func (s SLO) check(res Result) Violations {
	if res.Unanswered {
		// The earlier reps' figures, if any, do not clear a signer that
		// then hung.
		return Violations{{Scenario: res.Scenario, Key: res.Key, Conns: res.Conns, Unanswered: true, Errors: res.Errors, Ops: res.Ops}}
	}
	if res.AllFailed {
		return Violations{{Scenario: res.Scenario, Key: res.Key, Conns: res.Conns, AllFailed: true, Errors: res.Errors}}
	}
	var out Violations
	if res.Errors > 0 {
		// Only successful ops have latencies: failures that return at once
		// would leave fast figures for a signer that mostly fails.
		out = append(out, Violation{Scenario: res.Scenario, Key: res.Key, Conns: res.Conns, Errors: res.Errors, Ops: res.Ops})
	}
	for _, l := range s.Limits {
		get, ok := percentileOf[l.Percentile]
		if !ok {
			continue // only a hand-built SLO can hold an unknown name
		}
		measured := usDuration(get(res))
		if measured > l.Max {
			out = append(out, Violation{
				Scenario: res.Scenario, Key: res.Key, Conns: res.Conns,
				Percentile: l.Percentile, Measured: measured, Limit: l.Max, Errors: res.Errors,
			})
		}
	}
	return out
}

// cloudSLOSummary is the report's line on CloudSLO: "" when no cloud
// scenario ran.
func (r *Report) cloudSLOSummary() string {
	judged, vs := CheckCloud(r)
	if judged == 0 {
		return ""
	}
	head := fmt.Sprintf("Cloud SLO %s (the seeds'; judges %s whatever --slo says): ", CloudSLO, strings.Join(CloudScenarios, ", "))
	if len(vs) == 0 {
		return head + fmt.Sprintf("met by every cloud result (%d judged)\n", judged)
	}
	lines := make([]string, len(vs))
	for i, v := range vs {
		lines[i] = "- " + mdEscape(v.String())
	}
	return head + fmt.Sprintf("NOT met (%d):\n\n%s\n", len(vs), strings.Join(lines, "\n"))
}
