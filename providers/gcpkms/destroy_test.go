package gcpkms

import (
	"context"
	"crypto"
	"errors"
	"testing"

	"cloud.google.com/go/kms/apiv1/kmspb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/gcpkms/gcpkmstest"
)

// DestroyKey (rotation.KeyDestroyer) schedules the destruction of the
// version NewVersion made for a rotation attempt that never cut over:
// before, a failed attempt left its version ENABLED, the highest one, and
// one more per retry. A version check refuses (a slot's version) stays
// ENABLED and served; a destroy the service refused leaves the version
// unserved and is done by the next call; the base version signs on.
func TestDestroyKey(t *testing.T) {
	errKept := errors.New("a version of a slot")
	for _, tc := range []struct {
		name       string
		refuse     bool // check refuses the version
		failFirst  bool // the first DestroyCryptoKeyVersion calls answer UNAVAILABLE
		wantState  kmspb.CryptoKeyVersion_CryptoKeyVersionState
		wantServed bool
	}{
		{"destroyed", false, false, kmspb.CryptoKeyVersion_DESTROY_SCHEDULED, false},
		{"check refuses", true, false, kmspb.CryptoKeyVersion_ENABLED, true},
		{"destroy fails, then the next call destroys it", false, true, kmspb.CryptoKeyVersion_DESTROY_SCHEDULED, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tf := newFleet(t, 0)
			ctx := context.Background()
			base := tf.info(t, "p256")
			made, err := tf.p.NewVersion(ctx, "p256", "p256-v2")
			if err != nil {
				t.Fatal(err)
			}
			v2 := gcpkmstest.VersionName("p256", "2")
			if tc.failFirst {
				v, _ := tf.kms.Lookup(v2)
				tf.kms.Update(func() { v.DestroyErr, v.DestroyErrs = status.Error(codes.Unavailable, "injected"), 3 })
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
					t.Fatalf("DestroyKey with the service refusing: %v, want its error", err)
				}
				if st := versionNow(t, tf.kms, v2).State; st != kmspb.CryptoKeyVersion_ENABLED {
					t.Fatalf("after a failed destroy the version is %s", st)
				}
				err = tf.p.DestroyKey(ctx, "p256-v2", func(providers.KeyInfo) error { return nil })
			}
			if tc.refuse && !errors.Is(err, errKept) || !tc.refuse && err != nil {
				t.Fatalf("DestroyKey: %v", err)
			}
			if st := versionNow(t, tf.kms, v2).State; st != tc.wantState {
				t.Fatalf("the attempt's version is %s, want %s", st, tc.wantState)
			}
			d := randomDigest(crypto.SHA256)
			sig, err := tf.p.Sign(ctx, "p256-v2", algES256, d)
			if served := err == nil; served != tc.wantServed {
				t.Fatalf("the attempt's version after DestroyKey: served %v (%v), want %v", served, err, tc.wantServed)
			}
			if tc.wantServed {
				if err := providers.Verify(made.Public, algES256, d, sig); err != nil {
					t.Fatalf("the kept version's signature: %v", err)
				}
			} else if !errors.Is(err, providers.ErrNotFound) {
				t.Fatalf("Sign with the destroyed version: %v, want ErrNotFound", err)
			}
			if sig, err = tf.p.Sign(ctx, "p256", algES256, d); err != nil {
				t.Fatal(err)
			}
			if err := providers.Verify(base.Public, algES256, d, sig); err != nil {
				t.Fatalf("the base version's signature: %v", err)
			}
			if st := versionNow(t, tf.kms, gcpkmstest.VersionName("p256", "1")).State; st != kmspb.CryptoKeyVersion_ENABLED {
				t.Fatalf("the base version is %s", st)
			}
			if !tc.wantServed {
				err := tf.p.DestroyKey(ctx, "p256-v2", func(providers.KeyInfo) error { return nil })
				if !errors.Is(err, providers.ErrNotFound) {
					t.Fatalf("DestroyKey again: %v, want ErrNotFound", err)
				}
			}
		})
	}
}

// A name the provider made no version under since it started (the attempt
// died before its version, or made it before a restart) is not said to be
// absent: the version may exist, and the error must not let the rotation
// record it as not there. check is not called.
func TestDestroyKeyOfAnUnknownName(t *testing.T) {
	tf := newFleet(t, 0)
	err := tf.p.DestroyKey(context.Background(), "p256-v9", func(providers.KeyInfo) error {
		t.Fatal("check called for a name the provider does not know")
		return nil
	})
	if !errors.Is(err, providers.ErrUnavailable) || errors.Is(err, providers.ErrNotFound) {
		t.Fatalf("DestroyKey of an unknown name: %v, want ErrUnavailable, not ErrNotFound", err)
	}
}
