package agent_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cockroachdb/pebble/v2/vfs/errorfs"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/agent/journal"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/software"
)

// softwareConfig is a config with one software key of each type.
func softwareConfig(t testing.TB) agent.Config {
	t.Helper()
	dir := t.TempDir()
	cfg, err := agent.ParseConfig([]byte(`
default_key: default
providers:
  - id: soft
    type: software
    keys:
      - {name: default, type: ecdsa-p256}
      - {name: p384, type: ecdsa-p384}
      - {name: ed, type: ed25519}
      - {name: rsa, type: rsa-2048}
`))
	if err != nil {
		t.Fatal(err)
	}
	cfg.DataDir = filepath.Join(dir, "state")
	cfg.Socket = shortSocketPath(t)
	return cfg
}

// shortSocketPath keeps socket paths under the 108-byte sun_path limit, which
// t.TempDir's long names can exceed.
func shortSocketPath(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "sigil-t")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "s", "agent.sock")
}

type running struct {
	agent  *agent.Agent
	socket string
	done   chan error
}

// startAgent runs an agent on cfg.Socket until the test ends.
func startAgent(t testing.TB, cfg agent.Config, opts ...agent.Option) *running {
	t.Helper()
	return startAgentLog(t, cfg, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)), opts...)
}

// startAgentObserved runs an agent like startAgent and also records what it
// logs at Info and above, for tests of the log itself.
func startAgentObserved(t testing.TB, cfg agent.Config, opts ...agent.Option) (*running, *observer.ObservedLogs) {
	t.Helper()
	core, logs := observer.New(zap.InfoLevel)
	test := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)).Core()
	return startAgentLog(t, cfg, zap.New(zapcore.NewTee(test, core)), opts...), logs
}

// assertNoFieldTwice fails the test for every log entry that carries a field
// more than once: a reader (or a JSON decoder) keeps only one of them.
func assertNoFieldTwice(t testing.TB, logs *observer.ObservedLogs) {
	t.Helper()
	for _, e := range logs.All() {
		seen := make(map[string]int, len(e.Context))
		for _, f := range e.Context {
			seen[f.Key]++
		}
		for key, n := range seen {
			if n > 1 {
				t.Errorf("log entry %q carries %q %d times", e.Message, key, n)
			}
		}
	}
}

func startAgentLog(t testing.TB, cfg agent.Config, log *zap.Logger, opts ...agent.Option) *running {
	t.Helper()
	a, err := agent.New(context.Background(), cfg, log, opts...)
	if err != nil {
		t.Fatalf("agent.New: %v", err)
	}
	ln, err := agent.ListenUnix(cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	r := &running{agent: a, socket: cfg.Socket, done: make(chan error, 1)}
	go func() { r.done <- a.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := a.Shutdown(ctx); err != nil && !errors.Is(err, agent.ErrClosed) {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-r.done; !errors.Is(err, agent.ErrClosed) {
			t.Errorf("serve returned %v", err)
		}
	})
	return r
}

// serveForShutdown starts an agent on cfg's socket and dials it, leaving
// the agent's Shutdown to the test (startAgent's cleanup calls it).
func serveForShutdown(t *testing.T, cfg agent.Config, log *zap.Logger, opts ...agent.Option) (*agent.Agent, *client.Client) {
	t.Helper()
	a, err := agent.New(context.Background(), cfg, log, opts...)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := agent.ListenUnix(cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	go a.Serve(ln)
	c, err := client.Dial(context.Background(), cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return a, c
}

func (r *running) dial(t testing.TB) *client.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, r.socket)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// rawConn speaks frames by hand, for tests of what a well-behaved client
// never sends.
type rawConn struct {
	t     testing.TB
	nc    net.Conn
	br    *bufio.Reader
	codec *proto.Codec
}

func (r *running) raw(t testing.TB) *rawConn {
	t.Helper()
	return rawAt(t, r.socket)
}

// rawAt is a rawConn to the Unix socket at path (an admin socket).
func rawAt(t testing.TB, path string) *rawConn {
	t.Helper()
	nc, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	nc.SetDeadline(time.Now().Add(10 * time.Second))
	return &rawConn{t: t, nc: nc, br: bufio.NewReader(nc), codec: proto.NewCodec()}
}

func (rc *rawConn) send(req *proto.Request) {
	rc.t.Helper()
	frame, err := rc.codec.AppendRequestFrame(nil, req)
	if err != nil {
		rc.t.Fatal(err)
	}
	if _, err := rc.nc.Write(frame); err != nil {
		rc.t.Fatal(err)
	}
}

func (rc *rawConn) recv() (*proto.Response, error) {
	payload, err := proto.ReadFrame(rc.br, nil, 1<<20)
	if err != nil {
		return nil, err
	}
	var resp proto.Response
	if err := rc.codec.DecodeResponse(payload, &resp); err != nil {
		rc.t.Fatal(err)
	}
	return &resp, nil
}

// finalBadRequest reads the agent's last word on a malformed request (id
// 0, BAD_REQUEST, no signature) and then the close.
func (rc *rawConn) finalBadRequest() {
	rc.t.Helper()
	resp, err := rc.recv()
	if err != nil || resp.ID != 0 || resp.Code != proto.BadRequest || len(resp.Sig) != 0 {
		rc.t.Fatalf("final reply: %v %+v, want id 0 and BAD_REQUEST", err, resp)
	}
	if _, err := rc.recv(); !errors.Is(err, io.EOF) {
		rc.t.Fatalf("connection left open: %v", err)
	}
}

func (rc *rawConn) hello() {
	rc.t.Helper()
	rc.send(&proto.Request{ID: 1, Op: proto.OpHello, Version: proto.Version})
	resp, err := rc.recv()
	if err != nil || resp.Code != proto.OK {
		rc.t.Fatalf("hello: %v %+v", err, resp)
	}
}

// slowProvider wraps a provider and delays each Sign, honouring ctx the way
// a real provider must.
type slowProvider struct {
	providers.Provider
	delay time.Duration
}

func (s *slowProvider) Sign(ctx context.Context, key string, alg providers.Algorithm, digest []byte) ([]byte, error) {
	select {
	case <-time.After(s.delay):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return s.Provider.Sign(ctx, key, alg, digest)
}

// agentLifetime runs one agent on cfg from start to a checked Shutdown,
// handing f a client and an admin connection: tests that restart an agent
// call it once per life.
func agentLifetime(t *testing.T, cfg agent.Config, f func(c, admin *client.Client), opts ...agent.Option) {
	t.Helper()
	ctx := context.Background()
	a, err := agent.New(ctx, cfg, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)), opts...)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := agent.ListenUnix(cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	aln, err := agent.ListenUnix(cfg.AdminSocket)
	if err != nil {
		t.Fatal(err)
	}
	go a.Serve(ln)
	go a.ServeAdmin(aln)
	c, err := client.Dial(ctx, cfg.Socket)
	if err != nil {
		t.Fatal(err)
	}
	admin, err := client.Dial(ctx, cfg.AdminSocket)
	if err != nil {
		t.Fatal(err)
	}
	f(c, admin)
	c.Close()
	admin.Close()
	if err := a.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
}

// writeFaults fails every write through the journal's filesystem while it
// is on (toggle.On), as a failing disk would.
func writeFaults() *errorfs.Toggle {
	return faultsWhere(func(op errorfs.Op) bool { return op.Kind.ReadOrWrite() == errorfs.OpIsWrite })
}

// faultsWhere fails the filesystem operations fails picks while the
// toggle is on.
func faultsWhere(fails func(op errorfs.Op) bool) *errorfs.Toggle {
	return &errorfs.Toggle{Injector: errorfs.InjectorFunc(func(op errorfs.Op) error {
		if fails(op) {
			return errorfs.ErrInjected
		}
		return nil
	})}
}

// slowWrites makes every write through the journal's filesystem take d
// while the toggle is on, as a slow or saturated disk would.
func slowWrites(d time.Duration) *errorfs.Toggle {
	return &errorfs.Toggle{Injector: errorfs.InjectorFunc(func(op errorfs.Op) error {
		if op.Kind.ReadOrWrite() == errorfs.OpIsWrite {
			time.Sleep(d)
		}
		return nil
	})}
}

// heldProvider is a software provider that makes key versions (as a cloud
// provider does, so rotations and drills run through it) and whose next
// Sign, once held, waits inside the provider until the test lets it go: a
// slow HSM or KMS call, made deterministic. deaf makes the held call
// ignore its context, as a C_Sign on a wedged network HSM does.
type heldProvider struct {
	versioningSoftware
	hold, deaf atomic.Bool
	entered    chan struct{}
	letGo      chan struct{}
}

func newHeldProvider(t *testing.T) *heldProvider {
	t.Helper()
	sp, err := software.Open(software.Config{ID: "held", DataDir: t.TempDir(), Keys: []software.KeyConfig{{Name: "hkey", Type: providers.KeyECDSAP256}}})
	if err != nil {
		t.Fatal(err)
	}
	h := &heldProvider{versioningSoftware: versioningSoftware{sp, "held"}, entered: make(chan struct{}, 1), letGo: make(chan struct{})}
	t.Cleanup(h.release)
	return h
}

// release lets a held call go (once).
func (h *heldProvider) release() {
	select {
	case <-h.letGo:
	default:
		close(h.letGo)
	}
}

func (h *heldProvider) Sign(ctx context.Context, key string, alg providers.Algorithm, digest []byte) ([]byte, error) {
	if h.hold.CompareAndSwap(true, false) {
		h.entered <- struct{}{}
		if h.deaf.Load() {
			<-h.letGo
			ctx = context.Background()
		} else {
			select {
			case <-h.letGo:
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		}
	}
	return h.Provider.Sign(ctx, key, alg, digest)
}

// versioningSoftware is a software provider with ECDSA P-256 key versions
// the way a cloud provider makes them (NewVersion, URI, AddKey), for the
// test providers that hold signatures (heldProvider, gatedProvider).
type versioningSoftware struct {
	*software.Provider
	scheme string // the URIs' scheme
}

func (v versioningSoftware) NewVersion(ctx context.Context, _, name string) (providers.KeyInfo, error) {
	return v.GenerateKey(ctx, name, providers.KeyECDSAP256)
}

func (v versioningSoftware) URI(name string) (string, error) { return v.scheme + ":" + name, nil }

func (v versioningSoftware) AddKey(_ context.Context, name, _ string) (providers.KeyInfo, error) {
	return v.Adopt(name, providers.KeyECDSAP256)
}

// heldAgent runs an agent whose tenant payments (this uid, also the admin)
// has the slot release on a heldProvider's key, rotation on, and returns
// the provider, the config, the agent and an admin client.
func heldAgent(t *testing.T) (*heldProvider, agent.Config, *running, *client.Client) {
	t.Helper()
	h := newHeldProvider(t)
	cfg := heldConfig(t)
	r := startAgent(t, cfg, agent.WithProviders(h))
	return h, cfg, r, r.serveAdmin(t, cfg.AdminSocket)
}

// heldConfig is the agent config of heldAgent: heldPolicy's slot on the
// test's provider, an admin socket, two canaries per rotation.
func heldConfig(t *testing.T) agent.Config {
	t.Helper()
	cfg := softwareConfig(t)
	cfg.DefaultKey = ""
	cfg.Policy = filepath.Join(t.TempDir(), "policy.yaml")
	cfg.AdminSocket = filepath.Join(filepath.Dir(cfg.Socket), "admin.sock")
	cfg.Rotation.Canaries = 2
	if err := os.WriteFile(cfg.Policy, []byte(heldPolicy("")), 0o600); err != nil {
		t.Fatal(err)
	}
	return cfg
}

// serveSSH serves the agent's ssh-agent socket beside cfg's socket and
// returns its path.
func (r *running) serveSSH(t testing.TB, cfg agent.Config) string {
	t.Helper()
	path := filepath.Join(filepath.Dir(cfg.Socket), "ssh.sock")
	ln, err := agent.ListenUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	go r.agent.ServeSSHAgent(ln)
	return path
}

// serveAdmin serves the agent's admin operations on path and dials it.
func (r *running) serveAdmin(t testing.TB, path string) *client.Client {
	t.Helper()
	aln, err := agent.ListenUnix(path)
	if err != nil {
		t.Fatal(err)
	}
	go r.agent.ServeAdmin(aln)
	admin, err := client.Dial(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { admin.Close() })
	return admin
}

// releasePolicy is a policy whose admin and whose one tenant, payments,
// are this process's uid, with one slot, release, signed by key under the
// slot's policy fields slotPolicy ("" for none).
func releasePolicy(key, slotPolicy string) string {
	if slotPolicy != "" {
		slotPolicy = ", policy: {" + slotPolicy + "}"
	}
	return fmt.Sprintf("admins: {unix_uids: [%d]}\ntenants:\n  - name: payments\n    identities: {unix_uids: [%d]}\n    slots:\n      - {name: release, key: %s%s}\n", os.Getuid(), os.Getuid(), key, slotPolicy)
}

// heldPolicy is heldAgent's policy, the slot's policy fields given.
func heldPolicy(slotPolicy string) string { return releasePolicy("hkey", slotPolicy) }

// tenantAtItsLimit runs an agent whose tenant may have one Sign in flight
// (max_in_flight_per_tenant 1) and takes that place with a Sign held in a
// heldProvider (h.release lets it go; its result arrives on held), and
// returns the digest it signs.
func tenantAtItsLimit(t *testing.T) (*running, *heldProvider, chan error, [32]byte) {
	t.Helper()
	h := newHeldProvider(t)
	cfg := softwareConfig(t)
	cfg.Limits.MaxInFlightPerTenant = 1
	r := startAgent(t, cfg, agent.WithProviders(h))
	d := sha256.Sum256([]byte("x"))
	h.hold.Store(true)
	held := make(chan error, 1)
	go func() {
		_, err := r.dial(t).Sign(context.Background(), client.ByName("hkey"), client.Algorithm{}, d[:])
		held <- err
	}()
	<-h.entered
	return r, h, held, d
}

// journalOfStopped shuts a down and opens its journal, closed at the
// test's end: what the agent left on disk.
func journalOfStopped(t *testing.T, a *agent.Agent, cfg agent.Config) *journal.Journal {
	t.Helper()
	if err := a.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	j, err := journal.Open(journal.Options{Dir: filepath.Join(cfg.DataDir, "journal")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { j.Close() })
	return j
}

// auditOps returns tenant's last 1000 audit records whose op is op, each
// as its JSON fields, oldest first.
func auditOps(t *testing.T, admin *client.Client, tenant, op string) []map[string]any {
	t.Helper()
	recs, err := admin.AuditTail(context.Background(), tenant, 0, 1000)
	if err != nil {
		t.Fatal(err)
	}
	var out []map[string]any
	for _, raw := range recs {
		var r map[string]any
		if err := json.Unmarshal(raw, &r); err != nil {
			t.Fatal(err)
		}
		if r["op"] == op {
			out = append(out, r)
		}
	}
	return out
}

// serveAdminHTTP serves the agent's admin HTTP endpoints on listen until
// the test ends, and returns their base URL.
func (r *running) serveAdminHTTP(t *testing.T, listen string) string {
	t.Helper()
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		t.Fatal(err)
	}
	httpDone := make(chan error, 1)
	go func() { httpDone <- r.agent.ServeAdminHTTP(ln) }()
	t.Cleanup(func() {
		r.agent.Shutdown(context.Background())
		if err := <-httpDone; !errors.Is(err, agent.ErrClosed) {
			t.Errorf("ServeAdminHTTP returned %v", err)
		}
	})
	return "http://" + ln.Addr().String()
}
