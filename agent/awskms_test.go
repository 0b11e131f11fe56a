package agent_test

import (
	"context"
	"crypto"
	"crypto/sha256"
	"fmt"
	"testing"

	"github.com/aws/aws-sdk-go-v2/service/kms/types"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/awskms/awskmstest"
)

// An AWS KMS key (the local-kms emulator, the real SDK client) served by the
// agent, with credentials from the SDK's default chain as in production.
func TestAgentServesAWSKMSKeys(t *testing.T) {
	endpoint := awskmstest.Start(t)
	kc := awskmstest.Client(endpoint)
	id := awskmstest.CreateKey(t, kc, types.KeySpecEccNistP256)
	awskmstest.CreateAlias(t, kc, "alias/release", id)
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
      - {name: release, key_id: alias/release}
`, awskmstest.Region, endpoint)))
	if err != nil {
		t.Fatal(err)
	}
	cfg.DataDir = t.TempDir()
	cfg.Socket = shortSocketPath(t)
	r, logs := startAgentObserved(t, cfg)
	assertNoFieldTwice(t, logs)
	c := r.dial(t)
	ctx := context.Background()
	k, err := c.PublicKey(ctx, client.ByName("release"))
	if err != nil {
		t.Fatal(err)
	}
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
