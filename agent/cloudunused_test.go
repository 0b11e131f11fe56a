package agent_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"cloud.google.com/go/kms/apiv1/kmspb"
	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/awskms/awskmstest"
	"github.com/sigil-agent/sigil/providers/azurekv"
	"github.com/sigil-agent/sigil/providers/azurekv/azurekvtest"
	"github.com/sigil-agent/sigil/providers/gcpkms/gcpkmstest"
)

// cloudSlot is a rotating slot payments/release on a cloud key, with a
// switch that makes every key or version the service makes from then on
// refuse to sign (so an attempt fails at its CSR, after its key exists),
// and a look at what became of the attempts' keys.
type cloudSlot struct {
	cfg  agent.Config
	opts []agent.Option
	// failNew makes (true) or stops making (false) new keys refuse to sign.
	failNew func(bool)
	// made reports the state of each key or version made by a rotation,
	// in the service's words, oldest first.
	made func(t *testing.T) []string
	// gone is the state of a failed attempt's key once it is cleaned up.
	gone string
	// aliasSPKI, when set, returns the public key (DER SPKI) of the key
	// the slot's configured alias names: it must be the one the slot
	// signs with, after the failed attempts and after the rotation.
	aliasSPKI func(t *testing.T) []byte
}

// A rotation attempt on a cloud slot that fails after its key generation
// used to leave the new key (AWS) or version (GCP, Azure) enabled in the
// service: only the software and PKCS#11 providers could destroy an
// attempt's key, so every failed scheduled attempt added one more, billed
// and counted against quotas. Now each failed attempt's key is scheduled
// for deletion (AWS), destroyed (GCP) or disabled (Azure), with a
// rotate.destroy record; the slot signs on with its old version, and the
// next rotation succeeds. On an AWS slot configured by alias, each attempt
// moved the alias to its key at keygen, and the alias used to stay there,
// on a key the slot never cut over to, kept enabled for it: now it goes
// back to v1, and the rotation that succeeds moves it to v2.
func TestFailedCloudAttemptsLeaveNoEnabledKeys(t *testing.T) {
	const attempts = 2
	for _, tc := range []struct {
		name  string
		setup func(t *testing.T) cloudSlot
	}{
		{"gcpkms", gcpCloudSlot},
		{"awskms", func(t *testing.T) cloudSlot { return awsCloudSlot(t, false) }},
		{"awskms by alias", func(t *testing.T) cloudSlot { return awsCloudSlot(t, true) }},
		{"azurekv", azureCloudSlot},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := tc.setup(t)
			ctx := context.Background()
			d := sha256.Sum256([]byte("after a failed rotation"))
			alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
			agentLifetime(t, s.cfg, func(c, admin *client.Client) {
				v1, err := c.PublicKey(ctx, client.ByName("release"))
				if err != nil {
					t.Fatal(err)
				}
				s.failNew(true)
				for i := range attempts {
					if err := admin.Rotate(ctx, "payments/release"); err == nil || !strings.Contains(err.Error(), "step csr failed") {
						t.Fatalf("attempt %d: %v, want a failure at the CSR", i+1, err)
					}
				}
				made := s.made(t)
				if len(made) != attempts {
					t.Fatalf("%d failed attempts made %d keys: %v", attempts, len(made), made)
				}
				for i, st := range made {
					if st != s.gone {
						t.Errorf("attempt %d's key is %s in the service, want %s", i+1, st, s.gone)
					}
				}
				if n := destroyRecords(t, admin); n != attempts {
					t.Errorf("%d rotate.destroy records with code OK, want %d", n, attempts)
				}
				sig, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:])
				if err != nil || sig.KID != v1.KID {
					t.Fatalf("after the failed attempts: kid %s (v1 %s), %v", sig.KID, v1.KID, err)
				}
				if err := providers.Verify(v1.Public, alg, d[:], sig.Sig); err != nil {
					t.Fatalf("v1's signature after the failed attempts: %v", err)
				}
				if s.aliasSPKI != nil && !bytes.Equal(s.aliasSPKI(t), v1.SPKI) {
					t.Error("after the failed attempts the slot's alias names another key than v1")
				}

				s.failNew(false)
				if err := admin.Rotate(ctx, "payments/release"); err != nil {
					t.Fatalf("the rotation after the failed attempts: %v", err)
				}
				sig, err = c.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:])
				if err != nil || sig.KID == v1.KID {
					t.Fatalf("after the rotation: kid %s (v1 %s), %v", sig.KID, v1.KID, err)
				}
				v2, err := c.PublicKey(ctx, client.ByKID(sig.KID))
				if err != nil {
					t.Fatal(err)
				}
				if err := providers.Verify(v2.Public, alg, d[:], sig.Sig); err != nil {
					t.Fatalf("the new version's signature: %v", err)
				}
				if s.aliasSPKI != nil && !bytes.Equal(s.aliasSPKI(t), v2.SPKI) {
					t.Error("after the rotation the slot's alias does not name the new version's key")
				}
			}, s.opts...)
		})
	}
}

// destroyRecords counts the journal's rotate.destroy records that say the
// key was destroyed.
func destroyRecords(t *testing.T, admin *client.Client) int {
	t.Helper()
	n := 0
	for _, r := range auditOps(t, admin, "payments", "rotate.destroy") {
		if r["code_name"] != "OK" {
			t.Errorf("rotate.destroy record %v", r)
			continue
		}
		n++
	}
	return n
}

// rotationConfig is the agent configuration of a cloudSlot: policy file,
// admin socket and a few canaries, with providers (YAML) when the test does
// not hand the agent one already open.
func rotationConfig(t *testing.T, key, providersYAML string) agent.Config {
	t.Helper()
	dir := t.TempDir()
	policyFile := filepath.Join(dir, "policy.yaml")
	if err := os.WriteFile(policyFile, []byte(releasePolicy(key, "")), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := parsedConfig(t, fmt.Sprintf("policy: %s\nrotation: {canaries: 2}\n", policyFile)+providersYAML)
	cfg.AdminSocket = filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")
	return cfg
}

func gcpCloudSlot(t *testing.T) cloudSlot {
	kms, cfg := gcpRotationSetup(t, `"1"`)
	return cloudSlot{
		cfg: cfg,
		failNew: func(on bool) {
			kms.Update(func() {
				kms.NewVersionFault = nil
				if on {
					kms.NewVersionFault = func(v *gcpkmstest.Version) { v.SignErr = status.Error(codes.Unavailable, "injected") }
				}
			})
		},
		made: func(t *testing.T) []string {
			var out []string
			for n := 2; ; n++ {
				v, err := kms.Lookup(gcpkmstest.VersionName("release", fmt.Sprint(n)))
				if err != nil {
					return out
				}
				var st kmspb.CryptoKeyVersion_CryptoKeyVersionState
				kms.Update(func() { st = v.State })
				out = append(out, st.String())
			}
		},
		gone: kmspb.CryptoKeyVersion_DESTROY_SCHEDULED.String(),
	}
}

func azureCloudSlot(t *testing.T) cloudSlot {
	vault := &azurekvtest.Server{}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	v1 := vault.Add("release", key)
	u, opts, cred := vault.Start(t)
	p, err := azurekv.Open(context.Background(), azurekv.Config{ID: "azure", VaultURL: u, Credential: cred, ClientOptions: opts,
		Keys: []azurekv.KeyConfig{{Name: "az-release", Key: "release", Version: v1.ID}}})
	if err != nil {
		t.Fatal(err)
	}
	return cloudSlot{
		cfg:  rotationConfig(t, "az-release", ""),
		opts: []agent.Option{agent.WithProviders(p)},
		failNew: func(on bool) {
			vault.Update(func() {
				vault.NewVersionFault = nil
				if on {
					vault.NewVersionFault = func(v *azurekvtest.Version) { v.SignStatus = http.StatusForbidden }
				}
			})
		},
		made: func(t *testing.T) []string {
			var out []string
			vs := vault.Versions("release")
			vault.Update(func() {
				for _, v := range vs[1:] {
					out = append(out, map[bool]string{true: "enabled", false: "disabled"}[v.Enabled])
				}
			})
			return out
		},
		gone: "disabled",
	}
}

// A failed rotation attempt on a slot whose Azure key is configured without
// a version disables the version it made, which stays the vault key's
// newest. The agent used to fail its next start on the same configuration
// (the key resolved to that version: "key version is disabled"); it now
// starts, the key resolving to the newest enabled version, and signs with
// the slot's active version.
func TestAzureVersionlessSlotRestartsAfterAFailedAttempt(t *testing.T) {
	vault := &azurekvtest.Server{}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	vault.Add("release", key)
	u, opts, cred := vault.Start(t)
	ctx := context.Background()
	open := func() (*azurekv.Provider, error) {
		return azurekv.Open(ctx, azurekv.Config{ID: "azure", VaultURL: u, Credential: cred, ClientOptions: opts,
			Keys: []azurekv.KeyConfig{{Name: "az-release", Key: "release"}}})
	}
	p, err := open()
	if err != nil {
		t.Fatal(err)
	}
	cfg := rotationConfig(t, "az-release", "")
	d := sha256.Sum256([]byte("after a restart"))
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	var v1 client.Key
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		if v1, err = c.PublicKey(ctx, client.ByName("release")); err != nil {
			t.Fatal(err)
		}
		vault.Update(func() {
			vault.NewVersionFault = func(v *azurekvtest.Version) { v.SignStatus = http.StatusForbidden }
		})
		if err := admin.Rotate(ctx, "payments/release"); err == nil || !strings.Contains(err.Error(), "step csr failed") {
			t.Fatalf("the attempt: %v, want a failure at the CSR", err)
		}
	}, agent.WithProviders(p))
	p.Close()
	vs := vault.Versions("release")
	newestEnabled := true
	vault.Update(func() { newestEnabled = vs[len(vs)-1].Enabled })
	if len(vs) != 2 || newestEnabled {
		t.Fatalf("%d versions, the newest enabled: %v; want 2, the attempt's disabled", len(vs), newestEnabled)
	}

	p, err = open()
	if err != nil {
		t.Fatalf("the provider at the restart: %v", err)
	}
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		sig, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:])
		if err != nil || sig.KID != v1.KID {
			t.Fatalf("after the restart: kid %s (v1 %s), %v", sig.KID, v1.KID, err)
		}
		if err := providers.Verify(key.Public(), alg, d[:], sig.Sig); err != nil {
			t.Fatalf("v1's signature after the restart: %v", err)
		}
	}, agent.WithProviders(p))
}

// awsCloudSlot is a slot on an AWS key, configured by its key ARN or, with
// byAlias, by an alias that names it (which a rotation moves).
func awsCloudSlot(t *testing.T, byAlias bool) cloudSlot {
	const alias = "alias/release"
	endpoint := awskmstest.Start(t)
	kc := awskmstest.Client(endpoint)
	v1 := aws.ToString(awskmstest.DescribeKey(t, kc, awskmstest.CreateKey(t, kc, types.KeySpecEccNistP256)).Arn)
	keyID := v1
	if byAlias {
		awskmstest.CreateAlias(t, kc, alias, v1)
		keyID = alias
	}
	var failing atomic.Bool
	front := signRefusingFront(t, endpoint, v1, &failing)
	creds, err := awskmstest.Credentials().Retrieve(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("AWS_ACCESS_KEY_ID", creds.AccessKeyID)
	t.Setenv("AWS_SECRET_ACCESS_KEY", creds.SecretAccessKey)
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	cfg := rotationConfig(t, "aws-release", fmt.Sprintf("providers:\n  - id: aws\n    type: awskms\n    region: %s\n    endpoint: %q\n    keys:\n      - {name: aws-release, key_id: %s}\n",
		awskmstest.Region, front, keyID))
	var aliasSPKI func(t *testing.T) []byte
	if byAlias {
		aliasSPKI = func(t *testing.T) []byte {
			out, err := kc.GetPublicKey(context.Background(), &kms.GetPublicKeyInput{KeyId: aws.String(alias)})
			if err != nil {
				t.Fatal(err)
			}
			return out.PublicKey
		}
	}
	return cloudSlot{
		aliasSPKI: aliasSPKI,
		cfg:       cfg,
		failNew:   failing.Store,
		made: func(t *testing.T) []string {
			var out []string
			keys, err := kc.ListKeys(context.Background(), &kms.ListKeysInput{})
			if err != nil {
				t.Fatal(err)
			}
			for _, k := range keys.Keys {
				if aws.ToString(k.KeyArn) != v1 {
					out = append(out, string(awskmstest.DescribeKey(t, kc, aws.ToString(k.KeyArn)).KeyState))
				}
			}
			return out
		},
		gone: string(types.KeyStatePendingDeletion),
	}
}

// signRefusingFront passes every request to the KMS at upstream, except
// that while failing is set a Sign with any key but keep is answered
// KMSInvalidStateException (as for a disabled key).
func signRefusingFront(t *testing.T, upstream, keep string, failing *atomic.Bool) string {
	t.Helper()
	u, err := url.Parse(upstream)
	if err != nil {
		t.Fatal(err)
	}
	proxy := httputil.NewSingleHostReverseProxy(u)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		r.Body = io.NopCloser(bytes.NewReader(body))
		if failing.Load() && r.Header.Get("X-Amz-Target") == "TrentService.Sign" {
			var in struct{ KeyId string }
			if json.Unmarshal(body, &in) == nil && in.KeyId != keep {
				w.Header().Set("Content-Type", "application/x-amz-json-1.1")
				w.WriteHeader(http.StatusBadRequest)
				w.Write([]byte(`{"__type":"KMSInvalidStateException","message":"injected"}`))
				return
			}
		}
		proxy.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}
