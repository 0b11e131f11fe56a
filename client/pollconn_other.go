//go:build !linux

package client

import (
	"net"
	"syscall"
)

// socketConn is a connected stream socket of the net package.
type socketConn interface {
	net.Conn
	syscall.Conn
}

// pollingConn is sc itself: the poll(2) connection is Linux's
// (pollconn.go).
func pollingConn(sc socketConn) net.Conn { return sc }
