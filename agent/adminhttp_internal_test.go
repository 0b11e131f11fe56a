package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
)

// A client that sends its request slowly, a byte now and then, is cut
// once the admin HTTP server's read timeout passes, whatever part of the
// request it trickles: the endpoints share the agent's file descriptors,
// and connections held for ever would starve the signing sockets of them.
// The timeouts are shortened here; the agent's own are seconds.
func TestAdminHTTPCutsSlowRequests(t *testing.T) {
	saved := adminHTTPTimeouts
	t.Cleanup(func() { adminHTTPTimeouts = saved })
	adminHTTPTimeouts.readHeader = 200 * time.Millisecond
	adminHTTPTimeouts.read = 500 * time.Millisecond
	adminHTTPTimeouts.write = 500 * time.Millisecond
	adminHTTPTimeouts.idle = 500 * time.Millisecond

	addr := serveAdminHTTP(t)

	for _, tc := range []struct {
		name    string
		head    string // sent at once
		trickle string // then sent for ever, one piece at a time
	}{
		{"chunked body", "GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", "1\r\na\r\n"},
		{"declared body", "GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n", "a"},
		{"body to an unknown path", "POST /readyz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", "1\r\na\r\n"},
		{"headers", "GET /healthz HTTP/1.1\r\n", "X: y\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := io.WriteString(c, tc.head); err != nil {
				t.Fatal(err)
			}
			closed := make(chan struct{})
			go func() {
				io.Copy(io.Discard, c) // until the server closes it
				close(closed)
			}()
			// Many times every timeout: a server that holds the
			// connection past this holds it for as long as the
			// client trickles.
			giveUp := time.After(10 * time.Second)
			tick := time.NewTicker(50 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-closed:
					return
				case <-giveUp:
					t.Fatal("the server still holds a connection that trickles its request")
				case <-tick.C:
					io.WriteString(c, tc.trickle)
				}
			}
		})
	}
}

// serveAdminHTTP serves an agent's admin HTTP endpoints on a loopback port
// until the test ends, and returns the address.
func serveAdminHTTP(t *testing.T) string {
	t.Helper()
	a, err := New(context.Background(), Config{DataDir: t.TempDir(), Journal: JournalConfig{Mode: "off"}}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- a.ServeAdminHTTP(ln) }()
	t.Cleanup(func() {
		a.Shutdown(context.Background())
		if err := <-served; !errors.Is(err, ErrClosed) {
			t.Errorf("ServeAdminHTTP returned %v", err)
		}
	})
	return ln.Addr().String()
}

// The admin HTTP server holds at most maxAdminHTTPConns connections: one
// more waits, unanswered, until one of them closes, instead of taking
// another of the file descriptors the signing sockets need.
func TestAdminHTTPConnectionCap(t *testing.T) {
	saved := maxAdminHTTPConns
	t.Cleanup(func() { maxAdminHTTPConns = saved })
	maxAdminHTTPConns = 2

	addr := serveAdminHTTP(t)
	healthz := func(timeout time.Duration) error {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(timeout))
		if _, err := io.WriteString(c, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"); err != nil {
			return err
		}
		reply, err := io.ReadAll(c)
		if err == nil && !strings.HasPrefix(string(reply), "HTTP/1.1 200") {
			err = fmt.Errorf("reply %q", reply)
		}
		return err
	}
	if err := healthz(5 * time.Second); err != nil {
		t.Fatalf("healthz with no other connection: %v", err)
	}
	var held []net.Conn
	for range maxAdminHTTPConns {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		held = append(held, c)
	}
	if err := healthz(500 * time.Millisecond); err == nil {
		t.Fatalf("healthz answered with %d connections already open, the cap", len(held))
	}
	held[0].Close()
	if err := healthz(5 * time.Second); err != nil {
		t.Fatalf("healthz once a held connection closed: %v", err)
	}
}

// An address the configured name resolved to but that is not loopback is
// refused unless allow_remote is set: the config's check takes "localhost"
// on its name.
func TestAdminHTTPBoundAddressIsChecked(t *testing.T) {
	for _, tc := range []struct {
		addr        net.Addr
		allowRemote bool
		ok          bool
	}{
		{&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 9464}, false, true},
		{&net.TCPAddr{IP: net.IPv6loopback, Port: 9464}, false, true},
		{&net.TCPAddr{IP: net.IPv4(10, 1, 2, 3), Port: 9464}, false, false},
		{&net.TCPAddr{IP: net.IPv4(10, 1, 2, 3), Port: 9464}, true, true},
	} {
		err := boundWhereAllowed(tc.addr, AdminHTTPConfig{Listen: "localhost:9464", AllowRemote: tc.allowRemote})
		if (err == nil) != tc.ok {
			t.Errorf("%v, allow_remote %v: %v; want ok %v", tc.addr, tc.allowRemote, err, tc.ok)
		}
		// The agent's start exits 78 (a config fault, not restarted) on it.
		if err != nil && !errors.Is(err, ErrAdminHTTPNotLoopback) {
			t.Errorf("%v: %v is not ErrAdminHTTPNotLoopback", tc.addr, err)
		}
	}
}
