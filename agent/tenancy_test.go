package agent_test

import (
	"context"
	"crypto"
	"crypto/sha256"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	sshagentclient "golang.org/x/crypto/ssh/agent"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/agent/devcerts"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

// twoTenants: payments is this test process's uid (Unix) and a SPIFFE ID
// (mTLS); billing is another SPIFFE ID. The admin is this uid.
func twoTenants(uid int, billingMTLS string) string {
	return fmt.Sprintf(`
admins:
  unix_uids: [%d]
  mtls: ["spiffe://example.org/ops"]
tenants:
  - name: payments
    identities:
      unix_uids: [%d]
      mtls: ["spiffe://example.org/payments"]
    slots:
      - name: release
        key: default
        policy:
          algorithms: [ecdsa-sha256]
  - name: billing
    identities:
      mtls: [%q]
    slots:
      - name: invoice
        key: ed
`, uid, uid, billingMTLS)
}

type tenancySetup struct {
	*tlsSetup
	policyFile string
	admin      string
}

func startTenancy(t *testing.T) *tenancySetup {
	t.Helper()
	s := &tenancySetup{tlsSetup: &tlsSetup{dir: t.TempDir()}}
	var err error
	if s.ca, err = devcerts.NewCA("tenancy CA"); err != nil {
		t.Fatal(err)
	}
	srv, _ := s.ca.Issue(devcerts.Leaf{CommonName: "agent", IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, Server: true})
	cfg := softwareConfig(t)
	cfg.DefaultKey = ""
	cfg.TCP.CertFile, cfg.TCP.KeyFile, _ = srv.Write(s.dir, "server")
	cfg.TCP.ClientCAFile, _ = s.ca.WriteCert(s.dir, "ca")
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	s.addr = ln.Addr().String()
	ln.Close()
	cfg.TCP.Listen = s.addr
	s.policyFile = filepath.Join(s.dir, "policy.yaml")
	os.WriteFile(s.policyFile, []byte(twoTenants(os.Getuid(), "spiffe://example.org/billing")), 0o600)
	cfg.Policy = s.policyFile
	cfg.AdminSocket = filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")
	s.admin = cfg.AdminSocket
	s.running = startAgent(t, cfg)
	tln, err := s.running.agent.ListenTLS()
	if err != nil {
		t.Fatal(err)
	}
	go s.running.agent.Serve(tln)
	aln, err := agent.ListenUnix(cfg.AdminSocket)
	if err != nil {
		t.Fatal(err)
	}
	go s.running.agent.ServeAdmin(aln)
	return s
}

func (s *tenancySetup) tenantClient(t *testing.T, spiffe string) (*client.Client, error) {
	cert, _ := s.ca.Issue(devcerts.Leaf{CommonName: "c", URIs: []string{spiffe}})
	return s.dial(t, cert)
}

func TestTenantIsolation(t *testing.T) {
	s := startTenancy(t)
	payUnix := s.running.dial(t)
	payTLS, err := s.tenantClient(t, "spiffe://example.org/payments")
	if err != nil {
		t.Fatal(err)
	}
	billing, err := s.tenantClient(t, "spiffe://example.org/billing")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	d := sha256.Sum256([]byte("tenant payload"))
	billingKeys, _ := billing.ListKeys(ctx)
	if len(billingKeys) != 1 || billingKeys[0].Name != "invoice" {
		t.Fatalf("billing sees %+v", billingKeys)
	}
	invoiceKID := billingKeys[0].KID

	for name, c := range map[string]*client.Client{"payments over Unix": payUnix, "payments over mTLS": payTLS} {
		t.Run(name, func(t *testing.T) {
			keys, err := c.ListKeys(ctx)
			if err != nil || len(keys) != 1 || keys[0].Name != "release" {
				t.Fatalf("lists %+v, %v", keys, err)
			}
			sig, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:])
			if err != nil {
				t.Fatal(err)
			}
			if len(sig.PolicyHash) != 32 {
				t.Fatalf("no policy hash on the reply: %x", sig.PolicyHash)
			}
			// Everything of billing's is NOT_FOUND, by every route, with
			// the message a missing slot gets.
			_, missing := c.Sign(ctx, client.ByName("no-such-slot"), client.Algorithm{}, d[:])
			for _, ref := range []client.KeyRef{client.ByName("invoice"), client.ByName("billing/invoice"), client.ByKID(invoiceKID)} {
				_, err := c.Sign(ctx, ref, client.Algorithm{}, []byte("m"))
				if client.Code(err) != proto.NotFound {
					t.Fatalf("sign with %+v: %v", ref, err)
				}
				if _, err := c.PublicKey(ctx, ref); client.Code(err) != proto.NotFound {
					t.Fatalf("public key of %+v: %v", ref, err)
				}
				if ok, err := c.Verify(ctx, ref, client.Algorithm{}, []byte("m"), make([]byte, 64)); client.Code(err) != proto.NotFound || ok {
					t.Fatalf("verify with %+v: %v", ref, err)
				}
				// The message only echoes what was asked, as for a missing slot.
				if strings.Contains(err.Error(), "tenant") || strings.Contains(err.Error(), "exist") || strings.Contains(err.Error(), "permission") {
					t.Fatalf("the error hints at another tenant: %v", err)
				}
			}
			if client.Code(missing) != proto.NotFound {
				t.Fatal(missing)
			}
			// Policy: only ECDSA with SHA-256.
			d384 := make([]byte, 48)
			if _, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{Scheme: client.SchemeECDSA, Hash: crypto.SHA384}, d384); client.Code(err) != proto.UnsupportedAlgorithm {
				t.Fatalf("policy allowed sha384: %v", err)
			}
			// Admin operations are not for tenants.
			if _, err := c.Pause(ctx, "billing/invoice"); client.Code(err) != proto.PermissionDenied {
				t.Fatalf("a tenant paused a slot: %v", err)
			}
			if err := c.Rotate(ctx, "billing/invoice"); client.Code(err) != proto.PermissionDenied {
				t.Fatalf("a tenant rotated a slot: %v", err)
			}
		})
	}
	if _, err := billing.Sign(ctx, client.ByName("invoice"), client.Algorithm{}, []byte("bill")); err != nil {
		t.Fatal(err)
	}
	if _, err := billing.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:]); client.Code(err) != proto.NotFound {
		t.Fatalf("billing reached payments' slot: %v", err)
	}
}

func TestUnknownPeersRefused(t *testing.T) {
	s := startTenancy(t)
	if _, err := s.tenantClient(t, "spiffe://example.org/stranger"); client.Code(err) != proto.Unauthenticated {
		t.Fatalf("unmapped certificate: %v", err)
	}
	// The admin socket refuses a tenant's identity... and serves the admin.
	admin, err := client.Dial(context.Background(), s.admin)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	if _, err := admin.Sign(context.Background(), client.ByName("release"), client.Algorithm{}, make([]byte, 32)); client.Code(err) != proto.PermissionDenied {
		t.Fatalf("the admin socket signed: %v", err)
	}
}

func TestAdminPauseResumeReload(t *testing.T) {
	s := startTenancy(t)
	ctx := context.Background()
	admin, err := client.Dial(ctx, s.admin)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	pay := s.running.dial(t)
	billing, _ := s.tenantClient(t, "spiffe://example.org/billing")
	d := sha256.Sum256([]byte("x"))

	if _, err := admin.Pause(ctx, "payments/release"); err != nil {
		t.Fatal(err)
	}
	if _, err := pay.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:]); client.Code(err) != proto.Paused {
		t.Fatalf("paused slot signed: %v", err)
	}
	if _, err := billing.Sign(ctx, client.ByName("invoice"), client.Algorithm{}, []byte("m")); err != nil {
		t.Fatalf("pausing one slot stopped another: %v", err)
	}
	if _, err := admin.Resume(ctx, "payments/release"); err != nil {
		t.Fatal(err)
	}
	if _, err := pay.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:]); err != nil {
		t.Fatalf("after resume: %v", err)
	}
	if _, err := admin.Pause(ctx, "payments/nope"); client.Code(err) != proto.NotFound {
		t.Fatalf("pause of a missing slot: %v", err)
	}

	// A broken policy is refused; the old one stays in force.
	os.WriteFile(s.policyFile, []byte("tenants:\n  - name: BAD NAME\n"), 0o600)
	if _, err := admin.ReloadPolicy(ctx); client.Code(err) != proto.BadRequest || !strings.Contains(err.Error(), "policy.yaml:") {
		t.Fatalf("broken policy: %v", err)
	}
	if _, err := billing.Sign(ctx, client.ByName("invoice"), client.Algorithm{}, []byte("m")); err != nil {
		t.Fatalf("after a refused reload: %v", err)
	}
	// A policy that revokes billing's mapping: billing is refused at once.
	os.WriteFile(s.policyFile, []byte(twoTenants(os.Getuid(), "spiffe://example.org/billing-v2")), 0o600)
	if _, err := admin.ReloadPolicy(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := billing.Sign(ctx, client.ByName("invoice"), client.Algorithm{}, []byte("m")); client.Code(err) != proto.Unauthenticated {
		t.Fatalf("revoked mapping still signs: %v", err)
	}
	if err := billing.Ping(ctx); client.Code(err) != proto.Unauthenticated {
		t.Fatalf("revoked mapping's Ping: %v, want UNAUTHENTICATED", err)
	}
	if _, err := s.tenantClient(t, "spiffe://example.org/billing"); client.Code(err) != proto.Unauthenticated {
		t.Fatalf("revoked mapping connects: %v", err)
	}
	if _, err := s.tenantClient(t, "spiffe://example.org/billing-v2"); err != nil {
		t.Fatalf("new mapping: %v", err)
	}
	// An admin identity on mTLS holds the admin role there.
	ops, err := s.tenantClient(t, "spiffe://example.org/ops")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ops.Pause(ctx, "payments/release"); err != nil {
		t.Fatalf("mTLS admin: %v", err)
	}
	if _, err := pay.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:]); client.Code(err) != proto.Paused {
		t.Fatalf("after the mTLS admin paused: %v", err)
	}
	// SIGHUP's path does the same.
	if err := s.running.agent.Reload(); err != nil {
		t.Fatal(err)
	}
}

// Over mTLS one connection serves every role its identity holds: the
// policy's admins may overlap tenants' identities, and there is no second
// TCP listener for the other role. An admin that is also a tenant member
// used to be served admin operations only, so it could not sign at all.
func TestMTLSAdminThatIsAlsoATenant(t *testing.T) {
	s := startTenancy(t)
	ctx := context.Background()
	both := strings.Replace(twoTenants(os.Getuid(), "spiffe://example.org/billing"),
		`mtls: ["spiffe://example.org/payments"]`, `mtls: ["spiffe://example.org/payments", "spiffe://example.org/ops"]`, 1)
	if err := os.WriteFile(s.policyFile, []byte(both), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.running.agent.Reload(); err != nil {
		t.Fatal(err)
	}
	ops, err := s.tenantClient(t, "spiffe://example.org/ops")
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("both roles"))
	if _, err := ops.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:]); err != nil {
		t.Fatalf("an admin that is a payments member signs over mTLS: %v", err)
	}
	if _, err := ops.Pause(ctx, "payments/release"); err != nil {
		t.Fatalf("and pauses: %v", err)
	}
	if _, err := ops.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:]); client.Code(err) != proto.Paused {
		t.Fatalf("its own Sign after its pause: %v, want PAUSED", err)
	}
	// A tenant member without the role gets no admin operation.
	pay, err := s.tenantClient(t, "spiffe://example.org/payments")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pay.Resume(ctx, "payments/release"); client.Code(err) != proto.PermissionDenied {
		t.Fatalf("resume by a tenant member: %v, want PERMISSION_DENIED", err)
	}
	// The admin role taken away by a reload: the tenant role stays.
	if err := os.WriteFile(s.policyFile, []byte(strings.Replace(both, `mtls: ["spiffe://example.org/ops"]`, `mtls: []`, 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.running.agent.Reload(); err != nil {
		t.Fatal(err)
	}
	if _, err := ops.Resume(ctx, "payments/release"); client.Code(err) != proto.PermissionDenied {
		t.Fatalf("resume after the role was revoked: %v, want PERMISSION_DENIED", err)
	}
	if _, err := ops.ListKeys(ctx); err != nil {
		t.Fatalf("its tenant role after the revocation: %v", err)
	}
}

// A certificate without a URI SAN is known by its CN. A CN written as a
// URI is refused: CNs are free text to many CAs, and one must not pass for
// the SPIFFE ID (or fall under the URI prefix) that a policy names.
func TestCNWrittenAsAURIIsRefused(t *testing.T) {
	s := startTenancy(t)
	for _, cn := range []string{"spiffe://example.org/ops", "spiffe://example.org/payments"} {
		cert, err := s.ca.Issue(devcerts.Leaf{CommonName: cn})
		if err != nil {
			t.Fatal(err)
		}
		if c, err := s.dial(t, cert); err == nil {
			_, perr := c.Pause(context.Background(), "payments/release")
			_, serr := c.ListKeys(context.Background())
			t.Fatalf("CN %q without a URI SAN connected: pause %v, list keys %v", cn, perr, serr)
		}
	}
}

// A reload is taken part by part: with the TLS certificate file broken
// and the policy changed, the policy goes into force and the reply says
// so. It used to say "reload refused, what was in force stays", and an
// operator took a revocation that was in force for one that was not.
func TestReloadRefusedInPartSaysWhatWasTaken(t *testing.T) {
	s := startTenancy(t)
	ctx := context.Background()
	admin, err := client.Dial(ctx, s.admin)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	billing, err := s.tenantClient(t, "spiffe://example.org/billing")
	if err != nil {
		t.Fatal(err)
	}

	os.WriteFile(filepath.Join(s.dir, "server.pem"), []byte("half-written"), 0o600)
	_, err = admin.ReloadPolicy(ctx)
	if client.Code(err) != proto.BadRequest || !strings.Contains(err.Error(), "refused, what was in force stays") {
		t.Fatalf("reload with only the TLS file broken: %v, want it refused whole", err)
	}

	os.WriteFile(s.policyFile, []byte(twoTenants(os.Getuid(), "spiffe://example.org/billing-v2")), 0o600)
	_, err = admin.ReloadPolicy(ctx)
	if client.Code(err) != proto.BadRequest || !strings.Contains(err.Error(), "refused in part (taken all the same: policy ") ||
		!strings.Contains(err.Error(), "tls:") {
		t.Fatalf("reload with the TLS file broken and the policy changed: %v, want the policy named as taken and the TLS refusal", err)
	}
	if _, err := billing.Sign(ctx, client.ByName("invoice"), client.Algorithm{}, []byte("m")); client.Code(err) != proto.Unauthenticated {
		t.Fatalf("the revocation the reply reports as taken: %v", err)
	}
}

// clientsPolicy gives payments (this uid, the uid after it, and every
// SPIFFE ID under payments/) a slot that only the uid after this one and
// the ci identity may sign with, and one that every identity of the
// tenant may.
func clientsPolicy(uid int) string {
	return fmt.Sprintf(`
admins: {unix_uids: [%d]}
tenants:
  - name: payments
    identities:
      unix_uids: [%d, %d]
      mtls: ["spiffe://example.org/payments/*"]
    slots:
      - name: ci-only
        key: default
        policy: {clients: ["uid:%d", "spiffe://example.org/payments/ci"]}
      - name: open
        key: ed
`, uid, uid, uid+1, uid+1)
}

// ListKeys answers the keys this caller may use (docs/protocol.md), on
// every door: a slot whose clients leave the caller out is not listed,
// neither on the client socket nor over mTLS nor on the ssh-agent socket,
// where a listed key the caller could not sign with was offered to ssh.
// The slot's public key stays readable by the tenant's identities
// (PublicKey): public material, for verifying.
func TestListKeysShowsOnlySlotsTheCallerMaySignWith(t *testing.T) {
	s := startTenancy(t)
	ctx := context.Background()
	if err := os.WriteFile(s.policyFile, []byte(clientsPolicy(os.Getuid())), 0o600); err != nil {
		t.Fatal(err)
	}
	admin, err := client.Dial(ctx, s.admin)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	if _, err := admin.ReloadPolicy(ctx); err != nil {
		t.Fatal(err)
	}
	web, err := s.tenantClient(t, "spiffe://example.org/payments/web")
	if err != nil {
		t.Fatal(err)
	}
	ci, err := s.tenantClient(t, "spiffe://example.org/payments/ci")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		c    *client.Client
		want string // the slots listed, sorted, comma-separated
	}{
		{"this uid on the client socket", s.running.dial(t), "open"},
		{"payments/web over mTLS", web, "open"},
		{"payments/ci over mTLS", ci, "ci-only,open"},
	}
	d := sha256.Sum256([]byte("listed"))
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			keys, err := tc.c.ListKeys(ctx)
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, k := range keys {
				names = append(names, k.Name)
			}
			if got := strings.Join(names, ","); got != tc.want {
				t.Fatalf("lists %q, want %q", got, tc.want)
			}
			// What is listed signs; what is not is PERMISSION_DENIED.
			for _, slot := range []string{"ci-only", "open"} {
				_, err := tc.c.Sign(ctx, client.ByName(slot), client.Algorithm{}, d[:])
				listed := strings.Contains(","+tc.want+",", ","+slot+",")
				if listed && err != nil || !listed && client.Code(err) != proto.PermissionDenied {
					t.Errorf("sign with %s (listed %v): %v", slot, listed, err)
				}
			}
			if _, err := tc.c.PublicKey(ctx, client.ByName("ci-only")); err != nil {
				t.Errorf("public key of ci-only: %v", err)
			}
		})
	}
	t.Run("this uid on the ssh-agent socket", func(t *testing.T) {
		nc, err := net.Dial("unix", s.running.serveSSH(t, agent.Config{Socket: s.running.socket}))
		if err != nil {
			t.Fatal(err)
		}
		defer nc.Close()
		keys, err := sshagentclient.NewClient(nc).List()
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, k := range keys {
			names = append(names, k.Comment)
		}
		if got := strings.Join(names, ","); got != "open" {
			t.Fatalf("the ssh-agent socket offers %q, want %q", got, "open")
		}
	})
}
