// Package pkcs11module tests libsigil-pkcs11.so, Sigil's PKCS#11 front
// (docs/pkcs11-module.md). The module itself is C, in csrc/, built by
// `make build` into bin/; this package holds its tests: real programs
// (pkcs11-tool, ssh-keygen and ssh-agent, openssl with libp11's engine)
// and miekg/pkcs11 loading the module against a real agent, a fake agent
// that counts round trips and answers every result code, a fork check in
// C, a cgo shim over the module's wire codec so that Go's fuzzer can
// drive the C decoder against package proto, and a harness that runs the
// module's reading of replies (frames, key lists, key objects,
// signatures) under AddressSanitizer and UBSan over hostile replies.
package pkcs11module
