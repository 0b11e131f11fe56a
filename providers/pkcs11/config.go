package pkcs11

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	pkcs11uri "github.com/stefanberger/go-pkcs11uri"
	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/providers"
)

// KeyConfig names one key on the token.
type KeyConfig struct {
	Name string // the key's name in the agent, unique across the configuration
	// URI is an RFC 7512 PKCS#11 URI naming the private key object by object=
	// (CKA_LABEL) and/or id= (CKA_ID), for example
	// "pkcs11:token=prod;object=release-signing" or "pkcs11:id=%01".
	URI string
}

// Config configures a PKCS#11 provider: one module, one token, one login.
type Config struct {
	ID     string // provider id, part of every kid
	Module string // path of the PKCS#11 library (.so)

	// The token: by label, serial or slot id. At most one may be set here; a
	// token= or serial= in the key URIs works as well, and every place that
	// names the token must agree.
	TokenLabel  string
	TokenSerial string
	Slot        *uint

	// The user PIN comes from the environment variable PINEnv or from the
	// file PINFile (one trailing newline trimmed); exactly one must be set.
	// It never comes from the configuration text: a key URI carrying
	// pin-value or pin-source is rejected.
	PINEnv  string
	PINFile string

	// Sessions is the size of the session pool (default DefaultSessions),
	// shared out among the module instances.
	Sessions int

	// Instances is how many instances of the module the provider loads
	// (default 1). Modules that serialize work per process, like SoftHSM2,
	// sign faster with 2: see instances.go for how and when.
	Instances int

	// loadFrom is the file an instance loads the module from when it is not
	// Module: a private copy (instances.go).
	loadFrom string
	// loaded, if set, runs once the loader has mapped loadFrom, before
	// C_Initialize: the copy's file is not needed after that.
	loaded func()
	// pinRefused is shared by the instances of one Open: once the token
	// has refused the PIN to one of them, none presents it again (see
	// Provider.login).
	pinRefused *atomic.Bool

	Keys []KeyConfig

	Logger *zap.Logger // nil: no logging; the caller names the provider in it (the agent does)

	// Backoff is the supervisor's first wait after a failed repair (default
	// DefaultBackoff); it doubles on each failure up to MaxBackoff.
	Backoff time.Duration

	// FaultHook is for tests. When set, it is called with the name of each
	// module operation the provider is about to make ("sign", "login",
	// "open-session", "session-info", "find", "slot", "initialize",
	// "generate", and in a key generation after C_GenerateKeyPair
	// "public-key" and "destroy"); a non-zero CKR_ value is then taken as the module's
	// answer and the real call is skipped. It must be safe for concurrent use.
	FaultHook func(op string) uint
}

const (
	// DefaultSessions is chosen by measurement (BenchmarkPoolSize, and an
	// interleaved run against a plain miekg loop with one session per
	// goroutine, SoftHSM2 ECDSA P-256, 8 callers, 2 cores): a pool of 4 gave
	// 0.91x of the plain loop's throughput, 8 gave 0.97-1.1x, 16 no more.
	// Callers beyond the pool size wait for a session, and the park/wake
	// costs more than SoftHSM's internal serialization saves. Size the pool
	// to the number of concurrent callers; hardware tokens cap sessions
	// (YubiHSM2: 16 per connector).
	DefaultSessions = 8
	// DefaultBackoff is the supervisor's first retry delay.
	DefaultBackoff = 100 * time.Millisecond
	// MaxBackoff caps the supervisor's retry delay.
	MaxBackoff = 5 * time.Second
)

func (c *Config) ensureDefaults() {
	if c.Sessions <= 0 {
		c.Sessions = DefaultSessions
	}
	if c.Instances <= 0 {
		c.Instances = 1
	}
	if c.Backoff <= 0 {
		c.Backoff = DefaultBackoff
	}
	if c.Backoff > MaxBackoff {
		c.Backoff = MaxBackoff
	}
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
}

// FieldNames names Config's fields in Validate's errors: Go field name to
// the name a caller's users know it by ("PINFile": "pin_file"), for a
// caller that reads its configuration from a file. A field it lacks goes
// by its Go name.
type FieldNames map[string]string

func (n FieldNames) of(field string) string {
	if name, ok := n[field]; ok {
		return name
	}
	return field
}

// Validate checks what Open refuses before it loads the module: the module
// path, how the token is named (TokenLabel, TokenSerial or Slot, and the
// key URIs' token attributes, all naming one token), the PIN's source
// (exactly one of PINEnv, a variable's name, and PINFile, an absolute
// path; not the PIN), Instances, and each key's URI (no PIN in it, one
// object, each object once). It leaves to the caller the ID and the key
// names, which a caller with several providers checks across them, and
// to Open what needs the module, the token or the PIN. Its errors name
// fields by n (nil: Go names) and never quote a key URI, PINEnv or
// PINFile, where a PIN may have been put by mistake.
func (c Config) Validate(n FieldNames) error {
	_, _, err := c.parse(n)
	return err
}

// parse is Validate returning, for Open, the token selector and each key's
// object (by index in Keys).
func (c *Config) parse(n FieldNames) (tokenSelector, []objectSelector, error) {
	var errs []error
	switch {
	case c.Module == "":
		errs = append(errs, fmt.Errorf("no %s: the path of the PKCS#11 library", n.of("Module")))
	case !filepath.IsAbs(c.Module):
		// Open refuses it (checkModulePath: a name the loader would look
		// up in its search path is a path nobody checked); --check says so
		// first.
		errs = append(errs, fmt.Errorf("%s %q: want an absolute path (a bare name is looked up by the loader in directories nobody checked)", n.of("Module"), c.Module))
	}
	var sel tokenSelector
	named := 0
	if c.TokenLabel != "" {
		sel.label = c.TokenLabel
		named++
	}
	if c.TokenSerial != "" {
		sel.serial = c.TokenSerial
		named++
	}
	if c.Slot != nil {
		s := *c.Slot
		sel.slot = &s
		named++
	}
	if named > 1 {
		errs = append(errs, fmt.Errorf("name the token by one of %s, %s or %s", n.of("TokenLabel"), n.of("TokenSerial"), n.of("Slot")))
	}
	if c.Instances < 0 || c.Instances > MaxInstances {
		errs = append(errs, fmt.Errorf("%s %d: want 1 to %d", n.of("Instances"), c.Instances, MaxInstances))
	}
	objs := make([]objectSelector, len(c.Keys))
	parsed := make([]bool, len(c.Keys))
	allParsed := true
	for i, kc := range c.Keys {
		obj, tok, err := parseKeyURI(kc.URI, c.Module, n)
		if err != nil {
			errs = append(errs, fmt.Errorf("key %q: %w", kc.Name, err))
			allParsed = false
			continue
		}
		if err := sel.merge(tok); err != nil {
			errs = append(errs, fmt.Errorf("key %q: %w", kc.Name, err))
		}
		for j := range i {
			if parsed[j] && objs[j].equal(obj) {
				errs = append(errs, fmt.Errorf("keys %q and %q name the same object", c.Keys[j].Name, kc.Name))
				break
			}
		}
		objs[i], parsed[i] = obj, true
	}
	if sel.empty() && allParsed {
		errs = append(errs, fmt.Errorf("no token named: set %s, %s or %s, or token= in a key's %s", n.of("TokenLabel"), n.of("TokenSerial"), n.of("Slot"), n.of("URI")))
	}
	if err := pinSourceError(c, n); err != nil {
		errs = append(errs, err)
	}
	return sel, objs, errors.Join(errs...)
}

func (c *Config) loadPath() string {
	if c.loadFrom != "" {
		return c.loadFrom
	}
	return c.Module
}

// tokenSelector finds the token among the module's slots.
type tokenSelector struct {
	label, serial       string
	manufacturer, model string
	slot                *uint
}

func (t tokenSelector) empty() bool { return t.label == "" && t.serial == "" && t.slot == nil }

func (t tokenSelector) String() string {
	var parts []string
	if t.label != "" {
		parts = append(parts, "token="+t.label)
	}
	if t.serial != "" {
		parts = append(parts, "serial="+t.serial)
	}
	// Matching checks them too (supervisor.go): an error that left them
	// out would name a token that is present.
	if t.manufacturer != "" {
		parts = append(parts, "manufacturer="+t.manufacturer)
	}
	if t.model != "" {
		parts = append(parts, "model="+t.model)
	}
	if t.slot != nil {
		parts = append(parts, "slot-id="+strconv.FormatUint(uint64(*t.slot), 10))
	}
	return strings.Join(parts, ";")
}

// merge adds o's attributes to t; an attribute both name must be equal.
func (t *tokenSelector) merge(o tokenSelector) error {
	pick := func(dst *string, v, what string) error {
		if v == "" {
			return nil
		}
		if *dst != "" && *dst != v {
			return fmt.Errorf("%s %q and %q both named: one provider serves one token", what, *dst, v)
		}
		*dst = v
		return nil
	}
	if err := pick(&t.label, o.label, "token"); err != nil {
		return err
	}
	if err := pick(&t.serial, o.serial, "serial"); err != nil {
		return err
	}
	if err := pick(&t.manufacturer, o.manufacturer, "manufacturer"); err != nil {
		return err
	}
	if err := pick(&t.model, o.model, "model"); err != nil {
		return err
	}
	if o.slot != nil {
		if t.slot != nil && *t.slot != *o.slot {
			return fmt.Errorf("slot-id %d and %d both named: one provider serves one token", *t.slot, *o.slot)
		}
		s := *o.slot
		t.slot = &s
	}
	return nil
}

// objectSelector finds a private key object on the token.
type objectSelector struct {
	label string
	id    []byte
}

func (o objectSelector) String() string {
	var parts []string
	if o.label != "" {
		parts = append(parts, "object="+o.label)
	}
	if o.id != nil {
		parts = append(parts, fmt.Sprintf("id=%x", o.id))
	}
	return strings.Join(parts, ";")
}

func (o objectSelector) equal(p objectSelector) bool {
	return o.label == p.label && bytes.Equal(o.id, p.id)
}

// uriAttrsIgnored are RFC 7512 attributes that describe the library or slot;
// this provider loads the configured module, so it accepts and ignores them.
var uriAttrsIgnored = map[string]bool{
	"library-manufacturer": true, "library-description": true, "library-version": true,
	"slot-description": true, "slot-manufacturer": true,
}

const uriScheme = "pkcs11:"

// parseKeyURI parses one key URI. Its errors never quote the URI, which
// could carry a PIN under a spelling the checks below do not know; the caller
// names the key instead. n names Config's fields in them.
func parseKeyURI(raw, module string, n FieldNames) (objectSelector, tokenSelector, error) {
	uri := n.of("URI")
	if raw == "" {
		return objectSelector{}, tokenSelector{}, fmt.Errorf("no %s: name the key's object, like pkcs11:object=release", uri)
	}
	if err := refusePINAttributes(raw, n); err != nil {
		return objectSelector{}, tokenSelector{}, err
	}
	// A scheme is case-insensitive (RFC 3986 §3.1) but the parser and
	// countPathAttributes know only "pkcs11:". Attribute names keep their
	// case: RFC 7512 defines them in lower case only.
	if len(raw) >= len(uriScheme) && strings.EqualFold(raw[:len(uriScheme)], uriScheme) {
		raw = uriScheme + raw[len(uriScheme):]
	}
	u := pkcs11uri.New()
	if err := u.Parse(raw); err != nil {
		// The parser's own messages quote attribute values.
		return objectSelector{}, tokenSelector{}, fmt.Errorf("%s does not parse as an RFC 7512 PKCS#11 URI (check its attributes and %%-escapes)", uri)
	}
	var obj objectSelector
	var tok tokenSelector
	// The parser exposes attributes by name only; probe the known ones and
	// then make sure nothing else was given.
	known := 0
	get := func(name string) (string, bool) {
		v, ok := u.GetPathAttribute(name, false)
		if ok {
			known++
		}
		return v, ok
	}
	// An empty label, serial, manufacturer or model would match only a
	// token or object whose attribute is blank (RFC 7512 §2.3), but the
	// selectors below take "" for "not named", which matches any: refused,
	// so that "token=" cannot pick whichever token comes first. (An empty
	// id= keeps its RFC meaning: the selector tells it from an absent one.)
	for _, name := range []string{"object", "token", "serial", "manufacturer", "model"} {
		if v, ok := u.GetPathAttribute(name, false); ok && v == "" {
			return obj, tok, fmt.Errorf("%s: %s= is empty; name it or leave the attribute out", uri, name)
		}
	}
	if v, ok := get("object"); ok {
		obj.label = v
	}
	if v, ok := get("id"); ok {
		// Non-nil even when empty: RFC 7512 §2.3 has an empty attribute
		// match an empty value, so "id=" names a key with an empty CKA_ID.
		obj.id = []byte(v)
	}
	if v, ok := get("type"); ok && v != "private" {
		return obj, tok, fmt.Errorf("%s: its type is not private: a signing key is type=private", uri)
	}
	if v, ok := get("token"); ok {
		tok.label = v
	}
	if v, ok := get("serial"); ok {
		tok.serial = v
	}
	if v, ok := get("manufacturer"); ok {
		tok.manufacturer = v
	}
	if v, ok := get("model"); ok {
		tok.model = v
	}
	if v, ok := get("slot-id"); ok {
		id, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return obj, tok, fmt.Errorf("%s: slot-id is not a number", uri)
		}
		s := uint(id)
		tok.slot = &s
	}
	for name := range uriAttrsIgnored {
		get(name)
	}
	if countPathAttributes(raw) != known {
		return obj, tok, fmt.Errorf("%s: unknown path attribute (known: object, id, type, token, serial, manufacturer, model, slot-id)", uri)
	}
	if v, ok := u.GetQueryAttribute("module-path", false); ok {
		if filepath.Clean(v) != filepath.Clean(module) {
			return obj, tok, fmt.Errorf("%s: its module-path differs from the provider's %s %s", uri, n.of("Module"), module)
		}
	}
	if obj.label == "" && obj.id == nil {
		return obj, tok, fmt.Errorf("%s names no object: give object= or id=", uri)
	}
	return obj, tok, nil
}

// refusePINAttributes refuses a URI that carries pin-value or pin-source in
// its path or its query, whatever the case or percent-encoding of the name:
// RFC 7512 puts them in the query, but a PIN misplaced in the path must not
// reach an error message or a log line either. Both separators are tried
// on both parts: "object=k&pin-value=…" is a valid path attribute whose
// value would otherwise carry the PIN into the object label.
func refusePINAttributes(raw string, n FieldNames) error {
	attrs := strings.FieldsFunc(raw, func(r rune) bool { return r == ';' || r == '&' || r == '?' })
	for _, attr := range attrs {
		name, _, _ := strings.Cut(attr, "=")
		if unescaped, err := url.PathUnescape(name); err == nil {
			name = unescaped
		}
		switch strings.TrimPrefix(strings.ToLower(strings.TrimSpace(name)), "pkcs11:") {
		case "pin-value":
			return fmt.Errorf("%s carries pin-value: the PIN comes from %s or %s, never from the configuration", n.of("URI"), n.of("PINEnv"), n.of("PINFile"))
		case "pin-source":
			return fmt.Errorf("%s carries pin-source: use %s instead", n.of("URI"), n.of("PINFile"))
		}
	}
	return nil
}

// countPathAttributes counts the ';'-separated attributes of a URI's path, as
// the parser splits them (it refuses a repeated attribute).
func countPathAttributes(uri string) int {
	path := strings.TrimPrefix(uri, uriScheme)
	if i := strings.IndexByte(path, '?'); i >= 0 {
		path = path[:i]
	}
	if path == "" {
		return 0
	}
	return strings.Count(path, ";") + 1
}

// envName reports whether s can name an environment variable.
func envName(s string) bool {
	for i, r := range s {
		if r != '_' && (r < 'A' || r > 'Z') && (r < 'a' || r > 'z') && (i == 0 || r < '0' || r > '9') {
			return false
		}
	}
	return s != ""
}

// pinSourceError checks how the PIN is to be found, not the PIN: exactly
// one of PINEnv and PINFile, a variable's name, an absolute path. Neither
// value is quoted: a PIN may have been typed where either belongs.
func pinSourceError(cfg *Config, n FieldNames) error {
	switch {
	case cfg.PINEnv != "" && cfg.PINFile != "":
		return fmt.Errorf("both %s and %s set: choose one", n.of("PINEnv"), n.of("PINFile"))
	case cfg.PINEnv != "":
		if !envName(cfg.PINEnv) {
			return fmt.Errorf("%s is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)", n.of("PINEnv"))
		}
	case cfg.PINFile != "":
		if !filepath.IsAbs(cfg.PINFile) {
			return fmt.Errorf("%s is not an absolute path", n.of("PINFile"))
		}
	default:
		return fmt.Errorf("no PIN source: set %s or %s (a PIN is never taken from the configuration text)", n.of("PINEnv"), n.of("PINFile"))
	}
	return nil
}

// ErrPINSource: the configured PIN source gave no PIN to present (the
// variable unset or empty; the file missing, unreadable, empty, or open
// to others). The token was never asked, so it is not a refused PIN
// (providers.ErrPINIncorrect); nor will a retry help: the agent's
// environment or the file must change first.
var ErrPINSource = errors.New("no usable PIN")

// readPIN fetches the PIN from the one configured source. Errors wrap
// ErrPINSource and name the source, never the content.
func readPIN(cfg *Config, log *zap.Logger) (string, error) {
	if err := pinSourceError(cfg, nil); err != nil {
		return "", fmt.Errorf("%w: %w", ErrPINSource, err)
	}
	switch {
	case cfg.PINEnv != "":
		v, ok := os.LookupEnv(cfg.PINEnv)
		if !ok || v == "" {
			return "", fmt.Errorf("%w: environment variable %s is unset or empty", ErrPINSource, cfg.PINEnv)
		}
		return v, nil
	default:
		// The file's own checks are made on the file opened, but whoever
		// may write a directory on its path can put another file there
		// that passes them (a link to another of the agent's or root's
		// private files), which the agent would present as the PIN: a
		// failed login at each start, toward the token's lockout. A name
		// missing from a trusted directory is left to the read to report.
		if _, err := providers.TrustedPath(cfg.PINFile); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("%w: PIN file %s: %w", ErrPINSource, cfg.PINFile, err)
		}
		b, perm, err := providers.ReadPrivateFile(cfg.PINFile)
		if err != nil {
			return "", fmt.Errorf("%w: PIN file: %w", ErrPINSource, err)
		}
		if perm&0o040 != 0 {
			log.Info("PIN file is readable by its group", zap.String("file", cfg.PINFile), zap.Stringer("mode", perm))
		}
		b = bytes.TrimSuffix(b, []byte("\n"))
		b = bytes.TrimSuffix(b, []byte("\r"))
		if len(b) == 0 {
			return "", fmt.Errorf("%w: PIN file %s is empty", ErrPINSource, cfg.PINFile)
		}
		return string(b), nil
	}
}
