//go:build !unix

package providers

import "io/fs"

// FileOwner: no uids here.
func FileOwner(fs.FileInfo) (int, bool) { return 0, false }

// openNoBlock: no FIFOs to open here.
const openNoBlock = 0
