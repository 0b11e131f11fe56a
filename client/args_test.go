package client_test

import (
	"bufio"
	"context"
	"errors"
	"math"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

// DialTLS without a config is the caller's mistake, returned as one: it
// used to panic (a nil *tls.Config's MinVersion).
func TestDialTLSWithoutAConfig(t *testing.T) {
	var err error
	func() {
		defer func() {
			if p := recover(); p != nil {
				t.Fatalf("DialTLS with a nil config panicked: %v", p)
			}
		}()
		_, err = client.DialTLS(context.Background(), "127.0.0.1:1", nil)
	}()
	if !errors.Is(err, client.ErrRefusedByClient) || client.Code(err) != proto.BadRequest {
		t.Fatalf("DialTLS(nil config) = %v (code %v), want BAD_REQUEST, ErrRefusedByClient", err, client.Code(err))
	}
}

// A count or pack number past the wire's 32 bits goes out as the largest
// (which the protocol reads as "as many as allowed", or a pack never
// assigned, NOT_FOUND), never as its low 32 bits: pack 2^32+1 is not
// pack 1, and 2^32+5 records are not 5.
func TestLargeNumbersAreNotWrapped(t *testing.T) {
	big := int64(1)<<32 + 1
	if int64(int(big)) != big {
		t.Skip("int is 32 bits here")
	}
	got := make(chan uint32, 2)
	c := dialFake(t, func(nc net.Conn, br *bufio.Reader) {
		for {
			req, err := readRequest(br)
			if err != nil {
				return
			}
			got <- req.Limit
			writeResponse(nc, &proto.Response{ID: req.ID, Code: proto.NotFound, Msg: "no such pack"})
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, tc := range []struct {
		name string
		call func() error
	}{
		{"ExportREP pack 2^32+1", func() error { _, _, err := c.ExportREP(ctx, "a/b", int(big)); return err }},
		{"AuditTail 2^32+5 records", func() error { _, err := c.AuditTail(ctx, "", 0, int(big)+4); return err }},
	} {
		tc.call()
		if n := <-got; n != math.MaxUint32 {
			t.Errorf("%s: the agent was asked for %d, want %d", tc.name, n, uint32(math.MaxUint32))
		}
	}
}

// A tls:// address is the CLI's (SIGIL_SOCK=tls://host:port with its
// --tls-* files); Dial speaks Unix sockets only. It used to dial
// "tls://host:port" as a path and fail with "no such file or directory",
// which named neither the cause nor DialTLS.
func TestDialRefusesATLSAddress(t *testing.T) {
	for _, tc := range []struct {
		name, addr, env string
	}{
		{"given", "tls://127.0.0.1:7443", ""},
		{"from SIGIL_SOCK", "", "tls://127.0.0.1:7443"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.env != "" {
				t.Setenv(proto.SocketEnv, tc.env)
			}
			_, err := client.Dial(context.Background(), tc.addr)
			if !errors.Is(err, client.ErrRefusedByClient) || client.Code(err) != proto.BadRequest {
				t.Fatalf("Dial = %v (code %v), want BAD_REQUEST, ErrRefusedByClient", err, client.Code(err))
			}
			for _, want := range []string{"tls://127.0.0.1:7443", "DialTLS"} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("Dial = %q, want it to name %q", err, want)
				}
			}
			if tc.env != "" && !strings.Contains(err.Error(), proto.SocketEnv) {
				t.Errorf("Dial = %q, want it to name %s", err, proto.SocketEnv)
			}
		})
	}
}
