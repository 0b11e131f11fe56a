package client_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

// A Signer never signs with another key than the one Public returns. Once
// its key slot rotates, the version it holds verifies only: Sign fails
// with KEY_RETIRED (made from the slot's name or from the kid), and its
// message tells the caller how to reach the active version; Public still
// returns the old key. A new Signer gets the new version, and a rollback
// makes the first Signer sign again.
func TestSignerAcrossARotation(t *testing.T) {
	ctx := context.Background()
	cfg := agentConfig(t)
	cfg.DefaultKey = ""
	cfg.DataDir = t.TempDir()
	dir, _ := os.MkdirTemp("", "sigil-rot")
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg.Socket = filepath.Join(dir, "agent.sock")
	cfg.AdminSocket = filepath.Join(dir, "admin.sock")
	cfg.Policy = filepath.Join(dir, "policy.yaml")
	policy := fmt.Sprintf("admins: {unix_uids: [%d]}\ntenants:\n  - name: payments\n    identities: {unix_uids: [%d]}\n    slots:\n      - {name: release, key: p256}\n", os.Getuid(), os.Getuid())
	if err := os.WriteFile(cfg.Policy, []byte(policy), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg.Rotation.Canaries = 2
	a := run(t, cfg)
	aln, err := agent.ListenUnix(cfg.AdminSocket)
	if err != nil {
		t.Fatal(err)
	}
	go a.ServeAdmin(aln)
	c := dial(t, cfg.Socket)
	admin := dial(t, cfg.AdminSocket)

	byName, err := c.Signer(ctx, client.ByName("release"))
	if err != nil {
		t.Fatal(err)
	}
	byKID, err := c.Signer(ctx, client.ByKID(byName.Key().KID))
	if err != nil {
		t.Fatal(err)
	}
	v1 := byName.Key().SPKI
	signs := func(t *testing.T, s *client.Signer) {
		t.Helper()
		digest := digestFor(crypto.SHA256, "release v1.2.3")
		sig, err := s.Sign(nil, digest, crypto.SHA256)
		if err != nil {
			t.Fatalf("Sign: %v", err)
		}
		if err := verifyUnder(s.Public(), digest, crypto.SHA256, sig); err != nil {
			t.Fatal(err)
		}
	}
	signs(t, byName)
	signs(t, byKID)

	if err := admin.Rotate(ctx, "payments/release"); err != nil {
		t.Fatal(err)
	}
	for _, s := range []*client.Signer{byName, byKID} {
		sig, err := s.Sign(nil, digestFor(crypto.SHA256, "after the rotation"), crypto.SHA256)
		if client.Code(err) != proto.KeyRetired {
			t.Fatalf("a rotated-out version: Sign = %x, %v; want KEY_RETIRED", sig, err)
		}
		// The request named the slot (byName) or the kid alone: either
		// way, the remedy is a request for the slot's active version
		// without this kid, which a Go caller gets from a new Signer.
		var pe *proto.Error
		if !errors.As(err, &pe) || !strings.Contains(pe.Msg, "no kid") || !strings.Contains(err.Error(), "new Signer") {
			t.Errorf("the refusal does not say how to sign with the active version: %q", err)
		}
		if der, _ := x509.MarshalPKIXPublicKey(s.Public()); !bytes.Equal(der, v1) {
			t.Fatal("Public changed with the rotation")
		}
	}
	fresh, err := c.Signer(ctx, client.ByName("release"))
	if err != nil {
		t.Fatal(err)
	}
	if fresh.Key().KID == byName.Key().KID || bytes.Equal(fresh.Key().SPKI, v1) {
		t.Fatal("a Signer made after the rotation has the old key")
	}
	signs(t, fresh)

	if _, err := admin.Rollback(ctx, "payments/release"); err != nil {
		t.Fatal(err)
	}
	signs(t, byName)
	signs(t, byKID)
	if _, err := fresh.Sign(nil, digestFor(crypto.SHA256, "x"), crypto.SHA256); client.Code(err) != proto.KeyRetired {
		t.Fatalf("the version rolled back from: %v, want KEY_RETIRED", err)
	}

	// An incident drill retires the version it replaces, and every older
	// one still accepted, at once: they no longer even verify. Their
	// Signers get KEY_RETIRED too (the slot and the version exist: not
	// NOT_FOUND).
	if _, err := admin.IncidentDrill(ctx, "payments/release"); err != nil {
		t.Fatal(err)
	}
	for _, s := range []*client.Signer{byName, byKID, fresh} {
		sig, err := s.Sign(nil, digestFor(crypto.SHA256, "after the drill"), crypto.SHA256)
		if client.Code(err) != proto.KeyRetired || !strings.Contains(err.Error(), "new Signer") {
			t.Errorf("a retired version (%s): Sign = %x, %v; want KEY_RETIRED, saying to make a new Signer", s.Key().KID, sig, err)
		}
	}
}
