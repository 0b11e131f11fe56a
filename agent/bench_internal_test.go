package agent

import (
	"context"
	"net"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/policy"
	"github.com/sigil-agent/sigil/proto"
	"github.com/sigil-agent/sigil/providers"
)

// fixedProvider signs instantly with a constant, so the benchmark below
// measures the agent's own request path, not a key's arithmetic.
type fixedProvider struct {
	info providers.KeyInfo
	sig  []byte
}

func (f *fixedProvider) ID() string { return "fixed" }
func (f *fixedProvider) Keys(context.Context) ([]providers.KeyInfo, error) {
	return []providers.KeyInfo{f.info}, nil
}
func (f *fixedProvider) Sign(context.Context, string, providers.Algorithm, []byte) ([]byte, error) {
	return f.sig, nil
}
func (f *fixedProvider) Close() error { return nil }

// BenchmarkRequestPath is decode → dispatch → encode for one Sign, without
// the socket: the allocation budget of the agent's hot path, with the audit
// journal off and on (wal).
func BenchmarkRequestPath(b *testing.B) {
	for _, mode := range []string{"off", "wal"} {
		b.Run("journal-"+mode, func(b *testing.B) { benchRequestPath(b, mode) })
	}
}

// requestPathConn is a connection of an agent whose only key signs with a
// constant signature, ready for dispatch, and the payload of a Sign for it.
func requestPathConn(tb testing.TB, journalMode string) (*conn, []byte) {
	tb.Helper()
	pub, _, _ := ed25519Key()
	info, err := providers.NewKeyInfo("fixed", "k", pub)
	if err != nil {
		tb.Fatal(err)
	}
	cfg := Config{DataDir: tb.TempDir(), Journal: JournalConfig{Mode: journalMode}}
	a, err := New(context.Background(), cfg, zap.NewNop(),
		WithProviders(&fixedProvider{info: info, sig: make([]byte, 64)}))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { a.Shutdown(context.Background()) })
	srv, cli := net.Pipe()
	tb.Cleanup(func() { srv.Close(); cli.Close() })
	c := newConn(a, srv, false)
	c.helloDone = true
	c.peer = peer{unix: true, uid: 1000, gid: 1000}
	c.peerName = c.peer.String()
	frame, _ := proto.NewCodec().AppendRequestFrame(nil, &proto.Request{ID: 7, Op: proto.OpSign, Key: "k", Scheme: proto.SchemeEd25519, Digest: make([]byte, 32), TimeoutMillis: 1000})
	return c, frame[proto.FrameHeaderLen:]
}

// TestSignAllocations pins the allocation budget of a Sign's dispatch
// with the journal off: the request's context, nothing else (the signing
// decision stays on the stack).
func TestSignAllocations(t *testing.T) {
	c, payload := requestPathConn(t, "off")
	var req proto.Request
	if err := proto.NewCodec().DecodeRequest(payload, &req); err != nil {
		t.Fatal(err)
	}
	allocs := testing.AllocsPerRun(1000, func() {
		resp := proto.Response{ID: req.ID}
		var fence policy.Decision
		c.dispatch(&req, &resp, time.Time{}, &fence)
		fence.Done()
		if resp.Code != proto.OK {
			t.Fatal(resp.Msg)
		}
	})
	if allocs > 1 {
		t.Errorf("a Sign's dispatch allocates %v times, want at most 1", allocs)
	}
}

func benchRequestPath(b *testing.B, journalMode string) {
	c, payload := requestPathConn(b, journalMode)
	codec := proto.NewCodec()
	var out []byte
	b.ReportAllocs()
	for b.Loop() {
		req := requestPool.Get().(*proto.Request)
		req.Reset()
		if err := codec.DecodeRequest(payload, req); err != nil {
			b.Fatal(err)
		}
		resp := proto.Response{ID: req.ID}
		var fence policy.Decision
		c.dispatch(req, &resp, time.Time{}, &fence)
		fence.Done()
		requestPool.Put(req)
		if resp.Code != proto.OK {
			b.Fatal(resp.Msg)
		}
		out, _ = codec.AppendResponseFrame(out[:0], &resp)
	}
}

// BenchmarkIdleDeadline is what limits.idle_timeout adds per request: the
// read deadline armed before waiting for the next frame and cleared once it
// is in (waitFrame), on a Unix socket.
func BenchmarkIdleDeadline(b *testing.B) {
	ln, err := ListenUnix(b.TempDir() + "/s")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		if c, err := ln.Accept(); err == nil {
			defer c.Close()
			var one [1]byte
			_, _ = c.Read(one[:])
		}
	}()
	nc, err := net.Dial("unix", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer nc.Close()
	c := &conn{nc: nc}
	for b.Loop() {
		c.setReadDeadline(time.Now().Add(5 * time.Minute))
		c.setReadDeadline(time.Time{})
	}
}
