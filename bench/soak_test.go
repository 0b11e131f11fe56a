package bench

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/zeebo/blake3"

	"github.com/sigil-agent/sigil/proto"
)

func TestParseProcStatus(t *testing.T) {
	for _, tc := range []struct {
		name        string
		status      string
		rss, thread int64
		wantErr     bool
	}{
		{"running", "Name:\tsigil\nState:\tS (sleeping)\nVmRSS:\t   56320 kB\nRssAnon:\t 1 kB\nThreads:\t12\n", 56320 << 10, 12, false},
		{"zombie has no VmRSS", "Name:\tsigil\nState:\tZ (zombie)\nThreads:\t1\n", 0, 0, true},
		{"bad number", "VmRSS:\tlots kB\nThreads:\t3\n", 0, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := parseProcStatus([]byte(tc.status))
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if !tc.wantErr && (s.RSS != tc.rss || s.Threads != tc.thread) {
				t.Errorf("rss %d threads %d, want %d and %d", s.RSS, s.Threads, tc.rss, tc.thread)
			}
		})
	}
}

func TestMetricValues(t *testing.T) {
	page := []byte(`# HELP go_goroutines Number of goroutines that currently exist.
# TYPE go_goroutines gauge
go_goroutines 1234
go_goroutines_extra 5
sigil_limit_refusals_total{limit="frame_timeout"} 7
sigil_limit_refusals_total{limit="max_conns"} 0
`)
	for _, tc := range []struct {
		metric string
		want   map[string]float64
	}{
		{"go_goroutines", map[string]float64{"": 1234}},
		{"sigil_limit_refusals_total", map[string]float64{`limit="frame_timeout"`: 7, `limit="max_conns"`: 0}},
		{"absent", map[string]float64{}},
	} {
		got := metricValues(page, tc.metric)
		if fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("%s: %v, want %v", tc.metric, got, tc.want)
		}
	}
}

// samples makes n samples a second apart whose metrics follow f(i).
func samples(n int, f func(i int) SoakSample) []SoakSample {
	out := make([]SoakSample, n)
	for i := range out {
		out[i] = f(i)
		out[i].At = time.Duration(i) * time.Second
	}
	return out
}

func TestCheckLeaks(t *testing.T) {
	rule := LeakRule{Tolerance: 0.10, RSSSlack: 1 << 20, FDSlack: 4, GoroutineSlack: 8, ThreadSlack: 2}
	flat := func(int) SoakSample { return SoakSample{RSS: 100 << 20, FDs: 1000, Goroutines: 2000, Threads: 12} }
	for _, tc := range []struct {
		name   string
		s      []SoakSample
		warmup time.Duration
		leaks  []string // metrics that must fail
		judged []string // metrics judged, in order
	}{
		{"flat", samples(30, flat), 5 * time.Second, nil, []string{"rss_bytes", "fds", "goroutines"}},
		{"growth only during warm-up", samples(30, func(i int) SoakSample {
			s := flat(i)
			if i < 10 {
				s.RSS = int64(i) * 10 << 20 // climbs to the plateau
			}
			return s
		}), 10 * time.Second, nil, []string{"rss_bytes", "fds", "goroutines"}},
		{"RSS grows 30%", samples(30, func(i int) SoakSample {
			s := flat(i)
			s.RSS += int64(i) * (1 << 20)
			return s
		}), 0, []string{"rss_bytes"}, []string{"rss_bytes", "fds", "goroutines"}},
		{"fds and goroutines leak one per connection", samples(30, func(i int) SoakSample {
			s := flat(i)
			s.FDs += int64(i) * 10
			s.Goroutines += int64(i) * 20
			return s
		}), 0, []string{"fds", "goroutines"}, []string{"rss_bytes", "fds", "goroutines"}},
		{"noise within the slack", samples(30, func(i int) SoakSample {
			s := flat(i)
			s.FDs += int64(i % 4)
			return s
		}), 0, nil, []string{"rss_bytes", "fds", "goroutines"}},
		{"no goroutine count: threads judged", samples(30, func(i int) SoakSample {
			s := flat(i)
			s.Goroutines = -1
			s.Threads += int64(i)
			return s
		}), 0, []string{"threads"}, []string{"rss_bytes", "fds", "threads"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checks := CheckLeaks(tc.s, tc.warmup, rule)
			var judged, leaks []string
			for _, c := range checks {
				judged = append(judged, c.Metric)
				if !c.OK {
					leaks = append(leaks, c.Metric)
				}
			}
			if fmt.Sprint(judged) != fmt.Sprint(tc.judged) || fmt.Sprint(leaks) != fmt.Sprint(tc.leaks) {
				t.Errorf("judged %v, leaks %v; want %v and %v\n%+v", judged, leaks, tc.judged, tc.leaks, checks)
			}
		})
	}

	// Too few samples after warm-up: nothing is judged, nothing fails.
	for _, c := range CheckLeaks(samples(10, flat), 5*time.Second, rule) {
		if !c.OK || c.Note == "" {
			t.Errorf("%+v: want a note and no verdict", c)
		}
	}
}

func TestMatchAudit(t *testing.T) {
	digests := [][]byte{[]byte("one"), []byte("two"), []byte("three"), []byte("two")}
	var released [][16]byte
	for _, d := range digests {
		released = append(released, digestID(d))
	}
	record := func(op string, code proto.Code, digest string) string {
		h := blake3.Sum256([]byte(digest))
		return fmt.Sprintf(`{"seq":1,"op":%q,"code":%d,"code_name":%q,"digest_hash":%q}`, op, code, code, hex.EncodeToString(h[:]))
	}
	for _, tc := range []struct {
		name    string
		lines   []string
		missing int64
		signOK  int64
		wantErr bool
	}{
		{"every release recorded", []string{record("sign", proto.OK, "one"), record("sign", proto.OK, "two"), record("sign", proto.OK, "three"), record("sign", proto.OK, "two")}, 0, 4, false},
		{"a digest signed twice needs two records", []string{record("sign", proto.OK, "one"), record("sign", proto.OK, "two"), record("sign", proto.OK, "three")}, 1, 3, false},
		{"refusals and other ops do not count", []string{record("sign", proto.OK, "one"), record("sign", proto.Paused, "two"), record("pause", proto.OK, "three"), record("sign", proto.OK, "other")}, 3, 2, false},
		{"empty journal", nil, 4, 0, false},
		{"garbage", []string{"{not json"}, 0, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, err := matchAudit(strings.NewReader(strings.Join(tc.lines, "\n")), released)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v", err)
			}
			if tc.wantErr {
				return
			}
			if a.Missing != tc.missing || a.SignOK != tc.signOK || a.Records != int64(len(tc.lines)) || a.Released != 4 {
				t.Errorf("%+v: want %d missing, %d sign OK, %d records", a, tc.missing, tc.signOK, len(tc.lines))
			}
		})
	}
}

func TestCountFrameEnds(t *testing.T) {
	c := proto.NewCodec()
	rng := rand.New(rand.NewPCG(1, 2))
	stream := helloFrame(c)
	hello := len(stream)
	stream = signFrame(c, stream, 2, "k", rng)
	for _, tc := range []struct{ n, want int }{
		{0, 0}, {hello - 1, 0}, {hello, 1}, {hello + 5, 1}, {len(stream), 2},
	} {
		if got := countFrameEnds(stream, tc.n); got != tc.want {
			t.Errorf("countFrameEnds(%d) = %d, want %d", tc.n, got, tc.want)
		}
	}
}

// Each junk payload is the hostile opening it claims to be.
func TestJunkPayload(t *testing.T) {
	c := proto.NewCodec()
	rng := rand.New(rand.NewPCG(3, 4))
	for n := range 50 {
		p := junkPayload(rng, c, n)
		if len(p) == 0 {
			t.Fatalf("kind %d: empty payload", n%5)
		}
		switch n % 5 {
		case 1:
			if l := binary.BigEndian.Uint32(p); l <= proto.DefaultMaxFrame {
				t.Errorf("oversized frame announces %d bytes", l)
			}
		case 2:
			if l := binary.BigEndian.Uint32(p); int(l) != len(p)-proto.FrameHeaderLen {
				t.Errorf("garbage frame announces %d bytes, carries %d", l, len(p)-4)
			}
		case 3:
			if !bytes.Equal(p, []byte{0, 0, 0, 0}) {
				t.Errorf("empty frame is %x", p)
			}
		case 4:
			if !bytes.HasPrefix(p, helloFrame(c)) {
				t.Error("garbage after Hello does not start with Hello")
			}
		}
	}
}

func TestSoakOptions(t *testing.T) {
	var o SoakOptions
	o.EnsureDefaults()
	if o.Conns != 1000 || o.Duration != 5*time.Minute || o.Warmup != time.Minute || o.SampleEvery != 5*time.Second {
		t.Errorf("defaults: %+v", o)
	}
	if err := o.validate(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		conns                    int
		signers, slow, junk, nvr int
	}{
		{1000, 700, 100, 100, 100},
		{50, 35, 5, 5, 5},
		{4, 1, 1, 1, 1},
	} {
		o.Conns = tc.conns
		s, sl, j, n := o.split()
		if s != tc.signers || sl != tc.slow || j != tc.junk || n != tc.nvr {
			t.Errorf("%d conns: %d/%d/%d/%d", tc.conns, s, sl, j, n)
		}
	}
	bad := o
	bad.Mix = SoakMix{Slow: 50, Junk: 30, NeverReaders: 20}
	if bad.validate() == nil {
		t.Error("a mix with no signers passed validation")
	}
}

// A small soak against a real agent process: 50 connections for 5 seconds.
// It must pass, with signatures, junk connections closed, and every
// released signature in the journal.
func TestSoakSmall(t *testing.T) {
	if firstExisting(softhsmModules) == "" {
		t.Skip("SoftHSM2 is not installed")
	}
	if _, err := exec.LookPath("softhsm2-util"); err != nil {
		t.Skip("softhsm2-util is not installed")
	}
	sigil := buildSigil(t)
	var log bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	rep, err := Soak(ctx, SoakOptions{Sigil: sigil, Conns: 50, Duration: 5 * time.Second, Log: &log})
	if err != nil {
		t.Fatalf("%v\n%s", err, log.String())
	}
	var md bytes.Buffer
	if err := rep.Markdown(&md); err != nil {
		t.Fatal(err)
	}
	t.Log(md.String())
	if !rep.Passed() {
		t.Fatalf("soak failed: %v", rep.Failures)
	}
	if rep.Signers.Signatures == 0 || rep.Junk.Closed == 0 || rep.Audit.Released != rep.Signers.Signatures || rep.Audit.Missing != 0 {
		t.Errorf("signers %+v, junk %+v, audit %+v", rep.Signers, rep.Junk, rep.Audit)
	}
	if len(rep.Samples) < 10 || rep.Samples[0].Goroutines <= 0 {
		t.Errorf("%d samples, first %+v: want goroutines from the metrics endpoint", len(rep.Samples), rep.Samples)
	}
	if !strings.Contains(md.String(), ": PASS") {
		t.Errorf("the summary does not say PASS")
	}
}

func TestSoakMarkdownFailures(t *testing.T) {
	r := &SoakReport{Options: SoakOptions{Conns: 4, Duration: time.Second}, Elapsed: time.Second,
		Failures: []string{"the agent process exited during the run (killed by segmentation fault)"}}
	var b bytes.Buffer
	if err := r.Markdown(&b); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{": FAIL", "Failures:", "segmentation fault"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("summary lacks %q:\n%s", want, b.String())
		}
	}
}
