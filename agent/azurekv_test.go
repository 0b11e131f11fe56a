package agent_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/azurekv"
	"github.com/sigil-agent/sigil/providers/azurekv/azurekvtest"
)

// An Azure Key Vault key (an in-process vault over TLS, the real SDK client)
// served by the agent beside software keys. The provider is handed to the
// agent already open: the test's vault needs its own TLS trust and token,
// which production takes from the system roots and azidentity.
func TestAgentServesAzureKeyVaultKeys(t *testing.T) {
	vault := &azurekvtest.Server{}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	vault.Add("release", key)
	url, opts, cred := vault.Start(t)
	p, err := azurekv.Open(context.Background(), azurekv.Config{ID: "azure", VaultURL: url, Credential: cred, ClientOptions: opts,
		Keys: []azurekv.KeyConfig{{Name: "release", Key: "release"}}})
	if err != nil {
		t.Fatal(err)
	}
	r := startAgent(t, softwareConfig(t), agent.WithProviders(p))
	c := r.dial(t)
	ctx := context.Background()
	k, err := c.PublicKey(ctx, client.ByName("release"))
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("azure payload"))
	sig, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:])
	if err != nil {
		t.Fatal(err)
	}
	if err := providers.Verify(k.Public, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}, d[:], sig.Sig); err != nil {
		t.Fatalf("Go crypto rejects the Key Vault signature: %v", err)
	}
	if _, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{Scheme: client.SchemeECDSA, Hash: crypto.SHA512}, make([]byte, 64)); client.Code(err) != proto.UnsupportedAlgorithm {
		t.Fatalf("ES512 on a P-256 key: %v", err)
	}
}

func TestCloudProviderConfigValidation(t *testing.T) {
	for _, tc := range []struct{ name, yaml string }{
		{"azure without https", "providers:\n  - {id: a, type: azurekv, vault_url: 'http://v', keys: [{name: k, key: k}]}\n"},
		{"aws without region", "providers:\n  - {id: a, type: awskms, keys: [{name: k, key_id: alias/k}]}\n"},
		{"aws key without id", "providers:\n  - {id: a, type: awskms, region: eu-west-1, keys: [{name: k}]}\n"},
		{"gcp without key ring", "providers:\n  - {id: g, type: gcpkms, project: p, location: l, keys: [{name: k, key: k, version: '1'}]}\n"},
		{"challenge verification off on another type", "providers:\n  - {id: a, type: awskms, region: eu-west-1, disable_challenge_resource_verification: true, keys: [{name: k, key_id: alias/k}]}\n"},
		{"gcp insecure without endpoint", "providers:\n  - {id: g, type: gcpkms, project: p, location: l, key_ring: r, insecure_endpoint: true, keys: [{name: k, key: k, version: '1'}]}\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := agent.ParseConfig([]byte(tc.yaml)); err == nil {
				t.Fatal("accepted")
			}
		})
	}
}

// A key deleted in its vault while the agent serves it answers UNAVAILABLE
// (the provider lost it), as a deleted PKCS#11 object or a destroyed GCP
// version does, not NOT_FOUND, which tells a caller it named no key of its
// own; the audit record says the same.
func TestKeyDeletedInTheBackendIsUnavailable(t *testing.T) {
	vault := &azurekvtest.Server{}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	v := vault.Add("release", key)
	url, opts, cred := vault.Start(t)
	p, err := azurekv.Open(context.Background(), azurekv.Config{ID: "azure", VaultURL: url, Credential: cred, ClientOptions: opts,
		Keys: []azurekv.KeyConfig{{Name: "release", Key: "release"}}})
	if err != nil {
		t.Fatal(err)
	}
	cfg := softwareConfig(t)
	cfg.AdminSocket = filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")
	r := startAgent(t, cfg, agent.WithProviders(p))
	c := r.dial(t)
	vault.Update(func() { v.SignStatus = http.StatusNotFound })
	d := sha256.Sum256([]byte("after the deletion"))
	_, err = c.Sign(context.Background(), client.ByName("release"), client.Algorithm{}, d[:])
	if client.Code(err) != proto.Unavailable {
		t.Fatalf("sign with a deleted key: %v, want UNAVAILABLE", err)
	}
	admin := r.serveAdmin(t, cfg.AdminSocket)
	recs, err := admin.AuditTail(context.Background(), "", 0, 1)
	if err != nil || len(recs) != 1 || !strings.Contains(string(recs[0]), `"op":"sign"`) || !strings.Contains(string(recs[0]), `"UNAVAILABLE"`) {
		t.Fatalf("the refusal's record: %q %v, want a sign refused UNAVAILABLE", recs, err)
	}
}
