package agent_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/agent/rotation"
)

// A rotation calendar for a slot the policy lacks (a typo) would never
// rotate, silently: `sigil agent --check`, which systemctl reload runs
// first, refuses it, as it does a calendar without any policy.
func TestCheckFilesRefusesCalendarsForUnknownSlots(t *testing.T) {
	dir := t.TempDir()
	policyFile := filepath.Join(dir, "policy.yaml")
	os.WriteFile(policyFile, []byte(fmt.Sprintf(`
tenants:
  - name: payments
    identities: {unix_uids: [%d]}
    slots:
      - {name: release, key: default}
`, os.Getuid())), 0o600)
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
			err := agent.CheckFiles(cfg)
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
