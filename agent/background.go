package agent

import (
	"context"
	"time"
)

// goUntilShutdown runs fn on its own goroutine with a context that Shutdown
// cancels; Shutdown then waits for fn to return, in the order the
// goroutines were started, before it closes the keys and the journal.
func (a *Agent) goUntilShutdown(fn func(ctx context.Context)) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn(ctx)
	}()
	a.background = append(a.background, func() {
		cancel()
		select {
		case <-done:
		case <-time.After(stuckHandlerWait):
			// A scheduled rotation in a provider call deaf to its context
			// (a wedged HSM): Shutdown closes the providers and the journal
			// under it, as it does under a stuck request.
			a.log.Error("shutdown: a background task still runs; closing the providers and the journal under it")
		}
	})
}

// every runs fn every interval until Shutdown (first at once when now is
// set, else after one interval).
func (a *Agent) every(interval time.Duration, now bool, fn func(ctx context.Context)) {
	a.goUntilShutdown(func(ctx context.Context) {
		tick := time.NewTicker(interval)
		defer tick.Stop()
		if now {
			fn(ctx)
		}
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
				fn(ctx)
			}
		}
	})
}

// stopBackground ends what goUntilShutdown started.
func (a *Agent) stopBackground() {
	for _, stop := range a.background {
		stop()
	}
	a.background = nil
}
