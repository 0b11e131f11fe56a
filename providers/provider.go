package providers

import (
	"context"
	"crypto"
)

// Provider is a key backend. Implementations are safe for concurrent use.
type Provider interface {
	// ID is the provider's name from the configuration (for example "soft" or
	// "hsm-prod"); it is part of every kid the provider's keys carry.
	ID() string
	// Keys lists the keys the provider serves, with their public halves.
	Keys(ctx context.Context) ([]KeyInfo, error)
	// Sign signs digest (for Ed25519: the message) with the named key. The
	// caller has validated the request with CheckRequest. The result has the
	// encoding Go's crypto.Signer gives: ASN.1 DER for ECDSA, the raw
	// signature for RSA and Ed25519.
	Sign(ctx context.Context, key string, alg Algorithm, digest []byte) ([]byte, error)
	// Close releases sessions and handles; Sign fails with ErrUnavailable after it.
	Close() error
}

// KeyInfo describes one key a provider serves.
type KeyInfo struct {
	Name     string // unique across the agent's configuration
	Provider string // the provider's ID
	KID      string // see ComputeKID
	Type     KeyType
	Public   crypto.PublicKey
	SPKI     []byte // DER SubjectPublicKeyInfo of Public
}

// NewKeyInfo fills in SPKI, Type and KID for a public key.
func NewKeyInfo(provider, name string, pub crypto.PublicKey) (KeyInfo, error) {
	kt, err := KeyTypeOf(pub)
	if err != nil {
		return KeyInfo{}, err
	}
	spki, err := marshalSPKI(pub)
	if err != nil {
		return KeyInfo{}, err
	}
	return KeyInfo{
		Name:     name,
		Provider: provider,
		KID:      ComputeKID(spki, provider, name),
		Type:     kt,
		Public:   pub,
		SPKI:     spki,
	}, nil
}

// Remote is implemented by providers whose Sign waits on a network (cloud
// KMS). The agent runs their calls off a connection's reader, so one slow
// call does not hold up the connection's other requests.
type Remote interface {
	Remote() bool
}

// IsRemote reports whether p declares itself Remote.
func IsRemote(p Provider) bool {
	r, ok := p.(Remote)
	return ok && r.Remote()
}

// PoolStats is what a provider with a session pool reports for monitoring.
type PoolStats struct {
	Size    int    // sessions the pool keeps open
	Open    int    // sessions open now (idle and in use)
	Idle    int    // sessions waiting for a signature
	Repairs uint64 // repairs done since start: re-logins, module reloads, session sweeps
}

// PoolReporter is implemented by providers with a session pool (PKCS#11).
type PoolReporter interface {
	PoolStats() PoolStats
}
