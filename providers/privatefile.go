package providers

import (
	"fmt"
	"io"
	"io/fs"
	"os"
)

// ReadPrivateFile reads a file that holds a secret (a PIN, the agent's
// mTLS private key) after checking, when regularOnly, that it is a regular
// file (a PIN may come from a pipe), that its owner is the agent's user or root (an owner can read a file whatever its
// mode, or chmod it), and that none but its owner and group may read it
// and none but its owner write it: 0600 or 0640. The checks are made on
// the file opened, not on the path, so that a name swapped between a check
// and the read does not have the check judge another file; links are
// followed (a Kubernetes secret's file is one). It returns the file's
// permission bits too, for a caller that says when its group may read it.
// Errors name the file, never quote it.
func ReadPrivateFile(path string, regularOnly bool) ([]byte, fs.FileMode, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, 0, err
	}
	if regularOnly && !fi.Mode().IsRegular() {
		return nil, 0, fmt.Errorf("%s is not a regular file (%v)", path, fi.Mode().Type())
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
