package bench

import (
	"bytes"
	"encoding/xml"
	"errors"
	"io"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"
)

// lognormalCDF returns n sorted latencies around median with a tail, the
// shape a signer's latency has.
func lognormalCDF(rng *rand.Rand, n int, median time.Duration, sigma float64) []time.Duration {
	s := make([]time.Duration, n)
	for i := range s {
		s[i] = time.Duration(float64(median) * math.Exp(sigma*rng.NormFloat64()))
	}
	slices.Sort(s)
	return cdfPoints(s, MaxCDFPoints)
}

func svgReport() *Report {
	r := handBuiltReport()
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range r.Results {
		res := &r.Results[i]
		if res.Err == "" && !res.AllFailed {
			res.CDF = lognormalCDF(rng, 20_000, time.Duration(res.P50us*1000), 0.3)
		}
	}
	return r
}

// svgElements parses the document as XML and counts its elements by name.
func svgElements(t *testing.T, doc []byte) map[string]int {
	t.Helper()
	count := map[string]int{}
	d := xml.NewDecoder(bytes.NewReader(doc))
	for {
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("not valid XML: %v", err)
		}
		if se, ok := tok.(xml.StartElement); ok {
			count[se.Name.Local]++
		}
	}
	return count
}

func TestWriteSVG(t *testing.T) {
	r := svgReport()
	tests := []struct {
		conns     int
		polylines int
		contains  []string
	}{
		// At 1: direct, agent-unix, agent-tcp, p11kit, pkcs11-front on ECDSA
		// and agent-unix on RSA; agent-unix Ed25519 failed every op and is
		// named instead.
		{1, 6, []string{"1 connection<", "10µs", "100µs", "1ms", "agent-unix / rsa-2048",
			"not plotted: agent-unix/ed25519: every op failed"}},
		// At 8 also software on ECDSA and its four variants, and agent-unix
		// without its journal.
		{8, 11, []string{"8 connections<", "software / ed25519", "not plotted: agent-tcp/ecdsa-p256: not run: open worker 1 of 8"}},
		{64, 0, []string{"no data at this connection count"}},
	}
	for _, tt := range tests {
		var b bytes.Buffer
		if err := r.WriteSVG(&b, tt.conns); err != nil {
			t.Fatal(err)
		}
		els := svgElements(t, b.Bytes())
		if els["svg"] != 1 || els["polyline"] != tt.polylines {
			t.Errorf("conns %d: %d svg, %d polylines; want 1 and %d", tt.conns, els["svg"], els["polyline"], tt.polylines)
		}
		for _, s := range tt.contains {
			if !strings.Contains(b.String(), s) {
				t.Errorf("conns %d: SVG lacks %q", tt.conns, s)
			}
		}
	}
}

func TestWriteSVGEscapesAndDegenerates(t *testing.T) {
	r := &Report{Results: []Result{
		{Scenario: `a<b&"c"`, Key: "k>", Conns: 1, Reps: 1, P50us: 5, CDF: []time.Duration{5 * time.Microsecond}},
		{Scenario: "zero", Key: "k", Conns: 1, Reps: 1, CDF: []time.Duration{0, 0, time.Nanosecond}},
	}}
	var b bytes.Buffer
	if err := r.WriteSVG(&b, 1); err != nil {
		t.Fatal(err)
	}
	if els := svgElements(t, b.Bytes()); els["polyline"] != 2 {
		t.Errorf("%d polylines, want 2", els["polyline"])
	}
	if strings.Contains(b.String(), "NaN") || strings.Contains(b.String(), "Inf") {
		t.Errorf("non-finite coordinates:\n%s", b.String())
	}
}

func TestDecadeLabel(t *testing.T) {
	want := map[int]string{-3: "1ns", -1: "100ns", 0: "1µs", 1: "10µs", 2: "100µs", 3: "1ms", 4: "10ms", 5: "100ms", 6: "1s", 7: "10s"}
	for exp, label := range want {
		if got := decadeLabel(exp); got != label {
			t.Errorf("decadeLabel(%d) = %q, want %q", exp, got, label)
		}
	}
}
