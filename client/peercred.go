package client

import (
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/sigil-agent/sigil/proto"
)

// checkPeerUID refuses an agent on a Unix connection that runs as neither
// this user nor root (SO_PEERCRED). Where the kernel does not say
// (proto.UnixPeerCred is Linux's), the directory check alone stands.
func checkPeerUID(nc net.Conn) error {
	uc, ok := nc.(*net.UnixConn)
	if !ok {
		return nil
	}
	cred, err := proto.UnixPeerCred(uc)
	if errors.Is(err, errors.ErrUnsupported) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("sigil: peer credentials: %w", err)
	}
	if int(cred.UID) != os.Getuid() && cred.UID != 0 {
		return fmt.Errorf("%w: the agent there runs as uid %d, not you (%d); set %s or XDG_RUNTIME_DIR",
			proto.ErrUntrustedSocketDir, cred.UID, os.Getuid(), proto.SocketEnv)
	}
	return nil
}
