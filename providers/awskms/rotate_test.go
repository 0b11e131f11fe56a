package awskms

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"

	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/awskms/awskmstest"
	"github.com/sigil-agent/sigil/providers/providertest"
)

func TestNewVersionByAlias(t *testing.T) {
	ctx := context.Background()
	endpoint := awskmstest.Start(t)
	admin := awskmstest.Client(endpoint)
	oldID := awskmstest.CreateKey(t, admin, types.KeySpecEccNistP256)
	const alias = "alias/sigil-rotating"
	awskmstest.CreateAlias(t, admin, alias, oldID)
	oldARN := aws.ToString(awskmstest.DescribeKey(t, admin, oldID).Arn)

	p, err := Open(ctx, testConfig(endpoint, nil, 0, KeyConfig{Name: "signing", KeyID: alias}))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	old, _ := p.keys.Get("signing")
	oldInfo := old.info

	info, err := p.NewVersion(ctx, "signing", "signing-v2")
	if err != nil {
		t.Fatal(err)
	}
	if info.Name != "signing-v2" || info.Type != providers.KeyECDSAP256 {
		t.Fatalf("new version: name %q type %s", info.Name, info.Type)
	}
	if info.KID == oldInfo.KID {
		t.Fatalf("new version has the old kid %s", info.KID)
	}
	digest := randomDigest(crypto.SHA256)
	sig, err := p.Sign(ctx, "signing-v2", algES256, digest)
	if err != nil {
		t.Fatal(err)
	}
	if err := providers.Verify(info.Public, algES256, digest, sig); err != nil {
		t.Fatalf("new version's signature does not verify: %v", err)
	}
	// The old version is still served, with its own key.
	sig, err = p.Sign(ctx, "signing", algES256, digest)
	if err != nil {
		t.Fatal(err)
	}
	if err := providers.Verify(oldInfo.Public, algES256, digest, sig); err != nil {
		t.Fatalf("old version's signature does not verify: %v", err)
	}

	newARN, err := p.URI("signing-v2")
	if err != nil {
		t.Fatal(err)
	}
	if newARN == oldARN || newARN == "" {
		t.Fatalf("URI of the new version = %q (old key %q)", newARN, oldARN)
	}
	if got, err := p.URI("signing"); err != nil || got != oldARN {
		t.Fatalf("URI of the old version = %q, %v; want %q", got, err, oldARN)
	}
	if _, err := p.URI("nope"); !errors.Is(err, providers.ErrNotFound) {
		t.Fatalf("URI of an unknown key: %v", err)
	}
	md := awskmstest.DescribeKey(t, admin, alias)
	if got := aws.ToString(md.Arn); got != newARN {
		t.Fatalf("alias resolves to %s, want the new key %s", got, newARN)
	}
	if md.KeySpec != types.KeySpecEccNistP256 || md.KeyUsage != types.KeyUsageTypeSignVerify {
		t.Fatalf("new key: spec %s usage %s", md.KeySpec, md.KeyUsage)
	}
	if len(p.Algorithms("signing-v2")) == 0 {
		t.Fatal("new version has no algorithms")
	}
	keys, _ := p.Keys(ctx)
	if len(keys) != 2 || keys[0].Name != "signing" || keys[1].Name != "signing-v2" {
		t.Fatalf("Keys = %v", keys)
	}

	// Restart: a fresh provider serves the version again from its ARN.
	p2, err := Open(ctx, testConfig(endpoint, nil, 0, KeyConfig{Name: "signing", KeyID: oldARN}))
	if err != nil {
		t.Fatal(err)
	}
	defer p2.Close()
	again, err := p2.AddKey(ctx, "signing-v2", newARN)
	if err != nil {
		t.Fatal(err)
	}
	if again.KID != info.KID {
		t.Fatalf("AddKey kid %s, want %s", again.KID, info.KID)
	}
	if again2, err := p2.AddKey(ctx, "signing-v2", newARN); err != nil || again2.KID != info.KID {
		t.Fatalf("AddKey again: %v, %v", again2.KID, err)
	}
	if _, err := p2.AddKey(ctx, "signing-v2", oldARN); err == nil {
		t.Fatal("AddKey of another key under a served name succeeded")
	}
	sig, err = p2.Sign(ctx, "signing-v2", algES256, digest)
	if err != nil {
		t.Fatal(err)
	}
	if err := providers.Verify(again.Public, algES256, digest, sig); err != nil {
		t.Fatalf("re-added version's signature does not verify: %v", err)
	}
}

func TestNewVersionRefuses(t *testing.T) {
	tf := newFleet(t, 0)
	ctx := context.Background()
	if _, err := tf.p.NewVersion(ctx, "nope", "nope-v2"); !errors.Is(err, providers.ErrNotFound) {
		t.Fatalf("NewVersion of an unknown key: %v", err)
	}
	if _, err := tf.p.NewVersion(ctx, "p256", "p384"); err == nil {
		t.Fatal("NewVersion under a served name succeeded")
	}
	// A key configured by id, not alias: a new key, no alias touched.
	info, err := tf.p.NewVersion(ctx, "rsa", "rsa-v2")
	if err != nil {
		t.Fatal(err)
	}
	if info.Type != providers.KeyRSA2048 {
		t.Fatalf("new version type %s", info.Type)
	}
	tf.p.Close()
	if _, err := tf.p.NewVersion(ctx, "p256", "p256-v2"); !errors.Is(err, providers.ErrUnavailable) {
		t.Fatalf("NewVersion after Close: %v", err)
	}
}

// A failed UpdateAlias may have been applied all the same, and a read of
// the alias just after may still show the key it named before (KMS is
// eventually consistent). NewVersion schedules the new key for deletion
// only when KMS answered the update with a 4xx: a key pending deletion
// behind the alias would break every user of the alias, and the agent's
// next start. Otherwise it sends the update again, and leaves the new key
// in place unless that or a read-back shows the alias on it.
func TestNewVersionAliasUpdateFaults(t *testing.T) {
	const timeout = time.Second
	ctx := context.Background()
	endpoint := awskmstest.Start(t)
	admin := awskmstest.Client(endpoint)
	for i, tc := range []struct {
		name        string
		update      fault // of UpdateAlias
		readBack    fault // of DescribeKey, which reads the alias back
		wantErr     bool
		aliasOnNew  bool // the alias names the new key afterwards, else the old one
		newDeleting bool // the new key is pending deletion afterwards
	}{
		{"applied, answer a 5xx", faultApplied5xx, noFault, false, true, false},
		{"applied, answer lost", faultAppliedLost, noFault, false, true, false},
		{"refused with a 4xx", faultThrottled, noFault, true, false, true},
		{"not applied, a 5xx", faultRefused5xx, noFault, true, false, false},
		{"applied, read back stale", faultApplied5xx, faultStaleRead, true, true, false},
		// The read-back sees the old key because the update has not been
		// applied yet; KMS applies it after.
		{"applied after the read-back", faultAppliedLate, noFault, true, true, false},
		// The 4xx answers a second attempt, after the first was applied:
		// it proves nothing about the alias.
		{"applied, then a throttled attempt", faultAppliedThenThrottled, noFault, false, true, false},
		{"applied, alias unreadable", faultApplied5xx, faultRefused5xx, true, true, false},
		{"not applied, alias unreadable", faultRefused5xx, faultRefused5xx, true, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			alias := fmt.Sprintf("alias/sigil-fault-%d", i)
			oldID := awskmstest.CreateKey(t, admin, types.KeySpecEccNistP256)
			awskmstest.CreateAlias(t, admin, alias, oldID)
			oldARN := aws.ToString(awskmstest.DescribeKey(t, admin, oldID).Arn)
			tr := &transport{staleARN: oldARN}
			p, err := Open(ctx, testConfig(endpoint, tr, timeout, KeyConfig{Name: "signing", KeyID: alias}))
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			oldInfo := providertest.KeyInfo(t, p, "signing")
			tr.faults.Store("UpdateAlias", tc.update)
			tr.faults.Store("DescribeKey", tc.readBack)

			before := keyARNs(t, admin)
			info, err := p.NewVersion(ctx, "signing", "signing-v2")
			var newARN string
			for arn := range keyARNs(t, admin) {
				if !before[arn] {
					newARN = arn
				}
			}
			if newARN == "" {
				t.Fatal("NewVersion created no key")
			}

			if tc.wantErr {
				if err == nil {
					t.Fatal("NewVersion succeeded")
				}
				if !(errors.Is(err, providers.ErrUnavailable) || errors.Is(err, providers.ErrRateLimited)) || strings.Contains(err.Error(), "injected fault") {
					t.Fatalf("err = %v, want ErrUnavailable or ErrRateLimited without the server's text", err)
				}
				if _, uerr := p.URI("signing-v2"); uerr == nil {
					t.Fatal("the failed version is served")
				}
				if !tc.newDeleting && (!strings.Contains(err.Error(), newARN) || !strings.Contains(err.Error(), "not scheduled for deletion")) {
					t.Errorf("err = %v, want it to name the kept key %s", err, newARN)
				}
			} else if err != nil {
				t.Errorf("NewVersion: %v", err) // and where the alias and the key are, below
			} else {
				if got, _ := p.URI("signing-v2"); got != newARN {
					t.Fatalf("signing-v2 serves %s, want the new key %s", got, newARN)
				}
				digest := randomDigest(crypto.SHA256)
				sig, err := p.Sign(ctx, "signing-v2", algES256, digest)
				if err != nil {
					t.Fatal(err)
				}
				if err := providers.Verify(info.Public, algES256, digest, sig); err != nil {
					t.Fatalf("new version's signature does not verify: %v", err)
				}
			}

			wantTarget := oldARN
			if tc.aliasOnNew {
				wantTarget = newARN
			}
			if got := aws.ToString(awskmstest.DescribeKey(t, admin, alias).Arn); got != wantTarget {
				t.Errorf("alias names %s, want %s (old %s, new %s)", got, wantTarget, oldARN, newARN)
			}
			wantState := types.KeyStateEnabled
			if tc.newDeleting {
				wantState = types.KeyStatePendingDeletion
			}
			if got := awskmstest.DescribeKey(t, admin, newARN).KeyState; got != wantState {
				t.Errorf("new key is %s, want %s", got, wantState)
			}

			// Wherever the alias ended, the old version signs with the old
			// key: Sign names the ARN, never the alias.
			if got, _ := p.URI("signing"); got != oldARN {
				t.Errorf("signing serves %s, want the old key %s", got, oldARN)
			}
			digest := randomDigest(crypto.SHA256)
			sig, err := p.Sign(ctx, "signing", algES256, digest)
			if err != nil {
				t.Fatal(err)
			}
			if err := providers.Verify(oldInfo.Public, algES256, digest, sig); err != nil {
				t.Errorf("the old version's signature does not verify with its key: %v", err)
			}
		})
	}
}

// A CreateKey that fails is reported by what failed: throttling as
// RATE_LIMITED, a 5xx as UNAVAILABLE (its context was cancelled before the
// error was classified, so every one read as a deadline passed). And it is
// sent once: not idempotent, a CreateKey carried out but answered 5xx and
// retried made a key per attempt, none of them served or deleted.
func TestNewVersionCreateKeyFaults(t *testing.T) {
	ctx := context.Background()
	endpoint := awskmstest.Start(t)
	admin := awskmstest.Client(endpoint)
	id := awskmstest.CreateKey(t, admin, types.KeySpecEccNistP256)
	for _, tc := range []struct {
		name     string
		f        fault
		want     error
		newKeys  int
		requests int64
	}{
		{"throttled", faultThrottled, providers.ErrRateLimited, 0, 1},
		{"refused, 5xx", faultRefused5xx, providers.ErrUnavailable, 0, 1},
		{"carried out, answered 5xx", faultApplied5xx, providers.ErrUnavailable, 1, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr := &transport{}
			p, err := Open(ctx, testConfig(endpoint, tr, 5*time.Second, KeyConfig{Name: "signing", KeyID: id}))
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			tr.faults.Store("CreateKey", tc.f)
			before := keyARNs(t, admin)
			_, err = p.NewVersion(ctx, "signing", "signing-v2")
			if !errors.Is(err, tc.want) || errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("NewVersion: %v; want %v", err, tc.want)
			}
			if n := tr.injected.Load(); n != tc.requests {
				t.Errorf("CreateKey sent %d times, want %d", n, tc.requests)
			}
			made := 0
			for arn := range keyARNs(t, admin) {
				if !before[arn] {
					made++
				}
			}
			if made != tc.newKeys {
				t.Errorf("%d keys made, want %d", made, tc.newKeys)
			}
		})
	}
}

// keyARNs returns the ARNs of every key in the emulator.
func keyARNs(t *testing.T, admin *kms.Client) map[string]bool {
	t.Helper()
	arns := map[string]bool{}
	pages := kms.NewListKeysPaginator(admin, &kms.ListKeysInput{})
	for pages.HasMorePages() {
		page, err := pages.NextPage(context.Background())
		if err != nil {
			t.Fatalf("list keys: %v", err)
		}
		for _, k := range page.Keys {
			arns[aws.ToString(k.KeyArn)] = true
		}
	}
	return arns
}
