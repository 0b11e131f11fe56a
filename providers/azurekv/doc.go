// Package azurekv is a Sigil provider whose keys live in Azure Key Vault (or
// a Managed HSM), reached through the azkeys SDK.
//
// Each configured key is one Key Vault key version: named explicitly, or
// left empty and resolved once at Open to the key's current version (the
// version in the kid GetKey returns). Open fetches every public key once as
// a JSON Web Key (EC P-256/P-384 or RSA) and caches it, refusing a version
// the vault will not sign with (disabled, outside nbf/exp, key_ops without
// sign); Sign sends only the digest, with the JWS algorithm name: ES256 on
// P-256, ES384 on P-384, and RS256/RS384/RS512 (PKCS#1 v1.5) or
// PS256/PS384/PS512 (PSS, salt = hash length) on RSA. Anything else is
// providers.ErrUnsupportedAlgorithm, refused before any network call. Key
// Vault returns ECDSA signatures as raw r‖s; Sign converts them to ASN.1
// DER as providers.Provider promises.
//
// Credentials come from Config.Credential or, when nil, the SDK's default
// chain (azidentity.NewDefaultAzureCredential), never from configuration
// text; the SDK's challenge flow picks the tenant and scope from the vault's
// 401. One azkeys.Client is opened per provider and reused. Every call has
// one deadline, min(ctx, Config.Timeout) (default 2 s), which also bounds the
// SDK's retries: one quick retry of a transport failure or a 5xx, none of a
// 429. HTTP statuses map to the provider error vocabulary in one place,
// classify, keeping the status and Key Vault's error code and dropping the
// server's message text: 429 → providers.ErrRateLimited (RATE_LIMITED), 401/403 → credentials refused
// (both providers.ErrUnavailable), 404 → providers.ErrNotFound, 400 →
// providers.ErrBadRequest, others → providers.ErrUnavailable.
package azurekv
