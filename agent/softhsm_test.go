package agent_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"crypto/sha512"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/pkcs11"
	"github.com/sigil-agent/sigil/providers/pkcs11/softhsmtest"
)

// hsmConfig is an agent config serving the token's keys (named hsm-<type>)
// beside software keys of the same types (soft-<type>).
func hsmConfig(t *testing.T, tok *softhsmtest.Token, keys map[providers.KeyType]softhsmtest.Key) agent.Config {
	t.Helper()
	t.Setenv("SIGIL_TEST_PIN", tok.PIN)
	var b strings.Builder
	fmt.Fprintf(&b, "providers:\n  - id: hsm\n    type: pkcs11\n    module: %s\n    token_label: %s\n    pin_env: SIGIL_TEST_PIN\n    keys:\n", tok.Module, tok.Label)
	for kt, k := range keys {
		fmt.Fprintf(&b, "      - {name: hsm-%s, uri: %q}\n", kt, k.URI)
	}
	b.WriteString("  - id: soft\n    type: software\n    keys:\n")
	for kt := range keys {
		fmt.Fprintf(&b, "      - {name: soft-%s, type: %s}\n", kt, kt)
	}
	cfg, err := agent.ParseConfig([]byte(b.String()))
	if err != nil {
		t.Fatal(err)
	}
	cfg.DataDir = t.TempDir()
	cfg.Socket = shortSocketPath(t)
	return cfg
}

// Provider parity: the same digest signed through the agent by a SoftHSM2 key
// and by a software key of each type verifies with Go's crypto against each
// key's public key, and fails with one bit flipped.
func TestProviderParity(t *testing.T) {
	tok := softhsmtest.New(t, "parity")
	types := []providers.KeyType{providers.KeyECDSAP256, providers.KeyECDSAP384, providers.KeyRSA2048, providers.KeyRSA3072, providers.KeyEd25519}
	keys := tok.GenerateKeys(t, types...)
	r := startAgent(t, hsmConfig(t, tok, keys))
	c := r.dial(t)
	ctx := context.Background()
	d256 := sha256.Sum256([]byte("one payload for every provider"))
	d384 := sha512.Sum384([]byte("one payload for every provider"))
	algs := map[providers.KeyType][]struct {
		alg    client.Algorithm
		digest []byte
	}{
		providers.KeyECDSAP256: {{client.Algorithm{Scheme: client.SchemeECDSA, Hash: crypto.SHA256}, d256[:]}},
		providers.KeyECDSAP384: {{client.Algorithm{Scheme: client.SchemeECDSA, Hash: crypto.SHA384}, d384[:]}},
		providers.KeyRSA2048: {
			{client.Algorithm{Scheme: client.SchemePKCS1v15, Hash: crypto.SHA256}, d256[:]},
			{client.Algorithm{Scheme: client.SchemePSS, Hash: crypto.SHA256}, d256[:]},
			{client.Algorithm{Scheme: client.SchemePSS, Hash: crypto.SHA384}, d384[:]},
		},
		providers.KeyRSA3072: {{client.Algorithm{Scheme: client.SchemePKCS1v15, Hash: crypto.SHA384}, d384[:]}},
		providers.KeyEd25519: {{client.Algorithm{Scheme: client.SchemeEd25519}, []byte("one payload for every provider")}},
	}
	for _, kt := range types {
		for _, a := range algs[kt] {
			for _, prov := range []string{"hsm", "soft"} {
				name := prov + "-" + string(kt)
				t.Run(fmt.Sprintf("%s/%d-%v", name, a.alg.Scheme, a.alg.Hash), func(t *testing.T) {
					k, err := c.PublicKey(ctx, client.ByName(name))
					if err != nil {
						t.Fatal(err)
					}
					if k.Type != string(kt) {
						t.Fatalf("key type %s, want %s", k.Type, kt)
					}
					sig, err := c.Sign(ctx, client.ByName(name), a.alg, a.digest)
					if err != nil {
						t.Fatal(err)
					}
					palg := providers.Algorithm{Scheme: providers.Scheme(a.alg.Scheme), Hash: a.alg.Hash}
					if err := providers.Verify(k.Public, palg, a.digest, sig.Sig); err != nil {
						t.Fatalf("Go crypto rejects %s's signature: %v", name, err)
					}
					bad := bytes.Clone(a.digest)
					bad[0] ^= 0x80
					if err := providers.Verify(k.Public, palg, bad, sig.Sig); err == nil {
						t.Fatal("verified over a flipped digest")
					}
				})
			}
		}
	}
}

// Through the agent: sessions die and the login vanishes behind the pool's
// back while clients sign; signing resumes without a restart, every
// signature a client receives verifies, and no call outlives its deadline.
func TestAgentRecoversTokenSessions(t *testing.T) {
	tok := softhsmtest.New(t, "agent-recover")
	tok.Around = func(fn func()) {
		if err := pkcs11.PauseModule(tok.Module, fn); err != nil {
			t.Error(err)
		}
	}
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	r := startAgent(t, hsmConfig(t, tok, keys))
	c := r.dial(t)
	k, err := c.PublicKey(context.Background(), client.ByName("hsm-ecdsa-p256"))
	if err != nil {
		t.Fatal(err)
	}
	var ok, failed atomic.Int64
	var slowest atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				d := sha256.Sum256(fmt.Appendf(nil, "%d/%d", g, i))
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
				start := time.Now()
				sig, err := c.Sign(ctx, client.ByName("hsm-ecdsa-p256"), client.Algorithm{}, d[:])
				cancel()
				if el := int64(time.Since(start)); el > slowest.Load() {
					slowest.Store(el)
				}
				if err == nil {
					err = providers.Verify(k.Public, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}, d[:], sig.Sig)
				}
				if err != nil {
					failed.Add(1)
					select {
					case errs <- err:
					default:
					}
					continue
				}
				ok.Add(1)
			}
		}(g)
	}
	waitFor := func(n int64) {
		t.Helper()
		target := ok.Load() + n
		deadline := time.Now().Add(10 * time.Second)
		for ok.Load() < target {
			if time.Now().After(deadline) {
				t.Fatalf("signing did not resume: %d good", ok.Load())
			}
			time.Sleep(2 * time.Millisecond)
		}
	}
	waitFor(100)
	for round := 0; round < 2; round++ {
		tok.CloseAllSessions(t)
		waitFor(100)
		tok.Logout(t)
		waitFor(100)
	}
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		// A caller may only ever see UNAVAILABLE, never a garbage signature.
		if client.Code(err) != proto.Unavailable {
			t.Errorf("caller saw %v", err)
		}
	}
	if failed.Load() > 0 {
		t.Errorf("%d of %d signatures failed; dead sessions must be retried on fresh ones", failed.Load(), ok.Load()+failed.Load())
	}
	if s := time.Duration(slowest.Load()); s > 2500*time.Millisecond {
		t.Errorf("a call took %v, past its 2s deadline", s)
	}
}

// The agent names a provider in every line its provider logs, once: the
// providers leave the name to the logger they are given.
func TestProviderNamedOnceInTheLog(t *testing.T) {
	tok := softhsmtest.New(t, "log-fields")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	cfg := hsmConfig(t, tok, keys)
	_, logs := startAgentObserved(t, cfg)
	opened := logs.FilterMessage("pkcs11 provider open").All()
	if len(opened) != 1 {
		t.Fatalf("%d \"pkcs11 provider open\" lines, want 1", len(opened))
	}
	if got := opened[0].ContextMap()["provider"]; got != "hsm" {
		t.Errorf("provider field %v, want hsm", got)
	}
	assertNoFieldTwice(t, logs)
}

// A wrong PIN fails the start with PIN_INCORRECT, and neither the error nor
// the log carries the PIN.
func TestWrongPINAtStartup(t *testing.T) {
	tok := softhsmtest.New(t, "wrong-pin")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	cfg := hsmConfig(t, tok, keys)
	const wrong = "999999-not-the-pin"
	t.Setenv("SIGIL_TEST_PIN", wrong)
	core, logs := observer.New(zap.DebugLevel)
	_, err := agent.New(context.Background(), cfg, zap.New(core))
	if err == nil {
		t.Fatal("agent started with a wrong PIN")
	}
	if !errors.Is(err, providers.ErrPINIncorrect) || agent.Code(err) != proto.PINIncorrect {
		t.Fatalf("error %v (code %s), want PIN_INCORRECT", err, agent.Code(err))
	}
	for _, secret := range []string{wrong, tok.PIN} {
		if strings.Contains(err.Error(), secret) {
			t.Fatalf("error carries a PIN: %v", err)
		}
		for _, e := range logs.All() {
			line := e.Message
			for k, v := range e.ContextMap() {
				line += fmt.Sprintf(" %s=%v", k, v)
			}
			if strings.Contains(line, secret) {
				t.Fatalf("log line carries a PIN: %s", line)
			}
		}
	}
}
