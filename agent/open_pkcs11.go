package agent

import (
	"context"

	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/pkcs11"
)

func openPKCS11(ctx context.Context, spec ProviderSpec, log *zap.Logger) (providers.Provider, error) {
	keys := make([]pkcs11.KeyConfig, len(spec.Keys))
	for i, k := range spec.Keys {
		keys[i] = pkcs11.KeyConfig{Name: k.Name, URI: k.URI}
	}
	return pkcs11.Open(ctx, pkcs11.Config{
		ID:          spec.ID,
		Module:      spec.Module,
		TokenLabel:  spec.TokenLabel,
		TokenSerial: spec.TokenSerial,
		Slot:        spec.Slot,
		PINEnv:      spec.PINEnv,
		PINFile:     spec.PINFile,
		Sessions:    spec.Sessions,
		Instances:   spec.Instances,
		Keys:        keys,
		Logger:      log,
	})
}
