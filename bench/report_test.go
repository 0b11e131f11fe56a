package bench

import (
	"bytes"
	"encoding/json"
	"math"
	"strconv"
	"strings"
	"testing"
	"time"
)

// handBuiltReport is one run's worth of ECDSA P-256 figures in the shape of
// ANCHORS.md, plus a software Ed25519 result, a skipped and a dead scenario.
func handBuiltReport() *Report {
	r := &Report{
		Started: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC),
		Options: Options{Conns: []int{1, 8}, Duration: 2 * time.Second, Warmup: 300 * time.Millisecond, Reps: 3},
		Machine: Machine{Cores: 2, CPUModel: "AMD EPYC 7B13", Kernel: "6.1.0", GoVersion: "go1.26"},
	}
	add := func(sc, key string, conns int, p50, ops float64) {
		r.Results = append(r.Results, Result{
			Scenario: sc, Key: key, Conns: conns, Reps: 3,
			P50us: p50, P95us: 1.5 * p50, P99us: 2 * p50, P999us: 4 * p50,
			OpsPerS: ops, CPUPerOpUs: 50, Ops: int64(ops * 6),
		})
	}
	add("direct", "ecdsa-p256", 1, 70, 12000)
	add("direct", "ecdsa-p256", 8, 500, 14000)
	add("agent-unix", "ecdsa-p256", 1, 84, 10000)
	add("agent-unix", "ecdsa-p256", 8, 520, 15400)
	add("agent-unix-nojournal", "ecdsa-p256", 8, 480, 16500)
	add("agent-tcp", "ecdsa-p256", 1, 105, 8000)
	add("p11kit", "ecdsa-p256", 1, 349, 2900)
	add("p11kit", "ecdsa-p256", 8, 1800, 4400)
	add("pkcs11-front", "ecdsa-p256", 1, 160, 6000)
	add("pkcs11-front", "ecdsa-p256", 8, 450, 10000)
	add("software", "ed25519", 8, 150, 52000)
	add("software", "ecdsa-p256", 8, 320, 17000)
	add("software-wal", "ecdsa-p256", 8, 300, 19000)
	add("software-nojournal", "ecdsa-p256", 8, 280, 20000)
	add("software-fsync", "ecdsa-p256", 8, 900, 8000)
	add("software-policy", "ecdsa-p256", 8, 310, 18500)
	add("agent-unix", "rsa-2048", 1, 650, 1500)
	r.Results = append(r.Results,
		Result{Scenario: "agent-tcp", Key: "ecdsa-p256", Conns: 8, Err: "open worker 1 of 8: dial tcp: connection refused"},
		Result{Scenario: "agent-unix", Key: "ed25519", Conns: 1, Reps: 3, Errors: 900, AllFailed: true, OpErr: "no such key | gone"},
	)
	r.ComputeRatios()
	return r
}

func TestComputeRatios(t *testing.T) {
	r := handBuiltReport()
	want := map[string]float64{
		RatioAgentVsDirectP50:   84.0 / 70,
		RatioAgentVsDirectOpsG8: 15400.0 / 14000,
		RatioP11KitVsAgentP50:   349.0 / 84,
		RatioAgentVsP11KitOpsG8: 15400.0 / 4400,
		RatioTCPVsUnixP50:       105.0 / 84,
		RatioJournalVsOffOpsG8:  19000.0 / 20000,
		RatioMainVsOffOpsG8:     17000.0 / 20000,
		RatioFsyncVsOffOpsG8:    8000.0 / 20000,
		RatioJournalHSMOpsG8:    15400.0 / 16500,
		RatioPolicyVsNoneOpsG8:  18500.0 / 19000,
		RatioFrontVsP11KitOpsG8: 10000.0 / 4400,
		RatioFrontVsP11KitP50:   160.0 / 349,
	}
	if len(r.Ratios) != len(want) {
		t.Errorf("ratios %v, want %v", r.Ratios, want)
	}
	for k, v := range want {
		if got, ok := r.Ratios[k]; !ok || math.Abs(got-v) > 1e-12 {
			t.Errorf("%s = %v (present %v), want %v", k, got, ok, v)
		}
	}

	tests := []struct {
		name   string
		edit   func(*Report)
		absent []string
	}{
		{"no p11kit", func(r *Report) { r.Results = without(r.Results, "p11kit") },
			[]string{RatioP11KitVsAgentP50, RatioAgentVsP11KitOpsG8, RatioFrontVsP11KitOpsG8, RatioFrontVsP11KitP50}},
		{"front skipped", func(r *Report) { setErr(r, "pkcs11-front", "libsigil-pkcs11.so not found") },
			[]string{RatioFrontVsP11KitOpsG8, RatioFrontVsP11KitP50}},
		{"no direct", func(r *Report) { r.Results = without(r.Results, "direct") },
			[]string{RatioAgentVsDirectP50, RatioAgentVsDirectOpsG8}},
		{"agent skipped", func(r *Report) { setErr(r, "agent-unix", "dial: refused") },
			[]string{RatioAgentVsDirectP50, RatioAgentVsDirectOpsG8, RatioP11KitVsAgentP50, RatioAgentVsP11KitOpsG8, RatioTCPVsUnixP50, RatioJournalHSMOpsG8}},
		{"direct all failed", func(r *Report) {
			for i := range r.Results {
				if r.Results[i].Scenario == "direct" {
					r.Results[i].AllFailed, r.Results[i].P50us, r.Results[i].OpsPerS = true, 0, 0
				}
			}
		}, []string{RatioAgentVsDirectP50, RatioAgentVsDirectOpsG8}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := handBuiltReport()
			tt.edit(r)
			r.ComputeRatios()
			for _, k := range tt.absent {
				if v, ok := r.Ratios[k]; ok {
					t.Errorf("%s = %v, want it left out", k, v)
				}
			}
			if len(r.Ratios) != len(want)-len(tt.absent) {
				t.Errorf("%d ratios, want %d: %v", len(r.Ratios), len(want)-len(tt.absent), r.Ratios)
			}
		})
	}
}

func without(rs []Result, scenario string) []Result {
	var out []Result
	for _, r := range rs {
		if r.Scenario != scenario {
			out = append(out, r)
		}
	}
	return out
}

func setErr(r *Report, scenario, err string) {
	for i := range r.Results {
		if r.Results[i].Scenario == scenario {
			r.Results[i].Err = err
		}
	}
}

func TestGoals(t *testing.T) {
	r := handBuiltReport()
	met := map[string]bool{}
	for _, g := range r.Goals() {
		if !g.Measured {
			t.Errorf("%s not measured", g.Name)
		}
		met[g.Name] = g.Met()
	}
	want := map[string]bool{
		RatioAgentVsDirectP50:    true,  // 1.2 ≤ 1.3
		RatioAgentVsDirectOpsG8:  true,  // 1.1 ≥ 1.0
		RatioP11KitVsAgentP50:    true,  // 4.15 ≥ 3
		RatioAgentVsP11KitOpsG8:  true,  // 3.5 ≥ 3
		RatioTCPVsUnixP50:        false, // 1.25 > 1.2
		GoalSoftwareEd25519OpsG8: true,  // 52000 ≥ 40000
		RatioJournalVsOffOpsG8:   true,  // 0.95 ≥ 0.9
		RatioFsyncVsOffOpsG8:     true,  // reported, no goal
		RatioJournalHSMOpsG8:     true,  // reported, no goal
		RatioPolicyVsNoneOpsG8:   true,  // 0.974 ≥ 0.95
		RatioFrontVsP11KitOpsG8:  false, // 2.27 < 2.5
		RatioFrontVsP11KitP50:    true,  // 0.458 ≤ 0.5
	}
	for k, v := range want {
		if met[k] != v {
			t.Errorf("%s met = %v, want %v", k, met[k], v)
		}
	}

	empty := &Report{}
	for _, g := range empty.Goals() {
		if g.Measured || g.Met() {
			t.Errorf("empty report: %s measured %v met %v", g.Name, g.Measured, g.Met())
		}
	}
}

func TestMarkdown(t *testing.T) {
	r := handBuiltReport()
	var b bytes.Buffer
	if err := r.Markdown(&b); err != nil {
		t.Fatal(err)
	}
	md := b.String()
	for _, res := range r.Results {
		row := "| " + res.Scenario + " | " + res.Key + " | " + strconv.Itoa(res.Conns) + " |"
		if !strings.Contains(md, row) {
			t.Errorf("no row starting %q", row)
		}
	}
	for _, want := range []string{
		"| direct | ecdsa-p256 | 1 | 70.0 | 105.0 | 140.0 | 280.0 | 12000 | 50.0 | 0 |",
		"- agent_vs_direct_p50 (agent-unix p50 ÷ direct p50, 1 conn): 1.20, goal ≤ 1.3: met",
		"- agent_vs_direct_ops_g8 (agent-unix ops/s ÷ direct ops/s, 8 conns): 1.10, goal ≥ 1: met",
		"- p11kit_vs_agent_p50 (p11kit p50 ÷ agent-unix p50, 1 conn): 4.15, goal ≥ 3: met",
		"- agent_vs_p11kit_ops_g8 (agent-unix ops/s ÷ p11kit ops/s, 8 conns): 3.50, goal ≥ 3: met",
		"- tcp_vs_unix_p50 (agent-tcp p50 ÷ agent-unix p50, 1 conn): 1.25, goal ≤ 1.2: NOT met",
		"- software_ed25519_ops_g8 (software Ed25519 ops/s, 8 conns): 52000, goal ≥ 40000: met",
		"- front_vs_p11kit_ops_g8 (pkcs11-front ops/s ÷ p11kit ops/s, 8 conns): 2.27, goal ≥ 2.5: NOT met",
		"- front_vs_p11kit_p50 (pkcs11-front p50 ÷ p11kit p50, 1 conn): 0.46, goal ≤ 0.5: met",
		"| agent-tcp | ecdsa-p256 | 8 | – | – | – | – | – | – | not run |",
		"| agent-unix | ed25519 | 1 | – | – | – | – | 0 | – | 900 (all failed) |",
		"- agent-tcp/ecdsa-p256@8: not run: open worker 1 of 8: dial tcp: connection refused",
		`- agent-unix/ed25519@1: every op failed: no such key \| gone`,
	} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q", want)
		}
	}
	if t.Failed() {
		t.Log("\n" + md)
	}

	var empty bytes.Buffer
	if err := (&Report{}).Markdown(&empty); err != nil || !strings.Contains(empty.String(), "agent_vs_direct_p50") ||
		!strings.Contains(empty.String(), "not measured") {
		t.Errorf("empty report: %v\n%s", err, empty.String())
	}
}

func TestWriteJSON(t *testing.T) {
	r := handBuiltReport()
	r.Results[0].CDF = []time.Duration{time.Microsecond} // never written
	for i := range r.Results {
		switch res := &r.Results[i]; {
		case res.Scenario == "pkcs11-front" && res.Conns == 1:
			res.RepP50us = []float64{150, 170}
		case res.Scenario == "p11kit" && res.Conns == 1:
			res.RepP50us = []float64{300, 340}
		}
	}
	r.ComputeRatios()
	var b bytes.Buffer
	if err := r.WriteJSON(&b); err != nil {
		t.Fatal(err)
	}
	var got struct {
		Results   []map[string]any     `json:"results"`
		Ratios    map[string]float64   `json:"ratios"`
		RepRatios map[string][]float64 `json:"rep_ratios"`
		Machine   map[string]any       `json:"machine"`
		Options   map[string]any       `json:"options"`
		Goals     []map[string]any     `json:"goals"`
	}
	if err := json.Unmarshal(b.Bytes(), &got); err != nil {
		t.Fatalf("%v\n%s", err, b.String())
	}
	if len(got.Results) != len(r.Results) {
		t.Fatalf("%d results, want %d", len(got.Results), len(r.Results))
	}
	first := got.Results[0]
	for _, k := range []string{"scenario", "key", "conns", "p50_us", "p95_us", "p99_us", "p999_us", "ops_per_s", "errors", "cpu_per_op_us", "reps"} {
		if _, ok := first[k]; !ok {
			t.Errorf("result lacks %q: %v", k, first)
		}
	}
	if first["scenario"] != "direct" || first["p50_us"] != 70.0 || first["ops_per_s"] != 12000.0 {
		t.Errorf("first result %v", first)
	}
	if _, ok := first["CDF"]; ok {
		t.Error("CDF written to JSON")
	}
	if _, ok := first["error"]; ok {
		t.Error("empty error written")
	}
	if len(got.Ratios) != len(ratioDefs) || got.Ratios[RatioAgentVsDirectP50] == 0 {
		t.Errorf("ratios %v", got.Ratios)
	}
	if per := got.RepRatios[RatioFrontVsP11KitP50]; len(got.RepRatios) != 1 || len(per) != 2 || per[0] != 0.5 || per[1] != 0.5 {
		t.Errorf("rep_ratios %v", got.RepRatios)
	}
	if p50s, ok := first["rep_p50_us"]; ok {
		t.Errorf("direct has no reps recorded, yet rep_p50_us = %v", p50s)
	}
	if got.Machine["cores"] != 2.0 || got.Options["duration"] != "2s" || len(got.Goals) != len(ratioDefs)+1 {
		t.Errorf("machine %v options %v goals %v", got.Machine, got.Options, got.Goals)
	}

	// An empty report still has the arrays and objects consumers index.
	b.Reset()
	if err := (&Report{}).WriteJSON(&b); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), `"results": []`) || !strings.Contains(b.String(), `"ratios": {}`) ||
		!strings.Contains(b.String(), `"rep_ratios": {}`) {
		t.Errorf("empty report:\n%s", b.String())
	}
}

func TestRepRatios(t *testing.T) {
	setReps := func(r *Report, scenario string, conns int, p50, ops []float64) {
		for i := range r.Results {
			if res := &r.Results[i]; res.Scenario == scenario && res.Key == KeyECDSAP256 && res.Conns == conns {
				res.RepP50us, res.RepOpsPerS = p50, ops
			}
		}
	}
	tests := []struct {
		name      string
		edit      func(*Report)
		ratio     string
		wantPer   []float64 // nil: left out of RepRatios
		wantLine  string    // in the goal's Markdown line; "" to check it has no rep-by-rep part
		wantPairs int
		wantMet   int
	}{
		{
			name: "three reps paired in order",
			edit: func(r *Report) {
				setReps(r, "pkcs11-front", 1, []float64{120, 160, 150}, nil)
				setReps(r, "p11kit", 1, []float64{300, 300, 250}, nil)
			},
			ratio:     RatioFrontVsP11KitP50,
			wantPer:   []float64{0.4, 160.0 / 300, 0.6},
			wantLine:  "goal ≤ 0.5: met (rep by rep 0.40-0.60, met in 1 of 3)",
			wantPairs: 3, wantMet: 1,
		},
		{
			name: "a rep without a successful op is not paired",
			edit: func(r *Report) {
				setReps(r, "pkcs11-front", 1, []float64{120, 0, 150}, nil)
				setReps(r, "p11kit", 1, []float64{300, 300, 250}, nil)
			},
			ratio:     RatioFrontVsP11KitP50,
			wantPer:   []float64{0.4, 0.6},
			wantLine:  "(rep by rep 0.40-0.60, met in 1 of 2)",
			wantPairs: 2, wantMet: 1,
		},
		{
			name: "one pair: no range",
			edit: func(r *Report) {
				setReps(r, "software-wal", 8, nil, []float64{18000})
				setReps(r, "software-nojournal", 8, nil, []float64{20000, 21000, 19000})
			},
			ratio:     RatioJournalVsOffOpsG8,
			wantPer:   []float64{0.9},
			wantPairs: 1, wantMet: 1,
		},
		{
			name: "a reported ratio has a range but no count",
			edit: func(r *Report) {
				setReps(r, "software-fsync", 8, nil, []float64{8000, 9000})
				setReps(r, "software-nojournal", 8, nil, []float64{20000, 20000})
			},
			ratio:     RatioFsyncVsOffOpsG8,
			wantPer:   []float64{0.4, 0.45},
			wantLine:  "reported (no goal) (rep by rep 0.40-0.45)\n",
			wantPairs: 2,
		},
		{
			name:  "no reps recorded",
			edit:  func(*Report) {},
			ratio: RatioFrontVsP11KitP50,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := handBuiltReport()
			tt.edit(r)
			r.ComputeRatios()
			got, ok := r.RepRatios[tt.ratio]
			if ok != (tt.wantPer != nil) || len(got) != len(tt.wantPer) {
				t.Fatalf("RepRatios[%s] = %v (present %v), want %v", tt.ratio, got, ok, tt.wantPer)
			}
			for i := range got {
				if math.Abs(got[i]-tt.wantPer[i]) > 1e-12 {
					t.Errorf("rep %d: %v, want %v", i, got[i], tt.wantPer[i])
				}
			}
			var g Goal
			for _, x := range r.Goals() {
				if x.Name == tt.ratio {
					g = x
				}
			}
			if g.RepPairs != tt.wantPairs || g.RepPairsMet != tt.wantMet {
				t.Errorf("goal: %d pairs, %d met; want %d, %d", g.RepPairs, g.RepPairsMet, tt.wantPairs, tt.wantMet)
			}
			var b bytes.Buffer
			if err := r.Markdown(&b); err != nil {
				t.Fatal(err)
			}
			var line string
			for _, l := range strings.SplitAfter(b.String(), "\n") {
				if strings.HasPrefix(l, "- "+tt.ratio+" ") {
					line = l
				}
			}
			switch {
			case tt.wantLine == "" && strings.Contains(line, "rep by rep"):
				t.Errorf("line %q has a rep-by-rep range", line)
			case tt.wantLine != "" && !strings.Contains(line, tt.wantLine):
				t.Errorf("line %q lacks %q", line, tt.wantLine)
			}
		})
	}
}

// A goal whose scenarios had failed ops is not met, whatever its figure:
// only successes have latencies, so a signer failing 19 of 20 requests at
// once read as fast as direct, and the p50 goal as met.
func TestGoalWithFailedOpsIsNotMet(t *testing.T) {
	r := &Report{Results: []Result{
		{Scenario: ScenarioDirect, Key: KeyECDSAP256, Conns: 1, Reps: 1, Ops: 3460, P50us: 1000, OpsPerS: 1000, RepP50us: []float64{1000}},
		{Scenario: ScenarioAgentUnix, Key: KeyECDSAP256, Conns: 1, Reps: 1, Ops: 173, Errors: 3287, P50us: 1010, OpsPerS: 50, RepP50us: []float64{1010}},
	}}
	r.ComputeRatios()
	for _, g := range r.Goals() {
		if g.Name != RatioAgentVsDirectP50 {
			continue
		}
		if g.Met() || g.Failed != 3287 || !strings.Contains(g.status(), "3287 ops failed") {
			t.Fatalf("%s: met %v, failed %d, status %q", g.Name, g.Met(), g.Failed, g.status())
		}
		return
	}
	t.Fatal("no agent_vs_direct_p50 goal")
}

// The printed figure sides with the verdict: rounded to two decimals,
// 0.8996 read "0.90, goal ≥ 0.9: NOT met".
func TestGoalFigureSidesWithTheVerdict(t *testing.T) {
	r := &Report{Results: []Result{
		{Scenario: ScenarioSoftwareWAL, Key: KeyECDSAP256, Conns: 8, Reps: 1, Ops: 1, OpsPerS: 8996},
		{Scenario: ScenarioSoftwareNoJournal, Key: KeyECDSAP256, Conns: 8, Reps: 1, Ops: 1, OpsPerS: 10000},
	}}
	r.ComputeRatios()
	var b bytes.Buffer
	if err := r.Markdown(&b); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(b.String(), "- "+RatioJournalVsOffOpsG8+" (") || !strings.Contains(b.String(), "0.8996, goal ≥ 0.9: NOT met") {
		t.Fatalf("the goal line does not print 0.8996:\n%s", b.String())
	}
}

// The rep-by-rep range sides with its count too: reps of 0.8996 and 0.95
// against ≥ 0.9 read "0.90-0.95, met in 1 of 2", two reps seemingly met.
func TestRepRangeSidesWithTheCount(t *testing.T) {
	tests := []struct {
		name string
		wal  []float64 // software-wal ops/s rep by rep, against 10000
		want string
	}{
		{"the low end misses", []float64{8996, 9500}, "rep by rep 0.8996-0.95, met in 1 of 2"},
		{"the high end meets", []float64{8500, 9000.4}, "rep by rep 0.85-0.90, met in 1 of 2"},
		{"the high end misses", []float64{8500, 8999.6}, "rep by rep 0.85-0.899960, met in 0 of 2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			off := []float64{10000, 10000}
			r := &Report{Results: []Result{
				{Scenario: ScenarioSoftwareWAL, Key: KeyECDSAP256, Conns: 8, Reps: 2, Ops: 1, OpsPerS: Median(tt.wal), RepOpsPerS: tt.wal},
				{Scenario: ScenarioSoftwareNoJournal, Key: KeyECDSAP256, Conns: 8, Reps: 2, Ops: 1, OpsPerS: Median(off), RepOpsPerS: off},
			}}
			r.ComputeRatios()
			var b bytes.Buffer
			if err := r.Markdown(&b); err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(b.String(), tt.want) {
				t.Fatalf("want %q in:\n%s", tt.want, b.String())
			}
		})
	}
}
