package client_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"math/big"
	"net"
	"os"
	"os/exec"
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
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/pkcs11/softhsmtest"
)

// everyKeyAgent starts an agent serving a software key of every type the
// agent offers (soft-<type>) and, where SoftHSM2 and pkcs11-tool are
// installed, a token key of every type too (hsm-<type>). It returns the
// names served.
func everyKeyAgent(t *testing.T) (*client.Client, []string) {
	t.Helper()
	var b strings.Builder
	var names []string
	b.WriteString("providers:\n")
	if softhsmtest.FindModule() != "" && onPath("softhsm2-util") && onPath("pkcs11-tool") {
		tok := softhsmtest.New(t, "stdlib")
		keys := tok.GenerateKeys(t, providers.KeyTypes...)
		t.Setenv("SIGIL_TEST_PIN", tok.PIN)
		fmt.Fprintf(&b, "  - id: hsm\n    type: pkcs11\n    module: %s\n    token_label: %s\n    pin_env: SIGIL_TEST_PIN\n    keys:\n", tok.Module, tok.Label)
		for _, kt := range providers.KeyTypes {
			fmt.Fprintf(&b, "      - {name: hsm-%s, uri: %q}\n", kt, keys[kt].URI)
			names = append(names, "hsm-"+string(kt))
		}
	} else {
		t.Log("SoftHSM2 or pkcs11-tool not installed: software keys only")
	}
	b.WriteString("  - id: soft\n    type: software\n    keys:\n")
	for _, kt := range providers.KeyTypes {
		fmt.Fprintf(&b, "      - {name: soft-%s, type: %s}\n", kt, kt)
		names = append(names, "soft-"+string(kt))
	}
	cfg, err := agent.ParseConfig([]byte(b.String()))
	if err != nil {
		t.Fatal(err)
	}
	cfg.DataDir = t.TempDir()
	dir, _ := os.MkdirTemp("", "sigil-std")
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg.Socket = filepath.Join(dir, "agent.sock")
	run(t, cfg)
	return dial(t, cfg.Socket), names
}

func onPath(cmd string) bool {
	_, err := exec.LookPath(cmd)
	return err == nil
}

// x509Algorithms lists the certificate signature algorithms a key of the
// signer's type can make.
func x509Algorithms(pub crypto.PublicKey) []x509.SignatureAlgorithm {
	switch pub.(type) {
	case *ecdsa.PublicKey:
		return []x509.SignatureAlgorithm{x509.ECDSAWithSHA256, x509.ECDSAWithSHA384, x509.ECDSAWithSHA512}
	case ed25519.PublicKey:
		return []x509.SignatureAlgorithm{x509.PureEd25519}
	}
	return []x509.SignatureAlgorithm{x509.SHA256WithRSA, x509.SHA384WithRSA, x509.SHA512WithRSA,
		x509.SHA256WithRSAPSS, x509.SHA384WithRSAPSS, x509.SHA512WithRSAPSS}
}

// tlsSchemes lists the TLS signature schemes a key of the signer's type
// can sign with at version v (TLS 1.2 does not tie an ECDSA hash to the
// curve, and allows PKCS#1 v1.5; TLS 1.3 does neither).
func tlsSchemes(pub crypto.PublicKey, v uint16) []tls.SignatureScheme {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if v == tls.VersionTLS13 {
			if k.Curve == elliptic.P384() {
				return []tls.SignatureScheme{tls.ECDSAWithP384AndSHA384}
			}
			return []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256}
		}
		return []tls.SignatureScheme{tls.ECDSAWithP256AndSHA256, tls.ECDSAWithP384AndSHA384, tls.ECDSAWithP521AndSHA512}
	case ed25519.PublicKey:
		return []tls.SignatureScheme{tls.Ed25519}
	}
	pss := []tls.SignatureScheme{tls.PSSWithSHA256, tls.PSSWithSHA384, tls.PSSWithSHA512}
	if v == tls.VersionTLS13 {
		return pss
	}
	return append(pss, tls.PKCS1WithSHA256, tls.PKCS1WithSHA384, tls.PKCS1WithSHA512)
}

// A key behind the agent, of every type and from every provider, is a
// crypto.Signer the standard library takes as it takes its own keys: TLS
// 1.3 and 1.2 servers and clients authenticate with it, for every signature
// scheme the version allows, and x509 makes and checks certificates
// (self-signed and issued by it), CRLs and CSRs with every signature algorithm
// the key can make. The stdlib's own verification (the TLS peer's, x509's)
// checks each signature.
func TestSignerInTheStandardLibrary(t *testing.T) {
	c, names := everyKeyAgent(t)
	ca, err := devcerts.NewCA("stdlib root")
	if err != nil {
		t.Fatal(err)
	}
	peer, err := ca.Issue(devcerts.Leaf{CommonName: "peer.test", DNSNames: []string{"peer.test"}, Server: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		t.Run(name, func(t *testing.T) {
			s, err := c.Signer(context.Background(), client.ByName(name))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := x509.MarshalPKIXPublicKey(s.Public()); err != nil {
				t.Fatalf("Public() = %T: %v", s.Public(), err)
			}
			serverDER, err := ca.Certify(s.Public(), devcerts.Leaf{CommonName: name, DNSNames: []string{"sigil.test"}, Server: true})
			if err != nil {
				t.Fatal(err)
			}
			clientDER, err := ca.Certify(s.Public(), devcerts.Leaf{CommonName: name})
			if err != nil {
				t.Fatal(err)
			}
			for _, v := range []uint16{tls.VersionTLS13, tls.VersionTLS12} {
				for _, scheme := range tlsSchemes(s.Public(), v) {
					t.Run(fmt.Sprintf("%s/%s/server", tls.VersionName(v), scheme), func(t *testing.T) {
						cert := tls.Certificate{Certificate: [][]byte{serverDER}, PrivateKey: s, SupportedSignatureAlgorithms: []tls.SignatureScheme{scheme}}
						srv := handshake(t,
							&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: v, MaxVersion: v},
							&tls.Config{RootCAs: ca.Pool(), ServerName: "sigil.test", MinVersion: v, MaxVersion: v})
						if got := srv.ConnectionState().Version; got != v {
							t.Fatalf("negotiated %s", tls.VersionName(got))
						}
					})
					t.Run(fmt.Sprintf("%s/%s/client", tls.VersionName(v), scheme), func(t *testing.T) {
						cert := tls.Certificate{Certificate: [][]byte{clientDER}, PrivateKey: s, SupportedSignatureAlgorithms: []tls.SignatureScheme{scheme}}
						srv := handshake(t,
							&tls.Config{Certificates: []tls.Certificate{peer.TLS}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: ca.Pool(), MinVersion: v, MaxVersion: v},
							&tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: ca.Pool(), ServerName: "peer.test", MinVersion: v, MaxVersion: v})
						if got := srv.ConnectionState().PeerCertificates; len(got) == 0 || got[0].Subject.CommonName != name {
							t.Fatalf("the server saw %v", got)
						}
					})
				}
			}
			// Both ends held by the agent: mutual TLS 1.3 with no key in process.
			t.Run("mutual", func(t *testing.T) {
				handshake(t,
					&tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{serverDER}, PrivateKey: s}}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: ca.Pool()},
					&tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{clientDER}, PrivateKey: s}}, RootCAs: ca.Pool(), ServerName: "sigil.test"})
			})

			for _, alg := range x509Algorithms(s.Public()) {
				t.Run("x509/"+alg.String(), func(t *testing.T) {
					checkX509(t, s, alg)
				})
			}
		})
	}
}

// checkX509 makes a self-signed CA certificate with s, a leaf it issues,
// a CRL revoking the leaf and a CSR, all with alg, and checks them with
// x509.
func checkX509(t *testing.T, s crypto.Signer, alg x509.SignatureAlgorithm) {
	t.Helper()
	now := time.Now()
	rootTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "sigil root"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		IsCA:                  true,
		BasicConstraintsValid: true,
		SignatureAlgorithm:    alg,
	}
	rootDER, err := x509.CreateCertificate(rand.Reader, rootTmpl, rootTmpl, s.Public(), s)
	if err != nil {
		t.Fatalf("self-signed: %v", err)
	}
	root, err := x509.ParseCertificate(rootDER)
	if err != nil {
		t.Fatal(err)
	}
	if root.SignatureAlgorithm != alg {
		t.Fatalf("self-signed with %s, want %s", root.SignatureAlgorithm, alg)
	}
	if err := root.CheckSignatureFrom(root); err != nil {
		t.Fatalf("self-signed: %v", err)
	}

	leafKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	leafTmpl := &x509.Certificate{
		SerialNumber:       big.NewInt(2),
		Subject:            pkix.Name{CommonName: "leaf.sigil.test"},
		DNSNames:           []string{"leaf.sigil.test"},
		NotBefore:          now.Add(-time.Hour),
		NotAfter:           now.Add(time.Hour),
		KeyUsage:           x509.KeyUsageDigitalSignature,
		ExtKeyUsage:        []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		SignatureAlgorithm: alg,
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, root, &leafKey.PublicKey, s)
	if err != nil {
		t.Fatalf("issued: %v", err)
	}
	leaf, err := x509.ParseCertificate(leafDER)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(root)
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: "leaf.sigil.test"}); err != nil {
		t.Fatalf("issued: %v", err)
	}

	crlDER, err := x509.CreateRevocationList(rand.Reader, &x509.RevocationList{
		Number:             big.NewInt(1),
		ThisUpdate:         now,
		NextUpdate:         now.Add(time.Hour),
		SignatureAlgorithm: alg,
		RevokedCertificateEntries: []x509.RevocationListEntry{
			{SerialNumber: leaf.SerialNumber, RevocationTime: now},
		},
	}, root, s)
	if err != nil {
		t.Fatalf("CRL: %v", err)
	}
	crl, err := x509.ParseRevocationList(crlDER)
	if err != nil {
		t.Fatal(err)
	}
	if err := crl.CheckSignatureFrom(root); err != nil {
		t.Fatalf("CRL: %v", err)
	}

	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject:            pkix.Name{CommonName: "csr.sigil.test"},
		SignatureAlgorithm: alg,
	}, s)
	if err != nil {
		t.Fatalf("CSR: %v", err)
	}
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		t.Fatal(err)
	}
	if err := csr.CheckSignature(); err != nil {
		t.Fatalf("CSR: %v", err)
	}
}

// What crypto.Signer callers pass besides the common cases: each option is
// either signed so that Go's crypto verifies it under that same option, or
// refused with a stable code, before anything is signed another way.
func TestSignerOptionEdgeCases(t *testing.T) {
	c := dial(t, startAgent(t))
	d256 := sha256.Sum256([]byte("release v1.2.3"))
	d384 := sha512.Sum384([]byte("release v1.2.3"))
	d512 := sha512.Sum512([]byte("release v1.2.3"))
	for _, tc := range []struct {
		name   string
		key    string
		digest []byte
		opts   crypto.SignerOpts
		want   proto.Code // OK: signed, and verified under opts
	}{
		// PSS: the salt is the hash's length, which a verifier with Auto
		// (0) or EqualsHash (-1) or that very length accepts.
		{"PSS salt Auto", "rsa", d256[:], &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthAuto}, proto.OK},
		{"PSS salt EqualsHash", "rsa", d512[:], &rsa.PSSOptions{Hash: crypto.SHA512, SaltLength: rsa.PSSSaltLengthEqualsHash}, proto.OK},
		{"PSS salt 32 with SHA-256", "rsa", d256[:], &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: 32}, proto.OK},
		{"PSS salt 20", "rsa", d256[:], &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: 20}, proto.UnsupportedAlgorithm},
		{"PSS salt too long for the key", "rsa", d256[:], &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: 1000}, proto.UnsupportedAlgorithm},
		{"PSS salt -2", "rsa", d256[:], &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: -2}, proto.UnsupportedAlgorithm},
		// A digest that is not as long as the named hash is the agent's
		// BAD_REQUEST (rsa.PrivateKey fails it too), never signed as
		// another hash.
		{"PSS SHA-384 over a SHA-256 digest", "rsa", d256[:], &rsa.PSSOptions{Hash: crypto.SHA384, SaltLength: rsa.PSSSaltLengthEqualsHash}, proto.BadRequest},
		{"PKCS#1 v1.5 SHA-256 over a SHA-384 digest", "rsa", d384[:], crypto.SHA256, proto.BadRequest},
		// TLS 1.0/1.1 and SHA-1: not supported.
		{"PKCS#1 v1.5 MD5+SHA1 (TLS 1.0)", "rsa", make([]byte, 36), crypto.MD5SHA1, proto.UnsupportedAlgorithm},
		{"PKCS#1 v1.5 SHA-1", "rsa", make([]byte, 20), crypto.SHA1, proto.UnsupportedAlgorithm},
		{"ECDSA SHA-1", "p256", make([]byte, 20), crypto.SHA1, proto.UnsupportedAlgorithm},
		{"ECDSA SHA-512/256", "p256", d256[:], crypto.SHA512_256, proto.UnsupportedAlgorithm},
		// ECDSA signs a hash of any strength with either curve (TLS 1.2
		// does not tie them), as ecdsa.PrivateKey does.
		{"ECDSA P-256 with SHA-512", "p256", d512[:], crypto.SHA512, proto.OK},
		{"ECDSA P-384 with SHA-256", "p384", d256[:], crypto.SHA256, proto.OK},
		{"ECDSA P-384, no hash, a 64-byte digest", "p384", d512[:], crypto.Hash(0), proto.OK},
		{"ECDSA SHA-256 over a SHA-384 digest", "p256", d384[:], crypto.SHA256, proto.BadRequest},
		{"ECDSA SHA-384 over a SHA-256 digest", "p384", d256[:], crypto.SHA384, proto.BadRequest},
		{"ECDSA no hash, a 28-byte digest", "p256", d256[:28], crypto.Hash(0), proto.UnsupportedAlgorithm},
		{"ECDSA no digest", "p256", nil, crypto.SHA256, proto.BadRequest},
		// Ed25519: pure only; a hash or a context would make another
		// signature (Ed25519ph, Ed25519ctx) that pure Ed25519 is not.
		{"Ed25519 nil opts", "ed", []byte("release v1.2.3"), nil, proto.OK},
		{"Ed25519 empty ed25519.Options", "ed", []byte("release v1.2.3"), &ed25519.Options{}, proto.OK},
		{"Ed25519 empty message", "ed", []byte{}, crypto.Hash(0), proto.OK},
		{"Ed25519ph via ed25519.Options", "ed", d512[:], &ed25519.Options{Hash: crypto.SHA512}, proto.UnsupportedAlgorithm},
		{"Ed25519ph with a context", "ed", d512[:], &ed25519.Options{Hash: crypto.SHA512, Context: "sigil"}, proto.UnsupportedAlgorithm},
		{"Ed25519ctx", "ed", []byte("release v1.2.3"), &ed25519.Options{Context: "sigil"}, proto.UnsupportedAlgorithm},
		{"Ed25519 with crypto.SHA256", "ed", d256[:], crypto.SHA256, proto.UnsupportedAlgorithm},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := c.Signer(context.Background(), client.ByName(tc.key))
			if err != nil {
				t.Fatal(err)
			}
			// rand is the caller's, and unused: nil is fine.
			sig, err := s.Sign(nil, tc.digest, tc.opts)
			if code := client.Code(err); code != tc.want {
				t.Fatalf("Sign = %x, %v; want %s", sig, err, tc.want)
			}
			if tc.want != proto.OK {
				// Led by the code's name, which the rest does not repeat.
				words := strings.ToLower(strings.ReplaceAll(tc.want.String(), "_", " "))
				if text := strings.ToLower(strings.ReplaceAll(err.Error(), "_", " ")); !strings.HasPrefix(text, words+": ") || strings.Count(text, words) != 1 {
					t.Errorf("the error says its code other than once, first: %q", err)
				}
				return
			}
			if err := verifyUnder(s.Public(), tc.digest, tc.opts, sig); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// verifyUnder verifies sig as the stdlib verifies a signature made by its
// own key with opts.
func verifyUnder(pub crypto.PublicKey, digest []byte, opts crypto.SignerOpts, sig []byte) error {
	switch pub := pub.(type) {
	case ed25519.PublicKey:
		o, _ := opts.(*ed25519.Options)
		if o == nil {
			o = &ed25519.Options{}
		}
		return ed25519.VerifyWithOptions(pub, digest, sig, o)
	case *rsa.PublicKey:
		if pss, ok := opts.(*rsa.PSSOptions); ok {
			return rsa.VerifyPSS(pub, pss.Hash, digest, sig, pss)
		}
		return rsa.VerifyPKCS1v15(pub, opts.HashFunc(), digest, sig)
	}
	return verifySignature(pub, digest, opts, sig)
}

// One Signer, shared by 50 goroutines as a busy server shares its
// tls.Certificate: every signature is over its own caller's digest and
// verifies, for every key type; 50 concurrent TLS handshakes complete.
func TestSignerSharedByManyGoroutines(t *testing.T) {
	c := dial(t, startAgent(t))
	const workers, each = 50, 4
	for _, tc := range []struct {
		name, key string
		opts      crypto.SignerOpts
	}{
		{"ECDSA P-256", "p256", crypto.SHA256},
		{"ECDSA P-384", "p384", crypto.SHA384},
		{"RSA PSS", "rsa", &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthEqualsHash}},
		{"RSA PKCS#1 v1.5", "rsa", crypto.SHA512},
		{"Ed25519", "ed", crypto.Hash(0)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := c.Signer(context.Background(), client.ByName(tc.key))
			if err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range each {
						digest := digestFor(tc.opts, fmt.Sprintf("worker %d payload %d", w, i))
						sig, err := s.Sign(rand.Reader, digest, tc.opts)
						if err != nil {
							t.Errorf("worker %d: %v", w, err)
							return
						}
						if err := verifyUnder(s.Public(), digest, tc.opts, sig); err != nil {
							t.Errorf("worker %d, payload %d: %v", w, i, err)
							return
						}
					}
				}()
			}
			wg.Wait()
		})
	}

	t.Run("TLS handshakes", func(t *testing.T) {
		s, err := c.Signer(context.Background(), client.ByName("p256"))
		if err != nil {
			t.Fatal(err)
		}
		server, peer := signerTLS(t, s)
		var wg sync.WaitGroup
		errs := make(chan error, workers)
		for range workers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs <- handshakeErr(server, peer.Clone(), nil)
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
	})
}

// handshakeErr is handshake for goroutines other than the test's: it
// returns the first failure of either side, and the server's own in
// *serverErr when that is not nil.
func handshakeErr(server, cfg *tls.Config, serverErr *error) error {
	srvConn, cliConn := net.Pipe()
	defer srvConn.Close()
	defer cliConn.Close()
	srv, cli := tls.Server(srvConn, server), tls.Client(cliConn, cfg)
	errc := make(chan error, 1)
	go func() {
		err := srv.Handshake()
		if err != nil {
			srvConn.Close() // else the client waits on the pipe for good
		}
		errc <- err
	}()
	cerr := cli.Handshake()
	if cerr != nil {
		cliConn.Close()
	}
	serr := <-errc
	if serverErr != nil {
		*serverErr = serr
	}
	if cerr != nil {
		return fmt.Errorf("client handshake: %w", cerr)
	}
	if serr != nil {
		return fmt.Errorf("server handshake: %w", serr)
	}
	return nil
}

// An agent restart while a Signer is in use, on the Unix socket and over
// mutual TLS: goroutines signing through it see either a signature that
// verifies or UNAVAILABLE (a request lost with the connection, or none to
// send it on), never another code or a bad signature; once the agent is
// back, the same Signer signs again.
func TestSignerAcrossAnAgentRestart(t *testing.T) {
	t.Run("unix", func(t *testing.T) {
		cfg := agentConfig(t)
		cfg.DataDir = t.TempDir() // the same keys after the restart
		dir, _ := os.MkdirTemp("", "sigil-c")
		t.Cleanup(func() { os.RemoveAll(dir) })
		cfg.Socket = filepath.Join(dir, "agent.sock")
		start := func() *agent.Agent { return run(t, cfg) }
		signAcrossARestart(t, start, func() *client.Client { return dial(t, cfg.Socket) })
	})
	t.Run("tls", func(t *testing.T) {
		cfg := agentConfig(t)
		cfg.DataDir = t.TempDir()
		dir, _ := os.MkdirTemp("", "sigil-c")
		t.Cleanup(func() { os.RemoveAll(dir) })
		cfg.Socket = filepath.Join(dir, "agent.sock")
		ca, err := devcerts.NewCA("restart CA")
		if err != nil {
			t.Fatal(err)
		}
		srv, err := ca.Issue(devcerts.Leaf{CommonName: "sigil agent", IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, Server: true})
		if err != nil {
			t.Fatal(err)
		}
		cfg.TCP.CertFile, cfg.TCP.KeyFile, _ = srv.Write(dir, "server")
		cfg.TCP.ClientCAFile, _ = ca.WriteCert(dir, "clients-ca")
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		cfg.TCP.Listen = ln.Addr().String()
		ln.Close()
		start := func() *agent.Agent {
			a := run(t, cfg)
			tln, err := a.ListenTLS()
			if err != nil {
				t.Fatal(err)
			}
			go a.Serve(tln)
			return a
		}
		cert, err := ca.Issue(devcerts.Leaf{CommonName: "restart-client"})
		if err != nil {
			t.Fatal(err)
		}
		signAcrossARestart(t, start, func() *client.Client {
			c, err := client.DialTLS(context.Background(), cfg.TCP.Listen, &tls.Config{RootCAs: ca.Pool(), Certificates: []tls.Certificate{cert.TLS}})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			return c
		})
	})
}

func signAcrossARestart(t *testing.T, start func() *agent.Agent, dial func() *client.Client) {
	a := start()
	c := dial()
	s, err := c.Signer(context.Background(), client.ByName("p256"))
	if err != nil {
		t.Fatal(err)
	}

	var stop atomic.Bool
	var signed, unavailable atomic.Int64
	var wg sync.WaitGroup
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; !stop.Load(); i++ {
				digest := digestFor(crypto.SHA256, fmt.Sprintf("worker %d payload %d", w, i))
				sig, err := s.Sign(nil, digest, crypto.SHA256)
				switch {
				case err == nil:
					if err := verifyUnder(s.Public(), digest, crypto.SHA256, sig); err != nil {
						t.Errorf("worker %d: %v", w, err)
						return
					}
					signed.Add(1)
				case client.Code(err) == proto.Unavailable:
					unavailable.Add(1)
					time.Sleep(5 * time.Millisecond)
				default:
					t.Errorf("worker %d: %v (code %s), want a signature or UNAVAILABLE", w, err, client.Code(err))
					return
				}
			}
		}()
	}
	waitForCount(&signed, 50)
	a.Shutdown(context.Background())
	time.Sleep(50 * time.Millisecond) // callers meet the agent gone
	start()
	before := signed.Load()
	waitForCount(&signed, before+50)
	stop.Store(true)
	wg.Wait()
	if signed.Load() < before+50 {
		t.Fatalf("%d signatures after the restart (%d UNAVAILABLE), want 50", signed.Load()-before, unavailable.Load())
	}
	t.Logf("%d signatures, %d UNAVAILABLE", signed.Load(), unavailable.Load())
	digest := digestFor(crypto.SHA256, "after")
	sig, err := s.Sign(nil, digest, crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	if err := verifyUnder(s.Public(), digest, crypto.SHA256, sig); err != nil {
		t.Fatal(err)
	}
}

// A slot policy that allows some algorithms only: TLS picks the signature
// scheme from the peer's preferences before the agent's policy has a say,
// so a Certificate whose SupportedSignatureAlgorithms does not match the
// policy fails the handshakes where the pick falls outside it, with the
// policy's UNSUPPORTED_ALGORITHM in the server's error (a P-384 key
// allowed ecdsa-sha384 only, in TLS 1.2, where Go picks ECDSA with
// SHA-256; an RSA key allowed PKCS#1 v1.5 only, in either version). Set
// to the policy's schemes, the same handshakes complete.
func TestSignerInTLSUnderAnAlgorithmPolicy(t *testing.T) {
	cfg := agentConfig(t)
	cfg.DefaultKey = ""
	cfg.DataDir = t.TempDir()
	dir, _ := os.MkdirTemp("", "sigil-pol")
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg.Socket = filepath.Join(dir, "agent.sock")
	cfg.Policy = filepath.Join(dir, "policy.yaml")
	policy := fmt.Sprintf(`tenants:
  - name: web
    identities: {unix_uids: [%d]}
    slots:
      - {name: p384, key: p384, policy: {algorithms: [ecdsa-sha384]}}
      - {name: rsa, key: rsa, policy: {algorithms: [rsa-pkcs1v15-sha256]}}
`, os.Getuid())
	if err := os.WriteFile(cfg.Policy, []byte(policy), 0o600); err != nil {
		t.Fatal(err)
	}
	run(t, cfg)
	c := dial(t, cfg.Socket)
	ca, err := devcerts.NewCA("policy root")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		slot     string
		version  uint16
		schemes  []tls.SignatureScheme // the policy's, for the Certificate
		unlisted bool                  // without them the handshake still completes
	}{
		{"p384", tls.VersionTLS13, []tls.SignatureScheme{tls.ECDSAWithP384AndSHA384}, true},
		{"p384", tls.VersionTLS12, []tls.SignatureScheme{tls.ECDSAWithP384AndSHA384}, false},
		{"rsa", tls.VersionTLS12, []tls.SignatureScheme{tls.PKCS1WithSHA256}, false},
	} {
		t.Run(tc.slot+"/"+tls.VersionName(tc.version), func(t *testing.T) {
			s, err := c.Signer(context.Background(), client.ByName(tc.slot))
			if err != nil {
				t.Fatal(err)
			}
			der, err := ca.Certify(s.Public(), devcerts.Leaf{CommonName: tc.slot, DNSNames: []string{"sigil.test"}, Server: true})
			if err != nil {
				t.Fatal(err)
			}
			peer := &tls.Config{RootCAs: ca.Pool(), ServerName: "sigil.test", MaxVersion: tc.version}
			cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: s}
			var serverErr error
			server := &tls.Config{Certificates: []tls.Certificate{cert}, MaxVersion: tc.version}
			err = handshakeErr(server, peer, &serverErr)
			switch {
			case tc.unlisted && err != nil:
				t.Fatalf("without SupportedSignatureAlgorithms: %v", err)
			case !tc.unlisted && !refusedForItsAlgorithm(serverErr):
				t.Fatalf("without SupportedSignatureAlgorithms: %v; want the server to fail with UNSUPPORTED_ALGORITHM", err)
			}
			cert.SupportedSignatureAlgorithms = tc.schemes
			server.Certificates = []tls.Certificate{cert}
			if err := handshakeErr(server, peer, nil); err != nil {
				t.Fatalf("with SupportedSignatureAlgorithms %v: %v", tc.schemes, err)
			}
		})
	}
	// TLS 1.3 signs RSA with PSS only: a slot allowed PKCS#1 v1.5 alone
	// cannot serve it, whatever the Certificate says.
	s, err := c.Signer(context.Background(), client.ByName("rsa"))
	if err != nil {
		t.Fatal(err)
	}
	der, err := ca.Certify(s.Public(), devcerts.Leaf{CommonName: "rsa", DNSNames: []string{"sigil.test"}, Server: true})
	if err != nil {
		t.Fatal(err)
	}
	var serverErr error
	handshakeErr(&tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: s}}},
		&tls.Config{RootCAs: ca.Pool(), ServerName: "sigil.test"}, &serverErr)
	if !refusedForItsAlgorithm(serverErr) {
		t.Fatalf("TLS 1.3 with an RSA slot allowed PKCS#1 v1.5 only: server %v, want UNSUPPORTED_ALGORITHM", serverErr)
	}
}

// refusedForItsAlgorithm reports whether a TLS server's handshake failed
// on the agent's UNSUPPORTED_ALGORITHM: crypto/tls keeps the Signer's
// error as text only, so client.Code cannot see it.
func refusedForItsAlgorithm(err error) bool {
	return err != nil && strings.Contains(err.Error(), "failed to sign") && strings.Contains(err.Error(), proto.UnsupportedAlgorithm.String()+": ")
}

// waitForCount waits until c reaches n, 10 s at most (the caller's own
// checks then say what is missing).
func waitForCount(c *atomic.Int64, n int64) {
	for deadline := time.Now().Add(10 * time.Second); c.Load() < n && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
}
