package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"go.uber.org/zap/zaptest"
)

// drillAgent starts an agent (not serving) whose tenant payments has the
// slot release on a software key, rotation on, and returns it with its
// config; the caller shuts it down.
func drillAgent(t *testing.T) (*Agent, Config) {
	t.Helper()
	cfg, err := ParseConfig([]byte(`
providers:
  - id: soft
    type: software
    keys:
      - {name: default, type: ecdsa-p256}
`))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	cfg.DataDir = filepath.Join(dir, "state")
	cfg.Policy = filepath.Join(dir, "policy.yaml")
	cfg.Rotation.Canaries = 2
	policyText := fmt.Sprintf("admins: {unix_uids: [%d]}\ntenants:\n  - name: payments\n    identities: {unix_uids: [%d]}\n    slots:\n      - {name: release, key: default}\n", os.Getuid(), os.Getuid())
	if err := os.WriteFile(cfg.Policy, []byte(policyText), 0o600); err != nil {
		t.Fatal(err)
	}
	a, err := New(context.Background(), cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	return a, cfg
}

// operatorFirst is a drill's pauser before whose pause an operator pauses
// the slot: the operator's pause lands after the drill began and found
// the slot running, and before the drill's own pause.
type operatorFirst struct {
	pauser
	operator pauser
}

func (p operatorFirst) Pause(tenant, slot string) error {
	if err := p.operator.Pause(tenant, slot); err != nil {
		return err
	}
	return p.pauser.Pause(tenant, slot)
}

// An operator's pause that lands between a drill's "was it paused" check
// and the drill's own pause stands after the drill, and after a restart.
// The drill's pause used to take it over (the drill's pauser recorded the
// slot's pause as its own), so the drill's resume lifted the operator's
// pause, in memory and in the journal.
func TestDrillKeepsAPauseMadeJustBeforeItsOwn(t *testing.T) {
	const slot = "payments/release"
	a, cfg := drillAgent(t)
	ctx := context.Background()
	o, err := a.rotateOptions(slot, "incident drill", "test")
	if err != nil {
		t.Fatal(err)
	}
	o.Emergency = true
	p := operatorFirst{
		pauser:   pauser{a: a, by: "incident drill by test", own: new(uint64)},
		operator: pauser{a: a, by: "operator"},
	}
	rep, err := a.rot.Drill(ctx, slot, p, o)
	if err != nil {
		t.Fatalf("drill: %v", err)
	}
	if rep.Resumed || rep.Rotation == nil {
		t.Fatalf("the drill resumed the slot the operator paused (resumed %v, rotated %v)", rep.Resumed, rep.Rotation != nil)
	}
	if paused, _ := a.policy.Paused("payments", "release"); !paused {
		t.Fatal("after the drill the slot signs: the operator's pause was lifted")
	}
	if !rep.WasPaused || rep.PausedMeanwhile {
		t.Errorf("report: paused before the drill's pause %v, paused meanwhile %v; want true, false", rep.WasPaused, rep.PausedMeanwhile)
	}
	if err := a.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}

	a, err = New(ctx, cfg, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	defer a.Shutdown(ctx)
	if paused, _ := a.policy.Paused("payments", "release"); !paused {
		t.Fatal("after a restart the slot signs: the drill deleted the operator's stored pause")
	}
}
