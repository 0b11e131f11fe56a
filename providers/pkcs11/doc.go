// Package pkcs11 is Sigil's PKCS#11 key provider: it signs with keys that
// live in a PKCS#11 token (SoftHSM2 in tests; YubiHSM2, Thales, CloudHSM in
// the field) and keeps signing when the token's sessions, login or device go
// away, without a process restart.
//
// One Provider serves one token of one module. Open logs in once, finds the
// keys named by RFC 7512 URIs, reads their public halves from the token, and
// opens a pool of sessions. A signature is C_SignInit plus one C_Sign into a
// buffer of the known signature size, made through a small cgo shim in a
// single crossing (see shim.go): ECDSA (CKM_ECDSA, the token's r‖s converted
// to ASN.1 DER), RSA PKCS#1 v1.5 (CKM_RSA_PKCS over DigestInfo‖digest), RSA-PSS
// (CKM_RSA_PKCS_PSS, MGF1 with the same hash, salt = hash length) and Ed25519
// (CKM_EDDSA over the message).
//
// Failures are classified by their CKR_ code (classify.go). A dead session is
// dropped and the signature retried once on a freshly opened one; a lost login
// or stale object handles, and a removed device or module, are repaired by a
// supervisor goroutine (log in again, find the objects again, reload the
// module and find the token again) with exponential backoff. While a repair
// runs, callers wait for it no longer than their context allows; while the
// supervisor backs off after a failed repair, they get
// providers.ErrUnavailable at once. A wrong PIN or a locked token is
// permanent: the provider fails every request with providers.ErrPINIncorrect
// or providers.ErrTokenLocked and never presents the PIN again.
//
// The PIN comes from an environment variable or a file, never from
// configuration text, and appears in no error and no log line. Open fails
// with ErrPINSource when that source gives no PIN: the token is not asked.
// It fails with ErrModuleLoad when the module path gives no PKCS#11
// library; a module that loads and whose C_Initialize fails is another
// error, since its device may come back.
//
// A Cryptoki library has one state per process, so providers on the same
// module path share it (module.go): initialized once, finalized by the last
// Close, and the login of a token shared by two providers outlives either.
package pkcs11
