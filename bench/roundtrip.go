package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The roundtrip scenario is the floor of every scenario that signs in
// another process: a bare request and reply of a sign request's size between
// this process and an echo process, over a Unix socket, with nothing done in
// between. Both ends wait as the PKCS#11 module does, in poll(2) for POLLIN
// and then one read, on a thread of their own outside Go's netpoller, so
// that a round trip costs what the kernel and the VM charge for two
// cross-process wake-ups and nothing of Go's or Sigil's. A signature through
// the agent or the front costs at least the token's signature (direct) plus
// this; Report.Goals uses the two to say how far each goal can go in a run
// (Goal.Reach).
const (
	ScenarioRoundTrip = "roundtrip"
	// KeyNone is the key column of a scenario that signs nothing.
	KeyNone = "none"
	// roundTripBytes is about a Sign request's size (kid, algorithm,
	// 32-byte digest, msgpack) and an ECDSA reply's.
	roundTripBytes = 100
)

// EchoCommand is the hidden subcommand of the sigil binary that runs
// ServeEcho, so that the echo runs in a process of its own.
const EchoCommand = "bench-echo"

// ServeEcho answers every read on every connection of the Unix listener at
// path with the same bytes, until the listener fails or ctx ends. Each
// connection has a locked OS thread of its own that waits in poll(2), as
// the roundtrip worker does.
func ServeEcho(ctx context.Context, path string) error {
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return fmt.Errorf("echo: %w", err)
	}
	context.AfterFunc(ctx, func() { ln.Close() })
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("echo: accept: %w", err)
		}
		fd, err := blockingFD(c)
		if err != nil {
			return fmt.Errorf("echo: %w", err)
		}
		go echoConn(fd)
	}
}

func echoConn(fd int) {
	runtime.LockOSThread()
	defer unix.Close(fd)
	buf := make([]byte, 4096)
	for {
		n, err := pollRead(fd, buf)
		if err != nil || n == 0 {
			return
		}
		if err := writeAll(fd, buf[:n]); err != nil {
			return
		}
	}
}

// blockingFD takes c out of Go's netpoller: a blocking duplicate of its
// descriptor, c itself closed.
func blockingFD(c *net.UnixConn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var dupErr error
	if err := rc.Control(func(s uintptr) { fd, dupErr = unix.Dup(int(s)) }); err != nil {
		return -1, err
	}
	if dupErr != nil {
		return -1, fmt.Errorf("dup: %w", dupErr)
	}
	c.Close()
	if err := unix.SetNonblock(fd, false); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("blocking: %w", err)
	}
	return fd, nil
}

// pollRead waits for POLLIN, then reads once. Sleeping in read(2) instead
// is woken for nothing by the write space the other end's read frees
// (docs/pkcs11-module.md, session 8).
func pollRead(fd int, buf []byte) (int, error) {
	fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		if _, err := unix.Poll(fds, -1); err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return 0, err
		}
		n, err := unix.Read(fd, buf)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		return n, err
	}
}

func writeAll(fd int, b []byte) error {
	for len(b) > 0 {
		n, err := unix.Write(fd, b)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return err
		}
		b = b[n:]
	}
	return nil
}

// startEcho runs the sigil binary's EchoCommand on a socket in the bench
// directory.
func (e *Env) startEcho(ctx context.Context, sigil string) (Variant, error) {
	sock := filepath.Join(e.Dir, "echo.sock")
	cmd := exec.Command(sigil, EchoCommand, sock)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	cmd.SysProcAttr = serverProcAttr()
	if err := cmd.Start(); err != nil {
		return Variant{}, fmt.Errorf("start echo: %w", err)
	}
	// A binary without the command exits at once: say so then, not after
	// waitForSocket's limit.
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	upCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	up := make(chan error, 1)
	go func() { up <- waitForSocket(upCtx, "unix", sock, 20*time.Second) }()
	select {
	case err := <-exited:
		return Variant{}, fmt.Errorf("echo (%s %s) exited: %v", sigil, EchoCommand, err)
	case err := <-up:
		if err != nil {
			cmd.Process.Kill()
			<-exited
			return Variant{}, fmt.Errorf("echo did not come up: %w", err)
		}
	}
	e.stops = append(e.stops, func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
	})
	return Variant{Socket: sock, PID: cmd.Process.Pid}, nil
}

// RoundTripScenario measures bare round trips to the echo at socket, one
// connection per worker.
func RoundTripScenario(socket string, cpu func() time.Duration) Scenario {
	return Scenario{
		Name: ScenarioRoundTrip, Key: KeyNone, CPU: cpu,
		NewWorker: func(ctx context.Context) (func(context.Context) error, func() error, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, "unix", socket)
			if err != nil {
				return nil, nil, err
			}
			fd, err := blockingFD(c.(*net.UnixConn))
			if err != nil {
				return nil, nil, err
			}
			req := make([]byte, roundTripBytes)
			reply := make([]byte, roundTripBytes)
			op := func(context.Context) error {
				// The worker's goroutine blocks in the syscalls, its
				// thread held as by a cgo call into the module.
				if err := writeAll(fd, req); err != nil {
					return fmt.Errorf("roundtrip: write: %w", err)
				}
				for got := 0; got < len(reply); {
					n, err := pollRead(fd, reply[got:])
					if err != nil {
						return fmt.Errorf("roundtrip: read: %w", err)
					}
					if n == 0 {
						return fmt.Errorf("roundtrip: echo closed: %w", syscall.ECONNRESET)
					}
					got += n
				}
				return nil
			}
			return op, func() error { return unix.Close(fd) }, nil
		},
	}
}
