package pkcs11module

import (
	"crypto"
	"encoding/hex"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sigil-agent/sigil/proto"
)

// The module runs on the host's threads and shares its libcrypto: what it
// adds to OpenSSL's error queue, on success or failure, a host using
// OpenSSL itself would take for its own. testdata/errqueue.c holds an
// error and a mark of the host's across C_Initialize (failing, then
// succeeding) and hashed-mechanism signatures, and fails when the queue
// differs after a call; the signatures it prints are verified here.
func TestHostOpenSSLErrorQueue(t *testing.T) {
	need(t, "cc")
	keys := newFakeKeys(t)
	fake := startFake(t, keys)
	mod := modulePath(t)
	bin := filepath.Join(t.TempDir(), "errqueue")
	if out, err := exec.Command("cc", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-Werror", "-I/usr/include/p11-kit-1",
		"-o", bin, "testdata/errqueue.c", "-lcrypto", "-ldl").CombinedOutput(); err != nil {
		t.Fatalf("cc errqueue.c: %v\n%s", err, out)
	}
	out := run(t, []string{proto.SocketEnv + "=" + fake.sock}, bin, mod, string(message))

	pubs := map[string]crypto.PublicKey{}
	for _, k := range keys {
		pubs[k.name] = k.signer.Public()
	}
	want := []struct {
		label, key string
		hash       crypto.Hash
	}{
		{"ecdsa-sha256", "p256", crypto.SHA256},
		{"ecdsa-sha384-parts", "p384", crypto.SHA384},
		{"rsa-sha256", "rsa", crypto.SHA256},
		{"rsa-sha512-parts", "rsa", crypto.SHA512},
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != len(want)+1 || lines[len(want)] != "ok" {
		t.Fatalf("errqueue: %s", out)
	}
	for i, w := range want {
		label, sigHex, _ := strings.Cut(lines[i], " ")
		sig, err := hex.DecodeString(sigHex)
		if label != w.label || err != nil {
			t.Fatalf("line %d: %q", i, lines[i])
		}
		if err := verify(pubs[w.key], w.hash, false, sig); err != nil {
			t.Errorf("%s: %v", w.label, err)
		}
	}
}
