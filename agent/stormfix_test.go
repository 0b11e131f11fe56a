package agent_test

import (
	"context"
	"encoding/json"
	"os"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

// okSignsAfterRetire returns the OK sign records of payments that the
// journal holds after a retire record: signatures released by a key the
// agent had already retired.
func okSignsAfterRetire(t *testing.T, admin *client.Client) []string {
	t.Helper()
	recs, err := admin.AuditTail(context.Background(), "payments", 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	retired := map[string]bool{}
	for _, raw := range recs {
		var rec struct {
			Op, KID, Detail string
			CodeName        string `json:"code_name"`
		}
		json.Unmarshal(raw, &rec)
		switch {
		case rec.Op == "retire" && rec.CodeName == "OK":
			retired[rec.KID] = true
		case rec.Op == "sign" && rec.CodeName == "OK" && retired[rec.KID]:
			out = append(out, string(raw))
		}
	}
	return out
}

// A drill of a slot its policy file pauses (the drill then neither pauses
// nor resumes it) releases no signature by the key it retires: one the
// policy allowed before a reload paused the slot in its file, still in
// its provider when the drill retires the key, is withheld. Before, it
// was released with an OK record after the drill's retire record, a
// signature of a key retired in an incident.
func TestDrillOfAFilePausedSlotReleasesNoSignatureOfTheKeyItRetired(t *testing.T) {
	h, cfg, r, admin := heldAgent(t)
	signed := holdOneSign(t, h, r)
	if err := os.WriteFile(cfg.Policy, []byte(heldPolicy("paused: true")), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := r.agent.ReloadPolicy(); err != nil {
		t.Fatal(err)
	}
	drilled := make(chan error, 1)
	go func() { _, err := admin.IncidentDrill(context.Background(), "payments/release"); drilled <- err }()
	var derr error
	select {
	case derr = <-drilled:
		h.release()
	case <-time.After(500 * time.Millisecond):
		// The drill waits for the signature in flight: as good.
		h.release()
		derr = <-drilled
	}
	if derr != nil {
		t.Fatalf("drill: %v", derr)
	}
	err := <-signed
	if bad := okSignsAfterRetire(t, admin); len(bad) > 0 {
		t.Fatalf("the Sign in flight got %v; signatures journaled OK after their key's retirement:\n%s", err, bad)
	}
	if err != nil && client.Code(err) != proto.Unavailable {
		t.Fatalf("the Sign in flight: %v, want it released before the retirement or UNAVAILABLE", err)
	}
}
