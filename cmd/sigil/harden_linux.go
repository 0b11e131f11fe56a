package main

import (
	"fmt"
	"syscall"
)

const (
	prSetDumpable = 4 // PR_SET_DUMPABLE, <linux/prctl.h>
	prGetDumpable = 3 // PR_GET_DUMPABLE
)

// hardenProcess makes the agent non-dumpable, as ssh-agent does: no core
// file, and no ptrace or /proc/PID/mem reads by other processes of the same
// user, which could otherwise copy software keys, a token's PIN (kept for
// re-login) or digests out of its memory. Root still can.
func hardenProcess() error {
	if _, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, prSetDumpable, 0, 0); errno != 0 {
		return fmt.Errorf("prctl(PR_SET_DUMPABLE, 0): %w", errno)
	}
	return nil
}

// dumpable reports the process's PR_GET_DUMPABLE.
func dumpable() (bool, error) {
	r, _, errno := syscall.RawSyscall(syscall.SYS_PRCTL, prGetDumpable, 0, 0)
	if errno != 0 {
		return false, errno
	}
	return r != 0, nil
}
