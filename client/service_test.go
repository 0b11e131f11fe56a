package client_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/agent/devcerts"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

// Tests of the Signer as a service puts it to work: a crypto/tls server
// whose certificate's key is behind the agent, and crypto/tls clients that
// verify the chain.

// A TLS service on a rotating slot, as docs/rotation.md lays it out: the
// rotation's evidence pack carries the new key's name and a CSR for it; a
// CA certifies that key, `certificates:` names the certificate under that
// key name, and a reload serves it, so TLSCertificate serves TLS with the
// new version. The agent must then start again on that config: a restart
// serves the rotated key again before the certificates are checked. Once an
// incident drill retires that version, its certificate names a key no
// longer served; that does not stop a start either (the agent says so in
// its log), and the slot's new version has no certificate until one is
// named.
func TestTLSCertificateForARotatedVersionSurvivesRestarts(t *testing.T) {
	ctx := context.Background()
	dir, _ := os.MkdirTemp("", "sigil-svc")
	t.Cleanup(func() { os.RemoveAll(dir) })
	policyFile := filepath.Join(dir, "policy.yaml")
	policy := fmt.Sprintf("admins: {unix_uids: [%d]}\ntenants:\n  - name: payments\n    identities: {unix_uids: [%d]}\n    slots:\n      - {name: release, key: p256}\n", os.Getuid(), os.Getuid())
	if err := os.WriteFile(policyFile, []byte(policy), 0o600); err != nil {
		t.Fatal(err)
	}
	configFile := filepath.Join(dir, "sigil.yaml")
	dataDir := t.TempDir()
	writeConfig := func(certificates string) agent.Config {
		t.Helper()
		yaml := fmt.Sprintf(`socket: %s
admin_socket: %s
data_dir: %s
policy: %s
rotation: {canaries: 2}
%s
providers:
  - id: soft
    type: software
    keys:
      - {name: p256, type: ecdsa-p256}
`, filepath.Join(dir, "agent.sock"), filepath.Join(dir, "admin.sock"), dataDir, policyFile, certificates)
		if err := os.WriteFile(configFile, []byte(yaml), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, err := agent.LoadConfig(configFile)
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
	start := func(cfg agent.Config) (*agent.Agent, *client.Client, *client.Client) {
		t.Helper()
		a := run(t, cfg)
		aln, err := agent.ListenUnix(cfg.AdminSocket)
		if err != nil {
			t.Fatal(err)
		}
		go a.ServeAdmin(aln)
		return a, dial(t, cfg.Socket), dial(t, cfg.AdminSocket)
	}
	ca, err := devcerts.NewCA("rotated root")
	if err != nil {
		t.Fatal(err)
	}
	peer := &tls.Config{RootCAs: ca.Pool(), ServerName: "sigil.test"}
	servesTLS := func(t *testing.T, c *client.Client, when string) {
		t.Helper()
		cert, err := c.TLSCertificate(ctx, "release")
		if err != nil {
			t.Fatalf("%s: TLSCertificate: %v", when, err)
		}
		if err := handshakeErr(&tls.Config{Certificates: []tls.Certificate{cert}}, peer, nil); err != nil {
			t.Fatalf("%s: %v", when, err)
		}
	}

	cfg := writeConfig("")
	a, c, admin := start(cfg)
	if err := admin.Rotate(ctx, "payments/release"); err != nil {
		t.Fatal(err)
	}
	// What the operator has: the rotation's evidence pack, with the new
	// key's name and its CSR.
	manifest, _, err := admin.ExportREP(ctx, "payments/release", 0)
	if err != nil {
		t.Fatal(err)
	}
	var rep struct {
		New struct{ Key string }
		CSR struct{ PEM string }
	}
	if err := json.Unmarshal(manifest, &rep); err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode([]byte(rep.CSR.PEM))
	if block == nil || rep.New.Key == "" {
		t.Fatalf("the evidence pack names no new key or CSR: %s", manifest)
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if err := csr.CheckSignature(); err != nil {
		t.Fatal(err)
	}
	der, err := ca.Certify(csr.PublicKey, devcerts.Leaf{CommonName: "release", DNSNames: []string{"sigil.test"}, Server: true})
	if err != nil {
		t.Fatal(err)
	}
	certFile := filepath.Join(dir, "release-v2.crt")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg = writeConfig(fmt.Sprintf("certificates: {%q: %s}", rep.New.Key, certFile))
	if err := a.Reload(); err != nil {
		t.Fatalf("reload naming the rotated key's certificate: %v", err)
	}
	servesTLS(t, c, "after the reload")

	c.Close()
	admin.Close()
	a.Shutdown(ctx)
	a, c, admin = start(cfg)
	servesTLS(t, c, "after a restart")

	if _, err := admin.IncidentDrill(ctx, "payments/release"); err != nil {
		t.Fatal(err)
	}
	c.Close()
	admin.Close()
	a.Shutdown(ctx)
	_, c, _ = start(cfg)
	if _, err := c.TLSCertificate(ctx, "release"); client.Code(err) != proto.NotFound || !errors.Is(err, client.ErrNoCertificate) {
		t.Fatalf("the drill's new version, after a restart: TLSCertificate = %v, want NOT_FOUND (no certificate yet)", err)
	}
}
