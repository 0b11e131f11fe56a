package policy

import (
	"crypto"

	"github.com/sigil-agent/sigil/providers"
)

// algorithmNames is every algorithm a policy can name, in canonical order. The
// names are the CLI's (client.ParseAlgorithm). A slot's allowed set is a bit
// mask over this table's indexes, so the hot path tests membership with one
// AND.
var algorithmNames = [...]struct {
	name string
	alg  providers.Algorithm
}{
	{"ecdsa-sha256", providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}},
	{"ecdsa-sha384", providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA384}},
	{"ecdsa-sha512", providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA512}},
	{"rsa-pkcs1v15-sha256", providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: crypto.SHA256}},
	{"rsa-pkcs1v15-sha384", providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: crypto.SHA384}},
	{"rsa-pkcs1v15-sha512", providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: crypto.SHA512}},
	{"rsa-pss-sha256", providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA256}},
	{"rsa-pss-sha384", providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA384}},
	{"rsa-pss-sha512", providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA512}},
	{"ed25519", providers.Algorithm{Scheme: providers.SchemeEd25519}},
}

// algSet is a set of algorithms: bit i is algorithmNames[i].
type algSet uint16

const allAlgorithms algSet = 1<<len(algorithmNames) - 1

// algorithmBit returns alg's bit, or 0 for an algorithm no policy can allow
// (an unknown scheme, a hash other than SHA-2, Ed25519 with a hash).
func algorithmBit(alg providers.Algorithm) algSet {
	var h int
	switch alg.Hash {
	case crypto.SHA256:
		h = 0
	case crypto.SHA384:
		h = 1
	case crypto.SHA512:
		h = 2
	case 0:
		if alg.Scheme == providers.SchemeEd25519 {
			return 1 << 9
		}
		return 0
	default:
		return 0
	}
	switch alg.Scheme {
	case providers.SchemeECDSA:
		return 1 << h
	case providers.SchemePKCS1v15:
		return 1 << (3 + h)
	case providers.SchemePSS:
		return 1 << (6 + h)
	}
	return 0
}

func parseAlgorithm(name string) (algSet, bool) {
	for i, a := range algorithmNames {
		if a.name == name {
			return 1 << i, true
		}
	}
	return 0, false
}

// names lists the set's algorithm names in canonical order.
func (s algSet) names() []string {
	out := make([]string, 0, len(algorithmNames))
	for i, a := range algorithmNames {
		if s&(1<<i) != 0 {
			out = append(out, a.name)
		}
	}
	return out
}

func (s algSet) algorithms() []providers.Algorithm {
	out := make([]providers.Algorithm, 0, len(algorithmNames))
	for i, a := range algorithmNames {
		if s&(1<<i) != 0 {
			out = append(out, a.alg)
		}
	}
	return out
}

// digestSize is the digest length alg's hash produces, or -1 when the
// request carries the message itself (pure Ed25519). It never panics, unlike
// crypto.Hash.Size for an unlinked hash.
func digestSize(alg providers.Algorithm) int {
	switch alg.Hash {
	case crypto.SHA256:
		return 32
	case crypto.SHA384:
		return 48
	case crypto.SHA512:
		return 64
	}
	return -1
}

// AlgorithmNames lists every algorithm name a policy may use, in canonical
// order.
func AlgorithmNames() []string { return allAlgorithms.names() }
