package agent

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"sync/atomic"
	"time"

	"github.com/sigil-agent/sigil/providers"
)

// TCPConfig configures the mutual-TLS listener for services on other hosts
// (or in other network namespaces). Every client must present a certificate
// that chains to ClientCAFile; TLS 1.3 only.
type TCPConfig struct {
	Listen       string `yaml:"listen"`         // host:port, e.g. 127.0.0.1:7443
	CertFile     string `yaml:"cert_file"`      // the agent's certificate chain (PEM)
	KeyFile      string `yaml:"key_file"`       // its private key (PEM, 0600)
	ClientCAFile string `yaml:"client_ca_file"` // CAs whose client certificates are accepted (PEM)
	// HandshakeTimeout bounds a TLS handshake (default 10s), so a client
	// that connects and says nothing holds a socket for no longer.
	HandshakeTimeout time.Duration `yaml:"handshake_timeout"`
}

func (t *TCPConfig) validate() error {
	if t.Listen == "" {
		return nil
	}
	var errs []error
	for _, f := range []struct{ name, val string }{{"cert_file", t.CertFile}, {"key_file", t.KeyFile}, {"client_ca_file", t.ClientCAFile}} {
		if f.val == "" {
			errs = append(errs, fmt.Errorf("tcp.%s is required with tcp.listen (the TCP listener is mutual TLS only)", f.name))
		}
	}
	return errors.Join(errs...)
}

// tlsMaterial holds the current certificates; Reload swaps them so new
// handshakes use renewed certificates without a restart, while established
// connections carry on as long as their client's certificate chains to the
// client CAs in force (certInForce).
type tlsMaterial struct {
	cfg     TCPConfig
	current atomic.Pointer[tls.Config]
}

func newTLSMaterial(cfg TCPConfig) (*tlsMaterial, error) {
	m := &tlsMaterial{}
	if err := m.reloadFrom(cfg); err != nil {
		return nil, err
	}
	return m, nil
}

// reloadFrom puts in force the files cfg names, and remembers cfg as the
// paths in force; on an error the certificates in force stay, and so do
// their paths. Reload calls it serialized (Agent.reloadMu).
func (m *tlsMaterial) reloadFrom(cfg TCPConfig) error {
	certPEM, err := os.ReadFile(cfg.CertFile)
	if err != nil {
		return fmt.Errorf("tls: %w", err)
	}
	// Who reads the key can pass for the agent to remote clients: held
	// to the PIN file's rule.
	keyPEM, _, err := providers.ReadPrivateFile(cfg.KeyFile)
	if err != nil {
		return fmt.Errorf("tls: key_file: %w", err)
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	clear(keyPEM)
	if err != nil {
		return fmt.Errorf("tls: load %s / %s: %w", cfg.CertFile, cfg.KeyFile, err)
	}
	caPEM, err := os.ReadFile(cfg.ClientCAFile)
	if err != nil {
		return fmt.Errorf("tls: client CAs: %w", err)
	}
	pool, err := clientCAPool(caPEM)
	if err != nil {
		return fmt.Errorf("tls: %s: %w", cfg.ClientCAFile, err)
	}
	m.cfg = cfg
	m.current.Store(&tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
	})
	return nil
}

// ListenTLS opens the mutual-TLS listener of cfg.TCP.
func (a *Agent) ListenTLS() (net.Listener, error) {
	if a.tls == nil {
		return nil, errors.New("no tcp listener configured")
	}
	ln, err := net.Listen("tcp", a.cfg.TCP.Listen)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", a.cfg.TCP.Listen, err)
	}
	return a.WrapTLS(ln)
}

// WrapTLS serves mutual TLS on ln (a TCP listener made elsewhere, e.g. one
// inherited from systemd socket activation) with the certificates of
// cfg.TCP, reloaded like ListenTLS's.
func (a *Agent) WrapTLS(ln net.Listener) (net.Listener, error) {
	if a.tls == nil {
		return nil, errors.New("no tcp listener configured (tcp.cert_file, tcp.key_file, tcp.client_ca_file)")
	}
	return tls.NewListener(ln, &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
			return a.tls.current.Load(), nil
		},
	}), nil
}

// clientCAPool parses a client CA file whole. x509.CertPool's
// AppendCertsFromPEM keeps what parses before a damaged block and skips
// blocks of other types: a bundle caught half written would load with its
// last CAs missing, and open connections of their clients would be cut
// (certInForce), with the reload reported a success.
func clientCAPool(data []byte) (*x509.CertPool, error) {
	pool := x509.NewCertPool()
	n := 0
	rest := data
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		n++
		if b.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("PEM block %d is a %s, not a CERTIFICATE", n, b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", n, err)
		}
		pool.AddCert(c)
	}
	if bytes.Contains(rest, []byte("-----BEGIN")) {
		return nil, fmt.Errorf("the PEM block after certificate %d is incomplete", n)
	}
	if n == 0 {
		return nil, errors.New("holds no PEM certificate")
	}
	return pool, nil
}
