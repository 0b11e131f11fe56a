// Package providertest holds test helpers the providers' tests share.
package providertest

import (
	"context"
	"crypto"
	"crypto/rand"
	"testing"

	"github.com/sigil-agent/sigil/providers"
)

// KeyInfo returns the key p serves under name, failing the test when there
// is none.
func KeyInfo(t testing.TB, p providers.Provider, name string) providers.KeyInfo {
	t.Helper()
	infos, err := p.Keys(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, ki := range infos {
		if ki.Name == name {
			return ki
		}
	}
	t.Fatalf("key %q not served", name)
	return providers.KeyInfo{}
}

// RandomDigest returns a random digest of h's size.
func RandomDigest(h crypto.Hash) []byte {
	d := make([]byte, h.Size())
	rand.Read(d)
	return d
}
