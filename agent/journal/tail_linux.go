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

// fileID names a file: its device and inode.
type fileID struct{ dev, ino uint64 }

// fdID returns the identity of the file open as fd.
func fdID(fd uintptr) (fileID, error) {
	var st syscall.Stat_t
	if err := syscall.Fstat(int(fd), &st); err != nil {
		return fileID{}, fmt.Errorf("fstat: %w", err)
	}
	return fileID{dev: uint64(st.Dev), ino: st.Ino}, nil
}

// pathID returns the identity of the file at path; an error wrapping
// os.ErrNotExist when there is none.
func pathID(path string) (fileID, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return fileID{}, fmt.Errorf("stat: %w", err)
	}
	return fileID{dev: uint64(st.Dev), ino: st.Ino}, nil
}

// fdAtPath reports whether the file open as fd is the one at path (same
// device and inode); a path that names nothing is not.
func fdAtPath(fd uintptr, path string) (bool, error) {
	open, err := fdID(fd)
	if err != nil {
		return false, err
	}
	named, err := pathID(path)
	if errors.Is(err, syscall.ENOENT) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	return open == named, nil
}
