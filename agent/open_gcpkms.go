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
	ring := fmt.Sprintf("projects/%s/locations/%s/keyRings/%s", spec.Project, spec.Location, spec.KeyRing)
	keys := make([]gcpkms.KeyConfig, len(spec.Keys))
	for i, k := range spec.Keys {
		kc := gcpkms.KeyConfig{Name: k.Name, Resource: ring + "/cryptoKeys/" + k.Key}
		if k.Version == gcpkms.VersionLatest {
			kc.Version = gcpkms.VersionLatest
		} else {
			kc.Resource += "/cryptoKeyVersions/" + k.Version
		}
		keys[i] = kc
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
