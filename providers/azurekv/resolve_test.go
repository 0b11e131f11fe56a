package azurekv

import (
	"context"
	"crypto"
	"errors"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/azurekv/azurekvtest"
	"github.com/sigil-agent/sigil/providers/providertest"
)

// A rotation attempt that fails before its cut-over disables the version
// it made (DestroyKey), which stays the vault key's newest. A key named
// without a version used to resolve to it at the next Open and fail it
// ("key version is disabled"), so the agent did not start at all; it now
// resolves to the newest enabled version, the one served before the
// attempt, and the log says which and why.
func TestVersionlessKeyAfterAFailedRotation(t *testing.T) {
	tf := newFleet(t, 5*time.Second)
	ctx := context.Background()
	base := tf.info(t, "p384")
	made, err := tf.p.NewVersion(ctx, "p384", "p384-v2")
	if err != nil {
		t.Fatal(err)
	}
	if err := tf.p.DestroyKey(ctx, "p384-v2", func(providers.KeyInfo) error { return nil }); err != nil {
		t.Fatal(err)
	}
	tf.p.Close()

	core, logs := observer.New(zapcore.InfoLevel)
	p, err := Open(ctx, Config{ID: "azure", VaultURL: tf.url, Credential: tf.cred, ClientOptions: tf.opts,
		Keys: []KeyConfig{{Name: "p384", Key: "ec-p384"}}, Logger: zap.New(core)})
	if err != nil {
		t.Fatalf("Open after a failed rotation: %v", err)
	}
	defer p.Close()
	if v, _ := p.Version("p384"); v != tf.v["ec-p384"].ID {
		t.Fatalf("resolved to version %q, want the enabled %s", v, tf.v["ec-p384"].ID)
	}
	info := providertest.KeyInfo(t, p, "p384")
	if info.KID != base.KID || info.KID == made.KID {
		t.Fatalf("served kid %s, want the base's %s (the attempt's was %s)", info.KID, base.KID, made.KID)
	}
	d := randomDigest(crypto.SHA384)
	sig, err := p.Sign(ctx, "p384", algES384, d)
	if err != nil {
		t.Fatal(err)
	}
	if err := providers.Verify(base.Public, algES384, d, sig); err != nil {
		t.Fatalf("the resolved version's signature: %v", err)
	}
	chosen := logs.FilterMessageSnippet("newest enabled version").All()
	if len(chosen) != 1 || chosen[0].ContextMap()["version"] != tf.v["ec-p384"].ID || !strings.Contains(chosen[0].ContextMap()["reason"].(string), "disabled") {
		t.Fatalf("log of the choice: %v", chosen)
	}
}

// A key named without a version resolves to its newest version by created
// time that Key Vault would sign with (enabled, inside nbf..exp), as GCP's
// latest is the highest ENABLED version, across every page of the listing,
// with a tie broken by the version id. With none, Open fails as before,
// naming why the current version cannot sign; a pinned version is never
// replaced.
func TestVersionlessKeyResolvesToTheNewestUsableVersion(t *testing.T) {
	now := time.Now().Truncate(time.Second)
	type ver struct {
		age             int // seconds before now it was created
		disabled        bool
		expired, notYet bool
	}
	ok := func(age int) ver { return ver{age: age} }
	const tie = -1 // want: the larger id of versions 0 and 1
	for _, tc := range []struct {
		name     string
		versions []ver // in the order added; the last is the current one
		pageSize int
		want     int // index into versions; tie
		text     string
	}{
		{"current usable", []ver{ok(9), ok(1)}, 0, 1, ""},
		{"current disabled", []ver{ok(9), {age: 1, disabled: true}}, 0, 0, ""},
		{"current expired", []ver{ok(9), {age: 1, expired: true}}, 0, 0, ""},
		{"current not yet valid", []ver{ok(9), {age: 1, notYet: true}}, 0, 0, ""},
		{"newest by created time, not listing order", []ver{ok(5), ok(9), ok(7), {age: 1, disabled: true}}, 0, 0, ""},
		{"older ones unusable too", []ver{ok(9), {age: 7, expired: true}, {age: 5, disabled: true}, {age: 1, disabled: true}}, 0, 0, ""},
		{"on a later page", []ver{ok(9), ok(5), {age: 7, disabled: true}, {age: 1, disabled: true}}, 1, 1, ""},
		{"same created second", []ver{ok(5), ok(5), {age: 1, disabled: true}}, 2, tie, ""},
		{"none enabled", []ver{{age: 9, disabled: true}, {age: 1, disabled: true}}, 0, 0, "key version is disabled"},
		{"none valid", []ver{{age: 9, expired: true}, {age: 1, expired: true}}, 0, 0, "expired at"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kv := &azurekvtest.Server{}
			var vs []*azurekvtest.Version
			for _, v := range tc.versions {
				added := kv.Add("ec", testKeys()["p256"])
				kv.Update(func() {
					added.Created = now.Add(-time.Duration(v.age) * time.Second)
					added.Enabled = !v.disabled
					if v.expired {
						added.Expires = now.Add(-time.Hour)
					}
					if v.notYet {
						added.NotBefore = now.Add(time.Hour)
					}
				})
				vs = append(vs, added)
			}
			kv.Update(func() { kv.ListPageSize = tc.pageSize })
			url, opts, cred := kv.Start(t)
			open := func(kc KeyConfig) (*Provider, error) {
				return Open(context.Background(), Config{ID: "azure", VaultURL: url, Keys: []KeyConfig{kc}, Credential: cred, ClientOptions: opts})
			}
			p, err := open(KeyConfig{Name: "ec", Key: "ec"})
			if tc.text != "" {
				if !errors.Is(err, providers.ErrUnavailable) || !strings.Contains(err.Error(), tc.text) {
					t.Fatalf("Open: %v, want ErrUnavailable mentioning %q", err, tc.text)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			want := vs[max(tc.want, 0)]
			if tc.want == tie && vs[1].ID > vs[0].ID {
				want = vs[1]
			}
			if v, _ := p.Version("ec"); v != want.ID {
				t.Fatalf("resolved to version %q, want %q", v, want.ID)
			}
			d := randomDigest(crypto.SHA256)
			sig, err := p.Sign(context.Background(), "ec", algES256, d)
			if err != nil {
				t.Fatal(err)
			}
			if err := providers.Verify(want.Signer.Public(), algES256, d, sig); err != nil {
				t.Fatalf("the resolved version's signature: %v", err)
			}
			if cur := vs[len(vs)-1]; cur != want {
				if _, err := open(KeyConfig{Name: "ec", Key: "ec", Version: cur.ID}); !errors.Is(err, providers.ErrUnavailable) {
					t.Fatalf("Open pinned to the unusable current version: %v, want ErrUnavailable", err)
				}
			}
		})
	}
}

// The listing is bounded: a key with more pages of versions than
// maxVersionPages fails Open, asking for a pinned version, rather than
// paging on or picking from part of the list.
func TestVersionlessKeyListingIsBounded(t *testing.T) {
	kv := &azurekvtest.Server{}
	for range maxVersionPages + 1 {
		kv.Add("ec", testKeys()["p256"])
	}
	vs := kv.Versions("ec")
	kv.Update(func() {
		kv.ListPageSize = 1
		vs[len(vs)-1].Enabled = false
	})
	url, opts, cred := kv.Start(t)
	_, err := Open(context.Background(), Config{ID: "azure", VaultURL: url, Keys: []KeyConfig{{Name: "ec", Key: "ec"}}, Credential: cred, ClientOptions: opts})
	if !errors.Is(err, providers.ErrUnavailable) || !strings.Contains(err.Error(), "key version is disabled") || !strings.Contains(err.Error(), "pin") {
		t.Fatalf("Open with too many versions to list: %v, want ErrUnavailable asking for a pinned version", err)
	}
}
