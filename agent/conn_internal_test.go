package agent

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/policy"
	"github.com/sigil-agent/sigil/proto"
)

// gatedConn holds every Write until release is closed, and Close until
// closeGate is: the moments between a drop and the socket's close.
type gatedConn struct {
	net.Conn
	writes    chan int // the length of each write, as it starts
	release   chan struct{}
	closeGate chan struct{}
}

func (g *gatedConn) Write(p []byte) (int, error) {
	g.writes <- len(p)
	<-g.release
	return len(p), nil
}

func (g *gatedConn) Close() error {
	<-g.closeGate
	return g.Conn.Close()
}

// Replies dropped for a client that does not read (past maxPendingReplies)
// are not written afterwards by the goroutine whose blocked write was
// under way: their fences ended with the drop, so a signature among them
// would leave after a Pause's ack.
func TestDroppedRepliesAreNotWrittenLater(t *testing.T) {
	a, err := New(context.Background(), Config{DataDir: t.TempDir(), Journal: JournalConfig{Mode: "off"}}, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Shutdown(context.Background()) })
	srv, cli := net.Pipe()
	t.Cleanup(func() { cli.Close() })
	g := &gatedConn{Conn: srv, writes: make(chan int, 16), release: make(chan struct{}), closeGate: make(chan struct{})}
	c := newConn(a, g, false)

	flushed := make(chan struct{})
	go func() { c.send(&proto.Response{ID: 1}, policy.Decision{}); close(flushed) }()
	<-g.writes // the first reply's write is under way, and blocked
	c.send(&proto.Response{ID: 2, Sig: make([]byte, 64)}, policy.Decision{})
	big := strings.Repeat("x", 60000)
	go func() {
		for id := uint64(3); ; id++ {
			c.send(&proto.Response{ID: id, Msg: big}, policy.Decision{}) // the one past the bound drops, and waits in Close
			c.w.mu.Lock()
			broken := c.w.broken
			c.w.mu.Unlock()
			if broken {
				return
			}
		}
	}()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		c.w.mu.Lock()
		broken := c.w.broken
		c.w.mu.Unlock()
		if broken {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the replies never passed maxPendingReplies")
		}
	}
	close(g.release)
	<-flushed
	close(g.closeGate)
	if n := len(g.writes); n != 0 {
		t.Fatalf("%d writes after the drop: the dropped replies went out", n)
	}
}

// deadlineConn counts the write deadlines set on it.
type deadlineConn struct {
	net.Conn
	writeDeadlines int
}

func (d *deadlineConn) SetWriteDeadline(t time.Time) error { d.writeDeadlines++; return nil }
func (d *deadlineConn) Write(p []byte) (int, error)        { return len(p), nil }
func (d *deadlineConn) Read(p []byte) (int, error)         { return 0, nil }

// The ssh-agent server writes a reply in two calls, its length and its
// body: one write_timeout covers both. A deadline set at each call gave a
// reply twice the time, and a Pause waiting for it acked first.
func TestSSHReplyHasOneWriteDeadline(t *testing.T) {
	d := &deadlineConn{}
	s := &sshConn{Conn: d, writeTimeout: time.Second}
	for reply := 1; reply <= 2; reply++ {
		s.Read(make([]byte, 4))
		s.Write([]byte{0, 0, 0, 5})
		s.Write([]byte("reply"))
		if d.writeDeadlines != reply {
			t.Fatalf("after reply %d: %d write deadlines set, want one per reply", reply, d.writeDeadlines)
		}
	}
}

// idle_timeout counts from the end of a connection's last request on a
// worker by the monotonic clock. It was kept as wall-clock time: a clock
// stepped back an hour held an idle connection an hour longer, and one
// stepped forward closed a connection whose request had just ended.
func TestIdleTimeIsMeasuredOnTheMonotonicClock(t *testing.T) {
	if !strings.Contains(monoEpoch.String(), " m=") {
		t.Fatalf("monoEpoch has no monotonic reading: %s", monoEpoch)
	}
	const timeout = 10 * time.Second
	for _, tc := range []struct {
		name       string
		done, now  time.Duration // by monoNow; done 0: no request ended yet
		wantIdle   bool
		wantLeftAt time.Duration
	}{
		{"no request ended on a worker", 0, time.Second, true, 0},
		{"ended just now", 5 * time.Second, 5 * time.Second, false, timeout},
		{"ended 2s ago", 5 * time.Second, 7 * time.Second, false, 8 * time.Second},
		{"ended timeout ago", 5 * time.Second, 15 * time.Second, true, 0},
		{"ended long ago", 5 * time.Second, time.Hour, true, 0},
	} {
		c := &conn{}
		if tc.done != 0 {
			c.markDone(tc.done)
		}
		left := c.idleLeft(timeout, tc.now)
		if idle := left <= 0; idle != tc.wantIdle || (!idle && left != tc.wantLeftAt) {
			t.Errorf("%s: idleLeft = %v, want idle %v (left %v)", tc.name, left, tc.wantIdle, tc.wantLeftAt)
		}
	}
	// Between two real readings only the monotonic clock counts: a wall
	// clock stepped between them (the journal's Clock tests do the same
	// with an injected clock) cannot show here, and the reading of a
	// request that just ended leaves the whole timeout.
	c := &conn{}
	c.markDone(monoNow())
	if left := c.idleLeft(timeout, monoNow()); left <= timeout-time.Second || left > timeout {
		t.Fatalf("just after a request ended: idleLeft = %v, want about %v", left, timeout)
	}
}
