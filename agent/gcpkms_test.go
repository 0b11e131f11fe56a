package agent_test

import (
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"cloud.google.com/go/kms/apiv1/kmspb"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/gcpkms/gcpkmstest"
)

// A GCP Cloud KMS key served by the agent (the real SDK client against an
// in-process KMS): signatures verify with Go's crypto, several callers on
// one connection overlap (remote providers run off the reader), and its
// kid is the same construction as every other provider's.
func TestAgentServesGCPKMSKeys(t *testing.T) {
	keys := gcpkmstest.TestKeys()
	kms := &gcpkmstest.Server{}
	kms.Add(gcpkmstest.VersionName("release", "1"), keys["p256"], kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256)
	kms.Add(gcpkmstest.VersionName("release", "2"), keys["p384"], kmspb.CryptoKeyVersion_EC_SIGN_P384_SHA384)
	kms.Serve(t)
	cfg := parsedConfig(t, "providers:\n"+gcpProvider(kms, "",
		`[{name: release-v1, key: release, version: "1"}, {name: release-latest, key: release, version: latest}]`))
	r, logs := startAgentObserved(t, cfg)
	assertNoFieldTwice(t, logs)
	if logs.FilterMessage("gcpkms key ready").Len() != 2 {
		t.Errorf("want a \"gcpkms key ready\" line per key, got %d", logs.FilterMessage("gcpkms key ready").Len())
	}
	c := r.dial(t)
	ctx := context.Background()
	latest, err := c.PublicKey(ctx, client.ByName("release-latest"))
	if err != nil || latest.Type != "ecdsa-p384" {
		t.Fatalf("latest resolved to %s: %v", latest.Type, err)
	}
	if want := providers.ComputeKID(latest.SPKI, "gcp", "release-latest"); latest.KID != want {
		t.Fatalf("kid %s, want %s", latest.KID, want)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			d := sha256.Sum256([]byte{byte(g)})
			sig, err := c.Sign(ctx, client.ByName("release-v1"), client.Algorithm{}, d[:])
			if err == nil {
				k, _ := c.PublicKey(ctx, client.ByName("release-v1"))
				err = providers.Verify(k.Public, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}, d[:], sig.Sig)
			}
			errs <- err
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Sign(ctx, client.ByName("release-v1"), client.Algorithm{Scheme: client.SchemeECDSA, Hash: crypto.SHA384}, make([]byte, 48)); client.Code(err) != proto.UnsupportedAlgorithm {
		t.Fatalf("a version bound to ECDSA SHA-256 signed SHA-384: %v", err)
	}
}

// A GCP Ed25519 key served by the agent: a Sign carries the message
// itself (pure Ed25519), which the provider sends to Cloud KMS whole; the
// signatures verify with crypto/ed25519, the key's default scheme is
// Ed25519, and another scheme or a hash is UNSUPPORTED_ALGORITHM.
func TestAgentServesGCPKMSEd25519Key(t *testing.T) {
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	kms := &gcpkmstest.Server{}
	kms.Add(gcpkmstest.VersionName("ed", "1"), edKey, kmspb.CryptoKeyVersion_EC_SIGN_ED25519)
	kms.Serve(t)
	cfg := parsedConfig(t, "providers:\n"+gcpProvider(kms, "", `[{name: ed, key: ed, version: "1"}]`))
	r := startAgent(t, cfg)
	c := r.dial(t)
	ctx := context.Background()
	k, err := c.PublicKey(ctx, client.ByName("ed"))
	if err != nil || k.Type != "ed25519" {
		t.Fatalf("public key %s: %v", k.Type, err)
	}
	pub := edKey.Public().(ed25519.PublicKey)
	if !pub.Equal(k.Public) {
		t.Fatal("the agent serves another public key")
	}
	for _, tc := range []struct {
		name string
		alg  client.Algorithm
		msg  []byte
	}{
		{"default scheme", client.Algorithm{}, []byte("release 1.2.3")},
		{"ed25519 named", client.Algorithm{Scheme: client.SchemeEd25519}, []byte("a message longer than any digest: " + strings.Repeat("x", 200))},
		{"empty message", client.Algorithm{Scheme: client.SchemeEd25519}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := c.Sign(ctx, client.ByName("ed"), tc.alg, tc.msg)
			if err != nil {
				t.Fatal(err)
			}
			if s.KID != k.KID || !ed25519.Verify(pub, tc.msg, s.Sig) {
				t.Fatalf("signature by kid %s (want %s) does not verify over the message", s.KID, k.KID)
			}
		})
	}
	for _, alg := range []client.Algorithm{
		{Scheme: client.SchemeECDSA, Hash: crypto.SHA256},
		{Scheme: client.SchemeEd25519, Hash: crypto.SHA512},
	} {
		if _, err := c.Sign(ctx, client.ByName("ed"), alg, make([]byte, alg.Hash.Size())); client.Code(err) != proto.UnsupportedAlgorithm {
			t.Fatalf("%+v on an Ed25519 version: %v, want UNSUPPORTED_ALGORITHM", alg, err)
		}
	}
}

// Rotating a cloud slot makes a new version of its key in the KMS; after a
// restart the agent serves that version again by the resource the rotation
// recorded.
func TestAgentRotatesGCPKMSSlot(t *testing.T) {
	kms, cfg := gcpRotationSetup(t, `"1"`)
	ctx := context.Background()
	d := sha256.Sum256([]byte("cloud rotation"))

	var v1, v2 string
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		s, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:])
		if err != nil {
			t.Fatal(err)
		}
		v1 = s.KID
		if err := admin.Rotate(ctx, "payments/release"); err != nil {
			t.Fatal(err)
		}
		s, err = c.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:])
		if err != nil {
			t.Fatal(err)
		}
		v2 = s.KID
		if v2 == v1 {
			t.Fatal("the cloud slot signs with the same key after a rotation")
		}
	})
	if _, err := kms.Lookup(gcpkmstest.VersionName("release", "2")); err != nil {
		t.Fatalf("the rotation made no new version in the KMS: %v", err)
	}
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		s, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:])
		if err != nil || s.KID != v2 {
			t.Fatalf("after a restart: kid %s (want %s), %v", s.KID, v2, err)
		}
		k, _ := c.PublicKey(ctx, client.ByKID(v2))
		if err := providers.Verify(k.Public, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}, d[:], s.Sig); err != nil {
			t.Fatal(err)
		}
	})
}

// Rotating a slot on a GCP Ed25519 key makes an Ed25519 version (its
// canaries signed over their payloads through Cloud KMS), which then signs
// the slot's messages; the old and the new signatures each verify with
// their own version's key.
func TestAgentRotatesGCPKMSEd25519Slot(t *testing.T) {
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	kms, cfg := gcpRotationSetup(t, `"1"`, gcpRotationKey{edKey, kmspb.CryptoKeyVersion_EC_SIGN_ED25519})
	ctx := context.Background()
	msg := []byte("cloud rotation of an ed25519 slot")
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		s1, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{}, msg)
		if err != nil {
			t.Fatal(err)
		}
		if err := admin.Rotate(ctx, "payments/release"); err != nil {
			t.Fatal(err)
		}
		s2, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{}, msg)
		if err != nil {
			t.Fatal(err)
		}
		if s2.KID == s1.KID {
			t.Fatal("the slot signs with the same key after a rotation")
		}
		for _, s := range []client.Signature{s1, s2} {
			k, err := c.PublicKey(ctx, client.ByKID(s.KID))
			if err != nil {
				t.Fatal(err)
			}
			pub, ok := k.Public.(ed25519.PublicKey)
			if !ok || !ed25519.Verify(pub, msg, s.Sig) {
				t.Fatalf("kid %s: a %T key, or a signature that does not verify over the message", s.KID, k.Public)
			}
		}
	})
	v2, err := kms.Lookup(gcpkmstest.VersionName("release", "2"))
	if err != nil {
		t.Fatalf("the rotation made no new version in the KMS: %v", err)
	}
	var alg kmspb.CryptoKeyVersion_CryptoKeyVersionAlgorithm
	kms.Update(func() { alg = v2.Alg })
	if alg != kmspb.CryptoKeyVersion_EC_SIGN_ED25519 {
		t.Fatalf("the new version is %s", alg)
	}
}

// A slot whose key is configured as "latest" rotates, and the agent
// restarts: the configured name now resolves to the new version, so it
// cannot serve version 1 under that name. Version 1 is then refused
// (UNAVAILABLE), never answered with version 2's key: not its public key by
// v1's kid, and a rollback to v1 is refused, the slot signing on with v2.
func TestRotatedLatestCloudKeyDoesNotServeV2AsV1(t *testing.T) {
	_, cfg := gcpRotationSetup(t, "latest")
	ctx := context.Background()
	d := sha256.Sum256([]byte("cloud rotation"))

	var v1, v2 string
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		s, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:])
		if err != nil {
			t.Fatal(err)
		}
		v1 = s.KID
		if err := admin.Rotate(ctx, "payments/release"); err != nil {
			t.Fatal(err)
		}
		if s, err = c.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:]); err != nil {
			t.Fatal(err)
		}
		v2 = s.KID
	})
	agentLifetime(t, cfg, func(c, admin *client.Client) {
		s, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:])
		if err != nil || s.KID != v2 {
			t.Fatalf("after a restart: kid %s (want %s), %v", s.KID, v2, err)
		}
		if k, err := c.PublicKey(ctx, client.ByKID(v1)); err == nil && k.KID != v1 {
			t.Fatalf("the public key asked by v1's kid is kid %s", k.KID)
		} else if code := client.Code(err); err != nil && code != proto.Unavailable && code != proto.NotFound {
			t.Fatalf("v1's public key: %v, want it, NOT_FOUND or UNAVAILABLE", err)
		}
		if _, err := admin.Rollback(ctx, "payments/release"); client.Code(err) != proto.Unavailable {
			t.Fatalf("a rollback to v1, which this agent cannot serve: %v, want UNAVAILABLE", err)
		}
		s, err = c.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:])
		if err != nil || s.KID != v2 {
			t.Fatalf("after the refused rollback: kid %s (v1 %s, v2 %s), %v; want v2 signing on", s.KID, v1, v2, err)
		}
	})
}

// A stalled KMS: the agent answers DEADLINE_EXCEEDED within the configured
// per-call deadline plus 100 ms and keeps serving its other keys.
func TestAgentStalledCloudKey(t *testing.T) {
	keys := gcpkmstest.TestKeys()
	kms := &gcpkmstest.Server{}
	stalled := kms.Add(gcpkmstest.VersionName("slow", "1"), keys["p256"], kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256)
	kms.Add(gcpkmstest.VersionName("fast", "1"), keys["p384"], kmspb.CryptoKeyVersion_EC_SIGN_P384_SHA384)
	kms.Serve(t)
	cfg := parsedConfig(t, "providers:\n"+gcpProvider(kms, "    timeout: 200ms\n",
		`[{name: slow, key: slow, version: "1"}, {name: fast, key: fast, version: "1"}]`))
	r := startAgent(t, cfg)
	c := r.dial(t)
	kms.Update(func() { stalled.Delay = 5 * time.Second })
	ctx := context.Background()
	d := sha256.Sum256([]byte("stall"))
	start := time.Now()
	_, err := c.Sign(ctx, client.ByName("slow"), client.Algorithm{}, d[:])
	if client.Code(err) != proto.DeadlineExceeded {
		t.Fatalf("stalled KMS: %v", err)
	}
	// Past the 200ms deadline the answer would be the 5s stall: 2s tells
	// the two apart with room for a stalled CI machine.
	if el := time.Since(start); el > 2*time.Second {
		t.Fatalf("answered after %v; the deadline is 200ms", el)
	}
	d384 := make([]byte, 48)
	if _, err := c.Sign(ctx, client.ByName("fast"), client.Algorithm{}, d384); err != nil {
		t.Fatalf("another key of the same KMS after the stall: %v", err)
	}
}

// With a policy, a Sign on a cloud slot runs off the connection's reader
// like any remote key: a slow KMS call does not hold up the next request
// on the same connection.
func TestCloudSlotRunsOffTheReader(t *testing.T) {
	keys := gcpkmstest.TestKeys()
	kms := &gcpkmstest.Server{}
	slow := kms.Add(gcpkmstest.VersionName("slow", "1"), keys["p256"], kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256)
	kms.Serve(t)
	// Waiting behind the slow call would cost the local Sign about 1.4s,
	// answering off the reader a few ms: the 700ms bound below is far
	// from both. The delay stays under the provider's 2s DefaultTimeout.
	kms.Update(func() { slow.Delay = 1500 * time.Millisecond })
	dir := t.TempDir()
	policyFile := filepath.Join(dir, "policy.yaml")
	os.WriteFile(policyFile, []byte(fmt.Sprintf(`
tenants:
  - name: payments
    identities: {unix_uids: [%d]}
    slots:
      - {name: slow, key: gcp-slow}
      - {name: local, key: default}
`, os.Getuid())), 0o600)
	cfg := parsedConfig(t, fmt.Sprintf("policy: %s\nproviders:\n  - {id: soft, type: software, keys: [{name: default, type: ecdsa-p256}]}\n", policyFile)+
		gcpProvider(kms, "", `[{name: gcp-slow, key: slow, version: "1"}]`))
	r := startAgent(t, cfg)
	c := r.dial(t)
	ctx := context.Background()
	d := sha256.Sum256([]byte("x"))
	slowDone := make(chan error, 1)
	go func() {
		_, err := c.Sign(ctx, client.ByName("slow"), client.Algorithm{}, d[:])
		slowDone <- err
	}()
	time.Sleep(50 * time.Millisecond) // the slow request is at the KMS
	start := time.Now()
	if _, err := c.Sign(ctx, client.ByName("local"), client.Algorithm{}, d[:]); err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el > 700*time.Millisecond {
		t.Fatalf("a local Sign waited %v behind a slow cloud Sign on the same connection", el)
	}
	if err := <-slowDone; err != nil {
		t.Fatal(err)
	}
}

// gcpRotationSetup starts an in-process Cloud KMS holding version 1 of key
// "release" (a P-256 key, unless gcpRotationKey names another) and returns
// it with an agent config that serves it as gcp-release (configured by
// version, e.g. "1" or latest) behind the slot payments/release, rotation
// on, this uid a tenant and the admin.
func gcpRotationSetup(t *testing.T, version string, key ...gcpRotationKey) (*gcpkmstest.Server, agent.Config) {
	t.Helper()
	k := gcpRotationKey{gcpkmstest.TestKeys()["p256"], kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256}
	if len(key) > 0 {
		k = key[0]
	}
	kms := &gcpkmstest.Server{}
	kms.Add(gcpkmstest.VersionName("release", "1"), k.signer, k.alg)
	kms.Serve(t)
	dir := t.TempDir()
	policyFile := filepath.Join(dir, "policy.yaml")
	os.WriteFile(policyFile, []byte(releasePolicy("gcp-release", "")), 0o600)
	cfg := parsedConfig(t, fmt.Sprintf("policy: %s\nrotation: {canaries: 5}\nproviders:\n", policyFile)+
		gcpProvider(kms, "", "[{name: gcp-release, key: release, version: "+version+"}]"))
	cfg.AdminSocket = filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")
	return kms, cfg
}

// gcpRotationKey is the key and algorithm of gcpRotationSetup's version 1.
type gcpRotationKey struct {
	signer crypto.Signer
	alg    kmspb.CryptoKeyVersion_CryptoKeyVersionAlgorithm
}

// gcpProvider is the providers: entry of a gcpkms provider "gcp" on kms,
// with fields (more settings, as indented lines) and keys (its keys:).
func gcpProvider(kms *gcpkmstest.Server, fields, keys string) string {
	return fmt.Sprintf("  - id: gcp\n    type: gcpkms\n    project: p\n    location: global\n    key_ring: ring\n    endpoint: %q\n    insecure_endpoint: true\n%s    keys: %s\n",
		kms.Addr(), fields, keys)
}

// parsedConfig parses an agent configuration, with the test's own data dir
// and socket.
func parsedConfig(t *testing.T, yaml string) agent.Config {
	t.Helper()
	cfg, err := agent.ParseConfig([]byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	cfg.DataDir = t.TempDir()
	cfg.Socket = shortSocketPath(t)
	return cfg
}
