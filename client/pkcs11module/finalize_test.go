package pkcs11module

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// asanBuild builds the module with AddressSanitizer into a temporary
// directory (the Makefile's own rule, its output and flags overridden) and
// returns it with the flags a test program needs to host it: the program
// must carry ASan's runtime itself. Without ASan in the toolchain it
// returns the ordinary module and no flags, and the test checks result
// codes and crashes only.
func asanBuild(t *testing.T) (module string, ccFlags []string) {
	t.Helper()
	dir := t.TempDir()
	probe := filepath.Join(dir, "probe.c")
	if err := os.WriteFile(probe, []byte("int main(void) { return 0; }\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("cc", "-fsanitize=address", "-o", filepath.Join(dir, "probe"), probe).CombinedOutput(); err != nil {
		t.Logf("no AddressSanitizer here (%v: %s): the ordinary module, checked for result codes and crashes only", err, strings.TrimSpace(string(out)))
		return modulePath(t), nil
	}
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	module = filepath.Join(dir, "libsigil-pkcs11-asan.so")
	if out, err := exec.Command("make", "--no-print-directory", "-s", "-C", root, module,
		"PKCS11_MODULE="+module, "PKCS11_CFLAGS=-O1 -g -fsanitize=address -fno-omit-frame-pointer").CombinedOutput(); err != nil {
		t.Fatalf("make %s with AddressSanitizer: %v\n%s", module, err, out)
	}
	return module, []string{"-fsanitize=address", "-fno-omit-frame-pointer", "-g"}
}

// C_Finalize while three threads sign, search and read attributes:
// testdata/finalizesign.c, under AddressSanitizer where the toolchain has
// it. The calls in flight must finish on state that is still there, and
// every call after C_Finalize must answer CKR_CRYPTOKI_NOT_INITIALIZED.
func TestFinalizeWhileSigning(t *testing.T) {
	need(t, "cc")
	startFixture(t, fixtureOptions{})
	mod, flags := asanBuild(t)
	bin := filepath.Join(t.TempDir(), "finalizesign")
	args := append([]string{"-std=c11", "-D_GNU_SOURCE", "-Wall", "-I/usr/include/p11-kit-1"}, flags...)
	args = append(args, "-o", bin, "testdata/finalizesign.c", "-ldl", "-lpthread")
	if out, err := exec.Command("cc", args...).CombinedOutput(); err != nil {
		t.Fatalf("cc finalizesign.c: %v\n%s", err, out)
	}
	out := run(t, nil, bin, mod, "p256")
	if !strings.HasPrefix(out, "ok: 30 rounds") {
		t.Fatalf("finalizesign: %s", out)
	}
	t.Log(strings.TrimSpace(out))
}
