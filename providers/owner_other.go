//go:build !unix

package providers

import "io/fs"

// FileOwner: no uids here.
func FileOwner(fs.FileInfo) (int, bool) { return 0, false }
