package client_test

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"log"

	"github.com/sigil-agent/sigil/client"
)

// A service signs a digest with the agent's default key, then uses a named
// key as a crypto.Signer for a CSR and as a TLS certificate's private key.
func Example() {
	ctx := context.Background()
	c, err := client.Dial(ctx, "") // $SIGIL_SOCK, else the default socket
	if err != nil {
		log.Fatal(err)
	}
	defer c.Close()

	digest := sha256.Sum256([]byte("release-1.2.3.tar.gz contents"))
	sig, err := c.Sign(ctx, client.KeyRef{}, client.Algorithm{}, digest[:])
	if err != nil {
		log.Fatalf("sign: %v (code %s)", err, client.Code(err))
	}
	fmt.Printf("signed by %s (kid %s): %d bytes\n", sig.Key, sig.KID, len(sig.Sig))

	signer, err := c.Signer(ctx, client.ByName("default"))
	if err != nil {
		log.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject: pkix.Name{CommonName: "payments.internal"},
	}, signer)
	if err != nil {
		log.Fatal(err)
	}
	_ = csr // send to the CA; put the issued chain below

	var issuedChain [][]byte
	_ = tls.Certificate{Certificate: issuedChain, PrivateKey: signer}

	// Or, once the agent's config names the key's certificate
	// (certificates: {default: /etc/sigil/certs/default.pem}):
	if cert, err := c.TLSCertificate(ctx, "default"); err == nil {
		_ = &tls.Config{Certificates: []tls.Certificate{cert}}
	}
}
