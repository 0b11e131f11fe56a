package proto

import (
	"os"
	"path/filepath"
	"strconv"
)

// SocketEnv names the environment variable that points clients at an agent,
// the way SSH_AUTH_SOCK points at ssh-agent.
const SocketEnv = "SIGIL_SOCK"

// DefaultSocketPath is where an agent listens and a client looks when neither
// is told otherwise: $XDG_RUNTIME_DIR/sigil/agent.sock (a per-user tmpfs that
// systemd creates 0700), else /tmp/sigil-$UID/agent.sock.
func DefaultSocketPath() string {
	if dir := os.Getenv("XDG_RUNTIME_DIR"); dir != "" {
		return filepath.Join(dir, "sigil", "agent.sock")
	}
	return filepath.Join(os.TempDir(), "sigil-"+strconv.Itoa(os.Getuid()), "agent.sock")
}

// ClientSocketPath is the address a client uses: $SIGIL_SOCK when set, else
// DefaultSocketPath.
func ClientSocketPath() string {
	if p := os.Getenv(SocketEnv); p != "" {
		return p
	}
	return DefaultSocketPath()
}
