// Command sigil is Sigil's one binary: the agent daemon (`sigil agent`) and
// the commands people and scripts use against it (`sigil keys ...`,
// `sigil verify-signature`).
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
)

// Exit codes a shell user can branch on.
const (
	exitOK          = 0
	exitFailure     = 1 // the command ran and the answer is no (bad signature) or it failed
	exitUsage       = 2
	exitUnreachable = 3 // no agent answered at the socket
	exitRefused     = 4 // the agent answered with an error code, not in time, or unreadably
	// exitUnchecked: 'audit verify' reached no verdict (the journal
	// missing, in use or unreadable), which a monitor must not take for
	// a broken chain (exit 1) nor for a sound one.
	exitUnchecked = 5
	// exitConfig: the agent did not start, and will not until an
	// operator changes something: a token refused its PIN or is locked
	// (starting again presents the same PIN and may lock the token), a
	// PIN source gives no PIN (pin_file missing, unreadable, empty or open
	// to others; pin_env unset or empty), a PKCS#11 module path gives no
	// library (pkcs11.ErrModuleLoad), the config or its policy fails
	// its checks, DATA_DIR/evidence.key is missing while its public
	// key or packs are kept, systemd passed sockets the agent cannot take
	// (an unknown name, not a listening stream socket), or
	// admin_http.listen resolved to an address that is not loopback.
	// sigil.service does not restart on it (RestartPreventExitStatus=78;
	// 78 is sysexits' EX_CONFIG).
	exitConfig = 78
)

// exitError carries an exit code up to main.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func main() {
	root := newRootCommand()
	stdout := &checkedWriter{w: os.Stdout}
	root.SetOut(stdout)
	err := root.Execute()
	var ee *exitError
	if stdout.err != nil && !errors.As(err, &ee) {
		// A script must not take a signature it never got (a full disk, a
		// closed pipe) for one written; nor is that a usage error.
		err = &exitError{exitFailure, fmt.Errorf("write to standard output: %w", stdout.err)}
	}
	if err == nil {
		os.Exit(exitOK)
	}
	if errors.As(err, &ee) {
		if ee.err != nil {
			fmt.Fprintln(os.Stderr, "sigil:", ee.err)
		}
		os.Exit(ee.code)
	}
	fmt.Fprintln(os.Stderr, "sigil:", err)
	os.Exit(exitUsage)
}

// checkedWriter remembers the first write error, which commands printing
// with fmt.Fprint* do not look at.
type checkedWriter struct {
	w   io.Writer
	err error
}

func (c *checkedWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	if err != nil && c.err == nil {
		c.err = err
	}
	return n, err
}
