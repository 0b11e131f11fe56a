package agent

import (
	"testing"

	"go.yaml.in/yaml/v3"
)

// FuzzParseConfig feeds arbitrary files to the config loader (ParseConfig,
// which LoadConfig runs on a file's bytes). It must return a Config or an
// error, never panic. A config that loads must validate again as it is,
// write back to YAML that loads to the same Config (so `--print-default-config`
// and tooling that rewrites configs lose nothing), and stay valid once its
// defaults are filled in; its rotation calendars must parse or fail without
// panicking. A refused config is refused with the same message every time.
//
// Seeds: testdata/fuzz/FuzzParseConfig (the examples of docs/ and the
// bench's agent config) and the embedded default.
func FuzzParseConfig(f *testing.F) {
	f.Add(DefaultConfigYAML())
	f.Fuzz(func(t *testing.T, raw []byte) {
		cfg, err := ParseConfig(raw)
		if err != nil {
			if _, again := ParseConfig(raw); again == nil || again.Error() != err.Error() {
				t.Fatalf("refused with %q, then %v on the same input", err, again)
			}
			return
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("a loaded config fails Validate: %v", err)
		}
		out, err := yaml.Marshal(&cfg)
		if err != nil {
			t.Fatalf("a loaded config does not marshal: %v", err)
		}
		back, err := ParseConfig(out)
		if err != nil {
			t.Fatalf("a loaded config, written back, is refused: %v\n%s", err, out)
		}
		// Compared as YAML: a nil and an empty list or map are one setting.
		if again, err := yaml.Marshal(&back); err != nil || string(again) != string(out) {
			t.Fatalf("a loaded config changes when written back and loaded (%v):\n%s\n----\n%s", err, out, again)
		}
		for _, cc := range cfg.Rotation.Calendars {
			cc.Parse() // errors are reported at start; here only a panic matters
		}
		cfg.EnsureDefaults()
		if err := cfg.Validate(); err != nil {
			t.Fatalf("a loaded config fails Validate once its defaults are filled in: %v", err)
		}
	})
}
