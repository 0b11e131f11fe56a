package pkcs11

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/pkcs11/softhsmtest"
)

// dieOpeningInstanceEnv makes TestHelperDieOpeningInstance run: it is the
// child process of TestModuleCopyNotLeftByACrashDuringItsOpen, not a test
// of its own.
const dieOpeningInstanceEnv = "SIGIL_TEST_DIE_OPENING_INSTANCE"

// A process that dies while a module instance is being opened must leave
// no copy of the module behind: each start writes a fresh one, so an agent
// that a supervisor restarts again and again (a module that crashes or
// hangs in its C_Initialize until a watchdog kills it, when loaded twice)
// filled TMPDIR with copies, one per attempt. The child here opens two
// instances and is killed (SIGKILL: no deferred cleanup runs) as the
// second instance's open looks for its token, after the copy was loaded.
func TestModuleCopyNotLeftByACrashDuringItsOpen(t *testing.T) {
	tok := softhsmtest.New(t, "copycrash")
	keys := tok.GenerateKeys(t, providers.KeyECDSAP256)
	tmp := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperDieOpeningInstance$", "-test.count=1")
	cmd.Env = append(os.Environ(),
		dieOpeningInstanceEnv+"=1",
		"TMPDIR="+tmp,
		pinEnv+"="+tok.PIN,
		"SIGIL_TEST_MODULE="+tok.Module,
		"SIGIL_TEST_KEY_URI="+keys[providers.KeyECDSAP256].URI,
	)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if err == nil || !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("child: %v, want killed by SIGKILL while opening the second instance\n%s", err, out)
	}
	var left []string
	filepath.WalkDir(tmp, func(path string, d os.DirEntry, err error) error {
		if err == nil && path != tmp {
			left = append(left, strings.TrimPrefix(path, tmp+"/"))
		}
		return nil
	})
	if len(left) != 0 {
		t.Errorf("left in TMPDIR by the killed open: %v", left)
	}
}

// TestHelperDieOpeningInstance is the child of
// TestModuleCopyNotLeftByACrashDuringItsOpen.
func TestHelperDieOpeningInstance(t *testing.T) {
	if os.Getenv(dieOpeningInstanceEnv) == "" {
		t.Skip("the child process of TestModuleCopyNotLeftByACrashDuringItsOpen")
	}
	// Instance 0 looks for its token first; the second look is instance
	// 1's, made once its copy of the module is loaded.
	var slotLooks atomic.Int32
	cfg := Config{
		ID: "hsm-test", Module: os.Getenv("SIGIL_TEST_MODULE"), PINEnv: pinEnv,
		Keys:      []KeyConfig{{Name: "k", URI: os.Getenv("SIGIL_TEST_KEY_URI")}},
		Instances: 2, Sessions: 2,
		FaultHook: func(op string) uint {
			if op == "slot" && slotLooks.Add(1) == 2 {
				syscall.Kill(os.Getpid(), syscall.SIGKILL)
				select {}
			}
			return 0
		},
	}
	p, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	p.Close()
	t.Fatalf("opened both instances: the hook never saw the second instance's token search (%d searches)", slotLooks.Load())
}
