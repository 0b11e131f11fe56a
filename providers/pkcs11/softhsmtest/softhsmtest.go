// Package softhsmtest gives tests a fresh SoftHSM2 token: a temporary token
// directory and configuration, an initialized token with known PINs, keys
// generated with pkcs11-tool (as an operator would provision them), and
// faults injected through the module from behind a provider's back.
//
// New sets SOFTHSM2_CONF with t.Setenv, so a test using it cannot call
// t.Parallel, and tests of one process see one token configuration at a time.
// SoftHSM reads the variable at C_Initialize: a provider opened on the
// token must be closed before the next test makes its own token (the module
// is finalized when the last provider on it closes).
package softhsmtest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	p11 "github.com/miekg/pkcs11"
	"github.com/sigil-agent/sigil/providers"
)

// Token is an initialized SoftHSM2 token in a temporary directory.
type Token struct {
	Module   string // path of libsofthsm2.so
	Label    string
	Serial   string
	PIN      string // user PIN
	SOPIN    string
	ConfPath string // the softhsm2.conf that SOFTHSM2_CONF points to
	Dir      string // temporary directory holding the configuration and tokens

	// Around, when set, wraps every operation WithModule makes behind a
	// provider's back. SoftHSM frees a session that C_CloseAllSessions closes
	// while another thread is still signing on it (and crashes the process),
	// where a real token's sessions die on the device and calls on them
	// fail. A test that closes sessions under load sets Around to run the
	// operation while the provider's calls are held, e.g. with
	// pkcs11.PauseModule(tok.Module, fn).
	Around func(fn func())
}

// Key is a key generated into the token.
type Key struct {
	Type  providers.KeyType
	Label string
	ID    []byte
	URI   string // by label: pkcs11:token=<token>;object=<label>
	IDURI string // by id:    pkcs11:token=<token>;id=%xx...
}

// ModulePaths are where SoftHSM2's module is looked for, after $SOFTHSM2_MODULE.
var ModulePaths = []string{
	"/usr/lib/softhsm/libsofthsm2.so",
	"/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
	"/usr/local/lib/softhsm/libsofthsm2.so",
}

// FindModule returns the SoftHSM2 module's path, or "".
func FindModule() string {
	if m := os.Getenv("SOFTHSM2_MODULE"); m != "" {
		if _, err := os.Stat(m); err == nil {
			return m
		}
	}
	for _, m := range ModulePaths {
		if _, err := os.Stat(m); err == nil {
			return m
		}
	}
	return ""
}

const skipMessage = "SoftHSM2 not installed: run `make test` as root to install softhsm2"

// New initializes a token labelled label in a fresh temporary directory and
// points SOFTHSM2_CONF at it. It skips the test when SoftHSM2 is missing.
func New(t testing.TB, label string) *Token {
	t.Helper()
	module := FindModule()
	if module == "" {
		t.Skip(skipMessage)
	}
	if _, err := exec.LookPath("softhsm2-util"); err != nil {
		t.Skip(skipMessage + " (softhsm2-util not on PATH)")
	}
	dir := t.TempDir()
	tokens := filepath.Join(dir, "tokens")
	if err := os.Mkdir(tokens, 0o700); err != nil {
		t.Fatal(err)
	}
	conf := filepath.Join(dir, "softhsm2.conf")
	text := fmt.Sprintf("directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n", tokens)
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SOFTHSM2_CONF", conf)
	tok := &Token{Module: module, Label: label, PIN: "4711-user", SOPIN: "4711-so-pin", ConfPath: conf, Dir: dir}
	run(t, "softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", tok.SOPIN, "--pin", tok.PIN)
	tok.Serial = tok.findSerial(t)
	return tok
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, args[0], err, out.String())
	}
	return out.String()
}

// Reinitialize deletes the token and initializes a new, empty one under the
// same label and PINs, as an operator re-provisioning an HSM partition
// would: the new token has another serial and none of the old keys.
func (tok *Token) Reinitialize(t testing.TB) {
	t.Helper()
	run(t, "softhsm2-util", "--delete-token", "--serial", tok.Serial)
	run(t, "softhsm2-util", "--init-token", "--free", "--label", tok.Label, "--so-pin", tok.SOPIN, "--pin", tok.PIN)
	tok.Serial = tok.findSerial(t)
}

// AddToken initializes another token beside tok, in the same directory
// and configuration, with its own label and user PIN: two partitions of
// one HSM, which one module serves in two slots. SoftHSM lists its tokens
// at C_Initialize: add them before any provider opens the module.
func (tok *Token) AddToken(t testing.TB, label, pin string) *Token {
	t.Helper()
	other := *tok
	other.Label, other.PIN, other.Around = label, pin, nil
	run(t, "softhsm2-util", "--init-token", "--free", "--label", label, "--so-pin", other.SOPIN, "--pin", pin)
	other.Serial = other.findSerial(t)
	return &other
}

// findSerial reads the token's serial from softhsm2-util --show-slots.
func (tok *Token) findSerial(t testing.TB) string {
	out := run(t, "softhsm2-util", "--show-slots")
	serial := ""
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		if v, ok := strings.CutPrefix(line, "Serial number:"); ok {
			serial = strings.TrimSpace(v)
		}
		if v, ok := strings.CutPrefix(line, "Label:"); ok && strings.TrimSpace(v) == tok.Label && serial != "" {
			return serial
		}
	}
	t.Fatalf("token %q not in softhsm2-util --show-slots", tok.Label)
	return ""
}

// PINFile writes the user PIN to a 0600 file (with a trailing newline, as an
// editor would leave it) and returns its path.
func (tok *Token) PINFile(t testing.TB) string {
	t.Helper()
	f := filepath.Join(tok.Dir, "pin")
	if err := os.WriteFile(f, []byte(tok.PIN+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// pkcs11ToolKeyType is pkcs11-tool's --key-type for each key type.
var pkcs11ToolKeyType = map[providers.KeyType]string{
	providers.KeyECDSAP256: "EC:prime256v1",
	providers.KeyECDSAP384: "EC:secp384r1",
	providers.KeyRSA2048:   "rsa:2048",
	providers.KeyRSA3072:   "rsa:3072",
	providers.KeyRSA4096:   "rsa:4096",
	providers.KeyEd25519:   "EC:edwards25519",
}

// GenerateKey makes a key pair of type kt with pkcs11-tool, in another
// process, and returns its URIs. Generate keys before opening a provider
// on the token (SoftHSM does notice objects made by another process, but
// only on its next object search).
func (tok *Token) GenerateKey(t testing.TB, kt providers.KeyType, label string, id []byte) Key {
	t.Helper()
	if _, err := exec.LookPath("pkcs11-tool"); err != nil {
		t.Skip("pkcs11-tool (opensc) not installed: run `make test` as root to install opensc")
	}
	spec, ok := pkcs11ToolKeyType[kt]
	if !ok {
		t.Fatalf("key type %q", kt)
	}
	run(t, "pkcs11-tool", "--module", tok.Module, "--token-label", tok.Label, "--login", "--pin", tok.PIN,
		"--keypairgen", "--key-type", spec, "--label", label, "--id", fmt.Sprintf("%x", id))
	return Key{
		Type:  kt,
		Label: label,
		ID:    id,
		URI:   fmt.Sprintf("pkcs11:token=%s;object=%s", tok.Label, label),
		IDURI: fmt.Sprintf("pkcs11:token=%s;id=%s", tok.Label, pctAll(id)),
	}
}

// GenerateKeys makes one key of each type, labelled by type ("ecdsa-p256",
// ...) with ids 1, 2, ... in order.
func (tok *Token) GenerateKeys(t testing.TB, types ...providers.KeyType) map[providers.KeyType]Key {
	t.Helper()
	keys := make(map[providers.KeyType]Key, len(types))
	for i, kt := range types {
		keys[kt] = tok.GenerateKey(t, kt, string(kt), []byte{byte(i + 1)})
	}
	return keys
}

func pctAll(b []byte) string {
	var sb strings.Builder
	for _, c := range b {
		fmt.Fprintf(&sb, "%%%02X", c)
	}
	return sb.String()
}

// WithModule runs fn with a second handle on the token's module in this
// process. The dynamic loader returns the library already loaded, so this
// handle shares its state with any provider open on it: sessions closed or a
// logout made here happen behind the provider's back. C_Initialize answering
// CKR_CRYPTOKI_ALREADY_INITIALIZED is expected; the handle finalizes only if
// it initialized the library itself.
func (tok *Token) WithModule(t testing.TB, fn func(c *p11.Ctx, slot uint)) {
	t.Helper()
	c := p11.New(tok.Module)
	if c == nil {
		t.Fatalf("load %s", tok.Module)
	}
	defer c.Destroy()
	err := c.Initialize()
	var rv p11.Error
	switch {
	case err == nil:
		defer c.Finalize()
	case errors.As(err, &rv) && rv == p11.CKR_CRYPTOKI_ALREADY_INITIALIZED:
	default:
		t.Fatalf("C_Initialize: %v", err)
	}
	slots, err := c.GetSlotList(true)
	if err != nil {
		t.Fatalf("C_GetSlotList: %v", err)
	}
	for _, s := range slots {
		ti, err := c.GetTokenInfo(s)
		if err == nil && strings.TrimRight(ti.Label, " ") == tok.Label {
			if tok.Around != nil {
				tok.Around(func() { fn(c, s) })
			} else {
				fn(c, s)
			}
			return
		}
	}
	t.Fatalf("token %q not found", tok.Label)
}

// CloseAllSessions closes every session this process has on the token
// (C_CloseAllSessions), which also ends the login.
func (tok *Token) CloseAllSessions(t testing.TB) {
	t.Helper()
	tok.WithModule(t, func(c *p11.Ctx, slot uint) {
		if err := c.CloseAllSessions(slot); err != nil {
			t.Errorf("C_CloseAllSessions: %v", err)
		}
	})
}

// Logout logs the token out for the whole process (C_Logout), leaving the
// sessions open: every private object handle becomes invalid.
func (tok *Token) Logout(t testing.TB) {
	t.Helper()
	tok.WithModule(t, func(c *p11.Ctx, slot uint) {
		s, err := c.OpenSession(slot, p11.CKF_SERIAL_SESSION)
		if err != nil {
			t.Errorf("C_OpenSession: %v", err)
			return
		}
		if err := c.Logout(s); err != nil {
			t.Errorf("C_Logout: %v", err)
		}
		_ = c.CloseSession(s)
	})
}

// ChangePIN sets a new user PIN (C_SetPIN) through the process's current
// login, so a provider that logs in again afterwards presents a wrong PIN.
func (tok *Token) ChangePIN(t testing.TB, newPIN string) {
	t.Helper()
	tok.WithModule(t, func(c *p11.Ctx, slot uint) {
		s, err := c.OpenSession(slot, p11.CKF_SERIAL_SESSION|p11.CKF_RW_SESSION)
		if err != nil {
			t.Errorf("C_OpenSession: %v", err)
			return
		}
		defer c.CloseSession(s)
		if err := c.SetPIN(s, tok.PIN, newPIN); err != nil {
			t.Errorf("C_SetPIN: %v", err)
			return
		}
		tok.PIN = newPIN
	})
}
