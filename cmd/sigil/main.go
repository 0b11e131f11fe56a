// Command sigil is Sigil's one binary: the agent daemon (`sigil agent`) and
// the commands people and scripts use against it (`sigil keys ...`,
// `sigil verify-signature`).
package main

import (
	"errors"
	"fmt"
	"os"
)

// Exit codes a shell user can branch on.
const (
	exitOK          = 0
	exitFailure     = 1 // the command ran and the answer is no (bad signature) or it failed
	exitUsage       = 2
	exitUnreachable = 3 // no agent answered at the socket
	exitRefused     = 4 // the agent answered with an error code
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
	err := root.Execute()
	if err == nil {
		os.Exit(exitOK)
	}
	var ee *exitError
	if errors.As(err, &ee) {
		if ee.err != nil {
			fmt.Fprintln(os.Stderr, "sigil:", ee.err)
		}
		os.Exit(ee.code)
	}
	fmt.Fprintln(os.Stderr, "sigil:", err)
	os.Exit(exitUsage)
}
