package agent_test

import (
	"context"
	"crypto"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/agent/devcerts"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
	"github.com/sigil-agent/sigil/providers/software"
)

// signOK signs with the default key and verifies the signature: the agent
// is still serving well-behaved clients.
func signOK(t *testing.T, c *client.Client) {
	t.Helper()
	d := sha256.Sum256([]byte("still serving"))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	key, err := c.PublicKey(ctx, client.ByName("default"))
	if err != nil {
		t.Fatal(err)
	}
	sig, err := c.Sign(ctx, client.ByName("default"), client.Algorithm{}, d[:])
	if err != nil {
		t.Fatalf("a well-behaved client: %v", err)
	}
	if err := providers.Verify(key.Public, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}, d[:], sig.Sig); err != nil {
		t.Fatal(err)
	}
}

// waitClosed reads until the agent closes the connection; it fails the
// test if that takes longer than within.
func waitClosed(t *testing.T, nc net.Conn, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	nc.SetReadDeadline(start.Add(within))
	_, err := io.Copy(io.Discard, nc)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the agent did not close the connection within %v", within)
	}
	return time.Since(start)
}

func TestConnectionLimits(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.Limits.MaxConns = 3
	cfg.Limits.MaxConnsPerTenant = 2
	s := startTLSAgentWith(t, cfg)
	ctx := context.Background()

	// The Unix peer (this test's uid) is one tenant: two connections, then
	// UNAVAILABLE.
	a1, a2 := s.running.dial(t), s.running.dial(t)
	if _, err := client.Dial(ctx, s.running.socket); client.Code(err) != proto.Unavailable {
		t.Fatalf("third connection of one tenant: %v, want UNAVAILABLE", err)
	}
	// Another tenant (a client certificate) still gets in, up to max_conns.
	other, _ := s.ca.Issue(devcerts.Leaf{CommonName: "other-tenant"})
	b1, err := s.dial(t, other)
	if err != nil {
		t.Fatalf("another tenant's first connection: %v", err)
	}
	third, _ := s.ca.Issue(devcerts.Leaf{CommonName: "third-tenant"})
	if _, err := s.dial(t, third); client.Code(err) != proto.Unavailable {
		t.Fatalf("connection past max_conns: %v, want UNAVAILABLE", err)
	}
	for _, c := range []*client.Client{a1, a2, b1} {
		signOK(t, c)
	}
	// A closed connection frees its place.
	a2.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, err := client.Dial(ctx, s.running.socket)
		if err == nil {
			signOK(t, c)
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("place not freed: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestSlowLorisIsCut(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.Limits.FrameTimeout = 300 * time.Millisecond
	r := startAgent(t, cfg)
	good := r.dial(t)

	t.Run("silent before Hello", func(t *testing.T) {
		rc := r.raw(t)
		if took := waitClosed(t, rc.nc, 5*time.Second); took < 200*time.Millisecond {
			t.Fatalf("closed after %v, before the frame timeout", took)
		}
	})
	t.Run("header dribbled after Hello", func(t *testing.T) {
		rc := r.raw(t)
		rc.hello()
		if _, err := rc.nc.Write([]byte{0, 0}); err != nil {
			t.Fatal(err)
		}
		resp, err := rc.recv()
		if err != nil || resp.Code != proto.BadRequest || resp.ID != 0 {
			t.Fatalf("want a final BAD_REQUEST, got %+v %v", resp, err)
		}
		waitClosed(t, rc.nc, 5*time.Second)
	})
	t.Run("body dribbled", func(t *testing.T) {
		rc := r.raw(t)
		rc.hello()
		frame, _ := rc.codec.AppendRequestFrame(nil, &proto.Request{ID: 7, Op: proto.OpPing})
		// All but the last byte, one at a time, slower than the timeout in
		// total though each byte is quick.
		for _, b := range frame[:len(frame)-1] {
			if _, err := rc.nc.Write([]byte{b}); err != nil {
				break // closed already
			}
			time.Sleep(60 * time.Millisecond)
		}
		waitClosed(t, rc.nc, 5*time.Second)
	})
	t.Run("a frame sent slowly but within the limit is served", func(t *testing.T) {
		rc := r.raw(t)
		rc.hello()
		frame, _ := rc.codec.AppendRequestFrame(nil, &proto.Request{ID: 8, Op: proto.OpPing})
		rc.nc.Write(frame[:3])
		time.Sleep(100 * time.Millisecond)
		rc.nc.Write(frame[3:])
		resp, err := rc.recv()
		if err != nil || resp.ID != 8 || resp.Code != proto.OK {
			t.Fatalf("%+v %v", resp, err)
		}
	})
	signOK(t, good)
}

func TestIdleTimeout(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.Limits.IdleTimeout = 300 * time.Millisecond
	r := startAgent(t, cfg)
	busy := r.raw(t)
	busy.hello()
	idle := r.raw(t)
	idle.hello()
	// The busy connection pings more often than the timeout and stays.
	for i := 0; i < 6; i++ {
		busy.send(&proto.Request{ID: uint64(10 + i), Op: proto.OpPing})
		if resp, err := busy.recv(); err != nil || resp.Code != proto.OK {
			t.Fatalf("busy connection: %+v %v", resp, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	waitClosed(t, idle.nc, 5*time.Second)
}

// remoteSlowProvider is a slow provider the agent takes for a remote one
// (a cloud KMS): its signatures run on workers, not on the reader.
type remoteSlowProvider struct{ *slowProvider }

func (remoteSlowProvider) Remote() bool { return true }

// A connection waiting on a signature is not idle: idle_timeout counts from
// when nothing is in flight. Its reader used to stop at idle_timeout while
// a slow (remote) signature ran, so a request sent meanwhile was never
// answered and the connection closed after the reply.
func TestIdleTimeoutSparesAConnectionWithARequestInFlight(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.Limits.IdleTimeout = 300 * time.Millisecond
	soft, err := software.Open(software.Config{ID: "kms", DataDir: t.TempDir(), Keys: []software.KeyConfig{{Name: "kms", Type: providers.KeyECDSAP256}}})
	if err != nil {
		t.Fatal(err)
	}
	r := startAgent(t, cfg, agent.WithProviders(remoteSlowProvider{&slowProvider{Provider: soft, delay: time.Second}}))
	rc := r.raw(t)
	rc.hello()
	d := sha256.Sum256(nil)
	rc.send(&proto.Request{ID: 2, Op: proto.OpSign, Key: "kms", Digest: d[:]})
	time.Sleep(500 * time.Millisecond) // past idle_timeout, the Sign in flight
	rc.send(&proto.Request{ID: 3, Op: proto.OpPing})
	got := map[uint64]proto.Code{}
	for len(got) < 2 {
		resp, err := rc.recv()
		if err != nil {
			t.Fatalf("replies %v, then %v", got, err)
		}
		got[resp.ID] = resp.Code
	}
	if got[2] != proto.OK || got[3] != proto.OK {
		t.Fatalf("replies %v, want both OK", got)
	}
	// Idle from the Sign's end on: closed after idle_timeout.
	waitClosed(t, rc.nc, 5*time.Second)
}

// A client that pipelines requests and never reads the replies is dropped;
// the agent's memory does not grow with it and others keep signing.
func TestClientThatNeverReadsIsDropped(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.Limits.WriteTimeout = 300 * time.Millisecond
	r := startAgent(t, cfg)
	good := r.dial(t)
	rc := r.raw(t)
	rc.hello()
	d := sha256.Sum256([]byte("flood"))
	frame, _ := rc.codec.AppendRequestFrame(nil, &proto.Request{ID: 9, Op: proto.OpSign, Key: "ed", Digest: d[:]})
	var batch []byte
	for i := 0; i < 256; i++ {
		batch = append(batch, frame...)
	}
	done := make(chan error, 1)
	go func() {
		rc.nc.SetWriteDeadline(time.Now().Add(20 * time.Second))
		for {
			if _, err := rc.nc.Write(batch); err != nil {
				done <- err
				return
			}
		}
	}()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) && !isReset(err) {
			t.Fatalf("the flooding writer ended with %v, want the agent to have closed it", err)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("a client that never reads was not dropped")
	}
	signOK(t, good)
}

func isReset(err error) bool {
	var ne *net.OpError
	return errors.As(err, &ne) // EPIPE / ECONNRESET from the kernel
}

// One tenant's requests past max_in_flight_per_tenant wait at most their
// deadline; another tenant is not held up behind them.
func TestTenantInFlightLimit(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.Limits.MaxInFlightPerTenant = 2
	soft, err := software.Open(software.Config{ID: "slow", DataDir: t.TempDir(), Keys: []software.KeyConfig{{Name: "slow", Type: providers.KeyECDSAP256}}})
	if err != nil {
		t.Fatal(err)
	}
	s := startTLSAgentWith(t, cfg, agent.WithProviders(&slowProvider{Provider: soft, delay: time.Second}))
	d := sha256.Sum256(nil)

	// The Unix tenant fills its two places with slow signatures.
	var wg sync.WaitGroup
	for i := 0; i < 2; i++ {
		c := s.running.dial(t)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := c.Sign(context.Background(), client.ByName("slow"), client.Algorithm{}, d[:]); err != nil {
				t.Errorf("slow signature: %v", err)
			}
		}()
	}
	time.Sleep(200 * time.Millisecond)
	// Its third request waits for a place no longer than its deadline.
	third := s.running.dial(t)
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
	start := time.Now()
	_, err = third.Sign(ctx, client.ByName("default"), client.Algorithm{}, d[:])
	cancel()
	if code := client.Code(err); code != proto.DeadlineExceeded {
		t.Fatalf("third request of a full tenant: %s (%v), want DEADLINE_EXCEEDED", code, err)
	}
	if took := time.Since(start); took > 700*time.Millisecond {
		t.Fatalf("waited %v past a 150ms deadline", took)
	}
	// Another tenant signs at once.
	other, _ := s.ca.Issue(devcerts.Leaf{CommonName: "tenant-b"})
	b, err := s.dial(t, other)
	if err != nil {
		t.Fatal(err)
	}
	signOK(t, b)
	wg.Wait()
	// Places come back: the first tenant signs again.
	signOK(t, third)
}

// startTLSAgentWith is startTLSAgent on a given config and options.
func startTLSAgentWith(t testing.TB, cfg agent.Config, opts ...agent.Option) *tlsSetup {
	t.Helper()
	s := &tlsSetup{dir: t.TempDir()}
	var err error
	if s.ca, err = devcerts.NewCA("sigil test CA"); err != nil {
		t.Fatal(err)
	}
	srv, err := s.ca.Issue(devcerts.Leaf{CommonName: "sigil agent", IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, Server: true})
	if err != nil {
		t.Fatal(err)
	}
	cfg.TCP.CertFile, cfg.TCP.KeyFile, _ = srv.Write(s.dir, "server")
	cfg.TCP.ClientCAFile, _ = s.ca.WriteCert(s.dir, "clients-ca")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s.addr = ln.Addr().String()
	ln.Close()
	cfg.TCP.Listen = s.addr
	s.cfg = cfg
	s.running = startAgent(t, cfg, opts...)
	tln, err := s.running.agent.ListenTLS()
	if err != nil {
		t.Fatal(err)
	}
	go s.running.agent.Serve(tln)
	return s
}

// TCP connections that never finish their TLS handshake (no certificate,
// nothing sent) are not identified, so no tenant's limit counts them:
// limits.max_handshakes does. Past it a new one is closed at once, and
// clients on the Unix socket, and a TLS client once the squatters are gone,
// are served as before.
func TestHandshakeLimit(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.Limits.MaxHandshakes = 4
	cfg.TCP.HandshakeTimeout = time.Minute // the squatters outlast the test
	s := startTLSAgentWith(t, cfg)
	const squatters = 20
	var held []net.Conn
	for range squatters {
		nc, err := net.Dial("tcp", s.addr)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, nc)
	}
	defer func() {
		for _, nc := range held {
			nc.Close()
		}
	}()
	// A closed one reads EOF; one still waiting for its handshake times
	// out. Look until all but max_handshakes are closed, then once more.
	closed := make([]bool, squatters)
	count := func() (n int) {
		for i, nc := range held {
			if closed[i] {
				n++
				continue
			}
			nc.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
			var b [1]byte
			if _, err := nc.Read(b[:]); errors.Is(err, io.EOF) {
				closed[i] = true
				n++
			}
		}
		return n
	}
	want := squatters - cfg.Limits.MaxHandshakes
	for wait := time.Now().Add(5 * time.Second); count() < want && time.Now().Before(wait); {
	}
	time.Sleep(100 * time.Millisecond)
	if n := count(); n != want {
		t.Fatalf("%d of %d unidentified connections closed, want all but max_handshakes = %d", n, squatters, cfg.Limits.MaxHandshakes)
	}
	signOK(t, s.running.dial(t))

	for _, nc := range held {
		nc.Close()
	}
	good, err := s.ca.Issue(devcerts.Leaf{CommonName: "payments-client"})
	if err != nil {
		t.Fatal(err)
	}
	// The agent sees the squatters' closes as their handshakes fail.
	var c *client.Client
	for wait := time.Now().Add(5 * time.Second); ; {
		if c, err = s.dial(t, good); err == nil {
			if err = c.Ping(context.Background()); err == nil {
				break
			}
		}
		if time.Now().After(wait) {
			t.Fatalf("a TLS client after the squatters left: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	signOK(t, c)
}

// A request's deadline runs from when the agent read it: the wait for one
// of the tenant's in-flight places is part of it. The wait and the
// signature each used to get the whole deadline, so a signature was
// released (and journaled OK) up to twice the deadline after the request,
// to a client that had given up.
func TestTenantWaitCountsAgainstTheDeadline(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.Limits.MaxInFlightPerTenant = 1
	soft, err := software.Open(software.Config{ID: "slow", DataDir: t.TempDir(), Keys: []software.KeyConfig{{Name: "slow", Type: providers.KeyECDSAP256}}})
	if err != nil {
		t.Fatal(err)
	}
	r := startAgent(t, cfg, agent.WithProviders(&slowProvider{Provider: soft, delay: 400 * time.Millisecond}))
	d := sha256.Sum256(nil)
	holder := r.dial(t)
	held := make(chan error, 1)
	go func() {
		_, err := holder.Sign(context.Background(), client.ByName("slow"), client.Algorithm{}, d[:])
		held <- err
	}()
	time.Sleep(100 * time.Millisecond) // the holder has the tenant's one place

	rc := r.raw(t)
	rc.hello()
	start := time.Now()
	rc.send(&proto.Request{ID: 7, Op: proto.OpSign, Key: "slow", Digest: d[:], TimeoutMillis: 500})
	resp, err := rc.recv()
	took := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	if err := <-held; err != nil {
		t.Fatal(err)
	}
	if resp.Code != proto.DeadlineExceeded || took > 2*time.Second {
		t.Fatalf("a request that waited ~300 ms for a place and then signed for 400 ms, deadline 500 ms: %s after %v, want DEADLINE_EXCEEDED by ~500 ms", resp.Code, took)
	}
}

// A client certificate with neither a URI SAN nor a CN (DNS SANs only, as
// cert-manager and ACME issue) is one client for the limits, known by its
// certificate: it used to be known by its ephemeral address, so each of
// its connections was a tenant of its own and max_conns_per_tenant (and
// max_in_flight_per_tenant) never bound it.
func TestCertificateWithoutANameIsOneClient(t *testing.T) {
	cfg := softwareConfig(t)
	cfg.Limits.MaxConnsPerTenant = 2
	s := startTLSAgentWith(t, cfg)
	issue := func(dns string) *devcerts.Issued {
		c, err := s.ca.Issue(devcerts.Leaf{DNSNames: []string{dns}})
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	one, other := issue("signer.example.internal"), issue("other.example.internal")
	for i := range 2 {
		c, err := s.dial(t, one)
		if err != nil {
			t.Fatalf("connection %d: %v", i+1, err)
		}
		signOK(t, c)
	}
	if c, err := s.dial(t, one); err == nil {
		if err := c.Ping(context.Background()); err == nil {
			t.Fatal("a third connection of one certificate was served past max_conns_per_tenant=2")
		}
	}
	c, err := s.dial(t, other)
	if err != nil {
		t.Fatalf("another certificate: %v", err)
	}
	signOK(t, c)
}

// Pipelined requests behind one that waits for the tenant's in-flight place
// are still read at once, so each one's deadline (tmo) runs from when its
// client sent it, not from when the wait ahead of it ended: a request with
// a short deadline is refused in time instead of being signed (and
// journaled, and counted against quotas) after its client gave up.
func TestPipelinedRequestsBehindATenantWaitAreReadAtOnce(t *testing.T) {
	r, h, held, d := tenantAtItsLimit(t)
	defer h.release()

	rc := r.raw(t)
	rc.hello()
	sent := time.Now()
	rc.send(&proto.Request{ID: 2, Op: proto.OpSign, Digest: d[:], TimeoutMillis: 3000})
	rc.send(&proto.Request{ID: 3, Op: proto.OpSign, Digest: d[:], TimeoutMillis: 200})
	resp, err := rc.recv()
	if err != nil {
		t.Fatal(err)
	}
	if resp.ID != 3 || resp.Code != proto.DeadlineExceeded || len(resp.Sig) != 0 {
		t.Fatalf("first reply: id %d %s with %d signature bytes; want id 3 DEADLINE_EXCEEDED", resp.ID, resp.Code, len(resp.Sig))
	}
	if took := time.Since(sent); took > 2*time.Second {
		t.Fatalf("the 200 ms request was answered after %v: its deadline started late", took)
	}
	h.release()
	if err := <-held; err != nil {
		t.Fatal(err)
	}
	if resp, err := rc.recv(); err != nil || resp.ID != 2 || resp.Code != proto.OK {
		t.Fatalf("the 3 s request: %v %+v, want signed once the place was free", err, resp)
	}
}

// A tenant at its in-flight limit parks at most that many more requests on
// workers; beyond that its connections' readers wait, as they did before,
// so a flooding tenant cannot park a goroutine per pipelined request.
func TestTenantWaitersAreBounded(t *testing.T) {
	r, h, held, d := tenantAtItsLimit(t)
	defer h.release()
	before := runtime.NumGoroutine()
	var conns []*rawConn
	for range 8 {
		rc := r.raw(t)
		rc.hello()
		for i := range 16 {
			rc.send(&proto.Request{ID: uint64(2 + i), Op: proto.OpSign, Digest: d[:], TimeoutMillis: 5000})
		}
		conns = append(conns, rc)
	}
	time.Sleep(300 * time.Millisecond)
	if grown := runtime.NumGoroutine() - before; grown > 8*2+16 {
		t.Fatalf("8 connections pipelining 16 requests each past the tenant's limit of 1: %d more goroutines", grown)
	}
	h.release()
	if err := <-held; err != nil {
		t.Fatal(err)
	}
	for _, rc := range conns {
		for range 16 {
			if resp, err := rc.recv(); err != nil || resp.Code != proto.OK {
				t.Fatalf("a waiting request: %v %+v", err, resp)
			}
		}
	}
}

// A reader does not hold one of the tenant's in-flight places while it
// waits for one of its connection's: a request of that connection already
// on a worker may be waiting for that very place. With both limits at 1 a
// pipelining client's requests each waited out their deadline
// (DEADLINE_EXCEEDED) behind the next one's reader.
func TestReaderHoldsNoTenantPlaceWhileItsConnectionIsFull(t *testing.T) {
	for _, lim := range []struct{ perConn, perTenant int }{{1, 1}, {2, 2}, {1, 4}} {
		t.Run(fmt.Sprintf("per_conn=%d,per_tenant=%d", lim.perConn, lim.perTenant), func(t *testing.T) {
			cfg := softwareConfig(t)
			cfg.Limits.MaxInFlightPerConn = lim.perConn
			cfg.Limits.MaxInFlightPerTenant = lim.perTenant
			soft, err := software.Open(software.Config{ID: "kms", DataDir: t.TempDir(), Keys: []software.KeyConfig{{Name: "kms", Type: providers.KeyECDSAP256}}})
			if err != nil {
				t.Fatal(err)
			}
			r := startAgent(t, cfg, agent.WithProviders(remoteSlowProvider{&slowProvider{Provider: soft, delay: 20 * time.Millisecond}}))
			pub, err := r.dial(t).PublicKey(context.Background(), client.ByName("kms"))
			if err != nil {
				t.Fatal(err)
			}
			rc := r.raw(t)
			rc.hello()
			const n = 24
			d := sha256.Sum256([]byte("pipelined"))
			for i := range n {
				rc.send(&proto.Request{ID: uint64(2 + i), Op: proto.OpSign, Key: "kms", Digest: d[:], TimeoutMillis: 2000})
			}
			for range n {
				resp, err := rc.recv()
				if err != nil {
					t.Fatal(err)
				}
				if resp.Code != proto.OK {
					t.Fatalf("request %d: %s %q, want every request signed", resp.ID, resp.Code, resp.Msg)
				}
				if err := providers.Verify(pub.Public, providers.Algorithm{Scheme: providers.SchemeECDSA, Hash: crypto.SHA256}, d[:], resp.Sig); err != nil {
					t.Fatalf("request %d: %v", resp.ID, err)
				}
			}
		})
	}
}
