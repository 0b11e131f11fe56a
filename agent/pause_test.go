package agent_test

import (
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

// A run-time pause outlives the agent: after a restart the slot still
// refuses with PAUSED until an admin resumes it, and a resume outlives it
// too. A policy reload that drops the slot and brings it back keeps it
// paused.
func TestRunTimePauseSurvivesRestart(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.DefaultKey = ""
	cfg.AdminSocket = filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")
	cfg.Policy = filepath.Join(t.TempDir(), "policy.yaml")
	withSlot := fmt.Sprintf(`
admins: {unix_uids: [%d]}
tenants:
  - name: payments
    identities: {unix_uids: [%d]}
    slots:
      - {name: release, key: default}
      - {name: other, key: ed}
`, os.Getuid(), os.Getuid())
	withoutSlot := fmt.Sprintf(`
admins: {unix_uids: [%d]}
tenants:
  - name: payments
    identities: {unix_uids: [%d]}
    slots:
      - {name: other, key: ed}
`, os.Getuid(), os.Getuid())
	if err := os.WriteFile(cfg.Policy, []byte(withSlot), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	d := sha256.Sum256([]byte("pause"))
	sign := func(c *client.Client) error {
		_, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:])
		return err
	}

	agentLifetime(t, cfg, func(c, admin *client.Client) {
		if err := sign(c); err != nil {
			t.Fatal(err)
		}
		if _, err := admin.Pause(ctx, "payments/release"); err != nil {
			t.Fatal(err)
		}
		if err := sign(c); client.Code(err) != proto.Paused {
			t.Fatalf("after pause: %v, want PAUSED", err)
		}
	})
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		if err := sign(c); client.Code(err) != proto.Paused {
			t.Fatalf("after a restart: %v, want PAUSED", err)
		}
		if _, err := c.Sign(ctx, client.ByName("other"), client.Algorithm{}, []byte("m")); err != nil {
			t.Fatalf("the other slot: %v", err)
		}
		// The slot leaves the policy and comes back: still paused.
		os.WriteFile(cfg.Policy, []byte(withoutSlot), 0o600)
		if _, err := admin.ReloadPolicy(ctx); err != nil {
			t.Fatal(err)
		}
		os.WriteFile(cfg.Policy, []byte(withSlot), 0o600)
		if _, err := admin.ReloadPolicy(ctx); err != nil {
			t.Fatal(err)
		}
		if err := sign(c); client.Code(err) != proto.Paused {
			t.Fatalf("after the slot came back: %v, want PAUSED", err)
		}
		if _, err := admin.Resume(ctx, "payments/release"); err != nil {
			t.Fatal(err)
		}
		if err := sign(c); err != nil {
			t.Fatalf("after resume: %v", err)
		}
	})
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		if err := sign(c); err != nil {
			t.Fatalf("a resume did not outlive the restart: %v", err)
		}
	})
}
