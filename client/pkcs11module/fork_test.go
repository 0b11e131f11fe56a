package pkcs11module

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The module across fork(): testdata/forkcheck.c (built here with the C
// compiler the module needs anyway) forks while two threads sign, and each
// child, before any call, holds none of the parent's connections (those its
// threads had borrowed for a round trip included), then initializes the
// module again, finds the parent's key handle refused, and signs; the
// parent never stops.
func TestForkSafety(t *testing.T) {
	need(t, "cc")
	startFixture(t, fixtureOptions{})
	mod := modulePath(t)
	bin := filepath.Join(t.TempDir(), "forkcheck")
	if out, err := exec.Command("cc", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-I/usr/include/p11-kit-1",
		"-o", bin, "testdata/forkcheck.c", "-ldl", "-lpthread").CombinedOutput(); err != nil {
		t.Fatalf("cc forkcheck.c: %v\n%s", err, out)
	}
	out := run(t, nil, bin, mod, "p256")
	if !strings.HasPrefix(out, "ok: 20 forks") {
		t.Fatalf("forkcheck: %s", out)
	}
	t.Log(strings.TrimSpace(out))
}

// fork() while another thread is in C_Finalize: testdata/forkfinalize.c.
// Each child must initialize and finalize the module cleanly, not free what
// the parent's C_Finalize had freed already.
func TestForkDuringFinalize(t *testing.T) {
	need(t, "cc")
	startFixture(t, fixtureOptions{})
	mod := modulePath(t)
	bin := filepath.Join(t.TempDir(), "forkfinalize")
	if out, err := exec.Command("cc", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-I/usr/include/p11-kit-1",
		"-o", bin, "testdata/forkfinalize.c", "-ldl", "-lpthread").CombinedOutput(); err != nil {
		t.Fatalf("cc forkfinalize.c: %v\n%s", err, out)
	}
	out := run(t, nil, bin, mod)
	if !strings.HasPrefix(out, "ok: 40 forks") {
		t.Fatalf("forkfinalize: %s", out)
	}
}

// fork() while another thread dials the agent: testdata/forkdial.c, run
// under testdata/slowsocket.c (an LD_PRELOAD socket(2) that lingers), so
// that forks land between the socket's making and its joining the
// module's list of connections. No child may keep a socket: each would be
// a copy of the parent's live connection to the agent.
func TestForkDuringDial(t *testing.T) {
	need(t, "cc")
	startFixture(t, fixtureOptions{})
	mod := modulePath(t)
	dir := t.TempDir()
	shim := filepath.Join(dir, "slowsocket.so")
	if out, err := exec.Command("cc", "-shared", "-fPIC", "-o", shim, "testdata/slowsocket.c", "-ldl").CombinedOutput(); err != nil {
		t.Fatalf("cc slowsocket.c: %v\n%s", err, out)
	}
	bin := filepath.Join(dir, "forkdial")
	if out, err := exec.Command("cc", "-std=c11", "-D_GNU_SOURCE", "-Wall", "-I/usr/include/p11-kit-1",
		"-o", bin, "testdata/forkdial.c", "-ldl", "-lpthread").CombinedOutput(); err != nil {
		t.Fatalf("cc forkdial.c: %v\n%s", err, out)
	}
	out := run(t, []string{"LD_PRELOAD=" + shim}, bin, mod, "p256")
	if !strings.HasPrefix(out, "ok: 40 forks") {
		t.Fatalf("forkdial: %s", out)
	}
}
