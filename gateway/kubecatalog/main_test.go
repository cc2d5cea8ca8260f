package kubecatalog

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if a goroutine the tests started (the
// catalog's informers, the control plane's) is still running after them.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// klog's flush daemon, started by klog's init (client-go logs
		// through klog): it lives as long as the process.
		goleak.IgnoreTopFunction("k8s.io/klog/v2.(*flushDaemon).run.func1"))
}
