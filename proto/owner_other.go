//go:build !unix

package proto

import "io/fs"

// fileOwner: no uids here.
func fileOwner(fs.FileInfo) (int, bool) { return 0, false }
