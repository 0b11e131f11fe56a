package agent_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/agent/devcerts"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

type tlsSetup struct {
	ca, otherCA *devcerts.CA
	dir         string
	addr        string
	cfg         agent.Config // as running serves it, TCP listener included
	running     *running
}

func startTLSAgent(t *testing.T) *tlsSetup {
	t.Helper()
	s := startTLSAgentWith(t, softwareConfig(t))
	var err error
	if s.otherCA, err = devcerts.NewCA("some other CA"); err != nil {
		t.Fatal(err)
	}
	return s
}

func (s *tlsSetup) dial(t testing.TB, cert *devcerts.Issued) (*client.Client, error) {
	cfg := &tls.Config{RootCAs: s.ca.Pool()}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{cert.TLS}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := client.DialTLS(ctx, s.addr, cfg)
	if err == nil {
		t.Cleanup(func() { c.Close() })
	}
	return c, err
}

func TestMutualTLS(t *testing.T) {
	s := startTLSAgent(t)
	good, _ := s.ca.Issue(devcerts.Leaf{CommonName: "payments-client", URIs: []string{"spiffe://example.org/payments"}})
	expired, _ := s.ca.Issue(devcerts.Leaf{CommonName: "old", NotBefore: time.Now().Add(-48 * time.Hour), NotAfter: time.Now().Add(-24 * time.Hour)})
	foreign, _ := s.otherCA.Issue(devcerts.Leaf{CommonName: "intruder"})
	server, _ := s.ca.Issue(devcerts.Leaf{CommonName: "not a client", Server: true})

	c, err := s.dial(t, good)
	if err != nil {
		t.Fatalf("valid client certificate refused: %v", err)
	}
	d := sha256.Sum256([]byte("over mTLS"))
	if _, err := c.Sign(context.Background(), client.KeyRef{}, client.Algorithm{}, d[:]); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		cert *devcerts.Issued
	}{
		{"no certificate", nil},
		{"expired certificate", expired},
		{"certificate from another CA", foreign},
		{"server-only certificate", server},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := s.dial(t, tc.cert)
			if err == nil {
				// TLS 1.3 may report the server's refusal on the first read.
				err = c.Ping(context.Background())
			}
			if err == nil {
				t.Fatal("agent served a client it should have refused")
			}
		})
	}
	// The good client still works after the refusals.
	if err := c.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// Renewed certificates are picked up on Reload; connections open before it
// carry on.
func TestTLSReload(t *testing.T) {
	s := startTLSAgent(t)
	good, _ := s.ca.Issue(devcerts.Leaf{CommonName: "c"})
	before, err := s.dial(t, good)
	if err != nil {
		t.Fatal(err)
	}
	renewed, _ := s.ca.Issue(devcerts.Leaf{CommonName: "sigil agent renewed", IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, Server: true})
	renewed.Write(s.dir, "server")
	if err := s.running.agent.Reload(); err != nil {
		t.Fatal(err)
	}
	conn, err := tls.Dial("tcp", s.addr, &tls.Config{RootCAs: s.ca.Pool(), Certificates: []tls.Certificate{good.TLS}})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if cn := conn.ConnectionState().PeerCertificates[0].Subject.CommonName; cn != "sigil agent renewed" {
		t.Fatalf("after reload the agent presents %q", cn)
	}
	if err := before.Ping(context.Background()); err != nil {
		t.Fatalf("connection from before the reload: %v", err)
	}
	// A broken renewal keeps the working certificates.
	os.WriteFile(filepath.Join(s.dir, "server.pem"), []byte("garbage"), 0o644)
	if err := s.running.agent.Reload(); err == nil {
		t.Fatal("reload accepted a broken certificate")
	}
	if _, err := s.dial(t, good); err != nil {
		t.Fatalf("after a failed reload: %v", err)
	}
}

func TestTCPConfigNeedsTLSMaterial(t *testing.T) {
	_, err := agent.ParseConfig([]byte("tcp: {listen: '127.0.0.1:0'}\n"))
	if err == nil {
		t.Fatal("a TCP listener without certificates was accepted")
	}
}

// A client over mTLS outlives an agent restart as one on the Unix socket
// does: the first call after the restart goes out on a new connection. A TCP
// write to the closed connection would succeed and lose the request, so the
// client looks for the agent's close on a quiet connection first.
func TestTLSClientSurvivesAgentRestart(t *testing.T) {
	s := startTLSAgent(t)
	cert, err := s.ca.Issue(devcerts.Leaf{CommonName: "payments-client"})
	if err != nil {
		t.Fatal(err)
	}
	c, err := s.dial(t, cert)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	signer, err := c.Signer(ctx, client.ByName("default"))
	if err != nil {
		t.Fatal(err)
	}
	sign := func(when string) {
		t.Helper()
		d := sha256.Sum256([]byte(when))
		sig, err := signer.Sign(nil, d[:], crypto.SHA256)
		if err != nil {
			t.Fatalf("%s: %v", when, err)
		}
		if !ecdsa.VerifyASN1(signer.Public().(*ecdsa.PublicKey), d[:], sig) {
			t.Fatalf("%s: the signature does not verify", when)
		}
	}
	sign("before any restart")
	for i := range 3 {
		if err := s.running.agent.Shutdown(ctx); err != nil {
			t.Fatal(err)
		}
		s.running = startAgent(t, s.cfg)
		tln, err := s.running.agent.ListenTLS()
		if err != nil {
			t.Fatal(err)
		}
		go s.running.agent.Serve(tln)
		sign(fmt.Sprintf("first call after restart %d", i+1))
		sign(fmt.Sprintf("second call after restart %d", i+1))
	}
}

// A reload reads the config file again and follows the paths it names now,
// as `sigil agent --check` (systemd's ExecReload) checks them: the TLS files
// and the policy file. It used to reload the files named at start, so
// pointing tcp.cert_file at a renewed certificate passed the check,
// reported success and kept serving the old one. What only a restart can
// apply (the policy file or the TCP listener added or removed) fails the
// reload, named, and the rest is put in force.
func TestReloadFollowsTheConfigsPaths(t *testing.T) {
	dir := t.TempDir()
	ca, _ := devcerts.NewCA("reload CA")
	caFile, _ := ca.WriteCert(dir, "ca")
	issue := func(cn string) (string, string) {
		c, _ := ca.Issue(devcerts.Leaf{CommonName: cn, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, Server: true})
		cert, key, err := c.Write(dir, cn)
		if err != nil {
			t.Fatal(err)
		}
		return cert, key
	}
	oldCert, oldKey := issue("old-server")
	newCert, newKey := issue("renewed-server")
	writePolicy := func(name string, uid int) string {
		path := filepath.Join(dir, name)
		os.WriteFile(path, []byte(fmt.Sprintf("tenants:\n  - name: %s\n    identities: {unix_uids: [%d], mtls: [\"spiffe://example.org/%s\"]}\n    slots: [{name: release, key: default}]\n", name, uid, name)), 0o600)
		return path
	}
	oldPolicy := writePolicy("old", os.Getuid())
	newPolicy := writePolicy("new", os.Getuid())
	sock := shortSocketPath(t)
	configFile := filepath.Join(dir, "sigil.yaml")
	writeConfig := func(cert, key, policy string, tcp bool) {
		var b strings.Builder
		fmt.Fprintf(&b, "data_dir: %s\nsocket: %s\nproviders:\n  - {id: soft, type: software, keys: [{name: default, type: ecdsa-p256}]}\n", filepath.Join(dir, "state"), sock)
		if policy != "" {
			fmt.Fprintf(&b, "policy: %s\n", policy)
		}
		if tcp {
			fmt.Fprintf(&b, "tcp: {listen: \"127.0.0.1:0\", cert_file: %s, key_file: %s, client_ca_file: %s}\n", cert, key, caFile)
		}
		if err := os.WriteFile(configFile, []byte(b.String()), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	writeConfig(oldCert, oldKey, oldPolicy, true)
	cfg, err := agent.LoadConfig(configFile)
	if err != nil {
		t.Fatal(err)
	}
	r := startAgent(t, cfg)
	tln, err := r.agent.ListenTLS()
	if err != nil {
		t.Fatal(err)
	}
	go r.agent.Serve(tln)
	peer, _ := ca.Issue(devcerts.Leaf{CommonName: "c", URIs: []string{"spiffe://example.org/new"}})
	serverName := func() string {
		t.Helper()
		conn, err := tls.Dial("tcp", tln.Addr().String(), &tls.Config{RootCAs: ca.Pool(), Certificates: []tls.Certificate{peer.TLS}})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		return conn.ConnectionState().PeerCertificates[0].Subject.CommonName
	}
	tenantKeys := func() error {
		c, err := client.Dial(context.Background(), r.socket)
		if err != nil {
			return err
		}
		defer c.Close()
		_, err = c.ListKeys(context.Background())
		return err
	}
	if name := serverName(); name != "old-server" {
		t.Fatalf("at start the agent presents %q", name)
	}

	writeConfig(newCert, newKey, newPolicy, true)
	if err := r.agent.Reload(); err != nil {
		t.Fatal(err)
	}
	if name := serverName(); name != "renewed-server" {
		t.Fatalf("after the config named the renewed certificate and a reload, the agent presents %q", name)
	}
	c := r.dial(t)
	keys, err := c.ListKeys(context.Background())
	if err != nil || len(keys) != 1 {
		t.Fatalf("under the new policy file: %v, %v", keys, err)
	}
	// The admin op ReloadPolicy reads the policy file the last Reload took.
	os.WriteFile(newPolicy, []byte("tenants: []\n"), 0o600)
	if err := r.agent.ReloadPolicy(); err != nil {
		t.Fatal(err)
	}
	if err := tenantKeys(); client.Code(err) != proto.Unauthenticated {
		t.Fatalf("after the new policy file was emptied: %v, want UNAUTHENTICATED", err)
	}
	writePolicy("new", os.Getuid())

	for _, tc := range []struct {
		name   string
		policy string
		tcp    bool
		want   string
	}{
		{"policy removed", "", true, "policy was removed"},
		{"TCP listener removed", newPolicy, false, "tcp.listen was removed"},
	} {
		writeConfig(newCert, newKey, tc.policy, tc.tcp)
		err := r.agent.Reload()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Reload = %v, want an error naming %q", tc.name, err, tc.want)
		}
		if err := tenantKeys(); err != nil {
			t.Errorf("%s: the policy in force after the refused change: %v", tc.name, err)
		}
		if name := serverName(); name != "renewed-server" {
			t.Errorf("%s: the agent presents %q", tc.name, name)
		}
	}
}

// The agent's mTLS private key is its identity to remote clients: a local
// user who can read it can pass for the agent to them. It is held to the
// PIN file's rule: 0600 or 0640 (0400, 0440), owned by the agent's user or
// root, at start and at a reload, which keeps the key in force.
func TestTLSKeyFileMustBePrivate(t *testing.T) {
	ca, err := devcerts.NewCA("key file CA")
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ca.Issue(devcerts.Leaf{CommonName: "sigil agent", IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, Server: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		mode  os.FileMode
		owner int // -1: ours
		ok    bool
	}{
		{"0600", 0o600, -1, true},
		{"0640 for the agent's group", 0o640, -1, true},
		{"0400", 0o400, -1, true},
		{"readable by others", 0o644, -1, false},
		{"readable by others alone", 0o604, -1, false},
		{"writable by the group", 0o660, -1, false},
		{"another user's", 0o600, 65534, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.owner >= 0 && os.Getuid() != 0 {
				t.Skip("only root can give a file to another user")
			}
			dir := t.TempDir()
			cfg := softwareConfig(t)
			cfg.TCP.CertFile, cfg.TCP.KeyFile, _ = srv.Write(dir, "server")
			cfg.TCP.ClientCAFile, _ = ca.WriteCert(dir, "clients-ca")
			cfg.TCP.Listen = "127.0.0.1:0"
			if err := os.Chmod(cfg.TCP.KeyFile, tc.mode); err != nil {
				t.Fatal(err)
			}
			if tc.owner >= 0 {
				if err := os.Chown(cfg.TCP.KeyFile, tc.owner, tc.owner); err != nil {
					t.Fatal(err)
				}
			}
			a, err := agent.New(context.Background(), cfg, nil)
			if err == nil {
				a.Shutdown(context.Background())
			}
			if tc.ok {
				if err != nil {
					t.Fatalf("New: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("New accepted a TLS key file others can read")
			}
			if !strings.Contains(err.Error(), cfg.TCP.KeyFile) {
				t.Errorf("error %q does not name the key file", err)
			}
			if strings.Contains(err.Error(), "PRIVATE KEY") {
				t.Errorf("error %q quotes the key file", err)
			}
		})
	}

	// A reload that finds the key opened up keeps the key in force.
	s := startTLSAgent(t)
	good, _ := s.ca.Issue(devcerts.Leaf{CommonName: "c"})
	if err := os.Chmod(s.cfg.TCP.KeyFile, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := s.running.agent.Reload(); err == nil || !strings.Contains(err.Error(), s.cfg.TCP.KeyFile) {
		t.Fatalf("reload with the key file open to others: %v, want a refusal naming it", err)
	}
	c, err := s.dial(t, good)
	if err == nil {
		err = c.Ping(context.Background())
	}
	if err != nil {
		t.Fatalf("after the refused reload: %v", err)
	}
}
