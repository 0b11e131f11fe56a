package agent

import (
	"os"
	"os/user"
	"path/filepath"
	"strings"
	"testing"
)

// Without $XDG_STATE_HOME and $HOME (a bare `env -i`, a unit without
// User=) the data dir is under the user database's home, never a shared
// directory such as /tmp, where another user could make it first.
func TestDefaultDataDirWithoutHome(t *testing.T) {
	u, err := user.Current()
	if err != nil || u.HomeDir == "" {
		t.Skip("no home directory in the user database")
	}
	t.Setenv("XDG_STATE_HOME", "")
	t.Setenv("HOME", "")
	got := defaultDataDir()
	if want := filepath.Join(u.HomeDir, ".local", "state", "sigil"); got != want {
		t.Fatalf("defaultDataDir() = %q, want %q", got, want)
	}
	if strings.HasPrefix(got, os.TempDir()) {
		t.Fatalf("defaultDataDir() = %q, under the shared %s", got, os.TempDir())
	}
}
