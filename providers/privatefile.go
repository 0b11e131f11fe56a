package providers

import (
	"fmt"
	"io"
	"io/fs"
	"os"
)

// ReadPrivateFile reads a file that holds a secret (a PIN, the agent's
// mTLS private key) after checking that it is a regular file, that its
// owner is the agent's user or root (an owner can read a file whatever its
// mode, or chmod it), and that none but its owner and group may read it
// and none but its owner write it: 0600 or 0640. The checks are made on
// the file opened, not on the path, so that a name swapped between a check
// and the read does not have the check judge another file; links are
// followed (a Kubernetes secret's file is one). It returns the file's
// permission bits too, for a caller that says when its group may read it.
// Errors name the file, never quote it.
func ReadPrivateFile(path string) ([]byte, fs.FileMode, error) {
	// Refused before the open when the path already shows it: opening a
	// device runs its driver, and opening a FIFO to read waits for a
	// writer, which would hold the agent's start for good.
	fi, err := os.Stat(path)
	if err != nil {
		return nil, 0, err
	}
	if !fi.Mode().IsRegular() {
		return nil, 0, notRegular(path, fi)
	}
	// Non-blocking, for a FIFO put in the file's place since the Stat: the
	// open returns at once and the check below refuses it.
	f, err := os.OpenFile(path, os.O_RDONLY|openNoBlock, 0)
	if err != nil {
		return nil, 0, err
	}
	defer f.Close()
	if fi, err = f.Stat(); err != nil {
		return nil, 0, err
	}
	if !fi.Mode().IsRegular() {
		return nil, 0, notRegular(path, fi)
	}
	if uid, ok := FileOwner(fi); ok && uid != os.Geteuid() && uid != 0 {
		return nil, 0, fmt.Errorf("%s belongs to uid %d, neither the agent's (%d) nor root: its owner can read it", path, uid, os.Geteuid())
	}
	perm := fi.Mode().Perm()
	if perm&0o007 != 0 || perm&0o020 != 0 {
		// Group read stays allowed: root's 0640 file for group sigil is
		// the layout the shipped unit suggests.
		return nil, 0, fmt.Errorf("%s has mode %v: others may read or group may write it; want 0600 or 0640", path, perm)
	}
	b, err := io.ReadAll(f)
	return b, perm, err
}

func notRegular(path string, fi fs.FileInfo) error {
	return fmt.Errorf("%s is not a regular file (%v): a secret is read only from a regular file, never a pipe, device or directory", path, fi.Mode().Type())
}
