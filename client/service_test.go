package client_test

import (
	"bufio"
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/agent/devcerts"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

// Tests of the Signer as a service puts it to work: a crypto/tls server on
// a loopback TCP port whose certificate's key is behind the agent, and
// crypto/tls clients that verify the chain.

// tlsService is a TLS server on loopback: it accepts connections and runs
// each one's handshake, reporting the server side's result on results.
type tlsService struct {
	addr    string
	results chan serverHandshake
}

// serverHandshake is how a server's handshake ended, and how long it held
// its goroutine.
type serverHandshake struct {
	err  error
	took time.Duration
}

func serveTLS(t *testing.T, cfg *tls.Config) *tlsService {
	t.Helper()
	return serveTLSWithin(t, cfg, 0)
}

// serveTLSWithin is serveTLS with each handshake run under
// HandshakeContext with a deadline of d (none for 0), as http.Server and
// most TLS servers bound theirs.
func serveTLSWithin(t *testing.T, cfg *tls.Config, d time.Duration) *tlsService {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &tlsService{addr: ln.Addr().String(), results: make(chan serverHandshake, 1024)}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			nc, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer nc.Close()
				start := time.Now()
				tc := tls.Server(nc, cfg)
				ctx := context.Background()
				if d > 0 {
					var cancel context.CancelFunc
					ctx, cancel = context.WithTimeout(ctx, d)
					defer cancel()
				}
				err := tc.HandshakeContext(ctx)
				if err == nil {
					// One byte proves the connection carries data both ways.
					_, err = tc.Write([]byte{'k'})
				}
				s.results <- serverHandshake{err, time.Since(start)}
			})
		}
	})
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	return s
}

// dialTLS runs one client handshake against s and returns the client's and
// the server's results; it fails the test if either takes longer than max.
func (s *tlsService) dialTLS(t *testing.T, cfg *tls.Config, max time.Duration) (clientErr, serverErr error) {
	clientErr, srv := s.dialTLSServer(t, cfg, max)
	return clientErr, srv.err
}

// dialTLSServer is dialTLS with how long the server's handshake took.
func (s *tlsService) dialTLSServer(t *testing.T, cfg *tls.Config, max time.Duration) (clientErr error, srv serverHandshake) {
	t.Helper()
	start := time.Now()
	d := tls.Dialer{Config: cfg, NetDialer: &net.Dialer{Timeout: max}}
	ctx, cancel := context.WithTimeout(context.Background(), max+time.Second)
	defer cancel()
	nc, err := d.DialContext(ctx, "tcp", s.addr)
	if err == nil {
		var b [1]byte
		nc.SetReadDeadline(time.Now().Add(max))
		_, err = nc.Read(b[:])
		nc.Close()
	}
	select {
	case srv = <-s.results:
	case <-time.After(max + time.Second):
		t.Fatalf("the server's handshake did not end within %v", max+time.Second)
	}
	if took := time.Since(start); took > max {
		t.Fatalf("a handshake took %v (client: %v; server: %v), want at most %v", took, err, srv.err, max)
	}
	return err, srv
}

// A TLS server whose certificate's key is behind the agent, for every key
// type and both TLS versions: while the agent is down, handshakes fail at
// once, the server's error naming UNAVAILABLE, and none hangs; once the
// agent is back on the same socket, the same tls.Config serves again, its
// Signer redialled by the Client.
func TestTLSServerAcrossAnAgentOutage(t *testing.T) {
	cfg := agentConfig(t)
	cfg.DataDir = t.TempDir() // the same keys after the restart
	dir, _ := os.MkdirTemp("", "sigil-svc")
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg.Socket = filepath.Join(dir, "agent.sock")
	a := run(t, cfg)
	c := dial(t, cfg.Socket)
	ca, err := devcerts.NewCA("service root")
	if err != nil {
		t.Fatal(err)
	}
	type service struct {
		name    string
		version uint16
		svc     *tlsService
	}
	var services []service
	for _, key := range []string{"p256", "p384", "rsa", "ed"} {
		s, err := c.Signer(context.Background(), client.ByName(key))
		if err != nil {
			t.Fatal(err)
		}
		der, err := ca.Certify(s.Public(), devcerts.Leaf{CommonName: key, DNSNames: []string{"sigil.test"}, Server: true})
		if err != nil {
			t.Fatal(err)
		}
		for _, v := range []uint16{tls.VersionTLS13, tls.VersionTLS12} {
			services = append(services, service{key + "/" + tls.VersionName(v), v, serveTLS(t, &tls.Config{
				Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: s}},
				MinVersion:   v, MaxVersion: v,
			})})
		}
	}
	peer := func(v uint16) *tls.Config {
		return &tls.Config{RootCAs: ca.Pool(), ServerName: "sigil.test", MinVersion: v, MaxVersion: v}
	}
	serves := func(t *testing.T, when string) {
		t.Helper()
		for _, s := range services {
			if cerr, serr := s.svc.dialTLS(t, peer(s.version), 5*time.Second); cerr != nil || serr != nil {
				t.Fatalf("%s, %s: client %v; server %v", s.name, when, cerr, serr)
			}
		}
	}
	serves(t, "agent up")

	a.Shutdown(context.Background())
	for round := range 3 { // the first finds the connection gone, the rest no agent
		for _, s := range services {
			cerr, serr := s.svc.dialTLS(t, peer(s.version), time.Second)
			if cerr == nil || serr == nil || !strings.Contains(serr.Error(), proto.Unavailable.String()+": ") {
				t.Fatalf("%s, agent down (round %d): client %v; server %v; want both to fail, the server with UNAVAILABLE", s.name, round, cerr, serr)
			}
		}
	}

	run(t, cfg)
	time.Sleep(150 * time.Millisecond) // past the client's redial backoff
	serves(t, "agent back")
}

// hungAgent is an agent that answers the Hello and PublicKey (for the key
// pub) and takes Sign requests without ever answering them, as a wedged
// agent does. It returns the socket's path.
// signerTLS is a TLS server config whose certificate, from a throwaway
// CA, certifies s's key for sigil.test, with s as its private key; and a
// client config that trusts that CA.
func signerTLS(t *testing.T, s crypto.Signer) (server, peer *tls.Config) {
	t.Helper()
	ca, err := devcerts.NewCA("signer root")
	if err != nil {
		t.Fatal(err)
	}
	der, err := ca.Certify(s.Public(), devcerts.Leaf{CommonName: "sigil.test", DNSNames: []string{"sigil.test"}, Server: true})
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: s}}},
		&tls.Config{RootCAs: ca.Pool(), ServerName: "sigil.test"}
}

func hungAgent(t *testing.T, spki []byte) string {
	t.Helper()
	f := listenFake(t, func(_ int32, nc net.Conn, br *bufio.Reader) {
		if answerHello(nc, br) != nil {
			return
		}
		for {
			req, err := readRequest(br)
			if err != nil {
				return
			}
			if req.Op == proto.OpPublicKey {
				writeResponse(nc, &proto.Response{ID: req.ID, Code: proto.OK, Key: "hung", KID: "0123456789abcdef0123456789abcdef", KeyType: "ecdsa-p256", Pub: spki})
			}
		}
	})
	return f.path
}

// A wedged agent holds a TLS handshake for the Signer's deadline
// (SetTimeout; DefaultSignerTimeout, 10 s), not for good: the server's
// handshake then fails with DEADLINE_EXCEEDED. crypto.Signer has no
// context, so the handshake's own deadline (HandshakeContext, which
// http.Server and most TLS servers set) does not end the Sign sooner: the
// handshake's goroutine is held until the Sign returns, though the peer
// sees the connection closed at the handshake's deadline.
func TestTLSHandshakeAgainstAHungAgent(t *testing.T) {
	real := dial(t, startAgent(t))
	k, err := real.PublicKey(context.Background(), client.ByName("p256"))
	if err != nil {
		t.Fatal(err)
	}
	c := dial(t, hungAgent(t, k.SPKI))
	s, err := c.Signer(context.Background(), client.ByName("hung"))
	if err != nil {
		t.Fatal(err)
	}
	server, peer := signerTLS(t, s)
	const signerTimeout = 600 * time.Millisecond
	s.SetTimeout(signerTimeout)
	for _, tc := range []struct {
		name      string
		handshake time.Duration // the server's HandshakeContext deadline; 0 none
		serverErr string        // what the server's handshake error says
	}{
		{"no handshake deadline", 0, proto.DeadlineExceeded.String() + ": "},
		// HandshakeContext reports its own deadline, once the Sign is over.
		{"a shorter handshake deadline", 100 * time.Millisecond, context.DeadlineExceeded.Error()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			svc := serveTLSWithin(t, server, tc.handshake)
			cerr, srv := svc.dialTLSServer(t, peer, 3*time.Second)
			if cerr == nil || srv.err == nil || !strings.Contains(srv.err.Error(), tc.serverErr) {
				t.Fatalf("client %v; server %v; want both to fail, the server with %q", cerr, srv.err, tc.serverErr)
			}
			if srv.took < signerTimeout {
				t.Fatalf("the server's handshake ended after %v, before the Signer's deadline (%v)", srv.took, signerTimeout)
			}
		})
	}
}

// A TLS server whose certificate comes from TLSCertificate, on a slot that
// rotates while it serves: the certificate binds the old public key, so the
// server's handshakes fail with KEY_RETIRED rather than be signed by the
// new key (which the peer would refuse as an invalid signature, and which
// the certificate does not certify). TLSCertificate after the rotation
// finds no certificate for the new key; a rollback makes the old server
// serve again.
func TestTLSServerAcrossARotation(t *testing.T) {
	ctx := context.Background()
	cfg := agentConfig(t)
	cfg.DefaultKey = ""
	cfg.DataDir = t.TempDir()
	dir, _ := os.MkdirTemp("", "sigil-svc")
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg.Socket = filepath.Join(dir, "agent.sock")
	cfg.AdminSocket = filepath.Join(dir, "admin.sock")

	// The key's certificate, from the key's first start.
	first, c := serve(t, cfg)
	pub, err := c.PublicKey(ctx, client.ByName("p256"))
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	first.Shutdown(ctx)
	ca, err := devcerts.NewCA("rotation root")
	if err != nil {
		t.Fatal(err)
	}
	der, err := ca.Certify(pub.Public, devcerts.Leaf{CommonName: "release", DNSNames: []string{"sigil.test"}, Server: true})
	if err != nil {
		t.Fatal(err)
	}
	certFile := filepath.Join(dir, "p256.crt")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg.Certificates = map[string]string{"p256": certFile}
	cfg.Policy = filepath.Join(dir, "policy.yaml")
	policy := fmt.Sprintf("admins: {unix_uids: [%d]}\ntenants:\n  - name: payments\n    identities: {unix_uids: [%d]}\n    slots:\n      - {name: release, key: p256}\n", os.Getuid(), os.Getuid())
	if err := os.WriteFile(cfg.Policy, []byte(policy), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg.Rotation.Canaries = 2
	a := run(t, cfg)
	aln, err := agent.ListenUnix(cfg.AdminSocket)
	if err != nil {
		t.Fatal(err)
	}
	go a.ServeAdmin(aln)
	c = dial(t, cfg.Socket)
	admin := dial(t, cfg.AdminSocket)

	cert, err := c.TLSCertificate(ctx, "release")
	if err != nil {
		t.Fatal(err)
	}
	svc := serveTLS(t, &tls.Config{Certificates: []tls.Certificate{cert}})
	peer := &tls.Config{RootCAs: ca.Pool(), ServerName: "sigil.test"}
	if cerr, serr := svc.dialTLS(t, peer, 5*time.Second); cerr != nil || serr != nil {
		t.Fatalf("before the rotation: client %v; server %v", cerr, serr)
	}

	if err := admin.Rotate(ctx, "payments/release"); err != nil {
		t.Fatal(err)
	}
	cerr, serr := svc.dialTLS(t, peer, 5*time.Second)
	if serr == nil || !strings.Contains(serr.Error(), proto.KeyRetired.String()+": ") {
		t.Fatalf("after the rotation: client %v; server %v; want the server to fail with KEY_RETIRED", cerr, serr)
	}
	var verr *tls.CertificateVerificationError
	if errors.As(cerr, &verr) || strings.Contains(fmt.Sprint(cerr), "invalid signature") {
		t.Fatalf("after the rotation the peer got a signature it refused: %v", cerr)
	}
	if _, err := c.TLSCertificate(ctx, "release"); client.Code(err) != proto.NotFound || !errors.Is(err, client.ErrNoCertificate) {
		t.Fatalf("TLSCertificate after the rotation: %v, want NOT_FOUND (ErrNoCertificate): the new key has no certificate", err)
	}

	if _, err := admin.Rollback(ctx, "payments/release"); err != nil {
		t.Fatal(err)
	}
	if cerr, serr := svc.dialTLS(t, peer, 5*time.Second); cerr != nil || serr != nil {
		t.Fatalf("after the rollback: client %v; server %v", cerr, serr)
	}
	leaf, _ := x509.ParseCertificate(der)
	if got, _ := c.TLSCertificate(ctx, "release"); got.Leaf == nil || !got.Leaf.Equal(leaf) {
		t.Fatal("TLSCertificate after the rollback does not give the key's certificate")
	}
}

// Many concurrent handshakes on one Signer while the agent restarts: each
// either completes, its signature verified by the peer, or fails with
// UNAVAILABLE at the server, promptly; once the agent is back they
// complete again.
func TestTLSHandshakesAcrossAnAgentRestart(t *testing.T) {
	cfg := agentConfig(t)
	cfg.DataDir = t.TempDir()
	dir, _ := os.MkdirTemp("", "sigil-svc")
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg.Socket = filepath.Join(dir, "agent.sock")
	a := run(t, cfg)
	c := dial(t, cfg.Socket)
	s, err := c.Signer(context.Background(), client.ByName("p256"))
	if err != nil {
		t.Fatal(err)
	}
	server, peer := signerTLS(t, s)

	var stop atomic.Bool
	var ok, unavailable atomic.Int64
	var wg sync.WaitGroup
	for w := range 16 {
		wg.Go(func() {
			for !stop.Load() {
				start := time.Now()
				var serr error
				err := handshakeErr(server, peer, &serr)
				if took := time.Since(start); took > 2*time.Second {
					t.Errorf("worker %d: a handshake took %v", w, took)
					return
				}
				switch {
				case err == nil:
					ok.Add(1)
				case serr != nil && strings.Contains(serr.Error(), proto.Unavailable.String()+": "):
					unavailable.Add(1)
					time.Sleep(5 * time.Millisecond)
				default:
					t.Errorf("worker %d: %v, want a handshake or UNAVAILABLE at the server", w, err)
					return
				}
			}
		})
	}
	waitForCount(&ok, 50)
	a.Shutdown(context.Background())
	time.Sleep(100 * time.Millisecond)
	run(t, cfg)
	before := ok.Load()
	waitForCount(&ok, before+50)
	stop.Store(true)
	wg.Wait()
	if ok.Load() < before+50 {
		t.Fatalf("%d handshakes after the restart (%d UNAVAILABLE), want 50", ok.Load()-before, unavailable.Load())
	}
	t.Logf("%d handshakes, %d UNAVAILABLE", ok.Load(), unavailable.Load())
}

// A TLS service on a rotating slot, as docs/rotation.md lays it out: the
// rotation's evidence pack carries the new key's name and a CSR for it; a
// CA certifies that key, `certificates:` names the certificate under that
// key name, and a reload serves it, so TLSCertificate serves TLS with the
// new version. The agent must then start again on that config: a restart
// serves the rotated key again before the certificates are checked. Once an
// incident drill retires that version, its certificate names a key no
// longer served; that does not stop a start either (the agent says so in
// its log), and the slot's new version has no certificate until one is
// named.
func TestTLSCertificateForARotatedVersionSurvivesRestarts(t *testing.T) {
	ctx := context.Background()
	dir, writeConfig := rotatingSlotConfig(t)
	start := startRotatingSlot(t)
	ca, err := devcerts.NewCA("rotated root")
	if err != nil {
		t.Fatal(err)
	}
	peer := &tls.Config{RootCAs: ca.Pool(), ServerName: "sigil.test"}
	servesTLS := func(t *testing.T, c *client.Client, when string) {
		t.Helper()
		cert, err := c.TLSCertificate(ctx, "release")
		if err != nil {
			t.Fatalf("%s: TLSCertificate: %v", when, err)
		}
		if err := handshakeErr(&tls.Config{Certificates: []tls.Certificate{cert}}, peer, nil); err != nil {
			t.Fatalf("%s: %v", when, err)
		}
	}

	cfg := writeConfig("")
	a, c, admin := start(cfg)
	if err := admin.Rotate(ctx, "payments/release"); err != nil {
		t.Fatal(err)
	}
	newKey, certFile := certifyRotatedKey(t, admin, ca, dir)
	cfg = writeConfig(fmt.Sprintf("certificates: {%q: %s}", newKey, certFile))
	if err := a.Reload(); err != nil {
		t.Fatalf("reload naming the rotated key's certificate: %v", err)
	}
	servesTLS(t, c, "after the reload")

	c.Close()
	admin.Close()
	a.Shutdown(ctx)
	a, c, admin = start(cfg)
	servesTLS(t, c, "after a restart")

	if _, err := admin.IncidentDrill(ctx, "payments/release"); err != nil {
		t.Fatal(err)
	}
	c.Close()
	admin.Close()
	a.Shutdown(ctx)
	_, c, _ = start(cfg)
	if _, err := c.TLSCertificate(ctx, "release"); client.Code(err) != proto.NotFound || !errors.Is(err, client.ErrNoCertificate) {
		t.Fatalf("the drill's new version, after a restart: TLSCertificate = %v, want NOT_FOUND (no certificate yet)", err)
	}
}

// rotatingSlotConfig makes a config file for an agent with rotation on,
// whose policy's one slot, payments/release, starts on the software key
// p256; write writes it again with the certificates: line given and loads
// it. dir holds the config, the sockets and what a test writes beside.
func rotatingSlotConfig(t *testing.T) (dir string, write func(certificates string) agent.Config) {
	t.Helper()
	dir, _ = os.MkdirTemp("", "sigil-svc")
	t.Cleanup(func() { os.RemoveAll(dir) })
	policyFile := filepath.Join(dir, "policy.yaml")
	policy := fmt.Sprintf("admins: {unix_uids: [%d]}\ntenants:\n  - name: payments\n    identities: {unix_uids: [%d]}\n    slots:\n      - {name: release, key: p256}\n", os.Getuid(), os.Getuid())
	if err := os.WriteFile(policyFile, []byte(policy), 0o600); err != nil {
		t.Fatal(err)
	}
	configFile := filepath.Join(dir, "sigil.yaml")
	dataDir := t.TempDir()
	return dir, func(certificates string) agent.Config {
		t.Helper()
		yaml := fmt.Sprintf(`socket: %s
admin_socket: %s
data_dir: %s
policy: %s
rotation: {canaries: 2}
%s
providers:
  - id: soft
    type: software
    keys:
      - {name: p256, type: ecdsa-p256}
`, filepath.Join(dir, "agent.sock"), filepath.Join(dir, "admin.sock"), dataDir, policyFile, certificates)
		if err := os.WriteFile(configFile, []byte(yaml), 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, err := agent.LoadConfig(configFile)
		if err != nil {
			t.Fatal(err)
		}
		return cfg
	}
}

// startRotatingSlot returns a start of an agent on a rotatingSlotConfig:
// the agent, a client and an admin client.
func startRotatingSlot(t *testing.T) func(cfg agent.Config) (*agent.Agent, *client.Client, *client.Client) {
	return func(cfg agent.Config) (*agent.Agent, *client.Client, *client.Client) {
		t.Helper()
		a := run(t, cfg)
		aln, err := agent.ListenUnix(cfg.AdminSocket)
		if err != nil {
			t.Fatal(err)
		}
		go a.ServeAdmin(aln)
		return a, dial(t, cfg.Socket), dial(t, cfg.AdminSocket)
	}
}

// certifyRotatedKey does what an operator does after a rotation of
// payments/release: reads the new key's name and its CSR from the
// rotation's evidence pack, has ca certify it, and writes the certificate
// in dir. It returns the key's name and the certificate's file.
func certifyRotatedKey(t *testing.T, admin *client.Client, ca *devcerts.CA, dir string) (key, certFile string) {
	t.Helper()
	manifest, _, err := admin.ExportREP(context.Background(), "payments/release", 0)
	if err != nil {
		t.Fatal(err)
	}
	var rep struct {
		New struct{ Key string }
		CSR struct{ PEM string }
	}
	if err := json.Unmarshal(manifest, &rep); err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode([]byte(rep.CSR.PEM))
	if block == nil || rep.New.Key == "" {
		t.Fatalf("the evidence pack names no new key or CSR: %s", manifest)
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	if err := csr.CheckSignature(); err != nil {
		t.Fatal(err)
	}
	der, err := ca.Certify(csr.PublicKey, devcerts.Leaf{CommonName: "release", DNSNames: []string{"sigil.test"}, Server: true})
	if err != nil {
		t.Fatal(err)
	}
	certFile = filepath.Join(dir, strings.ReplaceAll(rep.New.Key, "/", "_")+".crt")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return rep.New.Key, certFile
}

// A certificate named for a key version a drill retired is left out of a
// start and of a reload (TestTLSCertificateForARotatedVersionSurvivesRestarts),
// but only once read and found to certify that version's recorded key, as
// while the version was served: a certificate of another key under its
// name (the next version's: v2 for v3) and a file that is not there are
// refused by a start and by a reload after one, as by a reload before the
// restart.
func TestCertificateOfARetiredVersionIsStillChecked(t *testing.T) {
	ctx := context.Background()
	dir, writeConfig := rotatingSlotConfig(t)
	start := startRotatingSlot(t)
	ca, err := devcerts.NewCA("rotated root")
	if err != nil {
		t.Fatal(err)
	}
	a, _, admin := start(writeConfig(""))
	if err := admin.Rotate(ctx, "payments/release"); err != nil {
		t.Fatal(err)
	}
	retired, retiredCert := certifyRotatedKey(t, admin, ca, dir)
	if _, err := admin.IncidentDrill(ctx, "payments/release"); err != nil {
		t.Fatal(err)
	}
	next, nextCert := certifyRotatedKey(t, admin, ca, dir)
	if next == retired {
		t.Fatalf("the drill's evidence pack names the retired key %s", next)
	}
	cases := []struct {
		name, file string
		want       string // in the error; "" for none
	}{
		{"its own certificate", retiredCert, ""},
		{"the next version's certificate", nextCert, nextCert + " certifies another key"},
		{"a file that is not there", filepath.Join(dir, "missing.crt"), "no such file"},
	}
	check := func(t *testing.T, when string, err error, want string) {
		t.Helper()
		switch {
		case want == "" && err != nil:
			t.Errorf("%s: %v", when, err)
		case want != "" && err == nil:
			t.Errorf("%s took it, want an error with %q", when, want)
		case want != "" && (!strings.Contains(err.Error(), "certificates["+retired+"]: ") || !strings.Contains(err.Error(), want)):
			t.Errorf("%s: %v, want certificates[%s]: ...%s", when, err, retired, want)
		}
	}
	configs := make([]agent.Config, len(cases))
	for i, tc := range cases {
		// The retired key is served until the restart.
		configs[i] = writeConfig(fmt.Sprintf("certificates: {%q: %s}", retired, tc.file))
		check(t, tc.name+": a reload before the restart", a.Reload(), tc.want)
	}
	admin.Close()
	a.Shutdown(ctx)
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b, err := agent.New(ctx, configs[i], nil)
			if err == nil {
				b.Shutdown(ctx)
			}
			check(t, "a start", err, tc.want)
			b, _, _ = start(writeConfig(""))
			writeConfig(fmt.Sprintf("certificates: {%q: %s}", retired, tc.file))
			check(t, "a reload after a start", b.Reload(), tc.want)
			b.Shutdown(ctx)
		})
	}
}

// A certificate for an accepted version (its signatures verify until its
// T1) whose key a start could not serve again is no rotated-out key's:
// the start refuses it as any certificate of a key no provider serves,
// rather than leaving it out as retired.
func TestCertificateOfAnAcceptedVersionNotServedRefused(t *testing.T) {
	ctx := context.Background()
	dir, writeConfig := rotatingSlotConfig(t)
	start := startRotatingSlot(t)
	ca, err := devcerts.NewCA("rotated root")
	if err != nil {
		t.Fatal(err)
	}
	a, _, admin := start(writeConfig(""))
	if err := admin.Rotate(ctx, "payments/release"); err != nil {
		t.Fatal(err)
	}
	accepted, certFile := certifyRotatedKey(t, admin, ca, dir)
	if err := admin.Rotate(ctx, "payments/release"); err != nil { // accepted is accepted now, until its T1
		t.Fatal(err)
	}
	cfg := writeConfig(fmt.Sprintf("certificates: {%q: %s}", accepted, certFile))
	if err := a.Reload(); err != nil {
		t.Fatalf("reload while the accepted version is served: %v", err)
	}
	admin.Close()
	a.Shutdown(ctx)
	// The key is lost: its software key file is gone.
	keyFile := url.PathEscape(accepted) + ".pem"
	var removed bool
	filepath.WalkDir(cfg.DataDir, func(path string, d fs.DirEntry, err error) error {
		if err == nil && d.Name() == keyFile {
			removed = os.Remove(path) == nil
		}
		return nil
	})
	if !removed {
		t.Fatalf("no key file %s under %s", keyFile, cfg.DataDir)
	}
	b, err := agent.New(ctx, cfg, nil)
	if err == nil {
		b.Shutdown(ctx)
		t.Fatal("a start left out the certificate of an accepted version it could not serve")
	}
	if want := "certificates[" + accepted + "]: no provider serves this key"; !strings.Contains(err.Error(), want) {
		t.Fatalf("start: %v, want %q", err, want)
	}
}
