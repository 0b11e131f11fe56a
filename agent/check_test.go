package agent_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/agent/rotation"
	"github.com/sigil-agent/sigil/providers/pkcs11/softhsmtest"
)

// A rotation calendar for a slot the policy lacks (a typo) would never
// rotate, silently: `sigil agent --check`, which systemctl reload runs
// first, refuses it, as it does a calendar without any policy.
func TestCheckFilesRefusesCalendarsForUnknownSlots(t *testing.T) {
	policyFile := releaseSlotPolicy(t)
	month := rotation.CalendarConfig{Period: "720h"}
	for _, tc := range []struct {
		name      string
		policy    string
		calendars map[string]rotation.CalendarConfig
		want      string // "" when valid
	}{
		{"known slot", policyFile, map[string]rotation.CalendarConfig{"payments/release": month}, ""},
		{"mistyped slot", policyFile, map[string]rotation.CalendarConfig{"payments/release": month, "payments/relase": month}, "rotation.calendars[payments/relase]"},
		{"unknown tenant", policyFile, map[string]rotation.CalendarConfig{"billing/release": month}, "rotation.calendars[billing/release]"},
		{"no policy", "", map[string]rotation.CalendarConfig{"payments/release": month}, "needs a policy file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := softwareConfig(t)
			cfg.Policy = tc.policy
			cfg.Rotation.Calendars = tc.calendars
			err := errors.Join(cfg.Validate(), agent.CheckFiles(cfg)) // as --check runs them
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("got %v, want an error naming %q", err, tc.want)
			}
			if tc.want != "" && strings.Contains(err.Error(), "payments/release]") {
				t.Errorf("the valid calendar was named too: %v", err)
			}
		})
	}
}

// What a provider refuses at start without touching its device or service
// (a key URI carrying a PIN, a relative pin_file, a pin_env that cannot
// name a variable, a token named twice, a Cloud KMS resource id with a
// "/") is refused by the config's validation, which `sigil agent --check`,
// LoadConfig and agent.New all run: --check used to call such a config
// valid, and the agent then failed to start with INTERNAL. The error names
// the setting as the config file spells it, and never echoes what may be a
// PIN (a pin-value, a PIN typed as pin_file or pin_env).
func TestConfigRefusesWhatProvidersRefuseAtStart(t *testing.T) {
	hsm := func(settings string, uris ...string) string {
		y := "providers:\n  - id: hsm\n    type: pkcs11\n    module: /usr/lib/softhsm/libsofthsm2.so\n" + settings + "    keys:\n"
		for i, uri := range uris {
			y += fmt.Sprintf("      - {name: key%d, uri: %q}\n", i, uri)
		}
		return y
	}
	const token, pin = "    token_label: prod\n", "    pin_env: SIGIL_PIN\n"
	gcp := func(project, key, version string) string {
		return fmt.Sprintf("providers:\n  - id: gcp\n    type: gcpkms\n    project: %q\n    location: global\n    key_ring: ring\n    keys:\n      - {name: k, key: %q, version: %q}\n", project, key, version)
	}
	for _, tc := range []struct {
		name   string
		yaml   string
		want   string // "" when valid
		secret string // never in the error
	}{
		{"valid pkcs11", hsm(token+pin, "pkcs11:object=release"), "", ""},
		{"valid pkcs11, token in the uri", hsm(pin, "pkcs11:token=prod;object=release"), "", ""},
		{"pin_file not absolute", hsm(token+"    pin_file: s3cr3t-pin\n", "pkcs11:object=release"), "pin_file is not an absolute path", "s3cr3t-pin"},
		{"pin_env not a variable name", hsm(token+"    pin_env: \"12-34!56\"\n", "pkcs11:object=release"), "pin_env is not an environment variable name", "12-34!56"},
		{"pin-value in a key's uri", hsm(token+pin, "pkcs11:object=release?pin-value=s3cr3t-pin"), `key "key0": uri carries pin-value`, "s3cr3t-pin"},
		{"pin-value in a key's uri path", hsm(token+pin, "pkcs11:object=release;pin-value=s3cr3t-pin"), `key "key0": uri carries pin-value`, "s3cr3t-pin"},
		{"pin-source in a key's uri", hsm(token+pin, "pkcs11:object=release?pin-source=file:/etc/pin"), "uri carries pin-source: use pin_file", "/etc/pin"},
		{"both pin_env and pin_file", hsm(token+pin+"    pin_file: /etc/sigil/pin\n", "pkcs11:object=release"), "both pin_env and pin_file", ""},
		{"no PIN source", hsm(token, "pkcs11:object=release"), "pin_env or pin_file", ""},
		{"token named twice", hsm(token+"    token_serial: \"42\"\n"+pin, "pkcs11:object=release"), "one of token_label, token_serial or slot", ""},
		{"no token named", hsm(pin, "pkcs11:object=release"), "set token_label, token_serial or slot", ""},
		{"a uri naming another token", hsm(token+pin, "pkcs11:token=test;object=release"), "one provider serves one token", ""},
		{"a uri naming no object", hsm(token+pin, "pkcs11:token=prod"), `key "key0": uri names no object`, ""},
		{"a uri with an unknown attribute", hsm(token+pin, "pkcs11:object=release;objet=x"), "unknown path attribute", ""},
		{"two keys, one object", hsm(token+pin, "pkcs11:object=release", "pkcs11:object=release"), `keys "key0" and "key1" name the same object`, ""},
		{"a uri with another module-path", hsm(token+pin, "pkcs11:object=release?module-path=/usr/lib/other.so"), "module-path", ""},
		{"valid gcpkms", gcp("p", "release", "latest"), "", ""},
		{"valid gcpkms version", gcp("p", "release", "3"), "", ""},
		{"a gcpkms project with a slash", gcp("p/q", "release", "3"), `providers[0].keys[0] "k": project, location, key_ring, key and version`, ""},
		{"a gcpkms key with a slash", gcp("p", "release/x", "latest"), `providers[0].keys[0] "k": project, location, key_ring, key and version`, ""},
		{"a gcpkms version with a slash", gcp("p", "release", "3/4"), `providers[0].keys[0] "k": project, location, key_ring, key and version`, ""},
		{"too many module instances", hsm(token+pin+"    module_instances: 17\n", "pkcs11:object=release"), "module_instances 17", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := agent.ParseConfig([]byte(tc.yaml))
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want == "":
				return
			case err == nil:
				t.Fatalf("accepted; want it refused naming %q", tc.want)
			case !strings.Contains(err.Error(), tc.want):
				t.Fatalf("%v\nwant it to say %q", err, tc.want)
			case tc.secret != "" && strings.Contains(err.Error(), tc.secret):
				t.Fatalf("%v\nechoes %q", err, tc.secret)
			}
			for _, goName := range []string{"PINFile", "PINEnv", "TokenLabel", "TokenSerial", "Instances", "URI"} {
				if strings.Contains(err.Error(), goName) {
					t.Errorf("%v\nnames the Go field %s, not the config's setting", err, goName)
				}
			}
		})
	}
}

// A rotation.slots entry that cannot take effect is refused by `sigil agent
// --check` (LoadConfig's validation, then CheckFiles), as a calendar is: a
// next_key that names no configured key, a slot not named tenant/slot or
// one the policy lacks. A next_key typo used to pass --check and the start;
// every rotation of the slot then failed, with nothing in the journal. The
// start refuses a next_key no provider serves too (it knows the keys of
// providers an embedder adds), and warns of a slot the policy lacks, as of
// a calendar's.
func TestCheckRefusesRotationSlotsThatCannotTakeEffect(t *testing.T) {
	policyFile := releaseSlotPolicy(t)
	subject := agent.SubjectConfig{CommonName: "release signing"}
	for _, tc := range []struct {
		name         string
		slots        map[string]agent.SlotRotation
		want         string // "" when valid
		startRefuses bool
	}{
		{"next_key served", map[string]agent.SlotRotation{"payments/release": {NextKey: "p384"}}, "", false},
		{"a subject", map[string]agent.SlotRotation{"payments/release": {Subject: subject}}, "", false},
		{"next_key names no key", map[string]agent.SlotRotation{"payments/release": {NextKey: "nosuchkey"}},
			`rotation.slots[payments/release].next_key "nosuchkey"`, true},
		{"a slot the policy lacks", map[string]agent.SlotRotation{"payments/relase": {Subject: subject}},
			"rotation.slots[payments/relase]: the policy has no such slot", false},
		{"a slot not named tenant/slot", map[string]agent.SlotRotation{"release": {Subject: subject}},
			"rotation.slots[release]", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := softwareConfig(t)
			cfg.DefaultKey = ""
			cfg.Policy = policyFile
			cfg.Rotation.Slots = tc.slots
			err := errors.Join(cfg.Validate(), agent.CheckFiles(cfg))
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("--check: %v, want an error naming %q", err, tc.want)
			}
			a, err := agent.New(context.Background(), cfg, zap.NewNop())
			if err == nil {
				defer a.Shutdown(context.Background())
			}
			switch {
			case tc.startRefuses && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("start: %v, want it refused naming %q", err, tc.want)
			case !tc.startRefuses && err != nil:
				t.Fatalf("start refused: %v", err)
			}
		})
	}
}

// A policy slot whose key (or a listed version's key) no configured
// provider serves is refused by the start; `sigil agent --check` used to
// pass it, so `systemctl reload` signalled an agent that then refused the
// policy, and the next restart failed. Both now refuse it in the same
// words, naming each such key once.
func TestCheckRefusesSlotsNamingUnservedKeys(t *testing.T) {
	for _, tc := range []struct {
		name  string
		slot  string
		wants []string // each in both errors; none when valid
	}{
		{"a served key", "{name: release, key: default}", nil},
		{"served versions", "{name: release, versions: [{version: 1, key: default}, {version: 2, key: p384}]}", nil},
		{"an unserved key", "{name: release, key: nosuchkey}",
			[]string{`policy: slot payments/release: key "nosuchkey" is not served by any provider`}},
		{"an unserved older version", "{name: release, versions: [{version: 1, key: gone}, {version: 2, key: default}]}",
			[]string{`policy: slot payments/release: key "gone" is not served by any provider`}},
		{"two unserved versions", "{name: release, versions: [{version: 1, key: gone}, {version: 2, key: nosuchkey}]}",
			[]string{`key "gone" is not served`, `key "nosuchkey" is not served`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := softwareConfig(t)
			cfg.Policy = filepath.Join(t.TempDir(), "policy.yaml")
			policyYAML := fmt.Sprintf("tenants:\n  - name: payments\n    identities: {unix_uids: [%d]}\n    slots:\n      - %s\n", os.Getuid(), tc.slot)
			if err := os.WriteFile(cfg.Policy, []byte(policyYAML), 0o600); err != nil {
				t.Fatal(err)
			}
			checkErr := errors.Join(cfg.Validate(), agent.CheckFiles(cfg)) // as --check runs them
			a, startErr := agent.New(context.Background(), cfg, zap.NewNop())
			if startErr == nil {
				defer a.Shutdown(context.Background())
			}
			for what, err := range map[string]error{"--check": checkErr, "start": startErr} {
				if len(tc.wants) == 0 {
					if err != nil {
						t.Errorf("%s refused: %v", what, err)
					}
					continue
				}
				if err == nil {
					t.Errorf("%s accepted it; want %q", what, tc.wants)
					continue
				}
				for _, want := range tc.wants {
					if n := strings.Count(err.Error(), want); n != 1 {
						t.Errorf("%s: %v\nsays %q %d times, want once", what, err, want, n)
					}
				}
			}
		})
	}
}

// New's errors that only an operator can cure (the config fails its
// checks, the policy fails its own or names a key no provider serves, a
// PKCS#11 PIN source gives no PIN or module path no library) are
// IsConfigError, on which `sigil agent` exits 78 and systemd does not
// restart it; they used to be INTERNAL, like a bug. One that may pass on
// another try (the journal held by an agent still stopping, a module
// whose C_Initialize fails) is not.
func TestStartFailuresThatNeedAnOperator(t *testing.T) {
	badPolicy := filepath.Join(t.TempDir(), "policy.yaml")
	if err := os.WriteFile(badPolicy, []byte("tenants: [{name: payments}]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	unservedKey := filepath.Join(t.TempDir(), "policy.yaml")
	if err := os.WriteFile(unservedKey, []byte(fmt.Sprintf("tenants:\n  - name: payments\n    identities: {unix_uids: [%d]}\n    slots:\n      - {name: release, key: nosuchkey}\n", os.Getuid())), 0o600); err != nil {
		t.Fatal(err)
	}
	const pinVar = "SIGIL_TEST_NEVER_SET_PIN"
	hsmOn := func(module, pinSource string) func(*agent.Config) {
		return func(cfg *agent.Config) {
			cfg.DefaultKey = ""
			cfg.Providers = append(cfg.Providers, agent.ProviderSpec{
				ID: "hsm", Type: "pkcs11", Module: module, TokenLabel: "prod",
				PINEnv: pinSource, Keys: []agent.KeySpec{{Name: "release", URI: "pkcs11:object=release"}},
			})
		}
	}
	hsm := func(pinSource string) func(*agent.Config) { return hsmOn("/nonexistent/libpkcs11.so", pinSource) }
	const setPIN = "SIGIL_TEST_CHECK_PIN"
	t.Setenv(setPIN, "1234")
	notELF := filepath.Join(t.TempDir(), "libnotes.so")
	if err := os.WriteFile(notELF, []byte("not a shared object\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// SoftHSM2 loads, and its C_Initialize fails without its configuration.
	const initFails = "a module whose C_Initialize fails"
	softhsm := softhsmtest.FindModule()
	t.Setenv("SOFTHSM2_CONF", filepath.Join(t.TempDir(), "absent.conf"))
	for _, tc := range []struct {
		name   string
		edit   func(*agent.Config)
		names  string // in the error
		config bool
	}{
		{"a config that fails validation", func(cfg *agent.Config) { cfg.DefaultKey = "nosuchkey" }, `default_key "nosuchkey"`, true},
		{"a policy that fails its checks", func(cfg *agent.Config) { cfg.Policy = badPolicy }, badPolicy, true},
		{"a policy slot naming a key no provider serves", func(cfg *agent.Config) { cfg.Policy = unservedKey }, `key "nosuchkey"`, true},
		{"a PIN variable unset", hsm(pinVar), pinVar, true},
		{"a module path with no file", hsmOn("/nonexistent/libpkcs11.so", setPIN), "/nonexistent/libpkcs11.so", true},
		{"a module path to no shared object", hsmOn(notELF, setPIN), notELF, true},
		{initFails, hsmOn(softhsm, setPIN), "initialize module", false},
		{"the journal held by another agent", nil, "journal", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.name == initFails && softhsm == "" {
				t.Skip("SoftHSM2 not installed")
			}
			cfg := softwareConfig(t)
			if tc.edit != nil {
				tc.edit(&cfg)
			} else {
				first, err := agent.New(context.Background(), cfg, zap.NewNop())
				if err != nil {
					t.Fatal(err)
				}
				defer first.Shutdown(context.Background())
			}
			a, err := agent.New(context.Background(), cfg, zap.NewNop())
			if err == nil {
				a.Shutdown(context.Background())
				t.Fatal("the agent started")
			}
			if !strings.Contains(err.Error(), tc.names) {
				t.Errorf("%v\ndoes not name %q", err, tc.names)
			}
			if got := agent.IsConfigError(err); got != tc.config {
				t.Errorf("IsConfigError = %v, want %v: %v", got, tc.config, err)
			}
		})
	}
}

// Rotation runs only with a policy (its slots) and the audit journal (its
// state). Calendars or slot settings without them are refused by `sigil
// agent --check` and the config's validation (so by the start and a
// reload too), naming what is missing: with `journal: {mode: off}` and a
// policy, --check passed, the start skipped rotation without a word, and
// `sigil admin reload` then refused "rotation is off in this agent", so
// `systemctl reload` failed after its pre-check passed and the slot never
// rotated. Without rotation settings such an agent starts, and says that
// rotation is off.
func TestRotationSettingsNeedRotationOn(t *testing.T) {
	policyFile := releaseSlotPolicy(t)
	calendars := map[string]rotation.CalendarConfig{"payments/release": {Period: "720h"}}
	slots := map[string]agent.SlotRotation{"payments/release": {Subject: agent.SubjectConfig{CommonName: "release signing"}}}
	for _, tc := range []struct {
		name      string
		policy    string
		journal   string
		calendars map[string]rotation.CalendarConfig
		slots     map[string]agent.SlotRotation
		want      string // "" when valid
		startLog  string // what the start logs, when valid
	}{
		{"calendars and slot settings, with a policy and the journal", policyFile, "", calendars, slots, "", ""},
		{"calendars with the journal off", policyFile, "off", calendars, nil, "rotation.calendars: rotation needs the audit journal", ""},
		{"slot settings with the journal off", policyFile, "off", nil, slots, "rotation.slots: rotation needs the audit journal", ""},
		{"calendars without a policy", "", "", calendars, nil, "rotation.calendars: rotation needs a policy file", ""},
		{"slot settings without a policy", "", "", nil, slots, "rotation.slots: rotation needs a policy file", ""},
		{"a policy with the journal off, no rotation settings", policyFile, "off", nil, nil, "", "key rotation is off"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := softwareConfig(t)
			cfg.DefaultKey = ""
			cfg.Policy, cfg.Journal.Mode = tc.policy, tc.journal
			cfg.Rotation.Calendars, cfg.Rotation.Slots = tc.calendars, tc.slots
			err := errors.Join(cfg.Validate(), agent.CheckFiles(cfg))
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("--check refused: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("--check: %v, want an error naming %q", err, tc.want)
			}
			core, logs := observer.New(zap.InfoLevel)
			a, err := agent.New(context.Background(), cfg, zap.New(core))
			if err == nil {
				defer a.Shutdown(context.Background())
			}
			switch {
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("start: %v, want it refused naming %q", err, tc.want)
			case tc.want == "" && err != nil:
				t.Fatalf("start refused: %v", err)
			case tc.startLog != "" && logs.FilterMessageSnippet(tc.startLog).Len() == 0:
				t.Fatalf("the start did not log %q", tc.startLog)
			}
		})
	}
}

// A provider's config is one struct for every type, so a setting of
// another type (pin_file or token_label on a software provider, vault_url
// on awskms, key_id on a gcpkms key) was silently ignored by --check and
// the start: the operator believed a PIN file, a token or a vault in use
// that was not. Such a setting is refused, naming it, the types that take
// it and the provider's type, never its value.
func TestConfigRefusesSettingsOfAnotherProviderType(t *testing.T) {
	const (
		soft  = "providers:\n  - id: p\n    type: software\n%s    keys:\n      - {name: k, type: ed25519%s}\n"
		hsm   = "providers:\n  - id: p\n    type: pkcs11\n    module: /usr/lib/softhsm/libsofthsm2.so\n    token_label: prod\n    pin_env: SIGIL_PIN\n    sessions: 4\n    module_instances: 2\n%s    keys:\n      - {name: k, uri: 'pkcs11:object=k'%s}\n"
		gcp   = "providers:\n  - id: p\n    type: gcpkms\n    project: pr\n    location: global\n    key_ring: ring\n    endpoint: 127.0.0.1:9999\n    insecure_endpoint: true\n    timeout: 3s\n%s    keys:\n      - {name: k, key: release, version: latest%s}\n"
		aws   = "providers:\n  - id: p\n    type: awskms\n    region: eu-west-1\n    endpoint: https://kms.example.com\n    timeout: 3s\n%s    keys:\n      - {name: k, key_id: alias/k%s}\n"
		azure = "providers:\n  - id: p\n    type: azurekv\n    vault_url: https://v.vault.azure.net\n    timeout: 3s\n    disable_challenge_resource_verification: true\n%s    keys:\n      - {name: k, key: release, version: abc%s}\n"
	)
	for _, tc := range []struct {
		name  string
		yaml  string
		want  string // "" when valid
		value string // the setting's value, never in the error
	}{
		{"software with its settings", fmt.Sprintf(soft, "    dir: /var/lib/sigil/keys\n", ""), "", ""},
		{"pkcs11 with its settings", fmt.Sprintf(hsm, "", ""), "", ""},
		{"gcpkms with its settings", fmt.Sprintf(gcp, "", ""), "", ""},
		{"awskms with its settings", fmt.Sprintf(aws, "", ""), "", ""},
		{"azurekv with its settings", fmt.Sprintf(azure, "", ""), "", ""},
		{"pin_file on software", fmt.Sprintf(soft, "    pin_file: /etc/s3cr3t-pin\n", ""),
			"providers[0]: pin_file is for pkcs11 providers, not software", "s3cr3t-pin"},
		{"token_label on software", fmt.Sprintf(soft, "    token_label: prod-token\n", ""),
			"providers[0]: token_label is for pkcs11 providers, not software", "prod-token"},
		{"vault_url on awskms", fmt.Sprintf(aws, "    vault_url: https://other.vault.azure.net\n", ""),
			"providers[0]: vault_url is for azurekv providers, not awskms", "other.vault"},
		{"dir on pkcs11", fmt.Sprintf(hsm, "    dir: /var/lib/sigil/other-keys\n", ""),
			"providers[0]: dir is for software providers, not pkcs11", "other-keys"},
		{"region on gcpkms", fmt.Sprintf(gcp, "    region: eu-north-9\n", ""),
			"providers[0]: region is for awskms providers, not gcpkms", "eu-north-9"},
		{"endpoint on azurekv", fmt.Sprintf(azure, "    endpoint: https://kms.example.org\n", ""),
			"providers[0]: endpoint is for gcpkms and awskms providers, not azurekv", "kms.example.org"},
		{"timeout on software", fmt.Sprintf(soft, "    timeout: 7s\n", ""),
			"providers[0]: timeout is for gcpkms, awskms and azurekv providers, not software", ""},
		{"challenge verification off on awskms", fmt.Sprintf(aws, "    disable_challenge_resource_verification: true\n", ""),
			"providers[0]: disable_challenge_resource_verification is for azurekv providers, not awskms", ""},
		{"key_id on a gcpkms key", fmt.Sprintf(gcp, "", ", key_id: alias/other-key"),
			`providers[0].keys[0] "k": key_id is for keys of awskms providers, not gcpkms`, "other-key"},
		{"type on a pkcs11 key", fmt.Sprintf(hsm, "", ", type: rsa-2048"),
			`providers[0].keys[0] "k": type is for keys of software providers, not pkcs11`, "rsa-2048"},
		{"uri on a software key", fmt.Sprintf(soft, "", ", uri: 'pkcs11:object=other-object'"),
			`providers[0].keys[0] "k": uri is for keys of pkcs11 providers, not software`, "other-object"},
		{"version on an awskms key", fmt.Sprintf(aws, "", ", version: '7'"),
			`providers[0].keys[0] "k": version is for keys of gcpkms and azurekv providers, not awskms`, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := agent.ParseConfig([]byte(tc.yaml))
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v\n%s", err, tc.yaml)
			case tc.want == "":
			case err == nil:
				t.Fatalf("accepted; want it refused naming %q", tc.want)
			case !strings.Contains(err.Error(), tc.want):
				t.Fatalf("%v\nwant it to say %q", err, tc.want)
			case tc.value != "" && strings.Contains(err.Error(), tc.value):
				t.Fatalf("%v\nechoes the setting's value %q", err, tc.value)
			}
		})
	}
}

// releaseSlotPolicy writes a policy whose one tenant, payments (this
// process's uid), has one slot, release, signed by the key default.
func releaseSlotPolicy(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "policy.yaml")
	if err := os.WriteFile(path, []byte(fmt.Sprintf(`
tenants:
  - name: payments
    identities: {unix_uids: [%d]}
    slots:
      - {name: release, key: default}
`, os.Getuid())), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// ssh_keys names what the ssh-agent socket lists and signs with: key names
// without a policy, slot names with one. A name that matches nothing (a
// typo) used to be taken silently, and the socket then offered no key at
// all. --check and the start refuse it, as they do a calendar for no slot.
func TestCheckRefusesSSHKeysNamingNothing(t *testing.T) {
	policyYAML := fmt.Sprintf("tenants:\n  - name: payments\n    identities: {unix_uids: [%d]}\n    slots:\n      - {name: release, key: default}\n", os.Getuid())
	for _, tc := range []struct {
		name     string
		policy   bool
		noSocket bool
		keys     []string
		want     string // in both errors; "" when valid
	}{
		{"a key, no policy", false, false, []string{"default", "ed"}, ""},
		{"a mistyped key, no policy", false, false, []string{"default", "defualt"}, `ssh_keys: no key named "defualt"`},
		{"a slot, with a policy", true, false, []string{"release"}, ""},
		{"a key that is no slot, with a policy", true, false, []string{"default"}, `ssh_keys: no slot named "default"`},
		{"a mistyped key, no ssh_agent_socket (an embedder's listener)", false, true, []string{"defualt"}, `ssh_keys: no key named "defualt"`},
		{"a key, no ssh_agent_socket", false, true, []string{"default"}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := softwareConfig(t)
			if !tc.noSocket {
				cfg.SSHAgentSocket = shortSocketPath(t)
			}
			cfg.SSHKeys = tc.keys
			if tc.policy {
				cfg.Policy = filepath.Join(t.TempDir(), "policy.yaml")
				if err := os.WriteFile(cfg.Policy, []byte(policyYAML), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			checkErr := errors.Join(cfg.Validate(), agent.CheckFiles(cfg)) // as --check runs them
			a, startErr := agent.New(context.Background(), cfg, zap.NewNop())
			if startErr == nil {
				defer a.Shutdown(context.Background())
			}
			for what, err := range map[string]error{"--check": checkErr, "start": startErr} {
				switch {
				case tc.want == "" && err != nil:
					t.Errorf("%s refused: %v", what, err)
				case tc.want != "" && err == nil:
					t.Errorf("%s accepted it; want %q", what, tc.want)
				case tc.want != "" && strings.Count(err.Error(), tc.want) != 1:
					t.Errorf("%s: %v\nwant %q once", what, err, tc.want)
				}
			}
			if tc.want != "" && startErr != nil && !agent.IsConfigError(startErr) {
				t.Errorf("start: %v is not a configuration error (exit 78)", startErr)
			}
		})
	}
}

// A reload is held to the start's rule: one that drops the slot ssh_keys
// names is refused, and the policy in force stays.
func TestPolicyReloadRefusesDroppingAnSSHKeysSlot(t *testing.T) {
	policyYAML := func(slot string) string {
		return fmt.Sprintf("tenants:\n  - name: payments\n    identities: {unix_uids: [%d]}\n    slots:\n      - {name: %s, key: default}\n", os.Getuid(), slot)
	}
	cfg := softwareConfig(t)
	cfg.SSHAgentSocket = shortSocketPath(t)
	cfg.SSHKeys = []string{"release"}
	cfg.Policy = filepath.Join(t.TempDir(), "policy.yaml")
	if err := os.WriteFile(cfg.Policy, []byte(policyYAML("release")), 0o600); err != nil {
		t.Fatal(err)
	}
	a, err := agent.New(context.Background(), cfg, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer a.Shutdown(context.Background())
	if err := os.WriteFile(cfg.Policy, []byte(policyYAML("releases")), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := a.ReloadPolicy(); err == nil || !strings.Contains(err.Error(), `ssh_keys: no slot named "release"`) {
		t.Fatalf("reload dropping the ssh_keys slot: %v, want it refused naming it", err)
	}
	if err := os.WriteFile(cfg.Policy, []byte(policyYAML("release")+"      - {name: build, key: default}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := a.ReloadPolicy(); err != nil {
		t.Fatalf("reload keeping the slot: %v", err)
	}
}
