package agent_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"math/big"
	"net/url"
	"os"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/agent/devcerts"
	"github.com/sigil-agent/sigil/client"
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
