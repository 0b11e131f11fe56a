package providers

import (
	"crypto"
	"fmt"
)

// ECDSARawToASN1 converts a PKCS#11 / JOSE style raw ECDSA signature (r‖s,
// each half the curve's byte length) to the ASN.1 DER SEQUENCE{r, s} that
// Go's ecdsa.VerifyASN1 and crypto.Signer callers expect.
func ECDSARawToASN1(raw []byte) ([]byte, error) {
	// Up to P-384's 2×48 bytes, every DER length below is short-form (<
	// 128); P-521's would not be, and no key type has that curve.
	if len(raw) == 0 || len(raw)%2 != 0 || len(raw) > 2*48 {
		return nil, fmt.Errorf("raw ecdsa signature of %d bytes: %w", len(raw), ErrBadRequest)
	}
	half := len(raw) / 2
	r, s := trimInteger(raw[:half]), trimInteger(raw[half:])
	rLen, sLen := derIntegerLen(r), derIntegerLen(s)
	body := 2 + rLen + 2 + sLen // every length here is < 128: short-form lengths
	out := make([]byte, 0, 2+body)
	out = append(out, 0x30, byte(body))
	out = appendDERInteger(out, r)
	out = appendDERInteger(out, s)
	return out, nil
}

// trimInteger drops leading zero bytes, keeping at least one byte.
func trimInteger(b []byte) []byte {
	for len(b) > 1 && b[0] == 0 {
		b = b[1:]
	}
	return b
}

// derIntegerLen is the content length of a non-negative INTEGER: a 0x00 pad
// keeps a value with its top bit set from reading as negative.
func derIntegerLen(b []byte) int {
	if b[0]&0x80 != 0 {
		return len(b) + 1
	}
	return len(b)
}

func appendDERInteger(out, b []byte) []byte {
	out = append(out, 0x02, byte(derIntegerLen(b)))
	if b[0]&0x80 != 0 {
		out = append(out, 0)
	}
	return append(out, b...)
}

// DigestInfoPrefix is the DER prefix of the PKCS#1 v1.5 DigestInfo for h
// (RFC 8017 section 9.2 note 1); the digest follows it. Tokens doing raw
// CKM_RSA_PKCS need it prepended by the caller.
func DigestInfoPrefix(h crypto.Hash) ([]byte, error) {
	switch h {
	case crypto.SHA256:
		return digestInfoSHA256, nil
	case crypto.SHA384:
		return digestInfoSHA384, nil
	case crypto.SHA512:
		return digestInfoSHA512, nil
	}
	return nil, fmt.Errorf("digestinfo for hash %v: %w", h, ErrUnsupportedAlgorithm)
}

var (
	digestInfoSHA256 = []byte{0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20}
	digestInfoSHA384 = []byte{0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0x04, 0x30}
	digestInfoSHA512 = []byte{0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05, 0x00, 0x04, 0x40}
)
