package client

import (
	"errors"
	"net"
	"strings"
	"testing"
)

// A failed connect names the agent's address once: from the error when it
// names one, else from the caller. A TLS alert is a *net.OpError with no
// address, and its text used to lose it.
func TestDialFailedNamesTheAddress(t *testing.T) {
	addr := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 7443}
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"dial refused", &net.OpError{Op: "dial", Net: "tcp", Addr: addr, Err: errors.New("connection refused")}},
		{"tls alert", &net.OpError{Op: "remote error", Err: errors.New("tls: protocol version not supported")}},
		{"other", errors.New("no route")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			msg := dialFailed("127.0.0.1:7443", tc.err).Error()
			if n := strings.Count(msg, "127.0.0.1:7443"); n != 1 {
				t.Fatalf("%q names the address %d times, want once", msg, n)
			}
		})
	}
}
