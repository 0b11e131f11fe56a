package journal

import (
	"errors"
	"fmt"
	"syscall"

	"github.com/cockroachdb/pebble/v2/vfs"
)

// mapTail allocates the tail file's blocks, maps it shared and touches
// every page, so that appends neither fault nor find the disk full.
func mapTail(fd uintptr, size int) ([]byte, error) {
	if fd == vfs.InvalidFd {
		return nil, errors.New("the file has no descriptor")
	}
	if err := syscall.Fallocate(int(fd), 0, 0, int64(size)); err != nil {
		return nil, fmt.Errorf("fallocate: %w", err)
	}
	m, err := syscall.Mmap(int(fd), 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mmap: %w", err)
	}
	// A page's first write faults (about 14 µs on these VMs): pay it here
	// for all of them rather than on appends.
	err = faultsAsErrors(func() {
		for i := 0; i < len(m); i += syscall.Getpagesize() {
			m[i] = 0
		}
	})
	if err != nil {
		_ = syscall.Munmap(m)
		return nil, fmt.Errorf("touch the mapping: %w", err)
	}
	return m, nil
}

func unmapTail(m []byte) error { return syscall.Munmap(m) }

// fdAtPath reports whether the file open as fd is the one at path (same
// device and inode); a path that names nothing is not.
func fdAtPath(fd uintptr, path string) (bool, error) {
	var open, named syscall.Stat_t
	if err := syscall.Fstat(int(fd), &open); err != nil {
		return false, fmt.Errorf("fstat: %w", err)
	}
	if err := syscall.Stat(path, &named); err != nil {
		if errors.Is(err, syscall.ENOENT) {
			return false, nil
		}
		return false, fmt.Errorf("stat: %w", err)
	}
	return open.Dev == named.Dev && open.Ino == named.Ino, nil
}
