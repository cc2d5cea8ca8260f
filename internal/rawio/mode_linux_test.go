package rawio_test

import (
	"net"
	"strings"
	"testing"
	"time"

	"github.com/fedmesh/fedmesh/internal/rawio"
)

// TestAutoBothPaths: a Conn in Auto mode moves 8 MiB each way correctly,
// starting on the scheduler's syscall path (not busy) and starting on raw
// system calls (busy). The transfer's own CPU use may flip the mode on the
// way, which must not matter either.
func TestAutoBothPaths(t *testing.T) {
	defer rawio.SetBusy(false)
	for _, busy := range []bool{false, true} {
		rawio.SetBusy(busy)
		w, p := pairMode(t, rawio.Auto)
		roundTrip(t, w, p)
	}
}

// TestAutoFollowsReadRate: Auto mode turns busy once the process's read
// rate, averaged over about 100 ms, reaches 7,000 a second, and idle once
// it is under 5,000; in between it keeps its mode, and a short burst does
// not flip it.
func TestAutoFollowsReadRate(t *testing.T) {
	defer rawio.ResetLoad()
	rawio.ResetLoad()
	ms := time.Millisecond
	var now time.Duration
	var reads uint64
	step := func(d time.Duration, perSecond int) bool {
		now += d
		reads += uint64(perSecond) * uint64(d) / uint64(time.Second)
		rawio.Sample(now, reads)
		return rawio.Busy()
	}
	for range 20 { // 2,000 req/s: about 4,000 reads a second
		if step(20*ms, 4000) {
			t.Fatal("busy at 4,000 reads a second")
		}
	}
	if step(20*ms, 12000) { // one 20 ms burst: the average moves a fifth of the way
		t.Fatal("busy after a single 20 ms burst of 12,000 a second")
	}
	step(20*ms, 4000)
	for range 3 { // spans under 20 ms are not samples
		if step(5*ms, 100000) {
			t.Fatal("busy from spans shorter than a sample")
		}
	}
	busyAfter := 0
	for i := range 10 { // saturation: some 30,000 a second
		if step(20*ms, 30000) {
			busyAfter = i + 1
			break
		}
	}
	if busyAfter == 0 || busyAfter > 2 {
		t.Fatalf("busy after %d samples of 30,000 reads a second, want 1 or 2", busyAfter)
	}
	for range 20 { // 6,000 a second: between the thresholds, stays busy
		if !step(20*ms, 6000) {
			t.Fatal("idle again at 6,000 reads a second, inside the gap")
		}
	}
	for range 20 {
		step(20*ms, 4000)
	}
	if rawio.Busy() {
		t.Fatal("still busy after 400 ms at 4,000 reads a second")
	}
	for range 20 { // and from idle, 6,000 keeps it idle
		if step(20*ms, 6000) {
			t.Fatal("busy at 6,000 reads a second, inside the gap, coming from idle")
		}
	}
	for range 3 {
		step(20*ms, 30000)
	}
	if !rawio.Busy() {
		t.Fatal("not busy at 30,000 reads a second")
	}
	if step(time.Second, 0) { // a span of 100 ms or more counts alone
		t.Fatal("still busy after a second without reads")
	}
}

func TestWrapModeStd(t *testing.T) {
	w, _ := pair(t)
	tc := w.(*rawio.Conn).TCPConn()
	if got := rawio.WrapMode(tc, rawio.Std); got != net.Conn(tc) {
		t.Fatalf("WrapMode(conn, Std) = %T, want the *net.TCPConn itself", got)
	}
}

func TestParseMode(t *testing.T) {
	for _, m := range []rawio.Mode{rawio.Auto, rawio.Raw, rawio.Std} {
		got, err := rawio.ParseMode(m.String())
		if err != nil || got != m {
			t.Errorf("ParseMode(%q) = %v, %v", m.String(), got, err)
		}
	}
	if _, err := rawio.ParseMode("fast"); err == nil || !strings.Contains(err.Error(), `"fast": want auto, raw or std`) {
		t.Errorf("ParseMode(fast) error %v", err)
	}
}
