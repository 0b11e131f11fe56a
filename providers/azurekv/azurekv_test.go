package azurekv

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"errors"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"

	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/azurekv/azurekvtest"
	"github.com/sigil-agent/sigil/providers/providertest"
)

var (
	algES256 = providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	algES384 = providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA384}
	algRS256 = providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: crypto.SHA256}
	algRS384 = providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: crypto.SHA384}
	algPS256 = providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA256}
	algPS384 = providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA384}
	algRS512 = providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: crypto.SHA512}
	algPS512 = providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA512}
)

// testKeys are generated once per test binary: RSA generation is slow under -race.
var testKeys = sync.OnceValue(func() map[string]crypto.Signer {
	must := func(k crypto.Signer, err error) crypto.Signer {
		if err != nil {
			panic(err)
		}
		return k
	}
	return map[string]crypto.Signer{
		"p256":   must(ecdsa.GenerateKey(elliptic.P256(), rand.Reader)),
		"p384":   must(ecdsa.GenerateKey(elliptic.P384(), rand.Reader)),
		"p256-b": must(ecdsa.GenerateKey(elliptic.P256(), rand.Reader)),
		"rsa":    must(rsa.GenerateKey(rand.Reader, 2048)),
	}
})

// testFleet is a fake vault holding one key per type and a provider opened on it.
type testFleet struct {
	kv *azurekvtest.Server
	p  *Provider
	v  map[string]*azurekvtest.Version // by vault key name
	// what the provider was opened with, for opening another on the same vault
	url  string
	opts *azkeys.ClientOptions
	cred azcore.TokenCredential
}

func newFleet(t *testing.T, timeout time.Duration) *testFleet {
	t.Helper()
	keys := testKeys()
	kv := &azurekvtest.Server{}
	v := map[string]*azurekvtest.Version{
		"ec-p256": kv.Add("ec-p256", keys["p256"]),
		"ec-p384": kv.Add("ec-p384", keys["p384"]),
		"rsa":     kv.Add("rsa", keys["rsa"]),
	}
	url, opts, cred := kv.Start(t)
	p, err := Open(context.Background(), Config{
		ID:       "azure",
		VaultURL: url,
		Keys: []KeyConfig{
			{Name: "p256", Key: "ec-p256", Version: v["ec-p256"].ID},
			{Name: "p384", Key: "ec-p384"},
			{Name: "rsa", Key: "rsa"},
		},
		Timeout:       timeout,
		Credential:    cred,
		ClientOptions: opts,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return &testFleet{kv: kv, p: p, v: v, url: url, opts: opts, cred: cred}
}

func (tf *testFleet) info(t *testing.T, name string) providers.KeyInfo {
	t.Helper()
	return providertest.KeyInfo(t, tf.p, name)
}

var randomDigest = providertest.RandomDigest

func TestSignVerifies(t *testing.T) {
	tf := newFleet(t, 0)
	if tf.kv.Challenges() == 0 {
		t.Fatal("the client never went through the challenge flow")
	}
	for _, tc := range []struct {
		key  string
		alg  providers.Algorithm
		kind providers.KeyType
	}{
		{"p256", algES256, providers.KeyECDSAP256},
		{"p384", algES384, providers.KeyECDSAP384},
		{"rsa", algRS256, providers.KeyRSA2048},
		{"rsa", algRS384, providers.KeyRSA2048},
		{"rsa", algPS256, providers.KeyRSA2048},
		{"rsa", algPS384, providers.KeyRSA2048},
		{"rsa", algRS512, providers.KeyRSA2048},
		{"rsa", algPS512, providers.KeyRSA2048},
	} {
		t.Run(tc.key+"/"+tc.alg.String(), func(t *testing.T) {
			ki := tf.info(t, tc.key)
			if ki.Type != tc.kind || ki.Provider != "azure" || len(ki.KID) != 32 {
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
	// Public keys are fetched once, at Open, and cached.
	if n := tf.kv.GetKeyCount(); n != 3 {
		t.Fatalf("vault answered %d get-key requests, want 3", n)
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
		{"p256", algPS256},
		{"rsa", algES256},
		{"p384", providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA512}},
		{"p256", providers.Algorithm{Scheme: providers.SchemeEd25519}},
	} {
		t.Run(tc.key+"/"+tc.alg.String(), func(t *testing.T) {
			_, err := tf.p.Sign(context.Background(), tc.key, tc.alg, randomDigest(crypto.SHA256))
			if !errors.Is(err, providers.ErrUnsupportedAlgorithm) {
				t.Fatalf("err = %v, want ErrUnsupportedAlgorithm", err)
			}
		})
	}
	if _, err := tf.p.Sign(context.Background(), "p256", algES256, make([]byte, 20)); !errors.Is(err, providers.ErrBadRequest) {
		t.Fatalf("short digest: err = %v, want ErrBadRequest", err)
	}
	if n := tf.kv.SignCount(); n != 0 {
		t.Fatalf("%d refused requests reached the vault", n)
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

// A stalled vault costs the caller the configured deadline and no more, and
// the provider goes on serving its other keys.
func TestSignDeadline(t *testing.T) {
	// The bounds below sit midway between the outcomes they tell apart,
	// so that a CI machine stalled for a few hundred milliseconds cannot
	// trip them: the call ends at Config.Timeout, not at twice it (a
	// deadline per attempt, one retry) nor at the stall (5 s or never);
	// the caller's 50 ms deadline ends it well before Config.Timeout.
	const timeout = time.Second
	const limit = timeout + timeout/2
	tf := newFleet(t, timeout)
	tf.kv.Update(func() { tf.v["ec-p256"].Delay = 5 * time.Second })

	start := time.Now()
	_, err := tf.p.Sign(context.Background(), "p256", algES256, randomDigest(crypto.SHA256))
	elapsed := time.Since(start)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want DeadlineExceeded", err)
	}
	if elapsed < timeout || elapsed > limit {
		t.Fatalf("deadline error after %v, want %v..%v", elapsed, timeout, limit)
	}
	t.Logf("stalled sign answered DeadlineExceeded after %v (timeout %v)", elapsed, timeout)

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
		status int
		want   error
		text   string
		tries  int // sign requests the vault sees: 5xx is retried once, 401 re-authenticated once
	}{
		{http.StatusTooManyRequests, providers.ErrRateLimited, "rate limited", 1},
		{http.StatusForbidden, providers.ErrUnavailable, "or a disabled key version", 1},
		{http.StatusUnauthorized, providers.ErrUnavailable, "credentials refused", 2},
		{http.StatusNotFound, providers.ErrNotFound, "HTTP 404", 1},
		{http.StatusBadRequest, providers.ErrBadRequest, "rejected as invalid", 1},
		{http.StatusServiceUnavailable, providers.ErrUnavailable, "HTTP 503", 2},
		{http.StatusInternalServerError, providers.ErrUnavailable, "HTTP 500", 2},
	} {
		t.Run(http.StatusText(tc.status), func(t *testing.T) {
			tf := newFleet(t, 0)
			tf.kv.Update(func() { tf.v["ec-p256"].SignStatus = tc.status })
			digest := randomDigest(crypto.SHA256)
			start := time.Now()
			_, err := tf.p.Sign(context.Background(), "p256", algES256, digest)
			elapsed := time.Since(start)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.text) {
				t.Fatalf("err = %v, want %v mentioning %q", err, tc.want, tc.text)
			}
			t.Logf("HTTP %d after %v: %v", tc.status, elapsed.Round(time.Millisecond), err)
			if strings.Contains(err.Error(), "injected fault") || strings.Contains(strings.ToLower(err.Error()), strings.ToLower(base64.RawURLEncoding.EncodeToString(digest))) {
				t.Fatalf("error carries server text or the digest: %v", err)
			}
			if n := tf.kv.SignCount(); n != tc.tries {
				t.Fatalf("vault saw %d sign requests, want %d", n, tc.tries)
			}
			if elapsed > time.Second {
				t.Fatalf("answered after %v", elapsed)
			}
		})
	}
}

// A 429 asks the client to pause (Retry-After): Signs meanwhile are
// RATE_LIMITED without reaching the vault, which extends throttling for
// clients that keep sending; after the pause they go through again.
func TestThrottlePauseIsHonoured(t *testing.T) {
	tf := newFleet(t, 0)
	tf.kv.Update(func() { tf.v["ec-p256"].SignStatus = http.StatusTooManyRequests }) // Retry-After: 1
	sign := func() error {
		_, err := tf.p.Sign(context.Background(), "p256", algES256, randomDigest(crypto.SHA256))
		return err
	}
	start := time.Now()
	if err := sign(); !errors.Is(err, providers.ErrRateLimited) {
		t.Fatalf("throttled: %v", err)
	}
	tf.kv.Update(func() { tf.v["ec-p256"].SignStatus = 0 })
	for range 5 {
		if err := sign(); !errors.Is(err, providers.ErrRateLimited) {
			if time.Since(start) < 900*time.Millisecond {
				t.Fatalf("during the pause the vault asked for: %v, want RATE_LIMITED", err)
			}
		}
	}
	if n := tf.kv.SignCount(); n != 1 && time.Since(start) < 900*time.Millisecond {
		t.Fatalf("the vault saw %d sign requests during its pause, want 1", n)
	}
	time.Sleep(time.Until(start.Add(1100 * time.Millisecond)))
	if err := sign(); err != nil {
		t.Fatalf("after the pause: %v", err)
	}
	// The pause was the vault's: every key of it signs again.
	if err := func() error {
		_, err := tf.p.Sign(context.Background(), "p384", algES384, randomDigest(crypto.SHA384))
		return err
	}(); err != nil {
		t.Fatal(err)
	}
}

// The pause is kept in wall-clock time; a clock stepped back must not
// stretch it past the longest pause a 429 may ask for.
func TestThrottlePauseAfterAClockStepBack(t *testing.T) {
	var p Provider
	now := time.Now()
	p.throttledUntil.Store(now.Add(time.Second).UnixNano())
	if got := p.throttled(now.Add(-time.Hour)); got > maxThrottlePause {
		t.Fatalf("an hour after a step back, %v of pause left, want at most %v", got, maxThrottlePause)
	}
}

func TestOpenResolvesVersions(t *testing.T) {
	keys := testKeys()
	kv := &azurekvtest.Server{}
	old := kv.Add("ec", keys["p256"])
	cur := kv.Add("ec", keys["p256-b"])
	url, opts, cred := kv.Start(t)
	open := func(kcs ...KeyConfig) (*Provider, error) {
		return Open(context.Background(), Config{ID: "azure", VaultURL: url, Keys: kcs, Credential: cred, ClientOptions: opts})
	}

	p, err := open(KeyConfig{Name: "latest", Key: "ec"}, KeyConfig{Name: "pinned", Key: "ec", Version: old.ID})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	for name, want := range map[string]*azurekvtest.Version{"latest": cur, "pinned": old} {
		if v, _ := p.Version(name); v != want.ID {
			t.Fatalf("%s resolved to version %q, want %q", name, v, want.ID)
		}
		digest := randomDigest(crypto.SHA256)
		sig, err := p.Sign(context.Background(), name, algES256, digest)
		if err != nil {
			t.Fatal(err)
		}
		if err := providers.Verify(want.Signer.Public(), algES256, digest, sig); err != nil {
			t.Fatalf("%s: signature is not the resolved version's: %v", name, err)
		}
	}

	for _, tc := range []struct {
		name string
		kc   KeyConfig
		want error
		text string
	}{
		{"unknown key", KeyConfig{Name: "x", Key: "missing"}, providers.ErrNotFound, "HTTP 404"},
		{"unknown version", KeyConfig{Name: "x", Key: "ec", Version: "0123456789abcdef0123456789abcdef"}, providers.ErrNotFound, "HTTP 404"},
		{"no vault key", KeyConfig{Name: "x"}, providers.ErrBadRequest, "empty vault key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := open(tc.kc)
			if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.text) {
				t.Fatalf("err = %v, want %v mentioning %q", err, tc.want, tc.text)
			}
		})
	}

	kv.Update(func() { cur.GetStatus = http.StatusForbidden })
	if _, err := open(KeyConfig{Name: "latest", Key: "ec"}); !errors.Is(err, providers.ErrUnavailable) || !strings.Contains(err.Error(), "refused (HTTP 403") {
		t.Fatalf("get key refused: err = %v", err)
	}
	if _, err := open(KeyConfig{Name: "a", Key: "ec"}, KeyConfig{Name: "a", Key: "ec", Version: old.ID}); err == nil {
		t.Fatal("a name configured twice opened")
	}
}

// With no Config.Credential the provider authenticates as production does,
// through azidentity's default chain: here an App Service managed identity
// (the fake's token endpoint, named by IDENTITY_ENDPOINT and
// IDENTITY_HEADER). The SDK refuses a vault on 127.0.0.1 challenged for
// https://vault.azure.net unless DisableChallengeResourceVerification says
// the name is known to be outside the cloud's domain.
func TestDefaultCredentialAndChallengeVerification(t *testing.T) {
	kv := &azurekvtest.Server{}
	v0 := kv.Add("ec", testKeys()["p256"])
	vault, err := kv.Listen()
	if err != nil {
		t.Fatal(err)
	}
	defer vault.Close()
	for _, kv := range vault.Env() {
		name, value, _ := strings.Cut(kv, "=")
		t.Setenv(name, value)
	}
	// The vault's transport trusts its certificate and nothing else is
	// changed from production: verification stays on unless Config says.
	opts := vault.ClientOptions()
	opts.DisableChallengeResourceVerification = false
	open := func(disable bool) (*Provider, error) {
		return Open(context.Background(), Config{ID: "azure", VaultURL: vault.URL, ClientOptions: opts,
			DisableChallengeResourceVerification: disable, Keys: []KeyConfig{{Name: "ec", Key: "ec"}}})
	}

	if _, err := open(false); !errors.Is(err, providers.ErrUnavailable) || !strings.Contains(err.Error(), "disable_challenge_resource_verification") {
		t.Fatalf("vault on 127.0.0.1 challenged for %s: err = %v, want the SDK's challenge resource refusal", azurekvtest.Resource, err)
	}
	if n := kv.IdentityTokens(); n != 0 {
		t.Fatalf("%d tokens issued for a refused challenge", n)
	}

	p, err := open(true)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	digest := randomDigest(crypto.SHA256)
	sig, err := p.Sign(context.Background(), "ec", algES256, digest)
	if err != nil {
		t.Fatal(err)
	}
	if err := providers.Verify(v0.Signer.Public(), algES256, digest, sig); err != nil {
		t.Fatal(err)
	}
	// MSAL keeps managed-identity tokens in one cache per process, so only
	// this test's first run in a process (go test -count N) fetches one.
	want := 1
	if defaultCredentialRuns.Add(1) > 1 {
		want = 0
	}
	if n := kv.IdentityTokens(); n != want {
		t.Fatalf("managed-identity endpoint issued %d tokens, want %d", n, want)
	}
	if _, err := p.Sign(context.Background(), "ec", algES256, digest); err != nil {
		t.Fatal(err)
	}
	if n := kv.IdentityTokens(); n != want {
		t.Fatalf("a second signature fetched another token (%d, want %d): the token is not cached", n, want)
	}
}

// defaultCredentialRuns counts TestDefaultCredentialAndChallengeVerification's
// runs in this process.
var defaultCredentialRuns atomic.Int32

// A signature the vault returns by another key is not released under the
// served kid: Sign checks it against the served public key.
func TestSignByAnotherKeyIsRefused(t *testing.T) {
	tf := newFleet(t, 0)
	tf.kv.Update(func() { tf.v["ec-p256"].Signer = testKeys()["p256-b"] })
	digest := randomDigest(algES256.Hash)
	sig, err := tf.p.Sign(context.Background(), "p256", algES256, digest)
	if !errors.Is(err, providers.ErrUnavailable) || sig != nil {
		t.Fatalf("Sign with the vault signing by another key: %d bytes, %v; want ErrUnavailable", len(sig), err)
	}
}

// stallingCredential hands out its inner credential's tokens, but the
// first expires almost at once and the fetch of the second hangs: until
// its caller gives up (a slow managed-identity endpoint during a refresh),
// or, with release set, until the test closes release, deaf to its
// caller's context (a token endpoint that hangs under azcore's lock).
type stallingCredential struct {
	inner   azcore.TokenCredential
	calls   atomic.Int32
	release chan struct{}
}

func (c *stallingCredential) GetToken(ctx context.Context, o policy.TokenRequestOptions) (azcore.AccessToken, error) {
	switch c.calls.Add(1) {
	case 1:
		tok, err := c.inner.GetToken(ctx, o)
		tok.ExpiresOn = time.Now().Add(300 * time.Millisecond)
		return tok, err
	case 2:
		if c.release != nil {
			<-c.release
			return azcore.AccessToken{}, errors.New("token endpoint gave up")
		}
		<-ctx.Done()
		return azcore.AccessToken{}, ctx.Err()
	}
	return c.inner.GetToken(ctx, o)
}

// A Sign's deadline bounds it even while another call's token fetch
// hangs: azcore makes the other callers wait for that fetch without
// heeding their own contexts.
func TestSignDeadlineDuringATokenFetch(t *testing.T) {
	tf := newFleet(t, 0)
	cred := &stallingCredential{inner: tf.cred}
	p, err := Open(context.Background(), Config{ID: "azure2", VaultURL: tf.url, Keys: []KeyConfig{{Name: "p256", Key: "ec-p256", Version: tf.v["ec-p256"].ID}},
		Timeout: 1500 * time.Millisecond, Credential: cred, ClientOptions: tf.opts})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	time.Sleep(400 * time.Millisecond) // the first token has expired
	// This Sign fetches the next token, and the fetch hangs.
	go p.Sign(context.Background(), "p256", algES256, randomDigest(algES256.Hash))
	time.Sleep(100 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err = p.Sign(ctx, "p256", algES256, randomDigest(algES256.Hash))
	if el := time.Since(start); el > 500*time.Millisecond {
		t.Fatalf("a Sign with a 50ms deadline returned after %v (%v)", el, err)
	}
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Sign: %v, want a deadline error", err)
	}
}

// A version Key Vault will not sign with is not served: one outside its
// nbf/exp window or whose key_ops leave out sign fails Open with that
// reason, as a disabled one does, whether it was named or is the key's
// current version (what a restart resolves after another writer's
// rotation) with no older one that can sign (the older one here is
// disabled; TestVersionlessKeyResolvesToTheNewestUsableVersion has one
// that can). Served, every Sign would be a 403 blamed on the identity's
// access policy.
func TestOpenRefusesVersionsThatCannotSign(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		name string
		set  func(v *azurekvtest.Version)
		want error // nil: served, and signs
		text string
	}{
		{"expired", func(v *azurekvtest.Version) { v.Expires = now.Add(-time.Hour) }, providers.ErrUnavailable, "expired at"},
		{"not yet valid", func(v *azurekvtest.Version) { v.NotBefore = now.Add(time.Hour) }, providers.ErrUnavailable, "not valid before"},
		{"no sign in key_ops", func(v *azurekvtest.Version) { v.KeyOps = []string{"verify"} }, providers.ErrUnsupportedAlgorithm, "key_ops"},
		{"disabled", func(v *azurekvtest.Version) { v.Enabled = false }, providers.ErrUnavailable, "disabled"},
		{"inside its window, sign permitted", func(v *azurekvtest.Version) {
			v.NotBefore, v.Expires, v.KeyOps = now.Add(-time.Hour), now.Add(time.Hour), []string{"sign"}
		}, nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kv := &azurekvtest.Server{}
			older := kv.Add("ec", testKeys()["p256-b"])
			cur := kv.Add("ec", testKeys()["p256"])
			kv.Update(func() {
				older.Enabled = false
				tc.set(cur)
			})
			url, opts, cred := kv.Start(t)
			for _, kc := range []KeyConfig{{Name: "ec", Key: "ec"}, {Name: "ec", Key: "ec", Version: cur.ID}} {
				p, err := Open(context.Background(), Config{ID: "azure", VaultURL: url, Keys: []KeyConfig{kc}, Credential: cred, ClientOptions: opts})
				if tc.want != nil {
					if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.text) {
						t.Fatalf("version %q: Open err = %v, want %v mentioning %q", kc.Version, err, tc.want, tc.text)
					}
					continue
				}
				if err != nil {
					t.Fatal(err)
				}
				digest := randomDigest(crypto.SHA256)
				sig, err := p.Sign(context.Background(), "ec", algES256, digest)
				p.Close()
				if err != nil {
					t.Fatal(err)
				}
				if err := providers.Verify(cur.Signer.Public(), algES256, digest, sig); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

// A served version whose exp passes is refused by the vault with a 403;
// the error names the expiry rather than only the identity's access.
func TestSignAfterTheVersionExpired(t *testing.T) {
	kv := &azurekvtest.Server{}
	v := kv.Add("ec", testKeys()["p256"])
	// exp is in whole seconds on the wire: at least a second ahead.
	exp := time.Now().Add(2 * time.Second).Truncate(time.Second)
	kv.Update(func() { v.Expires = exp })
	url, opts, cred := kv.Start(t)
	p, err := Open(context.Background(), Config{ID: "azure", VaultURL: url, Keys: []KeyConfig{{Name: "ec", Key: "ec"}}, Credential: cred, ClientOptions: opts})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if _, err := p.Sign(context.Background(), "ec", algES256, randomDigest(crypto.SHA256)); err != nil {
		t.Fatalf("before exp: %v", err)
	}
	time.Sleep(time.Until(exp) + 50*time.Millisecond)
	_, err = p.Sign(context.Background(), "ec", algES256, randomDigest(crypto.SHA256))
	if !errors.Is(err, providers.ErrUnavailable) || !strings.Contains(err.Error(), "expired at") {
		t.Fatalf("after exp: err = %v, want UNAVAILABLE naming the expiry", err)
	}
}

// Sign returns at its deadline while its SDK call runs on aside; the
// caller then reuses its digest buffer (the agent pools a request's
// digest). The call left behind must not read it then: under -race a read
// after Sign returned is a reported race, and a signature over whatever
// the buffer holds next would be worse.
func TestAbandonedSignDoesNotReadTheCallersDigest(t *testing.T) {
	tf := newFleet(t, 0)
	for range 20 {
		digest := randomDigest(crypto.SHA256)
		ctx, cancel := context.WithDeadline(context.Background(), time.Now())
		_, err := tf.p.Sign(ctx, "p256", algES256, digest)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("err = %v, want DeadlineExceeded", err)
		}
		copy(digest, randomDigest(crypto.SHA256)) // the buffer's next request
	}
	// Give the calls left behind time to run to their end.
	time.Sleep(200 * time.Millisecond)
}
