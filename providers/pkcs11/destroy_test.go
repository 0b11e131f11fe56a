package pkcs11

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/pkcs11/softhsmtest"
)

// With module_instances: 2, DestroyKey pauses the other instance for its
// write and used to take that instance's keysMu to drop the key from it,
// while an AddKey on the same token (a rollback serving an old version
// again) holds that keysMu and waits for the paused module: each waited on
// the other for ever, and the 30 s bound on the destroy could not help.
func TestDestroyKeyBesideAPeersAddKey(t *testing.T) {
	tok := softhsmtest.New(t, "destroy")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	p := open(t, tok, nil, func(c *Config) { c.Instances = 2; c.TokenLabel = tok.Label })
	ctx := context.Background()
	if _, err := p.GenerateKey(ctx, "attempt", providers.KeyECDSAP256, "attempt", nil); err != nil {
		t.Fatal(err)
	}
	added := make(chan error, 1)
	done := make(chan error, 1)
	go func() {
		done <- p.DestroyKey(ctx, "attempt", func(providers.KeyInfo) error {
			// The peer is paused by now: its AddKey holds its keysMu and
			// waits for the module.
			go func() {
				_, err := p.peers[0].addKey(ctx, KeyConfig{Name: "old-version", URI: keys[providers.KeyECDSAP256].URI})
				added <- err
			}()
			time.Sleep(300 * time.Millisecond)
			return nil
		})
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("DestroyKey: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("DestroyKey still blocked after 20 s beside a peer's AddKey")
	}
	if err := <-added; err != nil {
		t.Fatalf("the peer's AddKey: %v", err)
	}
	if _, err := p.Sign(ctx, "attempt", providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: 5}, make([]byte, 32)); !errors.Is(err, providers.ErrNotFound) {
		t.Fatalf("the destroyed key still signs: %v", err)
	}
}

// A crashed attempt's key that the agent now serves under another name
// (adopted by its URI, as another slot's key) is kept. The check compared kids, and a kid hashes the key's name
// too: the same key under another name has another kid, so it passed.
func TestDestroyKeyKeepsAKeyServedUnderAnotherName(t *testing.T) {
	tok := softhsmtest.New(t, "destroy2")
	p := open(t, tok, nil, func(c *Config) { c.TokenLabel = tok.Label })
	ctx := context.Background()
	info, err := p.GenerateKey(ctx, "attempt", providers.KeyECDSAP256, "attempt", nil)
	if err != nil {
		t.Fatal(err)
	}
	uri, err := p.URI("attempt")
	if err != nil {
		t.Fatal(err)
	}
	// An agent restarted after the attempt died does not serve it under
	// its own name; the operator's config serves it as web-next.
	p.keys.Remove("attempt")
	other, err := p.AddKey(ctx, KeyConfig{Name: "web-next", URI: uri})
	if err != nil {
		t.Fatal(err)
	}
	if other.KID == info.KID {
		t.Fatalf("one kid for two names: %s", info.KID)
	}
	err = p.DestroyKey(ctx, "attempt", func(providers.KeyInfo) error { return nil })
	if err == nil {
		t.Fatal("DestroyKey destroyed a key served as web-next")
	}
	signAndVerify(t, p, "web-next", providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: 5}, []byte("still here"))
}
