package agent

import (
	"context"
	"errors"

	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/providers"
)

// openPKCS11 is replaced by the PKCS#11 provider in the next commit; until
// then a pkcs11 entry in the config fails the start with this error.
func openPKCS11(context.Context, ProviderSpec, *zap.Logger) (providers.Provider, error) {
	return nil, errors.New("pkcs11 providers are not in this build yet")
}
