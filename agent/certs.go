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

// attachCertificates gives keys the X.509 certificates the config names
// (`certificates:`, key name → PEM file, the key's certificate first).
// Clients list them with the key: the PKCS#11 front shows each as a
// certificate object beside the key, which is how Java's SunPKCS11 keystore
// and NSS find a key for TLS client authentication or jarsigner. A file
// that does not parse, or a certificate for another key, stops the start:
// serving a certificate whose key is not the one that signs would only
// fail later, at the peer.
func (kr *keyring) attachCertificates(certs map[string]string) error {
	names := make([]string, 0, len(certs))
	for name := range certs {
		names = append(names, name)
	}
	sort.Strings(names)
	var errs []error
	for _, name := range names {
		if err := kr.attachCertificate(name, certs[name]); err != nil {
			errs = append(errs, fmt.Errorf("certificates[%s]: %w", name, err))
		}
	}
	if len(errs) == 0 && len(names) > 0 {
		// ListKeys answers in one frame, and clients (the Go client,
		// the PKCS#11 front) read at most proto.DefaultMaxFrame.
		frame, err := proto.NewCodec().AppendResponseFrame(nil, &proto.Response{ID: 1 << 62, Keys: kr.list})
		if err != nil {
			return err
		}
		if len(frame) > proto.DefaultMaxFrame {
			return fmt.Errorf("certificates: with them the key list is %d bytes, over the %d-byte frame clients read; name fewer", len(frame), proto.DefaultMaxFrame)
		}
	}
	return errors.Join(errs...)
}

func (kr *keyring) attachCertificate(name, path string) error {
	e := kr.entry(name)
	if e == nil {
		return errors.New("no provider serves this key")
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var der []byte
	for rest := data; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		if b.Type == "CERTIFICATE" {
			der = b.Bytes
			break
		}
	}
	if der == nil {
		return fmt.Errorf("%s: no PEM CERTIFICATE block", path)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	pub, err := x509.ParsePKIXPublicKey(e.info.SPKI)
	if err != nil {
		return fmt.Errorf("the key's public key: %w", err)
	}
	if k, ok := pub.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(cert.PublicKey) {
		return fmt.Errorf("%s certifies another key (subject %q), not this one", path, cert.Subject.String())
	}
	e.cert = der
	for i := range kr.list {
		if kr.list[i].Name == name {
			kr.list[i].Cert = der
		}
	}
	return nil
}
