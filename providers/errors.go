package providers

import "errors"

// The provider error vocabulary. Providers wrap these with context
// (fmt.Errorf("pkcs11 sign %s: %w", name, ErrUnavailable)); the agent maps them
// to wire codes in one place. context.DeadlineExceeded and context.Canceled
// pass through unwrapped-or-wrapped as they are.
var (
	// ErrNotFound: the provider has no key of that name.
	ErrNotFound = errors.New("key not found")
	// ErrUnsupportedAlgorithm: the key cannot sign with the requested scheme/hash.
	ErrUnsupportedAlgorithm = errors.New("unsupported algorithm for key")
	// ErrBadRequest: the input is malformed (for example a digest whose length
	// does not match the named hash).
	ErrBadRequest = errors.New("bad request")
	// ErrUnavailable: the backend cannot sign right now (no working session,
	// device removed, provider closed). Transient: a later call may succeed.
	ErrUnavailable = errors.New("provider unavailable")
	// ErrPINIncorrect: the token refused the PIN. Never retried automatically.
	ErrPINIncorrect = errors.New("PIN incorrect")
	// ErrTokenLocked: the token's PIN is locked.
	ErrTokenLocked = errors.New("token locked")
	// ErrRateLimited: the backend throttled the call (a cloud KMS quota).
	// Transient: retry later.
	ErrRateLimited = errors.New("rate limited by the key service")
	// ErrInvalidSignature: Verify found the signature does not match.
	ErrInvalidSignature = errors.New("invalid signature")
	// ErrInUse: a key a DestroyKey was asked to destroy is in use (a
	// version of a slot, served for another purpose, named by an alias
	// others use) and is kept. Not transient: asking again changes nothing.
	ErrInUse = errors.New("the key is in use")
)
