package faultnet

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if a goroutine of a relay (a read loop, a
// delayed send) or of a test is still running after the tests.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
