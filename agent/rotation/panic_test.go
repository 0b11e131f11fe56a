package rotation

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/software"
)

// panickyMaker is the software provider as a key maker that can attest
// and locate keys, with a bug in the call that `at` names ("" for none):
// it panics there, as a provider or a library under it can.
type panickyMaker struct {
	*software.Provider
	at atomic.Pointer[string]
}

func (m *panickyMaker) maybePanic(call string) {
	if p := m.at.Load(); p != nil && *p == call {
		panic(fmt.Sprintf("%s: bug holding PIN 1234", call))
	}
}

func (m *panickyMaker) GenerateKey(ctx context.Context, name string, kt providers.KeyType) (providers.KeyInfo, error) {
	m.maybePanic("generate")
	return m.Provider.GenerateKey(ctx, name, kt)
}

func (m *panickyMaker) URI(name string) (string, error) {
	m.maybePanic("uri")
	return "soft:" + name, nil
}

func (m *panickyMaker) Attest(context.Context, providers.KeyInfo) (Attestation, error) {
	m.maybePanic("attest")
	return Attestation{Format: "test", Data: []byte("attested")}, nil
}

func (m *panickyMaker) DestroyKey(ctx context.Context, name string, check func(providers.KeyInfo) error) error {
	m.maybePanic("destroy")
	return m.Provider.DestroyKey(ctx, name, check)
}

// Sign panics in its n-th call while `at` is "sign": the first is the
// CSR's, the later ones the canaries'.
type panickySigner struct {
	*panickyMaker
	n     int64
	calls atomic.Int64
}

func (s *panickySigner) Sign(ctx context.Context, key string, alg providers.Algorithm, digest []byte) ([]byte, error) {
	if s.calls.Add(1) == s.n {
		s.maybePanic("sign")
	}
	return s.panickyMaker.Provider.Sign(ctx, key, alg, digest)
}

// A provider's panic in a scheduled rotation fails that attempt at its
// step, journaled (rotate.failed, INTERNAL) and reverted where the new
// version had cut over, instead of ending the agent; the old version
// keeps signing, and the scheduler retries after RetryAfter as after any
// failed attempt.
func TestProviderPanicFailsTheRotationAttempt(t *testing.T) {
	for _, tc := range []struct {
		call     string
		signCall int64 // which Sign panics, for call "sign"
		step     string
		reverted bool
	}{
		{call: "generate", step: StepKeygen},
		{call: "uri", step: StepKeygen},
		{call: "attest", step: StepKeygen},
		{call: "sign", signCall: 1, step: StepCSR},
		{call: "sign", signCall: 3, step: StepCanary, reverted: true},
	} {
		t.Run(tc.step+" "+tc.call, func(t *testing.T) {
			e := newEnv(t, providers.KeyECDSAP256)
			core, logs := observer.New(zap.InfoLevel)
			rot, err := NewRotator(e.store, Options{EvidenceKey: e.evidence, EvidenceDir: e.evDir, Host: "test-host", Logger: zap.New(core)})
			if err != nil {
				t.Fatal(err)
			}
			m := &panickyMaker{Provider: e.soft}
			m.at.Store(&tc.call)
			signer := &panickySigner{panickyMaker: m, n: tc.signCall}
			s, err := NewScheduler(rot, SchedulerOptions{
				Calendars:  map[string]Calendar{testSlot: {Period: 720 * time.Hour}},
				RetryAfter: time.Hour,
				Options: func(string) (RotateOptions, error) {
					o := e.opts()
					o.Maker, o.Signer = m, signer
					return o, nil
				},
			})
			if err != nil {
				t.Fatal(err)
			}
			due := t0.Add(720 * time.Hour)
			e.clock.Set(due)
			rep, _ := s.Tick(context.Background())
			var se *StepError
			var pe *providers.PanicError
			if !errors.As(rep.Failed[testSlot], &se) || se.Step != tc.step || se.Reverted != tc.reverted || !errors.As(se, &pe) {
				t.Fatalf("the attempt: %v, want step %s failed with the panic (reverted %v)", rep.Failed[testSlot], tc.step, tc.reverted)
			}
			var last journal.Record
			for _, r := range e.records() {
				if r.Op == "rotate.failed" {
					last = r
				}
			}
			if last.CodeName != "INTERNAL" || !strings.Contains(last.Detail, "step "+tc.step+" failed") ||
				!strings.Contains(last.Detail, "panicked") || strings.Contains(last.Detail, "1234") {
				t.Fatalf("the failure's record: %s %s %q", last.Op, last.CodeName, last.Detail)
			}
			v := e.active()
			if v.Number != 1 {
				t.Fatalf("active v%d after the failed attempt, want v1", v.Number)
			}
			alg, in, sig := signWith(t, e.soft, v, []byte("after the panic"))
			if err := providers.Verify(v.Public, alg, in, sig); err != nil {
				t.Fatalf("v1 after the failed attempt: %v", err)
			}
			panics := logs.FilterMessageSnippet("panicked").FilterLevelExact(zapcore.ErrorLevel).All()
			if len(panics) != 1 || panics[0].ContextMap()["panic"] != "string" ||
				!strings.Contains(fmt.Sprint(panics[0].ContextMap()["stack"]), "maybePanic(...)") {
				t.Fatalf("the panic's log entries: %v", panics)
			}
			for _, l := range logs.All() {
				if strings.Contains(fmt.Sprint(l.Message, l.ContextMap()), "1234") {
					t.Fatalf("the log has the panic's value: %s %v", l.Message, l.ContextMap())
				}
			}

			// Retried after RetryAfter, not before; with the bug gone it
			// rotates.
			m.at.Store(nil)
			if rep := tick(t, e, s, due.Add(59*time.Minute)); len(rep.Rotated) != 0 {
				t.Fatal("retried before RetryAfter")
			}
			if rep := tick(t, e, s, due.Add(time.Hour)); len(rep.Rotated) != 1 || e.active().Number == 1 {
				t.Fatalf("not retried after RetryAfter: %+v", rep)
			}
		})
	}
}

// A panic in destroying a failed attempt's unused key keeps the key, as
// a destroy's error does, and the attempt fails at its own step.
func TestProviderPanicInDestroyKeepsTheKey(t *testing.T) {
	e := newEnv(t, providers.KeyECDSAP256)
	m := &panickyMaker{Provider: e.soft}
	destroy := "destroy"
	m.at.Store(&destroy)
	o := e.opts()
	o.Maker, o.Signer = m, failingSigner{errInjected}
	_, err := e.rot.Rotate(context.Background(), testSlot, o)
	var se *StepError
	if !errors.As(err, &se) || se.Step != StepCSR || !errors.Is(err, errInjected) {
		t.Fatalf("Rotate: %v, want the CSR step's own failure", err)
	}
	var destroyRec string
	for _, r := range e.records() {
		if r.Op == "rotate.destroy" {
			destroyRec = r.CodeName + " " + r.Detail
		}
	}
	if !strings.Contains(destroyRec, "panicked") {
		t.Fatalf("the destroy's record: %q, want the panic", destroyRec)
	}
	if _, err := e.soft.Sign(context.Background(), testSlot+"/v2", providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}, make([]byte, 32)); err != nil {
		t.Fatalf("the attempt's key was not kept: %v", err)
	}
	if v := e.active(); v.Number != 1 {
		t.Fatalf("active v%d, want v1", v.Number)
	}
}
