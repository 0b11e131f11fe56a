package agent_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/agent"
)

// writeSelfSigned writes a self-signed certificate for a new P-256 key
// (not one the agent has) and returns its path.
func writeSelfSigned(t *testing.T, dir string) string {
	t.Helper()
	k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "someone else"},
		NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "other.crt")
	os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	return path
}

// A certificate the agent cannot serve stops it at start, naming the key
// and the reason. (The certificates it does serve: client/pkcs11module's
// TestCertificateObjects and TestJavaJarsignerThroughTheModule.)
func TestCertificateConfigRefused(t *testing.T) {
	dir := t.TempDir()
	other := writeSelfSigned(t, dir)
	garbage := filepath.Join(dir, "garbage.crt")
	os.WriteFile(garbage, []byte("not a certificate"), 0o600)
	for _, tc := range []struct {
		name  string
		certs map[string]string
		want  string
	}{
		{"another key's certificate", map[string]string{"default": other}, "certificates[default]: " + other + " certifies another key"},
		{"unknown key", map[string]string{"nope": other}, "certificates[nope]: no provider serves this key"},
		{"not PEM", map[string]string{"ed": garbage}, "no PEM CERTIFICATE block"},
		{"missing file", map[string]string{"ed": filepath.Join(dir, "missing.crt")}, "no such file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := softwareConfig(t)
			cfg.Certificates = tc.certs
			a, err := agent.New(context.Background(), cfg, nil)
			if err == nil {
				a.Shutdown(context.Background())
				t.Fatal("the agent started")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q, want it to contain %q", err, tc.want)
			}
		})
	}
}
