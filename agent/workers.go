package agent

import (
	"sync"
	"time"

	"github.com/sigil-agent/sigil/proto"
)

// workerPool runs Sign and Verify requests on goroutines that outlive one
// request. A fresh goroutine per request starts on an 8 KiB stack and grows it
// (copying) on every signature, since crypto and cgo calls need deep stacks:
// the cost the gokeyless measurements in ANCHORS.md point at. Idle workers
// wait on an unbuffered channel, so a hand-off succeeds only when one is
// free; otherwise a new worker starts. Concurrency stays bounded by the
// per-connection in-flight limit, not by the pool.
type workerPool struct {
	jobs        chan job
	idleTimeout time.Duration
	stopped     chan struct{} // closed by stop: idle workers end
	stopOnce    sync.Once
}

type job struct {
	c        *conn
	req      *proto.Request
	arrived  time.Time // when the request was read: its deadline runs from then
	waitSlot bool      // the tenant's in-flight place is still to be taken
}

func newWorkerPool(idleTimeout time.Duration) *workerPool {
	return &workerPool{jobs: make(chan job), idleTimeout: idleTimeout, stopped: make(chan struct{})}
}

// stop ends the idle workers, and each busy one once its job is done, so
// that none outlives the agent's Shutdown by its idle timeout.
func (p *workerPool) stop() { p.stopOnce.Do(func() { close(p.stopped) }) }

func (p *workerPool) run(j job) {
	select {
	case p.jobs <- j:
	default:
		go p.worker(j)
	}
}

func (p *workerPool) worker(j job) {
	j.c.handleAsync(j.req, j.arrived, j.waitSlot)
	idle := time.NewTimer(p.idleTimeout)
	defer idle.Stop()
	for {
		select {
		case j := <-p.jobs:
			j.c.handleAsync(j.req, j.arrived, j.waitSlot)
			idle.Reset(p.idleTimeout)
		case <-idle.C:
			return
		case <-p.stopped:
			return
		}
	}
}
