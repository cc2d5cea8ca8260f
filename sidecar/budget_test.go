package sidecar

import (
	"testing"
	"testing/synctest"
	"time"

	"github.com/fedmesh/fedmesh/internal/testutil"
)

func TestBudget(t *testing.T) {
	testutil.CheckGoroutines(t)
	synctest.Test(t, func(t *testing.T) {
		b := newBudget(RetryBudget{Ratio: 0.2, MinPerSecond: 1, Window: 10 * time.Second})
		allowed := func() (n int) {
			for b.allowRetry(time.Now()) {
				n++
			}
			return n
		}
		if n := allowed(); n != 10 { // 1/s over 10s with no requests
			t.Fatalf("reserve allowed %d retries, want 10", n)
		}
		for range 100 {
			b.request(time.Now())
		}
		if n := allowed(); n != 20 {
			t.Fatalf("100 requests allowed %d more retries, want 20", n)
		}
		time.Sleep(5 * time.Second)
		if n := allowed(); n != 0 {
			t.Fatalf("%d retries allowed within the window after the budget was spent", n)
		}
		time.Sleep(5 * time.Second) // the first bucket has left the window
		if n := allowed(); n != 10 {
			t.Fatalf("%d retries allowed after the window slid, want the reserve of 10", n)
		}
	})
}
