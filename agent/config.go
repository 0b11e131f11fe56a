package agent

import (
	"bytes"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/url"
	"os"
	"os/user"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/sigil-agent/sigil/agent/rotation"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
)

//go:embed default.yaml
var defaultConfigYAML []byte

// DefaultConfigYAML is the embedded default configuration, for `sigil agent
// --print-default-config` and the docs.
func DefaultConfigYAML() []byte { return append([]byte(nil), defaultConfigYAML...) }

// Config is the agent's whole configuration. Zero values mean "the default";
// EnsureDefaults fills them in one place.
type Config struct {
	// Socket is the Unix socket path (default proto.DefaultSocketPath()).
	Socket string `yaml:"socket"`
	// DataDir holds software keys and, later, the journal (default
	// $XDG_STATE_HOME/sigil, else ~/.local/state/sigil).
	DataDir string `yaml:"data_dir"`
	// DefaultKey answers requests that name no key.
	DefaultKey string `yaml:"default_key"`
	// TCP, when Listen is set, adds a mutual-TLS listener.
	TCP     TCPConfig     `yaml:"tcp"`
	Journal JournalConfig `yaml:"journal"`
	// Policy is a policy file or directory (docs/policy.md). Without one the
	// agent is single-tenant: its socket's owner and root use every key.
	Policy string `yaml:"policy"`
	// AdminSocket serves the admin role (pause, resume, reload); default
	// admin.sock beside Socket.
	AdminSocket string `yaml:"admin_socket"`
	// Rotation: calendars and defaults (docs/rotation.md).
	Rotation RotationConfig `yaml:"rotation"`
	// AdminHTTP serves /metrics, /healthz and /readyz (off by default).
	AdminHTTP AdminHTTPConfig `yaml:"admin_http"`
	// SSHAgentSocket, when set, also serves the OpenSSH agent protocol
	// there (SSH_AUTH_SOCK), through the same tenants, policies and journal.
	SSHAgentSocket string `yaml:"ssh_agent_socket"`
	// SSHKeys limits what the ssh-agent socket lists and signs with (slot
	// names with a policy, key names without); empty: every key the peer
	// may use.
	SSHKeys []string `yaml:"ssh_keys"`
	// Certificates names an X.509 certificate (PEM file) for a key, by key
	// name; clients list it with the key (the PKCS#11 front shows it as a
	// certificate object). Its public key must be the key's.
	// Reload reads this map again from the file, so certificates can be
	// added, renewed or removed without a restart.
	Certificates map[string]string `yaml:"certificates"`
	Log          LogConfig         `yaml:"log"`
	Limits       Limits            `yaml:"limits"`
	Runtime      RuntimeConfig     `yaml:"runtime"`
	Providers    []ProviderSpec    `yaml:"providers"`

	// source is the file LoadConfig read, empty for a config built in
	// code or the embedded default.
	source string
}

// LogConfig chooses the zap logger.
type LogConfig struct {
	Level  string `yaml:"level"`  // debug, info (default), warn, error
	Format string `yaml:"format"` // console (default) or json
}

// DefaultGCPercent is the agent's garbage-collection target when neither
// runtime.gc_percent nor GOGC names one. Go's own default (100) collects
// about 40 times a second at 8 busy connections with software ECDSA keys,
// whose signing allocates about 7 KB a signature over a live heap of 3 MB;
// 400 gave those keys 8-17% more signatures per second for about 12 MB more
// memory (docs/performance.md, "The garbage collector").
const DefaultGCPercent = 400

// RuntimeConfig tunes the Go runtime the agent runs on.
type RuntimeConfig struct {
	// GCPercent is the garbage collector's target, as GOGC: the heap may
	// grow this many percent over the live heap before a collection.
	// Default DefaultGCPercent. Applied at start (a reload does not change
	// it). GOGC in the agent's environment, when set, wins over it;
	// GOMEMLIMIT sets a memory limit as for any Go program.
	GCPercent int `yaml:"gc_percent"`
}

// Limits bound what one client can make the agent do.
type Limits struct {
	MaxFrame           int           `yaml:"max_frame"`              // bytes, default proto.DefaultMaxFrame
	MaxInFlightPerConn int           `yaml:"max_in_flight_per_conn"` // default 64; the reader stops reading beyond it
	RequestTimeout     time.Duration `yaml:"request_timeout"`        // default 5s; a client may ask for less
	WriteTimeout       time.Duration `yaml:"write_timeout"`          // default 10s; a client that does not read is dropped
	ShutdownGrace      time.Duration `yaml:"shutdown_grace"`         // default 10s for in-flight requests on SIGTERM

	// Connections: beyond these a new connection gets one UNAVAILABLE
	// reply (id 0) and is closed. A tenant is the policy's tenant, or
	// without a policy the peer (Unix uid, client certificate identity).
	// The admin socket is exempt, so an operator can always get in.
	MaxConns          int `yaml:"max_conns"`            // default 4096
	MaxConnsPerTenant int `yaml:"max_conns_per_tenant"` // default 1024
	// MaxHandshakes bounds the TCP connections still in their TLS
	// handshake, whose peers are not identified yet and so count against
	// no tenant: past it a new one is closed at once. It keeps a peer
	// without a certificate from holding sockets (each for up to
	// tcp.handshake_timeout) until the agent runs out of file descriptors.
	MaxHandshakes int `yaml:"max_handshakes"` // default 256
	// MaxInFlightPerTenant bounds the Sign and Verify requests of one
	// tenant being worked on at once, over all its connections, so that a
	// tenant flooding cannot starve the others of provider sessions and
	// CPU. Past it the tenant's requests wait (at most their deadline).
	MaxInFlightPerTenant int `yaml:"max_in_flight_per_tenant"` // default 32
	// FrameTimeout is how long a frame may take to arrive once its first
	// byte has (slow-loris), and how long a new connection may take to say
	// Hello. Default 10s.
	FrameTimeout time.Duration `yaml:"frame_timeout"`
	// IdleTimeout closes a connection with nothing in flight that sent
	// nothing for this long. Default 0: never, since services and
	// ssh-agent-style holders keep one connection for their lifetime.
	IdleTimeout time.Duration `yaml:"idle_timeout"`
}

// ProviderSpec configures one provider. Type selects which fields apply
// (providerSettings); Validate refuses the others.
type ProviderSpec struct {
	ID   string `yaml:"id"`
	Type string `yaml:"type"` // software | pkcs11 | gcpkms | awskms | azurekv

	// software
	Dir string `yaml:"dir"` // default DataDir/keys/<id>

	// pkcs11
	Module      string `yaml:"module"`
	TokenLabel  string `yaml:"token_label"`
	TokenSerial string `yaml:"token_serial"`
	Slot        *uint  `yaml:"slot"`
	PINEnv      string `yaml:"pin_env"`
	PINFile     string `yaml:"pin_file"`
	Sessions    int    `yaml:"sessions"`
	// Instances loads the module this many times (SoftHSM2: 2); see
	// docs/pkcs11.md, "Module instances".
	Instances int `yaml:"module_instances"`

	// gcpkms: the key ring; credentials come from the Google SDK's default
	// chain (workload identity, GOOGLE_APPLICATION_CREDENTIALS), never from
	// this file.
	Project  string        `yaml:"project"`
	Location string        `yaml:"location"`
	KeyRing  string        `yaml:"key_ring"`
	Endpoint string        `yaml:"endpoint"` // default: the public endpoint
	Timeout  time.Duration `yaml:"timeout"`  // per call, default 2s
	// InsecureEndpoint talks plaintext gRPC without credentials to
	// Endpoint: for emulators and tests on loopback only.
	InsecureEndpoint bool `yaml:"insecure_endpoint"`

	// awskms: the region (credentials from the AWS SDK's default chain);
	// endpoint above overrides the regional one (VPC endpoints, emulators).
	Region string `yaml:"region"`

	// azurekv: the vault (credentials from azidentity's default chain).
	VaultURL string `yaml:"vault_url"`
	// DisableChallengeResourceVerification lets a vault reached by a name
	// outside its cloud's domain (an emulator on loopback, a custom DNS
	// name) be challenged for https://vault.azure.net; see
	// azurekv.Config and docs/cloudkms.md.
	DisableChallengeResourceVerification bool `yaml:"disable_challenge_resource_verification"`

	Keys []KeySpec `yaml:"keys"`
}

// KeySpec is one key of a provider: software keys by type, PKCS#11 keys by URI.
type KeySpec struct {
	Name string `yaml:"name"`
	Type string `yaml:"type"` // software: ecdsa-p256, ecdsa-p384, rsa-2048, rsa-3072, rsa-4096, ed25519
	URI  string `yaml:"uri"`  // pkcs11: RFC 7512, e.g. pkcs11:token=prod;object=release
	// gcpkms: the crypto key's id in the key ring, and its version: a
	// number, or "latest" (the highest enabled version, resolved at start).
	// azurekv: the key's name in the vault and its version ("" = current).
	Key     string `yaml:"key"`
	Version string `yaml:"version"`
	// awskms: key id, key ARN or alias/NAME.
	KeyID string `yaml:"key_id"`
}

// LoadConfig reads and validates a YAML configuration file. Errors name the
// file and, for YAML faults and unknown fields, the line.
func LoadConfig(path string) (Config, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("config: %w", err)
	}
	cfg, err := ParseConfig(raw)
	if err != nil {
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	cfg.source = path
	return cfg, nil
}

// DefaultConfig is the embedded default, parsed.
func DefaultConfig() Config {
	cfg, err := ParseConfig(defaultConfigYAML)
	if err != nil {
		panic("embedded default config is invalid: " + err.Error()) // caught by tests
	}
	return cfg
}

// ParseConfig parses YAML, refusing unknown fields (a typo must not silently
// drop a setting), and validates the result.
func ParseConfig(raw []byte) (Config, error) {
	var cfg Config
	dec := yaml.NewDecoder(bytes.NewReader(raw))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil {
		return Config{}, err
	}
	// A second document (two files concatenated, each opening with
	// "---") would go unread, policy: included: single-tenant mode.
	var more yaml.Node
	if err := dec.Decode(&more); !errors.Is(err, io.EOF) {
		return Config{}, errors.New("the config holds more than one YAML document (a second \"---\"): merge them into one")
	}
	// "unix:PATH" is how SIGIL_SOCK and --socket may name a socket, and
	// the path alone is meant here too: kept, it became a relative path
	// beginning "unix:".
	for _, path := range []*string{&cfg.Socket, &cfg.AdminSocket, &cfg.SSHAgentSocket} {
		*path = strings.TrimPrefix(*path, "unix:")
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

// EnsureDefaults fills every unset field with its default.
func (c *Config) EnsureDefaults() {
	if c.Socket == "" {
		c.Socket = proto.DefaultSocketPath()
	}
	if c.DataDir == "" {
		c.DataDir = defaultDataDir()
	}
	if c.AdminSocket == "" {
		c.AdminSocket = filepath.Join(filepath.Dir(c.Socket), "admin.sock")
	}
	if c.Log.Level == "" {
		c.Log.Level = "info"
	}
	if c.Log.Format == "" {
		c.Log.Format = "console"
	}
	if c.Runtime.GCPercent == 0 {
		c.Runtime.GCPercent = DefaultGCPercent
	}
	l := &c.Limits
	if l.MaxFrame == 0 {
		l.MaxFrame = proto.DefaultMaxFrame
	}
	if l.MaxInFlightPerConn == 0 {
		l.MaxInFlightPerConn = 64
	}
	if l.RequestTimeout == 0 {
		l.RequestTimeout = 5 * time.Second
	}
	if l.WriteTimeout == 0 {
		l.WriteTimeout = 10 * time.Second
	}
	if l.ShutdownGrace == 0 {
		l.ShutdownGrace = 10 * time.Second
	}
	if l.MaxConns == 0 {
		l.MaxConns = 4096
	}
	if l.MaxConnsPerTenant == 0 {
		l.MaxConnsPerTenant = 1024
	}
	if l.MaxHandshakes == 0 {
		l.MaxHandshakes = 256
	}
	if l.MaxInFlightPerTenant == 0 {
		l.MaxInFlightPerTenant = 32
	}
	if l.FrameTimeout == 0 {
		l.FrameTimeout = 10 * time.Second
	}
	if c.TCP.HandshakeTimeout == 0 {
		c.TCP.HandshakeTimeout = 10 * time.Second
	}
	for i := range c.Providers {
		p := &c.Providers[i]
		if p.Type == "software" && p.Dir == "" {
			p.Dir = filepath.Join(c.DataDir, "keys", p.ID)
		}
	}
}

// isLoopbackEndpoint reports whether endpoint is host:port on loopback.
func isLoopbackEndpoint(endpoint string) bool {
	host, _, err := net.SplitHostPort(endpoint)
	return err == nil && isLoopbackHost(host)
}

// isLoopbackHost reports whether host (no port) is this machine's loopback.
func isLoopbackHost(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// defaultDataDir is $XDG_STATE_HOME/sigil, else ~/.local/state/sigil, the
// home taken from $HOME or else the user database; "" when there is none
// (New then asks for data_dir). Never a shared directory such as
// /tmp: another user could make the path first, and a tmp cleaner would
// delete the keys.
func defaultDataDir() string {
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "sigil")
	}
	home, err := os.UserHomeDir()
	if err != nil {
		if u, uerr := user.Current(); uerr == nil && u.HomeDir != "" {
			home, err = u.HomeDir, nil
		}
	}
	if err != nil {
		return ""
	}
	return filepath.Join(home, ".local", "state", "sigil")
}

// Validate checks the configuration's consistency without touching providers.
func (c *Config) Validate() error {
	var errs []error
	if c.Limits.MaxFrame < 0 || c.Limits.MaxFrame > 16<<20 {
		errs = append(errs, fmt.Errorf("limits.max_frame %d: want 1..16 MiB", c.Limits.MaxFrame))
	}
	for _, l := range []struct {
		name string
		v    int
	}{
		{"max_in_flight_per_conn", c.Limits.MaxInFlightPerConn},
		{"max_conns", c.Limits.MaxConns},
		{"max_conns_per_tenant", c.Limits.MaxConnsPerTenant},
		{"max_handshakes", c.Limits.MaxHandshakes},
		{"max_in_flight_per_tenant", c.Limits.MaxInFlightPerTenant},
	} {
		if l.v < 0 {
			errs = append(errs, fmt.Errorf("limits.%s %d: negative", l.name, l.v))
		}
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"limits.frame_timeout", c.Limits.FrameTimeout},
		{"limits.idle_timeout", c.Limits.IdleTimeout},
		{"limits.request_timeout", c.Limits.RequestTimeout},
		{"limits.write_timeout", c.Limits.WriteTimeout},
		{"limits.shutdown_grace", c.Limits.ShutdownGrace},
		{"tcp.handshake_timeout", c.TCP.HandshakeTimeout},
		{"rotation.overlap", c.Rotation.Overlap},
		{"rotation.retry_after", c.Rotation.RetryAfter},
	} {
		// A negative duration would fail every request, reply, handshake
		// or shutdown at once, not mean "none".
		if d.v < 0 {
			errs = append(errs, fmt.Errorf("%s %s: negative", d.name, d.v))
		}
	}
	if d := c.Rotation.RetryAfter; d > 0 && d < time.Minute {
		errs = append(errs, fmt.Errorf("rotation.retry_after %s: at least 1m (a failing rotation retried in a loop)", d))
	}
	if n := c.Rotation.Canaries; n < 0 || n > rotation.MaxCanaries {
		errs = append(errs, fmt.Errorf("rotation.canaries %d: want 1..%d (0: the default, %d)", n, rotation.MaxCanaries, rotation.DefaultCanaries))
	}
	if c.Runtime.GCPercent < 0 || c.Runtime.GCPercent > 10000 {
		errs = append(errs, fmt.Errorf("runtime.gc_percent %d: want 1..10000 (GOGC=off in the environment turns the collector off)", c.Runtime.GCPercent))
	}
	switch c.Log.Level {
	case "", "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("log.level %q: want debug, info, warn or error", c.Log.Level))
	}
	switch c.Log.Format {
	case "", "console", "json":
	default:
		errs = append(errs, fmt.Errorf("log.format %q: want console or json", c.Log.Format))
	}
	if err := c.TCP.validate(); err != nil {
		errs = append(errs, err)
	}
	if err := c.Journal.validate(); err != nil {
		errs = append(errs, err)
	}
	if err := c.AdminHTTP.validate(); err != nil {
		errs = append(errs, err)
	}
	ids := map[string]bool{}
	names := map[string]string{}
	for i, p := range c.Providers {
		where := fmt.Sprintf("providers[%d]", i)
		if p.ID == "" {
			errs = append(errs, fmt.Errorf("%s: id is required", where))
		} else if ids[p.ID] {
			errs = append(errs, fmt.Errorf("%s: id %q used twice", where, p.ID))
		}
		ids[p.ID] = true
		switch p.Type {
		case "software":
			if defaulted := p.Dir == "" || p.Dir == filepath.Join(c.DataDir, "keys", p.ID); defaulted && p.ID != "" &&
				(!filepath.IsLocal(p.ID) || filepath.Clean(p.ID) == ".") {
				// The default dir would be outside DATA_DIR/keys (the journal's
				// directory, the data dir, a parent made 0700) or keys/ itself.
				errs = append(errs, fmt.Errorf("%s: id %q cannot name a directory under data_dir/keys: use another id, or set dir", where, p.ID))
			}
			for j, k := range p.Keys {
				if !knownKeyType(k.Type) {
					errs = append(errs, fmt.Errorf("%s.keys[%d] %q: type %q: want one of %v", where, j, k.Name, k.Type, providers.KeyTypes))
				}
			}
		case "pkcs11":
			// What the provider refuses at open without its module, by
			// its own check: --check and a start must not disagree.
			errs = append(errs, pkcs11ConfigErrors(where, p)...)
		case "gcpkms":
			if p.Project == "" || p.Location == "" || p.KeyRing == "" {
				errs = append(errs, fmt.Errorf("%s: gcpkms needs project, location and key_ring", where))
			}
			if p.InsecureEndpoint && !isLoopbackEndpoint(p.Endpoint) {
				// Plaintext and no credentials: an emulator on this machine only.
				errs = append(errs, fmt.Errorf("%s: insecure_endpoint needs an endpoint on loopback (localhost or 127.0.0.1/::1 with a port), not %q", where, p.Endpoint))
			}
			for j, k := range p.Keys {
				if k.Key == "" || k.Version == "" {
					errs = append(errs, fmt.Errorf("%s.keys[%d] %q: gcpkms keys need key and version (a number or latest)", where, j, k.Name))
				} else if p.Project != "" && p.Location != "" && p.KeyRing != "" {
					// What the provider refuses at open, by its own check.
					if err := gcpkmsKey(p, k).Validate(); err != nil {
						errs = append(errs, fmt.Errorf("%s.keys[%d] %q: project, location, key_ring, key and version make the key's resource name, so none may contain \"/\": %w", where, j, k.Name, err))
					}
				}
			}
		case "awskms":
			if p.Region == "" {
				errs = append(errs, fmt.Errorf("%s: awskms needs region", where))
			}
			if p.Endpoint != "" {
				// Signed requests and the public keys the agent then trusts,
				// in clear: an emulator on this machine only. Judged on the
				// URL as the SDK reads it (scheme in any case, the host
				// after any userinfo).
				u, err := url.Parse(p.Endpoint)
				switch {
				case err != nil || u.Host == "" || (!strings.EqualFold(u.Scheme, "http") && !strings.EqualFold(u.Scheme, "https")):
					errs = append(errs, fmt.Errorf("%s: endpoint: want an http(s)://host[:port] URL", where))
				case u.User != nil:
					// Not quoted: the user information may be a credential.
					errs = append(errs, fmt.Errorf("%s: endpoint: no user information in the URL", where))
				case strings.EqualFold(u.Scheme, "http") && !isLoopbackHost(u.Hostname()):
					errs = append(errs, fmt.Errorf("%s: an http:// endpoint must be on loopback (localhost or 127.0.0.1/::1 with a port), not %q; use https://", where, u.Host))
				}
			}
			for j, k := range p.Keys {
				if k.KeyID == "" {
					errs = append(errs, fmt.Errorf("%s.keys[%d] %q: awskms keys need key_id (id, ARN or alias/NAME)", where, j, k.Name))
				}
			}
		case "azurekv":
			if !strings.HasPrefix(p.VaultURL, "https://") {
				errs = append(errs, fmt.Errorf("%s: azurekv needs vault_url (https://NAME.vault.azure.net)", where))
			}
			for j, k := range p.Keys {
				if k.Key == "" {
					errs = append(errs, fmt.Errorf("%s.keys[%d] %q: azurekv keys need key (and optionally version)", where, j, k.Name))
				}
			}
		default:
			errs = append(errs, fmt.Errorf("%s: type %q: want software, pkcs11, gcpkms, awskms or azurekv", where, p.Type))
		}
		errs = append(errs, settingTypeErrors(where, p)...)
		for j, k := range p.Keys {
			if k.Name == "" {
				errs = append(errs, fmt.Errorf("%s.keys[%d]: name is required", where, j))
				continue
			}
			if other, dup := names[k.Name]; dup {
				errs = append(errs, fmt.Errorf("%s.keys[%d]: key name %q also used by provider %q", where, j, k.Name, other))
			}
			names[k.Name] = p.ID
		}
	}
	if c.DefaultKey != "" {
		if _, ok := names[c.DefaultKey]; !ok {
			errs = append(errs, fmt.Errorf("default_key %q: no such key", c.DefaultKey))
		}
	}
	// Calendars are parsed here too, so `sigil agent --check` and a reload
	// refuse a bad one instead of the scheduler at start.
	for _, slot := range slices.Sorted(maps.Keys(c.Rotation.Calendars)) {
		if _, _, err := rotation.SplitSlot(slot); err != nil {
			errs = append(errs, fmt.Errorf("rotation.calendars[%s]: %w", slot, err))
		}
		if _, err := c.Rotation.Calendars[slot].Parse(); err != nil {
			errs = append(errs, fmt.Errorf("rotation.calendars[%s]: %w", slot, err))
		}
	}
	for _, slot := range slices.Sorted(maps.Keys(c.Rotation.Slots)) {
		if _, _, err := rotation.SplitSlot(slot); err != nil {
			errs = append(errs, fmt.Errorf("rotation.slots[%s]: %w", slot, err))
		}
	}
	// Without a policy or the journal the agent does not rotate: such a
	// calendar or slot setting would never apply, and a reload would
	// refuse it (followConfig). Refused here, --check, the start and a
	// reload agree.
	if off := rotationOffReason(c); off != "" {
		if len(c.Rotation.Calendars) > 0 {
			errs = append(errs, fmt.Errorf("rotation.calendars: %s", off))
		}
		if len(c.Rotation.Slots) > 0 {
			errs = append(errs, fmt.Errorf("rotation.slots: %s", off))
		}
	}
	return errors.Join(errs...)
}

// providerTypes are the provider types, in the order messages list them.
var providerTypes = []string{"software", "pkcs11", "gcpkms", "awskms", "azurekv"}

// providerSettings are the settings each provider type takes, named as the
// config file names them (ProviderSpec's yaml tags), besides id, type and
// keys; keySettings those its keys take (KeySpec's), besides name. Each
// opener (openProvider) reads these and no others. ProviderSpec is one
// struct for every type, so a setting of another type would be ignored:
// settingTypeErrors refuses it.
var (
	providerSettings = map[string][]string{
		"software": {"dir"},
		"pkcs11":   {"module", "token_label", "token_serial", "slot", "pin_env", "pin_file", "sessions", "module_instances"},
		"gcpkms":   {"project", "location", "key_ring", "endpoint", "timeout", "insecure_endpoint"},
		"awskms":   {"region", "endpoint", "timeout"},
		"azurekv":  {"vault_url", "timeout", "disable_challenge_resource_verification"},
	}
	keySettings = map[string][]string{
		"software": {"type"},
		"pkcs11":   {"uri"},
		"gcpkms":   {"key", "version"},
		"awskms":   {"key_id"},
		"azurekv":  {"key", "version"},
	}
)

// settingTypeErrors names each setting of p, and of its keys, that p's
// type does not take (a pin_file on a software provider, a key_id on a
// gcpkms key), with the types that take it. Never the value: a PIN may
// have been typed where a path was meant.
func settingTypeErrors(where string, p ProviderSpec) []error {
	if _, known := providerSettings[p.Type]; !known {
		return nil // Validate names the type
	}
	errs := wrongTypeErrors(where, p.Type, settingsSet(p, "id", "type", "keys"), providerSettings, "")
	for j, k := range p.Keys {
		errs = append(errs, wrongTypeErrors(fmt.Sprintf("%s.keys[%d] %q", where, j, k.Name), p.Type, settingsSet(k, "name"), keySettings, "keys of ")...)
	}
	return errs
}

// wrongTypeErrors is an error for each of set that typ does not take
// under takes, naming the types that do.
func wrongTypeErrors(where, typ string, set []string, takes map[string][]string, whose string) []error {
	var errs []error
	for _, name := range set {
		if slices.Contains(takes[typ], name) {
			continue
		}
		var takers []string
		for _, t := range providerTypes {
			if slices.Contains(takes[t], name) {
				takers = append(takers, t)
			}
		}
		errs = append(errs, fmt.Errorf("%s: %s is for %s%s providers, not %s", where, name, whose, wordList(takers), typ))
	}
	return errs
}

// settingsSet names the fields of spec (a ProviderSpec or KeySpec) that
// are set, by their yaml tags, except those in skip.
func settingsSet(spec any, skip ...string) []string {
	v := reflect.ValueOf(spec)
	var set []string
	for i := range v.NumField() {
		name, _, _ := strings.Cut(v.Type().Field(i).Tag.Get("yaml"), ",")
		if name != "" && !slices.Contains(skip, name) && !v.Field(i).IsZero() {
			set = append(set, name)
		}
	}
	return set
}

// wordList is "a", "a and b", "a, b and c".
func wordList(words []string) string {
	if len(words) <= 1 {
		return strings.Join(words, "")
	}
	return strings.Join(words[:len(words)-1], ", ") + " and " + words[len(words)-1]
}

// rotationOffReason says why the agent will not rotate keys under c: ""
// when it will.
func rotationOffReason(c *Config) string {
	switch {
	case c.Policy == "":
		return "rotation needs a policy file (its slots are defined there), and the config names none"
	case c.Journal.Mode == "off":
		return "rotation needs the audit journal (its state is kept there), and journal.mode is off"
	}
	return ""
}

func knownKeyType(t string) bool {
	for _, kt := range providers.KeyTypes {
		if string(kt) == t {
			return true
		}
	}
	return false
}
