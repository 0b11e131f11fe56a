package agent

import (
	"context"
	"fmt"

	"go.uber.org/zap"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/gcpkms"
)

func openGCPKMS(ctx context.Context, spec ProviderSpec, log *zap.Logger) (providers.Provider, error) {
	keys := make([]gcpkms.KeyConfig, len(spec.Keys))
	for i, k := range spec.Keys {
		keys[i] = gcpkmsKey(spec, k)
	}
	var opts []option.ClientOption
	if spec.Endpoint != "" {
		opts = append(opts, option.WithEndpoint(spec.Endpoint))
	}
	if spec.InsecureEndpoint {
		opts = append(opts, option.WithoutAuthentication(),
			option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())))
	}
	return gcpkms.Open(ctx, gcpkms.Config{ID: spec.ID, Keys: keys, Timeout: spec.Timeout, ClientOptions: opts, Logger: log})
}

// gcpkmsKey is the provider's configuration of key k: the one mapping,
// which Validate checks and openGCPKMS opens. The config's ids make the
// key's resource name.
func gcpkmsKey(spec ProviderSpec, k KeySpec) gcpkms.KeyConfig {
	kc := gcpkms.KeyConfig{Name: k.Name,
		Resource: fmt.Sprintf("projects/%s/locations/%s/keyRings/%s/cryptoKeys/%s", spec.Project, spec.Location, spec.KeyRing, k.Key)}
	if k.Version == gcpkms.VersionLatest {
		kc.Version = gcpkms.VersionLatest
	} else {
		kc.Resource += "/cryptoKeyVersions/" + k.Version
	}
	return kc
}
