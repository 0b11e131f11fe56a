//go:build !linux

package proto

import (
	"errors"
	"net"
)

// PeerCred is what the kernel recorded of the process at the other end of a
// Unix socket (SO_PEERCRED, Linux's).
type PeerCred struct {
	UID, GID uint32
	PID      int32
}

// UnixPeerCred: SO_PEERCRED is Linux's.
func UnixPeerCred(*net.UnixConn) (PeerCred, error) { return PeerCred{}, errors.ErrUnsupported }
