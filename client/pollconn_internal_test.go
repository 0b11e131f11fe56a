//go:build linux

package client

import (
	"bufio"
	"errors"
	"io"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/sigil-agent/sigil/proto"
)

// pollPair is a pollConn on a Unix socket and the other end.
func pollPair(t *testing.T) (*pollConn, net.Conn) {
	t.Helper()
	uc, peer := dialPair(t, "unix")
	pc, err := newPollConn(uc, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	return pc, peer
}

// within fails the test unless fn returns within d (generous: a busy
// machine), and returns its error.
func within(t *testing.T, d time.Duration, what string, fn func() error) error {
	t.Helper()
	done := make(chan error, 1)
	go func() { done <- fn() }()
	select {
	case err := <-done:
		return err
	case <-time.After(d):
		t.Fatalf("%s: still blocked after %v", what, d)
		return nil
	}
}

func TestPollConnCarriesBytesBothWays(t *testing.T) {
	pc, peer := pollPair(t)
	if _, err := pc.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 16)
	n, err := io.ReadAtLeast(peer, buf, 7)
	if err != nil || string(buf[:n]) != "request" {
		t.Fatalf("peer read %q, %v", buf[:n], err)
	}
	// The reply comes while the read waits in poll(2).
	go func() {
		time.Sleep(20 * time.Millisecond)
		peer.Write([]byte("reply"))
	}()
	n, err = pc.Read(buf)
	if err != nil || string(buf[:n]) != "reply" {
		t.Fatalf("read %q, %v", buf[:n], err)
	}
	// A write larger than the socket's buffer waits for the peer to read.
	big := make([]byte, 8<<20)
	go io.Copy(io.Discard, peer)
	if n, err := pc.Write(big); err != nil || n != len(big) {
		t.Fatalf("wrote %d of %d bytes: %v", n, len(big), err)
	}
}

// The client cuts a waiting read by moving its deadline from another
// goroutine (a cancelled context); the wait must notice at once.
func TestPollConnDeadlines(t *testing.T) {
	for _, tc := range []struct {
		name string
		run  func(pc *pollConn) error
	}{
		{"read deadline runs out", func(pc *pollConn) error {
			pc.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			_, err := pc.Read(make([]byte, 8))
			return err
		}},
		{"read deadline moved into the past while waiting", func(pc *pollConn) error {
			pc.SetReadDeadline(time.Now().Add(time.Hour))
			time.AfterFunc(50*time.Millisecond, func() { pc.SetReadDeadline(time.Now()) })
			_, err := pc.Read(make([]byte, 8))
			return err
		}},
		{"read deadline set while waiting with none", func(pc *pollConn) error {
			time.AfterFunc(50*time.Millisecond, func() { pc.SetDeadline(time.Now().Add(10 * time.Millisecond)) })
			_, err := pc.Read(make([]byte, 8))
			return err
		}},
		{"read deadline already past", func(pc *pollConn) error {
			pc.SetReadDeadline(time.Unix(0, 0))
			_, err := pc.Read(make([]byte, 8))
			return err
		}},
		{"write deadline while the peer reads nothing", func(pc *pollConn) error {
			pc.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
			_, err := pc.Write(make([]byte, 32<<20))
			return err
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pc, peer := pollPair(t)
			err := within(t, 10*time.Second, tc.name, func() error { return tc.run(pc) })
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("got %v, want a deadline error", err)
			}
			var opErr *net.OpError
			if !errors.As(err, &opErr) || opErr.Net != "unix" {
				t.Fatalf("got %T %v, want a *net.OpError as the net package gives", err, err)
			}
			// The connection still works once the deadline is lifted.
			pc.SetDeadline(time.Time{})
			peer.Write([]byte("x"))
			err = within(t, 10*time.Second, "read after the deadline", func() error {
				_, err := pc.Read(make([]byte, 1))
				return err
			})
			if err != nil {
				t.Fatalf("read after the deadline: %v", err)
			}
		})
	}
}

func TestPollConnEnds(t *testing.T) {
	for _, tc := range []struct {
		name string
		run  func(t *testing.T, pc *pollConn, peer net.Conn) error
		want error
	}{
		{"peer closes during a read", func(t *testing.T, pc *pollConn, peer net.Conn) error {
			time.AfterFunc(50*time.Millisecond, func() { peer.Close() })
			_, err := pc.Read(make([]byte, 8))
			return err
		}, io.EOF},
		{"Close during a read", func(t *testing.T, pc *pollConn, peer net.Conn) error {
			time.AfterFunc(50*time.Millisecond, func() { pc.Close() })
			_, err := pc.Read(make([]byte, 8))
			return err
		}, net.ErrClosed},
		{"Close during a blocked write", func(t *testing.T, pc *pollConn, peer net.Conn) error {
			time.AfterFunc(50*time.Millisecond, func() { pc.Close() })
			_, err := pc.Write(make([]byte, 32<<20))
			return err
		}, net.ErrClosed},
		{"write to a closed peer", func(t *testing.T, pc *pollConn, peer net.Conn) error {
			peer.Close()
			_, err := pc.Write([]byte("x"))
			return err
		}, syscall.EPIPE},
		{"read after Close", func(t *testing.T, pc *pollConn, peer net.Conn) error {
			pc.Close()
			_, err := pc.Read(make([]byte, 8))
			return err
		}, net.ErrClosed},
		{"second Close", func(t *testing.T, pc *pollConn, peer net.Conn) error {
			pc.Close()
			return pc.Close()
		}, net.ErrClosed},
		{"deadline after Close", func(t *testing.T, pc *pollConn, peer net.Conn) error {
			pc.Close()
			return pc.SetReadDeadline(time.Now())
		}, net.ErrClosed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pc, peer := pollPair(t)
			err := within(t, 10*time.Second, tc.name, func() error { return tc.run(t, pc, peer) })
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
}

// openFDs counts this process's open descriptors.
func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd:", err)
	}
	return len(ents)
}

// Close releases the socket and both eventfds, also when it lands while
// a read is using them; the peer sees the connection end.
func TestPollConnCloseReleasesDescriptors(t *testing.T) {
	pc, peer := pollPair(t)
	before := openFDs(t)
	read := make(chan error, 1)
	go func() {
		_, err := pc.Read(make([]byte, 8))
		read <- err
	}()
	time.Sleep(20 * time.Millisecond)
	pc.Close()
	if err := <-read; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("read: %v", err)
	}
	if after := openFDs(t); after != before-3 {
		t.Fatalf("%d descriptors open after Close, want %d", after, before-3)
	}
	peer.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := peer.Read(make([]byte, 1)); err != io.EOF {
		t.Fatalf("peer read %v, want EOF", err)
	}
}

// A connection dropped without Close does not keep its descriptors.
func TestPollConnCollectedClosesDescriptors(t *testing.T) {
	uc, _ := dialPair(t, "unix")
	before := openFDs(t)
	func() {
		if _, err := newPollConn(uc, nil); err != nil {
			t.Fatal(err)
		}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for openFDs(t) > before-1 { // uc's descriptor is closed too
		if time.Now().After(deadline) {
			t.Fatalf("%d descriptors open, want %d", openFDs(t), before-1)
		}
		runtime.GC()
		time.Sleep(10 * time.Millisecond)
	}
}

// dialPair connects to a fresh listener on network ("unix", or "tcp" on
// loopback) and returns both ends; the listener and the server's end are
// closed with the test.
func dialPair(t *testing.T, network string) (client socketConn, server net.Conn) {
	t.Helper()
	addr := "127.0.0.1:0"
	if network == "unix" {
		addr = filepath.Join(t.TempDir(), "s")
	}
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	nc, err := net.Dial(network, ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	peer, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { peer.Close() })
	return nc.(socketConn), peer
}

// clientEnd is the client's end of dialPair.
func clientEnd(c socketConn, _ net.Conn) socketConn { return c }

// The budget hands out limit connections in poll mode (GOMAXPROCS-1: with
// one P, none); the rest use the netpoller. A closed connection, or one
// collected unclosed, gives its place back.
func TestPollBudget(t *testing.T) {
	isPoll := func(nc net.Conn) bool { _, ok := nc.(*pollConn); return ok }
	var none budget
	if nc := none.conn(clientEnd(dialPair(t, "unix")), 0); isPoll(nc) {
		t.Fatal("limit 0 gave a connection in poll mode")
	}
	var b budget
	first := b.conn(clientEnd(dialPair(t, "unix")), 1)
	second := b.conn(clientEnd(dialPair(t, "unix")), 1)
	if !isPoll(first) || isPoll(second) {
		t.Fatalf("limit 1: got %T and %T, want the first in poll mode only", first, second)
	}
	second.Close()
	first.Close()
	if n := b.inUse.Load(); n != 0 {
		t.Fatalf("%d places in use after Close, want 0", n)
	}
	func() { b.conn(clientEnd(dialPair(t, "unix")), 1) }() // dropped unclosed
	deadline := time.Now().Add(10 * time.Second)
	for b.inUse.Load() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("a connection collected unclosed kept its place")
		}
		runtime.GC()
		time.Sleep(10 * time.Millisecond)
	}
	if third := b.conn(clientEnd(dialPair(t, "unix")), 1); !isPoll(third) {
		t.Fatalf("after the place came back: got %T", third)
	} else {
		third.Close()
	}
}

// Under TLS the client polls the TCP connection, and its probe for the
// agent's close (conn.peerSpoke) peeks at the socket through SyscallConn.
func TestPollConnOverTCP(t *testing.T) {
	tc, peer := dialPair(t, "tcp")
	pc, err := newPollConn(tc, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()

	peer.Write([]byte("hello"))
	rc, err := pc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var peeked int
	err = within(t, 10*time.Second, "peek", func() error {
		return rc.Read(func(fd uintptr) bool {
			var b [8]byte
			n, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
			peeked = n
			return err != syscall.EAGAIN
		})
	})
	if err != nil || peeked != 5 {
		t.Fatalf("peeked %d bytes, %v; want the 5 waiting", peeked, err)
	}
	buf := make([]byte, 8)
	if n, err := pc.Read(buf); err != nil || string(buf[:n]) != "hello" {
		t.Fatalf("read %q, %v after the peek", buf[:n], err)
	}
	pc.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	_, err = pc.Read(buf)
	var opErr *net.OpError
	if !errors.As(err, &opErr) || opErr.Net != "tcp" || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("got %v, want a tcp *net.OpError for the deadline", err)
	}
}

// A deadline past the clock's range is none: context.WithTimeout(ctx,
// math.MaxInt64), a common "no timeout", wrapped round to a time long
// past, and every call failed at once.
func TestPollConnDeadlineBeyondTheClock(t *testing.T) {
	pc, peer := pollPair(t)
	pc.SetDeadline(time.Now().Add(math.MaxInt64))
	if _, err := pc.Write([]byte("x")); err != nil {
		t.Fatalf("write: %v", err)
	}
	time.AfterFunc(20*time.Millisecond, func() { peer.Write([]byte("y")) })
	err := within(t, 10*time.Second, "read", func() error {
		_, err := pc.Read(make([]byte, 1))
		return err
	})
	if err != nil {
		t.Fatalf("read: %v", err)
	}
}

// A reader that hands a reply to another caller (conn.deliver) and goes
// back to reading must let that caller run first. The caller is queued on
// the reader's P, which a thread in ppoll keeps, and with the other P busy
// it ran only when sysmon took the P back: 8 of 10 hand-offs 3-16 ms late
// (sysmon ticks slowly in a program otherwise idle). The replies come from
// another process, every 30 ms, so that no goroutine of this one needs a
// P to send them.
func TestHandedReplyRunsBeforeTheReaderWaits(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(2))
	uc, peer := dialPair(t, "unix")
	pc, err := newPollConn(uc, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	f, err := peer.(*net.UnixConn).File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	writer := exec.Command("sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 0.03; printf r; done >&3")
	writer.ExtraFiles = []*os.File{f}
	cn := &conn{nc: pc, br: bufio.NewReader(pc), pending: map[uint64]chan *proto.Response{}}
	replies := make(chan *proto.Response, 1)
	cn.pending[1] = replies
	var handedAt atomic.Int64
	go func() { // the reader: each byte is a reply for the caller below
		for {
			if _, err := cn.br.ReadByte(); err != nil {
				close(replies)
				return
			}
			handedAt.Store(time.Now().UnixNano())
			cn.deliver(&proto.Response{ID: 1})
		}
	}()
	var spin atomic.Bool
	spin.Store(true)
	defer spin.Store(false)
	go func() { // keeps the other P busy
		for spin.Load() {
		}
	}()
	if err := writer.Start(); err != nil {
		t.Skip("no sh:", err)
	}
	defer writer.Wait()
	var late []time.Duration
	for range 10 {
		if _, ok := <-replies; !ok {
			t.Fatal("the reader stopped")
		}
		if d := time.Since(time.Unix(0, handedAt.Load())); d > 2*time.Millisecond {
			late = append(late, d)
		}
		cn.mu.Lock()
		cn.pending[1] = replies // delivered replies leave pending
		cn.mu.Unlock()
	}
	if len(late) > 2 {
		t.Fatalf("%d of 10 hand-offs reached their caller late: %v", len(late), late)
	}
}
