// Package providers defines the one contract every key backend of Sigil satisfies
// (software, PKCS#11, cloud KMS), and the pieces they share: key identity (kid),
// signature algorithms, request validation and the provider error vocabulary that
// the agent maps to wire codes.
//
// A provider never sees a tenant or a policy; the agent has already decided that a
// request may be signed before it calls Sign. Providers sign digests (pure Ed25519
// signs the message itself) and never export private key material.
package providers
