package gcpkms

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"hash/crc32"
	"strings"
	"testing"

	"cloud.google.com/go/kms/apiv1/kmspb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/gcpkms/gcpkmstest"
)

var algEd25519 = providers.Algorithm{Scheme: providers.SchemeEd25519}

func crc32Of(b []byte) uint32 { return crc32.Checksum(b, crc32c) }

// newEd25519Fleet is a fake KMS holding an Ed25519 version ("ed") beside a
// P-256 one ("p256"), and a provider opened on both.
func newEd25519Fleet(t *testing.T) *testFleet {
	t.Helper()
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	f := &gcpkmstest.Server{}
	f.Add(gcpkmstest.VersionName("ed", "1"), edKey, kmspb.CryptoKeyVersion_EC_SIGN_ED25519)
	f.Add(gcpkmstest.VersionName("p256", "1"), gcpkmstest.TestKeys()["p256"], kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256)
	p, err := Open(context.Background(), Config{
		ID: "gcp",
		Keys: []KeyConfig{
			{Name: "ed", Resource: gcpkmstest.VersionName("ed", "1")},
			{Name: "p256", Resource: gcpkmstest.VersionName("p256", "1")},
		},
		ClientOptions: f.Serve(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	return &testFleet{kms: f, p: p}
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// An Ed25519 version is served: the message goes to Cloud KMS whole (pure
// Ed25519, RFC 8032), of any length up to Cloud KMS's data limit, and
// every signature verifies with Go's crypto/ed25519.
func TestEd25519SignVerifies(t *testing.T) {
	tf := newEd25519Fleet(t)
	ki := tf.info(t, "ed")
	pub, ok := ki.Public.(ed25519.PublicKey)
	if !ok || ki.Type != providers.KeyEd25519 || len(ki.KID) != 32 {
		t.Fatalf("key info %+v", ki)
	}
	if got := ki.Type.DefaultAlgorithm(); got != algEd25519 {
		t.Fatalf("default algorithm %s, want %s", got, algEd25519)
	}
	for _, tc := range []struct {
		name string
		msg  []byte
	}{
		{"empty", nil},
		{"one byte", []byte{0}},
		{"text", []byte("release 1.2.3")},
		{"digest-sized", randomBytes(64)},
		{"4 KiB", randomBytes(4 << 10)},
		{"at the data limit", randomBytes(gcpkmstest.MaxDataSize)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sig, err := tf.p.Sign(context.Background(), "ed", algEd25519, tc.msg)
			if err != nil {
				t.Fatal(err)
			}
			if len(sig) != ed25519.SignatureSize || !ed25519.Verify(pub, tc.msg, sig) {
				t.Fatalf("signature of %d bytes does not verify over the message", len(sig))
			}
			if err := providers.Verify(ki.Public, algEd25519, tc.msg, sig); err != nil {
				t.Fatal(err)
			}
			other := append(bytes.Clone(tc.msg), 'x')
			if ed25519.Verify(pub, other, sig) {
				t.Fatal("the signature verifies over another message")
			}
		})
	}
}

// What an Ed25519 version cannot do is refused without a call: another
// scheme, Ed25519ph (a hash named), Ed25519 on an ECDSA version, and a
// message over Cloud KMS's data limit (BAD_REQUEST, the message not in
// the error).
func TestEd25519SignRefuses(t *testing.T) {
	tf := newEd25519Fleet(t)
	marker := "secret-message-text "
	big := []byte(strings.Repeat(marker, gcpkmstest.MaxDataSize/len(marker)+1))
	for _, tc := range []struct {
		name string
		key  string
		alg  providers.Algorithm
		msg  []byte
		want error
	}{
		{"ecdsa on ed25519", "ed", algES256, randomDigest(crypto.SHA256), providers.ErrUnsupportedAlgorithm},
		{"ed25519ph", "ed", providers.Algorithm{Scheme: providers.SchemeEd25519, Hash: crypto.SHA512}, randomDigest(crypto.SHA512), providers.ErrUnsupportedAlgorithm},
		{"pkcs1 on ed25519", "ed", algRS256, randomDigest(crypto.SHA256), providers.ErrUnsupportedAlgorithm},
		{"pss on ed25519", "ed", algPS256, randomDigest(crypto.SHA256), providers.ErrUnsupportedAlgorithm},
		{"ed25519 on p256", "p256", algEd25519, []byte("message"), providers.ErrUnsupportedAlgorithm},
		{"one byte over the data limit", "ed", algEd25519, randomBytes(gcpkmstest.MaxDataSize + 1), providers.ErrBadRequest},
		{"far over the data limit", "ed", algEd25519, big, providers.ErrBadRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tf.p.Sign(context.Background(), tc.key, tc.alg, tc.msg)
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
			for _, leak := range []string{marker, hex.EncodeToString(tc.msg[:min(16, len(tc.msg))])} {
				if strings.Contains(err.Error(), leak) {
					t.Fatalf("err %q carries the message", err)
				}
			}
		})
	}
	if n := tf.kms.SignCount(); n != 0 {
		t.Fatalf("%d refused requests reached KMS", n)
	}
}

// A rotation of an Ed25519 CryptoKey makes an Ed25519 version (Cloud KMS
// takes the algorithm from the key's template), served at once.
func TestEd25519NewVersion(t *testing.T) {
	tf := newEd25519Fleet(t)
	ctx := context.Background()
	base := tf.info(t, "ed")
	ki, err := tf.p.NewVersion(ctx, "ed", "ed-v2")
	if err != nil {
		t.Fatal(err)
	}
	if ki.Type != providers.KeyEd25519 || ki.KID == base.KID {
		t.Fatalf("new version info %+v (base kid %s)", ki, base.KID)
	}
	if alg := versionNow(t, tf.kms, gcpkmstest.VersionName("ed", "2")).Alg; alg != kmspb.CryptoKeyVersion_EC_SIGN_ED25519 {
		t.Fatalf("the new version is %s", alg)
	}
	msg := []byte("after rotation")
	sig, err := tf.p.Sign(ctx, "ed-v2", algEd25519, msg)
	if err != nil {
		t.Fatal(err)
	}
	if !ed25519.Verify(ki.Public.(ed25519.PublicKey), msg, sig) {
		t.Fatal("the new version's signature does not verify with its key")
	}
	if ed25519.Verify(base.Public.(ed25519.PublicKey), msg, sig) {
		t.Fatal("the new version signed with the base key")
	}
}

// The fake answers as Cloud KMS does on the paths the provider uses: an
// Ed25519 version takes data, not a digest, up to 64 KiB, with its CRC32C
// checked. The requests go straight to the fake, past the provider.
func TestFakeEd25519AsCloudKMS(t *testing.T) {
	tf := newEd25519Fleet(t)
	name := gcpkmstest.VersionName("ed", "1")
	msg := []byte("message")
	crc := func(b []byte) *wrapperspb.Int64Value { return wrapperspb.Int64(int64(crc32Of(b))) }
	for _, tc := range []struct {
		name string
		req  *kmspb.AsymmetricSignRequest
		want codes.Code
	}{
		{"data", &kmspb.AsymmetricSignRequest{Name: name, Data: msg, DataCrc32C: crc(msg)}, codes.OK},
		{"digest", &kmspb.AsymmetricSignRequest{Name: name, Digest: digestOf(crypto.SHA512, randomDigest(crypto.SHA512))}, codes.InvalidArgument},
		{"data over 64 KiB", &kmspb.AsymmetricSignRequest{Name: name, Data: randomBytes(gcpkmstest.MaxDataSize + 1)}, codes.InvalidArgument},
		{"data crc32c wrong", &kmspb.AsymmetricSignRequest{Name: name, Data: msg, DataCrc32C: wrapperspb.Int64(int64(crc32Of(msg) ^ 1))}, codes.InvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := tf.p.client.AsymmetricSign(context.Background(), tc.req)
			if code := status.Code(err); code != tc.want {
				t.Fatalf("code %s, want %s (%v)", code, tc.want, err)
			}
			if err == nil && (!resp.VerifiedDataCrc32C || resp.VerifiedDigestCrc32C ||
				!ed25519.Verify(tf.info(t, "ed").Public.(ed25519.PublicKey), msg, resp.Signature)) {
				t.Fatalf("answer %+v", resp)
			}
		})
	}
}
