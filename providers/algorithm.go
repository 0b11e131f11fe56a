package providers

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"fmt"
)

// Scheme is a signature scheme, independent of the hash.
type Scheme uint8

// The values equal the wire protocol's (package proto) so conversion is a cast.
const (
	SchemeECDSA    Scheme = 1 // ASN.1 DER signature over a digest
	SchemePKCS1v15 Scheme = 2 // RSASSA-PKCS1-v1_5 over a digest (DigestInfo added by the signer)
	SchemePSS      Scheme = 3 // RSASSA-PSS, MGF1 with the same hash, salt length = hash length
	SchemeEd25519  Scheme = 4 // pure Ed25519 over the message
)

func (s Scheme) String() string {
	switch s {
	case SchemeECDSA:
		return "ecdsa"
	case SchemePKCS1v15:
		return "rsa-pkcs1v15"
	case SchemePSS:
		return "rsa-pss"
	case SchemeEd25519:
		return "ed25519"
	}
	return fmt.Sprintf("scheme(%d)", uint8(s))
}

// Algorithm is a scheme with its hash. Hash is 0 for pure Ed25519.
type Algorithm struct {
	Scheme Scheme
	Hash   crypto.Hash
}

func (a Algorithm) String() string {
	if a.Hash == 0 {
		return a.Scheme.String()
	}
	// The agent names the algorithm in every audit record: the usual
	// pairs come from a switch, so that costs no allocation.
	switch a {
	case Algorithm{SchemeECDSA, crypto.SHA256}:
		return "ecdsa-sha256"
	case Algorithm{SchemeECDSA, crypto.SHA384}:
		return "ecdsa-sha384"
	case Algorithm{SchemePKCS1v15, crypto.SHA256}:
		return "rsa-pkcs1v15-sha256"
	case Algorithm{SchemePSS, crypto.SHA256}:
		return "rsa-pss-sha256"
	}
	return a.Scheme.String() + "-" + hashName(a.Hash)
}

func hashName(h crypto.Hash) string {
	switch h {
	case crypto.SHA256:
		return "sha256"
	case crypto.SHA384:
		return "sha384"
	case crypto.SHA512:
		return "sha512"
	}
	return h.String()
}

// KeyType names the key's family and size.
type KeyType string

const (
	KeyECDSAP256 KeyType = "ecdsa-p256"
	KeyECDSAP384 KeyType = "ecdsa-p384"
	KeyRSA2048   KeyType = "rsa-2048"
	KeyRSA3072   KeyType = "rsa-3072"
	KeyRSA4096   KeyType = "rsa-4096"
	KeyEd25519   KeyType = "ed25519"
)

// KeyTypes lists the supported key types in a stable order.
var KeyTypes = []KeyType{KeyECDSAP256, KeyECDSAP384, KeyRSA2048, KeyRSA3072, KeyRSA4096, KeyEd25519}

// KeyTypeOf classifies a public key; other curves and sizes are unsupported.
func KeyTypeOf(pub crypto.PublicKey) (KeyType, error) {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256():
			return KeyECDSAP256, nil
		case elliptic.P384():
			return KeyECDSAP384, nil
		}
		return "", fmt.Errorf("ecdsa curve %s: %w", k.Curve.Params().Name, ErrUnsupportedAlgorithm)
	case *rsa.PublicKey:
		switch k.N.BitLen() {
		case 2048:
			return KeyRSA2048, nil
		case 3072:
			return KeyRSA3072, nil
		case 4096:
			return KeyRSA4096, nil
		}
		return "", fmt.Errorf("rsa-%d: %w", k.N.BitLen(), ErrUnsupportedAlgorithm)
	case ed25519.PublicKey:
		return KeyEd25519, nil
	}
	return "", fmt.Errorf("public key %T: %w", pub, ErrUnsupportedAlgorithm)
}

// IsRSA reports whether the key type is an RSA size.
func (t KeyType) IsRSA() bool { return t == KeyRSA2048 || t == KeyRSA3072 || t == KeyRSA4096 }

// IsECDSA reports whether the key type is an ECDSA curve.
func (t KeyType) IsECDSA() bool { return t == KeyECDSAP256 || t == KeyECDSAP384 }

// DefaultAlgorithm is what a caller gets when it names no algorithm: the
// scheme of the key's family with the hash matched to its strength.
func (t KeyType) DefaultAlgorithm() Algorithm {
	switch t {
	case KeyECDSAP384:
		return Algorithm{SchemeECDSA, crypto.SHA384}
	case KeyEd25519:
		return Algorithm{SchemeEd25519, 0}
	case KeyRSA2048, KeyRSA3072, KeyRSA4096:
		return Algorithm{SchemePKCS1v15, crypto.SHA256}
	}
	return Algorithm{SchemeECDSA, crypto.SHA256}
}

// CheckRequest validates that alg suits a key of type t and that digest has the
// length alg's hash produces. Pure Ed25519 takes the message itself, of any
// length (the wire frame bounds it). The agent calls this once before Sign, so
// every provider rejects the same inputs with the same error.
func CheckRequest(t KeyType, alg Algorithm, digest []byte) error {
	switch alg.Scheme {
	case SchemeECDSA:
		if !t.IsECDSA() {
			return refuse(ErrUnsupportedAlgorithm, "%s is not for a key of type %s", alg.Scheme, t)
		}
	case SchemePKCS1v15, SchemePSS:
		if !t.IsRSA() {
			return refuse(ErrUnsupportedAlgorithm, "%s is not for a key of type %s", alg.Scheme, t)
		}
	case SchemeEd25519:
		if t != KeyEd25519 {
			return refuse(ErrUnsupportedAlgorithm, "%s is not for a key of type %s", alg.Scheme, t)
		}
		if alg.Hash != 0 {
			return refuse(ErrUnsupportedAlgorithm, "ed25519 signs the message itself, not a %s digest", hashName(alg.Hash))
		}
		return nil
	default:
		return refuse(ErrUnsupportedAlgorithm, "unknown signature scheme %d", uint8(alg.Scheme))
	}
	switch alg.Hash {
	case crypto.SHA256, crypto.SHA384, crypto.SHA512:
	default:
		return refuse(ErrUnsupportedAlgorithm, "hash %v is not supported (sha256, sha384, sha512)", alg.Hash)
	}
	if len(digest) != alg.Hash.Size() {
		return refuse(ErrBadRequest, "digest of %d bytes for %s (want %d)", len(digest), hashName(alg.Hash), alg.Hash.Size())
	}
	return nil
}

// refusal is a request refused for what it asks. Its text is the reason
// alone: the agent sends it to the caller after the name of the code kind
// maps to, which kind's own text ("bad request") would only repeat.
type refusal struct {
	reason string
	kind   error // ErrUnsupportedAlgorithm or ErrBadRequest
}

func (r *refusal) Error() string { return r.reason }
func (r *refusal) Unwrap() error { return r.kind }

func refuse(kind error, format string, args ...any) error {
	return &refusal{reason: fmt.Sprintf(format, args...), kind: kind}
}

func marshalSPKI(pub crypto.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("marshal public key: %w", err)
	}
	return der, nil
}
