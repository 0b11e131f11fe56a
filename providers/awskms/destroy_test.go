package awskms

import (
	"context"
	"crypto"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"

	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/awskms/awskmstest"
)

// DestroyKey (rotation.KeyDestroyer) schedules for deletion the key
// NewVersion made for a rotation attempt that never cut over: before, a
// failed attempt left its key enabled, billed, one more per retry. A key
// check refuses (a slot's version), or that an alias names, stays enabled
// and served; a deletion carried out whose answer was lost (the SDK's
// retry is then refused) is done; one the service refused leaves the key
// unserved and is done by the next call; the base key signs on.
func TestDestroyKey(t *testing.T) {
	errKept := errors.New("a version of a slot")
	for _, tc := range []struct {
		name      string
		refuse    bool   // check refuses the key
		alias     bool   // an operator's alias names the new key
		fault     fault  // how ScheduleKeyDeletion fails the first call
		wantState string // the new key's state in the end
	}{
		{"scheduled for deletion", false, false, noFault, string(types.KeyStatePendingDeletion)},
		{"check refuses", true, false, noFault, string(types.KeyStateEnabled)},
		{"an alias names it", false, true, noFault, string(types.KeyStateEnabled)},
		{"carried out, answer lost", false, false, faultApplied5xx, string(types.KeyStatePendingDeletion)},
		{"refused, then the next call schedules it", false, false, faultRefused5xx, string(types.KeyStatePendingDeletion)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tf := newFleet(t, 0)
			ctx := context.Background()
			base := tf.info(t, "p256")
			made, err := tf.p.NewVersion(ctx, "p256", "p256-v2")
			if err != nil {
				t.Fatal(err)
			}
			arn, err := tf.p.URI("p256-v2")
			if err != nil {
				t.Fatal(err)
			}
			if tc.alias {
				awskmstest.CreateAlias(t, tf.admin, "alias/operators", arn)
			}
			tf.tr.faults.Store("ScheduleKeyDeletion", tc.fault)
			var checked providers.KeyInfo
			err = tf.p.DestroyKey(ctx, "p256-v2", func(info providers.KeyInfo) error {
				checked = info
				if tc.refuse {
					return errKept
				}
				return nil
			})
			if tc.alias {
				if err == nil || checked.KID != "" {
					t.Fatalf("DestroyKey of a key an alias names: %v, check called: %v", err, checked.KID != "")
				}
			} else if checked.KID != made.KID {
				t.Fatalf("check saw kid %q, want the new key's %s", checked.KID, made.KID)
			}
			if tc.fault == faultRefused5xx {
				if err == nil || errors.Is(err, providers.ErrNotFound) {
					t.Fatalf("DestroyKey with the service refusing: %v, want its error", err)
				}
				if st := awskmstest.DescribeKey(t, tf.admin, arn).KeyState; st != types.KeyStateEnabled {
					t.Fatalf("after a refused deletion the key is %s", st)
				}
				tf.tr.faults.Store("ScheduleKeyDeletion", noFault)
				err = tf.p.DestroyKey(ctx, "p256-v2", func(providers.KeyInfo) error { return nil })
			}
			kept := tc.wantState == string(types.KeyStateEnabled)
			switch {
			case tc.refuse && !errors.Is(err, errKept), !kept && err != nil:
				t.Fatalf("DestroyKey: %v", err)
			}
			md := awskmstest.DescribeKey(t, tf.admin, arn)
			if string(md.KeyState) != tc.wantState {
				t.Fatalf("the attempt's key is %s, want %s", md.KeyState, tc.wantState)
			}
			if !kept && md.DeletionDate == nil {
				t.Fatal("a key pending deletion with no deletion date")
			}
			d := randomDigest(crypto.SHA256)
			sig, err := tf.p.Sign(ctx, "p256-v2", algES256, d)
			if kept {
				if err != nil {
					t.Fatalf("the kept key: %v", err)
				}
				if err := providers.Verify(made.Public, algES256, d, sig); err != nil {
					t.Fatalf("the kept key's signature: %v", err)
				}
			} else if !errors.Is(err, providers.ErrNotFound) {
				t.Fatalf("Sign with the deleted key: %v, want ErrNotFound (not served)", err)
			}
			if sig, err = tf.p.Sign(ctx, "p256", algES256, d); err != nil {
				t.Fatal(err)
			}
			if err := providers.Verify(base.Public, algES256, d, sig); err != nil {
				t.Fatalf("the base key's signature: %v", err)
			}
			if st := awskmstest.DescribeKey(t, tf.admin, tf.ids["p256"]).KeyState; st != types.KeyStateEnabled {
				t.Fatalf("the base key is %s", st)
			}
			if !kept {
				err := tf.p.DestroyKey(ctx, "p256-v2", func(providers.KeyInfo) error { return nil })
				if !errors.Is(err, providers.ErrNotFound) {
					t.Fatalf("DestroyKey again: %v, want ErrNotFound", err)
				}
			}
		})
	}
}

// NewVersion moves the alias a slot's key was configured by to the new
// key at once, before the attempt's CSR and canaries. DestroyKey used to
// keep that key because the alias named it: the alias's users signed with
// a key the slot never cut over to, enabled for good. Now the alias moves
// back to the key it named before and the key is scheduled for deletion,
// and the next NewVersion moves the alias again. An alias someone else
// moved, or one this provider did not move, is left alone, the key kept.
// A move back that fails keeps the key, and the next call finishes it.
func TestDestroyKeyMovesTheAliasBack(t *testing.T) {
	const alias = "alias/rotating"
	for _, tc := range []struct {
		name    string
		destroy string // the name DestroyKey is given
		moved   bool   // someone else moves the alias after NewVersion
		faultOp string // the operation that fails in the first DestroyKey
		fault   fault
		stale   bool   // and DescribeKey answers the base key (a stale read)
		kept    bool   // the first DestroyKey keeps the key
		aliasAt string // where the alias is after it: "base", "new" or "other"
	}{
		{name: "moved back", destroy: "by-alias-v2", aliasAt: "base"},
		// A read showing the base key proves nothing: a stale one shows it
		// too. So a move back whose answers were lost keeps the key, and
		// the next call, whose update is answered, finishes it.
		{name: "moved back, the answers lost, then done", destroy: "by-alias-v2", faultOp: "UpdateAlias", fault: faultApplied5xx, kept: true, aliasAt: "base"},
		{name: "the move back refused, then done", destroy: "by-alias-v2", faultOp: "UpdateAlias", fault: faultRefused5xx, kept: true, aliasAt: "new"},
		{name: "the move back refused, a stale read showing the base key", destroy: "by-alias-v2", faultOp: "UpdateAlias", fault: faultRefused5xx, stale: true, kept: true, aliasAt: "new"},
		{name: "moved back, the deletion refused, then done", destroy: "by-alias-v2", faultOp: "ScheduleKeyDeletion", fault: faultRefused5xx, kept: true, aliasAt: "base"},
		{name: "someone else moved the alias", destroy: "by-alias-v2", moved: true, kept: true, aliasAt: "other"},
		{name: "an alias the provider did not move", destroy: "by-alias-2", kept: true, aliasAt: "base"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tf := newFleet(t, 0)
			ctx := context.Background()
			base := aws.ToString(awskmstest.DescribeKey(t, tf.admin, tf.ids["p256"]).Arn)
			awskmstest.CreateAlias(t, tf.admin, alias, base)
			for _, name := range []string{"by-alias", "by-alias-2"} {
				if _, err := tf.p.AddKey(ctx, name, alias); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := tf.p.NewVersion(ctx, "by-alias", "by-alias-v2"); err != nil {
				t.Fatal(err)
			}
			v2, _ := tf.p.URI("by-alias-v2")
			if got := aws.ToString(awskmstest.DescribeKey(t, tf.admin, alias).Arn); got != v2 {
				t.Fatalf("NewVersion left the alias on %s", got)
			}
			moveAlias := func(to string) {
				if _, err := tf.admin.UpdateAlias(ctx, &kms.UpdateAliasInput{AliasName: aws.String(alias), TargetKeyId: aws.String(to)}); err != nil {
					t.Fatal(err)
				}
			}
			destroyed, at := v2, map[string]string{"base": base, "new": v2}
			if tc.destroy == "by-alias-2" {
				// It names the base key, opened through the alias, which
				// this provider did not move there.
				destroyed = base
				moveAlias(base)
			}
			if tc.moved {
				at["other"] = aws.ToString(awskmstest.DescribeKey(t, tf.admin, awskmstest.CreateKey(t, tf.admin, types.KeySpecEccNistP256)).Arn)
				moveAlias(at["other"])
			}
			if tc.faultOp != "" {
				tf.tr.faults.Store(tc.faultOp, tc.fault)
			}
			if tc.stale {
				tf.tr.staleARN = base
				tf.tr.faults.Store("DescribeKey", faultStaleRead)
			}
			err := tf.p.DestroyKey(ctx, tc.destroy, func(providers.KeyInfo) error { return nil })
			if tc.faultOp != "" {
				tf.tr.faults.Store(tc.faultOp, noFault)
			}
			tf.tr.faults.Store("DescribeKey", noFault)
			if tc.kept == (err == nil) {
				t.Fatalf("DestroyKey: %v, want the key kept: %v", err, tc.kept)
			}
			if inUse := tc.kept && tc.fault == noFault && !tc.moved; errors.Is(err, providers.ErrInUse) != inUse {
				// An alias someone uses keeps the key for good (the rotator
				// does not try again); a failed call, or an alias found
				// elsewhere (maybe a stale read), keeps it for a retry.
				t.Fatalf("DestroyKey: %v; want ErrInUse: %v", err, inUse)
			}
			if got := aws.ToString(awskmstest.DescribeKey(t, tf.admin, alias).Arn); got != at[tc.aliasAt] {
				t.Fatalf("the alias names %s, want the %s key %s", got, tc.aliasAt, at[tc.aliasAt])
			}
			st := awskmstest.DescribeKey(t, tf.admin, destroyed).KeyState
			if want := map[bool]types.KeyState{true: types.KeyStateEnabled, false: types.KeyStatePendingDeletion}[tc.kept]; st != want {
				t.Fatalf("the key DestroyKey was given is %s, want %s", st, want)
			}
			if tc.fault == faultRefused5xx || tc.fault == faultApplied5xx {
				// What the next attempt's start does.
				if err := tf.p.DestroyKey(ctx, tc.destroy, func(providers.KeyInfo) error { return nil }); err != nil {
					t.Fatalf("DestroyKey again: %v", err)
				}
				if got := aws.ToString(awskmstest.DescribeKey(t, tf.admin, alias).Arn); got != base {
					t.Fatalf("after the second DestroyKey the alias names %s, want the base key %s", got, base)
				}
				if st := awskmstest.DescribeKey(t, tf.admin, v2).KeyState; st != types.KeyStatePendingDeletion {
					t.Fatalf("after the second DestroyKey the new key is %s", st)
				}
			}
			if awskmstest.DescribeKey(t, tf.admin, base).KeyState != types.KeyStateEnabled {
				t.Fatal("the base key is not enabled")
			}
			d := randomDigest(crypto.SHA256)
			sig, err := tf.p.Sign(ctx, "by-alias", algES256, d)
			if err != nil {
				t.Fatal(err)
			}
			if err := providers.Verify(tf.info(t, "by-alias").Public, algES256, d, sig); err != nil {
				t.Fatalf("the base key's signature: %v", err)
			}
			if tc.kept && tc.fault == noFault {
				return
			}
			// The base key got the alias back: its next version takes it.
			if _, err := tf.p.NewVersion(ctx, "by-alias", "by-alias-v3"); err != nil {
				t.Fatal(err)
			}
			v3, _ := tf.p.URI("by-alias-v3")
			if got := aws.ToString(awskmstest.DescribeKey(t, tf.admin, alias).Arn); got != v3 {
				t.Fatalf("after the next NewVersion the alias names %s, want the new key %s", got, v3)
			}
		})
	}
}

// A name the provider made no key under since it started is not said to
// be absent: the key may exist. check is not called.
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

// ListAliases may answer fewer aliases than its Limit, none at all, and
// say Truncated: more may follow (NextMarker). An empty page that says so
// used to read as "no alias", and the key an alias names on a later page
// was scheduled for deletion. Now the pages are followed, a bounded
// number of them; a key whose aliases were not all read is kept.
func TestDestroyKeyReadsEveryAliasPage(t *testing.T) {
	const more = `{"Aliases":[],"Truncated":true,"NextMarker":"m%d"}`
	const last = `{"Aliases":[],"Truncated":false}`
	const named = `{"Aliases":[{"AliasName":"alias/operators","AliasArn":"arn:aws:kms:eu-west-1:111122223333:alias/operators"}],"Truncated":false}`
	for _, tc := range []struct {
		name    string
		pages   func(n int) string // the answer to the n-th request, from 1
		kept    bool
		markers int // requests expected, each after the first with the marker before it
	}{
		{"an alias on the second page", func(n int) string {
			if n == 1 {
				return fmt.Sprintf(more, n)
			}
			return named
		}, true, 2},
		{"no alias on any page", func(n int) string {
			if n < 3 {
				return fmt.Sprintf(more, n)
			}
			return last
		}, false, 3},
		{"truncated with no marker", func(int) string { return `{"Aliases":[],"Truncated":true}` }, true, 1},
		{"truncated past the bound", func(n int) string { return fmt.Sprintf(more, n) }, true, maxAliasPages},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tf := newFleet(t, 0)
			ctx := context.Background()
			if _, err := tf.p.NewVersion(ctx, "p256", "p256-v2"); err != nil {
				t.Fatal(err)
			}
			arn, _ := tf.p.URI("p256-v2")
			var (
				mu      sync.Mutex
				markers []string
			)
			tf.tr.answers.Store("ListAliases", func(body []byte) string {
				var in struct{ KeyId, Marker string }
				if err := json.Unmarshal(body, &in); err != nil || in.KeyId != arn {
					t.Errorf("ListAliases for %q (%v), want the new key's", in.KeyId, err)
				}
				mu.Lock()
				defer mu.Unlock()
				markers = append(markers, in.Marker)
				return tc.pages(len(markers))
			})
			err := tf.p.DestroyKey(ctx, "p256-v2", func(providers.KeyInfo) error { return nil })
			if tc.kept == (err == nil) {
				t.Fatalf("DestroyKey: %v, want the key kept: %v", err, tc.kept)
			}
			want := types.KeyStatePendingDeletion
			if tc.kept {
				want = types.KeyStateEnabled
			}
			if st := awskmstest.DescribeKey(t, tf.admin, arn).KeyState; st != want {
				t.Fatalf("the attempt's key is %s, want %s", st, want)
			}
			mu.Lock()
			defer mu.Unlock()
			if len(markers) != tc.markers {
				t.Fatalf("%d ListAliases requests, want %d", len(markers), tc.markers)
			}
			for i, m := range markers {
				if w := fmt.Sprintf("m%d", i); i > 0 && m != w || i == 0 && m != "" {
					t.Fatalf("request %d sent marker %q, want the one before it", i+1, m)
				}
			}
		})
	}
}
