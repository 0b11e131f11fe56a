package pkcs11

import (
	"bytes"
	"crypto"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/asn1"
	"strings"
	"testing"

	p11 "github.com/miekg/pkcs11"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/pkcs11/softhsmtest"
)

func TestParseKeyURI(t *testing.T) {
	slot7 := uint(7)
	cases := []struct {
		uri     string
		obj     objectSelector
		tok     tokenSelector
		wantErr string
	}{
		{uri: "pkcs11:token=prod;object=release-signing", obj: objectSelector{label: "release-signing"}, tok: tokenSelector{label: "prod"}},
		{uri: "pkcs11:id=%01", obj: objectSelector{id: []byte{1}}},
		{uri: "pkcs11:object=a%20b;id=%DE%AD;type=private;serial=abc;slot-id=7", obj: objectSelector{label: "a b", id: []byte{0xde, 0xad}}, tok: tokenSelector{serial: "abc", slot: &slot7}},
		{uri: "pkcs11:object=x;manufacturer=SoftHSM%20project;model=SoftHSM%20v2;library-description=any", obj: objectSelector{label: "x"}, tok: tokenSelector{manufacturer: "SoftHSM project", model: "SoftHSM v2"}},
		{uri: "pkcs11:object=x?module-path=/usr/lib/softhsm/libsofthsm2.so", obj: objectSelector{label: "x"}},
		{uri: "pkcs11:object=x?pin-value=1234", wantErr: "pin-value"},
		{uri: "pkcs11:object=x?PIN-VALUE=1234", wantErr: "pin-value"},
		{uri: "pkcs11:object=x?pin-source=/tmp/pin", wantErr: "pin-source"},
		{uri: "pkcs11:object=x;pin-value=1234", wantErr: "pin-value"},
		{uri: "pkcs11:token=x?pin%2dvalue=1234", wantErr: "pin-value"},
		{uri: "pkcs11:object=x?pin%2Dvalue=1234", wantErr: "pin-value"},
		{uri: "pkcs11:object=x?module-path=/m.so&Pin%2DValue=1234", wantErr: "pin-value"},
		{uri: "pkcs11:pin-value=1234;object=x", wantErr: "pin-value"},
		{uri: "pkcs11:object=x;p%69n-source=1234", wantErr: "pin-source"},
		// Separators swapped: '&' is plain text in a path value, ';' in a
		// query value, and the PIN would ride in the label or module-path.
		{uri: "pkcs11:token=prod;object=release&pin-value=1234", wantErr: "pin-value"},
		{uri: "pkcs11:object=x?module-path=/m.so;pin-value=1234", wantErr: "pin-value"},
		{uri: "pkcs11:object=x;flavour=1234", wantErr: "unknown path attribute"},
		{uri: "pkcs11:object=x%zz1234", wantErr: "does not parse"},
		// The parser's own messages quote values: none reaches the error.
		{uri: "pkcs11:object=x;type=s3cr3t1234", wantErr: "does not parse"},
		{uri: "pkcs11:object=x;slot-id=s3cr3t1234", wantErr: "does not parse"},
		{uri: "pkcs11:object=x;library-version=s3cr3t1234", wantErr: "does not parse"},
		{uri: "pkcs11:object=x?module-path=s3cr3t1234", wantErr: "does not parse"},
		{uri: "pkcs11:token=prod", wantErr: "names no object"},
		{uri: "pkcs11:object=x;object=y", wantErr: "does not parse"},
		{uri: "pkcs11:object=x;flavour=mint", wantErr: "unknown path attribute"},
		{uri: "pkcs11:object=x;type=cert", wantErr: "type"},
		{uri: "pkcs11:object=x;slot-id=-1", wantErr: "slot-id"},
		{uri: "pkcs11:object=x?module-path=/other.so", wantErr: "module-path"},
		{uri: "file:/x", wantErr: "does not parse"},
		// RFC 3986 §3.1: the scheme is case-insensitive; attribute names are not.
		{uri: "PKCS11:token=prod;object=release-signing", obj: objectSelector{label: "release-signing"}, tok: tokenSelector{label: "prod"}},
		{uri: "Pkcs11:id=%01;slot-id=7", obj: objectSelector{id: []byte{1}}, tok: tokenSelector{slot: &slot7}},
		{uri: "PKCS11:object=x?PIN-VALUE=1234", wantErr: "pin-value"},
		{uri: "pkcs11:OBJECT=x", wantErr: "unknown path attribute"},
		{uri: "pkcs11:object=x;Token=prod", wantErr: "unknown path attribute"},
		// An empty attribute would match only a blank one, and read as
		// unnamed it matched any token (or any label beside an id).
		{uri: "pkcs11:token=;object=x", wantErr: "token= is empty"},
		{uri: "pkcs11:serial=;object=x", wantErr: "serial= is empty"},
		{uri: "pkcs11:manufacturer=;object=x", wantErr: "manufacturer= is empty"},
		{uri: "pkcs11:model=;object=x", wantErr: "model= is empty"},
		{uri: "pkcs11:object=;id=%01", wantErr: "object= is empty"},
		{uri: "pkcs11:token=prod;id=", obj: objectSelector{id: []byte{}}, tok: tokenSelector{label: "prod"}},
	}
	for _, tc := range cases {
		t.Run(tc.uri, func(t *testing.T) {
			obj, tok, err := parseKeyURI(tc.uri, "/usr/lib/softhsm/libsofthsm2.so", nil)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one mentioning %q", err, tc.wantErr)
				}
				if strings.Contains(err.Error(), "1234") {
					t.Errorf("error %q echoes the PIN", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !obj.equal(tc.obj) {
				t.Errorf("object %s, want %s", obj, tc.obj)
			}
			if tok.String() != tc.tok.String() || tok.manufacturer != tc.tok.manufacturer || tok.model != tc.tok.model {
				t.Errorf("token %+v, want %+v", tok, tc.tok)
			}
		})
	}
}

func TestParseECPublicKey(t *testing.T) {
	der := func(v any, params ...string) []byte {
		b, err := asn1.MarshalWithParams(v, strings.Join(params, ","))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	edPub, _, _ := ed25519.GenerateKey(rand.Reader)
	point := func(k *ecdsa.PublicKey) []byte {
		e, err := k.ECDH()
		if err != nil {
			t.Fatal(err)
		}
		return e.Bytes()
	}
	// A P-256 point whose X starts 0x3f reads as a complete DER OCTET STRING
	// of 63 bytes after its 0x04 prefix: length must decide, not parsing.
	var tricky *ecdsa.PublicKey
	for tricky == nil {
		k, _ := ecdh.P256().GenerateKey(rand.Reader)
		if b := k.PublicKey().Bytes(); b[1] == 0x3f {
			tricky, _ = ecdsa.ParseUncompressedPublicKey(elliptic.P256(), b)
		}
	}
	cases := []struct {
		name          string
		params, point []byte
		want          crypto.PublicKey
		wantErr       bool
	}{
		{"p256 DER point", der(oidP256), der(point(&p256.PublicKey)), &p256.PublicKey, false},
		{"p256 bare point", der(oidP256), point(&p256.PublicKey), &p256.PublicKey, false},
		{"p256 bare point that parses as DER", der(oidP256), point(tricky), tricky, false},
		{"p384 DER point", der(oidP384), der(point(&p384.PublicKey)), &p384.PublicKey, false},
		{"ed25519 OID, DER point", der(oidEd25519), der([]byte(edPub)), edPub, false},
		{"ed25519 name, bare point", der("edwards25519", "printable"), []byte(edPub), edPub, false},
		{"curve25519 name", der("curve25519", "printable"), []byte(edPub), nil, true},
		{"p521", der(asn1.ObjectIdentifier{1, 3, 132, 0, 35}), []byte{4}, nil, true},
		{"point off the curve", der(oidP256), der(append([]byte{4}, make([]byte, 64)...)), nil, true},
		{"garbage params", []byte{0xff}, nil, nil, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseECPublicKey(tc.params, tc.point)
			if tc.wantErr {
				if err == nil {
					t.Fatal("no error")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !got.(interface{ Equal(crypto.PublicKey) bool }).Equal(tc.want) {
				t.Errorf("got %v, want %v", got, tc.want)
			}
		})
	}
}

func TestClassify(t *testing.T) {
	cases := []struct {
		rv   uint
		want faultClass
	}{
		{p11.CKR_OK, faultNone},
		{p11.CKR_MECHANISM_INVALID, faultRequest},
		{p11.CKR_DATA_LEN_RANGE, faultRequest},
		{p11.CKR_FUNCTION_FAILED, faultTransient},
		{p11.CKR_DEVICE_MEMORY, faultTransient},
		{p11.CKR_SESSION_HANDLE_INVALID, faultSessionGone},
		{p11.CKR_SESSION_CLOSED, faultSessionGone},
		{p11.CKR_OPERATION_ACTIVE, faultSessionBroken},
		{p11.CKR_GENERAL_ERROR, faultSessionBroken},
		{0x8000_0001, faultSessionBroken}, // vendor-defined: replace the session
		{p11.CKR_USER_NOT_LOGGED_IN, faultLogin},
		{p11.CKR_OBJECT_HANDLE_INVALID, faultLogin},
		{p11.CKR_KEY_HANDLE_INVALID, faultLogin},
		{p11.CKR_DEVICE_REMOVED, faultDevice},
		{p11.CKR_TOKEN_NOT_PRESENT, faultDevice},
		{p11.CKR_CRYPTOKI_NOT_INITIALIZED, faultDevice},
		{p11.CKR_PIN_INCORRECT, faultPIN},
		{p11.CKR_PIN_EXPIRED, faultPIN},
		{p11.CKR_PIN_LOCKED, faultLocked},
	}
	for _, tc := range cases {
		if got := classify(tc.rv); got != tc.want {
			t.Errorf("classify(%s) = %s, want %s", ckrName(tc.rv), got, tc.want)
		}
	}
}

// Without a public key object the public key comes from the private key's
// attributes where the token keeps it there (RSA on SoftHSM); where it does
// not (EC on SoftHSM), Open names the key in its error.
func TestPublicKeyWithoutPublicObject(t *testing.T) {
	tok := softhsmtest.New(t, "nopub")
	keys := tok.GenerateKeys(t, providers.KeyRSA2048, providers.KeyECDSAP256)
	tok.WithModule(t, func(c *p11.Ctx, slot uint) {
		s, err := c.OpenSession(slot, p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
		if err != nil {
			t.Fatal(err)
		}
		defer c.CloseSession(s)
		if err := c.Login(s, p11.CKU_USER, tok.PIN); err != nil {
			t.Fatal(err)
		}
		defer c.Logout(s)
		objs, err := findObjects(c, s, []*p11.Attribute{p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PUBLIC_KEY)}, 10)
		if err != nil || len(objs) != 2 {
			t.Fatalf("public objects %v: %v", objs, err)
		}
		for _, o := range objs {
			if err := c.DestroyObject(s, o); err != nil {
				t.Fatal(err)
			}
		}
	})
	p := open(t, tok, keyConfigs(map[providers.KeyType]softhsmtest.Key{providers.KeyRSA2048: keys[providers.KeyRSA2048]}), nil)
	signAndVerify(t, p, string(providers.KeyRSA2048), providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA256}, []byte("no public object"))
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}

	_, err := tryOpen(t, tok, []KeyConfig{{Name: "ec-key", URI: keys[providers.KeyECDSAP256].URI}}, nil)
	if err == nil || !strings.Contains(err.Error(), `"ec-key"`) {
		t.Fatalf("Open of an EC key without its public object: %v, want an error naming the key", err)
	}
}

func TestFormatURIRoundTrip(t *testing.T) {
	for _, o := range []objectSelector{{label: "release signing/v2;x"}, {label: "k", id: []byte{0, 1, 0xff}}} {
		uri := formatURI("prod token", o)
		got, tok, err := parseKeyURI(uri, "", nil)
		if err != nil {
			t.Fatalf("%s: %v", uri, err)
		}
		if !got.equal(o) || tok.label != "prod token" {
			t.Errorf("%s parsed to %s %s", uri, got, tok)
		}
	}
	// A token with a blank label (picked by serial or slot): the URI names
	// none, since an empty token= is refused.
	if uri := formatURI("", objectSelector{label: "k"}); uri != "pkcs11:object=k" {
		t.Errorf("blank token label: %s", uri)
	} else if got, tok, err := parseKeyURI(uri, "", nil); err != nil || got.label != "k" || !tok.empty() {
		t.Errorf("%s parsed to %s %s, %v", uri, got, tok, err)
	}
	if !bytes.Equal([]byte(pctEncodeAll([]byte{1, 0xab})), []byte("%01%AB")) {
		t.Error(pctEncodeAll([]byte{1, 0xab}))
	}
}

// Validate is what Open refuses before it loads the module, so that a
// caller's config check (`sigil agent --check`) cannot pass what Open then
// refuses. Its errors name fields as the caller's FieldNames say, and never
// quote a PIN put in a key URI, PINEnv or PINFile.
func TestValidate(t *testing.T) {
	names := FieldNames{"PINEnv": "pin_env", "PINFile": "pin_file", "TokenLabel": "token_label",
		"TokenSerial": "token_serial", "Slot": "slot", "Instances": "module_instances", "URI": "uri", "Module": "module"}
	slot := uint(3)
	for _, tc := range []struct {
		name   string
		edit   func(*Config)
		want   string // "" when valid
		secret string // never in the error
	}{
		{"valid", func(*Config) {}, "", ""},
		{"token in the URI only", func(c *Config) { c.TokenLabel, c.Keys[0].URI = "", "pkcs11:token=prod;object=k" }, "", ""},
		{"PINFile not absolute", func(c *Config) { c.PINEnv, c.PINFile = "", "s3cr3t-pin" }, "pin_file is not an absolute path", "s3cr3t-pin"},
		{"PINEnv not a name", func(c *Config) { c.PINEnv = "12-34!56" }, "pin_env is not an environment variable name", "12-34!56"},
		{"both PIN sources", func(c *Config) { c.PINFile = "/etc/pin" }, "both pin_env and pin_file", ""},
		{"no PIN source", func(c *Config) { c.PINEnv = "" }, "set pin_env or pin_file", ""},
		{"pin-value in a URI", func(c *Config) { c.Keys[0].URI = "pkcs11:object=k?pin-value=s3cr3t-pin" }, `key "k": uri carries pin-value: the PIN comes from pin_env or pin_file`, "s3cr3t-pin"},
		{"pin-source in a URI", func(c *Config) { c.Keys[0].URI = "pkcs11:object=k?pin-source=file:/etc/pin" }, "uri carries pin-source: use pin_file", "/etc/pin"},
		{"empty URI", func(c *Config) { c.Keys[0].URI = "" }, `key "k": no uri`, ""},
		{"no module", func(c *Config) { c.Module = "" }, "no module", ""},
		{"a bare module name", func(c *Config) { c.Module = "libsofthsm2.so" }, `module "libsofthsm2.so": want an absolute path`, ""},
		{"two token selectors", func(c *Config) { c.Slot = &slot }, "one of token_label, token_serial or slot", ""},
		{"no token", func(c *Config) { c.TokenLabel = "" }, "no token named: set token_label, token_serial or slot, or token= in a key's uri", ""},
		{"two tokens", func(c *Config) { c.Keys[0].URI = "pkcs11:token=test;object=k" }, "one provider serves one token", ""},
		{"one object twice", func(c *Config) { c.Keys = append(c.Keys, KeyConfig{Name: "k2", URI: "pkcs11:object=k"}) }, `keys "k" and "k2" name the same object`, ""},
		{"too many instances", func(c *Config) { c.Instances = MaxInstances + 1 }, "module_instances 17: want 1 to 16", ""},
		{"negative instances", func(c *Config) { c.Instances = -1 }, "module_instances -1", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Config{ID: "hsm", Module: "/nonexistent/module.so", TokenLabel: "prod", PINEnv: "SIGIL_PIN",
				Keys: []KeyConfig{{Name: "k", URI: "pkcs11:object=k"}}}
			tc.edit(&cfg)
			err := cfg.Validate(names)
			if tc.want == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("%v, want an error saying %q", err, tc.want)
			}
			if tc.secret != "" && strings.Contains(err.Error(), tc.secret) {
				t.Errorf("%v echoes %q", err, tc.secret)
			}
			for goName := range names {
				if strings.Contains(err.Error(), goName) {
					t.Errorf("%v names the field %s by its Go name", err, goName)
				}
			}
			// Open refuses it the same way, before it loads the module.
			want := cfg.Validate(nil).Error()
			if _, err := Open(t.Context(), cfg); err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("Open: %v, want the refusal %q", err, want)
			}
		})
	}
}
