//go:build unix

package providers

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A secret file must be a regular file, its owner the agent's user or
// root, 0600 or 0640. A FIFO in its place hung the agent's start: open(2)
// of a FIFO for reading waits for a writer, and none may ever come.
func TestReadPrivateFile(t *testing.T) {
	dir := t.TempDir()
	file := func(name string, mode os.FileMode) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte("s3cr3t\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, mode); err != nil {
			t.Fatal(err)
		}
		return path
	}
	fifo := func(name string, mode uint32) string {
		path := filepath.Join(dir, name)
		if err := syscall.Mkfifo(path, mode); err != nil {
			t.Fatal(err)
		}
		return path
	}
	link := func(name, target string) string {
		path := filepath.Join(dir, name)
		if err := os.Symlink(target, path); err != nil {
			t.Fatal(err)
		}
		return path
	}
	large := filepath.Join(dir, "large")
	if err := os.WriteFile(large, make([]byte, maxPrivateFile+1), 0o600); err != nil {
		t.Fatal(err)
	}
	subdir := filepath.Join(dir, "a-dir")
	if err := os.Mkdir(subdir, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		path string
		want string // in the error; "" for a read
	}{
		{"0600", file("owner-only", 0o600), ""},
		{"0640", file("group-reads", 0o640), ""},
		{"a link to a 0600 file (a Kubernetes secret)", link("linked", filepath.Join(dir, "owner-only")), ""},
		{"others may read", file("open", 0o644), "others may read"},
		{"group may write", file("group-writes", 0o660), "group may write"},
		{"a FIFO", fifo("fifo", 0o600), "not a regular file"},
		{"a link to a FIFO", link("to-fifo", fifo("fifo2", 0o600)), "not a regular file"},
		{"a directory", subdir, "not a regular file"},
		{"a character device", "/dev/null", "not a regular file"},
		{"larger than any PIN or key", large, "larger than"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			type result struct {
				b   []byte
				err error
			}
			done := make(chan result, 1)
			go func() {
				b, _, err := ReadPrivateFile(tc.path)
				done <- result{b, err}
			}()
			var r result
			select {
			case r = <-done:
			case <-time.After(10 * time.Second):
				// Unblock the open so the goroutine ends with the test.
				if w, err := os.OpenFile(tc.path, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
					w.Close()
				}
				t.Fatalf("ReadPrivateFile(%s) still blocked after 10s", tc.path)
			}
			if tc.want == "" {
				if r.err != nil || string(r.b) != "s3cr3t\n" {
					t.Fatalf("got %q, %v; want the file's content", r.b, r.err)
				}
				return
			}
			if r.err == nil {
				t.Fatalf("read %q; want an error", r.b)
			}
			if !strings.Contains(r.err.Error(), tc.want) || !strings.Contains(r.err.Error(), tc.path) {
				t.Errorf("error %q does not say %q naming %s", r.err, tc.want, tc.path)
			}
			if strings.Contains(r.err.Error(), "s3cr3t") {
				t.Errorf("error %q quotes the file", r.err)
			}
		})
	}
}

// TrustedPath follows a path as the kernel does: ".." after a link is
// the parent of where the link led, and each directory met on the way,
// through links too, is judged.
func TestTrustedPath(t *testing.T) {
	base := t.TempDir()
	mkdir := func(rel string, mode os.FileMode) {
		if err := os.Mkdir(filepath.Join(base, rel), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(filepath.Join(base, rel), mode); err != nil {
			t.Fatal(err)
		}
	}
	link := func(target, rel string) {
		if err := os.Symlink(target, filepath.Join(base, rel)); err != nil {
			t.Fatal(err)
		}
	}
	mkdir("lib", 0o755)
	mkdir("open", 0o777)
	mkdir("lib/sub", 0o755)
	if err := os.WriteFile(filepath.Join(base, "lib", "f"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(base, "open", "f"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	link("../f", "lib/sub/up")              // relative, through a private directory
	link("../../open/f", "lib/sub/to-open") // relative, into a directory others may write
	link("sub/../../open", "lib/dotdot")    // ".." after a real directory
	link("loop2", "lib/loop1")
	link("loop1", "lib/loop2")
	for _, tc := range []struct {
		rel  string
		want string // in the error; "" for trusted
	}{
		{"lib/f", ""},
		{"lib/sub/../f", ""},
		{"lib/sub/up", ""},
		{"open/f", "directory " + filepath.Join(base, "open") + " may be written"},
		{"lib/sub/to-open", "directory " + filepath.Join(base, "open") + " may be written"},
		{"lib/dotdot/f", "directory " + filepath.Join(base, "open") + " may be written"},
		{"lib/loop1", "more than 40 links"},
		{"lib/absent", "no such file"},
	} {
		t.Run(tc.rel, func(t *testing.T) {
			fi, err := TrustedPath(filepath.Join(base, tc.rel))
			if tc.want == "" {
				if err != nil || !fi.Mode().IsRegular() {
					t.Fatalf("got %v, %v; want the file's information", fi, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v; want one saying %q", err, tc.want)
			}
		})
	}
}
