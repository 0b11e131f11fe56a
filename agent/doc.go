// Package agent is the Sigil daemon: it loads the configuration, opens the key
// providers, listens on the Unix socket, and serves the wire protocol with one
// reader and one writer goroutine per connection. Requests may be pipelined;
// replies go out as soon as each is ready, coalesced into as few writes as the
// moment allows. Errors from providers are mapped to wire codes in one place
// (codes.go). Policy (package policy) and the audit journal join the request
// path here as they are built.
package agent
