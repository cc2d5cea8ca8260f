package peer

import (
	"crypto/tls"
	"strings"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
)

func TestTimeoutsStayWithinBound(t *testing.T) {
	for _, d := range []time.Duration{10 * time.Millisecond, 300 * time.Millisecond, time.Second, 7 * time.Second} {
		idle, ka := Timeouts(d)
		if idle+ka > d || ka <= 0 || idle <= ka {
			t.Errorf("dead-after %s: idle %s + keepalive %s", d, idle, ka)
		}
	}
}

func TestConfigValidation(t *testing.T) {
	tr := &quic.Transport{}
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"no transport", Config{Addr: "x:1", TLS: &tls.Config{}}, "no transport"},
		{"no tls", Config{Addr: "x:1", Transport: tr}, "no tls config"},
		{"no addr", Config{Transport: tr, TLS: &tls.Config{}}, "no address"},
		{"tiny dead-after", Config{Addr: "x:1", Transport: tr, TLS: &tls.Config{}, DeadAfter: time.Millisecond}, "under 10ms"},
		{"backoff range", Config{Addr: "x:1", Transport: tr, TLS: &tls.Config{}, MinBackoff: time.Second, MaxBackoff: time.Millisecond}, "not a range"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want %q", err, tc.want)
			}
		})
	}
	l, err := New(Config{Cluster: "east", Addr: "127.0.0.1:1", Transport: tr, TLS: &tls.Config{}})
	if err != nil {
		t.Fatal(err)
	}
	if l.Up() || l.Status().Up {
		t.Error("a link that never ran is up")
	}
	if _, err := l.OpenStream(t.Context()); err != ErrDown {
		t.Errorf("open stream on a down link: %v, want ErrDown", err)
	}
}

// TestRecentRTT: the recent RTT follows the last 32 samples while the p50
// still reflects the 256-sample window, across the ring's wrap.
func TestRecentRTT(t *testing.T) {
	l := &Link{}
	add := func(n int, d time.Duration) {
		for range n {
			l.rtts[l.nrtt%rttSamples] = d
			l.nrtt++
		}
	}
	add(250, time.Millisecond)
	add(RecentRTTSamples, 40*time.Millisecond) // wraps the ring
	st := l.Status()
	if st.RTTP50 != time.Millisecond || st.RTTRecent != 40*time.Millisecond || st.RTTSamples != rttSamples {
		t.Fatalf("p50 %v recent %v samples %d, want 1ms, 40ms, %d", st.RTTP50, st.RTTRecent, st.RTTSamples, rttSamples)
	}
	add(RecentRTTSamples/2+1, 2*time.Millisecond) // the recent median is back
	if st := l.Status(); st.RTTRecent != 2*time.Millisecond {
		t.Fatalf("recent %v after 17 samples of 2ms, want 2ms", st.RTTRecent)
	}
	l = &Link{}
	add(3, 5*time.Millisecond) // fewer samples than the window
	if st := l.Status(); st.RTTRecent != 5*time.Millisecond || st.RTTRecentMS != 5 {
		t.Fatalf("recent %v (%v ms) from 3 samples, want 5ms", st.RTTRecent, st.RTTRecentMS)
	}
}
