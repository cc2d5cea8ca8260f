package gateway

import (
	"testing"

	"go.uber.org/goleak"
)

// leakOptions are goroutines that belong to the process, not to a test.
var leakOptions = []goleak.Option{
	// klog's flush daemon, started by klog's init (client-go, used by the
	// RTT publication test, logs through klog).
	goleak.IgnoreTopFunction("k8s.io/klog/v2.(*flushDaemon).run.func1"),
}

// TestMain fails the package if anything the tests started (gateways,
// their connections and streams, clients, relays, servers) is still running
// after them.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, leakOptions...)
}

// checkLeaks fails t if a goroutine is still running once t and all its
// cleanups are done: an exact check, not a count, so call it first (its
// cleanup then runs last). The tests of this package are not parallel, so
// every goroutine left then is one that t (or a test before it) leaked.
func checkLeaks(t *testing.T) {
	t.Helper()
	t.Cleanup(func() { goleak.VerifyNone(t, leakOptions...) })
}
