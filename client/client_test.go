package client_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

// agentConfig is the test agent's config: four software keys.
func agentConfig(t *testing.T) agent.Config {
	t.Helper()
	cfg, err := agent.ParseConfig([]byte(`
default_key: p256
providers:
  - id: soft
    type: software
    keys:
      - {name: p256, type: ecdsa-p256}
      - {name: p384, type: ecdsa-p384}
      - {name: rsa, type: rsa-2048}
      - {name: ed, type: ed25519}
`))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func startAgent(t *testing.T) string {
	t.Helper()
	cfg := agentConfig(t)
	cfg.DataDir = t.TempDir()
	dir, _ := os.MkdirTemp("", "sigil-c")
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg.Socket = filepath.Join(dir, "agent.sock")
	run(t, cfg)
	return cfg.Socket
}

// run starts an agent on cfg; the test's end stops it.
func run(t *testing.T, cfg agent.Config) *agent.Agent {
	t.Helper()
	a, err := agent.New(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := agent.ListenUnix(cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	go a.Serve(ln)
	t.Cleanup(func() { a.Shutdown(context.Background()) })
	return a
}

func dial(t *testing.T, addr string) *client.Client {
	t.Helper()
	c, err := client.Dial(context.Background(), addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestSignerMakesCSRs(t *testing.T) {
	c := dial(t, startAgent(t))
	cases := []struct {
		key string
		alg x509.SignatureAlgorithm
	}{
		{"p256", x509.ECDSAWithSHA256},
		{"p384", x509.ECDSAWithSHA384},
		{"rsa", x509.SHA256WithRSA},
		{"rsa", x509.SHA384WithRSAPSS},
		{"ed", x509.PureEd25519},
	}
	for _, tc := range cases {
		t.Run(tc.key+"/"+tc.alg.String(), func(t *testing.T) {
			s, err := c.Signer(context.Background(), client.ByName(tc.key))
			if err != nil {
				t.Fatal(err)
			}
			der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
				Subject:            pkix.Name{CommonName: "release-signing"},
				SignatureAlgorithm: tc.alg,
			}, s)
			if err != nil {
				t.Fatal(err)
			}
			csr, err := x509.ParseCertificateRequest(der)
			if err != nil {
				t.Fatal(err)
			}
			if err := csr.CheckSignature(); err != nil {
				t.Fatalf("CSR signature: %v", err)
			}
		})
	}
}

// A key behind the agent serves as a TLS certificate's private key: a real
// handshake completes and the peer sees the agent-held key's certificate.
func TestSignerAsTLSCertificate(t *testing.T) {
	c := dial(t, startAgent(t))
	for _, key := range []string{"p256", "rsa", "ed"} {
		t.Run(key, func(t *testing.T) {
			s, err := c.Signer(context.Background(), client.ByName(key))
			if err != nil {
				t.Fatal(err)
			}
			tmpl := &x509.Certificate{
				SerialNumber: big.NewInt(1),
				Subject:      pkix.Name{CommonName: "sigil.test"},
				DNSNames:     []string{"sigil.test"},
				NotBefore:    time.Now().Add(-time.Hour),
				NotAfter:     time.Now().Add(time.Hour),
				KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
				ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
				IsCA:         true, BasicConstraintsValid: true,
			}
			der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, s.Public(), s)
			if err != nil {
				t.Fatal(err)
			}
			cert, _ := x509.ParseCertificate(der)
			pool := x509.NewCertPool()
			pool.AddCert(cert)
			handshake(t, &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: s}}},
				&tls.Config{RootCAs: pool, ServerName: "sigil.test"})
		})
	}
}

// handshake runs a TLS handshake over a pipe and returns the server's end;
// either side failing fails the test.
func handshake(t *testing.T, server, client *tls.Config) *tls.Conn {
	t.Helper()
	srvConn, cliConn := net.Pipe()
	t.Cleanup(func() { srvConn.Close(); cliConn.Close() })
	srv, cli := tls.Server(srvConn, server), tls.Client(cliConn, client)
	errc := make(chan error, 1)
	go func() { errc <- srv.Handshake() }()
	if err := cli.Handshake(); err != nil {
		t.Fatalf("client handshake: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("server handshake: %v", err)
	}
	return srv
}

// What the agent cannot sign as crypto.Signer asks is refused, never signed
// some other way.
func TestSignerRefusesWhatItCannotDo(t *testing.T) {
	c := dial(t, startAgent(t))
	d := sha256.Sum256(nil)
	for _, tc := range []struct {
		name   string
		key    string
		digest []byte
		opts   crypto.SignerOpts
	}{
		{"Ed25519ph", "ed", make([]byte, 64), crypto.SHA512},
		// ed25519.PrivateKey signs Ed25519ctx for a context string.
		{"Ed25519ctx", "ed", []byte("message"), &ed25519.Options{Context: "sigil"}},
		{"odd PSS salt", "rsa", d[:], &rsa.PSSOptions{SaltLength: 7, Hash: crypto.SHA256}},
		{"MD5", "rsa", d[:], crypto.MD5},
		// crypto.Signer's hash 0 for RSA is PKCS#1 v1.5 over raw data; the
		// agent would sign a SHA-256 DigestInfo instead.
		{"RSA raw PKCS#1 v1.5", "rsa", d[:], crypto.Hash(0)},
		{"RSA nil opts", "rsa", d[:], nil},
		{"PSS without a hash", "rsa", d[:], &rsa.PSSOptions{SaltLength: 32}},
		{"PSS without a hash or salt", "rsa", d[:], &rsa.PSSOptions{}},
		{"ECDSA without a hash, a 20-byte digest", "p256", make([]byte, 20), nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := c.Signer(context.Background(), client.ByName(tc.key))
			if err != nil {
				t.Fatal(err)
			}
			sig, err := s.Sign(nil, tc.digest, tc.opts)
			if client.Code(err) != proto.UnsupportedAlgorithm {
				t.Fatalf("Sign = %x, %v; want UNSUPPORTED_ALGORITHM", sig, err)
			}
		})
	}
}

// The RSA options crypto.Signer users pass give signatures Go's rsa package
// verifies with the same options.
func TestSignerRSAOptions(t *testing.T) {
	c := dial(t, startAgent(t))
	s, err := c.Signer(context.Background(), client.ByName("rsa"))
	if err != nil {
		t.Fatal(err)
	}
	pub := s.Public().(*rsa.PublicKey)
	for _, tc := range []struct {
		name string
		hash crypto.Hash
		opts crypto.SignerOpts
	}{
		{"PKCS#1 v1.5 SHA-256", crypto.SHA256, crypto.SHA256},
		{"PKCS#1 v1.5 SHA-512", crypto.SHA512, crypto.SHA512},
		{"PSS SHA-256 salt = hash", crypto.SHA256, &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthEqualsHash}},
		{"PSS SHA-384 salt 48", crypto.SHA384, &rsa.PSSOptions{Hash: crypto.SHA384, SaltLength: 48}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := tc.hash.New()
			h.Write([]byte("release v1.2.3"))
			digest := h.Sum(nil)
			sig, err := s.Sign(nil, digest, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			if pss, ok := tc.opts.(*rsa.PSSOptions); ok {
				err = rsa.VerifyPSS(pub, tc.hash, digest, sig, pss)
			} else {
				err = rsa.VerifyPKCS1v15(pub, tc.hash, digest, sig)
			}
			if err != nil {
				t.Fatalf("signature does not verify: %v", err)
			}
		})
	}
}

// ECDSA with no hash in opts (crypto.Hash(0), nil opts) signs whatever
// digest it is given, as ecdsa.PrivateKey does, for any of the three SHA-2
// lengths and either curve; the signature verifies over that digest.
func TestSignerECDSAWithoutAHash(t *testing.T) {
	c := dial(t, startAgent(t))
	for _, key := range []string{"p256", "p384"} {
		s, err := c.Signer(context.Background(), client.ByName(key))
		if err != nil {
			t.Fatal(err)
		}
		for _, h := range []crypto.Hash{crypto.SHA256, crypto.SHA384, crypto.SHA512} {
			for _, opts := range []crypto.SignerOpts{nil, crypto.Hash(0)} {
				hh := h.New()
				hh.Write([]byte("release v1.2.3"))
				digest := hh.Sum(nil)
				sig, err := s.Sign(nil, digest, opts)
				if err != nil {
					t.Fatalf("%s, a %d-byte digest, opts %v: %v", key, len(digest), opts, err)
				}
				if !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), digest, sig) {
					t.Fatalf("%s, a %d-byte digest: the signature does not verify", key, len(digest))
				}
			}
		}
	}
}

// A Signer in a tls.Config serves many handshakes at once; its deadline can
// be changed meanwhile (go test -race watches).
func TestSignerSetTimeoutWhileSigning(t *testing.T) {
	c := dial(t, startAgent(t))
	s, err := c.Signer(context.Background(), client.ByName("p256"))
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("x"))
	var wg sync.WaitGroup
	for i := 0; i < 4; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 20; j++ {
				if _, err := s.Sign(nil, d[:], crypto.SHA256); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	for j := 0; j < 20; j++ {
		s.SetTimeout(time.Duration(5+j%3) * time.Second)
	}
	wg.Wait()
}

func TestDialUsesSIGIL_SOCK(t *testing.T) {
	sock := startAgent(t)
	t.Setenv(proto.SocketEnv, sock)
	c := dial(t, "")
	if err := c.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
	c2 := dial(t, "unix:"+sock)
	if err := c2.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
}

func TestDialNoAgent(t *testing.T) {
	_, err := client.Dial(context.Background(), filepath.Join(t.TempDir(), "none.sock"))
	if err == nil {
		t.Fatal("dialled nothing")
	}
}

// A client that found its agent by default (no SIGIL_SOCK, no
// XDG_RUNTIME_DIR: /tmp/sigil-$UID) does not talk to an agent whose
// directory another user could have made or can write to.
func TestDialRefusesAnUntrustedDefaultSocketDir(t *testing.T) {
	tmp, err := os.MkdirTemp("", "sigil-t") // short: a socket path must stay under ~100 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(tmp) })
	t.Setenv("XDG_RUNTIME_DIR", "")
	t.Setenv("TMPDIR", tmp)
	t.Setenv(proto.SocketEnv, "")
	cfg := agentConfig(t)
	cfg.DataDir = t.TempDir()
	cfg.Socket = proto.DefaultSocketPath()
	run(t, cfg)
	if err := dial(t, "").Ping(context.Background()); err != nil {
		t.Fatalf("the user's own default socket dir: %v", err)
	}
	// Another user's agent would sit in a directory like this one.
	if err := os.Chmod(filepath.Dir(cfg.Socket), 0o777); err != nil {
		t.Fatal(err)
	}
	for _, addr := range []string{"", cfg.Socket, filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")} {
		c, err := client.Dial(context.Background(), addr)
		if err == nil {
			c.Close()
			t.Fatalf("Dial(%q) trusted a socket dir others can write to", addr)
		}
		if !errors.Is(err, proto.ErrUntrustedSocketDir) {
			t.Errorf("Dial(%q): %v", addr, err)
		}
		// Not UNAVAILABLE: retrying cannot help until the directory, or
		// SIGIL_SOCK, is fixed.
		if code := client.Code(err); code != proto.Unauthenticated {
			t.Errorf("Dial(%q): code %s, want UNAUTHENTICATED", addr, code)
		}
	}
}

// When the agent dies mid-request, callers get an error at once, not a hang.
func TestAgentGoneFailsPendingCalls(t *testing.T) {
	dir, _ := os.MkdirTemp("", "sigil-c")
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "fake.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		nc, err := ln.Accept()
		// No second connection: a redial must fail, not wait for a Hello
		// nobody will answer.
		ln.Close()
		if err != nil {
			return
		}
		// Answer Hello, swallow the next request, then die.
		codec := proto.NewCodec()
		buf := make([]byte, 4096)
		nc.Read(buf)
		frame, _ := codec.AppendResponseFrame(nil, &proto.Response{ID: 1, Code: proto.OK, Version: proto.Version})
		nc.Write(frame)
		nc.Read(buf)
		nc.Close()
	}()
	c := dial(t, path)
	start := time.Now()
	err = c.Ping(context.Background())
	if client.Code(err) != proto.Unavailable || time.Since(start) > 5*time.Second {
		t.Fatalf("ping on a dead agent: %v after %v", err, time.Since(start))
	}
	if err := c.Ping(context.Background()); err == nil {
		t.Fatal("call on a dead connection succeeded")
	}
	var pe *proto.Error
	if errors.As(err, &pe) {
		t.Fatalf("a lost connection is not an agent code: %v", err)
	}
}
