//go:build !linux

package client

import "net"

// unixConn is uc itself: the poll(2) connection is Linux's (pollconn.go).
func unixConn(uc *net.UnixConn) net.Conn { return uc }
