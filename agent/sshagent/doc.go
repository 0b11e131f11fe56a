// Package sshagent serves the OpenSSH agent protocol
// (golang.org/x/crypto/ssh/agent) in front of keys held by Sigil, so that
// ssh, ssh-add -L and ssh-keygen -Y sign can use HSM- or KMS-held keys.
//
// The front holds no keys. Each accepted connection gets a Backend from the
// caller (the Sigil agent), chosen by the peer's identity: the Backend lists
// only the SSH-enabled keys the peer's tenant may use and signs through the
// same policy check and audit journal as Sigil's own wire protocol.
// A signature the front refuses itself (a key the Backend does not list,
// plain ssh-rsa) is handed to Backend.Refused, so that it is journaled as
// the wire protocol's refusals are.
//
// SSH signs a whole payload while Sigil providers sign digests, so the front
// prepares what the provider signs:
//
//   - Ed25519: the payload itself (pure Ed25519), format ssh-ed25519.
//   - ECDSA P-256: SHA-256 of the payload, format ecdsa-sha2-nistp256;
//     P-384: SHA-384, ecdsa-sha2-nistp384. The provider's ASN.1 DER
//     signature is re-encoded as SSH's pair of mpints (r, s).
//   - RSA: PKCS#1 v1.5 with SHA-256 (rsa-sha2-256) or SHA-512
//     (rsa-sha2-512), as the client's signature flags ask. Plain ssh-rsa
//     (SHA-1) is refused.
//
// Keys are listed with the key's name as the comment. Adding, removing,
// locking and unlocking are refused: keys live in the HSM, not in the
// agent. Extensions are unsupported.
//
// The agent protocol's failure reply carries no reason, so every refusal is
// logged on the front's logger with the connection's key name and cause.
package sshagent
