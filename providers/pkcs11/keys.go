package pkcs11

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/asn1"
	"encoding/binary"
	"errors"
	"fmt"
	"math/big"
	"sync/atomic"

	p11 "github.com/miekg/pkcs11"
	"github.com/sigil-agent/sigil/providers"
)

// Mechanisms and key types miekg/pkcs11 v1.1.2 does not define (PKCS#11 v3.0).
const (
	ckmEDDSA                = 0x1057
	ckmECEdwardsKeyPairGen  = 0x1055
	ckkECEdwards            = 0x40
	maxSignatureLen         = 512 // RSA-4096
	maxPKCS1v15InputLen     = 19 + 64
	ecdsaP256SignatureBytes = 64
	ecdsaP384SignatureBytes = 96
)

var (
	oidP256    = asn1.ObjectIdentifier{1, 2, 840, 10045, 3, 1, 7}
	oidP384    = asn1.ObjectIdentifier{1, 3, 132, 0, 34}
	oidEd25519 = asn1.ObjectIdentifier{1, 3, 101, 112}
)

// key is one served key. info and obj never change; handle is the private
// key's object handle and the module generation it was found in (nil when
// the object could not be found after a re-login).
type key struct {
	info   providers.KeyInfo
	obj    objectSelector
	sigLen int
	handle atomic.Pointer[keyHandle]
}

// keyHandle is an object handle with the module generation it belongs to.
// A provider's generation moves when its reload starts, its handles only as
// its key search reaches each key; the number of a handle from an older
// generation may name another object now (another provider's key), so
// Sign passes a handle to the module only in its own generation. gen is
// that of the session the handle was found (or generated) through: one a
// reload had voided gives a handle Sign refuses, not one it trusts. One
// value, so that a signer never reads a number with another's generation.
type keyHandle struct {
	obj p11.ObjectHandle
	gen uint64
}

// setHandle records h, found in module generation gen.
func (k *key) setHandle(h p11.ObjectHandle, gen uint64) {
	k.handle.Store(&keyHandle{obj: h, gen: gen})
}

// signParams picks the mechanism for alg and fills in the module's input: the
// digest, DigestInfo‖digest for PKCS#1 v1.5 (built in buf), or the message
// for Ed25519.
func (k *key) signParams(alg providers.Algorithm, digest []byte, buf *[maxPKCS1v15InputLen]byte) (signParams, []byte, error) {
	switch alg.Scheme {
	case providers.SchemeECDSA:
		return signParams{mech: p11.CKM_ECDSA}, digest, nil
	case providers.SchemeEd25519:
		return signParams{mech: ckmEDDSA}, digest, nil
	case providers.SchemePKCS1v15:
		prefix, err := providers.DigestInfoPrefix(alg.Hash)
		if err != nil {
			return signParams{}, nil, err
		}
		n := copy(buf[:], prefix)
		n += copy(buf[n:], digest)
		return signParams{mech: p11.CKM_RSA_PKCS}, buf[:n], nil
	case providers.SchemePSS:
		// Salt length = hash length: what crypto/rsa's PSSSaltLengthEqualsHash
		// and the providers contract fix for every backend.
		var hashMech, mgf uint
		switch alg.Hash {
		case crypto.SHA256:
			hashMech, mgf = p11.CKM_SHA256, p11.CKG_MGF1_SHA256
		case crypto.SHA384:
			hashMech, mgf = p11.CKM_SHA384, p11.CKG_MGF1_SHA384
		case crypto.SHA512:
			hashMech, mgf = p11.CKM_SHA512, p11.CKG_MGF1_SHA512
		default:
			return signParams{}, nil, fmt.Errorf("pss with %v: %w", alg.Hash, providers.ErrUnsupportedAlgorithm)
		}
		return signParams{mech: p11.CKM_RSA_PKCS_PSS, pssHash: hashMech, pssMGF: mgf, pssSaltLen: uint(alg.Hash.Size())}, digest, nil
	}
	return signParams{}, nil, fmt.Errorf("%s: %w", alg.Scheme, providers.ErrUnsupportedAlgorithm)
}

// encode turns the module's signature into the crypto.Signer encoding.
func (k *key) encode(raw []byte) ([]byte, error) {
	if k.info.Type.IsECDSA() {
		if len(raw) != k.sigLen {
			return nil, fmt.Errorf("module returned a %d-byte ECDSA signature, want %d: %w", len(raw), k.sigLen, providers.ErrUnavailable)
		}
		return providers.ECDSARawToASN1(raw)
	}
	out := make([]byte, len(raw))
	copy(out, raw)
	return out, nil
}

func signatureLen(pub crypto.PublicKey) (int, error) {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		return 2 * ((k.Curve.Params().BitSize + 7) / 8), nil
	case *rsa.PublicKey:
		return k.Size(), nil
	case ed25519.PublicKey:
		return ed25519.SignatureSize, nil
	}
	return 0, fmt.Errorf("public key %T: %w", pub, providers.ErrUnsupportedAlgorithm)
}

// findPrivateKey returns the one private key object matching sel.
func findPrivateKey(ctx *p11.Ctx, s p11.SessionHandle, sel objectSelector) (p11.ObjectHandle, error) {
	tmpl := []*p11.Attribute{p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PRIVATE_KEY)}
	tmpl = append(tmpl, sel.attributes()...)
	objs, err := findObjects(ctx, s, tmpl, 2)
	if err != nil {
		return 0, err
	}
	switch len(objs) {
	case 0:
		return 0, errObjectMissing
	case 1:
		return objs[0], nil
	}
	return 0, fmt.Errorf("more than one private key matches %s: add id= or object= to the URI", sel)
}

var errObjectMissing = errors.New("no private key object on the token matches")

func (o objectSelector) attributes() []*p11.Attribute {
	var a []*p11.Attribute
	if o.label != "" {
		a = append(a, p11.NewAttribute(p11.CKA_LABEL, o.label))
	}
	if o.id != nil {
		a = append(a, p11.NewAttribute(p11.CKA_ID, o.id))
	}
	return a
}

// findObjects returns up to max objects matching tmpl. A token may answer
// C_FindObjects with fewer handles than asked for while more match (only
// an empty answer ends the search), so it asks until it has max or none
// come: a caller that asks for 2 to tell one match from several must see
// the second.
func findObjects(ctx *p11.Ctx, s p11.SessionHandle, tmpl []*p11.Attribute, max int) ([]p11.ObjectHandle, error) {
	if err := ctx.FindObjectsInit(s, tmpl); err != nil {
		return nil, err
	}
	var objs []p11.ObjectHandle
	var err error
	for len(objs) < max {
		var more []p11.ObjectHandle
		more, _, err = ctx.FindObjects(s, max-len(objs))
		if err != nil || len(more) == 0 {
			break
		}
		objs = append(objs, more...)
	}
	if ferr := ctx.FindObjectsFinal(s); err == nil {
		err = ferr
	}
	return objs, err
}

// readPublicKey reads the public half of the private key priv: from the
// public key object with the same CKA_ID (or, without an id, the same label),
// or from the private key's own attributes where the token keeps them there.
func readPublicKey(ctx *p11.Ctx, s p11.SessionHandle, priv p11.ObjectHandle) (crypto.PublicKey, error) {
	attrs, err := ctx.GetAttributeValue(s, priv, []*p11.Attribute{
		p11.NewAttribute(p11.CKA_KEY_TYPE, nil),
		p11.NewAttribute(p11.CKA_ID, nil),
		p11.NewAttribute(p11.CKA_LABEL, nil),
	})
	if err != nil {
		return nil, fmt.Errorf("read private key attributes: %w", err)
	}
	keyType := bytesToUint(attrs[0].Value)
	id, label := attrs[1].Value, attrs[2].Value

	tmpl := []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PUBLIC_KEY),
		p11.NewAttribute(p11.CKA_KEY_TYPE, keyType),
	}
	switch {
	case len(id) > 0:
		tmpl = append(tmpl, p11.NewAttribute(p11.CKA_ID, id))
	case len(label) > 0:
		tmpl = append(tmpl, p11.NewAttribute(p11.CKA_LABEL, label))
	default:
		tmpl = nil
	}
	src := priv
	if tmpl != nil {
		objs, err := findObjects(ctx, s, tmpl, 2)
		if err != nil {
			return nil, fmt.Errorf("find public key object: %w", err)
		}
		if len(objs) > 1 {
			return nil, errors.New("more than one public key object shares the private key's id/label")
		}
		if len(objs) == 1 {
			src = objs[0]
		}
	}

	switch keyType {
	case p11.CKK_RSA:
		a, err := ctx.GetAttributeValue(s, src, []*p11.Attribute{
			p11.NewAttribute(p11.CKA_MODULUS, nil),
			p11.NewAttribute(p11.CKA_PUBLIC_EXPONENT, nil),
		})
		if err != nil {
			return nil, fmt.Errorf("read RSA public key: %w", err)
		}
		e := new(big.Int).SetBytes(a[1].Value)
		if !e.IsInt64() || e.Int64() < 3 || e.Int64() > 1<<31-1 {
			return nil, errors.New("RSA public exponent out of range")
		}
		return &rsa.PublicKey{N: new(big.Int).SetBytes(a[0].Value), E: int(e.Int64())}, nil
	case p11.CKK_EC, ckkECEdwards:
		a, err := ctx.GetAttributeValue(s, src, []*p11.Attribute{
			p11.NewAttribute(p11.CKA_EC_PARAMS, nil),
			p11.NewAttribute(p11.CKA_EC_POINT, nil),
		})
		if err != nil {
			return nil, fmt.Errorf("read EC public key (a private key without a public key object may not expose CKA_EC_POINT): %w", err)
		}
		return parseECPublicKey(a[0].Value, a[1].Value)
	}
	return nil, fmt.Errorf("key type 0x%x: %w", keyType, providers.ErrUnsupportedAlgorithm)
}

// parseECPublicKey decodes CKA_EC_PARAMS (a named-curve OID, or for Ed25519
// also the PrintableString "edwards25519" that SoftHSM and OpenSC write) and
// CKA_EC_POINT (a DER OCTET STRING around the point; some tokens give the bare
// point).
func parseECPublicKey(params, point []byte) (crypto.PublicKey, error) {
	var curve elliptic.Curve
	ed := false
	var oid asn1.ObjectIdentifier
	var name string
	switch {
	case len(params) > 0 && params[0] == asn1.TagOID:
		if rest, err := asn1.Unmarshal(params, &oid); err != nil || len(rest) != 0 {
			return nil, fmt.Errorf("CKA_EC_PARAMS: bad OID")
		}
		switch {
		case oid.Equal(oidP256):
			curve = elliptic.P256()
		case oid.Equal(oidP384):
			curve = elliptic.P384()
		case oid.Equal(oidEd25519):
			ed = true
		default:
			return nil, fmt.Errorf("curve %s: %w", oid, providers.ErrUnsupportedAlgorithm)
		}
	case len(params) > 0 && params[0] == asn1.TagPrintableString:
		if rest, err := asn1.UnmarshalWithParams(params, &name, "printable"); err != nil || len(rest) != 0 {
			return nil, fmt.Errorf("CKA_EC_PARAMS: bad curve name")
		}
		if name != "edwards25519" {
			return nil, fmt.Errorf("curve %q: %w", name, providers.ErrUnsupportedAlgorithm)
		}
		ed = true
	default:
		return nil, fmt.Errorf("CKA_EC_PARAMS: neither a named curve nor a curve name: %w", providers.ErrUnsupportedAlgorithm)
	}

	if ed {
		raw := point
		if len(point) != ed25519.PublicKeySize {
			raw = unwrapOctetString(point)
		}
		if len(raw) != ed25519.PublicKeySize {
			return nil, fmt.Errorf("CKA_EC_POINT: %d bytes for an Ed25519 key", len(point))
		}
		return ed25519.PublicKey(bytes.Clone(raw)), nil
	}
	// A bare uncompressed point is 1+2×coordinate bytes beginning 0x04, which
	// is also the OCTET STRING tag: decide by length first.
	coord := (curve.Params().BitSize + 7) / 8
	raw := point
	if !(len(point) == 1+2*coord && point[0] == 4) {
		raw = unwrapOctetString(point)
	}
	pub, err := ecdsa.ParseUncompressedPublicKey(curve, raw)
	if err != nil {
		return nil, fmt.Errorf("CKA_EC_POINT: %w", err)
	}
	return pub, nil
}

func unwrapOctetString(b []byte) []byte {
	var v []byte
	if rest, err := asn1.Unmarshal(b, &v); err != nil || len(rest) != 0 {
		return nil
	}
	return v
}

// bytesToUint reads a CK_ULONG attribute value, stored in native byte order.
func bytesToUint(b []byte) uint {
	switch len(b) {
	case 8:
		return uint(binary.NativeEndian.Uint64(b))
	case 4:
		return uint(binary.NativeEndian.Uint32(b))
	}
	return ^uint(0)
}

// pairProbe is the digest checkPair signs: fixed, so that a token's audit
// log shows the same one at every start.
var pairProbe = sha256.Sum256([]byte("sigil: this private key matches its public key"))

// checkPair signs pairProbe with priv and verifies the signature against
// pub, the public key read from the public object with priv's id or label.
// A key replaced by importing a new private key under the same id and label
// can leave the old public object behind: served, it would publish a key
// that verifies none of the signatures made, all journaled under its kid.
func checkPair(c *p11.Ctx, s p11.SessionHandle, priv p11.ObjectHandle, pub crypto.PublicKey) error {
	input := pairProbe[:]
	var mech uint
	switch pub.(type) {
	case *ecdsa.PublicKey:
		mech = p11.CKM_ECDSA
	case *rsa.PublicKey:
		mech = p11.CKM_RSA_PKCS
		input = append(append([]byte(nil), must(providers.DigestInfoPrefix(crypto.SHA256))...), pairProbe[:]...)
	case ed25519.PublicKey:
		mech = ckmEDDSA
	default:
		return fmt.Errorf("public key type %T", pub)
	}
	m := p11.NewMechanism(mech, nil)
	err := c.SignInit(s, []*p11.Mechanism{m}, priv)
	pss := false
	if _, isRSA := pub.(*rsa.PublicKey); isRSA && (rvOf(err) == p11.CKR_MECHANISM_INVALID || rvOf(err) == p11.CKR_KEY_FUNCTION_NOT_PERMITTED) {
		// A key its CKA_ALLOWED_MECHANISMS keeps to PSS.
		pss, input = true, pairProbe[:]
		m = p11.NewMechanism(p11.CKM_RSA_PKCS_PSS, p11.NewPSSParams(p11.CKM_SHA256, p11.CKG_MGF1_SHA256, sha256.Size))
		err = c.SignInit(s, []*p11.Mechanism{m}, priv)
	}
	if err != nil {
		return fmt.Errorf("test signature: %w", err)
	}
	sig, err := c.Sign(s, input)
	if err != nil {
		return fmt.Errorf("test signature: %w", err)
	}
	ok := false
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if n := len(sig) / 2; len(sig) == 2*((k.Curve.Params().BitSize+7)/8) {
			ok = ecdsa.Verify(k, pairProbe[:], new(big.Int).SetBytes(sig[:n]), new(big.Int).SetBytes(sig[n:]))
		}
	case *rsa.PublicKey:
		if pss {
			ok = rsa.VerifyPSS(k, crypto.SHA256, pairProbe[:], sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash}) == nil
		} else {
			ok = rsa.VerifyPKCS1v15(k, crypto.SHA256, pairProbe[:], sig) == nil
		}
	case ed25519.PublicKey:
		ok = ed25519.Verify(k, pairProbe[:], sig)
	}
	if !ok {
		return errKeyPairMismatch
	}
	return nil
}

var errKeyPairMismatch = errors.New("the private key does not match the public key object that shares its id or label (a key replaced, its old public object left on the token?): not serving it")

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}
