package providers

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/asn1"
	"errors"
	"math/big"
	"testing"
)

func TestCheckRequest(t *testing.T) {
	d32, d48 := make([]byte, 32), make([]byte, 48)
	cases := []struct {
		name   string
		kt     KeyType
		alg    Algorithm
		digest []byte
		want   error
	}{
		{"ecdsa p256 sha256", KeyECDSAP256, Algorithm{SchemeECDSA, crypto.SHA256}, d32, nil},
		{"ecdsa p384 sha384", KeyECDSAP384, Algorithm{SchemeECDSA, crypto.SHA384}, d48, nil},
		{"ecdsa short digest", KeyECDSAP256, Algorithm{SchemeECDSA, crypto.SHA256}, d32[:31], ErrBadRequest},
		{"ecdsa digest for other hash", KeyECDSAP256, Algorithm{SchemeECDSA, crypto.SHA384}, d32, ErrBadRequest},
		{"ecdsa md5", KeyECDSAP256, Algorithm{SchemeECDSA, crypto.MD5}, make([]byte, 16), ErrUnsupportedAlgorithm},
		{"ecdsa no hash", KeyECDSAP256, Algorithm{SchemeECDSA, 0}, d32, ErrUnsupportedAlgorithm},
		{"rsa pkcs1", KeyRSA2048, Algorithm{SchemePKCS1v15, crypto.SHA256}, d32, nil},
		{"rsa pss", KeyRSA3072, Algorithm{SchemePSS, crypto.SHA384}, d48, nil},
		{"pss on ecdsa key", KeyECDSAP256, Algorithm{SchemePSS, crypto.SHA256}, d32, ErrUnsupportedAlgorithm},
		{"ecdsa on rsa key", KeyRSA2048, Algorithm{SchemeECDSA, crypto.SHA256}, d32, ErrUnsupportedAlgorithm},
		{"ed25519 message", KeyEd25519, Algorithm{SchemeEd25519, 0}, []byte("any length message"), nil},
		{"ed25519 empty message", KeyEd25519, Algorithm{SchemeEd25519, 0}, nil, nil},
		{"ed25519ph refused", KeyEd25519, Algorithm{SchemeEd25519, crypto.SHA512}, make([]byte, 64), ErrUnsupportedAlgorithm},
		{"ed25519 on ecdsa key", KeyECDSAP256, Algorithm{SchemeEd25519, 0}, d32, ErrUnsupportedAlgorithm},
		{"unknown scheme", KeyECDSAP256, Algorithm{Scheme(9), crypto.SHA256}, d32, ErrUnsupportedAlgorithm},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := CheckRequest(tc.kt, tc.alg, tc.digest)
			if tc.want == nil && err != nil || tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("CheckRequest = %v, want %v", err, tc.want)
			}
		})
	}
}

func TestECDSARawToASN1(t *testing.T) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	digest := sha256.Sum256([]byte("x"))
	type sigRS struct{ R, S *big.Int }
	// Edge cases: leading zeros trimmed, top bit set needs a pad byte, zero value.
	fixed := [][2]*big.Int{
		{big.NewInt(1), big.NewInt(0)},
		{new(big.Int).Lsh(big.NewInt(1), 255), big.NewInt(127)},
		{big.NewInt(128), new(big.Int).Lsh(big.NewInt(1), 200)},
	}
	for _, rs := range fixed {
		raw := make([]byte, 64)
		rs[0].FillBytes(raw[:32])
		rs[1].FillBytes(raw[32:])
		got, err := ECDSARawToASN1(raw)
		if err != nil {
			t.Fatal(err)
		}
		want, _ := asn1.Marshal(sigRS{rs[0], rs[1]})
		if string(got) != string(want) {
			t.Fatalf("r=%v s=%v: got %x want %x", rs[0], rs[1], got, want)
		}
	}
	// A real signature survives raw → DER and verifies.
	for i := 0; i < 50; i++ {
		der, _ := ecdsa.SignASN1(rand.Reader, key, digest[:])
		var rs sigRS
		if _, err := asn1.Unmarshal(der, &rs); err != nil {
			t.Fatal(err)
		}
		raw := make([]byte, 64)
		rs.R.FillBytes(raw[:32])
		rs.S.FillBytes(raw[32:])
		back, err := ECDSARawToASN1(raw)
		if err != nil || !ecdsa.VerifyASN1(&key.PublicKey, digest[:], back) {
			t.Fatalf("converted signature does not verify: %v", err)
		}
	}
	// Past P-384's 2×48 bytes the DER lengths would need the long form,
	// which the short encoding would get wrong (P-521's 2×66 did).
	p521 := make([]byte, 132)
	p521[0], p521[66] = 0x80, 0x80
	for _, bad := range [][]byte{nil, {1}, make([]byte, 200), p521} {
		if _, err := ECDSARawToASN1(bad); !errors.Is(err, ErrBadRequest) {
			t.Fatalf("raw of %d bytes: %v", len(bad), err)
		}
	}
}

func TestDigestInfoPrefix(t *testing.T) {
	for _, h := range []crypto.Hash{crypto.SHA256, crypto.SHA384, crypto.SHA512} {
		p, err := DigestInfoPrefix(h)
		if err != nil {
			t.Fatal(err)
		}
		// The prefix's outer SEQUENCE length covers the prefix tail plus the digest.
		if int(p[1]) != len(p)-2+h.Size() || int(p[len(p)-1]) != h.Size() {
			t.Fatalf("%v prefix %x inconsistent", h, p)
		}
	}
	if _, err := DigestInfoPrefix(crypto.MD5); !errors.Is(err, ErrUnsupportedAlgorithm) {
		t.Fatal("md5 accepted")
	}
}

// Algorithm names are what audit records and logs carry: the switch for
// the usual pairs must name them exactly as the general rule does.
func TestAlgorithmString(t *testing.T) {
	cases := []struct {
		alg  Algorithm
		want string
	}{
		{Algorithm{SchemeECDSA, crypto.SHA256}, "ecdsa-sha256"},
		{Algorithm{SchemeECDSA, crypto.SHA384}, "ecdsa-sha384"},
		{Algorithm{SchemeECDSA, crypto.SHA512}, "ecdsa-sha512"},
		{Algorithm{SchemePKCS1v15, crypto.SHA256}, "rsa-pkcs1v15-sha256"},
		{Algorithm{SchemePKCS1v15, crypto.SHA384}, "rsa-pkcs1v15-sha384"},
		{Algorithm{SchemePSS, crypto.SHA256}, "rsa-pss-sha256"},
		{Algorithm{SchemePSS, crypto.SHA512}, "rsa-pss-sha512"},
		{Algorithm{SchemeEd25519, 0}, "ed25519"},
		{Algorithm{SchemeECDSA, crypto.MD5}, "ecdsa-MD5"},
		{Algorithm{Scheme(9), crypto.SHA256}, "scheme(9)-sha256"},
	}
	for _, tc := range cases {
		if got := tc.alg.String(); got != tc.want {
			t.Errorf("%#v.String() = %q, want %q", tc.alg, got, tc.want)
		}
	}
	usual := Algorithm{SchemeECDSA, crypto.SHA256}
	if n := testing.AllocsPerRun(100, func() { _ = usual.String() }); n != 0 {
		t.Errorf("ecdsa-sha256 String allocates %v times", n)
	}
}
