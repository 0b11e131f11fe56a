package azurekv

import (
	"context"
	"crypto/rsa"
	"fmt"

	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"
	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/providers"
)

// NewVersion creates a new version of the vault key behind the served key
// base (same key type and curve or RSA size, key_ops sign and verify) and
// starts serving it under name, pinned to the new version. base keeps its
// own pinned version. The new version becomes the vault key's current one.
func (p *Provider) NewVersion(ctx context.Context, base, name string) (providers.KeyInfo, error) {
	fail := func(err error) (providers.KeyInfo, error) {
		return providers.KeyInfo{}, fmt.Errorf("azurekv new version %s of %s: %w", name, base, err)
	}
	if name == "" {
		return fail(fmt.Errorf("empty key name: %w", providers.ErrBadRequest))
	}
	if p.closed.Load() {
		return fail(fmt.Errorf("provider closed: %w", providers.ErrUnavailable))
	}
	p.keysMu.Lock()
	defer p.keysMu.Unlock()
	b, ok := p.keys.Get(base)
	if !ok {
		return fail(providers.ErrNotFound)
	}
	if _, dup := p.keys.Get(name); dup {
		return fail(fmt.Errorf("a key of that name is already served: %w", providers.ErrBadRequest))
	}
	kty := b.kty
	params := azkeys.CreateKeyParameters{
		Kty:    &kty,
		KeyOps: []*azkeys.KeyOperation{ptr(azkeys.KeyOperationSign), ptr(azkeys.KeyOperationVerify)},
	}
	switch pub := b.info.Public.(type) {
	case *rsa.PublicKey:
		size := int32(pub.N.BitLen())
		params.KeySize = &size
	default:
		crv := b.crv
		params.Curve = &crv
	}
	op := "create key " + b.key
	callCtx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	resp, err := p.client.CreateKey(callCtx, b.key, params, nil)
	if err != nil {
		return fail(classify(ctx, callCtx, op, err))
	}
	k, err := p.entryOf(op, KeyConfig{Name: name, Key: b.key}, resp.KeyBundle)
	if err != nil {
		return fail(err)
	}
	if k.version == b.version {
		return fail(fmt.Errorf("azurekv %s: the vault answered with the base's version: %w", op, providers.ErrUnavailable))
	}
	if err := p.keys.Add(name, k); err != nil {
		return fail(err)
	}
	p.log.Info("azurekv key version created", zap.String("key", name),
		zap.String("base", base), zap.String("vault_key", k.key), zap.String("version", k.version), zap.String("kid", k.info.KID))
	return k.info, nil
}

// URI returns the full Key Vault key id (the kid URL, version included) of a
// served key, for writing into a configuration and passing to AddKey after a
// restart.
func (p *Provider) URI(name string) (string, error) {
	k, ok := p.keys.Get(name)
	if !ok {
		return "", fmt.Errorf("azurekv uri %s: %w", name, providers.ErrNotFound)
	}
	return k.uri, nil
}

// AddKey starts serving, under name, the key version a Key Vault key id
// names (https://<vault>/keys/<key>/<version>): a version a rotation created
// before a restart. Adding the same name and kid again returns the served
// key.
func (p *Provider) AddKey(ctx context.Context, name, kid string) (providers.KeyInfo, error) {
	fail := func(err error) (providers.KeyInfo, error) {
		return providers.KeyInfo{}, fmt.Errorf("azurekv add key %s: %w", name, err)
	}
	if name == "" {
		return fail(fmt.Errorf("empty key name: %w", providers.ErrBadRequest))
	}
	id := azkeys.ID(kid)
	key, version := id.Name(), id.Version()
	if key == "" || version == "" {
		return fail(fmt.Errorf("kid does not name a key version: %w", providers.ErrBadRequest))
	}
	if p.closed.Load() {
		return fail(fmt.Errorf("provider closed: %w", providers.ErrUnavailable))
	}
	p.keysMu.Lock()
	defer p.keysMu.Unlock()
	if k, dup := p.keys.Get(name); dup {
		if k.key == key && k.version == version {
			return k.info, nil
		}
		return fail(fmt.Errorf("a different key is served under this name: %w", providers.ErrBadRequest))
	}
	k, err := p.openKey(ctx, KeyConfig{Name: name, Key: key, Version: version})
	if err != nil {
		return fail(err)
	}
	if err := p.keys.Add(name, k); err != nil {
		return fail(err)
	}
	p.log.Info("azurekv key added", zap.String("key", name),
		zap.String("vault_key", k.key), zap.String("version", k.version), zap.String("kid", k.info.KID))
	return k.info, nil
}

func ptr[T any](v T) *T { return &v }
