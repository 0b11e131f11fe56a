// Package gcpkmstest is an in-process Cloud KMS for tests: the real gRPC
// service (kmspb.KeyManagementServiceServer) holding real Go keys, reached by
// the real SDK client over loopback. The gcpkms provider's tests, the agent's
// and `sigil bench` use it; nothing here is for production. It does not
// import testing (TB is the part of testing.TB Serve uses), so the sigil
// binary can link it.
package gcpkmstest

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"hash/crc32"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"

	"cloud.google.com/go/kms/apiv1/kmspb"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Server is an in-process Cloud KMS speaking the real gRPC service with real
// Go keys. It does what the real service does on the paths Sigil uses: it
// checks the digest's CRC32C and the digest type against the version's
// algorithm, signs an EC_SIGN_ED25519 version's data (at most 64 KiB, its
// CRC32C checked) and refuses it a digest, and returns CRC32C-protected
// answers. Faults are set per version.
type Server struct {
	kmspb.UnimplementedKeyManagementServiceServer

	mu       sync.Mutex
	versions map[string]*Version
	signs    int // AsymmetricSign calls answered, faults included
	gets     int // GetCryptoKeyVersion calls answered, faults included
	pubKeys  int // GetPublicKey calls answered, faults included
	destroys int // DestroyCryptoKeyVersion calls answered, faults included
	addr     string

	// NewVersionFault, when set, is applied to every version
	// CreateCryptoKeyVersion makes (under the server's lock), so a test
	// can fail a rotation after the version exists.
	NewVersionFault func(*Version)
}

// Addr is the loopback address Serve listens on (host:port), for an agent
// configured with endpoint and insecure_endpoint.
func (f *Server) Addr() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.addr
}

type Version struct {
	Signer crypto.Signer
	Alg    kmspb.CryptoKeyVersion_CryptoKeyVersionAlgorithm
	State  kmspb.CryptoKeyVersion_CryptoKeyVersionState

	Delay         time.Duration // AsymmetricSign stalls this long (or until the caller gives up)
	SignErr       error         // AsymmetricSign fails with this
	CorruptCRC    int           // the next corruptCRC responses carry a wrong signature_crc32c
	Unverified    bool          // verified_digest_crc32c stays false
	CorruptPEMCRC bool          // GetPublicKey returns a wrong pem_crc32c
	// PublicKeyErr, when set, fails the next PublicKeyErrs GetPublicKey
	// calls (every one while PublicKeyErrs is 0).
	PublicKeyErr  error
	PublicKeyErrs int
	// GetVersionErr and DestroyErr do the same for GetCryptoKeyVersion
	// and DestroyCryptoKeyVersion; a failed call changes no state.
	GetVersionErr  error
	GetVersionErrs int
	DestroyErr     error
	DestroyErrs    int
	// PendingGets is how many more GetCryptoKeyVersion calls report
	// PENDING_GENERATION before the version turns ENABLED (1 for a
	// version CreateCryptoKeyVersion makes; NewVersionFault may raise it).
	PendingGets int
}

const KeyRing = "projects/p/locations/global/keyRings/ring"

func CryptoKeyName(key string) string { return KeyRing + "/cryptoKeys/" + key }

func VersionName(key, v string) string { return CryptoKeyName(key) + "/cryptoKeyVersions/" + v }

func (f *Server) Add(name string, signer crypto.Signer, alg kmspb.CryptoKeyVersion_CryptoKeyVersionAlgorithm) *Version {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.versions == nil {
		f.versions = make(map[string]*Version)
	}
	v := &Version{Signer: signer, Alg: alg, State: kmspb.CryptoKeyVersion_ENABLED}
	f.versions[name] = v
	return v
}

func (f *Server) Lookup(name string) (*Version, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.versions[name]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "CryptoKeyVersion %s not found", name)
	}
	return v, nil
}

func (f *Server) SignCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.signs
}

// PublicKeyCount is how many GetPublicKey calls were answered, faults
// included.
func (f *Server) PublicKeyCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.pubKeys
}

func (f *Server) GetPublicKey(_ context.Context, req *kmspb.GetPublicKeyRequest) (*kmspb.PublicKey, error) {
	f.mu.Lock()
	f.pubKeys++
	f.mu.Unlock()
	v, err := f.Lookup(req.Name)
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	fault := takeFault(&v.PublicKeyErr, &v.PublicKeyErrs)
	f.mu.Unlock()
	if fault != nil {
		return nil, fault
	}
	der, err := x509.MarshalPKIXPublicKey(v.Signer.Public())
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	p := string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	sum := int64(crc32.Checksum([]byte(p), crc32c))
	if v.CorruptPEMCRC {
		sum ^= 1
	}
	return &kmspb.PublicKey{Name: req.Name, Pem: p, Algorithm: v.Alg, PemCrc32C: wrapperspb.Int64(sum)}, nil
}

// takeFault returns *err for one call, and clears it once *n calls,
// counted down here, have had it (never while *n is 0).
func takeFault(err *error, n *int) error {
	fault := *err
	if fault != nil && *n > 0 {
		if *n--; *n == 0 {
			*err = nil
		}
	}
	return fault
}

func (f *Server) ListCryptoKeyVersions(_ context.Context, req *kmspb.ListCryptoKeyVersionsRequest) (*kmspb.ListCryptoKeyVersionsResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	resp := &kmspb.ListCryptoKeyVersionsResponse{}
	for name, v := range f.versions {
		if strings.HasPrefix(name, req.Parent+"/cryptoKeyVersions/") {
			resp.CryptoKeyVersions = append(resp.CryptoKeyVersions, &kmspb.CryptoKeyVersion{Name: name, State: v.State, Algorithm: v.Alg})
		}
	}
	if len(resp.CryptoKeyVersions) == 0 {
		return nil, status.Errorf(codes.NotFound, "CryptoKey %s not found", req.Parent)
	}
	resp.TotalSize = int32(len(resp.CryptoKeyVersions))
	return resp, nil
}

func (f *Server) AsymmetricSign(ctx context.Context, req *kmspb.AsymmetricSignRequest) (*kmspb.AsymmetricSignResponse, error) {
	v, err := f.Lookup(req.Name)
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	f.signs++
	delay, signErr := v.Delay, v.SignErr
	corrupt := v.CorruptCRC > 0
	if corrupt {
		v.CorruptCRC--
	}
	unverified := v.Unverified
	f.mu.Unlock()
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	if signErr != nil {
		return nil, signErr
	}
	if v.Alg == kmspb.CryptoKeyVersion_EC_SIGN_ED25519 {
		return signData(v, req, corrupt, unverified)
	}
	if len(req.Data) > 0 || req.DataCrc32C != nil {
		return nil, status.Errorf(codes.Unimplemented, "test server: data for %s is not a path Sigil uses", v.Alg)
	}
	var digest []byte
	var hash crypto.Hash
	switch d := req.GetDigest().GetDigest().(type) {
	case *kmspb.Digest_Sha256:
		digest, hash = d.Sha256, crypto.SHA256
	case *kmspb.Digest_Sha384:
		digest, hash = d.Sha384, crypto.SHA384
	case *kmspb.Digest_Sha512:
		digest, hash = d.Sha512, crypto.SHA512
	default:
		return nil, status.Error(codes.InvalidArgument, "digest required")
	}
	if !strings.HasSuffix(v.Alg.String(), "_"+strings.ToUpper(strings.ReplaceAll(hash.String(), "-", ""))) {
		return nil, status.Errorf(codes.InvalidArgument, "digest type does not match algorithm %s", v.Alg)
	}
	if req.DigestCrc32C != nil && int64(crc32.Checksum(digest, crc32c)) != req.DigestCrc32C.Value {
		return nil, status.Error(codes.InvalidArgument, "digest_crc32c mismatch")
	}
	var opts crypto.SignerOpts = hash
	if strings.HasPrefix(v.Alg.String(), "RSA_SIGN_PSS_") {
		opts = &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash, Hash: hash}
	}
	resp, err := signed(v, req, digest, opts, corrupt)
	if err == nil {
		resp.VerifiedDigestCrc32C = req.DigestCrc32C != nil && !unverified
	}
	return resp, err
}

// signed signs input with v and answers it with the signature's CRC32C,
// a wrong one when corrupt.
func signed(v *Version, req *kmspb.AsymmetricSignRequest, input []byte, opts crypto.SignerOpts, corrupt bool) (*kmspb.AsymmetricSignResponse, error) {
	sig, err := v.Signer.Sign(rand.Reader, input, opts)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	sum := int64(crc32.Checksum(sig, crc32c))
	if corrupt {
		sum ^= 0x5a
	}
	return &kmspb.AsymmetricSignResponse{Name: req.Name, Signature: sig, SignatureCrc32C: wrapperspb.Int64(sum)}, nil
}

// MaxDataSize is the most AsymmetricSignRequest.data Cloud KMS takes, as
// its INVALID_ARGUMENT answer for more says.
const MaxDataSize = 65536

// signData signs req's data with an Ed25519 version, as Cloud KMS does:
// pure Ed25519 over the message, which must come as data, not a digest.
func signData(v *Version, req *kmspb.AsymmetricSignRequest, corrupt, unverified bool) (*kmspb.AsymmetricSignResponse, error) {
	if req.Digest != nil {
		return nil, status.Errorf(codes.InvalidArgument, "%s signs data, not a digest", v.Alg)
	}
	if len(req.Data) > MaxDataSize {
		return nil, status.Errorf(codes.InvalidArgument, "Request field data must have length of at least 0, but not more than %d. Provided value had length %d.", MaxDataSize, len(req.Data))
	}
	if req.DataCrc32C != nil && int64(crc32.Checksum(req.Data, crc32c)) != req.DataCrc32C.Value {
		return nil, status.Error(codes.InvalidArgument, "data_crc32c mismatch")
	}
	resp, err := signed(v, req, req.Data, crypto.Hash(0), corrupt)
	if err == nil {
		resp.VerifiedDataCrc32C = req.DataCrc32C != nil && !unverified
	}
	return resp, err
}

// TB is the part of testing.TB Serve uses; *testing.T and *testing.B
// satisfy it.
type TB interface {
	Helper()
	Cleanup(func())
	Fatalf(format string, args ...any)
}

// Listen serves f on a loopback port until stop is called; Addr then names
// the port. It is Serve for callers outside `go test` (sigil bench).
func (f *Server) Listen() (stop func(), err error) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("gcpkmstest: listen: %w", err)
	}
	srv := grpc.NewServer()
	kmspb.RegisterKeyManagementServiceServer(srv, f)
	go srv.Serve(lis)
	f.mu.Lock()
	f.addr = lis.Addr().String()
	f.mu.Unlock()
	return srv.Stop, nil
}

// Serve starts f on a loopback port for the test's lifetime and returns the
// client options that reach it the way tests should: the real SDK client,
// no credentials, plaintext gRPC.
func (f *Server) Serve(t TB) []option.ClientOption {
	t.Helper()
	stop, err := f.Listen()
	if err != nil {
		t.Fatalf("%v", err)
	}
	t.Cleanup(stop)
	return []option.ClientOption{
		option.WithEndpoint(f.Addr()),
		option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())),
	}
}

// TestKeys are generated once per test binary: RSA generation dominates
// otherwise.
var TestKeys = sync.OnceValue(func() map[string]crypto.Signer {
	must := func(k crypto.Signer, err error) crypto.Signer {
		if err != nil {
			panic(err)
		}
		return k
	}
	return map[string]crypto.Signer{
		"p256":    must(ecdsa.GenerateKey(elliptic.P256(), rand.Reader)),
		"p384":    must(ecdsa.GenerateKey(elliptic.P384(), rand.Reader)),
		"rsa2048": must(rsa.GenerateKey(rand.Reader, 2048)),
		"rsa-b":   must(rsa.GenerateKey(rand.Reader, 2048)),
	}
})

// crc32c is the Castagnoli table Cloud KMS uses for its integrity fields.
var crc32c = crc32.MakeTable(crc32.Castagnoli)

// CreateCryptoKeyVersion adds version max+1 to req.Parent with a fresh real
// key of the algorithm of the CryptoKey's highest version. Like Cloud KMS it
// generates asynchronously: the version is PENDING_GENERATION and the first
// GetCryptoKeyVersion call still reports so; later ones report ENABLED.
func (f *Server) CreateCryptoKeyVersion(_ context.Context, req *kmspb.CreateCryptoKeyVersionRequest) (*kmspb.CryptoKeyVersion, error) {
	f.mu.Lock()
	prefix := req.Parent + "/cryptoKeyVersions/"
	maxN := int64(0)
	var alg kmspb.CryptoKeyVersion_CryptoKeyVersionAlgorithm
	for name, v := range f.versions {
		if !strings.HasPrefix(name, prefix) {
			continue
		}
		n, err := strconv.ParseInt(strings.TrimPrefix(name, prefix), 10, 64)
		if err == nil && n > maxN {
			maxN, alg = n, v.Alg
		}
	}
	f.mu.Unlock()
	if maxN == 0 {
		return nil, status.Errorf(codes.NotFound, "CryptoKey %s not found", req.Parent)
	}
	signer, err := generate(alg)
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	// Numbered under the lock: a concurrent create may have taken maxN+1.
	var name string
	for n := maxN + 1; ; n++ {
		name = prefix + strconv.FormatInt(n, 10)
		if _, taken := f.versions[name]; !taken {
			break
		}
	}
	v := &Version{Signer: signer, Alg: alg, State: kmspb.CryptoKeyVersion_PENDING_GENERATION, PendingGets: 1}
	if f.NewVersionFault != nil {
		f.NewVersionFault(v)
	}
	f.versions[name] = v
	return &kmspb.CryptoKeyVersion{Name: name, State: v.State, Algorithm: alg}, nil
}

// DestroyCryptoKeyVersion schedules a version's destruction, as Cloud KMS
// does: it is DESTROY_SCHEDULED from then on, and signs no more.
func (f *Server) DestroyCryptoKeyVersion(_ context.Context, req *kmspb.DestroyCryptoKeyVersionRequest) (*kmspb.CryptoKeyVersion, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.versions[req.Name]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "CryptoKeyVersion %s not found", req.Name)
	}
	f.destroys++
	if fault := takeFault(&v.DestroyErr, &v.DestroyErrs); fault != nil {
		return nil, fault
	}
	v.State = kmspb.CryptoKeyVersion_DESTROY_SCHEDULED
	v.PendingGets = 0
	return &kmspb.CryptoKeyVersion{Name: req.Name, State: v.State, Algorithm: v.Alg}, nil
}

// generate makes a fresh key for alg: ECDSA P-256, P-384, RSA-2048 or
// Ed25519.
func generate(alg kmspb.CryptoKeyVersion_CryptoKeyVersionAlgorithm) (crypto.Signer, error) {
	var (
		k   crypto.Signer
		err error
	)
	switch alg {
	case kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256:
		k, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case kmspb.CryptoKeyVersion_EC_SIGN_P384_SHA384:
		k, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case kmspb.CryptoKeyVersion_RSA_SIGN_PKCS1_2048_SHA256, kmspb.CryptoKeyVersion_RSA_SIGN_PSS_2048_SHA256:
		k, err = rsa.GenerateKey(rand.Reader, 2048)
	case kmspb.CryptoKeyVersion_EC_SIGN_ED25519:
		_, k, err = ed25519.GenerateKey(rand.Reader)
	default:
		return nil, status.Errorf(codes.Unimplemented, "test server cannot generate %s", alg)
	}
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return k, nil
}

// GetCryptoKeyVersion reports a version's state, turning a freshly created
// version ENABLED after its PendingGets reports (the first one).
func (f *Server) GetCryptoKeyVersion(_ context.Context, req *kmspb.GetCryptoKeyVersionRequest) (*kmspb.CryptoKeyVersion, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	v, ok := f.versions[req.Name]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "CryptoKeyVersion %s not found", req.Name)
	}
	f.gets++
	if fault := takeFault(&v.GetVersionErr, &v.GetVersionErrs); fault != nil {
		return nil, fault
	}
	resp := &kmspb.CryptoKeyVersion{Name: req.Name, State: v.State, Algorithm: v.Alg}
	if v.PendingGets > 0 {
		v.PendingGets--
		if v.PendingGets == 0 && v.State == kmspb.CryptoKeyVersion_PENDING_GENERATION {
			v.State = kmspb.CryptoKeyVersion_ENABLED
		}
	}
	return resp, nil
}

// GetVersionCount is how many GetCryptoKeyVersion calls were answered,
// faults included.
func (f *Server) GetVersionCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.gets
}

// DestroyCount is how many DestroyCryptoKeyVersion calls were answered,
// faults included.
func (f *Server) DestroyCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.destroys
}

// Update runs fn with the server's lock held, for tests that change a
// Version's faults while requests are in flight.
func (f *Server) Update(fn func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn()
}
