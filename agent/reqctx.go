package agent

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// requestContext is a request's deadline that arms no timer until something
// waits on Done.
//
// Why not context.WithTimeout: adding a timer while no thread is asleep in
// the netpoller makes the Go runtime wake one (wakeNetPoller → wakep), so
// every request paid a futex wake-up and a thread spinning up on the other
// vCPU, dear on these VMs (a scheduler trace at 1 connection: a quarter of
// the agent's wake-ups came from this timer and the write deadline). On
// the common path nothing waits: the session pool and the journal try
// without blocking first and only check Err. A caller that does block calls
// Done, which arms the timer for what is left of the deadline then, so the
// context ends at the same time as one from WithDeadline would.
type requestContext struct {
	parent   context.Context
	deadline time.Time

	once     sync.Once
	armed    atomic.Pointer[context.Context] // set once Done was called
	cancel   context.CancelFunc              // valid once armed is set
	released atomic.Bool                     // the request is over: Canceled
}

// newRequestContext returns a context that ends at deadline (or the
// parent's, if that is earlier) or when parent ends. Call release when the
// request is done. It is not a (Context, CancelFunc) pair because the
// method value would cost an allocation per request.
func newRequestContext(parent context.Context, deadline time.Time) *requestContext {
	if d, ok := parent.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	return &requestContext{parent: parent, deadline: deadline}
}

// signContexts are a Sign's two contexts, in one allocation: the request's,
// which ends with its connection too, and its audit record's, the same
// deadline alone. A client gone while its signature's record was being
// appended used to cancel the append before the journal took the record:
// a signature made, withheld, and in no record.
type signContexts struct {
	request, record requestContext
}

func newSignContexts(conn context.Context, deadline time.Time) *signContexts {
	if d, ok := conn.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	return &signContexts{
		request: requestContext{parent: conn, deadline: deadline},
		record:  requestContext{parent: context.Background(), deadline: deadline},
	}
}

func (sc *signContexts) release() {
	sc.request.release()
	sc.record.release()
}

func (rc *requestContext) arm() context.Context {
	rc.once.Do(func() {
		ctx, cancel := context.WithDeadline(rc.parent, rc.deadline)
		rc.cancel = cancel
		rc.armed.Store(&ctx)
		// Armed after the request ended (a straggler): end it now. Either
		// this load sees release's store or release sees ours.
		if rc.released.Load() {
			cancel()
		}
	})
	return *rc.armed.Load()
}

// release ends the request's context, like a CancelFunc.
func (rc *requestContext) release() {
	rc.released.Store(true)
	if rc.armed.Load() != nil {
		rc.cancel()
	}
}

func (rc *requestContext) Deadline() (time.Time, bool) { return rc.deadline, true }

func (rc *requestContext) Done() <-chan struct{} { return rc.arm().Done() }

func (rc *requestContext) Err() error {
	if ctx := rc.armed.Load(); ctx != nil {
		return (*ctx).Err()
	}
	if rc.released.Load() {
		return context.Canceled
	}
	if err := rc.parent.Err(); err != nil {
		return err
	}
	if !time.Now().Before(rc.deadline) {
		return context.DeadlineExceeded
	}
	return nil
}

// Value asks the armed context once there is one: a context derived from
// this one (context.WithTimeout in a provider) then finds the cancelCtx
// behind Done and links to it, instead of starting a goroutine to watch it.
func (rc *requestContext) Value(key any) any {
	if ctx := rc.armed.Load(); ctx != nil {
		return (*ctx).Value(key)
	}
	return rc.parent.Value(key)
}
