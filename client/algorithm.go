package client

import (
	"crypto"
	"fmt"

	"github.com/sigil-agent/sigil/proto"
)

// Scheme is a signature scheme (the numbers are the wire protocol's).
type Scheme uint8

const (
	SchemeDefault  Scheme = Scheme(proto.SchemeDefault) // the key's default
	SchemeECDSA    Scheme = Scheme(proto.SchemeECDSA)
	SchemePKCS1v15 Scheme = Scheme(proto.SchemePKCS1v15)
	SchemePSS      Scheme = Scheme(proto.SchemePSS) // salt length = hash length
	SchemeEd25519  Scheme = Scheme(proto.SchemeEd25519)
)

// Algorithm is a scheme and hash; the zero value is the key's default.
type Algorithm struct {
	Scheme Scheme
	Hash   crypto.Hash // 0 for pure Ed25519 or the default
}

// ParseAlgorithm reads the CLI's algorithm names: ecdsa-sha256, ecdsa-sha384,
// rsa-pkcs1v15-sha256, rsa-pss-sha256 (… -sha384, -sha512), ed25519; "" is
// the key's default.
func ParseAlgorithm(s string) (Algorithm, error) {
	if s == "" {
		return Algorithm{}, nil
	}
	if s == "ed25519" {
		return Algorithm{Scheme: SchemeEd25519}, nil
	}
	for _, sc := range []struct {
		prefix string
		scheme Scheme
	}{{"ecdsa-", SchemeECDSA}, {"rsa-pkcs1v15-", SchemePKCS1v15}, {"rsa-pss-", SchemePSS}} {
		if len(s) > len(sc.prefix) && s[:len(sc.prefix)] == sc.prefix {
			switch s[len(sc.prefix):] {
			case "sha256":
				return Algorithm{sc.scheme, crypto.SHA256}, nil
			case "sha384":
				return Algorithm{sc.scheme, crypto.SHA384}, nil
			case "sha512":
				return Algorithm{sc.scheme, crypto.SHA512}, nil
			}
		}
	}
	return Algorithm{}, refused(proto.UnsupportedAlgorithm, fmt.Sprintf("unknown algorithm %q (want ecdsa-sha256, rsa-pkcs1v15-sha256, rsa-pss-sha256, ed25519, … with sha256/384/512)", s))
}

// DefaultAlgorithm is the algorithm the agent uses for a key type when the
// request names none.
func DefaultAlgorithm(keyType string) Algorithm {
	switch keyType {
	case "ecdsa-p384":
		return Algorithm{SchemeECDSA, crypto.SHA384}
	case "ed25519":
		return Algorithm{SchemeEd25519, 0}
	case "rsa-2048", "rsa-3072", "rsa-4096":
		return Algorithm{SchemePKCS1v15, crypto.SHA256}
	}
	return Algorithm{SchemeECDSA, crypto.SHA256}
}

func wireHash(h crypto.Hash) (uint8, error) {
	switch h {
	case 0:
		return proto.HashNone, nil
	case crypto.SHA256:
		return proto.HashSHA256, nil
	case crypto.SHA384:
		return proto.HashSHA384, nil
	case crypto.SHA512:
		return proto.HashSHA512, nil
	}
	return 0, refused(proto.UnsupportedAlgorithm, fmt.Sprintf("hash %v is not supported (SHA-256, SHA-384, SHA-512)", h))
}
