package awskmstest

import (
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/sha512"
	"crypto/x509"
	"errors"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"
	"github.com/aws/smithy-go"
)

// The front answers for Ed25519 keys as AWS KMS does, through the real SDK
// client, and leaves other keys to local-kms.
func TestFrontEd25519(t *testing.T) {
	c := Client(Start(t))
	ctx := context.Background()
	id := CreateKey(t, c, types.KeySpecEccNistEdwards25519)
	CreateAlias(t, c, "alias/ed", id)
	p256 := CreateKey(t, c, types.KeySpecEccNistP256)

	md := DescribeKey(t, c, "alias/ed")
	if md.KeySpec != types.KeySpecEccNistEdwards25519 || len(md.SigningAlgorithms) != 2 {
		t.Fatalf("DescribeKey: spec %s, algorithms %v", md.KeySpec, md.SigningAlgorithms)
	}
	if md := DescribeKey(t, c, p256); md.KeySpec != types.KeySpecEccNistP256 {
		t.Fatalf("a P-256 key described as %s", md.KeySpec)
	}
	gp, err := c.GetPublicKey(ctx, &kms.GetPublicKeyInput{KeyId: aws.String(id)})
	if err != nil {
		t.Fatal(err)
	}
	parsed, err := x509.ParsePKIXPublicKey(gp.PublicKey)
	pub, ok := parsed.(ed25519.PublicKey)
	if err != nil || !ok || gp.KeySpec != types.KeySpecEccNistEdwards25519 {
		t.Fatalf("GetPublicKey: %T, %v, spec %s", parsed, err, gp.KeySpec)
	}

	msg := []byte("a message")
	digest := sha512.Sum512(msg)
	for _, tc := range []struct {
		name    string
		keyID   string
		alg     types.SigningAlgorithmSpec
		typ     types.MessageType
		message []byte
		want    string // the error code, or "" for a signature that verifies
	}{
		{"pure by alias", "alias/ed", types.SigningAlgorithmSpecEd25519Sha512, types.MessageTypeRaw, msg, ""},
		{"pure by id, 4096 bytes", id, types.SigningAlgorithmSpecEd25519Sha512, types.MessageTypeRaw, make([]byte, 4096), ""},
		{"ph with a digest", aws.ToString(md.Arn), types.SigningAlgorithmSpecEd25519PhSha512, types.MessageTypeDigest, digest[:], ""},
		{"pure with DIGEST", id, types.SigningAlgorithmSpecEd25519Sha512, types.MessageTypeDigest, digest[:], "ValidationException"},
		{"ph with RAW", id, types.SigningAlgorithmSpecEd25519PhSha512, types.MessageTypeRaw, msg, "ValidationException"},
		{"4097 bytes", id, types.SigningAlgorithmSpecEd25519Sha512, types.MessageTypeRaw, make([]byte, 4097), "ValidationException"},
		{"ecdsa", id, types.SigningAlgorithmSpecEcdsaSha256, types.MessageTypeDigest, digest[:32], "InvalidKeyUsageException"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := c.Sign(ctx, &kms.SignInput{KeyId: aws.String(tc.keyID), Message: tc.message, MessageType: tc.typ, SigningAlgorithm: tc.alg})
			if tc.want != "" {
				var apiErr smithy.APIError
				if !errors.As(err, &apiErr) || apiErr.ErrorCode() != tc.want {
					t.Fatalf("err = %v, want %s", err, tc.want)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if aws.ToString(out.KeyId) != aws.ToString(md.Arn) {
				t.Errorf("answer names %s", aws.ToString(out.KeyId))
			}
			opts := &ed25519.Options{}
			if tc.alg == types.SigningAlgorithmSpecEd25519PhSha512 {
				opts.Hash = crypto.SHA512
			}
			if err := ed25519.VerifyWithOptions(pub, tc.message, out.Signature, opts); err != nil {
				t.Fatalf("crypto/ed25519: %v", err)
			}
		})
	}

	// local-kms still signs with its own keys through the front.
	if _, err := c.Sign(ctx, &kms.SignInput{KeyId: aws.String(p256), Message: digest[:32], MessageType: types.MessageTypeDigest, SigningAlgorithm: types.SigningAlgorithmSpecEcdsaSha256}); err != nil {
		t.Fatalf("P-256 key: %v", err)
	}
	DisableKey(t, c, id)
	_, err = c.Sign(ctx, &kms.SignInput{KeyId: aws.String(id), Message: msg, MessageType: types.MessageTypeRaw, SigningAlgorithm: types.SigningAlgorithmSpecEd25519Sha512})
	var disabled *types.DisabledException
	if !errors.As(err, &disabled) {
		t.Fatalf("disabled key: %v", err)
	}
}
