package agent

import (
	"crypto/sha256"
	"crypto/tls"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"net"
	"strings"

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
	p := peer{addr: addr, name: leaf.Subject.CommonName}
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
