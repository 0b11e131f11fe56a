package software

import (
	"context"
	"crypto"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/sigil-agent/sigil/providers"
)

var allKeys = []KeyConfig{
	{"p256", providers.KeyECDSAP256},
	{"p384", providers.KeyECDSAP384},
	{"rsa2048", providers.KeyRSA2048},
	{"rsa3072", providers.KeyRSA3072},
	{"ed25519", providers.KeyEd25519},
	{"payments/release", providers.KeyEd25519},
}

func TestSignVerifiesEveryType(t *testing.T) {
	p, err := Open(Config{ID: "soft", DataDir: t.TempDir(), Keys: allKeys})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	d256 := sha256.Sum256([]byte("payload"))
	d384 := sha512.Sum384([]byte("payload"))
	cases := []struct {
		key    string
		alg    providers.Algorithm
		digest []byte
	}{
		{"p256", providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}, d256[:]},
		{"p384", providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA384}, d384[:]},
		{"rsa2048", providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: crypto.SHA256}, d256[:]},
		{"rsa2048", providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA256}, d256[:]},
		{"rsa3072", providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA384}, d384[:]},
		{"rsa3072", providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: crypto.SHA384}, d384[:]},
		{"ed25519", providers.Algorithm{Scheme: providers.SchemeEd25519}, []byte("the message itself")},
		{"payments/release", providers.Algorithm{Scheme: providers.SchemeEd25519}, []byte("m")},
	}
	keys, _ := p.Keys(context.Background())
	pubs := map[string]crypto.PublicKey{}
	for _, k := range keys {
		pubs[k.Name] = k.Public
	}
	for _, tc := range cases {
		t.Run(tc.key+"/"+tc.alg.String(), func(t *testing.T) {
			sig, err := p.Sign(context.Background(), tc.key, tc.alg, tc.digest)
			if err != nil {
				t.Fatal(err)
			}
			if err := providers.Verify(pubs[tc.key], tc.alg, tc.digest, sig); err != nil {
				t.Fatalf("verify: %v", err)
			}
			if tc.alg.Scheme == providers.SchemePSS {
				// providers.Verify accepts any salt length; the documented one is the hash's.
				opts := &rsa.PSSOptions{SaltLength: tc.alg.Hash.Size()}
				if err := rsa.VerifyPSS(pubs[tc.key].(*rsa.PublicKey), tc.alg.Hash, tc.digest, sig, opts); err != nil {
					t.Fatalf("PSS salt is not the hash length: %v", err)
				}
			}
			flipped := append([]byte{}, tc.digest...)
			if len(flipped) == 0 {
				flipped = []byte{0}
			}
			flipped[0] ^= 1
			if err := providers.Verify(pubs[tc.key], tc.alg, flipped, sig); !errors.Is(err, providers.ErrInvalidSignature) {
				t.Fatalf("flipped digest verified: %v", err)
			}
		})
	}
}

func TestKeysPersistAcrossRestarts(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{ID: "soft", DataDir: dir, Keys: allKeys[:1]}
	p1, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	k1, _ := p1.Keys(context.Background())
	p1.Close()
	p2, err := Open(cfg)
	if err != nil {
		t.Fatal(err)
	}
	k2, _ := p2.Keys(context.Background())
	if k1[0].KID != k2[0].KID {
		t.Fatalf("kid changed across restart: %s → %s", k1[0].KID, k2[0].KID)
	}
	st, err := os.Stat(filepath.Join(dir, "p256.pem"))
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v", st.Mode().Perm())
	}
	dst, _ := os.Stat(dir)
	if dst.Mode().Perm() != 0o700 {
		t.Fatalf("data dir mode %v", dst.Mode().Perm())
	}
}

func TestOpenRefuses(t *testing.T) {
	cases := []struct {
		name    string
		prepare func(dir string)
		keys    []KeyConfig
	}{
		{"type changed in config", func(dir string) {
			if _, err := Open(Config{ID: "s", DataDir: dir, Keys: []KeyConfig{{"k", providers.KeyEd25519}}}); err != nil {
				t.Fatal(err)
			}
		}, []KeyConfig{{"k", providers.KeyECDSAP256}}},
		{"world-readable key file", func(dir string) {
			if _, err := Open(Config{ID: "s", DataDir: dir, Keys: []KeyConfig{{"k", providers.KeyEd25519}}}); err != nil {
				t.Fatal(err)
			}
			os.Chmod(filepath.Join(dir, "k.pem"), 0o644)
		}, []KeyConfig{{"k", providers.KeyEd25519}}},
		{"garbage key file", func(dir string) {
			os.WriteFile(filepath.Join(dir, "k.pem"), []byte("not a key"), 0o600)
		}, []KeyConfig{{"k", providers.KeyEd25519}}},
		{"key file of another user", func(dir string) {
			asRootOnly(t)
			if _, err := Open(Config{ID: "s", DataDir: dir, Keys: []KeyConfig{{"k", providers.KeyEd25519}}}); err != nil {
				t.Fatal(err)
			}
			if err := os.Chown(filepath.Join(dir, "k.pem"), 4242, 4242); err != nil {
				t.Fatal(err)
			}
		}, []KeyConfig{{"k", providers.KeyEd25519}}},
		{"key dir of another user", func(dir string) {
			asRootOnly(t)
			if err := os.Chown(dir, 4242, 4242); err != nil {
				t.Fatal(err)
			}
		}, []KeyConfig{{"k", providers.KeyEd25519}}},
		{"duplicate name", func(string) {}, []KeyConfig{{"k", providers.KeyEd25519}, {"k", providers.KeyEd25519}}},
		{"unknown type", func(string) {}, []KeyConfig{{"k", "dsa-1024"}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			tc.prepare(dir)
			if _, err := Open(Config{ID: "s", DataDir: dir, Keys: tc.keys}); err == nil {
				t.Fatal("Open succeeded")
			}
		})
	}
}

func asRootOnly(t *testing.T) {
	t.Helper()
	if os.Getuid() != 0 {
		t.Skip("giving a file to another uid needs root")
	}
}

// PrivateDir makes a directory this user's alone, or refuses one that is
// not this user's to make so.
func TestPrivateDir(t *testing.T) {
	cases := []struct {
		name    string
		prepare func(t *testing.T, dir string)
		refused bool
	}{
		{"absent", func(*testing.T, string) {}, false},
		{"ours, 0755", func(t *testing.T, dir string) {
			if err := os.Mkdir(dir, 0o755); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"ours, 0777", func(t *testing.T, dir string) {
			if err := os.Mkdir(dir, 0o777); err != nil {
				t.Fatal(err)
			}
		}, false},
		{"a file", func(t *testing.T, dir string) {
			if err := os.WriteFile(dir, nil, 0o600); err != nil {
				t.Fatal(err)
			}
		}, true},
		{"another user's", func(t *testing.T, dir string) {
			asRootOnly(t)
			if err := os.Mkdir(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.Chown(dir, 4242, 4242); err != nil {
				t.Fatal(err)
			}
		}, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "d")
			tc.prepare(t, dir)
			err := PrivateDir(dir)
			if tc.refused {
				if err == nil {
					t.Fatal("accepted")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if st, err := os.Stat(dir); err != nil || st.Mode().Perm() != 0o700 || !st.IsDir() {
				t.Fatalf("after PrivateDir: %v %v", st.Mode(), err)
			}
		})
	}
}

func TestSignErrors(t *testing.T) {
	p, err := Open(Config{ID: "s", DataDir: t.TempDir(), Keys: allKeys[:1]})
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256(nil)
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	if _, err := p.Sign(context.Background(), "nope", alg, d[:]); !errors.Is(err, providers.ErrNotFound) {
		t.Fatalf("unknown key: %v", err)
	}
	p.Close()
	if _, err := p.Sign(context.Background(), "p256", alg, d[:]); !errors.Is(err, providers.ErrUnavailable) {
		t.Fatalf("after close: %v", err)
	}
}

func TestGenerateKey(t *testing.T) {
	p, err := Open(Config{ID: "s", DataDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	info, err := p.GenerateKey(context.Background(), "slot/v2", providers.KeyECDSAP256)
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256([]byte("x"))
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	sig, err := p.Sign(context.Background(), "slot/v2", alg, d[:])
	if err != nil {
		t.Fatal(err)
	}
	if err := providers.Verify(info.Public, alg, d[:], sig); err != nil {
		t.Fatal(err)
	}
	if _, err := p.GenerateKey(context.Background(), "slot/v2", providers.KeyECDSAP256); err == nil {
		t.Fatal("generated over an existing key")
	}
}

// A key generation does not hold up the provider's other keys: Sign runs
// while an RSA-4096 key (seconds of work) is being made. GenerateKey used
// to hold the provider's lock throughout, so every Sign waited it out.
func TestGenerateKeyDoesNotStopSigning(t *testing.T) {
	p, err := Open(Config{ID: "s", DataDir: t.TempDir(), Keys: []KeyConfig{{"p256", providers.KeyECDSAP256}}})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	generated := make(chan error, 1)
	go func() {
		_, err := p.GenerateKey(context.Background(), "slot/v2", providers.KeyRSA4096)
		generated <- err
	}()
	d := sha256.Sum256([]byte("x"))
	alg := providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	signed := 0
	for {
		select {
		case err := <-generated:
			if err != nil {
				t.Fatal(err)
			}
			// An RSA-4096 generation lasts far longer than ten P-256
			// signatures; with the lock held, at most one got through.
			if signed < 10 {
				t.Fatalf("%d signatures made while an RSA-4096 key was generated", signed)
			}
			return
		default:
		}
		if _, err := p.Sign(context.Background(), "p256", alg, d[:]); err != nil {
			t.Fatal(err)
		}
		signed++
	}
}

func BenchmarkSignEd25519(b *testing.B) {
	p, err := Open(Config{ID: "s", DataDir: b.TempDir(), Keys: []KeyConfig{{"k", providers.KeyEd25519}}})
	if err != nil {
		b.Fatal(err)
	}
	alg := providers.Algorithm{Scheme: providers.SchemeEd25519}
	msg := make([]byte, 32)
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := p.Sign(context.Background(), "k", alg, msg); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// A key file is loaded only when it is a regular file in the key directory.
// A symlink there (planted while the directory was open to others, or by
// a packaging script) must not make a key of another file: the owner and
// mode checks would judge the target, not the link, and a FIFO would hang
// the start for ever.
func TestOpenRefusesKeyFileNotRegular(t *testing.T) {
	cases := []struct {
		name  string
		plant func(t *testing.T, dir, path string)
	}{
		{"symlink to another of our keys", func(t *testing.T, dir, path string) {
			other := filepath.Join(t.TempDir(), "other.pem")
			if _, err := Open(Config{ID: "s", DataDir: filepath.Dir(other), Keys: []KeyConfig{{"other", providers.KeyEd25519}}}); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(other, path); err != nil {
				t.Fatal(err)
			}
		}},
		{"dangling symlink", func(t *testing.T, dir, path string) {
			if err := os.Symlink(filepath.Join(dir, "nowhere"), path); err != nil {
				t.Fatal(err)
			}
		}},
		{"fifo", func(t *testing.T, dir, path string) {
			mkfifo(t, path)
		}},
		{"directory", func(t *testing.T, dir, path string) {
			if err := os.Mkdir(path, 0o700); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			tc.plant(t, dir, filepath.Join(dir, "k.pem"))
			p, err := Open(Config{ID: "s", DataDir: dir, Keys: []KeyConfig{{"k", providers.KeyEd25519}}})
			if err == nil {
				p.Close()
				t.Fatal("Open accepted it")
			}
			t.Log(err)
		})
	}
}

// Sign refuses what the key cannot sign, as the PKCS#11 provider does,
// rather than trusting every caller to have run CheckRequest: an RSA key
// asked for Ed25519 would otherwise sign the raw input without a
// DigestInfo, and an ECDSA key asked for PSS would sign under the wrong
// label.
func TestSignRefusesWhatTheKeyCannotDo(t *testing.T) {
	p, err := Open(Config{ID: "s", DataDir: t.TempDir(), Keys: allKeys[:5]})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	d256 := sha256.Sum256([]byte("x"))
	cases := []struct {
		key    string
		alg    providers.Algorithm
		digest []byte
		want   error
	}{
		{"p256", providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA256}, d256[:], providers.ErrUnsupportedAlgorithm},
		{"p256", providers.Algorithm{Scheme: providers.SchemeEd25519}, d256[:], providers.ErrUnsupportedAlgorithm},
		{"rsa2048", providers.Algorithm{Scheme: providers.SchemeEd25519}, d256[:], providers.ErrUnsupportedAlgorithm},
		{"rsa2048", providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}, d256[:], providers.ErrUnsupportedAlgorithm},
		{"ed25519", providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}, d256[:], providers.ErrUnsupportedAlgorithm},
		{"ed25519", providers.Algorithm{Scheme: providers.SchemeEd25519, Hash: crypto.SHA512}, d256[:], providers.ErrUnsupportedAlgorithm},
		{"p256", providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}, d256[:20], providers.ErrBadRequest},
		{"p384", providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA384}, d256[:], providers.ErrBadRequest},
		{"rsa2048", providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA384}, d256[:], providers.ErrBadRequest},
		{"rsa2048", providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: crypto.SHA1}, d256[:20], providers.ErrUnsupportedAlgorithm},
	}
	for _, tc := range cases {
		t.Run(tc.key+"/"+tc.alg.String(), func(t *testing.T) {
			sig, err := p.Sign(context.Background(), tc.key, tc.alg, tc.digest)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Sign = %d-byte signature, %v; want %v", len(sig), err, tc.want)
			}
		})
	}
}
