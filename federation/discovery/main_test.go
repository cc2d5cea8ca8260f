package discovery

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if any goroutine a test started (a stream, a
// directory rebuild, a gRPC server or client) is still running after the
// tests.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
