package agent

import (
	"context"
	"errors"
	"fmt"

	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/pkcs11"
)

func openPKCS11(ctx context.Context, spec ProviderSpec, log *zap.Logger) (providers.Provider, error) {
	cfg := pkcs11Config(spec)
	cfg.Logger = log
	p, err := pkcs11.Open(ctx, cfg)
	if errors.Is(err, pkcs11.ErrPINSource) || errors.Is(err, pkcs11.ErrModuleLoad) {
		// Not a module that loads and whose C_Initialize fails: its
		// device may come back, and a restart may find it.
		return nil, &configError{err}
	}
	if err != nil {
		// A nil *pkcs11.Provider in the interface would not be nil.
		return nil, err
	}
	return p, nil
}

// pkcs11Config is the provider's configuration from spec: the one mapping,
// which Validate checks and openPKCS11 opens.
func pkcs11Config(spec ProviderSpec) pkcs11.Config {
	keys := make([]pkcs11.KeyConfig, len(spec.Keys))
	for i, k := range spec.Keys {
		keys[i] = pkcs11.KeyConfig{Name: k.Name, URI: k.URI}
	}
	return pkcs11.Config{
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
	}
}

// pkcs11FieldNames are pkcs11.Config's fields as the config file spells
// them (ProviderSpec's and KeySpec's yaml tags).
var pkcs11FieldNames = pkcs11.FieldNames{
	"Module": "module", "TokenLabel": "token_label", "TokenSerial": "token_serial", "Slot": "slot",
	"PINEnv": "pin_env", "PINFile": "pin_file", "Instances": "module_instances", "URI": "uri",
}

// pkcs11ConfigErrors is what pkcs11.Open would refuse in spec before it
// loads the module, each problem on its own, named as the config file
// names it; where prefixes each ("providers[0]").
func pkcs11ConfigErrors(where string, spec ProviderSpec) []error {
	err := pkcs11Config(spec).Validate(pkcs11FieldNames)
	if err == nil {
		return nil
	}
	errs := []error{err}
	if joined, ok := err.(interface{ Unwrap() []error }); ok {
		errs = joined.Unwrap()
	}
	out := make([]error, len(errs))
	for i, e := range errs {
		out[i] = fmt.Errorf("%s: %w", where, e)
	}
	return out
}
