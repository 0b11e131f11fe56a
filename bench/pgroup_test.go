package bench

import (
	"context"
	"os/exec"
	"syscall"
	"testing"
)

// Ctrl-C at a terminal signals its whole foreground process group. The
// bench stops at the first one and still reports what it measured, which
// needs its agents and p11-kit server alive until it stops them: started
// in the bench's group, they got the same SIGINT and quit under the last
// rep's clients, whose errors then went into the report.
func TestServersAreOutsideTheBenchsProcessGroup(t *testing.T) {
	sigil := buildSigil(t)
	e, err := Setup(context.Background(), SetupOptions{Sigil: sigil, Keys: []string{KeyECDSAP256}})
	if err != nil {
		t.Skipf("bench environment: %v", err)
	}
	defer e.Close()
	own := syscall.Getpgrp()
	for name, cmd := range map[string]*exec.Cmd{"agent": e.agent, "p11-kit server": e.p11kit} {
		if cmd == nil {
			continue
		}
		pgid, err := syscall.Getpgid(cmd.Process.Pid)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if pgid == own {
			t.Errorf("the %s (pid %d) is in the bench's process group %d: a terminal's Ctrl-C reaches it", name, cmd.Process.Pid, own)
		}
	}
}
