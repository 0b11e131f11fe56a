package pkcs11

import (
	p11 "github.com/miekg/pkcs11"
)

// faultClass says what a module return value means for the session, the
// login and the library, and so what the provider does about it.
type faultClass uint8

const (
	faultNone faultClass = iota
	// faultRequest: the request itself is wrong for this key (mechanism,
	// data length). Nothing is broken; no retry.
	faultRequest
	// faultTransient: the call failed but nothing is known to be broken
	// (memory pressure, a cancelled function). Retried once on another
	// session; the session stays in the pool.
	faultTransient
	// faultSessionGone: the session no longer exists (closed behind our back,
	// or by the token). It is dropped without C_CloseSession: the module may
	// already have given its number to a new session.
	faultSessionGone
	// faultSessionBroken: the session exists but cannot be trusted (an
	// operation left active, a device error). It is closed and replaced.
	faultSessionBroken
	// faultLogin: the login is gone or the object handles are stale (after
	// a logout or re-login every handle may change). The supervisor logs in
	// again and finds the objects anew.
	faultLogin
	// faultDevice: the token or the library is gone. The supervisor reloads
	// the module (C_Finalize, C_Initialize) and finds the token again.
	faultDevice
	// faultPIN and faultLocked are permanent: the PIN is never retried.
	faultPIN
	faultLocked
)

func (c faultClass) String() string {
	switch c {
	case faultNone:
		return "none"
	case faultRequest:
		return "request"
	case faultTransient:
		return "transient"
	case faultSessionGone:
		return "session-gone"
	case faultSessionBroken:
		return "session-broken"
	case faultLogin:
		return "login-lost"
	case faultDevice:
		return "device-gone"
	case faultPIN:
		return "pin-incorrect"
	case faultLocked:
		return "token-locked"
	}
	return "unknown"
}

// classify maps a CKR_ value to its class. A value not listed is treated as a
// broken session: replacing a session costs microseconds, and keeping a
// session in an unknown state risks every later request on it.
func classify(rv uint) faultClass {
	switch rv {
	case p11.CKR_OK:
		return faultNone

	case p11.CKR_MECHANISM_INVALID, p11.CKR_MECHANISM_PARAM_INVALID,
		p11.CKR_KEY_TYPE_INCONSISTENT, p11.CKR_KEY_FUNCTION_NOT_PERMITTED,
		p11.CKR_KEY_SIZE_RANGE, p11.CKR_DATA_INVALID, p11.CKR_DATA_LEN_RANGE,
		p11.CKR_ARGUMENTS_BAD, p11.CKR_FUNCTION_NOT_SUPPORTED:
		return faultRequest

	case p11.CKR_HOST_MEMORY, p11.CKR_DEVICE_MEMORY, p11.CKR_FUNCTION_FAILED,
		p11.CKR_FUNCTION_CANCELED, p11.CKR_SESSION_COUNT, p11.CKR_CANT_LOCK:
		return faultTransient

	case p11.CKR_SESSION_HANDLE_INVALID, p11.CKR_SESSION_CLOSED:
		return faultSessionGone

	case p11.CKR_OPERATION_ACTIVE, p11.CKR_OPERATION_NOT_INITIALIZED,
		p11.CKR_BUFFER_TOO_SMALL, p11.CKR_DEVICE_ERROR, p11.CKR_GENERAL_ERROR:
		return faultSessionBroken

	// SoftHSM answers a signature with a key handle from before a logout with
	// CKR_OBJECT_HANDLE_INVALID, and the old handle stays invalid after the
	// next login: handles must be found again.
	case p11.CKR_USER_NOT_LOGGED_IN, p11.CKR_OBJECT_HANDLE_INVALID,
		p11.CKR_KEY_HANDLE_INVALID, p11.CKR_KEY_CHANGED:
		return faultLogin

	case p11.CKR_DEVICE_REMOVED, p11.CKR_TOKEN_NOT_PRESENT, p11.CKR_TOKEN_NOT_RECOGNIZED,
		p11.CKR_CRYPTOKI_NOT_INITIALIZED, p11.CKR_SLOT_ID_INVALID:
		return faultDevice

	case p11.CKR_PIN_INCORRECT, p11.CKR_PIN_INVALID, p11.CKR_PIN_LEN_RANGE, p11.CKR_PIN_EXPIRED:
		return faultPIN
	case p11.CKR_PIN_LOCKED:
		return faultLocked
	}
	return faultSessionBroken
}

// repairLevel is how much the supervisor must rebuild; a higher level does
// everything a lower one does.
type repairLevel uint8

const (
	repairNone repairLevel = iota
	// repairSweep: check idle sessions, replace dead ones, refill the pool.
	repairSweep
	// repairLogin: log in again (if the token says we are not), find every
	// key object again, then sweep.
	repairLogin
	// repairReload: reload the module, find the token's slot, open sessions,
	// log in, find the objects.
	repairReload
)

func (l repairLevel) String() string {
	switch l {
	case repairSweep:
		return "sweep"
	case repairLogin:
		return "relogin"
	case repairReload:
		return "reload"
	}
	return "none"
}

func (c faultClass) repair() repairLevel {
	switch c {
	case faultSessionGone, faultSessionBroken:
		return repairSweep
	case faultLogin:
		return repairLogin
	case faultDevice:
		return repairReload
	}
	return repairNone
}
