package main

import (
	"context"
	"crypto/ed25519"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/agent/rotation"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/software"
)

// A pack written by a real rotation verifies from the shell; one edited
// byte, or another evidence key, fails it.
func TestREPVerifyFromTheShell(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	j, err := journal.Open(journal.Options{Dir: filepath.Join(dir, "journal"), MinFreeBytes: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	soft, err := software.Open(software.Config{ID: "soft", DataDir: filepath.Join(dir, "keys")})
	if err != nil {
		t.Fatal(err)
	}
	defer soft.Close()
	store, err := rotation.OpenStore(ctx, j, rotation.StoreOptions{})
	if err != nil {
		t.Fatal(err)
	}
	evidence, err := rotation.LoadOrCreateEvidenceKey(filepath.Join(dir, "evidence.key"))
	if err != nil {
		t.Fatal(err)
	}
	rot, err := rotation.NewRotator(store, rotation.Options{EvidenceKey: evidence, EvidenceDir: filepath.Join(dir, "evidence")})
	if err != nil {
		t.Fatal(err)
	}
	v1, err := soft.GenerateKey(ctx, "payments/release/v1", providers.KeyECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := store.Enroll(ctx, "payments/release", v1, "test"); err != nil {
		t.Fatal(err)
	}
	res, err := rot.Rotate(ctx, "payments/release", rotation.RotateOptions{Maker: soft, Signer: soft, Canaries: 10, Reason: "test"})
	if err != nil {
		t.Fatal(err)
	}
	manifest, _, _, _ := rotation.REPPaths(filepath.Join(dir, "evidence"), "payments/release", res.REP)
	pub := filepath.Join(dir, "evidence.pub")
	os.WriteFile(pub, rotation.MarshalEvidencePublicKey(rot.EvidencePublicKey()), 0o644)

	out, stderr, code := run(t, "rep", "verify", manifest, "--evidence-key", pub)
	if code != exitOK || !strings.Contains(out, "evidence pack OK") {
		t.Fatalf("verify: %d %s %s", code, out, stderr)
	}
	raw, _ := os.ReadFile(manifest)
	edited := []byte(strings.Replace(string(raw), `"reason":"test"`, `"reason":"tesT"`, 1))
	if string(edited) == string(raw) {
		edited[len(edited)/2] ^= 1
	}
	os.WriteFile(manifest, edited, 0o644)
	if _, stderr, code := run(t, "rep", "verify", manifest, "--evidence-key", pub); code != exitFailure || !strings.Contains(stderr, "INVALID") {
		t.Fatalf("an edited pack: exit %d %s", code, stderr)
	}
	os.WriteFile(manifest, raw, 0o644)
	other, _ := rotation.LoadOrCreateEvidenceKey(filepath.Join(dir, "other.key"))
	os.WriteFile(pub, rotation.MarshalEvidencePublicKey(other.Public().(ed25519.PublicKey)), 0o644)
	if _, _, code := run(t, "rep", "verify", manifest, "--evidence-key", pub); code != exitFailure {
		t.Fatalf("another evidence key: exit %d", code)
	}
}
