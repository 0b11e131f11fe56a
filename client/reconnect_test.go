package client_test

import (
	"bufio"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/agent"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

// An agent restart (a deploy, systemd restarting it) costs its clients
// nothing but the restart: the same Client, and Signers made from it before,
// sign again with the same keys, whether or not calls came while it was down.
func TestClientSurvivesAgentRestart(t *testing.T) {
	ctx := context.Background()
	cfg := agentConfig(t)
	cfg.DataDir = t.TempDir() // the software keys live here, across restarts
	dir, _ := os.MkdirTemp("", "sigil-c")
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfg.Socket = filepath.Join(dir, "agent.sock")
	a := run(t, cfg)
	c := dial(t, cfg.Socket)

	cases := []struct {
		key  string
		opts crypto.SignerOpts // for Signer.Sign
		alg  client.Algorithm  // the same, for Client.Sign
	}{
		{"p256", crypto.SHA256, client.Algorithm{Scheme: client.SchemeECDSA, Hash: crypto.SHA256}},
		{"rsa", &rsa.PSSOptions{Hash: crypto.SHA256, SaltLength: rsa.PSSSaltLengthEqualsHash}, client.Algorithm{Scheme: client.SchemePSS, Hash: crypto.SHA256}},
		{"ed", crypto.Hash(0), ed25519Alg},
	}
	signers := make([]*client.Signer, len(cases))
	for i, tc := range cases {
		s, err := c.Signer(ctx, client.ByName(tc.key))
		if err != nil {
			t.Fatal(err)
		}
		signers[i] = s
	}
	signAll := func(t *testing.T) {
		t.Helper()
		for i, tc := range cases {
			s := signers[i]
			digest := digestFor(tc.opts, "release v1.2.3")
			sig, err := s.Sign(nil, digest, tc.opts)
			if err != nil {
				t.Fatalf("%s: Signer.Sign: %v", tc.key, err)
			}
			if err := verifySignature(s.Public(), digest, tc.opts, sig); err != nil {
				t.Fatalf("%s: Signer.Sign: %v", tc.key, err)
			}
			got, err := c.Sign(ctx, client.ByName(tc.key), tc.alg, digest)
			if err != nil {
				t.Fatalf("%s: Client.Sign: %v", tc.key, err)
			}
			if got.KID != s.Key().KID {
				t.Fatalf("%s: signed by kid %s, want %s", tc.key, got.KID, s.Key().KID)
			}
			if err := verifySignature(s.Public(), digest, tc.opts, got.Sig); err != nil {
				t.Fatalf("%s: Client.Sign: %v", tc.key, err)
			}
		}
	}
	signAll(t)

	t.Run("restart between calls", func(t *testing.T) {
		a.Shutdown(ctx)
		a = run(t, cfg)
		signAll(t)
	})
	t.Run("calls while the agent is down", func(t *testing.T) {
		a.Shutdown(ctx)
		if err := c.Ping(ctx); client.Code(err) != proto.Unavailable {
			t.Fatalf("Ping with the agent down: %v, want UNAVAILABLE", err)
		}
		a = run(t, cfg)
		// The first call may fall within the backoff of the failed redial.
		deadline := time.Now().Add(5 * time.Second)
		for err := c.Ping(ctx); err != nil; err = c.Ping(ctx) {
			if client.Code(err) != proto.Unavailable || time.Now().After(deadline) {
				t.Fatalf("Ping with the agent back: %v", err)
			}
			time.Sleep(20 * time.Millisecond)
		}
		signAll(t)
	})
}

func digestFor(opts crypto.SignerOpts, msg string) []byte {
	if opts.HashFunc() == 0 {
		return []byte(msg) // Ed25519 signs the message
	}
	h := opts.HashFunc().New()
	h.Write([]byte(msg))
	return h.Sum(nil)
}

func verifySignature(pub crypto.PublicKey, digest []byte, opts crypto.SignerOpts, sig []byte) error {
	switch pub := pub.(type) {
	case *ecdsa.PublicKey:
		if !ecdsa.VerifyASN1(pub, digest, sig) {
			return errors.New("ECDSA signature does not verify")
		}
		return nil
	case *rsa.PublicKey:
		if pss, ok := opts.(*rsa.PSSOptions); ok {
			return rsa.VerifyPSS(pub, opts.HashFunc(), digest, sig, pss)
		}
		return rsa.VerifyPKCS1v15(pub, opts.HashFunc(), digest, sig)
	case ed25519.PublicKey:
		if !ed25519.Verify(pub, digest, sig) {
			return errors.New("Ed25519 signature does not verify")
		}
		return nil
	}
	return fmt.Errorf("public key type %T", pub)
}

// fakeAgents listens on a Unix socket and serves each connection it accepts
// with serve, given the connection's number (1 for the first).
type fakeAgents struct {
	path  string
	ln    net.Listener
	conns atomic.Int32 // connections accepted

	mu       sync.Mutex
	accepted []net.Conn
}

func listenFake(t *testing.T, serve func(n int32, nc net.Conn, br *bufio.Reader)) *fakeAgents {
	t.Helper()
	dir, err := os.MkdirTemp("", "sigil-c") // a Unix socket path must stay short
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	f := &fakeAgents{path: filepath.Join(dir, "fake.sock")}
	if f.ln, err = net.Listen("unix", f.path); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			nc, err := f.ln.Accept()
			if err != nil {
				return
			}
			n := f.conns.Add(1)
			f.mu.Lock()
			f.accepted = append(f.accepted, nc)
			f.mu.Unlock()
			wg.Go(func() {
				defer nc.Close()
				serve(n, nc, bufio.NewReaderSize(nc, proto.DefaultMaxFrame+proto.FrameHeaderLen))
			})
		}
	})
	t.Cleanup(func() {
		f.stop()
		f.mu.Lock()
		for _, nc := range f.accepted {
			nc.Close()
		}
		f.mu.Unlock()
		wg.Wait()
	})
	return f
}

// stop closes the listener, which removes the socket: later dials fail.
func (f *fakeAgents) stop() { f.ln.Close() }

// answerHello reads the connection's Hello and answers it.
func answerHello(nc net.Conn, br *bufio.Reader) error {
	req, err := readRequest(br)
	if err != nil {
		return err
	}
	if req.Op != proto.OpHello {
		return fmt.Errorf("want Hello, got %v", req.Op)
	}
	return writeResponse(nc, &proto.Response{ID: req.ID, Code: proto.OK, Version: proto.Version, Features: proto.FeaturePipelining})
}

// answerOK answers every request on nc with OK until the connection ends.
func answerOK(nc net.Conn, br *bufio.Reader) {
	for {
		req, err := readRequest(br)
		if err != nil {
			return
		}
		writeResponse(nc, &proto.Response{ID: req.ID, Code: proto.OK})
	}
}

// While no agent serves the socket, calls fail at once with UNAVAILABLE,
// and the client dials at most once per backoff period however many calls
// come, yet keeps trying.
func TestNoAgentFailsFastWithoutSpinning(t *testing.T) {
	for _, tc := range []struct {
		name string
		// listening: the socket stays and takes connections, closing each
		// at once (an agent in a crash loop, or out of connections); else
		// the socket is gone.
		listening bool
	}{
		{"socket gone", false},
		{"every connection closed at once", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := listenFake(t, func(n int32, nc net.Conn, br *bufio.Reader) {
				if n == 1 {
					answerHello(nc, br) // then the agent goes away
				}
			})
			c := dial(t, f.path)
			if !tc.listening {
				f.stop()
			}
			const window = 500 * time.Millisecond
			var calls atomic.Int32
			var wg sync.WaitGroup
			start := time.Now()
			for range 4 {
				wg.Go(func() {
					for time.Since(start) < window {
						began := time.Now()
						err := c.Ping(context.Background())
						calls.Add(1)
						if client.Code(err) != proto.Unavailable {
							t.Errorf("Ping: %v, want UNAVAILABLE", err)
							return
						}
						if took := time.Since(began); took > time.Second {
							t.Errorf("Ping took %v to fail", took)
							return
						}
					}
				})
			}
			wg.Wait()
			elapsed := time.Since(start)
			t.Logf("%d calls and %d connections in %v", calls.Load(), f.conns.Load(), elapsed)
			if calls.Load() < 20 {
				t.Fatalf("only %d calls in %v: calls do not fail fast", calls.Load(), elapsed)
			}
			if !tc.listening {
				return
			}
			// One dial per 100 ms backoff, plus the first connection and one
			// for the edges of the window.
			redials := f.conns.Load() - 1
			most := int32(elapsed/(100*time.Millisecond)) + 2
			if redials < 2 || redials > most {
				t.Fatalf("%d redials in %v over %d calls, want 2 to %d", redials, elapsed, calls.Load(), most)
			}
		})
	}
}

// A request the agent may have received is never sent again: the agent reads
// a Sign and dies without answering, the caller gets UNAVAILABLE and the
// agent saw one Sign. The next call redials and signs.
func TestWrittenRequestIsNotResent(t *testing.T) {
	pub, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		die  func(nc net.Conn) // how the first connection ends after reading the Sign
	}{
		{"connection closed", func(nc net.Conn) { nc.Close() }},
		{"final reply", func(nc net.Conn) {
			writeResponse(nc, &proto.Response{ID: 0, Code: proto.Unavailable, Msg: "shutting down"})
			nc.Close()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var signs atomic.Int32
			f := listenFake(t, func(n int32, nc net.Conn, br *bufio.Reader) {
				if err := answerHello(nc, br); err != nil {
					return
				}
				for {
					req, err := readRequest(br)
					if err != nil {
						return
					}
					if req.Op != proto.OpSign {
						t.Errorf("fake agent: got %v, want Sign", req.Op)
						return
					}
					signs.Add(1)
					if n == 1 {
						tc.die(nc)
						return
					}
					writeResponse(nc, &proto.Response{ID: req.ID, Code: proto.OK, Key: "ed", KID: "fake", Sig: ed25519.Sign(priv, req.Digest)})
				}
			})
			c := dial(t, f.path)
			msg := []byte("release v1.2.3")
			_, err := c.Sign(context.Background(), client.ByName("ed"), ed25519Alg, msg)
			if client.Code(err) != proto.Unavailable {
				t.Fatalf("Sign the agent died on: %v, want UNAVAILABLE", err)
			}
			if got := signs.Load(); got != 1 {
				t.Fatalf("the agent saw %d Sign requests, want 1 (a written request must not be resent)", got)
			}
			if got := f.conns.Load(); got != 1 {
				t.Fatalf("%d connections after the lost reply, want 1", got)
			}

			sig, err := c.Sign(context.Background(), client.ByName("ed"), ed25519Alg, msg)
			if err != nil {
				t.Fatalf("Sign after the agent died: %v", err)
			}
			if !ed25519.Verify(pub, msg, sig.Sig) {
				t.Fatal("signature does not verify")
			}
			if got := signs.Load(); got != 2 {
				t.Fatalf("the agent saw %d Sign requests, want 2", got)
			}
		})
	}
}

// Close is final: later calls fail with ErrClosed and dial nothing, whether
// the connection was open or already lost.
func TestCloseIsFinal(t *testing.T) {
	for _, tc := range []struct {
		name string
		lost bool
	}{
		{"open connection", false},
		{"lost connection", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			helloDone := make(chan struct{})
			f := listenFake(t, func(n int32, nc net.Conn, br *bufio.Reader) {
				answerHello(nc, br)
				if n == 1 {
					close(helloDone)
				}
				if !tc.lost {
					readWholeFrames(br) // until the client closes
				}
			})
			c := dial(t, f.path)
			if tc.lost {
				<-helloDone
				f.stop()
				if err := c.Ping(context.Background()); client.Code(err) != proto.Unavailable {
					t.Fatalf("Ping on a lost connection: %v, want UNAVAILABLE", err)
				}
			}
			c.Close()
			digest := sha256.Sum256([]byte("x"))
			for _, call := range []struct {
				name string
				do   func() error
			}{
				{"Ping", func() error { return c.Ping(context.Background()) }},
				{"Sign", func() error {
					_, err := c.Sign(context.Background(), client.KeyRef{}, client.Algorithm{}, digest[:])
					return err
				}},
				{"ListKeys", func() error { _, err := c.ListKeys(context.Background()); return err }},
			} {
				if err := call.do(); !errors.Is(err, client.ErrClosed) {
					t.Errorf("%s after Close: %v, want ErrClosed", call.name, err)
				}
			}
			if got := f.conns.Load(); got != 1 {
				t.Fatalf("%d connections, want 1: a closed client dialled", got)
			}
		})
	}
}

// An agent that answers the Hello and then drops every connection before
// any reply (an agent in a crash loop that gets as far as the Hello, or one
// out of some resource for each request) makes a caller retrying in a loop
// back off as for a failed dial: at most one connection per backoff period,
// each call still UNAVAILABLE. Every call used to make a connection and say
// Hello. Once the agent answers again, a call goes through.
func TestConnectionsLostBeforeAnyReplyBackOff(t *testing.T) {
	for _, tc := range []struct {
		name string
		// readFirst: the agent reads the first request before closing;
		// else it closes right after its Hello reply.
		readFirst bool
		// malformed: it answers that request with a reply the client
		// cannot take (a byte after the message), which closes the
		// connection: no proof of a working agent either (reviewer BE).
		malformed bool
	}{
		{"closed after the Hello", false, false},
		{"closed after reading a request", true, false},
		{"a malformed reply to the first request", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var healthy atomic.Bool
			f := listenFake(t, func(n int32, nc net.Conn, br *bufio.Reader) {
				if answerHello(nc, br) != nil {
					return
				}
				if !healthy.Load() {
					if tc.readFirst {
						req, err := readRequest(br)
						if err == nil && tc.malformed {
							frame, _ := proto.NewCodec().AppendResponseFrame(nil, &proto.Response{ID: req.ID, Code: proto.OK})
							frame = append(frame, 0xc0)
							binary.BigEndian.PutUint32(frame, uint32(len(frame)-proto.FrameHeaderLen))
							nc.Write(frame)
							br.ReadByte() // until the client closes
						}
					}
					return
				}
				answerOK(nc, br)
			})
			c := dial(t, f.path)
			const window = 500 * time.Millisecond
			calls := 0
			var err error
			start := time.Now()
			for time.Since(start) < window {
				err = c.Ping(context.Background())
				if code := client.Code(err); code != proto.Unavailable && !(tc.malformed && code == proto.Internal) {
					t.Fatalf("Ping %d: %v, want UNAVAILABLE", calls, err)
				}
				calls++
			}
			elapsed := time.Since(start)
			// One connection per 100 ms backoff, plus one for the edges of
			// the window, after Dial's.
			redials := f.conns.Load() - 1
			t.Logf("%d calls and %d redials in %v; the last: %v", calls, redials, elapsed, err)
			if most := int32(elapsed/(100*time.Millisecond)) + 2; redials > most {
				t.Fatalf("%d redials in %v over %d calls, want at most %d", redials, elapsed, calls, most)
			}
			healthy.Store(true)
			deadline := time.Now().Add(5 * time.Second)
			for err := c.Ping(context.Background()); err != nil; err = c.Ping(context.Background()) {
				if client.Code(err) != proto.Unavailable || time.Now().After(deadline) {
					t.Fatalf("Ping with the agent answering: %v", err)
				}
				time.Sleep(20 * time.Millisecond)
			}
		})
	}
}

// Under systemd's socket activation (the README's setup) the socket stays
// open while the agent is down or restarting: a redial connects and its
// Hello waits for an agent to take the connection. The Sign that began the
// redial waits its deadline (an agent that starts within it serves it);
// while no agent answers, later Signs fail at once with UNAVAILABLE rather
// than each waiting its whole deadline; and once an agent takes the socket,
// the waiting connection serves the next Sign. A call with no deadline (or
// a long one) waits for the redial's own bound, not for good.
func TestRestartUnderSocketActivation(t *testing.T) {
	d := sha256.Sum256([]byte("socket activation"))
	// restart stops the agent serving cfg and holds its socket, as systemd
	// does, until start serves it with a new agent.
	restart := func(t *testing.T) (s *client.Signer, start func()) {
		t.Helper()
		cfg := agentConfig(t)
		cfg.DataDir = t.TempDir() // the software keys live here, across restarts
		dir, _ := os.MkdirTemp("", "sigil-c")
		t.Cleanup(func() { os.RemoveAll(dir) })
		cfg.Socket = filepath.Join(dir, "agent.sock")
		a := run(t, cfg)
		s, err := dial(t, cfg.Socket).Signer(context.Background(), client.ByName("p256"))
		if err != nil {
			t.Fatal(err)
		}
		a.Shutdown(context.Background())
		os.Remove(cfg.Socket)
		ln, err := net.Listen("unix", cfg.Socket) // held, not accepted
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		return s, func() {
			b, err := agent.New(context.Background(), cfg, nil)
			if err != nil {
				t.Error(err)
				return
			}
			t.Cleanup(func() { b.Shutdown(context.Background()) })
			go b.Serve(ln)
		}
	}
	signs := func(t *testing.T, s *client.Signer, when string) {
		t.Helper()
		sig, err := s.Sign(nil, d[:], crypto.SHA256)
		if err != nil {
			t.Fatalf("%s: %v", when, err)
		}
		if !ecdsa.VerifyASN1(s.Public().(*ecdsa.PublicKey), d[:], sig) {
			t.Fatalf("%s: the signature does not verify", when)
		}
	}

	t.Run("an agent down past a Sign's deadline", func(t *testing.T) {
		s, start := restart(t)
		const deadline = time.Second
		s.SetTimeout(deadline)
		began := time.Now()
		_, err := s.Sign(nil, d[:], crypto.SHA256)
		if took := time.Since(began); client.Code(err) != proto.DeadlineExceeded || took < deadline*9/10 {
			t.Fatalf("the first Sign: %v (%s) after %v, want DEADLINE_EXCEEDED after its deadline", err, client.Code(err), took)
		}
		for i := range 3 {
			began := time.Now()
			_, err := s.Sign(nil, d[:], crypto.SHA256)
			if took := time.Since(began); client.Code(err) != proto.Unavailable || took > 300*time.Millisecond {
				t.Fatalf("Sign %d while no agent answers: %v (%s) after %v, want UNAVAILABLE at once", i+2, err, client.Code(err), took)
			}
		}
		start()
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			began := time.Now()
			_, err := s.Sign(nil, d[:], crypto.SHA256)
			if err == nil {
				break
			}
			if took := time.Since(began); client.Code(err) != proto.Unavailable || took > 300*time.Millisecond {
				t.Fatalf("Sign while the agent starts: %v (%s) after %v, want UNAVAILABLE at once", err, client.Code(err), took)
			}
			if time.Now().After(deadline) {
				t.Fatalf("no Sign 5 s after the agent started: %v", err)
			}
		}
		signs(t, s, "after the start")
	})

	t.Run("a call without a deadline", func(t *testing.T) {
		defer client.SetRedialWait(500 * time.Millisecond)()
		s, _ := restart(t)
		s.SetTimeout(time.Hour)
		began := time.Now()
		_, err := s.Sign(nil, d[:], crypto.SHA256)
		if took := time.Since(began); client.Code(err) != proto.Unavailable || took < 400*time.Millisecond || took > 5*time.Second {
			t.Fatalf("Sign: %v (%s) after %v, want UNAVAILABLE once the redial's 500 ms are up", err, client.Code(err), took)
		}
	})

	t.Run("an agent that starts within the deadline", func(t *testing.T) {
		s, start := restart(t)
		s.SetTimeout(5 * time.Second)
		time.AfterFunc(500*time.Millisecond, start)
		signs(t, s, "the Sign that waited for the start")
	})
}

// heldAgent is a fake agent behind a socket that systemd holds: its first
// connection answers the Hello and is lost, and every later one is taken
// and its Hello waits for an agent, until up starts one, which answers it
// and then every request. The Client is dialled and its connection lost.
func heldAgent(t *testing.T) (c *client.Client, f *fakeAgents, up func()) {
	t.Helper()
	started, lost := make(chan struct{}), make(chan struct{})
	var once sync.Once
	up = func() { once.Do(func() { close(started) }) }
	f = listenFake(t, func(n int32, nc net.Conn, br *bufio.Reader) {
		if n == 1 {
			answerHello(nc, br)
			nc.Close()
			close(lost)
			return
		}
		<-started
		if answerHello(nc, br) != nil {
			return
		}
		answerOK(nc, br)
	})
	t.Cleanup(up) // before listenFake's, which waits for the handlers
	c = dial(t, f.path)
	<-lost
	return c, f, up
}

// pingWithin pings with the deadline (none for 0) and returns the error
// and how long the call took.
func pingWithin(c *client.Client, deadline time.Duration) (error, time.Duration) {
	ctx := context.Background()
	if deadline > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, deadline)
		defer cancel()
	}
	began := time.Now()
	err := c.Ping(ctx)
	return err, time.Since(began)
}

// Calls made while another call's redial waits for the agent wait with it,
// each up to its own deadline: an agent that answers in time serves them
// all, whatever the deadline of the call that began the redial. Once a
// call's deadline passes after it waited reconnectPatience (500 ms), the
// agent has not answered within a caller's deadline: calls made after
// that fail at once with UNAVAILABLE, and those waiting already wait on.
// (Reviewer CK: they used to queue for the redial token until the first
// call gave up; reviewer CM: then, failing after 100 ms whatever the
// agent, a healthy agent that answered a reconnect in 150 ms failed every
// concurrent call but one; reviewers CN, CO and CP: then a first call with
// a short deadline, a late short call, or a 1 s probe failed them all.)
func TestCallsDuringAWaitingRedial(t *testing.T) {
	const slack = 400 * time.Millisecond // a loaded machine under -race
	type call struct {
		deadline time.Duration // 0: none
		code     proto.Code    // want; OK: served
		at       time.Duration // want it about then, from the start
	}
	for _, tc := range []struct {
		name       string
		first      call
		upAt       time.Duration // when the agent starts; 0: never
		laterAt    time.Duration // when the later calls begin
		later      []call
		afterFirst bool // a call after them all fails at once
	}{
		// The 1 s call's deadline passes 1.3 s into the redial, after it
		// waited past reconnectPatience: calls made after it fail at
		// once, and those waiting wait out their own deadlines.
		{"the agent down", call{2 * time.Second, proto.DeadlineExceeded, 2 * time.Second}, 0, 300 * time.Millisecond, []call{
			{3 * time.Second, proto.DeadlineExceeded, 3300 * time.Millisecond},
			{time.Second, proto.DeadlineExceeded, 1300 * time.Millisecond},
		}, true},
		{"a 1 s probe during a healthy restart", call{10 * time.Second, proto.OK, 1500 * time.Millisecond}, 1500 * time.Millisecond, 200 * time.Millisecond, []call{
			{time.Second, proto.DeadlineExceeded, 1200 * time.Millisecond},
			{10 * time.Second, proto.OK, 1500 * time.Millisecond},
		}, false},
		{"the agent starts within the first call's deadline", call{5 * time.Second, proto.OK, 800 * time.Millisecond}, 800 * time.Millisecond, 300 * time.Millisecond, []call{
			{5 * time.Second, proto.OK, 800 * time.Millisecond},
			{0, proto.OK, 800 * time.Millisecond},
		}, false},
		{"a healthy agent slow to answer", call{10 * time.Second, proto.OK, 150 * time.Millisecond}, 150 * time.Millisecond, 10 * time.Millisecond, []call{
			{10 * time.Second, proto.OK, 150 * time.Millisecond},
			{10 * time.Second, proto.OK, 150 * time.Millisecond},
			{10 * time.Second, proto.OK, 150 * time.Millisecond},
		}, false},
		{"a first call with a short deadline", call{50 * time.Millisecond, proto.DeadlineExceeded, 50 * time.Millisecond}, 150 * time.Millisecond, 10 * time.Millisecond, []call{
			{10 * time.Second, proto.OK, 150 * time.Millisecond},
			{10 * time.Second, proto.OK, 150 * time.Millisecond},
		}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, f, up := heldAgent(t)
			if tc.upAt > 0 {
				time.AfterFunc(tc.upAt, up)
			}
			start := time.Now()
			check := func(what string, want call) {
				err, _ := pingWithin(c, want.deadline)
				at := time.Since(start)
				if client.Code(err) != want.code || at < want.at-slack/4 || at > want.at+slack {
					t.Errorf("%s, deadline %v: %v (%s) at %v, want %s at about %v", what, want.deadline, err, client.Code(err), at, want.code, want.at)
				}
			}
			var wg sync.WaitGroup
			wg.Go(func() { check("the call that began the redial", tc.first) })
			time.Sleep(tc.laterAt)
			for _, l := range tc.later {
				wg.Go(func() { check(fmt.Sprintf("a call begun %v into the redial", tc.laterAt), l) })
			}
			wg.Wait()
			if tc.upAt > 0 {
				if err, _ := pingWithin(c, 5*time.Second); err != nil {
					t.Fatalf("a call after the start: %v", err)
				}
			}
			if tc.afterFirst {
				for _, d := range []time.Duration{5 * time.Second, 0} {
					if err, took := pingWithin(c, d); client.Code(err) != proto.Unavailable || took > slack {
						t.Errorf("a call with deadline %v after them: %v (%s) after %v, want UNAVAILABLE at once", d, err, client.Code(err), took)
					}
				}
			}
			if got := f.conns.Load(); got != 2 {
				t.Fatalf("%d connections, want 2: Dial's and one redial's", got)
			}
		})
	}
}

// In a known outage (a redial went unanswered within redialWait) every
// call fails at once, whichever call began the redial. Reviewer CO: when
// that call had a deadline shorter than the 100 ms grace (a 50 ms health
// check) or was cancelled, nothing abandoned the redial, and the next
// calls waited until their own deadline or the redial's end.
func TestKnownOutageBegunByAShortCall(t *testing.T) {
	const wait = 3 * time.Second
	for _, tc := range []struct {
		name  string
		begin func(c *client.Client)
	}{
		{"a 50 ms deadline", func(c *client.Client) { pingWithin(c, 50*time.Millisecond) }},
		{"cancelled", func(c *client.Client) {
			ctx, cancel := context.WithCancel(context.Background())
			time.AfterFunc(20*time.Millisecond, cancel)
			c.Ping(ctx)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			defer client.SetRedialWait(wait)()
			c, _, _ := heldAgent(t)
			start := time.Now()
			if err, _ := pingWithin(c, 300*time.Millisecond); client.Code(err) != proto.DeadlineExceeded {
				t.Fatalf("first: %v", err)
			}
			// Past the first redial's bound and its backoff: a known outage.
			time.Sleep(time.Until(start.Add(wait + 300*time.Millisecond)))
			if err, took := pingWithin(c, 5*time.Second); client.Code(err) != proto.Unavailable || took > 400*time.Millisecond {
				t.Fatalf("control: %v after %v", err, took)
			}
			// That redial (abandoned by its 100 ms grace) runs until wait; past it.
			time.Sleep(wait + 300*time.Millisecond)
			tc.begin(c) // begins the next redial, impatient, and leaves
			err, took := pingWithin(c, 5*time.Second)
			if client.Code(err) != proto.Unavailable || took > 400*time.Millisecond {
				t.Fatalf("a 5 s call in a known outage after a short call began the redial: %v (%s) after %v, want UNAVAILABLE at once", err, client.Code(err), took)
			}
		})
	}
}

// A short call made late in a redial leaves the others waiting. Reviewer
// CO: a redial's age, not the call's own wait, decided, so a 50 ms health
// check made 1.1 s into a 1.5 s socket-activated restart failed the 10 s
// call waiting since the start.
func TestAShortCallLateInARedialLeavesOthersWaiting(t *testing.T) {
	c, _, up := heldAgent(t)
	time.AfterFunc(1500*time.Millisecond, up)
	long := make(chan error, 1)
	go func() { err, _ := pingWithin(c, 10*time.Second); long <- err }()
	time.Sleep(1100 * time.Millisecond)
	if err, _ := pingWithin(c, 50*time.Millisecond); client.Code(err) != proto.DeadlineExceeded {
		t.Logf("health check: %v", err)
	}
	if err := <-long; err != nil {
		t.Fatalf("the 10 s call, agent up at 1.5 s: %v (%s), want it served", err, client.Code(err))
	}
}

// An agent side that takes the connect and drops it without answering (a
// crash loop under socket activation, a proxy's backend timeout) is an
// outage too, though no redial runs out its whole bound: a redial that a
// caller abandoned and that then failed makes the next calls fail at once.
// Reviewer CP: every call waited its whole deadline.
func TestDroppedRedialsMakeAKnownOutage(t *testing.T) {
	defer client.SetRedialWait(3 * time.Second)()
	lost := make(chan struct{})
	f := listenFake(t, func(n int32, nc net.Conn, br *bufio.Reader) {
		if n == 1 {
			answerHello(nc, br)
			nc.Close()
			close(lost)
			return
		}
		readRequest(br) // the Hello, never answered
		time.Sleep(1500 * time.Millisecond)
	})
	c := dial(t, f.path)
	<-lost
	for i := range 4 {
		err, took := pingWithin(c, time.Second)
		t.Logf("call %d: %v (%s) after %v", i, err, client.Code(err), took)
		if i >= 2 && took > 400*time.Millisecond {
			t.Fatalf("call %d in a long outage waited %v (its whole deadline), want UNAVAILABLE at once", i, took)
		}
		time.Sleep(700 * time.Millisecond)
	}
}

// In a known outage a call that leaves before the 100 ms grace does not cut
// it short for the calls already waiting: an agent that answers within it
// serves them. Reviewer CP: they failed at once.
func TestAShortCallInAKnownOutageLeavesTheGraceToOthers(t *testing.T) {
	defer client.SetRedialWait(time.Second)()
	lost := make(chan struct{})
	f := listenFake(t, func(n int32, nc net.Conn, br *bufio.Reader) {
		switch n {
		case 1:
			answerHello(nc, br)
			nc.Close()
			close(lost)
			return
		case 2:
			for { // held: never answered
				if _, err := readRequest(br); err != nil {
					return
				}
			}
		}
		time.Sleep(70 * time.Millisecond)
		if answerHello(nc, br) != nil {
			return
		}
		answerOK(nc, br)
	})
	c := dial(t, f.path)
	<-lost
	start := time.Now()
	if err, _ := pingWithin(c, 300*time.Millisecond); client.Code(err) != proto.DeadlineExceeded {
		t.Fatalf("first: %v", err)
	}
	time.Sleep(time.Until(start.Add(1300 * time.Millisecond))) // the redial went unanswered: a known outage
	short := make(chan error, 1)
	go func() { err, _ := pingWithin(c, 50*time.Millisecond); short <- err }()
	time.Sleep(10 * time.Millisecond)
	err, took := pingWithin(c, 5*time.Second)
	t.Logf("50 ms check: %v", <-short)
	if err != nil {
		t.Fatalf("5 s call, agent answering in 70 ms: %v (%s) after %v, want it served", err, client.Code(err), took)
	}
}

// A redial that went unanswered long ago (more than redialWait) does not
// make a later restart look like the same outage: a client idle while the
// agent came back waits for the agent's next restart up to its deadline
// (reviewer CM: the call failed after 100 ms).
func TestUnansweredLongAgoIsForgotten(t *testing.T) {
	const wait = 500 * time.Millisecond
	defer client.SetRedialWait(wait)()
	c, _, up := heldAgent(t)
	if err, _ := pingWithin(c, 200*time.Millisecond); client.Code(err) != proto.DeadlineExceeded {
		t.Fatalf("the call that began the redial: %v (%s), want DEADLINE_EXCEEDED", err, client.Code(err))
	}
	// The redial goes unanswered at wait; the client is idle for twice
	// that more, then calls while the agent is starting (up in 300 ms).
	time.Sleep(3 * wait)
	time.AfterFunc(300*time.Millisecond, up)
	if err, took := pingWithin(c, 10*time.Second); err != nil {
		t.Fatalf("a call during a restart, long after an unanswered redial: %v after %v, want it served", err, took)
	}
}

// When a redial goes unanswered for its whole bound (redialWait, 30 s by
// default; an agent down for long behind a socket that systemd holds), the
// next redial goes on in the background too: the call that begins it waits
// 100 ms at most, as other calls do, and fails with UNAVAILABLE. It used to
// wait up to its own deadline again, so one call in every 30 s (and those
// queued behind it) waited its whole deadline. Once the agent answers,
// whether a redial is waiting for it then or not, a call goes through
// within a backoff period.
func TestRedialAfterAnUnansweredRedialFailsFast(t *testing.T) {
	const wait = time.Second // the redial's bound in this test
	const fast = 400 * time.Millisecond
	for _, tc := range []struct {
		name string
		// up: when the agent starts, after the second redial began: while
		// it waits (within wait), after it ended unanswered, or never (0).
		up time.Duration
	}{
		{"the agent stays down", 0},
		{"the agent starts while a redial waits", wait / 2},
		{"the agent starts after the redial ended", wait * 3 / 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			defer client.SetRedialWait(wait)()
			c, f, up := heldAgent(t)
			start := time.Now()
			if err, _ := pingWithin(c, 300*time.Millisecond); client.Code(err) != proto.DeadlineExceeded {
				t.Fatalf("the call that began the redial: %v (%s), want DEADLINE_EXCEEDED", err, client.Code(err))
			}
			// Past the first redial's bound and the backoff after it.
			time.Sleep(time.Until(start.Add(wait + 300*time.Millisecond)))
			second := time.Now()
			for _, d := range []time.Duration{5 * time.Second, 0} {
				err, took := pingWithin(c, d)
				if client.Code(err) != proto.Unavailable || took > fast {
					t.Fatalf("a call with deadline %v after a redial went unanswered: %v (%s) after %v, want UNAVAILABLE at once", d, err, client.Code(err), took)
				}
			}
			if got := f.conns.Load(); got != 3 {
				t.Fatalf("%d connections, want 3: Dial's and two redials'", got)
			}
			if tc.up == 0 {
				// Three more redial bounds: every call fails at once.
				for time.Since(second) < 3*wait {
					err, took := pingWithin(c, 5*time.Second)
					if client.Code(err) != proto.Unavailable || took > fast {
						t.Fatalf("a call %v into the outage: %v (%s) after %v, want UNAVAILABLE at once", time.Since(start), err, client.Code(err), took)
					}
					time.Sleep(50 * time.Millisecond)
				}
				return
			}
			time.Sleep(time.Until(second.Add(tc.up)))
			up()
			upAt := time.Now()
			for {
				err, took := pingWithin(c, 5*time.Second)
				if err == nil {
					break
				}
				if client.Code(err) != proto.Unavailable || took > fast {
					t.Fatalf("a call after the agent started: %v (%s) after %v, want UNAVAILABLE at once", err, client.Code(err), took)
				}
				if since := time.Since(upAt); since > fast {
					t.Fatalf("no call served %v after the agent started: %v", since, err)
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
}

// Close ends a redial that goes on without the call that began it: its
// connection is closed, whether the agent has not answered its Hello yet
// or answers it as Close runs, and it never becomes the client's.
func TestCloseEndsARedialGoingOnWithoutItsCall(t *testing.T) {
	for _, tc := range []struct {
		name     string
		upBefore bool // the agent starts just before Close
	}{
		{"unanswered", false},
		{"answered as Close runs", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			started, lost, ended := make(chan struct{}), make(chan struct{}), make(chan struct{})
			var once sync.Once
			up := func() { once.Do(func() { close(started) }) }
			f := listenFake(t, func(n int32, nc net.Conn, br *bufio.Reader) {
				if n == 1 {
					answerHello(nc, br)
					nc.Close()
					close(lost)
					return
				}
				<-started
				answerHello(nc, br)
				readWholeFrames(br) // until the client closes
				close(ended)
			})
			t.Cleanup(up)
			c := dial(t, f.path)
			<-lost
			if err, _ := pingWithin(c, 200*time.Millisecond); client.Code(err) != proto.DeadlineExceeded {
				t.Fatalf("the call that began the redial: %v (%s), want DEADLINE_EXCEEDED", err, client.Code(err))
			}
			if tc.upBefore {
				up()
			}
			c.Close()
			up()
			select {
			case <-ended:
			case <-time.After(5 * time.Second):
				t.Fatal("the redial's connection is still open 5 s after Close")
			}
			if err, _ := pingWithin(c, 0); !errors.Is(err, client.ErrClosed) {
				t.Fatalf("Ping after Close: %v, want ErrClosed", err)
			}
			if got := f.conns.Load(); got != 2 {
				t.Fatalf("%d connections, want 2", got)
			}
		})
	}
}
