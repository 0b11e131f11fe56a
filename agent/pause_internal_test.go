package agent

import (
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/policy"
	"github.com/sigil-agent/sigil/proto"
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

func (p operatorFirst) Pause(tenant, slot string, rec *journal.Record) error {
	op := p.a.eventRecord("pause", tenant+"/"+slot, proto.OK, "by operator")
	if err := p.operator.Pause(tenant, slot, &op); err != nil {
		return err
	}
	return p.pauser.Pause(tenant, slot, rec)
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

// A Sign that resolved its slot's key before an incident drill and reaches
// the policy's check after the drill resumed the slot is refused: it was
// not in flight when the drill's pause waited, so without a second look it
// signed with the key the drill had just retired.
func TestSignResolvedBeforeADrillIsRefused(t *testing.T) {
	const slot = "payments/release"
	a, _ := drillAgent(t)
	ctx := context.Background()
	defer a.Shutdown(ctx)
	srv, cli := net.Pipe()
	defer srv.Close()
	defer cli.Close()
	c := newConn(a, srv, false)
	c.helloDone = true
	c.peer = peer{unix: true, uid: uint32(os.Getuid()), gid: uint32(os.Getgid())}
	c.peerName = c.peer.String()
	digest := sha256.Sum256([]byte("released after the drill"))
	req := &proto.Request{ID: 1, Op: proto.OpSign, Key: "release", Scheme: proto.SchemeECDSA, Hash: proto.HashSHA256, Digest: digest[:]}

	// The first half of decideAndSign: the slot's key is resolved.
	target, tenant, err := c.resolve(req.Key, req.KID, false)
	if err != nil {
		t.Fatal(err)
	}
	old := target.key
	// The whole drill runs before this request's policy check.
	o, err := a.rotateOptions(slot, "incident drill", "test")
	if err != nil {
		t.Fatal(err)
	}
	o.Emergency = true
	rep, err := a.rot.Drill(ctx, slot, pauser{a: a, by: "incident drill by test", own: new(uint64)}, o)
	if err != nil || !rep.Resumed {
		t.Fatalf("drill: %v (resumed %v)", err, rep.Resumed)
	}

	d := signDecision{start: time.Now(), keyName: req.Key, digest: req.Digest, tenant: tenant, target: target}
	var fence policy.Decision
	sig, err := c.decideResolved(ctx, req, &d, &fence)
	fence.Done()
	if err == nil {
		verdict := "a signature that does not verify under the retired key"
		if ecdsa.VerifyASN1(old.info.Public.(*ecdsa.PublicKey), digest[:], sig) {
			verdict = "a signature by the retired key"
		}
		t.Fatalf("after the drill the request got %s (kid %s)", verdict, old.info.KID)
	}
	if codeOf(err) != proto.Unavailable {
		t.Fatalf("err = %v (%s), want UNAVAILABLE", err, codeOf(err))
	}
	// The retry resolves the drill's new key and signs with it.
	d = signDecision{start: time.Now(), keyName: req.Key, digest: req.Digest}
	fence = policy.Decision{}
	sig, err = c.decideAndSign(ctx, req, &d, &fence)
	fence.Done()
	if err != nil {
		t.Fatalf("the retry: %v", err)
	}
	if d.target.key == old || !ecdsa.VerifyASN1(d.target.key.info.Public.(*ecdsa.PublicKey), digest[:], sig) {
		t.Fatal("the retry did not sign with the drill's new key")
	}
}
