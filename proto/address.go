package proto

import (
	"errors"
	"fmt"
	"io/fs"
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

// ErrUntrustedSocketDir is what CheckDefaultSocketDir's refusals wrap.
var ErrUntrustedSocketDir = errors.New("sigil: refusing to trust an agent in the default socket dir")

// CheckDefaultSocketDir refuses to let a client trust a socket in the
// default socket directory unless that directory is a directory (not a
// link) owned by this user or root and writable by nobody else. Under /tmp
// another local user could otherwise create sigil-$UID first and run an
// agent of theirs there, which would then see this user's digests and hand
// back its own keys and signatures. A path elsewhere is the user's choice
// (SIGIL_SOCK, --socket), as SSH_AUTH_SOCK is for ssh; a directory that
// does not exist is no agent, which the dial reports.
func CheckDefaultSocketDir(path string) error {
	dir := filepath.Dir(path)
	if !InDefaultSocketDir(path) {
		return nil
	}
	st, err := os.Lstat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("sigil: socket dir: %w", err)
	}
	if !st.IsDir() {
		return fmt.Errorf("%w: %s is not a directory (a %s); set %s or XDG_RUNTIME_DIR",
			ErrUntrustedSocketDir, dir, st.Mode().Type(), SocketEnv)
	}
	if uid, ok := fileOwner(st); ok && uid != os.Getuid() && uid != 0 {
		return fmt.Errorf("%w: %s belongs to uid %d, not you (%d); set %s or XDG_RUNTIME_DIR",
			ErrUntrustedSocketDir, dir, uid, os.Getuid(), SocketEnv)
	}
	if st.Mode().Perm()&0o022 != 0 {
		return fmt.Errorf("%w: %s is writable by group or others (%v); set %s or XDG_RUNTIME_DIR",
			ErrUntrustedSocketDir, dir, st.Mode().Perm(), SocketEnv)
	}
	return nil
}

// InDefaultSocketDir reports whether path lies in the default socket
// directory, where a client checks whom it talks to.
func InDefaultSocketDir(path string) bool {
	return filepath.Dir(path) == filepath.Dir(DefaultSocketPath())
}
