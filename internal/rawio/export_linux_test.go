package rawio

import "time"

// SetBusy sets Auto mode's state, for tests of both of its paths.
func SetBusy(b bool) { load.busy.Store(b) }

// Sample feeds Auto mode a sample: reads counted by now (since a start of
// the test's own choosing, after a ResetLoad).
func Sample(now time.Duration, reads uint64) {
	load.mu.Lock()
	defer load.mu.Unlock()
	sample(now, reads)
}

// ResetLoad forgets every sample.
func ResetLoad() {
	load.mu.Lock()
	defer load.mu.Unlock()
	load.wall, load.n, load.rate = 0, 0, 0
	load.busy.Store(false)
}
