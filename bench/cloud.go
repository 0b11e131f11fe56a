package bench

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"cloud.google.com/go/kms/apiv1/kmspb"
	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"

	"github.com/sigil-agent/sigil/providers/awskms/awskmstest"
	"github.com/sigil-agent/sigil/providers/azurekv/azurekvtest"
	"github.com/sigil-agent/sigil/providers/gcpkms/gcpkmstest"
)

// Cloud scenarios: the agent process signing with an ECDSA P-256 key held by
// a cloud KMS, the KMS being an emulator this process starts on loopback.
// Their figures are the agent's cost plus a loopback round trip to an
// emulator, not a region's network latency; they are judged against the
// seeds' cloud SLO (CloudSLO), which they meet by a wide margin unless the
// agent queues, serialises or stalls its remote calls.
const (
	ScenarioAWSKMS  = "awskms"  // AWS KMS: local-kms, a child process
	ScenarioGCPKMS  = "gcpkms"  // GCP Cloud KMS: gcpkmstest's gRPC server in this process
	ScenarioAzureKV = "azurekv" // Azure Key Vault: azurekvtest's TLS server in this process
)

// CloudScenarios are the cloud scenarios, in the order they run.
var CloudScenarios = []string{ScenarioAWSKMS, ScenarioGCPKMS, ScenarioAzureKV}

// IsCloudScenario reports whether name is one of CloudScenarios.
func IsCloudScenario(name string) bool { return slices.Contains(CloudScenarios, name) }

// cloudKeyName is the agent's name for a cloud scenario's key.
func cloudKeyName(scenario string) string { return scenario + "-" + KeyECDSAP256 }

// Cloud is the emulators of the cloud scenarios and the one agent process
// serving a key from each. Close stops the emulators; Env.Close stops the
// agent.
type Cloud struct {
	Socket string
	// Skipped says, by scenario, why a wanted cloud scenario does not run:
	// its emulator could not be started.
	Skipped map[string]string

	served []string // scenarios the agent serves, in CloudScenarios order
	pid    int      // the agent's
	awsPID int      // local-kms's, 0 when it is not running
	stops  []func()
}

// cloudBackend is one started emulator: its provider entry in the agent's
// config and the environment the agent needs to reach it.
type cloudBackend struct {
	yaml string
	env  []string
	stop func()
	pid  int // a process serving it outside this one, for CPU accounting
}

// StartCloud starts the emulator of every wanted cloud scenario, makes an
// ECDSA P-256 key in each, and launches one agent process whose config
// points a provider of each type at its emulator. Credentials reach the
// agent the way production hands them over: AWS keys and region in
// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_REGION (the SDK's default
// chain); none for GCP (insecure_endpoint, for emulators on loopback); for
// Azure, azidentity's default chain finds the fake's App Service
// managed-identity endpoint (IDENTITY_ENDPOINT, IDENTITY_HEADER) and trusts
// the vault's certificate through SSL_CERT_FILE.
//
// Cloud scenarios measure ECDSA P-256 only, so nothing starts unless it is
// among the run's keys. A scenario whose emulator cannot start (local-kms
// not installed) is skipped, the reason logged; an agent that does not come
// up on working emulators is an error.
func (e *Env) StartCloud(ctx context.Context, sigil string, want func(string) bool, log io.Writer) (_ *Cloud, err error) {
	c := &Cloud{Skipped: map[string]string{}}
	if !slices.Contains(e.Keys, KeyECDSAP256) {
		return c, nil
	}
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	starters := map[string]func(context.Context) (cloudBackend, error){
		ScenarioAWSKMS:  startAWSKMS,
		ScenarioGCPKMS:  startGCPKMS,
		ScenarioAzureKV: e.startAzureKV,
	}
	var config strings.Builder
	var env []string
	for _, name := range CloudScenarios {
		if !want(name) {
			continue
		}
		b, err := starters[name](ctx)
		if err != nil {
			c.Skipped[name] = err.Error()
			fmt.Fprintf(log, "bench: %s scenario skipped: %v\n", name, err)
			continue
		}
		c.stops = append(c.stops, b.stop)
		if name == ScenarioAWSKMS {
			c.awsPID = b.pid
		}
		config.WriteString(b.yaml)
		env = append(env, b.env...)
		c.served = append(c.served, name)
	}
	if len(c.served) == 0 {
		return c, nil
	}
	c.Socket = filepath.Join(e.Dir, "cloud.sock")
	cfg := fmt.Sprintf("socket: %s\nadmin_socket: %s\ndata_dir: %s\nlog: {level: warn}\nproviders:\n%s",
		c.Socket, c.Socket+".admin", filepath.Join(e.Dir, "cloud"), config.String())
	cmd, err := e.launch(ctx, sigil, "cloud", cfg, c.Socket, env...)
	if err != nil {
		return nil, fmt.Errorf("agent for %s: %w", strings.Join(c.served, ", "), err)
	}
	e.extra = append(e.extra, cmd)
	c.pid = cmd.Process.Pid
	fmt.Fprintf(log, "bench: cloud agent (pid %d) on %s: %s against their emulators\n", c.pid, c.Socket, strings.Join(c.served, ", "))
	return c, nil
}

// Scenarios are the cloud scenarios the agent serves, on ECDSA P-256. CPU
// per op counts this process (the client, and the GCP and Azure emulators),
// the agent and local-kms.
func (c *Cloud) Scenarios() []Scenario {
	var out []Scenario
	for _, name := range c.served {
		pids := []int{c.pid}
		if name == ScenarioAWSKMS {
			pids = append(pids, c.awsPID)
		}
		out = append(out, AgentScenario(name, KeyECDSAP256, c.Socket, cloudKeyName(name), processesCPU(pids...)))
	}
	return out
}

// Close stops the emulators.
func (c *Cloud) Close() {
	for _, stop := range c.stops {
		stop()
	}
	c.stops = nil
}

// startAWSKMS runs local-kms, if installed (never installing it: that can
// take minutes), and creates a SIGN_VERIFY ECC_NIST_P256 key through the SDK.
func startAWSKMS(ctx context.Context) (cloudBackend, error) {
	bin, err := awskmstest.Find()
	if err != nil {
		return cloudBackend{}, err
	}
	em, err := awskmstest.StartEmulator(bin)
	if err != nil {
		return cloudBackend{}, err
	}
	out, err := awskmstest.Client(em.Endpoint).CreateKey(ctx, &kms.CreateKeyInput{
		KeySpec:     types.KeySpecEccNistP256,
		KeyUsage:    types.KeyUsageTypeSignVerify,
		Description: aws.String("sigil bench"),
	})
	if err == nil && out.KeyMetadata == nil {
		err = errors.New("no key metadata")
	}
	if err != nil {
		em.Close()
		return cloudBackend{}, fmt.Errorf("local-kms: create key: %w", err)
	}
	creds, err := awskmstest.Credentials().Retrieve(ctx)
	if err != nil {
		em.Close()
		return cloudBackend{}, err
	}
	return cloudBackend{
		yaml: fmt.Sprintf("  - id: aws\n    type: awskms\n    region: %s\n    endpoint: %q\n    keys:\n      - {name: %s, key_id: %q}\n",
			awskmstest.Region, em.Endpoint, cloudKeyName(ScenarioAWSKMS), aws.ToString(out.KeyMetadata.KeyId)),
		env: []string{
			"AWS_ACCESS_KEY_ID=" + creds.AccessKeyID,
			"AWS_SECRET_ACCESS_KEY=" + creds.SecretAccessKey,
			"AWS_REGION=" + awskmstest.Region,
			// The region is given; the SDK must not probe the EC2
			// metadata service for anything (a 1 s timeout off EC2).
			"AWS_EC2_METADATA_DISABLED=true",
		},
		stop: em.Close,
		pid:  em.PID(),
	}, nil
}

// startGCPKMS serves gcpkmstest on loopback with one EC_SIGN_P256_SHA256
// key version.
func startGCPKMS(context.Context) (cloudBackend, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return cloudBackend{}, err
	}
	f := &gcpkmstest.Server{}
	f.Add(gcpkmstest.VersionName("bench", "1"), key, kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256)
	stop, err := f.Listen()
	if err != nil {
		return cloudBackend{}, err
	}
	// projects/P/locations/L/keyRings/R
	ring := strings.Split(gcpkmstest.KeyRing, "/")
	if len(ring) != 6 {
		stop()
		return cloudBackend{}, fmt.Errorf("gcpkmstest key ring %q is not projects/P/locations/L/keyRings/R", gcpkmstest.KeyRing)
	}
	return cloudBackend{
		yaml: fmt.Sprintf("  - id: gcp\n    type: gcpkms\n    project: %s\n    location: %s\n    key_ring: %s\n    endpoint: %q\n    insecure_endpoint: true\n    keys:\n      - {name: %s, key: bench, version: \"1\"}\n",
			ring[1], ring[3], ring[5], f.Addr(), cloudKeyName(ScenarioGCPKMS)),
		stop: stop,
	}, nil
}

// startAzureKV serves azurekvtest on loopback with one P-256 key, and
// writes the vault's certificate where SSL_CERT_FILE points the agent.
func (e *Env) startAzureKV(context.Context) (cloudBackend, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return cloudBackend{}, err
	}
	kv := &azurekvtest.Server{}
	kv.Add("bench", key)
	v, err := kv.Listen()
	if err != nil {
		return cloudBackend{}, err
	}
	roots := filepath.Join(e.Dir, "azurekv-roots.pem")
	if err := os.WriteFile(roots, v.CertPEM, 0o600); err != nil {
		v.Close()
		return cloudBackend{}, err
	}
	// The vault is on 127.0.0.1, not under vault.azure.net, which its
	// challenge names: see disable_challenge_resource_verification in
	// docs/cloudkms.md.
	return cloudBackend{
		yaml: fmt.Sprintf("  - id: azure\n    type: azurekv\n    vault_url: %q\n    disable_challenge_resource_verification: true\n    keys:\n      - {name: %s, key: bench}\n",
			v.URL, cloudKeyName(ScenarioAzureKV)),
		env:  append(v.Env(), "SSL_CERT_FILE="+roots),
		stop: v.Close,
	}, nil
}
