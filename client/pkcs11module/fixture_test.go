package pkcs11module

import (
	"bufio"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	p11 "github.com/miekg/pkcs11"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/pkcs11/softhsmtest"
)

var (
	buildOnce sync.Once
	modPath   string
	buildErr  error
)

// modulePath builds bin/libsigil-pkcs11.so with the Makefile's own rule
// (a no-op when it is up to date, as under `make test`) and returns its
// absolute path; $SIGIL_PKCS11_MODULE names another build to test.
func modulePath(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		if p := os.Getenv("SIGIL_PKCS11_MODULE"); p != "" {
			modPath = p
			return
		}
		root, err := filepath.Abs("../..")
		if err != nil {
			buildErr = err
			return
		}
		out, err := exec.Command("make", "--no-print-directory", "-s", "-C", root, "bin/libsigil-pkcs11.so").CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("make bin/libsigil-pkcs11.so: %v\n%s", err, out)
			return
		}
		modPath = filepath.Join(root, "bin", "libsigil-pkcs11.so")
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return modPath
}

// shortDir is a temporary directory with a path short enough for a Unix
// socket (t.TempDir's can exceed sun_path's 108 bytes).
func shortDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "sgp11")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// fixture is a real agent in this process, serving software keys (p256,
// p384, rsa, ed) and, with hsm, SoftHSM2 keys (hsm-p256, hsm-rsa, hsm-ed).
// SIGIL_SOCK points at it, for this process's module and for the programs
// the tests run.
type fixture struct {
	t     *testing.T
	cfg   agent.Config
	dir   string
	agent *agent.Agent
	done  chan error
	admin chan error
	keys  map[string]client.Key
}

type fixtureOptions struct {
	hsm       bool
	policy    string // a policy file's text: the agent runs multi-tenant
	socketDir string // where the agent's sockets go; "" is the fixture's own dir
}

const softProvider = `  - id: soft
    type: software
    keys:
      - {name: p256, type: ecdsa-p256}
      - {name: p384, type: ecdsa-p384}
      - {name: rsa, type: rsa-2048}
      - {name: ed, type: ed25519}
`

func startFixture(t *testing.T, o fixtureOptions) *fixture {
	t.Helper()
	text := "providers:\n" + softProvider
	if o.hsm {
		tok := softhsmtest.New(t, "sigil-front")
		keys := tok.GenerateKeys(t, providers.KeyECDSAP256, providers.KeyRSA2048, providers.KeyEd25519)
		t.Setenv("SIGIL_TEST_HSM_PIN", tok.PIN)
		text += fmt.Sprintf("  - id: hsm\n    type: pkcs11\n    module: %s\n    token_label: %s\n    pin_env: SIGIL_TEST_HSM_PIN\n    keys:\n"+
			"      - {name: hsm-p256, uri: %q}\n      - {name: hsm-rsa, uri: %q}\n      - {name: hsm-ed, uri: %q}\n",
			tok.Module, tok.Label, keys[providers.KeyECDSAP256].URI, keys[providers.KeyRSA2048].URI, keys[providers.KeyEd25519].URI)
	}
	cfg, err := agent.ParseConfig([]byte(text))
	if err != nil {
		t.Fatal(err)
	}
	dir := shortDir(t)
	cfg.DataDir = filepath.Join(dir, "state")
	sockDir := dir
	if o.socketDir != "" {
		sockDir = o.socketDir
	}
	cfg.Socket = filepath.Join(sockDir, "agent.sock")
	cfg.AdminSocket = filepath.Join(sockDir, "admin.sock")
	if o.policy != "" {
		cfg.Policy = filepath.Join(dir, "policy.yaml")
		if err := os.WriteFile(cfg.Policy, []byte(o.policy), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	f := &fixture{t: t, cfg: cfg, dir: dir}
	f.start()
	t.Cleanup(func() {
		if f.agent != nil {
			f.stop()
		}
	})
	t.Setenv(proto.SocketEnv, cfg.Socket)
	t.Setenv("SIGIL_PKCS11_CONF", "")
	c := f.dial()
	defer c.Close()
	ks, err := c.ListKeys(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	f.keys = map[string]client.Key{}
	for _, k := range ks {
		f.keys[k.Name] = k
	}
	return f
}

func (f *fixture) start() {
	f.t.Helper()
	a, err := agent.New(context.Background(), f.cfg, nil)
	if err != nil {
		f.t.Fatalf("agent.New: %v", err)
	}
	ln, err := agent.ListenUnix(f.cfg.Socket)
	if err != nil {
		f.t.Fatal(err)
	}
	aln, err := agent.ListenUnix(f.cfg.AdminSocket)
	if err != nil {
		f.t.Fatal(err)
	}
	f.agent, f.done, f.admin = a, make(chan error, 1), make(chan error, 1)
	go func() { f.done <- a.Serve(ln) }()
	go func() { f.admin <- a.ServeAdmin(aln) }()
}

// stop shuts the agent down; start brings it back on the same socket,
// data directory and keys (a restart).
func (f *fixture) stop() {
	f.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := f.agent.Shutdown(ctx); err != nil && !errors.Is(err, agent.ErrClosed) {
		f.t.Errorf("shutdown: %v", err)
	}
	<-f.done
	<-f.admin
	f.agent = nil
}

func (f *fixture) dial() *client.Client {
	f.t.Helper()
	c, err := client.Dial(context.Background(), f.cfg.Socket)
	if err != nil {
		f.t.Fatal(err)
	}
	return c
}

func (f *fixture) dialAdmin() *client.Client {
	f.t.Helper()
	c, err := client.Dial(context.Background(), f.cfg.AdminSocket)
	if err != nil {
		f.t.Fatal(err)
	}
	return c
}

// pem writes key's public key as a PEM file for openssl and returns its path.
func (f *fixture) pem(name string) string {
	f.t.Helper()
	k, ok := f.keys[name]
	if !ok {
		f.t.Fatalf("no key %q behind the agent", name)
	}
	der, err := x509.MarshalPKIXPublicKey(k.Public)
	if err != nil {
		f.t.Fatal(err)
	}
	path := filepath.Join(f.dir, name+".pem")
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o600); err != nil {
		f.t.Fatal(err)
	}
	return path
}

// need skips the test when a program it runs is not installed.
func need(t testing.TB, progs ...string) {
	t.Helper()
	for _, p := range progs {
		if _, err := exec.LookPath(p); err != nil {
			t.Skipf("%s not installed (make test installs it as root: see .ci/install-test-deps)", p)
		}
	}
}

// run runs a program with extra environment and returns its combined
// output, failing the test when it exits non-zero.
func run(t testing.TB, env []string, name string, args ...string) string {
	t.Helper()
	out, err := runErr(env, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func runErr(env []string, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdin = nil
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// ---- a fake agent: counts requests by op and answers what a test sets ----

type fakeKey struct {
	name, kid, kty string
	signer         crypto.Signer
}

type fakeAgent struct {
	t      testing.TB
	sock   string
	ln     net.Listener
	keys   []fakeKey
	code   atomic.Uint32 // what Sign answers; OK signs
	silent atomic.Bool   // Sign requests are read and never answered
	hangUp atomic.Bool   // after answering a Sign, close the connection
	// finalOK: every request is answered with id 0 (the final reply
	// before a close) and code OK, which the protocol calls malformed,
	// carrying a signature of zeros.
	finalOK atomic.Bool
	hungUp  chan struct{} // receives once per connection closed for hangUp
	ops     [32]atomic.Int64
	conns   atomic.Int64
	mu      sync.Mutex // open, and keys once serving
	open    []net.Conn
	closed  atomic.Bool
}

func newFakeKeys(t testing.TB) []fakeKey {
	t.Helper()
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p384, _ := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	kid := func() string { b := make([]byte, 16); rand.Read(b); return hex.EncodeToString(b) }
	return []fakeKey{
		{"p256", kid(), "ecdsa-p256", p256},
		{"p384", kid(), "ecdsa-p384", p384},
		{"rsa", kid(), "rsa-2048", rsaKey},
		{"ed", kid(), "ed25519", ed},
	}
}

func startFake(t testing.TB, keys []fakeKey) *fakeAgent {
	t.Helper()
	f := &fakeAgent{t: t, sock: filepath.Join(shortDir(t), "fake.sock"), keys: keys, hungUp: make(chan struct{}, 16)}
	ln, err := net.Listen("unix", f.sock)
	if err != nil {
		t.Fatal(err)
	}
	f.ln = ln
	go f.serve()
	t.Cleanup(f.close)
	return f
}

func (f *fakeAgent) serve() {
	for {
		nc, err := f.ln.Accept()
		if err != nil {
			return
		}
		f.conns.Add(1)
		f.mu.Lock()
		f.open = append(f.open, nc)
		f.mu.Unlock()
		go f.handle(nc)
	}
}

// close stops listening and drops every connection: the agent is gone.
func (f *fakeAgent) close() {
	if f.closed.Swap(true) {
		return
	}
	f.ln.Close()
	f.mu.Lock()
	for _, c := range f.open {
		c.Close()
	}
	f.mu.Unlock()
}

// setKeys changes what the agent lists and signs with from the next
// request on: a key added, removed or moved in the list behind the module.
func (f *fakeAgent) setKeys(keys []fakeKey) {
	f.mu.Lock()
	f.keys = keys
	f.mu.Unlock()
}

func (f *fakeAgent) total() int64 {
	var n int64
	for i := range f.ops {
		n += f.ops[i].Load()
	}
	return n
}

func (f *fakeAgent) reset() {
	for i := range f.ops {
		f.ops[i].Store(0)
	}
}

func (f *fakeAgent) handle(nc net.Conn) {
	defer nc.Close()
	br := bufio.NewReader(nc)
	codec := proto.NewCodec()
	var buf []byte
	for {
		payload, err := proto.ReadFrame(br, buf, proto.DefaultMaxFrame)
		if err != nil {
			return
		}
		var req proto.Request
		if err := codec.DecodeRequest(payload, &req); err != nil {
			return
		}
		if int(req.Op) < len(f.ops) {
			f.ops[req.Op].Add(1)
		}
		if req.Op == proto.OpSign && f.silent.Load() {
			continue // a hung agent: the connection stays open, unanswered
		}
		resp := f.answer(&req)
		if f.finalOK.Load() {
			resp = &proto.Response{ID: 0, Code: proto.OK, Sig: make([]byte, 64)}
		}
		frame, err := codec.AppendResponseFrame(nil, resp)
		if err != nil {
			return
		}
		if _, err := nc.Write(frame); err != nil {
			return
		}
		if req.Op == proto.OpSign && f.hangUp.Load() {
			nc.Close()
			f.hungUp <- struct{}{}
			return
		}
	}
}

var hashes = map[uint8]crypto.Hash{proto.HashSHA256: crypto.SHA256, proto.HashSHA384: crypto.SHA384, proto.HashSHA512: crypto.SHA512}

func (f *fakeAgent) answer(req *proto.Request) *proto.Response {
	resp := &proto.Response{ID: req.ID}
	f.mu.Lock()
	keys := f.keys
	f.mu.Unlock()
	switch req.Op {
	case proto.OpHello:
		resp.Version = proto.Version
	case proto.OpListKeys:
		resp.Keys = []proto.KeyEntry{}
		for _, k := range keys {
			der, _ := x509.MarshalPKIXPublicKey(k.signer.Public())
			resp.Keys = append(resp.Keys, proto.KeyEntry{Name: k.name, KID: k.kid, Provider: "fake", KeyType: k.kty, Pub: der})
		}
	case proto.OpSign:
		if c := proto.Code(f.code.Load()); c != proto.OK {
			resp.Code, resp.Msg = c, "as the test asked"
			return resp
		}
		var key *fakeKey
		for i := range keys {
			if keys[i].name == req.Key && keys[i].kid == req.KID {
				key = &keys[i]
			}
		}
		if key == nil {
			resp.Code = proto.NotFound
			return resp
		}
		var sig []byte
		var err error
		switch s := key.signer.(type) {
		case *ecdsa.PrivateKey:
			sig, err = ecdsa.SignASN1(rand.Reader, s, req.Digest)
		case *rsa.PrivateKey:
			if req.Scheme == proto.SchemePSS {
				sig, err = rsa.SignPSS(rand.Reader, s, hashes[req.Hash], req.Digest, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
			} else {
				sig, err = rsa.SignPKCS1v15(rand.Reader, s, hashes[req.Hash], req.Digest)
			}
		case ed25519.PrivateKey:
			sig = ed25519.Sign(s, req.Digest)
		}
		if err != nil {
			resp.Code, resp.Msg = proto.BadRequest, err.Error()
			return resp
		}
		resp.Sig, resp.Key, resp.KID = sig, key.name, key.kid
	default:
		resp.Code = proto.BadRequest
	}
	return resp
}

// ---- miekg/pkcs11 helpers ----

// signMessageECDSA signs SHA-256(message) with key by CKM_ECDSA:
// C_SignInit, then C_Sign.
func signMessageECDSA(ctx *p11.Ctx, s p11.SessionHandle, key p11.ObjectHandle) ([]byte, error) {
	if err := ctx.SignInit(s, []*p11.Mechanism{p11.NewMechanism(p11.CKM_ECDSA, nil)}, key); err != nil {
		return nil, err
	}
	return ctx.Sign(s, sum(crypto.SHA256, message))
}

// fakeP256Session starts a fake agent, loads the module against it and
// opens a session. It returns the fake, the module, the session and the
// fake's P-256 private key.
func fakeP256Session(t *testing.T) (*fakeAgent, *p11.Ctx, p11.SessionHandle, p11.ObjectHandle) {
	t.Helper()
	fake := startFake(t, newFakeKeys(t))
	t.Setenv(proto.SocketEnv, fake.sock)
	ctx := openModule(t)
	s := openSession(t, ctx)
	return fake, ctx, s, findKey(t, ctx, s, p11.CKO_PRIVATE_KEY, "p256")
}

// openModule loads the module in this process and initializes it; the test
// finalizes and unloads it at the end.
func openModule(t testing.TB) *p11.Ctx {
	t.Helper()
	ctx := p11.New(modulePath(t))
	if ctx == nil {
		t.Fatal("cannot load the module")
	}
	if err := ctx.Initialize(); err != nil {
		ctx.Destroy()
		t.Fatalf("C_Initialize: %v", err)
	}
	t.Cleanup(func() {
		ctx.Finalize()
		ctx.Destroy()
	})
	return ctx
}

func openSession(t testing.TB, ctx *p11.Ctx) p11.SessionHandle {
	t.Helper()
	s, err := ctx.OpenSession(1, p11.CKF_SERIAL_SESSION)
	if err != nil {
		t.Fatalf("C_OpenSession: %v", err)
	}
	return s
}

// findKey returns the handle of the object of class cls labelled label.
func findKey(t testing.TB, ctx *p11.Ctx, s p11.SessionHandle, cls uint, label string) p11.ObjectHandle {
	t.Helper()
	if err := ctx.FindObjectsInit(s, []*p11.Attribute{
		p11.NewAttribute(p11.CKA_CLASS, cls),
		p11.NewAttribute(p11.CKA_LABEL, label),
	}); err != nil {
		t.Fatalf("C_FindObjectsInit: %v", err)
	}
	objs, _, err := ctx.FindObjects(s, 4)
	ctx.FindObjectsFinal(s)
	if err != nil {
		t.Fatalf("C_FindObjects: %v", err)
	}
	if len(objs) != 1 {
		t.Fatalf("%d objects labelled %q, want 1", len(objs), label)
	}
	return objs[0]
}

func ckr(err error) uint {
	var e p11.Error
	if errors.As(err, &e) {
		return uint(e)
	}
	return 0
}
