//go:build !linux

package journal

import "errors"

// mapTail: the mapped tail is Linux-only; elsewhere it is written.
func mapTail(uintptr, int) ([]byte, error) {
	return nil, errors.ErrUnsupported
}

func unmapTail([]byte) error { return nil }

// fdAtPath: only a mapped tail asks, and there is none here.
func fdAtPath(uintptr, string) (bool, error) { return true, nil }

// fileID: only a mapped tail has one.
type fileID struct{}

func fdID(uintptr) (fileID, error)  { return fileID{}, errors.ErrUnsupported }
func pathID(string) (fileID, error) { return fileID{}, errors.ErrUnsupported }
