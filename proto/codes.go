package proto

import "strconv"

// Code is a stable result code. Numbers and names never change meaning; new
// codes are appended.
type Code uint16

const (
	OK                   Code = 0
	BadRequest           Code = 1
	UnsupportedVersion   Code = 2
	Unauthenticated      Code = 3
	PermissionDenied     Code = 4
	NotFound             Code = 5
	UnsupportedAlgorithm Code = 6
	RateLimited          Code = 7
	QuotaExceeded        Code = 8
	OutsideWindow        Code = 9
	Paused               Code = 10
	KeyRetired           Code = 11
	PINIncorrect         Code = 12
	TokenLocked          Code = 13
	Unavailable          Code = 14
	DeadlineExceeded     Code = 15
	JournalUnavailable   Code = 16
	Internal             Code = 17

	// CodeOutOfRange is what the decoder reads for a code too large for
	// Code: 65535 and every number past it (code is a uint on the wire).
	// No code will ever be numbered so; like any code this version does
	// not know (a newer agent's), it is an error, never OK.
	CodeOutOfRange Code = 0xffff
)

var codeNames = [...]string{
	OK:                   "OK",
	BadRequest:           "BAD_REQUEST",
	UnsupportedVersion:   "UNSUPPORTED_VERSION",
	Unauthenticated:      "UNAUTHENTICATED",
	PermissionDenied:     "PERMISSION_DENIED",
	NotFound:             "NOT_FOUND",
	UnsupportedAlgorithm: "UNSUPPORTED_ALGORITHM",
	RateLimited:          "RATE_LIMITED",
	QuotaExceeded:        "QUOTA_EXCEEDED",
	OutsideWindow:        "OUTSIDE_WINDOW",
	Paused:               "PAUSED",
	KeyRetired:           "KEY_RETIRED",
	PINIncorrect:         "PIN_INCORRECT",
	TokenLocked:          "TOKEN_LOCKED",
	Unavailable:          "UNAVAILABLE",
	DeadlineExceeded:     "DEADLINE_EXCEEDED",
	JournalUnavailable:   "JOURNAL_UNAVAILABLE",
	Internal:             "INTERNAL",
}

// Codes lists every defined code in numeric order.
func Codes() []Code {
	out := make([]Code, len(codeNames))
	for i := range codeNames {
		out[i] = Code(i)
	}
	return out
}

// String returns the code's stable name, or CODE_<n> for a number this
// version does not know (a newer peer's code), CODE_65535+ for
// CodeOutOfRange.
func (c Code) String() string {
	switch {
	case int(c) < len(codeNames):
		return codeNames[c]
	case c == CodeOutOfRange:
		return "CODE_" + strconv.Itoa(int(c)) + "+"
	}
	return "CODE_" + strconv.Itoa(int(c))
}

// ParseCode maps a stable name back to its code.
func ParseCode(name string) (Code, bool) {
	for i, n := range codeNames {
		if n == name {
			return Code(i), true
		}
	}
	return 0, false
}

// Error is a non-OK reply as a Go error, so callers can errors.As it and
// switch on Code.
type Error struct {
	Code Code
	Msg  string
}

func (e *Error) Error() string {
	if e.Msg == "" {
		return e.Code.String()
	}
	return e.Code.String() + ": " + e.Msg
}

// Is makes errors.Is(err, &proto.Error{Code: c}) match on the code alone.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == e.Code
}
