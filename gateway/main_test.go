package gateway

import (
	"testing"

	"go.uber.org/goleak"

	"github.com/fedmesh/fedmesh/internal/testutil"
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

// checkLeaks fails t if a goroutine that started during it still runs once
// t and all its cleanups are done (testutil.CheckGoroutines: exact, by
// goroutine, with a wind-down wide enough for a loaded machine); call it
// first, so its cleanup runs last.
func checkLeaks(t *testing.T) {
	t.Helper()
	testutil.CheckGoroutines(t, leakOptions...)
}
