package awskms

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"

	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/awskms/awskmstest"
	"github.com/sigil-agent/sigil/providers/providertest"
)

var algEd25519 = providers.Algorithm{Scheme: providers.SchemeEd25519}

// edFleet is a fake KMS holding one Ed25519 key (id), named through an
// alias, and a provider serving it as "ed".
type edFixture struct {
	p     *Provider
	tr    *transport
	id    string
	admin *kms.Client
}

func edFleet(t *testing.T) edFixture {
	t.Helper()
	endpoint := awskmstest.Start(t)
	admin := awskmstest.Client(endpoint)
	id := awskmstest.CreateKey(t, admin, types.KeySpecEccNistEdwards25519)
	awskmstest.CreateAlias(t, admin, "alias/sigil-ed", id)
	tr := &transport{stallHost: stallServer(t)}
	p, err := Open(context.Background(), testConfig(endpoint, tr, 0, KeyConfig{Name: "ed", KeyID: "alias/sigil-ed"}))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return edFixture{p: p, tr: tr, id: id, admin: admin}
}

// An Ed25519 key in AWS KMS serves as the software and PKCS#11 ones do:
// pure Ed25519 over the message, which KMS takes RAW, up to 4096 bytes.
func TestEd25519SignVerifies(t *testing.T) {
	f := edFleet(t)
	p, tr := f.p, f.tr
	ki := providertest.KeyInfo(t, p, "ed")
	pub, ok := ki.Public.(ed25519.PublicKey)
	if ki.Type != providers.KeyEd25519 || !ok {
		t.Fatalf("key info: type %s, public key %T", ki.Type, ki.Public)
	}
	if ki.Type.DefaultAlgorithm() != algEd25519 {
		t.Fatalf("default algorithm %v", ki.Type.DefaultAlgorithm())
	}
	if algs := p.Algorithms("ed"); len(algs) != 1 || algs[0] != algEd25519 {
		t.Fatalf("algorithms %v, want only pure Ed25519", algs)
	}
	for _, size := range []int{0, 1, 32, 64, 1000, 4096} {
		t.Run(fmt.Sprintf("%d bytes", size), func(t *testing.T) {
			msg := make([]byte, size)
			rand.Read(msg)
			sig, err := p.Sign(context.Background(), "ed", algEd25519, msg)
			if err != nil {
				t.Fatalf("%d-byte message: %v", size, err)
			}
			if !ed25519.Verify(pub, msg, sig) {
				t.Fatalf("%d-byte message: crypto/ed25519 rejects the signature", size)
			}
			if size > 0 {
				msg[0] ^= 1
				if ed25519.Verify(pub, msg, sig) {
					t.Fatalf("%d-byte message: the signature verifies over another message", size)
				}
			}
		})
	}
	if n := tr.signs.Load(); n != 6 {
		t.Fatalf("%d Sign requests, want 6", n)
	}
}

// What KMS cannot do with the key is refused without a call: another
// scheme, Ed25519ph (a hash with the Ed25519 scheme), and a message over
// the 4096 bytes KMS signs, whose bytes the error does not carry.
func TestEd25519SignRefuses(t *testing.T) {
	f := edFleet(t)
	p, tr := f.p, f.tr
	long := bytes.Repeat([]byte("secret-payload!"), 300)[:4097]
	for _, tc := range []struct {
		name string
		alg  providers.Algorithm
		msg  []byte
		want error
	}{
		{"ecdsa", algES256, randomDigest(crypto.SHA256), providers.ErrUnsupportedAlgorithm},
		{"rsa-pss", algPS256, randomDigest(crypto.SHA256), providers.ErrUnsupportedAlgorithm},
		{"ed25519ph", providers.Algorithm{Scheme: providers.SchemeEd25519, Hash: crypto.SHA512}, randomDigest(crypto.SHA512), providers.ErrUnsupportedAlgorithm},
		{"message over 4096 bytes", algEd25519, long, providers.ErrBadRequest},
		{"message of 64 KiB", algEd25519, make([]byte, 64<<10), providers.ErrBadRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := p.Sign(context.Background(), "ed", tc.alg, tc.msg)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			if strings.Contains(err.Error(), "secret-payload") {
				t.Fatalf("the error carries the message: %v", err)
			}
		})
	}
	if n := tr.signs.Load(); n != 0 {
		t.Fatalf("%d refused requests reached KMS", n)
	}
}

// A disabled Ed25519 key is UNAVAILABLE, as any other.
func TestEd25519DisabledKey(t *testing.T) {
	f := edFleet(t)
	awskmstest.DisableKey(t, f.admin, f.id)
	if _, err := f.p.Sign(context.Background(), "ed", algEd25519, []byte("m")); !errors.Is(err, providers.ErrUnavailable) {
		t.Fatalf("disabled key: %v", err)
	}
}

// A rotation of an Ed25519 slot makes an Ed25519 key, and the alias
// follows it.
func TestEd25519NewVersion(t *testing.T) {
	f := edFleet(t)
	p, admin, oldID := f.p, f.admin, f.id
	ctx := context.Background()
	info, err := p.NewVersion(ctx, "ed", "ed-v2")
	if err != nil {
		t.Fatal(err)
	}
	if info.Type != providers.KeyEd25519 {
		t.Fatalf("new version is a %s key", info.Type)
	}
	newARN, _ := p.KeyARN("ed-v2")
	if md := awskmstest.DescribeKey(t, admin, newARN); md.KeySpec != types.KeySpecEccNistEdwards25519 {
		t.Fatalf("new key's spec %s", md.KeySpec)
	}
	if got := aws.ToString(awskmstest.DescribeKey(t, admin, "alias/sigil-ed").Arn); got != newARN {
		t.Fatalf("alias names %s, want the new key %s", got, newARN)
	}
	for _, name := range []string{"ed", "ed-v2"} {
		msg := []byte("release " + name)
		sig, err := p.Sign(ctx, name, algEd25519, msg)
		if err != nil {
			t.Fatal(err)
		}
		if !ed25519.Verify(providertest.KeyInfo(t, p, name).Public.(ed25519.PublicKey), msg, sig) {
			t.Fatalf("%s: crypto/ed25519 rejects the signature", name)
		}
	}
	if oldARN, _ := p.KeyARN("ed"); !strings.HasSuffix(oldARN, oldID) {
		t.Fatalf("old version now signs with %s", oldARN)
	}
}
