package client_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/tls"
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

// A key the agent has a certificate for is a tls.Certificate, with its
// intermediate: a server that requires client certificates from the root CA
// accepts a handshake whose CertificateVerify the agent signed. A key
// without one is NOT_FOUND.
func TestTLSCertificateAuthenticatesAClient(t *testing.T) {
	cfg := agentConfig(t)
	cfg.DataDir = t.TempDir()
	sockDir, _ := os.MkdirTemp("", "sigil-tls")
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	cfg.Socket = filepath.Join(sockDir, "first.sock")
	first, c := serve(t, cfg)
	keys, err := c.ListKeys(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	first.Shutdown(context.Background())

	// The same keys again, now with a certificate for p256 from an
	// intermediate CA, the intermediate after it in the file: the server
	// trusts only the root, so the handshake needs the chain.
	ca, err := devcerts.NewCA("client root CA")
	if err != nil {
		t.Fatal(err)
	}
	intermediate, err := ca.NewIntermediate("client issuing CA")
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if k.Name != "p256" {
			continue
		}
		der, err := intermediate.Certify(k.Public, devcerts.Leaf{CommonName: "payments-client"})
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(t.TempDir(), "p256.crt")
		os.WriteFile(path, append(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), intermediate.CertPEM...), 0o600)
		cfg.Certificates = map[string]string{"p256": path}
	}
	cfg.Socket = filepath.Join(sockDir, "second.sock")
	_, c2 := serve(t, cfg)

	if _, err := c2.TLSCertificate(context.Background(), "rsa"); client.Code(err) != proto.NotFound || !errors.Is(err, client.ErrNoCertificate) {
		t.Fatalf("a key without a certificate: %v, want NOT_FOUND (ErrNoCertificate)", err)
	}
	cert, err := c2.TLSCertificate(context.Background(), "p256")
	if err != nil {
		t.Fatal(err)
	}
	server, err := ca.Issue(devcerts.Leaf{CommonName: "server", DNSNames: []string{"server.test"}, Server: true})
	if err != nil {
		t.Fatal(err)
	}
	srv := handshake(t, &tls.Config{Certificates: []tls.Certificate{server.TLS}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: ca.Pool()},
		&tls.Config{RootCAs: ca.Pool(), ServerName: "server.test", Certificates: []tls.Certificate{cert}})
	if peer := srv.ConnectionState().PeerCertificates; len(peer) != 2 || peer[0].Subject.CommonName != "payments-client" {
		t.Fatalf("the server saw %v", peer)
	}
}

// serve starts an agent on cfg and dials it.
func serve(t *testing.T, cfg agent.Config) (*agent.Agent, *client.Client) {
	t.Helper()
	return run(t, cfg), dial(t, cfg.Socket)
}

// Under a policy, TLSCertificate takes a slot name as Signer does: short
// ("release") or qualified with the tenant ("payments/release"); a name
// qualified with a tenant the caller is not in finds nothing, even where
// the caller has a slot of that short name.
func TestTLSCertificateTakesQualifiedSlotNames(t *testing.T) {
	cfg := agentConfig(t)
	cfg.DataDir = t.TempDir()
	sockDir, _ := os.MkdirTemp("", "sigil-tls")
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	cfg.Socket = filepath.Join(sockDir, "first.sock")
	first, c := serve(t, cfg)
	pub, err := c.PublicKey(context.Background(), client.ByName("p256"))
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	first.Shutdown(context.Background())

	ca, err := devcerts.NewCA("slot CA")
	if err != nil {
		t.Fatal(err)
	}
	der, err := ca.Certify(pub.Public, devcerts.Leaf{CommonName: "release"})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile := filepath.Join(dir, "p256.crt")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	cfg.Certificates = map[string]string{"p256": certFile}
	cfg.Policy = filepath.Join(dir, "policy.yaml")
	os.WriteFile(cfg.Policy, []byte(fmt.Sprintf(`
tenants:
  - name: payments
    identities: {unix_uids: [%d]}
    slots:
      - {name: release, key: p256}
  - name: billing
    identities: {unix_uids: [%d]}
    slots:
      - {name: release, key: p384}
`, os.Getuid(), os.Getuid()+1)), 0o600)
	cfg.DefaultKey = ""
	cfg.Socket = filepath.Join(sockDir, "second.sock")
	_, c2 := serve(t, cfg)

	for _, name := range []string{"release", "payments/release"} {
		cert, err := c2.TLSCertificate(context.Background(), name)
		if err != nil {
			t.Fatalf("TLSCertificate(%q): %v", name, err)
		}
		signer := cert.PrivateKey.(crypto.Signer)
		digest := sha256.Sum256([]byte("hello"))
		sig, err := signer.Sign(nil, digest[:], crypto.SHA256)
		if err != nil {
			t.Fatalf("%q: Sign: %v", name, err)
		}
		if !ecdsa.VerifyASN1(cert.Leaf.PublicKey.(*ecdsa.PublicKey), digest[:], sig) {
			t.Fatalf("%q: the signature does not verify against the certificate", name)
		}
	}
	if _, err := c2.TLSCertificate(context.Background(), "billing/release"); client.Code(err) != proto.NotFound {
		t.Fatalf("another tenant's slot: %v, want NOT_FOUND", err)
	}
}
