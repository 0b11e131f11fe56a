package agent_test

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/software"
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

// gatedProvider is a software provider that makes key versions, like
// heldProvider, and holds the next Sign of a key whose name starts with a
// gate's prefix until the test opens that gate: two calls held apart.
type gatedProvider struct {
	versioningSoftware
	mu    sync.Mutex
	gates map[string]*signGate
}

type signGate struct {
	entered, letGo chan struct{}
	once           sync.Once
	corrupt        bool // the held call's signature comes back with a byte flipped
}

// open lets the held call go (once).
func (gt *signGate) open() { gt.once.Do(func() { close(gt.letGo) }) }

func newGatedProvider(t *testing.T) *gatedProvider {
	t.Helper()
	sp, err := software.Open(software.Config{ID: "gated", DataDir: t.TempDir(), Keys: []software.KeyConfig{{Name: "hkey", Type: providers.KeyECDSAP256}}})
	if err != nil {
		t.Fatal(err)
	}
	return &gatedProvider{versioningSoftware: versioningSoftware{sp, "gated"}, gates: map[string]*signGate{}}
}

// gate holds the next Sign of a key named prefix…
func (g *gatedProvider) gate(t *testing.T, prefix string) *signGate {
	gt := &signGate{entered: make(chan struct{}, 1), letGo: make(chan struct{})}
	t.Cleanup(gt.open)
	g.mu.Lock()
	g.gates[prefix] = gt
	g.mu.Unlock()
	return gt
}

func (g *gatedProvider) Sign(ctx context.Context, key string, alg providers.Algorithm, digest []byte) ([]byte, error) {
	g.mu.Lock()
	var gt *signGate
	for prefix, x := range g.gates {
		if strings.HasPrefix(key, prefix) {
			gt = x
			delete(g.gates, prefix)
		}
	}
	g.mu.Unlock()
	if gt != nil {
		gt.entered <- struct{}{}
		select {
		case <-gt.letGo:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	sig, err := g.Provider.Sign(ctx, key, alg, digest)
	if err == nil && gt != nil && gt.corrupt {
		sig[len(sig)/2] ^= 0xff
	}
	return sig, err
}

func waitEntered(t *testing.T, gt *signGate, what string) {
	t.Helper()
	select {
	case <-gt.entered:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s did not reach the provider", what)
	}
}

// An operator's resume during an incident drill is refused (UNAVAILABLE)
// until the drill ends: it let the slot sign again while the drill
// rotated, and a signature allowed then, by the key the drill's emergency
// cut-over retires, came out after the drill's retire record, journaled
// OK (the storm test's finding). A Sign meanwhile is PAUSED; the drill
// resumes the slot itself, on its new key.
func TestOperatorResumeDuringADrillIsRefused(t *testing.T) {
	held := drillHeldAtItsCSR(t, heldPolicy(""))
	r, csr, drilled, ctx := held.r, held.csr, held.drilled, context.Background()
	operator := r.serveAdminAgain(t, held.cfg.AdminSocket)
	if _, err := operator.Resume(ctx, "payments/release"); client.Code(err) != proto.Unavailable {
		t.Fatalf("an operator's resume during the drill: %v, want UNAVAILABLE", err)
	}
	c := r.dial(t)
	d := sha256.Sum256([]byte("while the drill rotates"))
	if _, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:]); client.Code(err) != proto.Paused {
		t.Fatalf("a Sign during the drill: %v, want PAUSED", err)
	}
	csr.open()
	if err := <-drilled; err != nil {
		t.Fatalf("drill: %v", err)
	}
	if bad := okSignsAfterRetire(t, operator); len(bad) > 0 {
		t.Fatalf("signatures journaled OK after their key's retirement:\n%s", bad)
	}
	sig, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:])
	if err != nil {
		t.Fatalf("a Sign after the drill: %v", err)
	}
	k, err := c.PublicKey(ctx, client.ByName("release"))
	if err != nil || sig.KID != k.KID {
		t.Fatalf("after the drill the slot signs with kid %s, its public key is %s (%v)", sig.KID, k.KID, err)
	}
	if _, err := operator.Resume(ctx, "payments/release"); err != nil {
		t.Fatalf("an operator's resume after the drill: %v", err)
	}
}

// serveAdminAgain dials the admin socket serveAdmin serves.
func (r *running) serveAdminAgain(t *testing.T, path string) *client.Client {
	t.Helper()
	c, err := client.Dial(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// A reload that drops a slot while an incident drill runs on it leaves
// the drill a success: its rotation is done, and it lifts its own pause
// (in the journal), so the slot signs with the new key when a reload
// brings it back. Before, the drill's resume found no slot and the drill
// failed, INTERNAL and drill.failed, after its rotation, and the slot came
// back paused by nobody's choice.
func TestDrillOfASlotDroppedDuringItSucceeds(t *testing.T) {
	withSlot := heldPolicy("") + "      - {name: other, key: ed}\n"
	withoutSlot := strings.Replace(withSlot, "      - {name: release, key: hkey}\n", "", 1)
	d := drillHeldAtItsCSR(t, withSlot)
	r, cfg, csr, drilled := d.r, d.cfg, d.csr, d.drilled
	if err := os.WriteFile(cfg.Policy, []byte(withoutSlot), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := r.agent.ReloadPolicy(); err != nil {
		t.Fatal(err)
	}
	csr.open()
	if err := <-drilled; err != nil {
		t.Fatalf("drill: %v", err)
	}
	if err := os.WriteFile(cfg.Policy, []byte(withSlot), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := r.agent.ReloadPolicy(); err != nil {
		t.Fatal(err)
	}
	if err := releaseSigner("back")(r.dial(t)); err != nil {
		t.Fatalf("the slot brought back after the drill: %v", err)
	}
}

// A drill of a slot the policy does not have (a reload dropped it; the
// rotation state keeps it) is NOT_FOUND, as a rotation of a slot the
// store lacks is. It was INTERNAL.
func TestDrillOfASlotThePolicyLacksIsNotFound(t *testing.T) {
	h, cfg, r, admin := heldAgent(t)
	_ = h
	if err := os.WriteFile(cfg.Policy, []byte(releasePolicy("ed", "")), 0o600); err != nil {
		t.Fatal(err)
	}
	p := strings.Replace(releasePolicy("ed", ""), "name: release", "name: other", 1)
	if err := os.WriteFile(cfg.Policy, []byte(p), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := r.agent.ReloadPolicy(); err != nil {
		t.Fatal(err)
	}
	if _, err := admin.IncidentDrill(context.Background(), "payments/release"); client.Code(err) != proto.NotFound {
		t.Fatalf("drill of a slot the policy dropped: %v, want NOT_FOUND", err)
	}
}

// A policy reload that would lift the file pause of a slot whose drill is
// under way is refused until the drill ends: the drill found the slot
// paused by its file and took no pause of its own, so the reload let it
// sign while the drill rotated. Once the drill ends the same reload goes
// through.
func TestReloadLiftingADrilledSlotsFilePauseWaitsForTheDrill(t *testing.T) {
	held := drillHeldAtItsCSR(t, heldPolicy("paused: true"))
	r, cfg, admin, csr, drilled, ctx := held.r, held.cfg, held.admin, held.csr, held.drilled, context.Background()
	if err := os.WriteFile(cfg.Policy, []byte(heldPolicy("")), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := r.agent.ReloadPolicy(); err == nil || !strings.Contains(err.Error(), "incident drill of it is under way") {
		t.Fatalf("a reload lifting the file pause during the drill: %v, want it refused", err)
	}
	d := sha256.Sum256([]byte("while the drill rotates"))
	c := r.dial(t)
	if _, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:]); client.Code(err) != proto.Paused {
		t.Fatalf("a Sign during the drill: %v, want PAUSED", err)
	}
	csr.open()
	if err := <-drilled; err != nil {
		t.Fatalf("drill: %v", err)
	}
	if err := r.agent.ReloadPolicy(); err != nil {
		t.Fatalf("the reload after the drill: %v", err)
	}
	if _, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:]); err != nil {
		t.Fatalf("a Sign after the drill and the reload: %v", err)
	}
	if bad := okSignsAfterRetire(t, admin); len(bad) > 0 {
		t.Fatalf("signatures journaled OK after their key's retirement:\n%s", bad)
	}
}

// heldDrill is an agent on a gatedProvider, its policy file slotPolicy,
// with an incident drill of payments/release held at its CSR: the drill
// has paused the slot (unless the file pauses it) and made its new key.
type heldDrill struct {
	r       *running
	cfg     agent.Config
	admin   *client.Client
	csr     *signGate  // open() lets the drill go on
	drilled chan error // the drill's result
}

func drillHeldAtItsCSR(t *testing.T, policyYAML string) heldDrill {
	t.Helper()
	g := newGatedProvider(t)
	cfg := softwareConfig(t)
	cfg.DefaultKey = ""
	cfg.Policy = filepath.Join(t.TempDir(), "policy.yaml")
	cfg.AdminSocket = filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")
	cfg.Rotation.Canaries = 2
	if err := os.WriteFile(cfg.Policy, []byte(policyYAML), 0o600); err != nil {
		t.Fatal(err)
	}
	r := startAgent(t, cfg, agent.WithProviders(g))
	admin := r.serveAdmin(t, cfg.AdminSocket)
	d := heldDrill{r: r, cfg: cfg, admin: admin, csr: g.gate(t, "payments/release/"), drilled: make(chan error, 1)}
	go func() { _, err := admin.IncidentDrill(context.Background(), "payments/release"); d.drilled <- err }()
	waitEntered(t, d.csr, "the drill's CSR")
	return d
}

// A Sign by a rotation's new version, in its provider when a canary fails
// and the rotation reverts (the new version retired, the old one active
// again), is withheld UNAVAILABLE: released, it would be a signature by a
// version the journal retired before its record.
func TestSignByAVersionARevertRetiredIsWithheld(t *testing.T) {
	g := newGatedProvider(t)
	cfg := heldConfig(t)
	r := startAgent(t, cfg, agent.WithProviders(g))
	admin := r.serveAdmin(t, cfg.AdminSocket)
	ctx := context.Background()
	const newKey = "payments/release/" // the rotation's new version's key

	csr := g.gate(t, newKey)
	rotated := make(chan error, 1)
	go func() { rotated <- admin.Rotate(ctx, "payments/release") }()
	waitEntered(t, csr, "the rotation's CSR")
	canary := g.gate(t, newKey)
	canary.corrupt = true
	csr.open()
	waitEntered(t, canary, "the first canary") // cut over: v2 active
	c := r.dial(t)
	v2, err := c.PublicKey(ctx, client.ByName("release"))
	if err != nil {
		t.Fatal(err)
	}
	inFlight := g.gate(t, newKey)
	signed := make(chan error, 1)
	go func() {
		d := sha256.Sum256([]byte("by v2, while its canary fails"))
		_, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:])
		signed <- err
	}()
	waitEntered(t, inFlight, "the Sign by v2")
	canary.open()
	if err := <-rotated; err == nil {
		t.Fatal("the rotation succeeded with a canary that does not verify")
	}
	inFlight.open()
	if err := <-signed; client.Code(err) != proto.Unavailable {
		t.Fatalf("the Sign by v2 (kid %s), in flight at the revert: %v, want UNAVAILABLE", v2.KID, err)
	}
	for _, r := range auditOps(t, admin, "payments", "sign") {
		if r["kid"] == v2.KID && r["code_name"] == "OK" {
			t.Fatalf("a signature by the reverted v2 was journaled OK: %v", r)
		}
	}
}
