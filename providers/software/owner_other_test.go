//go:build !unix

package software

import "testing"

func mkfifo(t *testing.T, _ string) { t.Skip("no FIFOs here") }
