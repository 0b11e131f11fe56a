// Package gcpkms is a Sigil provider whose keys live in Google Cloud KMS.
//
// Each configured key is one CryptoKeyVersion: either named in full, or a
// CryptoKey with version "latest", resolved once at Open to its highest
// ENABLED version. Open fetches every public key once (checking the PEM's
// CRC32C) and caches it; Sign sends the digest to AsymmetricSign, with
// CRC32C integrity checks in both directions.
//
// A GCP key version is bound to one algorithm (EC_SIGN_P256_SHA256,
// RSA_SIGN_PSS_2048_SHA256, EC_SIGN_ED25519, ...), so a key signs with
// exactly one providers.Algorithm; any other is
// providers.ErrUnsupportedAlgorithm. An Ed25519 version signs pure Ed25519
// (RFC 8032): Sign's input is the message, sent whole as the request's data
// (data_crc32c and verified_data_crc32c checked, as for a digest); a message
// over Cloud KMS's 64 KiB is providers.ErrBadRequest without a call.
//
// Credentials come from the SDK's default chain (Application Default
// Credentials), never from configuration text. One gRPC client is opened per
// provider and reused; every call has a deadline (Config.Timeout, default
// 2 s). The SDK's retries are off for AsymmetricSign; the reads that serve a
// key, the polls of a new version's state and the destruction of a version
// a failed rotation made retry UNAVAILABLE within the deadline (readRetry). gRPC status codes map to the provider error
// vocabulary in one place, classify.
package gcpkms
