package client

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"time"

	"github.com/sigil-agent/sigil/proto"
)

// Signer is a crypto.Signer backed by a key behind the agent. It signs
// only with the key whose public half Public returns: by kid, and, made
// from a name, by the name and the kid both, so that the agent applies that
// key slot's policy (two slots may share a key). When that key no longer
// signs under the name, Sign fails and Public still returns it: after the
// slot rotated to another version, KEY_RETIRED (the old version accepted
// or retired alike); for a name that now means another key, NOT_FOUND. A
// new Signer (or TLSCertificate) signs with the current key.
type Signer struct {
	c       *Client
	key     Key
	ref     KeyRef       // what Sign asks for: the kid, and the name if one was given
	timeout atomic.Int64 // per Sign, in ns: SetTimeout may run while it serves
}

func newSigner(c *Client, key Key, ref KeyRef) *Signer {
	s := &Signer{c: c, key: key, ref: ref}
	s.timeout.Store(int64(DefaultSignerTimeout))
	return s
}

// DefaultSignerTimeout bounds each Sign of a Signer: crypto.Signer has no
// context, so the deadline is set here. It is the only bound: the deadline
// of a TLS handshake that signs (HandshakeContext, which http.Server sets
// from its timeouts) does not reach the Signer, so a wedged agent holds
// such a handshake, and its goroutine, until the Sign's deadline, and the
// handshake then fails (DEADLINE_EXCEEDED in the Signer's error, or the
// handshake's own context error). A server with a shorter handshake
// timeout sets the Signer's to match (SetTimeout). While the agent is
// stopped or restarting and its socket is gone, Sign fails at once with
// UNAVAILABLE. Under systemd's socket activation the socket stays and takes
// the connect: the first Sign waits for the agent up to its deadline, and
// the Signs made meanwhile wait with it, each up to its own (all are served
// if the agent starts in time); once one has given up at its deadline after
// waiting half a second or more, the Signs made after it fail at once with
// UNAVAILABLE until the agent answers, and in an outage the client has
// seen (a reconnect left unanswered, within the last 30 s), every Sign
// fails within 100 ms (the package doc, on restarts).
const DefaultSignerTimeout = 10 * time.Second

// Signer returns a crypto.Signer for the key. ctx bounds only the public key
// lookup; each Sign is bounded by DefaultSignerTimeout (see SetTimeout).
func (c *Client) Signer(ctx context.Context, ref KeyRef) (*Signer, error) {
	k, err := c.PublicKey(ctx, ref)
	if err != nil {
		return nil, err
	}
	return newSigner(c, k, KeyRef{Name: ref.Name, KID: k.KID}), nil
}

// TLSCertificate returns the named key as a tls.Certificate, for a
// tls.Config's Certificates or GetClientCertificate: the key's certificate
// and its intermediates as the agent lists them (the agent config's
// `certificates:` file) and a Signer for the private key, which stays
// behind the agent. A name the agent's key list has no certificate under
// (no such key, or a key without one) is NOT_FOUND, with
// ErrNoCertificate in the chain: the client's finding, not a
// *proto.Error.
// name is what Signer takes: a key name, or a policy slot as the tenant
// sees it ("release") or qualified ("payments/release").
//
// TLS picks the signature scheme from the peer's preferences before the
// agent's policy has a say: under a slot policy that allows some
// algorithms only, set SupportedSignatureAlgorithms to those, or the
// handshakes whose pick falls outside them fail (UNSUPPORTED_ALGORITHM in
// the server's error). Go's TLS 1.2 signs with ECDSA SHA-256 for a P-384
// key and prefers RSA-PSS; TLS 1.3 signs RSA with PSS only.
//
// The PrivateKey is a *Signer: each handshake's signature waits at most
// DefaultSignerTimeout (cert.PrivateKey.(*Signer).SetTimeout changes it).
// After the slot rotates, the certificate still binds the old key and its
// handshakes fail with KEY_RETIRED; call TLSCertificate again once the new
// key has a certificate (docs/rotation.md, "Certificates").
func (c *Client) TLSCertificate(ctx context.Context, name string) (tls.Certificate, error) {
	keys, err := c.ListKeys(ctx)
	if err != nil {
		return tls.Certificate{}, err
	}
	k, found := keyNamed(keys, name)
	if _, short, qualified := strings.Cut(name, "/"); !found && qualified {
		// The list names a tenant's slots short. Which key a qualified
		// name means is the agent's to say (it may name another tenant's
		// slot, which this caller cannot have).
		pk, err := c.PublicKey(ctx, ByName(name))
		if err != nil {
			return tls.Certificate{}, err
		}
		if k, found = keyNamed(keys, short); found && k.KID != pk.KID {
			found = false
		}
	}
	if !found {
		return tls.Certificate{}, noCertificate(fmt.Sprintf("no key named %q", name))
	}
	if k.Certificate == nil {
		return tls.Certificate{}, noCertificate(fmt.Sprintf("the agent has no certificate for key %q", name))
	}
	leaf, err := x509.ParseCertificate(k.Certificate)
	if err != nil {
		return tls.Certificate{}, malformedReply(fmt.Sprintf("ListKeys reply: key %q: certificate", name), err)
	}
	return tls.Certificate{
		Certificate: append([][]byte{k.Certificate}, k.Intermediates...),
		PrivateKey:  newSigner(c, k, KeyRef{Name: name, KID: k.KID}),
		Leaf:        leaf,
	}, nil
}

func keyNamed(keys []Key, name string) (Key, bool) {
	for _, k := range keys {
		if k.Name == name {
			return k, true
		}
	}
	return Key{}, false
}

// SetTimeout changes the per-signature deadline; it may be called while
// the Signer is in use. A deadline of 0 or less fails every Sign at once.
func (s *Signer) SetTimeout(d time.Duration) { s.timeout.Store(int64(d)) }

// Public implements crypto.Signer.
func (s *Signer) Public() crypto.PublicKey { return s.key.Public }

// Key describes the key behind the signer. Its Provider is set only for a
// Signer from TLSCertificate: the agent names providers in its key list,
// not in a single key's lookup.
func (s *Signer) Key() Key { return s.key }

// Sign implements crypto.Signer. For ECDSA and RSA, digest is the hash named
// by opts; *rsa.PSSOptions selects PSS (salt length = hash length, which
// verifiers using PSSSaltLengthAuto or EqualsHash accept). ECDSA with
// opts.HashFunc() 0 (or nil opts) takes the hash from the digest's length,
// 32, 48 or 64 bytes (SHA-256, -384, -512), as ecdsa.PrivateKey signs any
// digest it is given. RSA needs a hash: opts.HashFunc() 0 (raw PKCS#1 v1.5)
// is UNSUPPORTED_ALGORITHM. For Ed25519, digest is the message and
// opts.HashFunc() must be 0 (Ed25519ph is not supported). rand is unused:
// the key's holder supplies randomness.
func (s *Signer) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	alg, err := s.algorithm(opts, len(digest))
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(s.timeout.Load()))
	defer cancel()
	sig, err := s.c.Sign(ctx, s.ref, alg, digest)
	if err != nil {
		var pe *proto.Error
		if errors.As(err, &pe) && pe.Code == proto.KeyRetired {
			// The agent's remedy (a request without the kid) is not one a
			// Signer can take: it signs only with the key Public returns.
			return nil, failed(fmt.Sprintf("Sign with this Signer's key, kid %s (a new Signer or TLSCertificate takes the slot's current key)", s.key.KID), err)
		}
		return nil, err
	}
	return sig.Sig, nil
}

func (s *Signer) algorithm(opts crypto.SignerOpts, digestLen int) (Algorithm, error) {
	h := crypto.Hash(0)
	if opts != nil {
		h = opts.HashFunc()
	}
	switch s.key.Public.(type) {
	case ed25519.PublicKey:
		if h != 0 {
			return Algorithm{}, unsupported("Ed25519ph (a pre-hashed Ed25519 signature) is not supported; pass crypto.Hash(0) and the message")
		}
		if o, ok := opts.(*ed25519.Options); ok && o.Context != "" {
			// ed25519.PrivateKey signs Ed25519ctx for a context; a pure
			// Ed25519 signature in its place would not verify as one.
			return Algorithm{}, unsupported("Ed25519ctx (a context string in ed25519.Options) is not supported; only pure Ed25519")
		}
		return Algorithm{SchemeEd25519, 0}, nil
	case *ecdsa.PublicKey:
		if h == 0 {
			// On the wire hash 0 is the curve's hash, whose length the
			// agent then requires of the digest.
			switch digestLen {
			case crypto.SHA256.Size():
				h = crypto.SHA256
			case crypto.SHA384.Size():
				h = crypto.SHA384
			case crypto.SHA512.Size():
				h = crypto.SHA512
			default:
				return Algorithm{}, unsupported(fmt.Sprintf("ECDSA without a hash in opts: a %d-byte digest is no SHA-256, -384 or -512 digest", digestLen))
			}
		}
		return Algorithm{SchemeECDSA, h}, nil
	case *rsa.PublicKey:
		if h == 0 {
			// crypto.Signer's hash 0 asks for PKCS#1 v1.5 over raw data, but on
			// the wire hash 0 means the default, SHA-256 with its DigestInfo:
			// the signature would verify only as a SHA-256 one. (PSSOptions
			// without a Hash lands here too, before h.Size() can panic.)
			return Algorithm{}, unsupported("RSA needs a hash (SHA-256, SHA-384, SHA-512) in opts; raw PKCS#1 v1.5 (crypto.Hash(0)) is not supported")
		}
		if pss, ok := opts.(*rsa.PSSOptions); ok {
			switch pss.SaltLength {
			case rsa.PSSSaltLengthEqualsHash, rsa.PSSSaltLengthAuto:
			default:
				if pss.SaltLength != h.Size() {
					return Algorithm{}, unsupported(fmt.Sprintf("PSS salt length %d; the agent uses the hash length (%d)", pss.SaltLength, h.Size()))
				}
			}
			return Algorithm{SchemePSS, h}, nil
		}
		return Algorithm{SchemePKCS1v15, h}, nil
	}
	return Algorithm{}, unsupported(fmt.Sprintf("public key type %T", s.key.Public))
}

func unsupported(msg string) error {
	return refused(proto.UnsupportedAlgorithm, msg)
}
