package agent

import (
	"reflect"
	"slices"
	"strings"
	"testing"
)

// Every setting of ProviderSpec and KeySpec is taken by some provider type
// (a new one missing from providerSettings or keySettings would be refused
// on every type), and the tables name only settings that exist.
func TestProviderSettingsTablesMatchTheSpecs(t *testing.T) {
	for _, tc := range []struct {
		spec  any
		skip  []string
		takes map[string][]string
	}{
		{ProviderSpec{}, []string{"id", "type", "keys"}, providerSettings},
		{KeySpec{}, []string{"name"}, keySettings},
	} {
		st := reflect.TypeOf(tc.spec)
		var fields []string
		for i := range st.NumField() {
			name, _, _ := strings.Cut(st.Field(i).Tag.Get("yaml"), ",")
			if !slices.Contains(tc.skip, name) {
				fields = append(fields, name)
			}
		}
		taken := map[string]bool{}
		for _, typ := range providerTypes {
			for _, name := range tc.takes[typ] {
				if !slices.Contains(fields, name) {
					t.Errorf("%s: type %s takes %q, which is not a setting", st.Name(), typ, name)
				}
				taken[name] = true
			}
		}
		for _, name := range fields {
			if !taken[name] {
				t.Errorf("%s: no provider type takes %q", st.Name(), name)
			}
		}
	}
}

// A socket named "unix:PATH" in the config is PATH, as it is in SIGIL_SOCK
// and --socket: kept whole it was a relative path starting "unix:".
func TestConfigSocketsTakeTheUnixPrefix(t *testing.T) {
	cfg, err := ParseConfig([]byte("socket: unix:/run/s/agent.sock\nadmin_socket: unix:/run/s/admin.sock\nssh_agent_socket: unix:/run/s/ssh.sock\n"))
	if err != nil {
		t.Fatal(err)
	}
	for _, got := range []struct{ field, path, want string }{
		{"socket", cfg.Socket, "/run/s/agent.sock"},
		{"admin_socket", cfg.AdminSocket, "/run/s/admin.sock"},
		{"ssh_agent_socket", cfg.SSHAgentSocket, "/run/s/ssh.sock"},
	} {
		if got.path != got.want {
			t.Errorf("%s: unix:%s read as %q", got.field, got.want, got.path)
		}
	}
}
