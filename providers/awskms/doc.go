// Package awskms is a Sigil provider whose keys live in AWS KMS.
//
// Each configured key is an asymmetric SIGN_VERIFY KMS key named by key id,
// key ARN, alias ("alias/name") or alias ARN. Open resolves it once through
// GetPublicKey to the key's ARN, caches the DER SubjectPublicKeyInfo it
// returns, and records which algorithms the key allows from its KeySpec and
// SigningAlgorithms: ECDSA_SHA_256/384/512 for ECC_NIST_P256/P384 keys,
// RSASSA_PKCS1_V1_5_SHA_256/384/512 and RSASSA_PSS_SHA_256/384/512 for
// RSA_2048/3072/4096 keys, and ED25519_SHA_512 (pure Ed25519) for
// ECC_NIST_EDWARDS25519 keys. Sign sends only the digest (MessageType DIGEST)
// to the resolved ARN, or for Ed25519 the message itself (MessageType RAW, at
// most MaxEd25519Message bytes, longer ones providers.ErrBadRequest without a
// call), so a key repointed behind an alias takes effect at the next Open,
// never between a cached public key and a signature. Any other algorithm
// (Ed25519ph among them) is providers.ErrUnsupportedAlgorithm, refused without
// a call. ECDSA signatures come back ASN.1 DER, RSA ones raw and Ed25519 ones
// as 64 bytes, as providers.Provider promises.
//
// Credentials come from the SDK's default chain (config.LoadDefaultConfig:
// environment, shared files, SSO, web identity, container and instance
// roles), never from configuration text; Config.Credentials exists for tests
// against an emulator. One kms.Client is built per provider and reused; every
// call has a deadline (Config.Timeout, default 2 s) that covers the SDK's own
// retries: its standard retryer retries transient server and connection
// errors, never throttling, with its backoff capped at a quarter of the
// timeout so retries fit inside the deadline; a pause an answer asks for
// (X-Amz-Retry-After) is taken only when it fits under that cap and in what
// is left of the deadline, else the call ends at once. API error codes map
// to the provider error vocabulary in one place, classify: throttling (any
// throttling code, any 429) is ErrRateLimited (RATE_LIMITED), refused
// credentials ErrUnavailable "credentials refused", NotFoundException ErrNotFound,
// disabled or pending-deletion keys ErrUnavailable "key not usable",
// ValidationException and InvalidKeyUsage ErrBadRequest, and an expired
// deadline context.DeadlineExceeded. Messages keep the error code and drop the
// server's text; digests never appear in them.
//
// Tests run against the AWS KMS emulator github.com/nsmithuk/local-kms (see
// package awskmstest), behind a front that adds the Ed25519 keys it lacks. Known difference: local-kms signs RSA-PSS with the
// maximum salt length, where AWS KMS uses a salt as long as the digest.
// providers.Verify uses rsa.PSSSaltLengthAuto, so both verify; a verifier
// that insists on a hash-length salt accepts AWS's signatures but not the
// emulator's.
package awskms
