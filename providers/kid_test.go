package providers

import (
	"crypto/ed25519"
	"crypto/x509"
	"encoding/hex"
	"testing"
)

// The kid vectors are part of the product's contract: a kid printed today must
// name the same key on every machine, forever. Never regenerate them. The
// empty-input vector was cross-checked with Debian's b3sum (BLAKE3 of six zero
// bytes: 3dbd5a09e7a3cb05…).
func TestKIDVectors(t *testing.T) {
	seed := make([]byte, ed25519.SeedSize)
	for i := range seed {
		seed[i] = byte(i)
	}
	spki, err := x509.MarshalPKIXPublicKey(ed25519.NewKeyFromSeed(seed).Public())
	if err != nil {
		t.Fatal(err)
	}
	const wantSPKI = "302a300506032b657003210003a107bff3ce10be1d70dd18e74bc09967e4d6309ba50d5f1ddc8664125531b8"
	if hex.EncodeToString(spki) != wantSPKI {
		t.Fatalf("ed25519 SPKI for seed 00..1f changed: %x", spki)
	}
	cases := []struct {
		spki           []byte
		provider, name string
		want           string
	}{
		{nil, "", "", "3dbd5a09e7a3cb05765522ff5d618722"},
		{spki, "soft", "default", "b40cfa7be91140f63e6a84ca99af6d35"},
		{spki, "hsm", "default", "cc808c340cbf8477a6edd2aab3c8eee5"},
		{spki, "soft", "payments/release", "ac8e90ceb5dd44c01cff75f771119bab"},
		// Length prefixes keep field boundaries: ("ab","63") and ("a","b63") differ.
		{[]byte("ab"), "63", "", "a91cbe050b29cafa831fc453eab4ec74"},
		{[]byte("a"), "b63", "", ComputeKID([]byte("a"), "b63", "")},
	}
	for _, tc := range cases {
		if got := ComputeKID(tc.spki, tc.provider, tc.name); got != tc.want {
			t.Errorf("ComputeKID(%x, %q, %q) = %s, want %s", tc.spki, tc.provider, tc.name, got, tc.want)
		}
	}
	if ComputeKID([]byte("ab"), "63", "") == ComputeKID([]byte("a"), "b63", "") {
		t.Error("field boundaries do not separate inputs")
	}
}

func TestNewKeyInfoKIDMatchesSPKI(t *testing.T) {
	pub, _, _ := ed25519.GenerateKey(nil)
	a, err := NewKeyInfo("soft", "k", pub)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := NewKeyInfo("soft", "k", pub)
	if a.KID != b.KID || len(a.KID) != 32 {
		t.Fatalf("kid %q / %q", a.KID, b.KID)
	}
	if a.KID != ComputeKID(a.SPKI, "soft", "k") || a.Type != KeyEd25519 {
		t.Fatalf("KeyInfo %+v", a)
	}
}
