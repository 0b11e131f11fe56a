package rotation

import (
	"context"
	"strings"
	"testing"
	"time"

	p11 "github.com/miekg/pkcs11"

	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/pkcs11"
	"github.com/sigil-agent/sigil/providers/pkcs11/softhsmtest"
)

// hsmMaker adapts the PKCS#11 provider to KeyMaker, as the agent does:
// the label is the key name, the id random. Its URI method is promoted, so
// the rotation records each new key's PKCS#11 URI.
type hsmMaker struct{ *pkcs11.Provider }

func (m hsmMaker) GenerateKey(ctx context.Context, name string, kt providers.KeyType) (providers.KeyInfo, error) {
	return m.Provider.GenerateKey(ctx, name, kt, "", nil)
}

const hsmPINEnv = "SIGIL_ROTATION_TEST_PIN"

func openHSM(t *testing.T, tok *softhsmtest.Token, keys []pkcs11.KeyConfig) *pkcs11.Provider {
	t.Helper()
	p, err := pkcs11.Open(context.Background(), pkcs11.Config{ID: "hsm", Module: tok.Module, TokenLabel: tok.Label,
		PINEnv: hsmPINEnv, Sessions: 2, Keys: keys})
	if err != nil {
		t.Fatalf("pkcs11.Open: %v", err)
	}
	return p
}

// Rotation, rollback and an incident drill with keys generated in a
// SoftHSM2 token (C_GenerateKeyPair); skipped when SoftHSM2 is missing.
func TestSoftHSMRotationAndDrill(t *testing.T) {
	tok := softhsmtest.New(t, "rotation")
	t.Setenv(hsmPINEnv, tok.PIN)
	p := openHSM(t, tok, nil)
	closed := false
	t.Cleanup(func() {
		if !closed {
			p.Close()
		}
	})
	maker := hsmMaker{p}
	e := newEnvOn(t, providers.KeyECDSAP256, maker)
	ctx := context.Background()
	v1 := e.active()
	o := RotateOptions{Maker: maker, Signer: p, Canaries: 20, Reason: "softhsm test"}

	res, err := e.rot.Rotate(ctx, testSlot, o)
	if err != nil {
		t.Fatalf("Rotate: %v", err)
	}
	v2 := e.active()
	if v2.Provider != "hsm" || !strings.HasPrefix(v2.URI, "pkcs11:token=rotation;object=") {
		t.Fatalf("new version %s on %s, uri %q", v2.Key, v2.Provider, v2.URI)
	}
	if _, err := VerifyREP(res.Manifest, res.Signature, e.rot.EvidencePublicKey()); err != nil {
		t.Fatalf("VerifyREP: %v", err)
	}
	// Before T1 both verify.
	for _, v := range []Version{v1, v2} {
		alg, in, sig := signWith(t, p, v, []byte("hsm"))
		got, err := e.store.VersionForVerify(testSlot, v.KID, e.clock.Now())
		if err != nil || providers.Verify(got.Public, alg, in, sig) != nil {
			t.Fatalf("v%d before T1: %v", v.Number, err)
		}
	}
	if _, err := e.rot.Rollback(ctx, testSlot, RollbackOptions{}); err != nil || e.active().KID != v1.KID {
		t.Fatalf("rollback 2->1: %v", err)
	}
	e.clock.Advance(time.Hour)

	pauser := &fakePauser{j: e.j}
	rep, err := e.rot.Drill(ctx, testSlot, pauser, o)
	if err != nil {
		t.Fatalf("Drill: %v", err)
	}
	v3 := e.active()
	if v3.Number != 3 || len(pauser.calls) != 2 || !rep.Resumed {
		t.Fatalf("after the drill: v%d, pauser %v", v3.Number, pauser.calls)
	}
	if _, err := VerifyREP(rep.Rotation.Manifest, rep.Rotation.Signature, e.rot.EvidencePublicKey()); err != nil {
		t.Fatalf("drill REP: %v", err)
	}

	// After a restart the agent finds the active key again by the recorded URI.
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	closed = true
	e.reopen()
	v3 = e.active()
	p2 := openHSM(t, tok, []pkcs11.KeyConfig{{Name: v3.Key, URI: v3.URI}})
	defer p2.Close()
	keys, err := p2.Keys(ctx)
	if err != nil || len(keys) != 1 || keys[0].KID != v3.KID {
		t.Fatalf("key by recorded URI: %v %+v", err, keys)
	}
	alg, in, sig := signWith(t, p2, v3, []byte("after restart"))
	if err := providers.Verify(v3.Public, alg, in, sig); err != nil {
		t.Fatal(err)
	}
}

// tokenObjects counts the objects on the token, private ones included
// (the provider's login is the process's).
func tokenObjects(t *testing.T, tok *softhsmtest.Token) int {
	t.Helper()
	n := -1
	tok.WithModule(t, func(c *p11.Ctx, slot uint) {
		sh, err := c.OpenSession(slot, p11.CKF_SERIAL_SESSION)
		if err != nil {
			t.Fatalf("C_OpenSession: %v", err)
		}
		defer c.CloseSession(sh)
		if err := c.FindObjectsInit(sh, nil); err != nil {
			t.Fatalf("C_FindObjectsInit: %v", err)
		}
		defer c.FindObjectsFinal(sh)
		n = 0
		for {
			objs, _, err := c.FindObjects(sh, 100)
			if err != nil {
				t.Fatalf("C_FindObjects: %v", err)
			}
			if len(objs) == 0 {
				return
			}
			n += len(objs)
		}
	})
	return n
}

// On a token with few object slots (YubiHSM2: 256) a rotation failing at
// every retry used to add a key pair per attempt until key generation
// failed for every key on the token. An attempt that fails before its
// cut-over destroys its pair (C_DestroyObject); one that died doing so
// leaves it to the next attempt, which finds it by its label after a
// restart.
func TestSoftHSMFailedAttemptsLeaveNoObjects(t *testing.T) {
	tok := softhsmtest.New(t, "rotation")
	t.Setenv(hsmPINEnv, tok.PIN)
	p := openHSM(t, tok, nil)
	t.Cleanup(func() { p.Close() })
	e := newEnvOn(t, providers.KeyECDSAP256, hsmMaker{p})
	ctx := context.Background()
	v1 := e.active()
	v1URI, err := p.URI(v1.Key)
	if err != nil {
		t.Fatal(err)
	}
	base := tokenObjects(t, tok)
	if base != 2 {
		t.Fatalf("%d objects on the token with v1 alone, want its pair", base)
	}
	e.rot.hook = func(step string) error {
		if step == StepCSR {
			return errInjected
		}
		return nil
	}
	o := RotateOptions{Maker: hsmMaker{p}, Signer: p, Canaries: 5, Reason: "softhsm test"}
	for i := range 3 {
		if _, err := e.rot.Rotate(ctx, testSlot, o); err == nil {
			t.Fatalf("attempt %d succeeded", i+1)
		}
	}
	if got := tokenObjects(t, tok); got != base {
		t.Fatalf("3 failed attempts left %d objects on the token, want %d", got-base, 0)
	}

	// An attempt dies after its key generation; the agent restarts.
	e.rot.hook = func(step string) error {
		if step == StepCSR {
			panic(errCrash)
		}
		return nil
	}
	func() {
		defer func() {
			if r := recover(); r != errCrash {
				t.Fatalf("Rotate did not die: %v", r)
			}
		}()
		_, _ = e.rot.Rotate(ctx, testSlot, o)
	}()
	if got := tokenObjects(t, tok); got != base+2 {
		t.Fatalf("%d objects after the crash, want %d", got, base+2)
	}
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	e.reopen()
	p2 := openHSM(t, tok, []pkcs11.KeyConfig{{Name: v1.Key, URI: v1URI}})
	t.Cleanup(func() { p2.Close() })
	e.rot.hook = nil
	res, err := e.rot.Rotate(ctx, testSlot, RotateOptions{Maker: hsmMaker{p2}, Signer: p2, Canaries: 5, Reason: "softhsm test"})
	if err != nil {
		t.Fatalf("Rotate after the restart: %v", err)
	}
	if got := tokenObjects(t, tok); got != base+2 {
		t.Fatalf("%d objects after the next rotation, want %d (v1 and %s)", got, base+2, res.New.Key)
	}
	alg, in, sig := signWith(t, p2, res.New, []byte("after"))
	if err := providers.Verify(res.New.Public, alg, in, sig); err != nil {
		t.Fatal(err)
	}
	alg, in, sig = signWith(t, p2, v1, []byte("v1"))
	if err := providers.Verify(v1.Public, alg, in, sig); err != nil {
		t.Fatalf("v1 after the cleanup: %v", err)
	}
}
