package tunnel

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if a goroutine a test started is still
// running after the tests.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
