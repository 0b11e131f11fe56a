package client

import "time"

// SetFrameTimeout sets the bound on a reply frame's rest for a test, which
// need not wait the default's 10 s, and returns what restores it.
func SetFrameTimeout(d time.Duration) (restore func()) {
	was := frameTimeout
	frameTimeout = d
	return func() { frameTimeout = was }
}

// SetRedialWait sets the bound on a redial's dial and Hello for a test,
// which need not wait the default's 30 s, and returns what restores it.
func SetRedialWait(d time.Duration) (restore func()) {
	was := redialWait
	redialWait = d
	return func() { redialWait = was }
}
