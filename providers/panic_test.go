package providers_test

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/sigil-agent/sigil/providers"
)

type secretValue struct{ pin string }

// recovered panics with v in a function that takes a digest by value (its
// words would be in a stack's argument list) and returns what Recovered
// makes of it.
func recovered(v any) (pe *providers.PanicError) {
	defer func() { pe = providers.Recovered(recover(), "hsm", "sign", "release") }()
	signWithArray([4]uint64{0x5ec7e75ec7e75ec7, 0x5ec7e75ec7e75ec7}, v)
	return nil
}

//go:noinline
func signWithArray(digest [4]uint64, v any) {
	if digest[0] != 0 {
		panic(v)
	}
}

// A PanicError names the panic's type, never its content (but for the
// runtime's own errors), and keeps the stack without argument words.
func TestRecoveredKeepsNoPanicData(t *testing.T) {
	var nilMap map[string]int
	for _, tc := range []struct {
		name  string
		value any
		want  string
	}{
		{"string", "PIN 1234", "string"},
		{"error", errors.New("PIN 1234"), "*errors.errorString"},
		{"struct", secretValue{pin: "1234"}, "providers_test.secretValue"},
		{"runtime error", func() (v any) {
			defer func() { v = recover() }()
			nilMap["x"] = 1
			return nil
		}(), "runtime.plainError: assignment to entry in nil map"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pe := recovered(tc.value)
			if pe.Value != tc.want {
				t.Errorf("Value = %q, want %q", pe.Value, tc.want)
			}
			all := pe.Error() + string(pe.Stack)
			if strings.Contains(all, "1234") || strings.Contains(strings.ToLower(all), "5ec7e75ec7") {
				t.Errorf("the error or its stack carries the panic's data:\n%s\n%s", pe.Error(), pe.Stack)
			}
			if !strings.Contains(string(pe.Stack), "signWithArray(...)") {
				t.Errorf("the stack lacks the panicking call:\n%s", pe.Stack)
			}
			if want := "provider hsm panicked in sign of key release (" + tc.want + ")"; pe.Error() != want {
				t.Errorf("Error() = %q, want %q", pe.Error(), want)
			}
		})
	}
}

//go:noinline
func sdkSign() ([]byte, error) { panic("sdk bug holding PIN 1234") }

// A call CallAside runs on a goroutine of its own (Azure's Sign) panics on
// its caller's goroutine, where the agent recovers a provider's panic: on
// its own goroutine it ended the process, out of any caller's reach. The
// PanicError keeps the stack of the call that panicked, and Recovered
// fills in what the caller knows.
func TestCallAsidePanicsOnTheCallersGoroutine(t *testing.T) {
	var pe *providers.PanicError
	func() {
		defer func() { pe = providers.Recovered(recover(), "vault", "sign", "release") }()
		_, _ = providers.CallAside(context.Background(), sdkSign)
	}()
	if pe.Provider != "vault" || pe.Op != "sign" || pe.Key != "release" || pe.Value != "string" {
		t.Fatalf("PanicError %+v", pe)
	}
	if !strings.Contains(string(pe.Stack), "sdkSign(...)") || strings.Contains(string(pe.Stack)+pe.Error(), "1234") {
		t.Fatalf("the stack is not the call's, or holds the panic's value:\n%s", pe.Stack)
	}
}
