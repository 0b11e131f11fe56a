package software

import (
	"context"
	"crypto"
	"crypto/sha256"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/providers"
)

// A crash inside WriteKeyFile leaves its temp file, a copy of a private key
// (or a second name of one), in the key dir. Open removes those old enough
// to be no write in flight, and nothing else, and serves the keys as before.
func TestOpenRemovesStaleKeyTemps(t *testing.T) {
	old := time.Now().Add(-time.Hour)
	cases := []struct {
		name    string
		file    string
		make    func(t *testing.T, path string)
		removed bool
	}{
		{"stale temp", ".tmp-key-123", func(t *testing.T, path string) { writeAged(t, path, old) }, true},
		{"fresh temp, maybe a write in flight", ".tmp-key-456", func(t *testing.T, path string) { writeAged(t, path, time.Now()) }, false},
		{"stale file of another name", "notes.tmp", func(t *testing.T, path string) { writeAged(t, path, old) }, false},
		{"stale directory named like a temp", ".tmp-key-dir", func(t *testing.T, path string) {
			if err := os.Mkdir(path, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.Chtimes(path, old, old); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"stale symlink named like a temp", ".tmp-key-link", func(t *testing.T, path string) {
			target := filepath.Join(t.TempDir(), "target")
			writeAged(t, target, old)
			if err := os.Symlink(target, path); err != nil {
				t.Fatal(err)
			}
		}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			cfg := Config{ID: "s", DataDir: dir, Keys: []KeyConfig{{"k", providers.KeyEd25519}}}
			p, err := Open(cfg)
			if err != nil {
				t.Fatal(err)
			}
			before, _ := p.Keys(context.Background())
			p.Close()
			path := filepath.Join(dir, tc.file)
			tc.make(t, path)

			p, err = Open(cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			_, err = os.Lstat(path)
			if gone := os.IsNotExist(err); gone != tc.removed {
				t.Fatalf("%s removed: %v, want %v (lstat: %v)", tc.file, gone, tc.removed, err)
			}
			after, _ := p.Keys(context.Background())
			if len(after) != 1 || after[0].KID != before[0].KID {
				t.Fatalf("keys changed: %v → %v", before, after)
			}
			alg := providers.Algorithm{Scheme: providers.SchemeEd25519}
			msg := []byte("after cleanup")
			sig, err := p.Sign(context.Background(), "k", alg, msg)
			if err != nil {
				t.Fatal(err)
			}
			if err := providers.Verify(after[0].Public, alg, msg, sig); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// The temp file a crash left after the link (a second name of the key file)
// goes, and the key file stays.
func TestOpenRemovesStaleTempLinkedToKey(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{ID: "s", DataDir: dir, Keys: []KeyConfig{{"k", providers.KeyECDSAP256}}}
	p, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	before, _ := p.Keys(context.Background())
	p.Close()
	tmp := filepath.Join(dir, ".tmp-key-linked")
	if err := os.Link(filepath.Join(dir, "k.pem"), tmp); err != nil {
		t.Fatal(err)
	}
	old := time.Now().Add(-time.Hour)
	if err := os.Chtimes(tmp, old, old); err != nil {
		t.Fatal(err)
	}
	p, err = Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if _, err := os.Lstat(tmp); !os.IsNotExist(err) {
		t.Fatalf("stale temp kept: %v", err)
	}
	after, _ := p.Keys(context.Background())
	if after[0].KID != before[0].KID {
		t.Fatalf("kid changed: %s → %s", before[0].KID, after[0].KID)
	}
	d := sha256.Sum256([]byte("x"))
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	sig, err := p.Sign(context.Background(), "k", alg, d[:])
	if err != nil {
		t.Fatal(err)
	}
	if err := providers.Verify(after[0].Public, alg, d[:], sig); err != nil {
		t.Fatal(err)
	}
}

func writeAged(t *testing.T, path string, mtime time.Time) {
	t.Helper()
	if err := os.WriteFile(path, []byte("-----BEGIN PRIVATE KEY-----\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(path, mtime, mtime); err != nil {
		t.Fatal(err)
	}
}

// PrivateDir makes every missing level of a nested path (DATA_DIR/keys/<id>
// on a first start) 0700, and reports what stops it. That each new entry is
// fsynced into its parent is seen only with strace or a power cut.
func TestPrivateDirMakesEachLevel(t *testing.T) {
	cases := []struct {
		name    string
		prepare func(t *testing.T, root string)
		path    string
		refused bool
	}{
		{"three levels absent", func(*testing.T, string) {}, "data/keys/soft", false},
		{"upper level present", func(t *testing.T, root string) {
			if err := os.Mkdir(filepath.Join(root, "data"), 0o700); err != nil {
				t.Fatal(err)
			}
		}, "data/keys/soft", false},
		{"a file on the way", func(t *testing.T, root string) {
			if err := os.WriteFile(filepath.Join(root, "data"), nil, 0o600); err != nil {
				t.Fatal(err)
			}
		}, "data/keys/soft", true},
		{"parent not writable", func(t *testing.T, root string) {
			if os.Getuid() == 0 {
				t.Skip("root writes anywhere")
			}
			if err := os.Mkdir(filepath.Join(root, "data"), 0o500); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.Chmod(filepath.Join(root, "data"), 0o700) })
		}, "data/keys/soft", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			tc.prepare(t, root)
			err := PrivateDir(filepath.Join(root, tc.path))
			if tc.refused {
				if err == nil {
					t.Fatal("accepted")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			for _, level := range []string{"data/keys", "data/keys/soft"} {
				st, err := os.Stat(filepath.Join(root, level))
				if err != nil || !st.IsDir() || st.Mode().Perm() != 0o700 {
					t.Fatalf("%s after PrivateDir: %v %v", level, st.Mode(), err)
				}
			}
		})
	}
}
