//go:build linux

package client

import (
	"io"
	"math"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// pollConn is a connection to the agent's Unix socket that a call reads and
// writes with poll(2) on its own thread, outside Go's netpoller.
//
// Why: the netpoller registers every socket for writability as well as
// readability, so when the agent reads a request, the space it frees in this
// socket wakes the netpoller's thread for nothing; and the reply, when it
// comes, wakes that thread, which then has to wake the caller's goroutine.
// A thread waiting in poll(2) for POLLIN is woken by the reply alone, and
// runs the caller on. On the 2-vCPU test machines that took about 40 µs off
// a signature's round trip (docs/performance.md, "The Go client's wait").
//
// The price is a thread: a call waiting for its reply holds one, as a cgo
// call does, and its P until the runtime hands the P on. Only one call per
// connection reads at a time (the others wait for it on channels), so that
// is one thread per connection with calls in flight, and a second while a
// write waits for room in the socket (an agent that has stopped reading).
// A goroutine readied by the waiting one is queued on the P the wait
// keeps, and runs when another P takes it or the runtime takes the P back
// (up to a sysmon tick or two, 20 ms): conn.deliver yields after handing
// a reply to another caller for that reason. Not before every wait:
// runtime.Gosched wakes a thread to look for work, the very wake-up the
// wait saves, and two runs that yielded so measured 30-40 µs slower at
// one connection (within what runs of one code spread here, but no gain
// could come of it).
//
// At most one Read and one Write may run at a time (conn's readerRole and
// writeToken see to that); deadline changes and Close may come from any
// goroutine and wake a wait in progress.
type pollConn struct {
	fd            int
	fds           *fdSet    // fd and the two eventfds, closed once
	born          time.Time // the zero of the deadlines' clock
	local, remote net.Addr
	readDeadline  deadline
	writeDeadline deadline
	closing       atomic.Bool
	mu            sync.Mutex // guards users and, with closing, its setting
	users         int        // calls using the descriptors now
	closeOnce     sync.Once
}

// deadline is one direction's deadline and the eventfd that wakes a wait
// when it moves.
type deadline struct {
	// at is when the deadline falls, in nanoseconds on the connection's
	// monotonic clock (pollConn.elapsed), as the net package keeps its
	// own: a step of the wall clock moves no deadline. 0: none.
	at      atomic.Int64
	waiting atomic.Bool // a wait is in poll(2) (or about to be)
	wake    int         // eventfd
}

// socketConn is a connected stream socket of the net package: a
// *net.UnixConn or a *net.TCPConn.
type socketConn interface {
	net.Conn
	syscall.Conn
}

// pollingConn is how a call reaches the agent over sc (the Unix socket, or
// the TCP connection under TLS): through a pollConn while the process has
// one to spare (pollBudget), else through sc itself.
func pollingConn(sc socketConn) net.Conn {
	return pollBudget.conn(sc, runtime.GOMAXPROCS(0)-1)
}

// pollBudget is the one piece of process-wide state in this package, for a
// process-wide thing: the runtime's Ps. A connection in poll mode holds a
// thread, and its P until the runtime takes the P back, whenever a call on
// it waits for a reply; GOMAXPROCS-1 of them leave at least one P for the
// rest of the program (none with GOMAXPROCS 1, where the wait would hold
// up every other goroutine). More of them measured worse: 8 connections
// each waiting in poll(2), with 2 Ps, used 15% more CPU per signature than
// the netpoller, the threads taking the Ps from one another. The count is
// taken at dial: a GOMAXPROCS lowered later leaves the connections that
// are in poll mode so until they close.
var pollBudget budget

// budget counts the connections in poll mode.
type budget struct{ inUse atomic.Int32 }

func (b *budget) conn(sc socketConn, limit int) net.Conn {
	for {
		n := b.inUse.Load()
		if int(n) >= limit {
			return sc
		}
		if b.inUse.CompareAndSwap(n, n+1) {
			break
		}
	}
	pc, err := newPollConn(sc, func() { b.inUse.Add(-1) })
	if err != nil {
		b.inUse.Add(-1)
		return sc // the netpoller's way still works
	}
	return pc
}

// newPollConn takes sc's socket out of the netpoller: it keeps a duplicate
// of the descriptor and closes sc. On failure sc is left as it was.
// released runs once the descriptors are closed.
func newPollConn(sc socketConn, released func()) (*pollConn, error) {
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	fd := -1
	var dupErr error
	if err := rc.Control(func(s uintptr) {
		fd, dupErr = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return nil, err
	}
	if dupErr != nil {
		return nil, os.NewSyscallError("fcntl", dupErr)
	}
	c := &pollConn{fd: fd, local: sc.LocalAddr(), remote: sc.RemoteAddr(), born: time.Now()}
	c.fds = &fdSet{fds: [3]int{fd, -1, -1}, released: released}
	for i, d := range []*deadline{&c.readDeadline, &c.writeDeadline} {
		if d.wake, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK); err != nil {
			c.fds.released = nil // the caller's to undo, with sc
			c.fds.close()
			return nil, os.NewSyscallError("eventfd", err)
		}
		c.fds.fds[1+i] = d.wake
	}
	// A client dropped without Close: its socket is closed when the
	// connection is collected, as the net package's would be.
	runtime.AddCleanup(c, (*fdSet).close, c.fds)
	// The duplicate shares sc's open file, non-blocking as the net package
	// left it (TCP_NODELAY and keep-alive too); closing sc takes the socket
	// out of the netpoller's epoll set.
	sc.Close()
	return c, nil
}

func (c *pollConn) Read(p []byte) (int, error) {
	if !c.enter() {
		return 0, c.opError("read", net.ErrClosed)
	}
	defer c.leave()
	if c.readDeadline.passed(c.elapsed()) {
		return 0, c.opError("read", os.ErrDeadlineExceeded)
	}
	for {
		// syscall's Read and Write, not unix's: the race detector orders
		// them with the peer's (they share one synchronisation point), as
		// it does the net package's.
		n, err := syscall.Read(c.fd, p)
		switch {
		case err == nil && n == 0 && len(p) > 0:
			return 0, io.EOF
		case err == nil:
			return n, nil
		case err == unix.EINTR:
			continue
		case err != unix.EAGAIN:
			return 0, c.opError("read", os.NewSyscallError("read", err))
		}
		if err := c.wait(unix.POLLIN, &c.readDeadline); err != nil {
			return 0, c.opError("read", err)
		}
	}
}

func (c *pollConn) Write(p []byte) (int, error) {
	if !c.enter() {
		return 0, c.opError("write", net.ErrClosed)
	}
	defer c.leave()
	if c.writeDeadline.passed(c.elapsed()) {
		return 0, c.opError("write", os.ErrDeadlineExceeded)
	}
	done := 0
	for done < len(p) {
		// A peer that has gone fails the write with EPIPE: the runtime
		// ignores SIGPIPE for descriptors other than 1 and 2, as for the
		// net package's writes.
		n, err := syscall.Write(c.fd, p[done:])
		switch {
		case err == nil:
			done += n
			continue
		case err == unix.EINTR:
			continue
		case err != unix.EAGAIN:
			return done, c.opError("write", os.NewSyscallError("write", err))
		}
		if err := c.wait(unix.POLLOUT, &c.writeDeadline); err != nil {
			return done, c.opError("write", err)
		}
	}
	return done, nil
}

// wait blocks until fd is ready for events (or has hung up, or failed:
// the read or write that follows says which), the deadline passes, or the
// connection is closed.
func (c *pollConn) wait(events int16, d *deadline) error {
	d.waiting.Store(true)
	defer d.waiting.Store(false)
	for {
		if c.closing.Load() {
			return net.ErrClosed
		}
		// Read after waiting is set: a deadline set from now on wakes us.
		var ts *unix.Timespec
		if at := d.at.Load(); at != 0 {
			left := time.Duration(at - c.elapsed())
			if left <= 0 {
				return os.ErrDeadlineExceeded
			}
			t := unix.NsecToTimespec(left.Nanoseconds())
			ts = &t
		}
		fds := [2]unix.PollFd{{Fd: int32(c.fd), Events: events}, {Fd: int32(d.wake), Events: unix.POLLIN}}
		_, err := unix.Ppoll(fds[:], ts, nil)
		if err != nil && err != unix.EINTR {
			return os.NewSyscallError("ppoll", err)
		}
		if fds[1].Revents != 0 {
			var buf [8]byte
			unix.Read(d.wake, buf[:]) // the deadline moved, or Close: look again
			continue
		}
		if c.closing.Load() {
			return net.ErrClosed // not the EOF that the shutdown made
		}
		if fds[0].Revents != 0 {
			return nil
		}
	}
}

func (c *pollConn) SetDeadline(t time.Time) error {
	c.SetReadDeadline(t)
	return c.SetWriteDeadline(t)
}

func (c *pollConn) SetReadDeadline(t time.Time) error  { return c.setDeadline(&c.readDeadline, t) }
func (c *pollConn) SetWriteDeadline(t time.Time) error { return c.setDeadline(&c.writeDeadline, t) }

func (c *pollConn) setDeadline(d *deadline, t time.Time) error {
	if !c.enter() { // the eventfd stays open while we may write to it
		return c.opError("set deadline", net.ErrClosed)
	}
	defer c.leave()
	d.at.Store(c.deadlineAt(t))
	if d.waiting.Load() {
		wakeUp(d.wake)
	}
	return nil
}

// Close shuts the socket down at once, which wakes any wait on it, and
// closes the descriptors once the last Read or Write has left them: closed
// earlier, the number could be reused by another open under a call still
// using it.
func (c *pollConn) Close() error {
	first := false
	c.closeOnce.Do(func() {
		first = true
		c.mu.Lock()
		c.closing.Store(true)
		c.users++ // Close uses the descriptors too, until leave
		c.mu.Unlock()
		unix.Shutdown(c.fd, unix.SHUT_RDWR)
		wakeUp(c.readDeadline.wake)
		wakeUp(c.writeDeadline.wake)
		c.leave()
	})
	if !first {
		return c.opError("close", net.ErrClosed)
	}
	return nil
}

// fdSet is a connection's descriptors, closed once: by the last call to
// leave a closed connection, or by the cleanup of one never closed.
type fdSet struct {
	once     sync.Once
	fds      [3]int
	released func() // nil: nothing to tell
}

func (s *fdSet) close() {
	s.once.Do(func() {
		for _, fd := range s.fds {
			if fd >= 0 {
				unix.Close(fd)
			}
		}
		if s.released != nil {
			s.released()
		}
	})
}

// enter registers a call that uses the descriptors; false once the
// connection is closing.
func (c *pollConn) enter() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closing.Load() {
		return false
	}
	c.users++
	return true
}

// leave ends what enter began; the last call to leave a closing connection
// closes the descriptors.
func (c *pollConn) leave() {
	c.mu.Lock()
	c.users--
	last := c.closing.Load() && c.users == 0
	c.mu.Unlock()
	if last {
		c.fds.close()
	}
}

// passed reports whether the deadline is set and has passed.
func (d *deadline) passed(now int64) bool {
	at := d.at.Load()
	return at != 0 && now >= at
}

// elapsed is the connection's monotonic clock: nanoseconds since born.
func (c *pollConn) elapsed() int64 { return int64(time.Since(c.born)) }

// deadlineAt is t on the connection's clock, for deadline.at: from t's
// monotonic reading when it has one (a context's deadline does), as the
// net package does. A deadline past the clock's range (a context.
// WithTimeout of math.MaxInt64, a common "no timeout") is none; one
// already past is 1, before any reading of the clock after born.
func (c *pollConn) deadlineAt(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	now := c.elapsed()
	left := time.Until(t) // saturates instead of wrapping
	switch {
	case left <= 0:
		return 1
	case int64(left) > math.MaxInt64-now:
		return 0
	}
	return now + int64(left)
}

func (c *pollConn) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: c.local.Network(), Source: c.local, Addr: c.remote, Err: err}
}

// SyscallConn gives the socket to a caller that looks at it directly (the
// TLS connection's probe for the agent's close, conn.peerSpoke).
func (c *pollConn) SyscallConn() (syscall.RawConn, error) { return rawPollConn{c}, nil }

// rawPollConn is a pollConn's syscall.RawConn.
type rawPollConn struct{ c *pollConn }

func (r rawPollConn) Control(f func(fd uintptr)) error {
	if !r.c.enter() {
		return r.c.opError("control", net.ErrClosed)
	}
	defer r.c.leave()
	f(uintptr(r.c.fd))
	return nil
}

func (r rawPollConn) Read(f func(fd uintptr) bool) error {
	return r.do("read", unix.POLLIN, &r.c.readDeadline, f)
}

func (r rawPollConn) Write(f func(fd uintptr) bool) error {
	return r.do("write", unix.POLLOUT, &r.c.writeDeadline, f)
}

// do calls f until it reports done, waiting for events between calls, as
// the net package's RawConn does.
func (r rawPollConn) do(op string, events int16, d *deadline, f func(fd uintptr) bool) error {
	c := r.c
	if !c.enter() {
		return c.opError(op, net.ErrClosed)
	}
	defer c.leave()
	for !f(uintptr(c.fd)) {
		if err := c.wait(events, d); err != nil {
			return c.opError(op, err)
		}
	}
	return nil
}

func (c *pollConn) LocalAddr() net.Addr  { return c.local }
func (c *pollConn) RemoteAddr() net.Addr { return c.remote }

// wakeUp adds one to an eventfd. A full counter (2^64-2) cannot happen:
// every wait drains it.
func wakeUp(fd int) {
	var one = [8]byte{1}
	unix.Write(fd, one[:])
}
