package providers

import (
	"cmp"
	"fmt"
	"runtime"
	"runtime/debug"
	"strings"
)

// PanicError is a provider call that panicked: a bug in the provider or in
// a library under it (a nil dereference in an SDK, an index out of range in
// a binding). The agent recovers it at the call (Recovered) and fails that
// call alone, so one provider's bug does not end the agent and its other
// keys and clients are served on. It wraps no sentinel of this package: the
// agent answers INTERNAL.
//
// The panic's value is not kept: it may hold whatever the provider had at
// hand (a digest, key bytes, a PIN). Value is its type, and for an error
// the Go runtime raised (a nil dereference, an index out of range) the
// runtime's own text, which is numbers and a reason.
type PanicError struct {
	Provider string // the provider's ID
	Op       string // what the caller asked of it: "sign", "generate key", ...
	Key      string // the key the call was about ("" for none)
	Value    string // see above
	Stack    []byte // the panicking goroutine's stack without argument words, at most maxPanicStack bytes
}

// maxPanicStack bounds the stack a PanicError keeps for the log: enough for
// the provider's frames and the agent's below them.
const maxPanicStack = 16 << 10

func (e *PanicError) Error() string {
	msg := "a provider's call panicked" // raised by CallAside, not recovered by a caller that names it
	if e.Provider != "" {
		msg = "provider " + e.Provider + " panicked"
	}
	if e.Op != "" {
		msg += " in " + e.Op
	}
	if e.Key != "" {
		msg += " of key " + e.Key
	}
	return msg + " (" + e.Value + ")"
}

// Recovered is the PanicError for v, a value recover returned in a call of
// op on the provider's key. Call it from the deferred function that
// recovered, so that the stack is the panic's. A v that is a PanicError
// already (CallAside raises one again on its caller's goroutine) keeps its
// stack, the call's, and gets the fields it lacks.
func Recovered(v any, provider, op, key string) *PanicError {
	if pe, ok := v.(*PanicError); ok {
		c := *pe
		c.Provider, c.Op, c.Key = cmp.Or(c.Provider, provider), cmp.Or(c.Op, op), cmp.Or(c.Key, key)
		return &c
	}
	return &PanicError{Provider: provider, Op: op, Key: key, Value: panicValue(v), Stack: stackWithoutArgs(debug.Stack())}
}

// stackWithoutArgs is a goroutine's stack as debug.Stack writes it, each
// call's argument words replaced by "...": a word may be a digest's or a
// key's bytes (an array passed by value), and the log gets none.
func stackWithoutArgs(stack []byte) []byte {
	out := make([]byte, 0, min(len(stack), maxPanicStack))
	for line := range strings.Lines(string(stack)) {
		body := strings.TrimSuffix(line, "\n")
		// A call's line: "pkg.(*T).f({0x1, 0x2}, 0x3)"; its file line starts
		// with a tab. Arguments hold no parenthesis, method receivers do.
		if !strings.HasPrefix(body, "\t") && strings.HasSuffix(body, ")") {
			if i := strings.LastIndexByte(body, '('); i > 0 {
				body = body[:i] + "(...)"
			}
		}
		if len(out)+len(body)+1 > maxPanicStack {
			break
		}
		out = append(out, body...)
		out = append(out, '\n')
	}
	return out
}

// panicValue describes a panic's value without its content, but for the
// runtime's own errors: their text is the runtime's, not the provider's.
func panicValue(v any) string {
	typ := fmt.Sprintf("%T", v)
	if re, ok := v.(runtime.Error); ok && strings.HasPrefix(strings.TrimPrefix(typ, "*"), "runtime.") {
		const max = 200
		msg := re.Error()
		if len(msg) > max {
			msg = msg[:max]
		}
		return typ + ": " + strings.ToValidUTF8(msg, "?")
	}
	return typ
}
