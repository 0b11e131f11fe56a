package client_test

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

// Tests of the client facing a faulty or hostile agent: a fake agent on a
// Unix socket writes every byte the client reads.

// Close ends a redial in progress: a call redialling an agent that accepts
// and never answers the Hello, without a deadline, returns ErrClosed, and
// calls that came during the redial return ErrClosed too, or UNAVAILABLE
// if they gave up on it (100 ms after it began) before Close. The redial's
// connection was not the client's yet, so Close did not close it, and all
// the calls used to wait for good.
func TestCloseEndsARedialInProgress(t *testing.T) {
	for _, callers := range []int{1, 3} {
		t.Run(map[int]string{1: "the redialling call", 3: "calls during the redial"}[callers], func(t *testing.T) {
			hung, lost := make(chan struct{}, 1), make(chan struct{})
			f := listenFake(t, func(n int32, nc net.Conn, br *bufio.Reader) {
				if n == 1 {
					answerHello(nc, br)
					nc.Close() // the connection is lost
					close(lost)
					return
				}
				if _, err := readRequest(br); err == nil {
					hung <- struct{}{} // a Hello, never answered
				}
				io.Copy(io.Discard, br)
			})
			c := dial(t, f.path)
			<-lost
			errs := make(chan error, callers)
			for range callers {
				go func() { errs <- c.Ping(context.Background()) }()
			}
			select {
			case <-hung:
			case <-time.After(5 * time.Second):
				t.Fatal("no redial reached the agent")
			}
			c.Close()
			closed := 0
			for range callers {
				select {
				case err := <-errs:
					if errors.Is(err, client.ErrClosed) && client.Code(err) == proto.BadRequest {
						closed++
					} else if callers == 1 || client.Code(err) != proto.Unavailable {
						t.Errorf("Ping: %v (%s), want ErrClosed", err, client.Code(err))
					}
				case <-time.After(5 * time.Second):
					t.Fatal("a call still waits on the redial 5 s after Close")
				}
			}
			if closed == 0 {
				t.Error("no call got ErrClosed: the redialling call did not wait for the redial")
			}
		})
	}
}

// A reply the client cannot take for what it says, in a frame that decodes,
// is INTERNAL (ErrMalformedReply), not a result: a Sign answered OK without
// a signature (crypto.Signer's caller would have sent an empty one on), a
// Sign by kid answered by another kid (a signature Public's key does not
// verify), a Hello answered OK for another protocol version than the
// client's (or none). Each used to be taken: a nil error with an empty
// signature, another key's signature, a connection in a version the client
// does not speak. The Sign's connection stays open: its frame was sound.
func TestRepliesThatDoNotFitTheRequest(t *testing.T) {
	ctx := func(t *testing.T) context.Context {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		t.Cleanup(cancel)
		return ctx
	}
	// agent answers Hello with hello (its id set here), then each request
	// with reply, Pings with OK.
	agent := func(hello, reply proto.Response) func(int32, net.Conn, *bufio.Reader) {
		return func(_ int32, nc net.Conn, br *bufio.Reader) {
			for first := true; ; first = false {
				req, err := readRequest(br)
				if err != nil {
					return
				}
				resp := reply
				switch {
				case first:
					resp = hello
				case req.Op == proto.OpPing:
					resp = proto.Response{Code: proto.OK}
				}
				resp.ID = req.ID
				writeResponse(nc, &resp)
			}
		}
	}
	hello := proto.Response{Code: proto.OK, Version: proto.Version, Features: proto.FeaturePipelining}
	helloIn := func(v uint16) proto.Response { h := hello; h.Version = v; return h }
	sign := func(ref client.KeyRef) func(*testing.T, *client.Client) error {
		return func(t *testing.T, c *client.Client) error {
			sig, err := c.Sign(ctx(t), ref, client.Algorithm{}, make([]byte, 32))
			if err != nil && (sig.Sig != nil || sig.KID != "") {
				t.Errorf("a failed Sign returned a signature, kid %q", sig.KID)
			}
			return err
		}
	}
	for _, tc := range []struct {
		name  string
		hello proto.Response
		reply proto.Response
		run   func(*testing.T, *client.Client) error // nil: the Dial fails
		says  string
	}{
		{name: "a Sign answered OK without a signature", hello: hello,
			reply: proto.Response{Code: proto.OK, Key: "k", KID: "0123"}, run: sign(client.ByName("k")),
			says: "INTERNAL: Sign reply: OK without a signature"},
		{name: "a Sign by kid answered by another kid", hello: hello,
			reply: proto.Response{Code: proto.OK, Key: "k", KID: "4567", Sig: []byte("sig")}, run: sign(client.ByKID("0123")),
			says: `INTERNAL: Sign reply: signed by kid "4567", not the "0123" asked for`},
		{name: "a Sign by kid answered without a kid", hello: hello,
			reply: proto.Response{Code: proto.OK, Key: "k", Sig: []byte("sig")}, run: sign(client.KeyRef{Name: "k", KID: "0123"}),
			says: `INTERNAL: Sign reply: signed by kid "", not the "0123" asked for`},
		{name: "a Hello answered OK for version 2", hello: helloIn(2),
			says: "INTERNAL: protocol error: the agent answered the Hello for protocol version 1 with OK and version 2"},
		{name: "a Hello answered OK without a version", hello: helloIn(0),
			says: "INTERNAL: protocol error: the agent answered the Hello for protocol version 1 with OK and version 0"},
		{name: "a Hello answered OK for a version past 16 bits", hello: helloIn(proto.VersionOutOfRange),
			says: "INTERNAL: protocol error: the agent answered the Hello for protocol version 1 with OK and version 65535"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := listenFake(t, agent(tc.hello, tc.reply))
			c, err := client.Dial(ctx(t), f.path)
			if tc.run == nil {
				if err == nil {
					c.Close()
					t.Fatal("Dial succeeded")
				}
			} else {
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				err = tc.run(t, c)
			}
			var pe *proto.Error
			switch {
			case err == nil:
				t.Fatal("no error")
			case client.Code(err) != proto.Internal || !errors.Is(err, client.ErrMalformedReply) || !strings.HasPrefix(err.Error(), tc.says):
				t.Fatalf("%q (%s), want INTERNAL, ErrMalformedReply and a text starting %q", err, client.Code(err), tc.says)
			case errors.As(err, &pe):
				t.Fatalf("%q: a *proto.Error, which is the agent's answer alone", err)
			}
			if c != nil {
				if err := c.Ping(ctx(t)); err != nil {
					t.Fatalf("Ping after the reply: %v", err)
				}
				if n := f.conns.Load(); n != 1 {
					t.Fatalf("%d connections, want the first one kept", n)
				}
			}
		})
	}
}

// A key list is decoded into memory in proportion to its reply, not to the
// count of entries the reply declares: an entry must carry its public key,
// so it takes at least 8 bytes of the frame. An entry of one byte (an empty
// map, a nil) used to become a 136-byte KeyEntry and a 152-byte Key: a
// 1 KiB reply made the client allocate about 300 KB, a reply at the frame
// limit over 50 MB. Each such reply is INTERNAL (ErrMalformedReply).
func TestKeyListAllocatesInProportionToItsReply(t *testing.T) {
	// keysReply is a reply of about size bytes to request id: a list of
	// copies of entry.
	keysReply := func(id uint64, size int, entry []byte) []byte {
		p := []byte{0x83, 0xa2, 'i', 'd', 0xcf}
		p = binary.BigEndian.AppendUint64(p, id)
		p = append(p, 0xa4, 'c', 'o', 'd', 'e', 0x00, 0xa4, 'k', 'e', 'y', 's', 0xdd)
		n := (size - len(p) - 4) / len(entry)
		p = binary.BigEndian.AppendUint32(p, uint32(n))
		for range n {
			p = append(p, entry...)
		}
		return append(binary.BigEndian.AppendUint32(nil, uint32(len(p))), p...)
	}
	for _, size := range []int{1 << 10, proto.DefaultMaxFrame} {
		for _, entry := range []struct {
			name  string
			bytes []byte
		}{
			{"empty maps", []byte{0x80}},
			{"nils", []byte{0xc0}},
			{"maps of an unknown field", []byte{0x81, 0xa0, 0xc0}},
			{"maps of a 1-byte pub", []byte{0x81, 0xa3, 'p', 'u', 'b', 0xc4, 0x01, 0x00}},
		} {
			t.Run(fmt.Sprintf("%d bytes of %s", size, entry.name), func(t *testing.T) {
				// The Hello is request 1, ListKeys 2. The fake agent
				// allocates nothing while the client decodes.
				reply := keysReply(2, size, entry.bytes)
				buf := make([]byte, proto.DefaultMaxFrame)
				c := dialFake(t, func(nc net.Conn, br *bufio.Reader) {
					if _, err := proto.ReadFrame(br, buf, proto.DefaultMaxFrame); err == nil {
						nc.Write(reply)
					}
					io.Copy(io.Discard, br)
				})
				var before, after runtime.MemStats
				runtime.GC()
				runtime.ReadMemStats(&before)
				_, err := c.ListKeys(context.Background())
				runtime.ReadMemStats(&after)
				if client.Code(err) != proto.Internal || !errors.Is(err, client.ErrMalformedReply) {
					t.Fatalf("ListKeys: %v (%s), want INTERNAL, a malformed reply", err, client.Code(err))
				}
				allocated := after.TotalAlloc - before.TotalAlloc
				t.Logf("%d bytes allocated for a %d-byte reply", allocated, len(reply))
				if most := uint64(24*len(reply) + 32<<10); allocated > most {
					t.Fatalf("%d bytes allocated for a %d-byte reply, want at most %d", allocated, len(reply), most)
				}
			})
		}
	}
}

// Replies no caller waits for reach no caller: one for a request whose
// caller gave up (its deadline passed), one with an id no request has, and
// a second one for an id already answered. The next caller gets its own
// signature, the connection stays, and once the client is closed its
// goroutines are gone.
func TestStrayRepliesReachNoOtherCaller(t *testing.T) {
	before := runtime.NumGoroutine()
	const rounds = 10
	f := listenFake(t, func(_ int32, nc net.Conn, br *bufio.Reader) {
		if answerHello(nc, br) != nil {
			return
		}
		echo := func(id uint64, sig []byte) { writeResponse(nc, &proto.Response{ID: id, Code: proto.OK, Sig: sig}) }
		for {
			late, err := readRequest(br) // its caller gives up
			if err != nil {
				return
			}
			now, err := readRequest(br)
			if err != nil {
				return
			}
			echo(late.ID, late.Digest)
			echo(now.ID+1000, []byte("stray"))
			echo(now.ID, now.Digest)
			echo(now.ID, []byte("again"))
		}
	})
	c, err := client.Dial(context.Background(), f.path)
	if err != nil {
		t.Fatal(err)
	}
	for i := range rounds {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		_, err := c.Sign(ctx, client.ByName("ed"), ed25519Alg, fmt.Appendf(nil, "late %d", i))
		cancel()
		if client.Code(err) != proto.DeadlineExceeded {
			t.Fatalf("round %d: the unanswered Sign: %v, want DEADLINE_EXCEEDED", i, err)
		}
		want := fmt.Appendf(nil, "now %d", i)
		sig, err := c.Sign(context.Background(), client.ByName("ed"), ed25519Alg, want)
		if err != nil || string(sig.Sig) != string(want) {
			t.Fatalf("round %d: Sign got %q, %v, want its own reply %q", i, sig.Sig, err, want)
		}
	}
	if n := f.conns.Load(); n != 1 {
		t.Fatalf("%d connections, want 1", n)
	}
	c.Close()
	f.stop()
	for deadline := time.Now().Add(5 * time.Second); runtime.NumGoroutine() > before; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines after Close, %d before Dial", runtime.NumGoroutine(), before)
		}
	}
}

// A reply frame whose rest never comes (the agent sent part of its length
// header, the header alone, or the header and part of the payload, and then
// nothing) ends its connection once the frame timeout has passed: its
// callers get UNAVAILABLE, with or without deadlines, and the next call
// goes out on a new connection. A caller without a deadline used to wait
// for good, and callers with deadlines each got DEADLINE_EXCEEDED on a
// connection that was never given up.
func TestReplyFrameCutOffEndsTheConnection(t *testing.T) {
	defer client.SetFrameTimeout(200 * time.Millisecond)()
	for _, part := range []struct {
		name  string
		bytes []byte
	}{
		{"half a length header", []byte{0, 0}},
		{"a length header alone", []byte{0, 0, 0, 40}},
		{"a header and part of the payload", []byte{0, 0, 0, 40, 0x83, 0xa2, 'i'}},
	} {
		for _, deadline := range []time.Duration{0, 50 * time.Millisecond} {
			name := part.name + "/no deadline"
			if deadline > 0 {
				name = fmt.Sprintf("%s/%v deadlines", part.name, deadline)
			}
			t.Run(name, func(t *testing.T) {
				f := listenFake(t, func(n int32, nc net.Conn, br *bufio.Reader) {
					if answerHello(nc, br) != nil {
						return
					}
					if n == 1 {
						if _, err := readRequest(br); err == nil {
							nc.Write(part.bytes)
						}
						io.Copy(io.Discard, br) // open, and silent
						return
					}
					answerOK(nc, br)
				})
				c := dial(t, f.path)
				ping := func() error {
					ctx := context.Background()
					if deadline > 0 {
						var cancel context.CancelFunc
						ctx, cancel = context.WithTimeout(ctx, deadline)
						defer cancel()
					}
					return c.Ping(ctx)
				}
				// With deadlines, the calls before the frame timeout passes
				// time out on their own.
				var err error
				calls := 0
				returnsWithin(t, 10*time.Second, "Pings on a connection with a frame cut off", func() {
					for err = ping(); deadline > 0 && client.Code(err) == proto.DeadlineExceeded && calls < 100; err = ping() {
						calls++
					}
				})
				if client.Code(err) != proto.Unavailable {
					t.Fatalf("Ping after %d calls timed out: %v (%s), want UNAVAILABLE", calls, err, client.Code(err))
				}
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				defer cancel()
				if err := c.Ping(ctx); err != nil {
					t.Fatalf("Ping after the connection was given up: %v", err)
				}
				if n := f.conns.Load(); n != 2 {
					t.Fatalf("%d connections, want 2", n)
				}
			})
		}
	}
}
