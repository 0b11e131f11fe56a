package agent_test

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/agent/devcerts"
	"github.com/sigil-agent/sigil/proto"
)

// rawTLS is a rawConn over mutual TLS with a certificate for spiffe, past
// its Hello.
func (s *tlsSetup) rawTLS(t *testing.T, spiffe string) *rawConn {
	t.Helper()
	cert, err := s.ca.Issue(devcerts.Leaf{CommonName: "c", URIs: []string{spiffe}})
	if err != nil {
		t.Fatal(err)
	}
	nc, err := tls.Dial("tcp", s.addr, &tls.Config{RootCAs: s.ca.Pool(), Certificates: []tls.Certificate{cert.TLS}, MinVersion: tls.VersionTLS13})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(30 * time.Second))
	rc := &rawConn{t: t, nc: nc, br: bufio.NewReader(nc), codec: proto.NewCodec()}
	rc.hello()
	return rc
}

// opClass sorts the 256 op numbers a request can carry.
func opClass(op proto.Op) string {
	switch op {
	case proto.OpHello, proto.OpPing:
		return "session"
	case proto.OpListKeys, proto.OpPublicKey, proto.OpSign, proto.OpVerify:
		return "key"
	case proto.OpRotate, proto.OpRollback, proto.OpPause, proto.OpResume, proto.OpReloadPolicy,
		proto.OpAuditTail, proto.OpExportREP, proto.OpIncidentDrill, proto.OpAuditVerify, proto.OpAuditPrune:
		return "admin"
	}
	return "unknown"
}

// served is any answer from the operation itself: not a refusal of the
// peer.
const served proto.Code = 0xfffe

// everyOp sends each op number (0 to 255) on rc, each with a harmless
// request (no slot named, no cut-off), and checks the code want gives for
// its class. A refusal's message must name nothing of any tenant.
func everyOp(t *testing.T, rc *rawConn, want map[string]proto.Code) {
	t.Helper()
	secrets := []string{"payments", "billing", "release", "invoice", "spiffe", "example.org"}
	for n := 0; n <= 255; n++ {
		op := proto.Op(n)
		id := uint64(1000 + n)
		rc.send(&proto.Request{ID: id, Op: op, Version: proto.Version})
		resp, err := rc.recv()
		if err != nil {
			t.Fatalf("%s: %v", op, err)
		}
		if resp.ID != id {
			t.Fatalf("%s: reply id %d (code %s, %q), want %d: the connection was closed", op, resp.ID, resp.Code, resp.Msg, id)
		}
		w := want[opClass(op)]
		switch {
		case w == served && (resp.Code == proto.PermissionDenied || resp.Code == proto.Unauthenticated):
			t.Errorf("%s (%s): %s %q, want it served", op, opClass(op), resp.Code, resp.Msg)
		case w != served && resp.Code != w:
			t.Errorf("%s (%s): %s %q, want %s", op, opClass(op), resp.Code, resp.Msg, w)
		}
		if resp.Code == proto.PermissionDenied || resp.Code == proto.Unauthenticated {
			for _, s := range secrets {
				if strings.Contains(resp.Msg, s) {
					t.Errorf("%s: refusal %q names %q", op, resp.Msg, s)
				}
			}
		}
	}
}

// Every op number, as each kind of peer, with a policy: admin operations
// only for the policy's admins, on the admin socket or over mTLS, and
// PERMISSION_DENIED for everyone else; the admin socket serves no key
// operation; an unknown op is BAD_REQUEST everywhere.
func TestEveryOpAsEveryPeer(t *testing.T) {
	s := startTenancy(t)
	for _, tc := range []struct {
		name string
		dial func(t *testing.T) *rawConn
		want map[string]proto.Code
	}{
		{"client socket, a tenant that is an admin uid",
			func(t *testing.T) *rawConn { rc := s.running.raw(t); rc.hello(); return rc },
			map[string]proto.Code{"session": proto.OK, "key": served, "admin": proto.PermissionDenied, "unknown": proto.BadRequest}},
		{"admin socket, an admin",
			func(t *testing.T) *rawConn { rc := rawAt(t, s.admin); rc.hello(); return rc },
			map[string]proto.Code{"session": proto.OK, "key": proto.PermissionDenied, "admin": served, "unknown": proto.BadRequest}},
		{"mTLS, a tenant",
			func(t *testing.T) *rawConn { return s.rawTLS(t, "spiffe://example.org/payments") },
			map[string]proto.Code{"session": proto.OK, "key": served, "admin": proto.PermissionDenied, "unknown": proto.BadRequest}},
		{"mTLS, another tenant",
			func(t *testing.T) *rawConn { return s.rawTLS(t, "spiffe://example.org/billing") },
			map[string]proto.Code{"session": proto.OK, "key": served, "admin": proto.PermissionDenied, "unknown": proto.BadRequest}},
		{"mTLS, an admin of no tenant",
			func(t *testing.T) *rawConn { return s.rawTLS(t, "spiffe://example.org/ops") },
			map[string]proto.Code{"session": proto.OK, "key": proto.Unauthenticated, "admin": served, "unknown": proto.BadRequest}},
	} {
		t.Run(tc.name, func(t *testing.T) { everyOp(t, tc.dial(t), tc.want) })
	}
}

// Without a policy the admin role is the agent's own user and root on the
// admin socket, and nobody's anywhere else: not the same user on the
// client socket, not any certificate over mTLS.
func TestEveryOpAsEveryPeerWithoutAPolicy(t *testing.T) {
	s := startTLSAgent(t)
	adminPath := filepath.Join(filepath.Dir(s.cfg.Socket), "admin.sock")
	s.running.serveAdmin(t, adminPath)
	for _, tc := range []struct {
		name string
		dial func(t *testing.T) *rawConn
		want map[string]proto.Code
	}{
		{"client socket, the agent's own user",
			func(t *testing.T) *rawConn { rc := s.running.raw(t); rc.hello(); return rc },
			map[string]proto.Code{"session": proto.OK, "key": served, "admin": proto.PermissionDenied, "unknown": proto.BadRequest}},
		{"admin socket, the agent's own user",
			func(t *testing.T) *rawConn { rc := rawAt(t, adminPath); rc.hello(); return rc },
			map[string]proto.Code{"session": proto.OK, "key": proto.PermissionDenied, "admin": served, "unknown": proto.BadRequest}},
		{"mTLS, any certificate",
			func(t *testing.T) *rawConn { return s.rawTLS(t, "spiffe://example.org/ops") },
			map[string]proto.Code{"session": proto.OK, "key": served, "admin": proto.PermissionDenied, "unknown": proto.BadRequest}},
	} {
		t.Run(tc.name, func(t *testing.T) { everyOp(t, tc.dial(t), tc.want) })
	}
}

// A uid the policy does not name in admins is refused at the admin
// socket's Hello (UNAUTHENTICATED, id 0, closed), even when it is a tenant.
func TestAdminSocketRefusesATenantThatIsNoAdmin(t *testing.T) {
	s := startTenancy(t)
	noAdmin := strings.Replace(twoTenants(os.Getuid(), "spiffe://example.org/billing"),
		fmt.Sprintf("unix_uids: [%d]\n  mtls: [\"spiffe://example.org/ops\"]", os.Getuid()),
		fmt.Sprintf("unix_uids: [%d]\n  mtls: [\"spiffe://example.org/ops\"]", os.Getuid()+1), 1)
	if noAdmin == twoTenants(os.Getuid(), "spiffe://example.org/billing") {
		t.Fatal("the policy names no admin uid to replace")
	}
	if err := os.WriteFile(s.policyFile, []byte(noAdmin), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.running.agent.Reload(); err != nil {
		t.Fatal(err)
	}
	rc := rawAt(t, s.admin)
	rc.send(&proto.Request{ID: 1, Op: proto.OpHello, Version: proto.Version})
	resp, err := rc.recv()
	if err != nil || resp.ID != 0 || resp.Code != proto.Unauthenticated {
		t.Fatalf("Hello of a tenant that is no admin on the admin socket: %v %+v, want id 0 UNAUTHENTICATED", err, resp)
	}
}

// A reload that takes a peer's role away (its tenant mapping, its place in
// admins) is told UNAUTHENTICATED on its next request, whatever the op,
// on every listener: docs/policy.md and docs/protocol.md.
func TestRevokedPeersAreUnauthenticatedOnEveryOp(t *testing.T) {
	s := startTenancy(t)
	unixClient := s.running.raw(t)
	unixClient.hello()
	adminSock := rawAt(t, s.admin)
	adminSock.hello()
	ops := s.rawTLS(t, "spiffe://example.org/ops")
	billing := s.rawTLS(t, "spiffe://example.org/billing")

	// No uid anywhere, billing under another name, no mTLS admin.
	revoked := fmt.Sprintf(`
admins:
  unix_uids: [%d]
tenants:
  - name: payments
    identities:
      unix_uids: [%d]
      mtls: ["spiffe://example.org/payments"]
    slots:
      - name: release
        key: default
  - name: billing
    identities:
      mtls: ["spiffe://example.org/billing-v2"]
    slots:
      - name: invoice
        key: ed
`, os.Getuid()+1, os.Getuid()+1)
	if err := os.WriteFile(s.policyFile, []byte(revoked), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.running.agent.Reload(); err != nil {
		t.Fatal(err)
	}
	all := map[string]proto.Code{"session": proto.Unauthenticated, "key": proto.Unauthenticated, "admin": proto.Unauthenticated, "unknown": proto.Unauthenticated}
	for name, rc := range map[string]*rawConn{
		"client socket, a tenant uid no longer mapped": unixClient,
		"admin socket, a uid no longer an admin":       adminSock,
		"mTLS, an admin no longer in admins":           ops,
		"mTLS, a tenant no longer mapped":              billing,
	} {
		t.Run(name, func(t *testing.T) { everyOp(t, rc, all) })
	}
}
