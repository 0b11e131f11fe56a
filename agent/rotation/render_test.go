package rotation

import (
	"errors"
	"strings"
	"testing"
)

// A failed drill's statement tells the operator how to lift the pause
// with a command that exists, `sigil admin resume`, and the slot in it
// as typed: a slot name with "_" (the policy allows it) used to come out
// as "pay\_ments" inside the code span, and the command as "sigil
// resume", which the CLI does not have.
func TestIncidentStatementNamesTheResumeCommand(t *testing.T) {
	const slot = "pay_ments/re_lease"
	st := string(renderIncident(&incident{slot: slot, started: t0, ended: t0, firstSeq: 7, err: errors.New("rotate: keygen failed")}))
	want := "`sigil admin resume " + slot + "`"
	if !strings.Contains(st, want) {
		t.Fatalf("the statement lacks %s:\n%s", want, st)
	}
}
