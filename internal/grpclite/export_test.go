package grpclite

import "time"

// SetPingAfter shortens the keepalive interval for a test.
func SetPingAfter(d time.Duration) (restore func()) {
	old := pingAfter
	pingAfter = d
	return func() { pingAfter = old }
}
