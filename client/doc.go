// Package client is the Go client of the Sigil agent. A Client holds one
// connection at a time, safe for concurrent use, with requests pipelined over
// it: many goroutines may sign at once and each gets its own reply as soon as
// the agent has it. Signer adapts a key behind the agent to crypto.Signer, so
// it drops into tls.Certificate, x509.CreateCertificate(Request) and JOSE
// libraries.
//
// A Client outlives agent restarts. A call that finds its connection failed
// (the agent restarted, crashed or closed it) dials the same address again,
// with the same TLS config, says Hello and goes out on the new connection;
// Signers and TLS certificates made from the Client keep working, signing by
// kid. One dial runs at a time, and none starts within 100 ms of a failed one:
// while the agent is down, calls fail at once with UNAVAILABLE.
//
// Only a request that was never written goes out on the new connection. A
// request that was written and whose reply was lost with the connection fails
// with UNAVAILABLE and is not sent again: the agent may have signed it, and a
// second signature would be a second audit record, and wrong for a caller
// counting on at most one. Whether to retry is the caller's choice. On the
// Unix socket a connection the agent closed fails the write itself, so the
// first call after a restart goes through; over TCP the close is seen only
// after the request is written, so that first call fails this way.
//
// Close is final: the client does not redial after it, and calls fail with
// ErrClosed.
//
// Errors the agent returns are *proto.Error values carrying a stable Code.
package client
