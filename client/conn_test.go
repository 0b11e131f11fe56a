package client_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/agent/devcerts"
	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

// fakeAgent listens on a Unix socket, accepts one connection, answers its
// Hello and then runs then on it in the background. It returns the socket's
// path; the test's end closes the connection and waits for then to return.
func fakeAgent(t *testing.T, then func(nc net.Conn, br *bufio.Reader)) string {
	t.Helper()
	// Not t.TempDir(): a Unix socket path must stay under ~100 bytes.
	dir, err := os.MkdirTemp("", "sigil-c")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	path := filepath.Join(dir, "fake.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	serveFake(t, ln, then)
	return path
}

// serveFake accepts one connection on ln and serves it as fakeAgent says.
func serveFake(t *testing.T, ln net.Listener, then func(nc net.Conn, br *bufio.Reader)) {
	t.Helper()
	var wg sync.WaitGroup
	accepted := make(chan net.Conn, 1) // the connection, or nil
	wg.Go(func() {
		nc, err := ln.Accept()
		ln.Close()
		if err != nil {
			accepted <- nil
			return
		}
		accepted <- nc
		br := bufio.NewReaderSize(nc, proto.DefaultMaxFrame+proto.FrameHeaderLen)
		req, err := readRequest(br)
		if err != nil || req.Op != proto.OpHello {
			t.Errorf("fake agent: want Hello, got %v, %v", req, err)
			return
		}
		if err := writeResponse(nc, &proto.Response{ID: req.ID, Code: proto.OK, Version: proto.Version, Features: proto.FeaturePipelining}); err != nil {
			t.Errorf("fake agent: %v", err)
			return
		}
		then(nc, br)
	})
	t.Cleanup(func() {
		ln.Close() // so that Accept, if still waiting, returns
		if nc := <-accepted; nc != nil {
			nc.Close()
		}
		wg.Wait()
	})
}

func readRequest(br *bufio.Reader) (*proto.Request, error) {
	payload, err := proto.ReadFrame(br, nil, proto.DefaultMaxFrame)
	if err != nil {
		return nil, err
	}
	req := new(proto.Request)
	return req, proto.NewCodec().DecodeRequest(payload, req)
}

func writeResponse(nc net.Conn, resp *proto.Response) error {
	frame, err := proto.NewCodec().AppendResponseFrame(nil, resp)
	if err != nil {
		return err
	}
	_, err = nc.Write(frame)
	return err
}

// returnsWithin runs fn and fails the test if it has not returned after d.
// A call that never returns is left behind: the test's cleanup closes the
// fake agent's end, which lets it go.
func returnsWithin(t *testing.T, d time.Duration, what string, fn func()) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn()
	}()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("%s: still blocked after %v", what, d)
	}
}

// bigMessage is an Ed25519 message that fills most of a frame, so that a few
// requests fill the socket's buffer.
var bigMessage = make([]byte, 60<<10)

var ed25519Alg = client.Algorithm{Scheme: client.SchemeEd25519}

// An agent that stops reading (past max_in_flight_per_conn requests in
// flight, or hung) must not hold a caller past its context, nor the callers
// queued behind it; a request cut off mid-frame closes the connection, so no
// later request is misframed.
func TestStalledAgentCannotHoldCallers(t *testing.T) {
	for _, tc := range []struct {
		name string
		run  func(t *testing.T, c *client.Client)
	}{
		{"sequential calls with deadlines", func(t *testing.T, c *client.Client) {
			// The first few requests fit in the socket's buffer and time out
			// waiting for replies; then one is cut off mid-write, and the
			// rest find the connection closed.
			var timedOut, closed int
			for i := 0; closed < 2 && i < 200; i++ {
				var err error
				returnsWithin(t, 2*time.Second, "Sign with a 200 ms deadline", func() {
					ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
					defer cancel()
					_, err = c.Sign(ctx, client.ByName("ed"), ed25519Alg, bigMessage)
				})
				switch code := client.Code(err); {
				case code == proto.Unavailable:
					closed++
				case code != proto.DeadlineExceeded || closed > 0:
					t.Fatalf("Sign %d: %v (code %v)", i, err, code)
				default:
					timedOut++
				}
			}
			if timedOut == 0 || closed == 0 {
				t.Fatalf("%d calls timed out and %d found the connection closed; want some of each", timedOut, closed)
			}
		}},
		{"a call queued behind a blocked write", func(t *testing.T, c *client.Client) {
			// Writers without a deadline: some fill the socket's buffer, one
			// blocks writing, the others wait for their turn.
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var wg sync.WaitGroup
			for range 16 {
				wg.Go(func() { c.Sign(ctx, client.ByName("ed"), ed25519Alg, bigMessage) })
			}
			time.Sleep(200 * time.Millisecond)
			returnsWithin(t, 2*time.Second, "Sign with a 200 ms deadline behind a blocked write", func() {
				ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
				defer cancel()
				_, err := c.Sign(ctx, client.ByName("ed"), ed25519Alg, bigMessage)
				if !errors.Is(err, context.DeadlineExceeded) {
					t.Errorf("Sign: %v, want a deadline error", err)
				}
			})
			cancel()
			returnsWithin(t, 2*time.Second, "cancelled Signs", wg.Wait)
		}},
		{"a call cancelled before its deadline, reading", func(t *testing.T, c *client.Client) {
			// A context with a deadline can also be cancelled (its parent,
			// its cancel func): the blocked read ends then, not at the
			// deadline.
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			time.AfterFunc(50*time.Millisecond, cancel)
			returnsWithin(t, 2*time.Second, "Sign cancelled 50 ms into a 10 s deadline", func() {
				if _, err := c.Sign(ctx, client.ByName("ed"), ed25519Alg, bigMessage); !errors.Is(err, context.Canceled) {
					t.Errorf("Sign: %v, want context.Canceled", err)
				}
			})
		}},
		{"calls cancelled before their deadlines, writing", func(t *testing.T, c *client.Client) {
			// Another caller holds the reader role; these fill the socket
			// and block writing.
			bg, stop := context.WithCancel(context.Background())
			var wg sync.WaitGroup
			wg.Go(func() { c.Sign(bg, client.ByName("ed"), ed25519Alg, bigMessage) })
			time.Sleep(50 * time.Millisecond)
			for i := range 8 {
				returnsWithin(t, 2*time.Second, fmt.Sprintf("Sign %d cancelled 50 ms into a 10 s deadline", i), func() {
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					defer cancel()
					time.AfterFunc(50*time.Millisecond, cancel)
					c.Sign(ctx, client.ByName("ed"), ed25519Alg, bigMessage)
				})
			}
			stop()
			returnsWithin(t, 2*time.Second, "the background Sign", wg.Wait)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			drain := make(chan struct{})
			framing := make(chan error, 1)
			path := fakeAgent(t, func(nc net.Conn, br *bufio.Reader) {
				<-drain
				framing <- readWholeFrames(br)
			})
			// Cleanups run last first: this one lets a failed test's fake
			// agent go before fakeAgent's cleanup waits for it.
			var once sync.Once
			t.Cleanup(func() { once.Do(func() { close(drain) }) })
			c := dial(t, path)
			tc.run(t, c)
			c.Close()
			once.Do(func() { close(drain) })
			if err := <-framing; err != nil {
				t.Fatalf("the agent read a misframed request: %v", err)
			}
		})
	}
}

// readWholeFrames reads Sign requests to the end of the stream. The last
// one may be cut short (the write the client gave up on); any other frame
// must decode.
func readWholeFrames(br *bufio.Reader) error {
	codec := proto.NewCodec()
	buf := make([]byte, proto.DefaultMaxFrame)
	for {
		payload, err := proto.ReadFrame(br, buf, proto.DefaultMaxFrame)
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil
		}
		if err != nil {
			return err
		}
		var req proto.Request
		if err := codec.DecodeRequest(payload, &req); err != nil {
			return err
		}
		if req.Op != proto.OpSign || len(req.Digest) != len(bigMessage) {
			return fmt.Errorf("request %d: %v of %d bytes, want a Sign of %d", req.ID, req.Op, len(req.Digest), len(bigMessage))
		}
	}
}

// The agent's final reply (id 0) ends the connection: the call waiting fails
// with its code, or INTERNAL when it says OK (a buggy or hostile agent: a
// protocol error, ErrMalformedReply), and nothing panics or hangs.
func TestFinalReplyEndsConnection(t *testing.T) {
	for _, tc := range []struct {
		name string
		code proto.Code
		want proto.Code
	}{
		{"OK", proto.OK, proto.Internal},
		{"UNAUTHENTICATED", proto.Unauthenticated, proto.Unauthenticated},
		{"BAD_REQUEST", proto.BadRequest, proto.BadRequest},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := fakeAgent(t, func(nc net.Conn, br *bufio.Reader) {
				if _, err := readRequest(br); err != nil {
					return
				}
				writeResponse(nc, &proto.Response{ID: 0, Code: tc.code})
				// Keep the connection open: the client must act on the
				// reply, not on an end of stream.
				io.Copy(io.Discard, br)
			})
			c, err := client.Dial(context.Background(), path)
			if err != nil {
				t.Fatal(err)
			}
			returnsWithin(t, 2*time.Second, "Sign answered by a final reply", func() {
				_, err := c.Sign(context.Background(), client.ByName("ed"), ed25519Alg, []byte("message"))
				if got := client.Code(err); err == nil || got != tc.want {
					t.Errorf("Sign: %v (code %v), want code %v", err, got, tc.want)
				}
			})
			// The next call redials; the fake agent takes one connection only.
			returnsWithin(t, 2*time.Second, "Ping after a final reply", func() {
				if err := c.Ping(context.Background()); client.Code(err) != proto.Unavailable {
					t.Errorf("Ping: %v, want code UNAVAILABLE", err)
				}
			})
			returnsWithin(t, 2*time.Second, "Close", func() { c.Close() })
		})
	}
}

// An agent that refuses a connection says why (a final reply, id 0) and
// closes at once, often before the client's Hello is written: the client
// reports the agent's reason, not the write's broken pipe.
func TestRefusalBeforeHelloIsReported(t *testing.T) {
	f := listenFake(t, func(_ int32, nc net.Conn, _ *bufio.Reader) {
		writeResponse(nc, &proto.Response{Code: proto.Unavailable, Msg: "too many connections (max_conns); try again later"})
	})
	for i := 0; i < 20; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		c, err := client.Dial(ctx, f.path)
		cancel()
		if err == nil {
			c.Close()
			t.Fatal("Dial to a refusing agent succeeded")
		}
		var pe *proto.Error
		if !errors.As(err, &pe) || pe.Code != proto.Unavailable || !strings.Contains(pe.Msg, "max_conns") {
			t.Fatalf("attempt %d: %v, want the agent's UNAVAILABLE refusal", i, err)
		}
	}
}

// fakeTLSAgent is fakeAgent over mutual TLS on loopback. It returns the
// address and the client's TLS configuration.
func fakeTLSAgent(t *testing.T, then func(nc net.Conn, br *bufio.Reader)) (string, *tls.Config) {
	t.Helper()
	ca, err := devcerts.NewCA("fake agent CA")
	if err != nil {
		t.Fatal(err)
	}
	server, err := ca.Issue(devcerts.Leaf{CommonName: "fake agent", IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, Server: true})
	if err != nil {
		t.Fatal(err)
	}
	clientCert, err := ca.Issue(devcerts.Leaf{CommonName: "fake client"})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serveFake(t, tls.NewListener(ln, &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{server.TLS},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    ca.Pool(),
	}), then)
	return ln.Addr().String(), &tls.Config{RootCAs: ca.Pool(), Certificates: []tls.Certificate{clientCert.TLS}}
}

// Over TCP a request first looks for the agent's close on a quiet
// connection, reading what the agent sent meanwhile. A late reply to a call
// that gave up is such a thing: it is dropped, and the connection, still
// good, carries the next call (the fake agent accepts one connection only).
func TestQuietTLSConnectionKeepsServingAfterALateReply(t *testing.T) {
	lateSent := make(chan struct{})
	addr, cfg := fakeTLSAgent(t, func(nc net.Conn, br *bufio.Reader) {
		late, err := readRequest(br)
		if err != nil {
			t.Errorf("fake agent: %v", err)
			return
		}
		time.Sleep(50 * time.Millisecond) // past the caller's deadline
		writeResponse(nc, &proto.Response{ID: late.ID, Code: proto.OK})
		close(lateSent)
		req, err := readRequest(br)
		if err != nil {
			t.Errorf("fake agent: the call after the late reply: %v", err)
			return
		}
		writeResponse(nc, &proto.Response{ID: req.ID, Code: proto.OK})
	})
	ctx := context.Background()
	c, err := client.DialTLS(ctx, addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	short, cancel := context.WithTimeout(ctx, 10*time.Millisecond)
	defer cancel()
	if err := c.Ping(short); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("the unanswered ping: %v, want a deadline error", err)
	}
	<-lateSent
	time.Sleep(20 * time.Millisecond) // the late reply is in the socket; the connection is quiet
	returnsWithin(t, 5*time.Second, "the next ping", func() {
		if err := c.Ping(ctx); err != nil {
			t.Errorf("the next ping on the same connection: %v", err)
		}
	})
}

// An agent's last word (an id 0 reply) on a quiet TCP connection ends it
// before the next request is written: the request goes to a new
// connection, here refused, and is not lost on the old one.
func TestQuietTLSConnectionEndedByTheAgentIsNotWrittenTo(t *testing.T) {
	wrote := make(chan bool, 1)
	addr, cfg := fakeTLSAgent(t, func(nc net.Conn, br *bufio.Reader) {
		writeResponse(nc, &proto.Response{ID: 0, Code: proto.Unavailable, Msg: "the agent is shutting down"})
		nc.SetReadDeadline(time.Now().Add(time.Second))
		_, err := readRequest(br)
		wrote <- err == nil
	})
	ctx := context.Background()
	c, err := client.DialTLS(ctx, addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	time.Sleep(20 * time.Millisecond)
	err = c.Ping(ctx)
	if client.Code(err) != proto.Unavailable {
		t.Fatalf("ping after the agent's last word: %v, want UNAVAILABLE", err)
	}
	if <-wrote {
		t.Fatal("the ping was written to the connection the agent had ended")
	}
}

// A call whose context has already ended sends nothing: the agent would
// sign it, journal it and count it against the slot's rate and quota for a
// caller that has gone.
func TestCancelledCallSendsNothing(t *testing.T) {
	var signs atomic.Int32
	path := fakeAgent(t, func(nc net.Conn, br *bufio.Reader) {
		for {
			req, err := readRequest(br)
			if err != nil {
				return
			}
			signs.Add(1)
			writeResponse(nc, &proto.Response{ID: req.ID, Code: proto.OK, Sig: []byte("sig")})
		}
	})
	c := dial(t, path)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for i := range 50 {
		if _, err := c.Sign(ctx, client.ByName("ed"), ed25519Alg, []byte("m")); !errors.Is(err, context.Canceled) {
			t.Fatalf("Sign %d with a cancelled context: %v, want context.Canceled", i, err)
		}
	}
	if _, err := c.Sign(context.Background(), client.ByName("ed"), ed25519Alg, []byte("m")); err != nil {
		t.Fatal(err)
	}
	if n := signs.Load(); n != 1 {
		t.Fatalf("the agent received %d Signs, want only the last one's", n)
	}
}

// A reply the agent sent just before it closed the connection reaches its
// caller. The reader hands it over and then fails the connection; the
// caller, finding both ready, took the failure about one time in four,
// reporting UNAVAILABLE for a signature the agent made and journaled (and a
// caller that retries would get a second one).
func TestReplyBeforeCloseIsNotLost(t *testing.T) {
	for i := range 100 {
		f := listenFake(t, func(_ int32, nc net.Conn, br *bufio.Reader) {
			if answerHello(nc, br) != nil {
				return
			}
			// The Ping (the reader's) is never answered; the Sign is,
			// whichever came first on a busy machine.
			for range 2 {
				req, err := readRequest(br)
				if err != nil {
					return
				}
				if req.Op == proto.OpSign {
					writeResponse(nc, &proto.Response{ID: req.ID, Code: proto.OK, Sig: []byte("sig")})
				}
			}
			nc.Close()
		})
		c, err := client.Dial(context.Background(), f.path)
		if err != nil {
			t.Fatal(err)
		}
		reading := make(chan struct{})
		go func() { defer close(reading); c.Ping(context.Background()) }()
		time.Sleep(2 * time.Millisecond) // the Ping holds the reader role
		if _, err := c.Sign(context.Background(), client.ByName("ed"), ed25519Alg, []byte("m")); err != nil {
			t.Fatalf("round %d: an answered Sign failed: %v", i, err)
		}
		c.Close()
		<-reading
		f.stop()
	}
}

// rawReply is a reply written by hand: code as a uint64 whatever its
// value (package proto writes only the codes Code holds), with a message
// and a signature.
func rawReply(id, code uint64, msg string, sig []byte) []byte {
	payload := []byte{0x84, 0xa2, 'i', 'd', 0xcf}
	payload = binary.BigEndian.AppendUint64(payload, id)
	payload = append(payload, 0xa4, 'c', 'o', 'd', 'e', 0xcf)
	payload = binary.BigEndian.AppendUint64(payload, code)
	payload = append(append(payload, 0xa3, 'm', 's', 'g', 0xa0|byte(len(msg))), msg...)
	payload = append(append(payload, 0xa3, 's', 'i', 'g', 0xc4, byte(len(sig))), sig...)
	return append(binary.BigEndian.AppendUint32(nil, uint32(len(payload))), payload...)
}

// A newer agent may answer with a code this client does not know. It is
// the call's error, with that code (never OK: a signature beside it is
// not returned), and the connection stays. A code past Code's 16 bits
// reads as proto.CodeOutOfRange, not wrapped onto a known code (65536 is
// not OK, 65546 not PAUSED); it used to fail the reply's decoding, which
// closed the connection and failed the call, and every other in flight,
// as UNAVAILABLE: a refusal the caller would have retried.
func TestUnknownCodesAreErrors(t *testing.T) {
	codes := []uint64{18, 0xfffe, 0xffff, 0x10000, 0x10000 + uint64(proto.Paused), 1<<32 + 1, 1<<64 - 1}
	const msg = "a newer agent's refusal"
	path := fakeAgent(t, func(nc net.Conn, br *bufio.Reader) {
		for _, code := range codes {
			req, err := readRequest(br)
			if err != nil {
				return
			}
			if _, err := nc.Write(rawReply(req.ID, code, msg, []byte{0x30, 0x06, 1, 1, 1, 2, 1, 1})); err != nil {
				return
			}
		}
		if req, err := readRequest(br); err == nil {
			writeResponse(nc, &proto.Response{ID: req.ID, Code: proto.OK})
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	digest := make([]byte, 32)
	for _, code := range codes {
		sig, err := c.Sign(ctx, client.ByName("k"), client.Algorithm{}, digest)
		want := proto.Code(min(code, uint64(proto.CodeOutOfRange)))
		var pe *proto.Error
		if err == nil || sig.Sig != nil || !errors.As(err, &pe) || pe.Code != want || pe.Msg != msg || client.Code(err) != want {
			t.Fatalf("code %d: signature %x, error %v (code %s), want %s with the agent's message", code, sig.Sig, err, client.Code(err), want)
		}
	}
	// The same connection: the fake agent accepts no other.
	if err := c.Ping(ctx); err != nil {
		t.Fatalf("the connection did not outlive the unknown codes: %v", err)
	}
}

// A reply's length prefix over the frame limit is refused by the limit's
// name, not the length it announced: from an agent (or a stream) that lost
// its place, those four bytes may be a digest's, which docs/security.md
// keeps out of messages and logs on the agent's side. The client's error
// used to say "reply frame of N bytes".
func TestOversizedReplyNamesTheLimit(t *testing.T) {
	digest := []byte{0xc0, 0xff, 0xee, 0xa1} // as a length: 3237998241
	for _, tc := range []struct {
		name   string
		prefix []byte
		is     error
	}{
		{"a digest's bytes as the length", digest, proto.ErrFrameTooLarge},
		{"one byte over the limit", binary.BigEndian.AppendUint32(nil, proto.DefaultMaxFrame+1), proto.ErrFrameTooLarge},
		{"an empty frame", []byte{0, 0, 0, 0}, proto.ErrEmptyFrame},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := fakeAgent(t, func(nc net.Conn, br *bufio.Reader) {
				if _, err := readRequest(br); err == nil {
					nc.Write(tc.prefix)
				}
			})
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			c, err := client.Dial(ctx, path)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			err = c.Ping(ctx)
			// INTERNAL, not UNAVAILABLE: the agent is there and broke the
			// protocol; a caller retrying on UNAVAILABLE would not mend it.
			if !errors.Is(err, tc.is) || !errors.Is(err, client.ErrMalformedReply) || client.Code(err) != proto.Internal {
				t.Fatalf("%v (%s), want %v, a malformed reply, INTERNAL", err, client.Code(err), tc.is)
			}
			msg := err.Error()
			n := binary.BigEndian.Uint32(tc.prefix)
			if strings.Contains(msg, fmt.Sprint(n)) && n != 0 || strings.Contains(strings.ToLower(msg), fmt.Sprintf("%x", tc.prefix[:2])) {
				t.Fatalf("the error names the announced length: %q", msg)
			}
			if tc.is == proto.ErrFrameTooLarge && !strings.Contains(msg, fmt.Sprint(proto.DefaultMaxFrame)) {
				t.Fatalf("the error does not name the limit: %q", msg)
			}
		})
	}
}
