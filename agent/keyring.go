package agent

import (
	"bytes"
	"context"
	"crypto"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/awskms"
	"github.com/sigil-agent/sigil/providers/azurekv"
	"github.com/sigil-agent/sigil/providers/software"
)

// keyEntry is one servable key and the provider that holds it.
type keyEntry struct {
	info     providers.KeyInfo
	provider providers.Provider
	// defaultAlg answers a Sign that names no scheme.
	defaultAlg providers.Algorithm
	// remote: the provider's Sign waits on a network (providers.Remote).
	remote bool
}

// keyring resolves key names and kids to entries. It is built once at start
// and read without locks on the hot path.
type keyring struct {
	// maps is replaced whole when a rotation adds a key, so the hot path
	// reads it with one atomic load and no lock.
	maps       atomic.Pointer[keyMaps]
	addMu      sync.Mutex
	defaultKey *keyEntry
	list       []proto.KeyEntry         // the ListKeys reply, precomputed, without certificates
	certs      atomic.Pointer[keyCerts] // certs.go; nil or empty without `certificates:`
	providers  []providers.Provider
}

type keyMaps struct {
	byName map[string]*keyEntry
	byKID  map[string]*keyEntry
}

func (kr *keyring) entry(name string) *keyEntry { return kr.maps.Load().byName[name] }

// serves reports whether a provider serves the key name: what the
// configuration checks (a slot's key, ssh_keys, next_key) ask of the keyring.
func (kr *keyring) serves(name string) bool { return kr.entry(name) != nil }

func (kr *keyring) entryByKID(kid string) *keyEntry { return kr.maps.Load().byKID[kid] }

// servingAs returns a name other than name under which the key with the
// public key spki is served, or "". A walk of every key: for a rotation's
// rare destroy, not for a request.
func (kr *keyring) servingAs(spki []byte, name string) string {
	for n, e := range kr.maps.Load().byName {
		if n != name && bytes.Equal(e.info.SPKI, spki) {
			return n
		}
	}
	return ""
}

// add serves a key that appeared after start (a rotation's new version, or
// one adopted again after a restart).
func (kr *keyring) add(k providers.KeyInfo, p providers.Provider) (*keyEntry, error) {
	kr.addMu.Lock()
	defer kr.addMu.Unlock()
	old := kr.maps.Load()
	if e := old.byName[k.Name]; e != nil {
		if e.info.KID == k.KID {
			return e, nil
		}
		return nil, fmt.Errorf("key name %q already serves another key", k.Name)
	}
	m := &keyMaps{byName: make(map[string]*keyEntry, len(old.byName)+1), byKID: make(map[string]*keyEntry, len(old.byKID)+1)}
	for n, e := range old.byName {
		m.byName[n] = e
	}
	for n, e := range old.byKID {
		m.byKID[n] = e
	}
	e := &keyEntry{info: k, provider: p, defaultAlg: k.Type.DefaultAlgorithm(), remote: providers.IsRemote(p)}
	m.byName[k.Name] = e
	m.byKID[k.KID] = e
	kr.maps.Store(m)
	return e, nil
}

// remove stops serving the key name with kid: a rotation's key that never
// signed, about to be destroyed. Another key under the name stays.
func (kr *keyring) remove(name, kid string) {
	kr.addMu.Lock()
	defer kr.addMu.Unlock()
	old := kr.maps.Load()
	if e := old.byName[name]; e == nil || e.info.KID != kid {
		return
	}
	m := &keyMaps{byName: make(map[string]*keyEntry, len(old.byName)), byKID: make(map[string]*keyEntry, len(old.byKID))}
	for n, e := range old.byName {
		if n != name {
			m.byName[n] = e
		}
	}
	for k, e := range old.byKID {
		if k != kid {
			m.byKID[k] = e
		}
	}
	kr.maps.Store(m)
}

// openProviders opens every configured provider, closing those already open
// if one fails, so a failed start leaves no token logged in.
func openProviders(ctx context.Context, cfg *Config, log *zap.Logger) (_ []providers.Provider, err error) {
	var opened []providers.Provider
	defer func() {
		if err != nil {
			for _, p := range opened {
				p.Close()
			}
		}
	}()
	for _, spec := range cfg.Providers {
		p, err := openProvider(ctx, spec, log.With(zap.String("provider", spec.ID)))
		if err != nil {
			return nil, fmt.Errorf("provider %s: %w", spec.ID, err)
		}
		opened = append(opened, p)
	}
	return opened, nil
}

func openProvider(ctx context.Context, spec ProviderSpec, log *zap.Logger) (providers.Provider, error) {
	switch spec.Type {
	case "software":
		keys := make([]software.KeyConfig, len(spec.Keys))
		for i, k := range spec.Keys {
			keys[i] = software.KeyConfig{Name: k.Name, Type: providers.KeyType(k.Type)}
		}
		return software.Open(software.Config{ID: spec.ID, DataDir: spec.Dir, Keys: keys})
	case "pkcs11":
		return openPKCS11(ctx, spec, log)
	case "gcpkms":
		return openGCPKMS(ctx, spec, log)
	case "awskms":
		keys := make([]awskms.KeyConfig, len(spec.Keys))
		for i, k := range spec.Keys {
			keys[i] = awskms.KeyConfig{Name: k.Name, KeyID: k.KeyID}
		}
		return awskms.Open(ctx, awskms.Config{ID: spec.ID, Region: spec.Region, Endpoint: spec.Endpoint, Keys: keys, Timeout: spec.Timeout, Logger: log})
	case "azurekv":
		keys := make([]azurekv.KeyConfig, len(spec.Keys))
		for i, k := range spec.Keys {
			keys[i] = azurekv.KeyConfig{Name: k.Name, Key: k.Key, Version: k.Version}
		}
		return azurekv.Open(ctx, azurekv.Config{ID: spec.ID, VaultURL: spec.VaultURL, Keys: keys, Timeout: spec.Timeout, Logger: log,
			DisableChallengeResourceVerification: spec.DisableChallengeResourceVerification})
	}
	return nil, fmt.Errorf("unknown provider type %q", spec.Type)
}

func newKeyring(ctx context.Context, provs []providers.Provider, defaultKey string) (*keyring, error) {
	kr := &keyring{
		list:      []proto.KeyEntry{},
		providers: provs,
	}
	m := &keyMaps{byName: map[string]*keyEntry{}, byKID: map[string]*keyEntry{}}
	for _, p := range provs {
		keys, err := p.Keys(ctx)
		if err != nil {
			return nil, fmt.Errorf("provider %s: list keys: %w", p.ID(), err)
		}
		for _, k := range keys {
			if _, dup := m.byName[k.Name]; dup {
				return nil, fmt.Errorf("key name %q served by two providers", k.Name)
			}
			e := &keyEntry{info: k, provider: p, defaultAlg: k.Type.DefaultAlgorithm(), remote: providers.IsRemote(p)}
			m.byName[k.Name] = e
			m.byKID[k.KID] = e
			kr.list = append(kr.list, proto.KeyEntry{
				Name: k.Name, KID: k.KID, Provider: k.Provider, KeyType: string(k.Type), Pub: k.SPKI,
			})
		}
	}
	kr.maps.Store(m)
	if defaultKey != "" {
		kr.defaultKey = m.byName[defaultKey]
		if kr.defaultKey == nil {
			return nil, fmt.Errorf("default key %q is not served by any provider", defaultKey)
		}
	}
	return kr, nil
}

var errNoDefaultKey = &proto.Error{Code: proto.NotFound, Msg: "no key named and no default_key configured"}

// lookup resolves a request's key: by name, else by kid, else the default.
// An unknown key is NOT_FOUND without saying which keys do exist.
func (kr *keyring) lookup(name, kid string) (*keyEntry, error) {
	switch {
	case name != "":
		e := kr.entry(name)
		if e == nil {
			return nil, &proto.Error{Code: proto.NotFound, Msg: "no key named " + quoteShort(name)}
		}
		if kid != "" && e.info.KID != kid {
			// Both given: the caller pinned the key it expects under the name.
			return nil, &proto.Error{Code: proto.NotFound, Msg: "key " + quoteShort(name) + " does not have kid " + quoteShort(kid)}
		}
		return e, nil
	case kid != "":
		if e := kr.entryByKID(kid); e != nil {
			return e, nil
		}
		return nil, &proto.Error{Code: proto.NotFound, Msg: "no key with kid " + quoteShort(kid)}
	case kr.defaultKey != nil:
		return kr.defaultKey, nil
	}
	return nil, errNoDefaultKey
}

// quoteShort quotes a client-supplied name for a message, cut short so a
// client cannot make the agent echo (or log) a large blob.
func quoteShort(s string) string { return fmt.Sprintf("%q", shortName(s)) }

func (kr *keyring) close() error {
	var errs []error
	for _, p := range kr.providers {
		if err := p.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close provider %s: %w", p.ID(), err))
		}
	}
	return errors.Join(errs...)
}

// wireHash maps the protocol's hash numbers to crypto.Hash.
func wireHash(h uint8) (crypto.Hash, bool) {
	switch h {
	case proto.HashNone:
		return 0, true
	case proto.HashSHA256:
		return crypto.SHA256, true
	case proto.HashSHA384:
		return crypto.SHA384, true
	case proto.HashSHA512:
		return crypto.SHA512, true
	}
	return 0, false
}

// algorithmFor turns the wire's scheme and hash into an Algorithm for key e:
// scheme 0 means the key's default; hash 0 with a hashed scheme means the
// default's hash.
func (e *keyEntry) algorithmFor(scheme, hash uint8) (providers.Algorithm, error) {
	h, ok := wireHash(hash)
	switch {
	case hash == proto.HashOutOfRange:
		// Every number from 255 up reads so: which one it was is unknown.
		return providers.Algorithm{}, &proto.Error{Code: proto.UnsupportedAlgorithm, Msg: fmt.Sprintf("unknown hash number (%d or more)", hash)}
	case !ok:
		return providers.Algorithm{}, &proto.Error{Code: proto.UnsupportedAlgorithm, Msg: fmt.Sprintf("unknown hash number %d", hash)}
	case scheme == proto.SchemeOutOfRange:
		// Other unknown schemes are refused by the policy or
		// providers.CheckRequest, which would name this one 255.
		return providers.Algorithm{}, &proto.Error{Code: proto.UnsupportedAlgorithm, Msg: fmt.Sprintf("unknown scheme number (%d or more)", scheme)}
	}
	alg := e.defaultAlg
	if scheme != proto.SchemeDefault {
		alg.Scheme = providers.Scheme(scheme)
		if alg.Scheme == providers.SchemeEd25519 {
			alg.Hash = 0
		} else if alg.Hash == 0 {
			alg.Hash = crypto.SHA256
		}
	}
	if h != 0 {
		alg.Hash = h
	}
	return alg, nil
}
