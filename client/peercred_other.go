//go:build !linux

package client

import "net"

// checkPeerUID: SO_PEERCRED is Linux's; elsewhere the directory check alone
// stands.
func checkPeerUID(net.Conn) error { return nil }
