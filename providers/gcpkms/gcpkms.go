package gcpkms

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"hash/crc32"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	kms "cloud.google.com/go/kms/apiv1"
	"cloud.google.com/go/kms/apiv1/kmspb"
	gax "github.com/googleapis/gax-go/v2"
	"go.uber.org/zap"
	"google.golang.org/api/iterator"
	"google.golang.org/api/option"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/sigil-agent/sigil/providers"
)

// DefaultTimeout bounds each KMS call when Config.Timeout is zero.
const DefaultTimeout = 2 * time.Second

// VersionLatest, as KeyConfig.Version, asks Open to resolve a CryptoKey to its
// highest-numbered ENABLED version.
const VersionLatest = "latest"

// KeyConfig names one key and the GCP key version behind it.
type KeyConfig struct {
	// Name is the key's name in Sigil, unique across the agent's configuration.
	Name string
	// Resource is a full version resource,
	// projects/P/locations/L/keyRings/R/cryptoKeys/K/cryptoKeyVersions/V,
	// or, with Version "latest", a CryptoKey resource
	// projects/P/locations/L/keyRings/R/cryptoKeys/K.
	Resource string
	// Version is empty (Resource names the version) or VersionLatest.
	Version string
}

// Config configures a GCP Cloud KMS provider.
type Config struct {
	ID      string        // provider id, part of every kid
	Keys    []KeyConfig   // the key versions served
	Timeout time.Duration // per KMS call; 0 means DefaultTimeout
	// ClientOptions are passed to the KMS client. Production leaves them
	// empty: the SDK's default credential chain applies. Tests point the
	// client at a loopback server without authentication.
	ClientOptions []option.ClientOption
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

// Provider signs with Cloud KMS key versions. Its key table is replaced
// whole (copy-on-write) when NewVersion or AddKey adds a key, so Sign takes
// no lock.
type Provider struct {
	id      string
	timeout time.Duration
	log     *zap.Logger
	client  *kms.KeyManagementClient
	keys    providers.KeySet[*remoteKey]
	keysMu  sync.Mutex // serializes NewVersion, AddKey and DestroyKey, which check keys before slow work
	closed  atomic.Bool
	unused  providers.UnusedKeys[*remoteKey] // versions DestroyKey stopped serving; guarded by keysMu
}

type remoteKey struct {
	info    providers.KeyInfo
	version string              // full CryptoKeyVersion resource
	alg     providers.Algorithm // the one algorithm the version signs with
}

var (
	_ providers.Provider = (*Provider)(nil)
	_ providers.Remote   = (*Provider)(nil)
)

// crc32c is the Castagnoli table Cloud KMS uses for its integrity fields.
var crc32c = crc32.MakeTable(crc32.Castagnoli)

// maxDataSize is the longest message Cloud KMS signs with an Ed25519
// version. The API reference names no limit for AsymmetricSignRequest.data;
// the service refuses more with INVALID_ARGUMENT "Request field data must
// have length of at least 0, but not more than 65536" (reported in
// onflow/flow-go-sdk#295), the 64 KiB its other data fields document.
// Checked here, a longer message is refused without a round trip.
const maxDataSize = 64 << 10

// Open connects one KMS client, resolves every configured key to a version
// and fetches and caches its public key. Any key that cannot be served fails
// Open as a whole: a half-configured provider would fail later, per request.
func Open(ctx context.Context, cfg Config) (*Provider, error) {
	if cfg.ID == "" {
		return nil, errors.New("gcpkms provider: empty id")
	}
	cfg.EnsureDefaults()
	client, err := kms.NewKeyManagementClient(ctx, cfg.ClientOptions...)
	if err != nil {
		return nil, fmt.Errorf("gcpkms provider %s: client: %w", cfg.ID, err)
	}
	// No SDK retries on the signing path: its default retries Unavailable
	// with backoff until the deadline, which would turn a clear "unavailable"
	// into a late "deadline exceeded". Sign retries only an integrity
	// mismatch, itself.
	client.CallOptions.AsymmetricSign = nil
	// Nor the SDK's retries on the reads that serve a key (at open, AddKey
	// and NewVersion) or poll a new version's state (NewVersion): they too
	// retried until the deadline. readRetry replaces them.
	client.CallOptions.GetPublicKey = nil
	client.CallOptions.ListCryptoKeyVersions = nil
	client.CallOptions.GetCryptoKeyVersion = nil
	// And on the destruction of a version a failed rotation made, which
	// held the rotation's answer back the whole timeout in an outage.
	client.CallOptions.DestroyCryptoKeyVersion = nil
	p := &Provider{
		id:      cfg.ID,
		timeout: cfg.Timeout,
		log:     cfg.Logger,
		client:  client,
	}
	for _, kc := range cfg.Keys {
		if _, dup := p.keys.Get(kc.Name); dup || kc.Name == "" {
			client.Close()
			return nil, fmt.Errorf("gcpkms provider %s: key %q empty or configured twice", cfg.ID, kc.Name)
		}
		k, err := p.openKey(ctx, kc)
		if err != nil {
			client.Close()
			return nil, fmt.Errorf("gcpkms provider %s: key %q: %w", cfg.ID, kc.Name, err)
		}
		if err := p.keys.Add(kc.Name, k); err != nil {
			client.Close()
			return nil, fmt.Errorf("gcpkms provider %s: key %q: %w", cfg.ID, kc.Name, err)
		}
		p.log.Info("gcpkms key ready", zap.String("key", kc.Name),
			zap.String("version", k.version), zap.Stringer("algorithm", k.alg), zap.String("kid", k.info.KID))
	}
	return p, nil
}

// Validate checks what Open refuses in kc before it asks Cloud KMS: the
// shape of Resource for its Version (ErrBadRequest).
func (kc KeyConfig) Validate() error {
	switch kc.Version {
	case "":
		if !isResource(kc.Resource, 10) {
			return fmt.Errorf("resource %q is not projects/P/locations/L/keyRings/R/cryptoKeys/K/cryptoKeyVersions/V: %w", kc.Resource, providers.ErrBadRequest)
		}
	case VersionLatest:
		if !isResource(kc.Resource, 8) {
			return fmt.Errorf("resource %q with version latest is not projects/P/locations/L/keyRings/R/cryptoKeys/K: %w", kc.Resource, providers.ErrBadRequest)
		}
	default:
		return fmt.Errorf("version %q: want empty (resource names the version) or %q: %w", kc.Version, VersionLatest, providers.ErrBadRequest)
	}
	return nil
}

func (p *Provider) openKey(ctx context.Context, kc KeyConfig) (*remoteKey, error) {
	if err := kc.Validate(); err != nil {
		return nil, err
	}
	version := kc.Resource
	if kc.Version == VersionLatest {
		v, err := p.latestVersion(ctx, kc.Resource)
		if err != nil {
			return nil, err
		}
		version = v
	}

	callCtx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	// Aside, as Sign's call (see signCall): at Open, AddKey or a
	// rotation's serve, a token refresh another call holds must not keep
	// this past its deadline. A read abandoned there changes nothing.
	pk, err := providers.CallAside(callCtx, func() (*kmspb.PublicKey, error) {
		return p.client.GetPublicKey(callCtx, &kmspb.GetPublicKeyRequest{Name: version}, p.readRetry(callCtx))
	})
	if err != nil {
		return nil, classify(ctx, callCtx, "get public key "+version, err)
	}
	if pk.PemCrc32C == nil || int64(crc32.Checksum([]byte(pk.Pem), crc32c)) != pk.PemCrc32C.Value {
		return nil, fmt.Errorf("get public key %s: pem_crc32c does not match the PEM received (corrupted in transit): %w", version, providers.ErrUnavailable)
	}
	if pk.Name != "" && pk.Name != version {
		return nil, fmt.Errorf("get public key %s: response names %s: %w", version, pk.Name, providers.ErrUnavailable)
	}
	alg, err := algorithmOf(pk.Algorithm)
	if err != nil {
		return nil, fmt.Errorf("version %s: %w", version, err)
	}
	pub, err := parsePublicPEM(pk.Pem)
	if err != nil {
		return nil, fmt.Errorf("version %s: %w", version, err)
	}
	info, err := providers.NewKeyInfo(p.id, kc.Name, pub)
	if err != nil {
		return nil, fmt.Errorf("version %s: %w", version, err)
	}
	// The public key and the algorithm come from one response; a mismatch
	// means a key we do not understand, so refuse it rather than sign wrong.
	var probe []byte // pure Ed25519 takes a message of any length, even none
	if alg.Hash != 0 {
		probe = make([]byte, alg.Hash.Size())
	}
	if err := providers.CheckRequest(info.Type, alg, probe); err != nil {
		return nil, fmt.Errorf("version %s: %s key with algorithm %s: %w", version, info.Type, pk.Algorithm, providers.ErrUnsupportedAlgorithm)
	}
	if want := curveHash(info.Type); want != 0 && want != alg.Hash {
		return nil, fmt.Errorf("version %s: %s key with algorithm %s: %w", version, info.Type, pk.Algorithm, providers.ErrUnsupportedAlgorithm)
	}
	return &remoteKey{info: info, version: version, alg: alg}, nil
}

// latestVersion returns the highest-numbered ENABLED version of cryptoKey.
// Version ids are decimal integers assigned in creation order, so "highest"
// compares them as numbers ("10" after "9").
func (p *Provider) latestVersion(ctx context.Context, cryptoKey string) (string, error) {
	callCtx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	it := p.client.ListCryptoKeyVersions(callCtx, &kmspb.ListCryptoKeyVersionsRequest{Parent: cryptoKey}, p.readRetry(callCtx))
	best, bestN := "", int64(-1)
	for {
		// Aside (see signCall): each page is fetched by Next. One abandoned
		// at the deadline is dropped with the iterator, which nothing
		// reads again.
		v, err := providers.CallAside(callCtx, it.Next)
		if errors.Is(err, iterator.Done) {
			break
		}
		if err != nil {
			return "", classify(ctx, callCtx, "list versions of "+cryptoKey, err)
		}
		if v.State != kmspb.CryptoKeyVersion_ENABLED {
			continue
		}
		n, err := strconv.ParseInt(v.Name[strings.LastIndexByte(v.Name, '/')+1:], 10, 64)
		if err != nil || !strings.HasPrefix(v.Name, cryptoKey+"/cryptoKeyVersions/") {
			return "", fmt.Errorf("list versions of %s: unexpected version name %q: %w", cryptoKey, v.Name, providers.ErrUnavailable)
		}
		if n > bestN {
			best, bestN = v.Name, n
		}
	}
	if best == "" {
		return "", fmt.Errorf("%s has no ENABLED version: %w", cryptoKey, providers.ErrNotFound)
	}
	return best, nil
}

// readAttempts bounds the requests of one read that serves a key.
const readAttempts = 3

// readRetry is the retry policy of the reads that serve a key
// (GetPublicKey, ListCryptoKeyVersions) and of each poll of a new
// version's state (GetCryptoKeyVersion), in place of the SDK's, which
// retried UNAVAILABLE and DEADLINE_EXCEEDED until the deadline: an
// outage answered a late DEADLINE_EXCEEDED after a dozen requests.
// Unlike a Sign, whose caller has a tight deadline and its own retries, a
// read runs at start (which one blip would fail) or just after a
// rotation made a version (which a failed read destroys), so it is
// retried, but as the AWS provider retries: UNAVAILABLE only, three
// requests at most, a full-jitter backoff from 50 ms capped at a quarter
// of the timeout, and no pause that would outlast ctx's deadline. An
// outage is UNAVAILABLE within the timeout. The one write that takes it,
// destroyVersion's, leaves the same state however often it is served.
func (p *Provider) readRetry(ctx context.Context) gax.CallOption {
	deadline, _ := ctx.Deadline()
	return gax.WithRetry(func() gax.Retryer {
		return &readRetryer{
			deadline: deadline,
			left:     readAttempts - 1,
			backoff:  gax.Backoff{Initial: 50 * time.Millisecond, Max: p.timeout / 4, Multiplier: 2},
		}
	})
}

// readRetryer is one call's state under readRetry.
type readRetryer struct {
	deadline time.Time // zero: none
	left     int       // retries left
	backoff  gax.Backoff
}

func (r *readRetryer) Retry(err error) (time.Duration, bool) {
	if r.left == 0 || status.Code(err) != codes.Unavailable {
		return 0, false
	}
	pause := r.backoff.Pause()
	if !r.deadline.IsZero() && time.Until(r.deadline) <= pause {
		return 0, false // the UNAVAILABLE in hand, rather than a deadline slept out
	}
	r.left--
	return pause, true
}

// ID implements providers.Provider.
func (p *Provider) ID() string { return p.id }

// Remote implements providers.Remote: every Sign is a network round trip.
func (p *Provider) Remote() bool { return true }

// Keys implements providers.Provider.
func (p *Provider) Keys(context.Context) ([]providers.KeyInfo, error) {
	return p.keys.Infos(func(k *remoteKey) providers.KeyInfo { return k.info }), nil
}

// Version returns the CryptoKeyVersion resource a key resolved to at Open
// (or was created or added as).
func (p *Provider) Version(name string) (string, bool) {
	k, ok := p.keys.Get(name)
	if !ok {
		return "", false
	}
	return k.version, true
}

// Sign implements providers.Provider. One deadline, min(ctx, Config.Timeout),
// covers the call and its one retry, so a caller's bound holds. For an
// Ed25519 version digest is the message, sent whole as the request's data.
func (p *Provider) Sign(ctx context.Context, name string, alg providers.Algorithm, digest []byte) ([]byte, error) {
	if p.closed.Load() {
		return nil, fmt.Errorf("gcpkms sign %s: provider closed: %w", name, providers.ErrUnavailable)
	}
	k, ok := p.keys.Get(name)
	if !ok {
		return nil, fmt.Errorf("gcpkms sign %s: %w", name, providers.ErrNotFound)
	}
	if alg != k.alg {
		return nil, fmt.Errorf("gcpkms sign %s: the key version signs only %s, not %s: %w", name, k.alg, alg, providers.ErrUnsupportedAlgorithm)
	}
	req := &kmspb.AsymmetricSignRequest{Name: k.version}
	data := alg.Scheme == providers.SchemeEd25519
	if data {
		// Pure Ed25519 (RFC 8032) hashes the message together with a part
		// of the private key, so no digest made here could stand for it:
		// Cloud KMS takes the message itself, and refuses a digest.
		if len(digest) > maxDataSize {
			return nil, fmt.Errorf("gcpkms sign %s: message of %d bytes, over the %d Cloud KMS signs: %w", name, len(digest), maxDataSize, providers.ErrBadRequest)
		}
		req.Data = bytes.Clone(digest) // see signCall
		req.DataCrc32C = wrapperspb.Int64(int64(crc32.Checksum(digest, crc32c)))
	} else {
		if len(digest) != alg.Hash.Size() {
			return nil, fmt.Errorf("gcpkms sign %s: digest of %d bytes for %s: %w", name, len(digest), alg, providers.ErrBadRequest)
		}
		req.Digest = digestOf(alg.Hash, bytes.Clone(digest)) // see signCall
		req.DigestCrc32C = wrapperspb.Int64(int64(crc32.Checksum(digest, crc32c)))
	}
	callCtx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	var err error
	// A CRC32C mismatch either way means bytes were damaged in transit; one
	// retry covers a transient fault without hiding a persistent one.
	for attempt := 0; attempt < 2; attempt++ {
		var resp *kmspb.AsymmetricSignResponse
		resp, err = p.signCall(callCtx, req)
		if err != nil {
			return nil, classify(ctx, callCtx, "sign "+name, err)
		}
		if p.closed.Load() {
			// Close overtook the call: nothing from it is released.
			return nil, fmt.Errorf("gcpkms sign %s: provider closed: %w", name, providers.ErrUnavailable)
		}
		if err = checkSignResponse(resp, k.version, data); err == nil {
			// ECDSA signatures arrive ASN.1 DER, RSA and Ed25519 ones raw:
			// already the encodings providers.Provider promises.
			if err := providers.CheckReturned(k.info, alg, digest, resp.Signature); err != nil {
				return nil, fmt.Errorf("gcpkms sign %s: %w", name, err)
			}
			return resp.Signature, nil
		}
		p.log.Warn("gcpkms sign integrity check failed",
			zap.String("key", name), zap.Int("attempt", attempt+1), zap.Error(err))
	}
	return nil, fmt.Errorf("gcpkms sign %s: %w", name, err)
}

// signCall runs the RPC aside and leaves at ctx's end. gRPC asks the auth
// library for the call's token under its refresh lock, without the call's
// context: while one call fetches a new token from a hung metadata server,
// every other Sign would wait past its deadline. So req holds its own copy
// of the digest or data: gRPC encodes it on the call's goroutine, maybe
// after Sign has returned and the agent has reused the caller's buffer.
func (p *Provider) signCall(ctx context.Context, req *kmspb.AsymmetricSignRequest) (*kmspb.AsymmetricSignResponse, error) {
	return providers.CallAside(ctx, func() (*kmspb.AsymmetricSignResponse, error) {
		return p.client.AsymmetricSign(ctx, req)
	})
}

// checkSignResponse checks an answer's integrity fields; data says the
// request carried data (Ed25519), whose CRC32C KMS must have verified,
// rather than a digest.
func checkSignResponse(resp *kmspb.AsymmetricSignResponse, version string, data bool) error {
	if data && !resp.VerifiedDataCrc32C {
		return fmt.Errorf("integrity check failed: KMS did not verify the data's CRC32C: %w", providers.ErrUnavailable)
	}
	if !data && !resp.VerifiedDigestCrc32C {
		return fmt.Errorf("integrity check failed: KMS did not verify the digest's CRC32C: %w", providers.ErrUnavailable)
	}
	if resp.Name != version {
		return fmt.Errorf("integrity check failed: response names another key version: %w", providers.ErrUnavailable)
	}
	if resp.SignatureCrc32C == nil || int64(crc32.Checksum(resp.Signature, crc32c)) != resp.SignatureCrc32C.Value {
		return fmt.Errorf("integrity check failed: signature does not match its CRC32C: %w", providers.ErrUnavailable)
	}
	return nil
}

// Close implements providers.Provider. Sign fails with ErrUnavailable after it.
func (p *Provider) Close() error {
	if p.closed.Swap(true) {
		return nil
	}
	if err := p.client.Close(); err != nil {
		return fmt.Errorf("gcpkms provider %s: close: %w", p.id, err)
	}
	return nil
}

// classify maps a KMS call's error to the provider error vocabulary. It keeps
// the gRPC code and drops the server's message text, so nothing the server
// echoes reaches a log or a client. parent is the caller's context, callCtx
// the one with the per-call deadline.
func classify(parent, callCtx context.Context, op string, err error) error {
	if errors.Is(parent.Err(), context.Canceled) {
		return fmt.Errorf("gcpkms %s: %w", op, context.Canceled)
	}
	if callCtx.Err() != nil {
		return fmt.Errorf("gcpkms %s: %w", op, context.DeadlineExceeded)
	}
	code := status.Code(err)
	switch code {
	case codes.DeadlineExceeded:
		return fmt.Errorf("gcpkms %s: %w", op, context.DeadlineExceeded)
	case codes.ResourceExhausted:
		return fmt.Errorf("gcpkms %s: rate limited (%s): %w", op, code, providers.ErrRateLimited)
	case codes.Unauthenticated, codes.PermissionDenied:
		return fmt.Errorf("gcpkms %s: credentials refused (%s): %w", op, code, providers.ErrUnavailable)
	case codes.NotFound:
		return fmt.Errorf("gcpkms %s: %w", op, providers.ErrNotFound)
	case codes.InvalidArgument:
		return fmt.Errorf("gcpkms %s: rejected as invalid: %w", op, providers.ErrBadRequest)
	case codes.FailedPrecondition:
		// For example a key version that is disabled or scheduled for destruction.
		return fmt.Errorf("gcpkms %s: key version not usable (%s): %w", op, code, providers.ErrUnavailable)
	case codes.Unavailable:
		return fmt.Errorf("gcpkms %s: %s: %w", op, code, providers.ErrUnavailable)
	}
	return fmt.Errorf("gcpkms %s: %s: %w", op, code, providers.ErrUnavailable)
}

// algorithmOf maps a GCP signing algorithm to the one providers.Algorithm it
// performs. GCP's PSS uses a salt as long as the digest, as Sigil does.
func algorithmOf(a kmspb.CryptoKeyVersion_CryptoKeyVersionAlgorithm) (providers.Algorithm, error) {
	const (
		ecdsa = providers.SchemeECDSA
		pkcs1 = providers.SchemePKCS1v15
		pss   = providers.SchemePSS
	)
	switch a {
	case kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256:
		return providers.Algorithm{Scheme: ecdsa, Hash: crypto.SHA256}, nil
	case kmspb.CryptoKeyVersion_EC_SIGN_P384_SHA384:
		return providers.Algorithm{Scheme: ecdsa, Hash: crypto.SHA384}, nil
	case kmspb.CryptoKeyVersion_RSA_SIGN_PKCS1_2048_SHA256,
		kmspb.CryptoKeyVersion_RSA_SIGN_PKCS1_3072_SHA256,
		kmspb.CryptoKeyVersion_RSA_SIGN_PKCS1_4096_SHA256:
		return providers.Algorithm{Scheme: pkcs1, Hash: crypto.SHA256}, nil
	case kmspb.CryptoKeyVersion_RSA_SIGN_PKCS1_4096_SHA512:
		return providers.Algorithm{Scheme: pkcs1, Hash: crypto.SHA512}, nil
	case kmspb.CryptoKeyVersion_RSA_SIGN_PSS_2048_SHA256,
		kmspb.CryptoKeyVersion_RSA_SIGN_PSS_3072_SHA256,
		kmspb.CryptoKeyVersion_RSA_SIGN_PSS_4096_SHA256:
		return providers.Algorithm{Scheme: pss, Hash: crypto.SHA256}, nil
	case kmspb.CryptoKeyVersion_RSA_SIGN_PSS_4096_SHA512:
		return providers.Algorithm{Scheme: pss, Hash: crypto.SHA512}, nil
	case kmspb.CryptoKeyVersion_EC_SIGN_ED25519:
		return providers.Algorithm{Scheme: providers.SchemeEd25519}, nil // pure Ed25519 over the message
	}
	// RSA_SIGN_RAW_PKCS1_* take a prebuilt DigestInfo as data, secp256k1 is no
	// Sigil key type, and the rest do not sign.
	return providers.Algorithm{}, fmt.Errorf("algorithm %s: %w", a, providers.ErrUnsupportedAlgorithm)
}

// curveHash is the hash GCP pairs with an ECDSA curve; 0 for other key types.
func curveHash(t providers.KeyType) crypto.Hash {
	switch t {
	case providers.KeyECDSAP256:
		return crypto.SHA256
	case providers.KeyECDSAP384:
		return crypto.SHA384
	}
	return 0
}

func digestOf(h crypto.Hash, digest []byte) *kmspb.Digest {
	switch h {
	case crypto.SHA384:
		return &kmspb.Digest{Digest: &kmspb.Digest_Sha384{Sha384: digest}}
	case crypto.SHA512:
		return &kmspb.Digest{Digest: &kmspb.Digest_Sha512{Sha512: digest}}
	}
	return &kmspb.Digest{Digest: &kmspb.Digest_Sha256{Sha256: digest}}
}

func parsePublicPEM(s string) (crypto.PublicKey, error) {
	block, _ := pem.Decode([]byte(s))
	if block == nil || block.Type != "PUBLIC KEY" {
		return nil, fmt.Errorf("public key: no PEM PUBLIC KEY block: %w", providers.ErrUnavailable)
	}
	pub, err := x509.ParsePKIXPublicKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("public key: %w", err)
	}
	return pub, nil
}

// isResource reports whether s is a KMS resource of n alternating
// collection/id segments, starting projects/…/locations/…/keyRings/…/cryptoKeys/….
func isResource(s string, n int) bool {
	parts := strings.Split(s, "/")
	if len(parts) != n {
		return false
	}
	collections := []string{"projects", "locations", "keyRings", "cryptoKeys", "cryptoKeyVersions"}
	for i := 0; i < n; i += 2 {
		if parts[i] != collections[i/2] || parts[i+1] == "" {
			return false
		}
	}
	return true
}

// GenerationTimeout bounds how long NewVersion waits for Cloud KMS to finish
// generating a new key version (PENDING_GENERATION to ENABLED), unless the
// caller's context ends sooner.
const GenerationTimeout = time.Minute

// Backoff between GetCryptoKeyVersion polls while a version is generated.
const (
	pollFirst = 50 * time.Millisecond
	pollMax   = 2 * time.Second
)

// NewVersion creates a new version of the CryptoKey behind the served key
// base, waits until Cloud KMS has generated it (ENABLED), fetches its public
// key with the checks Open makes, and starts serving it under name. base keeps
// being served as it was. The new version's resource is available from URI.
func (p *Provider) NewVersion(ctx context.Context, base, name string) (providers.KeyInfo, error) {
	fail := func(err error) (providers.KeyInfo, error) {
		return providers.KeyInfo{}, fmt.Errorf("gcpkms provider %s: new version %s of %s: %w", p.id, name, base, err)
	}
	if p.closed.Load() {
		return fail(fmt.Errorf("provider closed: %w", providers.ErrUnavailable))
	}
	if name == "" {
		return fail(fmt.Errorf("empty key name: %w", providers.ErrBadRequest))
	}
	p.keysMu.Lock()
	defer p.keysMu.Unlock()
	bk, ok := p.keys.Get(base)
	if !ok {
		return fail(providers.ErrNotFound)
	}
	if _, dup := p.keys.Get(name); dup {
		return fail(fmt.Errorf("key %q is already served: %w", name, providers.ErrBadRequest))
	}
	i := strings.LastIndex(bk.version, "/cryptoKeyVersions/")
	if i < 0 {
		return fail(fmt.Errorf("version %q has no parent CryptoKey: %w", bk.version, providers.ErrBadRequest))
	}
	cryptoKey := bk.version[:i]

	callCtx, cancel := context.WithTimeout(ctx, p.timeout)
	// Aside, as Sign's call (see signCall), so that a token refresh
	// another call holds cannot keep the rotation past its deadline. A
	// create abandoned there is sent, if at all, with a context already
	// ended; one in flight at the deadline may still be carried out, as
	// any lost answer. Its version, if made, is never served; it carries
	// no mark of this rotation to find it by among other writers', so it
	// is named for the operator rather than destroyed.
	created, err := providers.CallAside(callCtx, func() (*kmspb.CryptoKeyVersion, error) {
		return p.client.CreateCryptoKeyVersion(callCtx, &kmspb.CreateCryptoKeyVersionRequest{
			Parent:           cryptoKey,
			CryptoKeyVersion: &kmspb.CryptoKeyVersion{},
		})
	})
	err = classifyIf(ctx, callCtx, "create version of "+cryptoKey, err)
	cancel()
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		p.log.Warn("gcpkms: a rotation's create ended without an answer; Cloud KMS may still make the version",
			zap.String("crypto_key", cryptoKey), zap.Error(err))
		return fail(fmt.Errorf("%w; Cloud KMS may still make the version, which would be the highest ENABLED one (what \"latest\" picks at the next start): check %s's versions and destroy one made now", err, cryptoKey))
	}
	if err != nil {
		return fail(err)
	}
	version := created.GetName()
	if !isResource(version, 10) || !strings.HasPrefix(version, cryptoKey+"/cryptoKeyVersions/") {
		return fail(fmt.Errorf("create version of %s: unexpected version name %q: %w", cryptoKey, version, providers.ErrUnavailable))
	}
	p.log.Info("gcpkms key version created", zap.String("base", base),
		zap.String("key", name), zap.String("version", version), zap.Stringer("state", created.GetState()))
	// A version the rotation cannot use must not stay ENABLED: it is the
	// highest, so a key configured as "latest" would pick it at the next
	// start.
	discard := func(err error) (providers.KeyInfo, error) {
		_ = p.destroyVersion(ctx, version) // logged; the rotation's error is err
		return fail(err)
	}
	if created.GetState() != kmspb.CryptoKeyVersion_ENABLED {
		if err := p.awaitEnabled(ctx, version); err != nil {
			return discard(err)
		}
	}
	info, err := p.serve(ctx, name, version)
	if err != nil {
		return discard(err)
	}
	return info, nil
}

// destroyVersion schedules an unused new version for destruction, best
// effort: the rotation has failed already, and the version was never
// served. Cloud KMS keeps it restorable for the key's destroy-scheduled
// duration. It retries as the reads do (readRetry): UNAVAILABLE only,
// which says the request was not served, never a DEADLINE_EXCEEDED that
// may come after the destruction was scheduled (a second request would
// then be refused: only ENABLED or DISABLED versions can be scheduled).
func (p *Provider) destroyVersion(ctx context.Context, version string) error {
	callCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), p.timeout)
	defer cancel()
	// Aside (see signCall). A destroy abandoned at its deadline, like one
	// whose answer was lost, may yet be carried out or not: so the warning
	// says the version stays enabled unless it was, and asks for a check.
	// Either way the version is not served.
	_, err := providers.CallAside(callCtx, func() (*kmspb.CryptoKeyVersion, error) {
		return p.client.DestroyCryptoKeyVersion(callCtx, &kmspb.DestroyCryptoKeyVersionRequest{Name: version}, p.readRetry(callCtx))
	})
	if err != nil {
		err = classify(callCtx, callCtx, "destroy version", err)
		p.log.Warn("gcpkms: could not schedule an unused new version for destruction; it stays enabled, unless a request that ended at its deadline was carried out: check it and destroy it by hand",
			zap.String("version", version), zap.Error(err))
		return err
	}
	p.log.Info("gcpkms: unused new version scheduled for destruction", zap.String("version", version))
	return nil
}

// DestroyKey schedules for destruction the version NewVersion made under
// name, for a rotation attempt that never cut over (rotation.KeyDestroyer):
// check is called with its KeyInfo, and an error from it keeps the version,
// served as before. The version stops being served before the request is
// sent (destroyVersion: retried on UNAVAILABLE only); one whose request
// failed is found again by a later call. Cloud KMS destroys it after the
// CryptoKey's destroy-scheduled duration (30 days unless the key was made
// with another), until when it can be restored; it signs nothing meanwhile.
//
// Only versions made by this provider since it started are found: after a
// restart, a version an earlier process made is not known by name, and the
// error says so (it is not ErrNotFound: the version may well exist).
func (p *Provider) DestroyKey(ctx context.Context, name string, check func(providers.KeyInfo) error) error {
	if p.closed.Load() {
		return fmt.Errorf("gcpkms provider %s: destroy key %s: provider closed: %w", p.id, name, providers.ErrUnavailable)
	}
	p.keysMu.Lock()
	defer p.keysMu.Unlock()
	err := p.unused.Destroy(&p.keys, name, func(k *remoteKey) error { return check(k.info) },
		func(k *remoteKey) error { return p.destroyVersion(ctx, k.version) })
	if err != nil {
		return fmt.Errorf("gcpkms provider %s: destroy key %s: %w", p.id, name, err)
	}
	return nil
}

// awaitEnabled polls version until it is ENABLED, each call bounded by the
// per-call timeout, with doubling backoff between calls, for at most
// GenerationTimeout in all. Each poll retries as the reads that serve a key
// do (readRetry), its pauses kept inside the poll's deadline, which is
// never past the wait's: a poll that still fails ends the wait with its
// answer (an outage is UNAVAILABLE within the timeout, not DEADLINE_EXCEEDED
// at its end), and the version, which the caller then destroys, is not
// polled again. A version still PENDING_GENERATION when the wait ends is
// DEADLINE_EXCEEDED.
func (p *Provider) awaitEnabled(ctx context.Context, version string) error {
	waitCtx, cancel := context.WithTimeout(ctx, GenerationTimeout)
	defer cancel()
	delay := pollFirst
	for {
		callCtx, callCancel := context.WithTimeout(waitCtx, p.timeout)
		// Aside (see signCall); a poll abandoned at its deadline changes
		// nothing, and the version is then destroyed as any that failed.
		v, err := providers.CallAside(callCtx, func() (*kmspb.CryptoKeyVersion, error) {
			return p.client.GetCryptoKeyVersion(callCtx, &kmspb.GetCryptoKeyVersionRequest{Name: version}, p.readRetry(callCtx))
		})
		err = classifyIf(ctx, callCtx, "get version "+version, err)
		callCancel()
		if err != nil {
			return err
		}
		switch st := v.GetState(); st {
		case kmspb.CryptoKeyVersion_ENABLED:
			return nil
		case kmspb.CryptoKeyVersion_PENDING_GENERATION:
		default:
			return fmt.Errorf("version %s is %s, not ENABLED: %w", version, st, providers.ErrUnavailable)
		}
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-waitCtx.Done():
			t.Stop()
			if errors.Is(ctx.Err(), context.Canceled) {
				return fmt.Errorf("gcpkms await version %s: %w", version, context.Canceled)
			}
			return fmt.Errorf("gcpkms await version %s: still PENDING_GENERATION: %w", version, context.DeadlineExceeded)
		}
		delay = min(2*delay, pollMax)
	}
}

// classifyIf is classify for a possibly nil error.
func classifyIf(parent, callCtx context.Context, op string, err error) error {
	if err == nil {
		return nil
	}
	return classify(parent, callCtx, op, err)
}

// URI returns the full CryptoKeyVersion resource of a served key,
// projects/P/locations/L/keyRings/R/cryptoKeys/K/cryptoKeyVersions/V, for
// writing into a configuration so a restart (AddKey) serves the same version.
func (p *Provider) URI(name string) (string, error) {
	k, ok := p.keys.Get(name)
	if !ok {
		return "", fmt.Errorf("gcpkms uri %s: %w", name, providers.ErrNotFound)
	}
	return k.version, nil
}

// AddKey starts serving an existing key version, named by its full
// CryptoKeyVersion resource, under name: a version a rotation created before a
// restart. It is idempotent when name already serves that resource.
func (p *Provider) AddKey(ctx context.Context, name, resource string) (providers.KeyInfo, error) {
	fail := func(err error) (providers.KeyInfo, error) {
		return providers.KeyInfo{}, fmt.Errorf("gcpkms provider %s: add key %s: %w", p.id, name, err)
	}
	if p.closed.Load() {
		return fail(fmt.Errorf("provider closed: %w", providers.ErrUnavailable))
	}
	if name == "" {
		return fail(fmt.Errorf("empty key name: %w", providers.ErrBadRequest))
	}
	p.keysMu.Lock()
	defer p.keysMu.Unlock()
	if k, dup := p.keys.Get(name); dup {
		if k.version == resource {
			return k.info, nil
		}
		return fail(fmt.Errorf("another version (%s) is served under this name: %w", k.version, providers.ErrBadRequest))
	}
	info, err := p.serve(ctx, name, resource)
	if err != nil {
		return fail(err)
	}
	return info, nil
}

// serve fetches a key version's public key and starts serving it under name:
// the last step of NewVersion and AddKey.
func (p *Provider) serve(ctx context.Context, name, version string) (providers.KeyInfo, error) {
	k, err := p.openKey(ctx, KeyConfig{Name: name, Resource: version})
	if err != nil {
		return providers.KeyInfo{}, err
	}
	if err := p.keys.Add(name, k); err != nil {
		return providers.KeyInfo{}, err
	}
	p.log.Info("gcpkms key ready", zap.String("key", name),
		zap.String("version", k.version), zap.Stringer("algorithm", k.alg), zap.String("kid", k.info.KID))
	return k.info, nil
}
