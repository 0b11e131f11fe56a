package awskms

import (
	"bytes"
	"context"
	"crypto"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/kms"
	"github.com/aws/aws-sdk-go-v2/service/kms/types"
	"github.com/aws/smithy-go"

	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/awskms/awskmstest"
	"github.com/sigil-agent/sigil/providers/providertest"
)

var (
	algES256 = providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}
	algES384 = providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA384}
	algRS256 = providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: crypto.SHA256}
	algRS384 = providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: crypto.SHA384}
	algRS512 = providers.Algorithm{Scheme: providers.SchemePKCS1v15, Hash: crypto.SHA512}
	algPS256 = providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA256}
	algPS384 = providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA384}
	algPS512 = providers.Algorithm{Scheme: providers.SchemePSS, Hash: crypto.SHA512}
)

// transport wraps the SDK's HTTP client: it counts Sign requests, can send
// the Sign requests for one key to a server that never answers, and can fail
// any operation by name (faults). Everything else reaches local-kms
// unchanged.
type transport struct {
	inner     aws.HTTPClient
	signs     atomic.Int64
	stallKey  atomic.Value // string: a key id whose Sign requests stall
	stallHost string
	faults    sync.Map     // operation name ("UpdateAlias") → fault, on every attempt
	injected  atomic.Int64 // requests answered by inject
	staleARN  string       // what a faultStaleRead DescribeKey names
	attempts  atomic.Int64 // requests of a faultAppliedThenThrottled operation
	replies   sync.Map     // operation name → reply, on every attempt, counted in injected
	answers   sync.Map     // operation name → func(request body) string, a 200 answer's body; local-kms never sees the request
	lateMu    sync.Mutex
	late      []*http.Request // faultAppliedLate requests, sent on after the next DescribeKey
}

// reply is a canned KMS answer: an error body with the status and headers
// KMS (or a proxy in front of it) may send. local-kms never sees the
// request.
type reply struct {
	status int
	body   string
	header http.Header
}

// fault is how an operation fails as the client sees it.
type fault int

const (
	noFault fault = iota
	// faultApplied5xx: local-kms carries the request out, and the client
	// gets a 500 in place of its answer.
	faultApplied5xx
	// faultAppliedLost: local-kms carries the request out, and its answer
	// never arrives: the client's deadline passes.
	faultAppliedLost
	// faultRefused5xx: a 500, and local-kms never sees the request.
	faultRefused5xx
	// faultThrottled: KMS's throttling answer (400 ThrottlingException),
	// and local-kms never sees the request.
	faultThrottled
	// faultStaleRead: a DescribeKey answered with the key staleARN, as
	// eventually consistent KMS may answer just after an alias moved.
	faultStaleRead
	// faultAppliedThenThrottled: the first attempt is faultApplied5xx,
	// every later one faultThrottled.
	faultAppliedThenThrottled
	// faultAppliedLate: a 500 at once, and local-kms carries the request
	// out only after the next DescribeKey has been answered: an update
	// that KMS applies after a read that followed it.
	faultAppliedLate
)

func (tr *transport) Do(req *http.Request) (*http.Response, error) {
	target := req.Header.Get("X-Amz-Target")
	op := target[strings.LastIndexByte(target, '.')+1:]
	if r, ok := tr.replies.Load(op); ok {
		tr.injected.Add(1)
		rp := r.(reply)
		h := rp.header.Clone()
		if h == nil {
			h = http.Header{}
		}
		h.Set("Content-Type", "application/x-amz-json-1.1")
		return &http.Response{
			Status: http.StatusText(rp.status), StatusCode: rp.status,
			Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
			Header: h, Body: io.NopCloser(strings.NewReader(rp.body)),
			ContentLength: int64(len(rp.body)), Request: req,
		}, nil
	}
	if a, ok := tr.answers.Load(op); ok {
		body, err := io.ReadAll(req.Body)
		if err != nil {
			return nil, err
		}
		out := a.(func([]byte) string)(body)
		return &http.Response{
			Status: "200 OK", StatusCode: http.StatusOK,
			Proto: "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
			Header: http.Header{"Content-Type": {"application/x-amz-json-1.1"}},
			Body:   io.NopCloser(strings.NewReader(out)), ContentLength: int64(len(out)), Request: req,
		}, nil
	}
	if f, _ := tr.faults.Load(op); f != nil && f.(fault) != noFault {
		if f.(fault) == faultAppliedThenThrottled {
			f = faultThrottled
			if tr.attempts.Add(1) == 1 {
				f = faultApplied5xx
			}
		}
		if f.(fault) == faultAppliedLate {
			body, err := io.ReadAll(req.Body)
			if err != nil {
				return nil, err
			}
			late := req.Clone(context.Background())
			late.Body = io.NopCloser(bytes.NewReader(body))
			tr.lateMu.Lock()
			tr.late = append(tr.late, late)
			tr.lateMu.Unlock()
			return tr.inject(req, faultRefused5xx)
		}
		return tr.inject(req, f.(fault))
	}
	if op == "DescribeKey" {
		resp, err := tr.inner.Do(req)
		tr.lateMu.Lock()
		late := tr.late
		tr.late = nil
		tr.lateMu.Unlock()
		for _, r := range late {
			lr, lerr := tr.inner.Do(r)
			if lerr != nil {
				return nil, lerr
			}
			io.Copy(io.Discard, lr.Body)
			lr.Body.Close()
		}
		return resp, err
	}
	if op != "Sign" {
		return tr.inner.Do(req)
	}
	tr.signs.Add(1)
	if key, _ := tr.stallKey.Load().(string); key != "" && req.Body != nil {
		body, err := io.ReadAll(req.Body)
		if err != nil {
			return nil, err
		}
		req.Body = io.NopCloser(bytes.NewReader(body))
		if bytes.Contains(body, []byte(key)) {
			req.URL.Host = tr.stallHost
			req.Host = tr.stallHost
		}
	}
	return tr.inner.Do(req)
}

func (tr *transport) inject(req *http.Request, f fault) (*http.Response, error) {
	if f == faultApplied5xx || f == faultAppliedLost {
		resp, err := tr.inner.Do(req)
		if err != nil {
			return nil, err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
	if f == faultAppliedLost {
		<-req.Context().Done()
		return nil, req.Context().Err()
	}
	// What KMS answers when it fails inside; the SDK retries it, and
	// meets the same fault each time.
	body, status, code := `{"__type":"KMSInternalException","message":"injected fault"}`, "500 Internal Server Error", http.StatusInternalServerError
	switch f {
	case faultThrottled:
		body, status, code = `{"__type":"ThrottlingException","message":"Rate exceeded"}`, "400 Bad Request", http.StatusBadRequest
	case faultStaleRead:
		body, status, code = fmt.Sprintf(`{"KeyMetadata":{"Arn":%q,"KeyId":%q,"KeyState":"Enabled"}}`, tr.staleARN, tr.staleARN), "200 OK", http.StatusOK
	}
	tr.injected.Add(1)
	return &http.Response{
		Status:        status,
		StatusCode:    code,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        http.Header{"Content-Type": {"application/x-amz-json-1.1"}},
		Body:          io.NopCloser(strings.NewReader(body)),
		ContentLength: int64(len(body)),
		Request:       req,
	}, nil
}

// stallServer accepts TCP connections and reads from them without ever
// answering: a KMS endpoint that has stopped responding.
func stallServer(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			go io.Copy(io.Discard, c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return ln.Addr().String()
}

// testFleet is a local-kms holding one key per key spec, and a provider
// opened on it.
type testFleet struct {
	endpoint string
	admin    *kms.Client
	ids      map[string]string // Sigil key name → KMS key id
	tr       *transport
	p        *Provider
}

func testConfig(endpoint string, tr *transport, timeout time.Duration, keys ...KeyConfig) Config {
	cfg := Config{
		ID:          "aws",
		Region:      awskmstest.Region,
		Endpoint:    endpoint,
		Keys:        keys,
		Timeout:     timeout,
		Credentials: awskmstest.Credentials(),
	}
	if tr != nil {
		cfg.ClientOptions = []func(*kms.Options){func(o *kms.Options) {
			tr.inner = o.HTTPClient
			o.HTTPClient = tr
		}}
	}
	return cfg
}

func newFleet(t *testing.T, timeout time.Duration) *testFleet {
	t.Helper()
	endpoint := awskmstest.Start(t)
	admin := awskmstest.Client(endpoint)
	tf := &testFleet{
		endpoint: endpoint,
		admin:    admin,
		ids: map[string]string{
			"p256": awskmstest.CreateKey(t, admin, types.KeySpecEccNistP256),
			"p384": awskmstest.CreateKey(t, admin, types.KeySpecEccNistP384),
			"rsa":  awskmstest.CreateKey(t, admin, types.KeySpecRsa2048),
		},
		tr: &transport{stallHost: stallServer(t)},
	}
	p, err := Open(context.Background(), testConfig(endpoint, tf.tr, timeout,
		KeyConfig{Name: "p256", KeyID: tf.ids["p256"]},
		KeyConfig{Name: "p384", KeyID: tf.ids["p384"]},
		KeyConfig{Name: "rsa", KeyID: tf.ids["rsa"]},
	))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	tf.p = p
	return tf
}

func (tf *testFleet) info(t *testing.T, name string) providers.KeyInfo {
	t.Helper()
	return providertest.KeyInfo(t, tf.p, name)
}

var randomDigest = providertest.RandomDigest

func TestSignVerifies(t *testing.T) {
	tf := newFleet(t, 0)
	for _, tc := range []struct {
		key  string
		alg  providers.Algorithm
		kind providers.KeyType
	}{
		{"p256", algES256, providers.KeyECDSAP256},
		{"p384", algES384, providers.KeyECDSAP384},
		{"rsa", algRS256, providers.KeyRSA2048},
		{"rsa", algRS384, providers.KeyRSA2048},
		{"rsa", algRS512, providers.KeyRSA2048},
		{"rsa", algPS256, providers.KeyRSA2048},
		{"rsa", algPS384, providers.KeyRSA2048},
		{"rsa", algPS512, providers.KeyRSA2048},
	} {
		t.Run(tc.key+"/"+tc.alg.String(), func(t *testing.T) {
			ki := tf.info(t, tc.key)
			if ki.Type != tc.kind || ki.Provider != "aws" || len(ki.KID) != 32 {
				t.Fatalf("key info %+v", ki)
			}
			digest := randomDigest(tc.alg.Hash)
			sig, err := tf.p.Sign(context.Background(), tc.key, tc.alg, digest)
			if err != nil {
				t.Fatal(err)
			}
			if err := providers.Verify(ki.Public, tc.alg, digest, sig); err != nil {
				t.Fatalf("verify: %v", err)
			}
			sig[len(sig)/2] ^= 0x01
			if err := providers.Verify(ki.Public, tc.alg, digest, sig); !errors.Is(err, providers.ErrInvalidSignature) {
				t.Fatalf("flipped bit: verify = %v, want ErrInvalidSignature", err)
			}
		})
	}
	for name, want := range map[string]int{"p256": 1, "p384": 1, "rsa": 6} {
		if got := len(tf.p.Algorithms(name)); got != want {
			t.Errorf("%s: %d algorithms, want %d", name, got, want)
		}
	}
	if arn, _ := tf.p.KeyARN("p256"); !strings.HasPrefix(arn, "arn:aws:kms:"+awskmstest.Region+":"+awskmstest.AccountID+":key/") {
		t.Errorf("key ARN %q", arn)
	}
}

func TestSignRefusesOtherAlgorithms(t *testing.T) {
	tf := newFleet(t, 0)
	for _, tc := range []struct {
		key string
		alg providers.Algorithm
	}{
		{"p256", algES384},
		{"p384", algES256},
		{"p256", algPS256},
		{"rsa", algES256},
		{"p256", providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA512}},
		{"p256", providers.Algorithm{Scheme: providers.SchemeEd25519}},
	} {
		t.Run(tc.key+"/"+tc.alg.String(), func(t *testing.T) {
			_, err := tf.p.Sign(context.Background(), tc.key, tc.alg, randomDigest(crypto.SHA256))
			if !errors.Is(err, providers.ErrUnsupportedAlgorithm) {
				t.Fatalf("err = %v, want ErrUnsupportedAlgorithm", err)
			}
		})
	}
	if _, err := tf.p.Sign(context.Background(), "p256", algES256, make([]byte, 20)); !errors.Is(err, providers.ErrBadRequest) {
		t.Fatalf("short digest: %v", err)
	}
	if n := tf.tr.signs.Load(); n != 0 {
		t.Fatalf("%d refused requests reached KMS", n)
	}
}

func TestSignUnknownKeyAndClosed(t *testing.T) {
	tf := newFleet(t, 0)
	if _, err := tf.p.Sign(context.Background(), "nope", algES256, randomDigest(crypto.SHA256)); !errors.Is(err, providers.ErrNotFound) {
		t.Fatalf("unknown key: %v", err)
	}
	if !providers.IsRemote(tf.p) {
		t.Fatal("provider does not declare itself Remote")
	}
	if err := tf.p.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := tf.p.Sign(context.Background(), "p256", algES256, randomDigest(crypto.SHA256)); !errors.Is(err, providers.ErrUnavailable) {
		t.Fatalf("after Close: %v", err)
	}
}

func TestOpenByAlias(t *testing.T) {
	endpoint := awskmstest.Start(t)
	admin := awskmstest.Client(endpoint)
	id := awskmstest.CreateKey(t, admin, types.KeySpecEccNistP256)
	awskmstest.CreateAlias(t, admin, "alias/sigil-signing", id)
	p, err := Open(context.Background(), testConfig(endpoint, nil, 0, KeyConfig{Name: "signing", KeyID: "alias/sigil-signing"}))
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if arn, _ := p.KeyARN("signing"); !strings.HasSuffix(arn, ":key/"+id) {
		t.Fatalf("alias resolved to %q, want the ARN of key %s", arn, id)
	}
	ki, _ := p.Keys(context.Background())
	digest := randomDigest(crypto.SHA256)
	sig, err := p.Sign(context.Background(), "signing", algES256, digest)
	if err != nil {
		t.Fatal(err)
	}
	if err := providers.Verify(ki[0].Public, algES256, digest, sig); err != nil {
		t.Fatal(err)
	}
}

func TestOpenRefuses(t *testing.T) {
	endpoint := awskmstest.Start(t)
	admin := awskmstest.Client(endpoint)
	ok := awskmstest.CreateKey(t, admin, types.KeySpecEccNistP256)
	encOut, err := admin.CreateKey(context.Background(), &kms.CreateKeyInput{
		KeySpec: types.KeySpecRsa2048, KeyUsage: types.KeyUsageTypeEncryptDecrypt,
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		key  KeyConfig
		want error
	}{
		{"unknown key id", KeyConfig{Name: "k", KeyID: "00000000-0000-4000-8000-000000000000"}, providers.ErrNotFound},
		{"unknown alias", KeyConfig{Name: "k", KeyID: "alias/missing"}, providers.ErrNotFound},
		{"encryption key", KeyConfig{Name: "k", KeyID: aws.ToString(encOut.KeyMetadata.KeyId)}, providers.ErrUnsupportedAlgorithm},
		{"empty key id", KeyConfig{Name: "k"}, providers.ErrBadRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := Open(context.Background(), testConfig(endpoint, nil, 0, KeyConfig{Name: "fine", KeyID: ok}, tc.key))
			if err == nil {
				p.Close()
				t.Fatal("Open succeeded")
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
	if _, err := Open(context.Background(), testConfig(endpoint, nil, 0, KeyConfig{Name: "a", KeyID: ok}, KeyConfig{Name: "a", KeyID: ok})); err == nil {
		t.Fatal("duplicate key name accepted")
	}
}

// A disabled key fails as unavailable, without the digest in the message.
func TestSignDisabledKey(t *testing.T) {
	tf := newFleet(t, 0)
	awskmstest.DisableKey(t, tf.admin, tf.ids["p256"])
	digest := randomDigest(crypto.SHA256)
	_, err := tf.p.Sign(context.Background(), "p256", algES256, digest)
	if !errors.Is(err, providers.ErrUnavailable) || !strings.Contains(err.Error(), "key not usable") {
		t.Fatalf("err = %v, want ErrUnavailable, key not usable", err)
	}
	if strings.Contains(strings.ToLower(err.Error()), hex.EncodeToString(digest)) {
		t.Fatalf("err %q carries the digest", err)
	}
	if _, err := tf.p.Sign(context.Background(), "p384", algES384, randomDigest(crypto.SHA384)); err != nil {
		t.Fatalf("other key: %v", err)
	}
}

// A stalled KMS costs the caller the configured deadline and no more, and the
// provider goes on serving its other keys meanwhile.
func TestSignDeadline(t *testing.T) {
	// The bounds below sit midway between the outcomes they tell apart,
	// so that a CI machine stalled for a few hundred milliseconds cannot
	// trip them: the call ends at Config.Timeout, not at twice it (a
	// deadline per attempt, one retry) nor at the stall (5 s or never);
	// the caller's 50 ms deadline ends it well before Config.Timeout.
	const timeout = time.Second
	const limit = timeout + timeout/2
	tf := newFleet(t, timeout)
	tf.tr.stallKey.Store(tf.ids["p256"])

	other := make(chan error, 1)
	go func() {
		digest := randomDigest(crypto.SHA384)
		sig, err := tf.p.Sign(context.Background(), "p384", algES384, digest)
		if err == nil {
			err = providers.Verify(tf.info(t, "p384").Public, algES384, digest, sig)
		}
		other <- err
	}()

	start := time.Now()
	_, err := tf.p.Sign(context.Background(), "p256", algES256, randomDigest(crypto.SHA256))
	elapsed := time.Since(start)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want DeadlineExceeded", err)
	}
	if elapsed < timeout || elapsed > limit {
		t.Fatalf("deadline error after %v, want %v..%v", elapsed, timeout, limit)
	}
	if err := <-other; err != nil {
		t.Fatalf("other key during a stall: %v", err)
	}

	// The caller's own, shorter deadline wins over Config.Timeout.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start = time.Now()
	if _, err := tf.p.Sign(ctx, "p256", algES256, randomDigest(crypto.SHA256)); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("caller deadline: err = %v", err)
	}
	if elapsed := time.Since(start); elapsed > timeout/2 {
		t.Fatalf("caller deadline of 50ms honoured after %v", elapsed)
	}
}

// Open against an endpoint that never answers fails with DeadlineExceeded.
func TestOpenDeadline(t *testing.T) {
	const timeout = 200 * time.Millisecond
	start := time.Now()
	_, err := Open(context.Background(), testConfig("http://"+stallServer(t), nil, timeout, KeyConfig{Name: "k", KeyID: "alias/any"}))
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want DeadlineExceeded", err)
	}
	if elapsed := time.Since(start); elapsed > timeout+500*time.Millisecond {
		t.Fatalf("Open gave up after %v", elapsed)
	}
}

// classify keeps the API error code, maps it, and drops the server's text.
func TestClassify(t *testing.T) {
	const secret = "server says: secret-detail"
	for _, tc := range []struct {
		err     error
		want    error
		message string
	}{
		{&smithy.GenericAPIError{Code: "ThrottlingException", Message: secret}, providers.ErrRateLimited, "rate limited"},
		{&types.LimitExceededException{Message: aws.String(secret)}, providers.ErrRateLimited, "rate limited"},
		{&smithy.GenericAPIError{Code: "AccessDeniedException", Message: secret}, providers.ErrUnavailable, "credentials refused"},
		{&smithy.GenericAPIError{Code: "UnrecognizedClientException", Message: secret}, providers.ErrUnavailable, "credentials refused"},
		{&smithy.GenericAPIError{Code: "InvalidSignatureException", Message: secret}, providers.ErrUnavailable, "credentials refused"},
		{&types.NotFoundException{Message: aws.String(secret)}, providers.ErrNotFound, ""},
		{&types.DisabledException{Message: aws.String(secret)}, providers.ErrUnavailable, "key not usable"},
		{&types.KMSInvalidStateException{Message: aws.String(secret)}, providers.ErrUnavailable, "key not usable"},
		{&smithy.GenericAPIError{Code: "ValidationException", Message: secret}, providers.ErrBadRequest, ""},
		{&types.InvalidKeyUsageException{Message: aws.String(secret)}, providers.ErrBadRequest, ""},
		{&types.KMSInternalException{Message: aws.String(secret)}, providers.ErrUnavailable, "KMSInternalException"},
		{errors.New(secret), providers.ErrUnavailable, "request failed"},
	} {
		got := classify(context.Background(), context.Background(), "sign k", &smithy.OperationError{ServiceID: "KMS", OperationName: "Sign", Err: tc.err})
		if !errors.Is(got, tc.want) || !strings.Contains(got.Error(), tc.message) {
			t.Errorf("%T: %v, want %v mentioning %q", tc.err, got, tc.want, tc.message)
		}
		if strings.Contains(got.Error(), "secret-detail") {
			t.Errorf("%T: %q carries the server's text", tc.err, got)
		}
	}
	expired, cancel := context.WithDeadline(context.Background(), time.Now())
	defer cancel()
	if got := classify(context.Background(), expired, "sign k", errors.New("x")); !errors.Is(got, context.DeadlineExceeded) {
		t.Errorf("expired call: %v", got)
	}
}

func BenchmarkSign(b *testing.B) {
	endpoint := awskmstest.Start(b)
	id := awskmstest.CreateKey(b, awskmstest.Client(endpoint), types.KeySpecEccNistP256)
	p, err := Open(context.Background(), testConfig(endpoint, nil, 0, KeyConfig{Name: "p256", KeyID: id}))
	if err != nil {
		b.Fatal(err)
	}
	defer p.Close()
	digest := randomDigest(crypto.SHA256)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := p.Sign(context.Background(), "p256", algES256, digest); err != nil {
			b.Fatal(err)
		}
	}
}

// KMS throttling is RATE_LIMITED at once, after one request: the SDK's
// retries of a throttle (with a fixed backoff under a short cap) would
// send the throttled service three requests per signature, in step with
// every other caller, and turn the answer into DEADLINE_EXCEEDED for a
// caller with a tight deadline.
func TestThrottlingIsNotRetried(t *testing.T) {
	tf := newFleet(t, 0)
	tf.tr.faults.Store("Sign", faultThrottled)
	// The bound is midway between an answer at once and one at the
	// caller's deadline, for a stalled CI machine not to trip it.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	start := time.Now()
	_, err := tf.p.Sign(ctx, "p256", algES256, randomDigest(algES256.Hash))
	if !errors.Is(err, providers.ErrRateLimited) {
		t.Fatalf("Sign while KMS throttles: %v, want ErrRateLimited", err)
	}
	if n := tf.tr.injected.Load(); n != 1 {
		t.Fatalf("%d Sign requests for one throttled signature, want 1", n)
	}
	if el := time.Since(start); el > time.Second {
		t.Fatalf("the throttle took %v to report", el)
	}
}

// Credentials that can no longer be had (expired, the role or the file
// unreadable) are told apart from a network failure: nothing reached KMS.
func TestCredentialFailureIsNamed(t *testing.T) {
	endpoint := awskmstest.Start(t)
	admin := awskmstest.Client(endpoint)
	id := awskmstest.CreateKey(t, admin, types.KeySpecEccNistP256)
	var broken atomic.Bool
	static := awskmstest.Credentials()
	cfg := testConfig(endpoint, nil, 2*time.Second, KeyConfig{Name: "k", KeyID: id})
	cfg.Credentials = aws.CredentialsProviderFunc(func(ctx context.Context) (aws.Credentials, error) {
		if broken.Load() {
			return aws.Credentials{}, errors.New("the credential source is unreadable")
		}
		c, err := static.Retrieve(ctx)
		c.CanExpire, c.Expires = true, time.Now().Add(time.Second)
		return c, err
	})
	p, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	broken.Store(true)
	time.Sleep(1100 * time.Millisecond) // the cached credentials expire
	_, err = p.Sign(context.Background(), "k", algES256, randomDigest(crypto.SHA256))
	if !errors.Is(err, providers.ErrUnavailable) || !strings.Contains(err.Error(), "no credentials") {
		t.Fatalf("Sign with credentials gone: %v, want UNAVAILABLE naming the credentials", err)
	}
}

// Throttling is RATE_LIMITED after one request, whatever HTTP status
// carries it and whatever pause it asks for (X-Amz-Retry-After); a
// transient 5xx is retried, at most three requests, each pause within the
// backoff cap (a quarter of the timeout) and the call's deadline. A pause
// the service asks for beyond either is not taken: the SDK would stretch
// its backoff to the hint (up to 5 s more), and sleep out the deadline to
// answer DEADLINE_EXCEEDED late where UNAVAILABLE was known at once.
func TestThrottlingAndRetryAfter(t *testing.T) {
	// Each maxElapsed sits well between the outcomes it tells apart (an
	// answer at once against a pause or a deadline of 900 ms or more),
	// so that a CI machine stalled for a few hundred milliseconds cannot
	// trip it. Rows whose pauses must fit under the backoff cap run with
	// a longer timeout, for a cap of 1 s.
	const timeout, longTimeout = time.Second, 4 * time.Second // backoff caps 250ms, 1s
	endpoint := awskmstest.Start(t)
	id := awskmstest.CreateKey(t, awskmstest.Client(endpoint), types.KeySpecEccNistP256)
	throttle := `{"__type":"ThrottlingException","message":"Rate exceeded"}`
	internal := `{"__type":"KMSInternalException","message":"injected fault"}`
	for _, tc := range []struct {
		name       string
		status     int
		body       string
		retryAfter string        // X-Amz-Retry-After, milliseconds; "" for none
		timeout    time.Duration // Config.Timeout, 0 for timeout
		deadline   time.Duration // the caller's, 0 for none
		want       error
		attempts   int64
		minElapsed time.Duration // pauses taken
		maxElapsed time.Duration
	}{
		{"throttled", 400, throttle, "", 0, 0, providers.ErrRateLimited, 1, 0, timeout / 2},
		{"throttled, retry after 900ms", 400, throttle, "900", longTimeout, 0, providers.ErrRateLimited, 1, 0, 450 * time.Millisecond},
		{"throttled, retry after 3s", 400, throttle, "3000", 0, 0, providers.ErrRateLimited, 1, 0, timeout / 2},
		{"429 without an error code", 429, `{"message":"Too Many Requests"}`, "", 0, 0, providers.ErrRateLimited, 1, 0, timeout / 2},
		{"429, retry after 900ms", 429, "", "900", longTimeout, 0, providers.ErrRateLimited, 1, 0, 450 * time.Millisecond},
		{"429 from a proxy, an HTML body", 429, "<html><body>429 Too Many Requests</body></html>", "", 0, 0, providers.ErrRateLimited, 1, 0, timeout / 2},
		{"429 from a proxy, a text body", 429, "Too Many Requests", "", 0, 0, providers.ErrRateLimited, 1, 0, timeout / 2},
		{"throttled on a 503, retry after 900ms", 503, throttle, "900", longTimeout, 0, providers.ErrRateLimited, 1, 0, 450 * time.Millisecond},
		{"5xx", 500, internal, "", 0, 0, providers.ErrUnavailable, 3, 0, 2*timeout/4 + 150*time.Millisecond},
		{"5xx, retry after 100ms", 500, internal, "100", 0, 0, providers.ErrUnavailable, 3, 200 * time.Millisecond, 2*timeout/4 + 150*time.Millisecond},
		{"5xx, retry after 3s, beyond the cap", 500, internal, "3000", 0, 0, providers.ErrUnavailable, 1, 0, timeout / 2},
		{"5xx, retry after a year", 500, internal, "31536000000", 0, 0, providers.ErrUnavailable, 1, 0, timeout / 2},
		{"5xx, retry after 950ms, beyond the caller's deadline", 500, internal, "950", longTimeout, 900 * time.Millisecond, providers.ErrUnavailable, 1, 0, 450 * time.Millisecond},
		{"5xx, retry after 900ms, deadline for one pause", 500, internal, "900", longTimeout, 1700 * time.Millisecond, providers.ErrUnavailable, 2, 900 * time.Millisecond, 1300 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tr := &transport{}
			cfgTimeout := timeout
			if tc.timeout > 0 {
				cfgTimeout = tc.timeout
			}
			p, err := Open(context.Background(), testConfig(endpoint, tr, cfgTimeout, KeyConfig{Name: "k", KeyID: id}))
			if err != nil {
				t.Fatal(err)
			}
			defer p.Close()
			rp := reply{status: tc.status, body: tc.body}
			if tc.retryAfter != "" {
				rp.header = http.Header{"X-Amz-Retry-After": {tc.retryAfter}}
			}
			tr.replies.Store("Sign", rp)
			ctx := context.Background()
			if tc.deadline > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tc.deadline)
				defer cancel()
			}
			start := time.Now()
			_, err = p.Sign(ctx, "k", algES256, randomDigest(algES256.Hash))
			elapsed := time.Since(start)
			if !errors.Is(err, tc.want) || errors.Is(err, context.DeadlineExceeded) || strings.Contains(err.Error(), "injected fault") {
				t.Errorf("Sign: %v, want %v without the server's text", err, tc.want)
			}
			if n := tr.injected.Load(); n != tc.attempts {
				t.Errorf("%d requests, want %d", n, tc.attempts)
			}
			if elapsed < tc.minElapsed || elapsed > tc.maxElapsed {
				t.Errorf("answered after %v, want %v..%v", elapsed, tc.minElapsed, tc.maxElapsed)
			}
		})
	}
}
