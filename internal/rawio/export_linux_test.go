package rawio

import "time"

// SetBusy sets Auto mode's state, for tests of both of its paths.
func SetBusy(b bool) { load.busy.Store(b) }

// SampleNow takes one sample of the process's CPU share now.
func SampleNow() {
	load.mu.Lock()
	defer load.mu.Unlock()
	sample(time.Since(epoch))
}
