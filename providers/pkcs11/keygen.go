package pkcs11

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/asn1"
	"errors"
	"fmt"
	"strings"
	"time"

	p11 "github.com/miekg/pkcs11"
	"github.com/sigil-agent/sigil/providers"
	"go.uber.org/zap"
)

// GenerateKey creates a key pair in the token (C_GenerateKeyPair, token
// objects; the private key can sign and do nothing else, is sensitive and
// never extractable; the public key can only verify),
// and adds it to the keys the provider serves under name. label and id
// become CKA_LABEL and CKA_ID of both halves; an empty label means name, a
// nil id a random 16-byte one. Either already naming a private key on the
// token is an error: the new key could not be found unambiguously after a
// re-login.
//
// Generation cannot be interrupted once started (RSA-4096 takes seconds on
// SoftHSM); ctx is checked before it begins.
func (p *Provider) GenerateKey(ctx context.Context, name string, kt providers.KeyType, label string, id []byte) (providers.KeyInfo, error) {
	fail := func(err error) (providers.KeyInfo, error) {
		return providers.KeyInfo{}, fmt.Errorf("pkcs11 generate %s: %w", name, err)
	}
	if name == "" {
		return fail(errors.New("empty key name"))
	}
	if label == "" {
		label = name
	}
	if id == nil {
		id = make([]byte, 16)
		if _, err := rand.Read(id); err != nil {
			return fail(err)
		}
	}
	pubTmpl, privTmpl, mech, err := keyTemplates(kt, label, id)
	if err != nil {
		return fail(err)
	}
	if !p.enter() {
		return fail(errClosed)
	}
	defer p.exit()
	p.keysMu.Lock()
	defer p.keysMu.Unlock()
	if _, dup := p.keys.Get(name); dup {
		return fail(errors.New("a key of that name is already served"))
	}
	sh, shGen, closeSession, err := p.openWriteSession(ctx)
	if err != nil {
		return fail(err)
	}
	defer closeSession()

	sel := objectSelector{label: label, id: id}
	k := &key{obj: sel}
	k.info.Name = name
	start := time.Now()
	// The write runs alone among the module instances (instances.go).
	err = p.writeExclusive(func() error {
		// A reload meanwhile voided sh: its number may be another
		// provider's session, on another token.
		return p.onSession(context.Background(), "generate", shGen, func(c *p11.Ctx) error {
			// Private and public objects alike: a leftover public key with
			// the id would make the new pair's public half ambiguous.
			for _, class := range []uint{p11.CKO_PRIVATE_KEY, p11.CKO_PUBLIC_KEY} {
				for _, a := range []*p11.Attribute{p11.NewAttribute(p11.CKA_LABEL, label), p11.NewAttribute(p11.CKA_ID, id)} {
					objs, err := findObjects(c, sh, []*p11.Attribute{p11.NewAttribute(p11.CKA_CLASS, class), a}, 1)
					if err != nil {
						return err
					}
					if len(objs) > 0 {
						return fmt.Errorf("a %s key with this %s already exists on the token",
							map[uint]string{p11.CKO_PRIVATE_KEY: "private", p11.CKO_PUBLIC_KEY: "public"}[class],
							map[uint]string{p11.CKA_LABEL: "label", p11.CKA_ID: "id"}[a.Type])
					}
				}
			}
			pubH, priv, err := c.GenerateKeyPair(sh, []*p11.Mechanism{p11.NewMechanism(mech, nil)}, pubTmpl, privTmpl)
			if err != nil {
				return fmt.Errorf("C_GenerateKeyPair: %w", err)
			}
			// From here a failure destroys the new pair: left on the
			// token it would be a key no journal record names, holding
			// the label the next attempt needs.
			// When the destruction fails too (the session or the device
			// gone), the error says so and names the pair: an operator
			// must remove it before the label and id can be used again.
			destroy := func(err error) error {
				derr := errors.Join(p.destroyObject(c, sh, priv), p.destroyObject(c, sh, pubH))
				if derr == nil {
					return err
				}
				p.log.Error("pkcs11 key generation failed and its key pair is left on the token",
					zap.String("key", name), zap.Stringer("object", sel), zap.NamedError("cause", err), zap.NamedError("destroy", derr))
				return fmt.Errorf("%w; the new key pair (label %q, id %x) is left on the token: destroying it failed: %v", err, label, id, derr)
			}
			if rv := hook(p.inject, "public-key"); rv != 0 {
				return destroy(p11.Error(rv))
			}
			pub, err := readPublicKey(c, sh, priv)
			if err != nil {
				return destroy(err)
			}
			info, err := providers.NewKeyInfo(p.id, name, pub)
			if err != nil {
				return destroy(err)
			}
			if info.Type != kt {
				return destroy(fmt.Errorf("token generated a %s key, asked for %s", info.Type, kt))
			}
			n, err := signatureLen(pub)
			if err != nil {
				return destroy(err)
			}
			k.info, k.sigLen = info, n
			k.setHandle(priv, shGen)
			return nil
		})
	})
	if err != nil {
		p.afterWriteFailed(err)
		return fail(err)
	}

	if err := p.keys.Add(name, k); err != nil {
		return fail(err) // not reached: keysMu is held since the check above
	}
	p.addToPeers(ctx, KeyConfig{Name: name, URI: formatURI(p.tokenLabel, sel)})
	p.log.Info("pkcs11 key generated", zap.String("key", name), zap.String("kid", k.info.KID),
		zap.String("type", string(kt)), zap.Stringer("object", sel), zap.Duration("took", time.Since(start)))
	return k.info, nil
}

// afterWriteFailed asks for what a failed token write calls for: the
// provider's state looked at again when the module reloaded meanwhile, a
// repair when the token's answer needs one (a lost login, a removed
// device).
func (p *Provider) afterWriteFailed(err error) {
	if errors.Is(err, errStale) {
		p.afterStale(p.state.Load().epoch)
		return
	}
	if lvl := classify(rvOf(err)).repair(); rvOf(err) != 0 && lvl >= repairLogin {
		p.requestRepair(lvl, p.state.Load().epoch)
	}
}

// openWriteSession opens a read-write session of its own for a token
// write (generating or destroying a key), unless ctx has ended or the
// provider is not serving (stateError). Of its own: a write can take
// seconds and should not hold one of the signing sessions. It returns the
// session, the module generation its handles belong to, and its close,
// which closes it only in that generation (after a reload the number may
// be another provider's session) and keeps the login, since the pool's
// sessions stay open.
func (p *Provider) openWriteSession(ctx context.Context) (p11.SessionHandle, uint64, func(), error) {
	if err := ctx.Err(); err != nil {
		return 0, 0, nil, err
	}
	if err := stateError(p.state.Load()); err != nil {
		return 0, 0, nil, err
	}
	var sh p11.SessionHandle
	var shGen uint64
	err := p.call("open-session", func(c *p11.Ctx) error {
		var err error
		shGen = p.mod.gen.Load()
		if p.gen.Load() != shGen {
			// The slot is from before another provider's reload: it may
			// be another token's now.
			return errStale
		}
		sh, err = c.OpenSession(uint(p.slot.Load()), p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
		return err
	})
	if errors.Is(err, errStale) {
		p.afterStale(p.state.Load().epoch)
		return 0, 0, nil, fmt.Errorf("open session: %w", err)
	}
	if err != nil {
		p.requestRepair(classify(rvOf(err)).repair(), p.state.Load().epoch)
		return 0, 0, nil, fmt.Errorf("open session: %w: %w", providers.ErrUnavailable, err)
	}
	return sh, shGen, func() {
		_ = p.onSession(context.Background(), "", shGen, func(c *p11.Ctx) error { return c.CloseSession(sh) })
	}, nil
}

// DestroyKey destroys a key pair this provider generated under name and
// that was never used (rotation.KeyDestroyer: the key of a rotation attempt
// that failed before its cut-over): C_DestroyObject on the private key and
// on the public key with its id. The key served under name is the one
// destroyed; one not served (an attempt that died, and the agent
// restarted) is found by its label, name, as GenerateKey makes it with an
// empty label. check is given the key's info first; its error keeps the
// key and is returned. No private key there is an error wrapping
// providers.ErrNotFound; more than one is an error too, and all are kept:
// which to destroy would be a guess. The key stops being served, by every module instance,
// before it is destroyed.
func (p *Provider) DestroyKey(ctx context.Context, name string, check func(providers.KeyInfo) error) error {
	fail := func(err error) error { return fmt.Errorf("pkcs11 destroy %s: %w", name, err) }
	if name == "" {
		return fail(errors.New("empty key name"))
	}
	if !p.enter() {
		return fail(errClosed)
	}
	defer p.exit()
	p.keysMu.Lock()
	defer p.keysMu.Unlock()
	sel := objectSelector{label: name}
	served, _ := p.keys.Get(name)
	if served != nil {
		sel = served.obj
	}
	sh, shGen, closeSession, err := p.openWriteSession(ctx)
	if err != nil {
		return fail(err)
	}
	defer closeSession()
	err = p.writeExclusive(func() error {
		return p.onSession(context.Background(), "", shGen, func(c *p11.Ctx) error {
			priv, err := findPrivateKey(c, sh, sel)
			if errors.Is(err, errObjectMissing) {
				return providers.ErrNotFound
			}
			if err != nil {
				return err
			}
			pub, err := readPublicKey(c, sh, priv)
			if err != nil {
				return err
			}
			info, err := providers.NewKeyInfo(p.id, name, pub)
			if err != nil {
				return err
			}
			if served != nil && served.info.KID != info.KID {
				return fmt.Errorf("the object found has kid %s, the key served under the name %s", info.KID, served.info.KID)
			}
			for _, other := range p.keys.All() {
				// By public key: a kid hashes the name too.
				if other.info.Name != name && bytes.Equal(other.info.SPKI, info.SPKI) {
					return fmt.Errorf("the key is served as %q", other.info.Name)
				}
			}
			if err := check(info); err != nil {
				return err
			}
			attrs, err := c.GetAttributeValue(sh, priv, []*p11.Attribute{p11.NewAttribute(p11.CKA_ID, nil)})
			if err != nil {
				return err
			}
			tmpl := append([]*p11.Attribute{p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PUBLIC_KEY)}, sel.attributes()...)
			if sel.id == nil && len(attrs) == 1 && len(attrs[0].Value) > 0 {
				tmpl = append(tmpl, p11.NewAttribute(p11.CKA_ID, attrs[0].Value))
			}
			pubs, err := findObjects(c, sh, tmpl, 2)
			if err != nil {
				return err
			}
			// Not served from here on: it is going.
			// Not under the peers' keysMu: a peer's AddKey holds it while
			// it waits for its module, paused by this write, to open again
			// (a deadlock with module_instances > 1). A KeySet locks itself.
			p.keys.Remove(name)
			for _, q := range p.peers {
				q.keys.Remove(name)
			}
			if err := p.destroyObject(c, sh, priv); err != nil {
				return fmt.Errorf("C_DestroyObject (private key): %w", err)
			}
			if len(pubs) != 1 {
				// None, or several: which is the pair's would be a guess.
				p.log.Warn("pkcs11 key destroyed; its public key object is left on the token",
					zap.String("key", name), zap.Stringer("object", sel), zap.Int("public_objects", len(pubs)))
				return nil
			}
			if err := p.destroyObject(c, sh, pubs[0]); err != nil {
				return fmt.Errorf("C_DestroyObject (public key): %w", err)
			}
			return nil
		})
	})
	if err != nil {
		p.afterWriteFailed(err)
		return fail(err)
	}
	p.log.Info("pkcs11 key destroyed", zap.String("key", name), zap.Stringer("object", sel))
	return nil
}

// destroyObject is C_DestroyObject through the fault hook ("destroy").
func (p *Provider) destroyObject(c *p11.Ctx, sh p11.SessionHandle, h p11.ObjectHandle) error {
	if rv := hook(p.inject, "destroy"); rv != 0 {
		return p11.Error(rv)
	}
	return c.DestroyObject(sh, h)
}

// URI returns the RFC 7512 URI that names a generated (or configured) key's
// object, for writing into a configuration.
func (p *Provider) URI(name string) (string, error) {
	k, _ := p.keys.Get(name)
	if k == nil {
		return "", fmt.Errorf("pkcs11 uri %s: %w", name, providers.ErrNotFound)
	}
	return formatURI(p.tokenLabel, k.obj), nil
}

func formatURI(token string, o objectSelector) string {
	var attrs []string
	// A token with a blank label (picked by serial or slot) is named by
	// the provider's own selection alone: an empty token= is refused.
	if token != "" {
		attrs = append(attrs, "token="+pctEncode([]byte(token)))
	}
	if o.label != "" {
		attrs = append(attrs, "object="+pctEncode([]byte(o.label)))
	}
	if o.id != nil {
		attrs = append(attrs, "id="+pctEncodeAll(o.id))
	}
	return "pkcs11:" + strings.Join(attrs, ";")
}

// pctEncode escapes everything outside RFC 3986's unreserved set.
func pctEncode(b []byte) string {
	const hex = "0123456789ABCDEF"
	out := make([]byte, 0, len(b))
	for _, c := range b {
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.' || c == '_' || c == '~' {
			out = append(out, c)
			continue
		}
		out = append(out, '%', hex[c>>4], hex[c&15])
	}
	return string(out)
}

// pctEncodeAll escapes every byte: ids are binary.
func pctEncodeAll(b []byte) string {
	const hex = "0123456789ABCDEF"
	out := make([]byte, 0, 3*len(b))
	for _, c := range b {
		out = append(out, '%', hex[c>>4], hex[c&15])
	}
	return string(out)
}

func keyTemplates(kt providers.KeyType, label string, id []byte) (pub, priv []*p11.Attribute, mech uint, err error) {
	common := func(class uint, keyType uint) []*p11.Attribute {
		return []*p11.Attribute{
			p11.NewAttribute(p11.CKA_CLASS, class),
			p11.NewAttribute(p11.CKA_KEY_TYPE, keyType),
			p11.NewAttribute(p11.CKA_TOKEN, true),
			p11.NewAttribute(p11.CKA_LABEL, label),
			p11.NewAttribute(p11.CKA_ID, id),
		}
	}
	// The uses a key of its type has, but signing, are set false, not left
	// out: a token's defaults fill in what the template omits, and
	// SoftHSM2's are CKA_DECRYPT, CKA_UNWRAP, CKA_SIGN_RECOVER (raw RSA: a
	// decryption oracle) true on an RSA private key, CKA_ENCRYPT, CKA_WRAP
	// true on its public one. Only the uses the type has: tokens refuse an
	// attribute they do not support for it (AWS CloudHSM answers
	// CKR_TEMPLATE_INCONSISTENT for CKA_DECRYPT on an EC key, older
	// YubiHSM modules CKR_ATTRIBUTE_TYPE_INVALID for CKA_SIGN_RECOVER),
	// and key generation, a rotation's first step, would fail on them.
	privAttrs := func(keyType uint, off ...uint) []*p11.Attribute {
		a := append(common(p11.CKO_PRIVATE_KEY, keyType),
			p11.NewAttribute(p11.CKA_PRIVATE, true),
			p11.NewAttribute(p11.CKA_SIGN, true),
			p11.NewAttribute(p11.CKA_SENSITIVE, true),
			p11.NewAttribute(p11.CKA_EXTRACTABLE, false),
		)
		for _, t := range off {
			a = append(a, p11.NewAttribute(t, false))
		}
		return a
	}
	pubAttrs := func(keyType uint, off ...uint) []*p11.Attribute {
		a := append(common(p11.CKO_PUBLIC_KEY, keyType),
			p11.NewAttribute(p11.CKA_PRIVATE, false),
			p11.NewAttribute(p11.CKA_VERIFY, true),
		)
		for _, t := range off {
			a = append(a, p11.NewAttribute(t, false))
		}
		return a
	}
	ecParams := func(oid asn1.ObjectIdentifier) []byte {
		b, _ := asn1.Marshal(oid)
		return b
	}
	switch kt {
	case providers.KeyECDSAP256, providers.KeyECDSAP384:
		oid := oidP256
		if kt == providers.KeyECDSAP384 {
			oid = oidP384
		}
		// An EC key's one other use is key agreement (ECDH).
		pub = append(pubAttrs(p11.CKK_EC), p11.NewAttribute(p11.CKA_EC_PARAMS, ecParams(oid)))
		return pub, privAttrs(p11.CKK_EC, p11.CKA_DERIVE), p11.CKM_EC_KEY_PAIR_GEN, nil
	case providers.KeyEd25519:
		// EdDSA keys only sign.
		pub = append(pubAttrs(ckkECEdwards), p11.NewAttribute(p11.CKA_EC_PARAMS, ecParams(oidEd25519)))
		return pub, privAttrs(ckkECEdwards), ckmECEdwardsKeyPairGen, nil
	case providers.KeyRSA2048, providers.KeyRSA3072, providers.KeyRSA4096:
		bits := map[providers.KeyType]int{providers.KeyRSA2048: 2048, providers.KeyRSA3072: 3072, providers.KeyRSA4096: 4096}[kt]
		pub = append(pubAttrs(p11.CKK_RSA, p11.CKA_ENCRYPT, p11.CKA_WRAP, p11.CKA_VERIFY_RECOVER),
			p11.NewAttribute(p11.CKA_MODULUS_BITS, bits),
			p11.NewAttribute(p11.CKA_PUBLIC_EXPONENT, []byte{1, 0, 1}),
		)
		return pub, privAttrs(p11.CKK_RSA, p11.CKA_DECRYPT, p11.CKA_UNWRAP, p11.CKA_SIGN_RECOVER), p11.CKM_RSA_PKCS_KEY_PAIR_GEN, nil
	}
	return nil, nil, 0, fmt.Errorf("key type %q: %w", kt, providers.ErrUnsupportedAlgorithm)
}

// AddKey starts serving a key already on the token, named by its RFC 7512
// URI: a key version a rotation generated before a restart. The URI's token
// attributes (token, serial, manufacturer, model, slot-id) must all be
// this provider's token's.
func (p *Provider) AddKey(ctx context.Context, kc KeyConfig) (providers.KeyInfo, error) {
	info, err := p.addKey(ctx, kc)
	if err == nil {
		p.addToPeers(ctx, kc)
	}
	return info, err
}

func (p *Provider) addKey(ctx context.Context, kc KeyConfig) (providers.KeyInfo, error) {
	fail := func(err error) (providers.KeyInfo, error) {
		return providers.KeyInfo{}, fmt.Errorf("pkcs11 add key %s: %w", kc.Name, err)
	}
	obj, tok, err := parseKeyURI(kc.URI, p.modulePath, nil)
	if err != nil {
		return fail(err)
	}
	// Every token attribute the URI gives counts, as at Open: a URI for
	// another vendor's or model's token, or another slot, must not pick
	// up a key of the same label here.
	if !tok.matches(p.tokenInfo) || (tok.slot != nil && uint64(*tok.slot) != p.slot.Load()) {
		return fail(fmt.Errorf("the URI names another token than %q", p.tokenLabel))
	}
	if !p.enter() {
		return fail(errClosed)
	}
	defer p.exit()
	p.keysMu.Lock()
	defer p.keysMu.Unlock()
	if k, dup := p.keys.Get(kc.Name); dup {
		if k.obj.equal(obj) {
			return k.info, nil
		}
		return fail(errors.New("a different key is served under this name"))
	}
	s, _, err := p.acquire(ctx)
	if err != nil {
		return fail(err)
	}
	k := &key{obj: obj}
	k.info.Name = kc.Name
	err = p.resolveKey(s, k)
	p.release(s)
	if err != nil {
		return fail(err)
	}
	if other := p.sameObject(k); other != nil {
		return fail(fmt.Errorf("its object is served as %q already", other.info.Name))
	}
	if err := p.keys.Add(kc.Name, k); err != nil {
		return fail(err)
	}
	return k.info, nil
}
