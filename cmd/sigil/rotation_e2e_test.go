package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/agent/rotation"
)

// An operator's rotation from the shell: rotate, export the evidence pack
// and verify it offline, schedule one, run an incident drill.
func TestRotationFromTheShell(t *testing.T) {
	bin := buildSigil(t)
	r := newRotationSetup(t, "ecdsa-p256", 10)
	state, config, socket, admin := r.state, r.config, r.socket, r.admin
	dir := r.dir
	agent := startAgentProcess(t, bin, config, socket)
	agent.waitReady(t)

	out, stderr, code := runBin(t, bin, "rotate", "payments/release", "--admin-socket", admin)
	if code != 0 || !strings.Contains(out, "version 2") {
		t.Fatalf("rotate: %d %s %s", code, out, stderr)
	}
	exportDir := filepath.Join(dir, "export")
	out, stderr, code = runBin(t, bin, "rep", "export", "payments/release", "--out", exportDir, "--admin-socket", admin)
	if code != 0 {
		t.Fatalf("rep export: %d %s %s", code, out, stderr)
	}
	manifest := filepath.Join(exportDir, "payments", "release", "rep-2.json")
	out, stderr, code = runBin(t, bin, "rep", "verify", manifest, "--evidence-key", filepath.Join(state, "evidence.pub"))
	if code != 0 || !strings.Contains(out, "evidence pack OK") {
		t.Fatalf("rep verify: %d %s %s", code, out, stderr)
	}
	// The statement's own verify command works as printed, run where the
	// agent wrote the pack, and where rep export wrote it (with the
	// evidence public key the agent sent; it used to write none).
	for _, packDir := range []string{filepath.Join(state, "evidence", "payments", "release"), filepath.Dir(manifest)} {
		args := statementVerifyCommand(t, filepath.Join(packDir, "rep-2.json"))
		cmd := exec.Command(bin, args...)
		cmd.Dir = packDir
		if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "evidence pack OK") {
			t.Fatalf("the statement's %q in %s: %v\n%s", args, packDir, err, out)
		}
	}
	at := time.Now().Add(48 * time.Hour).UTC().Format(time.RFC3339)
	if out, stderr, code = runBin(t, bin, "rotate", "payments/release", "--at", at, "--admin-socket", admin); code != 0 || !strings.Contains(out, "scheduled") {
		t.Fatalf("rotate --at: %d %s %s", code, out, stderr)
	}
	if out, stderr, code = runBin(t, bin, "incident", "drill", "payments/release", "--admin-socket", admin); code != 0 || !strings.Contains(out, "drilled") {
		t.Fatalf("incident drill: %d %s %s", code, out, stderr)
	}
	if out, stderr, code = runBin(t, bin, "--socket", socket, "keys", "sign", "--in", config, "--key", "release"); code != 0 {
		t.Fatalf("sign after the drill: %s %s", out, stderr)
	}
	if _, stderr, code = runBin(t, bin, "rollback", "payments/release", "--admin-socket", admin); code != exitRefused || !strings.Contains(stderr, "KEY_RETIRED") {
		t.Fatalf("rollback past an emergency rotation: %d %s", code, stderr)
	}
}

// rotationSetup is an agent configuration with one tenant ("payments", this
// test's uid, also the admin) and one slot ("release") on a software key.
type rotationSetup struct {
	dir, state, config string
	socket, admin      string
}

func newRotationSetup(t *testing.T, keyType string, canaries int) rotationSetup {
	t.Helper()
	dir := t.TempDir()
	r := rotationSetup{dir: dir, state: filepath.Join(dir, "state"), config: filepath.Join(dir, "sigil.yaml")}
	policyFile := filepath.Join(dir, "policy.yaml")
	os.WriteFile(policyFile, []byte(fmt.Sprintf(`
admins: {unix_uids: [%d]}
tenants:
  - name: payments
    identities: {unix_uids: [%d]}
    slots:
      - {name: release, key: release-v1}
`, os.Getuid(), os.Getuid())), 0o600)
	os.WriteFile(r.config, []byte(fmt.Sprintf(`
data_dir: %s
policy: %s
rotation: {canaries: %d}
providers:
  - id: soft
    type: software
    keys: [{name: release-v1, type: %s}]
`, r.state, policyFile, canaries, keyType)), 0o600)
	sockDir, _ := os.MkdirTemp("", "sigil-rot")
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	r.socket = filepath.Join(sockDir, "agent.sock")
	r.admin = filepath.Join(sockDir, "admin.sock")
	return r
}

// An evidence pack larger than one reply is exported whole, in parts, and
// verifies: with 2000 canaries the manifest is several replies long (an
// RSA-4096 slot's default 100 already outgrow one). rep export used to fail
// with "frame too large", so such a pack could not be fetched.
func TestREPExportOfALargePack(t *testing.T) {
	bin := buildSigil(t)
	r := newRotationSetup(t, "ecdsa-p256", 2000)
	startAgentProcess(t, bin, r.config, r.socket).waitReady(t)
	if out, stderr, code := runBin(t, bin, "rotate", "payments/release", "--admin-socket", r.admin); code != 0 {
		t.Fatalf("rotate: %d %s %s", code, out, stderr)
	}
	own, _, _, _ := rotation.REPPaths(filepath.Join(r.state, "evidence"), "payments/release", 2)
	if fi, err := os.Stat(own); err != nil || fi.Size() < 3*64<<10 {
		t.Fatalf("the agent's manifest: %v; want one of several replies (%d bytes)", err, fi.Size())
	}
	exportDir := filepath.Join(r.dir, "export")
	if out, stderr, code := runBin(t, bin, "rep", "export", "payments/release", "--out", exportDir, "--admin-socket", r.admin); code != 0 {
		t.Fatalf("rep export: %d %s %s", code, out, stderr)
	}
	exported, _, _, _ := rotation.REPPaths(exportDir, "payments/release", 2)
	a, _ := os.ReadFile(own)
	b, _ := os.ReadFile(exported)
	if !bytes.Equal(a, b) {
		t.Fatalf("the exported manifest (%d bytes) differs from the agent's (%d bytes)", len(b), len(a))
	}
	if out, stderr, code := runBin(t, bin, "rep", "verify", exported, "--evidence-key", filepath.Join(r.state, "evidence.pub")); code != 0 || !strings.Contains(out, "evidence pack OK") {
		t.Fatalf("rep verify of the exported pack: %d %s %s", code, out, stderr)
	}
}

// `rep export` that cannot write its files here fails as a local failure
// (exit 1, naming the path and why), not as a lost agent: it used to
// report the write through the connection's error path, exit 3 and
// "no agent reachable", with the agent up and the pack fetched.
func TestREPExportLocalFailureIsNotNoAgent(t *testing.T) {
	bin := buildSigil(t)
	r := newRotationSetup(t, "ecdsa-p256", 10)
	startAgentProcess(t, bin, r.config, r.socket).waitReady(t)
	if out, stderr, code := runBin(t, bin, "rotate", "payments/release", "--admin-socket", r.admin); code != 0 {
		t.Fatalf("rotate: %d %s %s", code, out, stderr)
	}
	file := filepath.Join(r.dir, "a-file")
	os.WriteFile(file, []byte("not a directory"), 0o600)
	readOnly := filepath.Join(r.dir, "read-only")
	os.Mkdir(readOnly, 0o500)
	for _, tc := range []struct {
		name, out, says string
		needsNonRoot    bool
	}{
		{"--out is a file", file, "not a directory", false},
		{"--out under a file", filepath.Join(file, "packs"), "not a directory", false},
		{"--out read-only", readOnly, "permission denied", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.needsNonRoot && os.Geteuid() == 0 {
				t.Skip("root writes into a read-only directory")
			}
			_, stderr, code := runBin(t, bin, "rep", "export", "payments/release", "--out", tc.out, "--admin-socket", r.admin)
			if code != exitFailure || !strings.Contains(stderr, tc.says) || !strings.Contains(stderr, tc.out) ||
				strings.Contains(stderr, "agent") || strings.Contains(stderr, "connection") {
				t.Fatalf("exit %d (want %d), want a local failure naming %s and %q, not the agent:\n%s", code, exitFailure, tc.out, tc.says, stderr)
			}
		})
	}
}
