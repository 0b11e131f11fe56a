package gcpkms

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"github.com/sigil-agent/sigil/providers/gcpkms/gcpkmstest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"cloud.google.com/go/kms/apiv1/kmspb"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/oauth2"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/providertest"
)

var (
	algES256 = providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	algES384 = providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA384}
	algRS256 = providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: crypto.SHA256}
	algPS256 = providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA256}
)

// testFleet is a fake KMS holding one version per Sigil key type GCP offers,
// and a provider opened on it.
type testFleet struct {
	kms *gcpkmstest.Server
	p   *Provider
}

func newFleet(t *testing.T, timeout time.Duration) *testFleet {
	t.Helper()
	keys := gcpkmstest.TestKeys()
	f := &gcpkmstest.Server{}
	f.Add(gcpkmstest.VersionName("p256", "1"), keys["p256"], kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256)
	f.Add(gcpkmstest.VersionName("p384", "1"), keys["p384"], kmspb.CryptoKeyVersion_EC_SIGN_P384_SHA384)
	f.Add(gcpkmstest.VersionName("rsa-pkcs1", "1"), keys["rsa2048"], kmspb.CryptoKeyVersion_RSA_SIGN_PKCS1_2048_SHA256)
	f.Add(gcpkmstest.VersionName("rsa-pss", "1"), keys["rsa-b"], kmspb.CryptoKeyVersion_RSA_SIGN_PSS_2048_SHA256)
	opts := f.Serve(t)
	p, err := Open(context.Background(), Config{
		ID: "gcp",
		Keys: []KeyConfig{
			{Name: "p256", Resource: gcpkmstest.VersionName("p256", "1")},
			{Name: "p384", Resource: gcpkmstest.VersionName("p384", "1")},
			{Name: "rsa-pkcs1", Resource: gcpkmstest.VersionName("rsa-pkcs1", "1")},
			{Name: "rsa-pss", Resource: gcpkmstest.VersionName("rsa-pss", "1")},
		},
		Timeout:       timeout,
		ClientOptions: opts,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return &testFleet{kms: f, p: p}
}

func (tf *testFleet) info(t *testing.T, name string) providers.KeyInfo {
	t.Helper()
	return providertest.KeyInfo(t, tf.p, name)
}

var randomDigest = providertest.RandomDigest

func TestSignVerifies(t *testing.T) {
	tf := newFleet(t, 0)
	for _, tc := range []struct {
		key  string
		alg  providers.Algorithm
		kind providers.KeyType
	}{
		{"p256", algES256, providers.KeyECDSAP256},
		{"p384", algES384, providers.KeyECDSAP384},
		{"rsa-pkcs1", algRS256, providers.KeyRSA2048},
		{"rsa-pss", algPS256, providers.KeyRSA2048},
	} {
		t.Run(tc.key, func(t *testing.T) {
			ki := tf.info(t, tc.key)
			if ki.Type != tc.kind || ki.Provider != "gcp" || len(ki.KID) != 32 {
				t.Fatalf("key info %+v", ki)
			}
			digest := randomDigest(tc.alg.Hash)
			sig, err := tf.p.Sign(context.Background(), tc.key, tc.alg, digest)
			if err != nil {
				t.Fatal(err)
			}
			if err := providers.Verify(ki.Public, tc.alg, digest, sig); err != nil {
				t.Fatalf("verify: %v", err)
			}
			sig[len(sig)/2] ^= 0x01
			if err := providers.Verify(ki.Public, tc.alg, digest, sig); !errors.Is(err, providers.ErrInvalidSignature) {
				t.Fatalf("flipped bit: verify = %v, want ErrInvalidSignature", err)
			}
		})
	}
}

func TestSignRefusesOtherAlgorithms(t *testing.T) {
	tf := newFleet(t, 0)
	for _, tc := range []struct {
		key string
		alg providers.Algorithm
	}{
		{"p256", algES384},
		{"p384", algES256},
		{"rsa-pkcs1", algPS256},
		{"rsa-pss", algRS256},
		{"rsa-pkcs1", providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: crypto.SHA512}},
		{"p256", providers.Algorithm{Scheme: providers.SchemeEd25519}},
	} {
		t.Run(tc.key+"/"+tc.alg.String(), func(t *testing.T) {
			_, err := tf.p.Sign(context.Background(), tc.key, tc.alg, randomDigest(crypto.SHA256))
			if !errors.Is(err, providers.ErrUnsupportedAlgorithm) {
				t.Fatalf("err = %v, want ErrUnsupportedAlgorithm", err)
			}
		})
	}
	if n := tf.kms.SignCount(); n != 0 {
		t.Fatalf("%d refused requests reached KMS", n)
	}
}

func TestSignUnknownKeyAndClosed(t *testing.T) {
	tf := newFleet(t, 0)
	if _, err := tf.p.Sign(context.Background(), "nope", algES256, randomDigest(crypto.SHA256)); !errors.Is(err, providers.ErrNotFound) {
		t.Fatalf("unknown key: %v", err)
	}
	if !providers.IsRemote(tf.p) {
		t.Fatal("provider does not declare itself Remote")
	}
	if err := tf.p.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := tf.p.Sign(context.Background(), "p256", algES256, randomDigest(crypto.SHA256)); !errors.Is(err, providers.ErrUnavailable) {
		t.Fatalf("after Close: %v", err)
	}
}

// A stalled KMS costs the caller the configured deadline and no more, and the
// provider goes on serving its other keys.
func TestSignDeadline(t *testing.T) {
	// The bounds below sit midway between the outcomes they tell apart,
	// so that a CI machine stalled for a few hundred milliseconds cannot
	// trip them: the call ends at Config.Timeout, not at twice it (a
	// deadline per attempt, one retry) nor at the stall (5 s or never);
	// the caller's 50 ms deadline ends it well before Config.Timeout.
	const timeout = time.Second
	const limit = timeout + timeout/2
	tf := newFleet(t, timeout)
	stalled, _ := tf.kms.Lookup(gcpkmstest.VersionName("p256", "1"))
	tf.kms.Update(func() {
		stalled.Delay = 5 * time.Second
	})

	start := time.Now()
	_, err := tf.p.Sign(context.Background(), "p256", algES256, randomDigest(crypto.SHA256))
	elapsed := time.Since(start)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want DeadlineExceeded", err)
	}
	if elapsed < timeout || elapsed > limit {
		t.Fatalf("deadline error after %v, want %v..%v", elapsed, timeout, limit)
	}

	// The caller's own, shorter deadline wins over Config.Timeout.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start = time.Now()
	if _, err := tf.p.Sign(ctx, "p256", algES256, randomDigest(crypto.SHA256)); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("caller deadline: err = %v", err)
	}
	if elapsed := time.Since(start); elapsed > timeout/2 {
		t.Fatalf("caller deadline of 50ms honoured after %v", elapsed)
	}

	digest := randomDigest(crypto.SHA384)
	sig, err := tf.p.Sign(context.Background(), "p384", algES384, digest)
	if err != nil {
		t.Fatalf("other key after a stall: %v", err)
	}
	if err := providers.Verify(tf.info(t, "p384").Public, algES384, digest, sig); err != nil {
		t.Fatal(err)
	}
}

func TestSignErrorMapping(t *testing.T) {
	for _, tc := range []struct {
		name    string
		code    codes.Code
		want    error
		message string
	}{
		{"throttled", codes.ResourceExhausted, providers.ErrRateLimited, "rate limited"},
		{"unauthenticated", codes.Unauthenticated, providers.ErrUnavailable, "credentials refused"},
		{"permission denied", codes.PermissionDenied, providers.ErrUnavailable, "credentials refused"},
		{"not found", codes.NotFound, providers.ErrNotFound, ""},
		{"invalid argument", codes.InvalidArgument, providers.ErrBadRequest, ""},
		{"unavailable", codes.Unavailable, providers.ErrUnavailable, "Unavailable"},
		{"disabled version", codes.FailedPrecondition, providers.ErrUnavailable, "not usable"},
		{"server deadline", codes.DeadlineExceeded, context.DeadlineExceeded, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tf := newFleet(t, 0)
			v, _ := tf.kms.Lookup(gcpkmstest.VersionName("p256", "1"))
			tf.kms.Update(func() {
				v.SignErr = status.Error(tc.code, "server says: secret-detail")
			})
			digest := randomDigest(crypto.SHA256)
			start := time.Now()
			_, err := tf.p.Sign(context.Background(), "p256", algES256, digest)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.message) {
				t.Fatalf("err = %q, want it to mention %q", err, tc.message)
			}
			for _, leak := range []string{hex.EncodeToString(digest), "secret-detail"} {
				if strings.Contains(err.Error(), leak) {
					t.Fatalf("err %q carries %q", err, leak)
				}
			}
			// Failures come back at once: no SDK retry loop up to the deadline.
			if elapsed := time.Since(start); elapsed > 500*time.Millisecond {
				t.Fatalf("error after %v", elapsed)
			}
		})
	}
}

// A Sign's integrity checks, on the digest path and on Ed25519's data
// path alike: the input's crc32c sent, its verification by KMS required,
// signature_crc32c checked, one retry for a corrupted answer.
func TestSignIntegrity(t *testing.T) {
	for _, path := range []struct {
		name  string
		fleet func(*testing.T) *testFleet
		key   string
		alg   providers.Algorithm
		input []byte
	}{
		{"digest", func(t *testing.T) *testFleet { return newFleet(t, 0) }, "rsa-pss", algPS256, randomDigest(crypto.SHA256)},
		{"Ed25519 data", newEd25519Fleet, "ed", algEd25519, []byte("integrity")},
	} {
		for _, tc := range []struct {
			name       string
			corruptCRC int
			unverified bool
			wantErr    bool
			wantCalls  int
		}{
			{"one corrupted signature_crc32c is retried", 1, false, false, 2},
			{"persistent corruption fails", 100, false, true, 2},
			{"input crc32c not verified by KMS", 0, true, true, 2},
		} {
			t.Run(path.name+"/"+tc.name, func(t *testing.T) {
				tf := path.fleet(t)
				v, _ := tf.kms.Lookup(gcpkmstest.VersionName(path.key, "1"))
				tf.kms.Update(func() {
					v.CorruptCRC, v.Unverified = tc.corruptCRC, tc.unverified
				})
				sig, err := tf.p.Sign(context.Background(), path.key, path.alg, path.input)
				if n := tf.kms.SignCount(); n != tc.wantCalls {
					t.Fatalf("%d sign calls, want %d", n, tc.wantCalls)
				}
				if tc.wantErr {
					if !errors.Is(err, providers.ErrUnavailable) || !strings.Contains(err.Error(), "integrity") {
						t.Fatalf("err = %v, want an integrity ErrUnavailable", err)
					}
					return
				}
				if err != nil {
					t.Fatal(err)
				}
				if err := providers.Verify(tf.info(t, path.key).Public, path.alg, path.input, sig); err != nil {
					t.Fatal(err)
				}
			})
		}
	}
}

func TestOpenLatestPicksHighestEnabled(t *testing.T) {
	keys := gcpkmstest.TestKeys()
	f := &gcpkmstest.Server{}
	f.Add(gcpkmstest.VersionName("rot", "2"), keys["p256"], kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256)
	f.Add(gcpkmstest.VersionName("rot", "9"), keys["p256"], kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256)
	want := f.Add(gcpkmstest.VersionName("rot", "10"), keys["p384"], kmspb.CryptoKeyVersion_EC_SIGN_P384_SHA384)
	f.Add(gcpkmstest.VersionName("rot", "11"), keys["p256"], kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256).State = kmspb.CryptoKeyVersion_DISABLED
	f.Add(gcpkmstest.VersionName("rot", "12"), keys["p256"], kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256).State = kmspb.CryptoKeyVersion_DESTROYED
	f.Add(gcpkmstest.VersionName("other", "50"), keys["p256"], kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256)
	p, err := Open(context.Background(), Config{
		ID:            "gcp",
		Keys:          []KeyConfig{{Name: "rot", Resource: gcpkmstest.CryptoKeyName("rot"), Version: VersionLatest}},
		ClientOptions: f.Serve(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if got, _ := p.Version("rot"); got != gcpkmstest.VersionName("rot", "10") {
		t.Fatalf("latest = %s, want version 10 (numeric order, ENABLED only)", got)
	}
	digest := randomDigest(crypto.SHA384)
	sig, err := p.Sign(context.Background(), "rot", algES384, digest)
	if err != nil {
		t.Fatal(err)
	}
	if err := providers.Verify(want.Signer.Public(), algES384, digest, sig); err != nil {
		t.Fatal(err)
	}
}

func TestOpenRefuses(t *testing.T) {
	keys := gcpkmstest.TestKeys()
	_, edKey, _ := ed25519.GenerateKey(rand.Reader)
	f := &gcpkmstest.Server{}
	f.Add(gcpkmstest.VersionName("ok", "1"), keys["p256"], kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256)
	f.Add(gcpkmstest.VersionName("ec-as-ed", "1"), keys["p256"], kmspb.CryptoKeyVersion_EC_SIGN_ED25519)
	f.Add(gcpkmstest.VersionName("ed-as-ec", "1"), edKey, kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256)
	f.Add(gcpkmstest.VersionName("badcrc", "1"), keys["p256"], kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256).CorruptPEMCRC = true
	f.Add(gcpkmstest.VersionName("mismatch", "1"), keys["p256"], kmspb.CryptoKeyVersion_EC_SIGN_P384_SHA384)
	f.Add(gcpkmstest.VersionName("rsa-as-ec", "1"), keys["rsa2048"], kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256)
	f.Add(gcpkmstest.VersionName("secp", "1"), keys["p256"], kmspb.CryptoKeyVersion_EC_SIGN_SECP256K1_SHA256)
	f.Add(gcpkmstest.VersionName("off", "1"), keys["p256"], kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256).State = kmspb.CryptoKeyVersion_DISABLED
	opts := f.Serve(t)
	for _, tc := range []struct {
		name    string
		key     KeyConfig
		want    error
		message string
	}{
		{"not found", KeyConfig{Name: "k", Resource: gcpkmstest.VersionName("missing", "1")}, providers.ErrNotFound, ""},
		{"p-256 key with algorithm ed25519", KeyConfig{Name: "k", Resource: gcpkmstest.VersionName("ec-as-ed", "1")}, providers.ErrUnsupportedAlgorithm, ""},
		{"ed25519 key with algorithm p-256", KeyConfig{Name: "k", Resource: gcpkmstest.VersionName("ed-as-ec", "1")}, providers.ErrUnsupportedAlgorithm, ""},
		{"pem crc32c", KeyConfig{Name: "k", Resource: gcpkmstest.VersionName("badcrc", "1")}, providers.ErrUnavailable, "pem_crc32c"},
		{"curve and algorithm disagree", KeyConfig{Name: "k", Resource: gcpkmstest.VersionName("mismatch", "1")}, providers.ErrUnsupportedAlgorithm, ""},
		{"key type and algorithm disagree", KeyConfig{Name: "k", Resource: gcpkmstest.VersionName("rsa-as-ec", "1")}, providers.ErrUnsupportedAlgorithm, ""},
		{"secp256k1", KeyConfig{Name: "k", Resource: gcpkmstest.VersionName("secp", "1")}, providers.ErrUnsupportedAlgorithm, ""},
		{"latest with none enabled", KeyConfig{Name: "k", Resource: gcpkmstest.CryptoKeyName("off"), Version: VersionLatest}, providers.ErrNotFound, "ENABLED"},
		{"latest of a missing key", KeyConfig{Name: "k", Resource: gcpkmstest.CryptoKeyName("missing"), Version: VersionLatest}, providers.ErrNotFound, ""},
		{"malformed resource", KeyConfig{Name: "k", Resource: "projects/p/cryptoKeys/x"}, providers.ErrBadRequest, ""},
		{"latest on a version resource", KeyConfig{Name: "k", Resource: gcpkmstest.VersionName("ok", "1"), Version: VersionLatest}, providers.ErrBadRequest, ""},
		{"unknown version word", KeyConfig{Name: "k", Resource: gcpkmstest.CryptoKeyName("ok"), Version: "newest"}, providers.ErrBadRequest, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := Open(context.Background(), Config{
				ID:            "gcp",
				Keys:          []KeyConfig{{Name: "fine", Resource: gcpkmstest.VersionName("ok", "1")}, tc.key},
				ClientOptions: opts,
			})
			if err == nil {
				p.Close()
				t.Fatal("Open succeeded")
			}
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.message) {
				t.Fatalf("err = %v, want %v mentioning %q", err, tc.want, tc.message)
			}
		})
	}
}

func BenchmarkSign(b *testing.B) {
	f := &gcpkmstest.Server{}
	f.Add(gcpkmstest.VersionName("p256", "1"), gcpkmstest.TestKeys()["p256"], kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256)
	p, err := Open(context.Background(), Config{
		ID:            "gcp",
		Keys:          []KeyConfig{{Name: "p256", Resource: gcpkmstest.VersionName("p256", "1")}},
		ClientOptions: f.Serve(b),
	})
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	digest := randomDigest(crypto.SHA256)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := p.Sign(context.Background(), "p256", algES256, digest); err != nil {
			b.Fatal(err)
		}
	}
}

func TestNewVersionURIAddKey(t *testing.T) {
	tf := newFleet(t, 0)
	ctx := context.Background()
	base := tf.info(t, "p256")
	getsBefore := tf.kms.GetVersionCount()

	ki, err := tf.p.NewVersion(ctx, "p256", "p256-v2")
	if err != nil {
		t.Fatal(err)
	}
	if ki.Name != "p256-v2" || ki.Type != providers.KeyECDSAP256 || ki.Provider != "gcp" || ki.KID == base.KID {
		t.Fatalf("new version info %+v (base kid %s)", ki, base.KID)
	}
	if n := tf.kms.GetVersionCount() - getsBefore; n < 2 {
		t.Fatalf("%d GetCryptoKeyVersion calls, want >= 2 (PENDING_GENERATION then ENABLED)", n)
	}
	uri, err := tf.p.URI("p256-v2")
	if err != nil {
		t.Fatal(err)
	}
	if want := gcpkmstest.VersionName("p256", "2"); uri != want {
		t.Fatalf("URI = %q, want %q", uri, want)
	}
	if v, ok := tf.p.Version("p256-v2"); !ok || v != uri {
		t.Fatalf("Version = %q, %v", v, ok)
	}
	if got := tf.info(t, "p256-v2"); got.KID != ki.KID {
		t.Fatalf("Keys lists kid %s, want %s", got.KID, ki.KID)
	}
	digest := randomDigest(crypto.SHA256)
	sig, err := tf.p.Sign(ctx, "p256-v2", algES256, digest)
	if err != nil {
		t.Fatal(err)
	}
	if err := providers.Verify(ki.Public, algES256, digest, sig); err != nil {
		t.Fatalf("verify with the new key: %v", err)
	}
	if err := providers.Verify(base.Public, algES256, digest, sig); !errors.Is(err, providers.ErrInvalidSignature) {
		t.Fatalf("verify with the base key = %v, want ErrInvalidSignature", err)
	}
	// The base key is still served, unchanged.
	if sig, err := tf.p.Sign(ctx, "p256", algES256, digest); err != nil {
		t.Fatal(err)
	} else if err := providers.Verify(base.Public, algES256, digest, sig); err != nil {
		t.Fatalf("base key after rotation: %v", err)
	}
	if _, err := tf.p.URI("nope"); !errors.Is(err, providers.ErrNotFound) {
		t.Fatalf("URI(unknown) = %v, want ErrNotFound", err)
	}
	if _, err := tf.p.NewVersion(ctx, "p256", "p256-v2"); !errors.Is(err, providers.ErrBadRequest) {
		t.Fatalf("NewVersion onto a served name = %v, want ErrBadRequest", err)
	}

	// A restart: a fresh provider configured with the base key only adopts the
	// new version by its resource.
	p2, err := Open(ctx, Config{
		ID:            "gcp",
		Keys:          []KeyConfig{{Name: "p256", Resource: gcpkmstest.VersionName("p256", "1")}},
		ClientOptions: tf.kms.Serve(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer p2.Close()
	ki2, err := p2.AddKey(ctx, "p256-v2", uri)
	if err != nil {
		t.Fatal(err)
	}
	if ki2.KID != ki.KID {
		t.Fatalf("adopted kid %s, want %s", ki2.KID, ki.KID)
	}
	if again, err := p2.AddKey(ctx, "p256-v2", uri); err != nil || again.KID != ki.KID {
		t.Fatalf("AddKey again = %+v, %v; want idempotent", again, err)
	}
	if _, err := p2.AddKey(ctx, "p256-v2", gcpkmstest.VersionName("p256", "1")); !errors.Is(err, providers.ErrBadRequest) {
		t.Fatalf("AddKey of another resource under a served name = %v, want ErrBadRequest", err)
	}
	sig, err = p2.Sign(ctx, "p256-v2", algES256, digest)
	if err != nil {
		t.Fatal(err)
	}
	if err := providers.Verify(ki2.Public, algES256, digest, sig); err != nil {
		t.Fatalf("verify after adoption: %v", err)
	}
}

func TestNewVersionUnknownBase(t *testing.T) {
	tf := newFleet(t, 0)
	if _, err := tf.p.NewVersion(context.Background(), "nope", "nope-v2"); !errors.Is(err, providers.ErrNotFound) {
		t.Fatalf("NewVersion(unknown base) = %v, want ErrNotFound", err)
	}
	if _, err := tf.p.AddKey(context.Background(), "x", gcpkmstest.VersionName("missing", "1")); !errors.Is(err, providers.ErrNotFound) {
		t.Fatalf("AddKey(missing resource) = %v, want ErrNotFound", err)
	}
}

// A signature the service returns by another key (a key material change
// under the version's name, a faulty proxy) is not released under the
// served kid: Sign checks it against the served public key.
func TestSignByAnotherKeyIsRefused(t *testing.T) {
	tf := newFleet(t, 0)
	v, err := tf.kms.Lookup(gcpkmstest.VersionName("rsa-pss", "1"))
	if err != nil {
		t.Fatal(err)
	}
	tf.kms.Update(func() { v.Signer = gcpkmstest.TestKeys()["rsa2048"] })
	sig, err := tf.p.Sign(context.Background(), "rsa-pss", algPS256, randomDigest(algPS256.Hash))
	if !errors.Is(err, providers.ErrUnavailable) || sig != nil {
		t.Fatalf("Sign with the service signing by another key: %d bytes, %v; want ErrUnavailable", len(sig), err)
	}
}

// A rotation that fails after its version exists schedules that version's
// destruction: left ENABLED, it would be the highest, and a key configured
// as "latest" would pick it at the next start.
func TestFailedNewVersionIsDestroyed(t *testing.T) {
	tf := newFleet(t, 0)
	tf.kms.Update(func() {
		tf.kms.NewVersionFault = func(v *gcpkmstest.Version) { v.CorruptPEMCRC = true }
	})
	if _, err := tf.p.NewVersion(context.Background(), "p256", "p256-v2"); err == nil {
		t.Fatal("NewVersion succeeded with a public key that fails its integrity check")
	}
	if st := versionNow(t, tf.kms, gcpkmstest.VersionName("p256", "2")).State; st != kmspb.CryptoKeyVersion_DESTROY_SCHEDULED {
		t.Fatalf("the failed rotation's version is %s, want DESTROY_SCHEDULED", st)
	}
}

// openIntercepted opens a provider on one P-256 key of a fake whose client
// runs every unary call through icpt, given the provider once it is open.
func openIntercepted(t *testing.T, icpt func(p *Provider, ctx context.Context, req any, call func() error) error) *Provider {
	t.Helper()
	f := &gcpkmstest.Server{}
	f.Add(gcpkmstest.VersionName("p256", "1"), gcpkmstest.TestKeys()["p256"], kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256)
	var prov atomic.Pointer[Provider]
	interceptor := grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, o ...grpc.CallOption) error {
		call := func() error { return invoker(ctx, method, req, reply, cc, o...) }
		if p := prov.Load(); p != nil && strings.HasSuffix(method, "/AsymmetricSign") {
			return icpt(p, ctx, req, call)
		}
		return call()
	})
	p, err := Open(context.Background(), Config{
		ID:            "gcp",
		Keys:          []KeyConfig{{Name: "p256", Resource: gcpkmstest.VersionName("p256", "1")}},
		ClientOptions: append(f.Serve(t), option.WithGRPCDialOption(interceptor)),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	prov.Store(p)
	return p
}

// A Close that overtakes a Sign's call releases nothing from it, as AWS
// and Azure do: before, the signature came back all the same.
func TestSignOvertakenByCloseReleasesNothing(t *testing.T) {
	p := openIntercepted(t, func(p *Provider, _ context.Context, _ any, call func() error) error {
		err := call()
		p.Close() // KMS has answered; Sign has not returned yet
		return err
	})
	if sig, err := p.Sign(context.Background(), "p256", algES256, randomDigest(crypto.SHA256)); !errors.Is(err, providers.ErrUnavailable) {
		t.Fatalf("Sign overtaken by Close: %d-byte signature, %v; want ErrUnavailable", len(sig), err)
	}
}

// A call held up by what ignores its context (gRPC waits for the auth
// library's token refresh, under its lock, without the call's context)
// does not hold a Sign past its deadline.
func TestSignLeavesAtItsDeadline(t *testing.T) {
	release := make(chan struct{})
	t.Cleanup(func() { close(release) })
	p := openIntercepted(t, func(_ *Provider, _ context.Context, _ any, call func() error) error {
		<-release // deaf to the call's context, as the token refresh is
		return call()
	})
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := p.Sign(ctx, "p256", algES256, randomDigest(crypto.SHA256))
	if took := time.Since(start); !errors.Is(err, context.DeadlineExceeded) || took > time.Second {
		t.Fatalf("Sign with a 100 ms deadline: %v after %v; want DeadlineExceeded at its deadline", err, took)
	}
}

// A Sign left behind at its deadline sends the digest it was given, not
// what its caller's buffer holds later: the agent reuses a request's buffer
// for its next request once Sign has returned, while gRPC encodes the
// request on the call's own goroutine, once the token fetch lets it go.
func TestAbandonedSignSendsTheDigestItWasGiven(t *testing.T) {
	release := make(chan struct{})
	sent := make(chan []byte, 1)
	p := openIntercepted(t, func(_ *Provider, _ context.Context, req any, call func() error) error {
		<-release
		sent <- bytes.Clone(req.(*kmspb.AsymmetricSignRequest).GetDigest().GetSha256())
		return call()
	})
	digest := randomDigest(crypto.SHA256)
	given := bytes.Clone(digest)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := p.Sign(ctx, "p256", algES256, digest); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Sign held by the token fetch: %v, want DeadlineExceeded", err)
	}
	copy(digest, randomDigest(crypto.SHA256)) // the buffer's next request
	close(release)
	select {
	case got := <-sent:
		if !bytes.Equal(got, given) {
			t.Fatalf("the abandoned call sends %x, want the digest it was given %x", got, given)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the abandoned call never went on")
	}
}

// KeyConfig.Validate is what Open refuses before it asks Cloud KMS, so a
// config check (`sigil agent --check`) refuses it too.
func TestKeyConfigValidate(t *testing.T) {
	for _, tc := range []struct {
		name  string
		key   KeyConfig
		valid bool
	}{
		{"a version", KeyConfig{Resource: gcpkmstest.VersionName("k", "1")}, true},
		{"latest", KeyConfig{Resource: gcpkmstest.CryptoKeyName("k"), Version: VersionLatest}, true},
		{"malformed resource", KeyConfig{Resource: "projects/p/cryptoKeys/x"}, false},
		{"a project with a slash", KeyConfig{Resource: "projects/p/q/locations/l/keyRings/r/cryptoKeys/k/cryptoKeyVersions/1"}, false},
		{"latest on a version resource", KeyConfig{Resource: gcpkmstest.VersionName("k", "1"), Version: VersionLatest}, false},
		{"unknown version word", KeyConfig{Resource: gcpkmstest.CryptoKeyName("k"), Version: "newest"}, false},
	} {
		err := tc.key.Validate()
		if tc.valid != (err == nil) || (err != nil && !errors.Is(err, providers.ErrBadRequest)) {
			t.Errorf("%s: %v, want valid %v (else ErrBadRequest)", tc.name, err, tc.valid)
		}
	}
}

// GetPublicKey (at open, when AddKey serves a rotated version again after
// a restart, and when NewVersion serves its new version) is retried on
// UNAVAILABLE only, three requests at most, within the per-call timeout.
// With the SDK's defaults it was retried on UNAVAILABLE and
// DEADLINE_EXCEEDED until the deadline: a dozen requests and a late
// DEADLINE_EXCEEDED where UNAVAILABLE was known at the first answer.
func TestPublicKeyRetries(t *testing.T) {
	unavailable := status.Error(codes.Unavailable, "injected")
	for _, tc := range []struct {
		name     string
		err      error
		errs     int   // failed answers before the key; 0: every answer fails
		want     error // nil: served
		requests int
	}{
		{"unavailable once", unavailable, 1, nil, 2},
		{"unavailable twice", unavailable, 2, nil, 3},
		{"unavailable every time", unavailable, 0, providers.ErrUnavailable, 3},
		{"deadline exceeded at the server", status.Error(codes.DeadlineExceeded, "injected"), 0, context.DeadlineExceeded, 1},
		{"permission denied", status.Error(codes.PermissionDenied, "injected"), 0, providers.ErrUnavailable, 1},
		{"resource exhausted", status.Error(codes.ResourceExhausted, "injected"), 0, providers.ErrRateLimited, 1},
		{"internal", status.Error(codes.Internal, "injected"), 0, providers.ErrUnavailable, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			check := func(step string, err error, requests int) {
				t.Helper()
				if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
					t.Errorf("%s: %v, want %v", step, err, tc.want)
				}
				if tc.want != context.DeadlineExceeded && errors.Is(err, context.DeadlineExceeded) {
					t.Errorf("%s: %v, a deadline exceeded", step, err)
				}
				if requests != tc.requests {
					t.Errorf("%s: %d GetPublicKey requests, want %d", step, requests, tc.requests)
				}
			}
			f := &gcpkmstest.Server{}
			v := f.Add(gcpkmstest.VersionName("p256", "1"), gcpkmstest.TestKeys()["p256"], kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256)
			v.PublicKeyErr, v.PublicKeyErrs = tc.err, tc.errs
			opts := f.Serve(t)
			p, err := Open(context.Background(), Config{
				ID:            "gcp",
				Keys:          []KeyConfig{{Name: "p256", Resource: gcpkmstest.VersionName("p256", "1")}},
				ClientOptions: opts,
			})
			check("Open", err, f.PublicKeyCount())
			if err != nil {
				return
			}
			defer p.Close()

			// The same for the version a rotation makes.
			f.Update(func() {
				f.NewVersionFault = func(v *gcpkmstest.Version) { v.PublicKeyErr, v.PublicKeyErrs = tc.err, tc.errs }
			})
			before := f.PublicKeyCount()
			_, err = p.NewVersion(context.Background(), "p256", "p256-v2")
			check("NewVersion", err, f.PublicKeyCount()-before)
		})
	}
}

// ListCryptoKeyVersions, which resolves a "latest" key at open, is retried
// as GetPublicKey is (TestPublicKeyRetries).
func TestListVersionsRetries(t *testing.T) {
	for _, tc := range []struct {
		name     string
		errs     int   // UNAVAILABLE answers before the list; -1: every one
		want     error // nil: served
		requests int64
	}{
		{"unavailable once", 1, nil, 2},
		{"unavailable every time", -1, providers.ErrUnavailable, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &gcpkmstest.Server{}
			f.Add(gcpkmstest.VersionName("p256", "1"), gcpkmstest.TestKeys()["p256"], kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256)
			var requests atomic.Int64
			interceptor := grpc.WithUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, o ...grpc.CallOption) error {
				if strings.HasSuffix(method, "/ListCryptoKeyVersions") {
					if n := requests.Add(1); tc.errs < 0 || n <= int64(tc.errs) {
						return status.Error(codes.Unavailable, "injected")
					}
				}
				return invoker(ctx, method, req, reply, cc, o...)
			})
			p, err := Open(context.Background(), Config{
				ID:            "gcp",
				Keys:          []KeyConfig{{Name: "p256", Resource: gcpkmstest.CryptoKeyName("p256"), Version: VersionLatest}},
				ClientOptions: append(f.Serve(t), option.WithGRPCDialOption(interceptor)),
			})
			if err == nil {
				p.Close()
			}
			if tc.want == nil && err != nil || tc.want != nil && (!errors.Is(err, tc.want) || errors.Is(err, context.DeadlineExceeded)) {
				t.Errorf("Open: %v, want %v", err, tc.want)
			}
			if n := requests.Load(); n != tc.requests {
				t.Errorf("%d ListCryptoKeyVersions requests, want %d", n, tc.requests)
			}
		})
	}
}

// GetCryptoKeyVersion, polled while a rotation's new version is generated,
// is retried as GetPublicKey is (TestPublicKeyRetries), within each poll's
// deadline: the per-call timeout or what is left of the caller's, whichever
// ends first. With the SDK's defaults a poll was retried on UNAVAILABLE
// and DEADLINE_EXCEEDED until that deadline, and the rotation failed with
// a late DEADLINE_EXCEEDED. A poll that fails ends the wait, and the
// version is destroyed, as for any rotation that fails after its version
// exists.
func TestVersionPollRetries(t *testing.T) {
	unavailable := status.Error(codes.Unavailable, "injected")
	for _, tc := range []struct {
		name     string
		err      error
		errs     int           // failed polls before the state; 0: every poll fails
		pending  int           // polls that answer PENDING_GENERATION after them
		deadline time.Duration // the caller's; 0: none
		want     error         // nil: served
		requests int           // GetCryptoKeyVersion requests; -1: as many as fit
	}{
		{"unavailable once", unavailable, 1, 1, 0, nil, 3},
		{"unavailable twice", unavailable, 2, 1, 0, nil, 4},
		{"unavailable every time", unavailable, 0, 1, 0, providers.ErrUnavailable, 3},
		{"unavailable every time, the caller's deadline before the timeout's", unavailable, 0, 1, time.Second, providers.ErrUnavailable, 3},
		{"deadline exceeded at the server", status.Error(codes.DeadlineExceeded, "injected"), 0, 1, 0, context.DeadlineExceeded, 1},
		{"permission denied", status.Error(codes.PermissionDenied, "injected"), 0, 1, 0, providers.ErrUnavailable, 1},
		{"resource exhausted", status.Error(codes.ResourceExhausted, "injected"), 0, 1, 0, providers.ErrRateLimited, 1},
		{"internal", status.Error(codes.Internal, "injected"), 0, 1, 0, providers.ErrUnavailable, 1},
		{"pending past the caller's deadline", nil, 0, 1 << 20, 300 * time.Millisecond, context.DeadlineExceeded, -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tf := newFleet(t, 0)
			tf.kms.Update(func() {
				tf.kms.NewVersionFault = func(v *gcpkmstest.Version) {
					v.GetVersionErr, v.GetVersionErrs, v.PendingGets = tc.err, tc.errs, tc.pending
				}
			})
			ctx := context.Background()
			if tc.deadline > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tc.deadline)
				defer cancel()
			}
			before := tf.kms.GetVersionCount()
			_, err := tf.p.NewVersion(ctx, "p256", "p256-v2")
			if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
				t.Errorf("NewVersion: %v, want %v", err, tc.want)
			}
			if tc.want != context.DeadlineExceeded && errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("NewVersion: %v, a deadline exceeded", err)
			}
			if n := tf.kms.GetVersionCount() - before; tc.requests >= 0 && n != tc.requests {
				t.Errorf("%d GetCryptoKeyVersion requests, want %d", n, tc.requests)
			}
			st := versionNow(t, tf.kms, gcpkmstest.VersionName("p256", "2")).State
			want := kmspb.CryptoKeyVersion_ENABLED
			if tc.want != nil {
				want = kmspb.CryptoKeyVersion_DESTROY_SCHEDULED
			}
			if st != want {
				t.Errorf("the new version is %s, want %s", st, want)
			}
		})
	}
}

// DestroyCryptoKeyVersion, which schedules the destruction of the version
// a failed rotation made, is retried as the reads are
// (TestPublicKeyRetries), within its own timeout. With the SDK's defaults
// it was retried on UNAVAILABLE and DEADLINE_EXCEEDED until that timeout:
// a dozen requests, the failed rotation's answer held back the whole
// timeout, and a DEADLINE_EXCEEDED logged where UNAVAILABLE was known at
// the first answer. A server's DEADLINE_EXCEEDED, which may come after the
// destruction was scheduled, is not sent again.
func TestDestroyRetries(t *testing.T) {
	unavailable := status.Error(codes.Unavailable, "injected")
	for _, tc := range []struct {
		name      string
		err       error
		errs      int    // failed answers before the destruction; 0: every answer fails
		destroyed bool   // the version ends DESTROY_SCHEDULED
		logged    string // in the warning that the version stays enabled; "": none
		requests  int
	}{
		{"unavailable once", unavailable, 1, true, "", 2},
		{"unavailable twice", unavailable, 2, true, "", 3},
		{"unavailable every time", unavailable, 0, false, "Unavailable", 3},
		{"deadline exceeded at the server", status.Error(codes.DeadlineExceeded, "injected"), 0, false, "deadline exceeded", 1},
		{"permission denied", status.Error(codes.PermissionDenied, "injected"), 0, false, "PermissionDenied", 1},
		{"internal", status.Error(codes.Internal, "injected"), 0, false, "Internal", 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &gcpkmstest.Server{}
			f.Add(gcpkmstest.VersionName("p256", "1"), gcpkmstest.TestKeys()["p256"], kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256)
			core, logs := observer.New(zap.InfoLevel)
			p, err := Open(context.Background(), Config{
				ID:            "gcp",
				Keys:          []KeyConfig{{Name: "p256", Resource: gcpkmstest.VersionName("p256", "1")}},
				ClientOptions: f.Serve(t),
				Logger:        zap.New(core),
			})
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			// The new version's public key fails its check, so the rotation
			// fails after the version exists and destroys it.
			f.Update(func() {
				f.NewVersionFault = func(v *gcpkmstest.Version) {
					v.CorruptPEMCRC, v.DestroyErr, v.DestroyErrs = true, tc.err, tc.errs
				}
			})
			_, err = p.NewVersion(context.Background(), "p256", "p256-v2")
			if !errors.Is(err, providers.ErrUnavailable) || !strings.Contains(err.Error(), "pem_crc32c") {
				t.Errorf("NewVersion: %v, want the public key's integrity failure", err)
			}
			if n := f.DestroyCount(); n != tc.requests {
				t.Errorf("%d DestroyCryptoKeyVersion requests, want %d", n, tc.requests)
			}
			st := versionNow(t, f, gcpkmstest.VersionName("p256", "2")).State
			if destroyed := st == kmspb.CryptoKeyVersion_DESTROY_SCHEDULED; destroyed != tc.destroyed {
				t.Errorf("the failed rotation's version is %s, want destroyed %v", st, tc.destroyed)
			}
			warnings := logs.FilterMessageSnippet("it stays enabled").All()
			switch {
			case tc.logged == "" && len(warnings) != 0:
				t.Errorf("warned %v", warnings)
			case tc.logged != "" && (len(warnings) != 1 || !strings.Contains(fmt.Sprint(warnings[0].ContextMap()["error"]), tc.logged)):
				t.Errorf("warned %v, want one naming %q", warnings, tc.logged)
			}
		})
	}
}

// heldTokenSource hands out tokens, but the first expires almost at once
// and the fetch of the second is held until the test releases it: a
// metadata server that hangs during a refresh. Behind oauth2's
// ReuseTokenSource, as the SDK's, the fetch holds the cache's lock, and
// every other call's Token waits for it, with no context to leave by.
type heldTokenSource struct {
	calls   atomic.Int32
	release chan struct{}
}

func (s *heldTokenSource) Token() (*oauth2.Token, error) {
	switch s.calls.Add(1) {
	case 1:
		// oauth2 takes a token for expired 10 s before its expiry.
		return &oauth2.Token{AccessToken: "first", Expiry: time.Now().Add(10*time.Second + 300*time.Millisecond)}, nil
	case 2:
		<-s.release
		return nil, errors.New("metadata server gave up")
	}
	return &oauth2.Token{AccessToken: "later", Expiry: time.Now().Add(time.Hour)}, nil
}

// tokenCredentials are gRPC per-RPC credentials over an oauth2 token
// source, as grpc/credentials/oauth's, but allowed on the fake's
// plaintext connection: GetRequestMetadata asks for the token without
// the call's context.
type tokenCredentials struct{ ts oauth2.TokenSource }

func (c tokenCredentials) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	tok, err := c.ts.Token()
	if err != nil {
		return nil, err
	}
	return map[string]string{"authorization": tok.Type() + " " + tok.AccessToken}, nil
}

func (tokenCredentials) RequireTransportSecurity() bool { return false }

// versionNow is a copy of a fake version as it is now, read under the
// fake's lock.
func versionNow(t *testing.T, f *gcpkmstest.Server, name string) gcpkmstest.Version {
	t.Helper()
	v, err := f.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	var now gcpkmstest.Version
	f.Update(func() { now = *v })
	return now
}

// servedWithTokens serves f to a client whose gRPC per-RPC credentials
// come from ts through oauth2's ReuseTokenSource, as the SDK's do. ts holds
// a fetch until release is closed: after the given time, or at the test's
// end, before the fake's own cleanup, so that a call held by the fetch
// fails the test instead of hanging it.
func servedWithTokens(t *testing.T, f *gcpkmstest.Server, ts oauth2.TokenSource, release chan struct{}, after time.Duration) []option.ClientOption {
	t.Helper()
	opts := append(f.Serve(t), option.WithGRPCDialOption(grpc.WithPerRPCCredentials(tokenCredentials{oauth2.ReuseTokenSource(nil, ts)})))
	timer := time.AfterFunc(after, func() { close(release) })
	t.Cleanup(func() {
		if timer.Stop() {
			close(release)
		}
	})
	return opts
}

// The calls that serve a key or make a rotation's version (the listing
// and GetPublicKey at Open, GetPublicKey for AddKey,
// CreateCryptoKeyVersion for NewVersion) keep to the provider's timeout
// while another call's token refresh hangs, as Sign's do.
func TestKeyCallsDeadlineDuringATokenFetch(t *testing.T) {
	const timeout = 300 * time.Millisecond
	for _, tc := range []struct {
		name string
		op   func(p *Provider, opts []option.ClientOption) error
	}{
		{"open latest", func(_ *Provider, opts []option.ClientOption) error {
			p, err := Open(context.Background(), Config{ID: "gcp2", Timeout: timeout, ClientOptions: opts,
				Keys: []KeyConfig{{Name: "p256", Resource: gcpkmstest.CryptoKeyName("p256"), Version: VersionLatest}}})
			if err == nil {
				p.Close()
			}
			return err
		}},
		{"add key", func(p *Provider, _ []option.ClientOption) error {
			_, err := p.AddKey(context.Background(), "again", gcpkmstest.VersionName("p256", "1"))
			return err
		}},
		{"new version", func(p *Provider, _ []option.ClientOption) error {
			_, err := p.NewVersion(context.Background(), "p256", "p256-v2")
			return err
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := &gcpkmstest.Server{}
			f.Add(gcpkmstest.VersionName("p256", "1"), gcpkmstest.TestKeys()["p256"], kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256)
			ts := &heldTokenSource{release: make(chan struct{})}
			opts := servedWithTokens(t, f, ts, ts.release, 3*time.Second)
			p, err := Open(context.Background(), Config{ID: "gcp", Timeout: timeout, ClientOptions: opts,
				Keys: []KeyConfig{{Name: "p256", Resource: gcpkmstest.VersionName("p256", "1")}}})
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			time.Sleep(400 * time.Millisecond) // the first token has expired
			// This Sign fetches the next token, and the fetch hangs.
			go p.Sign(context.Background(), "p256", algES256, randomDigest(crypto.SHA256))
			time.Sleep(50 * time.Millisecond)
			start := time.Now()
			err = tc.op(p, opts)
			if limit := timeout + 200*time.Millisecond; time.Since(start) > limit {
				t.Fatalf("returned after %v, want at most %v (%v)", time.Since(start), limit, err)
			}
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("err = %v, want a deadline error", err)
			}
			if _, ok := p.Version("p256-v2"); ok {
				t.Fatal("a rotation that timed out serves its version")
			}
		})
	}
}

// heldAfterTokenSource fetches a token for every call (each one handed
// out has already expired, and oauth2's ReuseTokenSource hands out a
// fresh fetch unchecked), until it is armed: the fetch after that hangs
// until released, holding the cache's lock as the SDK's does.
type heldAfterTokenSource struct {
	armed   atomic.Bool
	release chan struct{}
}

func (s *heldAfterTokenSource) Token() (*oauth2.Token, error) {
	if s.armed.Load() {
		<-s.release
		return nil, errors.New("metadata server gave up")
	}
	return &oauth2.Token{AccessToken: "short", Expiry: time.Now().Add(-time.Second)}, nil
}

// A rotation's state poll and the destroy of its unusable version keep to
// the provider's timeout while a token refresh hangs, as the create does
// (TestKeyCallsDeadlineDuringATokenFetch): the refresh starts right after
// the create, so the first poll waits in it, and the destroy then waits
// for the cache's lock. NewVersion fails within the two calls' timeouts,
// warns that the version may stay enabled, and never serves it.
func TestRotationPollAndDestroyDeadlineDuringATokenFetch(t *testing.T) {
	const timeout = 300 * time.Millisecond
	f := &gcpkmstest.Server{}
	f.Add(gcpkmstest.VersionName("p256", "1"), gcpkmstest.TestKeys()["p256"], kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256)
	ts := &heldAfterTokenSource{release: make(chan struct{})}
	opts := servedWithTokens(t, f, ts, ts.release, 5*time.Second)
	core, logs := observer.New(zap.InfoLevel)
	p, err := Open(context.Background(), Config{ID: "gcp", Timeout: timeout, ClientOptions: opts, Logger: zap.New(core),
		Keys: []KeyConfig{{Name: "p256", Resource: gcpkmstest.VersionName("p256", "1")}}})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	// The create has its token by the time the server makes the version.
	f.Update(func() { f.NewVersionFault = func(*gcpkmstest.Version) { ts.armed.Store(true) } })
	start := time.Now()
	_, err = p.NewVersion(context.Background(), "p256", "p256-v2")
	took := time.Since(start)
	if limit := 2*timeout + 300*time.Millisecond; took > limit {
		t.Fatalf("NewVersion returned after %v, want at most %v (%v)", took, limit, err)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("NewVersion: %v, want a deadline error", err)
	}
	if w := logs.FilterMessageSnippet("it stays enabled").All(); len(w) != 1 {
		t.Errorf("%d warnings that the version may stay enabled, want 1", len(w))
	}
	if v, served := p.Version("p256-v2"); served {
		t.Errorf("the failed rotation's version %s is served", v)
	}
}
