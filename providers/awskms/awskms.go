package awskms

import (
	"context"
	"crypto"
	"crypto/x509"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	awshttp "github.com/aws/aws-sdk-go-v2/aws/transport/http"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"
	"github.com/aws/smithy-go"
	smithyhttp "github.com/aws/smithy-go/transport/http"
	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/providers"
)

// DefaultTimeout bounds each KMS call when Config.Timeout is zero.
const DefaultTimeout = 2 * time.Second

// MaxEd25519Message is the longest message an Ed25519 key signs: KMS signs
// pure Ed25519 over the message itself (MessageType RAW), and Sign takes at
// most 4096 bytes of it.
const MaxEd25519Message = 4096

// KeyConfig names one key and the AWS KMS key behind it.
type KeyConfig struct {
	// Name is the key's name in Sigil, unique across the agent's configuration.
	Name string
	// KeyID is a key id, a key ARN, an alias ("alias/name") or an alias ARN.
	// Open resolves it once to the key ARN it names and signs with that ARN,
	// so the cached public key and the signing key cannot drift apart.
	KeyID string
}

// Config configures an AWS KMS provider.
type Config struct {
	ID     string // provider id, part of every kid
	Region string // AWS region, for example eu-west-1; empty means the SDK's default chain
	// Endpoint overrides the KMS endpoint (for example a local-kms emulator,
	// http://127.0.0.1:PORT); empty means the region's AWS endpoint.
	Endpoint string
	Keys     []KeyConfig   // the keys served
	Timeout  time.Duration // per KMS call, SDK retries included; 0 means DefaultTimeout
	Logger   *zap.Logger   // nil means no logging; the caller names the provider in it (the agent does)
	// Credentials, when set, replace the SDK's default credential chain. Only
	// tests set it (static credentials for an emulator); production leaves it
	// nil, and credentials never come from configuration text.
	Credentials aws.CredentialsProvider
	// ClientOptions adjust the KMS client after the defaults above, for tests
	// (an instrumented HTTP client, for example).
	ClientOptions []func(*kms.Options)
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

// Provider signs with AWS KMS asymmetric keys. Its key table is replaced
// whole (copy on write) when NewVersion or AddKey adds a key, so Sign takes
// no lock.
type Provider struct {
	id      string
	timeout time.Duration
	log     *zap.Logger
	client  *kms.Client
	keys    providers.KeySet[*remoteKey]
	keysMu  sync.Mutex // serializes NewVersion, AddKey and DestroyKey, which check keys before slow work
	closed  atomic.Bool
	unused  providers.UnusedKeys[*remoteKey] // keys DestroyKey stopped serving; guarded by keysMu
}

type remoteKey struct {
	info  providers.KeyInfo
	keyID string                                             // the key ARN KMS resolved the configured id to
	spec  types.KeySpec                                      // the key's spec, for creating its next version
	alias string                                             // "alias/name" when the key is served through that alias, else ""
	algs  map[providers.Algorithm]types.SigningAlgorithmSpec // what the key may sign with
	// movedFrom is the ARN of the key NewVersion moved alias from to this
	// key, and movedBase the name that key is served under: DestroyKey
	// moves the alias back to it. Both "" for a key whose alias this
	// provider did not move (one opened through its alias).
	movedFrom string
	movedBase string
}

// aliasName returns the alias name ("alias/name") a configured key id names,
// or "" when it names a key by id or key ARN.
func aliasName(keyID string) string {
	if strings.HasPrefix(keyID, "alias/") {
		return keyID
	}
	if strings.HasPrefix(keyID, "arn:") {
		if i := strings.Index(keyID, ":alias/"); i >= 0 {
			return keyID[i+1:]
		}
	}
	return ""
}

var (
	_ providers.Provider = (*Provider)(nil)
	_ providers.Remote   = (*Provider)(nil)
)

// Open builds one KMS client, then fetches and caches every configured key's
// public key and signing algorithms. Any key that cannot be served fails Open
// as a whole: a half-configured provider would fail later, per request.
func Open(ctx context.Context, cfg Config) (*Provider, error) {
	if cfg.ID == "" {
		return nil, errors.New("awskms provider: empty id")
	}
	cfg.EnsureDefaults()
	// One warm connection pool for the provider, sized for the agent's
	// concurrency (providers.MaxIdleConnsPerHost).
	loadOpts := []func(*config.LoadOptions) error{
		config.WithHTTPClient(awshttp.NewBuildableClient().WithTransportOptions(func(tr *http.Transport) {
			tr.MaxIdleConns = 2 * providers.MaxIdleConnsPerHost
			tr.MaxIdleConnsPerHost = providers.MaxIdleConnsPerHost
		})),
	}
	if cfg.Region != "" {
		loadOpts = append(loadOpts, config.WithRegion(cfg.Region))
	}
	if cfg.Credentials != nil {
		loadOpts = append(loadOpts, config.WithCredentialsProvider(cfg.Credentials))
	}
	awsCfg, err := config.LoadDefaultConfig(ctx, loadOpts...)
	if err != nil {
		return nil, fmt.Errorf("awskms provider %s: load AWS configuration: %w", cfg.ID, err)
	}
	if awsCfg.Region == "" {
		return nil, fmt.Errorf("awskms provider %s: no region configured: %w", cfg.ID, providers.ErrBadRequest)
	}
	// The SDK's standard retryer, for transient 5xx and connection resets
	// only, with a jittered backoff capped so that retries fit inside the
	// per-call deadline instead of outliving it. Throttling is not
	// retried, whatever HTTP status carries it: it is RATE_LIMITED at
	// once, for the client to back off, rather than three requests per
	// signature to a service that is already refusing, in step with every
	// other caller's. retryPolicy keeps a pause the service asks for
	// inside the same bounds.
	maxBackoff := cfg.Timeout / 4
	opts := []func(*kms.Options){func(o *kms.Options) {
		if cfg.Endpoint != "" {
			o.BaseEndpoint = aws.String(cfg.Endpoint)
		}
		o.Retryer = retryPolicy{maxPause: maxBackoff, Standard: retry.NewStandard(func(so *retry.StandardOptions) {
			so.MaxBackoff = maxBackoff
			so.Backoff = jitterBackoff{max: maxBackoff}
			so.Retryables = []retry.IsErrorRetryable{
				retry.NoRetryCanceledError{},
				retry.IsErrorRetryableFunc(func(err error) aws.Ternary {
					if throttled(err) {
						return aws.FalseTernary
					}
					return aws.UnknownTernary
				}),
				retry.RetryableError{},
				retry.RetryableConnectionError{},
				retry.RetryableHTTPStatusCode{Codes: retry.DefaultRetryableHTTPStatusCodes},
				retry.RetryableErrorCode{Codes: retry.DefaultRetryableErrorCodes},
			}
		})}
	}}
	opts = append(opts, cfg.ClientOptions...)
	client := kms.NewFromConfig(awsCfg, opts...)
	p := &Provider{
		id:      cfg.ID,
		timeout: cfg.Timeout,
		log:     cfg.Logger,
		client:  client,
	}
	for _, kc := range cfg.Keys {
		if _, dup := p.keys.Get(kc.Name); dup || kc.Name == "" {
			return nil, fmt.Errorf("awskms provider %s: key %q empty or configured twice", cfg.ID, kc.Name)
		}
		k, err := p.openKey(ctx, kc)
		if err != nil {
			return nil, fmt.Errorf("awskms provider %s: key %q: %w", cfg.ID, kc.Name, err)
		}
		if err := p.keys.Add(kc.Name, k); err != nil {
			return nil, fmt.Errorf("awskms provider %s: key %q: %w", cfg.ID, kc.Name, err)
		}
		p.log.Info("awskms key ready", zap.String("key", kc.Name),
			zap.String("key_id", k.keyID), zap.Int("algorithms", len(k.algs)), zap.String("kid", k.info.KID))
	}
	return p, nil
}

func (p *Provider) openKey(ctx context.Context, kc KeyConfig) (*remoteKey, error) {
	if kc.KeyID == "" {
		return nil, fmt.Errorf("empty key id: %w", providers.ErrBadRequest)
	}
	callCtx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	out, err := p.client.GetPublicKey(callCtx, &kms.GetPublicKeyInput{KeyId: aws.String(kc.KeyID)})
	if err != nil {
		return nil, classify(ctx, callCtx, "get public key "+kc.KeyID, err)
	}
	if out.KeyUsage != types.KeyUsageTypeSignVerify {
		return nil, fmt.Errorf("key %s has usage %s, not SIGN_VERIFY: %w", kc.KeyID, out.KeyUsage, providers.ErrUnsupportedAlgorithm)
	}
	keyID := aws.ToString(out.KeyId)
	if keyID == "" {
		return nil, fmt.Errorf("get public key %s: response names no key: %w", kc.KeyID, providers.ErrUnavailable)
	}
	want, err := keyTypeOf(out.KeySpec)
	if err != nil {
		return nil, fmt.Errorf("key %s: %w", kc.KeyID, err)
	}
	pub, err := x509.ParsePKIXPublicKey(out.PublicKey)
	if err != nil {
		return nil, fmt.Errorf("key %s: public key: %v: %w", kc.KeyID, err, providers.ErrUnavailable)
	}
	info, err := providers.NewKeyInfo(p.id, kc.Name, pub)
	if err != nil {
		return nil, fmt.Errorf("key %s: %w", kc.KeyID, err)
	}
	// The key spec and the public key come from one response; a mismatch
	// means a key we do not understand, so refuse it rather than sign wrong.
	if info.Type != want {
		return nil, fmt.Errorf("key %s: key spec %s but a %s public key: %w", kc.KeyID, out.KeySpec, info.Type, providers.ErrUnsupportedAlgorithm)
	}
	algs := make(map[providers.Algorithm]types.SigningAlgorithmSpec, len(out.SigningAlgorithms))
	for _, spec := range out.SigningAlgorithms {
		alg, ok := algorithmOf(spec)
		if !ok {
			continue // an algorithm Sigil does not offer (SM2DSA, ML-DSA, ...)
		}
		var probe []byte // pure Ed25519 signs a message, of any length
		if alg.Hash != 0 {
			probe = make([]byte, alg.Hash.Size())
		}
		if providers.CheckRequest(info.Type, alg, probe) != nil {
			continue
		}
		algs[alg] = spec
	}
	if len(algs) == 0 {
		return nil, fmt.Errorf("key %s: no signing algorithm Sigil supports: %w", kc.KeyID, providers.ErrUnsupportedAlgorithm)
	}
	return &remoteKey{info: info, keyID: keyID, spec: out.KeySpec, alias: aliasName(kc.KeyID), algs: algs}, nil
}

// ID implements providers.Provider.
func (p *Provider) ID() string { return p.id }

// Remote implements providers.Remote: every Sign is a network round trip.
func (p *Provider) Remote() bool { return true }

// Keys implements providers.Provider.
func (p *Provider) Keys(context.Context) ([]providers.KeyInfo, error) {
	return p.keys.Infos(func(k *remoteKey) providers.KeyInfo { return k.info }), nil
}

// KeyARN returns the key ARN a key's configured id resolved to when the key
// was first served.
func (p *Provider) KeyARN(name string) (string, bool) {
	k, ok := p.keys.Get(name)
	if !ok {
		return "", false
	}
	return k.keyID, true
}

// URI returns the key ARN of a served key: what a later configuration (or
// AddKey after a restart) names the key by. Unlike the configured id it
// never follows an alias, so it keeps naming this key after a rotation.
func (p *Provider) URI(name string) (string, error) {
	k, ok := p.keys.Get(name)
	if !ok {
		return "", fmt.Errorf("awskms uri %s: %w", name, providers.ErrNotFound)
	}
	return k.keyID, nil
}

// NewVersion rotates the served key base: AWS KMS has no versions of an
// asymmetric key, so it creates a new SIGN_VERIFY key of base's key spec and
// serves it under name. When base was configured through an alias, the alias
// is pointed at the new key, but only once the new key's public key was
// fetched and checked; any failure before that leaves the alias on the old
// key (and schedules the unused new key for deletion, best effort). A failed
// alias update is checked against where the alias points (updateAlias): the
// new key is deleted only when the alias is known not to name it. The old
// key stays served under base. The alias moves at once, before the
// rotation's CSR and canaries: when the attempt fails, DestroyKey moves it
// back.
func (p *Provider) NewVersion(ctx context.Context, base, name string) (providers.KeyInfo, error) {
	fail := func(err error) (providers.KeyInfo, error) {
		return providers.KeyInfo{}, fmt.Errorf("awskms provider %s: new version %s of %s: %w", p.id, name, base, err)
	}
	if name == "" {
		return fail(fmt.Errorf("empty key name: %w", providers.ErrBadRequest))
	}
	if p.closed.Load() {
		return fail(fmt.Errorf("provider closed: %w", providers.ErrUnavailable))
	}
	p.keysMu.Lock()
	defer p.keysMu.Unlock()
	bk, ok := p.keys.Get(base)
	if !ok {
		return fail(providers.ErrNotFound)
	}
	if _, dup := p.keys.Get(name); dup {
		return fail(fmt.Errorf("a key is already served under this name: %w", providers.ErrBadRequest))
	}

	createCtx, cancel := context.WithTimeout(ctx, p.timeout)
	created, err := p.client.CreateKey(createCtx, &kms.CreateKeyInput{
		KeySpec:     bk.spec,
		KeyUsage:    types.KeyUsageTypeSignVerify,
		Description: aws.String(fmt.Sprintf("Sigil provider %s: key %s, rotation of key %s (%s)", p.id, name, base, bk.keyID)),
	}, func(o *kms.Options) {
		// Not idempotent: a 5xx may come after the key was made, and each
		// retry would make another, none of them ever deleted.
		o.Retryer = retry.AddWithMaxAttempts(o.Retryer, 1)
	})
	if err != nil {
		// Classified before cancel: a cancelled callCtx reads as the
		// deadline having passed, whatever the error was.
		err = classify(ctx, createCtx, "create key", err)
		cancel()
		return fail(err)
	}
	cancel()
	if created.KeyMetadata == nil || aws.ToString(created.KeyMetadata.Arn) == "" {
		return fail(fmt.Errorf("create key: response names no key: %w", providers.ErrUnavailable))
	}
	newARN := aws.ToString(created.KeyMetadata.Arn)
	discard := func(err error) (providers.KeyInfo, error) {
		p.deleteKey(ctx, newARN)
		return fail(err)
	}

	k, err := p.openKey(ctx, KeyConfig{Name: name, KeyID: newARN})
	if err != nil {
		return discard(err)
	}
	if k.keyID != newARN {
		return discard(fmt.Errorf("get public key %s: response names another key: %w", newARN, providers.ErrUnavailable))
	}
	if k.info.Type != bk.info.Type {
		return discard(fmt.Errorf("new key is a %s key, not %s: %w", k.info.Type, bk.info.Type, providers.ErrUnavailable))
	}

	if bk.alias != "" {
		if deletable, err := p.updateAlias(ctx, bk.alias, newARN, true); err != nil {
			if !deletable {
				return fail(fmt.Errorf("%w, so that key was left in place, not scheduled for deletion: check the alias, and delete the key that it does not name", err))
			}
			return discard(err)
		}
		// The alias now follows the new version: a later rotation of
		// name moves it again, one of base no longer does (unless
		// DestroyKey moves the alias back to base).
		k.alias, k.movedFrom, k.movedBase = bk.alias, bk.keyID, base
		ob := *bk
		ob.alias = ""
		if err := p.keys.Replace(base, &ob); err != nil {
			return fail(err)
		}
	}
	if err := p.keys.Add(name, k); err != nil {
		return fail(err)
	}
	p.log.Info("awskms key version created", zap.String("key", name),
		zap.String("base", base), zap.String("key_id", k.keyID), zap.String("alias", k.alias), zap.String("kid", k.info.KID))
	return k.info, nil
}

// updateAlias points alias at the key newARN. A failed UpdateAlias may have
// been applied all the same (the server wrote it, then the answer was lost
// to a deadline or came back a 5xx), and deleting a key the alias names
// breaks every user of the alias. Only a 4xx answer says it was not
// applied: then the error comes back with deletable true. Otherwise it is
// sent once more (pointing an alias at the same key again is idempotent),
// and the alias read back; a read showing newARN means done (nil), but a
// read showing the old key proves nothing, since KMS is eventually
// consistent and may still show what it named before. A read showing
// newARN proves the update only when readBackProves: not when newARN is
// the key the alias named before (a failed attempt's alias moved back),
// which a stale read shows too. So in every other case the error
// (deletable false) says that the alias may name newARN all the same.
func (p *Provider) updateAlias(ctx context.Context, alias, newARN string, readBackProves bool) (deletable bool, err error) {
	update := func() error {
		callCtx, cancel := context.WithTimeout(ctx, p.timeout)
		defer cancel()
		_, err := p.client.UpdateAlias(callCtx, &kms.UpdateAliasInput{
			AliasName:   aws.String(alias),
			TargetKeyId: aws.String(newARN),
		}, func(o *kms.Options) {
			// One attempt per call: a 4xx must be the answer to the only
			// attempt to mean "not applied". After an SDK retry it could
			// follow a first attempt that was applied and answered 5xx.
			o.Retryer = retry.AddWithMaxAttempts(o.Retryer, 1)
		})
		if err != nil {
			return classifyRejection(err, classify(ctx, callCtx, "update alias "+alias, err))
		}
		return nil
	}
	err = update()
	if err == nil {
		return false, nil
	}
	if errors.Is(err, errRejected) {
		return true, err
	}
	if ctx.Err() == nil {
		if err = update(); err == nil {
			p.log.Warn("awskms: alias update succeeded when sent again", zap.String("alias", alias), zap.String("key_id", newARN))
			return false, nil
		}
	}
	target, readErr := p.aliasTarget(ctx, alias)
	if readErr == nil && target == newARN && readBackProves {
		p.log.Warn("awskms: alias update reported a failure but was applied",
			zap.String("alias", alias), zap.String("key_id", newARN), zap.Error(err))
		return false, nil
	}
	p.log.Warn("awskms: alias update failed and may have been applied",
		zap.String("alias", alias), zap.String("key_id", newARN), zap.Error(err), zap.NamedError("read_back", readErr))
	return false, fmt.Errorf("%w; the alias may name key %s all the same (KMS shows changes late)", err, newARN)
}

// errRejected marks a call the service answered with a 4xx: it was not
// carried out.
var errRejected = errors.New("rejected")

// classifyRejection adds errRejected to classified when raw is a 4xx
// answer.
func classifyRejection(raw, classified error) error {
	var status interface{ HTTPStatusCode() int }
	if errors.As(raw, &status) && status.HTTPStatusCode() >= 400 && status.HTTPStatusCode() < 500 {
		return fmt.Errorf("%w (%w)", classified, errRejected)
	}
	return classified
}

// aliasTarget returns the ARN of the key alias names now. It runs even when
// ctx is done, since ctx's deadline may be what failed the call before it.
func (p *Provider) aliasTarget(ctx context.Context, alias string) (string, error) {
	parent := context.WithoutCancel(ctx)
	callCtx, cancel := context.WithTimeout(parent, p.timeout)
	defer cancel()
	out, err := p.client.DescribeKey(callCtx, &kms.DescribeKeyInput{KeyId: aws.String(alias)})
	if err != nil {
		return "", classify(parent, callCtx, "describe key "+alias, err)
	}
	if out.KeyMetadata == nil || aws.ToString(out.KeyMetadata.Arn) == "" {
		return "", fmt.Errorf("awskms describe key %s: response names no key: %w", alias, providers.ErrUnavailable)
	}
	return aws.ToString(out.KeyMetadata.Arn), nil
}

// DeletionWindowDays is the pending window of a key the provider schedules
// for deletion: KMS's minimum. Until it ends the key can be recovered
// (CancelKeyDeletion), and it signs nothing.
const DeletionWindowDays = 7

// maxAliasPages bounds the ListAliases pages read for one key.
const maxAliasPages = 10

// deleteKey schedules an unused key NewVersion created for deletion, best
// effort: the rotation has failed already, and the key was never served.
func (p *Provider) deleteKey(ctx context.Context, keyARN string) {
	if err := p.scheduleDeletion(ctx, keyARN); err != nil {
		p.log.Warn("awskms: could not schedule an unused new key for deletion",
			zap.String("key_id", keyARN), zap.Error(err))
	}
}

// scheduleDeletion schedules the key keyARN for deletion after
// DeletionWindowDays. It runs even when ctx is done (a rotation that failed
// at its deadline still cleans up). The SDK may send the request again
// after a 5xx that followed its being carried out, and KMS refuses a second
// one (KMSInvalidStateException): so a failure is checked against the
// key's state, and a key found pending deletion is done.
func (p *Provider) scheduleDeletion(ctx context.Context, keyARN string) error {
	parent := context.WithoutCancel(ctx)
	callCtx, cancel := context.WithTimeout(parent, p.timeout)
	defer cancel()
	_, err := p.client.ScheduleKeyDeletion(callCtx, &kms.ScheduleKeyDeletionInput{
		KeyId:               aws.String(keyARN),
		PendingWindowInDays: aws.Int32(DeletionWindowDays),
	})
	if err == nil {
		return nil
	}
	err = classify(parent, callCtx, "schedule key deletion", err)
	readCtx, cancelRead := context.WithTimeout(parent, p.timeout)
	defer cancelRead()
	out, readErr := p.client.DescribeKey(readCtx, &kms.DescribeKeyInput{KeyId: aws.String(keyARN)})
	if readErr == nil && out.KeyMetadata != nil && out.KeyMetadata.KeyState == types.KeyStatePendingDeletion {
		return nil
	}
	return err
}

// DestroyKey schedules for deletion (after DeletionWindowDays) the key
// NewVersion made under name, for a rotation attempt that never cut over
// (rotation.KeyDestroyer): check is called with its KeyInfo, and an error
// from it keeps the key, served as before.
//
// When NewVersion moved the configured alias to the key, the alias is
// moved back to the key it named before (the base key, which the slot
// still signs with), and the base key's next version moves it again. That
// is done only while the alias names the key NewVersion moved it to, or
// that base key already: an alias that names another key now was moved by
// someone else, and is left alone, the key kept. A key any other alias
// names is kept too: deleting it would break every user of the alias. So
// is a key whose aliases cannot all be read, or whose alias could not be
// moved back. The key stops being served before the alias moves back; one
// kept after that is found again by a later call, which tries again.
//
// Only keys made by this provider since it started are found: after a
// restart, a key an earlier process made is not known by name, and the
// error says so (it is not ErrNotFound: the key may well exist).
func (p *Provider) DestroyKey(ctx context.Context, name string, check func(providers.KeyInfo) error) error {
	if p.closed.Load() {
		return fmt.Errorf("awskms provider %s: destroy key %s: provider closed: %w", p.id, name, providers.ErrUnavailable)
	}
	p.keysMu.Lock()
	defer p.keysMu.Unlock()
	var keyID string
	err := p.unused.Destroy(&p.keys, name, func(k *remoteKey) error {
		if err := p.refuseAliased(ctx, k); err != nil {
			return err
		}
		return check(k.info)
	}, func(k *remoteKey) error {
		keyID = k.keyID
		if k.movedFrom != "" {
			if err := p.moveAliasBack(ctx, k); err != nil {
				return err
			}
		}
		return p.scheduleDeletion(ctx, k.keyID)
	})
	if err != nil {
		if keyID != "" {
			p.log.Warn("awskms: could not schedule an unused rotation key for deletion; it is not served",
				zap.String("key", name), zap.String("key_id", keyID), zap.Error(err))
		}
		return fmt.Errorf("awskms provider %s: destroy key %s: %w", p.id, name, err)
	}
	p.log.Info("awskms: unused rotation key scheduled for deletion", zap.String("key", name),
		zap.String("key_id", keyID), zap.Int("pending_window_days", DeletionWindowDays))
	return nil
}

// refuseAliased returns an error when an alias names k's key, or when that
// cannot all be read: the key is then kept. The alias NewVersion moved to
// k is the exception while it names k or the key it was moved from (it
// moves back before the deletion). A read of it may be stale (KMS is
// eventually consistent), which is why either answer moves it back, and
// why the listing skips it.
func (p *Provider) refuseAliased(ctx context.Context, k *remoteKey) error {
	own := ""
	switch {
	case k.movedFrom != "":
		target, err := p.aliasTarget(ctx, k.alias)
		if err != nil {
			return fmt.Errorf("%w; where alias %s points is unknown, so key %s is kept", err, k.alias, k.keyID)
		}
		if target != k.keyID && target != k.movedFrom {
			// Someone moved it, or the read is stale (KMS shows an alias's
			// moves late): kept, and read again at the next attempt's start.
			return fmt.Errorf("alias %s names key %s, not key %s the rotation moved it to; the alias is left there and the key kept for now: %w", k.alias, target, k.keyID, providers.ErrUnavailable)
		}
		own = k.alias
	case k.alias != "":
		return fmt.Errorf("alias %s names key %s: %w", k.alias, k.keyID, providers.ErrInUse)
	}
	// ListAliases may answer fewer aliases than asked for, even none, and
	// say Truncated: the rest follow NextMarker. Only an untruncated page
	// ends the list.
	var marker *string
	for range maxAliasPages {
		callCtx, cancel := context.WithTimeout(ctx, p.timeout)
		out, err := p.client.ListAliases(callCtx, &kms.ListAliasesInput{KeyId: aws.String(k.keyID), Marker: marker})
		if err != nil {
			err = classify(ctx, callCtx, "list aliases of "+k.keyID, err)
			cancel()
			return fmt.Errorf("%w; the key's aliases are unknown, so it is kept", err)
		}
		cancel()
		for _, a := range out.Aliases {
			if n := aws.ToString(a.AliasName); n != own {
				return fmt.Errorf("alias %s names key %s: %w", n, k.keyID, providers.ErrInUse)
			}
		}
		if !out.Truncated {
			return nil
		}
		if aws.ToString(out.NextMarker) == "" {
			return fmt.Errorf("list aliases of %s: a truncated answer without a marker; the key's aliases are unknown, so it is kept: %w", k.keyID, providers.ErrUnavailable)
		}
		marker = out.NextMarker
	}
	return fmt.Errorf("list aliases of %s: more than %d pages; the key's aliases are unknown, so it is kept: %w", k.keyID, maxAliasPages, providers.ErrUnavailable)
}

// moveAliasBack points the alias NewVersion moved to k back at the key it
// moved it from, and gives that key, if still served under its name, the
// alias again, so that its next version moves it. An update that may have
// been applied is settled as NewVersion settles it (updateAlias); any
// failure keeps k.
func (p *Provider) moveAliasBack(ctx context.Context, k *remoteKey) error {
	// The read-back proves nothing here: newARN is the key the alias named
	// until NewVersion moved it, which a stale read still shows.
	if _, err := p.updateAlias(ctx, k.alias, k.movedFrom, false); err != nil {
		return fmt.Errorf("move alias %s back to key %s: %w; key %s is kept, and the next attempt tries again", k.alias, k.movedFrom, err, k.keyID)
	}
	p.log.Info("awskms: alias moved back from an unused rotation key", zap.String("alias", k.alias),
		zap.String("key_id", k.movedFrom), zap.String("from_key_id", k.keyID))
	if b, ok := p.keys.Get(k.movedBase); ok && b.keyID == k.movedFrom && b.alias == "" {
		nb := *b
		nb.alias = k.alias
		if err := p.keys.Replace(k.movedBase, &nb); err != nil {
			return err
		}
	}
	// Done: a later call (after a failed deletion) finds k with no alias.
	k.alias, k.movedFrom, k.movedBase = "", "", ""
	return nil
}

// AddKey starts serving an existing key, named by key id, key ARN, alias or
// alias ARN, under name: a key version a rotation created before a restart,
// named by the ARN URI returned. Adding the same key under the same name
// again returns its KeyInfo; another key under a served name is refused.
func (p *Provider) AddKey(ctx context.Context, name, keyID string) (providers.KeyInfo, error) {
	fail := func(err error) (providers.KeyInfo, error) {
		return providers.KeyInfo{}, fmt.Errorf("awskms provider %s: add key %s: %w", p.id, name, err)
	}
	if name == "" {
		return fail(fmt.Errorf("empty key name: %w", providers.ErrBadRequest))
	}
	if p.closed.Load() {
		return fail(fmt.Errorf("provider closed: %w", providers.ErrUnavailable))
	}
	p.keysMu.Lock()
	defer p.keysMu.Unlock()
	cur, dup := p.keys.Get(name)
	if dup && cur.keyID == keyID {
		return cur.info, nil
	}
	k, err := p.openKey(ctx, KeyConfig{Name: name, KeyID: keyID})
	if err != nil {
		return fail(err)
	}
	if dup {
		if cur.keyID == k.keyID {
			return cur.info, nil
		}
		return fail(fmt.Errorf("a different key is served under this name: %w", providers.ErrBadRequest))
	}
	if err := p.keys.Add(name, k); err != nil {
		return fail(err)
	}
	p.log.Info("awskms key added", zap.String("key", name),
		zap.String("key_id", k.keyID), zap.String("kid", k.info.KID))
	return k.info, nil
}

// Algorithms returns the algorithms a key signs with, in no particular order.
func (p *Provider) Algorithms(name string) []providers.Algorithm {
	k, ok := p.keys.Get(name)
	if !ok {
		return nil
	}
	out := make([]providers.Algorithm, 0, len(k.algs))
	for a := range k.algs {
		out = append(out, a)
	}
	return out
}

// Sign implements providers.Provider. One deadline, min(ctx, Config.Timeout),
// covers the call and any retry the SDK makes, so a caller's bound holds.
func (p *Provider) Sign(ctx context.Context, name string, alg providers.Algorithm, digest []byte) ([]byte, error) {
	if p.closed.Load() {
		return nil, fmt.Errorf("awskms sign %s: provider closed: %w", name, providers.ErrUnavailable)
	}
	k, ok := p.keys.Get(name)
	if !ok {
		return nil, fmt.Errorf("awskms sign %s: %w", name, providers.ErrNotFound)
	}
	spec, ok := k.algs[alg]
	if !ok {
		return nil, fmt.Errorf("awskms sign %s: the key does not sign with %s: %w", name, alg, providers.ErrUnsupportedAlgorithm)
	}
	msgType := types.MessageTypeDigest
	if alg.Scheme == providers.SchemeEd25519 {
		// ED25519_SHA_512 is pure Ed25519: KMS takes the message itself,
		// as RAW only, and no more than it can take.
		if len(digest) > MaxEd25519Message {
			return nil, fmt.Errorf("awskms sign %s: an Ed25519 message of %d bytes; AWS KMS signs at most %d: %w",
				name, len(digest), MaxEd25519Message, providers.ErrBadRequest)
		}
		msgType = types.MessageTypeRaw
		if digest == nil {
			digest = []byte{} // the SDK refuses a nil Message as missing
		}
	} else if len(digest) != alg.Hash.Size() {
		return nil, fmt.Errorf("awskms sign %s: digest of %d bytes for %s: %w", name, len(digest), alg, providers.ErrBadRequest)
	}
	callCtx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	out, err := p.client.Sign(callCtx, &kms.SignInput{
		KeyId:            aws.String(k.keyID),
		Message:          digest,
		MessageType:      msgType,
		SigningAlgorithm: spec,
	})
	if err != nil {
		return nil, classify(ctx, callCtx, "sign "+name, err)
	}
	if len(out.Signature) == 0 {
		return nil, fmt.Errorf("awskms sign %s: empty signature: %w", name, providers.ErrUnavailable)
	}
	if out.KeyId != nil && *out.KeyId != k.keyID {
		return nil, fmt.Errorf("awskms sign %s: response names another key: %w", name, providers.ErrUnavailable)
	}
	if p.closed.Load() {
		return nil, fmt.Errorf("awskms sign %s: provider closed during the call: %w", name, providers.ErrUnavailable)
	}
	// ECDSA signatures arrive ASN.1 DER, RSA ones raw and Ed25519 ones as
	// their 64 bytes: already the encodings providers.Provider promises.
	if err := providers.CheckReturned(k.info, alg, digest, out.Signature); err != nil {
		return nil, fmt.Errorf("awskms sign %s: %w", name, err)
	}
	return out.Signature, nil
}

// jitterBackoff is a full-jitter exponential backoff from 25 ms, capped at
// max. The SDK's own, under a cap below one second, waits the cap every
// time: every caller retrying in step. A pause the service asks for
// (X-Amz-Retry-After) replaces it: retryPolicy has checked that it fits.
type jitterBackoff struct{ max time.Duration }

func (b jitterBackoff) BackoffDelay(attempt int, err error) (time.Duration, error) {
	if pause, ok := retryAfter(err); ok && pause <= b.max {
		return pause, nil
	}
	ceil := min(b.max, 25*time.Millisecond<<min(attempt, 16))
	if ceil <= 0 {
		return 0, nil
	}
	return time.Duration(rand.Int64N(int64(ceil) + 1)), nil
}

// retryPolicy is the standard retryer, refusing a retry after an answer
// that asks for a pause (X-Amz-Retry-After) longer than the backoff cap,
// or than what is left of the call's deadline. The SDK would stretch its
// backoff to that pause (up to 5 s beyond it), past the cap that keeps
// retries inside the deadline, and sleep out the deadline to report
// DEADLINE_EXCEEDED where the answer in hand says UNAVAILABLE now.
type retryPolicy struct {
	*retry.Standard
	maxPause time.Duration
}

// GetRetryToken is asked before every retry, with the attempt's context
// (whose deadline is the call's) and the error it failed with.
func (r retryPolicy) GetRetryToken(ctx context.Context, err error) (func(error) error, error) {
	if pause, ok := retryAfter(err); ok {
		if pause > r.maxPause {
			return nil, &pauseRefused{pause: pause, limit: "the backoff cap"}
		}
		if d, ok := ctx.Deadline(); ok && time.Until(d) <= pause {
			return nil, &pauseRefused{pause: pause, limit: "the call's deadline"}
		}
	}
	return r.Standard.GetRetryToken(ctx, err)
}

// pauseRefused ends a call whose retry would wait longer than it may.
type pauseRefused struct {
	pause time.Duration
	limit string
}

func (e *pauseRefused) Error() string {
	return fmt.Sprintf("not retried: the service asks for a pause of %v, beyond %s", e.pause, e.limit)
}

// retryAfter returns the pause an error answer asks for in its
// X-Amz-Retry-After header (milliseconds), read as the SDK reads it.
func retryAfter(err error) (time.Duration, bool) {
	var re *smithyhttp.ResponseError
	if !errors.As(err, &re) || re.Response == nil || re.Response.Response == nil {
		return 0, false
	}
	v := re.Response.Header.Get("X-Amz-Retry-After")
	if v == "" {
		return 0, false
	}
	ms, perr := strconv.ParseInt(v, 10, 64)
	if perr != nil || ms < 0 {
		return 0, false // the SDK ignores it too
	}
	// Beyond any cap; kept from overflowing a Duration.
	return min(time.Duration(ms), time.Hour/time.Millisecond) * time.Millisecond, true
}

// throttleCodes are the API error codes of a throttled call, in KMS and
// the AWS front ends before it.
var throttleCodes = map[string]bool{
	"ThrottlingException": true, "Throttling": true, "ThrottledException": true,
	"TooManyRequestsException": true, "RequestLimitExceeded": true, "LimitExceededException": true,
	"RequestThrottled": true, "RequestThrottledException": true, "SlowDown": true,
}

// throttled reports a throttled call: a throttling error code, under
// whatever HTTP status, or a 429 whatever its body says (a proxy's, or
// none).
func throttled(err error) bool {
	var status interface{ HTTPStatusCode() int }
	if errors.As(err, &status) && status.HTTPStatusCode() == http.StatusTooManyRequests {
		return true
	}
	var apiErr smithy.APIError
	return errors.As(err, &apiErr) && throttleCodes[apiErr.ErrorCode()]
}

// Close implements providers.Provider. Sign fails with ErrUnavailable after
// it. The SDK client holds only idle HTTP connections, which the transport
// closes on its own.
func (p *Provider) Close() error {
	p.closed.Store(true)
	return nil
}

// classify maps a KMS call's error to the provider error vocabulary. It keeps
// the API error code and drops the server's message text, so nothing the
// server echoes reaches a log or a client. parent is the caller's context,
// callCtx the one with the per-call deadline.
func classify(parent, callCtx context.Context, op string, err error) error {
	if errors.Is(parent.Err(), context.Canceled) {
		return fmt.Errorf("awskms %s: %w", op, context.Canceled)
	}
	if callCtx.Err() != nil || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("awskms %s: %w", op, context.DeadlineExceeded)
	}
	var apiErr smithy.APIError
	isAPIErr := errors.As(err, &apiErr)
	if throttled(err) {
		// Before the API error's absence: a proxy's or load balancer's
		// 429 has a body the SDK cannot read as one, and is throttling
		// all the same.
		code := "HTTP 429"
		if isAPIErr && apiErr.ErrorCode() != "" {
			code = apiErr.ErrorCode()
		}
		return fmt.Errorf("awskms %s: rate limited (%s): %w", op, code, providers.ErrRateLimited)
	}
	if !isAPIErr {
		if credentialsFailed(err) {
			// Nothing was sent: the SDK could not get credentials to sign
			// with (expired, the role or file unreadable). Said apart from
			// a network failure, which it otherwise reads as.
			return fmt.Errorf("awskms %s: no credentials to sign the request with (check the credential source): %w", op, providers.ErrUnavailable)
		}
		// Transport failures: connection refused, reset, TLS. Their text can
		// name the endpoint but carries nothing from a request body.
		return fmt.Errorf("awskms %s: request failed: %w", op, providers.ErrUnavailable)
	}
	code := apiErr.ErrorCode()
	var refused *pauseRefused
	if errors.As(err, &refused) {
		// The answer (a 5xx, most likely) was retryable, but not within
		// the bounds: said apart, so the log tells why it was not retried.
		return fmt.Errorf("awskms %s: %s; %v: %w", op, code, refused, providers.ErrUnavailable)
	}
	switch code {
	case "AccessDeniedException", "UnrecognizedClientException", "InvalidSignatureException",
		"IncompleteSignature", "MissingAuthenticationToken", "InvalidClientTokenId",
		"ExpiredTokenException", "ExpiredToken", "SignatureDoesNotMatch":
		return fmt.Errorf("awskms %s: credentials refused (%s): %w", op, code, providers.ErrUnavailable)
	case "NotFoundException":
		return fmt.Errorf("awskms %s: %w", op, providers.ErrNotFound)
	case "DisabledException", "KMSInvalidStateException", "KeyUnavailableException":
		return fmt.Errorf("awskms %s: key not usable (%s): %w", op, code, providers.ErrUnavailable)
	case "ValidationException", "InvalidKeyUsageException", "InvalidGrantTokenException":
		return fmt.Errorf("awskms %s: rejected as invalid (%s): %w", op, code, providers.ErrBadRequest)
	}
	return fmt.Errorf("awskms %s: %s: %w", op, code, providers.ErrUnavailable)
}

// credentialsFailed reports an error from getting the credentials a request
// is signed with, rather than from sending it: the SDK's signer error, or
// its auth step's "get identity" (a plain wrapped error).
func credentialsFailed(err error) bool {
	var signing *v4.SigningError
	return errors.As(err, &signing) || strings.Contains(err.Error(), "get identity:")
}

// keyTypeOf maps an AWS key spec to the Sigil key type; other specs
// (ECC_NIST_P521, ECC_SECG_P256K1, SM2, ML_DSA_*, HMAC_*, symmetric) are not
// Sigil key types.
func keyTypeOf(spec types.KeySpec) (providers.KeyType, error) {
	switch spec {
	case types.KeySpecEccNistP256:
		return providers.KeyECDSAP256, nil
	case types.KeySpecEccNistP384:
		return providers.KeyECDSAP384, nil
	case types.KeySpecRsa2048:
		return providers.KeyRSA2048, nil
	case types.KeySpecRsa3072:
		return providers.KeyRSA3072, nil
	case types.KeySpecRsa4096:
		return providers.KeyRSA4096, nil
	case types.KeySpecEccNistEdwards25519:
		return providers.KeyEd25519, nil
	}
	return "", fmt.Errorf("key spec %s: %w", spec, providers.ErrUnsupportedAlgorithm)
}

// algorithmOf maps an AWS signing algorithm to the providers.Algorithm it
// performs. ED25519_PH_SHA_512 (Ed25519ph) is not one Sigil offers.
func algorithmOf(spec types.SigningAlgorithmSpec) (providers.Algorithm, bool) {
	const (
		ecdsa = providers.SchemeECDSA
		pkcs1 = providers.SchemePKCS1v15
		pss   = providers.SchemePSS
	)
	switch spec {
	case types.SigningAlgorithmSpecEcdsaSha256:
		return providers.Algorithm{Scheme: ecdsa, Hash: crypto.SHA256}, true
	case types.SigningAlgorithmSpecEcdsaSha384:
		return providers.Algorithm{Scheme: ecdsa, Hash: crypto.SHA384}, true
	case types.SigningAlgorithmSpecEcdsaSha512:
		return providers.Algorithm{Scheme: ecdsa, Hash: crypto.SHA512}, true
	case types.SigningAlgorithmSpecRsassaPkcs1V15Sha256:
		return providers.Algorithm{Scheme: pkcs1, Hash: crypto.SHA256}, true
	case types.SigningAlgorithmSpecRsassaPkcs1V15Sha384:
		return providers.Algorithm{Scheme: pkcs1, Hash: crypto.SHA384}, true
	case types.SigningAlgorithmSpecRsassaPkcs1V15Sha512:
		return providers.Algorithm{Scheme: pkcs1, Hash: crypto.SHA512}, true
	case types.SigningAlgorithmSpecRsassaPssSha256:
		return providers.Algorithm{Scheme: pss, Hash: crypto.SHA256}, true
	case types.SigningAlgorithmSpecRsassaPssSha384:
		return providers.Algorithm{Scheme: pss, Hash: crypto.SHA384}, true
	case types.SigningAlgorithmSpecRsassaPssSha512:
		return providers.Algorithm{Scheme: pss, Hash: crypto.SHA512}, true
	case types.SigningAlgorithmSpecEd25519Sha512:
		return providers.Algorithm{Scheme: providers.SchemeEd25519}, true
	}
	return providers.Algorithm{}, false
}
