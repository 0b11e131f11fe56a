package agent

import (
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/sigil-agent/sigil/policy"
	"github.com/sigil-agent/sigil/proto"
)

// A Sign that resolved its slot's key under one policy and reaches the
// policy's check after a reload that gave the slot another key is refused:
// it was checked under the new policy and would have signed with the old
// one's key, a mix of the two (docs/policy.md: "never a mix"), with a key
// the reload may have handed to another tenant. Without rotation (journal
// off) the file's key is what signs; with it the rotation state decides
// and stillActive already holds the version.
func TestSignResolvedBeforeAReloadSignsWithTheNewPolicysKey(t *testing.T) {
	uid := os.Getuid()
	policyText := func(paymentsKey, shopKey string) string {
		return fmt.Sprintf(`
tenants:
  - name: payments
    identities: {unix_uids: [%d]}
    slots:
      - {name: release, key: %s}
  - name: shop
    identities: {unix_uids: [%d]}
    slots:
      - {name: release, key: %s}
`, uid, paymentsKey, uid+1, shopKey)
	}
	tests := []struct {
		name      string
		reloaded  string // the policy in force at the check
		req       proto.Request
		wantCode  proto.Code // OK: signs with the key of payments/release in force
		wantKeyOK string     // the key that must sign when allowed
	}{
		{"reload changes nothing", policyText("default", "p384"),
			proto.Request{Key: "release"}, proto.OK, "default"},
		{"the key moves to another tenant", policyText("p384", "default"),
			proto.Request{Key: "release"}, proto.Unavailable, ""},
		{"the key moves to another tenant, named by kid", policyText("p384", "default"),
			proto.Request{}, proto.Unavailable, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := ParseConfig([]byte(`
journal: {mode: "off"}
providers:
  - id: soft
    type: software
    keys:
      - {name: default, type: ecdsa-p256}
      - {name: p384, type: ecdsa-p384}
`))
			if err != nil {
				t.Fatal(err)
			}
			dir := t.TempDir()
			cfg.DataDir = filepath.Join(dir, "state")
			cfg.Policy = filepath.Join(dir, "policy.yaml")
			if err := os.WriteFile(cfg.Policy, []byte(policyText("default", "p384")), 0o600); err != nil {
				t.Fatal(err)
			}
			a, err := New(context.Background(), cfg, zaptest.NewLogger(t))
			if err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			defer a.Shutdown(ctx)
			srv, cli := net.Pipe()
			defer srv.Close()
			defer cli.Close()
			c := newConn(a, srv, false)
			c.helloDone = true
			c.peer = peer{unix: true, uid: uint32(uid), gid: uint32(os.Getgid())}
			c.peerName = c.peer.String()
			digest := sha256.Sum256([]byte("checked under the reloaded policy"))
			req := tc.req
			req.ID, req.Op, req.Scheme, req.Hash, req.Digest = 1, proto.OpSign, proto.SchemeECDSA, proto.HashSHA256, digest[:]
			if req.Key == "" {
				req.KID = a.keys.entry("default").info.KID
			}

			// The first half of decideAndSign: the slot's key is resolved.
			target, tenant, err := c.resolve(req.Key, req.KID, false)
			if err != nil {
				t.Fatal(err)
			}
			old := target.key
			if err := os.WriteFile(cfg.Policy, []byte(tc.reloaded), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := a.ReloadPolicy(); err != nil {
				t.Fatal(err)
			}
			d := signDecision{start: time.Now(), keyName: req.Key, digest: req.Digest, tenant: tenant, target: target}
			var fence policy.Decision
			sig, err := c.decideResolved(ctx, &req, &d, &fence)
			fence.Done()
			if code := codeOf(err); code != tc.wantCode {
				verdict := ""
				if err == nil && ecdsa.VerifyASN1(old.info.Public.(*ecdsa.PublicKey), digest[:], sig) {
					verdict = fmt.Sprintf(": a signature by %q, which the policy in force gives to %s", old.info.Name, "shop")
				}
				t.Fatalf("err = %v (%s), want %s%s", err, code, tc.wantCode, verdict)
			}
			if tc.wantCode == proto.OK {
				pub := a.keys.entry(tc.wantKeyOK).info.Public.(*ecdsa.PublicKey)
				if !ecdsa.VerifyASN1(pub, digest[:], sig) {
					t.Fatalf("not signed by %s", tc.wantKeyOK)
				}
			}
		})
	}
}
