package azurekv

import (
	"context"
	"crypto"
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/providers"
)

// DestroyKey (rotation.KeyDestroyer) disables the version NewVersion made
// for a rotation attempt that never cut over (Key Vault deletes only whole
// keys): before, a failed attempt left its version enabled, the key's
// current one, and one more per retry. A version check refuses (a slot's
// version) stays enabled and served; an update the vault refused leaves
// the version unserved and is done by the next call; the base version
// signs on.
func TestDestroyKey(t *testing.T) {
	errKept := errors.New("a version of a slot")
	for _, tc := range []struct {
		name        string
		refuse      bool // check refuses the version
		failFirst   bool // the vault refuses the first update
		wantEnabled bool
	}{
		{"disabled", false, false, false},
		{"check refuses", true, false, true},
		{"update fails, then the next call disables it", false, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tf := newFleet(t, 5*time.Second)
			ctx := context.Background()
			base := tf.info(t, "p256")
			made, err := tf.p.NewVersion(ctx, "p256", "p256-v2")
			if err != nil {
				t.Fatal(err)
			}
			enabled := func() bool {
				vs := tf.kv.Versions("ec-p256")
				if len(vs) != 2 {
					t.Fatalf("%d versions of the vault key, want 2", len(vs))
				}
				var on bool
				tf.kv.Update(func() { on = vs[1].Enabled })
				return on
			}
			if tc.failFirst {
				tf.kv.Update(func() { tf.kv.UpdateStatus = http.StatusForbidden })
			}
			var checked providers.KeyInfo
			err = tf.p.DestroyKey(ctx, "p256-v2", func(info providers.KeyInfo) error {
				checked = info
				if tc.refuse {
					return errKept
				}
				return nil
			})
			if checked.KID != made.KID {
				t.Fatalf("check saw kid %q, want the new version's %s", checked.KID, made.KID)
			}
			if tc.failFirst {
				if err == nil || errors.Is(err, providers.ErrNotFound) {
					t.Fatalf("DestroyKey with the vault refusing: %v, want its error", err)
				}
				if !enabled() {
					t.Fatal("the version is disabled after a refused update")
				}
				tf.kv.Update(func() { tf.kv.UpdateStatus = 0 })
				err = tf.p.DestroyKey(ctx, "p256-v2", func(providers.KeyInfo) error { return nil })
			}
			if tc.refuse && !errors.Is(err, errKept) || !tc.refuse && err != nil {
				t.Fatalf("DestroyKey: %v", err)
			}
			if on := enabled(); on != tc.wantEnabled {
				t.Fatalf("the attempt's version is enabled: %v, want %v", on, tc.wantEnabled)
			}
			d := randomDigest(crypto.SHA256)
			sig, err := tf.p.Sign(ctx, "p256-v2", algES256, d)
			if tc.wantEnabled {
				if err != nil {
					t.Fatalf("the kept version: %v", err)
				}
				if err := providers.Verify(made.Public, algES256, d, sig); err != nil {
					t.Fatalf("the kept version's signature: %v", err)
				}
			} else if !errors.Is(err, providers.ErrNotFound) {
				t.Fatalf("Sign with the disabled version: %v, want ErrNotFound (not served)", err)
			}
			if sig, err = tf.p.Sign(ctx, "p256", algES256, d); err != nil {
				t.Fatal(err)
			}
			if err := providers.Verify(base.Public, algES256, d, sig); err != nil {
				t.Fatalf("the base version's signature: %v", err)
			}
			if !tc.wantEnabled {
				err := tf.p.DestroyKey(ctx, "p256-v2", func(providers.KeyInfo) error { return nil })
				if !errors.Is(err, providers.ErrNotFound) {
					t.Fatalf("DestroyKey again: %v, want ErrNotFound", err)
				}
			}
		})
	}
}

// A name the provider made no version under since it started is not said
// to be absent: the version may exist. check is not called.
func TestDestroyKeyOfAnUnknownName(t *testing.T) {
	tf := newFleet(t, 5*time.Second)
	err := tf.p.DestroyKey(context.Background(), "p256-v9", func(providers.KeyInfo) error {
		t.Fatal("check called for a name the provider does not know")
		return nil
	})
	if !errors.Is(err, providers.ErrUnavailable) || errors.Is(err, providers.ErrNotFound) {
		t.Fatalf("DestroyKey of an unknown name: %v, want ErrUnavailable, not ErrNotFound", err)
	}
}
