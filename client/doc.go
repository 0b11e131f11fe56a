// Package client is the Go client of the Sigil agent. A Client is one
// connection, safe for concurrent use, with requests pipelined over it: many
// goroutines may sign at once and each gets its own reply as soon as the agent
// has it. Signer adapts a key behind the agent to crypto.Signer, so it drops
// into tls.Certificate, x509.CreateCertificate(Request) and JOSE libraries.
//
// Errors the agent returns are *proto.Error values carrying a stable Code.
package client
