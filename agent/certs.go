package agent

import (
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"sort"

	"github.com/sigil-agent/sigil/proto"
)

// Key certificates. The config names an X.509 certificate per key
// (`certificates:`, key name → PEM file, the key's certificate first) and
// clients list it with the key: the PKCS#11 front shows each as a
// certificate object beside the key, which is how Java's SunPKCS11 keystore
// and NSS find a key for TLS client authentication or jarsigner, and the Go
// client makes a tls.Certificate of it. A file that does not parse, or a
// certificate for another key, is refused (at start the agent does not
// start; at a reload the certificates in force stay): serving a certificate
// whose key is not the one that signs would only fail later, at the peer.
// Reload reads the files again, so a renewed certificate needs no restart.

// keyCerts maps key names to certificates (DER); replaced whole.
type keyCerts map[string][]byte

// cert returns the key's certificate, nil without one.
func (kr *keyring) cert(name string) []byte {
	if m := kr.certs.Load(); m != nil {
		return (*m)[name]
	}
	return nil
}

// listWithCerts is the ListKeys reply of every key, certificates included.
func (kr *keyring) listWithCerts() []proto.KeyEntry {
	m := kr.certs.Load()
	if m == nil || len(*m) == 0 {
		return kr.list
	}
	out := make([]proto.KeyEntry, len(kr.list))
	for i, k := range kr.list {
		k.Cert = (*m)[k.Name]
		out[i] = k
	}
	return out
}

// loadCertificates reads and checks the configured certificates and puts
// them in force; on any error the ones in force stay.
func (kr *keyring) loadCertificates(paths map[string]string) error {
	names := make([]string, 0, len(paths))
	for name := range paths {
		names = append(names, name)
	}
	sort.Strings(names)
	m := keyCerts{}
	var errs []error
	for _, name := range names {
		der, err := kr.readCertificate(name, paths[name])
		if err != nil {
			errs = append(errs, fmt.Errorf("certificates[%s]: %w", name, err))
			continue
		}
		m[name] = der
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	// ListKeys answers in one frame, and clients (the Go client, the
	// PKCS#11 front) read at most proto.DefaultMaxFrame.
	list := make([]proto.KeyEntry, len(kr.list))
	for i, k := range kr.list {
		k.Cert = m[k.Name]
		list[i] = k
	}
	frame, err := proto.NewCodec().AppendResponseFrame(nil, &proto.Response{ID: 1 << 62, Keys: list})
	if err != nil {
		return err
	}
	if len(frame) > proto.DefaultMaxFrame {
		return fmt.Errorf("certificates: with them the key list is %d bytes, over the %d-byte frame clients read; name fewer", len(frame), proto.DefaultMaxFrame)
	}
	kr.certs.Store(&m)
	return nil
}

// readCertificate reads the first certificate of a PEM file and checks that
// it certifies the named key.
func (kr *keyring) readCertificate(name, path string) ([]byte, error) {
	e := kr.entry(name)
	if e == nil {
		return nil, errors.New("no provider serves this key")
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var der []byte
	for rest := data; der == nil; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		if b.Type == "CERTIFICATE" {
			der = b.Bytes
		}
	}
	if der == nil {
		return nil, fmt.Errorf("%s: no PEM CERTIFICATE block", path)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	pub, err := x509.ParsePKIXPublicKey(e.info.SPKI)
	if err != nil {
		return nil, fmt.Errorf("the key's public key: %w", err)
	}
	if k, ok := pub.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("%s certifies another key (subject %q), not this one", path, cert.Subject.String())
	}
	return der, nil
}
