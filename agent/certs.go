package agent

import (
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"maps"
	"os"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/agent/rotation"
	"github.com/sigil-agent/sigil/proto"
)

// Key certificates. The config names an X.509 certificate per key
// (`certificates:`, key name → PEM file, the key's certificate first, then
// any intermediates) and clients list them with the key: the PKCS#11 front shows each as a
// certificate object beside the key, which is how Java's SunPKCS11 keystore
// and NSS find a key for TLS client authentication or jarsigner, and the Go
// client makes a tls.Certificate of it. A file that does not parse, or a
// certificate for another key, is refused (at start the agent does not
// start; at a reload the certificates in force stay): serving a certificate
// whose key is not the one that signs would only fail later, at the peer.
// Reload reads the files again, so a renewed certificate needs no restart.

// keyCert is a key's certificate and the ones that followed it in the
// file (intermediates), DER.
type keyCert struct {
	leaf     []byte
	chain    [][]byte
	notAfter time.Time // the leaf's
}

// keyCerts maps key names to certificates; replaced whole.
type keyCerts map[string]keyCert

// cert returns the key's certificate and chain, zero without one.
func (kr *keyring) cert(name string) keyCert {
	if m := kr.certs.Load(); m != nil {
		return (*m)[name]
	}
	return keyCert{}
}

// listWithCerts is the ListKeys reply of every key, certificates included.
func (kr *keyring) listWithCerts() []proto.KeyEntry {
	m := kr.certs.Load()
	if m == nil || len(*m) == 0 {
		return kr.list
	}
	return withCerts(kr.list, *m)
}

// withCerts copies list with each key's certificate and chain from m.
func withCerts(list []proto.KeyEntry, m keyCerts) []proto.KeyEntry {
	out := make([]proto.KeyEntry, len(list))
	for i, k := range list {
		c := m[k.Name]
		k.Cert, k.Chain = c.leaf, c.chain
		out[i] = k
	}
	return out
}

// reloadCertificates puts in force the certificates paths names (the
// `certificates:` map of the config as Reload read it again), every file
// read again.
func (a *Agent) reloadCertificates(paths map[string]string) error {
	a.certMu.Lock()
	defer a.certMu.Unlock()
	if len(paths) == 0 && len(a.certPaths) == 0 {
		return nil
	}
	if err := a.loadCertificates(paths); err != nil {
		return err
	}
	a.certPaths = paths
	a.log.Info("key certificates reloaded", zap.Int("certificates", len(paths)))
	a.checkCertificates(time.Now())
	return nil
}

// loadCertificates is keyring.loadCertificates for the agent's keys: a
// certificate for a key version a rotation made and has since retired (so
// not served again at a start) is left out, with a warning, rather than
// failing the start or the reload. The operator named it while the version
// signed (docs/rotation.md, "Certificates"); the calendar retiring the
// version must not stop the next start. It is still read and checked
// against the version's recorded key, as it was while the version was
// served: a start and a reload refuse what a reload before the restart
// refused.
func (a *Agent) loadCertificates(paths map[string]string) error {
	skipped, err := a.keys.loadCertificates(paths, a.retiredVersionKeys)
	for _, name := range skipped {
		a.log.Warn("key certificate left out: its key is a rotated-out key version the agent no longer serves; remove it from certificates:",
			zap.String("key", name), zap.String("file", paths[name]))
	}
	return err
}

// retiredVersionKeys returns the recorded public keys of the rotation
// versions whose key is name, when every one of them is retired. Any other
// key, an accepted version whose key could not be served again at the start
// among them (it is no rotated-out key, and its signatures should still
// verify), gets none: its certificate is refused as that of any key no
// provider serves.
func (a *Agent) retiredVersionKeys(name string) []crypto.PublicKey {
	if a.rot == nil {
		return nil
	}
	now := time.Now()
	var pubs []crypto.PublicKey
	for _, sl := range a.rot.Store().Slots() {
		for _, v := range sl.Versions {
			if v.Key != name {
				continue
			}
			if v.StateAt(now) != rotation.StateRetired {
				return nil
			}
			pubs = append(pubs, v.Public)
		}
	}
	return pubs
}

// loadCertificates reads and checks the configured certificates and puts
// them in force; on any error the ones in force stay. A certificate for a
// key no provider serves is an error, unless retired returns that key's
// public keys (a retired rotation version's, one per version with that
// key name): then it is left out (the names left out are returned) if it
// certifies one of them, and still an error if it does not or cannot be
// read.
func (kr *keyring) loadCertificates(paths map[string]string, retired func(name string) []crypto.PublicKey) (skipped []string, err error) {
	m := keyCerts{}
	var errs []error
	for _, name := range slices.Sorted(maps.Keys(paths)) {
		if kr.entry(name) == nil {
			if pubs := retired(name); len(pubs) > 0 {
				if _, err := readCertificateOf(paths[name], pubs...); err != nil {
					errs = append(errs, fmt.Errorf("certificates[%s]: %w", name, err))
					continue
				}
				skipped = append(skipped, name)
				continue
			}
		}
		c, err := kr.readCertificate(name, paths[name])
		if err != nil {
			errs = append(errs, fmt.Errorf("certificates[%s]: %w", name, err))
			continue
		}
		m[name] = c
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	// ListKeys answers in one frame, and clients (the Go client, the
	// PKCS#11 front) read at most proto.DefaultMaxFrame.
	frame, err := proto.NewCodec().AppendResponseFrame(nil, &proto.Response{ID: 1 << 62, Keys: withCerts(kr.list, m)})
	if err != nil {
		return nil, err
	}
	if len(frame) > proto.DefaultMaxFrame {
		return nil, fmt.Errorf("certificates: with them the key list is %d bytes, over the %d-byte frame clients read; name fewer", len(frame), proto.DefaultMaxFrame)
	}
	kr.certs.Store(&m)
	return skipped, nil
}

// certExpiryWarning is how long before a certificate's end the agent starts
// saying so at each load.
const certExpiryWarning = 14 * 24 * time.Hour

// checkCertificates logs the certificates that have expired or soon will
// (they are still served: replacing them is the operator's move) and
// updates the expiry metric, which is what alerts should watch.
func (a *Agent) checkCertificates(now time.Time) {
	m := a.keys.certs.Load()
	a.metrics.certExpiry.Reset()
	if m == nil {
		return
	}
	for name, c := range *m {
		a.metrics.certExpiry.WithLabelValues(name).Set(float64(c.notAfter.Unix()))
		switch left := c.notAfter.Sub(now); {
		case left <= 0:
			a.log.Error("key certificate has expired; peers will refuse it", zap.String("key", name), zap.Time("not_after", c.notAfter))
		case left < certExpiryWarning:
			a.log.Warn("key certificate expires soon", zap.String("key", name), zap.Time("not_after", c.notAfter))
		}
	}
}

// readCertificate reads a PEM file, the key's certificate first and any
// intermediates after it, and checks that the first certifies the named key.
func (kr *keyring) readCertificate(name, path string) (keyCert, error) {
	e := kr.entry(name)
	if e == nil {
		return keyCert{}, errors.New("no provider serves this key")
	}
	pub, err := x509.ParsePKIXPublicKey(e.info.SPKI)
	if err != nil {
		return keyCert{}, fmt.Errorf("the key's public key: %w", err)
	}
	return readCertificateOf(path, pub)
}

// readCertificateOf reads a PEM file as readCertificate does and checks
// that the first certificate certifies one of pubs.
func readCertificateOf(path string, pubs ...crypto.PublicKey) (keyCert, error) {
	ders, certs, err := readCertificateChain(path)
	if err != nil {
		return keyCert{}, err
	}
	if !slices.ContainsFunc(pubs, func(pub crypto.PublicKey) bool {
		k, ok := pub.(interface{ Equal(crypto.PublicKey) bool })
		return ok && k.Equal(certs[0].PublicKey)
	}) {
		return keyCert{}, fmt.Errorf("%s certifies another key (subject %q), not this one", path, certs[0].Subject.String())
	}
	c := keyCert{leaf: ders[0], notAfter: certs[0].NotAfter}
	if len(ders) > 1 {
		c.chain = ders[1:]
	}
	return c, nil
}

// readCertificateChain reads a PEM file's certificates, in file order.
func readCertificateChain(path string) ([][]byte, []*x509.Certificate, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, err
	}
	var ders [][]byte
	for rest := data; ; {
		var b *pem.Block
		if b, rest = pem.Decode(rest); b == nil {
			break
		}
		if b.Type == "CERTIFICATE" {
			ders = append(ders, b.Bytes)
		}
	}
	if len(ders) == 0 {
		return nil, nil, fmt.Errorf("%s: no PEM CERTIFICATE block", path)
	}
	certs := make([]*x509.Certificate, len(ders))
	for i, der := range ders {
		if certs[i], err = x509.ParseCertificate(der); err != nil {
			return nil, nil, fmt.Errorf("%s: certificate %d: %w", path, i+1, err)
		}
	}
	return ders, certs, nil
}
