package azurekv

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/azurekv/azurekvtest"
)

func TestNewVersionAndAddKey(t *testing.T) {
	ctx := context.Background()
	tf := newFleet(t, 5*time.Second)
	baseVersion, _ := tf.p.Version("p256")
	baseURI, err := tf.p.URI("p256")
	if err != nil {
		t.Fatal(err)
	}

	ki, err := tf.p.NewVersion(ctx, "p256", "p256-v2")
	if err != nil {
		t.Fatal(err)
	}
	if ki.Name != "p256-v2" || ki.Type != providers.KeyECDSAP256 {
		t.Fatalf("new version info %+v", ki)
	}
	if ki.KID == tf.info(t, "p256").KID {
		t.Fatal("new version has the base's kid")
	}
	newVersion, ok := tf.p.Version("p256-v2")
	if !ok || newVersion == "" || newVersion == baseVersion {
		t.Fatalf("new version %q, base %q", newVersion, baseVersion)
	}
	if v, _ := tf.p.Version("p256"); v != baseVersion {
		t.Fatalf("base moved to version %q, want %q", v, baseVersion)
	}
	for _, name := range []string{"p256", "p256-v2"} {
		want := tf.info(t, name)
		d := randomDigest(crypto.SHA256)
		sig, err := tf.p.Sign(ctx, name, algES256, d)
		if err != nil {
			t.Fatalf("sign %s: %v", name, err)
		}
		if err := providers.Verify(want.Public, algES256, d, sig); err != nil {
			t.Fatalf("verify %s: %v", name, err)
		}
	}
	// The new version's signature does not verify under the base's key.
	d := randomDigest(crypto.SHA256)
	sig, err := tf.p.Sign(ctx, "p256-v2", algES256, d)
	if err != nil {
		t.Fatal(err)
	}
	if err := providers.Verify(ki.Public, algES256, d, sig); err != nil {
		t.Fatal(err)
	}
	if providers.Verify(tf.info(t, "p256").Public, algES256, d, sig) == nil {
		t.Fatal("new version signs with the base's key")
	}

	uri, err := tf.p.URI("p256-v2")
	if err != nil {
		t.Fatal(err)
	}
	if uri == baseURI || uri[len(uri)-len(newVersion):] != newVersion {
		t.Fatalf("uri %q, base %q, version %q", uri, baseURI, newVersion)
	}
	if _, err := tf.p.URI("nope"); !errors.Is(err, providers.ErrNotFound) {
		t.Fatalf("uri of unknown key: %v", err)
	}

	// A restarted agent (a fresh Provider on the same vault) adopts the
	// version by its kid.
	fresh, err := Open(ctx, Config{ID: "azure", VaultURL: tf.url, Credential: tf.cred, ClientOptions: tf.opts})
	if err != nil {
		t.Fatal(err)
	}
	defer fresh.Close()
	got, err := fresh.AddKey(ctx, "p256-v2", uri)
	if err != nil {
		t.Fatal(err)
	}
	if got.KID != ki.KID {
		t.Fatalf("adopted kid %s, want %s", got.KID, ki.KID)
	}
	if u, _ := fresh.URI("p256-v2"); u != uri {
		t.Fatalf("adopted uri %q, want %q", u, uri)
	}
	again, err := fresh.AddKey(ctx, "p256-v2", uri)
	if err != nil || again.KID != ki.KID {
		t.Fatalf("idempotent add: %v %s", err, again.KID)
	}
	if _, err := fresh.AddKey(ctx, "p256-v2", baseURI); !errors.Is(err, providers.ErrBadRequest) {
		t.Fatalf("add another kid under the same name: %v", err)
	}
	sig, err = fresh.Sign(ctx, "p256-v2", algES256, d)
	if err != nil {
		t.Fatal(err)
	}
	if err := providers.Verify(got.Public, algES256, d, sig); err != nil {
		t.Fatal(err)
	}

	if _, err := tf.p.NewVersion(ctx, "unknown", "x"); !errors.Is(err, providers.ErrNotFound) {
		t.Fatalf("new version of unknown base: %v", err)
	}
	if _, err := tf.p.NewVersion(ctx, "p256", "p256-v2"); !errors.Is(err, providers.ErrBadRequest) {
		t.Fatalf("new version under a served name: %v", err)
	}
}

// A CreateKey the vault carried out but whose answer was lost (a 503 in its
// place, or none before the deadline) is not sent again: it is not
// idempotent, and each retry would make another version. And the version
// it made is disabled: left enabled it is the vault key's current one,
// which anything resolving the key by name (a config without a version)
// would use, though Sigil never published it.
func TestFailedNewVersionIsNotRetriedAndIsDisabled(t *testing.T) {
	for _, tc := range []struct {
		name  string
		fault func(kv *azurekvtest.Server)
	}{
		{"answer a 503", func(kv *azurekvtest.Server) { kv.CreateStatus = 503 }},
		{"answer lost", func(kv *azurekvtest.Server) { kv.CreateStall = true }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tf := newFleet(t, 500*time.Millisecond)
			tf.kv.Update(func() { tc.fault(tf.kv) })
			if _, err := tf.p.NewVersion(context.Background(), "p256", "p256-v2"); err == nil {
				t.Fatal("NewVersion succeeded")
			}
			if n := tf.kv.CreateCount(); n != 1 {
				t.Fatalf("the vault made %d versions, want 1", n)
			}
			vs := tf.kv.Versions("ec-p256")
			var enabled []string
			tf.kv.Update(func() {
				for _, v := range vs {
					if v.Enabled {
						enabled = append(enabled, v.ID)
					}
				}
			})
			if len(enabled) != 1 || enabled[0] != tf.v["ec-p256"].ID {
				t.Fatalf("enabled versions %v, want only the served %s", enabled, tf.v["ec-p256"].ID)
			}
			// The served version still signs.
			d := randomDigest(crypto.SHA256)
			sig, err := tf.p.Sign(context.Background(), "p256", algES256, d)
			if err != nil {
				t.Fatal(err)
			}
			if err := providers.Verify(tf.info(t, "p256").Public, algES256, d, sig); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// After a create whose answer was lost, only the version that create made
// is disabled: one another writer made meanwhile (a second agent, the
// vault's rotation policy, an operator) is left as it is.
func TestFailedNewVersionLeavesOtherWritersVersions(t *testing.T) {
	tf := newFleet(t, 500*time.Millisecond)
	var other *azurekvtest.Version
	tf.kv.Update(func() { tf.kv.CreateStall = true })
	done := make(chan error, 1)
	go func() {
		_, err := tf.p.NewVersion(context.Background(), "p256", "p256-v2")
		done <- err
	}()
	time.Sleep(100 * time.Millisecond) // the create is in, its answer stalled
	other = tf.kv.Add("ec-p256", testKeys()["p256-b"])
	if err := <-done; err == nil {
		t.Fatal("NewVersion succeeded")
	}
	var otherEnabled, ours int
	versions := tf.kv.Versions("ec-p256")
	tf.kv.Update(func() {
		otherEnabled = map[bool]int{true: 1}[other.Enabled]
		for _, v := range versions {
			if v.Tags[rotationTag] != "" && v.Enabled {
				ours++
			}
		}
	})
	if otherEnabled != 1 {
		t.Fatal("the other writer's version was disabled")
	}
	if ours != 0 {
		t.Fatal("the failed rotation's own version is still enabled")
	}
}

// The calls that serve a key or make a rotation's version (GetKey for
// AddKey, CreateKey and the version listing for NewVersion) keep to the
// provider's timeout while another call's token fetch hangs: azcore makes
// them wait for that fetch without heeding their contexts.
func TestKeyCallsDeadlineDuringATokenFetch(t *testing.T) {
	const timeout = 300 * time.Millisecond
	for _, tc := range []struct {
		name  string
		calls int // Key Vault calls the operation makes, each bounded by timeout
		op    func(p *Provider, uri string) error
	}{
		{"add key", 1, func(p *Provider, uri string) error {
			_, err := p.AddKey(context.Background(), "again", uri)
			return err
		}},
		{"new version", 2, func(p *Provider, _ string) error {
			_, err := p.NewVersion(context.Background(), "p256", "p256-v2")
			return err
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tf := newFleet(t, 0)
			cred := &stallingCredential{inner: tf.cred, release: make(chan struct{})}
			// Released after a while, so that a call held by the fetch fails
			// the test instead of hanging it.
			release := time.AfterFunc(3*time.Second, func() { close(cred.release) })
			t.Cleanup(func() { // before the vault's own cleanup
				if release.Stop() {
					close(cred.release)
				}
			})
			p, err := Open(context.Background(), Config{ID: "azure2", VaultURL: tf.url, Keys: []KeyConfig{{Name: "p256", Key: "ec-p256", Version: tf.v["ec-p256"].ID}},
				Timeout: timeout, Credential: cred, ClientOptions: tf.opts})
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			uri, _ := p.URI("p256")
			time.Sleep(400 * time.Millisecond) // the first token has expired
			// This Sign fetches the next token, and the fetch hangs.
			go p.Sign(context.Background(), "p256", algES256, randomDigest(algES256.Hash))
			time.Sleep(50 * time.Millisecond)
			start := time.Now()
			err = tc.op(p, uri)
			limit := time.Duration(tc.calls)*timeout + 200*time.Millisecond
			if el := time.Since(start); el > limit {
				t.Fatalf("returned after %v, want at most %v (%v)", el, limit, err)
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

// A version a failed rotation made and could not disable is named in the
// log and the error, by the vault's status and code only: the vault's
// answer text stays out of both, as classify keeps it out of every other
// message.
func TestUndisabledVersionLogCarriesNoServerText(t *testing.T) {
	tf := newFleet(t, 500*time.Millisecond)
	core, logs := observer.New(zap.DebugLevel)
	tf.p.log = zap.New(core)
	tf.kv.Update(func() { tf.kv.CreateStatus, tf.kv.UpdateStatus = 503, 503 })
	_, err := tf.p.NewVersion(context.Background(), "p256", "p256-v2")
	if err == nil || !strings.Contains(err.Error(), "could not be disabled") {
		t.Fatalf("NewVersion err = %v, want the version it could not disable named", err)
	}
	if strings.Contains(err.Error(), "injected fault") {
		t.Fatalf("error carries the vault's text: %v", err)
	}
	entries := logs.FilterMessageSnippet("could not be disabled").All()
	if len(entries) != 1 {
		t.Fatalf("%d log entries about the undisabled version, want 1", len(entries))
	}
	for k, v := range entries[0].ContextMap() {
		if s := fmt.Sprint(v); strings.Contains(s, "injected fault") || strings.Contains(s, "RESPONSE CONTENT") {
			t.Fatalf("log field %s carries the vault's answer: %s", k, s)
		}
	}
}
