package rotation

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs/errorfs"

	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
)

// The seeds' acceptance: before T1 signatures by the old and the new
// version both verify; from T1 on the old one is KEY_RETIRED.
func TestAcceptanceDualVerifyThenRetired(t *testing.T) {
	for _, kt := range []providers.KeyType{providers.KeyEd25519, providers.KeyECDSAP256, providers.KeyRSA2048} {
		t.Run(string(kt), func(t *testing.T) {
			e := newEnv(t, kt)
			v1 := e.active()
			msg := []byte("release 1.2.3")
			alg1, in1, sig1 := signWith(t, e.soft, v1, msg)

			res := e.rotate()
			v2 := e.active()
			if v2.Number != 2 || v2.KID == v1.KID || res.New.KID != v2.KID {
				t.Fatalf("after rotation active is v%d %s, result says %s", v2.Number, v2.KID, res.New.KID)
			}
			alg2, in2, sig2 := signWith(t, e.soft, v2, msg)
			t1 := t0.Add(DefaultOverlap)

			for _, tc := range []struct {
				name string
				at   time.Time
				kid  string
				alg  providers.Algorithm
				in   []byte
				sig  []byte
				want error
			}{
				{"old before T1", t1.Add(-time.Nanosecond), v1.KID, alg1, in1, sig1, nil},
				{"new before T1", t1.Add(-time.Nanosecond), v2.KID, alg2, in2, sig2, nil},
				{"old at T1", t1, v1.KID, alg1, in1, sig1, ErrKeyRetired},
				{"old after T1", t1.Add(time.Hour), v1.KID, alg1, in1, sig1, ErrKeyRetired},
				{"new after T1", t1.Add(time.Hour), v2.KID, alg2, in2, sig2, nil},
				{"unknown kid", t1, "00000000000000000000000000000000", alg2, in2, sig2, ErrNotFound},
			} {
				v, err := e.store.VersionForVerify(testSlot, tc.kid, tc.at)
				if !errors.Is(err, tc.want) {
					t.Fatalf("%s: VersionForVerify error %v, want %v", tc.name, err, tc.want)
				}
				if err != nil {
					continue
				}
				if err := providers.Verify(v.Public, tc.alg, tc.in, tc.sig); err != nil {
					t.Fatalf("%s: signature does not verify with v%d: %v", tc.name, v.Number, err)
				}
			}
			if !errors.Is(ErrNotFound, providers.ErrNotFound) {
				t.Error("ErrNotFound must wrap providers.ErrNotFound (the agent maps it to NOT_FOUND)")
			}
		})
	}
}

func TestRollback(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name       string
		setup      func(e *env)
		wantActive int
		wantErr    error
		// the version rolled back from, accepted until now+overlap
		wantAccepted int
	}{
		{name: "2 to 1", setup: func(e *env) { e.rotate() }, wantActive: 1, wantAccepted: 2},
		{name: "3 to 2", setup: func(e *env) { e.rotate(); e.clock.Advance(time.Hour); e.rotate() }, wantActive: 2, wantAccepted: 3},
		{name: "3 to 2 to 1", setup: func(e *env) {
			e.rotate()
			e.clock.Advance(time.Hour)
			e.rotate()
			if _, err := e.rot.Rollback(ctx, testSlot, RollbackOptions{}); err != nil {
				t.Fatal(err)
			}
		}, wantActive: 1, wantAccepted: 2},
		// v2 was backed out of; v3 replaced v1, so back to v1, not v2.
		{name: "3 to the 1 it replaced, past a version rolled back from", setup: func(e *env) {
			e.rotate()
			e.clock.Advance(time.Hour)
			if _, err := e.rot.Rollback(ctx, testSlot, RollbackOptions{}); err != nil {
				t.Fatal(err)
			}
			e.clock.Advance(time.Hour)
			e.rotate()
		}, wantActive: 1, wantAccepted: 3},
		{name: "to a version past T1", setup: func(e *env) { e.rotate(); e.clock.Advance(DefaultOverlap) }, wantErr: ErrKeyRetired},
		{name: "to a retired version", setup: func(e *env) {
			e.rotate()
			e.clock.Advance(DefaultOverlap + time.Minute)
			if got, err := e.rot.RetireDue(ctx, e.clock.Now()); err != nil || len(got) != 1 {
				t.Fatalf("RetireDue: %v %v", got, err)
			}
		}, wantErr: ErrKeyRetired},
		{name: "3 to 2 with 1 retired", setup: func(e *env) {
			e.rotate()
			e.clock.Advance(DefaultOverlap)
			e.rotate()
		}, wantActive: 2, wantAccepted: 3},
		{name: "no earlier version", setup: func(e *env) {}, wantErr: ErrNotFound},
		{name: "skips a failed version", setup: func(e *env) {
			o := e.opts()
			o.Signer = &corruptingSigner{inner: e.soft, clean: 1}
			if _, err := e.rot.Rotate(ctx, testSlot, o); err == nil {
				t.Fatal("rotation with corrupt canaries succeeded")
			}
			e.rotate() // v3
		}, wantActive: 1, wantAccepted: 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, providers.KeyEd25519)
			tc.setup(e)
			before := e.active()
			got, err := e.rot.Rollback(ctx, testSlot, RollbackOptions{Peer: "admin"})
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("Rollback error %v, want %v", err, tc.wantErr)
			}
			last := e.records()[len(e.records())-1]
			if last.Op != "rollback" {
				t.Fatalf("last record %q, want the rollback journaled", last.Op)
			}
			if tc.wantErr != nil {
				if e.active().KID != before.KID {
					t.Fatal("a refused rollback changed the active version")
				}
				if last.CodeName == "OK" {
					t.Fatalf("refusal journaled as %s", last.CodeName)
				}
				return
			}
			if got.Number != tc.wantActive || e.active().Number != tc.wantActive {
				t.Fatalf("active v%d (returned v%d), want v%d", e.active().Number, got.Number, tc.wantActive)
			}
			sl, _ := e.store.Get(testSlot)
			from, _ := sl.Version(tc.wantAccepted)
			if from.State != StateAccepted || !from.T1.Equal(e.clock.Now().Add(DefaultOverlap)) {
				t.Fatalf("v%d after rollback: %s until %v", from.Number, from.State, from.T1)
			}
			// The rolled-back-to key signs again, and the one rolled back
			// from still verifies until its T1.
			alg, in, sig := signWith(t, e.soft, e.active(), []byte("after rollback"))
			if v, err := e.store.VersionForVerify(testSlot, got.KID, e.clock.Now()); err != nil || providers.Verify(v.Public, alg, in, sig) != nil {
				t.Fatalf("rolled-back-to version does not verify: %v", err)
			}
			if _, err := e.store.VersionForVerify(testSlot, from.KID, e.clock.Now()); err != nil {
				t.Fatalf("rolled-back-from version before its T1: %v", err)
			}
		})
	}
}

// The agent restarts into the state it left.
func TestRestartLoadsSameState(t *testing.T) {
	e := newEnv(t, providers.KeyECDSAP256)
	ctx := context.Background()
	e.rotate()
	e.clock.Advance(time.Hour)
	res := e.rotate()
	if _, err := e.rot.Rollback(ctx, testSlot, RollbackOptions{}); err != nil {
		t.Fatal(err)
	}
	sched := newScheduler(t, e, nil)
	if err := sched.RotateAt(ctx, testSlot, t0.Add(1000*time.Hour), "admin"); err != nil {
		t.Fatal(err)
	}
	want := stateJSON(t, e.store)
	wantActive := e.active()

	e.reopen()
	if got := stateJSON(t, e.store); got != want {
		t.Fatalf("state after restart:\n%s\nwant:\n%s", got, want)
	}
	if got := e.active(); got.KID != wantActive.KID || got.Number != wantActive.Number {
		t.Fatalf("active after restart v%d, want v%d", got.Number, wantActive.Number)
	}
	for _, v := range e.store.Slots()[0].Versions {
		if v.Public == nil {
			t.Fatalf("v%d: public key not parsed on load", v.Number)
		}
	}
	manifest, sig, err := e.store.REP(testSlot, res.REP)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := VerifyREP(manifest, sig, e.rot.EvidencePublicKey()); err != nil {
		t.Fatalf("stored REP after restart: %v", err)
	}
	if n, err := e.store.REPNumbers(ctx, testSlot); err != nil || !slices.Equal(n, []int{2, 3}) {
		t.Fatalf("REPNumbers %v %v", n, err)
	}
	// The chain the rotation wrote verifies.
	if rep, err := e.j.Verify(ctx); err != nil || !rep.OK() {
		t.Fatalf("journal verify: %+v %v", rep, err)
	}
}

// A failed step leaves the old version active, says which step failed and
// journals the failure; a reopen finds the same.
func TestFailedStepKeepsOldActive(t *testing.T) {
	for _, tc := range []struct {
		name     string
		modify   func(e *env, o *RotateOptions)
		step     string
		reverted bool
	}{
		{"keygen error", func(e *env, o *RotateOptions) {
			o.Maker = failingMaker{fmt.Errorf("token full: %w", providers.ErrUnavailable)}
		}, StepKeygen, false},
		{"csr signing error", func(e *env, o *RotateOptions) { o.Signer = failingSigner{providers.ErrUnavailable} }, StepCSR, false},
		{"csr signature corrupt", func(e *env, o *RotateOptions) { o.Signer = &corruptingSigner{inner: e.soft} }, StepCSR, false},
		{"canary does not verify", func(e *env, o *RotateOptions) { o.Signer = &corruptingSigner{inner: e.soft, clean: 1} }, StepCanary, true},
		{"canary verifies partly", func(e *env, o *RotateOptions) { o.Signer = &corruptingSigner{inner: e.soft, clean: 6} }, StepCanary, true},
		{"evidence", func(e *env, o *RotateOptions) {
			e.rot.hook = func(step string) error {
				if step == StepEvidence {
					return errInjected
				}
				return nil
			}
		}, StepEvidence, true},
		{"emergency, evidence", func(e *env, o *RotateOptions) {
			o.Emergency = true
			e.rot.hook = func(step string) error {
				if step == StepEvidence {
					return errInjected
				}
				return nil
			}
		}, StepEvidence, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, providers.KeyEd25519)
			old := e.active()
			o := e.opts()
			tc.modify(e, &o)
			_, err := e.rot.Rotate(context.Background(), testSlot, o)
			var se *StepError
			if !errors.As(err, &se) || se.Step != tc.step || se.Reverted != tc.reverted || se.RevertErr != nil {
				t.Fatalf("error %v (%#v), want step %s reverted=%v", err, se, tc.step, tc.reverted)
			}
			if !strings.Contains(err.Error(), "step "+tc.step) {
				t.Fatalf("error %q does not name the step", err)
			}
			check := func() {
				t.Helper()
				if got := e.active(); got.KID != old.KID {
					t.Fatalf("active is v%d, want the old v%d", got.Number, old.Number)
				}
				if v, err := e.store.VersionForVerify(testSlot, old.KID, e.clock.Now().Add(1000*time.Hour)); err != nil || v.State != StateActive {
					t.Fatalf("old version: %v %v", v.State, err)
				}
				sl, _ := e.store.Get(testSlot)
				if tc.reverted {
					nv, ok := sl.Version(2)
					if !ok || nv.State != StateRetired || !nv.Failed {
						t.Fatalf("new version after revert: %+v", nv)
					}
					if _, err := e.store.VersionForVerify(testSlot, nv.KID, e.clock.Now()); !errors.Is(err, ErrKeyRetired) {
						t.Fatalf("failed version verifies: %v", err)
					}
				} else if len(sl.Versions) != 1 {
					t.Fatalf("%d versions after a failure before the cut-over", len(sl.Versions))
				}
				recs := e.records()
				last := recs[len(recs)-1]
				if last.Op == "rotate.destroy" {
					// The failed attempt's unused key, destroyed after the failure.
					last = recs[len(recs)-2]
				}
				if last.Op != "rotate.failed" || last.CodeName == "OK" || !strings.Contains(last.Detail, "step "+tc.step) {
					t.Fatalf("last record %s %s %q, want the failure journaled", last.Op, last.CodeName, last.Detail)
				}
			}
			check()
			e.reopen()
			check()

			// The next attempt uses a fresh key name and succeeds.
			e.rot.hook = nil
			res := e.rotate()
			want := testSlot + "/v2-a2" // a new name, as the attempt counter gives
			if tc.reverted {
				want = testSlot + "/v3" // v2 exists, failed
			}
			if res.New.Key != want {
				t.Fatalf("retry key name %q", res.New.Key)
			}
		})
	}
}

// Crash consistency: the agent dies right after a step (the journal goes
// away, so nothing after that step, not even a revert, is written). After
// a restart the slot has exactly one active version, the old or the new,
// and the cut-over's record is in the journal exactly when the state says
// the new version exists.
func TestCrashAfterEachStep(t *testing.T) {
	for _, tc := range []struct {
		step      string
		newActive bool
	}{
		{StepStart, false},
		{StepKeygen, false},
		{StepCSR, false},
		{StepCutover, true},
		{StepCanary, true},
		{StepEvidence, true},
	} {
		t.Run(tc.step, func(t *testing.T) {
			e := newEnv(t, providers.KeyEd25519)
			old := e.active()
			e.rot.hook = func(step string) error {
				if step == tc.step {
					_ = e.j.Close() // the process dies here
					return errInjected
				}
				return nil
			}
			_, err := e.rot.Rotate(context.Background(), testSlot, e.opts())
			var se *StepError
			if !errors.As(err, &se) {
				t.Fatalf("Rotate: %v, want a step error", err)
			}
			e.reopen()
			sl, ok := e.store.Get(testSlot)
			if !ok {
				t.Fatal("slot lost")
			}
			actives := 0
			for _, v := range sl.Versions {
				if v.State == StateActive {
					actives++
				}
			}
			if actives != 1 {
				t.Fatalf("%d active versions after the crash", actives)
			}
			got := e.active()
			if tc.newActive != (got.KID != old.KID) {
				t.Fatalf("active after crash at %s: v%d", tc.step, got.Number)
			}
			_, hasV2 := sl.Version(2)
			cutoverRecorded := slices.Contains(ops(e.records()), "rotate")
			if hasV2 != cutoverRecorded {
				t.Fatalf("state has v2: %v, journal has the cut-over record: %v", hasV2, cutoverRecorded)
			}
			if rep, err := e.j.Verify(context.Background()); err != nil || !rep.OK() {
				t.Fatalf("journal verify: %+v %v", rep, err)
			}
		})
	}
}

// A cut-over whose commit reports failure may still land (journal doc.go,
// "Failures"): in `fsync` mode a failed WAL sync leaves the write on disk,
// and the reopened journal replays it; a commit that timed out in the
// queue is committed later. Either way the rotation fails at the cut-over
// and undoes it: the old version is active, in memory and in the journal,
// and the new one is retired and marked failed.
func TestCutoverCommitNotConfirmed(t *testing.T) {
	for _, tc := range []struct {
		name  string
		fault *journalFault
		// arm runs right before the cut-over's commit.
		arm func(t *testing.T, e *env, f *journalFault)
	}{
		{"fsync EIO, the write on disk", newJournalFault(syscall.EIO, walSync...),
			func(t *testing.T, e *env, f *journalFault) { f.on.Store(true) }},
		{"timed out in the queue, landed later", newJournalFault(nil, walSync...),
			func(t *testing.T, e *env, f *journalFault) {
				// Another commit holds the journal in its WAL sync, so the
				// cut-over's queues behind it, times out, and lands once
				// the sync is let go, half a timeout later.
				f.on.Store(true)
				go func() {
					_ = e.j.Append(context.Background(), &journal.Record{Tenant: "other", Slot: "other/x", Op: "sign", CodeName: "OK"})
				}()
				<-f.hit
				time.AfterFunc(commitTimeout*3/2, func() { close(f.stall) })
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := tc.fault
			f.oneShot = true
			if f.err == nil {
				f.stall = make(chan struct{})
				saved := commitTimeout
				commitTimeout = 500 * time.Millisecond
				t.Cleanup(func() { commitTimeout = saved })
			}
			e := newEnvOn(t, providers.KeyEd25519, nil, withFault(f))
			old := e.active()
			e.rot.hook = func(step string) error {
				if step == StepCSR {
					tc.arm(t, e, f)
				}
				return nil
			}
			_, err := e.rot.Rotate(context.Background(), testSlot, e.opts())
			var se *StepError
			if !errors.As(err, &se) || se.Step != StepCutover || !se.Reverted || se.RevertErr != nil {
				t.Fatalf("Rotate: %v (%#v), want the cut-over failed and reverted", err, se)
			}
			check := func() {
				t.Helper()
				if got := e.active(); got.KID != old.KID {
					t.Fatalf("active is v%d, want the old v%d", got.Number, old.Number)
				}
				sl, _ := e.store.Get(testSlot)
				if nv, ok := sl.Version(2); !ok || nv.State != StateRetired || !nv.Failed {
					t.Fatalf("new version after the revert: %+v (found %v)", nv, ok)
				}
				recs := e.records()
				last := recs[len(recs)-1]
				if last.Op != "rotate.failed" || !strings.Contains(last.Detail, "reverted: v1 active again") {
					t.Fatalf("last record %s %q, want the revert journaled", last.Op, last.Detail)
				}
			}
			check()
			inMemory := stateJSON(t, e.store)
			e.reopen()
			check()
			if stored := stateJSON(t, e.store); stored != inMemory {
				t.Fatalf("state in memory and in the journal differ:\n%s\n%s", inMemory, stored)
			}
			if rep, err := e.j.Verify(context.Background()); err != nil || !rep.OK() {
				t.Fatalf("journal verify: %+v %v", rep, err)
			}
			e.rot.hook = nil
			if res := e.rotate(); res.New.Number != 3 {
				t.Fatalf("next rotation made v%d, want v3", res.New.Number)
			}
		})
	}
}

// The evidence pack's commit may report failure and land all the same, like
// the cut-over's. Then the pack and its record are in the journal, and the
// rotation stands: failing it would retire the version the stored pack
// vouches for, leaving both rotate.rep and rotate.failed in the journal.
func TestEvidenceCommitNotConfirmedButLanded(t *testing.T) {
	f := newJournalFault(syscall.EIO, walSync...)
	f.oneShot = true
	e := newEnvOn(t, providers.KeyEd25519, nil, withFault(f))
	old := e.active()
	e.rot.hook = func(step string) error {
		if step == StepRetire { // the last step before the pack's commit
			f.on.Store(true)
		}
		return nil
	}
	res, err := e.rot.Rotate(context.Background(), testSlot, e.opts())
	if err != nil {
		t.Fatalf("Rotate: %v, want the rotation to stand", err)
	}
	select {
	case <-f.hit:
	default:
		t.Fatal("the fault was not hit: the test did not fail the pack's commit")
	}
	check := func() {
		t.Helper()
		if got := e.active(); got.KID == old.KID || got.Number != res.New.Number {
			t.Fatalf("active is v%d, want the new v%d", got.Number, res.New.Number)
		}
		got := ops(e.records())
		if !slices.Contains(got, "rotate.rep") || slices.Contains(got, "rotate.failed") {
			t.Fatalf("journal ops %v, want rotate.rep and no rotate.failed", got)
		}
		manifest, err := e.j.Get(repKey("payments", "release", res.New.Number, "json"))
		if err != nil || !bytes.Equal(manifest, res.Manifest) {
			t.Fatalf("stored manifest: %v (equal %v)", err, bytes.Equal(manifest, res.Manifest))
		}
	}
	check()
	e.reopen()
	check()
}

// When the journal fails and stays down, the cut-over's outcome cannot be
// read back. The slot then signs with nothing: its new version may be
// active in the journal with no canary verified. Once the journal is back,
// the scheduler's next round reads the slot back and commits the revert.
func TestCutoverOutcomeUnknownFailsClosed(t *testing.T) {
	ctx := context.Background()
	// The WAL sync fails (the write stays on disk) and so do the recovery
	// probe and a new WAL: the journal cannot reopen while the fault is on.
	f := newJournalFault(syscall.EIO, append(walSync, errorfs.OpCreate, errorfs.OpReuseForWrite)...)
	e := newEnvOn(t, providers.KeyEd25519, nil, withFault(f))
	old := e.active()
	e.rot.hook = func(step string) error {
		if step == StepCSR {
			f.on.Store(true)
		}
		return nil
	}
	_, err := e.rot.Rotate(ctx, testSlot, e.opts())
	var se *StepError
	if !errors.As(err, &se) || se.Step != StepCutover || se.Reverted || !errors.Is(se.RevertErr, ErrStateUnknown) {
		t.Fatalf("Rotate: %v (%#v), want the cut-over failed with its outcome unknown", err, se)
	}
	if !strings.Contains(err.Error(), "unknown") || !strings.Contains(err.Error(), "does not sign") {
		t.Fatalf("error %q does not say the state is unknown and the slot does not sign", err)
	}
	if _, err := e.store.Resolve(testSlot); !errors.Is(err, ErrStateUnknown) || WireCode(err) != proto.JournalUnavailable {
		t.Fatalf("Resolve with the state unknown: %v, want ErrStateUnknown (JOURNAL_UNAVAILABLE)", err)
	}
	s := newScheduler(t, e, nil)
	if _, err := s.Tick(ctx); !errors.Is(err, ErrStateUnknown) {
		t.Fatalf("Tick with the journal down: %v, want ErrStateUnknown", err)
	}

	// The disk recovers. The cut-over had reached it, the revert had not:
	// the round finds v2 active in the journal, and reverts it.
	f.on.Store(false)
	deadline := time.Now().Add(10 * time.Second)
	for _, err := s.Tick(ctx); err != nil; _, err = s.Tick(ctx) {
		if time.Now().After(deadline) {
			t.Fatalf("Tick after the fault cleared: %v", err)
		}
		time.Sleep(2 * time.Millisecond) // the journal tries a reopen once per RecoveryInterval
	}
	for _, when := range []string{"in memory", "after a restart"} {
		if when != "in memory" {
			e.reopen()
		}
		if got := e.active(); got.KID != old.KID {
			t.Fatalf("%s: active v%d, want v%d", when, got.Number, old.Number)
		}
		sl, _ := e.store.Get(testSlot)
		if nv, ok := sl.Version(2); !ok || nv.State != StateRetired || !nv.Failed {
			t.Fatalf("%s: v2 %+v (found %v), want retired and failed", when, nv, ok)
		}
		recs := e.records()
		if got := ops(recs[len(recs)-2:]); !slices.Equal(got, []string{"rotate", "rotate.failed"}) {
			t.Fatalf("%s: last records %v, want the cut-over and its revert", when, got)
		}
	}
}

// A rollback whose commit reports failure but lands is reported as done:
// an operator told it failed would roll back again, one version further.
func TestRollbackCommitNotConfirmed(t *testing.T) {
	f := newJournalFault(syscall.EIO, walSync...)
	f.oneShot = true
	e := newEnvOn(t, providers.KeyEd25519, nil, withFault(f))
	e.rotate()
	e.rotate()
	f.on.Store(true)
	v, err := e.rot.Rollback(context.Background(), testSlot, RollbackOptions{})
	if err != nil || v.Number != 2 {
		t.Fatalf("Rollback: v%d %v, want v2 and no error", v.Number, err)
	}
	for _, when := range []string{"in memory", "after a restart"} {
		if when != "in memory" {
			e.reopen()
		}
		if got := e.active(); got.Number != 2 {
			t.Fatalf("%s: active v%d, want v2", when, got.Number)
		}
	}
}

// Every step is journaled, in order, one atomic record per state change.
func TestRotationJournalsEachStep(t *testing.T) {
	e := newEnv(t, providers.KeyECDSAP256)
	res := e.rotate()
	recs := e.records()
	want := []string{"enroll", "rotate.start", "rotate.keygen", "rotate.csr", "rotate", "canary", "rotate.rep"}
	if got := ops(recs); !slices.Equal(got, want) {
		t.Fatalf("records %v, want %v", got, want)
	}
	if res.FirstSeq != recs[1].Seq || res.LastSeq != recs[len(recs)-1].Seq {
		t.Fatalf("result seqs %d..%d, records %d..%d", res.FirstSeq, res.LastSeq, recs[1].Seq, recs[len(recs)-1].Seq)
	}
	for _, r := range recs {
		if r.Tenant != "payments" || r.Slot != testSlot || r.CodeName != "OK" {
			t.Fatalf("record %+v", r)
		}
	}
	if recs[5].Algorithm != "ecdsa-sha256" {
		t.Fatalf("canary record algorithm %q", recs[5].Algorithm)
	}
}

// Resolve and VersionForVerify are read without locks while a rotation
// and a rollback commit: every read sees exactly one active version.
func TestResolveDuringRotation(t *testing.T) {
	e := newEnv(t, providers.KeyEd25519)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				v, err := e.store.Resolve(testSlot)
				if err != nil || v.State != StateActive {
					t.Errorf("Resolve: %v %v", v.State, err)
					return
				}
				if _, err := e.store.VersionForVerify(testSlot, v.KID, e.clock.Now()); err != nil {
					t.Errorf("active version does not verify: %v", err)
					return
				}
			}
		}()
	}
	e.rotate()
	if _, err := e.rot.Rollback(context.Background(), testSlot, RollbackOptions{}); err != nil {
		t.Error(err)
	}
	close(stop)
	wg.Wait()
}

func TestResolveDoesNotAllocate(t *testing.T) {
	e := newEnv(t, providers.KeyEd25519)
	e.rotate()
	kid := e.active().KID
	now := e.clock.Now()
	if n := testing.AllocsPerRun(1000, func() {
		if _, err := e.store.Resolve(testSlot); err != nil {
			t.Fatal(err)
		}
		if _, err := e.store.VersionForVerify(testSlot, kid, now); err != nil {
			t.Fatal(err)
		}
		_, _ = e.store.Resolve("nobody/none")
	}); n != 0 {
		t.Fatalf("%v allocations per Resolve+VersionForVerify", n)
	}
}

func TestBusySlot(t *testing.T) {
	e := newEnv(t, providers.KeyEd25519)
	entered, proceed := make(chan struct{}), make(chan struct{})
	e.rot.hook = func(step string) error {
		if step == StepCSR {
			close(entered)
			<-proceed
		}
		return nil
	}
	done := make(chan error)
	go func() {
		_, err := e.rot.Rotate(context.Background(), testSlot, e.opts())
		done <- err
	}()
	<-entered
	if _, err := e.rot.Rotate(context.Background(), testSlot, e.opts()); !errors.Is(err, ErrBusy) {
		t.Errorf("concurrent Rotate: %v, want ErrBusy", err)
	}
	if _, err := e.rot.Rollback(context.Background(), testSlot, RollbackOptions{}); !errors.Is(err, ErrBusy) {
		t.Errorf("concurrent Rollback: %v, want ErrBusy", err)
	}
	close(proceed)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestEnroll(t *testing.T) {
	e := newEnv(t, providers.KeyEd25519)
	ctx := context.Background()
	v1 := e.active()
	info := providers.KeyInfo{Name: v1.Key, Provider: v1.Provider, KID: v1.KID, Type: v1.KeyType, Public: v1.Public, SPKI: v1.SPKI}
	if got, err := e.store.Enroll(ctx, testSlot, info, "again"); err != nil || got.KID != v1.KID {
		t.Fatalf("re-Enroll with the same key: %v %v", got.KID, err)
	}
	other, err := e.soft.GenerateKey(ctx, "other", providers.KeyEd25519)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.store.Enroll(ctx, testSlot, other, "x"); !errors.Is(err, ErrSlotExists) {
		t.Fatalf("Enroll with another key: %v, want ErrSlotExists", err)
	}
	for _, bad := range []string{"payments", "Payments/x", "a/../b", "/x", "a/", "a/b/c"} {
		if _, err := e.store.Enroll(ctx, bad, other, "x"); err == nil {
			t.Errorf("Enroll(%q) accepted", bad)
		}
	}
	if _, err := e.store.Enroll(ctx, "payments/other", other, "x"); err != nil {
		t.Fatal(err)
	}
	if n := len(e.store.Slots()); n != 2 {
		t.Fatalf("%d slots", n)
	}
}

// Pre-provisioned next key (named in configuration) instead of generation.
func TestRotateToPreProvisionedKey(t *testing.T) {
	e := newEnv(t, providers.KeyECDSAP256)
	next, err := e.soft.GenerateKey(context.Background(), "provisioned-next", providers.KeyECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	o := e.opts()
	o.Maker, o.NextKey = nil, &next
	res, err := e.rot.Rotate(context.Background(), testSlot, o)
	if err != nil {
		t.Fatal(err)
	}
	if res.New.KID != next.KID || e.active().Key != "provisioned-next" {
		t.Fatalf("rotated to %s (%s)", res.New.Key, res.New.KID)
	}
	// The same key again is refused: it is already a version.
	o.NextKey = &next
	if _, err := e.rot.Rotate(context.Background(), testSlot, o); err == nil {
		t.Fatal("rotating to a key that is already a version succeeded")
	}
}

// makeThenFail generates the key, then fails, as a maker does that finds
// the new key unfit after making it.
type makeThenFail struct{ inner KeyMaker }

func (m makeThenFail) GenerateKey(ctx context.Context, name string, kt providers.KeyType) (providers.KeyInfo, error) {
	info, err := m.inner.GenerateKey(ctx, name, kt)
	if err != nil {
		return info, err
	}
	return info, errors.New("the new key is unfit")
}

// Every key a rotation makes can be traced from the journal: rotate.start
// names the key it will make (a crash right after the generation leaves
// no keygen record), and a failure names a key the maker made and then
// reported failing.
func TestRotationNamesItsKeys(t *testing.T) {
	e := newEnv(t, providers.KeyECDSAP256)
	o := e.opts()
	o.Maker = makeThenFail{e.soft}
	if _, err := e.rot.Rotate(context.Background(), testSlot, o); err == nil {
		t.Fatal("Rotate succeeded with a failing maker")
	}
	var start, failed string
	for _, r := range e.records() {
		switch r.Op {
		case "rotate.start":
			start = r.Detail
		case "rotate.failed":
			failed = r.Detail
		}
	}
	if !strings.Contains(start, "key "+testSlot+"/v2") {
		t.Errorf("rotate.start %q does not name the key it makes", start)
	}
	if !strings.Contains(failed, "generated key "+testSlot+"/v2 is not in use") {
		t.Errorf("rotate.failed %q does not name the key the maker made", failed)
	}
}

// The evidence pack's files are written once the journal holds the pack:
// a crash while its commit is under way leaves no pack on disk that
// verifies for a rotation the journal does not record as done.
func TestEvidenceFilesFollowTheCommit(t *testing.T) {
	f := newJournalFault(nil, walSync...)
	f.oneShot = true
	f.stall = make(chan struct{})
	e := newEnvOn(t, providers.KeyEd25519, nil, withFault(f))
	e.rot.hook = func(step string) error {
		if step == StepRetire { // the last step before the pack's commit
			f.on.Store(true)
		}
		return nil
	}
	done := make(chan error, 1)
	go func() {
		_, err := e.rot.Rotate(context.Background(), testSlot, e.opts())
		done <- err
	}()
	<-f.hit // the pack's commit is in its WAL sync: a kill now loses it
	files, _ := filepath.Glob(filepath.Join(e.evDir, "*", "*", "rep-*"))
	close(f.stall)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if len(files) != 0 {
		t.Fatalf("pack files on disk before the journal held the pack: %v", files)
	}
	if after, _ := filepath.Glob(filepath.Join(e.evDir, "*", "*", "rep-*")); len(after) == 0 {
		t.Fatal("no pack files after the rotation")
	}
}
