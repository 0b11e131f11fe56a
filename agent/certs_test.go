package agent_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/agent/devcerts"
	"github.com/sigil-agent/sigil/client"
)

// writeOtherKeysCert writes a certificate for a new key (not one the agent
// has) and returns its path.
func writeOtherKeysCert(t *testing.T, dir string) string {
	t.Helper()
	ca, err := devcerts.NewCA("other CA")
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.Issue(devcerts.Leaf{CommonName: "someone else"})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "other.crt")
	os.WriteFile(path, leaf.CertPEM, 0o600)
	return path
}

// A certificate the agent cannot serve stops it at start, naming the key
// and the reason. (The certificates it does serve: client/pkcs11module's
// TestCertificateObjects and TestJavaJarsignerThroughTheModule.)
func TestCertificateConfigRefused(t *testing.T) {
	dir := t.TempDir()
	other := writeOtherKeysCert(t, dir)
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

// keysOfFirstStart starts the agent once, so that it makes its software
// keys, and returns them: a certificate needs the key's public half.
func keysOfFirstStart(t *testing.T, cfg agent.Config) []client.Key {
	t.Helper()
	r := startAgent(t, cfg)
	keys, err := r.dial(t).ListKeys(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	r.agent.Shutdown(context.Background())
	return keys
}

// Certificates that would make the key list larger than one frame are
// refused at start: clients read ListKeys in one frame of at most 64 KiB.
func TestCertificatesOverOneFrameRefused(t *testing.T) {
	cfg := softwareConfig(t)
	keys := keysOfFirstStart(t, cfg)
	ca, err := devcerts.NewCA("large CA")
	if err != nil {
		t.Fatal(err)
	}
	names := make([]string, 0, 3000)
	for i := range 3000 {
		names = append(names, fmt.Sprintf("host-%04d.example.org", i))
	}
	cfg.Certificates = map[string]string{}
	for _, k := range keys {
		if k.Name != "ed" {
			continue
		}
		der, err := ca.Certify(k.Public, devcerts.Leaf{CommonName: "large", DNSNames: names})
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(t.TempDir(), "large.crt")
		os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
		cfg.Certificates["ed"] = path
	}
	a, err := agent.New(context.Background(), cfg, nil)
	if err == nil {
		a.Shutdown(context.Background())
		t.Fatal("the agent started")
	}
	if !strings.Contains(err.Error(), "over the 65536-byte frame") {
		t.Fatalf("error %q", err)
	}
}

// A renewed certificate is served after a reload, with no restart; one
// that does not load is refused and the one in force stays.
func TestCertificateReload(t *testing.T) {
	cfg := softwareConfig(t)
	keys := keysOfFirstStart(t, cfg)
	var pub crypto.PublicKey
	for _, k := range keys {
		if k.Name == "default" {
			pub = k.Public
		}
	}
	ca, err := devcerts.NewCA("reload CA")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "default.crt")
	issue := func(cn string) []byte {
		der, err := ca.Certify(pub, devcerts.Leaf{CommonName: cn})
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
		return der
	}
	served := func(c *client.Client) []byte {
		t.Helper()
		keys, err := c.ListKeys(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range keys {
			if k.Name == "default" {
				return k.Certificate
			}
		}
		return nil
	}

	first := issue("first")
	cfg.Certificates = map[string]string{"default": path}
	r := startAgent(t, cfg)
	c := r.dial(t)
	if !bytes.Equal(served(c), first) {
		t.Fatal("the configured certificate is not served")
	}
	renewed := issue("renewed")
	if err := r.agent.Reload(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(served(c), renewed) {
		t.Fatal("the renewed certificate is not served after a reload")
	}
	// The expiry metric follows the certificate in force.
	cert, _ := x509.ParseCertificate(renewed)
	rec := httptest.NewRecorder()
	r.agent.AdminHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	want := fmt.Sprintf(`sigil_key_certificate_expiry_timestamp_seconds{key="default"} %s`,
		strconv.FormatFloat(float64(cert.NotAfter.Unix()), 'g', -1, 64))
	if !strings.Contains(rec.Body.String(), want) {
		t.Fatalf("/metrics lacks %q", want)
	}
	os.WriteFile(path, []byte("half-written"), 0o600)
	if err := r.agent.Reload(); err == nil || !strings.Contains(err.Error(), "no PEM CERTIFICATE block") {
		t.Fatalf("reload of a broken file: %v", err)
	}
	if !bytes.Equal(served(c), renewed) {
		t.Fatal("a failed reload changed the certificate served")
	}
}

// Reload reads the `certificates:` map again from the config file: a key
// given a certificate gets it, a key taken out of the map loses it, and a
// config file that no longer parses leaves the certificates in force.
func TestReloadReadsTheCertificatesMapAgain(t *testing.T) {
	base := softwareConfig(t)
	pubs := map[string]crypto.PublicKey{}
	for _, k := range keysOfFirstStart(t, base) {
		pubs[k.Name] = k.Public
	}
	ca, err := devcerts.NewCA("map CA")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile := func(name string) (string, []byte) {
		der, err := ca.Certify(pubs[name], devcerts.Leaf{CommonName: name})
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, name+".crt")
		os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
		return path, der
	}
	defaultPath, defaultDER := certFile("default")
	edPath, edDER := certFile("ed")

	configPath := filepath.Join(dir, "sigil.yaml")
	writeConfig := func(certificates string) {
		t.Helper()
		yaml := fmt.Sprintf("socket: %s\ndata_dir: %s\ndefault_key: default\n%s\nproviders:\n  - id: soft\n    type: software\n    keys:\n"+
			"      - {name: default, type: ecdsa-p256}\n      - {name: p384, type: ecdsa-p384}\n      - {name: ed, type: ed25519}\n      - {name: rsa, type: rsa-2048}\n",
			base.Socket, base.DataDir, certificates)
		if err := os.WriteFile(configPath, []byte(yaml), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	writeConfig("certificates: {default: " + defaultPath + "}")
	cfg, err := agent.LoadConfig(configPath)
	if err != nil {
		t.Fatal(err)
	}
	r := startAgent(t, cfg)
	c := r.dial(t)
	served := func() map[string][]byte {
		t.Helper()
		keys, err := c.ListKeys(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		out := map[string][]byte{}
		for _, k := range keys {
			if k.Certificate != nil {
				out[k.Name] = k.Certificate
			}
		}
		return out
	}
	check := func(step string, want map[string][]byte) {
		t.Helper()
		got := served()
		if len(got) != len(want) {
			t.Fatalf("%s: certificates served for %d keys, want %d", step, len(got), len(want))
		}
		for name, der := range want {
			if !bytes.Equal(got[name], der) {
				t.Fatalf("%s: key %s serves the wrong certificate or none", step, name)
			}
		}
	}
	check("start", map[string][]byte{"default": defaultDER})

	writeConfig("certificates: {default: " + defaultPath + ", ed: " + edPath + "}")
	if err := r.agent.Reload(); err != nil {
		t.Fatal(err)
	}
	check("key added to the map", map[string][]byte{"default": defaultDER, "ed": edDER})

	writeConfig("certificates: {ed: " + edPath + "}")
	if err := r.agent.Reload(); err != nil {
		t.Fatal(err)
	}
	check("key taken out of the map", map[string][]byte{"ed": edDER})

	if err := os.WriteFile(configPath, []byte("certificates: [half-written"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := r.agent.Reload(); err == nil || !strings.Contains(err.Error(), configPath) {
		t.Fatalf("reload with a broken config file: %v, want an error naming it", err)
	}
	check("broken config file", map[string][]byte{"ed": edDER})
}
