package rotation

import (
	"context"
	"crypto"
	"crypto/rsa"
	_ "crypto/sha256" // canary digests
	_ "crypto/sha512"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strconv"

	"github.com/zeebo/blake3"
	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/providers"
)

// KeyMaker generates a new key in a provider and serves it from then on.
// The software provider satisfies it as is; the agent adapts the PKCS#11
// provider (whose GenerateKey also takes a label and an id).
type KeyMaker interface {
	GenerateKey(ctx context.Context, name string, kt providers.KeyType) (providers.KeyInfo, error)
}

// Signer signs with a named key; every providers.Provider satisfies it.
type Signer interface {
	Sign(ctx context.Context, key string, alg providers.Algorithm, digest []byte) ([]byte, error)
}

// KeyDestroyer is optionally implemented by a KeyMaker that can destroy a
// key it generated (software: the key file; PKCS#11: C_DestroyObject on the
// private and the public object; AWS KMS: ScheduleKeyDeletion; GCP:
// DestroyCryptoKeyVersion; Azure Key Vault, which cannot delete one
// version: the version disabled). A rotation calls it only for the key of
// an attempt that never cut over, so never signed a request.
//
// DestroyKey finds the key generated under name (served or not), and calls
// check with its KeyInfo; when check returns an error, the key is kept and
// that error returned. A key that is not there is an error wrapping
// providers.ErrNotFound. The key stops being served before it is destroyed.
type KeyDestroyer interface {
	DestroyKey(ctx context.Context, name string, check func(providers.KeyInfo) error) error
}

// ErrKeyInUse: a key a failed rotation attempt would destroy is a version
// of a slot, or is served for another purpose, or is not the key the
// attempt generated. It is kept. The providers' own word for it (an AWS
// key an operator's alias names), so that a provider's refusal is read
// as the rotator's.
var ErrKeyInUse = providers.ErrInUse

// ErrKeyNotProvenUnused: a crashed attempt's key whose kid the journal
// does not hold (the attempt died between making it and its keygen
// record); a key under its name might be another's. It is kept.
var ErrKeyNotProvenUnused = errors.New("the key cannot be proven to be the attempt's")

// KeyLocator is optionally implemented by a KeyMaker whose keys a later
// configuration must name by URI (the PKCS#11 provider's URI method). The
// URI is kept with the version, so the agent can serve the key again after
// a restart.
type KeyLocator interface {
	URI(name string) (string, error)
}

// Attester is optionally implemented by a KeyMaker that can prove where a
// key lives (a YubiHSM2 or cloud HSM attestation certificate). The software
// provider and SoftHSM offer none.
type Attester interface {
	Attest(ctx context.Context, key providers.KeyInfo) (Attestation, error)
}

// Attestation is a device's statement about a key, quoted in the REP.
type Attestation struct {
	Format string // for example "yubihsm2-attestation-cert", "x509-chain-pem"
	Data   []byte
}

// CryptoSigner adapts a Signer and one of its keys to crypto.Signer, for
// x509.CreateCertificateRequest and other standard-library callers.
type CryptoSigner struct {
	ctx    context.Context
	signer Signer
	key    providers.KeyInfo
}

// NewCryptoSigner returns a crypto.Signer that signs with key through s,
// with ctx bounding each signature.
func NewCryptoSigner(ctx context.Context, s Signer, key providers.KeyInfo) *CryptoSigner {
	return &CryptoSigner{ctx: ctx, signer: s, key: key}
}

// Public implements crypto.Signer.
func (c *CryptoSigner) Public() crypto.PublicKey { return c.key.Public }

// Sign implements crypto.Signer. The scheme follows the key's type and
// opts: PSS when opts is *rsa.PSSOptions, else PKCS#1 v1.5 for RSA; pure
// Ed25519 (opts.HashFunc() == 0, digest is the message).
func (c *CryptoSigner) Sign(_ io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	alg, err := algorithmFor(c.key.Type, opts)
	if err != nil {
		return nil, err
	}
	if err := providers.CheckRequest(c.key.Type, alg, digest); err != nil {
		return nil, err
	}
	return c.signer.Sign(c.ctx, c.key.Name, alg, digest)
}

func algorithmFor(kt providers.KeyType, opts crypto.SignerOpts) (providers.Algorithm, error) {
	h := opts.HashFunc()
	switch {
	case kt == providers.KeyEd25519:
		return providers.Algorithm{Scheme: providers.SchemeEd25519, Hash: h}, nil
	case kt.IsECDSA():
		return providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: h}, nil
	case kt.IsRSA():
		if pss, ok := opts.(*rsa.PSSOptions); ok {
			if pss.SaltLength != rsa.PSSSaltLengthEqualsHash && pss.SaltLength != rsa.PSSSaltLengthAuto && pss.SaltLength != h.Size() {
				return providers.Algorithm{}, fmt.Errorf("pss salt length %d: providers use the hash length: %w", pss.SaltLength, providers.ErrUnsupportedAlgorithm)
			}
			return providers.Algorithm{Scheme: providers.SchemePSS, Hash: h}, nil
		}
		return providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: h}, nil
	}
	return providers.Algorithm{}, fmt.Errorf("key type %q: %w", kt, providers.ErrUnsupportedAlgorithm)
}

// CanaryScheme names how canary payloads are derived; it is written into
// every REP so a verifier can rebuild them.
const CanaryScheme = "sigil-canary/1"

// CanaryPayload is canary i (0-based) of a rotation to version n of slot:
//
//	"sigil-canary/1 <tenant>/<slot> v<n> <i>"
//
// Deterministic, so `sigil rep verify` re-derives every payload and checks
// every canary signature against the new public key offline.
func CanaryPayload(slot string, n, i int) []byte {
	b := make([]byte, 0, len(CanaryScheme)+len(slot)+24)
	b = append(b, CanaryScheme...)
	b = append(b, ' ')
	b = append(b, slot...)
	b = append(b, " v"...)
	b = strconv.AppendInt(b, int64(n), 10)
	b = append(b, ' ')
	return strconv.AppendInt(b, int64(i), 10)
}

// canaryInput is what gets signed for a payload under alg: its digest, or
// for pure Ed25519 the payload itself.
func canaryInput(alg providers.Algorithm, payload []byte) []byte {
	if alg.Hash == 0 {
		return payload
	}
	h := alg.Hash.New()
	h.Write(payload)
	return h.Sum(nil)
}

// canarySignaturesHash is BLAKE3-256 over len16(sig) ‖ sig for each
// signature in order, the hash a REP quotes.
func canarySignaturesHash(sigs [][]byte) [32]byte {
	h := blake3.New()
	var n [2]byte
	for _, s := range sigs {
		binary.BigEndian.PutUint16(n[:], uint16(len(s)))
		h.Write(n[:])
		h.Write(s)
	}
	var out [32]byte
	copy(out[:], h.Sum(nil))
	return out
}

// callProvider runs call, a call of op into a provider about key, with a
// panic in it (a bug in the provider or in a library under it) turned into
// a *providers.PanicError (INTERNAL), logged once with its stack: the
// rotation fails at its step as for the provider's error, journaled and
// retried by the rules of any failed attempt, and the agent serves on.
func (r *Rotator) callProvider(provider, op, key string, call func() error) (err error) {
	defer func() {
		if v := recover(); v != nil {
			pe := providers.Recovered(v, provider, op, key)
			r.log.Error("provider panicked; the call failed, the agent serves on",
				zap.String("provider", pe.Provider), zap.String("op", pe.Op), zap.String("key", pe.Key),
				zap.String("panic", pe.Value), zap.ByteString("stack", pe.Stack))
			err = pe
		}
	}()
	return call()
}
