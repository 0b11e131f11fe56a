package providers

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
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
	// A PIN or a private key is a few KiB at most: a path pointed at a
	// large file by mistake is refused, not read into memory whole.
	b, err := io.ReadAll(io.LimitReader(f, maxPrivateFile+1))
	if err == nil && len(b) > maxPrivateFile {
		return nil, 0, fmt.Errorf("%s is larger than %d KiB: not a PIN or a private key", path, maxPrivateFile>>10)
	}
	return b, perm, err
}

// maxPrivateFile bounds what ReadPrivateFile reads.
const maxPrivateFile = 1 << 20

func notRegular(path string, fi fs.FileInfo) error {
	return fmt.Errorf("%s is not a regular file (%v): a secret is read only from a regular file, never a pipe, device or directory", path, fi.Mode().Type())
}

// maxLinks bounds the links TrustedPath follows, as the kernel's
// MAXSYMLINKS (40) bounds a path lookup's.
const maxLinks = 40

// TrustedPath checks that no user but the agent's and root can change
// what path names: each directory the lookup of path passes through, as
// written and as its links lead, and each entry on the way (a directory, a
// link, the file) must belong to the agent's user or root, and no
// directory may be written by its group or others unless it has the
// sticky bit (as /tmp), which keeps them from renaming or removing
// entries not theirs. OpenSSH's StrictModes holds authorized_keys to the
// same rule. It returns the file's own information (links followed) for
// the caller's rule on the file itself. A path the agent uses by name
// after this check (a library to load) then leads where it did, unless
// root or the agent's user changed it. A name missing from a directory
// only they may write is fs.ErrNotExist. Errors name the entry at fault,
// not path: the caller does.
func TrustedPath(path string) (fs.FileInfo, error) {
	if !filepath.IsAbs(path) {
		return nil, errors.New("not an absolute path")
	}
	root, err := os.Lstat("/")
	if err != nil {
		return nil, err
	}
	if err := trustedEntry("/", root); err != nil {
		return nil, err
	}
	// cur never holds a link: each is replaced by its target as met, so
	// cur's parent is the kernel's "..", and curInfo is what cur names.
	cur, curInfo := "/", root
	pending, links := strings.Split(path, "/"), 0
	for len(pending) > 0 {
		name := pending[0]
		pending = pending[1:]
		switch name {
		case "", ".":
			continue
		case "..":
			cur = filepath.Dir(cur)
			if curInfo, err = os.Lstat(cur); err != nil {
				return nil, err
			}
			continue
		}
		next := filepath.Join(cur, name)
		fi, err := os.Lstat(next)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) && curInfo.Mode().Perm()&0o022 != 0 {
				// A sticky directory: another user may make the name
				// between this check and the caller's use of it.
				return nil, fmt.Errorf("%s does not exist, and others may make it in directory %s (%v)", next, cur, curInfo.Mode())
			}
			return nil, err
		}
		if err := trustedEntry(next, fi); err != nil {
			return nil, err
		}
		if fi.Mode()&fs.ModeSymlink != 0 {
			if links++; links > maxLinks {
				return nil, fmt.Errorf("more than %d links", maxLinks)
			}
			target, err := os.Readlink(next)
			if err != nil {
				return nil, err
			}
			if filepath.IsAbs(target) {
				cur, curInfo = "/", root
			}
			pending = append(strings.Split(target, "/"), pending...)
			continue
		}
		cur, curInfo = next, fi
	}
	return curInfo, nil
}

// trustedEntry is TrustedPath's rule for one entry, name, on the way.
func trustedEntry(name string, fi fs.FileInfo) error {
	if uid, ok := FileOwner(fi); ok && uid != os.Geteuid() && uid != 0 {
		return fmt.Errorf("%s belongs to uid %d: the file and each directory and link on its path must belong to the agent's user (%d) or root", name, uid, os.Geteuid())
	}
	if fi.IsDir() && fi.Mode().Perm()&0o022 != 0 && fi.Mode()&fs.ModeSticky == 0 {
		return fmt.Errorf("directory %s may be written by its group or others (%v), without the sticky bit: they could replace what is in it", name, fi.Mode())
	}
	return nil
}
