package client

import (
	"fmt"
	"net"
	"os"
	"syscall"

	"github.com/sigil-agent/sigil/proto"
)

// checkPeerUID refuses an agent on a Unix connection that runs as neither
// this user nor root (SO_PEERCRED).
func checkPeerUID(nc net.Conn) error {
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		return nil
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return fmt.Errorf("sigil: peer credentials: %w", err)
	}
	var cred *syscall.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil {
		return fmt.Errorf("sigil: peer credentials: %w", err)
	}
	if credErr != nil {
		return fmt.Errorf("sigil: peer credentials: %w", credErr)
	}
	if int(cred.Uid) != os.Getuid() && cred.Uid != 0 {
		return fmt.Errorf("%w: the agent there runs as uid %d, not you (%d); set %s or XDG_RUNTIME_DIR",
			proto.ErrUntrustedSocketDir, cred.Uid, os.Getuid(), proto.SocketEnv)
	}
	return nil
}
