package agent

import "context"

// WithSignedHook makes the agent call hook after each Sign whose signature
// was made and kept, before its record is appended, with the request's
// context (which ends with the connection). Tests use it to hang up the
// client in exactly that window.
func WithSignedHook(hook func(request context.Context)) Option {
	return func(o *options) { o.signedHook = hook }
}
