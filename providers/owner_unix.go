//go:build unix

package providers

import (
	"io/fs"
	"syscall"
)

// FileOwner returns the uid that owns the file fi describes: the providers
// judge key files, PIN files and module copies' directories by it.
func FileOwner(fi fs.FileInfo) (int, bool) {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return 0, false
	}
	return int(st.Uid), true
}

// openNoBlock keeps an open of a FIFO from waiting for a writer.
const openNoBlock = syscall.O_NONBLOCK
