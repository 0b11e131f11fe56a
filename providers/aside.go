package providers

import "context"

// CallAside runs call on a goroutine of its own and returns its result, or
// ctx's error as soon as ctx ends: for an SDK call that waits, somewhere
// inside, on something deaf to its context (azcore's and gRPC's token
// refresh, each under a lock), so that a caller still leaves at its
// deadline. The call runs on until it returns; its result is then dropped.
func CallAside[T any](ctx context.Context, call func() (T, error)) (T, error) {
	type result struct {
		v   T
		err error
	}
	done := make(chan result, 1)
	go func() {
		v, err := call()
		done <- result{v, err}
	}()
	select {
	case r := <-done:
		return r.v, r.err
	case <-ctx.Done():
		var zero T
		return zero, ctx.Err()
	}
}
