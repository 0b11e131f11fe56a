package rotation

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/providers"
)

// A failed drill's statement tells the operator how to lift the pause
// with a command that exists, `sigil admin resume`, and the slot in it
// as typed: a slot name with "_" (the policy allows it) used to come out
// as "pay\_ments" inside the code span, and the command as "sigil
// resume", which the CLI does not have.
func TestIncidentStatementNamesTheResumeCommand(t *testing.T) {
	const slot = "pay_ments/re_lease"
	st := string(renderIncident(&incident{slot: slot, started: t0, ended: t0, firstSeq: 7, err: errors.New("rotate: keygen failed")}))
	want := "`sigil admin resume " + slot + "`"
	if !strings.Contains(st, want) {
		t.Fatalf("the statement lacks %s:\n%s", want, st)
	}
}

// The statement restates the manifest's times as the manifest has them:
// it used to cut them to whole seconds, so a T1 of 09:00:00.9 read as
// 09:00:00 in the statement and differently in the signed JSON.
func TestREPStatementShowsTheManifestsTimes(t *testing.T) {
	e := newEnv(t, providers.KeyEd25519)
	e.clock.Advance(1500 * time.Millisecond)
	o := e.opts()
	res, err := e.rot.Rotate(context.Background(), testSlot, o)
	if err != nil {
		t.Fatal(err)
	}
	m, err := VerifyREP(res.Manifest, res.Signature, e.rot.EvidencePublicKey())
	if err != nil {
		t.Fatal(err)
	}
	var raw struct {
		StartedAt   string `json:"started_at"`
		CutoverAt   string `json:"cutover_at"`
		CompletedAt string `json:"completed_at"`
		Old         struct{ T1 string }
		New         struct{ Activated string }
	}
	if err := json.Unmarshal(res.Manifest, &raw); err != nil {
		t.Fatal(err)
	}
	st := string(RenderREPStatement(m))
	for _, c := range []struct{ name, manifest string }{
		{"started_at", raw.StartedAt},
		{"cutover_at", raw.CutoverAt},
		{"completed_at", raw.CompletedAt},
		{"old t1", raw.Old.T1},
		{"new activated", raw.New.Activated},
	} {
		if !strings.Contains(st, c.manifest) {
			t.Errorf("%s: the statement does not show the manifest's %s", c.name, c.manifest)
		}
	}
}
