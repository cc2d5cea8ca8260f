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

// TestAutoFollowsCPUShare: Auto mode turns busy after a stretch in which
// the process used most of a CPU, and idle again after one in which it
// slept.
func TestAutoFollowsCPUShare(t *testing.T) {
	defer rawio.SetBusy(false)
	rawio.SetBusy(false)
	rawio.SampleNow() // start a span
	for end := time.Now().Add(100 * time.Millisecond); time.Now().Before(end); {
		// spin: the process's CPU share over the span nears 1
	}
	rawio.SampleNow()
	if !rawio.Busy() {
		t.Fatal("not busy after 100 ms of spinning")
	}
	time.Sleep(150 * time.Millisecond)
	rawio.SampleNow()
	if rawio.Busy() {
		t.Fatal("still busy after 150 ms of sleep")
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
