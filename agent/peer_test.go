package agent_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/agent/devcerts"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

func (s *tlsSetup) dialTLS(t testing.TB, cert tls.Certificate) (*client.Client, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := client.DialTLS(ctx, s.addr, &tls.Config{RootCAs: s.ca.Pool(), Certificates: []tls.Certificate{cert}})
	if err == nil {
		t.Cleanup(func() { c.Close() })
	}
	return c, err
}

// issueNames issues a client certificate from ca with the subject's
// common names in order (a subject may repeat the attribute) and the URI
// SANs given.
func issueNames(t *testing.T, ca *devcerts.CA, cns []string, uris []string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	var subject pkix.Name
	for _, cn := range cns {
		subject.ExtraNames = append(subject.ExtraNames, pkix.AttributeTypeAndValue{Type: asn1.ObjectIdentifier{2, 5, 4, 3}, Value: cn})
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		Subject:      subject,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	for _, u := range uris {
		p, err := url.Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, p)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// A certificate that names its holder more than one way (two URI SANs, or
// two subject CNs) does not say which tenant it is: the agent used to take
// the first URI SAN, or the last CN (crypto/x509 keeps the last), so which
// tenant a peer became depended on attribute order, which a CA that
// checks only one of the names does not control. Such a peer is refused.
func TestAmbiguousCertificateNamesAreRefused(t *testing.T) {
	s := startTenancy(t)
	ctx := context.Background()
	// billing is known by a subject CN.
	os.WriteFile(s.policyFile, []byte(twoTenants(os.Getuid(), "billing-svc")), 0o600)
	if err := s.running.agent.ReloadPolicy(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name  string
		cns   []string
		uris  []string
		serve bool
	}{
		{"one URI SAN", []string{"c"}, []string{"spiffe://example.org/payments"}, true},
		{"one CN, no URI SAN", []string{"billing-svc"}, nil, true},
		{"two URI SANs, the first mapped", []string{"c"}, []string{"spiffe://example.org/payments", "spiffe://example.org/stranger"}, false},
		{"two URI SANs, the second mapped", []string{"c"}, []string{"spiffe://example.org/stranger", "spiffe://example.org/payments"}, false},
		{"two CNs, the last mapped", []string{"stranger", "billing-svc"}, nil, false},
		{"two CNs, the first mapped", []string{"billing-svc", "stranger"}, nil, false},
		{"a URI for its CN", []string{"spiffe://example.org/payments"}, nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cert := issueNames(t, s.ca, tc.cns, tc.uris)
			c, err := s.dialTLS(t, cert)
			if err == nil {
				_, err = c.ListKeys(ctx)
			}
			if tc.serve && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if !tc.serve && err == nil {
				t.Fatal("the agent served a peer whose certificate names it ambiguously")
			}
		})
	}
}

// An mTLS connection outlives the checks its handshake made: a service
// holds one for its lifetime. A CA taken out of client_ca_file (and
// reloaded), or the client certificate's end, used to leave such a
// connection signing as its tenant for as long as it stayed open. Its
// next request is now refused UNAUTHENTICATED and the connection closed,
// so that a client with a renewed certificate redials with it.
func TestOpenTLSConnectionsFollowTheirCertificate(t *testing.T) {
	ctx := context.Background()
	d := sha256.Sum256([]byte("after the certificate's end"))
	for _, tc := range []struct {
		name   string
		leaf   func(s *tlsSetup) devcerts.Leaf
		change func(t *testing.T, s *tlsSetup)
	}{
		{"its CA removed by a reload", func(*tlsSetup) devcerts.Leaf { return devcerts.Leaf{CommonName: "c"} },
			func(t *testing.T, s *tlsSetup) {
				if _, err := s.otherCA.WriteCert(s.dir, "clients-ca"); err != nil {
					t.Fatal(err)
				}
				if err := s.running.agent.Reload(); err != nil {
					t.Fatal(err)
				}
			}},
		{"its certificate expired", func(*tlsSetup) devcerts.Leaf {
			return devcerts.Leaf{CommonName: "c", NotAfter: time.Now().Add(2 * time.Second)}
		}, func(t *testing.T, s *tlsSetup) {
			time.Sleep(3 * time.Second) // x509 times have whole seconds
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startTLSAgent(t)
			cert, err := s.ca.Issue(tc.leaf(s))
			if err != nil {
				t.Fatal(err)
			}
			c, err := s.dial(t, cert)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := c.Sign(ctx, client.KeyRef{}, client.Algorithm{}, d[:]); err != nil {
				t.Fatal(err)
			}
			tc.change(t, s)
			if _, err := c.Sign(ctx, client.KeyRef{}, client.Algorithm{}, d[:]); client.Code(err) != proto.Unauthenticated {
				t.Fatalf("an open connection's Sign after its certificate stopped being valid: %v, want UNAUTHENTICATED", err)
			}
			// The Unix socket is untouched.
			if _, err := s.running.dial(t).Sign(ctx, client.KeyRef{}, client.Algorithm{}, d[:]); err != nil {
				t.Fatal(err)
			}
		})
	}
	t.Run("a reload that keeps its CA", func(t *testing.T) {
		s := startTLSAgent(t)
		cert, _ := s.ca.Issue(devcerts.Leaf{CommonName: "c"})
		c, err := s.dial(t, cert)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.running.agent.Reload(); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Sign(ctx, client.KeyRef{}, client.Algorithm{}, d[:]); err != nil {
			t.Fatal(err)
		}
	})
}

// A client CA file that does not parse whole (a bundle caught half
// written, a block that is not a certificate) is refused at a reload, and
// the CAs in force stay: x509.CertPool.AppendCertsFromPEM used to keep
// what parsed before the damage and report success, silently dropping
// the CAs after it, and with them the connections of their clients.
func TestReloadRefusesADamagedClientCAFile(t *testing.T) {
	s := startTLSAgent(t)
	caFile := filepath.Join(s.dir, "clients-ca.pem")
	good := append(append([]byte{}, s.ca.CertPEM...), s.otherCA.CertPEM...)
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"the second CA cut short", good[:len(s.ca.CertPEM)+len(s.otherCA.CertPEM)/2]},
		{"a block that is not a certificate", append(append([]byte{}, s.ca.CertPEM...), "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"...)},
		{"a private key among the CAs", append(append([]byte{}, s.ca.CertPEM...), "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := os.WriteFile(caFile, good, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := s.running.agent.Reload(); err != nil {
				t.Fatal(err)
			}
			fromOther, _ := s.otherCA.Issue(devcerts.Leaf{CommonName: "other"})
			c, err := s.dialTLS(t, fromOther.TLS)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(caFile, tc.data, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := s.running.agent.Reload(); err == nil {
				t.Fatal("a damaged client CA file was reloaded")
			}
			if err := c.Ping(context.Background()); err != nil {
				t.Fatalf("a client of a CA in force, after the refused reload: %v", err)
			}
		})
	}
}
