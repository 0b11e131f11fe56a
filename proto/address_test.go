package proto

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// Under /tmp the default socket directory's name is known to every local
// user; a client trusts it only while it is the user's own.
func TestCheckDefaultSocketDir(t *testing.T) {
	cases := []struct {
		name    string
		prepare func(t *testing.T, dir string)
		want    string // "" when trusted
	}{
		{"absent", func(*testing.T, string) {}, ""},
		{"ours, 0700", func(t *testing.T, dir string) { mkdir(t, dir, 0o700) }, ""},
		{"ours, 0755", func(t *testing.T, dir string) { mkdir(t, dir, 0o755) }, ""},
		{"writable by others", func(t *testing.T, dir string) { mkdir(t, dir, 0o777) }, "writable by group or others"},
		{"writable by the group", func(t *testing.T, dir string) { mkdir(t, dir, 0o770) }, "writable by group or others"},
		{"a symbolic link", func(t *testing.T, dir string) {
			target := filepath.Join(filepath.Dir(dir), "elsewhere")
			mkdir(t, target, 0o700)
			if err := os.Symlink(target, dir); err != nil {
				t.Fatal(err)
			}
		}, "is not a directory"},
		{"another user's", func(t *testing.T, dir string) {
			if os.Getuid() != 0 {
				t.Skip("giving a directory to another uid needs root")
			}
			mkdir(t, dir, 0o755)
			if err := os.Chown(dir, 4242, 4242); err != nil {
				t.Fatal(err)
			}
		}, "belongs to uid 4242"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tmp := t.TempDir()
			t.Setenv("XDG_RUNTIME_DIR", "")
			t.Setenv("TMPDIR", tmp)
			dir := filepath.Join(tmp, "sigil-"+strconv.Itoa(os.Getuid()))
			if got := filepath.Dir(DefaultSocketPath()); got != dir {
				t.Fatalf("default socket dir %s, want %s", got, dir)
			}
			tc.prepare(t, dir)
			err := CheckDefaultSocketDir(filepath.Join(dir, "agent.sock"))
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want != "" && (!errors.Is(err, ErrUntrustedSocketDir) || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("got %v, want ErrUntrustedSocketDir saying %q", err, tc.want)
			}
			// The admin socket beside it is judged the same; a path
			// elsewhere is the user's own choice.
			if err2 := CheckDefaultSocketDir(filepath.Join(dir, "admin.sock")); (err2 == nil) != (err == nil) {
				t.Errorf("admin.sock: %v, agent.sock: %v", err2, err)
			}
			if err := CheckDefaultSocketDir(filepath.Join(tmp, "other", "agent.sock")); err != nil {
				t.Errorf("a socket outside the default dir: %v", err)
			}
		})
	}
}

func mkdir(t *testing.T, dir string, mode os.FileMode) {
	t.Helper()
	if err := os.Mkdir(dir, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, mode); err != nil { // past the umask
		t.Fatal(err)
	}
}
