package proto

import (
	"net"
	"syscall"
)

// PeerCred is what the kernel recorded of the process at the other end of a
// Unix socket when it connected or listened (SO_PEERCRED).
type PeerCred struct {
	UID, GID uint32
	PID      int32
}

// UnixPeerCred reads SO_PEERCRED of uc: the agent uses it to tell who a
// client is, and a client to tell who runs the agent it reached.
func UnixPeerCred(uc *net.UnixConn) (PeerCred, error) {
	raw, err := uc.SyscallConn()
	if err != nil {
		return PeerCred{}, err
	}
	var cred *syscall.Ucred
	cerr := raw.Control(func(fd uintptr) {
		cred, err = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	})
	if cerr != nil {
		return PeerCred{}, cerr
	}
	if err != nil {
		return PeerCred{}, err
	}
	return PeerCred{UID: cred.Uid, GID: cred.Gid, PID: cred.Pid}, nil
}
