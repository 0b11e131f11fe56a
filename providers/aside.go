package providers

import "context"

// CallAside runs call on a goroutine of its own and returns its result, or
// ctx's error as soon as ctx ends: for an SDK call that waits, somewhere
// inside, on something deaf to its context (azcore's and gRPC's token
// refresh, each under a lock), so that a caller still leaves at its
// deadline. The call runs on until it returns; its result is then dropped.
//
// A panic in call is raised again on the caller's goroutine, as a
// *PanicError with call's stack, where the agent recovers a provider's
// panic; on call's own goroutine nothing could, and it would end the
// process. One after the caller has left is dropped with the result.
func CallAside[T any](ctx context.Context, call func() (T, error)) (T, error) {
	type result struct {
		v        T
		err      error
		panicked *PanicError
	}
	done := make(chan result, 1)
	go func() {
		defer func() {
			if v := recover(); v != nil {
				done <- result{panicked: Recovered(v, "", "", "")}
			}
		}()
		v, err := call()
		done <- result{v: v, err: err}
	}()
	select {
	case r := <-done:
		if r.panicked != nil {
			panic(r.panicked)
		}
		return r.v, r.err
	case <-ctx.Done():
		var zero T
		return zero, ctx.Err()
	}
}
