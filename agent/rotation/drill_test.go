package rotation

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/zeebo/blake3"

	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/providers"
)

// fakePauser records Pause and Resume calls, as the agent's pauser would
// take them: a slot paused already it leaves alone. It journals the
// change's record in j, as the agent's pauser commits it with the stored
// pause.
type fakePauser struct {
	j      *journal.Journal
	mu     sync.Mutex
	paused map[string]bool
	calls  []string
}

func (p *fakePauser) Pause(tenant, slot string, rec *journal.Record) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.paused == nil {
		p.paused = map[string]bool{}
	}
	if p.paused[tenant+"/"+slot] {
		return ErrPausedAlready
	}
	p.paused[tenant+"/"+slot] = true
	p.calls = append(p.calls, "pause "+tenant+"/"+slot)
	return p.j.Append(context.Background(), rec)
}

func (p *fakePauser) Resume(tenant, slot string, rec *journal.Record) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.paused[tenant+"/"+slot] = false
	p.calls = append(p.calls, "resume "+tenant+"/"+slot)
	return p.j.Append(context.Background(), rec)
}

func (p *fakePauser) isPaused(slot string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.paused[slot]
}

// pauseCheckingSigner signs through the provider, records whether the slot
// was paused at each signature, and journals a refused client signature
// per call, as the agent would for a signer hitting PAUSED meanwhile.
type pauseCheckingSigner struct {
	inner          Signer
	pauser         *fakePauser
	j              *journal.Journal
	signedUnpaused int
}

func (s *pauseCheckingSigner) Sign(ctx context.Context, key string, alg providers.Algorithm, digest []byte) ([]byte, error) {
	if !s.pauser.isPaused(testSlot) {
		s.signedUnpaused++
	} else if err := s.j.Append(ctx, &journal.Record{Tenant: "payments", Slot: testSlot, Op: "sign", Code: 10, CodeName: "PAUSED", Peer: "uid:1001"}); err != nil {
		return nil, err
	}
	return s.inner.Sign(ctx, key, alg, digest)
}

// A drill of a slot paused before it (an operator's pause) neither pauses
// nor resumes it: the slot stays paused, and the statement says so.
func TestDrillOfAPausedSlotLeavesItPaused(t *testing.T) {
	e := newEnv(t, providers.KeyECDSAP256)
	p := &fakePauser{j: e.j, paused: map[string]bool{testSlot: true}}
	o := e.opts()
	o.Signer = &pauseCheckingSigner{inner: e.soft, pauser: p, j: e.j}
	rep, err := e.rot.Drill(context.Background(), testSlot, p, o)
	if err != nil {
		t.Fatalf("Drill: %v", err)
	}
	if len(p.calls) != 0 || !p.isPaused(testSlot) {
		t.Fatalf("pauser calls %v, paused %v; want none, and still paused", p.calls, p.isPaused(testSlot))
	}
	if rep.Resumed || !rep.WasPaused || rep.Rotation == nil {
		t.Fatalf("report %+v", rep)
	}
	if !strings.Contains(string(rep.Statement), "stays **paused**") {
		t.Fatalf("the statement does not say the slot stays paused:\n%s", rep.Statement)
	}
}

func TestDrill(t *testing.T) {
	e := newEnv(t, providers.KeyECDSAP256)
	e.rotate() // v1 accepted until its T1, v2 active
	v1, _ := e.store.Get(testSlot)
	old := e.active()
	p := &fakePauser{j: e.j}
	signer := &pauseCheckingSigner{inner: e.soft, pauser: p, j: e.j}
	o := e.opts()
	o.Signer, o.Peer = signer, "admin uid:0"
	rep, err := e.rot.Drill(context.Background(), testSlot, p, o)
	if err != nil {
		t.Fatalf("Drill: %v", err)
	}
	if want := []string{"pause " + testSlot, "resume " + testSlot}; !slices.Equal(p.calls, want) {
		t.Fatalf("pauser calls %v, want %v", p.calls, want)
	}
	if signer.signedUnpaused != 0 {
		t.Fatalf("%d signatures of the drill made while the slot was not paused", signer.signedUnpaused)
	}
	if !rep.Resumed || rep.Rotation == nil || rep.Rotation.New.Number != 3 {
		t.Fatalf("report %+v", rep)
	}

	// Emergency: the old version stopped verifying at once and is retired,
	// and so is v1, which was still accepted.
	sl, _ := e.store.Get(testSlot)
	for _, kid := range []string{old.KID, v1.Versions[0].KID} {
		if _, err := e.store.VersionForVerify(testSlot, kid, e.clock.Now()); !errors.Is(err, ErrKeyRetired) {
			t.Fatalf("kid %s after the drill: %v", kid, err)
		}
	}
	for _, n := range []int{1, 2} {
		if v, _ := sl.Version(n); v.State != StateRetired {
			t.Fatalf("v%d after the drill: %s", n, v.State)
		}
	}
	if _, err := e.rot.Rollback(context.Background(), testSlot, RollbackOptions{}); !errors.Is(err, ErrKeyRetired) {
		t.Fatalf("rollback after an emergency rotation: %v", err)
	}
	m, err := VerifyREP(rep.Rotation.Manifest, rep.Rotation.Signature, e.rot.EvidencePublicKey())
	if err != nil || !m.Emergency || m.Overlap != "0s" || !m.Canary.AllVerified {
		t.Fatalf("drill REP: %v %+v", err, m)
	}

	// Every step journaled, in order (rollback's refusal comes after).
	var drillOps []string
	for _, r := range e.records() {
		if r.Seq >= rep.FirstSeq && r.Seq <= rep.LastSeq && r.Op != "sign" {
			drillOps = append(drillOps, r.Op)
		}
	}
	want := []string{"drill.start", "pause", "rotate.start", "rotate.keygen", "rotate.csr", "rotate", "canary", "retire", "rotate.rep", "resume", "drill.done"}
	if !slices.Equal(drillOps, want) {
		t.Fatalf("drill records %v\nwant %v", drillOps, want)
	}

	// The statement: from the journal, written, stored, hashed in the closing record.
	st := string(rep.Statement)
	for _, want := range []string{"Incident drill statement", testSlot, "completed", old.KID, rep.Rotation.New.KID,
		"rotate.keygen", "canary", "retire", "10/10 verified", "`PAUSED`", "resumed"} {
		if !strings.Contains(st, want) {
			t.Errorf("statement lacks %q:\n%s", want, st)
		}
	}
	if got, err := os.ReadFile(rep.StatementFile); err != nil || !bytes.Equal(got, rep.Statement) {
		t.Fatalf("statement file: %v", err)
	}
	if got, err := e.store.IncidentStatement(testSlot, rep.FirstSeq); err != nil || !bytes.Equal(got, rep.Statement) {
		t.Fatalf("stored statement: %v", err)
	}
	sum := blake3.Sum256(rep.Statement)
	last := e.records()
	closing := last[slices.IndexFunc(last, func(r journal.Record) bool { return r.Op == "drill.done" })]
	if !strings.Contains(closing.Detail, fmt.Sprintf("%x", sum)) {
		t.Fatalf("closing record %q does not quote the statement hash", closing.Detail)
	}
}

// cancellingPauser cancels the drill's context when the drill resumes the
// slot: the operator's command went away near the end.
type cancellingPauser struct {
	fakePauser
	cancel context.CancelFunc
}

func (p *cancellingPauser) Resume(tenant, slot string, rec *journal.Record) error {
	p.cancel()
	return p.fakePauser.Resume(tenant, slot, rec)
}

// A drill whose caller goes away after the rotation still writes its
// statement and closing record.
func TestDrillOutlivesItsCaller(t *testing.T) {
	e := newEnv(t, providers.KeyECDSAP256)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	p := &cancellingPauser{fakePauser: fakePauser{j: e.j}, cancel: cancel}
	rep, err := e.rot.Drill(ctx, testSlot, p, e.opts())
	if err != nil {
		t.Fatalf("Drill: %v", err)
	}
	recs := e.records()
	if last := recs[len(recs)-1]; last.Op != "drill.done" || last.Seq != rep.LastSeq {
		t.Fatalf("closing record %s (seq %d, report %d)", last.Op, last.Seq, rep.LastSeq)
	}
	if got, err := e.store.IncidentStatement(testSlot, rep.FirstSeq); err != nil || !bytes.Equal(got, rep.Statement) {
		t.Fatalf("stored statement: %v", err)
	}
}

func TestDrillFailureLeavesSlotPaused(t *testing.T) {
	e := newEnv(t, providers.KeyEd25519)
	old := e.active()
	p := &fakePauser{j: e.j}
	o := e.opts()
	o.Maker = failingMaker{fmt.Errorf("generate: %w", providers.ErrUnavailable)}
	rep, err := e.rot.Drill(context.Background(), testSlot, p, o)
	var se *StepError
	if !errors.As(err, &se) || se.Step != StepKeygen {
		t.Fatalf("Drill: %v, want the keygen step error", err)
	}
	if !p.isPaused(testSlot) || rep.Resumed || len(p.calls) != 1 {
		t.Fatalf("slot resumed after a failed drill: %v", p.calls)
	}
	if e.active().KID != old.KID {
		t.Fatal("failed drill changed the active version")
	}
	recs := e.records()
	if last := recs[len(recs)-1]; last.Op != "drill.failed" || last.CodeName != "UNAVAILABLE" || last.Seq != rep.LastSeq {
		t.Fatalf("closing record %s %s", last.Op, last.CodeName)
	}
	for _, want := range []string{"FAILED", "paused", "rotate.failed", "sigil admin resume " + testSlot} {
		if !strings.Contains(string(rep.Statement), want) {
			t.Errorf("statement lacks %q:\n%s", want, rep.Statement)
		}
	}
}

// meanwhilePauser is a Pauser whose slot someone pauses again while the
// drill runs: its Resume refuses, as the agent's does for a drill.
type meanwhilePauser struct{ fakePauser }

func (p *meanwhilePauser) Resume(tenant, slot string, _ *journal.Record) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.calls = append(p.calls, "resume refused "+tenant+"/"+slot)
	return ErrPausedMeanwhile
}

// A pause someone made during the drill stands: the drill does not resume
// the slot, succeeds, and the statement says the slot stays paused.
func TestDrillLeavesAPauseMadeDuringIt(t *testing.T) {
	e := newEnv(t, providers.KeyECDSAP256)
	p := &meanwhilePauser{fakePauser{j: e.j}}
	o := e.opts()
	o.Signer = &pauseCheckingSigner{inner: e.soft, pauser: &p.fakePauser, j: e.j}
	rep, err := e.rot.Drill(context.Background(), testSlot, p, o)
	if err != nil {
		t.Fatalf("Drill: %v", err)
	}
	if !p.isPaused(testSlot) || rep.Resumed || !rep.PausedMeanwhile || rep.WasPaused || rep.Rotation == nil {
		t.Fatalf("paused %v, report %+v", p.isPaused(testSlot), rep)
	}
	if !strings.Contains(string(rep.Statement), "paused again during the drill and stays **paused**") {
		t.Fatalf("the statement does not say the slot stays paused:\n%s", rep.Statement)
	}
}
