package client_test

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

// Tests of the client facing a faulty or hostile agent: a fake agent on a
// Unix socket writes every byte the client reads.

// Close ends a redial in progress: a call redialling an agent that accepts
// and never answers the Hello, and a call queued behind that redial, both
// without a deadline, return ErrClosed. The redial's connection was not the
// client's yet, so Close did not close it, and both calls waited for good.
func TestCloseEndsARedialInProgress(t *testing.T) {
	for _, callers := range []int{1, 3} {
		t.Run(map[int]string{1: "the redialling call", 3: "calls queued behind it"}[callers], func(t *testing.T) {
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
			for range callers {
				select {
				case err := <-errs:
					if !errors.Is(err, client.ErrClosed) || client.Code(err) != proto.BadRequest {
						t.Errorf("Ping: %v (%s), want ErrClosed", err, client.Code(err))
					}
				case <-time.After(5 * time.Second):
					t.Fatal("a call still waits on the redial 5 s after Close")
				}
			}
		})
	}
}
