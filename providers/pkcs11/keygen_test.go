package pkcs11

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"

	p11 "github.com/miekg/pkcs11"

	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/pkcs11/softhsmtest"
)

// tokenAttributes reads the boolean attributes attrs of the one object of
// class with CKA_ID id, through a handle of the process's own on tok's
// module (the provider's login serves it).
func tokenAttributes(t *testing.T, tok *softhsmtest.Token, class uint, id []byte, attrs []uint) map[uint]bool {
	t.Helper()
	got := map[uint]bool{}
	tok.WithModule(t, func(c *p11.Ctx, slot uint) {
		s, err := c.OpenSession(slot, p11.CKF_SERIAL_SESSION)
		if err != nil {
			t.Fatal(err)
		}
		defer c.CloseSession(s)
		if err := c.Login(s, p11.CKU_USER, tok.PIN); err != nil && !errors.Is(err, p11.Error(p11.CKR_USER_ALREADY_LOGGED_IN)) {
			t.Fatal(err)
		}
		objs, err := findObjects(c, s, []*p11.Attribute{p11.NewAttribute(p11.CKA_CLASS, class), p11.NewAttribute(p11.CKA_ID, id)}, 2)
		if err != nil || len(objs) != 1 {
			t.Fatalf("objects of class %d with id %x: %v %v", class, id, objs, err)
		}
		tmpl := make([]*p11.Attribute, len(attrs))
		for i, a := range attrs {
			tmpl[i] = p11.NewAttribute(a, nil)
		}
		vals, err := c.GetAttributeValue(s, objs[0], tmpl)
		if err != nil {
			t.Fatalf("C_GetAttributeValue: %v", err)
		}
		for _, v := range vals {
			got[v.Type] = len(v.Value) == 1 && v.Value[0] != 0
		}
	})
	return got
}

// A generated key can sign and nothing else: a private key that can also
// decrypt, unwrap or derive is a second use of the signing key that no
// policy of the agent governs, and its public half should not encrypt or
// wrap for it either. SoftHSM2's defaults for what the template leaves out
// are CKA_DECRYPT, CKA_UNWRAP (private) and CKA_ENCRYPT, CKA_WRAP (public)
// true.
func TestGeneratedKeyAttributes(t *testing.T) {
	tok := softhsmtest.New(t, "genattrs")
	p := open(t, tok, nil, func(c *Config) { c.TokenLabel = tok.Label })
	base := func(more map[uint]bool, from map[uint]bool) map[uint]bool {
		m := maps.Clone(from)
		maps.Copy(m, more)
		return m
	}
	privBase := map[uint]bool{
		p11.CKA_TOKEN: true, p11.CKA_PRIVATE: true, p11.CKA_SENSITIVE: true, p11.CKA_EXTRACTABLE: false,
		p11.CKA_SIGN: true, p11.CKA_ALWAYS_SENSITIVE: true, p11.CKA_NEVER_EXTRACTABLE: true,
	}
	pubBase := map[uint]bool{p11.CKA_TOKEN: true, p11.CKA_PRIVATE: false, p11.CKA_VERIFY: true}
	// Each type's uses but signing, off: an RSA key could decrypt, unwrap,
	// sign-recover (a decryption oracle) and its public half encrypt and
	// wrap; an EC key could agree keys (ECDH); an EdDSA key only signs.
	for i, tc := range []struct {
		kt        providers.KeyType
		priv, pub map[uint]bool
	}{
		{providers.KeyECDSAP256, base(map[uint]bool{p11.CKA_DERIVE: false}, privBase), pubBase},
		{providers.KeyEd25519, privBase, pubBase},
		{providers.KeyRSA2048,
			base(map[uint]bool{p11.CKA_DECRYPT: false, p11.CKA_UNWRAP: false, p11.CKA_SIGN_RECOVER: false}, privBase),
			base(map[uint]bool{p11.CKA_ENCRYPT: false, p11.CKA_WRAP: false, p11.CKA_VERIFY_RECOVER: false}, pubBase)},
	} {
		t.Run(string(tc.kt), func(t *testing.T) {
			id := []byte{0x50, byte(i)}
			if _, err := p.GenerateKey(context.Background(), "attrs-"+string(tc.kt), tc.kt, "", id); err != nil {
				t.Fatal(err)
			}
			for _, half := range []struct {
				class uint
				want  map[uint]bool
			}{{p11.CKO_PRIVATE_KEY, tc.priv}, {p11.CKO_PUBLIC_KEY, tc.pub}} {
				var attrs []uint
				for a := range half.want {
					attrs = append(attrs, a)
				}
				got := tokenAttributes(t, tok, half.class, id, attrs)
				for a, want := range half.want {
					if got[a] != want {
						t.Errorf("%s key: %s = %v, want %v", map[uint]string{p11.CKO_PRIVATE_KEY: "private", p11.CKO_PUBLIC_KEY: "public"}[half.class], attrName(a), got[a], want)
					}
				}
			}
		})
	}
}

// A key template names only the uses its key type has: a token refuses an
// attribute it does not support for the type (AWS CloudHSM: CKA_DECRYPT on
// an EC key is CKR_TEMPLATE_INCONSISTENT; older YubiHSM modules:
// CKA_SIGN_RECOVER is CKR_ATTRIBUTE_TYPE_INVALID), and every rotation's
// key generation would fail there.
func TestKeyTemplatesNameOnlyTheTypesUses(t *testing.T) {
	rsaOnly := []uint{p11.CKA_DECRYPT, p11.CKA_UNWRAP, p11.CKA_SIGN_RECOVER, p11.CKA_ENCRYPT, p11.CKA_WRAP, p11.CKA_VERIFY_RECOVER}
	for _, tc := range []struct {
		kt     providers.KeyType
		absent []uint
	}{
		{providers.KeyECDSAP256, rsaOnly},
		{providers.KeyECDSAP384, rsaOnly},
		{providers.KeyEd25519, append(rsaOnly, p11.CKA_DERIVE)},
	} {
		pub, priv, _, err := keyTemplates(tc.kt, "l", []byte{1})
		if err != nil {
			t.Fatal(err)
		}
		for _, a := range append(pub, priv...) {
			if slices.Contains(tc.absent, a.Type) {
				t.Errorf("%s template names %s", tc.kt, attrName(a.Type))
			}
		}
	}
}

func attrName(a uint) string {
	names := map[uint]string{
		p11.CKA_TOKEN: "CKA_TOKEN", p11.CKA_PRIVATE: "CKA_PRIVATE", p11.CKA_SENSITIVE: "CKA_SENSITIVE",
		p11.CKA_EXTRACTABLE: "CKA_EXTRACTABLE", p11.CKA_SIGN: "CKA_SIGN", p11.CKA_DECRYPT: "CKA_DECRYPT",
		p11.CKA_UNWRAP: "CKA_UNWRAP", p11.CKA_DERIVE: "CKA_DERIVE", p11.CKA_SIGN_RECOVER: "CKA_SIGN_RECOVER",
		p11.CKA_ALWAYS_SENSITIVE: "CKA_ALWAYS_SENSITIVE", p11.CKA_NEVER_EXTRACTABLE: "CKA_NEVER_EXTRACTABLE",
		p11.CKA_VERIFY: "CKA_VERIFY", p11.CKA_ENCRYPT: "CKA_ENCRYPT", p11.CKA_WRAP: "CKA_WRAP",
		p11.CKA_VERIFY_RECOVER: "CKA_VERIFY_RECOVER",
	}
	if n, ok := names[a]; ok {
		return n
	}
	return fmt.Sprintf("0x%x", a)
}

// AddKey serves a key named by a URI only if every token attribute the URI
// gives is the provider's token's: a URI written for another token (its
// manufacturer, model, serial or slot) must not pick up a key of the same
// label on this one.
func TestAddKeyChecksTheURIsToken(t *testing.T) {
	tok := softhsmtest.New(t, "addkey")
	tok.GenerateKey(t, providers.KeyECDSAP256, "k", []byte{0x61})
	tok.GenerateKey(t, providers.KeyECDSAP256, "k2", []byte{0x62})
	tok.GenerateKey(t, providers.KeyECDSAP256, "k3", []byte{0x63})
	p := open(t, tok, nil, func(c *Config) { c.TokenLabel = tok.Label })
	slot := p.slot.Load()
	for i, tc := range []struct {
		uri string
		ok  bool
	}{
		{"pkcs11:token=addkey;object=k", true},
		{"pkcs11:token=addkey;manufacturer=SoftHSM%20project;model=SoftHSM%20v2;object=k2", true},
		{fmt.Sprintf("pkcs11:serial=%s;slot-id=%d;id=%%63", tok.Serial, slot), true},
		{"pkcs11:token=other;object=k", false},
		{"pkcs11:serial=0123456789abcdef;object=k", false},
		{"pkcs11:token=addkey;manufacturer=Other%20Vendor;object=k", false},
		{"pkcs11:token=addkey;model=Other%20HSM;object=k", false},
		{fmt.Sprintf("pkcs11:token=addkey;slot-id=%d;object=k", slot+1), false},
	} {
		t.Run(tc.uri, func(t *testing.T) {
			info, err := p.AddKey(context.Background(), KeyConfig{Name: fmt.Sprintf("k%d", i), URI: tc.uri})
			switch {
			case tc.ok && err != nil:
				t.Fatalf("AddKey: %v", err)
			case !tc.ok && err == nil:
				t.Fatalf("AddKey served %s (%s) through a URI for another token", info.Name, info.KID)
			}
		})
	}
}

// A key URI names exactly one private key object. One that matches two
// (two keys under one label) is refused, never served by whichever the
// token lists first; two keys of the configuration that name one object
// by different attributes are refused as the same spelling is.
func TestKeyURIsNameOneObjectEach(t *testing.T) {
	tok := softhsmtest.New(t, "oneobj")
	tok.GenerateKey(t, providers.KeyECDSAP256, "twin", []byte{0x71})
	tok.GenerateKey(t, providers.KeyECDSAP256, "twin", []byte{0x72})
	tok.GenerateKey(t, providers.KeyEd25519, "single", []byte{0x73})
	for _, tc := range []struct {
		name string
		keys []KeyConfig
		want string // in Open's error
	}{
		{"two objects under one label", []KeyConfig{{Name: "a", URI: "pkcs11:token=oneobj;object=twin"}}, "more than one private key"},
		{"one object by label and by id", []KeyConfig{
			{Name: "a", URI: "pkcs11:token=oneobj;object=single"},
			{Name: "b", URI: "pkcs11:token=oneobj;id=%73"},
		}, `"a" and "b" name the same object`},
		{"one object by id, and by label and id", []KeyConfig{
			{Name: "a", URI: "pkcs11:token=oneobj;id=%71"},
			{Name: "b", URI: "pkcs11:token=oneobj;object=twin;id=%71"},
		}, `"a" and "b" name the same object`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := tryOpen(t, tok, tc.keys, nil)
			if err == nil {
				infos, _ := p.Keys(context.Background())
				t.Fatalf("Open served %v", infos)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Open: %v, want an error saying %q", err, tc.want)
			}
		})
	}
	// Each twin by its id is one object.
	p := open(t, tok, []KeyConfig{{Name: "a", URI: "pkcs11:token=oneobj;object=twin;id=%71"}, {Name: "b", URI: "pkcs11:token=oneobj;id=%72"}}, nil)
	if a, b := keyInfo(t, p, "a"), keyInfo(t, p, "b"); a.Public.(interface{ Equal(crypto.PublicKey) bool }).Equal(b.Public) {
		t.Error("the twins' keys are one key")
	}
	if info, err := p.AddKey(context.Background(), KeyConfig{Name: "c", URI: "pkcs11:token=oneobj;object=twin;id=%72"}); err == nil {
		t.Errorf("AddKey served b's object again as %s (%s)", info.Name, info.KID)
	}
}

// A token may return fewer handles from C_FindObjects than asked for while
// more match. The search for a key's object goes on until the token says
// there are no more: stopping at the first answer served whichever of two
// keys under one label the token listed first.
func TestKeySearchGoesOnPastAShortAnswer(t *testing.T) {
	tok := softhsmtest.New(t, "findone")
	tok.GenerateKey(t, providers.KeyECDSAP256, "twin", []byte{0x71})
	tok.GenerateKey(t, providers.KeyECDSAP256, "twin", []byte{0x72})
	proxy := buildModule(t, "testdata/findone.c")
	t.Setenv("SIGIL_TEST_FINDONE_TARGET", tok.Module)
	p, err := tryOpen(t, tok, []KeyConfig{{Name: "a", URI: "pkcs11:token=findone;object=twin"}}, func(c *Config) { c.Module = proxy })
	if err == nil {
		infos, _ := p.Keys(context.Background())
		t.Fatalf("Open through a module answering one handle a call served %v", infos)
	}
	if !strings.Contains(err.Error(), "more than one private key") {
		t.Fatalf("Open: %v, want an error saying more than one private key matches", err)
	}
	// The proxy itself works: one key by its id opens and signs.
	p = open(t, tok, []KeyConfig{{Name: "b", URI: "pkcs11:token=findone;id=%72"}}, func(c *Config) { c.Module = proxy })
	signAndVerify(t, p, "b", providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}, []byte("through the proxy"))
}

// A generation that fails after C_GenerateKeyPair destroys the new pair;
// when that fails too, the error says the pair is left on the token and
// names it, so that an operator can remove it: silently left, it holds
// the label and id the next attempt needs and is a key no record names.
func TestGenerateKeyFailingHalfway(t *testing.T) {
	tok := softhsmtest.New(t, "halfway")
	faults := newFaultSwitch()
	p := open(t, tok, nil, func(c *Config) { c.TokenLabel, c.FaultHook = tok.Label, faults.hook })
	count := func(label string) int {
		n := 0
		tok.WithModule(t, func(c *p11.Ctx, slot uint) {
			s, err := c.OpenSession(slot, p11.CKF_SERIAL_SESSION)
			if err != nil {
				t.Fatal(err)
			}
			defer c.CloseSession(s)
			objs, err := findObjects(c, s, []*p11.Attribute{p11.NewAttribute(p11.CKA_LABEL, label)}, 10)
			if err != nil {
				t.Fatal(err)
			}
			n = len(objs)
		})
		return n
	}
	for _, tc := range []struct {
		name    string
		faults  map[string]uint
		left    int    // objects under the label afterwards
		saysErr string // in GenerateKey's error
	}{
		{"the pair destroyed", map[string]uint{"public-key": p11.CKR_DEVICE_ERROR}, 0, "CKR_DEVICE_ERROR"},
		{"the pair left behind", map[string]uint{"public-key": p11.CKR_DEVICE_ERROR, "destroy": p11.CKR_DEVICE_ERROR}, 2, `key pair (label "half-2", id 6302) is left on the token`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			label := fmt.Sprintf("half-%d", tc.left)
			faults.set(tc.faults)
			_, err := p.GenerateKey(context.Background(), label, providers.KeyECDSAP256, "", []byte{0x63, byte(tc.left)})
			faults.set(map[string]uint{})
			if err == nil {
				t.Fatal("GenerateKey succeeded")
			}
			if !strings.Contains(err.Error(), tc.saysErr) {
				t.Errorf("GenerateKey: %v\nwant it to say %q", err, tc.saysErr)
			}
			if n := count(label); n != tc.left {
				t.Errorf("%d objects under the label afterwards, want %d", n, tc.left)
			}
		})
	}
}
