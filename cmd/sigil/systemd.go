package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"syscall"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"github.com/sigil-agent/sigil/client"
	"github.com/sigil-agent/sigil/proto"
)

// systemdListeners are the sockets systemd passed us (socket activation,
// LISTEN_FDS/LISTEN_FDNAMES, see systemd/sigil.socket): "client" for the
// agent socket, "admin" for the admin socket and "tcp" for the mutual-TLS
// port. Any of them may be nil. Their socket files belong to systemd: the
// agent does not remove them on exit.
type systemdListeners struct {
	client, admin, tcp net.Listener
}

// inheritedListeners takes the sockets systemd passed, or returns nil when
// the agent was not socket-activated (LISTEN_PID names another process, as
// when a parent that was activated leaked the variables). The LISTEN_*
// variables are unset in any case, so that child processes do not take the
// sockets for theirs. A passed fd that is not a listening stream socket is
// refused here: it used to be skipped (a regular file), and the agent made
// its own socket instead of the unit's, or taken (a datagram or
// seqpacket socket, a connected one), and every accept failed once the
// agent had told systemd it was ready.
func inheritedListeners() (*systemdListeners, error) {
	files := activation.Files(true)
	var s systemdListeners
	taken := func() []net.Listener {
		return slices.DeleteFunc([]net.Listener{s.client, s.admin, s.tcp}, func(ln net.Listener) bool { return ln == nil })
	}
	fail := func(err error) (*systemdListeners, error) {
		for _, ln := range taken() {
			ln.Close()
		}
		return nil, fmt.Errorf("systemd socket activation: %w", err)
	}
	for _, f := range files {
		// net.FileListener dups the fd; the original is not needed.
		defer f.Close()
	}
	for _, f := range files {
		name := f.Name()
		var slot *net.Listener
		switch name {
		case "client":
			slot = &s.client
		case "admin":
			slot = &s.admin
		case "tcp":
			slot = &s.tcp
		default:
			return fail(fmt.Errorf("unknown socket name %q (want client, admin or tcp in FileDescriptorName=)", name))
		}
		if *slot != nil {
			return fail(fmt.Errorf("more than one socket named %q", name))
		}
		if err := isListeningStream(f); err != nil {
			return fail(fmt.Errorf("%q: %w (want ListenStream= and Accept=no)", name, err))
		}
		ln, err := net.FileListener(f)
		if err != nil {
			return fail(fmt.Errorf("%q: %w", name, err))
		}
		*slot = ln
		if network := ln.Addr().Network(); name != "tcp" && network != "unix" {
			// The agent identifies these sockets' peers by their kernel
			// credentials; a TCP socket has none.
			return fail(fmt.Errorf("%q must be a Unix socket (ListenStream=/path), not %s", name, network))
		}
	}
	if len(taken()) == 0 {
		return nil, nil
	}
	return &s, nil
}

// isListeningStream reports why f is not a listening SOCK_STREAM socket, or
// nil when it is.
func isListeningStream(f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var typ, listening int
	var sockErr error
	if err := rc.Control(func(fd uintptr) {
		if typ, sockErr = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_TYPE); sockErr == nil {
			listening, sockErr = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_ACCEPTCONN)
		}
	}); err != nil {
		return err
	}
	switch {
	case errors.Is(sockErr, syscall.ENOTSOCK):
		return errors.New("not a socket")
	case sockErr != nil:
		return sockErr
	case typ != syscall.SOCK_STREAM:
		return fmt.Errorf("not a stream socket (type %d)", typ)
	case listening == 0:
		return errors.New("not a listening socket")
	}
	return nil
}

// sdNotify sends state to systemd when NOTIFY_SOCKET is set (Type=notify);
// otherwise it does nothing.
func sdNotify(log *zap.Logger, state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		log.Warn("sd_notify", zap.String("state", state), zap.Error(err))
	}
}

// sdReloading tells systemd that a reload began (sd_notify(3)):
// RELOADING=1 with the monotonic clock's time, by which systemd 253+ matches
// it to the reload it asked for. READY=1 must follow once the reload is
// done. Seen before systemd sees ExecReload's kill exit (it reads notify
// messages before SIGCHLD), it keeps the unit reloading until READY=1, so
// that `systemctl reload` returns once the new policy is in force, not
// when the signal was sent.
func sdReloading(log *zap.Logger) {
	state := "RELOADING=1\nSTATUS=reloading"
	var now unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &now); err == nil {
		state += "\nMONOTONIC_USEC=" + strconv.FormatInt(now.Nano()/1000, 10)
	}
	sdNotify(log, state)
}

// runWatchdog sends WATCHDOG=1 every half WatchdogSec while the agent still
// answers a Ping on its own client socket (which goes through accept, the
// connection's reader and the dispatcher), so a wedged agent is restarted by
// systemd. It returns when ctx ends or the watchdog is not enabled.
func runWatchdog(ctx context.Context, log *zap.Logger, socket string) {
	interval, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		log.Warn("systemd watchdog", zap.Error(err))
		return
	}
	if interval <= 0 {
		return
	}
	tick := time.NewTicker(interval / 2)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if err := pingSelf(ctx, socket, interval/2); err != nil {
			log.Warn("watchdog: the agent does not answer on its own socket; not sending keep-alive", zap.Error(err))
			continue
		}
		sdNotify(log, daemon.SdNotifyWatchdog)
	}
}

// pingSelf reports whether the agent answers on its client socket. Any
// answer counts, a refusal included: at max_conns the agent refuses the
// watchdog's connection like any other (with UNAVAILABLE, "too many
// connections"), and systemd must not restart a busy agent for that.
func pingSelf(ctx context.Context, socket string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	c, err := client.Dial(ctx, socket)
	if err == nil {
		defer c.Close()
		err = c.Ping(ctx)
	}
	var answer *proto.Error
	if errors.As(err, &answer) {
		return nil // the agent's own reply, whatever it says
	}
	return err
}
