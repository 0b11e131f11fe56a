package agent

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// patientListener backs off and accepts again when an accept fails for a
// reason that passes (a timeout, a resource shortage), so that a listener
// never ends, and the agent with it, for want of a file descriptor.
type patientListener struct {
	net.Listener
	log *zap.Logger
}

func (l patientListener) Accept() (net.Conn, error) {
	var backoff time.Duration
	for {
		nc, err := l.Listener.Accept()
		var ne net.Error
		if err == nil || !(errors.As(err, &ne) && ne.Timeout() || isResourceShortage(err)) {
			return nc, err
		}
		// Keep serving the connections already open meanwhile.
		backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
		l.log.Warn("accept failed; backing off", zap.String("listener", l.Addr().String()), zap.Error(err), zap.Duration("backoff", backoff))
		time.Sleep(backoff)
	}
}

// isResourceShortage reports whether an accept failed for want of a
// resource the system may get back (file descriptors, the system's file
// table, socket buffers, memory): the listener backs off and goes on, as
// net/http does, instead of ending Serve and with it the agent.
func isResourceShortage(err error) bool {
	for _, errno := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOBUFS, syscall.ENOMEM} {
		if errors.Is(err, errno) {
			return true
		}
	}
	return false
}

// fileKind names what a non-socket file at a socket path is.
func fileKind(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "directory"
	case m.IsRegular():
		return "regular file"
	case m&fs.ModeSymlink != 0:
		return "symbolic link"
	}
	return "file of mode " + m.Type().String()
}

// ListenUnix creates the agent's Unix socket: its directory owned by us (an
// attacker's pre-made /tmp directory is refused, not used) and writable by
// nobody else (made 0700 when it does not exist; an existing one's mode is
// left as it is, e.g. systemd's 0750 for a group of clients), the socket
// 0600. A stale socket left by a killed agent is removed; a live agent on the
// same path is an error, as is any file there that is not a socket, or a
// socket whose dial fails otherwise than refused (a live agent with a full
// accept queue).
func ListenUnix(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("socket dir: %w", err)
	}
	stale, err := checkUnixSocket(path)
	if err != nil {
		return nil, err
	}
	if stale {
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("remove stale socket %s: %w", path, err)
		}
	}
	// No one else can reach the socket between bind and the chmod below:
	// its directory is ours and 0700 (checked above). A umask would close
	// that window too, but umask is the whole process's, and the agent's
	// other goroutines may be creating files meanwhile (an overdue
	// rotation's evidence directory would come out 0600, unenterable).
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("socket %s: %w", path, err)
	}
	return ln, nil
}

// CheckUnixSocket returns what ListenUnix would refuse path for now (a live
// agent there, a file that is not a socket, a directory others own or can
// write to), and makes and removes nothing. The agent calls it before it
// opens its providers and journal: a second agent on a running one's
// socket is refused before it makes keys and a journal that no agent
// would serve.
func CheckUnixSocket(path string) error {
	_, err := checkUnixSocket(path)
	return err
}

// checkUnixSocket is CheckUnixSocket, reporting too whether a stale socket
// (one no agent listens on) is at path. A directory that does not exist
// yet is no reason to refuse.
func checkUnixSocket(path string) (stale bool, err error) {
	dir := filepath.Dir(path)
	st, err := os.Lstat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("socket dir: %w", err)
	}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok && int(sys.Uid) != os.Getuid() {
		return false, fmt.Errorf("socket dir %s belongs to uid %d, not us (%d): refusing it", dir, sys.Uid, os.Getuid())
	}
	if st.Mode().Perm()&0o022 != 0 {
		// Another user could replace the socket, or plant one before it.
		// Its mode is not ours to change: for root, dir may be /tmp or /run.
		return false, fmt.Errorf("socket dir %s is writable by group or others (%v): give the socket a directory of its own, e.g. %s",
			dir, st.Mode().Perm(), filepath.Join(dir, "sigil"))
	}
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("socket %s: %w", path, err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		// A mistyped path (the config file, ~/.ssh/config) is not ours
		// to delete.
		return false, fmt.Errorf("socket %s: a %s is there, not a socket: refusing to replace it", path, fileKind(fi.Mode()))
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return false, fmt.Errorf("socket %s: another agent is listening there", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		// Only a refused connection shows that no one listens. A live
		// agent whose accept queue is full answers EAGAIN, and one that
		// is slow to accept times out: removing its socket would cut it
		// off from every client while it holds the keys and the journal.
		return false, fmt.Errorf("socket %s: cannot tell whether an agent listens there (%w); remove it by hand if none does", path, err)
	}
	return true, nil
}
