package pkcs11

import (
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	p11 "github.com/miekg/pkcs11"

	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/pkcs11/softhsmtest"
	"github.com/sigil-agent/sigil/providers/providertest"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// Tests here use softhsmtest, which sets SOFTHSM2_CONF with t.Setenv: none of
// them may run in parallel.

const pinEnv = "SIGIL_TEST_PKCS11_PIN"

// open opens a provider on tok with the PIN in the environment and closes it
// when the test ends.
func open(t testing.TB, tok *softhsmtest.Token, keys []KeyConfig, edit func(*Config)) *Provider {
	t.Helper()
	p, err := tryOpen(t, tok, keys, edit)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return p
}

func tryOpen(t testing.TB, tok *softhsmtest.Token, keys []KeyConfig, edit func(*Config)) (*Provider, error) {
	t.Helper()
	t.Setenv(pinEnv, tok.PIN)
	cfg := Config{ID: "hsm-test", Module: tok.Module, PINEnv: pinEnv, Keys: keys, Backoff: 20 * time.Millisecond}
	if edit != nil {
		edit(&cfg)
	}
	p, err := Open(context.Background(), cfg)
	if err == nil {
		t.Cleanup(func() {
			if err := p.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
		})
	}
	return p, err
}

func digestOf(h crypto.Hash, msg []byte) []byte {
	switch h {
	case crypto.SHA256:
		d := sha256.Sum256(msg)
		return d[:]
	case crypto.SHA384:
		d := sha512.Sum384(msg)
		return d[:]
	case crypto.SHA512:
		d := sha512.Sum512(msg)
		return d[:]
	}
	return msg // pure Ed25519 signs the message
}

// signAndVerify signs msg's digest and checks the signature with Go's crypto,
// and that a flipped bit in the signature or the digest fails to verify.
func signAndVerify(t testing.TB, p *Provider, name string, alg providers.Algorithm, msg []byte) {
	t.Helper()
	info := keyInfo(t, p, name)
	digest := digestOf(alg.Hash, msg)
	sig, err := p.Sign(context.Background(), name, alg, digest)
	if err != nil {
		t.Fatalf("Sign %s %s: %v", name, alg, err)
	}
	if err := providers.Verify(info.Public, alg, digest, sig); err != nil {
		t.Fatalf("Verify %s %s: %v", name, alg, err)
	}
	if alg.Scheme == providers.SchemePSS {
		// The contract fixes the salt at the hash length; Verify accepts any.
		if err := rsa.VerifyPSS(info.Public.(*rsa.PublicKey), alg.Hash, digest, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash}); err != nil {
			t.Fatalf("%s %s: salt is not the hash length: %v", name, alg, err)
		}
	}
	bad := append([]byte(nil), sig...)
	bad[len(bad)/2] ^= 0x10
	if err := providers.Verify(info.Public, alg, digest, bad); !errors.Is(err, providers.ErrInvalidSignature) {
		t.Errorf("%s %s: flipped signature bit: Verify = %v, want ErrInvalidSignature", name, alg, err)
	}
	if len(digest) > 0 {
		other := append([]byte(nil), digest...)
		other[0] ^= 1
		if err := providers.Verify(info.Public, alg, other, sig); !errors.Is(err, providers.ErrInvalidSignature) {
			t.Errorf("%s %s: flipped digest bit: Verify = %v, want ErrInvalidSignature", name, alg, err)
		}
	}
}

func keyInfo(t testing.TB, p *Provider, name string) providers.KeyInfo {
	t.Helper()
	return providertest.KeyInfo(t, p, name)
}

var signCases = []struct {
	key providers.KeyType
	alg providers.Algorithm
	msg string
}{
	{providers.KeyECDSAP256, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}, "p256"},
	{providers.KeyECDSAP256, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA384}, "p256 with a longer digest"},
	{providers.KeyECDSAP384, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA384}, "p384"},
	{providers.KeyRSA2048, providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: crypto.SHA256}, "rsa pkcs1 sha256"},
	{providers.KeyRSA2048, providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: crypto.SHA384}, "rsa pkcs1 sha384"},
	{providers.KeyRSA2048, providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA256}, "rsa pss sha256"},
	{providers.KeyRSA2048, providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA384}, "rsa pss sha384"},
	{providers.KeyRSA3072, providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: crypto.SHA256}, "rsa3072 pkcs1"},
	{providers.KeyRSA3072, providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA512}, "rsa3072 pss sha512"},
	{providers.KeyEd25519, providers.Algorithm{Scheme: providers.SchemeEd25519}, "ed25519 message"},
	{providers.KeyEd25519, providers.Algorithm{Scheme: providers.SchemeEd25519}, ""},
}

var testKeyTypes = []providers.KeyType{
	providers.KeyECDSAP256, providers.KeyECDSAP384, providers.KeyRSA2048, providers.KeyRSA3072, providers.KeyEd25519,
}

func keyConfigs(keys map[providers.KeyType]softhsmtest.Key) []KeyConfig {
	var kc []KeyConfig
	for _, kt := range testKeyTypes {
		if k, ok := keys[kt]; ok {
			kc = append(kc, KeyConfig{Name: string(kt), URI: k.URI})
		}
	}
	return kc
}

// Keys provisioned by another tool (pkcs11-tool), as in the field.
func TestSignVerifyProvisionedKeys(t *testing.T) {
	tok := softhsmtest.New(t, "sign")
	keys := tok.GenerateKeys(t, testKeyTypes...)
	p := open(t, tok, keyConfigs(keys), nil)
	for _, tc := range signCases {
		t.Run(string(tc.key)+"/"+tc.alg.String(), func(t *testing.T) {
			if got := keyInfo(t, p, string(tc.key)).Type; got != tc.key {
				t.Fatalf("key type %s, want %s", got, tc.key)
			}
			signAndVerify(t, p, string(tc.key), tc.alg, []byte(tc.msg))
		})
	}
}

// Keys made by the provider itself, as rotation will.
func TestGenerateKeySignVerify(t *testing.T) {
	tok := softhsmtest.New(t, "gen")
	p := open(t, tok, nil, func(c *Config) { c.TokenLabel = tok.Label })
	types := testKeyTypes
	if !testing.Short() {
		types = append(types, providers.KeyRSA4096)
	}
	for i, kt := range types {
		info, err := p.GenerateKey(context.Background(), "gen-"+string(kt), kt, "", []byte{0x40, byte(i)})
		if err != nil {
			t.Fatalf("GenerateKey %s: %v", kt, err)
		}
		if info.Type != kt || info.KID == "" || info.Provider != p.ID() {
			t.Fatalf("GenerateKey %s: KeyInfo %+v", kt, info)
		}
	}
	for _, tc := range append(signCases, struct {
		key providers.KeyType
		alg providers.Algorithm
		msg string
	}{providers.KeyRSA4096, providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA256}, "rsa4096"}) {
		if tc.key == providers.KeyRSA4096 && testing.Short() {
			continue
		}
		t.Run(string(tc.key)+"/"+tc.alg.String(), func(t *testing.T) {
			signAndVerify(t, p, "gen-"+string(tc.key), tc.alg, []byte(tc.msg))
		})
	}

	if _, err := p.GenerateKey(context.Background(), "gen-"+string(providers.KeyECDSAP256), providers.KeyECDSAP256, "x", nil); err == nil {
		t.Error("GenerateKey with a served name: want an error")
	}
	if _, err := p.GenerateKey(context.Background(), "again", providers.KeyECDSAP256, "gen-"+string(providers.KeyECDSAP256), nil); err == nil {
		t.Error("GenerateKey with a label already on the token: want an error")
	}

	// The generated keys are found again by URI in a later configuration.
	uri, err := p.URI("gen-" + string(providers.KeyEd25519))
	if err != nil {
		t.Fatal(err)
	}
	want := keyInfo(t, p, "gen-"+string(providers.KeyEd25519)).KID
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	p2 := open(t, tok, []KeyConfig{{Name: "gen-" + string(providers.KeyEd25519), URI: uri}}, nil)
	if got := keyInfo(t, p2, "gen-"+string(providers.KeyEd25519)).KID; got != want {
		t.Errorf("kid after reopening by %s: %s, want %s", uri, got, want)
	}
	signAndVerify(t, p2, "gen-"+string(providers.KeyEd25519), providers.Algorithm{Scheme: providers.SchemeEd25519}, []byte("again"))
}

// Same key, provider id and name give the same kid whatever URI names the
// object, and two providers on one token in one process share the module
// and the login without stepping on each other.
func TestKIDStableAcrossURIForms(t *testing.T) {
	tok := softhsmtest.New(t, "kid")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256, providers.KeyEd25519)
	byLabel := open(t, tok, []KeyConfig{
		{Name: "release", URI: keys[providers.KeyECDSAP256].URI},
		{Name: "ed", URI: keys[providers.KeyEd25519].URI},
	}, nil)
	byID := open(t, tok, []KeyConfig{
		{Name: "release", URI: "pkcs11:id=%01"},
		{Name: "ed", URI: keys[providers.KeyEd25519].IDURI},
	}, func(c *Config) { c.TokenSerial = tok.Serial })
	for _, name := range []string{"release", "ed"} {
		a, b := keyInfo(t, byLabel, name), keyInfo(t, byID, name)
		if a.KID != b.KID || len(a.KID) != 32 {
			t.Errorf("%s: kid by label %s, by id %s", name, a.KID, b.KID)
		}
	}
	if byLabel.mod != byID.mod {
		t.Fatal("two providers on one module path loaded it twice")
	}
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	signAndVerify(t, byLabel, "release", alg, []byte("a"))
	signAndVerify(t, byID, "release", alg, []byte("b"))
	// Closing one must neither log the other out nor finalize the module.
	if err := byLabel.Close(); err != nil {
		t.Fatal(err)
	}
	signAndVerify(t, byID, "release", alg, []byte("c"))
	if err := byID.Healthy(); err != nil {
		t.Errorf("Healthy after the other provider closed: %v", err)
	}
}

func TestWrongPIN(t *testing.T) {
	tok := softhsmtest.New(t, "pin")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	const wrong = "wrong-pin-31337"
	core, logs := observer.New(zap.DebugLevel)
	_, err := tryOpen(t, tok, keyConfigs(keys), func(c *Config) {
		t.Setenv(pinEnv+"_WRONG", wrong)
		c.PINEnv = pinEnv + "_WRONG"
		c.Logger = zap.New(core)
	})
	if !errors.Is(err, providers.ErrPINIncorrect) {
		t.Fatalf("Open with a wrong PIN: %v, want ErrPINIncorrect", err)
	}
	if strings.Contains(err.Error(), wrong) {
		t.Errorf("error %q contains the PIN", err)
	}
	assertNoSecret(t, logs, wrong)

	// A locked token (SoftHSM does not lock, so the module's answer is
	// injected).
	_, err = tryOpen(t, tok, keyConfigs(keys), func(c *Config) {
		c.FaultHook = func(op string) uint {
			if op == "login" {
				return 0xA4 // CKR_PIN_LOCKED
			}
			return 0
		}
	})
	if !errors.Is(err, providers.ErrTokenLocked) {
		t.Fatalf("Open on a locked token: %v, want ErrTokenLocked", err)
	}

	// The right PIN from a file, with the trailing newline an editor leaves.
	p := open(t, tok, keyConfigs(keys), func(c *Config) { c.PINEnv, c.PINFile = "", tok.PINFile(t) })
	signAndVerify(t, p, string(providers.KeyECDSAP256), providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}, []byte("pin file"))
	// Root's 0640 file for the agent's group, as the shipped unit lays out.
	p = open(t, tok, keyConfigs(keys), func(c *Config) { c.PINEnv, c.PINFile = "", pinFileWithMode(t, tok, 0o640) })
	signAndVerify(t, p, string(providers.KeyECDSAP256), providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}, []byte("group-readable pin file"))
}

func assertNoSecret(t *testing.T, logs *observer.ObservedLogs, secret string) {
	t.Helper()
	for _, e := range logs.All() {
		line := e.Message
		for k, v := range e.ContextMap() {
			line += " " + k + "=" + strings.ReplaceAll(strings.ReplaceAll(toString(v), "\n", " "), "\t", " ")
		}
		if strings.Contains(line, secret) {
			t.Errorf("log line contains the PIN: %s", line)
		}
	}
}

func toString(v any) string {
	switch x := v.(type) {
	case string:
		return x
	case error:
		return x.Error()
	case interface{ String() string }:
		return x.String()
	}
	return ""
}

// pinFileWithMode writes tok's PIN to a file of the given mode.
func pinFileWithMode(t *testing.T, tok *softhsmtest.Token, mode os.FileMode) string {
	path := tok.PINFile(t)
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestConfigErrors(t *testing.T) {
	tok := softhsmtest.New(t, "cfg")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	good := keys[providers.KeyECDSAP256].URI
	cases := []struct {
		name    string
		edit    func(*Config)
		want    string // in the error
		notWant string // never in the error
	}{
		{"pin-value in URI", func(c *Config) { c.Keys[0].URI = good + "?pin-value=s3cr3t-pin" }, "pin-value", "s3cr3t-pin"},
		{"pin-source in URI", func(c *Config) { c.Keys[0].URI = good + "?pin-source=file:/etc/pin" }, "pin-source", ""},
		{"key object missing", func(c *Config) { c.Keys[0] = KeyConfig{Name: "ghost", URI: "pkcs11:token=cfg;object=no-such-key"} }, `key "ghost"`, ""},
		{"no object in URI", func(c *Config) { c.Keys[0].URI = "pkcs11:token=cfg" }, "names no object", ""},
		{"unknown attribute", func(c *Config) { c.Keys[0].URI = "pkcs11:token=cfg;objet=x" }, "unknown path attribute", ""},
		{"public key type", func(c *Config) { c.Keys[0].URI = good + ";type=public" }, "type=private", ""},
		{"two tokens", func(c *Config) { c.TokenLabel = "other" }, "one provider serves one token", ""},
		{"two selectors", func(c *Config) { c.TokenLabel, c.TokenSerial = "cfg", tok.Serial }, "one of TokenLabel", ""},
		{"no token", func(c *Config) { c.Keys[0].URI = "pkcs11:object=x" }, "no token named", ""},
		{"token absent", func(c *Config) { c.Keys[0].URI = "pkcs11:token=absent;object=x" }, "no token token=absent", ""},
		{"token of another manufacturer", func(c *Config) { c.Keys[0].URI = "pkcs11:token=cfg;manufacturer=Other%20Vendor;object=x" }, "no token token=cfg;manufacturer=Other Vendor present", ""},
		{"token of another model", func(c *Config) { c.Keys[0].URI = "pkcs11:token=cfg;model=Other%20HSM;object=x" }, "no token token=cfg;model=Other HSM present", ""},
		{"no PIN source", func(c *Config) { c.PINEnv = "" }, "no PIN source", ""},
		{"empty PIN env", func(c *Config) { c.PINEnv = "SIGIL_TEST_UNSET_PIN_VAR" }, "SIGIL_TEST_UNSET_PIN_VAR", ""},
		{"duplicate name", func(c *Config) { c.Keys = append(c.Keys, c.Keys[0]) }, "configured twice", ""},
		{"other module-path", func(c *Config) { c.Keys[0].URI = good + "?module-path=/usr/lib/other.so" }, "module-path", "/usr/lib/other.so"},
		{"pin-value after '&' in the path", func(c *Config) { c.Keys[0].URI = good + "&pin-value=s3cr3t-pin" }, "pin-value", "s3cr3t-pin"},
		{"pin-value after ';' in the query", func(c *Config) { c.Keys[0].URI = good + "?module-path=" + tok.Module + ";pin-value=s3cr3t-pin" }, "pin-value", "s3cr3t-pin"},
		// A PIN typed where the variable's name or the file's path belongs.
		{"the PIN as pin_env", func(c *Config) { c.PINEnv = tok.PIN }, "not an environment variable name", ""},
		{"the PIN as pin_file", func(c *Config) { c.PINEnv, c.PINFile = "", tok.PIN }, "not an absolute path", ""},
		{"a PIN file others may read", func(c *Config) { c.PINEnv, c.PINFile = "", pinFileWithMode(t, tok, 0o644) }, "others may read", ""},
		{"a PIN file its group may write", func(c *Config) { c.PINEnv, c.PINFile = "", pinFileWithMode(t, tok, 0o660) }, "group may write", ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tryOpen(t, tok, []KeyConfig{{Name: "k", URI: good}}, tc.edit)
			if err == nil {
				t.Fatal("Open succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not mention %q", err, tc.want)
			}
			if tc.notWant != "" && strings.Contains(err.Error(), tc.notWant) {
				t.Errorf("error %q contains %q", err, tc.notWant)
			}
			if strings.Contains(err.Error(), tok.PIN) {
				t.Errorf("error %q contains the PIN", err)
			}
		})
	}
}

// A PIN source that gives no PIN is ErrPINSource, naming the source: the
// token never saw a PIN, so it is not ErrPINIncorrect, and the agent
// tells it from a fault of its own (it was an unclassified error, which
// the agent reported as INTERNAL). A PIN the token refuses stays
// ErrPINIncorrect.
func TestPINSourceErrors(t *testing.T) {
	tok := softhsmtest.New(t, "pinsrc")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	dir := t.TempDir()
	file := func(name, content string, mode os.FileMode) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
		return path
	}
	pinDir := filepath.Join(dir, "pin-dir")
	if err := os.Mkdir(pinDir, 0o700); err != nil {
		t.Fatal(err)
	}
	// A FIFO held the start: its open waited for a writer.
	fifo := filepath.Join(dir, "pin-fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	fromFile := func(path string) func(*Config) { return func(c *Config) { c.PINEnv, c.PINFile = "", path } }
	// A file another user owns (0600, the right PIN in it) is theirs to
	// read, or to chmod: as good as one others may read. Only root can
	// give a file away, so only root runs that case.
	othersFile := filepath.Join(dir, "nobodys")
	if os.Getuid() == 0 {
		file("nobodys", tok.PIN+"\n", 0o600)
		if err := os.Chown(othersFile, 65534, 65534); err != nil {
			t.Fatal(err)
		}
	}
	// A directory on the file's path that others may write lets them put
	// another file of the agent's or root's in its place (a link to it),
	// which the agent would present as the PIN: a failed login each start,
	// toward the token's lockout.
	openDir := filepath.Join(dir, "writable-dir")
	if err := os.Mkdir(openDir, 0o755); err != nil {
		t.Fatal(err)
	}
	inOpenDir := filepath.Join(openDir, "pin")
	if err := os.WriteFile(inOpenDir, []byte(tok.PIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(openDir, 0o777); err != nil {
		t.Fatal(err)
	}
	// Here the link, put in the PIN file's place, leads to another
	// private file of the agent's, which is not the PIN.
	linkInOpenDir := filepath.Join(openDir, "link")
	if err := os.Symlink(file("agents-other-secret", "0000-wrong\n", 0o600), linkInOpenDir); err != nil {
		t.Fatal(err)
	}
	othersDir := filepath.Join(dir, "nobodys-dir")
	if os.Getuid() == 0 {
		if err := os.Mkdir(othersDir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(othersDir, "pin"), []byte(tok.PIN+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(othersDir, 65534, 65534); err != nil {
			t.Fatal(err)
		}
	}
	fromEnv := func(name, value string, set bool) func(*Config) {
		return func(c *Config) {
			if set {
				t.Setenv(name, value)
			}
			c.PINEnv = name
		}
	}
	for _, tc := range []struct {
		name   string
		edit   func(*Config)
		names  string // in the error
		source bool   // ErrPINSource, else ErrPINIncorrect
	}{
		{"variable unset", fromEnv("SIGIL_TEST_NEVER_SET_PIN", "", false), "SIGIL_TEST_NEVER_SET_PIN", true},
		{"variable empty", fromEnv("SIGIL_TEST_EMPTY_PIN", "", true), "SIGIL_TEST_EMPTY_PIN", true},
		{"file missing", fromFile(filepath.Join(dir, "absent")), filepath.Join(dir, "absent"), true},
		{"file others may read", fromFile(file("open", tok.PIN+"\n", 0o644)), filepath.Join(dir, "open"), true},
		{"file its group may write", fromFile(file("group", tok.PIN+"\n", 0o660)), filepath.Join(dir, "group"), true},
		{"file empty", fromFile(file("empty", "\n", 0o600)), filepath.Join(dir, "empty"), true},
		{"file a directory", fromFile(pinDir), pinDir + " is not a regular file", true},
		{"file a FIFO", fromFile(fifo), fifo + " is not a regular file", true},
		{"a PIN the token refuses", fromFile(file("wrong", "0000-wrong\n", 0o600)), "", false},
		{"file another user owns", fromFile(othersFile), othersFile, true},
		{"file in a directory others may write", fromFile(inOpenDir), "directory " + openDir + " may be written by its group or others", true},
		{"file linked from a directory others may write", fromFile(linkInOpenDir), "directory " + openDir + " may be written by its group or others", true},
		{"file in a directory another user owns", fromFile(filepath.Join(othersDir, "pin")), othersDir + " belongs to uid 65534", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if (tc.name == "file another user owns" || tc.name == "file in a directory another user owns") && os.Getuid() != 0 {
				t.Skip("only root can give a file to another user")
			}
			_, err := tryOpen(t, tok, []KeyConfig{{Name: "k", URI: keys[providers.KeyECDSAP256].URI}}, tc.edit)
			if err == nil {
				t.Fatal("Open succeeded")
			}
			if got := errors.Is(err, ErrPINSource); got != tc.source {
				t.Errorf("errors.Is(%v, ErrPINSource) = %v, want %v", err, got, tc.source)
			}
			if got := errors.Is(err, providers.ErrPINIncorrect); got == tc.source {
				t.Errorf("errors.Is(%v, ErrPINIncorrect) = %v, want %v", err, got, !tc.source)
			}
			if !strings.Contains(err.Error(), tc.names) {
				t.Errorf("%v\ndoes not name %q", err, tc.names)
			}
			if strings.Contains(err.Error(), tok.PIN) || strings.Contains(err.Error(), "0000-wrong") {
				t.Errorf("%v\ncontains a PIN", err)
			}
		})
	}
}

// A module path that does not give a PKCS#11 library (no file there, a
// file that is not a shared object, a shared object without
// C_GetFunctionList) is ErrModuleLoad, which the agent takes for the
// configuration's fault and does not restart on; it said only "dlopen
// failed". A module that loads and whose C_Initialize fails is not: its
// device may come back.
func TestModuleThatDoesNotLoad(t *testing.T) {
	dir := t.TempDir()
	notELF := filepath.Join(dir, "libnotes.so")
	if err := os.WriteFile(notELF, []byte("not a shared object\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		module func(t *testing.T) string
		says   string // in the error
		load   bool   // ErrModuleLoad
	}{
		{"no file there", func(*testing.T) string { return filepath.Join(dir, "libabsent.so") }, "No such file", true},
		{"not a shared object", func(*testing.T) string { return notELF }, "libnotes.so", true},
		{"no C_GetFunctionList", func(t *testing.T) string { return buildModule(t, "testdata/nofunctionlist.c") }, "exports no C_GetFunctionList", true},
		{"C_Initialize fails with CKR_DEVICE_ERROR", func(t *testing.T) string { return buildModule(t, "testdata/initfails.c") }, "CKR_DEVICE_ERROR", false},
		{"SoftHSM2 without its configuration", func(t *testing.T) string {
			module := softhsmtest.FindModule()
			if module == "" {
				t.Skip("SoftHSM2 not installed")
			}
			t.Setenv("SOFTHSM2_CONF", filepath.Join(dir, "absent.conf"))
			return module
		}, "initialize module", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			module := tc.module(t)
			t.Setenv(pinEnv, "1234")
			p, err := Open(context.Background(), Config{ID: "hsm", Module: module, TokenLabel: "prod", PINEnv: pinEnv,
				Keys: []KeyConfig{{Name: "k", URI: "pkcs11:object=k"}}})
			if err == nil {
				p.Close()
				t.Fatal("Open succeeded")
			}
			if got := errors.Is(err, ErrModuleLoad); got != tc.load {
				t.Errorf("errors.Is(%v, ErrModuleLoad) = %v, want %v", err, got, tc.load)
			}
			if !strings.Contains(err.Error(), module) || !strings.Contains(err.Error(), tc.says) {
				t.Errorf("%v\ndoes not name %s and say %q", err, module, tc.says)
			}
		})
	}
}

// buildModule compiles the C file src into a shared object and returns
// its path.
func buildModule(t *testing.T, src string) string {
	t.Helper()
	if _, err := exec.LookPath("cc"); err != nil {
		t.Skip("no C compiler")
	}
	so := filepath.Join(t.TempDir(), "libmodule.so")
	if out, err := exec.Command("cc", "-shared", "-fPIC", "-Wall", "-o", so, src, "-ldl").CombinedOutput(); err != nil {
		t.Fatalf("cc: %v\n%s", err, out)
	}
	return so
}

func TestSignErrors(t *testing.T) {
	tok := softhsmtest.New(t, "errs")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	p := open(t, tok, keyConfigs(keys), nil)
	ctx := context.Background()
	d := digestOf(crypto.SHA256, []byte("x"))
	cases := []struct {
		name string
		key  string
		alg  providers.Algorithm
		dig  []byte
		want error
	}{
		{"unknown key", "nope", providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}, d, providers.ErrNotFound},
		{"wrong scheme", string(providers.KeyECDSAP256), providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA256}, d, providers.ErrUnsupportedAlgorithm},
		{"short digest", string(providers.KeyECDSAP256), providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}, d[:20], providers.ErrBadRequest},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := p.Sign(ctx, tc.key, tc.alg, tc.dig); !errors.Is(err, tc.want) {
				t.Errorf("Sign: %v, want %v", err, tc.want)
			}
		})
	}

	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := p.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := p.Sign(ctx, string(providers.KeyECDSAP256), providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}, d); !errors.Is(err, providers.ErrUnavailable) {
		t.Errorf("Sign after Close: %v, want ErrUnavailable", err)
	}
	if err := p.Healthy(); !errors.Is(err, providers.ErrUnavailable) {
		t.Errorf("Healthy after Close: %v, want ErrUnavailable", err)
	}
}

func TestFunctionListLayout(t *testing.T) {
	module := softhsmtest.FindModule()
	if module == "" {
		t.Skip("SoftHSM2 not installed")
	}
	lib, err := openLibrary(module)
	if err != nil {
		t.Fatal(err)
	}
	defer lib.close()
	if !lib.symbolsMatch() {
		t.Fatal("shim's C_SignInit/C_Sign slots are not the module's C_SignInit/C_Sign: CK_FUNCTION_LIST layout is wrong")
	}
}

// A generation that cannot end well leaves nothing on the token: here a
// public key object left behind under the id (its private half deleted)
// would make the new pair's public half ambiguous. The generation is
// refused before it makes a pair, and the label stays free for the retry.
func TestGenerateKeyLeavesNoOrphan(t *testing.T) {
	tok := softhsmtest.New(t, "orphan")
	tok.GenerateKey(t, providers.KeyECDSAP256, "retired", []byte{0x42})
	tok.WithModule(t, func(c *p11.Ctx, slot uint) {
		s, err := c.OpenSession(slot, p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
		if err != nil {
			t.Fatal(err)
		}
		defer c.CloseSession(s)
		if err := c.Login(s, p11.CKU_USER, tok.PIN); err != nil && !errors.Is(err, p11.Error(p11.CKR_USER_ALREADY_LOGGED_IN)) {
			t.Fatal(err)
		}
		if err := c.FindObjectsInit(s, []*p11.Attribute{p11.NewAttribute(p11.CKA_CLASS, p11.CKO_PRIVATE_KEY), p11.NewAttribute(p11.CKA_ID, []byte{0x42})}); err != nil {
			t.Fatal(err)
		}
		objs, _, err := c.FindObjects(s, 1)
		c.FindObjectsFinal(s)
		if err != nil || len(objs) != 1 {
			t.Fatalf("the retired private key: %v %v", objs, err)
		}
		if err := c.DestroyObject(s, objs[0]); err != nil {
			t.Fatal(err)
		}
	})
	p := open(t, tok, nil, func(c *Config) { c.TokenLabel = tok.Label })
	if _, err := p.GenerateKey(context.Background(), "new", providers.KeyECDSAP256, "new", []byte{0x42}); err == nil {
		t.Fatal("GenerateKey over a leftover public key with the id succeeded")
	}
	if _, err := p.GenerateKey(context.Background(), "new", providers.KeyECDSAP256, "new", []byte{0x43}); err != nil {
		t.Fatalf("the retry under the same label: %v (an orphan from the first attempt holds it)", err)
	}
}

// The module is loaded into the agent, and dlopen runs its constructors
// with the agent's privileges before any check on what it does; the agent
// then hands it the PIN. A module file, or a directory on its way, that a
// user other than the agent's or root may change let that user run code
// in the agent: the loader took any path. Such a module is refused before
// it is loaded, as ErrModuleLoad (the configuration's fault), naming the
// path and the rule.
func TestModuleOthersMayChangeIsRefused(t *testing.T) {
	so := buildModule(t, "testdata/ranonload.c")
	const nobody = 65534
	// put copies the module to base/rel, with each directory made 0755 and
	// the file 0755.
	put := func(t *testing.T, base, rel string) string {
		path := filepath.Join(base, rel)
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(so)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, b, 0o755); err != nil {
			t.Fatal(err)
		}
		return path
	}
	chmod := func(t *testing.T, path string, mode os.FileMode) {
		if err := os.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
	}
	lchown := func(t *testing.T, path string) {
		if err := os.Lchown(path, nobody, nobody); err != nil {
			t.Fatal(err)
		}
	}
	symlink := func(t *testing.T, target, link string) {
		if err := os.MkdirAll(filepath.Dir(link), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(target, link); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		name   string
		layout func(t *testing.T, base string) string // the module's path
		root   bool                                   // needs root (chown)
		says   string                                 // in the refusal; "" for a module loaded
	}{
		{"in a directory only ours", func(t *testing.T, base string) string { return put(t, base, "lib/mod.so") }, false, ""},
		{"under a sticky directory others may write, as /tmp", func(t *testing.T, base string) string {
			m := put(t, base, "tmp/lib/mod.so")
			chmod(t, filepath.Join(base, "tmp"), 0o777|os.ModeSticky)
			return m
		}, false, ""},
		{"through a link in a directory only ours", func(t *testing.T, base string) string {
			put(t, base, "lib/mod.so")
			symlink(t, "lib", filepath.Join(base, "alias"))
			return filepath.Join(base, "alias", "mod.so")
		}, false, ""},
		{"the file its group may write", func(t *testing.T, base string) string {
			m := put(t, base, "lib/mod.so")
			chmod(t, m, 0o775)
			return m
		}, false, "may be written by its group or others"},
		{"the file others may write", func(t *testing.T, base string) string {
			m := put(t, base, "lib/mod.so")
			chmod(t, m, 0o757)
			return m
		}, false, "may be written by its group or others"},
		{"its directory its group may write", func(t *testing.T, base string) string {
			m := put(t, base, "lib/mod.so")
			chmod(t, filepath.Dir(m), 0o775)
			return m
		}, false, "directory " + "BASE/lib may be written by its group or others"},
		{"a directory above others may write", func(t *testing.T, base string) string {
			m := put(t, base, "open/lib/mod.so")
			chmod(t, filepath.Join(base, "open"), 0o777)
			return m
		}, false, "directory BASE/open may be written"},
		{"a link to it in a directory others may write", func(t *testing.T, base string) string {
			m := put(t, base, "lib/mod.so")
			symlink(t, m, filepath.Join(base, "open", "mod.so"))
			chmod(t, filepath.Join(base, "open"), 0o777)
			return filepath.Join(base, "open", "mod.so")
		}, false, "directory BASE/open may be written"},
		{"a link leading to a directory others may write", func(t *testing.T, base string) string {
			put(t, base, "open/mod.so")
			chmod(t, filepath.Join(base, "open"), 0o777)
			symlink(t, filepath.Join(base, "open", "mod.so"), filepath.Join(base, "lib", "mod.so"))
			return filepath.Join(base, "lib", "mod.so")
		}, false, "directory BASE/open may be written"},
		{"missing from a sticky directory others may write", func(t *testing.T, base string) string {
			open := filepath.Join(base, "tmp")
			if err := os.Mkdir(open, 0o755); err != nil {
				t.Fatal(err)
			}
			chmod(t, open, 0o777|os.ModeSticky)
			return filepath.Join(open, "absent.so")
		}, false, "BASE/tmp/absent.so does not exist, and others may make it"},
		{"the file another user's", func(t *testing.T, base string) string {
			m := put(t, base, "lib/mod.so")
			lchown(t, m)
			return m
		}, true, "BASE/lib/mod.so belongs to uid 65534"},
		{"its directory another user's", func(t *testing.T, base string) string {
			m := put(t, base, "lib/mod.so")
			lchown(t, filepath.Dir(m))
			return m
		}, true, "BASE/lib belongs to uid 65534"},
		{"another user's link in a sticky directory", func(t *testing.T, base string) string {
			m := put(t, base, "lib/mod.so")
			link := filepath.Join(base, "tmp", "mod.so")
			symlink(t, m, link)
			chmod(t, filepath.Dir(link), 0o777|os.ModeSticky)
			lchown(t, link)
			return link
		}, true, "BASE/tmp/mod.so belongs to uid 65534"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.root && os.Getuid() != 0 {
				t.Skip("only root can give a file to another user")
			}
			base := t.TempDir()
			module := tc.layout(t, base)
			ran := filepath.Join(t.TempDir(), "ran")
			t.Setenv("SIGIL_TEST_MODULE_RAN", ran)
			t.Setenv(pinEnv, "1234")
			p, err := Open(context.Background(), Config{ID: "hsm", Module: module, TokenLabel: "prod", PINEnv: pinEnv,
				Keys: []KeyConfig{{Name: "k", URI: "pkcs11:object=k"}}})
			if err == nil {
				p.Close()
				t.Fatal("Open succeeded on a module whose C_Initialize fails")
			}
			_, statErr := os.Stat(ran)
			if tc.says == "" {
				if errors.Is(err, ErrModuleLoad) || statErr != nil {
					t.Fatalf("the module was not loaded (its constructor ran: %v): %v", statErr == nil, err)
				}
				return
			}
			if statErr == nil {
				t.Error("the module's constructor ran")
			}
			if !errors.Is(err, ErrModuleLoad) {
				t.Errorf("errors.Is(%v, ErrModuleLoad) = false", err)
			}
			if want := strings.ReplaceAll(tc.says, "BASE", base); !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), module) {
				t.Errorf("error %q does not say %q naming %s", err, want, module)
			}
		})
	}
}
