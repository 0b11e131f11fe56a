package agent

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"net"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/proto"
)

// peer is who is on the other end of a connection: a local process by its
// kernel-reported credentials, or a remote service by its verified client
// certificate. Tenants are mapped from this, never from anything the client
// says about itself.
type peer struct {
	unix     bool
	uid, gid uint32
	pid      int32
	name     string // mTLS: the URI SAN (a SPIFFE ID, say), else the subject CN
	// cert names an mTLS peer whose certificate has neither (a DNS-SAN
	// only one, as cert-manager and ACME issue): by its leaf's SHA-256,
	// so that its connections count as one client in the limits and the
	// audit records name the certificate, not an ephemeral port.
	cert string
	addr string
	// chain is an mTLS peer's certificates as sent (leaf first), kept to
	// check them again when the client CAs change (certInForce).
	chain []*x509.Certificate
}

// unixPeer reads SO_PEERCRED: the uid, gid and pid the kernel recorded when
// the client connected.
func unixPeer(uc *net.UnixConn) (peer, error) {
	cred, err := proto.UnixPeerCred(uc)
	if err != nil {
		return peer{}, err
	}
	return peer{unix: true, uid: cred.UID, gid: cred.GID, pid: cred.PID}, nil
}

var errNoClientCert = errors.New("no verified client certificate")

// tlsPeer names a mutually authenticated TLS peer by its leaf certificate.
func tlsPeer(cs tls.ConnectionState, addr string) (peer, error) {
	if len(cs.VerifiedChains) == 0 || len(cs.PeerCertificates) == 0 {
		return peer{}, errNoClientCert
	}
	leaf := cs.PeerCertificates[0]
	p := peer{addr: addr, name: leaf.Subject.CommonName, chain: cs.PeerCertificates}
	// A certificate that names its holder twice does not say which tenant
	// it is: which one a peer became would hang on attribute order, and a
	// CA may have checked only one of the names (SPIFFE X.509-SVIDs carry
	// exactly one URI SAN). crypto/x509 keeps the last CN of several.
	if len(leaf.URIs) > 1 {
		return peer{addr: addr}, errManyURIs
	}
	cns := 0
	for _, n := range leaf.Subject.Names {
		if n.Type.Equal(oidCommonName) {
			cns++
		}
	}
	if len(leaf.URIs) == 0 && cns > 1 {
		return peer{addr: addr}, errManyCNs
	}
	if len(leaf.URIs) > 0 {
		p.name = leaf.URIs[0].String()
	} else if strings.Contains(p.name, "://") {
		// A CN is free text to many CAs: one written as a URI must not
		// pass for the URI SAN (a SPIFFE ID, say) the policy names, nor
		// fall under a URI prefix.
		return p, errURIInCN
	}
	if p.name == "" {
		sum := sha256.Sum256(leaf.Raw)
		p.cert = "cert-sha256:" + hex.EncodeToString(sum[:16])
	}
	return p, nil
}

var (
	oidCommonName = asn1.ObjectIdentifier{2, 5, 4, 3}
	errManyURIs   = errors.New("the client certificate has more than one URI SAN: it must name its holder once")
	errManyCNs    = errors.New("the client certificate has no URI SAN and more than one subject CN: it must name its holder once")
)

var errURIInCN = errors.New("the client certificate has no URI SAN and a URI for its CN: a URI identity must be a URI SAN")

func (p peer) logFields() []zap.Field {
	if p.unix {
		return []zap.Field{zap.Uint32("peer_uid", p.uid), zap.Uint32("peer_gid", p.gid), zap.Int32("peer_pid", p.pid)}
	}
	return []zap.Field{zap.String("peer", p.String()), zap.String("peer_addr", p.addr)}
}

// chainsEnd is when the last of chains stops being valid: a chain ends
// with the first of its certificates to expire.
func chainsEnd(chains [][]*x509.Certificate) time.Time {
	var end time.Time
	for _, ch := range chains {
		var chEnd time.Time
		for i, c := range ch {
			if i == 0 || c.NotAfter.Before(chEnd) {
				chEnd = c.NotAfter
			}
		}
		if chEnd.After(end) {
			end = chEnd
		}
	}
	return end
}

var (
	errCertExpired   = &proto.Error{Code: proto.Unauthenticated, Msg: "the client certificate has expired since the handshake; connect again with a valid one"}
	errCertUntrusted = &proto.Error{Code: proto.Unauthenticated, Msg: "the client certificate no longer chains to a CA of client_ca_file; connect again with one that does"}
)

// certInForce checks an mTLS peer's certificate again before a request:
// the handshake's checks hold only while the certificate is within its
// validity and its CA is still in client_ca_file, and a connection may
// stay open for months. Verification runs again only after a reload has
// put other client CAs in force. The reader alone calls it, for mTLS
// peers only (peer.chain set).
func (c *conn) certInForce(now time.Time) error {
	if now.After(c.certEnd) {
		return errCertExpired
	}
	if c.a.tls == nil {
		return nil
	}
	cur := c.a.tls.current.Load()
	if cur == c.certUnder {
		return nil
	}
	inter := x509.NewCertPool()
	for _, ic := range c.peer.chain[1:] {
		inter.AddCert(ic)
	}
	chains, err := c.peer.chain[0].Verify(x509.VerifyOptions{
		Roots:         cur.ClientCAs,
		Intermediates: inter,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	if err != nil {
		c.log.Info("client certificate refused under the reloaded client CAs", zap.Error(err))
		return errCertUntrusted
	}
	c.certUnder, c.certEnd = cur, chainsEnd(chains)
	return nil
}
