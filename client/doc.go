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
// while the agent is down, calls fail at once with UNAVAILABLE. Under
// systemd's socket activation (or over TCP to a host that does not answer)
// the socket of an agent that is down still takes the connect, or the dial
// hangs. The call that began the redial then waits for the Hello's reply up
// to its own deadline, and so does every call made meanwhile, each up to
// its own, without a dial of its own: an agent that answers in time (one
// starting, or a TLS reconnect over a long path) serves them all. Once a
// call's deadline passes after it waited half a second or more, every call
// made after that fails at once with UNAVAILABLE, while those waiting
// already wait on, each up to its own deadline (a call cancelled, or that
// waited less, changes nothing for the others); the dial and Hello go on
// up to 30 s from the dial. Once the agent answers, that connection is the
// client's and the next call goes out on it. A redial the agent leaves
// unanswered for the 30 s, or that such a call gave up on and that then
// failed (the agent's side dropped the connect), marks an outage: for the
// next 30 s every call waits for a redial 100 ms from its start at most,
// so with the agent down for long every call fails within 100 ms, and once
// it is back, the redial waiting then (its connection taken by the agent)
// or the next call's (answered within those 100 ms) gets through. A
// redialling caller without a deadline waits the 30 s at most. A redial's
// connection that the agent drops before answering anything after the Hello
// counts as a failed dial, so an agent that does so to every connection
// costs a retrying caller one connection per 100 ms, not one per call.
//
// A reply frame that stops partway (its length header, or part of its
// payload, in and the rest not coming) ends its connection once the rest has
// not come within 10 s of the first wait for it, the agent's default
// limits.frame_timeout: the calls on it fail with UNAVAILABLE, callers
// without a deadline too, and the next call dials anew. Until then a call
// with an earlier deadline fails with DEADLINE_EXCEEDED as usual. Over TLS
// the bound starts once part of the frame is decrypted: an agent stopping
// inside the first TLS record of a reply is bounded by callers' deadlines
// only.
//
// Only a request that was never written goes out on the new connection. A
// request that was written and whose reply was lost with the connection fails
// with UNAVAILABLE and is not sent again: the agent may have signed it, and a
// second signature would be a second audit record, and wrong for a caller
// counting on at most one. Whether to retry is the caller's choice. On the
// Unix socket a connection the agent closed fails the write itself, so the
// first call after a restart goes through. Over TCP a write to a closed
// connection succeeds, so a call on a connection that has had no reply for
// a millisecond or more first looks, without waiting, for the agent's close
// or last word (one system call), and goes out on a new connection when it
// finds one: the first call after a restart goes through there too.
//
// Close is final: the client does not redial after it, and calls fail with
// ErrClosed.
//
// On Linux a call waits for its reply in poll(2), on its own thread, rather
// than in Go's netpoller: on the Unix socket, and on the TCP connection
// under TLS. One thread wake-up per reply instead of two or three took
// 15-25% off a signature's latency at one connection on the test machines
// (docs/performance.md, "The Go client's wait"). One call per connection
// reads at a time, so this holds one thread per connection (two while a
// write waits for room), as a cgo call would, and its P until the runtime
// hands the P on. A process has at most GOMAXPROCS-1 connections so (none
// with GOMAXPROCS 1), the first ones dialled, counted at the dial; the
// others use the netpoller.
//
// Errors the agent returns are *proto.Error values carrying a stable Code,
// and only those: what the client finds itself is never one. Code gives
// the code of any error from this package: the agent's; DEADLINE_EXCEEDED
// for a call whose context ended, its deadline or its caller's
// cancellation; BAD_REQUEST for a call on a closed client (ErrClosed:
// Close is final); BAD_REQUEST (UNSUPPORTED_ALGORITHM for an algorithm)
// for a request the client refused before sending any of it, too large
// for one frame or with an argument the protocol cannot carry
// (ErrRefusedByClient: the agent never saw it, and it fails the same way
// every time); INTERNAL for a reply the client cannot take, a frame that
// does not decode or a public key that does not parse (ErrMalformedReply);
// UNAUTHENTICATED for a socket the client will not trust as the agent's
// (proto.ErrUntrustedSocketDir, until an operator fixes it);
// UNAVAILABLE for no agent or a lost connection, the one a caller may
// retry with backoff, and never for what the caller ended itself. An
// error's text says what happened once, led by its code's name
// ("UNAVAILABLE: Sign not sent: reconnect: connect to the agent: dial unix
// ...", "NOT_FOUND: ...") or, for what no code names (a caller's own
// cancellation, a closed client, a default socket directory the client
// will not trust), by "sigil: ". Match on Code, errors.Is and errors.As,
// not on the text: the causes (context errors, *net.OpError, ErrClosed,
// the agent's *proto.Error) stay in the chain.
package client
