package agent_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/sha256"
	"fmt"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/service/kms/types"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/awskms/awskmstest"
)

// startAWSAgent starts an agent serving the AWS KMS key alias as "release",
// with credentials from the SDK's default chain as in production.
func startAWSAgent(t *testing.T, endpoint, alias string) *running {
	t.Helper()
	creds, err := awskmstest.Credentials().Retrieve(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("AWS_ACCESS_KEY_ID", creds.AccessKeyID)
	t.Setenv("AWS_SECRET_ACCESS_KEY", creds.SecretAccessKey)
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	cfg, err := agent.ParseConfig([]byte(fmt.Sprintf(`
providers:
  - id: aws
    type: awskms
    region: %s
    endpoint: %q
    keys:
      - {name: release, key_id: %s}
`, awskmstest.Region, endpoint, alias)))
	if err != nil {
		t.Fatal(err)
	}
	cfg.DataDir = t.TempDir()
	cfg.Socket = shortSocketPath(t)
	r, logs := startAgentObserved(t, cfg)
	assertNoFieldTwice(t, logs)
	return r
}

// awsKeyServed starts the emulator with one key of spec under
// alias/release and an agent serving it as "release", and returns a
// client of the agent and the key as the agent shows it.
func awsKeyServed(t *testing.T, spec types.KeySpec) (*client.Client, client.Key) {
	t.Helper()
	endpoint := awskmstest.Start(t)
	kc := awskmstest.Client(endpoint)
	awskmstest.CreateAlias(t, kc, "alias/release", awskmstest.CreateKey(t, kc, spec))
	c := startAWSAgent(t, endpoint, "alias/release").dial(t)
	k, err := c.PublicKey(context.Background(), client.ByName("release"))
	if err != nil {
		t.Fatal(err)
	}
	return c, k
}

// An AWS KMS key (the local-kms emulator, the real SDK client) served by the
// agent.
func TestAgentServesAWSKMSKeys(t *testing.T) {
	c, k := awsKeyServed(t, types.KeySpecEccNistP256)
	ctx := context.Background()
	d := sha256.Sum256([]byte("aws payload"))
	sig, err := c.Sign(ctx, client.ByName("release"), client.Algorithm{}, d[:])
	if err != nil {
		t.Fatal(err)
	}
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	if err := providers.Verify(k.Public, alg, d[:], sig.Sig); err != nil {
		t.Fatalf("Go crypto rejects the AWS KMS signature: %v", err)
	}
}

// An Ed25519 key in AWS KMS serves as a software one does: pure Ed25519 by
// default, over the message itself, which KMS signs up to 4096 bytes.
func TestAgentServesAWSKMSEd25519Key(t *testing.T) {
	c, k := awsKeyServed(t, types.KeySpecEccNistEdwards25519)
	ctx := context.Background()
	pub, ok := k.Public.(ed25519.PublicKey)
	if !ok || k.Type != string(providers.KeyEd25519) {
		t.Fatalf("public key %T of type %s", k.Public, k.Type)
	}
	for _, tc := range []struct {
		name string
		alg  client.Algorithm
		msg  []byte
		want proto.Code
	}{
		{"default scheme", client.Algorithm{}, []byte("aws ed25519 payload"), proto.OK},
		{"ed25519, 4096 bytes", client.Algorithm{Scheme: client.SchemeEd25519}, bytes.Repeat([]byte{7}, 4096), proto.OK},
		{"4097 bytes", client.Algorithm{}, []byte(strings.Repeat("secret-payload!", 300)[:4097]), proto.BadRequest},
		{"ecdsa", client.Algorithm{Scheme: client.SchemeECDSA, Hash: crypto.SHA256}, make([]byte, 32), proto.UnsupportedAlgorithm},
		{"ed25519ph", client.Algorithm{Scheme: client.SchemeEd25519, Hash: crypto.SHA512}, make([]byte, 64), proto.UnsupportedAlgorithm},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sig, err := c.Sign(ctx, client.ByName("release"), tc.alg, tc.msg)
			if tc.want != proto.OK {
				if got := client.Code(err); got != tc.want {
					t.Fatalf("code %s (%v), want %s", got, err, tc.want)
				}
				if strings.Contains(err.Error(), "secret-payload") {
					t.Fatalf("the error carries the message: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !ed25519.Verify(pub, tc.msg, sig.Sig) {
				t.Fatal("crypto/ed25519 rejects the AWS KMS signature")
			}
		})
	}
}
