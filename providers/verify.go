package providers

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"fmt"
)

// Verify checks sig over digest (for Ed25519: the message) with Go's crypto.
// It returns nil for a valid signature, ErrInvalidSignature wrapped for an invalid
// one, and ErrUnsupportedAlgorithm when alg does not fit pub.
func Verify(pub crypto.PublicKey, alg Algorithm, digest, sig []byte) error {
	t, err := KeyTypeOf(pub)
	if err != nil {
		return err
	}
	if err := CheckRequest(t, alg, digest); err != nil {
		return err
	}
	ok := false
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		ok = ecdsa.VerifyASN1(k, digest, sig)
	case *rsa.PublicKey:
		if alg.Scheme == SchemePSS {
			// Auto accepts the hash-length salt Sigil's providers use and the
			// maximum-length salt some tokens and emulators produce.
			ok = rsa.VerifyPSS(k, alg.Hash, digest, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto}) == nil
		} else {
			ok = rsa.VerifyPKCS1v15(k, alg.Hash, digest, sig) == nil
		}
	case ed25519.PublicKey:
		ok = ed25519.Verify(k, digest, sig)
	}
	if !ok {
		return fmt.Errorf("signature does not verify: %w", ErrInvalidSignature)
	}
	return nil
}

// CheckReturned verifies a signature a remote provider (a cloud KMS)
// returned for digest against the served key's public key, before it is
// released. The service's answer names the key it used, but a signature
// by another key or version (a misrouted request, a key changed under its
// name, a faulty proxy) would otherwise go out under the served kid: fail
// closed instead. It costs a verification, nothing beside a network round
// trip.
func CheckReturned(info KeyInfo, alg Algorithm, digest, sig []byte) error {
	if err := Verify(info.Public, alg, digest, sig); err != nil {
		return fmt.Errorf("the signature returned does not verify against key %s's public key (kid %s): %w", info.Name, info.KID, ErrUnavailable)
	}
	return nil
}
