package bench

import (
	"context"
	"math"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestRoundTripEcho runs the roundtrip scenario's workers against
// ServeEcho in this process: every op gets its bytes back, several
// connections at once, and the echo stops with its context.
func TestRoundTripEcho(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	sock := filepath.Join(t.TempDir(), "echo.sock")
	served := make(chan error, 1)
	go func() { served <- ServeEcho(ctx, sock) }()
	if err := waitForSocket(ctx, "unix", sock, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	sc := RoundTripScenario(sock, nil)
	if sc.Name != ScenarioRoundTrip || sc.Key != KeyNone {
		t.Fatalf("scenario %s/%s", sc.Name, sc.Key)
	}
	done := make(chan error, 3)
	for range 3 {
		go func() {
			op, closeFn, err := sc.NewWorker(ctx)
			if err != nil {
				done <- err
				return
			}
			defer closeFn()
			for range 200 {
				if err := op(ctx); err != nil {
					done <- err
					return
				}
			}
			done <- nil
		}()
	}
	for range 3 {
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	}
	cancel()
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("ServeEcho after cancel: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ServeEcho did not return after its context ended")
	}
}

// TestGoalReach works out each goal's best figure from the direct and
// roundtrip floors of a hand-built run, and says which goals they put out
// of reach.
func TestGoalReach(t *testing.T) {
	floors := func(r *Report) {
		for i := range r.Results {
			if r.Results[i].Scenario == ScenarioDirect {
				r.Results[i].CPUPerOpUs = 100 // at 1 and 8
			}
		}
		r.Results = append(r.Results,
			Result{Scenario: ScenarioRoundTrip, Key: KeyNone, Conns: 1, Reps: 3, P50us: 20, OpsPerS: 50000, CPUPerOpUs: 30, Ops: 1},
			Result{Scenario: ScenarioRoundTrip, Key: KeyNone, Conns: 8, Reps: 3, P50us: 60, OpsPerS: 60000, CPUPerOpUs: 25, Ops: 1},
		)
	}
	// Cores 2: at most 2e6 / (100 + 25) = 16000 signatures/s.
	const ceiling = 16000.0
	tests := []struct {
		name string
		edit func(*Report)
		want map[string]float64 // goal → Reach; absent: 0
		out  []string           // goals out of reach
	}{
		{
			name: "floors measured",
			edit: floors,
			want: map[string]float64{
				RatioAgentVsDirectP50:   90.0 / 70,
				RatioAgentVsDirectOpsG8: ceiling / 14000,
				RatioP11KitVsAgentP50:   349.0 / 90,
				RatioAgentVsP11KitOpsG8: ceiling / 4400,
				RatioFrontVsP11KitOpsG8: ceiling / 4400,
				RatioFrontVsP11KitP50:   90.0 / 349,
			},
		},
		{
			name: "p11-kit fast enough to put the front's p50 goal out of reach",
			edit: func(r *Report) {
				floors(r)
				for i, res := range r.Results {
					if res.Scenario == ScenarioP11Kit && res.Conns == 1 {
						r.Results[i].P50us = 170
					}
				}
			},
			want: map[string]float64{
				RatioAgentVsDirectP50:   90.0 / 70,
				RatioAgentVsDirectOpsG8: ceiling / 14000,
				RatioP11KitVsAgentP50:   170.0 / 90,
				RatioAgentVsP11KitOpsG8: ceiling / 4400,
				RatioFrontVsP11KitOpsG8: ceiling / 4400,
				RatioFrontVsP11KitP50:   90.0 / 170,
			},
			out: []string{RatioP11KitVsAgentP50, RatioFrontVsP11KitP50},
		},
		{name: "no roundtrip: no reach", edit: func(*Report) {}},
		{
			name: "a failed roundtrip op: no reach from it",
			edit: func(r *Report) {
				floors(r)
				for i := range r.Results {
					if r.Results[i].Scenario == ScenarioRoundTrip {
						r.Results[i].Errors = 1
					}
				}
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := handBuiltReport()
			tt.edit(r)
			r.ComputeRatios()
			var out []string
			for _, g := range r.Goals() {
				if want := tt.want[g.Name]; math.Abs(g.Reach-want) > 1e-9 {
					t.Errorf("%s: reach %v, want %v", g.Name, g.Reach, want)
				}
				if g.OutOfReach() {
					out = append(out, g.Name)
				}
			}
			if strings.Join(out, ",") != strings.Join(tt.out, ",") {
				t.Errorf("out of reach %v, want %v", out, tt.out)
			}
			var md strings.Builder
			if err := r.Markdown(&md); err != nil {
				t.Fatal(err)
			}
			if got := strings.Contains(md.String(), "at best"); got != (len(tt.want) > 0) {
				t.Errorf("markdown says \"at best\": %v, want %v", got, len(tt.want) > 0)
			}
			for _, name := range tt.out {
				if !strings.Contains(md.String(), "out of reach") || !strings.Contains(lineOf(md.String(), name), "out of reach") {
					t.Errorf("markdown line of %s does not say out of reach:\n%s", name, lineOf(md.String(), name))
				}
			}
		})
	}
}

func lineOf(s, prefix string) string {
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, "- "+prefix+" ") {
			return l
		}
	}
	return ""
}
