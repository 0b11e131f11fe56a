//go:build !unix

package pkcs11

import "io/fs"

// fileOwner: no uids here.
func fileOwner(fs.FileInfo) (int, bool) { return 0, false }
