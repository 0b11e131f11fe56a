package agent

import (
	"errors"
	"strconv"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/sigil-agent/sigil/policy"
	"github.com/sigil-agent/sigil/proto"
)

// Limits that keep one client, or one tenant, from stopping the agent
// signing for everyone else. Each refusal has a stable code or is a clean
// close, is logged without secrets and counted in sigil_limit_refusals_total.
//
//   - Connections: limits.max_conns in all and limits.max_conns_per_tenant
//     per tenant. Past either the connection gets one UNAVAILABLE reply
//     (id 0) and is closed. The admin socket is exempt. Before either
//     counts it, a TCP connection's TLS handshake must finish, and at most
//     limits.max_handshakes may be under way: past it a new one is closed
//     at once, unanswered (its peer is no one yet).
//   - Requests: limits.max_in_flight_per_conn per connection (the reader
//     stops reading), and limits.max_in_flight_per_tenant Sign and Verify
//     requests per tenant being worked on at once. A request past the
//     tenant's bound waits, holding up only its own connection, for at most
//     its deadline (DEADLINE_EXCEEDED). This is what keeps a flooding
//     tenant from queueing thousands of requests ahead of another tenant's
//     for the same provider sessions and CPU.
//   - Time: limits.frame_timeout for a frame to arrive once its first byte
//     has (slow-loris) and for a new connection to say Hello;
//     limits.idle_timeout (off by default) for a quiet connection;
//     limits.write_timeout and a bound on queued reply bytes for a client
//     that does not read its replies.

// Refusal reasons, the values of the metric's "limit" label.
const (
	limitConns         = "max_conns"
	limitHandshakes    = "max_handshakes"
	limitTenantConns   = "max_conns_per_tenant"
	limitTenantFlight  = "max_in_flight_per_tenant"
	limitFrameTimeout  = "frame_timeout"
	limitIdleTimeout   = "idle_timeout"
	limitUnreadReplies = "unread_replies"
)

// tenantLoad is one tenant's share of the limits. It lives in
// Agent.tenants while the tenant has connections; a connection keeps its
// pointer, so requests in flight release into the right semaphore even
// after the entry is gone.
type tenantLoad struct {
	key      string
	conns    int           // guarded by Agent.mu
	inFlight chan struct{} // one token per Sign or Verify being worked on
	// waiting counts the tenant's requests waiting on workers for a
	// token, at most cap(inFlight): past that a connection's reader waits
	// itself, so that a flooding tenant parks a bounded number of
	// goroutines.
	waiting atomic.Int32
}

// mayWaitOnWorker takes one of the tenant's places to wait for a token on a
// worker; the worker gives it back (doneWaiting) once it has waited.
func (c *conn) mayWaitOnWorker() bool {
	t := c.load
	if t == nil {
		return true
	}
	if t.waiting.Add(1) > int32(cap(t.inFlight)) {
		t.waiting.Add(-1)
		return false
	}
	return true
}

func (c *conn) doneWaiting() {
	if c.load != nil {
		c.load.waiting.Add(-1)
	}
}

// principal names whom the per-tenant limits count: the policy's tenant,
// or without a policy (or for a peer no tenant claims, which Hello will
// refuse) the peer itself.
func (c *conn) principal() string {
	if c.a.policy != nil {
		if t, ok := c.a.policy.Set().TenantOf(c.identity()); ok {
			return "tenant:" + t
		}
	}
	if c.peer.unix {
		return "uid:" + strconv.FormatUint(uint64(c.peer.uid), 10)
	}
	return "peer:" + c.peer.String()
}

// beginHandshake counts a TLS connection about to identify its peer against
// max_handshakes; false: the limit refuses it.
func (a *Agent) beginHandshake() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.handshakes >= a.cfg.Limits.MaxHandshakes {
		return false
	}
	a.handshakes++
	return true
}

// endHandshake gives back what beginHandshake counted.
func (a *Agent) endHandshake() {
	a.mu.Lock()
	a.handshakes--
	a.mu.Unlock()
}

// admit counts an identified client connection against max_conns and its
// tenant's max_conns_per_tenant; it returns the limit that refuses it, or "".
func (a *Agent) admit(c *conn) string {
	if c.admin {
		return ""
	}
	if c.tlsAdmin() {
		if _, err := c.tenant(); err != nil {
			return "" // admin operations only, as on the admin socket
		}
	}
	key := c.principal()
	lim := a.cfg.Limits
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.clientConns >= lim.MaxConns {
		return limitConns
	}
	t := a.tenants[key]
	if t == nil {
		t = &tenantLoad{key: key, inFlight: make(chan struct{}, lim.MaxInFlightPerTenant)}
		a.tenants[key] = t
	}
	if t.conns >= lim.MaxConnsPerTenant {
		return limitTenantConns
	}
	t.conns++
	a.clientConns++
	c.load = t
	return ""
}

// unadmit gives back what admit counted.
func (a *Agent) unadmit(c *conn) {
	t := c.load
	if t == nil {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.clientConns--
	t.conns--
	if t.conns == 0 && a.tenants[t.key] == t {
		delete(a.tenants, t.key)
	}
}

// refuse sends the one reply a connection over a limit gets, then the
// caller closes it.
func (c *conn) refuse(limit string) {
	c.a.metrics.refused(limit)
	c.log.Warn("connection refused: limit reached", zap.String("limit", limit))
	c.sendFinal(proto.Unavailable, "too many connections ("+limit+"); try again later")
}

// acquireSlot takes one of the tenant's in-flight tokens for a Sign or
// Verify, waiting at most until the request's deadline (counted from
// arrived). When it returns false it has answered the request itself (or
// the connection is ending).
func (c *conn) acquireSlot(req *proto.Request, arrived time.Time) bool {
	switch c.takeTenantToken(c.requestTimeout(req)-time.Since(arrived), c.ctx.Done()) {
	case nil:
		return true
	case errNoTenantCapacity:
		// Answered before dispatch, which counts every other answer: no
		// tenant or key is resolved yet, so it is counted without them.
		c.a.metrics.request(req.Op, proto.DeadlineExceeded, &reqMeta{})
		c.send(&proto.Response{ID: req.ID, Code: proto.DeadlineExceeded, Msg: noTenantCapacityMsg}, policy.Decision{})
	}
	requestPool.Put(req)
	return false
}

var (
	errNoTenantCapacity = errors.New("no tenant capacity within the deadline")
	errConnEnding       = errors.New("connection ending")
)

const noTenantCapacityMsg = "no capacity within the deadline: this tenant has limits.max_in_flight_per_tenant requests in flight"

// takeTenantToken waits up to d for one of the tenant's in-flight tokens,
// or until done is closed.
// tryTenantToken takes one of the tenant's in-flight tokens if one is free
// now; releaseSlot gives it back.
func (c *conn) tryTenantToken() bool {
	if c.load == nil {
		return true
	}
	select {
	case c.load.inFlight <- struct{}{}:
		return true
	default:
		return false
	}
}

func (c *conn) takeTenantToken(d time.Duration, done <-chan struct{}) error {
	if c.tryTenantToken() {
		return nil // a token was free (or there is no tenant: the admin socket)
	}
	if d <= 0 {
		c.a.metrics.refused(limitTenantFlight)
		return errNoTenantCapacity
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case c.load.inFlight <- struct{}{}:
		return nil
	case <-t.C:
		c.a.metrics.refused(limitTenantFlight)
		return errNoTenantCapacity
	case <-done:
		return errConnEnding
	}
}

// releaseSlot gives back a token acquireSlot took.
func (c *conn) releaseSlot() {
	if c.load != nil {
		<-c.load.inFlight
	}
}
