package client

import (
	"context"
	"testing"
	"time"
)

// A reconnect that has ended with the agent's answer, but whose goroutine
// has not yet settled it, while it is also abandoned (the caller that
// marked it gave up just as the agent answered): a call that finds it
// takes the agent's connection, not "the agent has not answered".
// Reviewer CN: select picked either, and 106 of 200 calls failed.
func TestAnsweredReconnectWinsOverAbandoned(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	dead := &conn{done: make(chan struct{})}
	for i := range 200 {
		c := &Client{redialToken: make(chan struct{}, 1), closing: ctx, closeNow: cancel}
		c.redialToken <- struct{}{}
		c.cur.Store(dead)
		fresh := &conn{done: make(chan struct{})}
		r := &reconnect{start: time.Now().Add(-time.Second), done: make(chan struct{}), abandoned: make(chan struct{}), cn: fresh}
		r.abandon()
		close(r.done)
		c.reconnecting = r
		if cn, _, _, err := c.redialOnce(ctx, dead); cn != fresh {
			t.Fatalf("call %d: %v, %v; want the answered connection", i, cn, err)
		}
		if cn, err := c.await(ctx, r, false); cn != fresh {
			t.Fatalf("call %d waiting: %v, %v; want the answered connection", i, cn, err)
		}
	}
}
