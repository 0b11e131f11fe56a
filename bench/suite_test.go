package bench

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A wanted scenario that cannot be set up (local-kms not installed,
// libsigil-pkcs11.so not built) is in the report as not run, with why, at
// every connection count: it neither vanishes from the table nor passes.
func TestRunSuiteReportsWhatCannotBeSetUp(t *testing.T) {
	t.Setenv("LOCAL_KMS_BIN", filepath.Join(t.TempDir(), "no-local-kms"))
	sigil := buildSigil(t) // alone in its directory: no libsigil-pkcs11.so beside it
	o := SuiteOptions{
		Options:   Options{Conns: []int{1, 2}, Duration: 20 * time.Millisecond, Warmup: -1, Reps: 1},
		Sigil:     sigil,
		Keys:      []string{KeyECDSAP256},
		Scenarios: []string{ScenarioAWSKMS, ScenarioPKCS11Front, ScenarioSoftware},
		Log:       testLog{t},
	}
	report, err := RunSuite(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []struct{ scenario, why string }{
		{ScenarioAWSKMS, "no-local-kms"},
		{ScenarioPKCS11Front, "libsigil-pkcs11.so"},
	} {
		for _, conns := range o.Conns {
			r, ok := report.Find(want.scenario, KeyECDSAP256, conns)
			if !ok || r.Reps != 0 || !strings.Contains(r.Err, want.why) {
				t.Errorf("%s@%d: found %v, reps %d, err %q; want not run, naming %q", want.scenario, conns, ok, r.Reps, r.Err, want.why)
			}
		}
	}
	if r, _ := report.Find(ScenarioSoftware, KeyECDSAP256, 1); !r.ran() {
		t.Errorf("software@1 did not run: %+v", r)
	}
	var md bytes.Buffer
	if err := report.Markdown(&md); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(md.String(), "| awskms | ecdsa-p256 | 1 | – | – | – | – | – | – | not run |") ||
		!strings.Contains(md.String(), "- pkcs11-front/ecdsa-p256@2: not run: ") {
		t.Errorf("the report does not show the skipped scenarios as not run:\n%s", md.String())
	}
	for _, g := range report.Goals() {
		if g.Name == RatioFrontVsP11KitOpsG8 && g.Measured {
			t.Errorf("%s measured without pkcs11-front", g.Name)
		}
	}
}

// The roundtrip scenario runs its echo in a process of its own (the sigil
// binary's hidden bench-echo command), whose CPU counts in the figures.
func TestRunSuiteRoundTrip(t *testing.T) {
	o := SuiteOptions{
		Options:   Options{Conns: []int{1, 2}, Duration: 100 * time.Millisecond, Warmup: -1, Reps: 1},
		Sigil:     buildSigil(t),
		Keys:      []string{KeyECDSAP256},
		Scenarios: []string{ScenarioRoundTrip},
		Log:       testLog{t},
	}
	report, err := RunSuite(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	for _, conns := range o.Conns {
		r, ok := report.Find(ScenarioRoundTrip, KeyNone, conns)
		if !ok || !r.ran() || r.Errors != 0 || r.CPUPerOpUs <= 0 {
			t.Errorf("roundtrip@%d: found %v, %+v", conns, ok, r)
		}
	}
}

// A sigil binary without the echo command (an older one, named by hand)
// leaves the roundtrip scenario not set up, said at once; the run goes on.
func TestRunSuiteRoundTripWithoutEcho(t *testing.T) {
	fake := filepath.Join(t.TempDir(), "sigil")
	if err := os.WriteFile(fake, []byte("#!/bin/sh\nexit 2\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	env := &Env{Dir: t.TempDir()}
	start := time.Now()
	if _, err := env.startEcho(context.Background(), fake); err == nil || !strings.Contains(err.Error(), "exited") {
		t.Fatalf("startEcho with a binary lacking %s: %v, want it to say the echo exited", EchoCommand, err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("startEcho took %v to see the echo exit", d)
	}
}
