package client_test

import (
	"bufio"
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

// An error from the client says what happened once, led by its code's name
// where it has one (client.Code's, which it still gives) and by "sigil: "
// where it has none (a caller's cancellation, a closed client). It used to
// nest the client's own words: "sigil: hello: sigil Hello: context deadline
// exceeded", "sigil Ping: reconnect: sigil: connect to agent at X: dial
// unix X: ...", "sigil: hello: UNSUPPORTED_VERSION: ...". The causes stay
// in the chain for errors.Is and errors.As.
func TestErrorsSayItOnce(t *testing.T) {
	short := func() (context.Context, context.CancelFunc) {
		return context.WithTimeout(context.Background(), 300*time.Millisecond)
	}
	var opErr *net.OpError
	var refused *proto.Error
	for _, tc := range []struct {
		name   string
		run    func(t *testing.T) error
		code   proto.Code
		prefix string // the text's start
		is     error  // in the chain, when set
		as     any    // errors.As target, when set
	}{
		{name: "dial: no agent", code: proto.Unavailable, prefix: "UNAVAILABLE: connect to the agent: dial unix ", as: &opErr,
			run: func(t *testing.T) error {
				dir, err := os.MkdirTemp("", "sigil-c") // t.TempDir's name holds the test's words
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { os.RemoveAll(dir) })
				_, err = client.Dial(context.Background(), filepath.Join(dir, "none.sock"))
				return err
			}},
		{name: "dial: no Hello in time", code: proto.DeadlineExceeded, prefix: "DEADLINE_EXCEEDED: Hello ", is: context.DeadlineExceeded,
			run: func(t *testing.T) error {
				f := listenFake(t, func(_ int32, _ net.Conn, br *bufio.Reader) { readRequest(br); readRequest(br) })
				ctx, cancel := short()
				defer cancel()
				_, err := client.Dial(ctx, f.path)
				return err
			}},
		{name: "dial: Hello refused", code: proto.UnsupportedVersion, prefix: "UNSUPPORTED_VERSION: this agent speaks version 7", as: &refused,
			run: func(t *testing.T) error {
				f := listenFake(t, func(_ int32, nc net.Conn, br *bufio.Reader) {
					if req, err := readRequest(br); err == nil {
						writeResponse(nc, &proto.Response{ID: req.ID, Code: proto.UnsupportedVersion, Version: 7, Msg: "this agent speaks version 7"})
					}
				})
				_, err := client.Dial(context.Background(), f.path)
				return err
			}},
		{name: "call: cancelled before it was sent", code: proto.Unavailable, prefix: "sigil: Ping not sent: ", is: context.Canceled,
			run: func(t *testing.T) error {
				c := dialFake(t, func(nc net.Conn, br *bufio.Reader) {})
				ctx, cancel := context.WithCancel(context.Background())
				cancel()
				return c.Ping(ctx)
			}},
		{name: "call: no reply in time", code: proto.DeadlineExceeded, prefix: "DEADLINE_EXCEEDED: Ping ", is: context.DeadlineExceeded,
			run: func(t *testing.T) error {
				c := dialFake(t, func(nc net.Conn, br *bufio.Reader) { readRequest(br); readRequest(br) })
				ctx, cancel := short()
				defer cancel()
				return c.Ping(ctx)
			}},
		{name: "call: connection lost", code: proto.Unavailable, prefix: "UNAVAILABLE: connection to the agent lost: ",
			run: func(t *testing.T) error {
				c := dialFake(t, func(nc net.Conn, br *bufio.Reader) { readRequest(br); nc.Close() })
				return c.Ping(context.Background())
			}},
		{name: "call: reconnect finds no agent", code: proto.Unavailable, prefix: "UNAVAILABLE: Ping not sent: reconnect: connect to the agent: dial unix ", as: &opErr,
			run: func(t *testing.T) error {
				var f *fakeAgents
				f = listenFake(t, func(_ int32, nc net.Conn, br *bufio.Reader) {
					answerHello(nc, br)
					f.stop() // no second connection
					nc.Close()
				})
				c, err := client.Dial(context.Background(), f.path)
				if err != nil {
					t.Fatal(err)
				}
				defer c.Close()
				time.Sleep(50 * time.Millisecond) // the close reaches the client's socket
				return c.Ping(context.Background())
			}},
		{name: "call: client closed", code: proto.Unavailable, prefix: "sigil: client closed", is: client.ErrClosed,
			run: func(t *testing.T) error {
				c := dialFake(t, func(nc net.Conn, br *bufio.Reader) {})
				c.Close()
				return c.Ping(context.Background())
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.run(t)
			if err == nil {
				t.Fatal("no error")
			}
			msg := err.Error()
			if client.Code(err) != tc.code || !strings.HasPrefix(msg, tc.prefix) {
				t.Fatalf("%q (%s), want %s and a text starting %q", msg, client.Code(err), tc.code, tc.prefix)
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Fatalf("%q: errors.Is %v false", msg, tc.is)
			}
			if tc.as != nil && !errors.As(err, tc.as) {
				t.Fatalf("%q: errors.As %T false", msg, tc.as)
			}
			words := []string{"sigil", "Hello", "Ping", "reconnect", "connect to", "dial", "lost", "context"}
			for _, c := range proto.Codes() {
				words = append(words, c.String())
			}
			for _, w := range words {
				if n := strings.Count(msg, w); n > 1 {
					t.Errorf("%q says %q %d times", msg, w, n)
				}
			}
		})
	}
}

// dialFake connects to a fake agent that answers Hello and then runs then.
func dialFake(t *testing.T, then func(nc net.Conn, br *bufio.Reader)) *client.Client {
	t.Helper()
	c, err := client.Dial(context.Background(), fakeAgent(t, then))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
