package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/agent/rotation"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/software"
)

// rotatedPack makes a real rotation of payments/release (v1 to v2) and
// returns its pack's manifest, written where the agent writes it, and the
// evidence key files: the public key (PEM) that verifies it and the
// private key that signed it.
func rotatedPack(t *testing.T) (manifest, pub, private string) {
	t.Helper()
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
	private = filepath.Join(dir, "evidence.key")
	evidence, err := rotation.LoadOrCreateEvidenceKey(private)
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
	manifest, _, _, _ = rotation.REPPaths(filepath.Join(dir, "evidence"), "payments/release", res.REP)
	pub = filepath.Join(dir, "evidence.pub")
	os.WriteFile(pub, rotation.MarshalEvidencePublicKey(rot.EvidencePublicKey()), 0o644)
	return manifest, pub, private
}

// A pack written by a real rotation verifies from the shell; one edited
// byte, or another evidence key, fails it.
func TestREPVerifyFromTheShell(t *testing.T) {
	manifest, pub, _ := rotatedPack(t)
	dir := t.TempDir()
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

// A pack checked against a file that is not an Ed25519 public key (the
// evidence key is Ed25519) is not verified: exit 1, as for a pack that
// does not verify, saying what is wrong with the key and never printing
// it. Such a file used to be a usage error (exit 2), which
// docs/rotation.md did not say.
func TestREPVerifyWithAWrongEvidenceKey(t *testing.T) {
	manifest, _, private := rotatedPack(t)
	dir := t.TempDir()
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	spki, _ := x509.MarshalPKIXPublicKey(&ec.PublicKey)
	other, _ := rotation.LoadOrCreateEvidenceKey(filepath.Join(dir, "other.key"))
	privatePEM, _ := os.ReadFile(private)
	for _, tc := range []struct {
		name string
		key  []byte
		says string
	}{
		{"ECDSA public key", pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: spki}), "not an Ed25519 public key"},
		{"the evidence private key", privatePEM, "not an Ed25519 public key"},
		{"not a key", []byte("evidence.pub\n"), "not an Ed25519 public key"},
		{"another Ed25519 key", rotation.MarshalEvidencePublicKey(other.Public().(ed25519.PublicKey)), "INVALID"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pub := filepath.Join(dir, "key.pem")
			os.WriteFile(pub, tc.key, 0o600)
			out, stderr, code := run(t, "rep", "verify", manifest, "--evidence-key", pub)
			if code != exitFailure || !strings.Contains(stderr, tc.says) {
				t.Fatalf("exit %d (want %d), want %q\n%s%s", code, exitFailure, tc.says, out, stderr)
			}
			block, _ := pem.Decode(privatePEM)
			if body := base64.StdEncoding.EncodeToString(block.Bytes); strings.Contains(stderr, body[:16]) {
				t.Fatalf("the message carries key material: %s", stderr)
			}
		})
	}
}

// rep export gives each part of a pack larger than one reply its own
// --timeout: a big pack over a slow link, every part well in time, is
// fetched whole. The parts used to share one --timeout, so such a pack
// failed with DEADLINE_EXCEEDED however quick each part was.
func TestREPExportWaitsTimeoutForEachPart(t *testing.T) {
	const (
		parts   = 5
		perPart = 400 * time.Millisecond // each part's wait at the fake agent
		timeout = 1200 * time.Millisecond
	)
	// The parts together take longer than --timeout; each one well within it.
	if parts*perPart < timeout+500*time.Millisecond || 2*perPart > timeout {
		t.Fatal("the test's timing proves nothing")
	}
	manifest := []byte(`{"slot":"a/b","number":3,"reason":"` + strings.Repeat("r", parts*10000) + `"}`)
	partLen := (len(manifest) + parts - 1) / parts
	sig := bytes.Repeat([]byte{7}, 64)
	dir := shortSocketDir(t)
	admin := filepath.Join(dir, "admin.sock")
	var asked atomic.Int32
	listenUnix(t, admin, func(nc net.Conn) {
		go fakeAgent(nc, func(req *proto.Request) *proto.Response {
			if req.Op != proto.OpExportREP || req.Key != "a/b" || req.FromSeq >= uint64(len(manifest)) {
				return &proto.Response{Code: proto.BadRequest, Msg: "not the request the test expects"}
			}
			asked.Add(1)
			time.Sleep(perPart)
			part := manifest[req.FromSeq:min(int(req.FromSeq)+partLen, len(manifest))]
			return &proto.Response{Code: proto.OK, Records: [][]byte{part, sig, fmt.Appendf(nil, "%d 3", len(manifest))}}
		})
	})
	out := t.TempDir()
	stdout, stderr, code := run(t, "--timeout", timeout.String(), "rep", "export", "a/b", "--out", out, "--admin-socket", admin)
	if code != exitOK || !strings.Contains(stdout, "wrote ") {
		t.Fatalf("exit %d after %d parts, stdout %q, stderr %q; want the pack written", code, asked.Load(), stdout, stderr)
	}
	written, _, _, _ := rotation.REPPaths(out, "a/b", 3)
	if got, err := os.ReadFile(written); err != nil || !bytes.Equal(got, manifest) || asked.Load() != parts {
		t.Fatalf("%s: %v, %d bytes in %d parts; want the %d-byte manifest in %d", written, err, len(got), asked.Load(), len(manifest), parts)
	}
}

// A pack verifies as the file it is named: rep-N.json in TENANT/SLOT/, as
// the agent and rep export write it, must be pack N of that slot. Another
// pack put in its place (an older one replayed, another slot's, another
// tenant's) verifies by its signature alone, and rep verify used to say
// "evidence pack OK" for it. A copy under another name is verified as
// what it says it is.
func TestREPVerifyRefusesAPackInAnothersPlace(t *testing.T) {
	manifest, pub, _ := rotatedPack(t) // pack 2 of payments/release
	raw, _ := os.ReadFile(manifest)
	sig, _ := os.ReadFile(strings.TrimSuffix(manifest, ".json") + ".sig")
	for _, tc := range []struct {
		name, at string // at: where the pack is put, under a fresh directory
		code     int
		says     string
	}{
		{"its own place", "payments/release/rep-2.json", exitOK, "evidence pack OK: payments/release rotation 2"},
		{"a copy under another name", "pack.json", exitOK, "evidence pack OK: payments/release rotation 2"},
		{"in place of a newer pack", "payments/release/rep-3.json", exitFailure, "rep-3.json is the place of pack 3 of payments/release, but holds pack 2 of payments/release"},
		{"in place of another slot's", "payments/firmware/rep-2.json", exitFailure, "place of pack 2 of payments/firmware, but holds pack 2 of payments/release"},
		{"in place of another tenant's", "billing/release/rep-2.json", exitFailure, "place of pack 2 of billing/release, but holds pack 2 of payments/release"},
		{"a copy named rep-2.json out of its place", "rep-2.json", exitFailure, "INVALID: rotation evidence pack does not verify: rep-2.json is the place of pack 2 of"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), filepath.FromSlash(tc.at))
			os.MkdirAll(filepath.Dir(path), 0o755)
			os.WriteFile(path, raw, 0o644)
			os.WriteFile(strings.TrimSuffix(path, ".json")+".sig", sig, 0o644)
			out, stderr, code := run(t, "rep", "verify", path, "--evidence-key", pub)
			if code != tc.code || !strings.Contains(out+stderr, tc.says) {
				t.Fatalf("exit %d (want %d), want %q in\n%s%s", code, tc.code, tc.says, out, stderr)
			}
		})
	}
}

// rep export writes what it asked for: a reply that carries a pack of
// another slot, or another number than the one asked, is refused and
// nothing is written. It used to be written, under the other pack's own
// name, and the export said "wrote".
func TestREPExportRefusesAnotherPack(t *testing.T) {
	sig := bytes.Repeat([]byte{7}, 64)
	for _, tc := range []struct {
		name     string
		args     []string
		manifest string
	}{
		{"another slot", []string{"a/b"}, `{"slot":"a/other","tenant":"a","number":3}`},
		{"another number", []string{"a/b", "3"}, `{"slot":"a/b","tenant":"a","number":2}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			admin := filepath.Join(shortSocketDir(t), "admin.sock")
			listenUnix(t, admin, func(nc net.Conn) {
				go fakeAgent(nc, func(req *proto.Request) *proto.Response {
					return &proto.Response{Code: proto.OK, Records: [][]byte{[]byte(tc.manifest), sig}}
				})
			})
			out := t.TempDir()
			args := append([]string{"rep", "export"}, tc.args...)
			stdout, stderr, code := run(t, append(args, "--out", out, "--admin-socket", admin)...)
			if code != exitFailure || !strings.Contains(stderr, "not the pack asked for") {
				t.Fatalf("exit %d, want %d and the reason; stdout %q, stderr %q", code, exitFailure, stdout, stderr)
			}
			if ents, _ := os.ReadDir(out); len(ents) != 0 {
				t.Fatalf("files written under --out: %v", ents)
			}
		})
	}
}

// rep verify names the evidence key it verified with, so an auditor can
// compare it with the fingerprint pinned (docs/rotation.md); a pack
// whose manifest names another key says which, beside the key given. It
// used to print neither, though the docs tell auditors to pin it.
func TestREPVerifyPrintsTheEvidenceKey(t *testing.T) {
	manifest, pub, _ := rotatedPack(t)
	pubPEM, _ := os.ReadFile(pub)
	own, err := rotation.ParseEvidencePublicKey(pubPEM)
	if err != nil {
		t.Fatal(err)
	}
	other, _ := rotation.LoadOrCreateEvidenceKey(filepath.Join(t.TempDir(), "other.key"))
	otherPub := other.Public().(ed25519.PublicKey)
	otherFile := filepath.Join(t.TempDir(), "other.pub.pem")
	os.WriteFile(otherFile, rotation.MarshalEvidencePublicKey(otherPub), 0o644)
	for _, tc := range []struct {
		name, key string
		code      int
		says      string
	}{
		{"the signing key", pub, exitOK,
			"evidence pack OK: payments/release rotation 2 (evidence key " + rotation.EvidenceKeyID(own) + ")\n"},
		{"another key", otherFile, exitFailure,
			"(verified with evidence key " + rotation.EvidenceKeyID(otherPub) + "; the manifest names evidence key " + rotation.EvidenceKeyID(own) + ")"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, stderr, code := run(t, "rep", "verify", manifest, "--evidence-key", tc.key)
			if code != tc.code || !strings.Contains(out+stderr, tc.says) {
				t.Fatalf("exit %d (want %d), want %q in\n%s%s", code, tc.code, tc.says, out, stderr)
			}
		})
	}
}

// statementVerifyCommand is the `sigil rep verify` line of the statement
// rep-N.md beside manifest, as arguments after "sigil".
func statementVerifyCommand(t *testing.T, manifest string) []string {
	t.Helper()
	md, err := os.ReadFile(strings.TrimSuffix(manifest, ".json") + ".md")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(md), "\n") {
		if strings.HasPrefix(l, "sigil rep verify ") {
			return strings.Fields(l)[1:]
		}
	}
	t.Fatalf("no verify command in the statement beside %s", manifest)
	return nil
}

// rep export writes the agent's evidence public key at the top of --out,
// where every statement's verify command (../../evidence-key.pub.pem)
// looks for it, so that command verifies the exported pack as printed. A
// file there holding another key verifies the packs exported before with
// it: it is not replaced, and nothing is written. The key used not to be
// written at all, so the statement's command failed in an export.
func TestREPExportWritesTheEvidencePublicKey(t *testing.T) {
	manifestPath, pubPath, _ := rotatedPack(t)
	manifest, _ := os.ReadFile(manifestPath)
	sig, _ := os.ReadFile(strings.TrimSuffix(manifestPath, ".json") + ".sig")
	pubPEM, _ := os.ReadFile(pubPath)
	pub, err := rotation.ParseEvidencePublicKey(pubPEM)
	if err != nil {
		t.Fatal(err)
	}
	spki, _ := x509.MarshalPKIXPublicKey(pub)
	other, _ := rotation.LoadOrCreateEvidenceKey(filepath.Join(t.TempDir(), "other.key"))
	otherSPKI, _ := x509.MarshalPKIXPublicKey(other.Public())
	otherPEM := rotation.MarshalEvidencePublicKey(other.Public().(ed25519.PublicKey))
	for _, tc := range []struct {
		name     string
		had      []byte // evidence-key.pub.pem under --out before the export
		agentKey []byte // the evidence key the agent sends (DER SPKI; nil: the signing key)
		code     int
		says     string
		verifies bool // the statement's command, run in the exported pack's directory
	}{
		{"a fresh directory", nil, nil, exitOK, "evidence-key.pub.pem", true},
		{"the same key there", pubPEM, nil, exitOK, "wrote", true},
		{"another key there", otherPEM, nil, exitFailure, "holds evidence key " + rotation.EvidenceKeyID(other.Public().(ed25519.PublicKey)), false},
		{"not a key there", []byte("junk\n"), nil, exitFailure, "evidence-key.pub.pem", false},
		// After the agent's evidence key was replaced: its older packs are
		// signed by the key kept aside, which the note names.
		{"a pack by an earlier key", nil, otherSPKI, exitOK, "the pack names evidence key " + rotation.EvidenceKeyID(pub) + ", not the agent's current " + rotation.EvidenceKeyID(other.Public().(ed25519.PublicKey)), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			admin := filepath.Join(shortSocketDir(t), "admin.sock")
			listenUnix(t, admin, func(nc net.Conn) {
				go fakeAgent(nc, func(req *proto.Request) *proto.Response {
					key := spki
					if tc.agentKey != nil {
						key = tc.agentKey
					}
					return &proto.Response{Code: proto.OK, Records: [][]byte{manifest, sig}, Pub: key}
				})
			})
			out := t.TempDir()
			keyFile := filepath.Join(out, rotation.EvidencePublicKeyFile)
			if tc.had != nil {
				os.WriteFile(keyFile, tc.had, 0o644)
			}
			stdout, stderr, code := run(t, "rep", "export", "payments/release", "--out", out, "--admin-socket", admin)
			if code != tc.code || !strings.Contains(stdout+stderr, tc.says) {
				t.Fatalf("exit %d (want %d), want %q in stdout %q, stderr %q", code, tc.code, tc.says, stdout, stderr)
			}
			exported, _, _, _ := rotation.REPPaths(out, "payments/release", 2)
			if code == exitOK && !tc.verifies {
				// Written, with the agent's current key: not the pack's.
				if got, _ := os.ReadFile(keyFile); !bytes.Equal(got, otherPEM) {
					t.Fatalf("%s does not hold the agent's key", keyFile)
				}
				return
			}
			if !tc.verifies {
				if got, _ := os.ReadFile(keyFile); !bytes.Equal(got, tc.had) {
					t.Fatalf("%s was replaced", keyFile)
				}
				if _, err := os.Stat(exported); err == nil {
					t.Fatalf("%s written though the export failed", exported)
				}
				return
			}
			t.Chdir(filepath.Dir(exported))
			if stdout, stderr, code := run(t, statementVerifyCommand(t, exported)...); code != exitOK || !strings.Contains(stdout, "evidence pack OK") {
				t.Fatalf("the statement's command in the export: exit %d %s %s", code, stdout, stderr)
			}
		})
	}
}
