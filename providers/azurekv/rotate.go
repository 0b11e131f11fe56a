package azurekv

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"encoding/hex"
	"errors"
	"fmt"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
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
	// A tag only this call's version carries: after a create whose answer
	// was lost, the version to disable is the one with it, not whatever
	// else another writer (a second agent, the vault's rotation policy, an
	// operator) made meanwhile.
	var nonce [16]byte
	rand.Read(nonce[:])
	tag := hex.EncodeToString(nonce[:])
	params := azkeys.CreateKeyParameters{
		Kty:    &kty,
		KeyOps: []*azkeys.KeyOperation{ptr(azkeys.KeyOperationSign), ptr(azkeys.KeyOperationVerify)},
		Tags:   map[string]*string{rotationTag: &tag},
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
	// The versions there are now: a create whose answer is lost may have
	// made one, which is then found by its absence here.

	callCtx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	// Sent once: not idempotent, and a 5xx or a lost answer may come after
	// the vault made the version, so each retry would make another. Aside,
	// as Sign's call (see signCall), so that a token fetch another call
	// holds cannot keep the rotation past its deadline. A create abandoned
	// there is sent, if at all, with a context already ended; one in flight
	// at the deadline may still be carried out, as any lost answer: the
	// version is then found by its tag and disabled, or named for the
	// operator, and never served.
	createCtx := policy.WithRetryOptions(callCtx, policy.RetryOptions{MaxRetries: -1})
	resp, err := providers.CallAside(callCtx, func() (azkeys.CreateKeyResponse, error) {
		return p.client.CreateKey(createCtx, b.key, params, nil)
	})
	if err != nil {
		err = classify(ctx, callCtx, op, err)
		return fail(p.disableTagged(ctx, b.key, tag, err))
	}
	made := func(err error) (providers.KeyInfo, error) {
		if resp.Key != nil && resp.Key.KID != nil && resp.Key.KID.Version() != b.version {
			err = p.disable(ctx, b.key, resp.Key.KID.Version(), err)
		}
		return fail(err)
	}
	k, err := p.entryOf(op, KeyConfig{Name: name, Key: b.key}, resp.KeyBundle)
	if err != nil {
		return made(err)
	}
	if k.version == b.version {
		return fail(fmt.Errorf("azurekv %s: the vault answered with the base's version: %w", op, providers.ErrUnavailable))
	}
	if err := p.keys.Add(name, k); err != nil {
		return made(err)
	}
	p.log.Info("azurekv key version created", zap.String("key", name),
		zap.String("base", base), zap.String("vault_key", k.key), zap.String("version", k.version), zap.String("kid", k.info.KID))
	return k.info, nil
}

// rotationTag names the tag NewVersion sets on the version it creates.
const rotationTag = "sigil-rotation"

// disableTagged disables the version of key that carries the rotation tag
// tag, if the vault made one before a create whose outcome is unknown
// failed, and returns cause with what became of it.
func (p *Provider) disableTagged(ctx context.Context, key, tag string, cause error) error {
	callCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), p.timeout)
	defer cancel()
	var found string
	err := p.eachVersion(callCtx, key, func(kp *azkeys.KeyProperties) bool {
		if kp.KID == nil || kp.Tags[rotationTag] == nil || *kp.Tags[rotationTag] != tag {
			return true
		}
		found = kp.KID.Version()
		return false
	})
	if err != nil {
		if !errors.Is(err, errTooManyVersions) {
			err = classify(ctx, callCtx, "list versions of "+key, err)
		}
		return fmt.Errorf("%w; listing the key's versions to find one the failed create may have made failed too (%v): check for an enabled version tagged %s=%s, and disable it",
			cause, err, rotationTag, tag)
	}
	if found != "" {
		return p.disable(ctx, key, found, cause)
	}
	return cause
}

// disable disables a version a failed NewVersion made, so that it is not
// left as the vault key's current one, and returns cause saying so.
func (p *Provider) disable(ctx context.Context, key, version string, cause error) error {
	// The provider never serves the version, whatever becomes of the
	// update: it was not added to the key table.
	if err := p.disableVersion(ctx, key, version); err != nil {
		return fmt.Errorf("%w; the version %s it made could not be disabled (%v), and may be the key's current one: check it and disable it by hand", cause, version, err)
	}
	return fmt.Errorf("%w; the version %s it made was disabled", cause, version)
}

// disableVersion disables one version of key (UpdateKey, enabled: false),
// the only way to retire a single version: Key Vault deletes whole keys,
// every version at once. It runs even when ctx is done (a rotation that
// failed at its deadline still cleans up).
func (p *Provider) disableVersion(ctx context.Context, key, version string) error {
	callCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), p.timeout)
	defer cancel()
	enabled := false
	// Aside (see signCall). An update abandoned at its deadline, like one
	// whose answer was lost, may yet disable the version: so the error says
	// only that it may still be enabled.
	_, err := providers.CallAside(callCtx, func() (azkeys.UpdateKeyResponse, error) {
		return p.client.UpdateKey(callCtx, key, version, azkeys.UpdateKeyParameters{KeyAttributes: &azkeys.KeyAttributes{Enabled: &enabled}}, nil)
	})
	if err != nil {
		// Classified, for the log too: the SDK's error carries the vault's
		// whole answer, which stays out of logs as out of messages.
		err = classify(callCtx, callCtx, "disable "+key, err)
		p.log.Warn("azurekv: a version made by a failed rotation could not be disabled", zap.String("vault_key", key), zap.String("version", version), zap.Error(err))
		return err
	}
	p.log.Warn("azurekv: disabled the version a failed rotation made", zap.String("vault_key", key), zap.String("version", version))
	return nil
}

// DestroyKey disables the version NewVersion made under name, for a
// rotation attempt that never cut over (rotation.KeyDestroyer): Key Vault
// cannot delete a single version, and a disabled one signs nothing. check
// is called with its KeyInfo, and an error from it keeps the version,
// served and enabled as before. The version stops being served before the
// update is sent; one whose update failed is found again by a later call.
// The version stays in the vault, disabled, and is still the key's newest:
// a key named without a version passes over it to the newest enabled
// version (see openNewestUsable).
//
// Only versions made by this provider since it started are found: after a
// restart, a version an earlier process made is not known by name, and the
// error says so (it is not ErrNotFound: the version may well exist).
func (p *Provider) DestroyKey(ctx context.Context, name string, check func(providers.KeyInfo) error) error {
	if p.closed.Load() {
		return fmt.Errorf("azurekv provider %s: destroy key %s: provider closed: %w", p.id, name, providers.ErrUnavailable)
	}
	p.keysMu.Lock()
	defer p.keysMu.Unlock()
	err := p.unused.Destroy(&p.keys, name, func(k *remoteKey) error { return check(k.info) },
		func(k *remoteKey) error { return p.disableVersion(ctx, k.key, k.version) })
	if err != nil {
		return fmt.Errorf("azurekv provider %s: destroy key %s: %w", p.id, name, err)
	}
	return nil
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
