package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/coreos/go-systemd/v22/daemon"
	"go.uber.org/zap"

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
// the agent was not socket-activated. The LISTEN_* variables are unset so
// that child processes do not take the sockets for theirs.
func inheritedListeners() (*systemdListeners, error) {
	if os.Getenv("LISTEN_FDS") == "" {
		return nil, nil
	}
	byName, err := activation.ListenersWithNames()
	if err != nil {
		return nil, fmt.Errorf("systemd socket activation: %w", err)
	}
	var s systemdListeners
	for name, lns := range byName {
		for i, ln := range lns {
			if ln == nil {
				return nil, fmt.Errorf("systemd socket activation: %q is not a stream socket", name)
			}
			var slot *net.Listener
			switch name {
			case "client":
				slot = &s.client
			case "admin":
				slot = &s.admin
			case "tcp":
				slot = &s.tcp
			default:
				return nil, fmt.Errorf("systemd socket activation: unknown socket name %q (want client, admin or tcp in FileDescriptorName=)", name)
			}
			if i > 0 || *slot != nil {
				return nil, fmt.Errorf("systemd socket activation: more than one socket named %q", name)
			}
			if _, unix := ln.(*net.UnixListener); name != "tcp" && !unix {
				// The agent identifies these sockets' peers by their kernel
				// credentials; a TCP socket has none.
				return nil, fmt.Errorf("systemd socket activation: %q must be a Unix socket (ListenStream=/path), not %s", name, ln.Addr().Network())
			}
			*slot = ln
		}
	}
	if s.client == nil && s.admin == nil && s.tcp == nil {
		return nil, nil
	}
	return &s, nil
}

// sdNotify sends state to systemd when NOTIFY_SOCKET is set (Type=notify);
// otherwise it does nothing.
func sdNotify(log *zap.Logger, state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		log.Warn("sd_notify", zap.String("state", state), zap.Error(err))
	}
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
