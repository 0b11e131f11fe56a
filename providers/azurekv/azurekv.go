package azurekv

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"errors"
	"fmt"
	"math/big"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/Azure/azure-sdk-for-go/sdk/azcore"
	"github.com/Azure/azure-sdk-for-go/sdk/azcore/policy"
	"github.com/Azure/azure-sdk-for-go/sdk/azidentity"
	"github.com/Azure/azure-sdk-for-go/sdk/security/keyvault/azkeys"
	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/providers"
)

// DefaultTimeout bounds each Key Vault call when Config.Timeout is zero.
const DefaultTimeout = 2 * time.Second

// KeyConfig names one key and the Key Vault key version behind it.
type KeyConfig struct {
	// Name is the key's name in Sigil, unique across the agent's configuration.
	Name string
	// Key is the key's name in the vault.
	Key string
	// Version is a Key Vault key version; empty means the current version,
	// resolved once at Open to the concrete version the vault reports, or,
	// when that one cannot sign (disabled, outside its nbf..exp), to the
	// newest by created time that can (see openKey).
	Version string
}

// Config configures an Azure Key Vault provider.
type Config struct {
	ID       string        // provider id, part of every kid
	VaultURL string        // https://<vault>.vault.azure.net/
	Keys     []KeyConfig   // the key versions served
	Timeout  time.Duration // per Key Vault call, SDK retries included; 0 means DefaultTimeout
	// Credential authenticates to the vault. nil means the SDK's default
	// chain (azidentity.NewDefaultAzureCredential: environment, workload
	// identity, managed identity, Azure CLI, ...), never configuration text.
	Credential azcore.TokenCredential
	// DisableChallengeResourceVerification accepts a vault whose bearer
	// challenge names a resource its host is not under. By default the SDK
	// requires https://NAME.vault.azure.net (or a sovereign cloud's
	// equivalent) to be challenged for https://vault.azure.net, so that a
	// server the vault URL reaches by mistake cannot obtain a Key Vault token
	// by naming that resource. Only a vault reached by a name outside its
	// cloud's domain needs this: an emulator on loopback (sigil bench), a
	// private endpoint under a custom DNS name.
	DisableChallengeResourceVerification bool
	// ClientOptions are passed to azkeys.NewClient. Production leaves them
	// nil. Tests set a transport trusting a loopback TLS server and
	// DisableChallengeResourceVerification. A zero Retry gets this package's
	// bounded retry policy (see retryOptions).
	ClientOptions *azkeys.ClientOptions
	Logger        *zap.Logger // nil means no logging; the caller names the provider in it (the agent does)
}

// EnsureDefaults fills in the documented defaults.
func (c *Config) EnsureDefaults() {
	if c.Timeout <= 0 {
		c.Timeout = DefaultTimeout
	}
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
}

// Provider signs with Azure Key Vault keys. Its key table is replaced
// copy-on-write when NewVersion or AddKey adds a key, so Sign takes no lock.
type Provider struct {
	id      string
	timeout time.Duration
	log     *zap.Logger
	client  *azkeys.Client
	keys    providers.KeySet[*remoteKey]
	keysMu  sync.Mutex // serialises NewVersion, AddKey and DestroyKey, which check keys before slow work
	closed  atomic.Bool
	unused  providers.UnusedKeys[*remoteKey] // versions DestroyKey stopped serving; guarded by keysMu
	// throttledUntil (Unix ns): the vault answered 429 and asked for a
	// pause until then. Signs meanwhile are RATE_LIMITED here: Key Vault
	// extends throttling for clients that keep sending.
	throttledUntil atomic.Int64
}

// maxThrottlePause caps the pause a 429's Retry-After asks for;
// defaultThrottlePause is the pause when it names none.
const (
	maxThrottlePause     = time.Minute
	defaultThrottlePause = time.Second
)

// throttled returns how long the vault's last 429 asked for a pause still
// has to run, zero when none.
func (p *Provider) throttled(now time.Time) time.Duration {
	if until := p.throttledUntil.Load(); until > now.UnixNano() {
		// At most the longest pause kept: a wall clock stepped back must
		// not stretch it (an hour back held every Sign for an hour).
		return min(time.Duration(until-now.UnixNano()), maxThrottlePause)
	}
	return 0
}

// noteThrottle keeps the pause a 429 answer asks for: x-ms-retry-after-ms
// or retry-after-ms (milliseconds), else Retry-After (seconds, or an HTTP
// date), else defaultThrottlePause; at most maxThrottlePause.
func (p *Provider) noteThrottle(err error, now time.Time) {
	var re *azcore.ResponseError
	if !errors.As(err, &re) || re.StatusCode != http.StatusTooManyRequests {
		return
	}
	pause := defaultThrottlePause
	if re.RawResponse != nil {
		h := re.RawResponse.Header
		if ms, err := strconv.Atoi(h.Get("x-ms-retry-after-ms")); err == nil && ms > 0 {
			pause = time.Duration(ms) * time.Millisecond
		} else if ms, err := strconv.Atoi(h.Get("retry-after-ms")); err == nil && ms > 0 {
			pause = time.Duration(ms) * time.Millisecond
		} else if sec, err := strconv.Atoi(h.Get("Retry-After")); err == nil && sec > 0 {
			pause = time.Duration(sec) * time.Second
		} else if at, err := http.ParseTime(h.Get("Retry-After")); err == nil && at.After(now) {
			pause = at.Sub(now)
		}
	}
	until := now.Add(min(pause, maxThrottlePause)).UnixNano()
	for {
		old := p.throttledUntil.Load()
		if old >= until || p.throttledUntil.CompareAndSwap(old, until) {
			return
		}
	}
}

type remoteKey struct {
	info    providers.KeyInfo
	key     string // the key's name in the vault
	version string // the concrete key version
	uri     string // the full Key Vault key id (kid URL with version)
	kty     azkeys.KeyType
	crv     azkeys.CurveName // EC keys only
	size    int              // signature length: 2×coordinate bytes for ECDSA (raw r‖s), modulus bytes for RSA
	expires time.Time        // the version's exp when it was read; zero: none
}

var (
	_ providers.Provider = (*Provider)(nil)
	_ providers.Remote   = (*Provider)(nil)
)

// retryOptions bound the SDK's retries so that a call and its retries fit in
// one per-call deadline and a clear answer is not turned into a late
// "deadline exceeded": one quick retry of a transport failure or a 5xx, and
// none of a throttle (429), which surfaces at once as rate limited.
func retryOptions(timeout time.Duration) policy.RetryOptions {
	delay := timeout / 20
	if delay > 100*time.Millisecond {
		delay = 100 * time.Millisecond
	}
	return policy.RetryOptions{
		MaxRetries:    1,
		RetryDelay:    delay,
		MaxRetryDelay: delay,
		StatusCodes: []int{
			http.StatusInternalServerError,
			http.StatusBadGateway,
			http.StatusServiceUnavailable,
			http.StatusGatewayTimeout,
		},
	}
}

// Open creates one Key Vault client, resolves every configured key to a
// concrete version and fetches and caches its public key. Any key that
// cannot be served fails Open as a whole.
func Open(ctx context.Context, cfg Config) (*Provider, error) {
	if cfg.ID == "" {
		return nil, errors.New("azurekv provider: empty id")
	}
	if cfg.VaultURL == "" {
		return nil, fmt.Errorf("azurekv provider %s: empty vault URL: %w", cfg.ID, providers.ErrBadRequest)
	}
	cfg.EnsureDefaults()
	cred := cfg.Credential
	if cred == nil {
		c, err := azidentity.NewDefaultAzureCredential(nil)
		if err != nil {
			return nil, fmt.Errorf("azurekv provider %s: default credential: %w", cfg.ID, err)
		}
		cred = c
	}
	var opts azkeys.ClientOptions
	if cfg.ClientOptions != nil {
		opts = *cfg.ClientOptions
	}
	if opts.Transport == nil {
		// One warm connection pool, sized for the agent's concurrency
		// (providers.MaxIdleConnsPerHost); azcore's default keeps 10.
		opts.Transport = &http.Client{Transport: providers.NewHTTPTransport()}
	}
	if cfg.DisableChallengeResourceVerification {
		opts.DisableChallengeResourceVerification = true
	}
	if opts.Retry.MaxRetries == 0 && opts.Retry.StatusCodes == nil && opts.Retry.ShouldRetry == nil {
		opts.Retry = retryOptions(cfg.Timeout)
	}
	client, err := azkeys.NewClient(cfg.VaultURL, cred, &opts)
	if err != nil {
		return nil, fmt.Errorf("azurekv provider %s: client: %w", cfg.ID, err)
	}
	p := &Provider{
		id:      cfg.ID,
		timeout: cfg.Timeout,
		log:     cfg.Logger,
		client:  client,
	}
	for _, kc := range cfg.Keys {
		if _, dup := p.keys.Get(kc.Name); dup || kc.Name == "" {
			return nil, fmt.Errorf("azurekv provider %s: key %q empty or configured twice", cfg.ID, kc.Name)
		}
		k, err := p.openKey(ctx, kc)
		if err != nil {
			return nil, fmt.Errorf("azurekv provider %s: key %q: %w", cfg.ID, kc.Name, err)
		}
		if err := p.keys.Add(kc.Name, k); err != nil {
			return nil, fmt.Errorf("azurekv provider %s: key %q: %w", cfg.ID, kc.Name, err)
		}
		p.log.Info("azurekv key ready", zap.String("key", kc.Name),
			zap.String("vault_key", k.key), zap.String("version", k.version), zap.String("kid", k.info.KID))
	}
	return p, nil
}

func (p *Provider) openKey(ctx context.Context, kc KeyConfig) (*remoteKey, error) {
	if kc.Key == "" {
		return nil, fmt.Errorf("empty vault key name: %w", providers.ErrBadRequest)
	}
	op := "get key " + kc.Key
	callCtx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	// Aside, as Sign's call (see signCall): at Open, a reload or a
	// rotation's AddKey, a token fetch another call holds must not keep
	// this past its deadline. A get abandoned there changes nothing.
	resp, err := providers.CallAside(callCtx, func() (azkeys.GetKeyResponse, error) {
		return p.client.GetKey(callCtx, kc.Key, kc.Version, nil)
	})
	if err != nil {
		return nil, classify(ctx, callCtx, op, err)
	}
	k, err := p.entryOf(op, kc, resp.KeyBundle)
	var refused *unusableVersion
	if kc.Version == "" && errors.As(err, &refused) {
		return p.openNewestUsable(ctx, kc, resp.KeyBundle, refused)
	}
	return k, err
}

// maxVersionPages bounds the version listing openNewestUsable and
// disableTagged page through: Key Vault sends 25 versions a page, so a
// thousand versions, several seconds' worth of calls under the deadline.
const maxVersionPages = 40

// errTooManyVersions ends a listing that reached maxVersionPages.
var errTooManyVersions = fmt.Errorf("the key has more than %d pages of versions", maxVersionPages)

// openNewestUsable opens, for kc named without a version, the newest
// version Key Vault would sign with, when the current one (the bundle
// current, the newest) would not, as refused says. A rotation attempt that failed before its
// cut-over leaves its version disabled and newest (DestroyKey); resolved
// to it, the start failed and the agent did not start. As GCP's latest is
// the highest ENABLED version, the newest enabled version inside its
// nbf..exp, by created time (a tie by version id, so that every start
// picks the same), is served in its stead. With none, or when the
// versions cannot be listed, the current version's refusal stands.
func (p *Provider) openNewestUsable(ctx context.Context, kc KeyConfig, current azkeys.KeyBundle, refused *unusableVersion) (*remoteKey, error) {
	var best string
	var bestCreated time.Time
	now := time.Now()
	callCtx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	err := p.eachVersion(callCtx, kc.Key, func(kp *azkeys.KeyProperties) bool {
		if kp.KID == nil || kp.KID.Name() != kc.Key || kp.KID.Version() == "" || unusable(kp.Attributes, now) != "" {
			return true
		}
		var created time.Time
		if kp.Attributes != nil && kp.Attributes.Created != nil {
			created = *kp.Attributes.Created
		}
		if v := kp.KID.Version(); best == "" || created.After(bestCreated) || created.Equal(bestCreated) && v > best {
			best, bestCreated = v, created
		}
		return true
	})
	switch {
	case errors.Is(err, errTooManyVersions):
		return nil, fmt.Errorf("%w; %v to look through for one that can sign: pin a version in the configuration", refused, err)
	case err != nil:
		return nil, fmt.Errorf("%w; listing the key's versions for one that can sign failed (%v)", refused, classify(ctx, callCtx, "list versions of "+kc.Key, err))
	case best == "":
		return nil, refused
	}
	var currentVersion string
	if current.Key != nil && current.Key.KID != nil {
		currentVersion = current.Key.KID.Version()
	}
	p.log.Info("azurekv: the key's current version cannot sign; serving its newest enabled version",
		zap.String("key", kc.Name), zap.String("vault_key", kc.Key), zap.String("current", currentVersion),
		zap.String("reason", refused.why), zap.String("version", best))
	return p.openKey(ctx, KeyConfig{Name: kc.Name, Key: kc.Key, Version: best})
}

// eachVersion pages through key's versions (list-key-versions: properties,
// no key material) under callCtx, calling visit for each until it returns
// false. It returns the SDK's error unclassified, or errTooManyVersions
// after maxVersionPages pages.
func (p *Provider) eachVersion(callCtx context.Context, key string, visit func(*azkeys.KeyProperties) bool) error {
	pager := p.client.NewListKeyPropertiesVersionsPager(key, nil)
	for pages := 0; pager.More(); pages++ {
		if pages == maxVersionPages {
			return errTooManyVersions
		}
		// Aside (see signCall); a page abandoned at the deadline is
		// dropped with the pager, which nothing reads again.
		page, err := providers.CallAside(callCtx, func() (azkeys.ListKeyPropertiesVersionsResponse, error) {
			return pager.NextPage(callCtx)
		})
		if err != nil {
			return err
		}
		for _, kp := range page.Value {
			if kp != nil && !visit(kp) {
				return nil
			}
		}
	}
	return nil
}

// unusableVersion is entryOf's refusal of a version Key Vault would not
// sign with (see unusable): ErrUnavailable, and for a key named without a
// version, the cue to look for one it would sign with.
type unusableVersion struct{ op, why string }

func (e *unusableVersion) Error() string {
	return fmt.Sprintf("azurekv %s: %s: %v", e.op, e.why, providers.ErrUnavailable)
}

func (e *unusableVersion) Unwrap() error { return providers.ErrUnavailable }

// unusable says why Key Vault would not sign with a version of these
// attributes, "" when it would. It refuses (403) a disabled version and
// one outside nbf..exp alike: served, every Sign would fail, blamed on the
// identity's access.
func unusable(a *azkeys.KeyAttributes, now time.Time) string {
	switch {
	case a == nil:
		return ""
	case a.Enabled != nil && !*a.Enabled:
		return "key version is disabled"
	case a.Expires != nil && !now.Before(*a.Expires):
		return "key version expired at " + a.Expires.UTC().Format(time.RFC3339)
	case a.NotBefore != nil && now.Before(*a.NotBefore):
		return "key version not valid before " + a.NotBefore.UTC().Format(time.RFC3339)
	}
	return ""
}

// entryOf builds the served entry for kc from a key bundle the vault
// returned (get-key or create-key), checking that it names kc's key (and
// kc's version when one is given) and is not disabled.
func (p *Provider) entryOf(op string, kc KeyConfig, resp azkeys.KeyBundle) (*remoteKey, error) {
	jwk := resp.Key
	if jwk == nil || jwk.KID == nil {
		return nil, fmt.Errorf("azurekv %s: response has no key or kid: %w", op, providers.ErrUnavailable)
	}
	if name, version := jwk.KID.Name(), jwk.KID.Version(); name != kc.Key || version == "" || (kc.Version != "" && version != kc.Version) {
		return nil, fmt.Errorf("azurekv %s: response names key %q version %q: %w", op, name, version, providers.ErrUnavailable)
	}
	if why := unusable(resp.Attributes, time.Now()); why != "" {
		return nil, &unusableVersion{op: op, why: why}
	}
	var expires time.Time
	if a := resp.Attributes; a != nil && a.Expires != nil {
		expires = *a.Expires
	}
	// key_ops bound what the vault does with the key; absent means no bound.
	if jwk.KeyOps != nil && !slices.ContainsFunc(jwk.KeyOps, func(o *azkeys.KeyOperation) bool { return o != nil && *o == azkeys.KeyOperationSign }) {
		return nil, fmt.Errorf("azurekv %s: the key version's key_ops do not permit sign: %w", op, providers.ErrUnsupportedAlgorithm)
	}
	pub, size, err := publicKeyOf(jwk)
	if err != nil {
		return nil, fmt.Errorf("azurekv %s: %w", op, err)
	}
	info, err := providers.NewKeyInfo(p.id, kc.Name, pub)
	if err != nil {
		return nil, fmt.Errorf("azurekv %s: %w", op, err)
	}
	k := &remoteKey{info: info, key: kc.Key, version: jwk.KID.Version(), uri: string(*jwk.KID), kty: *jwk.Kty, size: size, expires: expires}
	if jwk.Crv != nil {
		k.crv = *jwk.Crv
	}
	return k, nil
}

// publicKeyOf converts a JSON Web Key's public half. size is the length of
// the signatures the key makes, as Key Vault returns them.
func publicKeyOf(jwk *azkeys.JSONWebKey) (crypto.PublicKey, int, error) {
	if jwk.Kty == nil {
		return nil, 0, fmt.Errorf("key has no kty: %w", providers.ErrUnsupportedAlgorithm)
	}
	switch *jwk.Kty {
	case azkeys.KeyTypeEC, azkeys.KeyTypeECHSM:
		var curve elliptic.Curve
		switch {
		case jwk.Crv != nil && *jwk.Crv == azkeys.CurveNameP256:
			curve = elliptic.P256()
		case jwk.Crv != nil && *jwk.Crv == azkeys.CurveNameP384:
			curve = elliptic.P384()
		default:
			crv := "none"
			if jwk.Crv != nil {
				crv = string(*jwk.Crv)
			}
			return nil, 0, fmt.Errorf("EC curve %s: %w", crv, providers.ErrUnsupportedAlgorithm)
		}
		n := (curve.Params().BitSize + 7) / 8
		if len(jwk.X) != n || len(jwk.Y) != n {
			return nil, 0, fmt.Errorf("EC key with %d/%d-byte coordinates on %s: %w", len(jwk.X), len(jwk.Y), curve.Params().Name, providers.ErrUnavailable)
		}
		// Uncompressed SEC 1 point, parsed by crypto/ecdh via ecdsa: this
		// checks that the point is on the curve.
		point := append(append([]byte{4}, jwk.X...), jwk.Y...)
		pub, err := ecdsa.ParseUncompressedPublicKey(curve, point)
		if err != nil {
			return nil, 0, fmt.Errorf("EC key: point not on %s: %w", curve.Params().Name, providers.ErrUnavailable)
		}
		return pub, 2 * n, nil
	case azkeys.KeyTypeRSA, azkeys.KeyTypeRSAHSM:
		if len(jwk.N) == 0 || len(jwk.E) == 0 || len(jwk.E) > 4 {
			return nil, 0, fmt.Errorf("RSA key without a usable n or e: %w", providers.ErrUnavailable)
		}
		e := new(big.Int).SetBytes(jwk.E)
		pub := &rsa.PublicKey{N: new(big.Int).SetBytes(jwk.N), E: int(e.Int64())}
		if pub.E < 3 || pub.E%2 == 0 {
			return nil, 0, fmt.Errorf("RSA key with exponent %d: %w", pub.E, providers.ErrUnsupportedAlgorithm)
		}
		return pub, pub.Size(), nil
	}
	return nil, 0, fmt.Errorf("key type %s: %w", *jwk.Kty, providers.ErrUnsupportedAlgorithm)
}

// ID implements providers.Provider.
func (p *Provider) ID() string { return p.id }

// Remote implements providers.Remote: every Sign is a network round trip.
func (p *Provider) Remote() bool { return true }

// Keys implements providers.Provider.
func (p *Provider) Keys(context.Context) ([]providers.KeyInfo, error) {
	return p.keys.Infos(func(k *remoteKey) providers.KeyInfo { return k.info }), nil
}

// Version returns the Key Vault key version a key is pinned to.
func (p *Provider) Version(name string) (string, bool) {
	k, ok := p.keys.Get(name)
	if !ok {
		return "", false
	}
	return k.version, true
}

// Sign implements providers.Provider. One deadline, min(ctx, Config.Timeout),
// covers the call, the challenge round trip and the SDK's retries.
func (p *Provider) Sign(ctx context.Context, name string, alg providers.Algorithm, digest []byte) ([]byte, error) {
	if p.closed.Load() {
		return nil, fmt.Errorf("azurekv sign %s: provider closed: %w", name, providers.ErrUnavailable)
	}
	k, ok := p.keys.Get(name)
	if !ok {
		return nil, fmt.Errorf("azurekv sign %s: %w", name, providers.ErrNotFound)
	}
	jws, err := jwsAlgorithm(k.info.Type, alg)
	if err != nil {
		return nil, fmt.Errorf("azurekv sign %s: %w", name, err)
	}
	if len(digest) != alg.Hash.Size() {
		return nil, fmt.Errorf("azurekv sign %s: digest of %d bytes for %s: %w", name, len(digest), alg, providers.ErrBadRequest)
	}
	if wait := p.throttled(time.Now()); wait > 0 {
		return nil, fmt.Errorf("azurekv sign %s: the vault asked for a pause (429), %v more: %w", name, wait.Round(time.Millisecond), providers.ErrRateLimited)
	}
	callCtx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	resp, err := p.signCall(callCtx, k, jws, digest)
	if err != nil {
		now := time.Now()
		p.noteThrottle(err, now)
		var re *azcore.ResponseError
		forbidden := errors.As(err, &re) && re.StatusCode == http.StatusForbidden
		err = classify(ctx, callCtx, "sign "+name, err)
		// A 403's reason is in the server's text, which stays out; an exp
		// passed since Open is the likely one. The vault stays the judge:
		// an exp an operator moved on signs again.
		if forbidden && !k.expires.IsZero() && !now.Before(k.expires) {
			err = fmt.Errorf("%w (the key version expired at %s)", err, k.expires.UTC().Format(time.RFC3339))
		}
		return nil, err
	}
	if resp.KID != nil && (resp.KID.Name() != k.key || resp.KID.Version() != k.version) {
		return nil, fmt.Errorf("azurekv sign %s: response names another key version: %w", name, providers.ErrUnavailable)
	}
	if len(resp.Result) != k.size {
		return nil, fmt.Errorf("azurekv sign %s: signature of %d bytes, want %d: %w", name, len(resp.Result), k.size, providers.ErrUnavailable)
	}
	if p.closed.Load() {
		return nil, fmt.Errorf("azurekv sign %s: provider closed during the call: %w", name, providers.ErrUnavailable)
	}
	sig := resp.Result
	if alg.Scheme == providers.SchemeECDSA {
		// Key Vault returns JOSE-style raw r‖s; providers.Provider promises DER.
		if sig, err = providers.ECDSARawToASN1(resp.Result); err != nil {
			return nil, fmt.Errorf("azurekv sign %s: %w", name, err)
		}
	}
	if err := providers.CheckReturned(k.info, alg, digest, sig); err != nil {
		return nil, fmt.Errorf("azurekv sign %s: %w", name, err)
	}
	return sig, nil
}

// signCall is the SDK's Sign, bounded by ctx. azcore's bearer token policy
// lets one call fetch a new token while the others wait for it, and the
// waiters do not heed their own contexts: while a slow token endpoint
// holds the fetch, a Sign with a short deadline would wait out the
// fetcher's. So the call runs aside, and the caller leaves at its deadline;
// the call ends with its context, once the fetch lets it.
//
// The call gets its own copy of the digest: the SDK encodes it on the
// call's goroutine, which may run after the caller left at its deadline
// and reused the buffer (the agent pools a request's digest).
func (p *Provider) signCall(ctx context.Context, k *remoteKey, jws azkeys.SignatureAlgorithm, digest []byte) (azkeys.SignResponse, error) {
	params := azkeys.SignParameters{Algorithm: &jws, Value: bytes.Clone(digest)}
	return providers.CallAside(ctx, func() (azkeys.SignResponse, error) {
		return p.client.Sign(ctx, k.key, k.version, params, nil)
	})
}

// Close implements providers.Provider. Sign fails with ErrUnavailable after
// it. The SDK client holds no resources beyond pooled connections.
func (p *Provider) Close() error {
	p.closed.Store(true)
	return nil
}

// jwsAlgorithm maps a Sigil algorithm on a key type to the JWS algorithm
// Key Vault signs with. Key Vault pairs an EC curve with one hash (ES256 on
// P-256, ES384 on P-384), signs RSA with any of SHA-256/384/512 (RS512 and
// PS512 too, as the wire may ask), and its PSS uses a salt as long as the
// digest, as Sigil does.
func jwsAlgorithm(t providers.KeyType, alg providers.Algorithm) (azkeys.SignatureAlgorithm, error) {
	switch {
	case t == providers.KeyECDSAP256 && alg == providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}:
		return azkeys.SignatureAlgorithmES256, nil
	case t == providers.KeyECDSAP384 && alg == providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA384}:
		return azkeys.SignatureAlgorithmES384, nil
	case t.IsRSA() && alg.Scheme == providers.SchemePKCS1v15 && alg.Hash == crypto.SHA256:
		return azkeys.SignatureAlgorithmRS256, nil
	case t.IsRSA() && alg.Scheme == providers.SchemePKCS1v15 && alg.Hash == crypto.SHA384:
		return azkeys.SignatureAlgorithmRS384, nil
	case t.IsRSA() && alg.Scheme == providers.SchemePSS && alg.Hash == crypto.SHA256:
		return azkeys.SignatureAlgorithmPS256, nil
	case t.IsRSA() && alg.Scheme == providers.SchemePSS && alg.Hash == crypto.SHA384:
		return azkeys.SignatureAlgorithmPS384, nil
	case t.IsRSA() && alg.Scheme == providers.SchemePKCS1v15 && alg.Hash == crypto.SHA512:
		return azkeys.SignatureAlgorithmRS512, nil
	case t.IsRSA() && alg.Scheme == providers.SchemePSS && alg.Hash == crypto.SHA512:
		return azkeys.SignatureAlgorithmPS512, nil
	}
	return "", fmt.Errorf("%s key cannot sign %s here: %w", t, alg, providers.ErrUnsupportedAlgorithm)
}

// safeCode admits a Key Vault error code ("Throttled", "KeyNotFound") into a
// message; anything else the server sent stays out.
var safeCode = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9_.]{0,63}$`)

// classify maps a Key Vault call's error to the provider error vocabulary.
// It keeps the HTTP status and the error code and drops the server's message
// text, so nothing the server echoes reaches a log or a client. parent is the
// caller's context, callCtx the one with the per-call deadline.
func classify(parent, callCtx context.Context, op string, err error) error {
	if errors.Is(parent.Err(), context.Canceled) {
		return fmt.Errorf("azurekv %s: %w", op, context.Canceled)
	}
	if callCtx.Err() != nil || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("azurekv %s: %w", op, context.DeadlineExceeded)
	}
	var re *azcore.ResponseError
	if errors.As(err, &re) {
		status := fmt.Sprintf("HTTP %d", re.StatusCode)
		if safeCode.MatchString(re.ErrorCode) {
			status += " " + re.ErrorCode
		}
		switch {
		case re.StatusCode == http.StatusTooManyRequests:
			return fmt.Errorf("azurekv %s: rate limited (%s): %w", op, status, providers.ErrRateLimited)
		case re.StatusCode == http.StatusUnauthorized:
			return fmt.Errorf("azurekv %s: credentials refused (%s): %w", op, status, providers.ErrUnavailable)
		case re.StatusCode == http.StatusForbidden:
			// Key Vault says 403 for an identity the access policy or RBAC
			// role does not allow, and for a disabled key version alike.
			return fmt.Errorf("azurekv %s: refused (%s: the identity's access policy or role, or a disabled key version): %w", op, status, providers.ErrUnavailable)
		case re.StatusCode == http.StatusNotFound:
			return fmt.Errorf("azurekv %s: %s: %w", op, status, providers.ErrNotFound)
		case re.StatusCode == http.StatusBadRequest:
			return fmt.Errorf("azurekv %s: rejected as invalid (%s): %w", op, status, providers.ErrBadRequest)
		}
		return fmt.Errorf("azurekv %s: %s: %w", op, status, providers.ErrUnavailable)
	}
	var afe *azidentity.AuthenticationFailedError
	if errors.As(err, &afe) {
		return fmt.Errorf("azurekv %s: credentials refused (token request failed): %w", op, providers.ErrUnavailable)
	}
	// The SDK refuses a challenge for a resource the vault's host is not
	// under with an untyped error (keyvault/internal challengeMatchError).
	if strings.Contains(err.Error(), "doesn't match the requested domain") {
		return fmt.Errorf("azurekv %s: the vault's challenge names a resource its host is not under (a vault reached outside its cloud's domain needs disable_challenge_resource_verification): %w", op, providers.ErrUnavailable)
	}
	// Transport failures, an unobtainable token, an unreadable response: no
	// answer from the vault that classifies further.
	return fmt.Errorf("azurekv %s: no usable response from the vault: %w", op, providers.ErrUnavailable)
}
